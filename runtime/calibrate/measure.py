"""The measurements of `specmoe calibrate` (runtime/calibrate/run.py) and the machine facts they need.
Each measurement is a plain function returning numbers (tested one by one):

    measure_dram_read_GBps         multi-threaded streaming read (torch .sum()) of a buffer >> L3
    measure_host_copy_GBps_by_chunk_MB  copies of chunks from a cold pool into one warm buffer
    measure_cpu_gemm_GFLOPs_by_M   x[M,h] @ W[h,F] of the model's expert shape, M = 1..256
    measure_cpu_attention_kv_GBps  runtime.kernels.verify_attention over a cold pool of KV layers
    measure_pinned_copy_GBps_by_chunk_MB, measure_gpu_gemm_TFLOPs_by_M, measure_hbm_copy_GBps,
    gpu_facts                      the CUDA side (CUDA events, warm-up, medians)
    measure_dram_contention        verify attention and pinned H2D, alone and together (in
                                   runtime/calibrate/contention.py, on the helpers kv_flat, kv_layers)
    measure_stage_overheads        the engine's own stage code on tiny random models (in
                                   runtime/calibrate/overhead.py); fit_overheads
                                   (runtime/calibrate/overhead_fit.py) turns the samples
                                   into `op_overhead_us` and `stage_overhead_us` (planner/overhead.py)
                                   when the spec is built, against the cost model's own roofline

CPU timings keep a low percentile (LOW_QUANTILE) of many individually timed calls, with their spread
(the machine may be shared: the fast calls are the closest to what the hardware does alone); GPU
timings keep the median of CUDA-event timings (steady there).
Chunk sizes are in MiB (2^20 bytes, written "MB" in keys as in shared/measurements), rates in
GB/s (1e9 bytes).

Dimension letters: M tokens of a GEMM, h hidden, F expert intermediate (h_e), B sequences in one
verify-attention call, N query tokens per sequence (k+1), Hq query heads, Hkv KV heads, S cache
positions, D head dim, n elements of a flat buffer.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


MiB = 2**20
GiB = 2**30
GB = 1e9
GEMM_MS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
ATTN_NS = (1, 2, 4, 8, 16)
ATTN_CONTEXTS = (512, 2048, 8192)


@dataclass(frozen=True)
class Settings:
    """How hard to measure: `quick` (~20 s here) or full (<= 2 min on 2 cores)."""

    mode: str
    reps: int                      # timed repetitions per point
    min_time_s: float              # each CPU repetition runs at least this long
    pool_min_bytes: int            # cold buffer for DRAM read, copy source, KV pool
    pool_max_bytes: int
    cpu_gemm_weight_max_bytes: int  # fp32 W[h, F] larger than this is scaled down in F
    attn_call_bytes: int           # KV bytes read by one verify-attention call (sets B)
    chunks_MB: tuple[int, ...]
    gpu_Ms: tuple[int, ...]
    # the engine-stage measurement: interleaved rounds over the configurations, iterations per configuration
    # per round; a step measured in a busy or slow spell is repeated up to max_tries times, the repeats of
    # all steps together adding at most retry_budget_s seconds
    overhead_rounds: int = 32  # pragma: no mutate
    overhead_per_round: int = 4  # pragma: no mutate
    max_tries: int = 3  # pragma: no mutate
    retry_budget_s: float = 90.0  # pragma: no mutate


# How hard each mode measures: repeats, pool sizes and the points of each curve. They set how long
# calibration takes and how precisely it measures, never what a formula computes, so mutation testing
# leaves these lines alone (`pragma: no mutate`); tests check the points against the committed
# calibrations and that quick measures no harder than full.
FULL = Settings("full", reps=5, min_time_s=0.05, pool_min_bytes=1 * GiB, pool_max_bytes=2 * GiB,  # pragma: no mutate
                cpu_gemm_weight_max_bytes=64 * MiB, attn_call_bytes=16 * MiB,  # pragma: no mutate
                chunks_MB=(1, 4, 16, 64, 256, 1024), gpu_Ms=tuple(2**i for i in range(13)))  # pragma: no mutate
QUICK = Settings("quick", reps=3, min_time_s=0.02,  # pragma: no mutate
                 pool_min_bytes=512 * MiB, pool_max_bytes=512 * MiB,  # pragma: no mutate
                 cpu_gemm_weight_max_bytes=16 * MiB, attn_call_bytes=8 * MiB,  # pragma: no mutate
                 chunks_MB=(1, 4, 16, 64, 256), gpu_Ms=tuple(2**i for i in range(11)),  # pragma: no mutate
                 overhead_rounds=3, overhead_per_round=4, max_tries=2, retry_budget_s=20.0)  # pragma: no mutate


# ---------------------------------------------------------------------------------------------
# machine facts
def mem_total_bytes() -> int:
    """MemTotal from /proc/meminfo (physical pages elsewhere)."""
    return _meminfo("MemTotal:", "SC_PHYS_PAGES")


def mem_available_bytes() -> int:
    return _meminfo("MemAvailable:", "SC_AVPHYS_PAGES")


def _meminfo(key: str, sysconf_key: str) -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf(sysconf_key))
    except (ValueError, OSError, AttributeError):
        return 8 * GiB


def l3_bytes() -> int:
    """Largest CPU cache of cpu0 (sysfs); 32 MiB if unknown."""
    best = 0
    for p in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            s = p.read_text().strip().upper()
            mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(s[-1:], 1)
            best = max(best, int(s.rstrip("KMG")) * mult)
        except (OSError, ValueError):
            continue
    return best or 32 * MiB


def pool_bytes(st: Settings) -> int:
    """A buffer well beyond the last-level cache, within a quarter of the free memory."""
    want = min(max(st.pool_min_bytes, 4 * l3_bytes()), st.pool_max_bytes)
    return max(64 * MiB, min(want, mem_available_bytes() // 4)) // MiB * MiB


# ---------------------------------------------------------------------------------------------
# CPU measurements
LOW_QUANTILE = 0.1     # the estimator of CPU timings: the 10th percentile of individually timed calls


def low_quantile(xs, q: float = LOW_QUANTILE) -> float:
    """The q-quantile of xs by the lower nearest rank (the minimum for fewer than 1/q samples)."""
    v = sorted(xs)
    return v[int(q * (len(v) - 1))]


def spread(xs) -> float:
    """(90th - 10th percentile) / 10th percentile of xs: how much the repetitions moved."""
    lo, hi = low_quantile(xs, 0.1), low_quantile(xs, 0.9)
    return (hi - lo) / lo if lo > 0 else 0.0


def _cpu_best_s(fns: dict, reps: int, min_time_s: float, spread_out: dict | None = None) -> dict:
    """Seconds per call of each fn (key -> fn()), the LOW_QUANTILE of its individually timed calls: two
    warm-up calls each, then `reps` rounds over all of them, each a batch of calls lasting at least
    min_time_s. Rounds interleave the points, so a burst of other work on a shared machine spoils one
    batch of each rather than every batch of one; a low percentile of many short calls is what the
    hardware does alone (a call that waited on a descheduled thread is slower, never faster) without
    resting on the single luckiest call. spread_out[key] gets the spread of the calls."""
    for fn in fns.values():
        fn()
        fn()
    times: dict = {k: [] for k in fns}
    for _ in range(max(1, reps)):
        for k, fn in fns.items():
            end, calls = time.perf_counter() + min_time_s, 0
            while True:
                t0 = time.perf_counter()
                fn()
                t1 = time.perf_counter()
                times[k].append(t1 - t0)
                calls += 1
                if t1 >= end or calls >= 100_000:
                    break
    if spread_out is not None:
        spread_out.update({k: round(spread(v), 3) for k, v in times.items()})
    return {k: max(low_quantile(v), 1e-9) for k, v in times.items()}


def make_pool(n_bytes: int):
    """A flat fp32 buffer [n] of random values in [-1, 1), filled by tiling a small random block."""
    import torch

    n = n_bytes // 4
    pool = torch.empty(n, dtype=torch.float32)  # [n]
    g = torch.Generator().manual_seed(0)
    block = (torch.rand(min(n, MiB), generator=g) * 2 - 1).numpy()  # [min(n, 1Mi)]
    flat = pool.numpy()  # shares memory; numpy copies on one thread, steady on a loaded machine
    for off in range(0, n, block.size):
        m = min(block.size, n - off)
        flat[off:off + m] = block[:m]
    return pool


def measure_dram_read_GBps(pool=None, *, n_bytes: int | None = None, reps: int = 5) -> float:
    """Best streaming read bandwidth (GB/s) of torch's multi-threaded sum over a buffer >> L3."""
    import torch

    if pool is None:
        pool = make_pool(n_bytes or pool_bytes(FULL))
    nbytes = pool.numel() * pool.element_size()
    pool.sum()  # warm-up (threads, page tables)
    best = math.inf
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        torch.sum(pool)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / GB


