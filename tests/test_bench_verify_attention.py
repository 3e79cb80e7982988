"""bench/verify_attention.py's measurement logic: the roofline and the interleaved rounds whose every timed
call starts after the DRAM probe (so each method reads its KV from DRAM, whichever ran before it)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import verify_attention as bench  # noqa: E402


def test_roofline_is_the_slower_of_memory_and_arithmetic():
    # 1 GB at 10 GB/s = 0.1 s; 50 GFLOP at 1000 GFLOP/s = 0.05 s -> memory-bound at 10 GB/s
    assert bench.roofline(10**9, 50 * 10**9, 10.0, 1000.0) == pytest.approx((10.0, "mem"))
    # 200 GFLOP -> 0.2 s -> 1 GB / 0.2 s = 5 GB/s, arithmetic-bound
    assert bench.roofline(10**9, 200 * 10**9, 10.0, 1000.0) == pytest.approx((5.0, "flop"))


class _FakeProbes:
    def __init__(self, log):
        self.log = log

    def dram(self):
        self.log.append("dram")

    def gemm(self):
        self.log.append("gemm")


def test_every_timed_call_follows_a_dram_probe_and_each_round_times_the_gemm():
    log = []
    fns = {"a": lambda: log.append("a"), "b": lambda: log.append("b")}
    t = bench.timed_interleaved(fns, repeats=3, min_time_s=0.0, probes=_FakeProbes(log))
    assert set(t) == {"a", "b", "probe-gemm", "probe-dram"}
    timed = log[3:]                                    # after one warm-up call of each
    assert timed == ["dram", "a", "dram", "b", "dram", "gemm"] * 3
    assert bench.timed_interleaved(fns, repeats=2, min_time_s=0.0).keys() == {"a", "b"}


def test_a_primed_call_follows_its_previous_layer_after_the_dram_probe():
    """The previous layer's call runs after the DRAM read and before the timed call it primes, untimed;
    a name without a prime (the "cold" one) follows the read directly."""
    log = []
    fns = {"a": lambda: log.append("a"), "a-cold": lambda: log.append("a")}
    t = bench.timed_interleaved(fns, repeats=2, min_time_s=0.0, probes=_FakeProbes(log),
                                primes={"a": lambda: log.append("prev")})
    assert log[3:] == ["dram", "prev", "a", "dram", "a", "dram", "gemm"] * 2
    assert set(t) == {"a", "a-cold", "probe-gemm", "probe-dram"}
    primes = bench.previous_layer(2, bench.torch.bfloat16, {"x": "fp32", "s": "sdpa"})
    assert set(primes) == {"x", "s"}
    assert primes["s"]().shape == (bench.B, bench.HQ, 2, bench.D)    # SDPA over PRIME_CTX + 2 keys
    assert primes["x"]().shape == (bench.B, 2, bench.HQ, bench.D)    # the kernel's fp32 path


def test_probe_rates_come_from_the_probe_sizes():
    t = {"probe-dram": 0.1, "probe-gemm": 0.02}
    dram, gemm = bench.Probes.rates(t)
    assert dram == pytest.approx(bench.PROBE_DRAM_BYTES / 0.1 / 1e9)
    assert gemm == pytest.approx(2 * bench.PROBE_GEMM_N**3 / 0.02 / 1e9)


def test_a_case_in_a_slow_spell_is_measured_again_and_the_clean_try_kept(monkeypatch):
    """The sentinel (timed before and after each try) says the first try ran 1.5x slow: the case is
    measured again and the second, clean, try's result is kept."""
    import time

    from specmoe.runtime.calibrate import quiet
    from specmoe.runtime.calibrate.quiet import QuietGuard
    # no other process in this test's view (a clock tick inside a microsecond try would read as one)
    monkeypatch.setattr(quiet, "cpu_window", lambda: quiet.CpuWindow(time.perf_counter(), 0.0, 0.0, 0.0))
    sentinels = iter([1.0, 1.5, 1.0, 1.0, 1.0])          # warm-up, try 1 before / after, try 2 before / after
    guard = QuietGuard(max_tries=3, wait_s=0.0, sentinel=lambda: next(sentinels))
    guard.warm_up(1)
    tries = iter(["slow try", "clean try"])
    result, q = bench.quiet_timing(guard, lambda: next(tries))
    assert result == "clean try" and q["tries"] == 2 and q["clean"]
    assert bench.spell_cell(q) == "1.00" and bench.spell_cell({"slowdown": 1.31, "clean": False}) == "1.31*"
    assert bench.spell_line([q, {"tries": 3, "clean": False, "slowdown": 1.31}]).startswith(
        "(slow spells: 2 of 2 cases measured again, 1 kept from a try that was not clean (*); sentinel up to 1.31x")
