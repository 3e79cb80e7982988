"""`refine_placement`: a solved point's placement improved by the event simulator (planner/search/
ranking.py refines its best candidates).

The program's placement is optimal for the closed form, which lets CPU attention, GPU work and H2D of a
layer overlap fully; under the engine's schedule GPU work waits for the attention inside a layer, so the
simulator often prefers more target KV on the GPU (less CPU attention in the chain) than the closed form
balances to. A local search over the placement, every move checked against planner.memory.footprint
(with the programs' margin) and scored by the simulator at the mean context:

    moves     the GPU-KV sequences t, the draft-KV split g, the cache slots of every MoE layer together
              (and of each layer alone on models of at most 8 MoE layers) up or down; where a move does
              not fit, the same move paired with one that gives its memory back (t up with g or the
              slots down, and so on);
              attention of the CPU-KV sequences to the other device, cold experts to the CPU or back,
              where the search allows them
    steps     t and g move by a step that starts at B/8 and halves when no move improves, down to 1

The best improving move is taken each round (steepest descent), and repeated while it keeps improving;
it stops when no move improves at step 1 or after MAX_ROUNDS rounds.
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from specmoe.planner import milp
from specmoe.planner.memory import draft_kv_bytes_per_sequence, footprint, kv_bytes_per_sequence
from specmoe.planner.plan import Placement
from specmoe.planner.search.costs import closed_form_s, iteration_costs
from specmoe.planner.search.results import simulate
from specmoe.planner.search.state import Search, Solved

MAX_ROUNDS = 24
PER_LAYER_MOVES_MAX_LAYERS = 8


class _Point:
    """One (B, m, k) of a search: memory checks and simulated times of its placements (memoised)."""

    def __init__(self, S: Search, s: Solved):
        self.S, self.B, self.m, self.k = S, s.batch, s.micro_batches, s.draft_len
        cm = S.cm
        self.draft = cm.draft if s.draft_len else None
        self.moe = tuple(int(i) for i in cm.model.moe_layers)
        self.E = cm.model.num_experts
        self.kt = kv_bytes_per_sequence(cm.model, cm.workload)
        self.kd = draft_kv_bytes_per_sequence(self.draft, cm.workload) if self.draft is not None else 0.0
        self.times: dict[Placement, float] = {}

    def normal(self, pl: Placement | None) -> Placement | None:
        """pl as the programs decode placements: no CPU-expert layer that caches every expert, and with
        routing statistics each layer's cache holding its hottest experts."""
        if pl is None:
            return None
        slots = pl.expert_cache_slots
        cpu = tuple(l for l in pl.cpu_expert_layers if slots[l] < self.E)
        cached = pl.cached_experts
        st = self.S.stats
        if st is not None and self.E:
            cached = tuple(tuple(int(e) for e in np.argsort(-np.asarray(st[l], float), kind="stable")[:slots[l]])
                           if l in self.moe else () for l in range(len(slots)))
        return replace(pl, cpu_expert_layers=cpu, cached_experts=cached)

    def fits(self, pl: Placement) -> bool:
        cm = self.S.cm
        if not (0 <= pl.target_kv_gpu_sequences <= self.B and 0 <= pl.draft_kv_gpu_sequences <= self.B):
            return False
        fp = footprint(cm.model, cm.hw, cm.workload, self.B, self.k, pl, self.draft, self.m)
        slack = 1.0 - milp.MEM_SLACK
        return fp.gpu_bytes <= fp.gpu_usable_bytes * slack and fp.cpu_bytes <= fp.cpu_usable_bytes * slack

    def time_s(self, pl: Placement) -> float:
        if pl not in self.times:
            S = self.S
            c = iteration_costs(S.cm, self.B, self.m, self.k, pl, S.stats)
            self.times[pl] = simulate(S.cm, c, pl, record=False).iteration_time_s
        return self.times[pl]


def _slots(pl: Placement, layers, delta: int, E: int) -> Placement | None:
    s = list(pl.expert_cache_slots)
    for i in layers:
        s[i] = min(E, max(0, s[i] + delta))
    out = tuple(s)
    return None if out == pl.expert_cache_slots else replace(pl, expert_cache_slots=out)


