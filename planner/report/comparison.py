"""One predicted/measured pair (Row) and the whole comparison of a run against its plan
(Comparison), with the verdict against the goal. Errors are signed and relative to the measurement:
error % = (predicted - measured) / measured x 100 (negative: the model is optimistic).
The goal (DESIGN.md, after SpecMoEOff's 9.7%) is the iteration time within GOAL_PCT of the
measurement on a calibrated machine.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from specmoe.planner.stages import Stage

GOAL_PCT = 10.0


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
    # memory, predicted (the planner's footprint) against measured (the run record's `memory`), in MiB
    # (planner/report/memory_rows.py); [] for a run record without memory measurements
    memory: list[Row] = field(default_factory=list)
    # the prefill by part (planner/prefill.py): each target stage, the draft's own prefill (draft.gpu, where
    # the run timed it), then `outside the stages` (predicted: the rest, and the draft's prefill for a run
    # that did not time it; measured: the prefill less its stages); [] for a run record without the
    # prefill's stage times (prefill_stage_totals_s). Not looked up by row(): the names are the stages'.
    prefill_stages: list[Row] = field(default_factory=list)

    def row(self, name: str) -> Row:
        for r in self.stages + self.metrics + self.memory:
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
                 "measured": r.measured, "error_pct": r.error_pct} for r in self.stages + self.metrics + self.memory]
        rows += [{"name": f"prefill {r.name}", "resource": r.resource, "unit": r.unit, "predicted": r.predicted,
                  "measured": r.measured, "error_pct": r.error_pct} for r in self.prefill_stages]
        return pd.DataFrame(rows)

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("stages", "metrics", "memory", "prefill_stages"):
            for r, src in zip(d[key], getattr(self, key)):
                r["error_pct"] = src.error_pct
        d.update(iteration_error_pct=self.iteration_error_pct, passed=self.passed, verdict=self.verdict)
        return d
