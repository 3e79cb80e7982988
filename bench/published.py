"""Predict published measurements nobody here made, and report how far the planner is from them.

    python bench/published.py [--cases bench/published_cases.yaml] [--json]

Each case of the cases file (bench/published_cases.yaml) is a peer system's measured throughput on a
host we ship a spec for, with the policy it ran. The planner predicts it at that policy
(specmoe.planner.estimator.estimate, the cost model `specmoe estimate` uses); what is the peer's own
inefficiency and not the hardware's is a labelled `peer_factor` (value, reason, source), applied as a
separate column. error = (predicted - measured) / measured, with predicted = planner x peer_factor.
The last line is `published: N cases, median |error| M%, worst W% (CASE)`.
A bad cases file exits 2 with one message naming the field.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CASES = ROOT / "bench" / "published_cases.yaml"
METRICS = ("end_to_end", "decode")
DTYPES = ("bf16", "fp16", "fp32", "fp8")
MICRO_BATCH_CHOICES = (1, 2, 4, 7, 8, 14, 16, 28, 32, 56, 64)   # `micro_batches: best` sweeps these


class CasesError(Exception):
    """A bad cases file: `field` names the offending field."""

    def __init__(self, field_name: str, problem: str):
        super().__init__(f"{field_name}: {problem}")
        self.field = field_name


@dataclass
class Case:
    id: str
    system: str
    hardware: str
    model: str
    prompt_len: int
    gen_len: int
    batch: int
    micro_batches: int | None          # None: the planner picks the best (policy says "best")
    draft_len: int
    acceptance: float | None
    metric: str
    measured: float
    source: str
    weight_dtype: str = "fp16"
    kv_dtype: str = "fp16"
    dataset: str = ""
    policy: dict = field(default_factory=dict)
    peer_factor: float = 1.0
    peer_reason: str = ""
    peer_source: str = ""
    fitted: bool = False               # the peer factor was fitted to this case: shown, not scored


@dataclass
class Result:
    case: Case
    planner: float                     # the planner's tokens/s at the case's policy
    predicted: float                   # planner x peer_factor
    error: float                       # (predicted - measured) / measured
    micro_batches: int                 # the m predicted with
    detail: dict = field(default_factory=dict)


def relative_error(predicted: float, measured: float) -> float:
    return (predicted - measured) / measured


# --------------------------------------------------------------------------------------------------
def _get(raw: dict, key: str, where: str, kind, *, required: bool = True, default=None):
    if key not in raw or raw[key] is None:
        if required:
            raise CasesError(f"{where}.{key}", "missing")
        return default
    v = raw[key]
    if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
        raise CasesError(f"{where}.{key}", f"must be an integer, got {v!r}")
    if kind is float and (isinstance(v, bool) or not isinstance(v, (int, float))):
        raise CasesError(f"{where}.{key}", f"must be a number, got {v!r}")
    if kind is str and (not isinstance(v, str) or not v.strip()):
        raise CasesError(f"{where}.{key}", f"must be a non-empty string, got {v!r}")
    if kind is dict and not isinstance(v, dict):
        raise CasesError(f"{where}.{key}", f"must be a mapping, got {v!r}")
    return float(v) if kind is float else v


def _positive(v, name: str):
    if v is not None and v <= 0:
        raise CasesError(name, f"must be > 0, got {v!r}")
    return v


def _peer(raw: dict, where: str) -> tuple[float, str, str]:
    pf = raw.get("peer_factor")
    if pf is None:
        return 1.0, "", ""
    w = f"{where}.peer_factor"
    if not isinstance(pf, dict):
        raise CasesError(w, "must be a mapping {value, reason, source}")
    value = _positive(_get(pf, "value", w, float), f"{w}.value")
    return value, _get(pf, "reason", w, str), _get(pf, "source", w, str)


def parse_case(raw: dict, defaults: dict, i: int) -> Case:
    if not isinstance(raw, dict):
        raise CasesError(f"cases[{i}]", "must be a mapping")
    merged = {**defaults, **raw}
    where = f"cases[{i}]" if not isinstance(raw.get("id"), str) else f"cases[{raw['id']}]"
    cid = _get(merged, "id", where, str)
    pol = _get(merged, "policy", where, dict)
    pw = f"{where}.policy"
    mb = pol.get("micro_batches")
    if mb == "best":
        mb = None
    else:
        mb = _positive(_get(pol, "micro_batches", pw, int), f"{pw}.micro_batches")
    metric = _get(merged, "metric", where, str)
    if metric not in METRICS:
        raise CasesError(f"{where}.metric", f"must be one of {', '.join(METRICS)}, got {metric!r}")
    for key in ("weight_dtype", "kv_dtype"):
        if merged.get(key, "fp16") not in DTYPES:
            raise CasesError(f"{where}.{key}", f"must be one of {', '.join(DTYPES)}, got {merged.get(key)!r}")
    value, reason, src = _peer(merged, where)
    k = _get(merged, "draft_len", where, int, required=False, default=0)
    acc = _get(merged, "acceptance", where, float, required=False)
    if k > 0 and acc is None:
        raise CasesError(f"{where}.acceptance", f"needed with draft_len {k}")
    return Case(id=cid, system=_get(merged, "system", where, str), hardware=_get(merged, "hardware", where, str),
                model=_get(merged, "model", where, str),
                prompt_len=_positive(_get(merged, "prompt_len", where, int), f"{where}.prompt_len"),
                gen_len=_positive(_get(merged, "gen_len", where, int), f"{where}.gen_len"),
                batch=_positive(_get(pol, "batch", pw, int), f"{pw}.batch"), micro_batches=mb,
                draft_len=k, acceptance=acc, metric=metric,
                measured=_positive(_get(merged, "measured", where, float), f"{where}.measured"),
                source=_get(merged, "source", where, str), weight_dtype=merged.get("weight_dtype", "fp16"),
                kv_dtype=merged.get("kv_dtype", "fp16"), dataset=str(merged.get("dataset", "")), policy=dict(pol),
                peer_factor=value, peer_reason=reason, peer_source=src, fitted=_fitted(merged, where))


def _fitted(merged: dict, where: str) -> bool:
    v = merged.get("fitted", False)
    if not isinstance(v, bool):
        raise CasesError(f"{where}.fitted", f"must be true or false, got {v!r}")
    return v


def load_cases(path: str | Path) -> list[Case]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise CasesError("cases", f"no such file {p}")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise CasesError("cases", f"not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise CasesError("cases", "the file must be a mapping with a `cases` list")
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise CasesError("defaults", "must be a mapping")
    items = raw.get("cases")
    if not isinstance(items, list) or not items:
        raise CasesError("cases", "must be a non-empty list")
    cases = [parse_case(c, defaults, i) for i, c in enumerate(items)]
    seen: set[str] = set()
    for c in cases:
        if c.id in seen:
            raise CasesError(f"cases[{c.id}].id", "duplicate id")
        seen.add(c.id)
    return cases


def check_presets(cases: list[Case]) -> None:
    """Every case's model and hardware preset loads (CasesError naming the field otherwise)."""
    from specmoe.planner.errors import SpecError
    from specmoe.planner.hardware_spec import load_hardware
    from specmoe.planner.model_spec import load_model

    for c in cases:
        for key, loader in (("model", load_model), ("hardware", load_hardware)):
            try:
                loader(getattr(c, key))
            except (SpecError, FileNotFoundError, OSError) as e:
                raise CasesError(f"cases[{c.id}].{key}", f"unknown preset {getattr(c, key)!r} ({e})") from None


