"""The report's two inputs, loaded and checked: the plan (a Plan, its dict or a plan.json path) and
the run record (a dict or a run.json path, never a runtime object: the planner does not import the
runtime). Each error names the field at fault, and a plan given for a run record (or the other way
round) is named as such."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from specmoe.planner.errors import SpecError
from specmoe.planner.plan import Plan
from specmoe.planner.stages import STAGE_NAMES, Stage

INPUTS = ("model", "hardware", "workload", "draft")
RUN_KEYS = ("complete", "stages", "iterations", "decode_tokens_per_s", "plan_hashes", "draft_len", "batch",
            "micro_batches")
_FIX_ORDER = "pass the plan first and the run record second: specmoe report plan.json run.json"
_FIX_RUN = "give an unedited run.json"


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
    _check_stages(d["stages"])
    _check_numbers(d)
    it = d["iterations"]
    if it == 0 or not d["stages"].get(Stage.ITERATION.value):
        raise SpecError("run.iterations", "the run measured no decode iteration",
                        "run with more new tokens per prompt (max_new_tokens >= 2)")
    if not isinstance(d["plan_hashes"], dict):
        raise SpecError("run.plan_hashes", "is not an object", _FIX_RUN)
    return d


def _check_stages(st: Any) -> None:
    """run.stages: an object of known stage names -> seconds >= 0."""
    if not isinstance(st, dict):
        raise SpecError("run.stages", "is not an object of stage name -> seconds", _FIX_RUN)
    for name, v in st.items():
        if name not in STAGE_NAMES:
            raise SpecError(f"run.stages.{name}", "unknown stage name", f"valid: {', '.join(STAGE_NAMES)}")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or v != v:
            raise SpecError(f"run.stages.{name}", f"must be seconds >= 0, got {v!r}", _FIX_RUN)


def _check_numbers(d: dict) -> None:
    """The run's counts are integers >= 0 and its rates numbers >= 0 (absent rates count as 0)."""
    for k in ("iterations", "draft_len", "batch", "micro_batches"):
        v = d[k]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise SpecError(f"run.{k}", f"must be an integer >= 0, got {v!r}", _FIX_RUN)
    for k in ("decode_tokens_per_s", "end_to_end_tokens_per_s", "mean_accepted", "decode_tokens"):
        v = d.get(k, 0.0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or v != v:
            raise SpecError(f"run.{k}", f"must be a number >= 0, got {v!r}", _FIX_RUN)


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
    sched = run.get("schedule")
    if isinstance(sched, dict) and sched and sched != plan.schedule.to_dict():
        diff = sorted(k for k in set(sched) | set(plan.schedule.to_dict())
                      if sched.get(k) != plan.schedule.to_dict().get(k))
        raise SpecError(f"run.schedule.{diff[0]}", f"the run ran another schedule than this plan's "
                        f"({', '.join(f'{k} {sched.get(k)!r} vs {plan.schedule.to_dict().get(k)!r}' for k in diff)}): "
                        "an override made a new plan", "report the run against the plan saved beside its run "
                        "record (RUN.plan.json)")
