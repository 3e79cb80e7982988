"""runtime/kernels/host_experts.py: the padded and grouped expert FFNs against one GEMM pair per expert and a
float64 recomputation, on fresh random inputs with empty experts, one expert and odd sizes; the path choice."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as Fn

from specmoe.runtime.kernels import host_experts as hx
from specmoe.runtime.kernels import moe_ops as ops


def _float64_ffn(xs, e_of_row, gu, dn):
    F = dn.shape[2]
    rows = [dn[e].double() @ (Fn.silu(gu[e, :F].double() @ x.double()) * (gu[e, F:].double() @ x.double()))
            for e, x in zip(e_of_row, xs)]
    return torch.stack(rows) if rows else torch.zeros(0, gu.shape[2], dtype=torch.float64)


def _close(got, want, dtype):
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    return torch.allclose(got.double(), want, rtol=tol, atol=tol * max(want.abs().max().item() if want.numel() else 0, 1e-30))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("counts", [[5, 0, 1, 9, 0, 0, 3], [0, 0, 17], [1], [0, 4, 0]])
def test_grouped_expert_ffn_is_the_per_expert_ffn_bit_for_bit(dtype, counts):
    """The grouped GEMMs give exactly what one GEMM pair per expert gives (so the engine's tokens do not
    depend on which runs), and both match a float64 recomputation of down . silu(gate) * up."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no grouped GEMM (the engine runs one GEMM pair per expert)")
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    E, H, F, N = len(counts), 40, 24, sum(counts)
    xs = torch.randn(N, H, generator=gen).to(dtype)
    gu, dn = torch.randn(E, 2 * F, H, generator=gen).to(dtype), torch.randn(E, H, F, generator=gen).to(dtype)
    got = hx.expert_ffn_grouped(xs, torch.tensor(counts), gu, dn)
    assert torch.equal(got, hx.expert_ffn_reference(xs, counts, gu, dn)), f"seed={seed}"
    e_of_row = torch.repeat_interleave(torch.arange(E), torch.tensor(counts)).tolist()
    assert _close(got, _float64_ffn(xs, e_of_row, gu, dn), dtype), f"seed={seed}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,K,E,H,F,skew", [(1, 1, 1, 8, 4, 0), (13, 2, 7, 40, 24, 0), (16, 2, 8, 33, 17, 12),
                                             (9, 3, 5, 16, 40, 9), (31, 4, 6, 24, 8, 0)])
def test_padded_expert_ffn_matches_the_per_expert_ffn(dtype, T, K, E, H, F, skew):
    """The padded batched GEMMs give, row for row in expert order, what one GEMM pair per expert gives (to the
    GEMMs' rounding) and what float64 gives, whatever the routing: skewed onto expert 0 (most rows padding
    elsewhere), experts left empty, one expert, odd sizes; combined, the same tokens as the per-expert path."""
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.rand(T, E, generator=gen).topk(K, dim=1).indices                 # K distinct experts a token
    ids[:skew, 0] = 0                                                           # skew: these tokens all hit 0
    ids[:skew, 1:] = torch.rand(skew, E - 1, generator=gen).topk(K - 1, dim=1).indices + 1 if K > 1 else ids[:skew, 1:]
    x = torch.randn(T, H, generator=gen).to(dtype)
    gu, dn = torch.randn(E, 2 * F, H, generator=gen).to(dtype) / 4, torch.randn(E, H, F, generator=gen).to(dtype) / 4
    perm = ops.expert_permutation(ids, E)
    counts = perm.counts.tolist()
    got = hx.expert_ffn_padded(x, ids, perm.perm, perm.inv, counts, gu, dn)
    xs = ops.permute_tokens(x, perm.perm, K)
    want = hx.expert_ffn_reference(xs, counts, gu, dn)
    assert got.shape == want.shape and got.dtype == dtype
    e_of_row = torch.repeat_interleave(torch.arange(E), perm.counts).tolist()
    assert _close(got, _float64_ffn(xs, e_of_row, gu, dn), dtype), f"seed={seed}"
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got.float(), want.float(), **tol, msg=f"seed={seed}")


def test_padded_expert_ffn_of_no_tokens_and_bad_counts():
    gu, dn = torch.zeros(3, 8, 5), torch.zeros(3, 5, 4)
    perm = ops.expert_permutation(torch.zeros(0, 2, dtype=torch.int64), 3)
    assert hx.expert_ffn_padded(torch.zeros(0, 5), torch.zeros(0, 2, dtype=torch.int64), perm.perm, perm.inv,
                                [0, 0, 0], gu, dn).shape == (0, 5)
    ids = torch.tensor([[0, 2]])
    perm = ops.expert_permutation(ids, 3)
    with pytest.raises(ops.KernelInputError, match="one entry per expert"):
        hx.expert_ffn_padded(torch.zeros(1, 5), ids, perm.perm, perm.inv, [1, 1], gu, dn)


def test_path_choice_follows_the_padding_cost(monkeypatch):
    """auto: padded while its padding rows cost less arithmetic than the grouped path's GEMM calls; the
    environment forces a path; grouped falls back to per-expert where torch's grouped GEMM is unusable."""
    monkeypatch.delenv(hx.HOST_EXPERTS_ENV, raising=False)
    monkeypatch.setattr(hx, "grouped_mm_supported", lambda dtype, device: True)
    f32 = torch.float32
    assert hx.host_experts_path([4, 4, 4, 4], 128, 256, f32, "cpu") == "padded"          # no padding at all
    # 8 experts, one with 20 rows: 8 * 20 - 34 = 126 padding rows of 6 * 128 * 256 FLOPs = 24.8 MFLOP > 16 calls
    assert hx.host_experts_path([20, 2, 2, 2, 2, 2, 2, 2], 128, 256, f32, "cpu") == "grouped"
    # the same routing for a model 16x smaller: the padding costs less than the calls
    assert hx.host_experts_path([20, 2, 2, 2, 2, 2, 2, 2], 32, 64, f32, "cpu") == "padded"
    rows_at_limit = int(2 * 8 * hx.GEMM_CALL_FLOP // (6 * 128 * 256))                 # padding rows it accepts
    n_max = 10
    counts = [n_max] + [1] * 7                                   # 8 * 10 - 17 = 63 padding rows
    assert (8 * n_max - sum(counts) <= rows_at_limit) == (hx.host_experts_path(counts, 128, 256, f32, "cpu") == "padded")
    for mode in ("padded", "grouped", "per-expert"):
        monkeypatch.setenv(hx.HOST_EXPERTS_ENV, mode)
        assert hx.host_experts_path([20, 0, 0, 1], 128, 256, f32, "cpu") == mode
    monkeypatch.setattr(hx, "grouped_mm_supported", lambda dtype, device: False)
    monkeypatch.setenv(hx.HOST_EXPERTS_ENV, "grouped")
    assert hx.host_experts_path([1, 1], 8, 8, f32, "cpu") == "per-expert"
    monkeypatch.setenv(hx.HOST_EXPERTS_ENV, "fast")
    with pytest.raises(ValueError, match="SPECMOE_HOST_EXPERTS='fast'"):
        hx.host_experts_path([1, 1], 8, 8, f32, "cpu")


def test_grouped_mm_probe_is_per_dtype_and_cached(monkeypatch):
    monkeypatch.setattr(hx, "_grouped_ok", {})
    assert hx.grouped_mm_supported(torch.float32, "cpu") is hasattr(torch, "_grouped_mm")
    assert list(hx._grouped_ok) == ([(torch.float32, "cpu")] if hasattr(torch, "_grouped_mm") else [])
