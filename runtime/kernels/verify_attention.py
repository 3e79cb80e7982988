"""CPU verify attention: N = k+1 query tokens per sequence against its KV cache rows.

Dimension letters: B batch rows in this call, N query tokens per sequence (= k+1, uniform in a
call), Hq query heads, Hkv KV heads (g = Hq / Hkv query heads per KV head), D head dim, R cache
rows (capacity in sequences), S cache capacity in positions, L = ctx + N keys of one sequence.

    verify_attention(q, k_cache, v_cache, slots, ctx_lens, *, scale=None, out=None, backend="auto",
                     path=None)

q [B, N, Hq, D] fp32 or bf16; k_cache, v_cache [R, Hkv, S, D] fp32, bf16 or fp16, the N new keys/values of
batch row b already written at positions ctx_lens[b] .. ctx_lens[b]+N-1 of cache row slots[b];
query i of batch row b attends keys 0 .. ctx_lens[b]+i. Returns out [B, N, Hq, D] (fp32 unless an
out of bf16 is given).

    verify_attention_tokens(q, k_cache, v_cache, slots, ctx_lens, token_offsets, n, out, ...)

the same on token-major rows, with no copy of q or out: batch row b's n queries are rows
token_offsets[b] .. token_offsets[b]+n-1 of q [Tq, Hq, D] and its output goes to the same rows of
out [To, Hq, D]; q and out are fp32 or bf16 rows of Hq*D contiguous elements at any row stride (q may
be a view of one buffer holding q, k and v per token). One call covers a whole pass whose sequences
sit anywhere in the token order (the engine's layer over all micro-batches). n is an int, or an int64
tensor [B] with each batch row's own count n[b] (a ragged call: a prefill pass of prompts of many
lengths, a draft step whose sequences catch up by different numbers of tokens), run by the kernel
grouped by count in one foreign call (csrc/verify_attention_api.h).

Backends: "cpp" (csrc/verify_attention.cpp and the parts it includes, C++/OpenMP, compiled on first use by
runtime.kernels.build), "torch" (verify_attention_reference) and "auto" (cpp if it builds, else
torch with one logged warning). verify_attention_backend() names what "auto" resolves to.

Paths of the C++ kernel for bf16 KV (fp32 KV always takes "fp32"): "amx" (AMX tiles),
"avx512bf16" (VDPBF16PS dot products) and "fp32" (K and V widened to fp32). Both bf16 paths scale
the scores after QK, so a q of bf16 values (a bf16 model's) multiplies exactly; both split any
other q into up to three bf16 parts. Both round P to bf16 for PV, as flash attention
does: about 1e-3 off the fp32 path. The argument path, else the environment variable
SPECMOE_VERIFY_PATH, else "auto" takes the first that available_paths() offers (this machine's
cpuid flags and the kernel's tile permission): "amx", else "avx512bf16", else "fp32".
verify_attention_path(kv_dtype) names the one a call takes.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os

import torch

from specmoe.runtime.kernels.build import load_cpp_kernel

log = logging.getLogger("specmoe.kernels")

KERNEL_NAME = "verify_attention"
BACKENDS = ("auto", "cpp", "torch")
PATHS = ("auto", "amx", "avx512bf16", "fp32")
PATH_ENV = "SPECMOE_VERIFY_PATH"
_PATH_CODE = {"auto": 0, "fp32": 1, "avx512bf16": 2, "amx": 3}
AUTO_ORDER = ("amx", "avx512bf16")  # the bf16 paths "auto" takes, best first, where offered
_KV_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_ROW_CODE = {torch.float32: 0, torch.bfloat16: 1}     # q and out element types of the C++ kernel


class VerifyAttentionInputError(ValueError):
    """An argument of verify_attention has the wrong shape, dtype, layout, device or value."""


class KernelUnavailableError(RuntimeError):
    """backend="cpp" was requested but the C++ kernel could not be built or loaded."""


_state: dict[str, object] = {}  # "lib": CDLL | None once resolved; "warned": bool


def _reset_backend() -> None:
    """Forget the resolved kernel (tests change SPECMOE_CXX / SPECMOE_CACHE_DIR)."""
    _state.clear()


def _kernel() -> ctypes.CDLL | None:
    if "lib" not in _state:
        lib = load_cpp_kernel(KERNEL_NAME)
        if lib is not None:
            i64, i32, ptr = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p
            fn = lib.specmoe_verify_attention
            fn.argtypes = [ptr, ptr, ptr, i32, ptr, ptr, ptr,
                           i64, i64, i64, i64, i64, i64, i64,
                           ctypes.c_float, i32, i64, i64, i32]
            fn.restype = ctypes.c_int
            fn = lib.specmoe_verify_attention_tokens
            fn.argtypes = [ptr, i32, i64, ptr, ptr, i32, ptr, ptr, ptr, i64, ptr, i32, i64,
                           i64, i64, i64, i64, i64, i64, i64,
                           ctypes.c_float, i32, i64, i64, i32]
            fn.restype = ctypes.c_int
            fn = lib.specmoe_verify_attention_ragged
            fn.argtypes = [ptr, i32, i64, ptr, ptr, i32, ptr, ptr, ptr, ptr, i64, ptr, i32, i64,
                           i64, i64, i64, i64, i64, i64, ctypes.c_float, i32, i64, i64, i32]
            fn.restype = ctypes.c_int
            lib.specmoe_verify_attention_info.argtypes = []
            lib.specmoe_verify_attention_info.restype = ctypes.c_char_p
        _state["lib"] = lib
    return _state["lib"]  # type: ignore[return-value]


def kernel_info() -> str | None:
    """e.g. "isa=avx512 width=16 openmp=1 max_threads=2"; None without the C++ kernel."""
    lib = _kernel()
    return lib.specmoe_verify_attention_info().decode() if lib is not None else None


def verify_attention_backend(kv_dtype=None) -> str:
    """What backend="auto" runs: "cpp-openmp" (or "cpp-serial" if built without OpenMP) or
    "torch-reference"; given a KV dtype, the C++ kernel's path for it too, "cpp-openmp/amx"."""
    info = kernel_info()
    if info is None:
        return "torch-reference"
    name = "cpp-openmp" if "openmp=1" in info else "cpp-serial"
    return name if kv_dtype is None else f"{name}/{verify_attention_path(kv_dtype)}"


