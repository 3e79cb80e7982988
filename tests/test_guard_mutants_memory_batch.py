"""Memory guards, part 2 (planner/memory.py's mutants): footprints, placement and max_batch worked by
hand; the shared helpers are in test_guard_mutants_memory.py."""
from __future__ import annotations

import pytest
from tiny_specs import tiny_target
from specmoe.planner import memory
from test_guard_mutants_memory import GiB, _qwen, _small_draft, _spec, _tiny_hw, _wl  # noqa: E402 (shared helpers)


def test_footprint_of_the_tiny_pair_by_hand():
    """Prompt 4, output 4, k = 2: rows of 4 + 4 + 2 + 2 = 12 positions; target KV 32 x 12 = 384 bytes a row,
    draft KV 16 x 12 = 192. Batch 4, 1 target row and 3 draft rows on the GPU; slots (1, 3) of 4 experts of
    3 x 8 x 16 = 384 weights (768 bytes in bf16); two streaming buffers of the larger layer's 3 uncached.
    The target's non-expert weights: per layer q 64, k 32, v 32, o 64, router 32, two norms 16 (240), the
    embedding and LM head 512 and the final norm 8: 1000."""
    from specmoe.planner.plan import Placement

    t, d, wl = tiny_target(), _small_draft(), _wl(4, 4)
    pl = Placement(expert_cache_slots=(1, 3), target_kv_gpu_sequences=1, draft_kv_gpu_sequences=3)
    fp = memory.footprint(t, _tiny_hw(), wl, 4, 2, pl, d)
    act = memory.activation_bytes(t, wl, 4, 2, d, 12)
    assert fp.gpu_breakdown == {"target_non_expert_weights": 2000.0, "draft_weights": 816.0, "expert_cache": 3072.0,
                                "streaming_buffers": 4608.0, "draft_kv": 576.0, "target_kv": 384.0, "activations": act}
    # CPU: all 8 experts pinned (6144); 3 target rows, 1 draft row; staging of the 16-token prefill pass
    # (4 prompts of 4, above the 12 verify tokens) at 128 bytes a token
    assert fp.cpu_breakdown == {"experts_pinned": 6144.0, "target_kv": 1152.0, "draft_kv": 192.0,
                                "attention_staging": 2048.0}
    assert fp.gpu_bytes == 2000 + 816 + 3072 + 4608 + 576 + 384 + act and fp.cpu_bytes == 6144 + 1152 + 192 + 2048
    assert (fp.gpu_capacity_bytes, fp.gpu_usable_bytes) == (GiB, GiB) and fp.shares_host is False
    # k = 0: no draft weights, no draft KV anywhere; k = 1: the draft is there (rows of 11)
    f0 = memory.footprint(t, _tiny_hw(), wl, 4, 0, pl, d)
    assert f0.gpu_breakdown["draft_weights"] == f0.gpu_breakdown["draft_kv"] == f0.cpu_breakdown["draft_kv"] == 0.0
    f1 = memory.footprint(t, _tiny_hw(), wl, 4, 1, pl, d)
    assert (f1.gpu_breakdown["draft_weights"], f1.gpu_breakdown["draft_kv"], f1.cpu_breakdown["draft_kv"]) == \
        (816.0, 3 * 16 * 11, 1 * 16 * 11)
    assert (f1.gpu_breakdown["target_kv"], f1.cpu_breakdown["target_kv"]) == (32 * 11, 3 * 32 * 11)
    # one streaming buffer; fully cached layers stream nothing
    one = Placement(expert_cache_slots=(1, 3), streaming_buffers=1)
    assert memory.footprint(t, _tiny_hw(), wl, 4, 0, one).gpu_breakdown["streaming_buffers"] == 3 * 768
    full = Placement(expert_cache_slots=(4, 4))
    f = memory.footprint(t, _tiny_hw(), wl, 4, 0, full)
    assert f.gpu_breakdown["streaming_buffers"] == 0.0 and f.gpu_breakdown["expert_cache"] == 8 * 768
    # a layer whose experts run on the CPU streams nothing: only layer 0's 3 uncached are buffered
    fid = Placement(expert_cache_slots=(1, 0), cpu_expert_layers=(1,))
    assert memory.footprint(t, _tiny_hw(), wl, 4, 0, fid).gpu_breakdown["streaming_buffers"] == 2 * 3 * 768


