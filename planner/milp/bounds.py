"""Lower bounds on the optimum T of one point's program (planner/milp/build.py), used by the optimizer
to skip points without solving them: `memory_feasible` (a necessary memory condition),
`lower_bound_s` (cheap, closed form), `lp_bound_s` (the linear relaxation's optimum, without an LP
solver) and `lp_bound_reference_s` (the same relaxation solved by scipy, for the tests). Each is
+inf when memory cannot fit.

Array dimension letters: L = target layers, E = experts (E+1: the slot table 0..E), P = breakpoints.
"""
from __future__ import annotations

import numpy as np

from specmoe.planner.milp.costs import MEM_SLACK, PointCosts, Variant, lower_hull


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
        # rho: the matmul part relies on the GEMM rate not falling with more tokens (see _gemm_rate_drop)
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
            return n * f_cpu(l, min(float(E), slot_mem / (n * eb)))
        # mean slots c: n c w_e + nb w_e (E - c) <= slot memory (the buffers hold at least E - mean c)
        if n > nb:
            c_bar = min(float(E), max(0.0, (slot_mem - nb * E * eb) / (eb * (n - nb))))
        else:
            c_bar = float(E)
        return n * max(_interp(pc.h2d_table_s[l], c_bar) + p[l], a[l], G[0])
    c_cap = min(float(E), slot_mem / eb)
    if v.x_mode == "stream":
        # sum of maxes >= max of sums; the fewest total H2D for the slot budget takes the largest
        # decrements of the convex per-layer tables
        dec = np.sort(np.concatenate([-np.diff(pc.h2d_table_s[l]) for l in moe]))[::-1]
        budget = min(slot_mem / eb, float(len(dec)))
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


