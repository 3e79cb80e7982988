"""`specmoe calibrate`: measure this machine and write a hardware spec with measured curves.

    calibrate(out_path, model=None, base=None, quick=False, force=False, progress=True) -> HardwareSpec

writes a YAML in the schema of planner/hardware_spec.py: `gpu`/`cpu`/`link` peaks (copied from a
base spec, with this machine's facts and raised to a measurement that exceeds them) and a
`measured:` section whose curves override the peaks in the cost model. Without a CUDA GPU the CPU
stands in for the GPU (the engine runs there): `gpu` is this CPU with a third of the RAM budgeted
as device memory, the GPU GEMM curve is the CPU's fp32 one and "H2D" is a host memory copy.

Each measurement is a plain function returning numbers (tested one by one):

    measure_dram_read_GBps         multi-threaded streaming read (torch .sum()) of a buffer >> L3
    measure_host_copy_GBps_by_chunk_MB  copies of chunks from a cold pool into one warm buffer
    measure_cpu_gemm_GFLOPs_by_M   x[M,h] @ W[h,F] of the model's expert shape, M = 1..256
    measure_cpu_attention_kv_GBps  runtime.kernels.verify_attention over a cold pool of KV layers
    measure_pinned_copy_GBps_by_chunk_MB, measure_gpu_gemm_TFLOPs_by_M, measure_hbm_copy_GBps,
    gpu_facts                      the CUDA side (CUDA events, warm-up, medians)
    measure_stage_overheads        the engine's own stage code on tiny random models (in
                                   runtime/calibrate_overhead.py); fit_overheads turns the samples
                                   into `op_overhead_us` and `stage_overhead_us` (planner/overhead.py)
                                   when the spec is built, against the cost model's own roofline

CPU timings keep the best of many individually timed calls (the machine may be shared: the best
call is the closest to what the hardware does alone); GPU timings keep the median of CUDA-event
timings (steady there).
Chunk sizes are in MiB (2^20 bytes, written "MB" in keys as in shared/measurements), rates in
GB/s (1e9 bytes).

Set OMP_WAIT_POLICY=PASSIVE before torch is imported (the CLI does): spinning OpenMP threads of an
idle pool slow the engine's small operations several-fold on shared cores, and the fixed costs
measured here are those of the engine as it runs.

Results are cached by machine fingerprint (CPU, cores, memory, GPU, torch, threads, OMP wait policy,
the sources of the kernels and the engine, the measured shapes and the mode) under
${SPECMOE_CACHE_DIR:-~/.cache/specmoe}/calibration/<fingerprint>.yaml; `force` re-measures.
Every file is written to a temporary file and renamed, so an interrupted run leaves none behind.

Dimension letters: M tokens of a GEMM, h hidden, F expert intermediate (h_e), B sequences in one
verify-attention call, N query tokens per sequence (k+1), Hq query heads, Hkv KV heads, S cache
positions, D head dim, n elements of a flat buffer.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from planner.errors import SpecError
from planner.hardware_spec import HardwareSpec, load_hardware, parse_hardware
from planner.model_spec import ModelSpec, load_model

MiB = 2**20
GiB = 2**30
GB = 1e9
FORMAT_VERSION = 2
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "tiny-moe"
DEFAULT_DRAFT_DIR = REPO_ROOT / "models" / "tiny-draft"
FALLBACK_MODEL = "mixtral-8x7b"
DEFAULT_CPU_BASE = "devbox-2core"
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
    overhead_rounds: int = 6       # engine-stage measurement: interleaved rounds over the configurations
    overhead_per_round: int = 5    # iterations per configuration per round


FULL = Settings("full", reps=5, min_time_s=0.05, pool_min_bytes=1 * GiB, pool_max_bytes=2 * GiB,
                cpu_gemm_weight_max_bytes=64 * MiB, attn_call_bytes=16 * MiB,
                chunks_MB=(1, 4, 16, 64, 256, 1024), gpu_Ms=tuple(2**i for i in range(13)))
QUICK = Settings("quick", reps=3, min_time_s=0.02, pool_min_bytes=512 * MiB, pool_max_bytes=512 * MiB,
                 cpu_gemm_weight_max_bytes=16 * MiB, attn_call_bytes=8 * MiB,
                 chunks_MB=(1, 4, 16, 64, 256), gpu_Ms=tuple(2**i for i in range(11)),
                 overhead_rounds=3, overhead_per_round=4)


# ---------------------------------------------------------------------------------------------
# machine facts
def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


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


def _pool_bytes(st: Settings) -> int:
    """A buffer well beyond the last-level cache, within a quarter of the free memory."""
    want = min(max(st.pool_min_bytes, 4 * l3_bytes()), st.pool_max_bytes)
    return max(64 * MiB, min(want, mem_available_bytes() // 4)) // MiB * MiB


# ---------------------------------------------------------------------------------------------
# CPU measurements
def _cpu_best_s(fns: dict, reps: int, min_time_s: float) -> dict:
    """Best seconds per call of each fn (key -> fn()): two warm-up calls each, then `reps` rounds
    over all of them, each a batch of individually timed calls lasting at least min_time_s. Rounds
    interleave the points, so a burst of other work on a shared machine spoils one batch of each
    rather than every batch of one; the best call is kept, as timeit does (a call that waited on a
    descheduled OpenMP thread is slower, never faster)."""
    for fn in fns.values():
        fn()
        fn()
    best = {k: math.inf for k in fns}
    for _ in range(max(1, reps)):
        for k, fn in fns.items():
            end, calls = time.perf_counter() + min_time_s, 0
            while True:
                t0 = time.perf_counter()
                fn()
                t1 = time.perf_counter()
                best[k], calls = min(best[k], t1 - t0), calls + 1
                if t1 >= end or calls >= 100_000:
                    break
    return {k: max(v, 1e-9) for k, v in best.items()}


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
        pool = make_pool(n_bytes or _pool_bytes(FULL))
    nbytes = pool.numel() * pool.element_size()
    pool.sum()  # warm-up (threads, page tables)
    best = math.inf
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        torch.sum(pool)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / GB


def measure_host_copy_GBps_by_chunk_MB(pool=None, chunks_MB=FULL.chunks_MB, *, reps: int = 3,
                                       min_time_s: float = FULL.min_time_s) -> dict[int, float]:
    """Host-to-host copy GB/s (bytes copied) per chunk size: each timed copy reads the next chunk of
    the cold pool (walked cyclically, as experts are read from the expert store, so every chunk
    comes from memory) into one reused destination buffer."""
    import torch

    if pool is None:
        pool = make_pool(_pool_bytes(FULL))
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

    t = _cpu_best_s({c: copier(c * MiB // 4) for c in chunks}, reps, min_time_s)
    return {c: c * MiB / t[c] / GB for c in chunks}


def measure_cpu_gemm_GFLOPs_by_M(h: int, F: int, Ms=GEMM_MS, dtype: str = "fp32", *, reps: int = 5,
                                 min_time_s: float = 0.05) -> dict[int, float]:
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

    t = _cpu_best_s({M: gemm(M) for M in Ms}, reps, min_time_s)
    return {M: 2.0 * M * h * F / t[M] / 1e9 for M in Ms}


def measure_cpu_attention_kv_GBps(n_q_heads: int, n_kv_heads: int, head_dim: int, *, pool=None,
                                  ns=ATTN_NS, contexts=ATTN_CONTEXTS, kv_dtype: str = "fp32",
                                  call_bytes: int = FULL.attn_call_bytes, reps: int = 3,
                                  min_time_s: float = FULL.min_time_s) -> dict[int, dict[int, float]]:
    """Verify-attention KV GB/s (K and V bytes read per second) per query tokens N and context:
    runtime.kernels.verify_attention on layers of KV carved from the cold pool (B sequences of
    about call_bytes each); each timed call takes the next layer, walking them cyclically, so its
    KV comes from memory as it does in a decode iteration."""
    import torch

    from runtime.kernels.verify_attention import verify_attention

    if n_q_heads % n_kv_heads:
        raise ValueError(f"measure_cpu_attention_kv_GBps: {n_q_heads} query heads are not a multiple "
                         f"of {n_kv_heads} KV heads")
    if pool is None:
        pool = make_pool(_pool_bytes(FULL))
    if kv_dtype == "bf16":
        flat = torch.empty(pool.numel() * 2, dtype=torch.bfloat16)  # [n] same bytes as the pool
        flat[: pool.numel()].copy_(pool)
        flat[pool.numel():].copy_(pool)
    elif kv_dtype == "fp32":
        flat = pool
    else:
        raise ValueError(f"kv_dtype must be fp32 or bf16, got {kv_dtype!r}")
    eb = flat.element_size()
    Hq, Hkv, D = n_q_heads, n_kv_heads, head_dim
    g = torch.Generator().manual_seed(2)
    res: dict[int, dict[int, float]] = {N: {} for N in ns}
    for ctx in contexts:
        S = ctx + max(ns)
        seq_elems = Hkv * S * D  # one of K or V of one sequence
        B = max(1, min(64, math.ceil(call_bytes / (2 * seq_elems * eb))))
        B = max(1, min(B, flat.numel() // (2 * seq_elems)))
        layer_elems = B * seq_elems
        P = flat.numel() // (2 * layer_elems)
        if P < 1:
            raise ValueError(f"measure_cpu_attention_kv_GBps: the pool is too small for context {ctx}")
        layers = [(flat[2 * i * layer_elems:(2 * i + 1) * layer_elems].view(B, Hkv, S, D),  # [B, Hkv, S, D]
                   flat[(2 * i + 1) * layer_elems:(2 * i + 2) * layer_elems].view(B, Hkv, S, D))
                  for i in range(P)]
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

        t = _cpu_best_s({N: attention(N) for N in ns}, reps, min_time_s)
        for N in ns:
            res[N][ctx] = B * 2 * Hkv * (ctx + N) * D * eb / t[N] / GB
    return res


def attention_backend() -> str:
    try:
        from runtime.kernels.verify_attention import verify_attention_backend

        return verify_attention_backend()
    except Exception as e:  # noqa: BLE001 - recorded, the measurement step will raise properly
        return f"unavailable ({type(e).__name__})"


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


# ---------------------------------------------------------------------------------------------
# inputs, fingerprint, cache, files
def resolve_model(model) -> tuple[str, ModelSpec]:
    """(label, spec) of the model whose shapes are measured; the tiny target by default."""
    if model is None:
        if (DEFAULT_MODEL_DIR / "config.json").is_file():
            return "models/tiny-moe", load_model(DEFAULT_MODEL_DIR)
        return FALLBACK_MODEL, load_model(FALLBACK_MODEL)
    try:
        return str(model), load_model(model)
    except SpecError as e:
        raise SpecError("--model", e.problem if e.field == "model" else f"{e.field}: {e.problem}", e.fix) from None


def resolve_model_config(model) -> dict:
    """The HF config.json mapping of the calibration model (as resolve_model finds it)."""
    from planner.model_spec import PRESET_DIR

    if model is None:
        p = DEFAULT_MODEL_DIR / "config.json"
        if not p.is_file():
            p = PRESET_DIR / f"{FALLBACK_MODEL}.json"
    elif (PRESET_DIR / f"{model}.json").is_file():
        p = PRESET_DIR / f"{model}.json"
    else:
        p = Path(model)
        if p.is_dir():
            p = p / "config.json"
    try:
        cfg = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SpecError("--model", f"cannot read {p}: {e}", "give a preset or a config.json") from None
    if not isinstance(cfg, dict):
        raise SpecError("--model", f"{p} is not a JSON object", "give a HF config.json")
    return cfg


def engine_configs(model_cfg: dict) -> dict:
    """The tiny target and drafts (1 and 2 layers) of the engine-stage measurement."""
    from .calibrate_overhead import draft_config, shrink_config

    target = shrink_config(model_cfg)
    base = None
    if (DEFAULT_DRAFT_DIR / "config.json").is_file():
        try:
            base = json.loads((DEFAULT_DRAFT_DIR / "config.json").read_text())
        except (OSError, ValueError):
            base = None
    return {"target": target, "drafts": {n: draft_config(target, base, n) for n in (1, 2)}}


def resolve_base(base) -> dict:
    """The raw mapping of the base hardware spec (a preset name or a spec YAML)."""
    try:
        return load_hardware(base).raw
    except SpecError as e:
        raise SpecError("--base", e.problem if e.field == "hardware" else f"{e.field}: {e.problem}", e.fix) from None


def measured_shapes(spec: ModelSpec, st: Settings) -> dict[str, Any]:
    """Expert GEMM and attention shapes; the CPU GEMM's F is halved until fp32 W fits the budget."""
    F = spec.expert_intermediate if spec.is_moe else spec.dense_intermediate
    if F <= 0 or spec.hidden <= 0:
        raise SpecError("--model", f"{spec.name} has no expert or FFN intermediate size", "give an MoE model")
    F_cpu = F
    while F_cpu > 64 and spec.hidden * F_cpu * 4 > st.cpu_gemm_weight_max_bytes:
        F_cpu = max(64, F_cpu // 2)
    structure = hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:12]
    return {"h": spec.hidden, "F": F, "F_cpu": F_cpu, "n_q": spec.num_q_heads, "n_kv": spec.num_kv_heads,
            "d": spec.head_dim, "structure": structure}