def test_footprint_where_the_cpu_stands_in_for_the_gpu():
    """The cache and the buffers are views of the pinned experts: 0 bytes; the rest is counted once, as host
    memory."""
    from specmoe.planner.plan import Placement

    t, wl = tiny_target(), _wl(4, 4)
    fp = memory.footprint(t, _tiny_hw(shares_host=True), wl, 4, 0, Placement(expert_cache_slots=(1, 3)))
    assert fp.shares_host is True
    assert fp.gpu_breakdown["expert_cache"] == 0.0 and fp.gpu_breakdown["streaming_buffers"] == 0.0
    assert fp.cpu_breakdown["experts_pinned"] == 6144.0
    assert fp.host_bytes == fp.gpu_bytes + fp.cpu_bytes and fp.device_bytes == 0.0


def test_footprint_refuses_a_placement_of_the_wrong_length():
    from specmoe.planner.errors import SpecError
    from specmoe.planner.plan import Placement

    with pytest.raises(SpecError) as ei:
        memory.footprint(tiny_target(), _tiny_hw(), _wl(4, 4), 4, 0, Placement(expert_cache_slots=(1, 1, 1)))
    assert str(ei.value) == ("placement.expert_cache_slots: has 3 entries, the model has 2 layers "
                             "(give one entry per layer)")


# a footprint's to_dict() with every entry a distinct power of two, so each sum below names its entries
_G = {"target_non_expert_weights": 1.0, "draft_weights": 2.0, "expert_cache": 4.0, "streaming_buffers": 8.0,
      "draft_kv": 16.0, "target_kv": 32.0, "activations": 64.0}
_C = {"experts_pinned": 128.0, "target_kv": 256.0, "draft_kv": 512.0, "attention_staging": 1024.0}


def test_components_as_the_engine_measures_them():
    fp = {"gpu_breakdown": dict(_G), "cpu_breakdown": dict(_C), "shares_host": False}
    # a real GPU: the host holds the CPU part; the device the GPU part (cache and buffers are its experts)
    assert memory.host_components(fp) == {"experts": 128.0, "target_kv": 256.0, "draft": 512.0,
                                          "activations": 1024.0}
    assert memory.device_components(fp) == {"non_expert_weights": 1.0, "experts": 12.0, "target_kv": 32.0,
                                            "draft": 18.0, "activations": 64.0}
    # a CPU standing in for the GPU: both parts are host memory, the device has nothing; the experts are the
    # pinned ones only (the cache and buffers are views of them, which footprint() counts as 0)
    fp["shares_host"] = True
    assert memory.host_components(fp) == {"experts": 128.0, "non_expert_weights": 1.0,
                                          "target_kv": 288.0, "draft": 2.0 + 16.0 + 512.0,
                                          "activations": 64.0 + 1024.0}
    assert memory.device_components(fp) == {}
    # entries that are absent count 0, and components of 0 bytes are left out
    part = {"gpu_breakdown": {"activations": 64.0}, "cpu_breakdown": {}, "shares_host": True}
    assert memory.host_components(part) == {"activations": 64.0}
    part = {"gpu_breakdown": {"activations": 64.0, "draft_kv": 0.0}, "cpu_breakdown": {"target_kv": 0.0}}
    assert memory.host_components(part) == {} and memory.device_components(part) == {"activations": 64.0}
    assert memory.host_components({}) == {} and memory.device_components({}) == {}


# ---- the uniform expert cache, and contexts a model cannot hold ----
def test_uniform_slots_by_hand():
    """need(c) = c n_moe eb + nb (E - c) eb below E, E n_moe eb at E: the most c whose need fits."""
    us = memory._uniform_slots
    # E = 4, 4 MoE layers, 1 buffer, eb = 1: need(c) = 3c + 4 (c < 4), need(4) = 16
    assert [us(4, 4, 1, 1.0, a) for a in (16, 15.5, 13, 12.99, 10, 7, 6.99, 5, 4)] == [4, 3, 3, 2, 2, 1, 0, 0, 0]
    # E = 64, eb = 2: need(c) = 8c + 2 (64 - c) = 6c + 128
    assert us(64, 4, 1, 2.0, 140) == 2 and us(64, 4, 1, 2.0, 248) == 20 and us(64, 4, 1, 2.0, 253.9) == 20
    assert us(64, 4, 1, 2.0, 127) == 0
    # one expert: cached if it fits, else none
    assert us(1, 3, 2, 1.0, 3) == 1 and us(1, 3, 2, 1.0, 2.5) == 0
    # as many buffered layers as MoE layers (2 and 2): need is 8 for every c, so all 4 or none
    assert us(4, 2, 2, 1.0, 8) == 4 and us(4, 2, 2, 1.0, 7) == 0
    # more buffers than layers (1 layer, 2 buffers): need(c) = 8 - c falls to need(4) = 4: all 4 or none
    assert us(4, 1, 2, 1.0, 4) == 4 and us(4, 1, 2, 1.0, 3.5) == 0