def lp_bound_reference_s(pc: PointCosts, v: Variant, max_time_s: float | None = None) -> float:
    """The plain reference of `lp_bound_s`: the same linear program solved by scipy's HiGHS (scipy is
    imported here only: it costs half a second). A small linear program with one mean
    slot count per class of identical MoE layers (Jensen: n f(mean c) <= sum_l f(c_l) for the
    convex per-layer time f, and the buffers hold at least E - mean c), continuous t and g, the
    relaxed draft time, and the same memory rows as the MILP. +inf when it is infeasible. Variant
    "per_layer" (min of two convex modes is not convex) falls back to lower_bound_s."""
    from scipy.optimize import linprog

    if v.x_mode == "per_layer" or (v.gpu_attention and pc.kv_h2d_s_per_seq is None):
        return lower_bound_s(pc, v)
    if not memory_feasible(pc, v):
        return float("inf")
    B, E, L, S = pc.batch, pc.num_experts, pc.num_layers, pc.time_scale_s
    moe = np.flatnonzero(pc.is_moe)
    classes: dict[int, list[int]] = {}
    for l in moe:
        classes.setdefault(int(pc.layer_class[l]), []).append(int(l))
    reps = [m[0] for m in classes.values()]
    counts = [len(m) for m in classes.values()]
    dense = [int(l) for l in np.flatnonzero(~pc.is_moe)]
    J, Dn = len(reps), len(dense)
    # variable order: c_j (J), tau_j (J), tau_d (Dn), t, g, U, delta
    nv = 2 * J + Dn + 4
    it, ig, iU, idl = 2 * J + Dn, 2 * J + Dn + 1, 2 * J + Dn + 2, 2 * J + Dn + 3
    y = 1.0 if v.gpu_attention else 0.0
    kvh = pc.kv_h2d_s_per_seq if v.gpu_attention else np.zeros(L)
    rows, rhs = [], []

    def ge(coef: dict, const: float, var: int) -> None:
        # var >= const + sum coef_i x_i   ->   sum coef_i x_i - var <= -const
        r = np.zeros(nv)
        for i, a_ in coef.items():
            r[i] += a_
        r[var] -= 1.0
        rows.append(r)
        rhs.append(-const)

    def layer_terms(l: int, var: int) -> None:
        a_c, a_g, kv = pc.attn_cpu_s_per_seq[l] / S, pc.attn_gpu_s_per_seq[l] / S, kvh[l] / S
        # cpu attention a_c (1-y)(B - t); gpu attention a_g (t + y (B - t)); kv streaming kv y (B - t)
        cpu = ({it: -a_c * (1 - y)}, a_c * (1 - y) * B)
        gpu = ({it: a_g * (1 - y)}, pc.gpu_fixed_s[l] / S + a_g * y * B)
        pci = ({it: -kv * y}, kv * y * B)
        return cpu, gpu, pci

    for j, (l, n) in enumerate(zip(reps, counts)):
        cpu, gpu, pci = layer_terms(l, J + j)
        moe_s = pc.moe_gpu_s[l] / S
        if v.x_mode == "stream":
            for b, s_ in pc.h2d_lines(l):
                ge({**pci[0], j: s_ / S}, pci[1] + b / S, J + j)
            ge(cpu[0], cpu[1], J + j)
            ge(gpu[0], gpu[1] + moe_s, J + j)
            ge({j: -1.0}, float(E), iU)                                    # U >= E - c_j
        else:
            ge(pci[0], pci[1], J + j)
            ge({**cpu[0], j: -pc.cpu_expert_s / S}, cpu[1] + pc.cpu_expert_s * E / S, J + j)
            ge({**gpu[0], j: moe_s / E}, gpu[1], J + j)
    for d, l in enumerate(dense):
        cpu, gpu, pci = layer_terms(l, 2 * J + d)
        for coef, const in (cpu, gpu, pci):
            ge(coef, const, 2 * J + d)
    if pc.uses_draft:
        # relaxed draft: max(rho matmuls of all B + GPU attention of g, CPU attention of B - g)
        ag, ac = pc.draft_attn_gpu_s / B / S, pc.draft_attn_cpu_s / B / S
        ge({ig: ag}, pc.gemm_rate_drop * pc.draft_mm_s / S, idl)
        ge({ig: -ac}, ac * B, idl)
    Gb, Cb = pc.gpu_usable_bytes, pc.cpu_usable_bytes
    r = np.zeros(nv)
    for j, n in enumerate(counts):
        r[j] = n * pc.expert_bytes / Gb
    r[iU] = (max(1, v.streaming_buffers) * pc.expert_bytes / Gb) if v.x_mode == "stream" else 0.0
    r[ig], r[it] = pc.kv_draft_bytes / Gb, pc.kv_target_bytes / Gb
    rows.append(r)
    rhs.append(1.0 - MEM_SLACK - pc.gpu_fixed_bytes / Gb)                         # GPU memory
    r = np.zeros(nv)
    r[it], r[ig] = -pc.kv_target_bytes / Cb, -pc.kv_draft_bytes / Cb
    rows.append(r)
    rhs.append(1.0 - MEM_SLACK - (pc.cpu_fixed_bytes + B * (pc.kv_target_bytes + pc.kv_draft_bytes)) / Cb)   # CPU memory
    cost = np.zeros(nv)
    cost[J:2 * J] = counts
    cost[2 * J:2 * J + Dn] = 1.0
    cost[idl] = 1.0
    if max_time_s is not None:
        rows.append(cost.copy())
        rhs.append(max_time_s / S - pc.fixed_s / S)
    bounds = ([(0, E)] * J + [(0, None)] * (J + Dn) + [(0, B if v.target_kv_gpu else 0), (0, B if pc.uses_draft else 0),
              (0, E), (0, None)])
    res = linprog(cost, A_ub=np.array(rows), b_ub=np.array(rhs), bounds=bounds, method="highs")
    if res.status == 2:
        return float("inf")
    if res.status != 0:
        return lower_bound_s(pc, v)
    # the LP's own tolerance (~1e-9 relative) must not turn the bound into an overestimate
    return (float(res.fun) + pc.fixed_s / S) * S * (1 - 1e-7)


