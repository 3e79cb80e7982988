"""Per-operation roofline costs: what one operation costs on the GPU, the CPU or the PCIe link.

An `OpCost` says what an operation does (flops, bytes read from each memory tier, bytes over
PCIe); `time_on(resource, hw, op, ...)` turns it into seconds on one resource:

    roofline time = max(flops / compute rate, bytes / memory bandwidth)

The rates are the datasheet peaks of the hardware spec, or its measured curves where calibration
exists (the curves override the peaks; every result says which it used):

    gpu  GEMM          measured.gpu_gemm_TFLOPs_by_M       against tokens M of the GEMM
    gpu  memory        measured.hbm_copy_GBps
    pcie H2D copy      measured.h2d_GBps_by_chunk_MB       against the size of one copy
    cpu  GEMM          measured.cpu_gemm_GFLOPs_by_M       against tokens M
    cpu  attention     measured.cpu_attention_kv_GBps      KV GB/s against (queries, context)
    cpu  memory        measured.dram_read_GBps

Host DRAM is shared: while the expert stream's DMA reads it, a CPU operation gets `cpu_share` of its
DRAM rate (measured.dram_contention); `dram_sharing` says how much longer that makes the operation and
how hard the operation itself reads DRAM (what slows the stream in turn).

Units: flops in FLOP, bytes in bytes, times in seconds, rates in FLOP/s and B/s (SI).
"""
from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass

from specmoe.planner.errors import SpecError
from specmoe.planner.hardware_spec import Curve, HardwareSpec

RESOURCES: tuple[str, ...] = ("gpu", "cpu", "pcie")
KINDS: tuple[str, ...] = ("gemm", "attention", "memory", "copy")

# dtype aliases -> the keys hardware specs use for peak_TFLOPs
_DTYPE_KEY = {"bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "fp16": "fp16", "float32": "fp32",
              "fp32": "fp32", "fp8": "fp8", "float8": "fp8", "int8": "int8", "int4": "int4", "mxfp4": "int4"}
# If a spec lacks the dtype's peak, use the first of these it has (low-precision weights are
# computed in 16-bit by the kernels we model).
_FALLBACK = ("bf16", "fp16", "fp32")


@dataclass(frozen=True, slots=True)
class OpCost:
    """What one operation does. Bytes are split by where they are read: GPU memory (hbm), CPU memory
    (dram), or over the host-to-device link (pcie)."""

    flops: float = 0.0
    hbm_bytes: float = 0.0
    dram_bytes: float = 0.0
    pcie_bytes: float = 0.0

    def __add__(self, o: "OpCost") -> "OpCost":
        return OpCost(self.flops + o.flops, self.hbm_bytes + o.hbm_bytes, self.dram_bytes + o.dram_bytes,
                      self.pcie_bytes + o.pcie_bytes)

    def scaled(self, f: float) -> "OpCost":
        return OpCost(self.flops * f, self.hbm_bytes * f, self.dram_bytes * f, self.pcie_bytes * f)


@dataclass(frozen=True, slots=True)
class OpTime:
    """Seconds of one operation on one resource, with the bound that applies and where the rates came from."""

    time_s: float
    resource: str            # gpu | cpu | pcie
    bound: str               # compute | memory | transfer | none (zero work)
    source: str              # peak | measured
    compute_s: float         # flops / compute rate
    memory_s: float          # bytes / bandwidth (pcie: bytes / link rate)


# ------------------------------------------------------------------------------------------------
_TABLES: dict[int, tuple[Curve, tuple[float, ...], tuple[float, ...]]] = {}