def specmoe_version() -> str:
    try:
        from importlib.metadata import version

        return version("specmoe")
    except Exception:  # noqa: BLE001 - not installed: the source tree's version
        return "source"


ENGINE_SOURCES = ("kernels/verify_attention.py", "kernels/csrc/verify_attention.cpp", "kernels/moe_ops.py",
                  "target_model.py", "draft_model.py", "speculative.py", "kv_cache.py", "layers.py",
                  "expert_store.py", "run_record.py", "calibrate_overhead.py")


def kernel_source_sha() -> str:
    """Hash of the kernels' and the engine's sources (the fixed costs are the engine's) and of the
    bundled draft's config (the draft of the engine-stage measurement)."""
    h = hashlib.sha256()
    for p in [REPO_ROOT / "runtime" / f for f in ENGINE_SOURCES] + [DEFAULT_DRAFT_DIR / "config.json"]:
        try:
            h.update(p.read_bytes())
        except OSError:
            h.update(b"missing")
    return h.hexdigest()[:16]


def cache_dir(override: str | Path | None = None) -> Path:
    if override is not None:
        return Path(override)
    base = os.environ.get("SPECMOE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "specmoe")
    return Path(base) / "calibration"


def fingerprint(facts: dict, shapes: dict, mode: str) -> tuple[str, dict]:
    import torch

    fp = {"format": FORMAT_VERSION, "cpu": facts["cpu_name"], "cores": facts["cores"],
          "mem_GiB": round(facts["mem_total_bytes"] / GiB), "gpu": facts["gpu_name"] or "none",
          "torch": str(torch.__version__), "specmoe": specmoe_version(), "kernel_sha": kernel_source_sha(),
          "threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
          "shapes": shapes, "mode": mode}
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:20], fp


