"""The CuPy kernels against their torch references on fresh random CUDA inputs (awkward sizes).

Marked `gpu`: skipped, with the reason, where CuPy or a CUDA GPU is missing. Before each kernel
call the CUDA caching allocator's free memory is filled with 0xFF bytes, so outputs the kernels
allocate start as NaN (floats) / -1 (ints): an element a kernel forgets to write shows up.
Dimensions as in moe_ops.
"""

from __future__ import annotations

import pytest
import torch

from specmoe.runtime.kernels import cuda_ops
from specmoe.runtime.kernels import moe_ops as ops

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _need_gpu():
    if not cuda_ops.cuda_available():
        pytest.skip(f"needs a CUDA GPU with cupy: {cuda_ops.unavailable_reason()}")


DEV = "cuda"


def poison() -> None:
    """Fill the caching allocator's free blocks (large and small pools) with 0xFF bytes."""
    torch.cuda.synchronize()
    big = [torch.full((1 << 26,), 255, dtype=torch.uint8, device=DEV) for _ in range(2)]
    small = [torch.full((n,), 255, dtype=torch.uint8, device=DEV) for n in (512, 4096, 65536, 1 << 20) for _ in range(8)]
    del big, small


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed(seed)


def test_poisoning_reaches_fresh_allocations():
    poison()
    fresh = [torch.empty(n, dtype=torch.int64, device=DEV) for n in (10, 3000, 1 << 20)]
    for t in fresh:  # all allocated before any comparison result takes memory
        assert bool((t == -1).all()), f"fresh int64[{t.numel()}] not poisoned"


def test_backends_name_cupy():
    assert set(ops.kernel_backends().values()) == {"cupy-cuda"}


# ----------------------------------------------------------------------------- permutation


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize(
    "t,k,e,distinct",
    [(1, 1, 1, True), (1, 8, 60, True), (37, 2, 8, True), (37, 8, 60, True), (5000, 2, 8, True),
     (4096, 8, 256, False), (3001, 6, 128, True), (700, 1, 3, False)],
)
def test_expert_permutation(t, k, e, distinct, dtype):
    g = _gen(t + 7 * k + e)
    if distinct:
        ids = torch.rand(t, e, generator=g, device=DEV).topk(k, dim=1).indices.to(dtype)
    else:
        ids = torch.randint(0, e, (t, k), generator=g, device=DEV).to(dtype)
    poison()
    got = ops.expert_permutation(ids, e)
    want = ops.expert_permutation_reference(ids.cpu(), e)
    for name, a, b in zip(got._fields, got, want):
        assert a.is_cuda and a.dtype == torch.int64
        assert torch.equal(a.cpu(), b), name


