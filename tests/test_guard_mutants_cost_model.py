"""Checks written for the mutants of planner/cost_model.py that survived scripts/mutation_check.sh: each
pins a value a surviving mutant changed, worked out by hand from the module's docstring formulas, or a
property that must hold (a stage that must be zero, a documented array shape, a share of the whole).

Models: tests/tiny_specs.py's tiny target (2 layers, h = 8, 4 query heads and 2 KV heads of d = 2, 4 experts
of 3*8*16 = 384 weights, top-2, V = 32) and tiny draft (1 layer, h = 8, 4 heads = 4 KV heads of d = 2,
FFN 8, V = 32), plus one-expert, dense and leading-dense-layer variants declared here.

Machines (rates chosen so that each number below is its own bound):
  tiny     tiny_specs.tiny_hw(): every rate 1e9/s, an operation takes max(flops, bytes) ns
  memslow  compute 1e12 FLOP/s, every memory and the link 1e9 B/s: an operation takes its bytes in ns
  (unless its flops exceed 1000x its bytes, which none here do)
"""
from __future__ import annotations

import numpy as np
import pytest

from specmoe.planner.cost_model import CostModel
from specmoe.planner.hardware_spec import parse_hardware
from specmoe.planner.model_spec import ModelSpec
from specmoe.planner.plan import Placement
from specmoe.planner.workload import Workload, load_acceptance
from tiny_specs import TINY_TARGET, tiny_draft, tiny_hw, tiny_target

NS = 1e-9


def _machine(gpu_TFLOPs=0.001, hbm_GBps=1, cpu_TFLOPs=0.001, dram_GBps=1, shares_host_cpu=False, **measured):
    """tiny_hw's machine with other rates (defaults: tiny_hw's 1e9 of everything)."""
    gpu = {"name": "g", "mem_GiB": 1, "reserve_GiB": 0, "hbm_GBps": hbm_GBps, "peak_TFLOPs": {"bf16": gpu_TFLOPs},
           "source": "test"}
    if shares_host_cpu:
        gpu["shares_host_cpu"] = True
    raw = {"name": "tiny-var", "gpu": gpu,
           "cpu": {"name": "c", "cores": 1, "mem_GiB": 1, "reserve_GiB": 0, "dram_GBps": dram_GBps,
                   "peak_TFLOPs": {"bf16": cpu_TFLOPs}, "source": "test"},
           "link": {"h2d_GBps": 1, "source": "test"}}
    if measured:
        raw["measured"] = dict(source="test", **measured)
    return parse_hardware(raw, "tiny-var.yaml")


def _memslow(**measured):
    return _machine(gpu_TFLOPs=1.0, cpu_TFLOPs=1.0, **measured)


def _cm(target=None, hw=None, draft=True, acc=0.5, **wl):
    wl = Workload(prompt_len=10, gen_len=4, acceptance=load_acceptance(acc), **wl)
    return CostModel(target or tiny_target(), hw or tiny_hw(), wl, tiny_draft() if draft else None)


# a DeepSeek-V2-like target whose layer 0 is dense (first_k_dense_replace = 1); layers 1 and 2 are MoE with
# tiny_target's experts (4 of 3*8*16 = 384 weights, top-2)
DEEPSEEK = {"model_type": "deepseek_v2", "hidden_size": 8, "num_hidden_layers": 3, "num_attention_heads": 4,
            "kv_lora_rank": 4, "qk_rope_head_dim": 2, "qk_nope_head_dim": 2, "v_head_dim": 2,
            "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "n_shared_experts": 1,
            "first_k_dense_replace": 1, "intermediate_size": 24, "vocab_size": 32, "tie_word_embeddings": False,
            "torch_dtype": "bfloat16"}


def _leading_dense():
    spec = ModelSpec.from_hf_config(dict(DEEPSEEK), name="tiny-deepseek")
    assert spec.moe_layers == (1, 2) and spec.expert_elems == 384
    return spec


