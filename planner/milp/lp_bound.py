"""`lp_bound_s`: the optimum of the linear relaxation of one point's program (planner/milp/build.py)
for one class of identical MoE layers, computed without an LP solver; the same program solved by
scipy is `lp_bound_reference_s` (planner/milp/lp_reference.py), which the tests compare it with.

For a fixed t (target-KV sequences on the GPU) the program in (mean slots c, draft split g) is
convex and piecewise linear in g once c takes all the GPU memory g leaves (or its best value below
that), so its minimum is at one of a few kinks; the value V(t) is convex in t (an LP's value
function), minimised by golden section and bounded from below by the secants of the points
evaluated.

Array dimension letters: L = target layers, P = breakpoints.
"""
from __future__ import annotations

import numpy as np

from specmoe.planner.milp.bounds import draft_lower_hull, lower_bound_s, memory_feasible
from specmoe.planner.milp.costs import MEM_SLACK, PointCosts, Variant
from specmoe.planner.milp.lp_reference import lp_bound_reference_s


def lp_bound_s(pc: PointCosts, v: Variant) -> float:
    """The optimum of the linear relaxation of `lp_bound_reference_s` (one class of identical MoE
    layers), in seconds; +inf when memory cannot fit. Per-layer x, or GPU attention without the
    KV-streaming slopes: lower_bound_s. Several classes (routing statistics): the LP itself."""
    moe = np.flatnonzero(pc.is_moe)
    if v.x_mode == "per_layer" or (v.gpu_attention and pc.kv_h2d_s_per_seq is None):
        return lower_bound_s(pc, v)
    if len(set(pc.layer_class[moe].tolist())) > 1:
        return lp_bound_reference_s(pc, v)          # several classes (routing statistics): the LP itself
    if not memory_feasible(pc, v):
        return float("inf")
    rel = _OneClassRelaxation(pc, v)
    t_lo, t_hi = rel.t_range()
    if t_lo > t_hi + 1e-9:
        return float("inf")
    t_hi = max(t_hi, t_lo)
    lb = _convex_min_lower_bound(sorted(_golden_section_samples(rel.value, t_lo, t_hi).items()))
    return (lb + pc.fixed_s) * (1 - 1e-9)


