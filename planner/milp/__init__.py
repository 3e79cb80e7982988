"""The inner problem of the optimizer: one mixed-integer program per point (batch B, micro-batches m,
draft length k, variant), in separate steps. This module is the public face; the steps live in

    planner/milp/costs.py    `point_costs` (coefficients from the cost model and the memory model),
                             `add_draft` and `add_kv_streaming` (completing them for a solve),
                             PointCosts, Variant
    planner/milp/bounds.py   `lower_bound_s` (a cheap bound, used to skip points) and `memory_feasible`
    planner/milp/lp_bound.py `lp_bound_s` (the linear relaxation's bound, without an LP solver)
    planner/milp/lp_reference.py
                             `lp_bound_reference_s` (the same relaxation solved by scipy, for the tests)
    planner/milp/build.py    `build` (the pulp model: its variables and constraints)
    planner/milp/solve.py    `solve` (CBC or HiGHS, status checked) and `decode` (back to a Placement)

For a fixed point the tokens produced per iteration, B(acc(k)+1), are fixed, so maximising
throughput B(acc(k)+1)/T and minimising per-token latency T/(acc(k)+1) both reduce to minimising
the iteration time T: the ratio objective becomes linear once B is enumerated outside.
"""
from __future__ import annotations

from specmoe.planner.milp.bounds import draft_lower_hull, lower_bound_s, memory_feasible
from specmoe.planner.milp.build import Milp, build
from specmoe.planner.milp.costs import (MEM_SLACK, X_MODES, PointCosts, Variant, add_draft, add_kv_streaming, convex_runs,
                         draft_is_piecewise_linear, draft_range, draft_time_fn, lower_hull, point_costs,
                         pwl_breakpoints, stats_h2d_row)
from specmoe.planner.milp.lp_bound import lp_bound_s
from specmoe.planner.milp.lp_reference import lp_bound_reference_s
from specmoe.planner.milp.solve import SOLVERS, SolveResult, decode, solve, solver_for

__all__ = [
    "MEM_SLACK", "SOLVERS", "X_MODES", "Milp", "PointCosts", "SolveResult", "Variant", "add_draft",
    "add_kv_streaming", "build", "convex_runs", "decode", "draft_is_piecewise_linear", "draft_lower_hull",
    "draft_range", "draft_time_fn", "lower_bound_s", "lower_hull", "lp_bound_reference_s", "lp_bound_s",
    "memory_feasible", "point_costs", "pwl_breakpoints", "solve", "solver_for", "stats_h2d_row",
]
