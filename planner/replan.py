"""A plan changed at run time: the same inputs and placement with another schedule or draft length,
re-estimated, so that what the engine runs is always a plan the planner costed (the run's own plan
is saved beside its run record).

    new = replan(plan, schedule=plan.schedule.with_changes(cpu_threads=4))
    new = replan(plan, draft_len=0)
    new = replan(plan, hardware=HardwareSpec.from_yaml("fresh.yaml"))   # re-costed on a fresh calibration
"""
from __future__ import annotations

from dataclasses import replace

from specmoe.planner.errors import SpecError
from specmoe.planner.estimator import estimate
from specmoe.planner.hardware_spec import HardwareSpec
from specmoe.planner.memory import default_placement, footprint, max_batch
from specmoe.planner.model_spec import ModelSpec
from specmoe.planner.plan import Plan
from specmoe.planner.schedule import Schedule


def replan(plan: Plan, schedule: Schedule | None = None, draft_len: int | None = None,
           draft: ModelSpec | None = None, hardware: HardwareSpec | None = None) -> Plan:
    """`plan` with `schedule` and/or `draft_len` changed, its prediction re-estimated (the placement is
    kept; at another draft length the draft KV placement is re-chosen when the plan's no longer
    applies, and a batch that no longer fits the longer drafts' KV becomes the largest that does,
    with the default placement). draft: the draft's spec when the plan has none and draft_len > 0. hardware: another spec of
    the same machine (a fresh calibration) to cost the same plan on. Returns `plan` itself when nothing
    changes."""
    sched = schedule if schedule is not None else plan.schedule
    k = plan.draft_len if draft_len is None else int(draft_len)
    if sched == plan.schedule and k == plan.draft_len and hardware is None:
        return plan
    d = plan.draft_spec() or draft
    if k > 0 and d is None:
        raise SpecError("draft_len", f"is {k} but the plan has no draft model", "plan with a draft, or use 0")
    m, hw, wl = plan.model_spec(), hardware or plan.hardware_spec(), plan.workload_spec()
    placement, batch, dk = plan.placement, plan.batch, d if k else None
    if k != plan.draft_len and (plan.draft_len == 0 or k == 0):
        chosen = default_placement(m, hw, wl, batch, k, dk, plan.micro_batches)
        placement = replace(placement, draft_kv_gpu_sequences=chosen.draft_kv_gpu_sequences)
    mb = plan.micro_batches
    if k > plan.draft_len and not footprint(m, hw, wl, batch, k, placement, dk, mb).fits:
        # longer drafts hold more KV per sequence: the default placement at this batch, else the most that fit
        placement = default_placement(m, hw, wl, batch, k, dk, mb)
        if not footprint(m, hw, wl, batch, k, placement, dk, mb).fits:
            batch = max(mb, min(batch, max_batch(m, hw, wl, dk, k, mb)))
            placement = default_placement(m, hw, wl, batch, k, dk, mb)
    est = estimate(m, hw, wl, draft=dk, draft_len=k, micro_batches=plan.micro_batches,
                   placement=placement, batch=batch, schedule=sched, timeline=True, run=True,
                   use_measured=bool(plan.solver.get("use_measured", True)) if isinstance(plan.solver, dict) else True)
    changed = {f: [getattr(plan.schedule, f), getattr(sched, f)] for f in sched.to_dict()
               if getattr(plan.schedule, f) != getattr(sched, f)}
    if k != plan.draft_len:
        changed["draft_len"] = [plan.draft_len, k]
    if batch != plan.batch:
        changed["batch"] = [plan.batch, batch]
    if hardware is not None:
        changed["hardware"] = [plan.hardware.get("name"), hardware.name]
    solver = {"name": "replan", "from": dict(plan.solver) if isinstance(plan.solver, dict) else {},
              "changed": changed}
    return replace(plan, batch=batch, draft=d.to_dict() if (k > 0 and d is not None) else None, draft_len=k,
                   placement=placement, predicted=est.to_prediction(), memory=est.memory, bound=est.bound,
                   solver=solver, schedule=sched, input_hashes={}, alternatives=(),
                   **({"hardware": hardware.raw} if hardware is not None else {}))
