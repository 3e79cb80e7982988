"""Calibration's measurements (runtime/calibrate/measure.py) with the clock taken out (issue 15, part 3).

Each measurement reports (work it did) / (seconds its timer kept). Here the timer's clock is a fake one that a
test advances by chosen amounts (time.perf_counter for the CPU timers, CUDA events for the GPU ones), so the
timers' logic (warm-up, rounds, minimum batch time, low quantile, spread, medians, iteration counts) is
checked against hand-worked values; the measurements' work (bytes, FLOPs, shapes, which chunk or layer each
call reads) is checked against hand counts with the timer replaced. The CUDA side runs on the CPU: torch's
CUDA entry points are replaced by CPU stand-ins for the test, so the GPU code paths are exercised here too.
"""
from __future__ import annotations

import pytest
import torch
import yaml

from specmoe.runtime.calibrate import measure

MiB = 2 ** 20
GiB = 2 ** 30
REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# units and grids
def test_units_are_the_docstrings():
    """Chunks in MiB (2^20 bytes), GiB 2^30 bytes, rates in GB/s (1e9 bytes)."""
    assert measure.MiB == 1048576 and measure.GiB == 1073741824 and measure.GB == 1000000000.0


def test_full_grid_is_the_grid_of_the_committed_calibrations():
    """A full calibration measures at the points the committed calibrated specs hold (full mode): the
    chunk sizes of the H2D curve, the GPU and CPU GEMM's M, the verify attention's query tokens and
    contexts; the module docstring's "M = 1..256" for the CPU GEMM."""
    h200 = yaml.safe_load((REPO / "hw_specs/h200-host-calibrated.yaml").read_text())["measured"]
    dev = yaml.safe_load((REPO / "hw_specs/devbox-2core-calibrated.yaml").read_text())["measured"]
    assert "full mode" in h200["source"] and "full mode" in dev["source"]
    assert measure.FULL.mode == "full" and measure.QUICK.mode == "quick"
    assert tuple(h200["h2d_GBps_by_chunk_MB"]) == measure.FULL.chunks_MB == (1, 4, 16, 64, 256, 1024)
    assert tuple(dev["details"]["host_copy_GBps_by_chunk_MB"]) == measure.FULL.chunks_MB
    assert tuple(h200["gpu_gemm_TFLOPs_by_M"]) == measure.FULL.gpu_Ms == tuple(2 ** i for i in range(13))
    assert tuple(dev["cpu_gemm_GFLOPs_by_M"]) == measure.GEMM_MS == (1, 2, 4, 8, 16, 32, 64, 128, 256)
    attn = dev["cpu_attention_kv_GBps"]
    assert tuple(int(q[1:]) for q in attn) == measure.ATTN_NS == (1, 2, 4, 8, 16)
    assert all(tuple(v) == measure.ATTN_CONTEXTS == (512, 2048, 8192) for v in attn.values())


def test_quick_measures_no_harder_than_full():
    """Quick is the lighter mode in every knob: fewer or equal reps, rounds and tries, shorter batches,
    smaller buffers, and a subset of full's points (a prefix of the GPU's M)."""
    q, f = measure.QUICK, measure.FULL
    assert 1 <= q.reps <= f.reps and 0 < q.min_time_s <= f.min_time_s
    assert 64 * MiB <= q.pool_min_bytes <= q.pool_max_bytes <= f.pool_max_bytes
    assert q.pool_min_bytes <= f.pool_min_bytes <= f.pool_max_bytes
    assert 0 < q.cpu_gemm_weight_max_bytes <= f.cpu_gemm_weight_max_bytes
    assert 0 < q.attn_call_bytes <= f.attn_call_bytes
    assert set(q.chunks_MB) <= set(f.chunks_MB) and q.gpu_Ms == f.gpu_Ms[:len(q.gpu_Ms)]
    assert 1 <= q.overhead_rounds <= f.overhead_rounds and 1 <= q.overhead_per_round <= f.overhead_per_round
    assert 1 <= q.max_tries <= f.max_tries and 0 < q.retry_budget_s <= f.retry_budget_s
    for st in (q, f):       # whole MiB, as pool_bytes rounds
        assert st.pool_min_bytes % MiB == 0 and st.pool_max_bytes % MiB == 0
        assert st.cpu_gemm_weight_max_bytes % MiB == 0 and st.attn_call_bytes % MiB == 0


