"""Calibration's GPU measurements run on the CPU: torch's CUDA entry points (events, synchronize, devices) are
replaced by CPU stand-ins, so the CUDA timer's iteration counts and medians and each measurement's bytes, FLOPs
and devices are checked here against hand values (issue 15, part 3).
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from specmoe.runtime.calibrate import measure

MiB = 2 ** 20
GiB = 2 ** 30
REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# CUDA side, with torch's CUDA entry points replaced by CPU stand-ins
class _FakeCuda:
    """Fake GPU clock (advanced by the timed functions), events reading it, and allocation on the CPU with
    the device and pinning recorded."""

    def __init__(self, monkeypatch, current=3):
        self.t = 0.0
        self.log = []
        self.allocs = []
        self.devices = []
        self.current = current
        cuda = torch.cuda
        fake = self

        class Event:
            def __init__(self, enable_timing=False):
                assert enable_timing
                self.at = None

            def record(self, stream=None):
                assert stream == ("stream", fake.stream_dev)
                self.at = fake.t
                fake.log.append("record")

            def synchronize(self):
                fake.log.append("esync")

            def elapsed_time(self, end):
                return (end.at - self.at) * 1e3          # milliseconds

        self.stream_dev = "unset"

        def current_stream(device=None):
            self.stream_dev = device
            return ("stream", device)

        @contextlib.contextmanager
        def device_ctx(dev):
            self.devices.append(str(dev))
            yield

        monkeypatch.setattr(cuda, "Event", Event)
        monkeypatch.setattr(cuda, "current_stream", current_stream)
        monkeypatch.setattr(cuda, "synchronize", lambda device=None: self.log.append(("sync", device)))
        monkeypatch.setattr(cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(cuda, "device", device_ctx)
        monkeypatch.setattr(cuda, "empty_cache", lambda: self.log.append("empty_cache"))
        monkeypatch.setattr(cuda, "mem_get_info", lambda dev: (self.devices.append(str(dev)) or (3 * GiB + GiB // 4, 80 * GiB - GiB // 20)))
        monkeypatch.setattr(cuda, "get_device_name", lambda dev: self.devices.append(str(dev)) or "Fake H100")

        def wrap(name):
            real = getattr(torch, name)

            def alloc(*a, device=None, pin_memory=False, **k):
                x = real(*a, **k)
                if device is not None and torch.device(device).type == "cuda":
                    x.fill_(7) if name == "empty" else None
                self.allocs.append((name, None if device is None else str(device), pin_memory, x))
                return x
            monkeypatch.setattr(torch, name, alloc)
        for name in ("empty", "ones", "rand"):
            wrap(name)
        real_gen = torch.Generator

        def gen(device=None):
            self.allocs.append(("generator", str(device), False, None))
            return real_gen()
        monkeypatch.setattr(torch, "Generator", gen)


def test_cuda_median_s_times_batches_by_events(monkeypatch):
    """One untimed call's 2^-10 s sets iters = int(2^-7 / 2^-10) = 8 calls a rep; three reps whose calls
    take 3, 1, 2 ms: median 2 ms a call. Two warm-up calls (100 s each) then a synchronize, never timed."""
    cu = _FakeCuda(monkeypatch)
    per_call = [100.0, 100.0, 2 ** -10] + [3e-3] * 8 + [1e-3] * 8 + [2e-3] * 8
    calls = [0]

    def fn():
        cu.t += per_call[calls[0]]
        calls[0] += 1
    got = measure._cuda_median_s(fn, reps=3, target_s=2 ** -7, device="dev7")
    assert calls[0] == 2 + 1 + 3 * 8
    assert got == pytest.approx(2e-3, rel=1e-9)
    assert cu.stream_dev == "dev7" and cu.log[0] == ("sync", "dev7")
    assert cu.log[1:] == ["record", "record", "esync"] * 4


def test_cuda_median_s_even_reps_and_one_iteration(monkeypatch):
    """A call longer than target_s runs once a rep; four reps of 1, 4, 2, 8 s: median (2 + 4) / 2 = 3."""
    cu = _FakeCuda(monkeypatch)
    per_call = [0.0, 0.0, 1.0, 1.0, 4.0, 2.0, 8.0]
    calls = [0]

    def fn():
        cu.t += per_call[calls[0]]
        calls[0] += 1
    assert measure._cuda_median_s(fn, reps=4, target_s=0.5) == pytest.approx(3.0)
    assert calls[0] == 7 and cu.stream_dev is None


def test_cuda_median_s_caps_iterations(monkeypatch):
    """A call too short to time (0 s) runs 10,000 times a rep, reps below 1 are one rep, and the default
    target (5 ms) at 1 ms a call is 5 calls a rep, 5 reps."""
    cu = _FakeCuda(monkeypatch)
    calls = [0]

    def fn():
        calls[0] += 1
    assert measure._cuda_median_s(fn, reps=0) == 0.0
    assert calls[0] == 3 + 10_000
    calls[0] = 0

    def ms():
        cu.t += 2 ** -10
        calls[0] += 1
    assert measure._cuda_median_s(ms, target_s=5 * 2 ** -10) == pytest.approx(2 ** -10)
    assert calls[0] == 3 + 5 * 5
    calls[0] = 0
    assert measure._cuda_median_s(ms, target_s=2 ** -11) == pytest.approx(2 ** -10)   # at least 1 a rep
    assert calls[0] == 3 + 5
    calls[0] = 0
    assert measure._cuda_median_s(ms, target_s=4.5 * 2 ** -10, reps=1) == pytest.approx(2 ** -10)  # int(4.5) = 4
    assert calls[0] == 3 + 4


def test_cuda_median_s_default_target_is_5_ms(monkeypatch):
    """Without target_s, a rep lasts about 5 ms: a call of 2^-10 s (0.977 ms) gives int(0.005 / 2^-10) =
    int(5.12) = 5 calls a rep, 5 reps."""
    cu = _FakeCuda(monkeypatch)
    calls = [0]

    def fn():
        cu.t += 2 ** -10
        calls[0] += 1
    assert measure._cuda_median_s(fn) == pytest.approx(2 ** -10)
    assert calls[0] == 3 + 5 * 5


def test_cuda_median_s_counts_an_unseen_call_as_a_tenth_of_a_microsecond(monkeypatch):
    """A call the events cannot see (0 s) counts as 1e-7 s when sizing a rep: a 50-us target is
    5e-5 / 1e-7 = 500 calls a rep (its time, 0, is still what is returned)."""
    cu = _FakeCuda(monkeypatch)
    calls = [0]

    def fn():
        calls[0] += 1
    assert measure._cuda_median_s(fn, reps=2, target_s=5e-5) == 0.0
    assert calls[0] == 3 + 2 * 500
    assert cu.log.count("record") == 2 * 3


def test_cuda_median_s_floor_on_one_call(monkeypatch):
    """A 0.5 us call with a 1 ms target: 2,000 calls a rep (the floor on one call's time is below it)."""
    cu = _FakeCuda(monkeypatch)
    calls = [0]

    def fn():
        cu.t += 2 ** -21
        calls[0] += 1
    measure._cuda_median_s(fn, reps=1, target_s=2 ** -11)
    assert calls[0] == 3 + 1024


def _fake_median(record, seconds):
    def fake(fn, *, reps=5, target_s=0.005, device=None):
        out = fn()
        record.append((reps, target_s, str(device), out))
        return seconds
    return fake


def test_pinned_copy_directions_and_bytes(monkeypatch):
    """Chunks of 1 and 2 MiB from one pinned host buffer and one GPU buffer of the largest chunk; h2d copies
    host -> GPU, d2h GPU -> host; c MiB in 1 ms is 1.048576 c GB/s."""
    cu = _FakeCuda(monkeypatch, current=2)
    rec = []
    monkeypatch.setattr(measure, "_cuda_median_s", _fake_median(rec, 1e-3))
    real_copy, asyncs = torch.Tensor.copy_, []
    monkeypatch.setattr(torch.Tensor, "copy_", lambda self, src, non_blocking=False:
                        asyncs.append(non_blocking) or real_copy(self, src, non_blocking))
    got = measure.measure_pinned_copy_GBps_by_chunk_MB((1, 2), "h2d", reps=4)
    assert asyncs == [True, True]          # queued on the stream, back to back (pinned memory allows it)
    assert got == pytest.approx({1: 1.048576, 2: 2.097152}, rel=1e-12)
    (_, hdev, hpin, host), (_, gdev, gpin, gpu) = cu.allocs
    assert (hdev, hpin, host.dtype, host.numel()) == (None, True, torch.uint8, 2 * MiB)
    assert (gdev, gpin, gpu.dtype, gpu.numel()) == ("cuda:2", False, torch.uint8, 2 * MiB)
    assert [(r[0], r[1], r[2], r[3].numel()) for r in rec] == [(4, 0.01, "cuda:2", MiB), (4, 0.01, "cuda:2", 2 * MiB)]
    assert all(r[3].data_ptr() == gpu.data_ptr() for r in rec)     # copies into the GPU buffer
    assert bool((gpu == 1).all()) and cu.devices == ["cuda:2"] and cu.log == ["empty_cache"]
    cu.allocs.clear()
    rec.clear()
    got = measure.measure_pinned_copy_GBps_by_chunk_MB((1,), "d2h", device=0)
    assert got == pytest.approx({1: 1.048576}, rel=1e-12)
    (_, _, hpin, host), (_, gdev, _, gpu) = cu.allocs
    assert hpin and gdev == "cuda:0" and rec[0][:3] == (5, 0.01, "cuda:0")
    assert rec[0][3].data_ptr() == host.data_ptr() and bool((host == 7).all())   # GPU -> host
    with pytest.raises(ValueError, match=r"^direction must be 'h2d' or 'd2h', got 'h2h'$"):
        measure.measure_pinned_copy_GBps_by_chunk_MB((1,), "h2h")


def test_pinned_copy_defaults(monkeypatch):
    _FakeCuda(monkeypatch, current=0)
    rec = []
    monkeypatch.setattr(measure, "_cuda_median_s", _fake_median(rec, 0.5))
    real_empty = torch.empty
    sizes = []
    monkeypatch.setattr(torch, "empty", lambda n, dtype=None, device=None, pin_memory=False:
                        sizes.append(n) or real_empty(min(n, 8), dtype=dtype))
    monkeypatch.setattr(torch.Tensor, "copy_", lambda self, src, non_blocking=False: self)
    got = measure.measure_pinned_copy_GBps_by_chunk_MB()
    assert sizes == [1024 * MiB, 1024 * MiB] and sorted(got) == [1, 4, 16, 64, 256, 1024]
    assert got[1024] == pytest.approx(1024 * MiB / 0.5 / 1e9) and len(rec) == 6


def test_gpu_gemm_flops_shapes_and_device(monkeypatch):
    """x[M, h] @ W[h, F] on the chosen device, at M = 1 and 3 (h 8, F 5): 2 M h F FLOPs (torch's count),
    in the requested dtype; TFLOP/s = FLOPs / seconds / 1e12."""
    cu = _FakeCuda(monkeypatch, current=1)
    rec = []

    def fake(fn, *, reps=5, target_s=0.005, device=None):
        with FlopCounterMode(display=False) as fc:
            y = fn()
        rec.append((reps, target_s, str(device), fc.get_total_flops(), y.dtype, tuple(y.shape)))
        return 2e-3
    monkeypatch.setattr(measure, "_cuda_median_s", fake)
    got = measure.measure_gpu_gemm_TFLOPs_by_M(8, 5, (1, 3), "fp16", reps=2)
    assert rec == [(2, 0.005, "cuda:1", 80, torch.float16, (1, 5)), (2, 0.005, "cuda:1", 240, torch.float16, (3, 5))]
    assert got == pytest.approx({1: 80 / 2e-3 / 1e12, 3: 240 / 2e-3 / 1e12}, rel=1e-12)
    assert cu.devices == ["cuda:1"] and cu.log == ["empty_cache"]
    assert {a[1] for a in cu.allocs} == {"cuda:1"}
    assert sorted(tuple(a[3].shape) for a in cu.allocs if a[0] == "rand") == [(3, 8), (8, 5)]
    rec.clear()
    measure.measure_gpu_gemm_TFLOPs_by_M(8, 5, (2,), device=0)
    assert rec == [(5, 0.005, "cuda:0", 160, torch.bfloat16, (2, 5))]
    rec.clear()
    measure.measure_gpu_gemm_TFLOPs_by_M(8, 5, (2,), "fp32")
    assert rec[0][4] == torch.float32
    rec.clear()
    monkeypatch.setattr(torch, "matmul", lambda x, W, out=None: out)
    got = measure.measure_gpu_gemm_TFLOPs_by_M(1, 1)
    assert sorted(got) == list(measure.FULL.gpu_Ms) and got[4096] == pytest.approx(2 * 4096 / 2e-3 / 1e12)


def test_gpu_gemm_writes_into_one_preallocated_output(monkeypatch):
    """The timed call allocates nothing: each M's callable writes x @ W into one [M, F] output made on the
    device before the timing, the same tensor at every call (called inside the timer: W and X are freed
    after the loop)."""
    cu = _FakeCuda(monkeypatch, current=1)
    got = []

    def capture(fn, *, reps=5, target_s=0.005, device=None):
        got.append((fn(), fn()))
        return 1.0
    monkeypatch.setattr(measure, "_cuda_median_s", capture)
    measure.measure_gpu_gemm_TFLOPs_by_M(8, 5, (1, 3))
    outs = [(a[3], a[1]) for a in cu.allocs if a[0] == "empty"]
    assert [(tuple(y.shape), dev) for y, dev in outs] == [((1, 5), "cuda:1"), ((3, 5), "cuda:1")]
    assert len(got) == 2 and all(a is y and b is y for (a, b), (y, _) in zip(got, outs))


def test_hbm_copy_counts_read_and_write(monkeypatch):
    """A 4 MiB copy in 1 ms: 2 x 4,194,304 bytes (read + written) / 1e-3 s = 8.388608 GB/s."""
    cu = _FakeCuda(monkeypatch, current=5)
    rec = []
    monkeypatch.setattr(measure, "_cuda_median_s", _fake_median(rec, 1e-3))
    assert measure.measure_hbm_copy_GBps(4 * MiB, reps=3) == pytest.approx(8.388608, rel=1e-12)
    (name, dev, _, src), = cu.allocs
    assert (name, dev, src.numel(), src.dtype) == ("ones", "cuda:5", MiB, torch.float32)
    assert rec[0][:3] == (3, 0.01, "cuda:5") and rec[0][3].numel() == MiB and bool((rec[0][3] == 1).all())
    assert rec[0][3].data_ptr() != src.data_ptr()
    assert cu.devices == ["cuda:5"] and cu.log == ["empty_cache"]
    cu.allocs.clear()
    rec.clear()
    monkeypatch.setattr(torch, "empty_like", lambda x: x)
    monkeypatch.setattr(torch.Tensor, "copy_", lambda self, src, non_blocking=False: self)
    real_ones = torch.ones
    made = []
    monkeypatch.setattr(torch, "ones", lambda n, dtype=None, device=None: made.append((n, str(device))) or real_ones(4))
    assert measure.measure_hbm_copy_GBps(device=2) == pytest.approx(2 * GiB / 1e-3 / 1e9)
    assert made == [(GiB // 4, "cuda:2")] and rec[0][:3] == (5, 0.01, "cuda:2")


def test_gpu_facts(monkeypatch):
    """Name and memory of the device: 80 GiB - 0.05 GiB total rounds to 80.0 (one decimal), 3.25 GiB free
    to 3.2 (round half to even)."""
    cu = _FakeCuda(monkeypatch, current=4)
    assert measure.gpu_facts() == {"name": "Fake H100", "mem_GiB": 80.0, "free_GiB": 3.2}
    assert cu.devices == ["cuda:4", "cuda:4"]
    cu.devices.clear()
    measure.gpu_facts(1)
    assert cu.devices == ["cuda:1", "cuda:1"]


def test_measurements_leave_torch_global_rng_alone(monkeypatch):
    """Operands come from the measurements' own generators: calibrating does not move torch's global random
    stream (a caller's seeded run draws the same numbers before and after)."""
    import specmoe.runtime.kernels.verify_attention as va

    monkeypatch.setattr(va, "verify_attention", lambda *a, **k: None)
    monkeypatch.setattr(measure, "_cpu_best_s",             # each call runs once and "takes" 1 s
                        lambda fns, reps, min_time_s, spread_out=None: {k: (fn(), 1.0)[1] for k, fn in fns.items()})
    torch.manual_seed(123)
    state = torch.get_rng_state()
    pool = measure.make_pool(MiB)
    measure.measure_cpu_gemm_GFLOPs_by_M(8, 4, (1, 2))
    measure.measure_cpu_attention_kv_GBps(2, 1, 4, pool=pool, ns=(1,), contexts=(8,), call_bytes=4096,
                                          reps=1, min_time_s=0.0)
    assert torch.equal(torch.get_rng_state(), state)
    _FakeCuda(monkeypatch)
    monkeypatch.setattr(measure, "_cuda_median_s", _fake_median([], 1.0))
    measure.measure_gpu_gemm_TFLOPs_by_M(8, 4, (1,))
    assert torch.equal(torch.get_rng_state(), state)