def measure_host_copy_GBps_by_chunk_MB(pool=None, chunks_MB=FULL.chunks_MB, *, reps: int = 3,
                                       min_time_s: float = FULL.min_time_s,
                                       spread_out: dict | None = None) -> dict[int, float]:
    """Host-to-host copy GB/s (bytes copied) per chunk size: each timed copy reads the next chunk of
    the cold pool (walked cyclically, as experts are read from the expert store, so every chunk
    comes from memory) into one reused destination buffer."""
    import torch

    if pool is None:
        pool = make_pool(pool_bytes(FULL))
    n = pool.numel()
    chunks = [c for c in chunks_MB if c * MiB <= n * 4]
    if not chunks:
        raise ValueError(f"measure_host_copy_GBps_by_chunk_MB: every chunk exceeds the {n * 4 // MiB} MiB pool")
    dst = torch.zeros(max(chunks) * MiB // 4, dtype=torch.float32)  # [max chunk]

    def copier(ce: int):
        d = dst[:ce]
        offsets = list(range(0, n - ce + 1, ce))
        cursor = [0]

        def one_copy():
            off = offsets[cursor[0]]
            cursor[0] = (cursor[0] + 1) % len(offsets)
            d.copy_(pool[off:off + ce])
        return one_copy

    t = _cpu_best_s({c: copier(c * MiB // 4) for c in chunks}, reps, min_time_s, spread_out)
    return {c: c * MiB / t[c] / GB for c in chunks}


def measure_cpu_gemm_GFLOPs_by_M(h: int, F: int, Ms=GEMM_MS, dtype: str = "fp32", *, reps: int = 5,
                                 min_time_s: float = 0.05, spread_out: dict | None = None) -> dict[int, float]:
    """GFLOP/s of x[M,h] @ W[h,F] (2*M*h*F flops) on the CPU for each M; W stays cache-warm, as a
    freshly streamed expert does in the engine."""
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    g = torch.Generator().manual_seed(1)
    W = (torch.rand(h, F, generator=g) - 0.5).to(dt)  # [h, F]
    X = (torch.rand(max(Ms), h, generator=g) - 0.5).to(dt)  # [M_max, h]
    def gemm(M: int):
        x = X[:M]  # [M, h]
        y = torch.empty(M, F, dtype=dt)  # [M, F]
        return lambda: torch.matmul(x, W, out=y)

    t = _cpu_best_s({M: gemm(M) for M in Ms}, reps, min_time_s, spread_out)
    return {M: 2.0 * M * h * F / t[M] / 1e9 for M in Ms}


def measure_cpu_attention_kv_GBps(n_q_heads: int, n_kv_heads: int, head_dim: int, *, pool=None,
                                  ns=ATTN_NS, contexts=ATTN_CONTEXTS, kv_dtype: str = "fp32",
                                  call_bytes: int = FULL.attn_call_bytes, reps: int = 3,
                                  min_time_s: float = FULL.min_time_s,
                                  spread_out: dict | None = None) -> dict[int, dict[int, float]]:
    """Verify-attention KV GB/s (K and V bytes read per second) per query tokens N and context:
    runtime.kernels.verify_attention on layers of KV carved from the cold pool (B sequences of
    about call_bytes each); each timed call takes the next layer, walking them cyclically, so its
    KV comes from memory as it does in a decode iteration."""
    import torch

    from specmoe.runtime.kernels.verify_attention import verify_attention

    if n_q_heads % n_kv_heads:
        raise ValueError(f"measure_cpu_attention_kv_GBps: {n_q_heads} query heads are not a multiple "
                         f"of {n_kv_heads} KV heads")
    if pool is None:
        pool = make_pool(pool_bytes(FULL))
    flat = kv_flat(pool, kv_dtype)
    eb = flat.element_size()
    Hq, Hkv, D = n_q_heads, n_kv_heads, head_dim
    g = torch.Generator().manual_seed(2)
    res: dict[int, dict[int, float]] = {N: {} for N in ns}
    for ctx in contexts:
        S = ctx + max(ns)
        B, layers = kv_layers(flat, Hkv, S, D, call_bytes)
        P = len(layers)
        slots = torch.arange(B, dtype=torch.int64)  # [B]
        ctx_lens = torch.full((B,), ctx, dtype=torch.int64)  # [B]
        cursor = [0]

        def attention(N: int):
            q = torch.rand(B, N, Hq, D, generator=g) - 0.5  # [B, N, Hq, D]
            o = torch.empty(B, N, Hq, D)  # [B, N, Hq, D]

            def one_call():
                k, v = layers[cursor[0]]
                cursor[0] = (cursor[0] + 1) % P
                verify_attention(q, k, v, slots, ctx_lens, out=o)
            return one_call

        sp: dict = {}
        t = _cpu_best_s({N: attention(N) for N in ns}, reps, min_time_s, sp)
        if spread_out is not None:
            spread_out.update({(N, ctx): v for N, v in sp.items()})
        for N in ns:
            res[N][ctx] = B * 2 * Hkv * (ctx + N) * D * eb / t[N] / GB
    return res


def kv_flat(pool, kv_dtype: str):
    """The cold pool as KV elements of kv_dtype ("fp32": the pool itself; "bf16": a copy of the same bytes)."""
    import torch

    if kv_dtype == "bf16":
        flat = torch.empty(pool.numel() * 2, dtype=torch.bfloat16)  # [n] same bytes as the pool
        flat[: pool.numel()].copy_(pool)
        flat[pool.numel():].copy_(pool)
        return flat
    if kv_dtype == "fp32":
        return pool
    raise ValueError(f"kv_dtype must be fp32 or bf16, got {kv_dtype!r}")


def kv_layers(flat, Hkv: int, S: int, D: int, call_bytes: int) -> tuple[int, list]:
    """(B, layers): as many (K, V) layers [B, Hkv, S, D] as the flat KV buffer holds, B sequences each
    (about call_bytes of K and V per layer, at most 64 sequences)."""
    eb = flat.element_size()
    seq_elems = Hkv * S * D  # one of K or V of one sequence
    B = max(1, min(64, math.ceil(call_bytes / (2 * seq_elems * eb))))
    B = max(1, min(B, flat.numel() // (2 * seq_elems)))
    layer_elems = B * seq_elems
    P = flat.numel() // (2 * layer_elems)
    if P < 1:
        raise ValueError(f"the {flat.numel() * eb // MiB} MiB pool is too small for {S} cache positions")
    return B, [(flat[2 * i * layer_elems:(2 * i + 1) * layer_elems].view(B, Hkv, S, D),  # [B, Hkv, S, D]
                flat[(2 * i + 1) * layer_elems:(2 * i + 2) * layer_elems].view(B, Hkv, S, D))
               for i in range(P)]


def attention_backend(kv_dtype: str | None = None) -> str:
    """The verify kernel's backend, with the path it takes for kv_dtype ("cpp-openmp/amx" for bf16 KV on an
    AMX host; runtime/kernels/verify_attention.py)."""
    try:
        from specmoe.runtime.kernels.verify_attention import verify_attention_backend

        return verify_attention_backend(kv_dtype)
    except Exception as e:  # noqa: BLE001 - recorded, the measurement step will raise properly
        return f"unavailable ({type(e).__name__})"


def verify_paths() -> list[str] | None:
    """The verify kernel's paths for bf16 KV on this machine, best first ("amx", "avx512bf16", "fp32");
    None without the C++ kernel."""
    try:
        from specmoe.runtime.kernels.verify_attention import available_paths

        return list(available_paths()) or None
    except Exception:  # noqa: BLE001 - no kernel: the spec keeps its base's flags
        return None


# ---------------------------------------------------------------------------------------------
# CUDA measurements (CUDA events on one stream, warm-up, medians)
def _cuda_median_s(fn: Callable[[], Any], *, reps: int = 5, target_s: float = 0.005, device=None) -> float:
    """Median seconds per call of fn() (enqueues GPU work on the current stream) by CUDA events."""
    import torch

    stream = torch.cuda.current_stream(device)
    fn()
    fn()
    torch.cuda.synchronize(device)
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record(stream)
    fn()
    e1.record(stream)
    e1.synchronize()
    once = max(e0.elapsed_time(e1) / 1e3, 1e-7)
    iters = max(1, min(10_000, int(target_s / once)))
    times = []
    for _ in range(max(1, reps)):
        e0.record(stream)
        for _ in range(iters):
            fn()
        e1.record(stream)
        e1.synchronize()
        times.append(e0.elapsed_time(e1) / 1e3 / iters)
    return statistics.median(times)


def measure_pinned_copy_GBps_by_chunk_MB(chunks_MB=FULL.chunks_MB, direction: str = "h2d", *,
                                         reps: int = 5, device=None) -> dict[int, float]:
    """Pinned host <-> GPU copy GB/s per chunk size (one chunk per copy, back to back)."""
    import torch

    if direction not in ("h2d", "d2h"):
        raise ValueError(f"direction must be 'h2d' or 'd2h', got {direction!r}")
    dev = torch.device("cuda", torch.cuda.current_device() if device is None else device)
    nbytes = max(chunks_MB) * MiB
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)  # [bytes]
    host.fill_(1)
    gpu = torch.empty(nbytes, dtype=torch.uint8, device=dev)  # [bytes]
    out = {}
    with torch.cuda.device(dev):
        for c in chunks_MB:
            hb, gb = host[: c * MiB], gpu[: c * MiB]
            src, dst = (hb, gb) if direction == "h2d" else (gb, hb)
            t = _cuda_median_s(lambda: dst.copy_(src, non_blocking=True), reps=reps, target_s=0.01, device=dev)
            out[c] = c * MiB / t / GB
    del host, gpu
    torch.cuda.empty_cache()
    return out


def measure_gpu_gemm_TFLOPs_by_M(h: int, F: int, Ms=FULL.gpu_Ms, dtype: str = "bf16", *, reps: int = 5,
                                 device=None) -> dict[int, float]:
    """TFLOP/s of x[M,h] @ W[h,F] on the GPU for each M."""
    import torch

    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    dev = torch.device("cuda", torch.cuda.current_device() if device is None else device)
    g = torch.Generator(device=dev).manual_seed(1)
    W = (torch.rand(h, F, generator=g, device=dev) - 0.5).to(dt)  # [h, F]
    X = (torch.rand(max(Ms), h, generator=g, device=dev) - 0.5).to(dt)  # [M_max, h]
    out = {}
    with torch.cuda.device(dev):
        for M in Ms:
            x = X[:M]  # [M, h]
            y = torch.empty(M, F, dtype=dt, device=dev)  # [M, F]
            t = _cuda_median_s(lambda: torch.matmul(x, W, out=y), reps=reps, device=dev)
            out[M] = 2.0 * M * h * F / t / 1e12
    del W, X
    torch.cuda.empty_cache()
    return out


def measure_hbm_copy_GBps(n_bytes: int = GiB, *, reps: int = 5, device=None) -> float:
    """GPU memory copy GB/s counting bytes read plus written."""
    import torch

    dev = torch.device("cuda", torch.cuda.current_device() if device is None else device)
    src = torch.ones(n_bytes // 4, dtype=torch.float32, device=dev)  # [n]
    dst = torch.empty_like(src)  # [n]
    with torch.cuda.device(dev):
        t = _cuda_median_s(lambda: dst.copy_(src), reps=reps, target_s=0.01, device=dev)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n_bytes / t / GB


def gpu_facts(device=None) -> dict[str, Any]:
    """Name and total memory (mem_get_info) of the GPU."""
    import torch

    dev = torch.device("cuda", torch.cuda.current_device() if device is None else device)
    free, total = torch.cuda.mem_get_info(dev)
    return {"name": torch.cuda.get_device_name(dev), "mem_GiB": round(total / GiB, 1),
            "free_GiB": round(free / GiB, 1)}
