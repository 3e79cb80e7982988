"""The report: predicted against measured, per stage (DESIGN.md: planner.report(plan, run) -> table,
plotly HTML, notebooks).

    cmp = compare(plan, run)          # plan: Plan | plan.json path | dict; run: run.json path | dict
    print(render_table(cmp))
    write_html(plan, run, "report.html")

The run record is taken as JSON (a dict or a path), never as a runtime object: the planner does not
import the runtime. Errors are signed and relative to the measurement:
error % = (predicted - measured) / measured x 100 (negative: the model is optimistic).
The goal (DESIGN.md, after SpecMoEOff's 9.7%) is the iteration time within GOAL_PCT of the
measurement on a calibrated machine.
"""
from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from specmoe.planner.errors import SpecError
from specmoe.planner.plan import Plan
from specmoe.planner.report.predict import (LIVE_BATCH_TOLERANCE, SCHEDULE_KEYS, _acc, _prediction, engine_schedule, job_prediction,  # noqa: F401
                             live_batch, predicted_timeline, throughput_by_k)
from specmoe.planner.stages import ITERATION_PARTS, STAGE_NAMES, STAGE_RESOURCE, Stage

GOAL_PCT = 10.0
INPUTS = ("model", "hardware", "workload", "draft")
RUN_KEYS = ("complete", "stages", "iterations", "decode_tokens_per_s", "plan_hashes", "draft_len", "batch",
            "micro_batches")
_FIX_ORDER = "pass the plan first and the run record second: specmoe report plan.json run.json"


# ---------------------------------------------------------------------------------------------------
# loading and checking the two inputs
def _read_json(x: Any, what: str) -> tuple[Any, str]:
    """(parsed object, where) from a dict or a path."""
    if isinstance(x, dict):
        return x, what
    if not isinstance(x, (str, Path)):
        raise SpecError(what, f"must be a dict or a path to a JSON file, got {type(x).__name__}", _FIX_ORDER)
    p = Path(x)
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(what, f"cannot read {p}: {getattr(e, 'strerror', None) or e}",
                        f"give the path of the {what} JSON file") from None
    try:
        return json.loads(text), str(p)
    except json.JSONDecodeError as e:
        raise SpecError(what, f"{p} is not valid JSON ({e.msg} at line {e.lineno}; truncated?)",
                        f"regenerate the {what} file") from None


def _looks_like_run(d: dict) -> bool:
    return "plan_hashes" in d and "complete" in d


def _looks_like_plan(d: dict) -> bool:
    return "predicted" in d and "placement" in d


def load_plan(plan: Plan | dict | str | Path) -> Plan:
    """A Plan from itself, its dict or a plan.json path; a run record given here is named as such."""
    if isinstance(plan, Plan):
        return plan
    d, where = _read_json(plan, "plan")
    if isinstance(d, dict) and _looks_like_run(d) and not _looks_like_plan(d):
        raise SpecError("plan", f"{where} is a run record (run.json), not a plan", _FIX_ORDER)
    return Plan.from_dict(d)


