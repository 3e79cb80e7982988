"""'Where the model is off and why': the report's notes, each read from the numbers of a Comparison
(the iteration's miss, the largest stage miss, a uniform miss, the machine's speed, the overlap,
the bound resource, acceptance, the prefill's miss with where its measured time went, the workload the
run had, and how the run was taken)."""
from __future__ import annotations

from specmoe.planner.plan import Plan
from specmoe.planner.report.comparison import Comparison, Row
from specmoe.planner.stages import ITERATION_PARTS, Stage


def _ms(x: float) -> str:
    return f"{x * 1e3:.3g} ms" if x < 1 else f"{x:.3g} s"


def explain(cmp: Comparison, plan: Plan, run: dict) -> list[str]:
    """'Where the model is off and why', from the numbers."""
    parts = cmp.stages[:len(ITERATION_PARTS)]
    it = cmp.row(Stage.ITERATION.value)
    notes = [_iteration_note(cmp, it), _largest_miss_note(parts), _uniform_miss_note(parts),
             _drift_note(cmp, it.error_pct)]
    notes += _unmeasured_notes(parts)
    notes += [_overlap_note(parts, it, run), _bound_note(parts, plan), _acceptance_note(cmp),
              _prefill_note(cmp, run)]
    notes += _workload_notes(plan, run)
    notes += _run_notes(cmp, run)
    return [n for n in notes if n is not None]


def _iteration_note(cmp: Comparison, it: Row) -> str | None:
    e = it.error_pct
    if e is None:
        return None
    way = "underestimates" if e < 0 else "overestimates"
    return (f"The iteration took {_ms(it.measured)} measured against {_ms(it.predicted)} predicted: the "
            f"model {way} it by {abs(e):.1f}% of the measured time ({cmp.verdict.split(':')[0]}).")


def _largest_miss_note(parts: list[Row]) -> str | None:
    """The stage with the largest absolute miss and its share of the summed stage miss."""
    miss = sorted(parts, key=lambda r: abs(r.diff), reverse=True)
    total_miss = sum(abs(r.diff) for r in parts) or 1.0
    top = miss[0] if miss and abs(miss[0].diff) > 0 else None
    if top is None:
        return None
    pct = "" if top.error_pct is None else f" ({top.error_pct:+.0f}%)"
    return (f"Largest miss: {top.name} on the {top.resource}: {_ms(top.measured or 0)} measured against "
            f"{_ms(top.predicted)} predicted{pct}, {abs(top.diff) / total_miss:.0%} of the summed stage miss; "
            + ("the model underestimates it." if top.diff < 0 else "the model overestimates it."))


