"""The fit of the engine's fixed per-invocation costs (planner/overhead.py) to the stage times that
runtime/calibrate/overhead.py measures: part of `specmoe calibrate`, run when the spec is built.

    fit_overheads(raw, hw_raw) -> (op_overhead_us, stage_overhead_us, details)

Per stage, measured = roofline + sum_key theta_key x count_key, with the cost model's own
roofline (planner.cost_model on the just-measured curves, no fixed costs) and the counts of
planner/overhead.py (invocations per layer and micro-batch, per touched expert, per sequence, per
draft step and layer), solved by non-negative least squares over the configurations. So the fixed
terms are exactly what the cost model adds, and at the calibration points fixed + roofline
reproduces the measurement up to the fit residual (recorded). What no stage times (the iteration
minus its stages: the pass's layout and inputs, Python between stages) is fitted the same way to
iteration.other + iteration.other.sequence x B. `op_overhead_us` is the fitted fixed
time of the largest configuration divided by the torch operations it issued (counted by a
TorchFunctionMode per stage), the fallback for keys a spec lacks.

Dimensions: B sequences, k draft tokens, m micro-batches, L layers, L_d draft layers.
"""
from __future__ import annotations

import math
import statistics
from typing import Any

from specmoe.planner.overhead import DRAFT_PART_KEYS, EAGLE_PART_KEYS, OverheadKey as K
from specmoe.planner.stages import Stage as S
from specmoe.runtime.calibrate.overhead import ORACLE_ALPHA, PROMPT_LEN, STAGES

STAT = "normalized_s"  # fitted: mean seconds per iteration (as RunRecords report them), each round divided by
                       # the machine's speed in it (round_speeds) and scaled to a typical round; "mean_s" where
                       # a cache's samples lack it


def engine_kv_parts(batch: int, micro_batches: int, gpu_sequences: int) -> list[tuple[int, int]]:
    """(device-KV, host-KV) sequences of each micro-batch as the engine forms them here: consecutive
    sequences (runtime.kv_cache.PassLayout.split: micro-batch j holds [B j / m, B (j+1) / m)), the
    first `gpu_sequences` rows on the device."""
    B, M, t = int(batch), max(1, min(int(micro_batches), int(batch))), int(gpu_sequences)
    out = []
    for j in range(M):
        s0, s1 = (B * j) // M, (B * (j + 1)) // M
        dev = max(0, min(s1, t) - s0)
        out.append((dev, s1 - s0 - dev))
    return out


def stage_features(c: dict, spec, n_moe: int, touched: float) -> dict[str, dict[str, float]]:
    """stage -> {key: how many units of the key one iteration of configuration c has}, counted as
    the engine runs (runtime/model/target.py forward, runtime/speculative.py step)."""
    B, k, M, Ld, tgpu = c["B"], c["k"], c["m"], c["draft_layers"], c["target_kv_gpu"]
    L = spec.num_layers
    M = max(1, min(M, B))
    parts = engine_kv_parts(B, M, tgpu)
    dev_mbs = sum(1 for d, _ in parts if d > 0)
    host_mbs = sum(1 for _, h in parts if h > 0)
    f = {
        S.TARGET_PRE_ATTN: {K.PRE_ATTN: 1 + L * M, K.PRE_ATTN_SEQUENCE: B},
        S.TARGET_ATTENTION: {K.ATTENTION: L * host_mbs, K.ATTENTION_GPU: L * dev_mbs, K.ATTENTION_SEQUENCE: B,
                             K.ATTENTION_TOKEN: L * B * (k + 1)},
        S.TARGET_POST_ATTN: {K.POST_ATTN: L * M, K.POST_ATTN_TOKEN: L * B * (k + 1)},
        # the expert chains the engine ran (counted), else uniform routing's expected count
        S.TARGET_MOE: {K.MOE: L, K.MOE_EXPERT: c.get("experts_per_iteration") or n_moe * touched,
                       K.MOE_TOKEN: n_moe * B * (k + 1)},
        S.TARGET_LM_HEAD: {K.LM_HEAD: 1, K.LM_HEAD_TOKEN: B * (k + 1)},
        S.VERIFY_ACCEPT: {K.ACCEPT: 1, K.ACCEPT_SEQUENCE: B, K.ACCEPT_TOKEN: B * (k + 1)},
    }
    if c["copies_per_iteration"] > 0:
        f[S.TARGET_H2D] = {K.H2D: c["copies_per_iteration"]}
    dgpu = min(B, c.get("draft_kv_gpu", B))        # draft-KV sequences on the device: one draft part each side
    for on_gpu, stage, seqs, catchup in ((True, S.DRAFT_GPU, dgpu, "catchup_per_iteration"),
                                         (False, S.DRAFT_CPU, B - dgpu, "catchup_host_per_iteration")):
        if k > 0 and seqs > 0:
            f[stage] = _draft_features(c.get("draft_kind", "model") == "eagle", on_gpu, k, Ld, seqs, c.get(catchup, 0.0))
    # plain strings: the keys go into the spec's YAML
    return {str(st.value): {str(key.value): n for key, n in terms.items()} for st, terms in f.items()}


