"""`specmoe calibrate`'s measurement of host DRAM shared by the expert stream and verify attention
(runtime/calibrate/contention.py) and its place in the written spec (runtime/calibrate/spec.py).

The GPU part cannot run without a GPU; the bookkeeping runs here on a fake clock, with a fake CPU
reader and a fake copy stream whose rates are known, so the four rates it must report are exact.
"""
from __future__ import annotations

import pytest
import yaml

from specmoe.planner.hardware_spec import parse_hardware
from specmoe.runtime.calibrate import contention
from specmoe.runtime.calibrate import run as cal

GB = 1e9


class _Clock:
    """time.perf_counter and time.sleep on a fake clock that only the fakes below advance."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


class _Copies:
    """2e8 bytes in 0.1 s alone (2 GB/s) and 0.125 s while the CPU reads (1.6 GB/s)."""

    nbytes = 200_000_000

    def __init__(self, clock: _Clock):
        self.clock, self.t0, self.reading, self.read_during = clock, None, False, False

    def start(self) -> None:
        self.t0, self.read_during = self.clock.now, False

    def _dur(self) -> float:
        return 0.125 if self.read_during else 0.1

    def active(self) -> bool:
        return self.t0 is not None and self.clock.now < self.t0 + self._dur()

    def done(self) -> bool:
        return not self.active()

    def elapsed_s(self) -> float:
        return self._dur()


def test_rates_bookkeeping_on_a_fake_clock(monkeypatch):
    """The CPU reads 1e6 bytes per call in 1 ms alone (1 GB/s) and in 1.25 ms beside the copies
    (0.8 GB/s); the copies move 2 GB/s alone and 1.6 GB/s beside the CPU."""
    clock = _Clock()
    monkeypatch.setattr(contention, "time", clock)
    copies = _Copies(clock)

    def read() -> int:
        if copies.active():
            copies.read_during = True
            clock.now += 1.25e-3
        else:
            clock.now += 1e-3
        return 1_000_000

    got = contention.contention_rates(read, copies, window_s=0.05, reps=2)
    assert got == pytest.approx({"cpu_read_GBps_alone": 1.0, "cpu_read_GBps_during_h2d": 0.8,
                                 "h2d_GBps_alone": 2.0, "h2d_GBps_during_cpu_read": 1.6}, rel=1e-9)


def _cache_with(rates: dict | None) -> dict:
    """A calibration's cached results of a GPU host (the numbers of tests/test_calibrate.py), plus the
    contention rates."""
    r = {"dram_read_GBps": 60.0, "host_copy_GBps_by_chunk_MB": {1: 10.0, 64: 20.0},
         "cpu_gemm_GFLOPs_by_M": {"fp32": {1: 50.0, 64: 900.0}, "bf16": {1: 30.0, 64: 3000.0}},
         "cpu_attention_kv_GBps": {1: {512: 30.0, 8192: 40.0}, 16: {512: 5.0, 8192: 6.0}}, "pool_MiB": 1024,
         "gpu_facts": {"name": "NVIDIA H200", "mem_GiB": 139.8, "free_GiB": 139.0},
         "h2d_GBps_by_chunk_MB": {1: 36.0, 256: 55.4}, "d2h_GBps_by_chunk_MB": {1: 38.0, 256: 55.2},
         "gpu_gemm_TFLOPs_by_M": {1: 2.3, 4096: 753.0}, "gpu_fp32_gemm_TFLOPs": 50.0, "hbm_copy_GBps": 4173.0}
    if rates is not None:
        r["dram_contention"] = rates
    facts = {"cpu_name": "Test CPU", "cores": 16, "mem_total_bytes": 128 * cal.GiB, "gpu_name": "NVIDIA H200",
             "torch": "x", "threads": 16, "attention_backend": "cpp-openmp"}
    return {"fingerprint": {}, "fingerprint_id": "f", "measured_at": "2026-01-01", "mode": "full", "model": "m",
            "facts": facts, "shapes": {"h": 4096, "F": 14336, "F_cpu": 3584, "n_q": 32, "n_kv": 8, "d": 128},
            "results": r}


def _spec(cache: dict):
    raw = cal.build_spec_raw(cache, cal.resolve_base("h200-host"), "h200-host", "gpu-box")
    return parse_hardware(yaml.safe_load(cal.dump_spec_yaml(raw)), "gpu-box.yaml")


def test_the_spec_carries_the_measured_contention():
    rates = {"cpu_read_GBps_alone": 59.0, "cpu_read_GBps_during_h2d": 45.0, "h2d_GBps_alone": 55.0,
             "h2d_GBps_during_cpu_read": 52.0}
    c = _spec(_cache_with(rates)).measured.dram_contention
    assert (c.cpu_share, c.h2d_share) == pytest.approx((45.0 / 59.0, 52.0 / 55.0))
    # a cache from before the contention step: no field, the planner models no contention
    assert _spec(_cache_with(None)).measured.dram_contention is None


def test_a_contention_slower_than_taking_turns_is_kept_out_of_the_model():
    rates = {"cpu_read_GBps_alone": 60.0, "cpu_read_GBps_during_h2d": 20.0, "h2d_GBps_alone": 50.0,
             "h2d_GBps_during_cpu_read": 25.0}                  # 1/3 + 1/2 < 1
    spec = _spec(_cache_with(rates))
    assert spec.measured.dram_contention is None
    assert spec.raw["measured"]["details"]["dram_contention_unused"]["cpu_read_GBps_during_h2d"] == 20.0


@pytest.mark.gpu
def test_cuda_contention_is_plausible():
    pool = cal.make_pool(512 * cal.MiB)
    got = contention.measure_dram_contention(32, 8, 128, pool=pool, kv_dtype="bf16", call_bytes=8 * cal.MiB, reps=2)
    assert all(0.5 < v < 2000 for v in got.values())
    # beside the other side neither reads faster than alone, by more than noise
    assert got["cpu_read_GBps_during_h2d"] < 1.15 * got["cpu_read_GBps_alone"]
    assert got["h2d_GBps_during_cpu_read"] < 1.15 * got["h2d_GBps_alone"]