def test_settings_are_frozen():
    """FULL and QUICK are shared module constants: a caller cannot change them for everyone else."""
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        measure.FULL.reps = 1
    assert measure.FULL.reps != 1 and len({measure.FULL, measure.QUICK}) == 2     # hashable values


def test_cpu_timers_floor_fits_the_stated_budgets():
    """Settings' docstring: quick takes ~20 s, full <= 2 min on 2 cores. Every CPU point is timed for at least
    reps x min_time_s (reps batches of at least min_time_s): host copy per chunk, the GEMM per M for fp32 and
    bf16, verify attention per N and context. That floor alone must leave most of the budget."""
    for st, budget_s in ((measure.QUICK, 20.0), (measure.FULL, 120.0)):
        points = len(st.chunks_MB) + 2 * len(measure.GEMM_MS) + len(measure.ATTN_NS) * len(measure.ATTN_CONTEXTS)
        assert points * st.reps * st.min_time_s <= budget_s / 2


# ---------------------------------------------------------------------------------------------
# machine facts
class _FakePath:
    """Path stand-in: read_text from a mapping (OSError when absent), glob over the mapping's keys."""

    files: dict = {}

    def __init__(self, p):
        self.p = str(p)

    def read_text(self):
        if self.p not in self.files:
            raise OSError(self.p)
        return self.files[self.p]

    def glob(self, pattern):
        assert pattern == "index*/size"
        return [type(self)(k) for k in sorted(self.files) if k.startswith(self.p + "/index")]


def _fake_fs(monkeypatch, files, sysconf=None):
    fake = type("P", (_FakePath,), {"files": dict(files)})
    monkeypatch.setattr(measure, "Path", fake)
    calls = []

    def fake_sysconf(key):
        calls.append(key)
        if sysconf is None or key not in sysconf:
            raise ValueError(key)
        return sysconf[key]
    monkeypatch.setattr(measure.os, "sysconf", fake_sysconf)
    return calls


MEMINFO = "MemTotal:       16384 kB\nMemFree:         1000 kB\nMemAvailable:    8192 kB\n"


def test_meminfo_reads_kib_lines(monkeypatch):
    calls = _fake_fs(monkeypatch, {"/proc/meminfo": MEMINFO})
    assert measure.mem_total_bytes() == 16384 * 1024
    assert measure.mem_available_bytes() == 8192 * 1024
    assert calls == []


def test_meminfo_falls_back_to_pages_then_to_8_gib(monkeypatch):
    # no /proc/meminfo: pages x page size, the key named by the caller
    calls = _fake_fs(monkeypatch, {}, {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 1000, "SC_AVPHYS_PAGES": 300})
    assert measure.mem_total_bytes() == 4096 * 1000
    assert measure.mem_available_bytes() == 4096 * 300
    assert calls == ["SC_PAGE_SIZE", "SC_PHYS_PAGES", "SC_PAGE_SIZE", "SC_AVPHYS_PAGES"]
    # a meminfo without the key, or with a bad value, goes to sysconf too
    _fake_fs(monkeypatch, {"/proc/meminfo": "MemFree: 5 kB\n"}, {"SC_PAGE_SIZE": 10, "SC_PHYS_PAGES": 7})
    assert measure.mem_total_bytes() == 70
    _fake_fs(monkeypatch, {"/proc/meminfo": "MemTotal: lots kB\n"}, {"SC_PAGE_SIZE": 10, "SC_PHYS_PAGES": 9})
    assert measure.mem_total_bytes() == 90
    _fake_fs(monkeypatch, {"/proc/meminfo": "MemTotal:\n"}, {"SC_PAGE_SIZE": 10, "SC_PHYS_PAGES": 3})
    assert measure.mem_total_bytes() == 30
    # neither: 8 GiB
    _fake_fs(monkeypatch, {"/proc/meminfo": "MemFree: 5 kB\n"})
    assert measure.mem_total_bytes() == 8 * GiB and measure.mem_available_bytes() == 8 * GiB


def test_meminfo_fallbacks_on_other_errors(monkeypatch):
    for err in (OSError, AttributeError):
        fake = type("P", (_FakePath,), {"files": {}})
        monkeypatch.setattr(measure, "Path", fake)

        def bad(key, err=err):
            raise err(key)
        monkeypatch.setattr(measure.os, "sysconf", bad)
        assert measure.mem_total_bytes() == 8 * GiB


CACHE = "/sys/devices/system/cpu/cpu0/cache"