# --------------------------------------------------------------------------------------------------
def _estimate(c: Case, m: int):
    from specmoe.planner.estimator import estimate
    from specmoe.planner.workload import Workload, load_acceptance

    acc = load_acceptance(c.acceptance if c.acceptance is not None else 0.0, max_k=max(16, c.draft_len))
    wl = Workload(prompt_len=c.prompt_len, gen_len=c.gen_len, batch=c.batch, acceptance=acc,
                  kv_dtype=c.kv_dtype, weight_dtype=c.weight_dtype)
    return estimate(c.model, c.hardware, wl, draft_len=c.draft_len, micro_batches=m, batch=c.batch,
                    timeline=False)


def _metric(e, metric: str) -> float:
    return e.end_to_end_tokens_per_s if metric == "end_to_end" else e.run_decode_tokens_per_s


def predict(c: Case) -> Result:
    """The planner's throughput at the case's policy (the best m where the policy leaves it open)."""
    from specmoe.planner.errors import SpecError

    choices = [c.micro_batches] if c.micro_batches else [m for m in MICRO_BATCH_CHOICES if m <= c.batch]
    best = None
    for m in choices:
        try:
            e = _estimate(c, m)
        except SpecError:
            if c.micro_batches:
                raise
            continue
        if best is None or _metric(e, c.metric) > _metric(best[1], c.metric):
            best = (m, e)
    if best is None:
        raise SpecError(f"cases[{c.id}]", "no micro-batch count fits memory", "check the policy")
    m, e = best
    planner = _metric(e, c.metric)
    predicted = planner * c.peer_factor
    detail = {"iteration_s": e.iteration_time_s, "prefill_s": e.prefill_time_s, "decode_s": e.decode_time_s,
              "bound": e.bound, "stages": {k: v for k, v in e.stages.items() if v}}
    return Result(c, planner, predicted, relative_error(predicted, c.measured), m, detail)


