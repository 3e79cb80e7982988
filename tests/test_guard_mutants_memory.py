"""Checks written for mutants of planner/memory.py that survived scripts/mutation_check.sh: each pins a value
a surviving mutant changed, worked out by hand from the docstrings' rules (not read back from the code).

The tiny target (tests/tiny_specs.py, bf16): hidden 8, 4 query heads and 2 KV heads of dimension 2 (group 2),
2 layers of 4 experts (width 16, top-2), vocabulary 32.
"""
from __future__ import annotations

import pytest

from tiny_specs import tiny_target
from specmoe.planner import memory
from specmoe.planner.workload import Workload, load_acceptance


def _wl(prompt_len, gen_len=4, weight_dtype="bf16", kv_dtype="bf16"):
    return Workload(prompt_len, gen_len, acceptance=load_acceptance(0.5), weight_dtype=weight_dtype,
                    kv_dtype=kv_dtype)


# the CPU attention's staging per token of a pass (host_staging_bytes): q (4 x 2 = 8) and k, v (2 x 2 x 2 = 8)
# in bf16, then the fp32 queries and output and the output twice more in bf16: 16 x 2 + 8 x (4 + 4 + 2 + 2)
TINY_STAGING_PER_TOKEN = 16 * 2 + 8 * 12         # 128 bytes


def test_a_prefill_pass_holds_whole_prompts_up_to_16384_tokens():
    """Prompts of 5 tokens: a pass takes floor(16384 / 5) = 3276 whole prompts, 16,380 tokens (a 3277th would
    make 16,385, past the 16,384-token pass). At batch 4000 and k = 0 the verify pass is 4000 tokens, so the
    prefill pass is the larger and sets the CPU staging."""
    m, wl = tiny_target(), _wl(5)
    assert memory.host_staging_bytes(m, wl, 4000, 0) == 16380 * TINY_STAGING_PER_TOKEN
    # a batch smaller than a pass: all 1000 prompts in one pass (5000 tokens, above the 1000 verify tokens)
    assert memory.host_staging_bytes(m, wl, 1000, 0) == 5000 * TINY_STAGING_PER_TOKEN
    # a prompt that divides 16384 exactly: 16384 / 4 = 4096 prompts, 16,384 tokens
    assert memory.host_staging_bytes(m, _wl(4), 5000, 0) == 16384 * TINY_STAGING_PER_TOKEN


def test_gpu_attention_stages_a_chunk_of_many_sequences_when_they_are_small():
    """block_attention_torch stages at most 2^24 elements of K and of the scores per chunk of sequences.
    4 rows of n = 3 new tokens over 10 keys, bf16 KV (2 bytes):
      K per row   2 KV heads x 10 keys x 2 = 40 elements; scores 2 heads x group 2 x 3 x 10 = 120:
      far under 2^24, so all 4 rows make one chunk;
      per row: K and V gathered, in fp32, plus the bf16 gather: 40 x (2 x 4 + 2) = 400; two fp32 score-sized
      tensors 2 x 120 x 4 = 960; the mask 3 x 10 = 30: 1390 bytes;
      the fp32 output of all rows: 4 x 3 x 4 heads x 2 x 4 = 384."""
    m = tiny_target()
    assert memory._gpu_attention_staging(m, 4, 3, 10, 2) == 4 * 1390 + 384
    # one row: one chunk of one sequence
    assert memory._gpu_attention_staging(m, 1, 3, 10, 2) == 1390 + 96
    # rows whose scores fill half the chunk: n = 1 over 2^21 keys gives 2 x 2 x 1 x 2^21 = 2^23 score (and K)
    # elements per row, so a chunk holds 2 of the 10 rows
    keys = 1 << 21
    per_row = (1 << 23) * (2 * 4 + 2) + 2 * (1 << 23) * 4 + keys
    assert memory._gpu_attention_staging(m, 10, 1, keys, 2) == 2 * per_row + 10 * 1 * 4 * 2 * 4
    # rows larger than a chunk: one sequence per chunk. n = 3 over 2^20 keys: scores 2 x 2 x 3 x 2^20 = 12 x 2^20
    # (2^24 holds one, not 4/3), K 2 x 2^20 x 2 = 2^22: per row 2^22 x 10 + 2 x 12 x 2^20 x 4 + 3 x 2^20 = 139 x 2^20
    assert memory._gpu_attention_staging(m, 4, 3, 1 << 20, 2) == 139 * (1 << 20) + 4 * 3 * 4 * 2 * 4
    # n = 1 over 2^23 keys: scores and K 2^25 elements each, twice a chunk: still one whole row per chunk,
    # per row 2^25 x 10 + 2 x 2^25 x 4 + 2^23 = 73 x 2^23
    assert memory._gpu_attention_staging(m, 3, 1, 1 << 23, 2) == 73 * (1 << 23) + 3 * 1 * 4 * 2 * 4
    # no rows or no new tokens: nothing staged
    assert memory._gpu_attention_staging(m, 0, 3, 10, 2) == memory._gpu_attention_staging(m, 4, 0, 10, 2) == 0.0


