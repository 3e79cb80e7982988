"""The report: predicted against measured, per stage (DESIGN.md: planner.report(plan, run) -> table,
plotly HTML, notebooks).

    cmp = compare(plan, run)          # plan: Plan | plan.json path | dict; run: run.json path | dict
    print(render_table(cmp))          # planner/report/render.py
    write_html(plan, run, "report.html")

The run record is taken as JSON (a dict or a path), never as a runtime object: the planner does not
import the runtime (planner/report/inputs.py loads and checks both inputs). Errors are signed and
relative to the measurement (planner/report/comparison.py).
"""
from __future__ import annotations

from pathlib import Path

from specmoe.planner.errors import SpecError
from specmoe.planner.plan import Plan
from specmoe.planner.report.comparison import GOAL_PCT, Comparison, Row
from specmoe.planner.report.explain import explain
from specmoe.planner.report.memory_rows import MEMORY_GOAL_PCT, memory_rows, misses
from specmoe.planner.report.inputs import check_match, load_plan, load_run
from specmoe.planner.report.predict import (acceptance_at, job_prediction, live_batch, prediction_for_run,
                                            prefill_parts_for, throughput_by_k)
from specmoe.planner.stages import ITERATION_PARTS, STAGE_RESOURCE, Stage


def compare(plan: Plan | dict | str | Path, run: dict | str | Path, goal_pct: float = GOAL_PCT) -> Comparison:
    """Predicted against measured for every stage of the iteration, the iteration itself, prefill,
    throughput and acceptance. Raises SpecError for mismatched or malformed inputs."""
    plan = load_plan(plan)
    run = load_run(run)
    check_match(plan, run)
    # how the run differed from the calibration its plan was costed with (the engine said so before it ran)
    warnings: list[str] = [f"the run differed from its calibration: {w}" for w in run.get("calibration_warnings") or []
                           if isinstance(w, str)]
    warnings += calibration_quality_warnings(plan.hardware)
    pst, tot, ptl = prediction_for_run(plan, run, warnings)
    rows = _stage_rows(plan, run, pst, tot)
    errs = [abs(r.error_pct) for r in rows[:len(ITERATION_PARTS)] if r.error_pct is not None]
    mae = sum(errs) / len(errs) if errs else None
    k = int(run["draft_len"])
    metrics = _metric_rows(plan, run, tot, k)
    job = _job_or_warning(plan, run, warnings)
    live_pred, live_m = _live_counts(run, job)
    if job is not None:
        metrics += _job_rows(job, run)
    cmp = Comparison(stages=rows, metrics=metrics, mean_abs_error_pct=mae, goal_pct=goal_pct,
                     calibrated=tot["source"] == "measured", notes=[], warnings=warnings,
                     header=_header(plan, run, tot), predicted_timeline=ptl,
                     measured_timeline=list(run.get("timeline") or []), acceptance=_acceptance(plan, run, k))
    try:
        cmp.by_k = throughput_by_k(plan)
    except SpecError as e:
        warnings.append(f"no throughput-against-k curve: {e}")
    cmp.drift = _drift(run, cmp.row(Stage.ITERATION.value))
    cmp.live = {"measured": live_m, "predicted": live_pred} if live_m else {}
    cmp.memory = memory_rows(plan, run)
    cmp.prefill_stages = _prefill_rows(plan, run, k, warnings)
    off = misses(cmp.memory)
    if off:
        warnings.append(f"memory predicted more than {MEMORY_GOAL_PCT:g}% off the measurement: {', '.join(off)}")
    cmp.notes = explain(cmp, plan, run)
    return cmp


