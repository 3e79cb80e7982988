"""What-if studies for the notebooks: throughput over k x batch, sweeps over PCIe bandwidth, GPU
memory, CPU memory and acceptance rate, where speculation stops paying, the roofline of one
iteration, and a Plan for a chosen or a searched configuration.

Every number comes from specmoe.planner.estimator (the cost model and the event simulator); the search uses
planner.optimizer.optimize when it imports and `use_optimizer` allows it, else a grid of estimates
over (k, micro-batches) at the largest batch that fits. Sweeps return pandas DataFrames;
configurations that do not fit in memory give rows with fits=False and NaN throughput.

Array dimension letters: I = intensity samples.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Iterable

import numpy as np
import pandas as pd

from specmoe.planner.cost_model import ACT_BYTES, LOGIT_BYTES, CostModel, split_even, touched_experts
from specmoe.planner.errors import SpecError
from specmoe.planner.estimator import Estimate, estimate
from specmoe.planner.hardware_spec import load_hardware
from specmoe.planner.model_spec import ModelSpec, default_draft_name, load_model
from specmoe.planner.plan import Placement, Plan
from specmoe.planner.schedule import Schedule, default_schedule
from specmoe.planner.roofline import OpCost, h2d_rate, memory_bandwidth, peak_flops, time_on
from specmoe.planner.stages import Stage
from specmoe.planner.workload import MAX_DRAFT_LEN, AcceptanceProfile, Workload

KS = range(0, MAX_DRAFT_LEN + 1)
HW_PARAMS = ("h2d_GBps", "gpu_mem_GiB", "cpu_mem_GiB")


def _draft_for(model: ModelSpec, draft) -> ModelSpec | None:
    try:
        return load_model(draft if draft is not None else default_draft_name(model))
    except SpecError:
        if draft is not None:
            raise
        return None


def _try(model, hw, wl, draft, k, mb, batch, **kw) -> Estimate | None:
    try:
        if batch == "max" and wl.num_prompts is not None:     # a finite job: no more rows than prompts
            from specmoe.planner.memory import max_batch

            batch = min(max_batch(model, hw, wl, draft if k else None, k, mb), wl.num_prompts)
        kw.setdefault("schedule", default_schedule(load_hardware(hw)))   # as a plan would run it
        return estimate(model, hw, wl, draft=draft if k else None, draft_len=k, micro_batches=mb, batch=batch,
                        timeline=False, run=False, **kw)
    except SpecError:
        return None


def _row(e: Estimate | None, **extra) -> dict:
    if e is None:
        return {**extra, "fits": False, "batch": np.nan, "decode_tokens_per_s": np.nan, "iteration_time_s": np.nan,
                "bound": None}
    job = e.job or {}
    return {**extra, "fits": True, "batch": e.batch, "micro_batches": e.micro_batches,
            # a finite job's throughput (its batch drains: planner/batch_drain.py), else the full batch's
            "decode_tokens_per_s": job.get("decode_tokens_per_s", e.decode_tokens_per_s),
            "steady_decode_tokens_per_s": e.decode_tokens_per_s, "mean_live_batch": job.get("mean_live_batch", e.batch),
            "iteration_time_s": e.iteration_time_s, "bound": e.bound,
            "accepted_per_iteration": e.accepted_per_iteration, "moe_gpu_utilization": e.moe_gpu_utilization}


def best_by_k(model, hardware, workload: Workload, draft=None, ks: Iterable[int] = KS,
              micro_batches: Iterable[int] = (2,), batch: int | str = "max") -> pd.DataFrame:
    """The best configuration at each draft length k (over `micro_batches`, at `batch`; "max" = the
    most that fits at that k): one row per k."""
    m, hw = load_model(model), load_hardware(hardware)
    d = _draft_for(m, draft)
    rows = []
    for k in ks:
        if k > 0 and d is None:
            continue
        best = None
        for mb in micro_batches:
            e = _try(m, hw, workload, d, k, mb, batch)
            if e is not None and (best is None or e.decode_tokens_per_s > best.decode_tokens_per_s):
                best = e
        rows.append(_row(best, draft_len=k))
    return pd.DataFrame(rows)


def throughput_grid(model, hardware, workload: Workload, draft=None, ks: Iterable[int] = KS,
                    batches: Iterable[int] | None = None, micro_batches: int = 2) -> pd.DataFrame:
    """Decode throughput over draft length k x batch (long form: draft_len, batch, fits, ...).
    batches: default powers of two up to the largest batch that fits without speculation."""
    from specmoe.planner.memory import max_batch

    m, hw = load_model(model), load_hardware(hardware)
    d = _draft_for(m, draft)
    if batches is None:
        top = max_batch(m, hw, workload, None, 0, micro_batches)
        batches = sorted({2 ** i for i in range(int(math.log2(max(top, 1))) + 1)} | {top})
    rows = []
    for k in ks:
        if k > 0 and d is None:
            continue
        for b in batches:
            e = _try(m, hw, workload, d, k, min(micro_batches, b), int(b))
            r = _row(e, draft_len=k)
            r["batch"] = int(b)
            rows.append(r)
    return pd.DataFrame(rows)


def _with_alpha(workload: Workload, alpha: float) -> Workload:
    return replace(workload, acceptance=AcceptanceProfile.from_alpha(float(alpha), max(16, workload.acceptance.max_k)))


def _point(m, hw, wl, d, ks, micro_batches) -> dict:
    df = best_by_k(m, hw, wl, d, ks, micro_batches)
    k0 = df[df.draft_len == 0]
    spec = df[(df.draft_len > 0) & df.fits]
    out = {"k0_tokens_per_s": float(k0.decode_tokens_per_s.iloc[0]) if len(k0) else np.nan,
           "k0_batch": k0.batch.iloc[0] if len(k0) else np.nan, "k0_bound": k0.bound.iloc[0] if len(k0) else None}
    if len(spec):
        b = spec.loc[spec.decode_tokens_per_s.idxmax()]
        out.update(spec_k=int(b.draft_len), spec_tokens_per_s=float(b.decode_tokens_per_s), spec_batch=b.batch,
                   spec_bound=b.bound)
    else:
        out.update(spec_k=np.nan, spec_tokens_per_s=np.nan, spec_batch=np.nan, spec_bound=None)
    fits = df[df.fits]
    if len(fits):
        b = fits.loc[fits.decode_tokens_per_s.idxmax()]
        out.update(best_k=int(b.draft_len), best_tokens_per_s=float(b.decode_tokens_per_s), best_batch=b.batch,
                   best_bound=b.bound)
    else:
        out.update(best_k=np.nan, best_tokens_per_s=np.nan, best_batch=np.nan, best_bound=None)
    out["speedup"] = out["best_tokens_per_s"] / out["k0_tokens_per_s"] if out["k0_tokens_per_s"] > 0 else np.nan
    return out


def sweep(model, hardware, workload: Workload, param: str, values: Iterable[float], draft=None,
          ks: Iterable[int] = KS, micro_batches: Iterable[int] = (2,)) -> pd.DataFrame:
    """Best-k and k=0 decode throughput against one parameter: "h2d_GBps", "gpu_mem_GiB",
    "cpu_mem_GiB" (the hardware spec with that value replaced), "acceptance" (per-token rate alpha)
    or "num_prompts" (the job's size: the batch is capped by it and drains at the end).
    Columns: the parameter, k0_*, spec_* (best with k >= 1), best_* (overall), speedup."""
    m, hw = load_model(model), load_hardware(hardware)
    d = _draft_for(m, draft)
    ks = list(ks)
    params = HW_PARAMS + ("acceptance", "num_prompts")
    if param not in params:
        raise SpecError("param", f"unknown sweep parameter {param!r}", f"one of {', '.join(params)}")
    rows = []
    for v in values:
        if param == "acceptance":
            pt = _point(m, hw, _with_alpha(workload, v), d, ks, micro_batches)
        elif param == "num_prompts":
            if isinstance(v, bool) or int(v) != v or v < 1:
                raise SpecError("num_prompts", f"sweep value {v!r} is not a positive integer", "give prompt counts")
            pt = _point(m, hw, replace(workload, num_prompts=int(v)), d, ks, micro_batches)
        else:
            pt = _point(m, hw.with_overrides(**{param: float(v)}), workload, d, ks, micro_batches)
        rows.append({param: v, **pt})
    return pd.DataFrame(rows)


def sweep_pcie(model, hardware, workload, values, **kw) -> pd.DataFrame:
    return sweep(model, hardware, workload, "h2d_GBps", values, **kw)


def sweep_gpu_memory(model, hardware, workload, values, **kw) -> pd.DataFrame:
    return sweep(model, hardware, workload, "gpu_mem_GiB", values, **kw)


def sweep_cpu_memory(model, hardware, workload, values, **kw) -> pd.DataFrame:
    return sweep(model, hardware, workload, "cpu_mem_GiB", values, **kw)


def sweep_acceptance(model, hardware, workload, values, **kw) -> pd.DataFrame:
    return sweep(model, hardware, workload, "acceptance", values, **kw)


def sweep_job_size(model, hardware, workload, values, **kw) -> pd.DataFrame:
    """Against the job's number of prompts: a small job cannot fill the batch memory allows, and under
    speculation its batch drains at the end (planner/batch_drain.py); rows price both in."""
    return sweep(model, hardware, workload, "num_prompts", values, **kw)


def speculation_breakeven(model, hardware, workload: Workload, param: str = "acceptance", lo: float | None = None,
                          hi: float | None = None, draft=None, ks: Iterable[int] = KS,
                          micro_batches: Iterable[int] = (2,), rel_tol: float = 1e-3) -> dict[str, Any]:
    """Where speculation stops paying: the value of `param` ("acceptance" or "h2d_GBps") at which the
    best throughput with k >= 1 equals the k = 0 throughput, by bisection between lo and hi (geometric
    for bandwidth). Returns {param, value (None when the sign does not change in [lo, hi]), gain_lo,
    gain_hi, lo, hi}; gain = best k >= 1 throughput / k = 0 throughput - 1."""
    m, hw = load_model(model), load_hardware(hardware)
    d = _draft_for(m, draft)
    ks = [k for k in ks if k > 0]
    if param == "acceptance":
        lo, hi = (0.0 if lo is None else lo), (0.99 if hi is None else hi)
        k0 = _point(m, hw, workload, d, [0], micro_batches)["k0_tokens_per_s"]

        def gain(x):
            pt = _point(m, hw, _with_alpha(workload, x), d, ks, micro_batches)
            return pt["spec_tokens_per_s"] / k0 - 1.0
        mid = lambda a, b: (a + b) / 2  # noqa: E731
    elif param == "h2d_GBps":
        lo, hi = (1.0 if lo is None else lo), (1000.0 if hi is None else hi)

        def gain(x):
            h = hw.with_overrides(h2d_GBps=x)
            pt = _point(m, h, workload, d, [0] + ks, micro_batches)
            return pt["spec_tokens_per_s"] / pt["k0_tokens_per_s"] - 1.0
        mid = lambda a, b: math.sqrt(a * b)  # noqa: E731
    else:
        raise SpecError("param", f"unknown breakeven parameter {param!r}", "one of acceptance, h2d_GBps")
    if not 0 <= lo < hi:
        raise SpecError("lo/hi", f"need 0 <= lo < hi, got {lo}, {hi}", "give a proper interval")
    g_lo, g_hi = gain(lo), gain(hi)
    out = {"param": param, "value": None, "lo": lo, "hi": hi, "gain_lo": g_lo, "gain_hi": g_hi}
    if not (np.isfinite(g_lo) and np.isfinite(g_hi)) or (g_lo > 0) == (g_hi > 0):
        return out
    a, b, ga = lo, hi, g_lo
    while b - a > rel_tol * max(abs(b), 1e-9):
        c = mid(a, b)
        gc = gain(c)
        if (gc > 0) == (ga > 0):
            a, ga = c, gc
        else:
            b = c
    out["value"] = (a + b) / 2
    return out


def describe_breakeven(r: dict[str, Any]) -> str:
    """One sentence from a speculation_breakeven result."""
    unit = " GB/s" if r["param"] == "h2d_GBps" else ""
    name = "per-token acceptance rate" if r["param"] == "acceptance" else "host-to-device bandwidth"
    rng = f"{r['lo']:g}{unit} to {r['hi']:g}{unit}"
    if r["value"] is None:
        if not (np.isfinite(r["gain_lo"]) and np.isfinite(r["gain_hi"])):
            return f"No comparison over {name} {rng}: a configuration does not fit at one end."
        word = "pays" if r["gain_lo"] > 0 else "does not pay"
        return (f"Speculation {word} over the whole range of {name} {rng} (best k >= 1 against k = 0: "
                f"{r['gain_lo']:+.0%} at {r['lo']:g}{unit}, {r['gain_hi']:+.0%} at {r['hi']:g}{unit}).")
    side = "below" if r["gain_lo"] < 0 else "above"
    return (f"Speculation stops paying at a {name} of {r['value']:.3g}{unit}: {side} it, k = 0 is faster "
            f"({r['gain_lo']:+.0%} at {r['lo']:g}{unit}, {r['gain_hi']:+.0%} at {r['hi']:g}{unit}).")


# ---------------------------------------------------------------------------------------------------
def plan_from_estimate(est: Estimate, model, hardware, workload: Workload, draft=None,
                       frontier: dict | None = None, solver: dict | None = None,
                       schedule: Schedule | None = None) -> Plan:
    """A Plan carrying one estimated configuration (its prediction, timeline and memory), estimated with
    `schedule` (None: the hardware's default, which the plan then carries)."""
    m, hw = load_model(model), load_hardware(hardware)
    d = load_model(draft) if (draft is not None and est.draft_len > 0) else None
    if est.draft_len > 0 and d is None:
        d = load_model(default_draft_name(m))
    return Plan(model=m.to_dict(), hardware=hw.raw, workload=workload.to_dict(), draft=d.to_dict() if d else None,
                batch=est.batch, micro_batches=est.micro_batches, draft_len=est.draft_len, placement=est.placement,
                predicted=est.to_prediction(), memory=est.memory, bound=est.bound,
                frontier=frontier or {"by_k": [], "by_batch": []},
                solver=solver or {"name": "estimate", "options": est.options}, schedule=schedule)


def _frontier(df: pd.DataFrame) -> list[dict]:
    return [{"draft_len": int(r.draft_len), "decode_tokens_per_s": float(r.decode_tokens_per_s), "batch": int(r.batch),
             "micro_batches": int(r.micro_batches)} for r in df[df.fits].itertuples()]


def fixed_plan(model, hardware, workload: Workload, draft=None, draft_len: int = 0, batch: int | str | None = None,
               micro_batches: int = 2, placement: Placement | None = None, frontier_ks: Iterable[int] | None = KS) -> Plan:
    """A Plan for one given configuration (no search): planner.estimate with its timeline, plus the
    throughput-against-k frontier at the same batch (frontier_ks=None: none)."""
    m, hw = load_model(model), load_hardware(hardware)
    d = _draft_for(m, draft) if draft_len > 0 or draft is not None else None
    est = estimate(m, hw, workload, draft=d if draft_len else None, draft_len=draft_len, micro_batches=micro_batches,
                   placement=placement, batch=batch, timeline=True, run=True, schedule=default_schedule(hw))
    fr = {"by_k": [], "by_batch": []}
    if frontier_ks is not None:
        ks = [k for k in frontier_ks if k == 0 or d is not None]
        fr["by_k"] = _frontier(best_by_k(m, hw, workload, d, ks, (est.micro_batches,), est.batch))
    return plan_from_estimate(est, m, hw, workload, d, fr, {"name": "fixed", "options": est.options})


def _optimizer():
    try:
        from specmoe.planner import optimizer  # imported on use: the grid search works without it
    except ImportError:
        return None
    return getattr(optimizer, "optimize", None)


def choose_plan(model, hardware, workload: Workload, draft=None, ks: Iterable[int] = KS,
                micro_batches: Iterable[int] = (1, 2, 4), use_optimizer: bool | None = None) -> Plan:
    """The best plan: planner.optimizer.optimize when available (use_optimizer None or True), else the
    grid of estimates over (k, micro-batches) at the largest batch that fits, best decode throughput."""
    opt = _optimizer() if use_optimizer in (None, True) else None
    if use_optimizer and opt is None:
        raise SpecError("use_optimizer", "planner.optimizer is not available", "use the grid (use_optimizer=False)")
    if opt is not None:
        return opt(model, hardware, workload, draft=draft)
    m, hw = load_model(model), load_hardware(hardware)
    d = _draft_for(m, draft)
    df = best_by_k(m, hw, workload, d, ks, micro_batches)
    ok = df[df.fits]
    if not len(ok):
        raise SpecError("workload", f"no configuration of {m.name} fits {hw.name}", "give more memory or shorter sequences")
    b = ok.loc[ok.decode_tokens_per_s.idxmax()]
    k, mb, B = int(b.draft_len), int(b.micro_batches), int(b.batch)
    est = estimate(m, hw, workload, draft=d if k else None, draft_len=k, micro_batches=mb, batch=B,
                   timeline=True, run=True, schedule=default_schedule(hw))
    by_batch = []
    for bb in sorted({max(1, B // 8), max(1, B // 4), max(1, B // 2), B}):
        e = _try(m, hw, workload, d, k, min(mb, bb), bb)
        if e is not None:
            by_batch.append({"batch": bb, "decode_tokens_per_s": e.decode_tokens_per_s, "draft_len": k})
    return plan_from_estimate(est, m, hw, workload, d, {"by_k": _frontier(ok), "by_batch": by_batch},
                              {"name": "grid", "evaluated": int(len(df) * len(tuple(micro_batches))),
                               "options": est.options})


# ---------------------------------------------------------------------------------------------------
def iteration_ops(model, hardware, workload: Workload, draft=None, draft_len: int = 0, batch: int | str | None = None,
                  micro_batches: int = 2, placement: Placement | None = None, use_measured: bool = True) -> pd.DataFrame:
    """Every operation of one decode iteration with its roofline numbers, one row per kind of
    operation (on the largest micro-batch): op, stage, resource, flops, bytes (of the memory it reads:
    HBM on the GPU, DRAM on the CPU, the link for PCIe), intensity_flop_per_byte, time_s of one
    instance, count per iteration, achieved_flops, bound, source. The PCIe row is the hierarchical
    roofline's view of a streamed MoE layer: its expert FLOPs over the bytes streamed for it.
    With an even micro-batch split, sum(time_s x count) per target stage equals the cost model's."""
    m, hw = load_model(model), load_hardware(hardware)
    k = int(draft_len)
    d = _draft_for(m, draft) if k > 0 else None
    est = estimate(m, hw, workload, draft=d, draft_len=k, micro_batches=micro_batches, placement=placement,
                   batch=batch, timeline=False, run=False, use_measured=use_measured)
    cm = CostModel(m, hw, workload, d, use_measured=use_measured)
    ops = _OpRows(hw, cm.dtype, use_measured)
    _target_layer_ops(ops, cm, est)
    _target_once_ops(ops, cm, est)
    if k > 0 and d is not None:
        _draft_ops(ops, cm, est)
    df = pd.DataFrame(ops.rows)
    df.attrs.update(batch=est.batch, micro_batches=est.micro_batches, draft_len=k, model=m.name, hardware=hw.name)
    return df


class _OpRows:
    """The rows of iteration_ops: one per kind of operation, with its roofline time on its resource."""

    def __init__(self, hw, dtype: str, use_measured: bool):
        self.hw, self.dtype, self.use_measured = hw, dtype, use_measured
        self.rows: list[dict] = []

    def add(self, op: str, stage: Stage, res: str, cost: OpCost, count: float, **kw) -> None:
        """One row, unless the operation does not run (count 0) or has no time, bytes or flops."""
        if count <= 0:
            return
        t = time_on(res, self.hw, cost, use_measured=self.use_measured, **{"dtype": self.dtype, **kw})
        nbytes = {"gpu": cost.hbm_bytes, "cpu": cost.dram_bytes, "pcie": cost.pcie_bytes}[res]
        if t.time_s <= 0 or nbytes <= 0 or cost.flops <= 0:
            return
        self.rows.append({"op": op, "stage": stage.value, "resource": res, "flops": cost.flops, "bytes": nbytes,
                          "intensity_flop_per_byte": cost.flops / nbytes, "time_s": t.time_s, "count": count,
                          "achieved_flops": cost.flops / t.time_s, "bound": t.bound, "source": t.source})


def _target_layer_ops(ops: _OpRows, cm: CostModel, est: Estimate) -> None:
    """The target's per-layer operations on the largest micro-batch b (n = b (k+1) tokens): pre and
    post attention, verify attention on the CPU and the GPU, the routed experts, and their H2D."""
    m, wl, wb = cm.model, cm.workload, cm.wb
    B, M, pl = est.batch, est.micro_batches, est.placement
    b = split_even(B, M)[0]
    b_gpu_kv = split_even(min(pl.target_kv_gpu_sequences, B), M)[0]
    k1, s, kvd = est.draft_len + 1, wl.mean_context, wl.kv_dtype
    n = b * k1
    moe_layers = [i for i in m.moe_layers if i not in pl.cpu_expert_layers]
    L = m.num_layers
    ops.add("pre_attn", Stage.TARGET_PRE_ATTN, "gpu",
            OpCost(2.0 * n * cm.pre_elems, cm.pre_elems * wb + n * (m.hidden + cm.pre_out) * ACT_BYTES), L * M, tokens=n)
    if b - b_gpu_kv > 0 and pl.attention_device == "cpu":
        ops.add("attention (cpu)", Stage.TARGET_ATTENTION, "cpu", cm.attn_op(b - b_gpu_kv, k1, s, False), L * M,
                dtype=kvd, kind="attention", n_query=k1, context=s)
    if b_gpu_kv > 0:
        ops.add("attention (gpu)", Stage.TARGET_ATTENTION, "gpu", cm.attn_op(b_gpu_kv, k1, s, True), L * M,
                dtype=kvd, kind="attention")
    post_act = n * (m.num_q_heads * m.head_dim + 2 * m.hidden) * ACT_BYTES
    n_moe = len(m.moe_layers)
    ops.add("post_attn", Stage.TARGET_POST_ATTN, "gpu", OpCost(2.0 * n * cm.post_moe_elems,
                                                               cm.post_moe_elems * wb + post_act), n_moe * M, tokens=n)
    ops.add("post_attn (dense)", Stage.TARGET_POST_ATTN, "gpu",
            OpCost(2.0 * n * cm.post_dense_elems, cm.post_dense_elems * wb + post_act), (L - n_moe) * M, tokens=n)
    if not cm.E:
        return
    tj = touched_experts(cm.E, cm.na, n)
    moe_flops = 2.0 * n * cm.na * m.expert_elems
    ops.add("moe", Stage.TARGET_MOE, "gpu", OpCost(moe_flops, tj * cm.expert_bytes + n * cm.na * 2 * m.hidden * ACT_BYTES),
            len(moe_layers) * M, tokens=n * cm.na / tj)
    N = B * k1
    p_all = 1.0 - (1.0 - cm.na / cm.E) ** N
    unc = [cm.E - pl.expert_cache_slots[i] for i in moe_layers]
    mean_unc = float(np.mean(unc)) if unc else 0.0
    ops.add("h2d (experts)", Stage.TARGET_H2D, "pcie",
            OpCost(flops=2.0 * N * cm.na * m.expert_elems, pcie_bytes=mean_unc * p_all * cm.expert_bytes),
            len(moe_layers), chunk_bytes=cm.expert_bytes)


def _target_once_ops(ops: _OpRows, cm: CostModel, est: Estimate) -> None:
    """The LM head and the acceptance, which run once over the whole batch's B (k+1) tokens."""
    m = cm.model
    nb = est.batch * (est.draft_len + 1)
    ops.add("lm_head", Stage.TARGET_LM_HEAD, "gpu", OpCost(2.0 * nb * m.vocab_size * m.hidden,
                                                           m.vocab_size * m.hidden * cm.wb + nb * m.vocab_size * LOGIT_BYTES),
            1, tokens=nb)
    ops.add("verify.accept", Stage.VERIFY_ACCEPT, "gpu", OpCost(float(nb * m.vocab_size), nb * m.vocab_size * LOGIT_BYTES),
            1, kind="memory")


def _draft_ops(ops: _OpRows, cm: CostModel, est: Estimate) -> None:
    """The draft's k steps: matmuls of the GPU-KV and CPU-KV sequences, and their attention."""
    d, wl, k = cm.draft, cm.workload, est.draft_len
    s, kvd = wl.mean_context, wl.kv_dtype
    B = est.batch
    g = min(B, est.placement.draft_kv_gpu_sequences)
    c = B - g
    for seqs, label in ((g, "gpu-KV"), (c, "cpu-KV")):
        if seqs > 0:
            ops.add(f"draft matmuls ({label})", Stage.DRAFT_GPU if label == "gpu-KV" else Stage.DRAFT_CPU, "gpu",
                    OpCost(2.0 * seqs * cm.d_mm, cm.d_mm * cm.wb + 2 * seqs * d.hidden * ACT_BYTES), k, tokens=seqs)
    if g > 0:
        ops.add("draft attention (gpu)", Stage.DRAFT_GPU, "gpu",
                cm.attn_op(g, 1, s, True, spec=d, e_h=cm.d_e_h, kv_tok_bytes=cm.d_kv_tok_bytes, layers=d.num_layers),
                k, dtype=kvd, kind="attention")
    if c > 0:
        ops.add("draft attention (cpu)", Stage.DRAFT_CPU, "cpu",
                cm.attn_op(c, 1, s, False, spec=d, e_h=cm.d_e_h, kv_tok_bytes=cm.d_kv_tok_bytes, layers=d.num_layers),
                k, dtype=kvd, kind="attention", n_query=1, context=s)


def roofs(hardware, dtype: str = "bf16", chunk_bytes: float | None = None, use_measured: bool = True,
          intensities: np.ndarray | None = None) -> pd.DataFrame:
    """Each resource's roof: gpu min(peak, I x HBM), cpu min(peak, I x DRAM), pcie min(GPU peak,
    I x H2D) (the GPU fed over the link). Long form: resource, intensity_flop_per_byte, flops."""
    hw = load_hardware(hardware)
    xs = np.logspace(-2, 5, 80) if intensities is None else np.asarray(intensities, dtype=float)   # [I]
    gpu_peak, cpu_peak = peak_flops(hw, "gpu", dtype), peak_flops(hw, "cpu", dtype)
    rows = []
    for res, peak, bw in (("gpu", gpu_peak, memory_bandwidth(hw, "gpu", use_measured)[0]),
                          ("cpu", cpu_peak, memory_bandwidth(hw, "cpu", use_measured)[0]),
                          ("pcie", gpu_peak, h2d_rate(hw, chunk_bytes, use_measured)[0])):
        rows.append(pd.DataFrame({"resource": res, "intensity_flop_per_byte": xs, "flops": np.minimum(peak, xs * bw)}))
    return pd.concat(rows, ignore_index=True)


def roofline_chart(model, hardware, workload: Workload, draft=None, draft_len: int = 0, batch: int | str | None = None,
                   micro_batches: int = 2, placement: Placement | None = None, use_measured: bool = True):
    """The roofline figure of one iteration (plotly): iteration_ops on the roofs of `hardware`."""
    from specmoe.planner.report.plots import roofline

    m, hw = load_model(model), load_hardware(hardware)
    ops = iteration_ops(m, hw, workload, draft, draft_len, batch, micro_batches, placement, use_measured)
    r = roofs(hw, workload.weight_dtype, m.expert_elems * workload.weight_bytes_per_elem or None, use_measured)
    fig = roofline(ops, r)
    fig.update_layout(title=f"Roofline of one decode iteration: {m.name} on {hw.name}, batch {ops.attrs['batch']}, "
                            f"{ops.attrs['micro_batches']} micro-batches, k {ops.attrs['draft_len']}")
    return fig


def plan_roofline_chart(plan: Plan, use_measured: bool = True):
    """roofline_chart of a plan's own configuration (inputs, batch, micro-batches, k, placement)."""
    return roofline_chart(plan.model_spec(), plan.hardware_spec(), plan.workload_spec(), plan.draft_spec(),
                          plan.draft_len, plan.batch, plan.micro_batches, plan.placement, use_measured)


__all__ = ["best_by_k", "throughput_grid", "sweep", "sweep_pcie", "sweep_gpu_memory", "sweep_cpu_memory",
           "sweep_acceptance", "speculation_breakeven", "describe_breakeven", "plan_from_estimate", "fixed_plan", "choose_plan",
           "iteration_ops", "roofs", "roofline_chart", "plan_roofline_chart"]