def _curve_table(curve: Curve) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(log xs, ys) of a curve, cached by identity (curves are frozen; the entry keeps it alive)."""
    hit = _TABLES.get(id(curve))
    if hit is None or hit[0] is not curve:
        if len(_TABLES) > 1024:
            _TABLES.clear()
        hit = (curve, tuple(math.log(x) for x in curve.xs), tuple(curve.ys))
        _TABLES[id(curve)] = hit
    return hit[1], hit[2]


def interp_curve(curve: Curve, x: float) -> float:
    """The curve at x: linear in log(x), clamped at both ends (same rule as Curve.__call__, but
    without numpy so that the cost model can call it thousands of times)."""
    lx, ys = _curve_table(curve)
    v = math.log(max(float(x), 1e-12))
    if v <= lx[0]:
        return ys[0]
    if v >= lx[-1]:
        return ys[-1]
    i = bisect_right(lx, v)
    t = (v - lx[i - 1]) / (lx[i] - lx[i - 1])
    return ys[i - 1] + t * (ys[i] - ys[i - 1])


def peak_flops(hw: HardwareSpec, resource: str, dtype: str) -> float:
    """Datasheet FLOP/s of the GPU or CPU for a dtype (falling back to bf16, fp16, fp32)."""
    peaks = hw.gpu.peak_flops if resource == "gpu" else hw.cpu.peak_flops
    key = _DTYPE_KEY.get(dtype, dtype)
    if key in peaks:
        return peaks[key]
    for k in _FALLBACK:
        if k in peaks:
            return peaks[k]
    return max(peaks.values())


def memory_bandwidth(hw: HardwareSpec, resource: str, use_measured: bool = True) -> tuple[float, str]:
    """(B/s, source) of the GPU's HBM or the CPU's DRAM."""
    m = hw.measured
    if resource == "gpu":
        if use_measured and m.hbm_copy_GBps:
            return m.hbm_copy_GBps * 1e9, "measured"
        return hw.gpu.hbm_Bps, "peak"
    if use_measured and m.dram_read_GBps:
        return m.dram_read_GBps * 1e9, "measured"
    return hw.cpu.dram_Bps, "peak"


def h2d_rate(hw: HardwareSpec, chunk_bytes: float | None = None, use_measured: bool = True) -> tuple[float, str]:
    """(B/s, source) of host-to-device copies of `chunk_bytes` each."""
    c = hw.measured.h2d_GBps_by_chunk_MB
    if use_measured and c is not None and chunk_bytes:
        return interp_curve(c, chunk_bytes / 1e6) * 1e9, "measured"
    return hw.link.h2d_Bps, "peak"


def compute_rate(hw: HardwareSpec, resource: str, dtype: str, kind: str = "gemm", tokens: float | None = None,
                 use_measured: bool = True) -> tuple[float, str]:
    """(FLOP/s, source) for a GEMM of M = `tokens` rows (measured curve, capped at the peak) or the peak."""
    if resource == "cpu" and kind == "attention":
        # The CPU verify-attention kernel runs bf16/fp16 KV on AMX tiles or AVX512-BF16 dot products
        # where the CPU has them (cpu.amx_bf16, cpu.avx512_bf16: its compute roof is the bf16 peak);
        # elsewhere it widens KV to fp32 and runs fp32 FMAs (as the paper's MKL SGEMM kernel does).
        dtype = "bf16" if hw.cpu.bf16_attention and _DTYPE_KEY.get(dtype, dtype) in ("bf16", "fp16") else "fp32"
        peak = peak_flops(hw, resource, dtype)
        if use_measured and hw.measured.cpu_attention_TFLOPs is not None:
            # a profiled sustained rate of the kernel (below the FMA peak: softmax, merges, loads)
            return min(hw.measured.cpu_attention_TFLOPs * 1e12, peak), "measured"
        return peak, "peak"
    peak = peak_flops(hw, resource, dtype)
    if use_measured and kind == "gemm" and tokens is not None and tokens > 0:
        if resource == "gpu" and hw.measured.gpu_gemm_TFLOPs_by_M is not None:
            return min(interp_curve(hw.measured.gpu_gemm_TFLOPs_by_M, tokens) * 1e12, peak), "measured"
        if resource == "cpu" and hw.measured.cpu_gemm_GFLOPs_by_M is not None:
            return min(interp_curve(hw.measured.cpu_gemm_GFLOPs_by_M, tokens) * 1e9, peak), "measured"
    return peak, "peak"


def time_on(resource: str, hw: HardwareSpec, op: OpCost, *, dtype: str = "bf16", kind: str = "gemm",
            tokens: float | None = None, n_query: float | None = None, context: float | None = None,
            chunk_bytes: float | None = None, use_measured: bool = True) -> OpTime:
    """Seconds of `op` on `resource` ("gpu" | "cpu" | "pcie").

    gpu/cpu: max(op.flops / compute rate, bytes of that device's memory / its bandwidth); with
      kind="gemm" the compute rate is the measured GEMM curve at M = `tokens` where there is one;
      with kind="attention" on the CPU a measured KV-GB/s curve at (`n_query`, `context`) gives
      the time directly (op.dram_bytes / rate).
    pcie: op.pcie_bytes / H2D rate, the measured curve at `chunk_bytes` per copy where there is one.
    """
    if resource == "pcie":
        rate, src = h2d_rate(hw, chunk_bytes, use_measured)
        t = op.pcie_bytes / rate
        return OpTime(t, "pcie", "transfer" if t > 0 else "none", src, 0.0, t)
    if resource not in ("gpu", "cpu"):
        raise SpecError("resource", f"unknown resource {resource!r}", f"one of {', '.join(RESOURCES)}")
    if kind not in KINDS:
        raise SpecError("kind", f"unknown operation kind {kind!r}", f"one of {', '.join(KINDS)}")
    nbytes = op.hbm_bytes if resource == "gpu" else op.dram_bytes
    bw, bw_src = memory_bandwidth(hw, resource, use_measured)
    rate, c_src = compute_rate(hw, resource, dtype, kind, tokens, use_measured)
    compute_s = op.flops / rate
    memory_s = nbytes / bw
    t = max(compute_s, memory_s)
    bound = "none" if t == 0 else ("compute" if compute_s >= memory_s else "memory")
    src = "measured" if "measured" in (c_src, bw_src) and t > 0 else "peak"
    if (resource == "cpu" and kind == "attention" and use_measured and hw.measured.cpu_attention_kv_GBps
            and nbytes > 0 and n_query):
        gbps = hw.measured.cpu_attention_GBps(int(round(n_query)), context or 1.0)
        t = nbytes / (gbps * 1e9)
        src = "measured"
    return OpTime(t, resource, bound, src, compute_s, memory_s)


def cpu_dram_sharing(hw: HardwareSpec, op: OpCost, *, dtype: str, kind: str = "gemm", tokens: float | None = None,
                     n_query: float | None = None, context: float | None = None,
                     use_measured: bool = True) -> tuple[float, float]:
    """dram_sharing of `op` timed on the CPU by time_on with these arguments."""
    ot = time_on("cpu", hw, op, dtype=dtype, kind=kind, tokens=tokens, n_query=n_query, context=context,
                 use_measured=use_measured)
    return dram_sharing(hw, op, ot, kind=kind, context=context, use_measured=use_measured)


def dram_sharing(hw: HardwareSpec, op: OpCost, ot: OpTime, *, kind: str = "gemm", context: float | None = None,
                 use_measured: bool = True) -> tuple[float, float]:
    """(stretch, pressure) of a CPU operation `op` (its time alone `ot`) beside the expert stream.

    Its DRAM reads take m = bytes / ceiling alone, where the ceiling is the CPU's DRAM rate, or for
    verify attention timed by a measured KV-GB/s curve the kernel's own rate at its fewest queries (its
    most DRAM-bound point, at the same context). Beside the stream the ceiling falls to f_cpu x ceiling:
        stretch  = max(t, m / f_cpu) / t          (>= 1; 1 while the operation stays compute-bound)
        pressure = min(1, m / t)                  (1: it reads DRAM at the full rate the whole time)
    (1, 0) without a measured contention (or with use_measured=False: it is a measurement)."""
    c = hw.measured.dram_contention
    t = ot.time_s
    if c is None or not use_measured or t <= 0 or op.dram_bytes <= 0:
        return 1.0, 0.0
    mem_s = ot.memory_s
    if kind == "attention" and hw.measured.cpu_attention_kv_GBps:
        mem_s = op.dram_bytes / (hw.measured.cpu_attention_GBps(1, context or 1.0) * 1e9)
    return max(t, mem_s / c.cpu_share) / t, min(1.0, mem_s / t)
