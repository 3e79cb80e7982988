"""`optimize(...)`: the planner's search. Chooses the batch B, the micro-batches m, the draft length k
and the placement (expert cache slots per layer, target KV and attention, draft KV, CPU-computed
experts) that maximise decode throughput, or minimise per-token latency under a throughput floor.

Method (DESIGN.md, "The optimizer"):

* Enumerating B: for a fixed batch the tokens an iteration produces, B(acc(k)+1), are a constant,
  so the ratio objective B(acc(k)+1)/T becomes "minimise T", linear. B therefore runs over a grid
  outside the program: from the largest batch the memory admits (`batch_limit`, per k, m and
  variant) down by factors (throughput: 1, 3/4, 1/2; latency: halving to 1), or the workload's own
  batch when it gives one. One refined batch joins the grid: a golden-section search, on the
  linear-relaxation bound, between the grid neighbours of the point whose bound is best (the
  throughput against B has a knee where the KV stops fitting the GPU, often between grid points).
* The other small discrete axes are enumerated too: k, m, and the variant (cold experts streamed /
  computed on the CPU, uniform over identical layers unless the model has at most 8 MoE layers or
  `cpu_expert_mode` says "per_layer"; target attention next to the CPU KV or streamed to the GPU).
* Inside each point, a MILP (planner.milp) over integer slots per layer, GPU-KV sequence counts and
  the draft-KV split, with epigraph variables for the per-layer max, minimises the cost model's
  closed-form iteration time T under the GPU and CPU memory constraints (with planner.memory's
  margins). The MILP's optimum is checked against the cost model at the decoded placement.
* Pruning: every point gets a cheap valid lower bound of T (milp.lower_bound_s); popped in bound
  order, it is first tightened to the linear relaxation's bound (milp.lp_bound_s), then solved; the
  search stops when no remaining bound can beat the best plan found, which is therefore the exact
  optimum over the enumerated points (to the solver's 1e-9 gap). MILPs run two at a time.
* The chosen configuration is then re-evaluated with the event simulator (planner.estimate) for the
  plan's predicted stage times; the frontier (the best plan at each k for the chosen B, m, and at
  each grid batch for the chosen k, m) and the alternatives (next-best distinct (B, m, k) among the
  points solved) are simulated too.
"""
from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass, replace
from typing import Any, Iterable

import numpy as np

from specmoe.planner import milp
from specmoe.planner.batch_drain import Drain, at_live_batch, drain, job_summary, live_placement
from specmoe.planner.cost_model import CostModel
from specmoe.planner.errors import InfeasibleError, SpecError
from specmoe.planner.estimator import estimate
from specmoe.planner.hardware_spec import HardwareSpec, load_hardware
from specmoe.planner.memory import Footprint, footprint
from specmoe.planner.model_spec import ModelSpec, default_draft_name, load_model
from specmoe.planner.plan import Placement, Plan, Prediction
from specmoe.planner.simulator import prefill_time, simulate_iteration
from specmoe.planner.stages import Stage
from specmoe.planner.workload import Workload

OBJECTIVES = ("throughput", "latency")
PER_LAYER_X_MAX_LAYERS = 8          # at most this many MoE layers: x_l per layer by default
FRONTIER_GAP = 0.05                 # frontier points: variants whose bound is within 5% are not solved


