"""What the cost model predicts for the run that actually happened (planner.report compares it):
the plan's own prediction, or a re-estimate from the plan's inputs under the plan's schedule (which
the engine runs exactly) at the run's mean live batch (a static batch thins out under speculation);
and the plan's throughput against k and its predicted timeline for the report's charts."""
from __future__ import annotations

from pathlib import Path

from specmoe.planner.batch_drain import at_live_batch, drain, live_curve, live_placement
from specmoe.planner.errors import SpecError
from specmoe.planner.plan import Plan
from specmoe.planner.report.inputs import load_plan
from specmoe.planner.stages import Stage
from specmoe.planner.workload import MAX_DRAFT_LEN


def _estimate_for(plan: Plan, draft_len: int, timeline: bool, placement=None, batch: int | None = None,
                  run: bool = True):
    """planner.estimate of the plan's inputs and schedule at `draft_len` (the plan's placement unless
    given)."""
    from specmoe.planner.estimator import estimate

    return estimate(plan.model_spec(), plan.hardware_spec(), plan.workload_spec(),
                    draft=plan.draft_spec() if draft_len > 0 else None, draft_len=draft_len,
                    micro_batches=min(plan.micro_batches, batch or plan.batch),
                    placement=plan.placement if placement is None else placement,
                    batch=batch or plan.batch, timeline=timeline, run=run, schedule=plan.schedule)


def throughput_by_k(plan: Plan, ks: range | None = None) -> list[dict]:
    """Predicted decode throughput against k: the plan's frontier when it has one, else
    planner.estimate over k at the plan's batch (default placement; the plan's own at its k)."""
    pts = [dict(p) for p in (plan.frontier or {}).get("by_k", []) if isinstance(p, dict)
           and "draft_len" in p and "decode_tokens_per_s" in p and p.get("feasible", True)]
    if pts:
        return sorted(pts, key=lambda p: p["draft_len"])
    from specmoe.planner.memory import default_placement

    if ks is None:
        ks = range(0, max(MAX_DRAFT_LEN, plan.draft_len + 2) + 1) if plan.draft is not None else range(0, 1)
    m, hw, wl, d = plan.model_spec(), plan.hardware_spec(), plan.workload_spec(), plan.draft_spec()
    out = []
    for k in ks:
        try:
            pl = plan.placement if k == plan.draft_len else default_placement(
                m, hw, wl, plan.batch, k, d if k else None, plan.micro_batches)
            e = _estimate_for(plan, k, timeline=False, placement=pl, run=False)
        except SpecError:
            continue
        out.append({"draft_len": k, "decode_tokens_per_s": e.decode_tokens_per_s, "batch": e.batch,
                    "iteration_time_s": e.iteration_time_s, "bound": e.bound})
    return out


def predicted_timeline(plan: Plan | dict | str | Path) -> list[dict]:
    """The plan's predicted Gantt events of one iteration; re-simulated from its inputs when the plan
    carries none."""
    plan = load_plan(plan)
    if plan.predicted.timeline:
        return list(plan.predicted.timeline)
    return list(_estimate_for(plan, plan.draft_len, timeline=True, run=False).timeline)


LIVE_BATCH_TOLERANCE = 0.03     # re-estimate when the run's mean live batch is this much below the plan's


def live_batch(run: dict) -> float | None:
    """The run's mean number of sequences per decode iteration: from its per-iteration counts, or
    verified sequences (the acceptance histogram counts one per live sequence and iteration) over
    iterations in records without them. Under speculation a
    static batch thins out at the end, as sequences reach their length at different iterations."""
    lives = run.get("live_by_iteration")
    if isinstance(lives, list) and lives and all(isinstance(x, int) and not isinstance(x, bool) for x in lives):
        return sum(lives) / len(lives)
    hist, its = run.get("acceptance_histogram"), run.get("iterations")
    if not isinstance(hist, dict) or not hist or not its:
        return None
    try:
        n = sum(int(v) for v in hist.values())
    except (TypeError, ValueError):
        return None
    return n / float(its) if n > 0 else None


def _live_placement(plan: Plan, batch: int):
    """The plan's placement for `batch` live sequences: GPU-resident KV shares scaled to the batch."""
    return live_placement(plan.placement, plan.batch, batch)