# ---- a dense target: no routed experts anywhere ----
def test_a_dense_target_has_no_expert_time_of_any_kind():
    """The tiny draft (a Llama: no experts) as the target: every routed-expert quantity is zero, the
    per-layer arrays and the optimizer's linear pieces alike (GPU MoE of a fully cached layer, one
    uncached expert on the CPU, one uncached expert's copy)."""
    dense = tiny_draft()
    assert dense.num_experts == 0
    for kw in ({}, {"batched_moe": True}):
        c = _cm(target=dense, draft=False).iteration(2, 2, 0, Placement(expert_cache_slots=(0,)), context_len=10,
                                                     **kw)
        assert c.moe_gpu_full_s == 0.0
        assert c.cpu_expert_s_per_uncached_expert == 0.0
        assert c.h2d_s_per_uncached_expert == 0.0
        assert not c.moe_gpu_s.any() and not c.moe_cpu_s.any() and not c.h2d_s.any()
        assert c.moe_flops_gpu == 0.0


# ---- verify.accept: one compare per logit ----
def test_verify_counts_one_flop_per_logit_on_a_slow_gpu():
    """verify.accept reads the N V fp32 logits and does N V compares. On a GPU of 1e8 FLOP/s and 1e9 B/s
    it is compute-bound: B = 2, k = 0, N = 2, V = 32: 64 flops = 640 ns against 256 bytes = 256 ns."""
    hw = _machine(gpu_TFLOPs=1e-4)
    c = _cm(hw=hw, draft=False).iteration(2, 1, 0, Placement(expert_cache_slots=(4, 4)), context_len=10)
    assert c.verify_s.sum() == pytest.approx(640 * NS)


# ---- target.h2d: nothing is copied on a CPU standing in for the GPU ----
def test_a_cpu_standing_in_for_the_gpu_copies_no_experts():
    """shares_host_cpu: the engine's expert buffers are views of the host store (module docstring:
    t_h2d = 0, no copy), however few experts are cached."""
    hw = _machine(shares_host_cpu=True)
    assert hw.gpu.shares_host_cpu
    c = _cm(hw=hw).iteration(2, 1, 1, Placement(expert_cache_slots=(0, 1), draft_kv_gpu_sequences=1),
                             context_len=10)
    assert c.h2d_s_per_uncached_expert == 0.0
    assert c.h2d_s.tolist() == [0.0, 0.0]


# ---- batched_layer: pre/post attention once over the whole batch, in column 0 ----
def test_batched_layer_puts_the_whole_batch_pre_and_post_in_column_zero_by_hand():
    """B = 2 in M = 2 micro-batches, k = 1: N = 4 tokens in one pass per layer (tiny machine).
    pre_attn:  P = 192 - o 64 = 128 weights (128 // 8 = 16 outputs per token): flops 2*4*128 = 1024;
               bytes 128*2 + 4*(8 + 16)*2 = 448                                               -> 1024 ns
    post_attn: o 64 + router 8*4 = 32: 96 weights; flops 2*4*96 = 768; bytes 96*2 + 4*(8 + 2*8)*2 = 384 -> 768 ns
    Column 1 holds nothing."""
    c = _cm().iteration(2, 2, 1, Placement(expert_cache_slots=(4, 4), draft_kv_gpu_sequences=2), context_len=10,
                        batched_layer=True)
    assert c.batched_layer
    assert c.pre_s == pytest.approx(np.array([[1024 * NS, 0.0]] * 2))
    assert c.post_s == pytest.approx(np.array([[768 * NS, 0.0]] * 2))


# ---- CPU-expert layers: the GPU computes the cached share c/E ----
def test_a_cpu_expert_layer_leaves_the_gpu_its_cached_share_by_hand():
    """tiny target, B = 1, k = 0 (one token, tiny machine). A layer that streams runs every routed
    token on the GPU: touched(1) = 2 experts, flops 2*2*384 = 1536, bytes 2*384*2 + 2*2*8*2 = 1600 ->
    1600 ns. Layer 1 computes its uncached experts on the CPU: with c = 2 of E = 4 cached the GPU gets
    2/4 of that (800 ns); with all 4 cached all of it, as a streaming layer."""
    cm = _cm(draft=False)
    half = cm.iteration(1, 1, 0, Placement(expert_cache_slots=(0, 2), cpu_expert_layers=(1,)), context_len=10)
    assert half.moe_gpu_s[:, 0] == pytest.approx([1600 * NS, 800 * NS])
    # routed-expert flops on the GPU: layer 0 all of 2*1*2*384 = 1536, layer 1 half of it
    assert half.moe_flops_gpu == pytest.approx(1536 * 1.5)
    full = cm.iteration(1, 1, 0, Placement(expert_cache_slots=(0, 4), cpu_expert_layers=(1,)), context_len=10)
    assert full.moe_gpu_s[1, 0] == pytest.approx(full.moe_gpu_s[0, 0]) and full.moe_cpu_s[1, 0] == 0.0