# ---- Footprint: its derived figures and the words of check() ----
GiB = 2**30


def _fp(gpu=3, cpu=10, gpu_gb=None, cpu_gb=None, **kw):
    """A footprint of round numbers: a GPU of 8 GiB with 6 usable, a host of 16 GiB with 10 usable."""
    gb = gpu_gb if gpu_gb is not None else {"expert_cache": gpu * GiB}
    cb = cpu_gb if cpu_gb is not None else {"target_kv": cpu * GiB}
    return memory.Footprint(gpu_bytes=gpu * GiB, cpu_bytes=cpu * GiB, gpu_capacity_bytes=8 * GiB,
                            cpu_capacity_bytes=16 * GiB, gpu_usable_bytes=6 * GiB, cpu_usable_bytes=10 * GiB,
                            gpu_breakdown=gb, cpu_breakdown=cb, **kw)


def test_footprint_figures_by_hand():
    import dataclasses

    fp = _fp()                                   # a real GPU: the two parts are separate memories
    assert fp.shares_host is False
    assert (fp.host_bytes, fp.device_bytes) == (10 * GiB, 3 * GiB)
    assert (fp.gpu_fraction, fp.cpu_fraction) == (0.75, 0.625)                    # 6 / 8, 10 / 16
    assert (fp.gpu_reserve_bytes, fp.cpu_reserve_bytes) == (2 * GiB, 6 * GiB)
    shared = _fp(shares_host=True)               # a CPU standing in for the GPU: all of it is host memory
    assert (shared.host_bytes, shared.device_bytes) == (13 * GiB, 0.0)
    assert fp.to_dict() == {
        "gpu_bytes": 3 * GiB, "cpu_bytes": 10 * GiB, "gpu_capacity_bytes": 8 * GiB, "cpu_capacity_bytes": 16 * GiB,
        "gpu_usable_bytes": 6 * GiB, "cpu_usable_bytes": 10 * GiB, "gpu_reserve_bytes": 2 * GiB,
        "cpu_reserve_bytes": 6 * GiB, "gpu_fraction": 0.75, "cpu_fraction": 0.625,
        "gpu_breakdown": {"expert_cache": 3 * GiB}, "cpu_breakdown": {"target_kv": 10 * GiB},
        "shares_host": False, "host_bytes": 10 * GiB, "device_bytes": 3 * GiB}
    assert shared.to_dict()["shares_host"] is True and shared.to_dict()["device_bytes"] == 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):          # a plan's footprint is not edited in place
        fp.gpu_bytes = 0.0


def test_footprint_fits_up_to_the_usable_bytes_exactly():
    assert _fp(gpu=6, cpu=10).fits                                # both exactly at their usable bytes
    assert _fp(gpu=6, cpu=10).fits_gpu and _fp(gpu=6, cpu=10).fits_cpu
    over_gpu, over_cpu = _fp(gpu=7, cpu=10), _fp(gpu=6, cpu=11)
    assert (over_gpu.fits_gpu, over_gpu.fits_cpu, over_gpu.fits) == (False, True, False)
    assert (over_cpu.fits_gpu, over_cpu.fits_cpu, over_cpu.fits) == (True, False, False)
    _fp(gpu=6, cpu=10).check(batch=3)                             # fits: no error


