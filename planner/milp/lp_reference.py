"""`lp_bound_reference_s`: the linear relaxation behind planner/milp/lp_bound.py's `lp_bound_s`, solved
by scipy's HiGHS, as the plain reference the tests compare the fast bound with (and the bound itself
when MoE layers fall in several classes, under routing statistics).

The program: one mean slot count c_j per class j of identical MoE layers (Jensen: n f(mean c) <=
sum_l f(c_l) for the convex per-layer time f, and the buffers hold at least E - mean c), one epigraph
variable tau per class and per dense layer, continuous t (target-KV sequences on the GPU) and g
(draft-KV sequences on the GPU), U (non-resident experts of a streaming layer) and delta (the relaxed
draft time), with the same memory rows as the MILP. Times are in units of `time_scale_s`, memory in
units of the usable bytes.

Array dimension letters: L = target layers, V = the program's variables.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from specmoe.planner.milp.bounds import lower_bound_s, memory_feasible
from specmoe.planner.milp.costs import MEM_SLACK, PointCosts, Variant


@dataclass
class _Layout:
    """Where each variable sits: c_j (J), tau_j (J), tau_d (Dn), t, g, U, delta."""

    reps: list[int]          # one MoE layer per class
    counts: list[int]        # the class sizes
    dense: list[int]         # the dense layers

    @classmethod
    def of(cls, pc: PointCosts) -> "_Layout":
        classes: dict[int, list[int]] = {}
        for l in np.flatnonzero(pc.is_moe):
            classes.setdefault(int(pc.layer_class[l]), []).append(int(l))
        return cls([m[0] for m in classes.values()], [len(m) for m in classes.values()],
                   [int(l) for l in np.flatnonzero(~pc.is_moe)])

    @property
    def J(self) -> int:
        return len(self.reps)

    @property
    def nv(self) -> int:
        return 2 * self.J + len(self.dense) + 4

    @property
    def it(self) -> int:
        return 2 * self.J + len(self.dense)

    @property
    def ig(self) -> int:
        return self.it + 1

    @property
    def iU(self) -> int:
        return self.it + 2

    @property
    def idl(self) -> int:
        return self.it + 3


class _Rows:
    """The inequality rows A_ub x <= b_ub of the program."""

    def __init__(self, nv: int):
        self.nv, self.rows, self.rhs = nv, [], []

    def ge(self, coef: dict, const: float, var: int) -> None:
        # var >= const + sum coef_i x_i   ->   sum coef_i x_i - var <= -const
        r = np.zeros(self.nv)                                                   # [V]
        for i, a_ in coef.items():
            r[i] += a_
        r[var] -= 1.0
        self.add(r, -const)

    def add(self, row: np.ndarray, rhs: float) -> None:
        self.rows.append(row)
        self.rhs.append(rhs)


def lp_bound_reference_s(pc: PointCosts, v: Variant, max_time_s: float | None = None) -> float:
    """The optimum of the linear relaxation (seconds), solved by scipy's HiGHS (scipy is imported here
    only: it costs half a second); +inf when it is infeasible. Variant "per_layer" (the min of two
    convex modes is not convex) falls back to lower_bound_s."""
    from scipy.optimize import linprog

    if v.x_mode == "per_layer" or (v.gpu_attention and pc.kv_h2d_s_per_seq is None):
        return lower_bound_s(pc, v)
    if not memory_feasible(pc, v):
        return float("inf")
    B, E, S = pc.batch, pc.num_experts, pc.time_scale_s
    lay = _Layout.of(pc)
    A = _Rows(lay.nv)
    _layer_rows(A, pc, v, lay)
    if pc.uses_draft:
        # relaxed draft: max(rho matmuls of all B + GPU attention of g, CPU attention of B - g)
        ag, ac = pc.draft_attn_gpu_s / B / S, pc.draft_attn_cpu_s / B / S
        A.ge({lay.ig: ag}, pc.gemm_rate_drop * pc.draft_mm_s / S, lay.idl)
        A.ge({lay.ig: -ac}, ac * B, lay.idl)
    _memory_rows(A, pc, v, lay)
    cost = np.zeros(lay.nv)                                                     # [V]
    cost[lay.J:2 * lay.J] = lay.counts
    cost[2 * lay.J:2 * lay.J + len(lay.dense)] = 1.0
    cost[lay.idl] = 1.0
    if max_time_s is not None:
        A.add(cost.copy(), max_time_s / S - pc.fixed_s / S)
    bounds = ([(0, E)] * lay.J + [(0, None)] * (lay.J + len(lay.dense))
              + [(0, B if v.target_kv_gpu else 0), (0, B if pc.uses_draft else 0), (0, E), (0, None)])
    res = linprog(cost, A_ub=np.array(A.rows), b_ub=np.array(A.rhs), bounds=bounds, method="highs")
    if res.status == 2:
        return float("inf")
    if res.status != 0:
        return lower_bound_s(pc, v)
    # the LP's own tolerance (~1e-9 relative) must not turn the bound into an overestimate
    return (float(res.fun) + pc.fixed_s / S) * S * (1 - 1e-7)


def _layer_rows(A: _Rows, pc: PointCosts, v: Variant, lay: _Layout) -> None:
    """tau >= each resource's time, per class of MoE layers and per dense layer."""
    S, E = pc.time_scale_s, pc.num_experts
    y = 1.0 if v.gpu_attention else 0.0
    kvh = pc.kv_h2d_s_per_seq if v.gpu_attention else np.zeros(pc.num_layers)  # [L]
    it = lay.it

    def layer_terms(l: int):
        a_c, a_g, kv = pc.attn_cpu_s_per_seq[l] / S, pc.attn_gpu_s_per_seq[l] / S, kvh[l] / S
        # cpu attention a_c (1-y)(B - t); gpu attention a_g (t + y (B - t)); kv streaming kv y (B - t)
        cpu = ({it: -a_c * (1 - y)}, a_c * (1 - y) * pc.batch)
        gpu = ({it: a_g * (1 - y)}, pc.gpu_fixed_s[l] / S + a_g * y * pc.batch)
        pci = ({it: -kv * y}, kv * y * pc.batch)
        return cpu, gpu, pci

    J = lay.J
    for j, l in enumerate(lay.reps):
        cpu, gpu, pci = layer_terms(l)
        moe_s = pc.moe_gpu_s[l] / S
        if v.x_mode == "stream":
            for b, s_ in pc.h2d_lines(l):
                A.ge({**pci[0], j: s_ / S}, pci[1] + b / S, J + j)
            A.ge(cpu[0], cpu[1], J + j)
            A.ge(gpu[0], gpu[1] + moe_s, J + j)
            A.ge({j: -1.0}, float(E), lay.iU)                                   # U >= E - c_j
        else:
            A.ge(pci[0], pci[1], J + j)
            A.ge({**cpu[0], j: -pc.cpu_expert_s / S}, cpu[1] + pc.cpu_expert_s * E / S, J + j)
            A.ge({**gpu[0], j: moe_s / E}, gpu[1], J + j)
    for d, l in enumerate(lay.dense):
        for coef, const in layer_terms(l):
            A.ge(coef, const, 2 * J + d)


def _memory_rows(A: _Rows, pc: PointCosts, v: Variant, lay: _Layout) -> None:
    """GPU memory: slots, streaming buffers, draft and target KV on the GPU; CPU memory: the KV left there."""
    B = pc.batch
    Gb, Cb = pc.gpu_usable_bytes, pc.cpu_usable_bytes
    r = np.zeros(lay.nv)                                                        # [V]
    for j, n in enumerate(lay.counts):
        r[j] = n * pc.expert_bytes / Gb
    r[lay.iU] = (max(1, v.streaming_buffers) * pc.expert_bytes / Gb) if v.x_mode == "stream" else 0.0
    r[lay.ig], r[lay.it] = pc.kv_draft_bytes / Gb, pc.kv_target_bytes / Gb
    A.add(r, 1.0 - MEM_SLACK - pc.gpu_fixed_bytes / Gb)                         # GPU memory
    r = np.zeros(lay.nv)                                                        # [V]
    r[lay.it], r[lay.ig] = -pc.kv_target_bytes / Cb, -pc.kv_draft_bytes / Cb
    A.add(r, 1.0 - MEM_SLACK - (pc.cpu_fixed_bytes + B * (pc.kv_target_bytes + pc.kv_draft_bytes)) / Cb)   # CPU memory
