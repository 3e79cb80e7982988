"""C++ verify attention against the torch reference, input validation, build cache and fallback.

Dimension letters: B batch rows, N query tokens (k+1), Hq / Hkv query / KV heads, D head dim,
R cache rows, S cache capacity. Every run draws fresh random inputs (the seed is in each failure
message). The kernel is compared with the float64 reference on the very same cache values
(bf16 KV included). The fp32 path meets TOL on either dtype; bf16 KV on this machine's default
path (AMX, which rounds P to bf16 as flash attention does) meets BF16_PATH_TOL, still far under
the O(1) error of a wrong key, row or mask (test_verify_attention_bf16 covers every path).
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from specmoe.runtime.kernels import build
from specmoe.runtime.kernels import verify_attention as va

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5  # max |out - ref| / max |ref|; fp32 accumulation measures ~1e-6
BF16_PATH_TOL = 1e-2  # the bf16 paths round P (and a non-bf16 q) to bf16: measures 1-4e-3
RUN_SEED = random.SystemRandom().randrange(2**31)

needs_compiler = pytest.mark.skipif(build.find_compiler() is None, reason="no C++ compiler on this machine")


def make_case(B, N, Hq, Hkv, D, ctxs, kv_dtype=torch.float32, *, seed, q_scale=1.0, spare_rows=2, spare_pos=3):
    """Random inputs; every cache entry the call must not read is NaN."""
    gen = torch.Generator().manual_seed(seed)
    R, S = B + spare_rows, max(ctxs) + N + spare_pos
    slots = torch.randperm(R, generator=gen)[:B]  # non-identity cache rows
    k_cache = torch.full((R, Hkv, S, D), float("nan")).to(kv_dtype)  # [R, Hkv, S, D]
    v_cache = torch.full((R, Hkv, S, D), float("nan")).to(kv_dtype)
    for b, ctx in enumerate(ctxs):
        L = ctx + N
        k_cache[slots[b], :, :L] = torch.randn(Hkv, L, D, generator=gen).to(kv_dtype)
        v_cache[slots[b], :, :L] = torch.randn(Hkv, L, D, generator=gen).to(kv_dtype)
    q = torch.randn(B, N, Hq, D, generator=gen) * q_scale  # [B, N, Hq, D]
    ctx_lens = torch.tensor(ctxs, dtype=torch.int64)
    return q, k_cache, v_cache, slots, ctx_lens


def default_tol(kv_dtype, backend: str, kernel_kw: dict) -> float:
    """TOL where the fp32 path (or the torch reference) runs, BF16_PATH_TOL on a bf16 path."""
    if kv_dtype == torch.float32 or backend == "torch" or va._kernel() is None:
        return TOL
    return TOL if va.verify_attention_path(kv_dtype, kernel_kw.get("path")) == "fp32" else BF16_PATH_TOL


def check(B, N, Hq, Hkv, D, ctxs, kv_dtype=torch.float32, *, backend="cpp", q_scale=1.0, tol=None, **kernel_kw):
    tol = default_tol(kv_dtype, backend, kernel_kw) if tol is None else tol
    seed = random.randrange(2**31)
    q, k, v, slots, ctx_lens = make_case(B, N, Hq, Hkv, D, ctxs, kv_dtype, seed=seed, q_scale=q_scale)
    out = torch.full((B, N, Hq, D), float("nan"))  # every element must be written
    res = va.verify_attention(q, k, v, slots, ctx_lens, out=out, backend=backend, **kernel_kw)
    assert res is out
    ref = va.verify_attention_reference(q.double(), k.double(), v.double(), slots, ctx_lens)
    what = f"B={B} N={N} Hq={Hq} Hkv={Hkv} D={D} ctx={ctxs} {kv_dtype} {kernel_kw} seed={seed}"
    assert not torch.isnan(out).any(), f"NaN in output: {what}"
    err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}: {what}"
    return err


# The required values: N in {1,2,3,5,8,16,17}, ctx in {0,1,63,64,65,1000,5000}, B in {1,3,7},
# groups 1/4/8, D in {64,96,128}, both dtypes -- each appears in at least one case.
F32, BF16 = torch.float32, torch.bfloat16
CASES = [
    # B, N, Hq, Hkv, D, ctxs, dtype
    (1, 1, 4, 4, 64, [0], F32),
    (1, 1, 8, 2, 128, [1], BF16),
    (3, 17, 8, 2, 128, [0, 1, 63], BF16),
    (7, 5, 16, 2, 96, [64, 65, 0, 1, 1000, 63, 7], F32),
    (1, 16, 8, 2, 128, [5000], F32),  # B=1, long context: split-K across threads
    (3, 8, 4, 4, 64, [5000, 1000, 65], BF16),
    (3, 2, 16, 2, 128, [5000, 0, 64], BF16),
    (7, 3, 8, 2, 96, [9, 300, 0, 65, 64, 1, 130], BF16),
    (3, 16, 32, 8, 128, [1000, 63, 2047], F32),
    (1, 17, 64, 8, 64, [65], F32),
    # M = g*N <= 8 takes the row-split QK on AVX-512: M = 1, 2, 3, 4, 5, 8
    (3, 1, 4, 4, 128, [5000, 0, 64], F32),
    (3, 2, 4, 4, 96, [1, 63, 1000], BF16),
    (7, 3, 4, 4, 64, [0, 1, 63, 64, 65, 200, 1000], F32),
    (3, 1, 16, 4, 128, [65, 1000, 0], BF16),
    (3, 5, 2, 2, 96, [0, 64, 1000], F32),
    (3, 2, 32, 8, 128, [5000, 17, 64], F32),
]


@needs_compiler
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-N{c[1]}-g{c[2] // c[3]}-D{c[4]}-{str(c[6])[6:]}")
def test_kernel_matches_reference(case):
    B, N, Hq, Hkv, D, ctxs, dtype = case
    check(B, N, Hq, Hkv, D, ctxs, dtype)


@needs_compiler
def test_random_sample_of_cross_product():
    rng = random.Random(RUN_SEED)
    for _ in range(12):
        B = rng.choice([1, 3, 7])
        N = rng.choice([1, 2, 3, 5, 8, 16, 17])
        g = rng.choice([1, 4, 8])
        Hkv = rng.choice([1, 2])
        D = rng.choice([32, 64, 96, 128])
        ctxs = [rng.choice([0, 1, 63, 64, 65, 200, 1000]) for _ in range(B)]
        check(B, N, g * Hkv, Hkv, D, ctxs, rng.choice([F32, BF16]))


@needs_compiler
@pytest.mark.parametrize("D", [8, 32, 40, 80, 256])
def test_other_head_dims(D):
    check(3, 5, 4, 2, D, [0, 70, 300], F32)
    check(2, 4, 6, 3, D, [33, 1], BF16)


@needs_compiler
@pytest.mark.parametrize("D", [8, 24, 36, 72])
def test_row_split_with_head_dims_off_the_vector(D):
    """M = g*N = 1, 2, 4 query rows take the row-split QK (16, 8, 4 lanes a row where D allows) with
    one accumulator per (key, row) and Q rows padded to 16: head dims that are not a multiple of 16,
    contexts that leave a chunk shorter than a tile."""
    for g, N in ((1, 1), (2, 1), (4, 1), (2, 2)):
        check(3, N, 2 * g, 2, D, [0, 5, 300], F32)
        check(2, N, 2 * g, 2, D, [3, 130], BF16)


@needs_compiler
@pytest.mark.parametrize("N", [1, 2, 3, 5])
def test_head_dim_32_compiled_path_at_the_demos_shapes(N):
    """D = 32 (the bundled tiny model's) has its own compiled path: against the reference, and against
    the runtime-D path it replaced, at the demo's shapes (g = 2, short contexts) and awkward ones."""
    check(32, N, 4, 2, 32, [0, 1, 31, 33, 64, 97] * 5 + [200, 5], F32, num_threads=1)
    check(5, N, 8, 1, 32, [0, 17, 64, 130, 700], BF16)
    q, k, v, slots, ctx_lens = make_case(6, N, 4, 2, 32, [3, 40, 64, 65, 90, 300], seed=RUN_SEED + N)
    fast = va.verify_attention(q, k, v, slots, ctx_lens, backend="cpp")
    generic = va.verify_attention(q, k, v, slots, ctx_lens, backend="cpp", _generic=True)
    assert (fast - generic).abs().max().item() < 1e-5


@needs_compiler
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
def test_forced_paths_small_chunks_and_splits(dtype):
    """Chunk and split boundaries at every awkward offset, the runtime-D path, one thread."""
    ctxs = [0, 1, 23, 24, 25, 63, 64, 65]
    check(8, 17, 8, 2, 128, ctxs, dtype, _chunk_keys=24, _split_keys=48)
    check(8, 3, 8, 1, 64, ctxs, dtype, _chunk_keys=24, _split_keys=24)
    check(3, 8, 8, 2, 128, [100, 2000, 5], dtype, _generic=True, _split_keys=48)
    check(3, 8, 8, 2, 96, [100, 700, 5], dtype, num_threads=1)
    check(8, 2, 8, 2, 128, ctxs, dtype, _chunk_keys=24, _split_keys=24)  # row-split QK, M = 8
    check(8, 1, 8, 2, 64, ctxs, dtype, _chunk_keys=24, _split_keys=48)  # row-split QK, M = 4
    # Default chunk C = 72: an item's last chunk takes the rest (102 keys: 4 tiles + an overlapping
    # 5th), 132 = 72 + 60, 142 = 72 + 70; plain QK (M = 12) and row-split QK (M = 8).
    check(3, 3, 8, 2, 128, [99, 129, 139], dtype)
    check(3, 2, 8, 2, 128, [100, 130, 140], dtype)


@needs_compiler
@pytest.mark.parametrize("threads", [1, 3, 5])
def test_split_merge_with_any_team(threads):
    """Split-K parts meet on a counter before the merges (Join): teams of 1, more threads than
    cores, and more threads than items, both KV dtypes."""
    for dtype in (F32, BF16):
        check(2, 3, 8, 2, 128, [700, 90], dtype, _split_keys=48, num_threads=threads)


@needs_compiler
def test_team_smaller_than_asked_finishes():
    """OpenMP may give a smaller team than num_threads (OMP_THREAD_LIMIT here): the counters count
    the team there is, so the call neither hangs nor skips a merge."""
    code = ("import torch; from specmoe.runtime.kernels import verify_attention as va; "
            "torch.manual_seed(0); q = torch.randn(1, 2, 8, 64); k = torch.randn(1, 2, 900, 64); "
            "v = torch.randn_like(k); s = torch.zeros(1, dtype=torch.int64); c = torch.tensor([800]); "
            "o = va.verify_attention(q, k, v, s, c, backend='cpp', num_threads=4, _split_keys=48); "
            "r = va.verify_attention_reference(q.double(), k.double(), v.double(), s, c); "
            "print(float((o.double() - r).abs().max() / r.abs().max()))")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_THREAD_LIMIT": "1"})
    assert res.returncode == 0, res.stderr
    assert float(res.stdout.split()[-1]) <= TOL, res.stdout


_WORKER_CPU = """
import os, sys, torch
from specmoe.runtime.kernels import verify_attention as va
def others_ns():   # CPU time of every thread but this one (the OpenMP workers among them)
    me, t = str(os.getpid()), 0
    for tid in os.listdir("/proc/self/task"):
        if tid != me:
            t += int(open(f"/proc/self/task/{tid}/schedstat").read().split()[0])
    return t
def calls(n_keys, reps):
    q = torch.randn(1, 8, 4, 32); k = torch.randn(1, 2, n_keys + 8, 32); v = torch.randn_like(k)
    s, c = torch.zeros(1, dtype=torch.int64), torch.tensor([n_keys])
    va.verify_attention(q, k, v, s, c, backend="cpp", num_threads=2)
    t0 = others_ns()
    for _ in range(reps):
        va.verify_attention(q, k, v, s, c, backend="cpp", num_threads=2)
    return (others_ns() - t0) / reps
print(calls(0, 400), calls(4096, 100))
"""


@needs_compiler
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc/self/task/*/schedstat")
def test_small_call_leaves_the_sleeping_workers_asleep():
    """Under OMP_WAIT_POLICY=PASSIVE a call of a few us of work runs on the calling thread: the other
    threads' CPU time does not grow with such calls (a woken worker costs each 16-26 us, measured),
    while a call of ~100 us of work does use them (which shows the measurement sees the workers)."""
    res = subprocess.run([sys.executable, "-c", _WORKER_CPU], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "2"})
    assert res.returncode == 0, res.stderr
    small_ns, big_ns = (float(x) for x in res.stdout.split()[-2:])
    assert small_ns < 1000, f"other threads ran {small_ns:.0f} ns per small call"
    assert big_ns > 10_000, f"other threads ran only {big_ns:.0f} ns per large call: the workers were not seen"


@needs_compiler
def test_peaked_scores_stay_finite():
    """Scores in the hundreds: the online softmax must rescale, never overflow. fp32 rounding of a
    score s moves its weight by ~|s| * 6e-8, so torch's own fp32 path is also ~1e-5 off here."""
    check(3, 8, 8, 2, 128, [0, 500, 3000], F32, q_scale=30.0, tol=1e-4)
    check(3, 8, 8, 2, 64, [10, 500, 70], BF16, q_scale=30.0, tol=1e-4, path="fp32")
    # the default path: bf16 P; where the CPU has no bf16 path it is the fp32 path, with the fp32 allowance
    check(3, 8, 8, 2, 64, [10, 500, 70], BF16, q_scale=30.0, tol=max(1e-4, default_tol(BF16, "cpp", {})))
    check(3, 2, 8, 2, 128, [0, 500, 3000], F32, q_scale=30.0, tol=1e-4)  # row-split QK (M = 8)


def test_torch_backend_matches_reference():
    check(3, 5, 8, 2, 64, [0, 63, 200], F32, backend="torch", tol=1e-5)
    check(3, 5, 8, 2, 64, [0, 63, 200], BF16, backend="torch", tol=1e-5)


@needs_compiler
def test_out_none_scale_and_empty_batch():
    q, k, v, slots, ctx_lens = make_case(3, 4, 8, 2, 64, [5, 0, 90], seed=RUN_SEED)
    got = va.verify_attention(q, k, v, slots, ctx_lens, scale=0.3, backend="cpp")
    ref = va.verify_attention_reference(q.double(), k.double(), v.double(), slots, ctx_lens, scale=0.3)
    assert got.shape == (3, 4, 8, 64) and got.dtype == torch.float32
    assert ((got.double() - ref).abs().max() / ref.abs().max()).item() <= TOL
    empty = va.verify_attention(q[:0], k, v, slots[:0], ctx_lens[:0], backend="cpp")
    assert empty.shape == (0, 4, 8, 64)


@needs_compiler
def test_concurrent_callers_from_python_threads():
    """Each calling thread gets its own OpenMP team and work buffers: results stay exact."""
    import threading

    cases = [make_case(3, n, 8, 2, 128, [n * 37, 900, 64], seed=RUN_SEED + n) for n in (1, 4, 8, 16)]
    want = [va.verify_attention(*c, backend="cpp") for c in cases]
    errors: list[str] = []

    def worker(i: int) -> None:
        for _ in range(15):
            got = va.verify_attention(*cases[i], backend="cpp")
            if not torch.equal(got, want[i]):
                errors.append(f"case {i} differs")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


@needs_compiler
def test_auto_backend_is_the_kernel():
    assert va.verify_attention_backend() == "cpp-openmp"
    assert "openmp=1" in va.kernel_info()


# ------------------------------------------------------------------------- bad inputs


def _bad_inputs():
    def base():
        q, k, v, slots, ctx_lens = make_case(2, 3, 4, 2, 16, [4, 9], seed=1)
        return dict(q=q, k_cache=k, v_cache=v, slots=slots, ctx_lens=ctx_lens)

    def mod(**changes):
        def make():
            a = base()
            for key, fn in changes.items():
                a[key] = fn(a) if callable(fn) else fn
            return a
        return make

    return [
        ("q", mod(q=lambda a: a["q"][0])),  # 3-D
        ("q", mod(q=lambda a: a["q"].double())),
        ("q", mod(q=lambda a: a["q"].transpose(1, 2).contiguous().transpose(1, 2))),  # non-contiguous
        ("q", mod(q=lambda a: a["q"][:, :0].contiguous())),  # N = 0
        ("q", mod(q=lambda a: torch.empty(a["q"].shape, device="meta"))),  # not on the CPU
        ("q", mod(q=lambda a: a["q"][:, :, :3].contiguous())),  # Hq=3 not a multiple of Hkv=2
        ("q", mod(q=lambda a: a["q"].numpy())),
        ("k_cache", mod(k_cache=lambda a: a["k_cache"].to(torch.int8), v_cache=lambda a: a["v_cache"].to(torch.int8))),
        ("k_cache", mod(k_cache=lambda a: a["k_cache"][..., :8].contiguous(),
                        v_cache=lambda a: a["v_cache"][..., :8].contiguous())),  # head dim differs
        ("k_cache", mod(k_cache=lambda a: a["k_cache"].transpose(1, 2).contiguous().transpose(1, 2))),
        ("k_cache", mod(k_cache=lambda a: a["k_cache"][0])),
        ("v_cache", mod(v_cache=lambda a: a["v_cache"][:, :, :-1].contiguous())),
        ("v_cache", mod(v_cache=lambda a: a["v_cache"].bfloat16())),
        ("slots", mod(slots=lambda a: a["slots"].int())),
        ("slots", mod(slots=lambda a: a["slots"][:1])),
        ("slots", mod(slots=lambda a: a["slots"].repeat_interleave(2)[::2])),  # strided view
        ("ctx_lens", mod(ctx_lens=lambda a: a["ctx_lens"].repeat_interleave(2)[::2])),
        ("slots", mod(slots=torch.tensor([0, 4]))),  # R = 4
        ("slots", mod(slots=torch.tensor([-1, 0]))),
        ("ctx_lens", mod(ctx_lens=torch.tensor([-1, 0]))),
        ("ctx_lens", mod(ctx_lens=torch.tensor([0, 13]))),  # 13 + 3 > S = 15
        ("ctx_lens", mod(ctx_lens=lambda a: a["ctx_lens"].float())),
        ("out", lambda: {**base(), "out": torch.empty(2, 3, 4, 15)}),
        ("out", lambda: {**base(), "out": torch.empty(2, 3, 4, 16, dtype=torch.float64)}),
        ("out", lambda: {**base(), "out": torch.empty(2, 3, 16, 4).transpose(2, 3)}),
        ("scale", lambda: {**base(), "scale": float("nan")}),
        ("backend", lambda: {**base(), "backend": "cuda"}),
    ]


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("arg,make", _bad_inputs(), ids=lambda x: x if isinstance(x, str) else "")
def test_bad_input_raises_clear_error(arg, make, backend):
    kwargs = make()
    kwargs.setdefault("backend", backend)
    with pytest.raises(va.VerifyAttentionInputError, match=rf"verify_attention: {arg}:"):
        va.verify_attention(**kwargs)


@needs_compiler
def test_c_entry_point_rejects_bad_indices_without_writing():
    """Defence in depth: the C ABI itself refuses out-of-range slots / ctx (no crash)."""
    lib = va._kernel()
    q, k, v, slots, ctx_lens = make_case(2, 3, 4, 2, 16, [4, 9], seed=2)
    out = torch.full((2, 3, 4, 16), 7.0)

    R, S = k.shape[0], k.shape[2]

    def call(sl, cl):
        return lib.specmoe_verify_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), 0, sl.data_ptr(),
                                            cl.data_ptr(), out.data_ptr(), 2, 3, 4, 2, 16, R, S, 0.25, 0, 0, 0, 0)

    assert call(torch.tensor([0, R]), ctx_lens) == -2
    assert call(slots, torch.tensor([0, S - 2])) == -3
    assert call(slots, torch.tensor([-5, 0])) == -3
    assert (out == 7.0).all()
    assert call(slots, ctx_lens) == 0


# ------------------------------------------------------------------------- build, cache, fallback


@pytest.fixture
def fresh_backend(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECMOE_CACHE_DIR", str(tmp_path / "cache"))
    va._reset_backend()
    yield tmp_path
    monkeypatch.undo()
    va._reset_backend()


def _load_in_subprocess(env):
    code = ("from specmoe.runtime.kernels import build; lib = build.load_cpp_kernel('verify_attention'); "
            "print(build.build_count, lib is not None)")
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow  # two concurrent kernel builds (~7 s on 2 idle cores); run by default
@needs_compiler
def test_portable_avx_build_concurrent_cached_and_correct(fresh_backend, monkeypatch):
    """Two processes build the same kernel at once; this process then loads it without building;
    the AVX (8-wide) path it holds is correct; a second load in-process does not rebuild."""
    monkeypatch.setenv("SPECMOE_CXXFLAGS", "-mno-avx512f")
    env = dict(os.environ)
    procs = [_load_in_subprocess(env) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (so, se) in zip(procs, outs):
        assert p.returncode == 0 and so.split()[1] == "True", se
    assert sum(int(so.split()[0]) for so, _ in outs) >= 1
    built = list((fresh_backend / "cache" / "kernels").rglob("*.so"))
    assert len(built) == 1 and not list((fresh_backend / "cache").rglob("*.tmp"))

    before = build.build_count
    info = va.kernel_info()
    assert build.build_count == before, "a kernel already in the cache was rebuilt"
    if "isa=avx512" in info:
        pytest.fail(f"-mno-avx512f was not applied: {info}")
    check(3, 17, 8, 2, 128, [0, 64, 1000], F32)
    check(3, 5, 8, 1, 96, [1, 63, 300], BF16, _chunk_keys=24, _split_keys=48)
    check(2, 3, 8, 2, 40, [7, 100], F32)
    va._reset_backend()
    monkeypatch.setattr(build, "_loaded", {})
    assert va.kernel_info() == info and build.build_count == before


@pytest.mark.slow  # one kernel build (~6 s); run by default
@needs_compiler
def test_portable_128bit_build_correct(fresh_backend, monkeypatch):
    monkeypatch.setenv("SPECMOE_CXXFLAGS", "-mno-avx")
    info = va.kernel_info()
    if info is None or "isa=avx" in info:
        pytest.skip(f"the compiler does not take -mno-avx here ({info})")
    assert "width=4" in info
    check(3, 8, 8, 2, 128, [0, 65, 700], F32)
    check(2, 5, 8, 1, 64, [1, 300], BF16, _chunk_keys=24, _split_keys=48)


def test_no_compiler_falls_back_to_torch(fresh_backend, monkeypatch, caplog):
    monkeypatch.setenv("SPECMOE_CXX", str(fresh_backend / "no-such-compiler"))
    with caplog.at_level(logging.WARNING, logger="specmoe.kernels"):
        assert va.verify_attention_backend() == "torch-reference"
        check(2, 3, 8, 2, 64, [0, 40], F32, backend="auto")
        check(2, 3, 8, 2, 64, [0, 40], F32, backend="auto")
    text = caplog.text
    assert "no-such-compiler" in text and "torch" in text
    assert text.count("using the torch reference") == 1, "the fallback warning must be logged once"
    with pytest.raises(va.KernelUnavailableError):
        check(1, 1, 4, 4, 64, [0], F32, backend="cpp")
    assert not (fresh_backend / "cache" / "kernels").exists() or not list(
        (fresh_backend / "cache" / "kernels").rglob("*.so"))


@needs_compiler
def test_failed_build_logs_compiler_error(fresh_backend, monkeypatch, caplog):
    monkeypatch.setenv("SPECMOE_CXXFLAGS", "--no-such-flag-for-specmoe")
    with caplog.at_level(logging.WARNING, logger="specmoe.kernels"):
        assert build.load_cpp_kernel("verify_attention") is None
        assert va.verify_attention_backend() == "torch-reference"
    assert "no-such-flag-for-specmoe" in caplog.text and "Compiler said" in caplog.text


def test_unknown_kernel_name_is_a_clear_error():
    with pytest.raises(ValueError, match="no kernel source"):
        build.load_cpp_kernel("no_such_kernel")


def test_importing_runtime_kernels_build_does_not_import_torch():
    code = "import sys, runtime, runtime.kernels.build; print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "False", res.stderr


@pytest.mark.slow  # one kernel build with -DVA_CHECK_UNITS (~20 s on 2 cores); run by default
@needs_compiler
def test_prefetch_pacer_counts_the_work_each_path_steps(fresh_backend, monkeypatch):
    """The prefetch pacer spreads a chunk's requests over the work units it counts for the chunk;
    a count that differs from what the path's tiles step leaves lines unrequested (or requests them
    early), which no result shows. A checking build compares the two on every chunk of every path
    this CPU offers, row-split and plain tiles, head dims on and off the compiled ones."""
    monkeypatch.setenv("SPECMOE_CXXFLAGS", "-DVA_CHECK_UNITS")
    assert "units=0/0/0" in va.kernel_info()
    shapes = [(1, 1), (2, 1), (4, 1), (4, 2), (8, 1), (4, 4), (4, 8), (8, 16)]  # (g, N): M = 1 .. 128
    for dtype, paths in ((F32, [None]), (BF16, va.available_paths())):
        for i, (path, (g, N)) in enumerate(itertools.product(paths, shapes)):
            D = (128, 64, 96, 40)[i % 4]
            q, k, v, slots, ctx_lens = make_case(2, N, 2 * g, 2, D, [300, 700], dtype, seed=RUN_SEED + i)
            va.verify_attention(q, k, v, slots, ctx_lens, backend="cpp", path=path)
    chunks, off, worst = map(int, va.kernel_info().split("units=")[1].split("/"))
    assert chunks > 100 and off == 0, f"{off} of {chunks} chunks counted off by more than 10% (worst {worst}%)"