CPU_TAIL = ", a shorter prompt/output, a smaller KV dtype (--kv-dtype fp8), or more host memory (--cpu-mem-GiB))"


def test_check_names_the_cpu_overflow_in_words():
    from specmoe.planner.errors import InfeasibleError

    cb = {"experts_pinned": 4 * GiB, "target_kv": 6 * GiB, "draft_kv": 0.0, "attention_staging": GiB / 2}
    fp = _fp(gpu=7, cpu=10.5, cpu_gb=cb)          # the GPU overflows too: the CPU is named first
    head = ("cpu memory: needs 10.50 GiB (experts_pinned 4.00 GiB, target_kv 6.00 GiB, attention_staging 0.50 GiB)"
            " but 10.00 GiB is usable (16.00 GiB less a 6.00 GiB reserve)")
    cases = [(dict(batch=7, max_fit=5), head + " at batch 7 (use --batch 5 or less" + CPU_TAIL),
             (dict(batch=7), head + " at batch 7 (lower the batch" + CPU_TAIL),
             (dict(), head + " (lower the batch" + CPU_TAIL),
             (dict(batch=7, max_fit=5, placement_given=True),
              head + " at batch 7 (keep more draft/target KV off the CPU or lower the batch (5 fit with the default "
                     "placement)" + CPU_TAIL),
             (dict(batch=7, placement_given=True), head + " at batch 7 (lower the batch" + CPU_TAIL)]
    for kw, want in cases:
        with pytest.raises(InfeasibleError) as ei:
            fp.check(**kw)
        assert str(ei.value) == want and ei.value.field == "cpu memory", kw


def test_check_says_when_the_pinned_experts_alone_overflow():
    from specmoe.planner.errors import InfeasibleError

    pinned = "(the pinned experts alone exceed it: use smaller weights (--weight-dtype fp8) or a host with more " \
             "memory (--cpu-mem-GiB))"
    fp = _fp(cpu=12, cpu_gb={"experts_pinned": 11 * GiB, "target_kv": 1 * GiB})
    with pytest.raises(InfeasibleError) as ei:
        fp.check(batch=2, max_fit=1)
    assert str(ei.value).endswith(" at batch 2 " + pinned)
    # experts exactly at the usable 10 GiB do not exceed it alone: the KV beside them is what to cut
    fp = _fp(cpu=11, cpu_gb={"experts_pinned": 10 * GiB, "target_kv": 1 * GiB})
    with pytest.raises(InfeasibleError) as ei:
        fp.check(batch=2, max_fit=1)
    assert str(ei.value).endswith(" at batch 2 (use --batch 1 or less" + CPU_TAIL)
    # a breakdown without pinned experts (usable memory under one byte): nothing pinned to blame
    tiny = memory.Footprint(0.0, 1.0, 1.0, 1.0, 1.0, 0.5, {}, {"target_kv": 1.0})
    with pytest.raises(InfeasibleError) as ei:
        tiny.check()
    assert str(ei.value).endswith("(lower the batch" + CPU_TAIL)


def test_check_names_the_gpu_overflow_in_words():
    from specmoe.planner.errors import InfeasibleError

    fp = _fp(gpu=7, gpu_gb={"expert_cache": 5 * GiB, "streaming_buffers": 2 * GiB, "draft_kv": 0.0})
    fix = ("(cache fewer experts, keep less draft/target KV on the GPU, lower the batch, or give more GPU memory "
           "(--gpu-mem-GiB))")
    head = ("gpu memory: needs 7.00 GiB (expert_cache 5.00 GiB, streaming_buffers 2.00 GiB) but 6.00 GiB is usable "
            "(8.00 GiB less a 2.00 GiB reserve)")
    for kw, want in ((dict(batch=7, max_fit=5), head + " at batch 7 " + fix), (dict(), head + " " + fix)):
        with pytest.raises(InfeasibleError) as ei:
            fp.check(**kw)
        assert str(ei.value) == want and ei.value.field == "gpu memory"


