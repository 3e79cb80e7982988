"""The torch references of runtime.kernels.moe_ops against plain loop implementations.

The loops below are written for clarity, not speed; inputs are fresh random tensors with awkward
sizes. Dimensions as in moe_ops: T, K, N = T*K, E, H; M, F; B, k, V; Hq, Hkv, G, D, R, S.
"""

from __future__ import annotations

import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as Fn

from specmoe.runtime.kernels import moe_ops as ops

REPO = Path(__file__).resolve().parent.parent


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _topk_ids(t: int, k: int, e: int, dtype, g, distinct: bool) -> torch.Tensor:
    if distinct:  # like a router: K different experts per token
        return torch.rand(t, e, generator=g).topk(k, dim=1).indices.to(dtype)
    return torch.randint(0, e, (t, k), generator=g, dtype=torch.int64).to(dtype)


# ----------------------------------------------------------------------------- permutation


def loop_expert_permutation(ids: torch.Tensor, e: int):
    flat = ids.reshape(-1).tolist()
    counts = [0] * e
    for x in flat:
        counts[x] += 1
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    perm = [i for expert in range(e) for i, x in enumerate(flat) if x == expert]
    inv = [0] * len(flat)
    for pos, i in enumerate(perm):
        inv[i] = pos
    return counts, offsets, perm, inv


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize(
    "t,k,e,distinct",
    [(1, 1, 1, True), (1, 8, 60, True), (37, 2, 8, True), (37, 8, 60, True), (37, 3, 60, False),
     (64, 4, 1, False), (513, 2, 8, True), (100, 6, 7, False)],
)
def test_expert_permutation_matches_loop(t, k, e, distinct, dtype):
    g = _gen(1000 * t + 10 * k + e)
    ids = _topk_ids(t, k, e, dtype, g, distinct)
    got = ops.expert_permutation_reference(ids, e)
    counts, offsets, perm, inv = loop_expert_permutation(ids, e)
    assert got.counts.tolist() == counts
    assert got.offsets.tolist() == offsets
    assert got.perm.tolist() == perm
    assert got.inv.tolist() == inv
    assert all(x.dtype == torch.int64 for x in got)
    # dispatch on CPU is the reference
    assert [x.tolist() for x in ops.expert_permutation(ids, e)] == [x.tolist() for x in got]


def test_expert_permutation_properties():
    g = _gen(7)
    t, k, e = 301, 4, 60
    ids = _topk_ids(t, k, e, torch.int64, g, distinct=False)
    counts, offsets, perm, inv = ops.expert_permutation_reference(ids, e)
    n = t * k
    flat = ids.reshape(-1)
    assert sorted(perm.tolist()) == list(range(n))  # a permutation
    assert torch.equal(inv[perm], torch.arange(n))
    assert torch.equal(perm[inv], torch.arange(n))
    sorted_ids = flat[perm]
    assert bool((sorted_ids[1:] >= sorted_ids[:-1]).all())  # grouped by expert
    for x in range(e):  # stable: token order kept inside each expert
        seg = perm[offsets[x] : offsets[x + 1]]
        assert bool((seg[1:] > seg[:-1]).all())
        assert bool((flat[seg] == x).all())
    assert int(counts.sum()) == n and int(offsets[-1]) == n


def test_expert_permutation_rejects_bad_input():
    with pytest.raises(ops.KernelInputError, match=r"topk_ids values must be in \[0, 4\)"):
        ops.expert_permutation(torch.tensor([[0, 4]]), 4)
    with pytest.raises(ops.KernelInputError, match="topk_ids values"):
        ops.expert_permutation(torch.tensor([[-1, 2]]), 4)
    with pytest.raises(ops.KernelInputError, match="2 dimensions"):
        ops.expert_permutation(torch.tensor([0, 1]), 4)
    with pytest.raises(ops.KernelInputError, match="dtype"):
        ops.expert_permutation(torch.tensor([[0.0, 1.0]]), 4)
    with pytest.raises(ops.KernelInputError, match="num_experts"):
        ops.expert_permutation(torch.tensor([[0, 1]]), 0)


