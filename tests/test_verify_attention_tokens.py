"""The verify kernel on token-major rows (verify_attention_tokens): q read in place from a strided
view of one buffer holding q, k and v per token (fp32 or bf16), the output written at the sequences'
token offsets (fp32 or bf16), against the float64 reference on the same values; rows the call does
not own stay untouched; bf16 q and bf16 out change nothing but the rounding of the output.

Dimension letters: T tokens of a pass, B sequences, N = k+1 tokens each, Hq / Hkv heads, D head dim.
"""
from __future__ import annotations

import random

import pytest
import torch

from specmoe.runtime.kernels import verify_attention as va
from test_verify_attention import make_case

needs_kernel = pytest.mark.skipif(va.kernel_info() is None, reason="no C++ verify kernel on this machine")
PATHS = va.available_paths() or ("fp32",)
TOL = {"fp32": 1e-5, "amx": 1e-2, "avx512bf16": 1e-2}     # as tests/test_verify_attention_bf16.py; a bf16 out adds its rounding
OUT_ROUNDING = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -8}


def fused_pass(q4: torch.Tensor, Hkv: int, gap: int, seed: int, dtype: torch.dtype):
    """q4 [B, N, Hq, D] placed in a fused [T, Hq + 2*Hkv, D] buffer (q, then k and v of the token) with
    the sequences in shuffled order and `gap` unused tokens between them -> (buffer, q view [T, Hq, D],
    token offsets [B])."""
    B, N, Hq, D = q4.shape
    order = torch.randperm(B, generator=torch.Generator().manual_seed(seed))
    T = B * (N + gap) + gap
    buf = torch.full((T, Hq + 2 * Hkv, D), float("nan")).to(dtype)       # [T, Hq+2Hkv, D]
    offsets = torch.empty(B, dtype=torch.int64)
    for slot, b in enumerate(order.tolist()):
        offsets[b] = gap + slot * (N + gap)
        buf[offsets[b]:offsets[b] + N, :Hq] = q4[b].to(dtype)
    return buf, buf[:, :Hq], offsets


@needs_kernel
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("q_dtype,out_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("case", [(3, 4, 8, 2, 128, [0, 65, 700]), (5, 1, 4, 4, 64, [1, 0, 130, 9, 63]),
                                  (2, 9, 16, 2, 96, [3000, 17])], ids=lambda c: f"B{c[0]}-N{c[1]}-D{c[4]}")
def test_strided_rows_at_token_offsets_match_reference(case, q_dtype, out_dtype, path):
    B, N, Hq, Hkv, D, ctxs = case
    seed = random.randrange(2**31)
    q4, k, v, slots, ctx_lens = make_case(B, N, Hq, Hkv, D, ctxs, torch.bfloat16, seed=seed)
    buf, q, offsets = fused_pass(q4, Hkv, gap=2, seed=seed, dtype=q_dtype)
    assert q.stride(0) == (Hq + 2 * Hkv) * D and not q.is_contiguous()
    out = torch.full((q.shape[0], Hq, D), 7.0, dtype=out_dtype)                  # [T, Hq, D]
    res = va.verify_attention_tokens(q, k, v, slots, ctx_lens, offsets, N, out, path=path)
    assert res is out
    ref = va.verify_attention_reference(q4.to(q_dtype).double(), k.double(), v.double(), slots, ctx_lens)
    owned = torch.zeros(q.shape[0], dtype=torch.bool)
    for b in range(B):
        rows = slice(int(offsets[b]), int(offsets[b]) + N)
        owned[rows] = True
        err = ((out[rows].double() - ref[b]).abs().max() / ref.abs().max()).item()
        assert err <= TOL[path] + OUT_ROUNDING[out_dtype], f"b={b} err {err:.2e} path={path} seed={seed}"
    assert (out[~owned] == 7.0).all(), "a row no sequence owns was written"
    assert torch.isnan(buf[:, Hq:]).all(), "the k / v part of the fused buffer was written"


@needs_kernel
@pytest.mark.parametrize("path", PATHS)
def test_bf16_in_and_out_change_only_the_output_rounding(path):
    """bf16 q widens exactly, so it gives the fp32 result of the same values bit for bit; a bf16 out is that
    result rounded to nearest even (torch's .bfloat16()), and the token layout with offsets b*N is the
    dense call."""
    q4, k, v, slots, ctx_lens = make_case(4, 5, 8, 2, 128, [0, 64, 300, 2500], torch.bfloat16,
                                          seed=random.randrange(2**31))
    q4 = q4.bfloat16()
    dense = va.verify_attention(q4.float(), k, v, slots, ctx_lens, path=path)           # [B, N, Hq, D] fp32
    assert torch.equal(va.verify_attention(q4, k, v, slots, ctx_lens, path=path), dense)
    B, N, Hq, D = q4.shape
    rows = q4.reshape(B * N, Hq, D)
    offsets = torch.arange(B, dtype=torch.int64) * N
    out32 = torch.empty(B * N, Hq, D)
    va.verify_attention_tokens(rows, k, v, slots, ctx_lens, offsets, N, out32, path=path)
    assert torch.equal(out32, dense.reshape(B * N, Hq, D))
    out16 = torch.empty(B * N, Hq, D, dtype=torch.bfloat16)
    va.verify_attention_tokens(rows, k, v, slots, ctx_lens, offsets, N, out16, path=path)
    assert torch.equal(out16, out32.bfloat16())


