"""The bf16-KV paths of the C++ verify attention (AMX, AVX512-BF16, fp32) against the reference.

Every path this machine offers is forced in turn (argument and SPECMOE_VERIFY_PATH) on fresh
random inputs (the seed is in each failure message), awkward sizes included: head dims that are
not a multiple of the 32-element tile, k+1 = 1, contexts 0 and 1, g = 1 and g = 8, chunk and
split boundaries. The reference is float64 on the very same bf16 cache values.

Tolerances (max |out - ref| / max |ref|): "fp32" widens K and V and computes in fp32 (measures
~1e-6). "amx" and "avx512bf16" round P to bf16 for PV (relative 2^-9 per weight, products exact
and accumulated in fp32); "avx512bf16" also rounds Q, while "amx" splits a q that is not bf16
into up to three bf16 parts. Both measure 1-4e-3, so 1e-2, well under the O(1) error of a wrong
key, row or mask. With a q of bf16 values (a bf16 model's) the AMX QK is exact: the test
test_bf16_q_scores_are_exact_on_amx checks it on a case where P is exact too.
"""

from __future__ import annotations

import random

import pytest
import torch

from specmoe.runtime.kernels import build
from specmoe.runtime.kernels import verify_attention as va

TOL = {"fp32": 1e-5, "amx": 1e-2, "avx512bf16": 1e-2}
PATHS = va.available_paths() if build.find_compiler() is not None else ()

needs_kernel = pytest.mark.skipif(not PATHS, reason="no C++ kernel on this machine")


def make_case(B, N, Hq, Hkv, D, ctxs, *, seed, q_scale=1.0):
    """Random bf16 KV; every cache entry the call must not read is NaN."""
    gen = torch.Generator().manual_seed(seed)
    R, S = B + 1, max(ctxs) + N + 2
    slots = torch.randperm(R, generator=gen)[:B]
    k = torch.full((R, Hkv, S, D), float("nan"), dtype=torch.bfloat16)  # [R, Hkv, S, D]
    v = torch.full((R, Hkv, S, D), float("nan"), dtype=torch.bfloat16)
    for b, ctx in enumerate(ctxs):
        k[slots[b], :, :ctx + N] = torch.randn(Hkv, ctx + N, D, generator=gen).bfloat16()
        v[slots[b], :, :ctx + N] = torch.randn(Hkv, ctx + N, D, generator=gen).bfloat16()
    q = torch.randn(B, N, Hq, D, generator=gen) * q_scale  # [B, N, Hq, D]
    return q, k, v, slots, torch.tensor(ctxs, dtype=torch.int64)


def check(path, B, N, Hq, Hkv, D, ctxs, **kw):
    seed = random.randrange(2**31)
    q, k, v, slots, ctx_lens = make_case(B, N, Hq, Hkv, D, ctxs, seed=seed, q_scale=kw.pop("q_scale", 1.0))
    out = torch.full((B, N, Hq, D), float("nan"))  # every element must be written
    va.verify_attention(q, k, v, slots, ctx_lens, out=out, backend="cpp", path=path, **kw)
    ref = va.verify_attention_reference(q.double(), k.double(), v.double(), slots, ctx_lens)
    what = f"path={path} B={B} N={N} Hq={Hq} Hkv={Hkv} D={D} ctx={ctxs} {kw} seed={seed}"
    assert not torch.isnan(out).any(), f"NaN in output: {what}"
    err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
    assert err <= TOL[path], f"relative error {err:.2e} > {TOL[path]:.0e}: {what}"


CASES = [
    # B, N, Hq, Hkv, D, ctxs: g = 1 and 8, k+1 = 1, contexts 0 and 1, D off the tile
    (1, 1, 4, 4, 128, [0]),
    (2, 1, 8, 1, 64, [1, 0]),
    (3, 16, 32, 8, 128, [1000, 63, 2047]),
    (3, 17, 8, 1, 128, [0, 1, 300]),
    (2, 4, 6, 3, 40, [33, 1]),
    (3, 5, 8, 1, 80, [300, 0, 1]),
    (2, 3, 16, 2, 72, [129, 17]),
    (2, 8, 4, 4, 96, [500, 0]),
    (1, 2, 2, 2, 8, [70]),
    (2, 16, 64, 8, 256, [200, 31]),
]


