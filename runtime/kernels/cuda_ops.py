"""GPU entry points of the cuda_kernels/*.cu kernels, launched through CuPy on torch's stream.

Importing this module needs neither CuPy nor a GPU; :func:`cuda_available` says whether the
kernels can run. Sources are compiled lazily by CuPy's RawModule (NVRTC) on first use and cached
per (file, options, device); CuPy also keeps the binaries in its on-disk cache.

Tensors are shared with the kernels without copies: each launch passes the torch tensors' device
pointers (``data_ptr()``) as kernel arguments and runs on ``torch.cuda.current_stream()``, so
torch's allocator and stream ordering stay valid. (Raw pointers rather than
``cupy.asarray(tensor)``: the CUDA array interface has no bfloat16.) Callers (moe_ops) validate
shapes and dtypes; the functions here assume valid, contiguous inputs on one CUDA device.

Dimensions as in moe_ops: T, K, N = T*K, E, H; M, F; B, k, V; Hq, Hkv, G, D, R, S, P splits.
Set SPECMOE_DISABLE_CUPY=1 to make cuda_available() False (torch references everywhere).
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Callable

import numpy as np
import torch

from specmoe import cuda_kernels

COMPILE_OPTIONS: tuple[str, ...] = ("-std=c++17",)
PERM_CHUNK = 512  # = PERM_CHUNK in moe_permute.cu
PERM_SCAN_THREADS = 1024  # = PERM_SCAN_THREADS in moe_permute.cu
RS_THREADS = 512  # = RS_THREADS in spec_accept.cu
DDA_THREADS = 128  # = DDA_THREADS in draft_attention.cu
DDA_MAX_HEAD_DIM = 512  # = DDA_GEN_MAXD in draft_attention.cu
DDA_FAST_HEAD_DIMS = (64, 128, 256)
DDA_FAST_GROUPS = (1, 2, 4, 8)
SILU_VECS = {"bf16": (8, 2, 1), "f32": (4, 1)}  # elements per thread step, widest first
COMBINE_VEC = {"bf16": 8, "f32": 4}  # the wide variant; 1 is the fallback

_u64, _i64, _i32, _f32 = np.uint64, np.int64, np.int32, np.float32


@functools.lru_cache(maxsize=1)
def _cupy():
    """The cupy module, or None when it cannot be imported (never raises)."""
    try:
        import cupy  # noqa: PLC0415

        return cupy
    except Exception:  # ImportError, or a broken CUDA install raising at import
        return None


@functools.lru_cache(maxsize=1)
def cuda_available() -> bool:
    """True when CuPy imports, it sees a GPU, and torch has CUDA too. Never raises."""
    if os.environ.get("SPECMOE_DISABLE_CUPY", "") not in ("", "0"):
        return False
    cp = _cupy()
    if cp is None:
        return False
    try:
        return cp.cuda.runtime.getDeviceCount() > 0 and torch.cuda.is_available()
    except Exception:
        return False


def unavailable_reason() -> str:
    """Why cuda_available() is False ('' when it is True), for skip messages and logs."""
    if cuda_available():
        return ""
    if os.environ.get("SPECMOE_DISABLE_CUPY", "") not in ("", "0"):
        return "SPECMOE_DISABLE_CUPY is set"
    cp = _cupy()
    if cp is None:
        return "cupy is not installed (pip install cupy-cuda12x or cupy-cuda13x)"
    try:
        n = cp.cuda.runtime.getDeviceCount()
    except Exception as exc:  # no driver, driver too old, ...
        return f"cupy sees no GPU: {type(exc).__name__}: {exc}"
    if n == 0:
        return "cupy sees no GPU"
    return "torch was built without CUDA or sees no GPU"


@functools.lru_cache(maxsize=None)
def _module(name: str, options: tuple[str, ...], device_id: int):
    cp = _cupy()
    with cp.cuda.Device(device_id):
        return cp.RawModule(code=cuda_kernels.load_source(name), options=options)


@functools.lru_cache(maxsize=None)
def _function(module: str, fn: str, device_id: int):
    cp = _cupy()
    with cp.cuda.Device(device_id):
        return _module(module, COMPILE_OPTIONS, device_id).get_function(fn)


class _StreamHandle:
    """A raw cudaStream_t seen through the CUDA stream protocol (for cupy.cuda.Stream.from_external)."""

    def __init__(self, ptr: int):
        self.ptr = ptr

    def __cuda_stream__(self):
        return (0, self.ptr)


@functools.lru_cache(maxsize=64)
def _cupy_stream(ptr: int, device_id: int):
    cp = _cupy()
    if hasattr(cp.cuda.Stream, "from_external"):  # CuPy >= 14
        try:
            return cp.cuda.Stream.from_external(_StreamHandle(ptr))
        except Exception:
            pass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return cp.cuda.ExternalStream(ptr, device_id)


@functools.lru_cache(maxsize=None)
def _driver_function(module: str, fn: str, device_id: int):
    """The loaded cupy.cuda.function.Function behind a RawKernel (its __call__ takes a stream)."""
    cp = _cupy()
    with cp.cuda.Device(device_id):
        return _function(module, fn, device_id).kernel


_raw_stream_fn = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # fast path, as Triton uses


def _raw_stream(device_id: int) -> int:
    """cudaStream_t of torch's current stream on the device."""
    if _raw_stream_fn is not None:
        return _raw_stream_fn(device_id)
    return torch.cuda.current_stream(device_id).cuda_stream


