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
  optimum of the closed form over the enumerated points (to the solver's 1e-9 gap; the plan's
  solver.closed_form_optimum). MILPs run two at a time.
* The choice by the event simulator (rank="simulator", the default): the closed form's per-layer
  max cannot see the micro-batch pipeline (fill and drain, GPU work waiting for CPU attention inside a
  layer), so its optimum can simulate far slower than another point. The points whose bounds leave
  room are screened by the simulator's own bound over their placements, solved, simulated, and the
  best ones' placements improved by the simulator (planner/search/ranking.py); the plan is the
  simulator's best. rank="closed_form" keeps the closed form's optimum.
* The chosen configuration is then re-evaluated with the event simulator (planner.estimate) for the
  plan's predicted stage times; the frontier (the best plan at each k for the chosen B, m, and at
  each grid batch for the chosen k, m) and the alternatives (next-best distinct (B, m, k) among the
  candidates, in the order of the ranking) are simulated too.

The steps live in

    planner/search/inputs.py   the arguments checked, the draft and the variants; the infeasibility error
    planner/search/batches.py  `batch_limit` and `batch_grid` (enumerating B)
    planner/search/costs.py    `closed_form_s` (the cost model at a point, with routing statistics)
    planner/search/state.py    `Search` (caches, bounds, solving) and `Solved` (one solved point)
    planner/search/points.py   enumerating the points, refining B, solving in best-bound order
    planner/search/ranking.py  the candidates ranked by the event simulator (sim_bound.py: its bound over
                               a point's placements; refine.py: a placement improved by it)
    planner/search/results.py  the chosen plan simulated, the frontier, the alternatives, the solver summary
"""
from __future__ import annotations

import time
from typing import Iterable

from specmoe.planner import milp
from specmoe.planner.cost_model import CostModel
from specmoe.planner.hardware_spec import HardwareSpec, load_hardware
from specmoe.planner.model_spec import ModelSpec, load_model
from specmoe.planner.memory import check_context
from specmoe.planner.plan import Plan
from specmoe.planner.schedule import Schedule, default_schedule
from specmoe.planner.search.batches import batch_grid, batch_limit
from specmoe.planner.search.costs import closed_form_s
from specmoe.planner.search.inputs import (OBJECTIVES, PER_LAYER_X_MAX_LAYERS, check_objective, check_stats, int_list,
                                           pick_draft, raise_infeasible, search_variants)
from specmoe.planner.search.points import best_first, enumerate_points, refine_grid
from specmoe.planner.search.ranking import (RANKS, SIM_CF_FLOOR, check_rank, next_points, rank_by_simulator,
                                            ranking_summary)
from specmoe.planner.search.results import (FRONTIER_GAP, add_job, alternative_rows, evaluate, frontier,
                                            set_chosen_frontier_tps, solved_by_score, solver_summary)
from specmoe.planner.search.state import Search, Solved
from specmoe.planner.workload import MAX_DRAFT_LEN, Workload

__all__ = ["FRONTIER_GAP", "OBJECTIVES", "PER_LAYER_X_MAX_LAYERS", "RANKS", "SIM_CF_FLOOR", "Solved", "batch_grid",
           "batch_limit", "closed_form_s", "optimize"]


def optimize(model: str | ModelSpec, hardware: str | HardwareSpec, workload: Workload, draft=None,
             objective: str = "throughput", min_throughput: float | None = None, routing_stats=None,
             solver: str = "cbc", k_values: Iterable[int] = range(0, MAX_DRAFT_LEN + 1),
             micro_batch_values: Iterable[int] = (1, 2, 4, 8), *, cpu_expert_mode: str = "auto",
             gpu_attention: bool = True, target_kv_gpu: bool = True, alternatives: int = 3,
             use_measured: bool = True, time_limit_s: float | None = None, timeline: bool = True,
             schedule: Schedule | None = None, rank: str = "simulator") -> Plan:
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
    schedule: how the engine will run the plan (planner/schedule.py); None: the hardware's default.
      Every point is costed with it, and the plan carries it.
    rank: "simulator" (the candidates' placements from the programs, the choice by the event simulator:
      planner/search/ranking.py) or "closed_form" (the programs' exact optimum of the closed form).
    Raises InfeasibleError (which constraint fails and by how much) when no configuration fits.
    """
    t_start = time.perf_counter()
    m = load_model(model)
    hw = load_hardware(hardware)
    check_objective(workload, objective, min_throughput)
    check_rank(rank)
    milp.solver_for(solver)                          # unknown or unavailable solver: fail before any work
    stats = check_stats(routing_stats, m)
    ks = int_list(k_values, "k_values", 0)
    mbs = int_list(micro_batch_values, "micro_batch_values", 1)
    d, ks = pick_draft(m, draft, ks)
    check_context(m, workload, d if any(k > 0 for k in ks) else None)
    time_limit_s = (1.0 if stats is not None else 5.0) if time_limit_s is None else time_limit_s
    sched = schedule if schedule is not None else default_schedule(hw)
    cm = CostModel(m, hw, workload, d, use_measured=use_measured, schedule=sched)
    variants = search_variants(m, cpu_expert_mode, gpu_attention, target_kv_gpu)
    S = Search(cm, objective, float(min_throughput) if min_throughput else None, stats, solver, variants, time_limit_s)

    # enumerate (B, m, k, variant) with their bounds, refine B, then solve best bound first until no
    # bound can beat the best found (the winner is exact over the enumerated points)
    heap, grids = enumerate_points(S, ks, mbs, target_kv_gpu)
    n_points = len(heap)
    refined, added = refine_grid(S, heap, grids, ks, mbs)
    n_points += added
    points = list(heap)
    best: dict[tuple, Solved] = {}
    best_first(S, heap, best)
    if not best:
        raise_infeasible(cm, workload, ks, mbs, variants, S)
    cf_win = min(best.values(), key=S.score_of)
    pruned = len(heap)

    # rank the candidates by the event simulator (the closed form cannot see the pipeline), best first
    ranked = rank_by_simulator(S, points, [cf_win, *best.values()]) if rank == "simulator" else []
    win = ranked[0].solved if ranked else cf_win
    t_search = time.perf_counter() - t_start

    # report: the frontier it beat, the chosen point simulated, the next-best alternatives
    by_k, by_b, b_axis = frontier(S, win, ks, grids)
    order = [r.solved for r in ranked] if ranked else solved_by_score(S, best)
    pred, bound, mem = evaluate(cm, win, stats, timeline)
    pred = add_job(S, win, pred)
    if pred.job:
        set_chosen_frontier_tps(win, by_k, by_b, pred.decode_tokens_per_s)
    alts = alternative_rows(S, win, next_points(order, win, alternatives), pred.decode_tokens_per_s)
    info = solver_summary(S, win, t_start, t_search, n_points, pruned, refined, b_axis, min_throughput, use_measured)
    info.update(ranking_summary(S, rank, ranked, cf_win))
    return Plan(model=m.to_dict(), hardware=hw.raw, workload=workload.to_dict(),
                draft=d.to_dict() if (d is not None and win.draft_len > 0) else None,
                batch=win.batch, micro_batches=win.micro_batches, draft_len=win.draft_len,
                placement=win.placement, predicted=pred, memory=mem, bound=bound,
                frontier={"by_k": by_k, "by_batch": by_b}, objective=objective, alternatives=tuple(alts),
                solver=info, schedule=sched)