def test_a_one_expert_cpu_layer_with_its_expert_cached_is_all_gpu():
    """E = 1, top-1: the one expert cached (c = E = 1) leaves nothing for the CPU, so the CPU-expert
    layer's GPU time equals the streaming layer's: one token, flops 2*384 = 768, bytes 384*2 + 2*8*2 =
    800 -> 800 ns on both."""
    one = ModelSpec.from_hf_config(dict(TINY_TARGET, num_local_experts=1, num_experts_per_tok=1), name="one-expert")
    assert one.num_experts == 1 and one.top_k == 1
    c = _cm(target=one, draft=False).iteration(1, 1, 0, Placement(expert_cache_slots=(1, 1), cpu_expert_layers=(1,)),
                                               context_len=10)
    assert c.moe_gpu_s[:, 0] == pytest.approx([800 * NS, 800 * NS])
    assert c.moe_cpu_s[:, 0].tolist() == [0.0, 0.0]
    assert c.moe_flops_gpu == pytest.approx(2 * 768)


# ---- batched_moe: a layer's whole MoE time in column 0, nothing elsewhere ----
def test_batched_moe_leaves_dense_layers_and_non_cpu_layers_empty():
    """Leading dense layer 0, MoE layers 1, 2; B = 2, k = 1 (N = 4 tokens), batched_moe, tiny machine.
    GPU MoE on layers 1, 2: flops 2*4*2*384 = 6144 > bytes (touched(4) = 3.75 experts) -> 6144 ns in
    column 0; layer 0 has no routed experts; no layer computes experts on the CPU."""
    c = _cm(target=_leading_dense()).iteration(2, 2, 1, Placement(expert_cache_slots=(0, 1, 0),
                                                                  draft_kv_gpu_sequences=2),
                                               context_len=10, batched_moe=True)
    assert c.batched_moe
    assert c.moe_gpu_s == pytest.approx(np.array([[0.0, 0.0], [6144 * NS, 0.0], [6144 * NS, 0.0]]))
    assert not c.moe_cpu_s.any()


def test_batched_moe_cpu_experts_by_hand():
    """tiny target, B = 2 in M = 2, k = 0, batched_moe, layer 1 computing its 4 uncached experts on the CPU
    (tiny machine). One expert over the batch's n = 2 tokens: n n_a / E = 1 token, flops 2*1*384 = 768;
    it is touched with p = 1 - (1/2)^2 = 0.75: 0.75*384*2 = 576 bytes -> 768 ns; 4 of them: 3072 ns, in
    column 0 of layer 1 only."""
    c = _cm(draft=False).iteration(2, 2, 0, Placement(expert_cache_slots=(4, 0), cpu_expert_layers=(1,)),
                                   context_len=10, batched_moe=True)
    assert c.cpu_expert_s_per_uncached_expert == pytest.approx(768 * NS)
    assert c.moe_cpu_s == pytest.approx(np.array([[0.0, 0.0], [3072 * NS, 0.0]]))


def test_routed_expert_flops_count_moe_layers_only():
    """moe_flops_gpu = 2 N n_a (3 h h_e) over the MoE layers: leading dense layer 0, MoE layers 1 and 2,
    B = 2, k = 1: 2*4*2*384 x 2 layers = 12288."""
    c = _cm(target=_leading_dense()).iteration(2, 1, 1, Placement(expert_cache_slots=(0, 1, 0),
                                                                  draft_kv_gpu_sequences=1), context_len=10)
    assert c.moe_flops_gpu == pytest.approx(12288)