def _uniform_miss_note(parts: list[Row]) -> str | None:
    """Every stage off by a similar factor: a missing term (large factors) or the machine's speed (small ones)."""
    ratios = sorted(r.measured / r.predicted for r in parts if r.predicted > 0 and r.measured)
    if len(ratios) >= 3 and ratios[len(ratios) // 2] > 5:
        return (f"Every measured stage is {ratios[0]:.3g}x to {ratios[-1]:.3g}x its prediction (median "
                f"{ratios[len(ratios) // 2]:.3g}x): a miss this uniform is a missing term, not a mis-tuned rate. "
                "For small models fixed per-operation costs (Python dispatch, kernel launches, synchronisation) "
                "dominate, and the roofline, which counts only FLOPs and bytes, has no term for them.")
    if len(ratios) >= 3 and (ratios[0] > 1.08 or ratios[-1] < 1 / 1.08) and ratios[-1] / ratios[0] < 2.0:
        slower = ratios[0] > 1
        return (f"Every measured stage is {ratios[0]:.2f}x to {ratios[-1]:.2f}x its prediction, all "
                + ("slower" if slower else "faster") + ": a miss this uniform is the machine running "
                + ("slower" if slower else "faster") + " than when it was calibrated (other load, frequency), "
                "not one mis-modelled stage. Calibrate again (`specmoe calibrate --force`) and compare runs "
                "made close together.")
    return None


def _drift_note(cmp: Comparison, e: float | None) -> str | None:
    """The speed probe around the run against calibration, and whether it explains the miss."""
    if not cmp.drift:
        return None
    r, e2, noise = cmp.drift["ratio"], cmp.drift["scaled_error_pct"], cmp.drift.get("calibration_spread")
    text = (f"Machine speed: a fixed probe of the engine's own stage code took {r:.2f}x its calibration time "
            f"around this run. ")
    if noise is not None and abs(r - 1) <= noise:
        return text + (f"That is within the probe's own noise (its four calibration samples spread {noise:.0%}), so "
                       f"it says nothing either way about the miss (scaled by it: {e2:+.1f}%).")
    return text + (f"The machine ran {abs(r - 1):.0%} {'slower' if r > 1 else 'faster'} than when it was calibrated; "
                   f"scaled by that, the predicted iteration is off by {e2:+.1f}% "
                   + ("(within the goal: the rest of the miss is the machine, not the model)."
                      if abs(e2) <= cmp.goal_pct < abs(e if e is not None else 0) else
                      "(the probe does not explain the miss)." if e is not None and abs(e2) >= abs(e) else "."))


def _unmeasured_notes(parts: list[Row]) -> list[str]:
    """Stages predicted but not measured, and measured but not predicted."""
    notes = []
    for r in parts:
        if r.predicted > 0 and not r.measured:
            notes.append(f"{r.name} is predicted ({_ms(r.predicted)}) but was not measured: the run did not execute "
                         f"this stage (or timed it inside another).")
        elif r.predicted == 0 and r.measured:
            notes.append(f"{r.name} was measured ({_ms(r.measured)}) but the model predicts no time for it.")
    return notes


def _overlap_note(parts: list[Row], it: Row, run: dict) -> str | None:
    """The model lets GPU, CPU and PCIe run concurrently; the stage sum over the iteration shows how much did."""
    sum_m = sum(r.measured or 0 for r in parts)
    sum_p = sum(r.predicted for r in parts)
    if not (it.measured and it.predicted and sum_m and sum_p):
        return None
    ov_m, ov_p = sum_m / it.measured, sum_p / it.predicted
    msg = (f"Overlap: measured stages sum to {ov_m:.2f}x the measured iteration, predicted stages to {ov_p:.2f}x "
           f"the predicted one.")
    if ov_p > 1.15 and ov_m < ov_p - 0.15:
        msg += (" The model overlaps GPU, CPU and PCIe work that the run executed one after the other "
                f"(device {run.get('device', '?')}): the pipeline is the gap.")
    elif ov_m < 0.9:
        msg += (f" {1 - ov_m:.0%} of the measured iteration lies outside the timed stages (Python, "
                "synchronisation, sampling): overhead the model does not have.")
    return msg


def _bound_note(parts: list[Row], plan: Plan) -> str | None:
    """The resource whose stages took the most measured time, against the model's and the plan's bound."""
    busy_m: dict[str, float] = {}
    busy_p: dict[str, float] = {}
    for r in parts:
        res = "cpu" if r.resource == "cpu+gpu" else r.resource
        busy_m[res] = busy_m.get(res, 0.0) + (r.measured or 0.0)
        busy_p[res] = busy_p.get(res, 0.0) + r.predicted
    if not sum(busy_m.values()) > 0:
        return None
    bm = max(busy_m, key=busy_m.get)
    bp = max(busy_p, key=busy_p.get) if sum(busy_p.values()) > 0 else plan.bound
    same = "as predicted" if bm == bp else f"but the model has the {bp} busiest"
    return (f"Bound: the {bm} stages take the most measured time ({_ms(busy_m[bm])} per iteration), {same}; "
            f"the plan names {plan.bound} as the bound resource.")


def _acceptance_note(cmp: Comparison) -> str | None:
    """Measured acceptance against the plan's acc(k), when it is off by more than 10% (or the plan assumed none)."""
    acc_row = next((r for r in cmp.metrics if r.name == "accepted drafts per sequence"), None)
    if acc_row is not None and acc_row.measured is not None and acc_row.predicted <= 0 < acc_row.measured:
        return (f"Acceptance: the plan assumed no accepted drafts (acc(k)=0) but {acc_row.measured:.2f} were accepted "
                "per sequence and iteration: plan with the measured acceptance (--acceptance).")
    if acc_row is not None and acc_row.error_pct is not None and abs(acc_row.error_pct) > 10:
        return (f"Acceptance: {acc_row.measured:.2f} drafts accepted per sequence and iteration, the plan assumed "
                f"acc(k)={acc_row.predicted:.2f} ({acc_row.error_pct:+.0f}%): tokens per iteration, hence "
                "throughput, move with it; re-profile acceptance (`specmoe profile-acceptance`) and plan again.")
    return None


def _part_name(stage: str) -> str:
    """A prefill stage as the note names it: the target's by their part (pre_attn, moe), the draft's own prefill
    as such."""
    return "the draft's own" if stage == Stage.DRAFT_GPU.value else stage.split(".", 1)[-1]


def _prefill_note(cmp: Comparison, run: dict) -> str | None:
    """A prefill off by more than the goal: its measured time by stage (the run record's prefill_stage_totals_s:
    the target's, and the draft's own prefill as draft.gpu where the run timed it) and the rest (the KV commit,
    the first tokens' choice), and the part whose prediction is furthest off (cmp.prefill_stages)."""
    row = cmp.row(Stage.PREFILL.value)
    if row.error_pct is None or abs(row.error_pct) <= cmp.goal_pct or not row.measured:
        return None
    by = {k: float(v) for k, v in (run.get("prefill_stage_totals_s") or {}).items()
          if isinstance(v, (int, float)) and v > 0}
    where = ""
    if by:
        parts = ", ".join(f"{_part_name(k)} {_ms(v)}" for k, v in sorted(by.items(), key=lambda kv: -kv[1]))
        rest = ("the first tokens' choice" if Stage.DRAFT_GPU.value in by
                else "the draft's own prefill, the first tokens' choice")
        where = f"; measured by stage: {parts}, and {_ms(max(0.0, row.measured - sum(by.values())))} " \
                f"outside them ({rest})"
    worst = max(cmp.prefill_stages, key=lambda r: abs(r.diff), default=None)
    if worst is not None and worst.measured:
        where += (f"; furthest off: {worst.name}, {_ms(worst.measured)} measured against {_ms(worst.predicted)} "
                  "predicted (the table \"prefill by stage\")")
    way = "underestimates" if row.error_pct < 0 else "overestimates"
    return (f"Prefill: {_ms(row.measured)} measured against {_ms(row.predicted)} predicted, the model {way} it "
            f"by {abs(row.error_pct):.1f}%{where}. It is costed from the calibration's own prefill passes "
            "(the prefill keys of each stage), where the spec has them.")


def _workload_notes(plan: Plan, run: dict) -> list[str]:
    """Fewer prompts than the planned batch, and prompts of another length than planned."""
    notes = []
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
    return notes


def _run_notes(cmp: Comparison, run: dict) -> list[str]:
    """How the prediction and the run were taken: datasheet rates, unsynchronised GPU timing, an
    incomplete run, an acceptance oracle."""
    notes = []
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
