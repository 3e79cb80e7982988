"""runtime/calibrate/speed_probe.py and the report's machine-speed line: the probe times the engine's own stage
code; the drift ratio and the scaled iteration error are checked against hand-computed values."""
from __future__ import annotations

import pytest

from specmoe.planner import Workload, load_acceptance
from specmoe.planner.report import compare, render_table
from specmoe.planner.what_if import fixed_plan
from specmoe.runtime.calibrate.speed_probe import PROBE_CONFIG, calibration_probe_s, speed_drift

SPEC = {"measured": {"details": {"speed_probe": {"iteration_s": 0.02}}}}


def test_drift_ratio_is_the_mean_probe_over_the_calibrations():
    d = speed_drift(0.025, 0.023, SPEC)
    assert d["ratio"] == pytest.approx(0.024 / 0.02) and d["calibration_iteration_s"] == 0.02
    assert d["config"] == list(PROBE_CONFIG)
    assert speed_drift(0.02, 0.02, {"measured": {}}) is None
    assert speed_drift(0.0, 0.02, SPEC) is None
    assert calibration_probe_s({"measured": {"details": {"speed_probe": {"iteration_s": "x"}}}}) is None
    assert calibration_probe_s({}) is None


def test_report_scales_the_prediction_by_the_probe():
    plan = fixed_plan("mixtral-8x7b", "a30-xeon6426y", Workload(566, 1024, acceptance=load_acceptance(0.8)),
                      draft_len=2, batch=64, micro_batches=2)
    p = plan.predicted
    measured = p.iteration_time_s * 1.3                # the machine ran 25% slower, the model a little off
    run = {"complete": True, "stages": {**p.stages, "iteration": measured}, "iterations": 20,
           "decode_tokens_per_s": 40.0, "acceptance_histogram": {"0": 256, "1": 384, "2": 640}, "mean_accepted": 1.3,
           "backends": {}, "machine": {}, "git_commit": "abc", "plan_hashes": dict(plan.input_hashes),
           "draft_len": 2, "batch": 64, "micro_batches": 2, "h2d_bytes": 0, "decode_tokens": 2400,
           "speed_probe": {"calibration_iteration_s": 0.02, "before_s": 0.025, "after_s": 0.025, "ratio": 1.25}}
    cmp = compare(plan, run)
    it = cmp.row("iteration")
    assert cmp.iteration_error_pct == pytest.approx((p.iteration_time_s - measured) / measured * 100)
    assert cmp.drift["ratio"] == 1.25
    assert cmp.drift["scaled_error_pct"] == pytest.approx((it.predicted * 1.25 - measured) / measured * 100)
    assert cmp.drift["scaled_error_pct"] == pytest.approx((1.25 / 1.3 - 1) * 100)
    table = render_table(cmp)
    assert "machine speed: the speed probe took 1.25x its calibration time" in table
    assert f"{cmp.drift['scaled_error_pct']:+.1f}%" in table
    assert any(n.startswith("Machine speed:") for n in cmp.notes)
    run.pop("speed_probe")
    assert compare(plan, run).drift == {} and "machine speed" not in render_table(compare(plan, run))


def test_probe_times_the_engine_stage_code():
    pytest.importorskip("torch")
    from specmoe.runtime.calibrate.spec import engine_configs, resolve_model_config
    from specmoe.runtime.calibrate.speed_probe import probe_iteration_s

    t = probe_iteration_s(engine_configs(resolve_model_config(None)), iterations=4)
    assert 1e-5 < t < 1.0


def test_probe_frees_its_engine_when_it_returns():
    """The probe runs around every demo run: the experts of its random engine (a host mapping) must go
    when it returns, not when the cyclic gc next runs (the demo held four of them, 48 MiB, at a run's start)."""
    pytest.importorskip("torch")
    import gc

    from specmoe.runtime.calibrate.spec import engine_configs, resolve_model_config
    from specmoe.runtime.calibrate.speed_probe import probe_iteration_s
    from specmoe.runtime.model.expert_store import ExpertStore

    gc.collect()
    before = {id(o) for o in gc.get_objects() if isinstance(o, ExpertStore)}   # other tests' engines
    gc.disable()
    try:
        probe_iteration_s(engine_configs(resolve_model_config(None)), iterations=2)
        alive = [o for o in gc.get_objects() if isinstance(o, ExpertStore) and id(o) not in before]
    finally:
        gc.enable()
    assert alive == []


def test_round_speeds_take_the_machines_spells_out():
    """Three configurations over four rounds; round 2 ran 1.5x slower for all of them, round 3 0.8x:
    the per-round speeds recover that, and dividing by them leaves each configuration's own time."""
    import statistics

    from specmoe.runtime.calibrate.overhead import round_speeds

    base, spell, per = [0.010, 0.020, 0.035], [1.0, 1.0, 1.5, 0.8], 3
    samples = [[b * f for f in spell for _ in range(per)] for b in base]
    samples[1][0] *= 1.3                                  # one odd iteration in one configuration
    sp = round_speeds(samples, len(spell), per)
    ref = statistics.median(spell)
    assert sp == pytest.approx([f / ref for f in spell], rel=1e-9)
    for b, v in zip(base[::2], samples[::2]):
        rounds = [statistics.fmean(v[r * per:(r + 1) * per]) for r in range(len(spell))]
        assert statistics.fmean(m / s for m, s in zip(rounds, sp)) == pytest.approx(b * ref, rel=1e-9)


def test_a_drift_inside_the_probes_own_noise_is_called_so():
    from specmoe.runtime.calibrate.speed_probe import calibration_probe_spread

    spec = {"measured": {"details": {"speed_probe": {"iteration_s": 0.02, "samples_s": [0.018, 0.02, 0.021, 0.024]}}}}
    assert calibration_probe_spread(spec) == pytest.approx(0.006 / 0.0205)
    d = speed_drift(0.021, 0.021, spec)
    assert d["calibration_spread"] == pytest.approx(0.006 / 0.0205)
    plan = fixed_plan("mixtral-8x7b", "a30-xeon6426y", Workload(566, 1024, acceptance=load_acceptance(0.8)),
                      draft_len=2, batch=64, micro_batches=2)
    p = plan.predicted
    run = {"complete": True, "stages": {**p.stages, "iteration": p.iteration_time_s * 1.2}, "iterations": 20,
           "decode_tokens_per_s": 40.0, "acceptance_histogram": {"0": 256, "1": 384, "2": 640}, "mean_accepted": 1.3,
           "backends": {}, "machine": {}, "git_commit": "abc", "plan_hashes": dict(plan.input_hashes),
           "draft_len": 2, "batch": 64, "micro_batches": 2, "h2d_bytes": 0, "decode_tokens": 2400, "speed_probe": d}
    cmp = compare(plan, run)
    note = next(n for n in cmp.notes if n.startswith("Machine speed:"))
    assert "within the probe's own noise" in note and "spread 29%" in render_table(cmp)
    run["speed_probe"] = speed_drift(0.03, 0.03, spec)            # 1.5x: well outside the noise
    note = next(n for n in compare(plan, run).notes if n.startswith("Machine speed:"))
    assert "ran 50% slower" in note