@needs_kernel
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-N{c[1]}-g{c[2] // c[3]}-D{c[4]}")
def test_each_path_matches_reference(path, case):
    check(path, *case)


@needs_kernel
@pytest.mark.parametrize("path", PATHS)
def test_chunk_and_split_boundaries(path):
    ctxs = [0, 1, 15, 16, 17, 31, 32, 33]
    check(path, 8, 17, 8, 2, 128, ctxs, _chunk_keys=16, _split_keys=32)
    check(path, 8, 3, 8, 1, 64, ctxs, _chunk_keys=32, _split_keys=48)
    check(path, 3, 8, 8, 2, 96, [100, 700, 5], num_threads=1)
    check(path, 4, 2, 8, 2, 128, [127, 128, 129, 383])  # the default chunk and its rest
    check(path, 2, 16, 8, 2, 128, [1000, 600], _split_keys=384)  # split-K parts past their first chunk: FusedP


@needs_kernel
@pytest.mark.parametrize("path", PATHS)
def test_blocked_tiles_and_their_tails(path):
    """AMX multiplies 64 keys by one tile of 16 query rows (M <= 16), 32 keys by two tiles (M = 32, 64),
    and the rest 16 keys at a time; PV pairs of row tiles with pairs of d tiles. Contexts around those
    multiples, K read in place (D = 128) and copied (D = 96), chunks whose length is not a multiple."""
    ctxs = [64, 65, 95, 127, 160, 191]
    for N, g in ((4, 4), (1, 16), (8, 4), (16, 4), (12, 4)):   # M = 16, 16, 32, 64, 48
        check(path, 6, N, 4 * g, 4, 128, ctxs)
    check(path, 6, 8, 16, 4, 96, ctxs, _chunk_keys=112)        # D tiles: 6 = three pairs


@needs_kernel
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("M", [9, 12, 13, 23, 33, 80])
def test_row_tiles_around_the_v_pairing(path, M):
    """AVX512-BF16 PV: up to 12 rows pair V as they read it; above, the first 12-row tile stores the
    pairs for the other rows and for later 64-row blocks (M = 80). Every tail, D on and off the
    32-element pairs."""
    for D in (128, 72):
        check(path, 2, M, 1, 1, D, [95, 300])
        check(path, 2, 1, M, 1, D, [0, 130], _chunk_keys=48)


@needs_kernel
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", [(3, 1, 8, 2, 128, [0, 47, 300]), (2, 2, 8, 2, 40, [1, 97]),
                                  (3, 5, 16, 2, 72, [0, 95, 400]), (2, 16, 32, 8, 128, [33, 700])],
                         ids=lambda c: f"N{c[1]}-g{c[2] // c[3]}-D{c[4]}")
def test_fp16_kv_matches_reference(path, case):
    """fp16 KV: the bf16 paths round each element to bf16 as they load it (K copied, V paired), fp32 widens."""
    B, N, Hq, Hkv, D, ctxs = case
    seed = random.randrange(2**31)
    q, k, v, slots, ctx_lens = make_case(B, N, Hq, Hkv, D, ctxs, seed=seed)
    k, v = k.half(), v.half()
    out = va.verify_attention(q, k, v, slots, ctx_lens, path=path)
    ref = va.verify_attention_reference(q.double(), k.double(), v.double(), slots, ctx_lens)
    err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
    assert err <= dict(TOL, fp32=1e-5)[path] * 2, f"relative error {err:.2e}: path={path} seed={seed}"


@needs_kernel
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 8])
def test_few_query_rows(path, M):
    """M <= 8 rows a KV head: avx512bf16 splits each row's dot product over 16/Mq lanes (row-split QK,
    24 keys a tile, scores packed Mq a key). Every Mq, contexts around the tiles and the chunk, head
    dims read in place and padded, one bf16 part of q and three, chunks and split-K ranges cut short."""
    N, g = {1: (1, 1), 2: (2, 1), 3: (1, 3), 4: (1, 4), 5: (5, 1), 8: (2, 4)}[M]
    ctxs = [0, 1, 23, 24, 25, 47, 48, 191, 192, 193]
    for D in (128, 40, 64):
        check(path, len(ctxs), N, 2 * g, 2, D, ctxs)
    check(path, 4, N, g, 1, 128, [300, 24, 5, 1000], _chunk_keys=48, _split_keys=96)
    seed = random.randrange(2**31)
    q, k, v, slots, ctx_lens = make_case(3, N, 2 * g, 2, 96, [0, 70, 500], seed=seed)
    q = q.bfloat16().float()   # one bf16 part: the scores exact
    out = va.verify_attention(q, k, v, slots, ctx_lens, path=path)
    ref = va.verify_attention_reference(q.double(), k.double(), v.double(), slots, ctx_lens)
    err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
    assert err <= TOL[path], f"relative error {err:.2e}: M={M} seed={seed}"