def check_output_path(out_path) -> Path:
    """The -o path, checked before anything is measured: a .yaml in a writable directory."""
    if out_path is None or str(out_path).strip() == "":
        raise SpecError("-o", "missing", "give the spec file to write, e.g. -o hw_specs/mybox.yaml")
    p = Path(out_path).expanduser()
    if p.suffix not in (".yaml", ".yml"):
        raise SpecError("-o", f"{p} does not end in .yaml", "name the output e.g. hw_specs/mybox.yaml")
    if p.is_dir():
        raise SpecError("-o", f"{p} is a directory", "give a file name ending in .yaml")
    if p.parent.exists() and not p.parent.is_dir():
        raise SpecError("-o", f"{p.parent} is not a directory", "choose a path inside a directory")
    if not p.parent.is_dir():
        raise SpecError("-o", f"directory {p.parent} does not exist", "create it first or choose another path")
    try:
        fd, probe = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise SpecError("-o", f"cannot write in {p.parent} ({e.strerror})", "choose a writable path") from None
    return p


def atomic_write_text(path: Path, text: str) -> None:
    """Write through a temporary file in the same directory and rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file a normal file's mode
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _r(x: float) -> float:
    return float(f"{x:.4g}")


def _curve(d: dict, scale: float = 1.0) -> dict:
    return {int(k): _r(v * scale) for k, v in sorted(d.items(), key=lambda kv: int(kv[0]))}


def _plain(x: Any) -> Any:
    """Plain YAML-safe Python (int keys kept) from measurement results."""
    if isinstance(x, dict):
        return {(k if isinstance(k, (int, str)) else str(k)): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, bool) or x is None:
        return x
    if isinstance(x, int):
        return int(x)
    if isinstance(x, float):
        return float(x)
    return str(x)


class _SpecDumper(yaml.SafeDumper):
    """Block style for sections, flow style for curves and other all-scalar mappings of numbers."""


def _represent_dict(dumper: yaml.SafeDumper, d: dict):
    flow = bool(d) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in d.values())
    return dumper.represent_mapping("tag:yaml.org,2002:map", d.items(), flow_style=flow)


_SpecDumper.add_representer(dict, _represent_dict)


# ---------------------------------------------------------------------------------------------
def run_measurements(st: Settings, shapes: dict, has_gpu: bool, progress: bool = True,
                     engine_cfgs: dict | None = None) -> dict[str, Any]:
    """All measurement steps under one tqdm bar; returns the raw results (what the cache holds).
    engine_cfgs: {"target": HF config, "drafts": {layers: HF config}} of the engine-stage step."""
    from tqdm import tqdm

    engine_dtype = "bf16" if has_gpu else "fp32"
    res: dict[str, Any] = {}
    state: dict[str, Any] = {}
    h, F, F_cpu = shapes["h"], shapes["F"], shapes["F_cpu"]

    def pool():
        state["pool"] = make_pool(_pool_bytes(st))
        res["pool_MiB"] = state["pool"].numel() * 4 // MiB

    def gemm(dtype):
        def step():
            try:
                res.setdefault("cpu_gemm_GFLOPs_by_M", {})[dtype] = measure_cpu_gemm_GFLOPs_by_M(
                    h, F_cpu, GEMM_MS, dtype, reps=st.reps, min_time_s=st.min_time_s)
            except RuntimeError as e:  # a dtype this CPU/torch cannot multiply: recorded, not fatal
                if dtype == engine_dtype:
                    raise
                res.setdefault("skipped", {})[f"cpu_gemm_{dtype}"] = str(e).splitlines()[0]
        return step

    def overheads():
        from .calibrate_overhead import measure_stage_overheads

        cfgs = engine_cfgs
        if not cfgs:
            res.setdefault("skipped", {})["stage_overheads"] = "no engine configuration for this model"
            return
        try:
            res["stage_overheads"] = measure_stage_overheads(
                cfgs["target"], {int(k): v for k, v in cfgs["drafts"].items()}, rounds=st.overhead_rounds,
                per_round=st.overhead_per_round, progress=lambda msg: bar.set_postfix_str(msg))
        except (SpecError, ValueError, NotImplementedError, RuntimeError) as e:   # a family the engine lacks
            res.setdefault("skipped", {})["stage_overheads"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"

    steps: list[tuple[str, Callable[[], None]]] = [
        ("fill a cold buffer", pool),
        ("DRAM read", lambda: res.__setitem__("dram_read_GBps", measure_dram_read_GBps(
            state["pool"], reps=st.reps))),
        ("host memory copy", lambda: res.__setitem__("host_copy_GBps_by_chunk_MB", measure_host_copy_GBps_by_chunk_MB(
            state["pool"], st.chunks_MB, reps=st.reps, min_time_s=st.min_time_s))),
        ("CPU GEMM fp32", gemm("fp32")),
        ("CPU GEMM bf16", gemm("bf16")),
        ("CPU verify attention", lambda: res.__setitem__("cpu_attention_kv_GBps", measure_cpu_attention_kv_GBps(
            shapes["n_q"], shapes["n_kv"], shapes["d"], pool=state["pool"], kv_dtype=engine_dtype,
            call_bytes=st.attn_call_bytes, reps=st.reps, min_time_s=st.min_time_s))),
        ("engine stage overheads", overheads),
        # read again at the end and keep the better: a burst of other work spoils one pass, not both
        ("DRAM read again", lambda: res.__setitem__("dram_read_GBps", max(res["dram_read_GBps"], measure_dram_read_GBps(
            state["pool"], reps=st.reps)))),
    ]
    if has_gpu:
        steps += [
            ("GPU facts", lambda: res.__setitem__("gpu_facts", gpu_facts())),
            ("pinned H2D", lambda: res.__setitem__("h2d_GBps_by_chunk_MB", measure_pinned_copy_GBps_by_chunk_MB(
                st.chunks_MB, "h2d"))),
            ("pinned D2H", lambda: res.__setitem__("d2h_GBps_by_chunk_MB", measure_pinned_copy_GBps_by_chunk_MB(
                st.chunks_MB, "d2h"))),
            ("GPU GEMM bf16", lambda: res.__setitem__("gpu_gemm_TFLOPs_by_M", measure_gpu_gemm_TFLOPs_by_M(
                h, F, st.gpu_Ms, "bf16"))),
            ("GPU GEMM fp32", lambda: res.__setitem__("gpu_fp32_gemm_TFLOPs", max(measure_gpu_gemm_TFLOPs_by_M(
                h, F, (max(st.gpu_Ms),), "fp32").values()))),
            ("HBM copy", lambda: res.__setitem__("hbm_copy_GBps", measure_hbm_copy_GBps())),
        ]
    t0 = time.perf_counter()
    res["load_avg_before"] = _load_avg()
    bar = tqdm(total=len(steps), desc="specmoe calibrate", unit="step", disable=not progress, file=sys.stderr,
               leave=True, bar_format="{desc}: {n}/{total} |{bar}| {elapsed} {postfix}")
    try:
        for name, fn in steps:
            bar.set_postfix_str(name)
            fn()
            bar.update(1)
    finally:
        bar.close()
        state.clear()
    res["elapsed_s"] = round(time.perf_counter() - t0, 1)
    res["load_avg_after"] = _load_avg()
    return res


def _load_avg() -> float | None:
    """1-minute load average: above the core count, other processes were competing for the CPU."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _machine_facts() -> dict[str, Any]:
    import torch

    has_gpu = bool(torch.cuda.is_available())
    return {"cpu_name": cpu_model_name(), "cores": os.cpu_count() or 1, "mem_total_bytes": mem_total_bytes(),
            "gpu_name": torch.cuda.get_device_name() if has_gpu else None, "torch": str(torch.__version__),
            "threads": torch.get_num_threads()}