_direct_launch = True  # Function.__call__(..., stream=) works; set False on the first TypeError


def launch(ref: torch.Tensor, module: str, fn: str, grid, block, args, shared_mem: int = 0) -> None:
    """Launch kernel ``fn`` of cuda_kernels/<module>.cu on ref's device and torch's current stream."""
    global _direct_launch
    cp = _cupy()
    dev = ref.device.index if ref.device.index is not None else torch.cuda.current_device()
    stream = _cupy_stream(_raw_stream(dev), dev)
    grid, block, args = tuple(grid), tuple(block), tuple(args)
    if _direct_launch:
        try:
            func = _driver_function(module, fn, dev)
            if torch.cuda.current_device() == dev:
                func(grid, block, args, shared_mem=shared_mem, stream=stream)
            else:
                with cp.cuda.Device(dev):
                    func(grid, block, args, shared_mem=shared_mem, stream=stream)
            return
        except TypeError:  # another CuPy's Function signature: use the RawKernel path from now on
            _direct_launch = False
    with cp.cuda.Device(dev), stream:
        _function(module, fn, dev)(grid, block, args, shared_mem=shared_mem)


def precompile(device: torch.device | int | None = None) -> list[str]:
    """Compile and load every kernel module now (e.g. before timing); returns the module names."""
    dev = torch.device("cuda", device) if isinstance(device, int) else device or torch.device("cuda")
    dev_id = dev.index if dev.index is not None else torch.cuda.current_device()
    used = kernel_functions_used()
    for module, fns in used.items():
        for fn in fns:
            _function(module, fn, dev_id)  # compiles the module once, loads every kernel
    return sorted(used)


def _ptr(t: torch.Tensor | None):
    return _u64(0 if t is None else t.data_ptr())