@needs_kernel
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("scale", [-0.3, 0.0, 0.02])
def test_any_scale_matches_reference(path, scale):
    """The fast paths scale the scores inside the softmax when the scale is positive (the maximum of the
    scaled scores is the scale times the maximum) and in a pass of their own otherwise."""
    seed = random.randrange(2**31)
    q, k, v, slots, ctx_lens = make_case(3, 8, 16, 4, 128, [0, 130, 600], seed=seed, q_scale=4.0)
    out = va.verify_attention(q, k, v, slots, ctx_lens, path=path, scale=scale)
    ref = va.verify_attention_reference(q.double(), k.double(), v.double(), slots, ctx_lens, scale=scale)
    err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
    assert err <= TOL[path], f"relative error {err:.2e}: scale={scale} seed={seed}"


@needs_kernel
@pytest.mark.parametrize("path", PATHS)
def test_peaked_scores_stay_finite(path):
    """Scores of ~30 standard deviations: the fp32 path is ~1e-5 off from rounding alone (see
    test_verify_attention); the bf16 paths split the fp32 q into bf16 parts, so only P's rounding
    remains (a single bf16 part would move each score by ~30 * 2^-9 = 0.06, a weight by ~6%)."""
    tol = dict(TOL, fp32=1e-4)
    seed = random.randrange(2**31)
    q, k, v, slots, ctx_lens = make_case(3, 8, 8, 2, 128, [0, 500, 3000], seed=seed, q_scale=30.0)
    out = va.verify_attention(q, k, v, slots, ctx_lens, path=path)
    ref = va.verify_attention_reference(q.double(), k.double(), v.double(), slots, ctx_lens)
    assert torch.isfinite(out).all()
    err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
    assert err <= tol[path], f"relative error {err:.2e}: seed={seed}"


@needs_kernel
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("gain", [0.2, 3.0, 40.0])
def test_scores_that_rise_past_the_running_max(path, gain):
    """AVX512-BF16 turns a chunk's scores into probabilities against the maximum of the chunks before
    it (FusedP), keeping that maximum while a row's sum over the chunk stays under 2^16 and redoing
    the chunk exactly past it. The keys from 700 on, scaled by `gain`, push the scores down (0.2), up
    by ~10 in log2 (3: the probabilities reach ~2^10, kept) and far past the bound (40: redone)."""
    seed = random.randrange(2**31)
    q, k, v, slots, ctx_lens = make_case(2, 4, 16, 4, 128, [1500, 900], seed=seed)  # M = 16 rows
    k[:, :, 700:] = (k[:, :, 700:].float() * gain).bfloat16()
    out = va.verify_attention(q, k, v, slots, ctx_lens, path=path)
    ref = va.verify_attention_reference(q.double(), k.double(), v.double(), slots, ctx_lens)
    assert torch.isfinite(out).all(), f"gain={gain} seed={seed}"
    err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
    assert err <= dict(TOL, fp32=1e-4)[path], f"relative error {err:.2e}: gain={gain} seed={seed}"


@needs_kernel
@pytest.mark.parametrize("path", PATHS)
def test_bf16_q_scores_are_exact(path):
    """A q of bf16 values (a bf16 model's q projection) is packed unscaled and the scores scaled in
    fp32, so QK is exact on every path: peaked scores (~30 standard deviations) stay within the
    bf16-P tolerance even on avx512bf16, whose rounding of a pre-scaled q would move each weight by
    ~6% (test_peaked_scores_stay_finite measures 2.5-4e-2 for an fp32 q)."""
    seed = random.randrange(2**31)
    q, k, v, slots, ctx_lens = make_case(3, 8, 8, 2, 128, [0, 500, 3000], seed=seed, q_scale=30.0)
    q = q.bfloat16().float()
    out = va.verify_attention(q, k, v, slots, ctx_lens, path=path)
    ref = va.verify_attention_reference(q.double(), k.double(), v.double(), slots, ctx_lens)
    err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
    tol = dict(TOL, fp32=1e-4)[path]  # fp32 rounding of scores this large: ~1e-5 (see above)
    assert err <= tol, f"relative error {err:.2e}: path={path} seed={seed}"