def _moves(P: _Point, pl: Placement, step: int, allowed: dict) -> list[list[Placement]]:
    """The neighbours of pl (see the module doc) in groups: a move, then the same move paired with one
    that gives its memory back; the caller takes the first of each group that fits memory."""
    t, g = pl.target_kv_gpu_sequences, pl.draft_kv_gpu_sequences
    out: list[list[Placement | None]] = []
    kv_moves = [("t", +step), ("t", -step)] if allowed["t"] else []
    kv_moves += [("g", +step), ("g", -step)] if P.kd > 0 else []
    for var, d in kv_moves:
        q = replace(pl, target_kv_gpu_sequences=t + d) if var == "t" else replace(pl, draft_kv_gpu_sequences=g + d)
        group = [q]
        other = "g" if var == "t" else "t"
        if (other == "g" and P.kd > 0) or (other == "t" and allowed["t"]):
            b_self, b_other = (P.kt, P.kd) if var == "t" else (P.kd, P.kt)
            dd = max(1, math.ceil(abs(d) * b_self / b_other)) * (-1 if d > 0 else 1)
            group.append(replace(q, target_kv_gpu_sequences=t + dd) if other == "t"
                         else replace(q, draft_kv_gpu_sequences=g + dd))
        group.append(_slots(q, P.moe, -1 if d > 0 else +1, P.E))
        out.append(group)
    per_layer = [(i,) for i in P.moe] if len(P.moe) <= PER_LAYER_MOVES_MAX_LAYERS else []
    for layers in ([P.moe] if P.moe else []) + per_layer:
        out.append([_slots(pl, layers, -1, P.E)])
        up = _slots(pl, layers, +1, P.E)
        if up is not None:
            per = len(layers) * P.S.cm.model.expert_elems * P.S.cm.workload.weight_bytes_per_elem
            group = [up]
            if P.kd > 0:
                group.append(replace(up, draft_kv_gpu_sequences=g - max(1, math.ceil(per / P.kd))))
            if allowed["t"]:
                group.append(replace(up, target_kv_gpu_sequences=t - max(1, math.ceil(per / P.kt))))
            out.append(group)
    if allowed["gpu_attention"]:
        out.append([replace(pl, attention_device="cpu" if pl.attention_device == "gpu" else "gpu")])
    for layers in ([P.moe] + ([(i,) for i in P.moe] if allowed["per_layer_x"] else [])) if allowed["cpu_x"] else []:
        cur = set(pl.cpu_expert_layers)
        flip = cur ^ set(layers) if len(layers) == 1 else (set() if cur else set(layers))
        out.append([replace(pl, cpu_expert_layers=tuple(sorted(flip)))])
    return [[q for q in map(P.normal, grp) if q is not None and q != pl] for grp in out]


def _extrapolate(P: _Point, pl: Placement, q: Placement) -> tuple[Placement, float]:
    """From the improving move pl -> q, further steps of the same size while they fit and improve."""
    dt = q.target_kv_gpu_sequences - pl.target_kv_gpu_sequences
    dg = q.draft_kv_gpu_sequences - pl.draft_kv_gpu_sequences
    ds = [b - a for a, b in zip(pl.expert_cache_slots, q.expert_cache_slots)]
    cur, best = q, P.time_s(q)
    same_rest = (q.attention_device, q.cpu_expert_layers) == (pl.attention_device, pl.cpu_expert_layers)
    while same_rest and (dt or dg or any(ds)):
        nxt = P.normal(replace(cur, target_kv_gpu_sequences=cur.target_kv_gpu_sequences + dt,
                               draft_kv_gpu_sequences=cur.draft_kv_gpu_sequences + dg,
                               expert_cache_slots=tuple(min(P.E, max(0, c + d))
                                                        for c, d in zip(cur.expert_cache_slots, ds))))
        if nxt == cur or not P.fits(nxt) or P.time_s(nxt) >= best * (1 - 1e-9):
            break
        cur, best = nxt, P.time_s(nxt)
    return cur, best


def _allowed(S: Search) -> dict:
    vs = S.variants
    return {"t": any(v.target_kv_gpu for v in vs), "gpu_attention": any(v.gpu_attention for v in vs),
            "cpu_x": any(v.x_mode != "stream" for v in vs), "per_layer_x": any(v.x_mode == "per_layer" for v in vs)}


def _variant_of(v: milp.Variant, pl: Placement, moe: tuple) -> milp.Variant:
    """The variant a refined placement belongs to (the attention device and the CPU-expert layers may move)."""
    x = v.x_mode
    cpu = set(pl.cpu_expert_layers)
    if cpu and cpu != set(moe):
        x = "per_layer"
    elif cpu and x == "stream":
        x = "cpu"
    elif not cpu and x == "cpu":
        x = "stream"
    return replace(v, x_mode=x, gpu_attention=pl.attention_device == "gpu")


def with_placement(S: Search, s: Solved, pl: Placement, status: str) -> Solved | None:
    """s's point with another placement (None when it does not fit memory there)."""
    P = _Point(S, s)
    pl = P.normal(pl)
    if not P.fits(pl):
        return None
    cf = closed_form_s(S.cm, s.batch, s.micro_batches, s.draft_len, pl, S.stats)
    return Solved(s.batch, s.micro_batches, s.draft_len, _variant_of(s.variant, pl, P.moe), pl, cf, float("nan"),
                  s.tokens_per_iteration, s.accepted_plus_one, status, 0.0)


def refine_placement(S: Search, s: Solved, start: Placement | None = None) -> Solved:
    """s with the placement the local search (module doc) finds; s itself when nothing improves.
    start: another placement to begin from when it fits and simulates faster (the one refined at a
    sibling point); the search then begins at step 1."""
    P = _Point(S, s)
    allowed = _allowed(S)
    pl, best = s.placement, P.time_s(s.placement)
    step = max(1, s.batch // 8)
    start = P.normal(start)
    if start is not None and P.fits(start) and P.time_s(start) < best:
        pl, best, step = start, P.time_s(start), 1
    for _ in range(MAX_ROUNDS):
        cands = [q for q in (next(filter(P.fits, grp), None) for grp in _moves(P, pl, step, allowed)) if q is not None]
        scored = sorted(((P.time_s(q), i, q) for i, q in enumerate(cands)), key=lambda x: x[:2])
        if scored and scored[0][0] < best * (1 - 1e-9):
            pl, best = _extrapolate(P, pl, scored[0][2])
            continue
        if step == 1:
            break
        step = max(1, step // 2)
    if pl == s.placement:
        return s
    return with_placement(S, s, pl, "placement refined by the simulator") or s