def test_the_optimizers_h2d_form_is_zero_on_a_dense_layer_and_matches_the_iteration():
    """t_h2d(c) = (E - c) p w_e / B_h2d on MoE layers, 0 on dense ones. Leading dense layer 0; B = 2, k = 1
    (N = 4): p = 1 - (1/2)^4 = 15/16, w_e = 768 bytes: 720 ns per uncached expert (tiny machine)."""
    cm = _cm(target=_leading_dense())
    c = cm.iteration(2, 1, 1, Placement(expert_cache_slots=(0, 1, 0), draft_kv_gpu_sequences=1), context_len=10)
    assert c.h2d_s_per_uncached_expert == pytest.approx(720 * NS)
    assert cm.h2d_s(c, 0).tolist() == pytest.approx([0.0, 4 * 720 * NS, 4 * 720 * NS])
    assert cm.h2d_s(c, [0, 1, 0]).tolist() == pytest.approx(c.h2d_s.tolist())


# ---- the draft arrays: [G, K] ----
@pytest.mark.parametrize("k", [0, 1, 3])
@pytest.mark.parametrize("groups", ["batch", "micro_batch"])
def test_draft_arrays_have_one_row_per_group_and_one_column_per_step(k, groups):
    """IterationCosts documents draft_gpu_s, draft_cpu_attn_s and draft_cpu_gpu_s as [G, K]: G draft
    groups (draft_group_sizes), K = k steps; at k = 0 none. The simulator reads G, K from draft_gpu_s
    and indexes the other two with them."""
    c = _cm().iteration(4, 2, k, Placement(expert_cache_slots=(4, 4), draft_kv_gpu_sequences=2), context_len=10,
                        draft_groups=groups)
    G = len(c.draft_group_sizes)
    assert c.draft_group_sizes.sum() == 4
    for a in (c.draft_gpu_s, c.draft_cpu_attn_s, c.draft_cpu_gpu_s):
        assert a.shape == (G, k)


def test_micro_batch_draft_groups_split_the_gpu_draft_kv_evenly():
    """draft_groups="micro_batch", B = 4 in M = 2, 2 sequences with draft KV on the GPU: each group has
    2 sequences, 1 on the GPU and 1 on the CPU, so both groups' steps cost the same, and none is free."""
    c = _cm().iteration(4, 2, 2, Placement(expert_cache_slots=(4, 4), draft_kv_gpu_sequences=2), context_len=10,
                        draft_groups="micro_batch")
    assert c.draft_group_sizes.tolist() == [2, 2]
    for a in (c.draft_gpu_s, c.draft_cpu_attn_s, c.draft_cpu_gpu_s):
        assert (a > 0).all()
        assert a[0].tolist() == a[1].tolist()


def test_draft_kv_all_on_the_gpu_leaves_the_cpu_part_empty():
    """Every sequence's draft KV on the GPU: the CPU part has no sequence, so neither its attention nor its
    GPU rest takes time, at any step."""
    c = _cm().iteration(2, 1, 3, Placement(expert_cache_slots=(4, 4), draft_kv_gpu_sequences=2), context_len=10)
    assert (c.draft_gpu_s > 0).all()
    assert not c.draft_cpu_attn_s.any() and not c.draft_cpu_gpu_s.any()


def test_draft_steps_of_the_cpu_part_by_hand():
    """memslow machine (an operation takes its bytes in ns). B = 2, k = 2, no draft KV on the GPU, s = 10,
    acc(2) = 0.5 + 0.25 = 0.75 (alpha 0.5): step 0 re-reads q = 1.75 tokens per sequence, step 1 q = 1.
    The draft's matmul weights per token: q, k, v, o 4*8*8 = 256, MLP 3*8*8 = 192, LM head 32*8 = 256,
    three RMSNorm vectors 3*8 = 24: 728 (x 2 bytes = 1456); activations 2 n h elements x 2 bytes for n = 2q tokens.
      GPU rest:       step 0: 1456 + 2*3.5*8*2 = 1568 ns; step 1: 1456 + 2*2*8*2 = 1520 ns
      CPU attention:  2 sequences x (s + q) x 1 layer x 4 KV heads x 2 (K, V) x 2 d x 2 bytes (32 per token):
                      step 0: 2*11.75*32 = 752 ns; step 1: 2*11*32 = 704 ns"""
    cm = _cm(hw=_memslow())
    assert cm.d_mm == 728
    c = cm.iteration(2, 1, 2, Placement(expert_cache_slots=(4, 4), draft_kv_gpu_sequences=0), context_len=10)
    assert c.draft_cpu_gpu_s == pytest.approx(np.array([[1568 * NS, 1520 * NS]]))
    assert c.draft_cpu_attn_s == pytest.approx(np.array([[752 * NS, 704 * NS]]))
    assert not c.draft_gpu_s.any()