class _OneClassRelaxation:
    """The relaxed program of one point whose MoE layers are identical (n of them, the first l0):
    per-layer time F(c, t), draft time D(g), and the value V(t) minimised over c and g."""

    def __init__(self, pc: PointCosts, v: Variant):
        self.pc, self.v = pc, v
        moe = np.flatnonzero(pc.is_moe)
        B, E, n = pc.batch, pc.num_experts, len(moe)
        self.B, self.E, self.n = B, E, n
        slack = 1.0 - MEM_SLACK
        eb, nb = pc.expert_bytes, max(1, v.streaming_buffers)
        self.kt, self.kd = pc.kv_target_bytes, pc.kv_draft_bytes
        self.gfree = pc.gpu_usable_bytes * slack - pc.gpu_fixed_bytes
        # CPU room left with all KV there
        self.cfree = pc.cpu_usable_bytes * slack - pc.cpu_fixed_bytes - B * (self.kt + self.kd)
        self.y = 1.0 if v.gpu_attention else 0.0
        self.kvh = pc.kv_h2d_s_per_seq if v.gpu_attention else np.zeros(pc.num_layers)      # [L]
        self.stream = stream = v.x_mode == "stream" and n > 0
        if n == 0:
            self.buf, self.coef = 0.0, 0.0
        elif stream and n <= nb:
            self.buf, self.coef = n * E * eb, 0.0          # every slot filled is cheapest (no buffers then)
        elif stream:
            self.buf, self.coef = nb * E * eb, (n - nb) * eb
        else:
            self.buf, self.coef = 0.0, n * eb
        self.l0 = int(moe[0]) if n else -1
        self.lines = pc.h2d_lines(self.l0) if stream else []
        # slots where the H2D table changes slope (between its consecutive lines)
        self.kinks = [(b2 - b1) / (s1 - s2) for (b1, s1), (b2, s2) in zip(self.lines[:-1], self.lines[1:]) if s1 != s2]
        self.dense = np.flatnonzero(~pc.is_moe)
        self.ag_d, self.ac_d = (pc.draft_attn_gpu_s / B, pc.draft_attn_cpu_s / B) if pc.uses_draft else (0.0, 0.0)
        self.mm_d = pc.gemm_rate_drop * pc.draft_mm_s
        self.hull = draft_lower_hull(pc) if pc.uses_draft else None                         # ([P], [P])

    def t_range(self) -> tuple[float, float]:
        """The target-KV sequences on the GPU that memory admits: at most all B (when allowed) or what
        the GPU holds past the buffers; at least what the CPU cannot hold with every draft KV on the GPU."""
        B, kt = self.B, self.kt
        t_hi = min(float(B) if self.v.target_kv_gpu else 0.0, (self.gfree - self.buf) / kt if kt > 0 else float(B))
        t_lo = max(0.0, -(self.cfree + B * self.kd) / kt) if kt > 0 else 0.0
        return t_lo, t_hi

    def layer_parts(self, l: int, t: float) -> tuple[float, float, float]:
        """Layer l's KV streaming, CPU attention and GPU time (without the MoE) with t GPU-KV sequences."""
        pc, off = self.pc, self.B - t
        return (self.kvh[l] * self.y * off, pc.attn_cpu_s_per_seq[l] * (1 - self.y) * off,
                pc.gpu_fixed_s[l] + pc.attn_gpu_s_per_seq[l] * (t + self.y * off))

    def layer_time(self, c: float, t: float) -> float:
        """F(c, t): one MoE layer's time with c cache slots, the max of its resources' times."""
        pc, l0 = self.pc, self.l0
        p, a, g = self.layer_parts(l0, t)
        if self.stream:
            return max(max(b + s * c for b, s in self.lines) + p, a, g + pc.moe_gpu_s[l0])
        return max(p, a + pc.cpu_expert_s * (self.E - c), g + pc.moe_gpu_s[l0] * c / self.E)

    def best_slots(self, cmax: float, t: float) -> float:
        """The slots to use given at most cmax: all of them (streaming), or the crossing point (CPU experts)."""
        if self.stream or self.n == 0:
            return cmax
        p, a, g = self.layer_parts(self.l0, t)
        b1, b2 = self.pc.cpu_expert_s, self.pc.moe_gpu_s[self.l0] / self.E
        cross = (a + b1 * self.E - g) / (b1 + b2) if b1 + b2 > 0 else cmax
        return min(cmax, max(0.0, cross))

    def draft_time(self, g: float) -> float:
        """D(g): the relaxed draft time, max(rho matmuls + GPU attention of g, CPU attention of B - g),
        raised to the lower hull of the exact breakpoints where they are exact."""
        if not self.pc.uses_draft:
            return 0.0
        relaxed = max(self.mm_d + self.ag_d * g, self.ac_d * (self.B - g))
        if self.hull is None:
            return relaxed
        return max(relaxed, float(np.interp(g, self.hull[0], self.hull[1])))

    def slots_max(self, g: float, R: float) -> float:
        """The most slots per layer that the memory R left after the target KV holds with g draft KVs."""
        if self.n == 0:
            return 0.0
        if self.coef == 0.0:
            return float(self.E)
        return min(float(self.E), max(0.0, (R - self.kd * g) / self.coef))

    def value(self, t: float) -> float:
        """V(t): the relaxed program's optimum with t GPU-KV sequences (+inf when memory cannot fit)."""
        R = self.gfree - self.buf - self.kt * t                 # memory left for slots and draft KV
        if R < -1e-9 * self.gfree:
            return float("inf")
        R = max(R, 0.0)
        dense_s = sum(max(self.layer_parts(int(l), t)) for l in self.dense)
        g_range = self.draft_range(t, R)
        if g_range is None:
            return float("inf")
        g_lo, g_hi = g_range
        best = float("inf")
        for g in self.draft_candidates(t, R, g_lo, g_hi):
            g = min(max(g, g_lo), g_hi)
            c = self.best_slots(self.slots_max(g, R), t)
            best = min(best, self.n * self.layer_time(c, t) + self.draft_time(g)) if self.n else min(best, self.draft_time(g))
        return best + dense_s

    def draft_range(self, t: float, R: float) -> tuple[float, float] | None:
        """The draft-KV sequences on the GPU that memory admits (None: none does)."""
        kt, kd, cfree = self.kt, self.kd, self.cfree
        if kd > 0:
            g_lo = max(0.0, -(cfree + kt * t) / kd)             # CPU: kt (B - t) + kd (B - g) <= room
            g_hi = min(float(self.B), R / kd)
        else:
            if cfree + kt * t < -1e-9 * max(1.0, abs(cfree)):
                return None
            g_lo = g_hi = 0.0
        if g_lo > g_hi + 1e-9:
            return None
        return g_lo, g_hi

    def draft_candidates(self, t: float, R: float, g_lo: float, g_hi: float) -> set[float]:
        """The draft splits g where V's piecewise-linear function of g can have its minimum: the ends,
        the relaxed draft's crossing, the hull's breakpoints, and where the slots reach E or the layer
        time changes its active piece."""
        pc, kd, coef = self.pc, self.kd, self.coef
        cands = {g_lo, g_hi}
        if pc.uses_draft and self.ag_d + self.ac_d > 0:
            cands.add((self.ac_d * self.B - self.mm_d) / (self.ag_d + self.ac_d))
        if self.hull is not None:
            cands.update(float(x) for x in self.hull[0])
        if kd > 0 and coef > 0:
            # g where the slots hit E, or where the per-layer time changes its active piece
            cs = [float(self.E)] + self.kinks
            if self.n:
                p, a, gg = self.layer_parts(self.l0, t)
                K = max(a, gg + pc.moe_gpu_s[self.l0]) if self.stream else None
                if self.stream:
                    cs += [(K - p - b) / s for b, s in self.lines if s != 0]
                else:
                    cs.append(self.best_slots(float(self.E), t))
            cands.update((R - coef * c) / kd for c in cs)
        return cands


def _golden_section_samples(V, t_lo: float, t_hi: float) -> dict[float, float]:
    """The points a golden-section search for the minimum of the convex V over [t_lo, t_hi] evaluates,
    with their values; it stops at a bracket of width 1 (the secant bound stays valid at any width)."""
    pts = {t_lo: V(t_lo), t_hi: V(t_hi)}
    a_, b_ = t_lo, t_hi
    phi = (np.sqrt(5.0) - 1) / 2
    x1, x2 = b_ - phi * (b_ - a_), a_ + phi * (b_ - a_)
    f1, f2 = V(x1), V(x2)
    pts[x1], pts[x2] = f1, f2
    for _ in range(60):
        if b_ - a_ <= 1.0:
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
    return pts


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