def test_torch_backend_takes_the_same_rows():
    q4, k, v, slots, ctx_lens = make_case(3, 3, 4, 2, 16, [0, 5, 9], seed=3)
    buf, q, offsets = fused_pass(q4, 2, gap=1, seed=3, dtype=torch.float32)
    out = torch.full((q.shape[0], 4, 16), 7.0)
    va.verify_attention_tokens(q, k, v, slots, ctx_lens, offsets, 3, out, backend="torch")
    ref = va.verify_attention_reference(q4, k, v, slots, ctx_lens)
    for b in range(3):
        o = int(offsets[b])
        assert torch.allclose(out[o:o + 3], ref[b], atol=1e-6)
    assert int((out == 7.0).all(-1).all(-1).sum()) == q.shape[0] - 9


def _bad_token_inputs():
    def base(**changes):
        q4, k, v, slots, ctx_lens = make_case(2, 3, 4, 2, 16, [4, 9], seed=1)
        buf, q, offsets = fused_pass(q4, 2, gap=0, seed=1, dtype=torch.float32)
        a = dict(q=q, k_cache=k, v_cache=v, slots=slots, ctx_lens=ctx_lens, token_offsets=offsets, n=3,
                 out=torch.empty(6, 4, 16))
        for key, fn in changes.items():
            a[key] = fn(a) if callable(fn) else fn
        return a

    return [
        ("token_offsets", lambda: base(token_offsets=torch.tensor([0, 4]))),           # rows 4..6 of 6
        ("token_offsets", lambda: base(token_offsets=torch.tensor([-1, 3]))),
        ("token_offsets", lambda: base(token_offsets=torch.tensor([0, 3], dtype=torch.int32))),
        ("slots", lambda: base(token_offsets=torch.tensor([0]))),                      # B differs from slots'
        ("q", lambda: base(q=lambda a: a["q"].transpose(1, 2))),                      # heads not D apart
        ("q", lambda: base(q=lambda a: a["q"].double())),
        ("out", lambda: base(out=torch.empty(6, 4, 8))),
        ("out", lambda: base(out=torch.empty(6, 16, 4).transpose(1, 2))),
        ("out", lambda: base(out=torch.empty(6, 4, 16, dtype=torch.float16))),
        ("n", lambda: base(n=0)),
        ("n", lambda: base(n=True)),
        ("slots", lambda: base(slots=torch.tensor([0, 4]))),
    ]


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("arg,make", _bad_token_inputs(), ids=lambda x: x if isinstance(x, str) else "")
def test_bad_token_input_raises_clear_error(arg, make, backend):
    a = make()
    with pytest.raises(va.VerifyAttentionInputError, match=rf"verify_attention: {arg}:"):
        va.verify_attention_tokens(**a, backend=backend)


@needs_kernel
def test_c_entry_point_refuses_bad_row_arguments_without_writing():
    lib = va._kernel()
    q, k, v, slots, ctx_lens = make_case(2, 3, 4, 2, 16, [4, 9], seed=2)
    out = torch.full((2, 3, 4, 16), 7.0)
    R, S = k.shape[0], k.shape[2]

    def call(q_dtype=0, q_tok=64, tokens=None, T=6, out_dtype=0, out_tok=64):
        return lib.specmoe_verify_attention_tokens(
            q.data_ptr(), q_dtype, q_tok, k.data_ptr(), v.data_ptr(), 0, slots.data_ptr(), ctx_lens.data_ptr(),
            None if tokens is None else tokens.data_ptr(), T, out.data_ptr(), out_dtype, out_tok,
            2, 3, 4, 2, 16, R, S, 0.25, 0, 0, 0, 0)

    assert call(q_tok=63) == -1 and call(out_tok=10) == -1
    assert call(q_dtype=2) == -1 and call(out_dtype=-1) == -1
    assert call(tokens=torch.tensor([0, -3])) == -6 and call(tokens=torch.tensor([0, 4])) == -6
    assert call(T=5) == -6                                          # rows 3..5 of 5
    assert (out == 7.0).all()
    assert call(tokens=torch.tensor([0, 3])) == 0 and not (out == 7.0).any()