def lp_bound_s(pc: PointCosts, v: Variant) -> float:
    """The optimum of the linear relaxation of `lp_bound_reference_s` (one class of identical MoE
    layers), computed without an LP solver: for a fixed t the program in (mean slots c, draft split
    g) is convex and piecewise linear in g once c takes all the GPU memory g leaves (or its best
    value below that), so its minimum is at one of a few kinks; the value V(t) is convex in t
    (an LP's value function), minimised by golden section and bounded from below by the secants
    of the points evaluated. Several classes (routing statistics) or per-layer x: lower_bound_s."""
    moe = np.flatnonzero(pc.is_moe)
    if v.x_mode == "per_layer" or (v.gpu_attention and pc.kv_h2d_s_per_seq is None):
        return lower_bound_s(pc, v)
    if len(set(pc.layer_class[moe].tolist())) > 1:
        return lp_bound_reference_s(pc, v)          # several classes (routing statistics): the LP itself
    if not memory_feasible(pc, v):
        return float("inf")
    B, E, n = pc.batch, pc.num_experts, len(moe)
    slack = 1.0 - MEM_SLACK
    eb, nb = pc.expert_bytes, max(1, v.streaming_buffers)
    kt, kd = pc.kv_target_bytes, pc.kv_draft_bytes
    gfree = pc.gpu_usable_bytes * slack - pc.gpu_fixed_bytes
    cfree = pc.cpu_usable_bytes * slack - pc.cpu_fixed_bytes - B * (kt + kd)   # CPU room left with all KV there
    y = 1.0 if v.gpu_attention else 0.0
    kvh = pc.kv_h2d_s_per_seq if v.gpu_attention else np.zeros(pc.num_layers)
    stream = v.x_mode == "stream" and n > 0
    if n == 0:
        buf, coef = 0.0, 0.0
    elif stream and n <= nb:
        buf, coef = n * E * eb, 0.0          # every slot filled is cheapest (no buffers then)
    elif stream:
        buf, coef = nb * E * eb, (n - nb) * eb
    else:
        buf, coef = 0.0, n * eb
    l0 = int(moe[0]) if n else -1
    lines = pc.h2d_lines(l0) if stream else []
    # slots where the H2D table changes slope (between its consecutive lines)
    kinks = [(b2 - b1) / (s1 - s2) for (b1, s1), (b2, s2) in zip(lines[:-1], lines[1:]) if s1 != s2]
    dense = np.flatnonzero(~pc.is_moe)
    ag_d, ac_d = (pc.draft_attn_gpu_s / B, pc.draft_attn_cpu_s / B) if pc.uses_draft else (0.0, 0.0)

    def layer_parts(l: int, t: float) -> tuple[float, float, float]:
        off = B - t
        return (kvh[l] * y * off, pc.attn_cpu_s_per_seq[l] * (1 - y) * off,
                pc.gpu_fixed_s[l] + pc.attn_gpu_s_per_seq[l] * (t + y * off))

    def F(c: float, t: float) -> float:
        p, a, g = layer_parts(l0, t)
        if stream:
            return max(max(b + s * c for b, s in lines) + p, a, g + pc.moe_gpu_s[l0])
        return max(p, a + pc.cpu_expert_s * (E - c), g + pc.moe_gpu_s[l0] * c / E)

    def c_best(cmax: float, t: float) -> float:
        """The slots to use given at most cmax: all of them (streaming), or the crossing point (CPU experts)."""
        if stream or n == 0:
            return cmax
        p, a, g = layer_parts(l0, t)
        b1, b2 = pc.cpu_expert_s, pc.moe_gpu_s[l0] / E
        cross = (a + b1 * E - g) / (b1 + b2) if b1 + b2 > 0 else cmax
        return min(cmax, max(0.0, cross))

    mm_d = pc.gemm_rate_drop * pc.draft_mm_s
    hull = draft_lower_hull(pc) if pc.uses_draft else None

    def D(g: float) -> float:
        if not pc.uses_draft:
            return 0.0
        relaxed = max(mm_d + ag_d * g, ac_d * (B - g))
        if hull is None:
            return relaxed
        return max(relaxed, float(np.interp(g, hull[0], hull[1])))

    def V(t: float) -> float:
        R = gfree - buf - kt * t                                # memory left for slots and draft KV
        if R < -1e-9 * gfree:
            return float("inf")
        R = max(R, 0.0)
        dense_s = sum(max(layer_parts(int(l), t)) for l in dense)
        if kd > 0:
            g_lo = max(0.0, -(cfree + kt * t) / kd)             # CPU: kt (B - t) + kd (B - g) <= room
            g_hi = min(float(B), R / kd)
        else:
            if cfree + kt * t < -1e-9 * max(1.0, abs(cfree)):
                return float("inf")
            g_lo = g_hi = 0.0
        if g_lo > g_hi + 1e-9:
            return float("inf")

        def cmax(g: float) -> float:
            if n == 0:
                return 0.0
            if coef == 0.0:
                return float(E)
            return min(float(E), max(0.0, (R - kd * g) / coef))

        cands = {g_lo, g_hi}
        if pc.uses_draft and ag_d + ac_d > 0:
            cands.add((ac_d * B - mm_d) / (ag_d + ac_d))
        if hull is not None:
            cands.update(float(x) for x in hull[0])
        if kd > 0 and coef > 0:
            # g where the slots hit E, or where the per-layer time changes its active piece
            cs = [float(E)] + kinks
            if n:
                p, a, gg = layer_parts(l0, t)
                K = max(a, gg + pc.moe_gpu_s[l0]) if stream else None
                if stream:
                    cs += [(K - p - b) / s for b, s in lines if s != 0]
                else:
                    cs.append(c_best(float(E), t))
            cands.update((R - coef * c) / kd for c in cs)
        best = float("inf")
        for g in cands:
            g = min(max(g, g_lo), g_hi)
            c = c_best(cmax(g), t)
            best = min(best, n * F(c, t) + D(g)) if n else min(best, D(g))
        return best + dense_s

    t_hi = min(float(B) if v.target_kv_gpu else 0.0, (gfree - buf) / kt if kt > 0 else float(B))
    t_lo = max(0.0, -(cfree + B * kd) / kt) if kt > 0 else 0.0   # CPU: with every draft KV on the GPU
    if t_lo > t_hi + 1e-9:
        return float("inf")
    t_hi = max(t_hi, t_lo)
    pts = {t_lo: V(t_lo), t_hi: V(t_hi)}
    a_, b_ = t_lo, t_hi
    phi = (np.sqrt(5.0) - 1) / 2
    x1, x2 = b_ - phi * (b_ - a_), a_ + phi * (b_ - a_)
    f1, f2 = V(x1), V(x2)
    pts[x1], pts[x2] = f1, f2
    for _ in range(60):
        if b_ - a_ <= 1.0:               # the secant bound below stays valid at any bracket width
            break
        if f1 <= f2:
            b_, x2, f2 = x2, x1, f1
            x1 = b_ - phi * (b_ - a_)
            f1 = V(x1)
            pts[x1] = f1
        else:
            a_, x1, f1 = x1, x2, f2
            x2 = a_ + phi * (b_ - a_)
            f2 = V(x2)
            pts[x2] = f2
    lb = _convex_min_lower_bound(sorted(pts.items()))
    return (lb + pc.fixed_s) * (1 - 1e-9)


