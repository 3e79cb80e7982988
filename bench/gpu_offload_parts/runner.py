"""The engine side: a Runner builds engines (one at a time, reused while the expert placement is the same)
and runs one mode for a fixed number of decode iterations; summarize turns its record into the mode's
measured figures beside the planner's prediction for exactly that configuration."""
from __future__ import annotations

import gc
import time

from .common import STREAMING, WARMUP_ITERATIONS, Deadline, StopAfter


def shared_expert_rows(tsrc, device, have: dict | None = None) -> dict:
    """{MoE layer: host rows [E, P]}: one layer's experts, read once into a region of their own (page-locked
    with CUDA), given to every MoE layer; `have` (a previous Runner's) is reused when it covers them."""
    from specmoe.runtime.model.expert_store import layer_rows

    layers = list(tsrc.config.moe_layers)
    if have and all(l in have for l in layers):
        return {l: have[l] for l in layers}
    rows = layer_rows(tsrc, layers[0], tsrc.dtype, register=device.type == "cuda") if layers else None
    return {l: rows for l in layers}


class Runner:
    """Builds engines (one at a time, reused while the expert placement is the same) and runs modes."""

    def __init__(self, tcfg, dcfg, device, args, log, expert_host: dict | None = None):
        import torch

        from specmoe.runtime.weights.sources import WeightSource

        self.torch, self.device, self.args, self.log = torch, device, args, log
        gen_dev = "cuda" if device.type == "cuda" else "cpu"
        self.tsrc = WeightSource.random(tcfg, seed=args.seed, dtype=torch.bfloat16, device_for_generation=gen_dev)
        self.dsrc = WeightSource.random(dcfg, seed=args.seed + 1, dtype=torch.bfloat16, device_for_generation=gen_dev)
        self.engine = None
        self.key = None
        self.build_s: list[float] = []
        # the host experts: one layer's rows, pinned once, stand for every layer's (bandwidth is what is
        # measured), kept across engines and across the layer fallback
        self.expert_host = shared_expert_rows(self.tsrc, device, expert_host)
        self.host_io = args.host_io_used

    def release(self) -> None:
        """Drop the engine; its GPU memory stays in torch's cache for the next one (no empty_cache: the
        next mode would pay cudaMalloc again inside its measured iterations)."""
        self.engine, self.key = None, None
        gc.collect()

    def engine_for(self, plan):
        from specmoe.runtime.engine import Engine

        pl = plan.placement      # what Engine() builds from; the KV split and batch are read per generate()
        key = (pl.expert_cache_slots, pl.cpu_expert_layers, pl.streaming_buffers, plan.draft_len > 0,
               plan.model.get("num_layers"))
        if self.engine is not None and key == self.key:
            self.engine.plan = plan
            return self.engine, 0.0
        self.release()
        t0 = time.perf_counter()
        eng = Engine(plan, self.tsrc, self.dsrc if plan.draft_len > 0 else None, device=self.device,
                     dtype=self.torch.bfloat16, check_memory=False, prefill_chunk_tokens=32768,
                     expert_host=self.expert_host, prefetch_next_layer=STREAMING[self.args.streaming],
                     host_io=self.host_io)
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        self.build_s.append(dt)
        self.engine, self.key = eng, key
        return eng, dt

    def run(self, plan, alpha, profile, iterations):
        """Prefill the plan's batch of random prompts and run `iterations` decode iterations;
        -> (RunRecord or None, status, build_s, wall_s)."""
        t0 = time.perf_counter()
        gc.collect()             # the previous mode's KV caches (held by its exception's traceback cycle)
        eng, build_s = self.engine_for(plan)
        k = plan.draft_len
        eng.acceptance_oracle = alpha if k > 0 else None
        eng.profile_stages = profile
        eng.prefetch_next_layer = STREAMING[self.args.streaming]
        eng.host_io = self.host_io
        eng.max_k = k

        def policy(info):
            if info.iteration >= iterations:
                raise StopAfter(f"stopped after {iterations} decode iterations (by design)")
            return k
        eng.k_policy = policy
        g = self.torch.Generator().manual_seed(self.args.seed + 7)
        V = self.tsrc.config.vocab_size
        prompts = self.torch.randint(3, V, (plan.batch, self.args.prompt_len), generator=g).tolist()
        rec, status = None, "ok"
        try:
            rec = eng.generate(prompts, max_new_tokens=self.args.gen_len, seed=self.args.seed).record
            status = "ok (all sequences finished before the iteration limit)"
        except StopAfter as e:
            pr = getattr(e, "partial_result", None) or eng.last_result
            rec = pr.record if pr is not None else None
        except Deadline as e:
            pr = getattr(e, "partial_result", None)
            rec = pr.record if pr is not None else None
            status = "deadline (time budget ran out inside this mode)"
        return rec, status, build_s, time.perf_counter() - t0