def test_l3_is_the_largest_cache(monkeypatch):
    _fake_fs(monkeypatch, {CACHE + "/index0/size": "48K\n", CACHE + "/index2/size": "2048K",
                           CACHE + "/index3/size": "36m", CACHE + "/index4/size": "bad"})
    assert measure.l3_bytes() == 36 * 2 ** 20
    _fake_fs(monkeypatch, {CACHE + "/index0/size": "32K", CACHE + "/index1/size": "1G"})
    assert measure.l3_bytes() == 2 ** 30
    _fake_fs(monkeypatch, {CACHE + "/index0/size": "4096"})        # no unit: bytes
    assert measure.l3_bytes() == 4096
    _fake_fs(monkeypatch, {CACHE + "/index0/size": "3K", CACHE + "/index1/size": "1K"})
    assert measure.l3_bytes() == 3072
    _fake_fs(monkeypatch, {CACHE + "/index0/size": "?", CACHE + "/index1/size": "8K"})   # a bad entry is skipped
    assert measure.l3_bytes() == 8192


def test_l3_unknown_is_32_mib(monkeypatch):
    _fake_fs(monkeypatch, {})
    assert measure.l3_bytes() == 32 * MiB
    _fake_fs(monkeypatch, {CACHE + "/index0/size": "x"})
    assert measure.l3_bytes() == 32 * MiB
    _fake_fs(monkeypatch, {CACHE + "/index0/size": "8x"})        # not a size: ignored
    assert measure.l3_bytes() == 32 * MiB

    class Unreadable(_FakePath):
        files = {CACHE + "/index0/size": "8K"}

        def read_text(self):
            raise OSError(self.p)
    monkeypatch.setattr(measure, "Path", Unreadable)
    assert measure.l3_bytes() == 32 * MiB


def _pool_case(monkeypatch, l3, avail, st):
    monkeypatch.setattr(measure, "l3_bytes", lambda: l3)
    monkeypatch.setattr(measure, "mem_available_bytes", lambda: avail)
    return measure.pool_bytes(st)


def test_pool_bytes_by_hand(monkeypatch):
    st = measure.Settings("t", reps=1, min_time_s=0.0, pool_min_bytes=100 * MiB, pool_max_bytes=300 * MiB,
                          cpu_gemm_weight_max_bytes=MiB, attn_call_bytes=MiB, chunks_MB=(1,), gpu_Ms=(1,))
    big = 64 * GiB
    assert _pool_case(monkeypatch, 10 * MiB, big, st) == 100 * MiB      # 4 x L3 = 40 MiB < min
    assert _pool_case(monkeypatch, 50 * MiB, big, st) == 200 * MiB      # 4 x L3 between min and max
    assert _pool_case(monkeypatch, 25 * MiB, big, st) == 100 * MiB      # 4 x L3 = min exactly
    assert _pool_case(monkeypatch, 75 * MiB, big, st) == 300 * MiB      # = max exactly
    assert _pool_case(monkeypatch, 100 * MiB, big, st) == 300 * MiB     # beyond max
    assert _pool_case(monkeypatch, 50 * MiB, 600 * MiB, st) == 150 * MiB   # a quarter of the free memory
    assert _pool_case(monkeypatch, 50 * MiB, 800 * MiB, st) == 200 * MiB   # a quarter = want exactly
    assert _pool_case(monkeypatch, 50 * MiB, 601 * MiB + 8, st) == 150 * MiB  # floored to whole MiB
    assert _pool_case(monkeypatch, 50 * MiB, 100 * MiB, st) == 64 * MiB    # never below 64 MiB
    assert _pool_case(monkeypatch, 50 * MiB, 260 * MiB, st) == 65 * MiB
    # full mode on a big machine with a small cache: its minimum, 1 GiB; a huge cache: its maximum, 2 GiB
    assert _pool_case(monkeypatch, 32 * MiB, big, measure.FULL) == GiB
    assert _pool_case(monkeypatch, GiB, big, measure.FULL) == 2 * GiB
    assert _pool_case(monkeypatch, 32 * MiB, big, measure.QUICK) == 512 * MiB