def available_paths() -> tuple[str, ...]:
    """The C++ kernel's paths for bf16 / fp16 KV on this machine, best first, e.g.
    ("amx", "avx512bf16", "fp32"); () without the C++ kernel. Read from the kernel once per
    loaded kernel (every call resolves its path through this)."""
    if "paths" not in _state:
        info = kernel_info()
        words = [w for w in (info or "").split() if w.startswith("paths=")]
        _state["paths"] = (() if info is None else
                           tuple(words[0][len("paths="):].split(",")) if words else ("fp32",))
    return _state["paths"]  # type: ignore[return-value]


def _requested_path(path: str | None) -> str:
    name = path if path is not None else (os.environ.get(PATH_ENV, "").strip() or "auto")
    if name not in PATHS:
        where = "path" if path is not None else PATH_ENV
        _fail(where, f"is {name!r}", f"use one of {PATHS}")
    return name


def verify_attention_path(kv_dtype=torch.bfloat16, path: str | None = None) -> str:
    """The path the C++ kernel takes for KV of kv_dtype (torch dtype or "fp32"/"bf16"/"fp16")
    with this path argument (None: SPECMOE_VERIFY_PATH, else "auto"); raises
    KernelUnavailableError for a path this machine lacks."""
    kv_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(kv_dtype, kv_dtype)
    name = _requested_path(path)
    if kv_dtype == torch.float32:
        return "fp32"
    offered = available_paths()
    if name == "auto":
        return next((p for p in AUTO_ORDER if p in offered), "fp32")
    if name not in offered:
        raise KernelUnavailableError(f"verify_attention: path {name!r} is not available on this machine "
                                     f"(it offers {offered or 'no C++ kernel'}); use path='auto'")
    return name
def _fail(arg: str, problem: str, fix: str) -> None:
    raise VerifyAttentionInputError(f"verify_attention: {arg}: {problem}; {fix}")


def _check_values(slots, ctx_lens, N, R: int, S: int) -> None:
    """Range checks of slots and ctx_lens (the C entry point repeats them before any access); N an int
    or the per-row counts [B]."""
    if slots.shape[0] == 0:
        return
    lo, hi = torch.aminmax(slots)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= R:
        _fail("slots", f"holds {lo if lo < 0 else hi}, outside the cache's {R} rows", f"use 0 <= slot < {R}")
    cmin = int(ctx_lens.min())
    if cmin < 0:
        _fail("ctx_lens", f"holds {cmin}", "cached lengths must be >= 0")
    b = int(torch.argmax(ctx_lens + N))                      # the row reaching furthest into the cache
    cmax, nb = int(ctx_lens[b]), int(N if isinstance(N, int) else N[b])
    if cmax + nb > S:
        _fail("ctx_lens", f"holds {cmax}: {cmax} + N={nb} exceeds the cache capacity S={S}",
              f"keep ctx_lens <= S - N = {S - nb}")


