"""The verify kernel with per-row query counts (verify_attention_tokens with n a tensor [B]: one call for
a prefill pass of prompts of many lengths): against the float64 reference row by row on fresh random
inputs (counts 1 .. 70, contexts 0 and 1 among them, awkward head dims, g = 1 and 8, every path this
machine offers), bit for bit the same as one call per count, rows no sequence owns left untouched,
and every bad count refused with the argument named before any memory is touched.

Dimension letters: T tokens of a pass, B sequences, n[b] tokens of sequence b, Hq / Hkv heads, D head dim.
"""
from __future__ import annotations

import random

import pytest
import torch

from specmoe.runtime.kernels import verify_attention as va

needs_kernel = pytest.mark.skipif(va.kernel_info() is None, reason="no C++ verify kernel on this machine")
PATHS = va.available_paths() or ("fp32",)
TOL = {"fp32": 1e-5, "amx": 1e-2, "avx512bf16": 1e-2}     # as tests/test_verify_attention_tokens.py


def ragged_case(counts, ctxs, Hq, Hkv, D, kv_dtype, seed, gap=1):
    """Sequences of counts[b] new tokens after ctxs[b] cached ones, their q rows shuffled into a
    token-major [T, Hq, D] buffer with `gap` unused rows between them; cache entries no call may read
    are NaN -> (q, k_cache, v_cache, slots, ctx_lens, offsets, n, T)."""
    gen = torch.Generator().manual_seed(seed)
    B = len(counts)
    R, S = B + 2, max(c + n for c, n in zip(ctxs, counts)) + 3
    slots = torch.randperm(R, generator=gen)[:B]
    k = torch.full((R, Hkv, S, D), float("nan")).to(kv_dtype)                   # [R, Hkv, S, D]
    v = torch.full((R, Hkv, S, D), float("nan")).to(kv_dtype)
    for b in range(B):
        L = ctxs[b] + counts[b]
        k[slots[b], :, :L] = torch.randn(Hkv, L, D, generator=gen).to(kv_dtype)
        v[slots[b], :, :L] = torch.randn(Hkv, L, D, generator=gen).to(kv_dtype)
    order = torch.randperm(B, generator=gen).tolist()
    offsets, t = torch.empty(B, dtype=torch.int64), gap
    for b in order:
        offsets[b], t = t, t + counts[b] + gap
    q = torch.full((t, Hq, D), float("nan"))                                   # [T, Hq, D]
    for b in range(B):
        q[offsets[b]:offsets[b] + counts[b]] = torch.randn(counts[b], Hq, D, generator=gen)
    return q, k, v, slots, torch.tensor(ctxs, dtype=torch.int64), offsets, torch.tensor(counts), t