def _draft_features(eagle: bool, on_gpu: bool, k: int, Ld: int, seqs: int, catchup: float) -> dict:
    """One draft part's units per iteration (planner/fixed_costs.py draft_step_s): k steps of `seqs`
    sequences, Ld layers each (an EAGLE head's first layer inside its step key), `catchup` the share of
    iterations in which some sequence of the part had accepted all k drafts."""
    if eagle:
        step, sequence, catch = EAGLE_PART_KEYS[on_gpu]
        terms = {step: k, sequence: k * seqs, catch: Ld * catchup}
        if Ld > 1:
            terms[DRAFT_PART_KEYS[on_gpu][1]] = k * (Ld - 1)
        return terms
    step, layer, sequence, catch = DRAFT_PART_KEYS[on_gpu]
    return {step: k, layer: k * Ld, sequence: k * seqs, catch: Ld * catchup}


def roofline_stages(c: dict, spec, dspec, hw, dtype: str) -> dict[str, float]:
    """The cost model's stage times (no fixed costs) of configuration c."""
    from specmoe.planner.cost_model import CostModel
    from specmoe.planner.plan import Placement
    from specmoe.planner.workload import AcceptanceProfile, Workload

    wl = Workload(prompt_len=PROMPT_LEN, gen_len=64, acceptance=AcceptanceProfile.from_alpha(ORACLE_ALPHA),
                  kv_dtype=dtype, weight_dtype=dtype)
    cm = CostModel(spec, hw, wl, dspec if c["k"] > 0 else None)
    pl = Placement(expert_cache_slots=tuple(c["expert_cache_slots"]), draft_kv_gpu_sequences=c.get("draft_kv_gpu", c["B"]),
                   target_kv_gpu_sequences=c["target_kv_gpu"])
    costs = cm.iteration(c["B"], max(1, min(c["m"], c["B"])), c["k"], pl, context_len=c["context"], batched_moe=True)
    return costs.stage_totals()


def _stat(c: dict) -> dict:
    return c.get(STAT) or c["mean_s"]


def _touched(spec, c: dict) -> float:
    """Experts of one layer the configuration's B (k+1) tokens touch under uniform routing."""
    from specmoe.planner.cost_model import touched_experts

    N = c["B"] * (c["k"] + 1)
    return touched_experts(spec.num_experts, spec.top_k, N) if spec.num_experts else 0.0


def _untimed(c: dict) -> float:
    """The iteration minus its timed stages (seconds)."""
    return _stat(c)["iteration"] - sum(_stat(c)[st] for st in STAGES)