def _check_cpu(named) -> None:
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            _fail(name, f"expected a torch.Tensor, got {type(t).__name__}", "pass a CPU tensor")
        if not t.is_cpu:
            _fail(name, f"is on {t.device}", "this kernel runs on the CPU: pass a CPU tensor")


def _row_dtypes(reference: bool) -> tuple:
    """dtypes of q and out: fp32 or bf16 (the reference also float64)."""
    return tuple(_ROW_CODE) + ((torch.float64,) if reference else ())


def _check_caches(k_cache, v_cache, Hq: int, D: int, reference: bool) -> tuple[int, int, int]:
    """The KV caches [R, Hkv, S, D] -> (R, Hkv, S)."""
    # fp16 KV: widened on the fp32 path, each element rounded to bf16 as it loads on the bf16 paths
    kv_dtypes = tuple(_KV_CODE) + ((torch.float64,) if reference else ())
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dim() != 4:
            _fail(name, f"has shape {tuple(t.shape)}", "expected [R, Hkv, S, D]")
        if t.dtype not in kv_dtypes:
            _fail(name, f"has dtype {t.dtype}", "expected torch.float32, torch.bfloat16 or torch.float16")
    if k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
        _fail("v_cache", f"is {tuple(v_cache.shape)} {v_cache.dtype} but k_cache is "
              f"{tuple(k_cache.shape)} {k_cache.dtype}", "both caches must match")
    R, Hkv, S, Dk = k_cache.shape
    if Dk != D:
        _fail("k_cache", f"head dim {Dk} differs from q's {D}", "use the same head dim D")
    if R < 1 or Hkv < 1 or S < 1:
        _fail("k_cache", f"has shape {tuple(k_cache.shape)} with an empty dimension", "allocate R, Hkv, S >= 1")
    if Hq % Hkv != 0:
        _fail("q", f"has {Hq} query heads, not a multiple of the cache's {Hkv} KV heads",
              "Hq must be g * Hkv")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not t.is_contiguous():
            _fail(name, "is not contiguous", "pass .contiguous()")
    return R, Hkv, S


def _check_index(named, B: int) -> None:
    for name, t in named:
        if t.dtype != torch.int64 or t.dim() != 1 or t.shape[0] != B:
            _fail(name, f"is {t.dtype} of shape {tuple(t.shape)}", f"expected int64 of shape [{B}] (B of q)")
        if not t.is_contiguous():
            _fail(name, "is not contiguous", "pass .contiguous()")