# ---------------------------------------------------------------------------------------------
def batch_limit(cm: CostModel, draft_len: int, micro_batches: int, x_mode: str = "stream",
                target_kv_gpu: bool = True, streaming_buffers: int = 2) -> int:
    """The largest batch whose memory some placement of the variant satisfies: KV beyond the CPU's
    room moved to the GPU (draft KV, and target KV when allowed), no expert cache, the fewest
    streaming buffers the variant needs (none when cold experts may run on the CPU). 0 when not even
    one sequence fits. Same memory model as planner.memory.footprint (checked in the tests)."""
    from specmoe.planner.memory import activation_bytes, draft_kv_bytes_per_sequence, kv_bytes_per_sequence

    m, wl = cm.model, cm.workload
    k, M = int(draft_len), int(micro_batches)
    use_draft = k > 0 and cm.draft is not None
    d = cm.draft if use_draft else None
    n_moe, E = len(m.moe_layers), m.num_experts
    eb = m.expert_elems * wl.weight_bytes_per_elem
    buf_min = 0.0 if (x_mode != "stream" or not n_moe or not E) else min(max(1, streaming_buffers), n_moe) * E * eb
    kv_t = kv_bytes_per_sequence(m, wl)
    kv_d = draft_kv_bytes_per_sequence(cm.draft, wl) if use_draft else 0.0
    slack = 1.0 - milp.MEM_SLACK
    fp1 = footprint(m, cm.hw, wl, 1, k, Placement(expert_cache_slots=(0,) * m.num_layers), d, 1)
    weights = sum(v for key, v in fp1.gpu_breakdown.items()
                  if key not in ("expert_cache", "streaming_buffers", "draft_kv", "target_kv", "activations"))
    gu, cfree = fp1.gpu_usable_bytes * slack, fp1.cpu_usable_bytes * slack - fp1.cpu_breakdown["experts_pinned"]

    def fits(B: int) -> bool:
        gfree = gu - weights - activation_bytes(m, B, k, min(M, B), d) - buf_min
        if gfree < 0 or cfree < 0:
            return False
        need = B * (kv_t + kv_d) - cfree
        if need <= 0:
            return True
        t = np.arange(B + 1 if target_kv_gpu else 1, dtype=float)               # [T]
        rest = need - kv_t * t                                                   # [T]
        if kv_d > 0:
            g = np.maximum(0.0, np.ceil(rest / kv_d - 1e-12))
        else:
            g = np.where(rest <= 0, 0.0, np.inf)
        ok = (g <= B) & (kv_t * t + kv_d * np.where(np.isfinite(g), g, 0.0) <= gfree)
        return bool(ok.any())

    if not fits(1):
        return 0
    per = kv_t + kv_d
    hi = int((max(cfree, 0.0) + gu) // per) + 2 if per > 0 else 1 << 20   # fits(hi) is false
    lo = 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def batch_grid(b_hi: int, objective: str) -> list[int]:
    """Batch candidates from the largest that fits down by factors (enumerating B)."""
    if b_hi <= 0:
        return []
    if objective == "throughput":
        vals = {max(1, int(round(b_hi * f))) for f in (1.0, 0.75, 0.5)}
    else:
        vals, b = set(), b_hi
        while b >= 1:
            vals.add(b)
            b //= 2
    return sorted(vals, reverse=True)


# ---------------------------------------------------------------------------------------------
@dataclass
class Solved:
    """One solved point: (B, m, k, variant), its placement and its closed-form time."""

    batch: int
    micro_batches: int
    draft_len: int
    variant: milp.Variant
    placement: Placement
    closed_form_s: float          # the cost model's closed form at the decoded placement
    milp_s: float                 # the program's optimum
    tokens_per_iteration: float
    accepted_plus_one: float
    status: str
    solve_s: float

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.batch, self.micro_batches, self.draft_len)

    @property
    def closed_form_tokens_per_s(self) -> float:
        return self.tokens_per_iteration / self.closed_form_s


