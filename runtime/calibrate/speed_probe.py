"""How fast this machine runs the engine's kind of work right now, against when it was calibrated.

    t = probe_iteration_s(engine_cfgs)                  # seconds per iteration of a fixed small workload
    drift = speed_drift(t_before, t_after, spec_raw)    # {"ratio": ..., ...} or None
    probe = RunProbe(plan.hardware); probe.before(); res = engine.generate(...); probe.after(res.record)

A shared or virtual machine runs the same code at different speeds from one spell to the next
(neighbours, frequency, cache pressure): on the 2-core VM this project is developed on, identical
runs seconds apart differ by 20-50%, far more than the cost model's own error. The calibration's
predictions carry the speed of the spell it was measured in. This probe is a fixed workload of
the engine's own stage code (one configuration of runtime/calibrate/overhead.py: 16 sequences,
k = 2, the tiny random target and a one-layer draft, PROBE_ITERATIONS iterations) timed during
`specmoe calibrate` (measured.details.speed_probe, with the configurations it ran) and again
around a run (`specmoe run` and the demo probe before and after each run when the plan's hardware
spec has a probe). Their ratio says how much slower (> 1) or faster (< 1) the machine ran the
run's kind of work than at calibration; `specmoe report` prints the iteration error both as
predicted and with the prediction scaled by that ratio, so that a miss which is the machine's
drift is told apart from one that is the model's. It is a measurement of the machine, not of the
run, and never changes a plan.
"""
from __future__ import annotations

import statistics

PROBE_CONFIG = (16, 2, 1, 1, 0, "full")   # (B, k, m, draft layers, target-KV sequences on the device, cache)
PROBE_ITERATIONS = 40


def probe_iteration_s(engine_cfgs: dict, iterations: int = PROBE_ITERATIONS, device=None) -> float:
    """Median seconds per iteration of the probe workload (about 0.5 s on 2 cores with the tiny model;
    the median, so that one hiccup of the machine does not decide the probe).
    engine_cfgs: {"target": HF config, "drafts": {layers: HF config}} (runtime.calibrate.spec.engine_configs)."""
    from specmoe.runtime.calibrate.overhead import measure_stage_overheads

    r = measure_stage_overheads(engine_cfgs["target"], {int(k): v for k, v in engine_cfgs["drafts"].items()},
                                rounds=1, per_round=iterations, warmup=2, configs=(PROBE_CONFIG,), device=device)
    return float(r["configs"][0]["median_s"]["iteration"])


def probe_configs(spec_raw: dict) -> dict | None:
    """The engine configurations the calibration's probe ran (None when the spec has no probe)."""
    try:
        cfgs = spec_raw["measured"]["details"]["speed_probe"]["engine_configs"]
    except (KeyError, TypeError):
        return None
    if not isinstance(cfgs, dict) or not isinstance(cfgs.get("target"), dict) or not isinstance(cfgs.get("drafts"), dict):
        return None
    return cfgs


class RunProbe:
    """The probe around engine runs: `before()` once, then `after(record)` after each run sets
    record.speed_probe from the last probe and a new one (which the next run starts from). A spec
    without a probe makes both no-ops."""

    def __init__(self, spec_raw: dict, device=None):
        self.spec_raw, self.device = spec_raw, device
        self.cfgs = probe_configs(spec_raw) if calibration_probe_s(spec_raw) else None
        self.last: float | None = None

    @property
    def enabled(self) -> bool:
        return self.cfgs is not None

    def before(self) -> None:
        if self.cfgs is not None:
            self.last = probe_iteration_s(self.cfgs, device=self.device)

    def after(self, record) -> None:
        if self.cfgs is None or self.last is None:
            return
        now = probe_iteration_s(self.cfgs, device=self.device)
        record.speed_probe = speed_drift(self.last, now, self.spec_raw)
        self.last = now


def calibration_probe_s(spec_raw: dict) -> float | None:
    """The probe's seconds per iteration recorded by `specmoe calibrate` in a spec (None if absent)."""
    try:
        v = spec_raw["measured"]["details"]["speed_probe"]["iteration_s"]
    except (KeyError, TypeError):
        return None
    return float(v) if isinstance(v, (int, float)) and v > 0 else None


def speed_drift(before_s: float, after_s: float, spec_raw: dict) -> dict | None:
    """{"calibration_iteration_s", "before_s", "after_s", "ratio"}: ratio = mean(before, after) over the
    calibration's probe (> 1: the machine ran slower than when calibrated); None without a probe in
    the spec."""
    cal = calibration_probe_s(spec_raw)
    if cal is None or before_s <= 0 or after_s <= 0:
        return None
    out = {"calibration_iteration_s": cal, "before_s": float(before_s), "after_s": float(after_s),
           "ratio": statistics.fmean((before_s, after_s)) / cal, "config": list(PROBE_CONFIG)}
    noise = calibration_probe_spread(spec_raw)
    if noise is not None:
        out["calibration_spread"] = noise
    return out


STALE_MARGIN = 1.15   # a calibration whose probe ran this much slower than the machine runs it now is re-measured


def calibration_slowness(spec_raw: dict, samples: int = 2, device=None) -> float | None:
    """How much slower the calibration's probe ran than the machine runs it now (fastest of `samples`
    probes): above STALE_MARGIN the calibration was taken in a busy or slow spell and its rates are low.
    None when the spec has no probe."""
    cfgs, cal = probe_configs(spec_raw), calibration_probe_s(spec_raw)
    if cfgs is None or cal is None:
        return None
    now = min(probe_iteration_s(cfgs, device=device) for _ in range(max(1, samples)))
    return cal / now


def calibration_probe_spread(spec_raw: dict) -> float | None:
    """(max - min) / median of the calibration's probe samples: how much the probe itself moved while
    the machine was being calibrated (a drift smaller than that is within the probe's noise)."""
    try:
        xs = [float(x) for x in spec_raw["measured"]["details"]["speed_probe"]["samples_s"]]
    except (KeyError, TypeError, ValueError):
        return None
    if len(xs) < 2 or min(xs) <= 0:
        return None
    return (max(xs) - min(xs)) / statistics.median(xs)