def _scale(scale, D: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(D)
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        _fail("scale", f"is {scale!r}", "pass a finite float or None for 1/sqrt(D)")
    return float(scale)


def _validate(q, k_cache, v_cache, slots, ctx_lens, scale, out, *, reference: bool = False,
              values: bool = True):
    """Check every argument before any memory is touched; returns (B, N, Hq, Hkv, D, R, S, scale).

    values=False leaves the range checks of slots / ctx_lens to the C entry point, which makes
    them before touching memory and returns an error code that _check_values then explains."""
    _check_cpu(zip(("q", "k_cache", "v_cache", "slots", "ctx_lens"), (q, k_cache, v_cache, slots, ctx_lens)))
    if q.dim() != 4:
        _fail("q", f"has shape {tuple(q.shape)}", "expected [B, N, Hq, D]")
    if q.dtype not in _row_dtypes(reference):
        _fail("q", f"has dtype {q.dtype}", "expected torch.float32 or torch.bfloat16")
    B, N, Hq, D = q.shape
    if N < 1 or Hq < 1 or D < 1:
        _fail("q", f"has shape {tuple(q.shape)} with an empty N, Hq or D", "N = k+1 >= 1 query tokens")
    R, Hkv, S = _check_caches(k_cache, v_cache, Hq, D, reference)
    if not q.is_contiguous():
        _fail("q", "is not contiguous", "pass .contiguous()")
    _check_index((("slots", slots), ("ctx_lens", ctx_lens)), B)
    if values:
        _check_values(slots, ctx_lens, N, R, S)
    scale = _scale(scale, D)
    if out is not None:
        if not isinstance(out, torch.Tensor) or not out.is_cpu:
            _fail("out", "must be a CPU tensor", "pass a CPU tensor or None")
        if tuple(out.shape) != (B, N, Hq, D) or out.dtype not in _row_dtypes(reference) or not out.is_contiguous():
            _fail("out", f"is {out.dtype} {tuple(out.shape)} (contiguous={out.is_contiguous()})",
                  f"expected a contiguous float32 or bfloat16 tensor of shape {(B, N, Hq, D)}")
    return B, N, Hq, Hkv, D, R, S, scale


def _check_rows(name: str, t: torch.Tensor, reference: bool) -> None:
    """A token-major t [T, Hq, D]: rows of Hq*D contiguous fp32 / bf16 elements at any row stride."""
    if t.dim() != 3:
        _fail(name, f"has shape {tuple(t.shape)}", "expected token-major rows [T, Hq, D]")
    if t.dtype not in _row_dtypes(reference):
        _fail(name, f"has dtype {t.dtype}", "expected torch.float32 or torch.bfloat16")
    T, H, D = t.shape
    if H < 1 or D < 1:
        _fail(name, f"has shape {tuple(t.shape)} with an empty Hq or D", "Hq, D >= 1")
    if t.stride(2) != 1 or (H > 1 and t.stride(1) != D) or (T > 1 and t.stride(0) < H * D):
        _fail(name, f"has strides {t.stride()}", f"rows of Hq*D = {H * D} contiguous elements, row stride >= {H * D}")


def _validate_tokens(q, k_cache, v_cache, slots, ctx_lens, token_offsets, n, scale, out, *,
                     reference: bool = False, values: bool = True):
    """verify_attention_tokens' arguments -> (B, n, Hq, Hkv, D, R, S, scale); see _validate."""
    _check_cpu(zip(("q", "k_cache", "v_cache", "slots", "ctx_lens", "token_offsets", "out"),
                   (q, k_cache, v_cache, slots, ctx_lens, token_offsets, out)))
    _check_rows("q", q, reference)
    _check_rows("out", out, reference)
    Tq, Hq, D = q.shape
    if tuple(out.shape[1:]) != (Hq, D):
        _fail("out", f"has rows of {tuple(out.shape[1:])}", f"expected rows of q's (Hq, D) = {(Hq, D)}")
    R, Hkv, S = _check_caches(k_cache, v_cache, Hq, D, reference)
    B = token_offsets.shape[0] if token_offsets.dim() == 1 else -1
    _check_index((("token_offsets", token_offsets), ("slots", slots), ("ctx_lens", ctx_lens)), B)
    _check_counts(n, B, values)
    if values:
        _check_tokens(token_offsets, n, Tq, out.shape[0])
        _check_values(slots, ctx_lens, n, R, S)
    return B, n, Hq, Hkv, D, R, S, _scale(scale, D)


def _check_counts(n, B: int, values: bool = True) -> None:
    """n: query tokens per sequence, an int >= 1 or an int64 tensor [B] of counts >= 1 (a ragged call;
    values=False leaves the counts' range to the C entry point, as _validate leaves slots and ctx_lens)."""
    if isinstance(n, torch.Tensor):
        _check_cpu((("n", n),))
        _check_index((("n", n),), B)
        if values and B and int(n.min()) < 1:
            _fail("n", f"holds {int(n.min())}", "every sequence has n >= 1 query tokens")
    elif isinstance(n, bool) or not isinstance(n, int) or n < 1:
        _fail("n", f"is {n!r}", "n = k+1 >= 1 query tokens per sequence, or an int64 tensor [B] of them")


def _check_tokens(token_offsets, n, Tq: int, To: int) -> None:
    """Range check of the token offsets (the C entry point repeats it before any access); n an int or
    the per-row counts [B]."""
    if token_offsets.shape[0] == 0:
        return
    lo = int(token_offsets.min())
    b = int(torch.argmax(token_offsets + n))                 # the row whose tokens end last
    hi, nb = int(token_offsets[b]), int(n if isinstance(n, int) else n[b])
    rows = min(Tq, To)
    if lo < 0 or hi + nb > rows:
        _fail("token_offsets", f"holds {lo if lo < 0 else hi}: rows up to {hi + nb} of q [{Tq}] / out [{To}]",
              f"keep 0 <= offset <= {rows - nb}")


def verify_attention_reference(q, k_cache, v_cache, slots, ctx_lens, *, scale=None, out=None):
    """Plain torch verify attention (float64 throughout if q or the caches are float64)."""
    B, N, Hq, Hkv, D, R, S, scale = _validate(q, k_cache, v_cache, slots, ctx_lens, scale, out, reference=True)
    g = Hq // Hkv
    cdt = torch.float64 if torch.float64 in (q.dtype, k_cache.dtype) else torch.float32
    res = torch.empty(B, N, Hq, D, dtype=cdt)  # [B, N, Hq, D]
    future = torch.ones(N, N, dtype=torch.bool).triu(1)  # [N, N] query i must not see new key j > i
    for b in range(B):
        slot, ctx = int(slots[b]), int(ctx_lens[b])
        L = ctx + N
        k = k_cache[slot, :, :L].to(cdt).repeat_interleave(g, dim=0)  # [Hq, L, D]
        v = v_cache[slot, :, :L].to(cdt).repeat_interleave(g, dim=0)  # [Hq, L, D]
        qb = q[b].to(cdt).transpose(0, 1)  # [Hq, N, D]
        scores = (qb @ k.transpose(1, 2)) * scale  # [Hq, N, L]
        scores[:, :, ctx:] = scores[:, :, ctx:].masked_fill(future, float("-inf"))
        res[b] = (scores.softmax(dim=-1) @ v).transpose(0, 1)  # [N, Hq, D]
    if out is None:
        return res
    out.copy_(res)
    return out


def verify_attention_tokens_reference(q, k_cache, v_cache, slots, ctx_lens, token_offsets, n, out, *, scale=None):
    """verify_attention_tokens in plain torch: gather the rows, verify_attention_reference, scatter (per
    count, for per-row counts n)."""
    B, N, Hq, Hkv, D, R, S, scale = _validate_tokens(q, k_cache, v_cache, slots, ctx_lens, token_offsets, n,
                                                     scale, out, reference=True)
    if B == 0:
        return out
    if isinstance(N, torch.Tensor):
        for nv in torch.unique(N).tolist():
            sel = torch.nonzero(N == nv).flatten()
            verify_attention_tokens_reference(q, k_cache, v_cache, slots[sel], ctx_lens[sel], token_offsets[sel],
                                              int(nv), out, scale=scale)
        return out
    rows = (token_offsets[:, None] + torch.arange(N)).reshape(-1)  # [B*N] token rows, b-major
    res = verify_attention_reference(q.index_select(0, rows).view(B, N, Hq, D), k_cache, v_cache, slots, ctx_lens,
                                     scale=scale)  # [B, N, Hq, D]
    out.index_copy_(0, rows, res.reshape(B * N, Hq, D).to(out.dtype))
    return out


def _resolve(backend: str, path: str | None, k_cache):
    """-> (the C++ kernel or None for the torch reference, the path code for the kernel)."""
    if backend not in BACKENDS:
        _fail("backend", f"is {backend!r}", f"use one of {BACKENDS}")
    lib = _kernel() if backend != "torch" else None
    requested = _requested_path(path)
    # "auto" is resolved here, not by the kernel (which would take avx512bf16 where there is no AMX)
    path_code = _PATH_CODE[verify_attention_path(k_cache.dtype, requested) if requested == "auto" and lib is not None
                           and isinstance(k_cache, torch.Tensor) else requested]
    if backend != "torch":
        if lib is None and backend == "cpp":
            raise KernelUnavailableError(
                "verify_attention: backend='cpp' but the C++ kernel could not be built (see the "
                "logged compiler error; set SPECMOE_CXX to a working compiler) - use backend='auto'")
        if lib is None and not _state.get("warned"):
            _state["warned"] = True
            log.warning("verify_attention: C++ kernel unavailable, using the torch reference (slow)")
    return lib, path_code


def _launch(lib, q, k_cache, v_cache, slots, ctx_lens, token_offsets, out, dims, scale, num_threads, tune,
            path_code) -> None:
    """One call of the C++ kernel; dims (B, N, Hq, Hkv, D, R, S); tune (chunk keys, split keys, generic)."""
    B, N, Hq, Hkv, D, R, S = dims
    row_stride = lambda t: t.stride(0) if t.dim() == 3 and t.shape[0] > 1 else Hq * D  # noqa: E731 elements per token
    flags = int(tune[2]) | path_code << 2
    T = min(q.shape[0], out.shape[0]) if token_offsets is not None else B * N   # rows q and out both have
    head = (q.data_ptr(), _ROW_CODE[q.dtype], row_stride(q), k_cache.data_ptr(), v_cache.data_ptr(),
            _KV_CODE[k_cache.dtype], slots.data_ptr(), ctx_lens.data_ptr(),
            None if token_offsets is None else token_offsets.data_ptr())
    tail = (scale, int(num_threads), int(tune[0]), int(tune[1]), flags)
    if isinstance(N, torch.Tensor):     # per-row counts: one ragged call
        rc = lib.specmoe_verify_attention_ragged(*head, N.data_ptr(), T, out.data_ptr(), _ROW_CODE[out.dtype],
                                                 row_stride(out), B, Hq, Hkv, D, R, S, *tail)
    else:
        rc = lib.specmoe_verify_attention_tokens(*head, T, out.data_ptr(), _ROW_CODE[out.dtype], row_stride(out),
                                                 B, N, Hq, Hkv, D, R, S, *tail)
    if rc == -5:
        verify_attention_path(k_cache.dtype, [p for p, c in _PATH_CODE.items() if c == path_code][0])
    if rc == -4:
        raise MemoryError("verify_attention: the C++ kernel could not allocate its work buffers")
    if rc == -6:  # a token offset out of range, found before any memory access
        _check_tokens(token_offsets, N, q.shape[0], out.shape[0])
    if rc == -1 and isinstance(N, torch.Tensor):
        _check_counts(N, B)
    if rc != 0:  # -2 / -3: a slot or ctx_len out of range, found before any memory access
        _check_values(slots, ctx_lens, N, R, S)
        raise RuntimeError(f"verify_attention: C++ kernel rejected its arguments (code {rc})")


def verify_attention(q, k_cache, v_cache, slots, ctx_lens, *, scale=None, out=None, backend="auto",
                     path: str | None = None, num_threads: int = 0, _chunk_keys: int = 0,
                     _split_keys: int = 0, _generic: bool = False) -> torch.Tensor:
    """Verify attention of N = k+1 query tokens per sequence (see module docstring).

    path: the C++ kernel's path for bf16 / fp16 KV (module docstring; None: SPECMOE_VERIFY_PATH,
    else "auto"). num_threads: 0 uses the OpenMP default (OMP_NUM_THREADS); a call of under ~30 us of
    one core's work runs on the calling thread alone where idle OpenMP workers sleep (PASSIVE). _chunk_keys,
    _split_keys and _generic tune or force kernel paths for tests and benchmarks.
    """
    lib, path_code = _resolve(backend, path, k_cache)
    B, N, Hq, Hkv, D, R, S, scale = _validate(q, k_cache, v_cache, slots, ctx_lens, scale, out,
                                              values=lib is None)
    if out is None:
        out = torch.empty(B, N, Hq, D, dtype=torch.float32)  # [B, N, Hq, D]
    if lib is None:
        return verify_attention_reference(q, k_cache, v_cache, slots, ctx_lens, scale=scale, out=out)
    if B > 0:
        _launch(lib, q, k_cache, v_cache, slots, ctx_lens, None, out, (B, N, Hq, Hkv, D, R, S), scale, num_threads,
                (_chunk_keys, _split_keys, _generic), path_code)
    return out


def verify_attention_tokens(q, k_cache, v_cache, slots, ctx_lens, token_offsets, n, out, *, scale=None,
                            backend="auto", path: str | None = None, num_threads: int = 0, _chunk_keys: int = 0,
                            _split_keys: int = 0, _generic: bool = False) -> torch.Tensor:
    """Verify attention on token-major rows (module docstring): q [Tq, Hq, D] and out [To, Hq, D] fp32 or
    bf16 (any row stride), token_offsets [B] int64 the first row of each batch row's n tokens. n: an
    int, or an int64 tensor [B] of per-row counts (a ragged call: a prefill pass of prompts of many
    lengths in one call). The kernel reads q and writes out in place: no gather, cast or scatter. Rows of
    two batch rows must not overlap. Returns out."""
    lib, path_code = _resolve(backend, path, k_cache)
    B, N, Hq, Hkv, D, R, S, scale = _validate_tokens(q, k_cache, v_cache, slots, ctx_lens, token_offsets, n,
                                                     scale, out, values=lib is None)
    if lib is None:
        return verify_attention_tokens_reference(q, k_cache, v_cache, slots, ctx_lens, token_offsets, n, out,
                                                 scale=scale)
    if B > 0:
        _launch(lib, q, k_cache, v_cache, slots, ctx_lens, token_offsets, out, (B, N, Hq, Hkv, D, R, S), scale,
                num_threads, (_chunk_keys, _split_keys, _generic), path_code)
    return out