class _Search:
    """Holds the specs, the caches of point costs, and the solved points of one optimize() call."""

    def __init__(self, cm: CostModel, objective: str, min_throughput: float | None, routing_stats,
                 solver: str, variants: list[milp.Variant], time_limit_s: float | None):
        self.cm, self.objective, self.floor = cm, objective, min_throughput
        self.stats, self.solver, self.variants, self.time_limit_s = routing_stats, solver, variants, time_limit_s
        self.costs: dict[tuple, milp.PointCosts] = {}
        self.drafts: dict[tuple, Any] = {}
        self.solved: dict[tuple, Solved | None] = {}
        self.kvh: dict[tuple, np.ndarray] = {}
        self.gaps: dict[tuple, float] = {}
        self.draft_pwl = milp.draft_is_piecewise_linear(cm)
        self.milps = 0
        self.milp_time_s = 0.0
        self.statuses: dict[str, int] = {}
        self.max_check_err = 0.0
        self.drains: dict[tuple, Drain | None] = {}
        self.live_times: dict[tuple, float] = {}

    def acc1(self, k: int) -> float:
        return self.cm.workload.acceptance.acc(k) + 1.0 if k > 0 else 1.0

    def point(self, B: int, m: int, k: int) -> milp.PointCosts:
        key = (B, m, k)
        if key not in self.costs:
            self.costs[key] = milp.point_costs(self.cm, B, m, k, self.stats)
        return self.costs[key]

    def score(self, T: float, B: int, k: int) -> float:
        """What is minimised across points: seconds per generated token (throughput) or per-token latency."""
        return T / (B * self.acc1(k)) if self.objective == "throughput" else T / self.acc1(k)

    def max_time(self, B: int, k: int) -> float | None:
        return B * self.acc1(k) / self.floor if self.floor else None

    def kv_ready(self, B: int, m: int, k: int) -> bool:
        return self.point(B, m, k).kv_h2d_s_per_seq is not None

    def add_kv(self, B: int, m: int, k: int) -> None:
        """The KV-streaming slopes (GPU-attention variants); they do not depend on m."""
        pc = self.point(B, m, k)
        if pc.kv_h2d_s_per_seq is None:
            if (B, k) not in self.kvh:
                milp.add_kv_streaming(pc, self.cm)
                self.kvh[(B, k)] = pc.kv_h2d_s_per_seq
            pc.kv_h2d_s_per_seq = self.kvh[(B, k)]

    def bound(self, B: int, m: int, k: int, v: milp.Variant) -> float:
        """Lower bound of T at the point (inf: infeasible, or under the throughput floor). For GPU-
        attention variants without the KV-streaming slopes yet, a weaker bound (streaming costs 0)."""
        lb = milp.lower_bound_s(self.point(B, m, k), v)
        cap = self.max_time(B, k)
        if cap is not None and lb > cap * (1 + 1e-9):
            return float("inf")
        return lb

    def tight_bound(self, B: int, m: int, k: int, v: milp.Variant) -> float:
        """The linear-relaxation bound (with the KV-streaming slopes for GPU-attention variants)."""
        if v.gpu_attention:
            self.add_kv(B, m, k)
        pc = self.point(B, m, k)
        if self.draft_pwl:                              # exact draft breakpoints tighten the bound
            if (B, k) not in self.drafts:
                self.drafts[(B, k)] = milp.draft_time_fn(self.cm, B, k)
            milp.add_draft(pc, self.drafts[(B, k)])
        lb = max(milp.lp_bound_s(pc, v), milp.lower_bound_s(pc, v))
        cap = self.max_time(B, k)
        if cap is not None and lb > cap * (1 + 1e-9):
            return float("inf")
        return lb

    def _prepare(self, B: int, m: int, k: int, v: milp.Variant) -> milp.Milp:
        pc = self.point(B, m, k)
        if (B, k) not in self.drafts:
            self.drafts[(B, k)] = milp.draft_time_fn(self.cm, B, k)
        milp.add_draft(pc, self.drafts[(B, k)])
        if v.gpu_attention:
            self.add_kv(B, m, k)
        return milp.build(pc, v, self.max_time(B, k))

    def _finish(self, B: int, m: int, k: int, v: milp.Variant, model: milp.Milp, res: milp.SolveResult) -> Solved | None:
        self.milps += 1
        self.milp_time_s += res.time_s + model.build_s
        self.statuses[res.status] = self.statuses.get(res.status, 0) + 1
        out = None
        if res.status in ("Optimal", "Integer feasible (time limit)"):
            pl = milp.decode(model, self.stats)
            fp = footprint(self.cm.model, self.cm.hw, self.cm.workload, B, k, pl,
                           self.cm.draft if k > 0 else None, m)
            if not fp.fits:        # cannot happen with MEM_SLACK above the solver's tolerance; never emit it
                raise RuntimeError(f"MILP placement overfills memory at batch {B}, micro-batches {m}, draft length {k}")
            cf = closed_form_s(self.cm, B, m, k, pl, self.stats)
            if model.pc.draft_exact:
                self.max_check_err = max(self.max_check_err, abs(cf - res.objective_s) / cf)
            out = Solved(B, m, k, v, pl, cf, res.objective_s, model.pc.tokens_per_iteration, self.acc1(k),
                         res.status, res.time_s)
        elif res.status not in ("Infeasible", "Undefined"):
            raise SpecError("solver", f"{self.solver} returned {res.status!r} for batch {B}, micro-batches {m}, "
                            f"draft length {k}", "raise the time limit or try --solver highs")
        self.solved[(B, m, k, v)] = out
        return out

    def solve(self, B: int, m: int, k: int, v: milp.Variant) -> Solved | None:
        if (B, m, k, v) not in self.solved:
            model = self._prepare(B, m, k, v)
            self._finish(B, m, k, v, model, milp.solve(model, self.solver, self.time_limit_s))
        return self.solved[(B, m, k, v)]

    def solve_many(self, items: list[tuple]) -> None:
        """Solve several programs, two solver processes at a time (the solver runs outside the GIL)."""
        from concurrent.futures import ThreadPoolExecutor

        todo = [it for it in dict.fromkeys(items) if it not in self.solved]
        if len(todo) <= 1:
            for it in todo:
                self.solve(*it)
            return
        models = [self._prepare(*it) for it in todo]
        with ThreadPoolExecutor(max_workers=2) as ex:
            results = list(ex.map(lambda mdl: milp.solve(mdl, self.solver, self.time_limit_s), models))
        for it, mdl, res in zip(todo, models, results):
            self._finish(*it, mdl, res)

    def best_at_many(self, points: list[tuple[int, int, int]], rel_gap: float = 0.0) -> dict[tuple, Solved | None]:
        """The best variant of each (B, m, k): each point's best-bound variant first (solved together),
        then any other variant whose bound could still beat what was found by more than rel_gap.
        self.gaps[point] records by how much an unsolved variant could at most have beaten it."""
        cands = {}
        for (B, m, k) in points:
            lbs = sorted((self.tight_bound(B, m, k, v), i) for i, v in enumerate(self.variants))
            cands[(B, m, k)] = [(lb, self.variants[i]) for lb, i in lbs if math.isfinite(lb)]
        pos = {p: 0 for p in cands}
        best: dict[tuple, Solved | None] = {p: None for p in cands}
        while True:
            todo = []
            for p, c in cands.items():
                while pos[p] < len(c):
                    lb, v = c[pos[p]]
                    b = best[p]
                    if b is not None and self.score(lb, p[0], p[2]) >= self.score_of(b) * (1 - rel_gap):
                        self.gaps[p] = max(0.0, self.score_of(b) / self.score(lb, p[0], p[2]) - 1.0)
                        pos[p] = len(c)
                        break
                    if (*p, v) in self.solved:
                        s_ = self.solved[(*p, v)]
                        if s_ is not None and (b is None or self.score_of(s_) < self.score_of(b)):
                            best[p] = s_
                        pos[p] += 1
                        continue
                    todo.append((*p, v))
                    break
            if not todo:
                return best
            self.solve_many(todo)

    def score_of(self, s: Solved) -> float:
        """Seconds per token of a solved point. For a throughput job of workload.num_prompts prompts:
        the job's decode time per decode token, iterations x T(mean live batch) (planner/batch_drain.py),
        never below the steady-state score the bounds are compared with (T(b)/b does not rise as b falls)."""
        if self.objective == "throughput" and self.cm.workload.num_prompts is not None:
            sec = self.job_seconds_per_token(s)
            if sec is not None:
                return sec
        return self.score(s.closed_form_s, s.batch, s.draft_len)

    def drain_of(self, B: int, k: int) -> Drain | None:
        key = (B, k)
        if key not in self.drains:
            self.drains[key] = drain(self.cm.workload, B, k)
        return self.drains[key]

    def live_closed_form_s(self, s: Solved, live: float) -> float:
        """The closed-form iteration of s's placement at `live` (fractional) live sequences."""
        def at(b: int) -> float:
            if b >= s.batch:
                return s.closed_form_s
            key = (s.batch, s.micro_batches, s.draft_len, s.variant, b)
            if key not in self.live_times:
                self.live_times[key] = closed_form_s(self.cm, b, min(s.micro_batches, b), s.draft_len,
                                                     live_placement(s.placement, s.batch, b), self.stats)
            return self.live_times[key]
        return at_live_batch(at, s.batch, live)

    def job_seconds_per_token(self, s: Solved) -> float | None:
        d = self.drain_of(s.batch, s.draft_len)
        if d is None or d.decode_tokens <= 0:
            return None
        return d.iterations * self.live_closed_form_s(s, d.mean_live_batch) / d.decode_tokens