def test_pool_bytes_is_a_whole_number_of_bytes(monkeypatch):
    """make_pool(n_bytes) makes torch.empty(n_bytes // 4), which takes only an int: the pool size is an int in
    every case, also where a quarter of the free memory (600 MiB + 3 bytes: not a multiple of 4) is the
    binding term -> 150 MiB."""
    st = measure.Settings("t", reps=1, min_time_s=0.0, pool_min_bytes=100 * MiB, pool_max_bytes=300 * MiB,
                          cpu_gemm_weight_max_bytes=MiB, attn_call_bytes=MiB, chunks_MB=(1,), gpu_Ms=(1,))
    for l3, avail, want in ((50 * MiB, 600 * MiB, 150 * MiB), (50 * MiB, 600 * MiB + 3, 150 * MiB),
                            (50 * MiB, 100 * MiB, 64 * MiB), (50 * MiB, 64 * GiB, 200 * MiB)):
        got = _pool_case(monkeypatch, l3, avail, st)
        assert type(got) is int and got == want
        assert torch.empty(got // 4, dtype=torch.float32, device="meta").numel() == want // 4


# ---------------------------------------------------------------------------------------------
# the CPU timer
def test_low_quantile_and_spread_by_hand():
    xs = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0, 9.0, 8.0, 7.0, 6.0, 11.0]      # sorted 1..11, ranks 0..10
    assert measure.LOW_QUANTILE == 0.1
    assert measure.low_quantile(xs) == 2.0                               # rank int(0.1 * 10) = 1
    assert measure.low_quantile(xs, 0.5) == 6.0 and measure.low_quantile(xs, 0.95) == 10.0
    assert measure.low_quantile(xs, 0.0) == 1.0 and measure.low_quantile(xs, 1.0) == 11.0
    assert measure.low_quantile([3.0, 1.0, 2.0]) == 1.0                  # under 1/q samples: the minimum
    assert measure.low_quantile(list(range(21, 0, -1))) == 3              # rank int(0.1 * 20) = 2
    assert measure.spread(xs) == pytest.approx((10.0 - 2.0) / 2.0)       # 90th: rank int(0.9 * 10) = 9
    assert measure.spread([4.0, 2.0, 3.0]) == pytest.approx(0.5)          # (3 - 2) / 2: 90th rank int(1.8) = 1
    assert measure.spread([2.0] * 7) == 0.0
    assert measure.spread([0.0, 0.0, 5.0]) == 0.0                         # 10th percentile 0: no ratio
    assert measure.spread([0.0] * 12 + [5.0]) == 0.0


def test_spread_of_sub_second_and_one_second_calls():
    """Repetitions are timed in seconds, mostly far below 1: their spread is a ratio of the same kind. Sorted
    [0.5, 0.75, 1.0]: 10th percentile rank int(0.2) = 0 -> 0.5, 90th rank int(1.8) = 1 -> 0.75, (0.75 - 0.5)
    / 0.5 = 0.5. Microsecond calls 2, 3 us: rank 0 both ways for two samples -> 0; three 2, 3, 4 us -> 0.5.
    A 10th percentile of exactly 1 s: [1.0, 1.5, 2.0] -> (1.5 - 1) / 1 = 0.5."""
    assert measure.spread([1.0, 0.5, 0.75]) == pytest.approx(0.5)
    assert measure.spread([2e-6, 3e-6]) == 0.0
    assert measure.spread([4e-6, 2e-6, 3e-6]) == pytest.approx(0.5)
    assert measure.spread([2.0, 1.0, 1.5]) == pytest.approx(0.5)


class _FakeClock:
    """time.perf_counter that moves only when a timed function advances it."""

    def __init__(self, t0: float = 1000.0):
        self.t = t0
        self.reads = 0

    def perf_counter(self):
        self.reads += 1
        return self.t


def _scripted(clock, log, key, durations):
    """A function that, at its i-th call, logs `key` and advances the clock by durations[i] (the last one
    repeated)."""
    n = [0]

    def fn():
        log.append(key)
        clock.t += durations[min(n[0], len(durations) - 1)]
        n[0] += 1
    return fn


def test_cpu_best_s_warms_up_interleaves_and_batches(monkeypatch):
    """Two keys: warm-up calls (2 each, 1000 s: never counted) then `reps` = 2 rounds, each a batch of a's
    calls lasting at least 0.375 s, then b's. a's calls take 0.125 s: a batch of 3 calls ends exactly at
    0.375 s (reaching the minimum ends it). b's calls take 0.5 s: one per batch."""
    clock, log = _FakeClock(), []
    monkeypatch.setattr(measure, "time", clock)
    a = _scripted(clock, log, "a", [1000.0, 1000.0, 0.125])
    b = _scripted(clock, log, "b", [1000.0, 1000.0, 0.5, 0.75])
    sp = {}
    got = measure._cpu_best_s({"a": a, "b": b}, 2, 0.375, sp)
    assert log == ["a", "a", "b", "b"] + (["a"] * 3 + ["b"]) * 2
    assert got == {"a": 0.125, "b": 0.5}
    assert sp == {"a": 0.0, "b": 0.0}           # two samples: the 10th and 90th percentiles are both the first