def test_check_context_names_the_model_and_the_lengths():
    from specmoe.planner.errors import SpecError

    short = _spec("target", max_position_embeddings=16)
    memory.check_context(short, _wl(10, 6))                   # 16 positions: fits exactly
    memory.check_context(tiny_target(), _wl(10, 6), None)
    with pytest.raises(SpecError) as ei:
        memory.check_context(short, _wl(10, 7))
    assert str(ei.value) == ("gen_len: prompt_len (10) + gen_len (7) = 17 exceeds tiny-target's "
                             "max_position_embeddings 16 (shorten the prompts or the outputs)")
    # the draft is held to its own positions too
    short_draft = _spec("draft", max_position_embeddings=12)
    with pytest.raises(SpecError, match="= 16 exceeds tiny-draft's max_position_embeddings 12"):
        memory.check_context(tiny_target(), _wl(10, 6), short_draft)
    memory.check_context(tiny_target(), _wl(6, 6), short_draft)


def test_uniform_slots_is_exact_where_floats_round():
    """The closed form floor((avail - nb E eb) / ((n_moe - nb) eb)) can land one step off when eb is not a
    whole number of bytes; the answer is still the most c with need(c) <= avail, need computed as the
    footprint computes it. Cases found by search, each checked against need() directly."""
    us = memory._uniform_slots

    def need(c, E, n, nb, eb):
        return c * n * eb + (nb * (E - c) * eb if c < E else 0.0)

    def most(E, n, nb, eb, avail):            # the definition, by enumeration
        return max([c for c in range(E + 1) if need(c, E, n, nb, eb) <= avail] or [0])

    cases = [(3, 2, 1, 0.1, need(1, 3, 2, 1, 0.1)),        # the closed form says 0
             (3, 2, 1, 0.1, need(2, 3, 2, 1, 0.1)),        # it says 1: the answer is E - 1
             (6, 2, 1, 0.1, need(5, 6, 2, 1, 0.1)),        # it says 4
             (16, 33, 1, 357433499.9804964, 165849143990.95032),   # it says 14, one too many
             (3, 3, 3, 0.7, need(2, 3, 3, 3, 0.7))]        # nb = n_moe: need(2) rounds under need(3)
    assert [most(*c) for c in cases] == [1, 2, 5, 13, 2]
    assert [us(*c) for c in cases] == [1, 2, 5, 13, 2]
    # two experts: the one slot fits where both do not (need(1) = 4 + 1 = 5, need(2) = 8)
    assert us(2, 4, 1, 1.0, 5) == 1 and us(2, 4, 1, 1.0, 4.9) == 0


# ---- the default placement and the largest batch ----
def _tiny4():
    """The tiny target with 4 layers: non-expert weights 4 x 240 + 520 = 1480 (2960 bytes in bf16); 16 experts
    of 768 bytes (12,288 pinned); K and V 4 x 2 x 2 x 2 x 2 = 64 bytes a token."""
    t = _spec("target", num_hidden_layers=4)
    assert t.non_expert_elems == 1480 and t.kv_bytes_per_token(2) == 64 and t.moe_layers == (0, 1, 2, 3)
    return t


def _gpu_of(nbytes, cpu_bytes=GiB, shares_host=False):
    return _tiny_hw(shares_host=shares_host, gpu_GiB=nbytes / GiB, cpu_GiB=cpu_bytes / GiB)


