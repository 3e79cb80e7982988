"""The optimizer's choice by the event simulator (planner/optimizer.py). The programs minimise the closed
form, whose per-layer max of resource times cannot see the micro-batch pipeline: its fill and drain, and
the GPU work that waits for CPU attention inside a layer under the engine's schedule. So the closed
form's best point can simulate far slower than another (the README example: its best, k = 5, simulates
17% slower than k = 3; bench/plan_quality.py). The search therefore ranks its candidates by the simulator:

1. Screening, in the order of the points' closed-form bounds: a point stays a candidate while
   floor x its bound beats the best simulated score so far. The simulator runs under the closed form
   only where it overlaps what the closed form adds up (the first layers' experts stream during the
   previous draft phase): at least 0.966 x it over the points of the benchmark cases. floor is
   SIM_CF_FLOOR, or less when the points solved before (the seeds) show a smaller ratio.
   Each candidate gets the simulator's own lower bound over its placements (planner/search/sim_bound.py).
2. Candidates in the order of that bound: each one's program is solved (two at a time) and its
   placement simulated at the mean context, until SIM_BOUND_MARGIN x the next bound cannot beat the best.
   Another m of a (B, k, variant) already solved takes that placement instead when it fits (the closed
   form hardly depends on m; step 3 adapts it to the pipeline).
3. The candidates' placements are improved by the simulator (planner/search/refine.py), best first,
   unless their point's bound rules it out: at most REFINE_TOP distinct (B, k).

`Ranked` is one simulated candidate; `rank_by_simulator` returns them best first.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, replace

from specmoe.planner.errors import SpecError
from specmoe.planner.search.refine import refine_placement, with_placement
from specmoe.planner.search.results import job_tokens_per_s, simulated_s
from specmoe.planner.search.sim_bound import sim_lower_bound_s
from specmoe.planner.search.state import Search, Solved

RANKS = ("simulator", "closed_form")
SIM_CF_FLOOR = 0.95         # screening: the simulated iteration is taken to be at least 0.95 x the closed form
SIM_BOUND_MARGIN = 0.98     # the simulator's lower bound, with room for event-order effects
REFINE_TOP = 3              # distinct (B, k) whose placements the simulator improves
JOB_EXACT_TOP = 8           # a finite job's best candidates scored with their live batch simulated
RANK_TIME_LIMIT_S = 1.0     # per program of a candidate (its incumbent is kept; step 3 improves it anyway)


@dataclass
class Ranked:
    """One candidate: its solved point (placement from a program, or refined) and its simulation."""

    solved: Solved
    iteration_s: float          # simulated iteration at the mean context
    tokens_per_s: float         # decode tokens/s: steady state, or a finite job's as its batch drains
    score: float                # simulated seconds per token (throughput) or per-token latency (latency)
    admissible: bool            # meets the latency objective's throughput floor in the simulator

    @property
    def key(self) -> tuple:
        return (not self.admissible, self.score)


def check_rank(rank) -> None:
    if rank not in RANKS:
        raise SpecError("rank", f"unknown ranking {rank!r}", " or ".join(RANKS))


def evaluate_candidate(S: Search, s: Solved, exact_job: bool = False) -> Ranked:
    """s through the event simulator, scored as the search scores points. A finite job's iteration at
    its mean live batch: the full batch's scaled by the closed form's ratio, or (exact_job) simulated
    there as the plan's prediction is."""
    sim_t = simulated_s(S.cm, s, S.stats)
    if S.objective == "throughput":
        tps = job_tokens_per_s(S, s, sim_t, exact=exact_job)
        score = 1.0 / tps
    else:
        tps = s.tokens_per_iteration / sim_t
        score = sim_t / s.accepted_plus_one
    ok = S.floor is None or s.tokens_per_iteration / sim_t >= S.floor * (1 - 1e-9)
    return Ranked(s, sim_t, tps, score, ok)


class _Board:
    """The candidates simulated so far, the best of each (B, m, k, variant)."""

    def __init__(self, S: Search):
        self.S = S
        self.ranked: dict[tuple, Ranked] = {}
        self.bounds: dict[tuple, float] = {}            # (B, m, k, variant) -> simulator's bound score

    def add(self, s: Solved | None) -> None:
        if s is None:
            return
        key = (s.batch, s.micro_batches, s.draft_len, s.variant)
        r = evaluate_candidate(self.S, s)
        if key not in self.ranked or r.key < self.ranked[key].key:
            self.ranked[key] = r

    def best_score(self) -> float:
        """The best admissible score (with none admissible yet, the best of all: what prunes the search)."""
        ok = [r.score for r in self.ranked.values() if r.admissible]
        return min(ok or [r.score for r in self.ranked.values()], default=math.inf)

    def bound(self, s: Solved) -> float:
        return self.bound_of(s.batch, s.micro_batches, s.draft_len, s.variant)

    def bound_of(self, B: int, m: int, k: int, v) -> float:
        """The simulator's lower bound of the point over every placement, as a score (memoised)."""
        key = (B, m, k, v)
        if key not in self.bounds:
            self.bounds[key] = self.S.score(sim_lower_bound_s(self.S, B, m, k, v), B, k)
        return self.bounds[key]