def test_cpu_best_s_keeps_the_low_quantile_of_single_calls(monkeypatch):
    """reps = 11 rounds of one call each (each call outlasts min_time_s) with times 11, 3, 7, 1, 9, 2, 10, 5,
    4, 8, 6: the 10th percentile by lower rank is the 2nd smallest, 2; the 90th the 10th smallest, 10;
    spread (10 - 2) / 2 = 4. A second key with 0.3-s calls in batches of 0.5 s: 2 calls a round."""
    clock, log = _FakeClock(), []
    monkeypatch.setattr(measure, "time", clock)
    ts = [11.0, 3.0, 7.0, 1.0, 9.0, 2.0, 10.0, 5.0, 4.0, 8.0, 6.0]
    x = _scripted(clock, log, "x", [0.0, 0.0] + ts)
    y = _scripted(clock, log, "y", [0.0, 0.0, 0.3])
    sp = {}
    got = measure._cpu_best_s({"x": x, "y": y}, 11, 0.5, sp)
    assert got["x"] == 2.0 and got["y"] == pytest.approx(0.3)
    assert sp["x"] == 4.0 and sp["y"] == 0.0
    assert log.count("x") == 2 + 11 and log.count("y") == 2 + 22


def test_cpu_best_s_rounds_the_spread_to_three_places(monkeypatch):
    clock, log = _FakeClock(), []
    monkeypatch.setattr(measure, "time", clock)
    f = _scripted(clock, log, "f", [0.0, 0.0, 4.0, 3.0, 4.0])     # spread (4 - 3) / 3 = 0.3333...
    sp = {"old": 9}
    measure._cpu_best_s({"f": f}, 3, 0.0, sp)
    assert sp == {"old": 9, "f": 0.333}


def test_cpu_best_s_without_spread_out_and_with_no_reps(monkeypatch):
    """reps below 1 still times one round; no spread_out dict is fine; min_time_s 0 is one call a batch."""
    clock, log = _FakeClock(), []
    monkeypatch.setattr(measure, "time", clock)
    f = _scripted(clock, log, "f", [0.0, 0.0, 2.0, 1.0])
    assert measure._cpu_best_s({"f": f}, 0, 0.0) == {"f": 2.0}
    assert log == ["f"] * 3
    log.clear()
    assert measure._cpu_best_s({"f": f}, -3, 0.0) == {"f": 1.0}
    assert len(log) == 3


def test_cpu_best_s_caps_a_batch_at_100000_calls(monkeypatch):
    """A call the clock cannot see (0 s) would never end its batch: it stops at 100,000 calls, and its time
    counts as 1 ns, one tick of perf_counter (CLOCK_MONOTONIC, resolution 1e-9 s on Linux): the smallest
    time the clock could have shown, positive because a rate divides by it."""
    clock = _FakeClock()
    monkeypatch.setattr(measure, "time", clock)
    n = [0]

    def f():
        n[0] += 1
    got = measure._cpu_best_s({"f": f}, 1, 1.0)
    assert n[0] == 2 + 100_000
    assert got["f"] == 1e-9


def test_cpu_best_s_keeps_calls_just_above_one_tick(monkeypatch):
    """Only calls under the clock's 1-ns tick are floored: calls the clock shows as 1.5 ns, or 1 ns exactly,
    keep their time (one call a batch, min_time_s 0); a call of 0.25 ns counts as 1 ns."""
    for dt, want in ((1.5e-9, 1.5e-9), (1e-9, 1e-9), (0.25e-9, 1e-9)):
        clock, log = _FakeClock(0.0), []
        monkeypatch.setattr(measure, "time", clock)
        f = _scripted(clock, log, "f", [dt])
        assert measure._cpu_best_s({"f": f}, 3, 0.0) == {"f": pytest.approx(want, rel=1e-9)}