def test_a_cpu_expert_reads_its_weights_with_the_probability_one_token_touches_it():
    """memslow machine, tiny target, B = 2, k = 0 (n = 2 tokens), layer 1 on the CPU with nothing cached:
    each expert is touched with p = 1 - (1 - 2/4)^2 = 0.75, so it reads 0.75 x 768 = 576 bytes -> 576 ns
    (its 2*1*384 = 768 flops take 0.8 ns); 4 uncached: 2304 ns."""
    c = _cm(hw=_memslow(), draft=False).iteration(2, 1, 0, Placement(expert_cache_slots=(4, 0), cpu_expert_layers=(1,)),
                                                  context_len=10)
    assert c.cpu_expert_s_per_uncached_expert == pytest.approx(576 * NS)
    assert c.moe_cpu_s[:, 0] == pytest.approx([0.0, 2304 * NS])


# ---- shared host DRAM: the stretch and pressure of each CPU operation ----
CONTENTION = {"cpu_read_GBps_alone": 1.0, "cpu_read_GBps_during_h2d": 0.8,   # f_cpu = 0.8
              "h2d_GBps_alone": 1.0, "h2d_GBps_during_cpu_read": 0.5}        # f_h2d = 0.5


def test_shared_dram_of_each_cpu_operation_by_hand():
    """tiny machine with a measured contention (f_cpu = 0.8, f_h2d = 0.5); an operation alone takes
    t = max(flops, bytes) ns and reads DRAM for m = bytes ns; stretch = max(t, m / f_cpu) / t, pressure =
    min(1, m / t) (planner/roofline.py dram_sharing). B = 2, M = 1, k = 2, s = 10, acc(2) = 0.75.
      target attention, one sequence, k+1 = 3 queries: flops 2*4 heads*4*(3*10 + 3*4/2) = 1152, KV bytes
        (10 + 3) x 16 = 208: compute-bound, (1, 208/1152)
      one CPU expert for the micro-batch's n = 2*3 = 6 tokens: 6*2/4 = 3 tokens, flops 2*3*384 = 2304;
        p = 1 - (1/2)^6 = 63/64 of its 768 bytes = 756: (1, 756/2304)
      the draft's attention, one sequence per step: 2*4 heads*4 = 32 flops per (query, key) pair, 32 bytes per key:
        step 0, q = 1.75: flops 32*(17.5 + 1.75*2.75/2) = 32*19.90625, bytes 32*11.75: (1, 11.75/19.90625)
        step 1, q = 1:    flops 32*11 = bytes 32*11: DRAM-bound, (1/0.8, 1)"""
    cm = _cm(hw=tiny_hw(dram_contention=dict(CONTENTION)))
    c = cm.iteration(2, 1, 2, Placement(expert_cache_slots=(4, 4), draft_kv_gpu_sequences=0), context_len=10)
    sd = c.shared_dram
    assert sd is not None and sd.pcie_stretch == pytest.approx(2.0)
    assert sd.attn_cpu == pytest.approx((1.0, 208 / 1152))
    assert sd.moe_cpu == pytest.approx((1.0, 756 / 2304))
    assert len(sd.draft_cpu) == 2
    assert sd.draft_cpu[0] == pytest.approx((1.0, 11.75 / 19.90625))
    assert sd.draft_cpu[1] == pytest.approx((1.25, 1.0))


def test_shared_dram_has_no_draft_steps_without_speculation():
    """k = 0 with a draft model: no draft step runs, so none has a stretch."""
    cm = _cm(hw=tiny_hw(dram_contention=dict(CONTENTION)))
    c = cm.iteration(2, 1, 0, Placement(expert_cache_slots=(4, 4)), context_len=10)
    assert c.shared_dram is not None and c.shared_dram.draft_cpu == ()
    # one query over 10 + 1 keys: flops 2*4*4*11 = 352 against 176 bytes: (1, 0.5)
    assert c.shared_dram.attn_cpu == pytest.approx((1.0, 0.5))
    assert np.isfinite(c.closed_form_time_s)