def load_run(run: dict | str | Path) -> dict:
    """The run record as a checked dict (the keys of runtime/run_record.py); a plan given here is
    named as such, missing keys and unknown stage names are named with their field."""
    d, where = _read_json(run, "run")
    if not isinstance(d, dict):
        raise SpecError("run", f"{where}: top level is not a JSON object", "give the run.json written by `specmoe run`")
    if _looks_like_plan(d) and not _looks_like_run(d):
        raise SpecError("run", f"{where} is a plan (plan.json), not a run record", _FIX_ORDER)
    for k in RUN_KEYS:
        if k not in d:
            raise SpecError(f"run.{k}", f"missing in {where} (truncated, or not written by `specmoe run`?)",
                            "give the run.json written by `specmoe run`")
    st = d["stages"]
    if not isinstance(st, dict):
        raise SpecError("run.stages", "is not an object of stage name -> seconds", "give an unedited run.json")
    for name, v in st.items():
        if name not in STAGE_NAMES:
            raise SpecError(f"run.stages.{name}", "unknown stage name", f"valid: {', '.join(STAGE_NAMES)}")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or v != v:
            raise SpecError(f"run.stages.{name}", f"must be seconds >= 0, got {v!r}", "give an unedited run.json")
    for k in ("iterations", "draft_len", "batch", "micro_batches"):
        v = d[k]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise SpecError(f"run.{k}", f"must be an integer >= 0, got {v!r}", "give an unedited run.json")
    for k in ("decode_tokens_per_s", "end_to_end_tokens_per_s", "mean_accepted", "decode_tokens"):
        v = d.get(k, 0.0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or v != v:
            raise SpecError(f"run.{k}", f"must be a number >= 0, got {v!r}", "give an unedited run.json")
    it = d["iterations"]
    if it == 0 or not st.get(Stage.ITERATION.value):
        raise SpecError("run.iterations", "the run measured no decode iteration",
                        "run with more new tokens per prompt (max_new_tokens >= 2)")
    if not isinstance(d["plan_hashes"], dict):
        raise SpecError("run.plan_hashes", "is not an object", "give an unedited run.json")
    return d


def check_match(plan: Plan, run: dict) -> None:
    """SpecError naming every input (model, hardware, workload, draft) whose hash in the run record
    differs from the plan's: the run was made from another plan."""
    ph = run["plan_hashes"]
    diff = [k for k in INPUTS if ph.get(k) != plan.input_hashes.get(k)]
    if diff:
        raise SpecError(f"run.plan_hashes.{diff[0]}",
                        f"the run was made from another plan: its {', '.join(diff)} "
                        f"{'differs' if len(diff) == 1 else 'differ'} from this plan's "
                        f"(plan: {plan.model.get('name', '?')} on {plan.hardware.get('name', '?')})",
                        "report the run against the plan.json it was run with")


# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """One predicted/measured pair. error_pct = (predicted - measured) / measured x 100, None when
    nothing was measured."""

    name: str
    resource: str
    predicted: float
    measured: float | None
    unit: str = "s"

    @property
    def error_pct(self) -> float | None:
        if self.measured is None or self.measured <= 0:
            return None
        return (self.predicted - self.measured) / self.measured * 100.0

    @property
    def diff(self) -> float:
        return self.predicted - (self.measured or 0.0)


@dataclass
class Comparison:
    stages: list[Row]                 # the iteration parts, then `iteration`, then `prefill`
    metrics: list[Row]                # throughput, tokens per iteration, acceptance
    mean_abs_error_pct: float | None  # mean |error| over the iteration parts with a measurement > 0
    goal_pct: float
    calibrated: bool                  # the prediction used measured curves (plan.predicted.source)
    notes: list[str]                  # where the model is off, and why
    warnings: list[str]
    header: dict[str, Any]
    predicted_timeline: list[dict] = field(default_factory=list)
    measured_timeline: list[dict] = field(default_factory=list)
    by_k: list[dict] = field(default_factory=list)
    acceptance: dict[str, Any] = field(default_factory=dict)
    # the machine's speed around the run against calibration (run record `speed_probe`): {ratio, before_s,
    # after_s, calibration_iteration_s, scaled_error_pct: the iteration error with the prediction x ratio}
    drift: dict[str, Any] = field(default_factory=dict)
    # live sequences per decode iteration: {"measured": the run's counts, "predicted": the expected drain of a
    # static batch (planner/batch_drain.live_curve) or None}
    live: dict[str, Any] = field(default_factory=dict)

    def row(self, name: str) -> Row:
        for r in self.stages + self.metrics:
            if r.name == name:
                return r
        raise KeyError(name)

    @property
    def iteration_error_pct(self) -> float | None:
        return self.row(Stage.ITERATION.value).error_pct

    @property
    def passed(self) -> bool:
        e = self.iteration_error_pct
        return e is not None and abs(e) <= self.goal_pct

    @property
    def verdict(self) -> str:
        e = self.iteration_error_pct
        word = "PASS" if self.passed else "MISS"
        tail = "" if self.calibrated else " [rates: datasheet peaks; the goal is set for a calibrated machine]"
        err = "n/a" if e is None else f"{e:+.1f}%"
        return f"{word}: iteration time within {self.goal_pct:g}% of measured (error {err}){tail}"

    def to_dataframe(self):
        import pandas as pd

        rows = [{"name": r.name, "resource": r.resource, "unit": r.unit, "predicted": r.predicted,
                 "measured": r.measured, "error_pct": r.error_pct} for r in self.stages + self.metrics]
        return pd.DataFrame(rows)

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("stages", "metrics"):
            for r, src in zip(d[key], getattr(self, key)):
                r["error_pct"] = src.error_pct
        d.update(iteration_error_pct=self.iteration_error_pct, passed=self.passed, verdict=self.verdict)
        return d


# ---------------------------------------------------------------------------------------------------
def _resource(plan: Plan, stage: Stage) -> str:
    if stage == Stage.TARGET_ATTENTION:
        return "gpu" if plan.placement.attention_device == "gpu" else "cpu"
    if stage == Stage.DRAFT_CPU:
        return "cpu+gpu"
    return STAGE_RESOURCE[stage]


def compare(plan: Plan | dict | str | Path, run: dict | str | Path, goal_pct: float = GOAL_PCT) -> Comparison:
    """Predicted against measured for every stage of the iteration, the iteration itself, prefill,
    throughput and acceptance. Raises SpecError for mismatched or malformed inputs."""
    plan = load_plan(plan)
    run = load_run(run)
    check_match(plan, run)
    warnings: list[str] = []
    pst, tot, ptl = _prediction(plan, run, warnings)
    mst = run["stages"]
    rows = [Row(s.value, _resource(plan, s), float(pst.get(s.value, 0.0)), float(mst.get(s.value, 0.0)))
            for s in ITERATION_PARTS]
    rows.append(Row(Stage.ITERATION.value, "all", tot["iteration_time_s"], float(mst[Stage.ITERATION.value])))
    pre_m = mst.get(Stage.PREFILL.value)
    rows.append(Row(Stage.PREFILL.value, "all", tot["prefill_time_s"], None if pre_m is None else float(pre_m)))
    errs = [abs(r.error_pct) for r in rows[:len(ITERATION_PARTS)] if r.error_pct is not None]
    mae = sum(errs) / len(errs) if errs else None

    k = int(run["draft_len"])
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
        metrics.append(Row("accepted drafts per sequence", "all", _acc(plan, k),
                           float(run["mean_accepted"]) if "mean_accepted" in run else None, "tok"))
    try:
        job = job_prediction(plan, run)
    except SpecError as e:
        job = None
        warnings.append(f"no prediction of the job's drain: {e}")
    lives = run.get("live_by_iteration")
    if isinstance(lives, list) and lives:
        live_pred = job.get("live_curve") if job is not None else None
        live_m = [int(x) for x in lives]
    else:
        live_pred, live_m = None, []
    if job is not None:
        live = live_batch(run)
        metrics += [
            Row("mean live batch", "all", job["mean_live_batch"], live, "seq"),
            Row("decode iterations", "all", job["iterations"], float(its), "iter"),
            Row("job decode tokens/s", "all", job["decode_tokens_per_s"], float(run["decode_tokens_per_s"]), "tok/s"),
        ]
    header = _header(plan, run, tot)
    cmp = Comparison(stages=rows, metrics=metrics, mean_abs_error_pct=mae, goal_pct=goal_pct,
                     calibrated=tot["source"] == "measured", notes=[], warnings=warnings, header=header,
                     predicted_timeline=ptl, measured_timeline=list(run.get("timeline") or []),
                     acceptance=_acceptance(plan, run, k))
    try:
        cmp.by_k = throughput_by_k(plan)
    except SpecError as e:
        warnings.append(f"no throughput-against-k curve: {e}")
    cmp.drift = _drift(run, cmp.row(Stage.ITERATION.value))
    cmp.live = {"measured": live_m, "predicted": live_pred} if live_m else {}
    cmp.notes = explain(cmp, plan, run)
    return cmp


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
    acc = [_acc(plan, j) for j in range(k + 1)] + [_acc(plan, k)]
    surv = [1.0] + [max(0.0, acc[j] - acc[j - 1]) for j in range(1, k + 1)] + [0.0]   # P(A >= j)
    planned = {str(j): max(0.0, surv[j] - surv[j + 1]) for j in range(k + 1)}
    hist = {str(a): int(n) for a, n in (run.get("acceptance_histogram") or {}).items()}
    return {"k": k, "measured": hist, "planned": planned}


# ---------------------------------------------------------------------------------------------------
def _ms(x: float) -> str:
    return f"{x * 1e3:.3g} ms" if x < 1 else f"{x:.3g} s"


def explain(cmp: Comparison, plan: Plan, run: dict) -> list[str]:
    """'Where the model is off and why', from the numbers."""
    notes = []
    parts = cmp.stages[:len(ITERATION_PARTS)]
    it = cmp.row(Stage.ITERATION.value)
    e = it.error_pct
    if e is not None:
        way = "underestimates" if e < 0 else "overestimates"
        notes.append(f"The iteration took {_ms(it.measured)} measured against {_ms(it.predicted)} predicted: the "
                     f"model {way} it by {abs(e):.1f}% of the measured time ({cmp.verdict.split(':')[0]}).")
    miss = sorted(parts, key=lambda r: abs(r.diff), reverse=True)
    total_miss = sum(abs(r.diff) for r in parts) or 1.0
    top = miss[0] if miss and abs(miss[0].diff) > 0 else None
    if top is not None:
        pct = "" if top.error_pct is None else f" ({top.error_pct:+.0f}%)"
        notes.append(f"Largest miss: {top.name} on the {top.resource}: {_ms(top.measured or 0)} measured against "
                     f"{_ms(top.predicted)} predicted{pct}, {abs(top.diff) / total_miss:.0%} of the summed stage miss; "
                     + ("the model underestimates it." if top.diff < 0 else "the model overestimates it."))
    ratios = sorted(r.measured / r.predicted for r in parts if r.predicted > 0 and r.measured)
    if len(ratios) >= 3 and ratios[len(ratios) // 2] > 5:
        notes.append(f"Every measured stage is {ratios[0]:.3g}x to {ratios[-1]:.3g}x its prediction (median "
                     f"{ratios[len(ratios) // 2]:.3g}x): a miss this uniform is a missing term, not a mis-tuned rate. "
                     "For small models fixed per-operation costs (Python dispatch, kernel launches, synchronisation) "
                     "dominate, and the roofline, which counts only FLOPs and bytes, has no term for them.")
    elif len(ratios) >= 3 and (ratios[0] > 1.08 or ratios[-1] < 1 / 1.08) and ratios[-1] / ratios[0] < 2.0:
        slower = ratios[0] > 1
        notes.append(f"Every measured stage is {ratios[0]:.2f}x to {ratios[-1]:.2f}x its prediction, all "
                     + ("slower" if slower else "faster") + ": a miss this uniform is the machine running "
                     + ("slower" if slower else "faster") + " than when it was calibrated (other load, frequency), "
                     "not one mis-modelled stage. Calibrate again (`specmoe calibrate --force`) and compare runs "
                     "made close together.")
    if cmp.drift:
        r, e2, noise = cmp.drift["ratio"], cmp.drift["scaled_error_pct"], cmp.drift.get("calibration_spread")
        text = (f"Machine speed: a fixed probe of the engine's own stage code took {r:.2f}x its calibration time "
                f"around this run. ")
        if noise is not None and abs(r - 1) <= noise:
            text += (f"That is within the probe's own noise (its four calibration samples spread {noise:.0%}), so it "
                     f"says nothing either way about the miss (scaled by it: {e2:+.1f}%).")
        else:
            text += (f"The machine ran {abs(r - 1):.0%} {'slower' if r > 1 else 'faster'} than when it was calibrated; "
                     f"scaled by that, the predicted iteration is off by {e2:+.1f}% "
                     + ("(within the goal: the rest of the miss is the machine, not the model)."
                        if abs(e2) <= cmp.goal_pct < abs(e if e is not None else 0) else
                        "(the probe does not explain the miss)." if e is not None and abs(e2) >= abs(e) else "."))
        notes.append(text)
    for r in parts:
        if r.predicted > 0 and not r.measured:
            notes.append(f"{r.name} is predicted ({_ms(r.predicted)}) but was not measured: the run did not execute "
                         f"this stage (or timed it inside another).")
        elif r.predicted == 0 and r.measured:
            notes.append(f"{r.name} was measured ({_ms(r.measured)}) but the model predicts no time for it.")
    # overlap: the model lets GPU, CPU and PCIe run concurrently; the stage sum / iteration shows how much did
    sum_m = sum(r.measured or 0 for r in parts)
    sum_p = sum(r.predicted for r in parts)
    if it.measured and it.predicted and sum_m and sum_p:
        ov_m, ov_p = sum_m / it.measured, sum_p / it.predicted
        msg = (f"Overlap: measured stages sum to {ov_m:.2f}x the measured iteration, predicted stages to {ov_p:.2f}x "
               f"the predicted one.")
        if ov_p > 1.15 and ov_m < ov_p - 0.15:
            msg += (" The model overlaps GPU, CPU and PCIe work that the run executed one after the other "
                    f"(device {run.get('device', '?')}): the pipeline is the gap.")
        elif ov_m < 0.9:
            msg += (f" {1 - ov_m:.0%} of the measured iteration lies outside the timed stages (Python, "
                    "synchronisation, sampling): overhead the model does not have.")
        notes.append(msg)
    busy_m: dict[str, float] = {}
    busy_p: dict[str, float] = {}
    for r in parts:
        res = "cpu" if r.resource == "cpu+gpu" else r.resource
        busy_m[res] = busy_m.get(res, 0.0) + (r.measured or 0.0)
        busy_p[res] = busy_p.get(res, 0.0) + r.predicted
    if sum(busy_m.values()) > 0:
        bm = max(busy_m, key=busy_m.get)
        bp = max(busy_p, key=busy_p.get) if sum(busy_p.values()) > 0 else plan.bound
        same = "as predicted" if bm == bp else f"but the model has the {bp} busiest"
        notes.append(f"Bound: the {bm} stages take the most measured time ({_ms(busy_m[bm])} per iteration), {same}; "
                     f"the plan names {plan.bound} as the bound resource.")
    acc_row = next((r for r in cmp.metrics if r.name == "accepted drafts per sequence"), None)
    if acc_row is not None and acc_row.measured is not None and acc_row.predicted <= 0 < acc_row.measured:
        notes.append(f"Acceptance: the plan assumed no accepted drafts (acc(k)=0) but {acc_row.measured:.2f} were accepted "
                     "per sequence and iteration: plan with the measured acceptance (--acceptance).")
    elif acc_row is not None and acc_row.error_pct is not None and abs(acc_row.error_pct) > 10:
        notes.append(f"Acceptance: {acc_row.measured:.2f} drafts accepted per sequence and iteration, the plan assumed "
                     f"acc(k)={acc_row.predicted:.2f} ({acc_row.error_pct:+.0f}%): tokens per iteration, hence "
                     "throughput, move with it; re-profile acceptance (`specmoe profile-acceptance`) and plan again.")
    seqs = run.get("sequences")
    if seqs is not None and seqs < plan.batch:
        notes.append(f"Batch: the run had {seqs} prompts for a planned batch of {plan.batch}, so iterations ran "
                     f"with fewer sequences than the prediction assumes.")
    wl = plan.workload
    if run.get("prompt_tokens") and seqs:
        mean_p = run["prompt_tokens"] / seqs
        if abs(mean_p - wl.get("prompt_len", mean_p)) > 0.25 * max(1.0, wl.get("prompt_len", 1)):
            notes.append(f"Context: prompts averaged {mean_p:.0f} tokens against the planned {wl.get('prompt_len')} "
                         f"(and {run.get('max_new_tokens', '?')} new tokens against {wl.get('gen_len')}): attention "
                         f"and KV costs were evaluated at another context length.")
    if not cmp.calibrated:
        notes.append("Rates: the prediction used datasheet peaks (no measured curves in the hardware spec); run "
                     "`specmoe calibrate` on this machine and plan again for the calibrated comparison.")
    if str(run.get("device", "")).startswith("cuda") and not run.get("profile_stages"):
        notes.append("GPU stage times were taken without synchronising the GPU (`--profile-stages` off), so they "
                     "measure kernel launches; only the iteration time is exact.")
    if not run["complete"]:
        notes.append(f"The run is incomplete ({run.get('error') or 'stopped early'}); the measured means cover the "
                     f"{run['iterations']} iterations that ran.")
    if run.get("acceptance_oracle") is not None:
        notes.append(f"Acceptance was driven by a seeded Bernoulli oracle at rate {run['acceptance_oracle']}; "
                     "the measured throughput is oracle-driven.")
    return notes


# ---------------------------------------------------------------------------------------------------
def _fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "s":
        return f"{v:.6f}" if v < 10 else f"{v:.2f}"
    return f"{v:.2f}"


def _err(r: Row) -> str:
    e = r.error_pct
    return "n/a" if e is None else f"{e:+.1f}%"


def render_table(cmp: Comparison) -> str:
    """The per-stage table with an error column, the throughput rows, the mean |error| and the verdict."""
    h = cmp.header
    k = h["run_draft_len"]
    lines = [f"specmoe report: {h['model']} on {h['hardware']}" + (f", draft {h['draft']}" if h["draft"] else "")
             + f"; batch {h['batch']}, micro-batches {h['micro_batches']}, k {k}; rates: {h['rates']}",
             f"  run: {h['iterations']} iterations on {h['device']} ({'complete' if h['complete'] else 'INCOMPLETE'}), "
             f"commit {str(h['git_commit'])[:12]}",
             "", f"  {'stage':30s} {'resource':8s} {'predicted s':>12s} {'measured s':>12s} {'error':>9s}"]
    for r in cmp.stages:
        lines.append(f"  {r.name:30s} {r.resource:8s} {_fmt(r.predicted, 's'):>12s} {_fmt(r.measured, 's'):>12s} "
                     f"{_err(r):>9s}")
    lines += ["", f"  {'metric':30s} {'unit':8s} {'predicted':>12s} {'measured':>12s} {'error':>9s}"]
    for r in cmp.metrics:
        lines.append(f"  {r.name:30s} {r.unit:8s} {_fmt(r.predicted, r.unit):>12s} {_fmt(r.measured, r.unit):>12s} "
                     f"{_err(r):>9s}")
    mae = "n/a" if cmp.mean_abs_error_pct is None else f"{cmp.mean_abs_error_pct:.1f}%"
    lines += ["", f"  mean |error| over the measured iteration stages: {mae}", f"  {cmp.verdict}"]
    if cmp.drift:
        r, noise = cmp.drift["ratio"], cmp.drift.get("calibration_spread")
        lines.append(f"  machine speed: the speed probe took {r:.2f}x its calibration time around this run "
                     f"({'slower' if r > 1 else 'faster'} than when calibrated"
                     + (f"; its calibration samples spread {noise:.0%}" if noise is not None else "")
                     + f"); with the prediction scaled by it the iteration error is {cmp.drift['scaled_error_pct']:+.1f}%")
    lines += [f"  warning: {w}" for w in cmp.warnings]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
def write_html(plan: Plan | dict | str | Path, run: dict | str | Path, path: str | Path,
               comparison: Comparison | None = None) -> Path:
    """One self-contained HTML report (plotly's JS inlined, no network). Written atomically: on any
    error no file (and no partial file) is left at `path`."""
    from specmoe.planner.report import plots as rp

    out = Path(path)
    if not out.parent.is_dir():
        raise SpecError("-o", f"directory {out.parent} does not exist", "create it first or choose another path")
    plan_obj = load_plan(plan)
    cmp = comparison if comparison is not None else compare(plan_obj, run)
    figs = [("Stage times per iteration", rp.stage_bars(cmp))]
    if cmp.predicted_timeline:
        figs.append(("Predicted timeline of one iteration", rp.gantt(cmp.predicted_timeline, "predicted")))
    if cmp.measured_timeline:
        figs.append(("Measured timeline of one iteration", rp.gantt(cmp.measured_timeline, "measured")))
    if cmp.by_k:
        it_m = cmp.row("decode tokens/s").measured
        figs.append(("Decode throughput against draft length k",
                     rp.throughput_vs_k(cmp.by_k, plan_obj.draft_len, plan_obj.predicted.decode_tokens_per_s,
                                        cmp.header["run_draft_len"], it_m)))
    if cmp.acceptance:
        figs.append(("Accepted drafts per verified sequence", rp.acceptance_bars(cmp.acceptance)))
    lives = cmp.live.get("measured") if cmp.live else None
    if lives:
        figs.append(("Live sequences per decode iteration", rp.live_batch(cmp.live.get("predicted"), lives,
                                                                          plan_obj.batch)))
    page = _page(cmp, figs)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        tmp.write_text(page, encoding="utf-8")
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{padding:3px 10px;border-bottom:1px solid #ddd;text-align:right}
td:first-child,th:first-child,td.l{text-align:left}.pass{color:#fff;background:#2a7;padding:4px 10px}
.miss{color:#fff;background:#c33;padding:4px 10px}.warn{color:#a60}h2{margin-top:1.6em}"""


def _page(cmp: Comparison, figs: list) -> str:
    e = html.escape
    h = cmp.header
    head_rows = "".join(f"<tr><td class=l>{e(str(k))}</td><td class=l>{e(str(v))}</td></tr>" for k, v in h.items()
                        if v not in (None, "", {}))

    def table(rows, first="stage"):
        body = "".join(f"<tr><td>{e(r.name)}</td><td class=l>{e(r.resource)}</td><td class=l>{e(r.unit)}</td>"
                       f"<td>{_fmt(r.predicted, r.unit)}</td><td>{_fmt(r.measured, r.unit)}</td><td>{_err(r)}</td></tr>"
                       for r in rows)
        return (f"<table><tr><th>{first}</th><th>resource</th><th>unit</th><th>predicted</th><th>measured</th>"
                f"<th>error</th></tr>{body}</table>")

    mae = "n/a" if cmp.mean_abs_error_pct is None else f"{cmp.mean_abs_error_pct:.1f}%"
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>specmoe report: {e(h['model'])} on "
             f"{e(h['hardware'])}</title><style>{_CSS}</style></head><body>",
             f"<h1>specmoe report: {e(h['model'])} on {e(h['hardware'])}</h1>",
             f"<p><span class='{'pass' if cmp.passed else 'miss'}'>{e(cmp.verdict)}</span></p>",
             f"<p>Mean absolute error over the measured iteration stages: <b>{mae}</b>. Error = (predicted - measured)"
             f" / measured; negative means the model is optimistic.</p>",
             "<h2>Where the model is off and why</h2><ul>" + "".join(f"<li>{e(n)}</li>" for n in cmp.notes) + "</ul>"]
    if cmp.warnings:
        parts.append("<ul>" + "".join(f"<li class=warn>{e(w)}</li>" for w in cmp.warnings) + "</ul>")
    parts += ["<h2>Stages</h2>", table(cmp.stages), "<h2>Throughput and acceptance</h2>", table(cmp.metrics, "metric")]
    first = True
    for title, fig in figs:
        parts.append(f"<h2>{e(title)}</h2>")
        parts.append(fig.to_html(full_html=False, include_plotlyjs=True if first else False,
                                 config={"displaylogo": False}))
        first = False
    parts += ["<h2>Plan and run</h2>", f"<table>{head_rows}</table>", "</body></html>"]
    return "\n".join(parts)


def describe_plan(plan: Plan | dict | str | Path) -> str:
    """A few lines: the chosen configuration, placement, predicted throughput, memory and bound."""
    p = load_plan(plan)
    pl = p.placement
    slots = sorted(set(pl.expert_cache_slots))
    mem = p.memory or {}
    gib = 2 ** 30
    lines = [f"plan: {p.model.get('name')} on {p.hardware.get('name')}"
             + (f", draft {p.draft.get('name')}" if p.draft else ""),
             f"  batch {p.batch}, micro-batches {p.micro_batches}, draft length k {p.draft_len}",
             f"  predicted: iteration {p.predicted.iteration_time_s:.4f} s, decode {p.predicted.decode_tokens_per_s:.1f} "
             f"tokens/s, end-to-end {p.predicted.end_to_end_tokens_per_s:.1f} tokens/s (rates: {p.predicted.source})",
             f"  bound: {p.bound}; expert cache slots per layer {slots if len(slots) > 1 else slots[0]}; draft KV on GPU "
             f"for {pl.draft_kv_gpu_sequences}/{p.batch}; target KV on GPU for {pl.target_kv_gpu_sequences}"]
    if "gpu_bytes" in mem:
        lines.append(f"  memory: GPU {mem['gpu_bytes'] / gib:.2f} of {mem.get('gpu_capacity_bytes', 0) / gib:.1f} GiB, "
                     f"CPU {mem.get('cpu_bytes', 0) / gib:.2f} of {mem.get('cpu_capacity_bytes', 0) / gib:.1f} GiB")
    lines.append(f"  solver: {p.solver.get('name', '?') if isinstance(p.solver, dict) else p.solver}")
    return "\n".join(lines)


__all__ = ["Comparison", "Row", "compare", "render_table", "write_html", "load_plan", "load_run", "check_match",
           "throughput_by_k", "predicted_timeline", "explain", "describe_plan", "GOAL_PCT"]