def draft_lower_hull(pc: PointCosts) -> tuple[np.ndarray, np.ndarray] | None:
    """A convex function below D(g): the lower convex hull of its breakpoints, when they reproduce D
    at every integer (peak rates). Not with measured rates: D is curved between its breakpoints there
    and their hull can lie above it (measured: up to 20%), so those bounds keep the relaxed draft."""
    if pc.draft_g is None or len(pc.draft_g) < 2 or not pc.draft_exact:
        return None
    return lower_hull(np.asarray(pc.draft_g, float), np.asarray(pc.draft_s, float))


def _convex_min_lower_bound(pts: list[tuple[float, float]]) -> float:
    """A lower bound of min V over [x_0, x_n] for a convex V known at the sorted points (x_i, V_i):
    between x_i and x_i+1, V lies above the secants of the neighbouring pairs extended."""
    xs = [p[0] for p in pts]
    fs = [p[1] for p in pts]
    if not all(np.isfinite(fs)):
        # the feasible set is an interval and V is +inf outside; keep the finite run
        fin = [i for i, f in enumerate(fs) if np.isfinite(f)]
        if not fin:
            return float("inf")
        xs, fs = xs[fin[0]:fin[-1] + 1], fs[fin[0]:fin[-1] + 1]
    lb = min(fs)
    for i in range(len(xs) - 1):
        cands = []
        if i >= 1 and xs[i] > xs[i - 1]:
            sl = (fs[i] - fs[i - 1]) / (xs[i] - xs[i - 1])
            cands.append((fs[i], sl, xs[i]))                    # line through x_i-1, x_i
        if i + 2 < len(xs) and xs[i + 2] > xs[i + 1]:
            sr = (fs[i + 2] - fs[i + 1]) / (xs[i + 2] - xs[i + 1])
            cands.append((fs[i + 1], sr, xs[i + 1]))            # line through x_i+1, x_i+2
        if not cands:
            lb = min(lb, min(fs[i], fs[i + 1]))                 # no information: only the ends
            continue
        # the max of the two extended lines, minimised over [x_i, x_i+1]
        grid = [xs[i], xs[i + 1]]
        if len(cands) == 2:
            (f_a, s_a, x_a), (f_b, s_b, x_b) = cands
            if s_a != s_b:
                xc = (f_b - s_b * x_b - f_a + s_a * x_a) / (s_a - s_b)
                if xs[i] < xc < xs[i + 1]:
                    grid.append(xc)
        lb = min(lb, min(max(f + s * (x - x0) for f, s, x0 in cands) for x in grid))
    return lb