def random_counts(rng: random.Random, B: int) -> tuple[list[int], list[int]]:
    """Counts 1 .. 70 with repeats (two rows of one count share a group), contexts 0, 1 or up to 300."""
    pool = [rng.randint(1, 70) for _ in range(max(1, B // 2))]
    counts = [rng.choice(pool + [1]) for _ in range(B)]
    ctxs = [rng.choice([0, 1, rng.randint(2, 300)]) for _ in range(B)]
    return counts, ctxs


@needs_kernel
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(8, 1), (4, 2), (8, 8)], ids=["g8", "g2", "g1"])
@pytest.mark.parametrize("D", [32, 40, 128])
def test_ragged_rows_match_reference(D, heads, kv_dtype, path):
    if kv_dtype == torch.float32 and path != "fp32":
        pytest.skip("fp32 KV takes the fp32 path")
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    counts, ctxs = random_counts(rng, rng.randint(1, 9))
    Hq, Hkv = heads
    q, k, v, slots, ctx_lens, offsets, n, T = ragged_case(counts, ctxs, Hq, Hkv, D, kv_dtype, seed)
    out = torch.full((T, Hq, D), 7.0)
    assert va.verify_attention_tokens(q, k, v, slots, ctx_lens, offsets, n, out, path=path) is out
    owned = torch.zeros(T, dtype=torch.bool)
    for b in range(len(counts)):
        rows = slice(int(offsets[b]), int(offsets[b]) + counts[b])
        owned[rows] = True
        ref = va.verify_attention_reference(q[rows][None].double(), k.double(), v.double(), slots[b:b + 1],
                                            ctx_lens[b:b + 1])[0]                # [n_b, Hq, D]
        err = ((out[rows].double() - ref).abs().max() / ref.abs().max()).item()
        assert err <= TOL[path], f"b={b} n={counts[b]} ctx={ctxs[b]} err {err:.2e} path={path} seed={seed}"
    assert (out[~owned] == 7.0).all(), f"a row no sequence owns was written (seed={seed})"


@needs_kernel
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
def test_ragged_call_is_the_calls_per_count(kv_dtype):
    """Grouped by count inside the kernel, each group a uniform call: the same bits as a call per count (on
    one thread: the threads a call has decide how it splits long contexts); on two, side by side or one
    after another, the reference's values."""
    seed = random.randrange(2**31)
    counts, ctxs = random_counts(random.Random(seed), 12)
    q, k, v, slots, ctx_lens, offsets, n, T = ragged_case(counts, ctxs, 8, 2, 64, kv_dtype, seed)
    one = torch.zeros(T, 8, 64)
    va.verify_attention_tokens(q, k, v, slots, ctx_lens, offsets, n, one, num_threads=1)
    per = torch.zeros(T, 8, 64)
    for nv in sorted(set(counts)):
        sel = torch.nonzero(n == nv).flatten()
        va.verify_attention_tokens(q, k, v, slots[sel], ctx_lens[sel], offsets[sel], nv, per, num_threads=1)
    assert torch.equal(one, per), f"seed={seed}"
    two = torch.zeros(T, 8, 64)
    va.verify_attention_tokens(q, k, v, slots, ctx_lens, offsets, n, two, num_threads=2)
    tol = 1e-5 if kv_dtype == torch.float32 else 1e-2
    assert ((two - one).abs().max() / one.abs().max()).item() <= tol, f"seed={seed}"


def test_torch_backend_takes_ragged_rows():
    counts, ctxs = [3, 1, 5, 3], [0, 7, 1, 2]
    q, k, v, slots, ctx_lens, offsets, n, T = ragged_case(counts, ctxs, 4, 2, 16, torch.float32, seed=5)
    out = torch.full((T, 4, 16), 7.0)
    va.verify_attention_tokens(q, k, v, slots, ctx_lens, offsets, n, out, backend="torch")
    for b in range(4):
        rows = slice(int(offsets[b]), int(offsets[b]) + counts[b])
        ref = va.verify_attention_reference(q[rows][None], k, v, slots[b:b + 1], ctx_lens[b:b + 1])[0]
        assert torch.allclose(out[rows], ref, atol=1e-6)
    assert int((out == 7.0).all(-1).all(-1).sum()) == T - sum(counts)


def _bad_ragged_inputs():
    def base(**changes):
        q, k, v, slots, ctx_lens, offsets, n, T = ragged_case([3, 1], [4, 0], 4, 2, 16, torch.float32, seed=1, gap=0)
        a = dict(q=q, k_cache=k, v_cache=v, slots=slots, ctx_lens=ctx_lens, token_offsets=offsets, n=n,
                 out=torch.full((T, 4, 16), 7.0))
        for key, fn in changes.items():
            a[key] = fn(a) if callable(fn) else fn
        return a

    return [
        ("n", lambda: base(n=torch.tensor([3, 0]))),
        ("n", lambda: base(n=torch.tensor([3, 1], dtype=torch.int32))),
        ("n", lambda: base(n=torch.tensor([3]))),
        ("n", lambda: base(n=torch.tensor([[3, 1]]))),
        ("token_offsets", lambda: base(n=torch.tensor([3, 2]))),        # the second sequence runs past T = 4
        ("ctx_lens", lambda: base(ctx_lens=torch.tensor([4, 10]))),     # 10 + 1 > S = 10
    ]


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("arg,make", _bad_ragged_inputs(), ids=lambda x: x if isinstance(x, str) else "")
def test_bad_ragged_input_raises_clear_error(arg, make, backend):
    a = make()
    before = a["out"].clone()
    with pytest.raises(va.VerifyAttentionInputError, match=rf"verify_attention: {arg}:"):
        va.verify_attention_tokens(**a, backend=backend)
    assert torch.equal(a["out"], before)


@needs_kernel
def test_c_ragged_entry_refuses_bad_rows_without_writing():
    q, k, v, slots, ctx_lens, offsets, n, T = ragged_case([3, 1], [4, 0], 4, 2, 16, torch.float32, seed=2, gap=0)
    lib = va._kernel()
    out = torch.full((T, 4, 16), 7.0)
    R, S = k.shape[0], k.shape[2]

    def call(counts, tokens=offsets, T=T):
        return lib.specmoe_verify_attention_ragged(
            q.data_ptr(), 0, 64, k.data_ptr(), v.data_ptr(), 0, slots.data_ptr(), ctx_lens.data_ptr(),
            None if tokens is None else tokens.data_ptr(), counts.data_ptr(), T, out.data_ptr(), 0, 64,
            2, 4, 2, 16, R, S, 0.25, 0, 0, 0, 0)

    assert call(torch.tensor([3, -1])) == -1 and call(torch.tensor([3, 1]), tokens=None) == -1
    assert call(torch.tensor([3, 2])) == -6 and call(torch.tensor([3, 1]), T=3) == -6
    assert call(torch.tensor([S, 1])) == -3
    assert (out == 7.0).all()
    assert call(n) == 0 and not (out == 7.0).any()