@needs_kernel
def test_environment_variable_forces_the_path(monkeypatch):
    q, k, v, slots, ctx_lens = make_case(3, 4, 8, 2, 128, [100, 0, 700], seed=random.randrange(2**31))
    for path in PATHS:
        by_arg = va.verify_attention(q, k, v, slots, ctx_lens, path=path)
        monkeypatch.setenv(va.PATH_ENV, path)
        assert va.verify_attention_path(torch.bfloat16) == path
        assert va.verify_attention_backend(torch.bfloat16).endswith("/" + path)
        assert torch.equal(va.verify_attention(q, k, v, slots, ctx_lens), by_arg), path
        assert va.verify_attention_path(torch.float32) == "fp32"  # fp32 KV always widens nothing
    monkeypatch.delenv(va.PATH_ENV)
    assert va.verify_attention_path("bf16") == PATHS[0]  # auto: the best this machine offers


@needs_kernel
def test_paths_differ_where_they_should():
    """Each forced path really runs: avx512bf16 rounds Q and P, so its output differs from fp32's."""
    if "avx512bf16" not in PATHS:
        pytest.skip("no AVX512-BF16 on this machine")
    q, k, v, slots, ctx_lens = make_case(2, 8, 8, 2, 128, [300, 40], seed=random.randrange(2**31))
    outs = {p: va.verify_attention(q, k, v, slots, ctx_lens, path=p) for p in PATHS}
    assert not torch.equal(outs["avx512bf16"], outs["fp32"])
    if "amx" in PATHS:
        assert not torch.equal(outs["amx"], outs["fp32"])


def test_bad_path_is_a_clear_error(monkeypatch):
    q, k, v, slots, ctx_lens = make_case(1, 1, 4, 4, 64, [3], seed=1)
    with pytest.raises(va.VerifyAttentionInputError, match="verify_attention: path: is 'tiles'"):
        va.verify_attention(q, k, v, slots, ctx_lens, path="tiles")
    monkeypatch.setenv(va.PATH_ENV, "tiles")
    with pytest.raises(va.VerifyAttentionInputError, match="SPECMOE_VERIFY_PATH"):
        va.verify_attention(q, k, v, slots, ctx_lens)


@needs_kernel
def test_missing_path_is_refused_before_running():
    missing = [p for p in ("amx", "avx512bf16") if p not in PATHS]
    if not missing:
        pytest.skip("this machine offers every path")
    q, k, v, slots, ctx_lens = make_case(1, 1, 4, 4, 64, [3], seed=1)
    with pytest.raises(va.KernelUnavailableError, match=missing[0]):
        va.verify_attention(q, k, v, slots, ctx_lens, path=missing[0])


def test_build_hashes_the_included_part():
    src = build.CSRC_DIR / "verify_attention.cpp"
    for part in ("verify_attention_common.h", "verify_attention_fp32.h", "verify_attention_bf16.h",
                 "verify_attention_dpbf.h", "verify_attention_amx.h", "verify_attention_api.h"):
        assert (build.CSRC_DIR / part).read_bytes() in build.source_bytes(src)


def test_auto_takes_the_best_path_offered(monkeypatch):
    """"auto" takes AMX where offered, else AVX512-BF16 (the hosts with it and no AMX are AMD Zen 4 / 5,
    where it ran 1.1-1.9x the fp32 path at every k+1, bench/verify_attention.py), else fp32."""
    import specmoe.runtime.kernels.verify_attention as va

    monkeypatch.setattr(va, "available_paths", lambda: ("avx512bf16", "fp32"))
    assert va.verify_attention_path(torch.bfloat16, "auto") == "avx512bf16"
    assert va.verify_attention_path(torch.bfloat16, "fp32") == "fp32"
    monkeypatch.setattr(va, "available_paths", lambda: ("fp32",))
    assert va.verify_attention_path(torch.bfloat16, "auto") == "fp32"
    monkeypatch.setattr(va, "available_paths", lambda: ("amx", "avx512bf16", "fp32"))
    assert va.verify_attention_path(torch.bfloat16, "auto") == "amx"
    assert va.verify_attention_path(torch.float32, "auto") == "fp32"