def _best_first(S: _Search, heap: list, best: dict, width: int = 2) -> None:
    """Pop points in bound order: tighten cheap bounds to the linear relaxation, solve the MILPs of
    tight ones (up to `width` at a time, in parallel solver processes); stop, leaving the rest on the
    heap, when no bound can beat the best found so far (which is then the exact optimum)."""

    def threshold() -> float:
        return min((S.score_of(x) for x in best.values()), default=float("inf"))

    while heap:
        batch = []
        while heap and len(batch) < width:
            item = heapq.heappop(heap)
            lb_score, B, mb, k, vi, tight = item
            if lb_score >= threshold():
                heapq.heappush(heap, item)
                break
            cur = best.get((B, mb, k))
            if cur is not None and lb_score >= S.score_of(cur):
                continue
            v = S.variants[vi]
            if not tight:                   # tighten the bound (the linear relaxation) and queue it again
                lb = S.tight_bound(B, mb, k, v)
                if math.isfinite(lb):
                    heapq.heappush(heap, (S.score(lb, B, k), B, mb, k, vi, True))
                continue
            batch.append((B, mb, k, v))
        if not batch:
            if heap and heap[0][0] >= threshold():
                return
            continue
        S.solve_many(batch)
        for (B, mb, k, v) in batch:
            s = S.solved[(B, mb, k, v)]
            cur = best.get((B, mb, k))
            if s is not None and (cur is None or S.score_of(s) < S.score_of(cur)):
                best[(B, mb, k)] = s


def _best_tight(S: _Search, heap: list) -> tuple | None:
    """The point with the best linear-relaxation bound: tighten cheap bounds from the top of the heap
    until a tightened one is on top (it stays on the heap)."""
    while heap:
        lb_score, B, mb, k, vi, tight = heap[0]
        if tight:
            return B, mb, k, S.variants[vi]
        heapq.heappop(heap)
        lb = S.tight_bound(B, mb, k, S.variants[vi])
        if math.isfinite(lb):
            heapq.heappush(heap, (S.score(lb, B, k), B, mb, k, vi, True))
    return None


