"""Solving one point's program (planner/milp/build.py) and reading its answer: `solver_for` (CBC or
HiGHS through pulp), `solve` (status checked, never assumed) and `decode` (back to a Placement).

Array dimension letters: L = target layers, E = experts.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from specmoe.planner.errors import SpecError
from specmoe.planner.milp.build import Milp
from specmoe.planner.plan import Placement

SOLVERS = ("cbc", "highs")


@dataclass
class SolveResult:
    status: str            # Optimal | Infeasible | ...
    time_s: float
    objective_s: float     # the program's optimum T in seconds (nan unless Optimal)


def solver_for(name: str, time_limit_s: float | None = None, lean: bool = False):
    """A pulp solver. lean (CBC): no preprocessing, root cuts, strong branching or heuristics, which
    cost more than they save on programs of identical layers (measured 5-15x faster there, same
    optima) but can stall on others (layers that all differ)."""
    import pulp

    if name == "cbc":
        return pulp.PULP_CBC_CMD(msg=False, gapRel=1e-9, timeLimit=time_limit_s, threads=1,
                                 options=["preprocess off", "cuts off", "strong 0", "heuristics off"] if lean else [])
    if name == "highs":
        for cls in (getattr(pulp, "HiGHS", None), getattr(pulp, "HiGHS_CMD", None)):
            if cls is not None:
                s = cls(msg=False, gapRel=1e-9, timeLimit=time_limit_s)
                if s.available():
                    if hasattr(s, "optionsDict"):
                        s.optionsDict["output_flag"] = False       # no banner on stdout
                    return s
        raise SpecError("solver", "HiGHS is not available to pulp (neither highspy nor a `highs` binary)",
                        "pip install highspy, or use --solver cbc")
    raise SpecError("solver", f"unknown solver {name!r}", f"one of {', '.join(SOLVERS)}")


def solve(model: Milp, solver: str = "cbc", time_limit_s: float | None = None) -> SolveResult:
    """Solve and report the solver's status (never assumes success)."""
    import pulp

    t0 = time.perf_counter()
    prob = model.problem
    pc = model.pc
    lean = len(set(pc.layer_class[pc.is_moe].tolist())) <= 1
    try:
        prob.solve(solver_for(solver, time_limit_s, lean=lean))
    except pulp.PulpSolverError as e:
        # CBC 2.10.3 (the one bundled with pulp) can crash on an infeasible program when run lean
        # (segfault in tightenPrimalBounds); run it again with its defaults
        try:
            if not lean or solver != "cbc":
                raise
            prob.solve(solver_for(solver, time_limit_s, lean=False))
        except pulp.PulpSolverError:
            raise SpecError("solver", f"{solver} failed: {e}", "try the other solver (--solver cbc|highs)") from None
    status = pulp.LpStatus[prob.status]
    if status == "Optimal" and getattr(prob, "sol_status", 1) == 2:     # stopped by the time limit
        status = "Integer feasible (time limit)"
    usable = status in ("Optimal", "Integer feasible (time limit)")
    obj = float(pulp.value(prob.objective)) * model.pc.time_scale_s if usable else float("nan")
    return SolveResult(status, time.perf_counter() - t0, obj)


def decode(model: Milp, routing_stats: np.ndarray | None = None) -> Placement:
    """The Placement of a solved program (integers rounded from the solver's floats)."""
    import pulp

    pc, v, var = model.pc, model.v, model.variant
    L, E = pc.num_layers, pc.num_experts

    def val(e) -> int:
        return int(e) if isinstance(e, (int, float)) else int(round(pulp.value(e) or 0.0))

    slots = [0] * L
    for l, cv in v["c"].items():
        slots[l] = val(cv)
    moe = [int(l) for l in np.flatnonzero(pc.is_moe)]
    if var.x_mode == "cpu":
        cpu_layers = tuple(l for l in moe if slots[l] < E)
    else:
        cpu_layers = tuple(l for l, xv in v["x"].items() if val(xv) == 1 and slots[l] < E)
    cached: tuple = ()
    if routing_stats is not None and E:
        cached = tuple(tuple(int(e) for e in np.argsort(-np.asarray(routing_stats[l], float), kind="stable")[:slots[l]])
                       if pc.is_moe[l] else () for l in range(L))
    return Placement(expert_cache_slots=tuple(slots), target_kv_gpu_sequences=val(v["t"]),
                     draft_kv_gpu_sequences=val(v["g"]), attention_device="gpu" if var.gpu_attention else "cpu",
                     cpu_expert_layers=cpu_layers, streaming_buffers=var.streaming_buffers, cached_experts=cached)