def summary_line(results: list[Result]) -> str:
    """The last line, over the predicted cases (a case a peer factor was fitted to is not scored)."""
    scored = [r for r in results if not r.case.fitted] or results
    errs = [abs(r.error) for r in scored]
    worst = max(scored, key=lambda r: abs(r.error))
    return (f"published: {len(scored)} cases, median |error| {round(100 * statistics.median(errs))}%, "
            f"worst {round(100 * abs(worst.error))}% ({worst.case.id})")


def _policy_text(r: Result) -> str:
    c = r.case
    mu = c.policy.get("micro_batch_size")
    mb = f"m={r.micro_batches}" + ("" if c.micro_batches else "*")
    return f"N={c.batch} " + (f"mu={mu} " if mu else "") + mb + f" k={c.draft_len}"


def format_table(results: list[Result]) -> str:
    hdr = (f"{'case':20s} {'system':17s} {'hardware':9s} {'model':13s} {'policy':24s} {'metric':10s} "
           f"{'planner':>8s} {'peer':>5s} {'predicted':>9s} {'measured':>8s} {'error':>7s}")
    lines = [hdr, "-" * len(hdr)]
    for r in results:
        c = r.case
        lines.append(f"{c.id:20s} {c.system:17s} {c.hardware:9s} {c.model:13s} {_policy_text(r):24s} "
                     f"{c.metric:10s} {r.planner:8.2f} {c.peer_factor:5.2f} {r.predicted:9.2f} {c.measured:8.2f} "
                     f"{r.error:+7.1%}" + ("  (fitted, not scored)" if c.fitted else ""))
    notes, seen = [], {}
    for r in results:
        key = (r.case.peer_factor, r.case.peer_reason, r.case.peer_source)
        if r.case.peer_factor != 1.0:
            seen.setdefault(key, []).append(r.case.id)
    for (value, reason, src), ids in seen.items():
        notes.append(f"  peer factor x{value:g} ({', '.join(ids)}): {reason} [{src}]")
    lines += ["", "tokens/s; metric end_to_end = generated tokens / (prefill + decode); predicted = planner x peer;",
              "error = (predicted - measured) / measured; m* = micro-batches picked by the planner (mu unpublished)"]
    return "\n".join(lines + notes)


def _to_json(results: list[Result]) -> dict:
    return {"cases": [{**asdict(r.case), "planner": r.planner, "predicted": r.predicted, "error": r.error,
                       "micro_batches_used": r.micro_batches, "detail": r.detail} for r in results],
            "summary": summary_line(results)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=str(DEFAULT_CASES), help="the cases YAML (default bench/published_cases.yaml)")
    ap.add_argument("--json", action="store_true", help="print one JSON object (its `summary` is the last line)")
    args = ap.parse_args(argv)
    from specmoe.planner.errors import SpecError

    try:
        cases = load_cases(args.cases)
        check_presets(cases)
        results = [predict(c) for c in cases]
    except CasesError as e:
        print(f"error: bad cases file {args.cases}: {e}", file=sys.stderr)
        return 2
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(_to_json(results)))
    else:
        print(format_table(results))
    print(summary_line(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