def rank_by_simulator(S: Search, points: list[tuple], seeds: list[Solved]) -> list[Ranked]:
    """Every candidate simulated, best first (see the module doc). points: the enumerated heap items
    (bound score, B, m, k, variant index, tight); seeds: solved points simulated before the others.

    One heap in bound order: a point first enters with floor x its closed-form bound; popped, it
    goes back with the simulator's own bound (x SIM_BOUND_MARGIN); popped again, its program is solved
    (two at a time) and its placement simulated. It stops when the top of the heap cannot beat the best."""
    board = _Board(S)
    for s in seeds:
        board.add(s)
    ratios = [r.iteration_s / r.solved.closed_form_s for r in board.ranked.values() if r.solved.closed_form_s > 0]
    floor = min([SIM_CF_FLOOR] + [SIM_CF_FLOOR * x for x in ratios])
    lbs: dict[tuple, float] = {}
    for lb, B, mb, k, vi, _tight in points:            # a tightened bound beside the cheap one: the larger holds
        lbs[(B, mb, k, vi)] = max(lb, lbs.get((B, mb, k, vi), -math.inf))
    heap = [(floor * lb, False, p) for p, lb in lbs.items()]
    heapq.heapify(heap)
    first: dict[tuple, Solved] = {}                   # (B, k, variant) -> the first point solved there
    while heap:
        todo = []
        while heap and len(todo) < 2:
            key, simulated_bound, (B, mb, k, vi) = heapq.heappop(heap)
            if key >= board.best_score():
                heap = []
                break
            v = S.variants[vi]
            if simulated_bound:
                sib = first.get((B, k, v))
                moved = None if sib is None else with_placement(S, replace(sib, micro_batches=mb), sib.placement,
                                                                f"placement of micro-batches {sib.micro_batches}")
                if moved is not None:
                    board.add(moved)
                else:
                    todo.append((B, mb, k, v))
                continue
            b = board.bound_of(B, mb, k, v)
            if math.isfinite(b):
                heapq.heappush(heap, (max(key, SIM_BOUND_MARGIN * b), True, (B, mb, k, vi)))
        S.solve_many(todo, time_limit_s=RANK_TIME_LIMIT_S)
        for it in todo:
            s = S.solved.get(it)
            if s is not None:
                first.setdefault((s.batch, s.draft_len, s.variant), s)
            board.add(s)
    _refine_best(S, board)
    ranked = sorted(board.ranked.values(), key=lambda r: r.key)
    if S.objective == "throughput" and S.cm.workload.num_prompts is not None:
        # a finite job: the best few again with the live batch simulated, as the plan will predict it
        ranked[:JOB_EXACT_TOP] = sorted((evaluate_candidate(S, r.solved, exact_job=True)
                                         for r in ranked[:JOB_EXACT_TOP]), key=lambda r: r.key)
    return ranked


def _refine_best(S: Search, board: _Board) -> None:
    """Step 3: the placements of the candidates improved by the simulator, in score order, unless the
    simulator's bound over every placement of the point (x SIM_BOUND_MARGIN; for a finite job x the
    candidate's own ratio of job to steady-state score) cannot beat the best: at most REFINE_TOP
    distinct (B, k). Another m of a refined (B, k) starts from that placement, or just takes it where
    it simulates as the refined point did before (m does not matter there)."""
    done: dict[tuple, tuple[float, object]] = {}      # (B, k) -> (its iteration before, refined placement)
    points: set[tuple] = set()
    for r in sorted(board.ranked.values(), key=lambda r: r.key):
        s = r.solved
        bk = (s.batch, s.draft_len)
        if s.key in points or (bk not in done and len(done) >= REFINE_TOP):
            continue                  # a point refined from another variant's placement, or enough (B, k)
        steady = r.iteration_s / s.accepted_plus_one / (1.0 if S.objective == "latency" else s.batch)
        if SIM_BOUND_MARGIN * board.bound(s) * (r.score / steady) >= board.best_score():
            continue
        points.add(s.key)
        if bk in done and abs(r.iteration_s - done[bk][0]) <= 1e-9 * r.iteration_s:
            board.add(with_placement(S, s, done[bk][1], "placement refined by the simulator at another m"))
            continue
        better = refine_placement(S, s, start=done[bk][1] if bk in done else None)
        done.setdefault(bk, (r.iteration_s, better.placement))
        board.add(better)


def next_points(order: list[Solved], win: Solved, n: int) -> list[Solved]:
    """The first of each distinct (B, m, k) other than win's, in the given order, at most n of them."""
    seen: dict[tuple, Solved] = {}
    for s in order:
        if s.key != win.key:
            seen.setdefault(s.key, s)
    return list(seen.values())[:max(0, int(n))]


def ranking_summary(S: Search, rank: str, ranked: list[Ranked], cf_win: Solved) -> dict:
    """The plan's `solver` entries about the choice: how it ranked, how many candidates the simulator
    saw, and the closed form's own optimum (exact over the enumerated points) with its simulation."""
    cf_sim = next((r for r in ranked if r.solved is cf_win), None) or evaluate_candidate(S, cf_win)
    return {"ranked_by": rank, "simulated_candidates": len(ranked),
            "closed_form_optimum": {"batch": cf_win.batch, "micro_batches": cf_win.micro_batches,
                                    "draft_len": cf_win.draft_len, "variant": cf_win.variant.label(),
                                    "closed_form_tokens_per_s": cf_win.closed_form_tokens_per_s,
                                    "closed_form_iteration_s": cf_win.closed_form_s,
                                    "decode_tokens_per_s": cf_sim.tokens_per_s}}