def calibration_quality_warnings(hw_raw: dict) -> list[str]:
    """One warning when the plan's hardware spec was calibrated in a busy or slow spell (`specmoe calibrate`
    records which steps were not clean: runtime/calibrate/quiet.py), naming the steps."""
    try:
        q = hw_raw["measured"]["details"]["calibration_quality"]
    except (KeyError, TypeError):
        return []
    if not isinstance(q, dict) or q.get("clean", True) or not isinstance(q.get("unclean_steps"), dict):
        return []
    steps = "; ".join(f"{n}: {why}" for n, why in q["unclean_steps"].items())
    return [f"the calibration of {hw_raw.get('name', 'this spec')} was not measured on a quiet machine ({steps}): its "
            "rates may be low and the prediction pessimistic; calibrate again with --force when the machine is quiet"]


def _resource(plan: Plan, stage: Stage) -> str:
    if stage == Stage.TARGET_ATTENTION:
        return "gpu" if plan.placement.attention_device == "gpu" else "cpu"
    if stage == Stage.DRAFT_CPU:
        return "cpu+gpu"
    return STAGE_RESOURCE[stage]


def _stage_rows(plan: Plan, run: dict, pst: dict, tot: dict) -> list[Row]:
    """The iteration parts, then the iteration, then prefill (not measured when the run has no prefill time)."""
    mst = run["stages"]
    rows = [Row(s.value, _resource(plan, s), float(pst.get(s.value, 0.0)), float(mst.get(s.value, 0.0)))
            for s in ITERATION_PARTS]
    rows.append(Row(Stage.ITERATION.value, "all", tot["iteration_time_s"], float(mst[Stage.ITERATION.value])))
    pre_m = mst.get(Stage.PREFILL.value)
    rows.append(Row(Stage.PREFILL.value, "all", tot["prefill_time_s"], None if pre_m is None else float(pre_m)))
    return rows


PREFILL_OUTSIDE = "outside the stages"


def _prefill_rows(plan: Plan, run: dict, k: int, warnings: list[str]) -> list[Row]:
    """The prefill by part, predicted (planner/prefill.py, from the plan's inputs at the run's k) against the
    run's prefill stage totals; the attention of a prefill runs where the cost model costs it, on the GPU."""
    by = run.get("prefill_stage_totals_s")
    pre_m = run["stages"].get(Stage.PREFILL.value)
    if not isinstance(by, dict) or not by or pre_m is None:
        return []
    parts = prefill_parts_for(plan, k)
    if parts is None:
        warnings.append("no prediction of the prefill by stage: the plan's inputs could not be costed")
        return []
    meas = {name: float(v) for name, v in by.items() if isinstance(v, (int, float))}
    res = {name: "gpu" if name == Stage.TARGET_ATTENTION.value else STAGE_RESOURCE[Stage(name)] for name in parts.stages_s}
    rows = [Row(name, res[name], pred, meas.get(name, 0.0)) for name, pred in parts.stages_s.items()
            if pred > 0 or meas.get(name, 0.0) > 0]
    outside = parts.other_s
    draft = Stage.DRAFT_GPU.value
    if draft in meas:           # the draft's own prefill, timed as its stage (runs recorded before: outside them)
        rows.append(Row(draft, "gpu", parts.draft_s, meas[draft]))
    else:
        outside += parts.draft_s
    rows.append(Row(PREFILL_OUTSIDE, "all", outside, max(0.0, float(pre_m) - sum(meas.values()))))
    return rows


def _metric_rows(plan: Plan, run: dict, tot: dict, k: int) -> list[Row]:
    """Throughput, tokens per iteration and (with speculation) accepted drafts per sequence."""
    its = run["iterations"]
    dec_tok = run.get("decode_tokens")
    metrics = [
        Row("decode tokens/s", "all", tot["decode_tokens_per_s"], float(run["decode_tokens_per_s"]), "tok/s"),
        Row("end-to-end tokens/s", "all", tot["end_to_end_tokens_per_s"],
            float(run["end_to_end_tokens_per_s"]) if "end_to_end_tokens_per_s" in run else None, "tok/s"),
        Row("tokens per iteration", "all", tot["tokens_per_iteration"],
            float(dec_tok) / its if dec_tok is not None else None, "tok"),
    ]
    if k > 0:
        metrics.append(Row("accepted drafts per sequence", "all", acceptance_at(plan, k),
                           float(run["mean_accepted"]) if "mean_accepted" in run else None, "tok"))
    return metrics