def warm_figures(rec) -> dict:
    """Iteration time and tokens/s over the iterations after the first WARMUP_ITERATIONS (all of them, said
    so, when there are no more)."""
    ts, em = list(rec.iteration_times_s), list(rec.emitted_by_iteration)
    skip = WARMUP_ITERATIONS if len(ts) > WARMUP_ITERATIONS else 0
    t, n = sum(ts[skip:]), len(ts) - skip
    return {"warmup_iterations_excluded": skip, "measured_iterations": n,
            "iteration_s": t / n if n else rec.stages.get("iteration", 0.0),
            "tokens_per_s": sum(em[skip:]) / t if t > 0 else rec.decode_tokens_per_s}


def summarize(rec, plan, alpha, spec, dspec, hw, args) -> dict:
    """Measured figures of one mode (iteration time and tokens/s without the warm-up iterations) and the
    planner's prediction for exactly its configuration."""
    from specmoe.planner.errors import SpecError
    from specmoe.planner.estimator import estimate
    from specmoe.planner.workload import AcceptanceProfile, Workload

    B, k = plan.batch, plan.draft_len
    h2d_s = rec.h2d_busy_s          # copy-stream busy seconds of the decode copies (CUDA events)
    dec_s = rec.decode_time_s
    pl = plan.placement
    n_slots = sum(pl.expert_cache_slots)
    d = {"oracle": k > 0, "alpha": alpha if k > 0 else None, "batch": B, "draft_len": k, "k": k,
         "micro_batches": plan.micro_batches, "m": plan.micro_batches, "expert_cache_slots": list(pl.expert_cache_slots),
         "cached_expert_fraction": n_slots / max(1, len(spec.moe_layers) * spec.num_experts),
         "draft_kv_gpu_sequences": pl.draft_kv_gpu_sequences if k else 0,
         "target_kv_gpu_sequences": pl.target_kv_gpu_sequences, "iterations": rec.iterations,
         "decode_tokens": rec.decode_tokens, "decode_time_s": dec_s,
         "tokens_per_s_all_iterations": rec.decode_tokens_per_s,
         "iteration_s_all_iterations": rec.stages.get("iteration", 0.0), "prefill_s": rec.prefill_time_s,
         "mean_accepted": rec.mean_accepted, "h2d_bytes": rec.h2d_decode_bytes, "h2d_s": h2d_s,
         "h2d_bytes_all_phases": rec.h2d_bytes, "h2d_prefill_bytes": rec.h2d_prefill_bytes,
         "h2d_GBps": rec.h2d_GBps, "h2d_busy_fraction": rec.h2d_busy_fraction,
         "h2d_unused_experts": rec.h2d_unused_experts, "expert_streaming": rec.expert_streaming,
         "host_io": rec.host_io,
         "stages_measured_s": dict(rec.stages), "profile_stages": rec.profile_stages,
         "planned": {"decode_tokens_per_s": plan.predicted.decode_tokens_per_s,
                     "iteration_s": plan.predicted.iteration_time_s, "gen_len": args.gen_len,
                     "planner": plan.solver.get("name", "")},
         "record_error": rec.error, "complete_record": rec.complete}
    d.update(warm_figures(rec))
    gen_eq = max(1, round(2 + rec.decode_tokens / max(1, B)))
    d["measured_mean_context"] = args.prompt_len + gen_eq / 2
    try:
        wl = Workload(prompt_len=args.prompt_len, gen_len=gen_eq, acceptance=AcceptanceProfile.from_alpha(alpha or 0.0))
        # the engine's schedule: the MoE of all micro-batches runs together; with streaming ahead the
        # first layers' experts stream during the draft phase and pre/post attention run once per layer
        ahead = rec.expert_streaming == "next"
        est = estimate(spec, hw, wl, draft=dspec if k > 0 else None, draft_len=k, micro_batches=plan.micro_batches,
                       placement=pl, batch=B, timeline=False, run=True, prefetch=ahead, batched_moe=True,
                       batched_layer=ahead)
        d["prediction_options"] = {"prefetch": ahead, "batched_moe": True, "batched_layer": ahead}
        d["stages_predicted_s"] = {s: float(v) for s, v in est.stages.items()}
        d["predicted_iteration_s"] = est.iteration_time_s
        d["predicted_tokens_per_s"] = est.decode_tokens_per_s
        d["prediction_source"] = est.source
        it = d["iteration_s"]
        d["iteration_error_pct"] = (est.iteration_time_s - it) / it * 100 if it > 0 else None
    except SpecError as e:  # the planner refuses this configuration: said so, the measurement stands
        d["prediction_error"] = f"{type(e).__name__}: {e}"
    return d