def _refine_batch(S: _Search, B0: int, m: int, k: int, v: milp.Variant, grid: list[int]) -> int | None:
    """Golden-section search over the batches between B0's neighbours on the grid, for (m, k, variant),
    on the linear-relaxation bound of the score (within a few percent of the MILP's). Returns the best
    batch found if it is not on the grid already."""
    g = sorted(set(grid) | {B0})
    i = g.index(B0)
    lo = g[i - 1] if i > 0 else max(m, B0 // 3)
    hi = g[i + 1] if i + 1 < len(g) else B0
    if hi - lo < 3:
        return None
    memo: dict[int, float] = {}

    def f(B: int) -> float:
        if B not in memo:
            memo[B] = S.score(S.tight_bound(B, m, k, v), B, k) if B >= m else float("inf")
        return memo[B]

    a, b = lo, hi
    while b - a > 2:
        x1 = a + int(round((b - a) * 0.382))
        x2 = a + int(round((b - a) * 0.618))
        if x1 == x2:
            x2 = x1 + 1
        if f(x1) <= f(x2):
            b = x2
        else:
            a = x1
    cands = [x for x in range(a, b + 1)] + [B0]
    best = min(cands, key=f)
    return None if best in grid or not math.isfinite(f(best)) else best


def closed_form_s(cm: CostModel, B: int, m: int, k: int, placement: Placement, routing_stats=None) -> float:
    """The cost model's closed-form iteration time of a placement (with routing statistics: the H2D of
    each streaming layer replaced by its cold experts' own touch probabilities)."""
    return _costs(cm, B, m, k, placement, routing_stats).closed_form_time_s


def _costs(cm: CostModel, B: int, m: int, k: int, placement: Placement, routing_stats=None):
    c = cm.iteration(B, m, k, placement)
    if routing_stats is not None and cm.E:
        p_all = 1.0 - (1.0 - cm.na / cm.E) ** c.tokens
        per = c.h2d_s_per_uncached_expert / p_all if p_all > 0 else 0.0
        cpu = set(placement.cpu_expert_layers)
        h2d = np.zeros(cm.L)
        for l in np.flatnonzero(cm.is_moe):
            if l not in cpu:
                h2d[l] = milp.stats_h2d_row(routing_stats[l], cm.na, c.tokens)[placement.expert_cache_slots[l]] * per
        c.h2d_s = h2d
    return c


# ---------------------------------------------------------------------------------------------
def _check_stats(routing_stats, model: ModelSpec) -> np.ndarray | None:
    if routing_stats is None:
        return None
    try:
        a = np.asarray(routing_stats, dtype=float)
    except (TypeError, ValueError):
        raise SpecError("routing_stats", "is not a numeric [layers, experts] array", "give expert-hit counts or shares") from None
    want = (model.num_layers, model.num_experts)
    if a.shape != want:
        raise SpecError("routing_stats", f"has shape {a.shape}, the model needs {want} (layers, experts)",
                        "give one row per layer (dense layers may be zeros) and one column per expert")
    if not np.all(np.isfinite(a)) or np.any(a < 0):
        raise SpecError("routing_stats", "has negative or non-finite entries", "give non-negative hit counts")
    out = np.zeros_like(a)
    for l in model.moe_layers:
        tot = a[l].sum()
        if tot <= 0:
            raise SpecError(f"routing_stats[{l}]", "is all zero on a MoE layer", "give that layer's expert-hit counts")
        out[l] = a[l] / tot
    return out


def _variants(model: ModelSpec, cpu_expert_mode: str, gpu_attention: bool, target_kv_gpu: bool) -> list[milp.Variant]:
    n_moe = len(model.moe_layers) if model.is_moe else 0
    if cpu_expert_mode not in ("auto", "uniform", "per_layer", "off"):
        raise SpecError("cpu_expert_mode", f"unknown mode {cpu_expert_mode!r}", "one of auto, uniform, per_layer, off")
    if n_moe == 0 or cpu_expert_mode == "off":
        modes = ["stream"]
    elif cpu_expert_mode == "per_layer" or (cpu_expert_mode == "auto" and n_moe <= PER_LAYER_X_MAX_LAYERS):
        modes = ["per_layer"]
    else:
        modes = ["stream", "cpu"]
    ys = [False, True] if gpu_attention else [False]
    return [milp.Variant(x_mode=x, gpu_attention=y, target_kv_gpu=target_kv_gpu) for x in modes for y in ys]


def _int_list(vals: Iterable, name: str, minimum: int) -> list[int]:
    try:
        out = sorted({int(v) for v in vals})
    except (TypeError, ValueError):
        raise SpecError(name, f"must be integers, got {vals!r}", f"give integers >= {minimum}") from None
    if not out or out[0] < minimum:
        raise SpecError(name, f"must be non-empty integers >= {minimum}, got {out}", f"give integers >= {minimum}")
    return out


def optimize(model: str | ModelSpec, hardware: str | HardwareSpec, workload: Workload, draft=None,
             objective: str = "throughput", min_throughput: float | None = None, routing_stats=None,
             solver: str = "cbc", k_values: Iterable[int] = range(0, 9),
             micro_batch_values: Iterable[int] = (1, 2, 4, 8), *, cpu_expert_mode: str = "auto",
             gpu_attention: bool = True, target_kv_gpu: bool = True, alternatives: int = 3,
             use_measured: bool = True, time_limit_s: float | None = None, timeline: bool = True) -> Plan:
    """The plan with the best objective over batch, micro-batches, draft length and placement.

    draft: a preset, config path, dict or ModelSpec; None = the target's default draft when it has
      one (DEFAULT_DRAFTS), else no speculation (k = 0 only); False = no speculation.
    objective: "throughput" (decode tokens/s) or "latency" (iteration time / (acc(k)+1), under the
      floor `min_throughput` tokens/s when given).
    routing_stats: [layers, experts] expert-hit counts or shares; then each layer caches its hottest
      experts and its slots may differ from the other layers'.
    k_values, micro_batch_values: the draft lengths and micro-batch counts enumerated.
    cpu_expert_mode: "auto" (per-layer x for models with <= 8 MoE layers, else uniform), "uniform",
      "per_layer" or "off"; gpu_attention / target_kv_gpu: allow those placements.
    alternatives: how many next-best distinct (B, m, k) to list (from the points solved).
    time_limit_s: per program; None = 5 s, or 1 s with routing statistics (programs of layers that all
      differ are hard to prove optimal for CBC; the incumbent is kept and the status says so; HiGHS,
      solver="highs", proves them in well under a second).
    Raises InfeasibleError (which constraint fails and by how much) when no configuration fits.
    """
    t_start = time.perf_counter()
    m = load_model(model)
    hw = load_hardware(hardware)
    if not isinstance(workload, Workload):
        raise SpecError("workload", f"must be a planner.Workload, got {type(workload).__name__}",
                        "build one with Workload(prompt_len, gen_len, ...)")
    if objective not in OBJECTIVES:
        raise SpecError("objective", f"unknown objective {objective!r}", "throughput or latency")
    if min_throughput is not None:
        if isinstance(min_throughput, bool) or not isinstance(min_throughput, (int, float)) or not min_throughput > 0:
            raise SpecError("min_throughput", f"must be a positive number of tokens/s, got {min_throughput!r}",
                            "give e.g. 100, or leave it out")
        if objective != "latency":
            raise SpecError("min_throughput", "only applies to the latency objective", "add --objective latency")
    milp.solver_for(solver)                          # unknown or unavailable solver: fail before any work
    stats = _check_stats(routing_stats, m)
    ks = _int_list(k_values, "k_values", 0)
    mbs = _int_list(micro_batch_values, "micro_batch_values", 1)
    d = None
    if draft is not False and any(k > 0 for k in ks):
        if draft is None:
            try:
                d = load_model(default_draft_name(m))
            except SpecError:
                d = None
        else:
            d = load_model(draft)
    if d is None:
        if 0 not in ks:
            raise SpecError("draft", "no draft model for speculation and k = 0 is not among the draft lengths",
                            "give a draft model or allow draft length 0")
        ks = [0]
    if time_limit_s is None:
        time_limit_s = 1.0 if stats is not None else 5.0
    cm = CostModel(m, hw, workload, d, use_measured=use_measured)
    variants = _variants(m, cpu_expert_mode, gpu_attention, target_kv_gpu)
    S = _Search(cm, objective, float(min_throughput) if min_throughput else None, stats, solver, variants, time_limit_s)

    # ---- enumerate (B, m, k, variant) with their bounds (enumerating B on a grid per k, m, variant) ----
    limits: dict[tuple, int] = {}
    grids: dict[tuple, list[int]] = {}
    heap = []
    for k in ks:
        for mb in mbs:
            for vi, v in enumerate(variants):
                if workload.batch is not None:
                    Bs = [workload.batch]
                else:
                    key = (k, mb, v.x_mode == "stream")
                    if key not in limits:
                        limits[key] = batch_limit(cm, k, mb, v.x_mode, target_kv_gpu, v.streaming_buffers)
                        if workload.num_prompts is not None:     # rows beyond the job's prompts stay empty
                            limits[key] = min(limits[key], workload.num_prompts)
                    Bs = batch_grid(limits[key], objective)
                grids[(k, mb, v.x_mode)] = Bs
                for B in Bs:
                    if mb > B:
                        continue
                    lb = S.bound(B, mb, k, v)
                    if math.isfinite(lb):
                        heapq.heappush(heap, (S.score(lb, B, k), B, mb, k, vi, False))
    n_points = len(heap)

    # ---- refine B around the point with the best linear-relaxation bound, before any MILP: between
    # its grid neighbours, for its (m, k, variant); the refined batch joins the grid of every (k, m) ----
    refined = None
    lead = _best_tight(S, heap)
    if workload.batch is None and lead is not None:
        B0, m0, k0, v0 = lead
        refined = _refine_batch(S, B0, m0, k0, v0, grids.get((k0, m0, v0.x_mode), []))
        if refined is not None:
            for k in ks:
                for mb in mbs:
                    for vi, v in enumerate(variants):
                        if mb <= refined and refined <= max(grids.get((k, mb, v.x_mode), [0]) or [0]):
                            grids[(k, mb, v.x_mode)] = sorted(set(grids[(k, mb, v.x_mode)]) | {refined}, reverse=True)
                            lb = S.bound(refined, mb, k, v)
                            if math.isfinite(lb):
                                heapq.heappush(heap, (S.score(lb, refined, k), refined, mb, k, vi, False))
                                n_points += 1

    # ---- best bound first; stop when no bound can beat the best found (the winner is exact) ----
    best: dict[tuple, Solved] = {}
    _best_first(S, heap, best)
    if not best:
        _raise_infeasible(cm, workload, ks, mbs, variants, S)
    win = min(best.values(), key=S.score_of)
    pruned = len(heap)
    t_search = time.perf_counter() - t_start

    # ---- frontier: against k at the chosen (B, m), against B at the chosen (k, m) ----
    Bw, mw, kw = win.batch, win.micro_batches, win.draft_len
    b_axis = sorted(set(grids.get((kw, mw, win.variant.x_mode), [])) | {Bw})
    pts = [(Bw, mw, k) for k in ks if k != kw] + [(B, mw, kw) for B in b_axis if B != Bw and mw <= B]
    front = S.best_at_many(pts, rel_gap=FRONTIER_GAP)
    front[(Bw, mw, kw)] = win
    by_k = [_frontier_entry(S, front.get((Bw, mw, k)), "draft_len", k) for k in ks]
    by_b = [_frontier_entry(S, front.get((B, mw, kw)), "batch", B) for B in b_axis]

    # ---- alternatives: the next-best distinct (B, m, k) among all solved points ----
    for sv in S.solved.values():
        if sv is not None and (sv.key not in best or S.score_of(sv) < S.score_of(best[sv.key])):
            best[sv.key] = sv
    order = sorted(best.values(), key=S.score_of)
    alts = []
    pred, bound, mem = _evaluate(cm, win, stats, timeline)
    pred = _add_job(S, win, pred)
    if pred.job:       # the chosen point's own frontier entries: its simulated job throughput, exactly
        for e in [e for e in by_k if e.get("draft_len") == kw] + [e for e in by_b if e.get("batch") == Bw]:
            e["decode_tokens_per_s"] = pred.decode_tokens_per_s
    win_tps = pred.decode_tokens_per_s
    for s in order[1:1 + max(0, int(alternatives))]:
        sim_t = _simulate_s(cm, s, stats)
        tps = _job_tps(S, s, sim_t)
        alts.append({"batch": s.batch, "micro_batches": s.micro_batches, "draft_len": s.draft_len,
                     "variant": s.variant.label(), "decode_tokens_per_s": tps,
                     "closed_form_tokens_per_s": s.closed_form_tokens_per_s, "iteration_time_s": sim_t,
                     "per_token_latency_s": sim_t / s.accepted_plus_one,
                     "relative_to_chosen": tps / win_tps if win_tps else 0.0,
                     "differs": _differs(win, s), "placement": _placement_summary(s.placement)})

    solver_info = {
        "name": solver, "status": "Optimal" if set(S.statuses) <= {"Optimal", "Infeasible", "Undefined"}
        else "Feasible (some programs stopped at the time limit; see statuses)", "objective": objective, "time_s": time.perf_counter() - t_start,
        "search_time_s": t_search, "milps": S.milps, "milp_time_s": S.milp_time_s, "statuses": S.statuses,
        "points": n_points, "pruned_by_bound": pruned, "refined_batch": refined, "variants": [v.label() for v in variants],
        "chosen_variant": win.variant.label(), "batch_candidates": b_axis,
        "closed_form_iteration_s": win.closed_form_s, "closed_form_tokens_per_s": win.closed_form_tokens_per_s,
        "milp_iteration_s": win.milp_s, "closed_form_check_rel_err": S.max_check_err,
        "min_throughput": min_throughput, "routing_stats": stats is not None,
        "use_measured": use_measured, "draft_breakpoints_exact": all(
            pc.draft_exact for pc in S.costs.values() if pc.draft_g is not None),
    }
    if stats is not None:
        from specmoe.planner.plan import content_hash
        solver_info["routing_stats_sha256"] = content_hash(np.round(stats, 12).tolist())
    return Plan(model=m.to_dict(), hardware=hw.raw, workload=workload.to_dict(),
                draft=d.to_dict() if (d is not None and win.draft_len > 0) else None,
                batch=win.batch, micro_batches=win.micro_batches, draft_len=win.draft_len,
                placement=win.placement, predicted=pred, memory=mem, bound=bound,
                frontier={"by_k": by_k, "by_batch": by_b}, objective=objective, alternatives=tuple(alts),
                solver=solver_info)


# ---------------------------------------------------------------------------------------------
def _simulate_s(cm: CostModel, s: Solved, stats) -> float:
    c = _costs(cm, s.batch, s.micro_batches, s.draft_len, s.placement, stats)
    return simulate_iteration(c, s.placement, record=False).iteration_time_s


def _live_sim_s(S: _Search, s: Solved, full_s: float, live: float) -> float:
    """The simulated iteration of s's placement at `live` (fractional) live sequences; full_s at s.batch."""
    def at(b: int) -> float:
        if b >= s.batch:
            return full_s
        pl = live_placement(s.placement, s.batch, b)
        return simulate_iteration(_costs(S.cm, b, min(s.micro_batches, b), s.draft_len, pl, S.stats), pl,
                                  record=False).iteration_time_s
    return at_live_batch(at, s.batch, live)


def _job_tps(S: _Search, s: Solved, sim_t: float) -> float:
    """Decode tokens/s of s: steady state (B (acc(k)+1) / T), or for a finite job its tokens over
    iterations x T(mean live batch), that T the simulated full-batch iteration scaled by the closed
    form's live/full ratio (the chosen plan's own entries are then set to its simulated job figure)."""
    d = S.drain_of(s.batch, s.draft_len) if S.objective == "throughput" else None
    if d is None or d.iterations <= 0:
        return s.tokens_per_iteration / sim_t
    return d.decode_tokens_per_s(sim_t * S.live_closed_form_s(s, d.mean_live_batch) / s.closed_form_s)


def _add_job(S: _Search, s: Solved, pred: Prediction) -> Prediction:
    """For a finite job (workload.num_prompts): pred with the predicted drain, the simulated iteration
    at the mean live batch, and the job's throughputs (decode_tokens_per_s becomes the job's)."""
    d = S.drain_of(s.batch, s.draft_len)
    if d is None or pred.job:        # none, or estimate() priced it in already
        return pred
    job = job_summary(d, _live_sim_s(S, s, pred.iteration_time_s, d.mean_live_batch), pred.prefill_time_s,
                      S.cm.workload.gen_len)
    tps, e2e = job.pop("decode_tokens_per_s"), job.pop("end_to_end_tokens_per_s")
    return replace(pred, decode_tokens_per_s=tps, end_to_end_tokens_per_s=e2e,
                   job={**job, "steady_decode_tokens_per_s": pred.decode_tokens_per_s})


def _frontier_entry(S: _Search, s: Solved | None, axis: str, value: int) -> dict:
    """One frontier point: its best plan, simulated. `optimality_gap`: by how much (relative, closed form) a
    variant left unsolved could at most beat it (0: exact)."""
    if s is None:
        return {axis: value, "feasible": False, "decode_tokens_per_s": 0.0, "closed_form_tokens_per_s": 0.0}
    sim_t = _simulate_s(S.cm, s, S.stats)
    return {axis: value, "feasible": True, "decode_tokens_per_s": _job_tps(S, s, sim_t),
            "closed_form_tokens_per_s": s.closed_form_tokens_per_s, "iteration_time_s": sim_t,
            "per_token_latency_s": sim_t / s.accepted_plus_one, "variant": s.variant.label(),
            "optimality_gap": S.gaps.get(s.key, 0.0)}


def _evaluate(cm: CostModel, s: Solved, stats, timeline: bool) -> tuple[Prediction, str, dict]:
    """The chosen configuration through the event simulator: predicted stages, bound, memory."""
    if stats is None:
        est = estimate(cm.model, cm.hw, cm.workload, draft=cm.draft if s.draft_len else None, draft_len=s.draft_len,
                       micro_batches=s.micro_batches, placement=s.placement, batch=s.batch, timeline=timeline,
                       use_measured=cm.use_measured)
        return est.to_prediction(), est.bound, est.memory
    c = _costs(cm, s.batch, s.micro_batches, s.draft_len, s.placement, stats)
    sim = simulate_iteration(c, s.placement, record=timeline)
    it = sim.iteration_time_s
    stages = dict(sim.stages)
    pre = prefill_time(cm, s.batch, s.placement)
    stages[Stage.PREFILL.value] = pre
    fp = footprint(cm.model, cm.hw, cm.workload, s.batch, s.draft_len, s.placement,
                   cm.draft if s.draft_len else None, s.micro_batches)
    pred = Prediction(iteration_time_s=it, decode_tokens_per_s=c.tokens_per_iteration / it, stages=stages,
                      prefill_time_s=pre, tokens_per_iteration=c.tokens_per_iteration, source=c.source,
                      timeline=sim.timeline)
    return pred, sim.bound, fp.to_dict()


def _placement_summary(p: Placement) -> dict:
    slots = sorted(set(p.expert_cache_slots))
    return {"expert_cache_slots": slots if len(slots) > 1 else (slots[0] if slots else 0),
            "target_kv_gpu_sequences": p.target_kv_gpu_sequences, "draft_kv_gpu_sequences": p.draft_kv_gpu_sequences,
            "attention_device": p.attention_device, "cpu_expert_layers": len(p.cpu_expert_layers)}


def _differs(a: Solved, b: Solved) -> str:
    out = []
    for name, x, y in (("batch", a.batch, b.batch), ("micro_batches", a.micro_batches, b.micro_batches),
                       ("draft_len", a.draft_len, b.draft_len)):
        if x != y:
            out.append(f"{name} {x} -> {y}")
    pa, pb = _placement_summary(a.placement), _placement_summary(b.placement)
    for key in pa:
        if pa[key] != pb[key]:
            out.append(f"{key} {pa[key]} -> {pb[key]}")
    return "; ".join(out) or "same configuration"


def _raise_infeasible(cm: CostModel, wl: Workload, ks, mbs, variants, S: _Search) -> None:
    """No point is feasible: name the constraint that fails at the smallest configuration, and by how much."""
    if S.floor:
        raise InfeasibleError("min_throughput", f"no configuration reaches {S.floor:g} tokens/s",
                              "lower --min-throughput or use --objective throughput to see the best achievable")
    m = cm.model
    B = wl.batch or 1
    free_x = any(v.x_mode != "stream" for v in variants)
    cpu_layers = tuple(m.moe_layers) if free_x else ()
    pl = Placement(expert_cache_slots=(0,) * m.num_layers, cpu_expert_layers=cpu_layers)
    fp: Footprint = footprint(m, cm.hw, wl, B, 0, pl, None, 1)
    fit = None
    if wl.batch is not None and not fp.fits_cpu:
        fit = max([batch_limit(cm, 0, 1, "cpu" if free_x else "stream")] + [0]) or None
    fp.check(batch=B, max_fit=fit)
    # memory fits at the smallest configuration: the KV of `B` sequences is what does not
    if wl.batch is not None:
        raise InfeasibleError("batch", f"no placement fits batch {B} with draft lengths {ks} and micro-batches {mbs}",
                              "lower the batch (or --batch max), shorten the prompt/output, or give more memory")
    raise InfeasibleError("memory", "no configuration fits although the smallest one's weights do "
                          f"(GPU {fp.gpu_fraction:.0%} / CPU {fp.cpu_fraction:.0%} usable)",
                          "shorten the prompt/output or give more memory")