def _describe(facts: dict) -> str:
    gpu = facts["gpu_name"] or "no GPU"
    return (f"{facts['cpu_name']} ({facts['cores']} cores, {facts['mem_total_bytes'] / GiB:.1f} GiB RAM), {gpu}; "
            f"torch {facts['torch']} with {facts['threads']} threads")


def _base_note(base_raw: dict | None, section: str) -> str:
    return f" (base: {base_raw[section].get('source', '')})" if base_raw else ""


def build_spec_raw(cached: dict, base_raw: dict | None, base_label: str | None, name: str) -> dict:
    """The hardware spec (schema of planner/hardware_spec.py) from cached results and a base."""
    r, facts, shapes = cached["results"], cached["facts"], cached["shapes"]
    date, machine = cached["measured_at"], _describe(facts)
    has_gpu = facts["gpu_name"] is not None
    edt = "bf16" if has_gpu else "fp32"
    gemm = r["cpu_gemm_GFLOPs_by_M"]
    cpu_peak = {dt: max(c.values()) / 1e3 for dt, c in gemm.items()}  # TFLOP/s
    mem_GiB = facts["mem_total_bytes"] / GiB
    host_copy = r["host_copy_GBps_by_chunk_MB"]
    big = max(host_copy)
    tag = f"specmoe calibrate {date}"

    def raised(sec: dict, key: str, measured: float) -> None:
        old = sec.get(key)
        if not isinstance(old, (int, float)) or measured > old:
            sec[key] = _r(measured)

    if base_raw is not None:
        gpu = dict(base_raw["gpu"])
        cpu = dict(base_raw["cpu"])
        link = dict(base_raw["link"])
        gpu["peak_TFLOPs"] = dict(gpu.get("peak_TFLOPs") or {})
        cpu["peak_TFLOPs"] = dict(cpu.get("peak_TFLOPs") or {})
        peaks_from = f"peaks from base {base_label}, raised to a measured value where it was higher"
    else:
        gpu, cpu, link = {"peak_TFLOPs": {}}, {"peak_TFLOPs": {}}, {}
        peaks_from = "no base given: the best measured values are used as the peaks"
    cpu.update(name=f"{facts['cpu_name']} ({facts['cores']} cores)", cores=int(facts["cores"]))
    cpu.pop("mem_GB", None)
    for dt, v in cpu_peak.items():
        raised(cpu["peak_TFLOPs"], dt, v)
    raised(cpu, "dram_GBps", r["dram_read_GBps"])
    cpu["source"] = (f"{tag}: name, cores, memory (/proc/meminfo) of this machine; DRAM read and GEMM "
                     f"measured; {peaks_from}" + _base_note(base_raw, "cpu"))
    if has_gpu:
        gf = r["gpu_facts"]
        cpu["mem_GiB"] = round(mem_GiB, 1)
        gpu.pop("mem_GB", None)
        gpu.update(name=gf["name"], mem_GiB=gf["mem_GiB"])
        raised(gpu, "hbm_GBps", r["hbm_copy_GBps"])
        raised(gpu["peak_TFLOPs"], "bf16", max(r["gpu_gemm_TFLOPs_by_M"].values()))
        raised(gpu["peak_TFLOPs"], "fp32", r["gpu_fp32_gemm_TFLOPs"])
        gpu["source"] = (f"{tag}: name and memory from torch.cuda (mem_get_info); HBM copy and bf16/fp32 GEMM "
                         f"measured; {peaks_from}" + _base_note(base_raw, "gpu"))
        raised(link, "h2d_GBps", max(r["h2d_GBps_by_chunk_MB"].values()))
        raised(link, "d2h_GBps", max(r["d2h_GBps_by_chunk_MB"].values()))
        link["source"] = f"{tag}: pinned H2D/D2H copies by chunk size; {peaks_from}"
        h2d_curve = r["h2d_GBps_by_chunk_MB"]
        gpu_gemm = _curve(r["gpu_gemm_TFLOPs_by_M"])
        hbm_copy = r["hbm_copy_GBps"]
    else:
        cpu["mem_GiB"] = round(mem_GiB / 2, 1)
        gpu = {"name": "CPU standing in for the GPU", "mem_GiB": round(mem_GiB / 3, 1),
               "shares_host_cpu": True,          # the same cores: the cost model overlaps nothing
               "hbm_GBps": _r(r["dram_read_GBps"]),
               "peak_TFLOPs": {dt: _r(v) for dt, v in sorted(cpu_peak.items())},
               "source": (f"{tag}: no GPU, so the engine runs on this CPU: DRAM read and best expert GEMM "
                          f"measured here; a third of the {mem_GiB:.1f} GiB RAM budgeted as device memory "
                          f"(and half as CPU memory)")}
        raised(link, "h2d_GBps", max(host_copy.values()))
        raised(link, "d2h_GBps", max(host_copy.values()))
        link["source"] = (f"{tag}: no GPU, so 'H2D' is a host memory copy (cold source, warm destination), "
                          f"best over chunk sizes; {peaks_from}")
        h2d_curve = host_copy
        gpu_gemm = _curve(gemm["fp32"], 1e-3)
        hbm_copy = 2 * host_copy[big]
    measured = {
        "source": (f"{tag} on {machine}; {cached['mode']} mode; CPU: best of many timed calls, GPU: medians of "
                   f"CUDA-event timings; expert GEMM x[M,{shapes['h']}] @ W[{shapes['h']},F] with F="
                   f"{shapes['F']} on the GPU and F={shapes['F_cpu']} on the CPU ({cached['model']}); verify "
                   f"attention Hq={shapes['n_q']} Hkv={shapes['n_kv']} D={shapes['d']} {edt} KV by "
                   f"{facts['attention_backend']}"),
        "h2d_GBps_by_chunk_MB": _curve(h2d_curve),
        "gpu_gemm_TFLOPs_by_M": gpu_gemm,
        "cpu_gemm_GFLOPs_by_M": _curve(gemm[edt] if edt in gemm else gemm["fp32"]),
        "cpu_attention_kv_GBps": {f"q{n}": _curve(c) for n, c in
                                  sorted(r["cpu_attention_kv_GBps"].items(), key=lambda kv: int(kv[0]))},
        "dram_read_GBps": _r(r["dram_read_GBps"]),
        "hbm_copy_GBps": _r(hbm_copy),
        # informational, not read by the planner
        "details": {
            "cpu_gemm_GFLOPs_by_M_by_dtype": {dt: _curve(c) for dt, c in gemm.items()},
            "host_copy_GBps_by_chunk_MB": _curve(host_copy),
            **({"d2h_GBps_by_chunk_MB": _curve(r["d2h_GBps_by_chunk_MB"])} if has_gpu else {}),
            "cold_buffer_MiB": r.get("pool_MiB"),
            "skipped": r.get("skipped", {}),
            "elapsed_s": r.get("elapsed_s"),
            "load_avg_1min": [r.get("load_avg_before"), r.get("load_avg_after")],
            "fingerprint": cached["fingerprint_id"],
        },
    }
    gpu, cpu, link = (_ordered(sec) for sec in (gpu, cpu, link))
    desc = (f"Calibrated by `specmoe calibrate` on {date}: {machine}."
            + ("" if has_gpu else " No GPU: 'gpu' is this CPU standing in for it and 'link' is a host memory copy."))
    raw = {"name": name, "description": desc, "gpu": gpu, "cpu": cpu, "link": link, "measured": measured}
    if r.get("stage_overheads"):
        from .calibrate_overhead import fit_overheads

        # fitted against the cost model's roofline on the curves above (the fixed costs are the rest)
        op_us, stage_us, det = fit_overheads(r["stage_overheads"], raw)
        details = measured.pop("details")
        if op_us:
            measured["op_overhead_us"] = op_us
        measured["stage_overhead_us"] = stage_us
        measured["source"] += ("; fixed costs per stage invocation (op_overhead_us, stage_overhead_us) fitted to the "
                               "engine's own stages timed on tiny random models, against the cost model's roofline "
                               "(runtime/calibrate_overhead.py)")
        measured["details"] = {**details, "stage_overheads": det}
    return raw


