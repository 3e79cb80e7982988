"""Lower bounds on the optimum T of one point's program (planner/milp/build.py), used by the optimizer
to skip points without solving them: `memory_feasible` (a necessary memory condition) and
`lower_bound_s` (cheap, closed form), +inf when memory cannot fit; `draft_lower_hull` (a convex
function below the draft time, for the tighter bounds). The linear relaxation's bound is `lp_bound_s`
(planner/milp/lp_bound.py), its scipy reference `lp_bound_reference_s` (planner/milp/lp_reference.py).

Array dimension letters: L = target layers, E = experts (E+1: the slot table 0..E), P = breakpoints.
"""
from __future__ import annotations

import numpy as np

from specmoe.planner.milp.costs import PointCosts, Variant, lower_hull


def memory_feasible(pc: PointCosts, v: Variant) -> bool:
    """Necessary memory condition: KV that does not fit the CPU fits in the GPU memory left after the
    weights, activations and the fewest streaming buffers the variant allows."""
    B, E = pc.batch, pc.num_experts
    n_moe = int(pc.is_moe.sum())
    nb = max(1, v.streaming_buffers)
    buf_min = 0.0 if (v.x_mode != "stream" or E == 0 or n_moe == 0) else min(nb, n_moe) * E * pc.expert_bytes
    free = pc.gpu_usable_bytes - pc.gpu_fixed_bytes - buf_min
    cpu_free = pc.cpu_usable_bytes - pc.cpu_fixed_bytes
    if free < 0 or cpu_free < 0:
        return False
    over = B * (pc.kv_target_bytes + pc.kv_draft_bytes) - cpu_free
    movable = (B * pc.kv_target_bytes if v.target_kv_gpu else 0.0) + B * pc.kv_draft_bytes
    return over <= min(free, movable) + 1e-9 * max(1.0, over)


def lower_bound_s(pc: PointCosts, v: Variant) -> float:
    """A cheap valid lower bound of the program's optimum T (seconds); +inf when memory cannot fit.

    Relaxations: the KV that must leave the CPU is charged to the GPU first; the cache slots get the
    rest (continuous), the target KV the best place it could have on its own, the draft a relaxed
    D(g) >= max(matmuls of all B + GPU attention of g, CPU attention of B - g). Layers: identical
    layers (one class) by Jensen, n f(mean slots) <= sum_l f(c_l) for the convex per-layer time f;
    otherwise the max of the per-resource sums, with the fewest total H2D for the slot budget."""
    if not memory_feasible(pc, v):
        return float("inf")
    B, E, L = pc.batch, pc.num_experts, pc.num_layers
    eb, nb = pc.expert_bytes, max(1, v.streaming_buffers)
    moe = np.flatnonzero(pc.is_moe)
    n = len(moe)
    free = pc.gpu_usable_bytes - pc.gpu_fixed_bytes
    cpu_free = pc.cpu_usable_bytes - pc.cpu_fixed_bytes
    mand = max(0.0, B * (pc.kv_target_bytes + pc.kv_draft_bytes) - cpu_free)     # KV the GPU must hold
    buf_min = min(nb, n) * E * eb if (v.x_mode == "stream" and n and E) else 0.0
    slot_mem = max(0.0, free - mand)
    t_cap = min(B, max(0.0, free - buf_min) / pc.kv_target_bytes) if (v.target_kv_gpu and pc.kv_target_bytes > 0) else 0.0
    cpu_seqs = 0.0 if v.gpu_attention else max(0.0, B - t_cap)
    kv_seqs = max(0.0, B - t_cap) if v.gpu_attention else 0.0
    kvh = pc.kv_h2d_s_per_seq if pc.kv_h2d_s_per_seq is not None else np.zeros(L)
    a = pc.attn_cpu_s_per_seq * cpu_seqs                                           # [L]
    p = kvh * kv_seqs                                                              # [L]
    g = pc.gpu_fixed_s + (pc.attn_gpu_s_per_seq * B if v.gpu_attention else 0.0)   # [L]
    dense = np.flatnonzero(~pc.is_moe)
    total = float(np.maximum(np.maximum(p[dense], a[dense]), g[dense]).sum())
    if n:
        total += _moe_layers_bound(pc, v, moe, a, p, g, slot_mem)
    if pc.uses_draft:
        kd = pc.kv_draft_bytes
        g_hi = min(B, max(0.0, free - buf_min) / kd)
        g_lo = min(g_hi, max(0.0, B - (cpu_free - (B - t_cap) * pc.kv_target_bytes) / kd))
        ag, ac = pc.draft_attn_gpu_s / B, pc.draft_attn_cpu_s / B
        # rho: the matmul part relies on the GEMM rate not falling with more tokens (PointCosts.gemm_rate_drop, planner/milp/costs.py)
        mm = pc.gemm_rate_drop * pc.draft_mm_s
        cands = [g_lo, g_hi] + ([min(max((ac * B - mm) / (ag + ac), g_lo), g_hi)] if ag + ac > 0 else [])
        total += min(max(mm + ag * x, ac * (B - x)) for x in cands)
    return total + pc.fixed_s


