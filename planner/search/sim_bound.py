"""`sim_lower_bound_s`: a lower bound of the simulated iteration of one point (B, m, k, variant) over
every placement memory admits, without a program: the event simulator run on each stage's least
duration over those placements (planner/search/ranking.py skips the points it rules out).

Each placement-dependent stage time is monotone in one placement variable, so its least value is at
one end of that variable's range, and the ranges are relaxed (each variable alone may take all the
memory the others could leave it):

    target attention on the CPU    falls with the GPU-KV sequences t      least at t_max
    target attention on the GPU    rises with t (and with the CPU-KV sequences streamed)  least at t = 0
    expert H2D                     falls with the cache slots c           least at c_max (identical
                                   layers: the mean slots rounded up, as a convex H2D balances them)
    routed experts (GPU / CPU)     a CPU-expert layer moves work to the CPU   both modes of the variant
    draft on the GPU / on the CPU  rises / falls with the draft-KV split g   least at g_lo / g_hi

The variant fixes where the CPU-KV sequences' attention runs and which layers' cold experts run on
the CPU (per-layer mode: both), so the attention chain of a layer (pre -> attention -> post -> MoE
under the engine's schedule) keeps its weight in the bound, which the closed form's per-layer max
drops. Event scheduling is not monotone in every case, so the ranking keeps a margin below it.
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from specmoe.planner import milp
from specmoe.planner.plan import Placement
from specmoe.planner.search.costs import iteration_costs
from specmoe.planner.search.results import simulate
from specmoe.planner.search.state import Search

_ARRAYS = ("pre_s", "attn_cpu_s", "attn_gpu_s", "kv_h2d_s", "post_s", "moe_gpu_s", "moe_cpu_s", "h2d_s",
           "lm_head_s", "verify_s", "draft_gpu_s", "draft_cpu_attn_s", "draft_cpu_gpu_s")


def _ranges(pc: milp.PointCosts, v: milp.Variant) -> tuple[int, int, int, int]:
    """Relaxed (t_max, c_max, g_lo, g_hi) of the point's placements under the variant's memory."""
    B, E = pc.batch, pc.num_experts
    n_moe = int(pc.is_moe.sum())
    eb, kt, kd = pc.expert_bytes, pc.kv_target_bytes, pc.kv_draft_bytes
    free = pc.gpu_usable_bytes - pc.gpu_fixed_bytes
    cpu_free = pc.cpu_usable_bytes - pc.cpu_fixed_bytes
    buf_min = min(max(1, v.streaming_buffers), n_moe) * E * eb if (v.x_mode == "stream" and n_moe and E) else 0.0
    room = max(0.0, free - buf_min)
    t_max = min(B, int(room // kt)) if (v.target_kv_gpu and kt > 0) else 0
    if n_moe and eb > 0:
        budget = max(0.0, free) / eb                 # slots, all layers together
        one_class = len(set(pc.layer_class[pc.is_moe].tolist())) <= 1
        # identical layers (convex H2D in c): the program balances the slots, so no layer holds more than
        # the mean rounded up; otherwise one layer may hold the whole budget
        c_max = min(E, math.ceil(budget / n_moe - 1e-9) if one_class else int(budget))
    else:
        c_max = E
    if pc.uses_draft:
        g_hi = min(B, int(room // kd))
        g_lo = min(g_hi, max(0, math.ceil(B - (cpu_free - (B - t_max) * kt) / kd - 1e-9)))
    else:
        g_lo = g_hi = 0
    return t_max, c_max, g_lo, g_hi


def sim_lower_bound_s(S: Search, B: int, m: int, k: int, v: milp.Variant) -> float:
    """The simulated iteration with every stage at its least duration over the point's placements
    (see the module doc); +inf when memory cannot fit."""
    pc = S.point(B, m, k)
    if not milp.memory_feasible(pc, v):
        return math.inf
    L = pc.num_layers
    moe = tuple(int(i) for i in np.flatnonzero(pc.is_moe))
    t_max, c_max, g_lo, g_hi = _ranges(pc, v)
    cpu_modes = {"stream": [()], "cpu": [moe], "per_layer": [(), moe]}[v.x_mode]
    att = "gpu" if v.gpu_attention else "cpu"
    ends = []
    for cpu_layers in cpu_modes:
        for t, c, g in ((0, 0, g_lo), (t_max, c_max, g_hi)):
            slots = tuple(c if i in moe else 0 for i in range(L))
            pl = Placement(expert_cache_slots=slots, target_kv_gpu_sequences=t, draft_kv_gpu_sequences=g,
                           attention_device=att, cpu_expert_layers=cpu_layers, streaming_buffers=v.streaming_buffers)
            ends.append((iteration_costs(S.cm, B, m, k, pl, S.stats), pl))
    least = replace(ends[0][0], **{a: np.minimum.reduce([getattr(c, a) for c, _ in ends]) for a in _ARRAYS})
    least.other_s = min(c.other_s for c, _ in ends)
    return simulate(S.cm, least, ends[-1][1], record=False).iteration_time_s
