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