def job_prediction(plan: Plan, run: dict) -> dict | None:
    """The drain the cost model predicts for the job the run was (its sequences, the plan's batch and
    lengths, the run's k): planner/batch_drain.py's mean live batch and iterations, the iteration
    simulated at that live batch, and the job's decode tokens/s. None when the run does not say how
    many sequences it ran."""
    from dataclasses import replace

    n = run.get("sequences")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        return None
    wl = plan.workload_spec()
    gen = run.get("max_new_tokens")
    wl = replace(wl, num_prompts=n, gen_len=gen if isinstance(gen, int) and gen >= 1 else wl.gen_len)
    k = int(run["draft_len"])
    d = drain(wl, plan.batch, k)
    if d is None or d.iterations <= 0:
        return None
    def at(b: int) -> float:
        return _estimate_for(plan, k, timeline=False, placement=_live_placement(plan, b), batch=b,
                             run=False).iteration_time_s

    t_live = at_live_batch(at, plan.batch, d.mean_live_batch)
    curve = live_curve(wl, plan.batch, k)
    return {**d.to_dict(), "iteration_time_s": t_live, "decode_tokens_per_s": d.decode_tokens_per_s(t_live),
            "live_curve": curve}


def prediction_for_run(plan: Plan, run: dict, warnings: list[str]) -> tuple[dict, dict, list[dict]]:
    """(stages, totals, timeline) predicted for the run's configuration, always under the plan's
    schedule (the engine runs exactly it): the plan's own prediction when the run used the plan's k
    and batch (its timeline re-simulated from the plan's inputs when the plan carries none);
    re-estimated from the plan's inputs when the run's mean live batch was smaller than the plan's
    (sequences finishing at different iterations of a static batch, or fewer prompts than rows: the
    prediction is then at that batch, so both sides describe the same iterations), when the run used
    another k (an API caller's generate(draft_len=...); `specmoe run --draft-len` writes a new plan
    instead), or when the plan carries no prediction."""
    k_run = int(run["draft_len"])
    live = live_batch(run)
    if live is not None and live < (1 - LIVE_BATCH_TOLERANCE) * plan.batch:
        got = _at_live_batch(plan, run, k_run, live, warnings)
        if got is not None:
            return got
    if k_run == plan.draft_len and plan.predicted.iteration_time_s > 0:
        return _plan_prediction(plan, k_run, warnings)
    return _fresh_estimate(plan, k_run, warnings)


def _at_live_batch(plan: Plan, run: dict, k_run: int, live: float | None,
                   warnings: list[str]) -> tuple[dict, dict, list[dict]] | None:
    """Re-estimated at the run's live batch (the plan's when the run kept it) and k; None with a
    warning when that fails."""
    if live is None or live >= (1 - LIVE_BATCH_TOLERANCE) * plan.batch:
        live = float(plan.batch)
    b_run = max(1, int(round(live)))
    try:
        e = _estimate_for(plan, k_run, timeline=True, placement=_live_placement(plan, b_run), batch=b_run)
    except SpecError as err:
        warnings.append(f"could not re-estimate at the run's batch {live:.1f} ({err}); "
                        f"predictions are for the plan's batch {plan.batch}")
        return None
    if b_run != plan.batch:
        warnings.append(f"the run averaged {live:.1f} live sequences per iteration of the plan's "
                        f"{plan.batch} (sequences finish at different iterations): predictions "
                        f"re-estimated at batch {b_run}" + (f" and k={k_run}" if k_run != plan.draft_len else ""))
    elif k_run != plan.draft_len:
        warnings.append(f"the run used k={k_run}, the plan k={plan.draft_len}: predictions re-estimated "
                        f"from the plan's inputs at k={k_run}")
    stages = dict(e.stages)
    stages[Stage.ITERATION.value] = e.iteration_time_s
    prefill = _prefill_for(plan, k_run, e)
    stages[Stage.PREFILL.value] = prefill
    dec = run.get("decode_tokens")
    e2e = e.end_to_end_tokens_per_s
    if dec and e.decode_tokens_per_s > 0:
        gen = float(run.get("generated_tokens") or dec)
        e2e = gen / (prefill + float(dec) / e.decode_tokens_per_s)
    return stages, _pred_totals(e.iteration_time_s, e.decode_tokens_per_s, e2e,
                                e.tokens_per_iteration, prefill, e.source), list(e.timeline)