def _threads(units: int, cap: int = 256) -> int:
    return int(min(cap, max(32, (units + 31) // 32 * 32)))


def _aligned(nbytes_multiple: int, *tensors_or_ints) -> bool:
    for x in tensors_or_ints:
        v = x.data_ptr() if isinstance(x, torch.Tensor) else int(x)
        if v % nbytes_multiple:
            return False
    return True


# ----------------------------------------------------------------------------- permutation


def expert_permutation(topk_ids: torch.Tensor, num_experts: int):
    """-> counts [E], offsets [E+1], perm [N], inv [N] (int64) and bad() -> bool (reads the error flags)."""
    dev = topk_ids.device
    n = topk_ids.numel()
    e = num_experts
    chunks = max(1, (n + PERM_CHUNK - 1) // PERM_CHUNK)
    out = torch.empty(2 * e + 1 + 2 * n, dtype=torch.int64, device=dev)  # one allocation for all four
    counts, offsets = out[:e], out[e : 2 * e + 1]
    perm, inv = out[2 * e + 1 : 2 * e + 1 + n], out[2 * e + 1 + n :]
    work = torch.empty(chunks * e + chunks, dtype=torch.int32, device=dev)
    table, chunk_err = work[: chunks * e], work[chunks * e :]  # [C, E] and [C]
    suffix = "i32" if topk_ids.dtype == torch.int32 else "i64"
    ids, n64, e32 = _ptr(topk_ids), _i64(n), _i32(e)
    launch(topk_ids, "moe_permute", f"perm_count_{suffix}", (chunks,), (32,),
           (ids, n64, e32, _ptr(table), _ptr(chunk_err)))
    launch(topk_ids, "moe_permute", "perm_scan", (1,), (PERM_SCAN_THREADS,),
           (_ptr(table), _i32(chunks), e32, _ptr(counts), _ptr(offsets)))
    launch(topk_ids, "moe_permute", f"perm_scatter_{suffix}", (chunks,), (32,),
           (ids, n64, e32, _ptr(table), _ptr(offsets), _ptr(perm), _ptr(inv)))

    def bad() -> bool:
        return bool(chunk_err.any().item())

    return counts, offsets, perm, inv, bad


def permute_tokens(x: torch.Tensor, perm: torch.Tensor, top_k: int) -> torch.Tensor:
    """xs [N, H] = x[perm // K] as a raw row gather (any 2- or 4-byte dtype)."""
    n, h = perm.numel(), x.shape[1]
    xs = torch.empty(n, h, dtype=x.dtype, device=x.device)
    row_bytes = h * x.element_size()
    if n == 0 or row_bytes == 0:
        return xs
    if row_bytes % 16 == 0 and _aligned(16, x, xs):
        fn, unit = "gather_rows_u128", 16
    elif row_bytes % 4 == 0 and _aligned(4, x, xs):
        fn, unit = "gather_rows_u32", 4
    else:
        fn, unit = "gather_rows_u16", 2
    units = row_bytes // unit
    launch(x, "moe_permute", fn, (n,), (_threads(units),),
           (_ptr(x), _ptr(xs), _ptr(perm), _i32(top_k), _i64(x.shape[0]), _i64(n), _i32(units)))
    return xs


def unpermute_combine(ys: torch.Tensor, inv: torch.Tensor, weights: torch.Tensor, out_dtype: torch.dtype):
    """y [T, H] = sum_k weights[t, k] * ys[inv[t*K + k]] in fp32, stored as out_dtype."""
    t, k = weights.shape
    h = ys.shape[1]
    y = torch.empty(t, h, dtype=out_dtype, device=ys.device)
    if t == 0 or h == 0:
        return y
    w = weights.to(torch.float32).contiguous()  # [T, K]
    tin = "bf16" if ys.dtype == torch.bfloat16 else "f32"
    tout = "bf16" if out_dtype == torch.bfloat16 else "f32"
    vec = COMBINE_VEC[tin]
    if h % vec or not _aligned(16, ys, y):
        vec = 1
    launch(ys, "moe_permute", f"combine_{tin}_{tout}_v{vec}", (t,), (_threads((h + vec - 1) // vec),),
           (_ptr(ys), _ptr(inv), _ptr(w), _ptr(y), _i32(k), _i32(h), _i64(ys.shape[0])))
    return y


# ----------------------------------------------------------------------------- SiLU * mul


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """out [M, F] = silu(gate) * up; gate, up [M, F] with unit column stride, any row stride."""
    m, f = gate.shape
    out = torch.empty(m, f, dtype=gate.dtype, device=gate.device)
    if m == 0 or f == 0:
        return out
    es = gate.element_size()
    gs, us = gate.stride(0), up.stride(0)
    name = "bf16" if gate.dtype == torch.bfloat16 else "f32"
    vec = 1
    for v in SILU_VECS[name]:
        nb = v * es
        if f % v == 0 and _aligned(nb, gate, up, out, gs * es, us * es):
            vec = v
            break
    launch(gate, "silu_mul", f"silu_mul_{name}_v{vec}", (m,), (_threads((f + vec - 1) // vec),),
           (_ptr(gate), _i64(gs), _ptr(up), _i64(us), _ptr(out), _i32(f)))
    return out


# ----------------------------------------------------------------------------- acceptance


def greedy_accept(draft: torch.Tensor, target: torch.Tensor):
    """-> accepted_len [B], next_token [B] (int64)."""
    b, k = draft.shape
    acc = torch.empty(b, dtype=torch.int64, device=draft.device)
    nxt = torch.empty(b, dtype=torch.int64, device=draft.device)
    launch(draft, "spec_accept", "greedy_accept", ((b + 127) // 128,), (128,),
           (_ptr(draft), _ptr(target), _i32(b), _i32(k), _ptr(acc), _ptr(nxt)))
    return acc, nxt


def rejection_sample_accept(draft, q, p, u_accept, u_sample):
    """fp32 q [B, k, V], p [B, k+1, V] -> accepted_len [B], next_token [B] (int64)."""
    b, k = draft.shape
    v = p.shape[2]
    acc = torch.empty(b, dtype=torch.int64, device=draft.device)
    nxt = torch.empty(b, dtype=torch.int64, device=draft.device)
    launch(draft, "spec_accept", "rejection_accept_f32", (b,), (RS_THREADS,),
           (_ptr(draft), _ptr(q), _ptr(p), _ptr(u_accept), _ptr(u_sample), _i32(k), _i64(v), _ptr(acc), _ptr(nxt)))
    return acc, nxt


# ----------------------------------------------------------------------------- draft attention


@functools.lru_cache(maxsize=8)
def _sm_count(device_id: int) -> int:
    return torch.cuda.get_device_properties(device_id).multi_processor_count


def dda_splits(batch: int, hkv: int, max_len: int, sm_count: int) -> tuple[int, int]:
    """Split-K plan (P, keys per split) so that B * Hkv * P blocks fill the GPU; P = 1 when they already do."""
    blocks = batch * hkv
    if blocks >= 2 * sm_count or max_len <= 256:
        return 1, max_len
    want = -(-4 * sm_count // blocks)  # ceil
    p = max(1, min(want, -(-max_len // 128)))
    split_len = -(-max_len // p)
    split_len = -(-split_len // 64) * 64
    return -(-max_len // split_len), split_len


def draft_decode_attention(q, k_cache, v_cache, slots, lens, scale: float, max_len: int) -> torch.Tensor:
    """q [B, Hq, D] fp32 contiguous; caches [R, Hkv, S, D] with unit D stride -> out [B, Hq, D] fp32."""
    b, hq, d = q.shape
    r, hkv, s, _ = k_cache.shape
    g = hq // hkv
    out = torch.empty(b, hq, d, dtype=torch.float32, device=q.device)
    kv = "bf16" if k_cache.dtype == torch.bfloat16 else "f32"
    es = k_cache.element_size()
    ks, vs = k_cache.stride(), v_cache.stride()
    strides = (_i64(ks[0]), _i64(ks[1]), _i64(ks[2]), _i64(vs[0]), _i64(vs[1]), _i64(vs[2]))
    fast = (
        d in DDA_FAST_HEAD_DIMS
        and g in DDA_FAST_GROUPS
        and _aligned(16, k_cache, v_cache, q, *(int(x) * es for x in ks[:3] + vs[:3]))
    )
    dev = q.device.index if q.device.index is not None else torch.cuda.current_device()
    if not fast:
        launch(q, "draft_attention", f"dda_generic_{kv}", (b * hq,), (DDA_THREADS,),
               (_ptr(q), _ptr(k_cache), _ptr(v_cache), _ptr(slots), _ptr(lens), _ptr(out), _i32(hq), _i32(g),
                _i32(d), _i64(r), _i64(s), *strides, _f32(scale)))
        return out
    p, split_len = dda_splits(b, hkv, max_len, _sm_count(dev))
    part_o = part_ml = None
    if p > 1:
        part_o = torch.empty(b * hq * p * d, dtype=torch.float32, device=q.device)  # [B, Hq, P, D]
        part_ml = torch.empty(b * hq * p * 2, dtype=torch.float32, device=q.device)  # [B, Hq, P, 2]
    launch(q, "draft_attention", f"dda_{kv}_d{d}_g{g}", (b * hkv, p), (DDA_THREADS,),
           (_ptr(q), _ptr(k_cache), _ptr(v_cache), _ptr(slots), _ptr(lens), _ptr(out), _ptr(part_o), _ptr(part_ml),
            _i32(hkv), _i64(r), _i64(s), *strides, _f32(scale), _i32(split_len)))
    if p > 1:
        launch(q, "draft_attention", "dda_combine", (b * hq,), (_threads(d),),
               (_ptr(part_o), _ptr(part_ml), _ptr(slots), _ptr(lens), _ptr(out), _i32(hq), _i32(d), _i32(p),
                _i64(r), _i64(s)))
    return out


def kernel_functions_used() -> dict[str, list[str]]:
    """Every kernel name the entry points above may launch, by source file (checked against the PTX)."""
    kinds = ("bf16", "f32")
    return {
        "moe_permute": ["perm_count_i32", "perm_count_i64", "perm_scan", "perm_scatter_i32", "perm_scatter_i64",
                        "gather_rows_u128", "gather_rows_u32", "gather_rows_u16"]
        + [f"combine_{a}_{b}_v{v}" for a in kinds for b in kinds for v in (COMBINE_VEC[a], 1)],
        "silu_mul": [f"silu_mul_{a}_v{v}" for a in kinds for v in SILU_VECS[a]],
        "spec_accept": ["greedy_accept", "rejection_accept_f32"],
        "draft_attention": [f"dda_{a}_d{d}_g{g}" for a in kinds for d in DDA_FAST_HEAD_DIMS for g in DDA_FAST_GROUPS]
        + ["dda_combine", "dda_generic_bf16", "dda_generic_f32"],
    }


KERNEL_ENTRY_POINTS: dict[str, Callable] = {
    "expert_permutation": expert_permutation,
    "permute_tokens": permute_tokens,
    "unpermute_combine": unpermute_combine,
    "silu_mul": silu_mul,
    "greedy_accept": greedy_accept,
    "rejection_sample_accept": rejection_sample_accept,
    "draft_decode_attention": draft_decode_attention,
}