def test_unchecked_permutation_and_combine_give_the_checked_result():
    """check=False (the engine's call on its router's ids and the permutation's own inv) skips only the range
    checks: the same tensors, and ids or inv out of range still fail (torch's error, not a wrong answer)."""
    g = _gen(11)
    t, k, e, h = 23, 3, 7, 10
    ids = _topk_ids(t, k, e, torch.int64, g, distinct=False)
    checked, unchecked = ops.expert_permutation(ids, e), ops.expert_permutation(ids, e, check=False)
    assert all(torch.equal(a, b) for a, b in zip(checked, unchecked))
    ys, w = torch.randn(t * k, h, generator=g), torch.rand(t, k, generator=g)
    assert torch.equal(ops.unpermute_combine(ys, checked.inv, w, check=False),
                       ops.unpermute_combine(ys, checked.inv, w))
    with pytest.raises((IndexError, RuntimeError)):
        ops.unpermute_combine(torch.zeros(4, 3), torch.tensor([0, 1, 2, 9]), torch.zeros(2, 2), check=False)
    with pytest.raises(RuntimeError):
        ops.expert_permutation(torch.tensor([[-1, 2]]), 4, check=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("t,k,h", [(1, 1, 1), (1, 8, 7), (37, 2, 13), (37, 8, 64), (5, 3, 4096)])
def test_permute_tokens_matches_loop(t, k, h, dtype):
    g = _gen(t * 31 + k * 7 + h)
    e = 9
    x = torch.randn(t, h, generator=g).to(dtype)
    ids = _topk_ids(t, k, e, torch.int64, g, distinct=True)
    perm = ops.expert_permutation_reference(ids, e).perm
    got = ops.permute_tokens_reference(x, perm, k)
    want = torch.empty(t * k, h, dtype=dtype)
    for p in range(t * k):
        want[p] = x[perm[p] // k]
    assert torch.equal(got, want)
    assert torch.equal(ops.permute_tokens(x, perm, k), want)


def test_permute_tokens_rejects_bad_input():
    x = torch.zeros(3, 4)
    with pytest.raises(ops.KernelInputError, match="T\\*K"):
        ops.permute_tokens(x, torch.arange(5), 2)
    with pytest.raises(ops.KernelInputError, match="perm values"):
        ops.permute_tokens(x, torch.tensor([0, 1, 2, 3, 4, 6]), 2)
    with pytest.raises(ops.KernelInputError, match="int64"):
        ops.permute_tokens(x, torch.arange(6, dtype=torch.int32), 2)


def loop_combine(ys, inv, w, out_dtype):
    t, k = w.shape
    h = ys.shape[1]
    y = torch.zeros(t, h, dtype=torch.float64)
    for ti in range(t):
        for ki in range(k):
            y[ti] += float(w[ti, ki]) * ys[inv[ti * k + ki]].double()
    return y


@pytest.mark.parametrize("in_dtype,out_dtype", [(torch.bfloat16, None), (torch.float32, None),
                                                (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("t,k,h", [(1, 1, 1), (1, 8, 9), (37, 2, 13), (37, 8, 64), (40, 3, 33)])
def test_unpermute_combine_matches_loop(t, k, h, in_dtype, out_dtype):
    g = _gen(t * 131 + k * 17 + h)
    e = 11
    ys = torch.randn(t * k, h, generator=g).to(in_dtype)
    w = torch.rand(t, k, generator=g)
    inv = ops.expert_permutation_reference(_topk_ids(t, k, e, torch.int64, g, distinct=True), e).inv
    got = ops.unpermute_combine_reference(ys, inv, w, out_dtype)
    want = loop_combine(ys, inv, w, out_dtype)
    expect_dtype = in_dtype if out_dtype is None else out_dtype
    assert got.dtype == expect_dtype and got.shape == (t, h)
    tol = 1e-5 if expect_dtype == torch.float32 else 8e-3
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_permute_then_combine_round_trip():
    g = _gen(3)
    t, k, e, h = 37, 4, 60, 21
    x = torch.randn(t, h, generator=g)
    ids = _topk_ids(t, k, e, torch.int64, g, distinct=True)
    w = torch.softmax(torch.randn(t, k, generator=g), dim=1)
    counts, offsets, perm, inv = ops.expert_permutation(ids, e)
    xs = ops.permute_tokens(x, perm, k)  # identity "experts"
    y = ops.unpermute_combine(xs, inv, w)
    torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)


def test_unpermute_combine_rejects_bad_input():
    with pytest.raises(ops.KernelInputError, match="N = T\\*K"):
        ops.unpermute_combine(torch.zeros(5, 3), torch.arange(5), torch.zeros(3, 2))
    with pytest.raises(ops.KernelInputError, match="inv values"):
        ops.unpermute_combine(torch.zeros(4, 3), torch.tensor([0, 1, 2, 9]), torch.zeros(2, 2))
    with pytest.raises(ops.KernelInputError, match="ys must have dtype"):
        ops.unpermute_combine(torch.zeros(4, 3, dtype=torch.float64), torch.arange(4), torch.zeros(2, 2))


# ----------------------------------------------------------------------------- SiLU * mul


def loop_silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    out = torch.empty(gate.shape, dtype=torch.float64)
    g2, u2, o2 = gate.reshape(-1, gate.shape[-1]), up.reshape(-1, up.shape[-1]), out.view(-1, gate.shape[-1])
    for m in range(g2.shape[0]):
        for f in range(g2.shape[1]):
            x = float(g2[m, f])
            o2[m, f] = x / (1.0 + math.exp(-x)) * float(u2[m, f])
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (37, 16), (2, 3, 5)])
def test_silu_mul_matches_loop(shape, dtype):
    g = _gen(sum(shape) * 13)
    f = shape[-1]
    gate_up = (4 * torch.randn(*shape[:-1], 2 * f, generator=g)).to(dtype)
    gate, up = gate_up[..., :f], gate_up[..., f:]
    want = loop_silu_mul(gate, up)
    fused = ops.silu_mul_reference(gate_up)
    split = ops.silu_mul_reference(gate.contiguous(), up.contiguous())
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    for got in (fused, split, ops.silu_mul(gate_up), ops.silu_mul(gate, up)):
        assert got.dtype == dtype and got.shape == shape
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(fused, split, rtol=1e-6, atol=1e-6)  # strided vs contiguous: ulps apart


def test_silu_mul_rejects_bad_input():
    with pytest.raises(ops.KernelInputError, match="even last dimension"):
        ops.silu_mul(torch.zeros(3, 5))
    with pytest.raises(ops.KernelInputError, match="one shape"):
        ops.silu_mul(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(ops.KernelInputError, match="dtype"):
        ops.silu_mul(torch.zeros(3, 4, dtype=torch.float64))


# ----------------------------------------------------------------------------- acceptance


def loop_greedy(draft, target):
    acc, nxt = [], []
    for b in range(draft.shape[0]):
        j = 0
        while j < draft.shape[1] and int(draft[b, j]) == int(target[b, j]):
            j += 1
        acc.append(j)
        nxt.append(int(target[b, j]))
    return acc, nxt


@pytest.mark.parametrize("b,k", [(1, 1), (1, 0), (37, 1), (37, 4), (64, 8)])
def test_greedy_accept_matches_loop(b, k):
    g = _gen(b * 10 + k)
    target = torch.randint(0, 5, (b, k + 1), generator=g)
    draft = target[:, :k].clone()
    flip = torch.rand(b, k, generator=g) < 0.25  # mismatches at random places
    draft[flip] = (draft[flip] + 1) % 5
    got = ops.greedy_accept(draft, target)
    acc, nxt = loop_greedy(draft, target)
    assert got.accepted_len.tolist() == acc and got.next_token.tolist() == nxt
    ref = ops.greedy_accept_reference(draft, target)
    assert torch.equal(ref.accepted_len, got.accepted_len) and torch.equal(ref.next_token, got.next_token)
    assert got.accepted_len.dtype == torch.int64 and got.next_token.dtype == torch.int64


def test_greedy_accept_rejects_bad_shapes():
    with pytest.raises(ops.KernelInputError, match=r"\[B, k\+1\]"):
        ops.greedy_accept(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ops.KernelInputError, match="dtype"):
        ops.greedy_accept(torch.zeros(2, 3, dtype=torch.int32), torch.zeros(2, 4, dtype=torch.int64))


def loop_rejection(draft, q, p, u_acc, u_smp):
    b, k = draft.shape
    v = p.shape[2]
    acc, nxt = [], []
    for bi in range(b):
        n = 0
        while n < k:
            x = int(draft[bi, n])
            if not float(u_acc[bi, n]) * float(q[bi, n, x]) < float(p[bi, n, x]):
                break
            n += 1
        if n < k:
            dist = [max(float(p[bi, n, j]) - float(q[bi, n, j]), 0.0) for j in range(v)]
            if sum(dist) <= 0:
                dist = [float(p[bi, n, j]) for j in range(v)]
        else:
            dist = [float(p[bi, k, j]) for j in range(v)]
        total = 0.0
        for x in dist:  # sequential, as torch.cumsum
            total += x
        thr = float(u_smp[bi]) * total
        c, tok = 0.0, max((j for j in range(v) if dist[j] > 0), default=v - 1)
        for j in range(v):
            c += dist[j]
            if c > thr:
                tok = j
                break
        acc.append(n)
        nxt.append(tok)
    return acc, nxt


def _probs(*shape, g, peaked: float = 1.0) -> torch.Tensor:
    return torch.softmax(peaked * torch.randn(*shape, generator=g), dim=-1)


@pytest.mark.parametrize("b,k,v", [(1, 1, 2), (37, 3, 11), (20, 8, 50), (5, 1, 1)])
def test_rejection_sample_matches_loop(b, k, v):
    g = _gen(b * 100 + k * 10 + v)
    q = _probs(b, k, v, g=g, peaked=2.0)
    p = _probs(b, k + 1, v, g=g, peaked=2.0)
    p[:, :k] = 0.5 * p[:, :k] + 0.5 * q  # overlap so that some drafts are accepted
    draft = torch.multinomial(q.reshape(-1, v), 1, generator=g).view(b, k)
    u_acc, u_smp = ops.draw_uniforms(b, k, generator=g)
    got = ops.rejection_sample_accept(draft, q, p, u_acc, u_smp)
    acc, nxt = loop_rejection(draft, q, p, u_acc, u_smp)
    assert got.accepted_len.tolist() == acc
    assert got.next_token.tolist() == nxt


def test_rejection_sample_when_target_equals_draft_accepts_all():
    g = _gen(5)
    b, k, v = 50, 4, 9
    q = _probs(b, k, v, g=g)
    p = torch.cat([q, _probs(b, 1, v, g=g)], dim=1)
    draft = torch.multinomial(q.reshape(-1, v), 1, generator=g).view(b, k)
    u_acc, u_smp = ops.draw_uniforms(b, k, generator=g)
    assert ops.rejection_sample_accept(draft, q, p, u_acc, u_smp).accepted_len.tolist() == [k] * b


def _chi2(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expect = probs.double() * tokens.numel()
    return float(((counts - expect) ** 2 / expect).sum())


def test_rejection_sampling_reproduces_target_distribution():
    """Each emitted token is distributed as the target's p (chi-square, V = 5, df = 4).

    The bound 18.47 is the 99.9% quantile of chi2(4); the seed is fixed, so the test is
    deterministic. As a power check, the draft's own tokens (from q != p) fail the same bound.
    """
    g = _gen(2024)
    n, k, v = 40000, 2, 5
    p_rows = torch.tensor([[0.40, 0.30, 0.15, 0.10, 0.05],
                           [0.05, 0.10, 0.20, 0.25, 0.40],
                           [0.20, 0.20, 0.20, 0.20, 0.20]])  # [k+1, V] target per position
    q_rows = torch.tensor([[0.10, 0.20, 0.30, 0.20, 0.20],
                           [0.30, 0.30, 0.20, 0.10, 0.10]])  # [k, V] draft per position
    p = p_rows.expand(n, k + 1, v).contiguous()
    q = q_rows.expand(n, k, v).contiguous()
    draft = torch.stack([torch.multinomial(q_rows[j], n, replacement=True, generator=g) for j in range(k)], dim=1)
    u_acc, u_smp = ops.draw_uniforms(n, k, generator=g)
    acc, nxt = ops.rejection_sample_accept(draft, q, p, u_acc, u_smp)
    bound = 18.47
    first = torch.where(acc >= 1, draft[:, 0], nxt)  # emitted token 0
    assert _chi2(first, p_rows[0]) < bound
    kept = acc >= 1  # emitted token 1 (its position was reached)
    second = torch.where(acc[kept] >= 2, draft[kept, 1], nxt[kept])
    assert int(kept.sum()) > 5000
    assert _chi2(second, p_rows[1]) < bound
    bonus = nxt[acc == k]  # the bonus token after all k accepted
    assert bonus.numel() > 2000
    assert _chi2(bonus, p_rows[2]) < bound
    assert _chi2(draft[:, 0], p_rows[0]) > 10 * bound  # the test can fail


def test_rejection_sample_rejects_bad_shapes():
    b, k, v = 2, 3, 4
    q = torch.full((b, k, v), 0.25)
    p = torch.full((b, k + 1, v), 0.25)
    d = torch.zeros(b, k, dtype=torch.int64)
    ua, us = ops.draw_uniforms(b, k)
    with pytest.raises(ops.KernelInputError, match="target_probs must have shape"):
        ops.rejection_sample_accept(d, q, p[:, :k], ua, us)
    with pytest.raises(ops.KernelInputError, match="u_sample must have shape"):
        ops.rejection_sample_accept(d, q, p, ua, us[:1])


# ----------------------------------------------------------------------------- draft attention


def loop_attention(q, k_cache, v_cache, slots, lens, scale):
    b, hq, d = q.shape
    g = hq // k_cache.shape[1]
    out = torch.empty(b, hq, d, dtype=torch.float64)
    for bi in range(b):
        row, n = int(slots[bi]), int(lens[bi])
        for h in range(hq):
            keys = k_cache[row, h // g, :n].double()  # [n, D]
            vals = v_cache[row, h // g, :n].double()
            scores = [float(q[bi, h].double() @ keys[j]) * scale for j in range(n)]
            mx = max(scores)
            w = [math.exp(s - mx) for s in scores]
            total = sum(w)
            out[bi, h] = sum(w[j] / total * vals[j] for j in range(n))
    return out


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "b,hq,hkv,d,s,lens",
    [(1, 4, 4, 16, 1, [1]), (3, 8, 2, 64, 100, [1, 33, 100]), (4, 16, 2, 32, 70, [70, 5, 32, 61]),
     (2, 6, 3, 24, 40, [17, 40])],
)
def test_draft_attention_matches_loop(b, hq, hkv, d, s, lens, kv_dtype):
    g = _gen(b * 1000 + hq * 10 + d)
    r = b + 3
    q = torch.randn(b, hq, d, generator=g)
    k_cache = torch.randn(r, hkv, s, d, generator=g).to(kv_dtype)
    v_cache = torch.randn(r, hkv, s, d, generator=g).to(kv_dtype)
    slots = torch.randperm(r, generator=g)[:b]
    lens_t = torch.tensor(lens)
    got = ops.draft_decode_attention(q, k_cache, v_cache, slots, lens_t)
    assert got.dtype == torch.float32 and got.shape == (b, hq, d)
    want = loop_attention(q, k_cache, v_cache, slots, lens_t, 1.0 / math.sqrt(d))
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)
    got2 = ops.draft_decode_attention_reference(q.to(kv_dtype), k_cache, v_cache, slots, lens_t, scale=0.3)
    want2 = loop_attention(q.to(kv_dtype), k_cache, v_cache, slots, lens_t, 0.3)
    torch.testing.assert_close(got2.double(), want2, rtol=2e-5, atol=2e-5)


def test_draft_attention_on_strided_cache_view():
    g = _gen(11)
    layers, r, hkv, s, d, b, hq = 3, 5, 2, 50, 32, 3, 8
    cache = torch.randn(layers, 2, r, hkv, s, d, generator=g)  # [layer, k/v, R, Hkv, S, D]
    k_cache, v_cache = cache[1, 0], cache[1, 1]
    q = torch.randn(b, hq, d, generator=g)
    slots, lens = torch.tensor([4, 0, 2]), torch.tensor([50, 9, 31])
    got = ops.draft_decode_attention(q, k_cache, v_cache, slots, lens)
    want = loop_attention(q, k_cache, v_cache, slots, lens, 1.0 / math.sqrt(d))
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)


def test_draft_attention_rejects_bad_input():
    q = torch.zeros(2, 4, 8)
    kc = torch.zeros(3, 2, 10, 8)
    ok_slots, ok_lens = torch.tensor([0, 2]), torch.tensor([1, 10])
    with pytest.raises(ops.KernelInputError, match=r"lens must be in \[1, 10\]"):
        ops.draft_decode_attention(q, kc, kc, ok_slots, torch.tensor([0, 3]))
    with pytest.raises(ops.KernelInputError, match=r"lens must be in \[1, 10\]"):
        ops.draft_decode_attention(q, kc, kc, ok_slots, torch.tensor([11, 3]))
    with pytest.raises(ops.KernelInputError, match=r"slots must be cache rows in \[0, 3\)"):
        ops.draft_decode_attention(q, kc, kc, torch.tensor([0, 3]), ok_lens)
    with pytest.raises(ops.KernelInputError, match="multiple of KV heads"):
        ops.draft_decode_attention(torch.zeros(2, 3, 8), kc, kc, ok_slots, ok_lens)
    with pytest.raises(ops.KernelInputError, match="head dim"):
        ops.draft_decode_attention(torch.zeros(2, 4, 6), kc, kc, ok_slots, ok_lens)
    with pytest.raises(ops.KernelInputError, match="scale"):
        ops.draft_decode_attention(q, kc, kc, ok_slots, ok_lens, scale=-1.0)


def test_dda_split_plan():
    from specmoe.runtime.kernels.cuda_ops import dda_splits

    assert dda_splits(256, 8, 1024, 132) == (1, 1024)  # B * Hkv blocks already fill the GPU
    assert dda_splits(4, 8, 200, 132) == (1, 200)  # short: no split
    for b, hkv, n in [(4, 8, 1024), (1, 2, 4097), (5, 8, 1000), (2, 2, 300)]:
        p, split_len = dda_splits(b, hkv, n, 132)
        assert p > 1 and split_len % 64 == 0
        assert (p - 1) * split_len < n <= p * split_len  # covers all keys, no empty trailing split


# ----------------------------------------------------------------------------- packaging


def test_kernel_backends_names_every_op():
    backends = ops.kernel_backends()
    assert set(backends) == {"expert_permutation", "permute_tokens", "unpermute_combine", "silu_mul",
                             "greedy_accept", "rejection_sample_accept", "draft_decode_attention"}
    assert set(backends.values()) <= {"cupy-cuda", "torch-cuda", "torch-cpu"}


def test_imports_and_runs_without_cupy():
    code = (
        "import sys; sys.modules['cupy'] = None\n"  # makes `import cupy` fail
        "import torch\n"
        "from specmoe.runtime.kernels import moe_ops, cuda_ops\n"
        "assert not cuda_ops.cuda_available()\n"
        "assert 'cupy' in cuda_ops.unavailable_reason()\n"
        "assert set(moe_ops.kernel_backends().values()) <= {'torch-cpu', 'torch-cuda'}\n"
        "r = moe_ops.expert_permutation(torch.tensor([[1, 0], [1, 1]]), 2)\n"
        "assert r.perm.tolist() == [1, 0, 2, 3], r\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