def fit_overheads(raw: dict, hw_raw: dict) -> tuple[float | None, dict[str, float], dict[str, Any]]:
    """(op_overhead_us, stage_overhead_us, details) from measure_stage_overheads' samples and a hardware
    spec (raw mapping) holding the measured curves but no fixed costs."""
    from specmoe.planner.model_spec import ModelSpec

    hw = _hardware(hw_raw)
    spec = ModelSpec.from_hf_config(raw["target_config"], name="calibration target")
    dspecs = {int(k): ModelSpec.from_hf_config(v, name=f"calibration draft {k}") for k, v in raw["draft_configs"].items()}
    if raw.get("eagle_config"):
        dspecs["eagle"] = ModelSpec.from_hf_config(raw["eagle_config"], name="calibration EAGLE head")
    dt = "bf16" if raw["dtype"] == "bfloat16" else "fp32"
    n_moe = len(spec.moe_layers)
    rows = _stage_rows(raw, spec, dspecs, hw, dt, n_moe)
    theta, fit_err, fit_by_cfg, roof_share = _fit_stages(rows)
    _fit_untimed(raw, theta, fit_err)
    ops = _fit_ops_per_invocation(raw, spec, n_moe)
    op_us = _op_overhead_us(raw, theta, spec, n_moe)
    untimed = [_untimed(c) for c in raw["configs"]]
    stage_us = {key: _r(v * 1e6) for key, v in sorted(theta.items())}
    details = {
        "method": ("engine stages timed on tiny random models (runtime/calibrate/overhead.py); per stage "
                   "measured = cost-model roofline + sum of fixed terms x invocations, non-negative least squares"),
        "device": raw["device"], "dtype": raw["dtype"], "configs": len(raw["configs"]),
        "fit_max_rel_err_by_stage": {st: _r(v) for st, v in sorted(fit_err.items())},
        "fit_rel_err_by_stage_and_config": dict(sorted(fit_by_cfg.items())),
        "roofline_share_by_stage": {st: _r(v) for st, v in sorted(roof_share.items())},
        "ops_per_invocation": dict(sorted(ops.items())),
        "untimed_per_iteration_us": _r(max(0.0, statistics.median(untimed)) * 1e6),
    }
    op_us = _r(op_us) if op_us else None
    if raw.get("prefill"):        # prefill passes timed: what the cost model's prefill leaves out per token
        from specmoe.runtime.calibrate.prefill import fit_prefill

        theta_s, details["prefill"] = fit_prefill(raw, lambda keys: _hardware(hw_raw, op_us, {**stage_us, **keys}))
        stage_us.update({key: _r(v * 1e6) for key, v in theta_s.items()})
    return op_us, stage_us, details


def _hardware(hw_raw: dict, op_us: float | None = None, stage_us: dict[str, float] | None = None):
    """The hardware spec of hw_raw with these fixed costs in place of its own (none: the cost model then
    gives the bare roofline)."""
    from specmoe.planner.hardware_spec import parse_hardware

    measured = {k: v for k, v in hw_raw.get("measured", {}).items() if k not in ("op_overhead_us", "stage_overhead_us")}
    if op_us:
        measured["op_overhead_us"] = op_us
    if stage_us:
        measured["stage_overhead_us"] = dict(stage_us)
    return parse_hardware({**hw_raw, "measured": measured}, "calibration")


def _stage_rows(raw: dict, spec, dspecs: dict, hw, dt: str, n_moe: int) -> dict[str, list[tuple[dict, float, float]]]:
    """stage -> one (features, measured s, roofline s) row per configuration."""
    rows: dict[str, list[tuple[dict, float, float]]] = {}
    for c in raw["configs"]:
        touched = _touched(spec, c)
        roof = roofline_stages(c, spec, dspecs["eagle" if c.get("draft_kind") == "eagle" else c["draft_layers"]], hw, dt)
        for st, feats in stage_features(c, spec, n_moe, touched).items():
            rows.setdefault(st, []).append((feats, _stat(c)[st], roof.get(st, 0.0)))
    return rows