# ---- KV rows, the draft's weights, and the activations of one pass ----
def _spec(base="target", **over):
    from tiny_specs import TINY_DRAFT, TINY_TARGET
    from specmoe.planner.model_spec import ModelSpec

    cfg = dict(TINY_TARGET if base == "target" else TINY_DRAFT)
    cfg.update(over)
    return ModelSpec.from_hf_config(cfg, name=f"tiny-{base}")


def _qwen(**over):
    """A tiny Qwen2-MoE: hidden 8, 4 query and 2 KV heads of dimension 2, 8 experts of width 16 (top-2) and a
    24-wide shared expert on every layer."""
    cfg = {"model_type": "qwen2_moe", "hidden_size": 8, "intermediate_size": 64, "moe_intermediate_size": 16,
           "shared_expert_intermediate_size": 24, "num_experts": 8, "num_experts_per_tok": 2,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 32,
           "tie_word_embeddings": False}
    cfg.update(over)
    from specmoe.planner.model_spec import ModelSpec

    return ModelSpec.from_hf_config(cfg, name="tiny-qwen")


def test_kv_rows_by_hand():
    t, d = tiny_target(), _spec("draft")
    wl = _wl(10, 5)                                  # longest context 15
    assert memory.row_positions(100, 3) == 100 + 3 + 2     # + the pending and bonus tokens
    assert memory.kv_positions(wl) == 17 and memory.kv_positions(wl, 3) == 20
    # K and V per token: target 2 layers x 2 x 2 KV heads x 2 x 2 bytes = 32; draft 1 x 2 x 4 x 2 x 2 = 32
    assert memory.kv_bytes_per_sequence(t, wl) == 32 * 17 and memory.kv_bytes_per_sequence(t, wl, 3) == 32 * 20
    assert memory.draft_kv_bytes_per_sequence(d, wl) == 32 * 17
    assert memory.draft_kv_bytes_per_sequence(d, wl, 3) == 32 * 20
    assert memory.draft_kv_bytes_per_sequence(None, wl, 3) == 0.0


def test_which_drafts_share_the_targets_embeddings():
    t = tiny_target()
    one_layer = _spec("draft")                       # one dense layer of the target's width and vocabulary
    assert memory.shares_target_embeddings(t, one_layer) is True
    for other in (_spec("draft", num_hidden_layers=2), _spec("draft", hidden_size=16),
                  _spec("draft", vocab_size=64), _spec("target", num_hidden_layers=1)):   # the last one is MoE
        assert memory.shares_target_embeddings(t, other) is False, other
    assert memory.shares_target_embeddings(t, None) is False
    # its own weights: 984 in all, less the 32 x 8 embedding and the 32 x 8 LM head it reads from the target
    assert one_layer.total_params == 984 and memory.draft_weight_elems(t, one_layer) == 984 - 256 - 256
    two = _spec("draft", num_hidden_layers=2)
    assert memory.draft_weight_elems(t, two) == two.total_params


def test_activation_elements_of_one_pass_by_hand():
    """Per token: the residual stream and its update (2h) plus the larger of the attention side
    (2h + (2 n_q + 2 n_kv) d) and the FFN side: a dense layer's 2h + 3 h_ff, an MoE layer's
    (2 + 2 top-k) h + 3 x busiest x h_e + 3 x shared, busiest = min(1, 2 top-k / E)."""
    pe = memory._pass_elems
    # the one-layer draft (h 8, 4 + 4 heads of 2, FFN 8): attention 16 + 16 x 2 = 48 > FFN 16 + 24 = 40
    assert pe(_spec("draft"), 1) == 16 + 48 and pe(_spec("draft"), 3) == 3 * 64
    # its FFN at 64 wide: 16 + 192 = 208 > 48
    assert pe(_spec("draft", intermediate_size=64), 2) == 2 * (16 + 208)
    # the tiny Qwen2-MoE: busiest 2 x 2 / 8 = 0.5: 6 x 8 + 3 x 0.5 x 16 + 3 x 24 = 144 > attention 16 + 12 x 2 = 40
    assert pe(_qwen(), 1) == 16 + 144
    # one leading dense layer of width 64: 16 + 192 = 208 outgrows the MoE side
    assert _qwen(first_k_dense_replace=1).num_dense_layers == 1
    assert pe(_qwen(first_k_dense_replace=1), 1) == 16 + 208
    # top-3 of 4 experts: 2 x 3 / 4 = 1.5, capped at all the tokens (1): 8 x 8 + 3 x 16 = 112
    assert pe(_spec("target", num_experts_per_tok=3), 1) == 16 + 112