def test_expert_permutation_bad_ids():
    ids = torch.tensor([[0, 1], [5, 2], [1, -1]], device=DEV)
    with pytest.raises(ops.KernelInputError, match=r"topk_ids values must be in \[0, 4\)"):
        ops.expert_permutation(ids, 4)
    got = ops.expert_permutation(ids, 4, check=False)  # no raise, no out-of-bounds writes
    assert got.inv.cpu().tolist()[2] == -1 and got.inv.cpu().tolist()[5] == -1
    assert got.counts.cpu().tolist() == [1, 2, 1, 0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("t,k,h", [(1, 1, 1), (1, 8, 7), (37, 2, 13), (37, 8, 64), (300, 2, 4096), (5, 3, 8)])
@pytest.mark.parametrize("misaligned", [False, True])
def test_permute_tokens(t, k, h, dtype, misaligned):
    g = _gen(t * 3 + k + h)
    base = torch.randn(t * h + 1, generator=g, device=DEV).to(dtype)
    x = (base[1:] if misaligned else base[:-1]).view(t, h)
    ids = torch.rand(t, 9, generator=g, device=DEV).topk(min(k, 9), dim=1).indices
    perm = ops.expert_permutation(ids, 9).perm
    poison()
    got = ops.permute_tokens(x, perm, ids.shape[1])
    assert torch.equal(got, ops.permute_tokens_reference(x, perm, ids.shape[1]))


@pytest.mark.parametrize("in_dtype,out_dtype", [(torch.bfloat16, None), (torch.float32, None),
                                                (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("t,k,h", [(1, 1, 1), (1, 8, 9), (37, 2, 13), (37, 8, 64), (200, 2, 4096), (64, 3, 24)])
def test_unpermute_combine(t, k, h, in_dtype, out_dtype):
    g = _gen(t * 5 + k * 3 + h)
    e = 11
    ids = torch.rand(t, e, generator=g, device=DEV).topk(k, dim=1).indices
    inv = ops.expert_permutation(ids, e).inv
    ys = torch.randn(t * k, h, generator=g, device=DEV).to(in_dtype)
    w = torch.rand(t, k, generator=g, device=DEV)
    poison()
    got = ops.unpermute_combine(ys, inv, w, out_dtype)
    exact = ops.unpermute_combine_reference(ys, inv, w, torch.float32)
    want_dtype = in_dtype if out_dtype is None else out_dtype
    assert got.dtype == want_dtype and got.shape == (t, h)
    if want_dtype == torch.float32:
        torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-5)
    else:  # one rounding to bf16 of a sum that may differ in the last fp32 bits
        torch.testing.assert_close(got.float(), exact, rtol=8e-3, atol=1e-5)


# ----------------------------------------------------------------------------- SiLU * mul


@pytest.mark.parametrize("dtype,f", [(torch.bfloat16, 1), (torch.bfloat16, 7), (torch.bfloat16, 14),
                                     (torch.bfloat16, 4096), (torch.bfloat16, 1432), (torch.float32, 3),
                                     (torch.float32, 4), (torch.float32, 4096)])
@pytest.mark.parametrize("m", [1, 37])
def test_silu_mul(m, f, dtype):
    g = _gen(m * 11 + f)
    gate_up = (4 * torch.randn(m, 2 * f, generator=g, device=DEV)).to(dtype)
    gate, up = gate_up[:, :f].contiguous(), gate_up[:, f:].contiguous()
    want = ops.silu_mul_reference(gate_up).float()
    for args in ((gate_up,), (gate, up), (gate_up[:, :f], gate_up[:, f:])):
        poison()
        got = ops.silu_mul(*args)
        assert got.dtype == dtype and got.shape == (m, f)
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        else:
            torch.testing.assert_close(got.float(), want, rtol=8e-3, atol=1e-6)


def test_silu_mul_3d_and_misaligned():
    g = _gen(99)
    base = torch.randn(2 * 5 * 2 * 16 + 1, generator=g, device=DEV).to(torch.bfloat16)
    gate_up = base[1:].view(2, 5, 32)  # 2-byte misaligned rows
    poison()
    got = ops.silu_mul(gate_up)
    torch.testing.assert_close(got.float(), ops.silu_mul_reference(gate_up).float(), rtol=8e-3, atol=1e-6)


# ----------------------------------------------------------------------------- acceptance


@pytest.mark.parametrize("b,k", [(1, 1), (1, 0), (37, 1), (37, 4), (1000, 8), (129, 5)])
def test_greedy_accept(b, k):
    g = _gen(b + k)
    target = torch.randint(0, 4, (b, k + 1), generator=g, device=DEV)
    draft = target[:, :k].clone()
    flip = torch.rand(b, k, generator=g, device=DEV) < 0.2
    draft[flip] = (draft[flip] + 1) % 4
    poison()
    got = ops.greedy_accept(draft, target)
    want = ops.greedy_accept_reference(draft.cpu(), target.cpu())
    assert torch.equal(got.accepted_len.cpu(), want.accepted_len)
    assert torch.equal(got.next_token.cpu(), want.next_token)


@pytest.mark.parametrize("b,k,v", [(1, 1, 2), (37, 3, 50), (300, 8, 5000), (64, 4, 32000), (3, 2, 1)])
def test_rejection_sample_accept(b, k, v):
    g = _gen(b * 7 + k + v)
    q = torch.softmax(2 * torch.randn(b, k, v, generator=g, device=DEV), dim=-1)
    p = torch.softmax(2 * torch.randn(b, k + 1, v, generator=g, device=DEV), dim=-1)
    p[:, :k] = 0.5 * p[:, :k] + 0.5 * q
    draft = torch.multinomial(q.reshape(-1, v), 1, generator=g).view(b, k)
    u_acc, u_smp = ops.draw_uniforms(b, k, generator=g, device=DEV)
    poison()
    got = ops.rejection_sample_accept(draft, q, p, u_acc, u_smp)
    want = ops.rejection_sample_accept_reference(draft.cpu(), q.cpu(), p.cpu(), u_acc.cpu(), u_smp.cpu())
    assert torch.equal(got.accepted_len.cpu(), want.accepted_len)
    gt, wt = got.next_token.cpu(), want.next_token
    assert bool(((gt >= 0) & (gt < v)).all())
    bad = (gt != wt).nonzero().flatten().tolist()
    assert len(bad) <= max(1, b // 100)
    for row in bad:  # only where u_sample lands on a CDF step, within summation-order rounding
        n = int(want.accepted_len[row])
        pr = p[row, n].double().cpu()
        qr = q[row, n].double().cpu() if n < k else torch.zeros_like(pr)
        dist = (pr.float() - qr.float()).clamp_min(0).double()
        dist = dist if dist.sum() > 0 else pr
        cdf = dist.cumsum(0)
        thr = float(u_smp[row]) * float(cdf[-1])
        lo, hi = sorted((int(gt[row]), int(wt[row])))
        assert bool(((cdf[lo:hi] - thr).abs() < 1e-9 * float(cdf[-1])).all()), (row, lo, hi)


# ----------------------------------------------------------------------------- draft attention

ATTN_CASES = [
    # b, hq, hkv, d, s, lens (None: random in [1, s])
    (3, 8, 8, 128, 100, [1, 33, 100]),  # G = 1, fast, one split
    (5, 32, 8, 128, 1000, None),  # G = 4, split-K
    (2, 16, 2, 64, 300, [300, 7]),  # G = 8, split-K, D = 64
    (4, 8, 2, 256, 70, [70, 5, 32, 61]),  # G = 4, D = 256
    (64, 32, 8, 128, 512, None),  # B * Hkv >= 2 * SMs: one split
    (3, 6, 2, 40, 50, [1, 17, 50]),  # G = 3, D = 40: generic kernel
    (2, 12, 12, 80, 33, [33, 2]),  # D = 80: generic kernel
    (1, 4, 2, 64, 4097, [4097]),  # long single sequence, many splits
]


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("b,hq,hkv,d,s,lens", ATTN_CASES)
def test_draft_decode_attention(b, hq, hkv, d, s, lens, kv_dtype):
    g = _gen(b * 1000 + hq + d + s)
    r = b + 2
    q = torch.randn(b, hq, d, generator=g, device=DEV)
    kc = torch.randn(r, hkv, s, d, generator=g, device=DEV).to(kv_dtype)
    vc = torch.randn(r, hkv, s, d, generator=g, device=DEV).to(kv_dtype)
    slots = torch.randperm(r, generator=g, device=DEV)[:b]
    lens_t = (torch.tensor(lens, device=DEV) if lens is not None
              else torch.randint(1, s + 1, (b,), generator=g, device=DEV))
    want = ops.draft_decode_attention_reference(q, kc, vc, slots, lens_t)
    poison()
    got = ops.draft_decode_attention(q, kc, vc, slots, lens_t)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    poison()
    got2 = ops.draft_decode_attention(q.to(kv_dtype), kc, vc, slots, lens_t, scale=0.05,
                                      max_len=int(lens_t.max()))
    want2 = ops.draft_decode_attention_reference(q.to(kv_dtype), kc, vc, slots, lens_t, scale=0.05)
    torch.testing.assert_close(got2, want2, rtol=1e-4, atol=1e-4)


def test_draft_attention_strided_view_and_side_stream():
    g = _gen(5)
    cache = torch.randn(2, 2, 6, 8, 300, 128, generator=g, device=DEV).to(torch.bfloat16)
    kc, vc = cache[1, 0], cache[1, 1]  # [R, Hkv, S, D] views, non-contiguous over R
    q = torch.randn(4, 32, 128, generator=g, device=DEV)
    slots, lens = torch.tensor([5, 0, 3, 1], device=DEV), torch.tensor([300, 1, 129, 64], device=DEV)
    want = ops.draft_decode_attention_reference(q, kc, vc, slots, lens)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        poison()
        got = ops.draft_decode_attention(q, kc, vc, slots, lens)
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_draft_attention_bad_rows():
    q = torch.randn(3, 8, 64, device=DEV)
    kc = torch.randn(4, 2, 50, 64, device=DEV)
    slots, lens = torch.tensor([0, 9, 2], device=DEV), torch.tensor([10, 10, 50], device=DEV)
    with pytest.raises(ops.KernelInputError, match="slots must be cache rows"):
        ops.draft_decode_attention(q, kc, kc, slots, lens)
    got = ops.draft_decode_attention(q, kc, kc, slots, lens, max_len=50)  # unchecked: row 1 is NaN
    assert bool(got[1].isnan().all())
    good = torch.tensor([0, 2])
    want = ops.draft_decode_attention_reference(q[good], kc, kc, slots[good], lens[good])
    torch.testing.assert_close(got[good], want, rtol=1e-4, atol=1e-4)
