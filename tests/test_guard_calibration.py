"""Calibration's formulas against counts worked by hand or counted by torch (issue 15).

The timing is taken out of each measurement (runtime/calibrate/measure.py): its timer is replaced by
one that returns a chosen number of seconds, so each rate it reports is (work it claims) / (those
seconds), and the work is checked: the GEMM's FLOPs against torch's own FlopCounterMode running the
very call the measurement times, the bytes of copies, KV reads and DRAM sums against hand values.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from specmoe.runtime.calibrate import measure

MiB = 2 ** 20


def test_cpu_gemm_flops_are_the_flops_torch_counts(monkeypatch):
    """Each timed call is run once under FlopCounterMode and "takes" its counted FLOPs at 1 TFLOP/s: the
    measurement must then report 1000 GFLOP/s at every M; the counts are 2 M h F (hand: M=3, h=96,
    F=80: 46080)."""
    counted = {}

    def fake_best(fns, reps, min_time_s, spread_out=None):
        out = {}
        for key, fn in fns.items():
            with FlopCounterMode(display=False) as fc:
                fn()
            counted[key] = fc.get_total_flops()
            out[key] = counted[key] / 1e12
        return out

    monkeypatch.setattr(measure, "_cpu_best_s", fake_best)
    got = measure.measure_cpu_gemm_GFLOPs_by_M(96, 80, (1, 3, 17), "fp32", reps=1, min_time_s=0.0)
    assert counted == {1: 2 * 96 * 80, 3: 46080, 17: 2 * 17 * 96 * 80}
    assert got == pytest.approx({1: 1000.0, 3: 1000.0, 17: 1000.0}, rel=1e-12)


def _fixed(seconds: float):
    def fake_best(fns, reps, min_time_s, spread_out=None):
        for fn in fns.values():
            fn()                          # the call itself still runs once (shapes, bounds)
        return {key: seconds for key in fns}
    return fake_best


def test_host_copy_counts_the_chunk_bytes(monkeypatch):
    """A chunk of c MiB copied in 1 ms: c x 1,048,576 bytes / 1e-3 s = 1.048576 c GB/s."""
    monkeypatch.setattr(measure, "_cpu_best_s", _fixed(1e-3))
    pool = measure.make_pool(8 * MiB)
    got = measure.measure_host_copy_GBps_by_chunk_MB(pool, (1, 4), reps=1, min_time_s=0.0)
    assert got == pytest.approx({1: 1.048576, 4: 4.194304}, rel=1e-12)


def test_cpu_attention_counts_k_and_v_of_every_position(monkeypatch):
    """Hkv = 2 heads of D = 8, context 16, N in (1, 2): rows of S = 16 + 2 = 18 positions; one sequence's K
    (or V) is 2*18*8 = 288 fp32 elements, 1152 bytes, so a call of 6912 bytes holds B = 3 sequences. A
    call reads K and V of B sequences over context + N positions in 1 ms:
      N = 1: 3 * 2 * 2 * 17 * 8 * 4 = 6528 bytes -> 0.006528 GB/s;  N = 2: 3 * 2 * 2 * 18 * 8 * 4 = 6912 -> 0.006912."""
    monkeypatch.setattr(measure, "_cpu_best_s", _fixed(1e-3))
    seen = []
    import specmoe.runtime.kernels.verify_attention as va

    real = va.verify_attention

    def spy(q, k, v, slots, ctx_lens, out=None):
        seen.append((tuple(q.shape), tuple(k.shape), ctx_lens.tolist()))
        return real(q, k, v, slots, ctx_lens, out=out)

    monkeypatch.setattr(va, "verify_attention", spy)
    pool = measure.make_pool(MiB)
    got = measure.measure_cpu_attention_kv_GBps(4, 2, 8, pool=pool, ns=(1, 2), contexts=(16,), call_bytes=6912,
                                                reps=1, min_time_s=0.0)
    assert got == {1: {16: pytest.approx(0.006528, rel=1e-12)}, 2: {16: pytest.approx(0.006912, rel=1e-12)}}
    assert {s[1] for s in seen} == {(3, 2, 18, 8)} and all(s[2] == [16, 16, 16] for s in seen)
    assert {s[0] for s in seen} == {(3, 1, 4, 8), (3, 2, 4, 8)}


class _Clock:
    """perf_counter advancing 0.25 s per reading: every timed interval is 0.25 s."""

    def __init__(self):
        self.t = 0.0

    def perf_counter(self):
        self.t += 0.25
        return self.t


def test_dram_read_counts_the_pool_bytes(monkeypatch):
    """A 1 MiB pool summed in 0.25 s: 1,048,576 / 0.25 = 4.194304 MB/s = 0.004194304 GB/s."""
    pool = measure.make_pool(MiB)
    assert pool.numel() * pool.element_size() == MiB
    monkeypatch.setattr(measure, "time", _Clock())
    assert measure.measure_dram_read_GBps(pool, reps=3) == pytest.approx(0.004194304, rel=1e-12)


def test_the_fake_timer_keeps_the_real_calls(monkeypatch):
    """The GEMM the fake timer runs is the measurement's own x[M, h] @ W[h, F] (the output's shape)."""
    shapes = []
    real = torch.matmul

    def spy(a, b, out=None):
        shapes.append((tuple(a.shape), tuple(b.shape)))
        return real(a, b, out=out)

    monkeypatch.setattr(torch, "matmul", spy)
    monkeypatch.setattr(measure, "_cpu_best_s", _fixed(1.0))
    got = measure.measure_cpu_gemm_GFLOPs_by_M(16, 24, (2, 5), "fp32", reps=1, min_time_s=0.0)
    assert shapes == [((2, 16), (16, 24)), ((5, 16), (16, 24))]
    assert got == pytest.approx({2: 2 * 2 * 16 * 24 / 1e9, 5: 2 * 5 * 16 * 24 / 1e9}, rel=1e-12)