# ---------------------------------------------------------------------------------------------
# buffers
def test_make_pool_tiles_one_random_block():
    """n_bytes // 4 fp32 values; the first 2^20 are torch's uniform stream from seed 0 mapped to [-1, 1),
    repeated to fill the rest (the last copy cut short)."""
    n = 2 * MiB + 5
    pool = measure.make_pool(4 * n + 3)
    assert pool.dtype == torch.float32 and pool.numel() == n
    ref = torch.rand(MiB, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert torch.equal(pool[:MiB], ref)
    assert torch.equal(pool[MiB:2 * MiB], ref) and torch.equal(pool[2 * MiB:], ref[:5])
    assert float(pool.min()) >= -1.0 and float(pool.max()) < 1.0
    assert float(pool.min()) < -0.99 and float(pool.max()) > 0.99


def test_make_pool_smaller_than_one_block():
    pool = measure.make_pool(4000)
    ref = torch.rand(1000, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert pool.numel() == 1000 and torch.equal(pool, ref)


def test_kv_flat_by_dtype():
    pool = torch.tensor([1.5, -2.25, 3.0])
    assert measure.kv_flat(pool, "fp32") is pool
    b = measure.kv_flat(pool, "bf16")
    assert b.dtype == torch.bfloat16 and b.numel() == 6 and b.element_size() == 2
    assert b.tolist() == [1.5, -2.25, 3.0, 1.5, -2.25, 3.0]       # the same bytes: the pool twice
    with pytest.raises(ValueError, match=r"^kv_dtype must be fp32 or bf16, got 'fp16'$"):
        measure.kv_flat(pool, "fp16")


def test_kv_layers_by_hand():
    """Hkv = 2, S = 3, D = 4: one sequence's K is 24 elements (96 fp32 bytes), K + V 192 bytes.
    call_bytes 400 -> ceil(400 / 192) = 3 sequences; a flat buffer of 500 elements holds
    500 // (2 * 72) = 3 layers of K and V [3, 2, 3, 4], back to back."""
    flat = torch.arange(500, dtype=torch.float32)
    B, layers = measure.kv_layers(flat, 2, 3, 4, 400)
    assert B == 3 and len(layers) == 3
    for i, (k, v) in enumerate(layers):
        assert k.shape == v.shape == (3, 2, 3, 4)
        assert k.flatten().tolist() == list(range(144 * i, 144 * i + 72))
        assert v.flatten().tolist() == list(range(144 * i + 72, 144 * i + 144))
    assert measure.kv_layers(flat, 2, 3, 4, 384)[0] == 2       # exactly 2 sequences' bytes
    assert measure.kv_layers(flat, 2, 3, 4, 385)[0] == 3
    assert measure.kv_layers(flat, 2, 3, 4, 1)[0] == 1
    assert measure.kv_layers(flat, 2, 3, 4, 0)[0] == 1           # at least one sequence


def test_kv_layers_caps_sequences():
    """At most 64 sequences; at most what the buffer holds for one layer (here 2 * 64 * 1 elements)."""
    big = torch.zeros(2 * 70 * 4)
    B, layers = measure.kv_layers(big, 1, 2, 2, 10 ** 9)            # seq 4 elements: 70 would fit
    assert B == 64 and len(layers) == 1 and layers[0][0].shape == (64, 1, 2, 2)
    B, layers = measure.kv_layers(big, 1, 2, 2, 64 * 2 * 4 * 4)     # exactly 64
    assert B == 64
    small = torch.zeros(2 * 5 * 4 + 3)                               # holds K and V of 5 sequences
    B, layers = measure.kv_layers(small, 1, 2, 2, 10 ** 9)
    assert B == 5 and len(layers) == 1
    B, layers = measure.kv_layers(torch.zeros(2 * 6 * 4), 1, 2, 2, 2 * 3 * 4 * 4)  # 3 a call: 2 layers
    assert B == 3 and len(layers) == 2
    bf = torch.zeros(2 * 4 * 4, dtype=torch.bfloat16)               # bf16: 2 bytes an element
    assert measure.kv_layers(bf, 1, 2, 2, 2 * 2 * 4 * 2)[0] == 2


def test_kv_layers_too_small_raises():
    with pytest.raises(ValueError, match=r"^the 0 MiB pool is too small for 3 cache positions$"):
        measure.kv_layers(torch.zeros(2 * 24 - 1), 2, 3, 4, 100)
    B, layers = measure.kv_layers(torch.zeros(2 * 24), 2, 3, 4, 100)   # exactly one sequence's K and V
    assert B == 1 and len(layers) == 1
    with pytest.raises(ValueError, match=r"^the 2 MiB pool is too small for 1024 cache positions$"):
        measure.kv_layers(torch.zeros(MiB // 2), 8, 1024, 128, MiB)


# ---------------------------------------------------------------------------------------------