def _prefill_for(plan: Plan, k_run: int, e) -> float:
    """Prefill runs once over the whole batch: the plan's batch, not the live one (the plan's own
    prediction at its k; `e`'s when re-estimating at the plan's batch fails)."""
    p = plan.predicted
    try:
        return (p.prefill_time_s if k_run == plan.draft_len and p.prefill_time_s > 0
                else _estimate_for(plan, k_run, timeline=False).prefill_time_s)
    except SpecError:
        return e.prefill_time_s


def prefill_parts_for(plan: Plan, k_run: int):
    """The prefill of the plan's batch by part (planner/prefill.py PrefillParts) from the plan's inputs at the
    run's k; None when the plan's inputs cannot be costed."""
    from specmoe.planner.cost_model import CostModel
    from specmoe.planner.prefill import prefill_parts

    try:
        cm = CostModel(plan.model_spec(), plan.hardware_spec(), plan.workload_spec(),
                       plan.draft_spec() if k_run > 0 else None)
        return prefill_parts(cm, plan.batch, plan.placement)
    except SpecError:
        return None


def _plan_prediction(plan: Plan, k_run: int, warnings: list[str]) -> tuple[dict, dict, list[dict]]:
    """The plan's own prediction; its timeline re-simulated from its inputs when it carries none."""
    p = plan.predicted
    stages = dict(p.stages)
    tot = _pred_totals(p.iteration_time_s, p.decode_tokens_per_s, p.end_to_end_tokens_per_s,
                       p.tokens_per_iteration, p.prefill_time_s, p.source)
    if p.timeline:
        return stages, tot, list(p.timeline)
    try:
        e = _estimate_for(plan, k_run, timeline=True, run=False)
    except SpecError as err:
        warnings.append(f"no predicted timeline: re-simulating the plan failed ({err})")
        return stages, tot, []
    if abs(e.iteration_time_s - p.iteration_time_s) > 0.01 * p.iteration_time_s:
        warnings.append(f"the re-simulated timeline ({e.iteration_time_s:.4g} s) differs from the plan's predicted "
                        f"iteration ({p.iteration_time_s:.4g} s): the plan was made with other simulator options")
    return stages, tot, list(e.timeline)


def _fresh_estimate(plan: Plan, k_run: int, warnings: list[str]) -> tuple[dict, dict, list[dict]]:
    """Re-estimated from the plan's inputs at the run's k (the plan has no prediction for it)."""
    p = plan.predicted
    try:
        e = _estimate_for(plan, k_run, timeline=True)
    except SpecError as err:
        raise SpecError("plan.predicted", f"has no prediction for k={k_run} and re-estimating failed: {err}",
                        "re-run `specmoe plan`") from None
    if k_run != plan.draft_len:
        warnings.append(f"the run used k={k_run}, the plan k={plan.draft_len}: predictions re-estimated from the "
                        f"plan's inputs at k={k_run}")
    else:
        warnings.append(f"the plan carries no prediction (source {p.source!r}): re-estimated from its inputs")
    stages = dict(e.stages)
    stages[Stage.ITERATION.value] = e.iteration_time_s
    return stages, _pred_totals(e.iteration_time_s, e.decode_tokens_per_s, e.end_to_end_tokens_per_s,
                                e.tokens_per_iteration, e.prefill_time_s, e.source), list(e.timeline)


def _pred_totals(it, tps, e2e, tpi, prefill, source) -> dict:
    return {"iteration_time_s": float(it), "decode_tokens_per_s": float(tps), "end_to_end_tokens_per_s": float(e2e),
            "tokens_per_iteration": float(tpi), "prefill_time_s": float(prefill), "source": str(source)}


def acceptance_at(plan: Plan, k: int) -> float:
    """acc(k): the plan's expected accepted drafts per sequence and iteration at draft length k."""
    if k <= 0:
        return 0.0
    return plan.workload_spec().acceptance.acc(k)
