"""Calibration's CPU measurements (DRAM read, host copy, GEMM, verify attention) with their timer replaced: the
work each claims (bytes, FLOPs, which chunk or layer each call reads) against hand counts and torch's own
FLOP counter. The clock-level checks of the timers are in test_guard_mutants_measure.py (issue 15, part 3).
"""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from specmoe.runtime.calibrate import measure

MiB = 2 ** 20
GiB = 2 ** 30
REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


# CPU measurements
class _TickClock:
    """perf_counter whose successive intervals are given: reading 2i is t, reading 2i + 1 is t + dts[i]."""

    def __init__(self, dts):
        self.dts = list(dts)
        self.t = 0.0
        self.n = 0

    def perf_counter(self):
        if self.n % 2:
            self.t += self.dts[self.n // 2]
        self.n += 1
        return self.t


def test_dram_read_keeps_the_fastest_sum(monkeypatch):
    """Sums of a 1 MiB pool timed 0.5, 0.25, 2 s: the fastest, 1,048,576 / 0.25 = 0.004194304 GB/s; one
    untimed warm-up sum first (torch.sum counted), then `reps` timed ones."""
    pool = measure.make_pool(MiB)
    clock = _TickClock([0.5, 0.25, 2.0, 0.125])
    monkeypatch.setattr(measure, "time", clock)
    sums = []
    real_sum = torch.sum
    monkeypatch.setattr(torch, "sum", lambda x, *a, **k: sums.append(x.numel()) or real_sum(x, *a, **k))
    assert measure.measure_dram_read_GBps(pool, reps=3) == pytest.approx(MiB / 0.25 / 1e9, rel=1e-12)
    assert clock.n == 6 and sums == [MiB // 4] * 3
    clock = _TickClock([0.5, 0.25])
    monkeypatch.setattr(measure, "time", clock)
    assert measure.measure_dram_read_GBps(pool, reps=0) == pytest.approx(MiB / 0.5 / 1e9, rel=1e-12)
    assert clock.n == 2


def test_dram_read_makes_its_pool(monkeypatch):
    made = []

    def fake_pool(n):
        made.append(n)
        return torch.zeros(n // 4)
    monkeypatch.setattr(measure, "make_pool", fake_pool)
    monkeypatch.setattr(measure, "pool_bytes", lambda st: 2 * MiB if st is measure.FULL else 0)
    monkeypatch.setattr(measure, "time", _TickClock([0.5] * 10))
    assert measure.measure_dram_read_GBps(n_bytes=4 * MiB) == pytest.approx(4 * MiB / 0.5 / 1e9)
    assert measure.measure_dram_read_GBps() == pytest.approx(2 * MiB / 0.5 / 1e9)
    assert made == [4 * MiB, 2 * MiB]


def _recording_best(seconds, calls_each=1, record=None):
    """A _cpu_best_s stand-in: runs each fn calls_each times, returns `seconds` (a number or key -> number)
    and records its arguments."""
    def fake(fns, reps, min_time_s, spread_out=None):
        if record is not None:
            record.append((list(fns), reps, min_time_s, spread_out is not None))
        for fn in fns.values():
            for _ in range(calls_each):
                fn()
        if spread_out is not None:
            spread_out.update({k: 0.25 for k in fns})
        return {k: (seconds[k] if isinstance(seconds, dict) else seconds) for k in fns}
    return fake


def test_host_copy_walks_the_pool_chunk_by_chunk(monkeypatch):
    """A 5 MiB pool of distinct values; 2 MiB chunks: offsets 0, 2 MiB (a third would pass the end), so
    successive copies read chunk 0, 1, 0, 1, ... into the start of one destination."""
    n = 5 * MiB // 4
    pool = torch.arange(n, dtype=torch.float32)
    copies = []
    real_copy = torch.Tensor.copy_

    def spy(dst, src, *a, **k):
        copies.append((dst.data_ptr(), src[0].item(), src.numel()))
        return real_copy(dst, src, *a, **k)
    monkeypatch.setattr(torch.Tensor, "copy_", spy)
    rec = []
    monkeypatch.setattr(measure, "_cpu_best_s", _recording_best({1: 1e-3, 2: 2e-3}, 5, rec))
    sp = {}
    got = measure.measure_host_copy_GBps_by_chunk_MB(pool, (2, 1, 8), reps=7, min_time_s=0.125, spread_out=sp)
    assert got == pytest.approx({2: 2 * MiB / 2e-3 / 1e9, 1: MiB / 1e-3 / 1e9}, rel=1e-12)
    assert list(got) == [2, 1]
    assert rec == [([2, 1], 7, 0.125, True)] and sp == {2: 0.25, 1: 0.25}
    e2, e1 = 2 * MiB // 4, MiB // 4
    assert [c[1:] for c in copies[:5]] == [(0.0, e2), (float(e2), e2), (0.0, e2), (float(e2), e2), (0.0, e2)]
    assert [c[1] for c in copies[5:]] == [0.0, e1, 2 * e1, 3 * e1, 4 * e1]        # 5 offsets of 1 MiB
    assert all(c[2] == e1 for c in copies[5:])
    assert len({c[0] for c in copies}) == 1                                     # one destination


def test_host_copy_wraps_after_the_last_whole_chunk(monkeypatch):
    """A 4 MiB pool in 2 MiB chunks: offsets 0 and 2 MiB (the last chunk ends at the pool's end exactly)."""
    pool = torch.arange(MiB, dtype=torch.float32)
    dsts = []
    monkeypatch.setattr(measure, "_cpu_best_s", _recording_best(1.0, 3))
    real_copy = torch.Tensor.copy_

    def spy(dst, src, *a, **k):
        dsts.append((src[0].item(), dst.numel()))
        out = real_copy(dst, src, *a, **k)
        assert torch.equal(dst, src)
        return out
    monkeypatch.setattr(torch.Tensor, "copy_", spy)
    got = measure.measure_host_copy_GBps_by_chunk_MB(pool, (2, 4), reps=1, min_time_s=0.0)
    assert dsts[:3] == [(0.0, MiB // 2), (float(MiB // 2), MiB // 2), (0.0, MiB // 2)]
    assert dsts[3:] == [(0.0, MiB)] * 3
    assert got == pytest.approx({2: 2 * MiB / 1e9, 4: 4 * MiB / 1e9})
    dsts.clear()        # one element short of two chunks: only the first chunk is whole
    measure.measure_host_copy_GBps_by_chunk_MB(pool[:MiB - 1], (2,), reps=1, min_time_s=0.0)
    assert dsts == [(0.0, MiB // 2)] * 3


def test_host_copy_refuses_chunks_beyond_the_pool(monkeypatch):
    monkeypatch.setattr(measure, "_cpu_best_s", _recording_best(1.0))
    with pytest.raises(ValueError, match=r"^measure_host_copy_GBps_by_chunk_MB: every chunk exceeds the 1 MiB pool$"):
        measure.measure_host_copy_GBps_by_chunk_MB(torch.zeros(MiB // 4 + 1), (2, 4), reps=1, min_time_s=0.0)
    # a pool of n fp32 elements holds 4 n bytes: 7 MiB / 8 elements are 3.5 MiB, so a 4 MiB chunk does not
    # fit (it would at 5 bytes an element: 4.375 MiB), and the message names the pool's whole MiB, 3
    pool = torch.zeros(7 * MiB // 8)
    with pytest.raises(ValueError) as e:
        measure.measure_host_copy_GBps_by_chunk_MB(pool, (4,), reps=1, min_time_s=0.0)
    assert str(e.value) == "measure_host_copy_GBps_by_chunk_MB: every chunk exceeds the 3 MiB pool"
    rec = []
    monkeypatch.setattr(measure, "_cpu_best_s", _recording_best(1.0, 1, rec))
    got = measure.measure_host_copy_GBps_by_chunk_MB(pool, (1, 4, 2), reps=1, min_time_s=0.0)
    assert rec[0][0] == [1, 2] and got == pytest.approx({1: MiB / 1e9, 2: 2 * MiB / 1e9})
    monkeypatch.setattr(measure, "_cpu_best_s", _recording_best(1.0))
    made = []
    monkeypatch.setattr(measure, "make_pool", lambda n: made.append(n) or torch.zeros(MiB // 4))
    monkeypatch.setattr(measure, "pool_bytes", lambda st: 5 * MiB if st is measure.FULL else 0)
    assert measure.measure_host_copy_GBps_by_chunk_MB(chunks_MB=(1, 2), reps=1, min_time_s=0.0) == \
        pytest.approx({1: MiB / 1e9})
    assert made == [5 * MiB]


def test_host_copy_defaults(monkeypatch):
    rec = []
    monkeypatch.setattr(measure, "_cpu_best_s", _recording_best(1.0, 1, rec))
    measure.measure_host_copy_GBps_by_chunk_MB(torch.zeros(MiB))
    assert rec[0][0] == [1, 4] and rec[0][1:] == (3, 0.05, False)


def test_cpu_gemm_flops_and_dtypes(monkeypatch):
    """x[M, h] @ W[h, F] at M = 1 and 4 (h 8, F 6): 2 M h F FLOPs (torch's count), bf16 operands when asked,
    output [M, F]; the rate is FLOPs / seconds / 1e9."""
    seen = []

    def fake(fns, reps, min_time_s, spread_out=None):
        out = {}
        for key, fn in fns.items():
            with FlopCounterMode(display=False) as fc:
                y = fn()
            seen.append((key, fc.get_total_flops(), y.dtype, tuple(y.shape)))
            out[key] = 0.5
        if spread_out is not None:
            spread_out["seen"] = (reps, min_time_s)
        return out
    monkeypatch.setattr(measure, "_cpu_best_s", fake)
    sp = {}
    got = measure.measure_cpu_gemm_GFLOPs_by_M(8, 6, (1, 4), "bf16", reps=2, min_time_s=0.5, spread_out=sp)
    assert seen == [(1, 96, torch.bfloat16, (1, 6)), (4, 384, torch.bfloat16, (4, 6))]
    assert got == pytest.approx({1: 96 / 0.5 / 1e9, 4: 384 / 0.5 / 1e9}, rel=1e-12)
    assert sp == {"seen": (2, 0.5)}
    seen.clear()
    measure.measure_cpu_gemm_GFLOPs_by_M(8, 6, (2,))
    assert seen == [(2, 192, torch.float32, (2, 6))]
    assert sp == {"seen": (2, 0.5)}
    with pytest.raises(KeyError):
        measure.measure_cpu_gemm_GFLOPs_by_M(8, 6, (1,), "fp16")


def test_cpu_gemm_writes_into_one_preallocated_output(monkeypatch):
    """The timed call allocates nothing: each M's callable writes x @ W into one [M, F] output made before the
    timing, the same tensor (same storage) at every call, holding the product."""
    fns = {}

    def capture(f, reps, min_time_s, spread_out=None):
        fns.update(f)
        return {k: 1.0 for k in f}
    monkeypatch.setattr(measure, "_cpu_best_s", capture)
    measure.measure_cpu_gemm_GFLOPs_by_M(8, 6, (1, 3), reps=1, min_time_s=0.0)
    assert sorted(fns) == [1, 3]
    for M, fn in fns.items():
        y1 = fn()
        ptr = y1.data_ptr()
        y2 = fn()
        assert y1 is y2 and y2.data_ptr() == ptr and tuple(y2.shape) == (M, 6)
    assert fns[1]().data_ptr() != fns[3]().data_ptr()


def test_cpu_gemm_defaults(monkeypatch):
    rec = []
    monkeypatch.setattr(measure, "_cpu_best_s", _recording_best(1.0, 1, rec))
    got = measure.measure_cpu_gemm_GFLOPs_by_M(4, 2)
    assert rec == [(list(measure.GEMM_MS), 5, 0.05, False)]
    assert got[256] == pytest.approx(2 * 256 * 4 * 2 / 1e9)


def test_cpu_attention_walks_the_layers_and_counts_kv(monkeypatch):
    """Hq 4, Hkv 2, D 8, bf16 KV (2 bytes), context 16, N in (1, 3): S = 16 + 3 = 19 positions; one sequence's
    K is 2 * 19 * 8 = 304 elements, 608 bytes; call_bytes 2432 = 2 sequences' K and V; the pool of 64 KiB
    (bf16 view: 32768 elements) holds 32768 // (2 * 608) = 26 layers. Each call takes the next layer
    (cyclically, one cursor over both N); a call reads K and V of B sequences over context + N positions
    in the timer's seconds."""
    import specmoe.runtime.kernels.verify_attention as va

    seen = []

    def spy(q, k, v, slots, ctx_lens, out=None):
        seen.append((tuple(q.shape), k.data_ptr(), tuple(k.shape), v.data_ptr() - k.data_ptr(),
                     slots.tolist(), ctx_lens.tolist(), out is not None and out.shape == q.shape, q.dtype))
        assert k.dtype == v.dtype == torch.bfloat16
    monkeypatch.setattr(va, "verify_attention", spy)
    rec = []
    monkeypatch.setattr(measure, "_cpu_best_s", _recording_best({1: 1e-3, 3: 4e-3}, 14, rec))
    pool = measure.make_pool(64 * 1024)
    sp = {"keep": 1}
    got = measure.measure_cpu_attention_kv_GBps(4, 2, 8, pool=pool, ns=(1, 3), contexts=(16,), kv_dtype="bf16",
                                                call_bytes=2432, reps=6, min_time_s=0.25, spread_out=sp)
    b1 = 2 * 2 * 2 * 17 * 8 * 2          # B K+V Hkv (ctx + N) D bytes
    b3 = 2 * 2 * 2 * 19 * 8 * 2
    assert got == {1: {16: pytest.approx(b1 / 1e-3 / 1e9, rel=1e-12)}, 3: {16: pytest.approx(b3 / 4e-3 / 1e9, rel=1e-12)}}
    assert rec[0][:3] == ([1, 3], 6, 0.25) and sp == {"keep": 1, (1, 16): 0.25, (3, 16): 0.25}
    layer_bytes = 2 * 2 * 19 * 8 * 2      # K (or V) of one layer: B Hkv S D bytes
    assert len(seen) == 28
    base = seen[0][1]
    assert [(s[1] - base) // (2 * layer_bytes) for s in seen] == list(range(26)) + [0, 1]
    assert all(s[2] == (2, 2, 19, 8) and s[3] == layer_bytes for s in seen)
    assert [s[0] for s in seen] == [(2, 1, 4, 8)] * 14 + [(2, 3, 4, 8)] * 14
    assert all(s[4] == [0, 1] and s[5] == [16, 16] and s[6] and s[7] == torch.float32 for s in seen)


def test_cpu_attention_over_several_contexts(monkeypatch):
    """Two contexts, each with its own layers (S = context + max N) and B; fp32 KV. The pool of 1 MiB
    (262144 elements); call_bytes 20000: context 8 -> S 10, a sequence's K is 1 * 10 * 4 = 40 elements
    (160 bytes): ceil(20000 / 320) = 63 sequences; context 100 -> S 102, K 408 elements (1632 bytes):
    ceil(20000 / 3264) = 7."""
    import specmoe.runtime.kernels.verify_attention as va

    shapes = []
    monkeypatch.setattr(va, "verify_attention",
                        lambda q, k, v, slots, ctx_lens, out=None: shapes.append((tuple(k.shape), ctx_lens.tolist()[0])))
    monkeypatch.setattr(measure, "_cpu_best_s", _recording_best(0.5))
    got = measure.measure_cpu_attention_kv_GBps(2, 1, 4, pool=measure.make_pool(MiB), ns=(1, 2), contexts=(8, 100),
                                                call_bytes=20000, reps=1, min_time_s=0.0)
    assert shapes == [((63, 1, 10, 4), 8)] * 2 + [((7, 1, 102, 4), 100)] * 2
    assert got[1] == pytest.approx({8: 63 * 2 * 9 * 4 * 4 / 0.5 / 1e9, 100: 7 * 2 * 101 * 4 * 4 / 0.5 / 1e9}, rel=1e-12)
    assert got[2] == pytest.approx({8: 63 * 2 * 10 * 4 * 4 / 0.5 / 1e9, 100: 7 * 2 * 102 * 4 * 4 / 0.5 / 1e9}, rel=1e-12)
    assert sorted(got) == [1, 2]


def test_cpu_attention_defaults_and_refusals(monkeypatch):
    import specmoe.runtime.kernels.verify_attention as va

    monkeypatch.setattr(va, "verify_attention", lambda *a, **k: None)
    rec = []
    monkeypatch.setattr(measure, "_cpu_best_s", _recording_best(1.0, 1, rec))
    made = []
    monkeypatch.setattr(measure, "make_pool", lambda n: made.append(n) or torch.zeros(64 * MiB // 4))
    monkeypatch.setattr(measure, "pool_bytes", lambda st: 7 * MiB if st is measure.FULL else 0)
    got = measure.measure_cpu_attention_kv_GBps(2, 1, 4)
    assert made == [7 * MiB]
    assert [r[0] for r in rec] == [list(measure.ATTN_NS)] * 3 and all(r[1:] == (3, 0.05, True) for r in rec)
    assert sorted(got) == list(measure.ATTN_NS) and all(sorted(v) == [512, 2048, 8192] for v in got.values())
    # 8192 + 16 positions of 1 x 4 fp32: a sequence's K and V 262,656 bytes; 16 MiB a call -> 64 sequences (the cap)
    assert got[16][8192] == pytest.approx(64 * 2 * (8192 + 16) * 4 * 4 / 1e9)
    with pytest.raises(ValueError,
                       match=r"^measure_cpu_attention_kv_GBps: 3 query heads are not a multiple of 2 KV heads$"):
        measure.measure_cpu_attention_kv_GBps(3, 2, 4, pool=torch.zeros(16))


def test_attention_backend_names_a_failure(monkeypatch):
    import specmoe.runtime.kernels.verify_attention as va

    got = []
    monkeypatch.setattr(va, "verify_attention_backend", lambda kv=None: got.append(kv) or f"be-{kv}")
    assert measure.attention_backend("bf16") == "be-bf16" and measure.attention_backend() == "be-None"
    assert got == ["bf16", None]

    def broken(kv=None):
        raise RuntimeError("no compiler")
    monkeypatch.setattr(va, "verify_attention_backend", broken)
    assert measure.attention_backend("fp32") == "unavailable (RuntimeError)"
