"""The state of one Engine.generate() call, and the RunRecord it ends with.

RunState holds the queue of prompts, the free KV rows, the live sequences and the counters of the
decode loop; `build_record` turns it, the stage timer and the expert store's accounting into the
RunRecord (runtime/run_record.py) that the report reads.
"""
from __future__ import annotations

import time
from collections import deque

from specmoe.runtime.device import git_commit, kernel_backends, machine_description
from specmoe.runtime.k_policy import DynamicK
from specmoe.runtime.latency import LatencyTracker, acceptance_by_position
from specmoe.runtime.thread_env import thread_env_record
from specmoe.runtime.run_record import RunRecord, StageTimer, stage_summary


class RunState:
    """Queue, rows, live sequences and counters of one generate() call."""

    def __init__(self, seqs: list, rows: int, store=None):
        self.seqs = seqs
        self.rows = rows
        self.queue = deque(seqs)
        self.free_rows = list(range(rows - 1, -1, -1))
        self.active: list = []
        self.iterations = 0
        self.prefill_s = self.decode_s = 0.0
        self.generated = self.decode_tokens = self.prompt_tokens = 0
        self.accepted = self.trials = self.verified = 0
        self.hist: dict[int, int] = {}
        self.k_hist: dict[int, int] = {}
        self.live: list[int] = []          # sequences in each decode iteration
        self.iteration_s: list[float] = []  # wall seconds of each decode iteration
        self.emitted: list[int] = []       # tokens each decode iteration emitted
        self.timeline: list[dict] = []     # the stages of decode iteration TIMELINE_ITERATION (engine.py)
        self.memory: dict = {}             # runtime/memory_usage.py measured_memory, set when the run ends
        # the expert store's counters at the start: the run's own are the differences
        self.store0 = {k: getattr(store, k, 0) for k in ("h2d_bytes", "h2d_experts", "h2d_unused_experts",
                                                         "cache_fill_bytes")} if store is not None else None
        self.t_start = time.perf_counter()
        self.latency = LatencyTracker(self.t_start)    # TTFT, TPOT, ITL (runtime/latency.py)

    def record_iteration(self, st, dt: float) -> None:
        self.iterations += 1
        self.decode_s += dt
        self.decode_tokens += st.emitted
        self.generated += st.emitted
        self.k_hist[st.k] = self.k_hist.get(st.k, 0) + 1
        self.live.append(len(st.accepted))
        self.iteration_s.append(float(dt))
        self.emitted.append(int(st.emitted))
        if st.k > 0:
            for a in st.accepted:
                self.hist[a] = self.hist.get(a, 0) + 1
                self.accepted += a
                self.trials += a + (1 if a < st.k else 0)
                self.verified += 1

    def store_delta(self, store, key: str) -> int:
        return getattr(store, key) - self.store0[key] if store is not None else 0


def _h2d_fields(run: RunState, timer: StageTimer, totals: dict, store) -> dict:
    dec_bytes = timer.counters["decode"].get("h2d_bytes", 0)
    busy_s = totals.get("target.h2d", 0.0)
    return dict(h2d_bytes=run.store_delta(store, "h2d_bytes"), h2d_experts=run.store_delta(store, "h2d_experts"),
                h2d_unused_experts=run.store_delta(store, "h2d_unused_experts"),
                h2d_decode_bytes=dec_bytes, h2d_busy_s=busy_s,
                h2d_GBps=dec_bytes / busy_s / 1e9 if busy_s > 0 else None,
                h2d_busy_fraction=busy_s / run.decode_s if run.decode_s > 0 else None,
                h2d_prefill_bytes=timer.counters["prefill"].get("h2d_bytes", 0),
                cache_fill_bytes=run.store_delta(store, "cache_fill_bytes"))


def build_record(eng, run: RunState, timer: StageTimer, dec, policy, outputs: dict, error: BaseException | None,
                 total_s: float, *, k0: int, mode: str, temperature: float, seed: int, max_new_tokens: int) -> RunRecord:
    """The RunRecord of a generate() call on Engine `eng`."""
    means, totals, pre = stage_summary(timer, run.iterations, run.prefill_s)
    pl, store = eng.plan.placement, eng.store
    return RunRecord(
        complete=error is None, stages=means, stage_totals_s=totals, prefill_stage_totals_s=pre,
        iterations=run.iterations,
        decode_tokens_per_s=run.decode_tokens / run.decode_s if run.decode_s > 0 else 0.0,
        end_to_end_tokens_per_s=run.generated / total_s if total_s > 0 else 0.0,
        acceptance_histogram={str(a): n for a, n in sorted(run.hist.items())},
        mean_accepted=run.accepted / run.verified if run.verified else 0.0,
        backends=kernel_backends(), machine=machine_description(eng.device), git_commit=git_commit(),
        plan_hashes=dict(eng.plan.input_hashes), draft_len=k0, batch=eng.plan.batch, rows=run.rows,
        micro_batches=eng.plan.micro_batches, token_flips=dec.flips, flip_gap=eng.flip_gap,
        error=None if error is None else f"{type(error).__name__}: {error}",
        sequences=len(run.seqs), finished_sequences=len(outputs), generated_tokens=run.generated,
        decode_tokens=run.decode_tokens, prompt_tokens=run.prompt_tokens, prefill_time_s=run.prefill_s,
        decode_time_s=run.decode_s, total_time_s=total_s, temperature=float(temperature), seed=int(seed),
        max_new_tokens=max_new_tokens, dynamic_k=isinstance(policy, DynamicK), dynamic_k_source=policy.source,
        draft_len_histogram={str(a): n for a, n in sorted(run.k_hist.items())},
        acceptance_oracle=eng.acceptance_oracle, device=str(eng.device),
        dtype=str(eng.dtype).replace("torch.", ""),
        weights={"target": eng.target_source.description,
                 "draft": eng.draft_source.description if eng.draft_source else "none"},
        prefetch_next_layer=mode != "off", expert_streaming=mode,
        host_io=eng.target.host_io if mode == "next" else "direct",
        schedule=eng.plan.schedule.to_dict(), replanned=eng.replanned,
        calibration_warnings=list(eng.calibration_warnings),
        **_h2d_fields(run, timer, totals, store),
        draft_kv_gpu_sequences=pl.draft_kv_gpu_sequences, target_kv_gpu_sequences=pl.target_kv_gpu_sequences,
        expert_cache_slots=list(pl.expert_cache_slots), profile_stages=eng.profile_stages,
        cached_experts_planned=bool(pl.cached_experts), experts_rebalanced=eng.experts_rebalanced,
        cached_experts={str(l): list(e) for l, e in store.cached.items()} if store is not None else {},
        live_by_iteration=list(run.live), iteration_times_s=list(run.iteration_s),
        emitted_by_iteration=list(run.emitted), timeline=list(run.timeline), memory=dict(run.memory),
        latency=run.latency.summary(), acceptance_by_position=acceptance_by_position(run.hist),
        thread_env=thread_env_record(),
    )
