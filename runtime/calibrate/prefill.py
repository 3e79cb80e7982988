"""Prefill passes of the engine, timed and fitted: part of `specmoe calibrate`'s engine-stage step.

    measure_prefills(target_cfg, ...) -> raw samples (kept with the stage overheads, under "prefill")
    fit_prefill(raw, hw) -> (prefill.token seconds, details)

The decode terms (runtime/calibrate/overhead.py) are fitted on passes of at most B (k+1) = 128 tokens.
A prefill pass carries thousands: its rotary and norms, the expert GEMMs' outputs and silu_mul over
[T*K, F], the permutation and combine, and the pages of every activation of that size, cost more per
token than the decode passes show (the demo's prefill ran 18-31% over its prediction in every run on a
2-core VM, 1065 tokens a pass). So the calibration runs the engine's own prefill (runtime/speculative.py
prefill: target only, its KV in host memory) on tiny random prompts at a few (batch, mean prompt length),
the lengths spread over P/2 .. 3P/2 as a real prompt set's are (the kernel then runs one group per
length, and a pass of ragged prompts ran 1.2x one of equal prompts of the same tokens here), and
fits what the cost model's prefill (planner/simulator.py prefill_time, with the fixed costs just fitted)
leaves out as one term, seconds per prompt token per target layer (`prefill.token`, non-negative least
squares relative to each configuration's time), which planner/fixed_costs.py adds to every prefill.

Dimensions: B sequences, P prompt tokens each, T = B*P tokens of a pass, L target layers.
"""
from __future__ import annotations

import time
from typing import Callable

from specmoe.runtime.calibrate.measure import low_quantile

# (B, P): passes of 96 to 1280 tokens, prompts of 12 to 64 (the demo's: 32 prompts of 34 tokens)
PREFILL_CONFIGS: tuple[tuple[int, int], ...] = ((8, 12), (4, 64), (32, 24), (20, 64))
ROUNDS = 8          # timed passes of each configuration (at most), interleaved; one untimed pass each first


def measure_prefills(target_cfg: dict, *, rounds: int = ROUNDS, configs=PREFILL_CONFIGS, device=None,
                     progress: Callable[[str], None] | None = None) -> dict:
    """Seconds of each configuration's prefill pass (wall, from the engine's call to its first tokens):
    every sample and the low quantile. A random target (the calibration's config) with every expert
    resident, on the device and in the dtype of the engine-stage measurement; fresh random prompts each
    pass, of the lengths prompt_lengths(B, P), each pass after the C heap's free pages are released, as
    the engine's runs start."""
    import torch

    from specmoe.runtime.calibrate.overhead import engine_device, engine_parts, random_sequences, stage_decoder
    from specmoe.runtime.memory_usage import release_free_heap

    dev, dtype = engine_device(device)
    target, _, slots = engine_parts(target_cfg, dev, dtype, "full")
    g = torch.Generator().manual_seed(1)
    runs = []
    for B, P in configs:
        lens = prompt_lengths(B, P)
        dec, _ = stage_decoder(target, None, B, 0, 1, 0, B, max(lens) + 4, dev, dtype)
        runs.append({"B": B, "P": P, "lens": lens, "dec": dec, "samples": []})
    vocab = target.config.vocab_size
    for r in range(rounds + 1):
        if progress:
            progress(f"prefill passes: round {r}/{rounds}")
        for run in runs:
            seqs = random_sequences(run["B"], vocab, run["lens"], g)
            # as every run of the engine starts (Engine.generate, MemoryMeter.run_started): its first prefill
            # faults its activations' pages in anew (5 of the demo's 50 ms on this VM, side by side)
            release_free_heap()
            t0 = time.perf_counter()
            run["dec"].prefill(seqs)
            if r > 0:            # round 0: the untimed first pass (allocations)
                run["samples"].append(time.perf_counter() - t0)
    return {"expert_cache_slots": list(slots), "rounds": rounds,
            "configs": [{"B": run["B"], "P": run["P"], "samples_s": [round(x, 7) for x in run["samples"]],
                         "low_s": low_quantile(run["samples"])} for run in runs]}


def prompt_lengths(B: int, P: int) -> list[int]:
    """B prompt lengths spread evenly over P/2 .. 3P/2 (at least 1), their mean P, in a mixed order."""
    lens = [max(1, round(P * (0.5 + i / max(1, B - 1)))) if B > 1 else P for i in range(B)]
    lens[-1] += P * B - sum(lens)           # the mean exactly P
    return lens[::2] + lens[1::2]


def fit_prefill(raw: dict, hw) -> tuple[float, dict]:
    """(seconds per prompt token per target layer, details) from measure_prefills' samples (raw["prefill"] of
    the stage-overhead samples) against the cost model's prefill on hw, the hardware spec with the fixed costs
    just fitted."""
    import numpy as np
    from scipy.optimize import nnls

    from specmoe.planner.model_spec import ModelSpec

    pre = raw["prefill"]
    spec = ModelSpec.from_hf_config(raw["target_config"], name="calibration target")
    dt = "bf16" if raw["dtype"] == "bfloat16" else "fp32"
    L = spec.num_layers
    meas = np.array([c["low_s"] for c in pre["configs"]], dtype=float)                             # [configs]
    model = np.array([model_prefill_s(spec, hw, dt, c["B"], c["P"], pre["expert_cache_slots"])
                      for c in pre["configs"]], dtype=float)
    X = np.array([[c["B"] * c["P"] * L] for c in pre["configs"]], dtype=float)                    # [configs, 1]
    sol, _ = nnls(X / meas[:, None], (meas - model) / meas)
    theta = float(sol[0])
    err = (model + X[:, 0] * theta - meas) / meas
    details = {"method": ("the engine's prefill (target, host KV) timed at (B, P); prefill.token = what the cost "
                          "model's prefill (roofline + fixed costs) leaves out, per prompt token per layer, "
                          "non-negative least squares relative to each pass"),
               "configs": [{"B": c["B"], "P": c["P"], "measured_ms": _r(m * 1e3), "model_ms": _r(p * 1e3),
                            "fit_rel_err": _r(e)} for c, m, p, e in zip(pre["configs"], meas, model, err)],
               "model_rel_err_before": [_r(e) for e in (model - meas) / meas]}
    return theta, details


def model_prefill_s(spec, hw, dtype: str, B: int, P: int, slots: list[int]) -> float:
    """The cost model's prefill of B prompts of P tokens (no draft) on hw."""
    from specmoe.planner.cost_model import CostModel
    from specmoe.planner.plan import Placement
    from specmoe.planner.simulator import prefill_time
    from specmoe.planner.workload import Workload

    wl = Workload(prompt_len=P, gen_len=64, kv_dtype=dtype, weight_dtype=dtype)
    pl = Placement(expert_cache_slots=tuple(slots), draft_kv_gpu_sequences=0, target_kv_gpu_sequences=0)
    return prefill_time(CostModel(spec, hw, wl, None), B, pl)


def _r(x: float) -> float:
    return float(f"{x:.4g}")

