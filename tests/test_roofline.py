"""Roofline times: max(flops/peak, bytes/bandwidth), measured curves override peaks, every result
says its source and bound."""
from __future__ import annotations

import pytest

from specmoe.planner.errors import SpecError
from specmoe.planner.hardware_spec import HardwareSpec
from specmoe.planner.roofline import OpCost, compute_rate, h2d_rate, peak_flops, time_on
from tiny_specs import tiny_hw


def test_peak_roofline_exact():
    hw = tiny_hw()                                  # 1e9 FLOP/s, 1e9 B/s everywhere
    t = time_on("gpu", hw, OpCost(flops=3000, hbm_bytes=1000))
    assert t.time_s == pytest.approx(3e-6) and t.bound == "compute" and t.source == "peak"
    assert t.compute_s == pytest.approx(3e-6) and t.memory_s == pytest.approx(1e-6)
    t = time_on("gpu", hw, OpCost(flops=10, hbm_bytes=5000, dram_bytes=1e9))   # DRAM bytes do not count on the GPU
    assert t.time_s == pytest.approx(5e-6) and t.bound == "memory"
    t = time_on("cpu", hw, OpCost(flops=10, hbm_bytes=1e9, dram_bytes=700))
    assert t.time_s == pytest.approx(7e-7) and t.bound == "memory"
    t = time_on("pcie", hw, OpCost(pcie_bytes=2e9))
    assert t.time_s == pytest.approx(2.0) and t.bound == "transfer"
    t = time_on("gpu", hw, OpCost())
    assert t.time_s == 0 and t.bound == "none"


def test_measured_gemm_curve_overrides_peak():
    hw = tiny_hw(gpu_gemm_TFLOPs_by_M={1: 0.0001, 100: 0.0005})          # 0.1 and 0.5 GFLOP/s, under the peak
    op = OpCost(flops=1000, hbm_bytes=1)
    t1 = time_on("gpu", hw, op, tokens=1)
    assert t1.time_s == pytest.approx(1000 / 1e8) and t1.source == "measured"
    t100 = time_on("gpu", hw, op, tokens=100)
    assert t100.time_s == pytest.approx(1000 / 5e8)
    t10 = time_on("gpu", hw, op, tokens=10)                              # halfway in log(M)
    assert t10.time_s == pytest.approx(1000 / 3e8)
    assert time_on("gpu", hw, op, tokens=1, use_measured=False).source == "peak"
    assert time_on("gpu", hw, op, kind="attention", tokens=1).source == "peak"   # not a GEMM: the peak
    # a curve above the datasheet peak is capped at the peak
    hw2 = tiny_hw(gpu_gemm_TFLOPs_by_M={1: 5.0})
    assert compute_rate(hw2, "gpu", "bf16", "gemm", 1)[0] == pytest.approx(1e9)


def test_measured_h2d_and_cpu_curves():
    hw = tiny_hw(h2d_GBps_by_chunk_MB={1: 0.5, 100: 2.0}, cpu_gemm_GFLOPs_by_M={1: 0.25},
                 cpu_attention_kv_GBps={"q1": {100: 0.5}, "q4": {100: 0.25}}, dram_read_GBps=0.8)
    t = time_on("pcie", hw, OpCost(pcie_bytes=1e9), chunk_bytes=100e6)
    assert t.time_s == pytest.approx(0.5) and t.source == "measured"
    assert h2d_rate(hw, 1e6)[0] == pytest.approx(0.5e9)
    t = time_on("cpu", hw, OpCost(flops=1e6, dram_bytes=1), tokens=1)
    assert t.time_s == pytest.approx(1e6 / 0.25e9) and t.source == "measured"
    t = time_on("cpu", hw, OpCost(flops=1, dram_bytes=1e6), kind="attention", n_query=4, context=100)
    assert t.time_s == pytest.approx(1e6 / 0.25e9) and t.source == "measured"
    t = time_on("cpu", hw, OpCost(flops=1, dram_bytes=1e6), kind="attention", n_query=2, context=100)
    assert t.time_s == pytest.approx(1e6 / 0.375e9)                     # interpolated in log(queries)
    t = time_on("cpu", hw, OpCost(flops=1, dram_bytes=8e5), kind="memory")
    assert t.time_s == pytest.approx(1e-3) and t.source == "measured"   # measured DRAM read 0.8 GB/s


def test_cpu_attention_turns_compute_bound_on_the_a30_host():
    """Verify attention reads each fp16 KV element once and does g(k+1) flops per byte: memory-bound
    at k = 0, compute-bound from k + 1 = 2 on at the datasheet peak (CPU ridge 2430/357 = 6.8 flop/byte, g = 4)."""
    hw = HardwareSpec.preset("a30-xeon6426y")
    s, nq, nkv, d = 1000, 32, 8, 128
    for k1, bound in ((1, "memory"), (2, "compute"), (5, "compute")):
        op = OpCost(flops=4 * k1 * s * nq * d, dram_bytes=s * 2 * nkv * d * 2)
        assert time_on("cpu", hw, op, kind="attention", use_measured=False).bound == bound
    # at the rate the paper measured for its kernel there (under a third of the peak) it is compute-bound
    # from the first query on
    for k1 in (1, 2, 5):
        op = OpCost(flops=4 * k1 * s * nq * d, dram_bytes=s * 2 * nkv * d * 2)
        t = time_on("cpu", hw, op, kind="attention")
        assert t.bound == "compute" and t.source == "measured"
        assert t.time_s == pytest.approx(op.flops / (hw.measured.cpu_attention_TFLOPs * 1e12))


def test_peaks_and_errors():
    hw = HardwareSpec.preset("a30-xeon6426y")
    assert peak_flops(hw, "gpu", "float16") == pytest.approx(165e12)
    assert peak_flops(hw, "gpu", "fp8") == pytest.approx(165e12)       # no fp8 peak listed: bf16's
    assert peak_flops(hw, "cpu", "fp32") == pytest.approx(2.43e12)     # Table 1 gives one (fp32 vector) rate
    assert peak_flops(HardwareSpec.preset("h200-host"), "cpu", "fp32") == pytest.approx(1.0e12)
    with pytest.raises(SpecError, match="resource"):
        time_on("tpu", hw, OpCost(1))
    with pytest.raises(SpecError, match="kind"):
        time_on("gpu", hw, OpCost(1), kind="conv")
    a, b = OpCost(1, 2, 3, 4), OpCost(10, 20, 30, 40)
    assert a + b == OpCost(11, 22, 33, 44) and a.scaled(2) == OpCost(2, 4, 6, 8)


def test_cpu_attention_uses_the_fp32_roof():
    """The verify kernel widens bf16 KV to fp32 and runs fp32 FMAs: on a host whose bf16 peak is a
    matrix unit's (AMX), CPU attention is bounded by the fp32 vector peak, not the bf16 one."""
    hw = HardwareSpec.preset("h200-host")            # cpu: bf16 4.0 TFLOP/s (AMX), fp32 1.0
    op = OpCost(flops=1e12, dram_bytes=1.0)          # compute-bound by far
    t = time_on("cpu", hw, op, dtype="bf16", kind="attention", use_measured=False)
    assert t.time_s == pytest.approx(1.0)            # 1e12 flop / 1.0e12 flop/s
    g = time_on("cpu", hw, op, dtype="bf16", kind="gemm", use_measured=False)
    assert g.time_s == pytest.approx(0.25)           # GEMMs do use the bf16 (AMX) peak