_KEY_ORDER = {k: i for i, k in enumerate(("name", "cores", "mem_GiB", "hbm_GBps", "dram_GBps", "h2d_GBps",
                                           "d2h_GBps", "peak_TFLOPs"))}


def _ordered(sec: dict) -> dict:
    """A section's keys in the presets' order; other keys after them, `source` last."""
    return dict(sorted(sec.items(), key=lambda kv: _KEY_ORDER.get(kv[0], len(_KEY_ORDER) + (kv[0] == "source"))))


def dump_spec_yaml(raw: dict) -> str:
    head = ("# Written by `specmoe calibrate` (runtime/calibrate.py). Peaks in gpu/cpu/link; the measured:\n"
            "# curves override them in the cost model (schema: planner/hardware_spec.py).\n")
    return head + yaml.dump(_plain(raw), Dumper=_SpecDumper, sort_keys=False, width=120, allow_unicode=True)


def _load_cache(path: Path, fp: dict) -> dict | None:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or data.get("fingerprint") != fp or not isinstance(data.get("results"), dict):
        return None
    return data


def calibrate_with_info(out_path, model=None, base=None, quick: bool = False, force: bool = False,
                        progress: bool = True, cache_dir_override=None) -> tuple[HardwareSpec, dict]:
    """calibrate(), also returning {"cache_path", "cache_hit", "elapsed_s", "mode"}."""
    t0 = time.perf_counter()
    out = check_output_path(out_path)
    model_label, mspec = resolve_model(model)
    st = QUICK if quick else FULL
    shapes = measured_shapes(mspec, st)
    base_raw, base_label = (resolve_base(base), str(base)) if base is not None else (None, None)
    facts = _machine_facts()
    has_gpu = facts["gpu_name"] is not None
    if base_raw is None and not has_gpu:
        base_raw, base_label = resolve_base(DEFAULT_CPU_BASE), DEFAULT_CPU_BASE
    cdir = cache_dir(cache_dir_override)
    cached, cache_path, hit = None, None, False
    # a full measurement also answers a quick request
    for s in ((FULL, QUICK) if quick else (FULL,)):
        fid, fp = fingerprint(facts, measured_shapes(mspec, s), s.mode)
        if not force and (c := _load_cache(cdir / f"{fid}.yaml", fp)) is not None:
            cached, cache_path, hit = c, cdir / f"{fid}.yaml", True
            break
    if cached is None:
        fid, fp = fingerprint(facts, shapes, st.mode)
        facts = {**facts, "attention_backend": attention_backend()}
        results = run_measurements(st, shapes, has_gpu, progress=progress,
                                   engine_cfgs=engine_configs(resolve_model_config(model)))
        cached = {"fingerprint": fp, "fingerprint_id": fid, "measured_at": datetime.date.today().isoformat(),
                  "mode": st.mode, "model": model_label, "facts": facts, "shapes": shapes,
                  "results": _plain(results)}
        cache_path = cdir / f"{fid}.yaml"
        try:
            cdir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(cache_path, yaml.dump(cached, Dumper=_SpecDumper, sort_keys=False, width=120))
        except OSError:
            cache_path = None  # an unwritable cache only costs a re-measure next time
    raw = build_spec_raw(cached, base_raw, base_label, out.stem)
    text = dump_spec_yaml(raw)
    parse_hardware(yaml.safe_load(text), str(out))  # validate exactly what is written, before writing it
    atomic_write_text(out, text)
    spec = HardwareSpec.from_yaml(out)
    return spec, {"cache_path": str(cache_path) if cache_path else None, "cache_hit": hit,
                  "elapsed_s": round(time.perf_counter() - t0, 1), "mode": cached["mode"]}


def calibrate(out_path, model=None, base=None, quick: bool = False, force: bool = False,
              progress: bool = True, cache_dir_override=None) -> HardwareSpec:
    """Measure this machine (or reuse the cached measurement) and write a hardware spec to out_path.

    model: a preset name or a config.json path (default: models/tiny-moe, else mixtral-8x7b shapes
    scaled to fit). base: a preset or spec YAML whose gpu/cpu/link peaks are copied (default
    devbox-2core without a GPU; with a GPU and no base the measured peaks are used). quick: ~20 s
    on 2 cores instead of <= 2 min. force: re-measure even if the cache holds this machine.
    Bad input raises SpecError before anything is measured; an interruption leaves no file.
    """
    return calibrate_with_info(out_path, model, base, quick, force, progress, cache_dir_override)[0]
