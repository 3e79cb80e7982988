"""The quiet-machine checks of `specmoe calibrate` (runtime/calibrate/quiet.py) and its estimators."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from specmoe.runtime.calibrate.measure import low_quantile, spread
from specmoe.runtime.calibrate.quiet import (OTHERS_MAX, CpuWindow, QuietGuard, TryQuality, cpu_window,
                                             machine_state, others_share, quality_lines, quality_summary)


def test_low_quantile_and_spread_by_hand():
    xs = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0, 9.0, 8.0, 7.0, 6.0, 11.0]     # sorted: 1..11
    assert low_quantile(xs, 0.1) == 2.0        # rank int(0.1 * 10) = 1
    assert low_quantile(xs, 0.0) == 1.0 and low_quantile(xs, 1.0) == 11.0
    assert low_quantile([3.0, 1.0, 2.0]) == 1.0   # fewer than 10 samples: the minimum
    assert spread(xs) == pytest.approx((10.0 - 2.0) / 2.0)
    assert spread([2.0] * 7) == 0.0


def test_others_share_by_hand():
    a = CpuWindow(wall_s=0.0, busy_s=100.0, steal_s=5.0, own_cpu_s=10.0)
    b = CpuWindow(wall_s=2.0, busy_s=103.0, steal_s=5.4, own_cpu_s=11.0)    # 3 s busy, 1 s of it ours
    others, steal = others_share(a, b, cores=2)
    assert others == pytest.approx(2.0 / 4.0) and steal == pytest.approx(0.4 / 4.0)
    assert others_share(a, CpuWindow(2.0, None, None, 11.0), cores=2) == (None, None)


def _fake_sentinel(values):
    it = iter(values)
    return lambda: next(it)


def test_guard_repeats_a_slow_try_and_keeps_the_clean_one():
    # warm-up sets the best (10 ms); try 1 is bracketed by a 14 ms sentinel (1.4x: a slow spell), try 2 is clean
    g = QuietGuard(max_tries=3, wait_s=0.0, sentinel=_fake_sentinel([0.010] * 3 + [0.014, 0.010, 0.0101, 0.0102]))
    g.warm_up()
    res = {"v": 0}
    tries = iter([111, 222])

    def step():
        res["v"] = next(tries)
    q = g.run(step, lambda: dict(res), lambda snap: res.update(snap))
    assert q["tries"] == 2 and q["clean"] and res["v"] == 222 and q["slowdown"] == pytest.approx(1.02)


def test_guard_gives_up_keeping_the_cleanest_try_and_says_why():
    # every try slow: 1.5x, 1.3x, 1.6x -> the second one is kept
    sent = [0.010] * 3 + [0.015, 0.015, 0.013, 0.013, 0.016, 0.016]
    g = QuietGuard(max_tries=3, wait_s=0.0, sentinel=_fake_sentinel(sent))
    g.warm_up()
    res = {"v": 0}
    tries = iter([1, 2, 3])

    def step():
        res["v"] = next(tries)
    q = g.run(step, lambda: dict(res), lambda snap: res.update(snap))
    assert q["tries"] == 3 and not q["clean"] and res["v"] == 2
    assert q["slowdown"] == pytest.approx(1.3) and "1.30x slower" in q["why"]


def test_guard_starts_each_try_from_the_saved_results():
    """A step that accumulates (the probe appends samples) must not accumulate over repeats."""
    g = QuietGuard(max_tries=2, wait_s=0.0, sentinel=_fake_sentinel([0.01] * 3 + [0.02, 0.02, 0.01, 0.01]))
    g.warm_up()
    res = {"samples": [7]}
    q = g.run(lambda: res["samples"].append(len(res["samples"])),
              lambda: {"samples": list(res["samples"])}, lambda snap: res.update({"samples": list(snap["samples"])}))
    assert q["tries"] == 2 and res["samples"] == [7, 1]


def test_guard_sees_another_process_using_the_cpu():
    """A real busy process beside a step that itself uses no CPU: others' share is about one core of all."""
    busy = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time() + 30\nwhile time.time() < t: pass"])
    try:
        time.sleep(0.3)
        g = QuietGuard(max_tries=2, wait_s=0.0, sentinel=lambda: 0.01)
        g.warm_up()
        q = g.run(lambda: time.sleep(1.0), lambda: None, lambda snap: None)
    finally:
        busy.kill()
        busy.wait()
    if q["others_cpu_share"] is None:
        pytest.skip("/proc/stat is not readable here")
    assert q["others_cpu_share"] > OTHERS_MAX and not q["clean"] and q["tries"] == 2
    assert "other processes used" in q["why"]


def test_cpu_window_counts_this_process():
    a = cpu_window()
    t_end = time.perf_counter() + 0.3
    while time.perf_counter() < t_end:
        pass
    b = cpu_window()
    assert b.own_cpu_s - a.own_cpu_s > 0.2
    if a.busy_s is not None:
        assert b.busy_s - a.busy_s >= 0.2


def test_try_quality_thresholds():
    assert TryQuality(1.10, 0.05, 0.0, 1.0).clean
    assert not TryQuality(1.20, 0.05, 0.0, 1.0).clean
    assert not TryQuality(1.00, 0.40, 0.0, 1.0).clean
    assert not TryQuality(1.00, 0.0, 0.20, 1.0).clean
    assert "steal" in TryQuality(1.00, 0.0, 0.20, 1.0).why()


def test_machine_state_records_what_the_rates_hold_for():
    import torch

    st = machine_state()
    assert st["threads"] == torch.get_num_threads() and st["torch"] == str(torch.__version__)
    assert st["kernel"] and st["python"].count(".") == 2
    assert set(st) >= {"omp_wait_policy", "load_avg_1min", "cpu_MHz", "governor"}


def test_quality_lines_say_plainly_what_was_not_clean():
    steps = {"CPU GEMM fp32": {"tries": 1, "clean": True}, "DRAM read": {"tries": 3, "clean": False,
                                                                        "why": "other processes used 48% of the CPUs"}}
    q = {**quality_summary(steps), "steps": steps}
    assert not q["clean"] and q["unclean_steps"] == {"DRAM read": "other processes used 48% of the CPUs"}
    lines = quality_lines(q, cache_hit=False)
    assert lines[0].startswith("warning: could not get a clean measurement of 1 of 2 steps")
    assert "DRAM read: other processes used 48% of the CPUs (kept the cleanest of 3 tries)" in lines[1]
    assert "not cached" in lines[-1]
    ok = {**quality_summary({"a": {"tries": 2, "clean": True}}), "steps": {"a": {"tries": 2, "clean": True}}}
    assert quality_lines(ok, cache_hit=True) == ["quiet machine: all 1 steps measured clean; repeated after a busy "
                                                 "or slow spell: a (2 tries)"]


def test_the_report_repeats_that_a_calibration_was_not_clean():
    from specmoe.planner.report.compare import calibration_quality_warnings

    q = {"clean": False, "unclean_steps": {"CPU GEMM fp32": "the machine ran 1.40x slower than its best (a slow spell)"}}
    hw = {"name": "box", "measured": {"details": {"calibration_quality": q}}}
    (w,) = calibration_quality_warnings(hw)
    assert "box was not measured on a quiet machine" in w and "CPU GEMM fp32: the machine ran 1.40x slower" in w
    assert calibration_quality_warnings({"name": "box", "measured": {"details": {
        "calibration_quality": {"clean": True, "unclean_steps": {}}}}}) == []
    assert calibration_quality_warnings({"name": "datasheet"}) == []