def _job_or_warning(plan: Plan, run: dict, warnings: list[str]) -> dict | None:
    """The job's predicted drain (predict.job_prediction), or None with a warning when it cannot be made."""
    try:
        return job_prediction(plan, run)
    except SpecError as e:
        warnings.append(f"no prediction of the job's drain: {e}")
        return None


def _live_counts(run: dict, job: dict | None) -> tuple[list | None, list[int]]:
    """(predicted, measured) live sequences per decode iteration; measured is [] when the run has no counts."""
    lives = run.get("live_by_iteration")
    if isinstance(lives, list) and lives:
        return (job.get("live_curve") if job is not None else None), [int(x) for x in lives]
    return None, []


def _job_rows(job: dict, run: dict) -> list[Row]:
    """The drain of the job: mean live batch, decode iterations and the job's decode tokens/s."""
    return [
        Row("mean live batch", "all", job["mean_live_batch"], live_batch(run), "seq"),
        Row("decode iterations", "all", job["iterations"], float(run["iterations"]), "iter"),
        Row("job decode tokens/s", "all", job["decode_tokens_per_s"], float(run["decode_tokens_per_s"]), "tok/s"),
    ]


def _drift(run: dict, it: Row) -> dict:
    """The run's speed probe (runtime/calibrate/speed_probe.py) and the iteration error with the prediction scaled
    by it; {} when the run was not probed."""
    sp = run.get("speed_probe")
    if not isinstance(sp, dict):
        return {}
    try:
        ratio = float(sp["ratio"])
    except (KeyError, TypeError, ValueError):
        return {}
    if not ratio > 0 or not it.measured:
        return {}
    return {**{k: sp[k] for k in ("calibration_iteration_s", "before_s", "after_s", "calibration_spread") if k in sp},
            "ratio": ratio,
            "scaled_error_pct": (it.predicted * ratio - it.measured) / it.measured * 100.0}


def _header(plan: Plan, run: dict, tot: dict) -> dict:
    m = run.get("machine") or {}
    machine = m if isinstance(m, str) else ", ".join(f"{k}: {v}" for k, v in m.items()) if isinstance(m, dict) else str(m)
    return {"model": plan.model.get("name", "?"), "draft": (plan.draft or {}).get("name"),
            "hardware": plan.hardware.get("name", "?"), "batch": plan.batch, "micro_batches": plan.micro_batches,
            "draft_len": plan.draft_len, "run_draft_len": int(run["draft_len"]), "bound": plan.bound,
            "rates": tot["source"], "machine": machine, "device": run.get("device", "?"),
            "git_commit": run.get("git_commit", "?"), "backends": run.get("backends", {}),
            "complete": bool(run["complete"]), "iterations": run["iterations"],
            "sequences": run.get("sequences"), "profile_stages": run.get("profile_stages"),
            "acceptance_oracle": run.get("acceptance_oracle")}


def _acceptance(plan: Plan, run: dict, k: int) -> dict:
    """Measured histogram of accepted drafts per verified sequence and the planned distribution
    P(A = j) = (acc(j) - acc(j-1)) - (acc(j+1) - acc(j)) (a chain of drafts), for j = 0..k."""
    if k <= 0:
        return {}
    acc = [acceptance_at(plan, j) for j in range(k + 1)] + [acceptance_at(plan, k)]
    surv = [1.0] + [max(0.0, acc[j] - acc[j - 1]) for j in range(1, k + 1)] + [0.0]   # P(A >= j)
    planned = {str(j): max(0.0, surv[j] - surv[j + 1]) for j in range(k + 1)}
    hist = {str(a): int(n) for a, n in (run.get("acceptance_histogram") or {}).items()}
    return {"k": k, "measured": hist, "planned": planned}


__all__ = ["Comparison", "Row", "compare", "load_plan", "load_run", "check_match", "throughput_by_k", "explain",
           "GOAL_PCT"]
