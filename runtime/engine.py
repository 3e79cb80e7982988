"""Engine: executes a Plan on a target (MoE) and a draft checkpoint and measures every stage.

    eng = Engine(plan, "models/tiny-moe", "models/tiny-draft")
    res = eng.generate(["Once upon a time"], max_new_tokens=32)   # greedy; temperature>0 samples
    res.outputs[0].text, res.record.to_json("run.json")

Continuous batching: `plan.batch` KV rows; sequences leave at EOS or max_new_tokens and queued
prompts are prefilled into free rows at iteration boundaries. A plan that does not fit the free
memory is refused before any weight is loaded. An error or Ctrl-C inside generate() keeps what
finished: the partial GenerateResult (record.complete = False) is in `engine.last_result` and
on the exception as `.partial_result`.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from specmoe.planner.errors import SpecError
from specmoe.planner.plan import Plan
from specmoe.planner.stages import Stage

from specmoe.runtime.weights.checkpoint import DTYPES, load_tokenizer
from specmoe.runtime.device import git_commit, kernel_backends, machine_description, pick_device
from specmoe.runtime.model.draft import DraftModel
from specmoe.runtime.engine_plan import plan_for_checkpoint
from specmoe.runtime.model.expert_store import ExpertStore
from specmoe.runtime.k_policy import CallableK, ConstantK, DynamicK, IterationInfo
from specmoe.runtime.model.kv_cache import SplitKVCache
from specmoe.runtime.memory_check import check_fits, requirement
from specmoe.runtime.run_record import RunRecord, StageTimer, stage_summary
from specmoe.runtime.speculative import Sequence, SpeculativeDecoder
from specmoe.runtime.model.target import HOST_IO, TargetModel, stream_mode
from specmoe.runtime.weights.sources import WeightSource, as_weight_source

__all__ = ["Engine", "GenerateResult", "SequenceOutput", "plan_for_checkpoint"]


@dataclass
class SequenceOutput:
    index: int
    prompt: str | list[int]
    token_ids: list[int]           # generated tokens only
    text: str | None
    finish_reason: str
    decode_iterations: int = 0     # decode iterations the sequence was live in
    accepted_drafts: int = 0       # drafts accepted over them

    def to_dict(self) -> dict:
        return {"index": self.index, "prompt": self.prompt, "text": self.text, "token_ids": self.token_ids,
                "finish_reason": self.finish_reason, "decode_iterations": self.decode_iterations,
                "accepted_drafts": self.accepted_drafts}


@dataclass
class GenerateResult:
    outputs: list[SequenceOutput]  # finished sequences in prompt order
    record: RunRecord
    unfinished: list[int] = field(default_factory=list)   # prompt indices without output (after an error)


def _config_of(x: Any):
    if isinstance(x, WeightSource):
        return x.config
    from specmoe.runtime.weights.checkpoint import read_config

    return read_config(x)


class Engine:
    def __init__(self, plan: Plan | str | Path, target_dir: str | Path | WeightSource,
                 draft_dir: str | Path | WeightSource | None = None, device: str | torch.device | None = None, *,
                 dtype: torch.dtype | str | None = None, profile_stages: bool = False, dynamic_k: bool = False,
                 k_policy: Callable[[IterationInfo], int] | None = None, max_k: int = 8,
                 acceptance_oracle: float | None = None, check_memory: bool = True,
                 progress: Callable[[int], None] | None = None, flip_gap: float = 1e-4,
                 prefill_chunk_tokens: int = 16384, prefetch_next_layer: bool | str | None = None,
                 expert_host: dict | None = None, host_io: str = "auto"):
        self.plan = plan if isinstance(plan, Plan) else Plan.from_json(plan)
        self.device = pick_device(device)
        # ---- everything below up to the weights reads configs only ----
        tcfg = _config_of(target_dir)
        dcfg = _config_of(draft_dir) if draft_dir is not None else None
        self._check_plan(tcfg, dcfg)
        if dtype is None:
            dtype = tcfg.dtype
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise SpecError("dtype", f"unknown dtype {dtype!r}", f"one of {', '.join(DTYPES)}")
            dtype = DTYPES[dtype]
        if dtype == torch.float16 and self.device.type == "cpu":
            dtype = torch.float32
        self.dtype = dtype
        self.kv_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
        self.profile_stages, self.dynamic_k, self.max_k = profile_stages, dynamic_k, int(max_k)
        self.k_policy, self.acceptance_oracle, self.flip_gap = k_policy, acceptance_oracle, float(flip_gap)
        self.prefill_chunk_tokens = int(prefill_chunk_tokens)
        self.prefetch_next_layer = prefetch_next_layer   # None: "next" on CUDA when experts stream, else "off"
        if host_io not in ("auto",) + HOST_IO:
            raise SpecError("host_io", f"{host_io!r} is not a transfer mode", f"one of auto, {', '.join(HOST_IO)}")
        try:
            stream_mode(prefetch_next_layer if prefetch_next_layer is not None else False)
        except ValueError as e:
            raise SpecError("prefetch_next_layer", str(e), "give None (auto), True/False, 'next', 'predict' or 'off'") \
                from None
        if acceptance_oracle is not None and not 0 <= acceptance_oracle <= 1:
            raise SpecError("acceptance_oracle", f"{acceptance_oracle} is outside [0, 1]", "give a rate such as 0.8")
        wl = self.plan.workload
        plan_ctx = int(wl.get("prompt_len", 0)) + int(wl.get("gen_len", 0)) + self.plan.draft_len + 2
        self.memory = requirement(tcfg, dcfg, self.plan, dtype, plan_ctx,
                                  self.plan.batch * max(self.plan.draft_len + 1, int(wl.get("prompt_len", 1))))
        if check_memory:
            self.memory["free_at_start"] = check_fits(self.memory, self.device)
        # ---- weights ----
        tsrc = as_weight_source(target_dir)
        dsrc = as_weight_source(draft_dir) if draft_dir is not None else None
        self.target_source, self.draft_source = tsrc, dsrc
        self.tcfg, self.dcfg = tsrc.config, (dsrc.config if dsrc else None)
        pl = self.plan.placement
        self.store = ExpertStore(tsrc, self.device, dtype, pl.expert_cache_slots, pl.cpu_expert_layers,
                                 pl.streaming_buffers, progress, host=expert_host) if self.tcfg.is_moe else None
        self.target = TargetModel(tsrc, self.store, self.device, dtype)
        self.host_io = host_io
        self.draft = DraftModel(dsrc, self.device, dtype) if dsrc is not None else None
        self.tokenizer = load_tokenizer(tsrc.path) if tsrc.path is not None else None
        self.eos_ids = tuple(self.tcfg.eos_token_ids)
        self.last_result: GenerateResult | None = None
        self._cache_balanced = False

    # host_io: how the target's attention over host KV rows moves q/k/v and its output when the streaming
    # schedule is "next": "direct" (SplitKVCache.attend's own transfers per micro-batch), "pinned" (once per
    # layer through pinned buffers), "zero-copy" (pinned in, output read by a GPU kernel from pinned memory);
    # "auto": pinned on CUDA, direct on the CPU.

    def expert_streaming(self) -> str:
        """The streaming schedule generate() uses: prefetch_next_layer resolved (None: "next" where experts
        stream on a CUDA device, "off" elsewhere; on the CPU the copies are synchronous, so streaming ahead
        only moves them earlier)."""
        p = self.prefetch_next_layer
        if p is None:
            return "next" if (self.device.type == "cuda" and self.store is not None and self.store.streaming_layers) \
                else "off"
        return stream_mode(p)

    # ---- checks ----
    def _check_plan(self, tcfg, dcfg) -> None:
        p = self.plan
        pm = p.model
        for key, ours in (("num_layers", tcfg.num_layers), ("num_experts", tcfg.num_experts),
                          ("hidden", tcfg.hidden)):
            if int(pm.get(key, -1)) != ours:
                raise SpecError(f"plan.model.{key}", f"is {pm.get(key)} but the target checkpoint has {ours}",
                                "this plan was made for another model: re-run `specmoe plan` for this checkpoint")
        if p.draft_len > 0 and dcfg is None:
            raise SpecError("draft", f"the plan speculates with k={p.draft_len} but no draft was given",
                            "pass --draft DIR, or --draft-len 0")
        if dcfg is not None and dcfg.vocab_size < tcfg.vocab_size // 2:
            raise SpecError("draft", f"vocabulary {dcfg.vocab_size} does not match the target's {tcfg.vocab_size}",
                            "use a draft with the target's tokenizer")

    def _prepare(self, prompts, max_new_tokens: int) -> list[Sequence]:
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise SpecError("prompts", "must be a non-empty list of strings or of token-id lists", "give prompts")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise SpecError("max_new_tokens", f"must be a positive integer, got {max_new_tokens!r}", "e.g. 64")
        seqs = []
        V = self.tcfg.vocab_size
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise SpecError("prompts", "text prompts need a tokenizer.json in the target checkpoint",
                                    "give token ids, or a checkpoint with a tokenizer")
                ids, text = self.tokenizer.encode(p), p
            elif isinstance(p, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                ids, text = [int(t) for t in p], None
            else:
                raise SpecError(f"prompts[{i}]", f"is a {type(p).__name__}", "give a string or a list of token ids")
            if not ids:
                raise SpecError(f"prompts[{i}]", "is empty (no tokens)", "give at least one token")
            bad = [t for t in ids if not 0 <= t < V]
            if bad:
                raise SpecError(f"prompts[{i}]", f"token id {bad[0]} is outside the vocabulary [0, {V})", "fix the ids")
            seqs.append(Sequence(i, ids, max_new_tokens, prompt_text=text))
        return seqs

    def _policy(self, k0: int):
        if self.k_policy is not None:
            return CallableK(self.k_policy, max(self.max_k, k0))
        if self.dynamic_k and self.draft is not None and k0 > 0:
            return DynamicK(self.plan, k0, max(self.max_k, k0))
        return ConstantK(k0)

    def _decode(self, ids: list[int]) -> str | None:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else None

    # ---- generation ----
    def generate(self, prompts, max_new_tokens: int = 32, temperature: float = 0.0, seed: int = 0,
                 draft_len: int | None = None, on_finish: Callable[[SequenceOutput], None] | None = None) -> GenerateResult:
        seqs = self._prepare(prompts, max_new_tokens)
        if not isinstance(temperature, (int, float)) or temperature < 0 or temperature != temperature:
            raise SpecError("temperature", f"must be >= 0, got {temperature!r}", "0 for greedy decoding")
        k0 = self.plan.draft_len if draft_len is None else draft_len
        if isinstance(k0, bool) or not isinstance(k0, int) or k0 < 0:
            raise SpecError("draft_len", f"must be an integer >= 0, got {k0!r}", "0 disables speculation")
        if k0 > 0 and self.draft is None:
            raise SpecError("draft_len", f"is {k0} but the engine has no draft model", "give a draft or use 0")
        policy = self._policy(k0)
        longest = max(len(s.prompt) for s in seqs)
        capacity = longest + max_new_tokens + policy.max_k + 2
        for name, cfg in (("target", self.tcfg), ("draft", self.dcfg)):
            if cfg is None:
                continue
            if capacity > cfg.max_position_embeddings:
                raise SpecError("max_new_tokens", f"prompt ({longest}) + new tokens ({max_new_tokens}) exceeds the "
                                f"{name}'s max_position_embeddings {cfg.max_position_embeddings}", "generate fewer tokens")
            if cfg.sliding_window is not None and capacity > cfg.sliding_window:
                raise SpecError("max_new_tokens", f"the context reaches {capacity} tokens, beyond the {name}'s sliding "
                                f"window {cfg.sliding_window} (not supported)", "use shorter prompts or outputs")
        B = self.plan.batch
        req = requirement(self.tcfg, self.dcfg, self.plan, self.dtype, capacity, B * (policy.max_k + 1))
        kv_need = {"device_bytes": req["device_breakdown"].get("target_kv", 0) + req["device_breakdown"].get("draft_kv", 0),
                   "host_bytes": req["host_breakdown"].get("target_kv", 0) + req["host_breakdown"].get("draft_kv", 0),
                   "device_breakdown": {k: v for k, v in req["device_breakdown"].items() if k.endswith("_kv")},
                   "host_breakdown": {k: v for k, v in req["host_breakdown"].items() if k.endswith("_kv")}}
        check_fits(kv_need, self.device)
        pl = self.plan.placement
        t, d = self.tcfg, self.dcfg
        tkv = SplitKVCache(t.num_layers, B, pl.target_kv_gpu_sequences, t.num_kv_heads, capacity, t.head_dim,
                           self.device, self.kv_dtype, self.kv_dtype, decode_kernel=False)
        dkv = SplitKVCache(d.num_layers, B, pl.draft_kv_gpu_sequences, d.num_kv_heads, capacity, d.head_dim,
                           self.device, self.kv_dtype, self.kv_dtype, decode_kernel=True) if d is not None else None
        timer = StageTimer(self.device, self.profile_stages)
        mode = self.expert_streaming()
        self.target.host_io = hio = ("pinned" if self.device.type == "cuda" else "direct") if self.host_io == "auto" \
            else self.host_io
        dec = SpeculativeDecoder(self.target, self.draft, tkv, dkv, timer, self.plan.micro_batches, self.eos_ids,
                                 temperature, seed, flip_gap=self.flip_gap, oracle_alpha=self.acceptance_oracle,
                                 prefill_chunk_tokens=self.prefill_chunk_tokens, prefetch=mode)
        run = _RunState()
        queue, free_rows, active = deque(seqs), list(range(B - 1, -1, -1)), []
        outputs: dict[int, SequenceOutput] = {}
        h2d0 = self.store.h2d_bytes if self.store else 0
        hx0 = self.store.h2d_experts if self.store else 0
        hu0 = self.store.h2d_unused_experts if self.store else 0
        fill0 = self.store.cache_fill_bytes if self.store else 0
        error: BaseException | None = None
        t_start = time.perf_counter()

        def finish(s: Sequence):
            out = SequenceOutput(s.index, s.prompt_text if s.prompt_text is not None else s.prompt, list(s.generated),
                                 self._decode(s.generated), s.finish_reason or "length", s.decode_iterations,
                                 s.accepted_drafts)
            outputs[s.index] = out
            free_rows.append(s.row)
            if on_finish is not None:
                on_finish(out)

        try:
            while queue or active:
                if queue and free_rows:
                    newcomers = []
                    while queue and free_rows:
                        s = queue.popleft()
                        s.row = free_rows.pop()
                        newcomers.append(s)
                    t0 = time.perf_counter()
                    dec.prefill(newcomers)
                    run.prefill_s += time.perf_counter() - t0
                    run.prompt_tokens += sum(len(s.prompt) for s in newcomers)
                    run.generated += len(newcomers)
                    if self.store is not None and not self._cache_balanced and self.store.has_statistics:
                        self.store.rebalance()
                        self._cache_balanced = True
                    for s in newcomers:
                        if s.finished:
                            finish(s)
                        else:
                            active.append(s)
                    if not active:
                        continue
                info = IterationInfo(run.iterations, len(active), sum(s.target_len for s in active) / len(active),
                                     run.accepted, run.trials)
                k = policy(info)
                t0 = time.perf_counter()
                st = dec.step(active, k)
                dt = time.perf_counter() - t0
                timer.add(Stage.ITERATION, dt)
                run.record_iteration(st, dt)
                still = []
                for s in active:
                    (finish if s.finished else still.append)(s)
                active = still
        except BaseException as e:  # noqa: BLE001  (KeyboardInterrupt included: keep what finished)
            error = e
        total_s = time.perf_counter() - t_start
        store = self.store
        if store is not None:     # the copies still in flight (waits for them), in the phase that issued them
            try:
                timer.add_h2d(store.take_h2d(block=True))
            except BaseException as e:  # noqa: BLE001
                error = error or e
        means, totals, pre = stage_summary(timer, run.iterations, run.prefill_s)
        h2d_dec_bytes = timer.counters["decode"].get("h2d_bytes", 0)
        h2d_busy_s = totals.get(Stage.TARGET_H2D.value, 0.0)
        rec = RunRecord(
            complete=error is None, stages=means, stage_totals_s=totals, prefill_stage_totals_s=pre,
            iterations=run.iterations,
            decode_tokens_per_s=run.decode_tokens / run.decode_s if run.decode_s > 0 else 0.0,
            end_to_end_tokens_per_s=run.generated / total_s if total_s > 0 else 0.0,
            acceptance_histogram={str(a): n for a, n in sorted(run.hist.items())},
            mean_accepted=run.accepted / run.verified if run.verified else 0.0,
            backends=kernel_backends(), machine=machine_description(self.device), git_commit=git_commit(),
            plan_hashes=dict(self.plan.input_hashes), draft_len=k0, batch=B, micro_batches=self.plan.micro_batches,
            h2d_bytes=(store.h2d_bytes - h2d0) if store else 0, token_flips=dec.flips, flip_gap=self.flip_gap,
            error=None if error is None else f"{type(error).__name__}: {error}",
            sequences=len(seqs), finished_sequences=len(outputs), generated_tokens=run.generated,
            decode_tokens=run.decode_tokens, prompt_tokens=run.prompt_tokens, prefill_time_s=run.prefill_s,
            decode_time_s=run.decode_s, total_time_s=total_s, temperature=float(temperature), seed=int(seed),
            max_new_tokens=max_new_tokens, dynamic_k=isinstance(policy, DynamicK), dynamic_k_source=policy.source,
            draft_len_histogram={str(a): n for a, n in sorted(run.k_hist.items())},
            acceptance_oracle=self.acceptance_oracle, device=str(self.device),
            dtype=str(self.dtype).replace("torch.", ""),
            weights={"target": self.target_source.description,
                     "draft": self.draft_source.description if self.draft_source else "none"},
            h2d_experts=(store.h2d_experts - hx0) if store else 0,
            h2d_unused_experts=(store.h2d_unused_experts - hu0) if store else 0,
            prefetch_next_layer=mode != "off", expert_streaming=mode, host_io=hio if mode == "next" else "direct",
            h2d_decode_bytes=h2d_dec_bytes, h2d_busy_s=h2d_busy_s,
            h2d_GBps=h2d_dec_bytes / h2d_busy_s / 1e9 if h2d_busy_s > 0 else None,
            h2d_busy_fraction=h2d_busy_s / run.decode_s if run.decode_s > 0 else None,
            h2d_prefill_bytes=timer.counters["prefill"].get("h2d_bytes", 0),
            cache_fill_bytes=(store.cache_fill_bytes - fill0) if store else 0,
            draft_kv_gpu_sequences=pl.draft_kv_gpu_sequences, target_kv_gpu_sequences=pl.target_kv_gpu_sequences,
            expert_cache_slots=list(pl.expert_cache_slots), profile_stages=self.profile_stages,
            live_by_iteration=list(run.live),
        )
        result = GenerateResult([outputs[i] for i in sorted(outputs)], rec,
                                [s.index for s in seqs if s.index not in outputs])
        self.last_result = result
        if error is not None:
            try:
                error.partial_result = result  # type: ignore[attr-defined]
            except Exception:
                pass
            raise error
        return result


class _RunState:
    """Counters of one generate() call."""

    def __init__(self):
        self.iterations = 0
        self.prefill_s = self.decode_s = 0.0
        self.generated = self.decode_tokens = self.prompt_tokens = 0
        self.accepted = self.trials = self.verified = 0
        self.hist: dict[int, int] = {}
        self.k_hist: dict[int, int] = {}
        self.live: list[int] = []          # sequences in each decode iteration

    def record_iteration(self, st, dt: float) -> None:
        self.iterations += 1
        self.decode_s += dt
        self.decode_tokens += st.emitted
        self.generated += st.emitted
        self.k_hist[st.k] = self.k_hist.get(st.k, 0) + 1
        self.live.append(len(st.accepted))
        if st.k > 0:
            for a in st.accepted:
                self.hist[a] = self.hist.get(a, 0) + 1
                self.accepted += a
                self.trials += a + (1 if a < st.k else 0)
                self.verified += 1
