"""CPU verify attention: N = k+1 query tokens per sequence against its KV cache rows.

Dimension letters: B batch rows in this call, N query tokens per sequence (= k+1, uniform in a
call), Hq query heads, Hkv KV heads (g = Hq / Hkv query heads per KV head), D head dim, R cache
rows (capacity in sequences), S cache capacity in positions, L = ctx + N keys of one sequence.

    verify_attention(q, k_cache, v_cache, slots, ctx_lens, *, scale=None, out=None, backend="auto",
                     path=None)

q [B, N, Hq, D] fp32; k_cache, v_cache [R, Hkv, S, D] fp32 or bf16, the N new keys/values of
batch row b already written at positions ctx_lens[b] .. ctx_lens[b]+N-1 of cache row slots[b];
query i of batch row b attends keys 0 .. ctx_lens[b]+i. Returns out [B, N, Hq, D] fp32.

Backends: "cpp" (csrc/verify_attention.cpp, C++/OpenMP, compiled on first use by
runtime.kernels.build), "torch" (verify_attention_reference) and "auto" (cpp if it builds, else
torch with one logged warning). verify_attention_backend() names what "auto" resolves to.

Paths of the C++ kernel for bf16 KV (fp32 KV always takes "fp32"): "amx" (AMX tiles,
Q and P carried as sums of bf16 parts: fp32-path accuracy), "avx512bf16" (VDPBF16PS dot
products, Q and P rounded to bf16) and "fp32" (K and V widened to fp32). The argument path, else
the environment variable SPECMOE_VERIFY_PATH, else "auto" picks one: "amx" where available_paths()
offers it (this machine's cpuid flags and the kernel's tile permission), else "fp32". "auto" never
takes "avx512bf16" (it rounds Q and P to bf16: about 3e-3 off the fp32 path), which runs when asked for.
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
AUTO_PATH = "amx"        # the one bf16 path "auto" takes where offered: fp32-path accuracy at tile speed
_KV_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


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
            fn = lib.specmoe_verify_attention
            i64, ptr = ctypes.c_int64, ctypes.c_void_p
            fn.argtypes = [ptr, ptr, ptr, ctypes.c_int32, ptr, ptr, ptr,
                           i64, i64, i64, i64, i64, i64, i64,
                           ctypes.c_float, ctypes.c_int32, i64, i64, ctypes.c_int32]
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
    ("amx", "avx512bf16", "fp32"); () without the C++ kernel."""
    info = kernel_info()
    if info is None:
        return ()
    for word in info.split():
        if word.startswith("paths="):
            return tuple(word[len("paths="):].split(","))
    return ("fp32",)


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
        return AUTO_PATH if AUTO_PATH in offered else "fp32"
    if name not in offered:
        raise KernelUnavailableError(f"verify_attention: path {name!r} is not available on this machine "
                                     f"(it offers {offered or 'no C++ kernel'}); use path='auto'")
    return name


def _fail(arg: str, problem: str, fix: str) -> None:
    raise VerifyAttentionInputError(f"verify_attention: {arg}: {problem}; {fix}")


def _check_values(slots, ctx_lens, N: int, R: int, S: int) -> None:
    """Range checks of slots and ctx_lens (the C entry point repeats them before any access)."""
    if slots.shape[0] == 0:
        return
    lo, hi = torch.aminmax(slots)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= R:
        _fail("slots", f"holds {lo if lo < 0 else hi}, outside the cache's {R} rows", f"use 0 <= slot < {R}")
    cmin, cmax = torch.aminmax(ctx_lens)
    cmin, cmax = int(cmin), int(cmax)
    if cmin < 0:
        _fail("ctx_lens", f"holds {cmin}", "cached lengths must be >= 0")
    if cmax + N > S:
        _fail("ctx_lens", f"holds {cmax}: {cmax} + N={N} exceeds the cache capacity S={S}",
              f"keep ctx_lens <= S - N = {S - N}")


