"""The state of one optimizer search (planner/optimizer.py): `Solved`, one solved point, and `Search`,
which holds the specs, the caches of point costs and bounds, and the points solved so far.

A point is (batch B, micro-batches m, draft length k, variant); its program (planner.milp) minimises
the closed-form iteration time T. Across points the search compares seconds per generated token:
T / (B (acc(k)+1)) for throughput, T / (acc(k)+1) for latency; for a finite job (workload.num_prompts)
the throughput score is the job's decode time per token as its batch drains (planner/batch_drain.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from specmoe.planner import milp
from specmoe.planner.batch_drain import Drain, at_live_batch, drain, live_placement
from specmoe.planner.cost_model import CostModel
from specmoe.planner.errors import SpecError
from specmoe.planner.memory import footprint
from specmoe.planner.plan import Placement
from specmoe.planner.search.costs import closed_form_s


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


class Search:
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

    def solve(self, B: int, m: int, k: int, v: milp.Variant, time_limit_s: float | None = None) -> Solved | None:
        if (B, m, k, v) not in self.solved:
            model = self._prepare(B, m, k, v)
            self._finish(B, m, k, v, model, milp.solve(model, self.solver, self._limit(time_limit_s)))
        return self.solved[(B, m, k, v)]

    def _limit(self, time_limit_s: float | None) -> float | None:
        """The search's time limit per program, or the smaller one given."""
        if time_limit_s is None or self.time_limit_s is None:
            return self.time_limit_s if time_limit_s is None else time_limit_s
        return min(self.time_limit_s, time_limit_s)

    def solve_many(self, items: list[tuple], time_limit_s: float | None = None) -> None:
        """Solve several programs, two solver processes at a time (the solver runs outside the GIL).
        time_limit_s: a smaller limit per program than the search's."""
        from concurrent.futures import ThreadPoolExecutor

        todo = [it for it in dict.fromkeys(items) if it not in self.solved]
        if len(todo) <= 1:
            for it in todo:
                self.solve(*it, time_limit_s=time_limit_s)
            return
        models = [self._prepare(*it) for it in todo]
        limit = self._limit(time_limit_s)
        with ThreadPoolExecutor(max_workers=2) as ex:
            results = list(ex.map(lambda mdl: milp.solve(mdl, self.solver, limit), models))
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
            key = (s.batch, s.micro_batches, s.draft_len, s.placement, b)
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