def test_default_placement_by_hand():
    """One sequence of prompt 1, k = 0, one streaming buffer, a GPU of 10,828 bytes: fixed 2960 weights +
    856 activations (the verify pass: 2 x 112 + 16 + 616 staging) = 3816; c slots on each of the 4 layers
    and a buffer of the 4 - c others cost 768 (4c + 4 - c): c = 1 takes 5376 (c = 2 would take 7680 > 7012),
    leaving 1636 = two more slots, on the first two layers."""
    from specmoe.planner.plan import Placement

    t, wl = _tiny4(), _wl(1, 5)
    assert memory.activation_bytes(t, wl, 1, 0) == 856
    pl = memory.default_placement(t, _gpu_of(10828), wl, 1, 0, None, 2, streaming_buffers=1)
    assert pl == Placement(expert_cache_slots=(2, 2, 1, 1), target_kv_gpu_sequences=0, draft_kv_gpu_sequences=0,
                           streaming_buffers=1)
    # 1536 bytes less: c = 1 with 100 to spare, no extra slot
    assert memory.default_placement(t, _gpu_of(10828 - 1536), wl, 1, 0, None, 2, 1).expert_cache_slots == (1,) * 4
    # everything cached: 3816 + 16 x 768 = 16,104 bytes (no buffer); 767 more bytes give no 17th slot
    for extra in (0, 767):
        assert memory.default_placement(t, _gpu_of(16104 + extra), wl, 1, 0, None, 2, 1).expert_cache_slots == \
            (4,) * 4
    # one byte less: c = 3 costs 3816 + 768 x 13 = 13,800, leaving 2303 = two extra slots (a third, 16,104)
    assert memory.default_placement(t, _gpu_of(16103), wl, 1, 0, None, 2, 1).expert_cache_slots == (4, 4, 3, 3)
    # dense layers hold no expert slot: a leading dense layer, and a dense model
    assert memory.default_placement(_qwen(first_k_dense_replace=1), _gpu_of(GiB), wl, 1).expert_cache_slots == (0, 8)
    assert memory.default_placement(_spec("draft"), _gpu_of(GiB), wl, 1).expert_cache_slots == (0,)
    # the default: two streaming buffers, no drafts without k, even when a draft is given
    d = _small_draft()
    pl = memory.default_placement(t, _gpu_of(10828), wl, 1, draft=d)
    assert pl.streaming_buffers == 2 and pl.draft_kv_gpu_sequences == 0
    assert pl == memory.default_placement(t, _gpu_of(10828), wl, 1, 0, None)


def test_default_placement_where_the_cpu_stands_in_for_the_gpu():
    """Every expert of every MoE layer is cached (views of the host store), dense layers hold none; all draft
    rows on the "GPU" when there are drafts, none otherwise; target KV stays on the CPU."""
    from specmoe.planner.plan import Placement

    hw, wl = _gpu_of(1000, shares_host=True), _wl(1, 5)
    pl = memory.default_placement(_tiny4(), hw, wl, 3, 1, _small_draft())
    assert pl == Placement(expert_cache_slots=(4, 4, 4, 4), target_kv_gpu_sequences=0, draft_kv_gpu_sequences=3)
    assert memory.default_placement(_tiny4(), hw, wl, 3, 0, _small_draft()).draft_kv_gpu_sequences == 0
    assert memory.default_placement(_tiny4(), hw, wl, 3).draft_kv_gpu_sequences == 0
    q = _qwen(first_k_dense_replace=1)                        # layer 0 dense, layer 1 MoE of 8
    assert memory.default_placement(q, hw, wl, 3).expert_cache_slots == (0, 8)


@pytest.mark.parametrize("nb", [1, 2])
def test_default_placement_is_maximal_at_every_gpu_size(nb):
    """Over GPU sizes from too small to everything cached (tiny 4-layer target, the small draft at k = 1,
    batch 3): draft rows first, as many as fit with no cache; then uniform slots (the first layers one more)
    such that one more slot on the least-cached layer does not fit; the placement fits whenever the bare
    minimum (no cache, no draft rows) fits."""
    from specmoe.planner.plan import Placement

    t, d, wl, B, k = _tiny4(), _small_draft(), _wl(1, 5), 3, 1
    seen = set()
    for U in range(9000, 26000, 97):
        hw = _gpu_of(U)
        pl = memory.default_placement(t, hw, wl, B, k, d, 2, nb)
        s, g = list(pl.expert_cache_slots), pl.draft_kv_gpu_sequences
        seen.add((g, tuple(s)))
        assert pl.target_kv_gpu_sequences == 0 and pl.streaming_buffers == nb
        assert s == sorted(s, reverse=True) and s[0] - s[-1] <= 1 and 0 <= s[-1] and s[0] <= 4

        def fits_gpu(slots, rows):
            p = Placement(expert_cache_slots=tuple(slots), draft_kv_gpu_sequences=rows, streaming_buffers=nb)
            return memory.footprint(t, hw, wl, B, k, p, d).fits_gpu

        if not fits_gpu([0] * 4, 0):
            assert g == 0 and s == [0] * 4
            continue
        assert fits_gpu(s, g), U
        assert g == B or not fits_gpu([0] * 4, g + 1), U           # draft rows first
        if s[-1] < 4:
            more = list(s)
            more[s.index(s[-1])] += 1
            assert not fits_gpu(more, g), U
    # the sweep reaches every regime: no draft rows, some, all; no cache, partial, full
    assert {g for g, _ in seen} == {0, 1, 2, 3}
    assert {(0, 0, 0, 0), (4, 4, 4, 4)} <= {s for _, s in seen} and any(s[0] != s[-1] for _, s in seen)