def _validate(q, k_cache, v_cache, slots, ctx_lens, scale, out, *, reference: bool = False,
              values: bool = True):
    """Check every argument before any memory is touched; returns (B, N, Hq, Hkv, D, R, S, scale).

    values=False leaves the range checks of slots / ctx_lens to the C entry point, which makes
    them before touching memory and returns an error code that _check_values then explains."""
    names = ("q", "k_cache", "v_cache", "slots", "ctx_lens")
    for name, t in zip(names, (q, k_cache, v_cache, slots, ctx_lens)):
        if not isinstance(t, torch.Tensor):
            _fail(name, f"expected a torch.Tensor, got {type(t).__name__}", "pass a CPU tensor")
        if not t.is_cpu:
            _fail(name, f"is on {t.device}", "this kernel runs on the CPU: pass a CPU tensor")
    q_dtypes = (torch.float32, torch.float64) if reference else (torch.float32,)
    # fp16 KV: the C kernel takes it (kv_dtype 2: widened on the fp32 path, rounded to bf16 on the
    # others) but the API still refuses it, as tests/test_verify_attention.py pins.
    kv_dtypes = (torch.float32, torch.bfloat16, torch.float64) if reference else (torch.float32, torch.bfloat16)
    if q.dim() != 4:
        _fail("q", f"has shape {tuple(q.shape)}", "expected [B, N, Hq, D]")
    if q.dtype not in q_dtypes:
        _fail("q", f"has dtype {q.dtype}", "expected torch.float32")
    B, N, Hq, D = q.shape
    if N < 1 or Hq < 1 or D < 1:
        _fail("q", f"has shape {tuple(q.shape)} with an empty N, Hq or D", "N = k+1 >= 1 query tokens")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dim() != 4:
            _fail(name, f"has shape {tuple(t.shape)}", "expected [R, Hkv, S, D]")
        if t.dtype not in kv_dtypes:
            _fail(name, f"has dtype {t.dtype}", "expected torch.float32 or torch.bfloat16")
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
    for name, t in zip(names[:3], (q, k_cache, v_cache)):
        if not t.is_contiguous():
            _fail(name, "is not contiguous", "pass .contiguous()")
    for name, t in (("slots", slots), ("ctx_lens", ctx_lens)):
        if t.dtype != torch.int64 or t.dim() != 1 or t.shape[0] != B:
            _fail(name, f"is {t.dtype} of shape {tuple(t.shape)}", f"expected int64 of shape [{B}] (B of q)")
        if not t.is_contiguous():
            _fail(name, "is not contiguous", "pass .contiguous()")
    if values:
        _check_values(slots, ctx_lens, N, R, S)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif not isinstance(scale, (int, float)) or not math.isfinite(scale):
        _fail("scale", f"is {scale!r}", "pass a finite float or None for 1/sqrt(D)")
    if out is not None:
        if not isinstance(out, torch.Tensor) or not out.is_cpu:
            _fail("out", "must be a CPU tensor", "pass a CPU tensor or None")
        want_dtype = out.dtype if reference and out.dtype == torch.float64 else torch.float32
        if tuple(out.shape) != (B, N, Hq, D) or out.dtype != want_dtype or not out.is_contiguous():
            _fail("out", f"is {out.dtype} {tuple(out.shape)} (contiguous={out.is_contiguous()})",
                  f"expected a contiguous float32 tensor of shape {(B, N, Hq, D)}")
    return B, N, Hq, Hkv, D, R, S, float(scale)


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


def verify_attention(q, k_cache, v_cache, slots, ctx_lens, *, scale=None, out=None, backend="auto",
                     path: str | None = None, num_threads: int = 0, _chunk_keys: int = 0,
                     _split_keys: int = 0, _generic: bool = False) -> torch.Tensor:
    """Verify attention of N = k+1 query tokens per sequence (see module docstring).

    path: the C++ kernel's path for bf16 / fp16 KV (module docstring; None: SPECMOE_VERIFY_PATH,
    else "auto"). num_threads: 0 uses the OpenMP default (OMP_NUM_THREADS). _chunk_keys,
    _split_keys and _generic tune or force kernel paths for tests and benchmarks.
    """
    if backend not in BACKENDS:
        _fail("backend", f"is {backend!r}", f"use one of {BACKENDS}")
    lib = _kernel() if backend != "torch" else None
    requested = _requested_path(path)
    # "auto" is resolved here, not by the kernel (which would take avx512bf16 where there is no AMX)
    path_code = _PATH_CODE[verify_attention_path(k_cache.dtype, requested) if requested == "auto" and lib is not None
                           and isinstance(k_cache, torch.Tensor) else requested]
    B, N, Hq, Hkv, D, R, S, scale = _validate(q, k_cache, v_cache, slots, ctx_lens, scale, out,
                                              values=lib is None)
    if backend != "torch":
        if lib is None and backend == "cpp":
            raise KernelUnavailableError(
                "verify_attention: backend='cpp' but the C++ kernel could not be built (see the "
                "logged compiler error; set SPECMOE_CXX to a working compiler) - use backend='auto'")
        if lib is None and not _state.get("warned"):
            _state["warned"] = True
            log.warning("verify_attention: C++ kernel unavailable, using the torch reference (slow)")
    if out is None:
        out = torch.empty(B, N, Hq, D, dtype=torch.float32)  # [B, N, Hq, D]
    if lib is None:
        return verify_attention_reference(q, k_cache, v_cache, slots, ctx_lens, scale=scale, out=out)
    if B == 0:
        return out
    flags = int(_generic) | path_code << 2
    rc = lib.specmoe_verify_attention(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), _KV_CODE[k_cache.dtype],
        slots.data_ptr(), ctx_lens.data_ptr(), out.data_ptr(),
        B, N, Hq, Hkv, D, R, S, scale, int(num_threads), int(_chunk_keys), int(_split_keys), flags)
    if rc == -5:
        verify_attention_path(k_cache.dtype, [p for p, c in _PATH_CODE.items() if c == path_code][0])
    if rc == -4:
        raise MemoryError("verify_attention: the C++ kernel could not allocate its work buffers")
    if rc != 0:  # -2 / -3: a slot or ctx_len out of range, found before any memory access
        _check_values(slots, ctx_lens, N, R, S)
        raise RuntimeError(f"verify_attention: C++ kernel rejected its arguments (code {rc})")
    return out