def test_host_staging_by_hand():
    """The CPU staging is TINY_STAGING_PER_TOKEN bytes per token of the larger of the verify pass, B(k+1)
    tokens, and the largest prefill pass (whole prompts up to 16,384 tokens; a longer prompt alone)."""
    t = tiny_target()
    per = TINY_STAGING_PER_TOKEN
    assert memory.host_staging_bytes(t, _wl(5), 4000, 4) == 4000 * 5 * per      # verify 20,000 > prefill 16,380
    assert memory.host_staging_bytes(t, _wl(5), 4000, 2) == 16380 * per          # verify 12,000 < 16,380
    assert memory.host_staging_bytes(t, _wl(1), 100, 0) == 100 * per             # 100 prompts of one token
    assert memory.host_staging_bytes(t, _wl(1), 1, 0) == 1 * per
    assert memory.host_staging_bytes(t, _wl(20000), 3, 0) == 20000 * per         # one long prompt per pass
    assert memory.host_staging_bytes(t, _wl(5), 0, 4) == 0.0
    # rows of 12 positions (context=12): a 20-token prompt is cut to the 12 the engine sizes its rows for
    assert memory.host_staging_bytes(t, _wl(20), 3, 0, context=12) == 3 * 12 * per
    # fp32 weights: activations in fp32 (4 bytes): 16 x 4 + 8 x (4 + 4 + 4 + 4) = 192 per token
    assert memory.host_staging_bytes(t, _wl(1, weight_dtype="fp32"), 10, 0) == 10 * 192


def _with_vocab(vocab):
    return _spec("target", vocab_size=vocab)


def test_activations_of_the_largest_pass_by_hand():
    """activation_bytes = the largest of: verify (a x pass(N) + N x router + GPU attention staging, or the
    residual stream 2Nh in a with the logits N V in a and in fp32), the target's prefill (a x pass + router +
    staging + logits of its rows), and with a draft at k > 0 its catch-up step (2B tokens, staging of 2 new
    tokens, B rows of logits) and its prefill. Tiny target: 112 pass elements and 4 x 4 = 16 router bytes per
    token; the one-layer draft 64 elements; logits cost V x (2 + 4) in bf16. Staging (see the chunk test):
    target rows x (K 40 ... ) worked out per case below."""
    t = tiny_target()
    ab = memory.activation_bytes
    # prompt 1, output 5, k = 3, B = 2: rows of 6 + 3 + 2 = 11 positions, N = 8
    #   staging of 2 rows of 4 new tokens over 11 keys: K 2 x 11 x 2 = 44, scores 2 x 2 x 4 x 11 = 176:
    #   2 x (44 x 10 + 2 x 176 x 4 + 4 x 11) + output 2 x 4 x 4 x 2 x 4 = 3784 + 256 = 4040
    #   verify: 2 x 112 x 8 + 8 x 16 + 4040 = 5960 (its logits side: 2 x 2 x 8 x 8 + 8 x 32 x 6 = 1792)
    #   prefill: 2 prompts of 1: 2 x 112 x 2 + 2 x 16 + staging (2 x (4 x 10 + 2 x 4 x 4 + 1) + 64 = 210)
    #            + 2 x 32 x 6 = 1074
    assert ab(t, _wl(1, 5), 2, 3) == 5960
    # one sequence, k = 0 (rows of 8): verify 2 x 112 + 16 + (1 x (32 x 10 + 2 x 32 x 4 + 8) + 32 = 616) = 856
    assert ab(t, _wl(1, 5), 1, 0) == 856
    assert ab(t, _wl(1, 5), 0, 3) == 0.0
    # a 4096-token vocabulary: the logits side of verify dominates: 2 x 2 x 8 x 8 + 8 x 4096 x 6 = 196,864
    assert ab(_with_vocab(4096), _wl(1, 5), 2, 3) == 256 + 8 * 4096 * 6
    # in fp32 the logits are fp32 only (4 bytes, no copy): 4 x 2 x 8 x 8 + 8 x 4096 x 4 = 131,584
    assert ab(_with_vocab(4096), _wl(1, 5, weight_dtype="fp32"), 2, 3) == 512 + 8 * 4096 * 4
    # prompts of 64, k = 0, B = 4: the prefill pass (256 tokens) dominates:
    #   2 x 112 x 256 + 256 x 16 + staging (4 x (256 x 10 + 2 x 16384 x 4 + 64 x 64) + 4 x 64 x 4 x 2 x 4
    #   = 559,104) + 4 x 32 x 6 = 621,312
    assert ab(t, _wl(64, 4), 4, 0) == 57344 + 4096 + 559104 + 768