def _fit_stages(rows: dict[str, list[tuple[dict, float, float]]]):
    """Per stage, the fixed terms theta (seconds per unit of each key) by relative non-negative least
    squares of measured - roofline on the features; with the fit's errors and the roofline's share."""
    import numpy as np
    from scipy.optimize import nnls

    theta: dict[str, float] = {}
    fit_err: dict[str, float] = {}
    fit_by_cfg: dict[str, list[float]] = {}
    roof_share: dict[str, float] = {}
    for st, rs in rows.items():
        keys = sorted({key for feats, _, _ in rs for key in feats})
        X = np.array([[feats.get(key, 0.0) for key in keys] for feats, _, _ in rs], dtype=float)   # [configs, keys]
        y = np.array([meas - roof for _, meas, roof in rs], dtype=float)                          # [configs]
        meas = np.array([m for _, m, _ in rs], dtype=float)
        roof = np.array([r for _, _, r in rs], dtype=float)
        scale = np.maximum(meas, 1e-9)                 # relative least squares: every configuration counts alike
        sol, _ = nnls(X / scale[:, None], y / scale)
        for key, v in zip(keys, sol):
            theta[key] = float(v)
        pred = roof + X @ sol
        fit_err[st] = float(np.max(np.abs(pred - meas) / scale))
        fit_by_cfg[st] = [_r(v) for v in (pred - meas) / scale]
        roof_share[st] = float(np.mean(roof / scale))
    return theta, fit_err, fit_by_cfg, roof_share


def _fit_untimed(raw: dict, theta: dict[str, float], fit_err: dict[str, float]) -> None:
    """The engine's work outside every stage (layout and inputs of the pass, Python between stages):
    iteration - sum of stages = iteration.other + iteration.other.sequence x B, relative to the iteration.
    Adds both terms to theta and their fit error to fit_err."""
    import numpy as np
    from scipy.optimize import nnls

    Xo = np.array([[1.0, float(c["B"])] for c in raw["configs"]])                          # [configs, 2]
    it_s = np.array([_stat(c)["iteration"] for c in raw["configs"]], dtype=float)          # [configs]
    yo = it_s - np.array([sum(_stat(c)[st] for st in STAGES) for c in raw["configs"]], dtype=float)
    so, _ = nnls(Xo / it_s[:, None], yo / it_s)
    theta[K.OTHER.value], theta[K.OTHER_SEQUENCE.value] = float(so[0]), float(so[1])
    fit_err[K.OTHER.value] = float(np.max(np.abs(Xo @ so - yo) / it_s))


def _fit_ops_per_invocation(raw: dict, spec, n_moe: int) -> dict[str, float]:
    """Torch operations per invocation of each key (exact counts: the same features, least squares)."""
    import numpy as np
    from scipy.optimize import nnls

    ops_rows: dict[str, list[tuple[dict, float]]] = {}
    for c in raw["configs"]:
        touched = _touched(spec, c)
        for st, feats in stage_features(c, spec, n_moe, touched).items():
            ops_rows.setdefault(st, []).append((feats, float(c["ops"].get(st, 0))))
    ops: dict[str, float] = {}
    for st, rs in ops_rows.items():
        keys = sorted({key for feats, _ in rs for key in feats if not key.endswith((".sequence", ".token"))})
        if not keys:
            continue
        X = np.array([[feats.get(key, 0.0) for key in keys] for feats, _ in rs], dtype=float)
        y = np.array([n for _, n in rs], dtype=float)
        sol, _ = nnls(X, y)
        ops.update({key: round(float(v), 1) for key, v in zip(keys, sol)})
    return ops


def _op_overhead_us(raw: dict, theta: dict[str, float], spec, n_moe: int) -> float | None:
    """The fitted fixed time of the slowest configuration over the torch operations it issued (us per op)."""
    ref = max(raw["configs"], key=lambda c: _stat(c)["iteration"])
    touched = _touched(spec, ref)
    fixed_ref = sum(theta.get(key, 0.0) * n for feats in stage_features(ref, spec, n_moe, touched).values()
                    for key, n in feats.items())
    ops_ref = sum(n for st, n in ref["ops"].items() if st in STAGES)
    return fixed_ref / ops_ref * 1e6 if ops_ref > 0 and fixed_ref > 0 else None


def _r(x: float) -> float:
    return float(f"{x:.4g}") if x and math.isfinite(x) else 0.0