def test_max_batch_by_hand():
    """Prompt 1, output 5, k = 0, a 1 GiB GPU (never the limit): the host holds the 12,288 pinned bytes and per
    sequence a KV row of 8 positions (512 bytes) and 1 staged token (128 bytes): b = (C - 12,288) // 640."""
    from specmoe.planner.errors import InfeasibleError

    t, wl = _tiny4(), _wl(1, 5)
    for b in (1, 2, 3, 10, 37, 100):
        for spare in (0, 639):
            hw = _tiny_hw(gpu_GiB=1, cpu_GiB=(12288 + 640 * b + spare) / GiB)
            assert memory.max_batch(t, hw, wl) == b, (b, spare)
    # with drafts (k = 1): draft rows go to the GPU, the host keeps target rows of 9 positions (576 bytes) and
    # 2 staged tokens (256): 832 a sequence
    hw = _tiny_hw(gpu_GiB=1, cpu_GiB=(12288 + 832 * 5 + 1) / GiB)
    assert memory.max_batch(t, hw, wl, _small_draft(), 1) == 5
    # a KV budget replaces the host's memory: 512 bytes a row
    big = _tiny_hw(gpu_GiB=1, cpu_GiB=1)
    assert [memory.max_batch(t, big, wl, cpu_kv_budget_bytes=512 * n + r) for n, r in
            ((1, 0), (7, 0), (7, 511), (40, 3))] == [1, 7, 7, 40]
    with pytest.raises(InfeasibleError) as ei:
        memory.max_batch(t, big, wl, cpu_kv_budget_bytes=511)
    assert str(ei.value) == ("cpu memory: one sequence needs 0.00 GiB of KV but the KV budget is 0.00 GiB "
                             "(shorten the prompt/output or raise the budget)")
    # not one sequence fits the host: the footprint's own message, at batch 1
    with pytest.raises(InfeasibleError) as ei:
        memory.max_batch(t, _tiny_hw(gpu_GiB=1, cpu_GiB=(12288 + 639) / GiB), wl)
    assert str(ei.value).startswith("cpu memory: needs ") and " at batch 1 (lower the batch" in str(ei.value)


def test_max_batch_is_the_most_that_fits_with_drafts():
    """max_batch against its definition, by enumeration: the largest b whose default placement fits (the host's
    memory, or the KV budget for the host's target and draft rows), here with the small draft at k = 1 on GPUs
    small enough that some draft rows, and their weights, decide it."""

    t, d, wl, k = _tiny4(), _small_draft(), _wl(1, 5), 1

    def fits(hw, b, budget=None):
        pl = memory.default_placement(t, hw, wl, b, k, d, 2)
        fp = memory.footprint(t, hw, wl, b, k, pl, d, 2)
        ok = fp.fits_cpu if budget is None else fp.cpu_breakdown["target_kv"] + fp.cpu_breakdown["draft_kv"] <= budget
        return ok and fp.fits_gpu, pl

    spilled = drafted = 0
    for gpu in (12500, 14000, 16000, 20000):
        for cpu, budget in ((12288 + 900 * 6, None), (12288 + 1100 * 9 + 50, None), (GiB, 1500), (GiB, 2900),
                            (GiB, 6000), (GiB, 9999)):
            hw = _tiny_hw(gpu_GiB=gpu / GiB, cpu_GiB=cpu / GiB)
            ok = [b for b in range(1, 80) if fits(hw, b, budget)[0]]
            assert ok and ok[-1] < 79
            assert memory.max_batch(t, hw, wl, d, k, 2, cpu_kv_budget_bytes=budget) == ok[-1], (gpu, cpu, budget)
            pl = fits(hw, ok[-1], budget)[1]
            spilled += pl.draft_kv_gpu_sequences < ok[-1]
            drafted += pl.draft_kv_gpu_sequences > 0
    assert spilled >= 4 and drafted >= 4          # draft rows on the host in some cases, on the GPU in others
    # a GPU of 13,016 bytes: at b = 2 it holds 12,916 without draft rows, no room for one (144 bytes), so both
    # rows' draft KV (288) stays on the host beside the target's 2 x 576: 1440 > a budget of 1400; b = 1 fits
    hw = _tiny_hw(gpu_GiB=13016 / GiB, cpu_GiB=1)
    assert fits(hw, 2)[1].draft_kv_gpu_sequences == 0 and fits(hw, 2)[0]
    assert memory.max_batch(t, hw, wl, d, k, 2, cpu_kv_budget_bytes=1400) == 1
    assert memory.max_batch(t, hw, wl, d, k, 2, cpu_kv_budget_bytes=1440) == 2