def test_the_draft_passes_by_hand():
    """A separate draft (the one-layer model with a 4096-token vocabulary): its B rows of logits make its
    passes the largest. k = 1, prompt 1, B = 2 (rows of 6 + 1 + 2 = 9):
      catch-up step, 2 tokens per row: 2 x 64 x 4 + staging (4 KV heads, group 1: K 4 x 9 x 2 = 72, scores
      4 x 2 x 9 = 72: 2 x (720 + 576 + 18) + 2 x 2 x 4 x 2 x 4 = 2756) + 2 x 4096 x 6 = 52,420;
      its prefill (1 token per row): 256 + 290 + 49,152 = 49,698; the target's passes stay under 3000."""
    t, d = tiny_target(), _spec("draft", vocab_size=4096)
    ab = memory.activation_bytes
    assert ab(t, _wl(1, 5), 2, 1, d) == 512 + 2756 + 49152
    # without drafts (k = 0) the draft does not run: the target's own passes, here its verify pass over
    # rows of 8: 2 x 112 x 2 + 2 x 16 + (2 x (32 x 10 + 2 x 32 x 4 + 8) + 2 x 1 x 4 x 2 x 4 = 1232) = 1712
    assert ab(t, _wl(1, 5), 2, 0, d) == ab(t, _wl(1, 5), 2, 0) == 1712
    # prompts of 64, B = 4, k = 1: the draft's prefill dominates:
    #   2 x 64 x 256 + staging (4 x (512 x 10 + 2 x 16384 x 4 + 4096) + 8192 = 569,344) + 4 x 4096 x 6 = 700,416
    #   (its catch-up step: 1024 + 41,720 + 98,304 = 141,048; the target's prefill 621,312)
    assert ab(t, _wl(64, 4), 4, 1, d) == 32768 + 569344 + 98304


# ---- the footprint of one configuration, and its components as the engine measures them ----
def _tiny_hw(shares_host=False, gpu_GiB=1, cpu_GiB=1):
    from tiny_specs import TINY_HW
    from specmoe.planner.hardware_spec import parse_hardware

    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY_HW.items()}
    raw["gpu"].update(mem_GiB=gpu_GiB, shares_host_cpu=shares_host)
    raw["cpu"].update(mem_GiB=cpu_GiB)
    return parse_hardware(raw, "tiny.yaml")


def _small_draft():
    """The one-layer draft with 2 KV heads: q 8 x 8, k and v 8 x 4 each, o 8 x 8 (192); a SwiGLU of 3 x 8 x 8
    (192); 3 norms of 8; the embedding and LM head 2 x 32 x 8 = 512: 920 weights, 408 its own (the rest the
    target's); its K and V take 1 layer x 2 x 2 heads x 2 x 2 bytes = 16 bytes a token."""
    d = _spec("draft", num_key_value_heads=2)
    assert d.total_params == 920 and d.kv_bytes_per_token(2) == 16
    return d