def _interp(tab: np.ndarray, c: float) -> float:
    lo = min(int(np.floor(c)), len(tab) - 1)
    return float(tab[lo] if lo >= len(tab) - 1 else tab[lo] + (tab[lo + 1] - tab[lo]) * (c - lo))


def _moe_layers_bound(pc: PointCosts, v: Variant, moe, a, p, g, slot_mem: float) -> float:
    E, eb, n = pc.num_experts, pc.expert_bytes, len(moe)
    nb = max(1, v.streaming_buffers)
    G = g[moe] + pc.moe_gpu_s[moe]
    cu = pc.cpu_expert_s
    one_class = len(set(pc.layer_class[moe].tolist())) == 1

    def f_cpu(l: int, c_cap: float) -> float:
        # min over c in [0, c_cap] of max(kv, A + cu (E - c), G + moe c / E)
        a1, b1 = a[l] + cu * E, cu
        a2, b2 = g[l], pc.moe_gpu_s[l] / E
        cs = [0.0, c_cap] + ([min(max((a1 - a2) / (b1 + b2), 0.0), c_cap)] if b1 + b2 > 0 else [])
        return max(p[l], min(max(a1 - b1 * c, a2 + b2 * c) for c in cs))

    if one_class and v.x_mode in ("stream", "cpu"):
        l = int(moe[0])
        if v.x_mode == "cpu":
            return n * f_cpu(l, min(float(E), slot_mem / (n * eb)) if eb > 0 else float(E))
        # mean slots c: n c w_e + nb w_e (E - c) <= slot memory (the buffers hold at least E - mean c)
        if n > nb and eb > 0:
            c_bar = min(float(E), max(0.0, (slot_mem - nb * E * eb) / (eb * (n - nb))))
        else:
            c_bar = float(E)
        return n * max(_interp(pc.h2d_table_s[l], c_bar) + p[l], a[l], G[0])
    c_cap = min(float(E), slot_mem / eb) if eb > 0 else float(E)      # eb 0: slots take no device memory
    if v.x_mode == "stream":
        # sum of maxes >= max of sums; the fewest total H2D for the slot budget takes the largest
        # decrements of the convex per-layer tables
        dec = np.sort(np.concatenate([-np.diff(pc.h2d_table_s[l]) for l in moe]))[::-1]
        budget = min(slot_mem / eb, float(len(dec))) if eb > 0 else float(len(dec))
        k = int(np.floor(budget))
        saved = dec[:k].sum() + (dec[k] * (budget - k) if k < len(dec) else 0.0)
        h_tot = float(pc.h2d_table_s[moe, 0].sum() - saved)
        return max(h_tot + float(p[moe].sum()), float(a[moe].sum()), float(G.sum()))
    # per-layer x (or several classes with CPU experts): each layer alone, the better of its two modes
    total = 0.0
    for i, l in enumerate(moe):
        f = f_cpu(int(l), c_cap)
        if v.x_mode == "per_layer":
            f = min(f, max(_interp(pc.h2d_table_s[l], c_cap) + p[l], a[l], G[i]))
        total += f
    return total


def draft_lower_hull(pc: PointCosts) -> tuple[np.ndarray, np.ndarray] | None:
    """A convex function below D(g): the lower convex hull of its breakpoints, when they reproduce D
    at every integer (peak rates). Not with measured rates: D is curved between its breakpoints there
    and their hull can lie above it (measured: up to 20%), so those bounds keep the relaxed draft."""
    if pc.draft_g is None or len(pc.draft_g) < 2 or not pc.draft_exact:
        return None
    return lower_hull(np.asarray(pc.draft_g, float), np.asarray(pc.draft_s, float))
