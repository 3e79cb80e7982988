"""The decode-iteration cost model, checked exactly on a tiny config worked by hand, then its linear
forms and properties on real models."""
from __future__ import annotations

import numpy as np
import pytest

from specmoe.planner.cost_model import CostModel, head_read_elems, split_even, touched_experts
from specmoe.planner.errors import SpecError
from specmoe.planner.hardware_spec import HardwareSpec
from specmoe.planner.model_spec import ModelSpec
from specmoe.planner.plan import Placement
from specmoe.planner.stages import Stage
from tiny_specs import datasheet
from specmoe.planner.workload import Workload, load_acceptance
from tiny_specs import tiny_draft, tiny_hw, tiny_target

NS = 1e-9


def _tiny(**pl):
    m, d, hw = tiny_target(), tiny_draft(), tiny_hw()
    wl = Workload(prompt_len=10, gen_len=4, acceptance=load_acceptance(0.5))
    place = Placement(expert_cache_slots=pl.pop("slots", (1, 0)), draft_kv_gpu_sequences=pl.pop("draft_gpu", 1), **pl)
    return CostModel(m, hw, wl, d), place


def test_tiny_config_by_hand():
    """Target: h=8, 2 layers, n_q=4, n_kv=2, d=2, E=4 experts of h_e=16, top-2, V=32, bf16 (2 bytes).
    Machine: 1 GFLOP/s and 1 GB/s everywhere, so t = max(flops, bytes) ns.
    Configuration: B=2, m=1, k=1 (N = 4 tokens), context s=10, alpha=0.5 (acc(1) = 0.5),
    cache slots (1, 0), draft KV of 1 sequence on the GPU, 1 on the CPU.

    pre_attn:  P = q,k,v = 8*8 + 2*8*4 = 128 weights; flops 2*4*128 = 1024;
               bytes 128*2 + 4*(8 in + 16 out)*2 = 448                     -> 1024 ns (compute)
    attention: e_h = 2d = 4; flops 2*2 seqs*4 heads*4*((k+1)s + (k+1)(k+2)/2 = 20+3) = 1472;
               KV bytes 2*(10+2)*8 elems*2 = 384                          -> 1472 ns
    post_attn: o 64 + router 8*4 = 96 weights; flops 2*4*96 = 768;
               bytes 96*2 + 4*(8 + 16)*2 = 384                             ->  768 ns
    moe:       touched(4) = 4(1 - (1/2)^4) = 3.75; flops 2*4*2*384 = 6144;
               bytes 3.75*768 + 4*2*2*8*2 = 3136                           -> 6144 ns
    h2d:       p = 1 - (1/2)^4 = 0.9375 of each uncached 768-byte expert = 720 ns each;
               layer 0 (1 slot): 3*720 = 2160 ns, layer 1 (0 slots): 4*720 = 2880 ns
    lm_head:   flops 2*4*32*8 = 2048; bytes 32*8*2 + 4*32*4 = 1024        -> 2048 ns
    verify:    4*32 fp32 logits = 512 bytes (128 flops)                    ->  512 ns
    draft (1 layer, h=8, 4 heads of d=2, FFN 8; 984 params, 728 of them multiplied per token):
               one step of q = acc+1 = 1.5 tokens per sequence
      GPU part (1 seq): GEMMs flops 2*1.5*728 = 2184, bytes 728*2 + 2*1.5*8*2 = 1504 -> 2184 ns;
               attention flops 2*1*4*4*(1.5*10 + 1.5*2.5/2) = 540, bytes (10+1.5)*32 = 368 -> 540 ns
               draft.gpu = 2724 ns
      CPU part (1 seq): attention 540 ns on the CPU, GEMMs 2184 ns on the GPU: draft.cpu = 2724 ns
    """
    cm, pl = _tiny()
    c = cm.iteration(2, 1, 1, pl, context_len=10)
    assert c.tokens == 4 and c.tokens_per_iteration == pytest.approx(3.0)
    assert c.pre_s[:, 0] == pytest.approx([1024 * NS] * 2)
    assert c.attn_cpu_s[:, 0] == pytest.approx([1472 * NS] * 2)
    assert c.post_s[:, 0] == pytest.approx([768 * NS] * 2)
    assert c.moe_gpu_s[:, 0] == pytest.approx([6144 * NS] * 2)
    assert c.h2d_s == pytest.approx([2160 * NS, 2880 * NS])
    assert c.lm_head_s == pytest.approx([2048 * NS]) and c.verify_s == pytest.approx([512 * NS])
    assert c.draft_gpu_s == pytest.approx(np.array([[2724 * NS]]))
    assert c.draft_cpu_attn_s == pytest.approx(np.array([[540 * NS]])) and c.draft_cpu_gpu_s == pytest.approx(np.array([[2184 * NS]]))
    st = c.stage_totals()
    assert st[Stage.TARGET_H2D.value] == pytest.approx(5040 * NS)
    assert st[Stage.DRAFT_CPU.value] == pytest.approx(2724 * NS)
    # closed form: per layer max(h2d, cpu 1472, gpu 1024+768+6144 = 7936) = 7936; + LM head + accept;
    # draft phase: max(GPU 2724 + 2184, CPU 540, CPU-part chain 540 + 2184) = 4908
    assert c.layer_time_s == pytest.approx([7936 * NS] * 2)
    assert c.closed_form_time_s == pytest.approx((2 * 7936 + 2048 + 512 + 4908) * NS)
    assert c.sum_of_stages_s == pytest.approx(31864 * NS)
    assert c.moe_flops_gpu == pytest.approx(2 * 6144)
    assert c.source == "peak"
    # linear forms
    assert c.h2d_s_per_uncached_expert == pytest.approx(720 * NS)
    assert cm.h2d_s(c, [3, 4]) == pytest.approx([720 * NS, 0.0])
    assert c.cpu_attn_s_per_seq == pytest.approx([736 * NS] * 2)      # 1472 / 2: linear in sequences
    assert cm.cpu_attn_s(c, 5) == pytest.approx([5 * 736 * NS] * 2)


def test_tiny_cpu_expert_layer_and_gpu_kv():
    cm, pl = _tiny(cpu_expert_layers=(1,))
    c = cm.iteration(2, 1, 1, pl, context_len=10)
    # layer 1 streams nothing; its 4 cold experts run on the CPU: 2 tokens each (4*2/4),
    # flops 2*2*384 = 1536, bytes 0.9375*768 = 720 -> 1536 ns each, 6144 ns in all
    assert c.h2d_s == pytest.approx([2160 * NS, 0.0])
    assert c.moe_cpu_s[:, 0] == pytest.approx([0.0, 6144 * NS])
    assert c.moe_gpu_s[:, 0] == pytest.approx([6144 * NS, 0.0])       # 0 of 4 experts cached in layer 1
    assert c.cpu_expert_s_per_uncached_expert == pytest.approx(1536 * NS)
    cm, pl = _tiny(target_kv_gpu_sequences=1)
    c = cm.iteration(2, 1, 1, pl, context_len=10)
    assert c.attn_cpu_s[:, 0] == pytest.approx([736 * NS] * 2) and c.attn_gpu_s[:, 0] == pytest.approx([736 * NS] * 2)
    cm, pl = _tiny(attention_device="gpu")
    c = cm.iteration(2, 1, 1, pl, context_len=10)
    assert c.kv_h2d_s[:, 0] == pytest.approx([384 * NS] * 2)            # 2 seqs x 12 tokens x 16 B
    assert c.attn_cpu_s.sum() == 0 and c.attn_gpu_s[:, 0] == pytest.approx([1472 * NS] * 2)


def test_tiny_errors():
    cm, pl = _tiny()
    with pytest.raises(SpecError, match="micro_batches"):
        cm.iteration(2, 3, 1, pl)
    with pytest.raises(SpecError, match="batch"):
        cm.iteration(0, 1, 1, pl)
    with pytest.raises(SpecError, match="expert_cache_slots"):
        cm.iteration(2, 1, 1, Placement(expert_cache_slots=(1,)))
    with pytest.raises(SpecError, match="expert_cache_slots"):
        cm.iteration(2, 1, 1, Placement(expert_cache_slots=(5, 0)))
    no_draft = CostModel(tiny_target(), tiny_hw(), Workload(10, 4))
    with pytest.raises(SpecError, match="draft"):
        no_draft.iteration(2, 1, 1, pl)


def test_touched_and_split():
    assert touched_experts(8, 2, 1) == pytest.approx(2.0)
    assert touched_experts(8, 2, 10_000) == pytest.approx(8.0)
    assert touched_experts(0, 0, 5) == 0.0
    assert split_even(7, 3) == [3, 2, 2] and split_even(2, 2) == [1, 1]
    assert head_read_elems(ModelSpec.preset("mixtral-8x7b")) == 256
    assert head_read_elems(ModelSpec.preset("deepseek-v2-lite")) == 2 * 576       # MLA: the latent, twice


@pytest.fixture(scope="module")
def mixtral():
    m, d = ModelSpec.preset("mixtral-8x7b"), ModelSpec.preset("mixtral-8x7b-eagle")
    hw = datasheet("a30-xeon6426y")                  # the paper's Table 1 peaks, worked by hand below
    wl = Workload(566, 1024, acceptance=load_acceptance(0.8), kv_dtype="fp16", weight_dtype="fp16")
    return CostModel(m, hw, wl, d)


def test_h2d_linear_in_slots(mixtral):
    cm = mixtral
    pl = Placement(expert_cache_slots=(0,) * 32, draft_kv_gpu_sequences=100)
    c = cm.iteration(512, 2, 3, pl)
    for s in range(9):
        t = cm.h2d_s(c, s)
        # N = 2048 tokens touch every expert: (touched - cached) exactly
        assert t == pytest.approx((8 - s) * 352_321_536 / 25e9, rel=1e-9)
        c2 = cm.iteration(512, 2, 3, Placement(expert_cache_slots=(s,) * 32, draft_kv_gpu_sequences=100))
        assert c2.h2d_s == pytest.approx(t)
    # small N: the expected uncached touched experts, not (touched - cached)+
    c1 = cm.iteration(1, 1, 0, Placement(expert_cache_slots=(2,) * 32))
    assert c1.touched == pytest.approx(2.0)
    assert c1.h2d_s[0] == pytest.approx(6 * 0.25 * 352_321_536 / 25e9)


def test_cpu_attention_linear_and_grows_with_k(mixtral):
    cm = mixtral
    pl = Placement(expert_cache_slots=(0,) * 32, draft_kv_gpu_sequences=0)
    prev = 0.0
    for k in (0, 1, 2, 4, 8):
        c = cm.iteration(400, 2, k, pl)
        assert c.attn_cpu_s.sum(axis=1) == pytest.approx(c.cpu_attn_s_per_seq * 400, rel=1e-9)
        per = c.cpu_attn_s_per_seq[0]
        assert per > prev
        prev = per
    # memory-bound at k=0 (time = KV bytes / DRAM bw), compute-bound at k=4 (g(k+1) = 20 flop/byte > 6.8)
    c0 = cm.iteration(400, 2, 0, pl)
    kv = 400 * (1078 + 1) * 8 * 128 * 2 * 2
    assert c0.attn_cpu_s[0].sum() == pytest.approx(kv / 357e9, rel=1e-9)


def test_layer_time_is_bare_max_and_speculation_raises_utilization(mixtral):
    cm = mixtral
    pl = Placement(expert_cache_slots=(1,) * 32, draft_kv_gpu_sequences=200)
    utils = []
    for k in (0, 2, 4):
        c = cm.iteration(600, 2, k, pl)
        assert c.layer_time_s == pytest.approx(np.maximum(np.maximum(c.pcie_s, c.cpu_s), c.gpu_s))
        busy = c.resource_busy_s()
        assert sum(busy.values()) == pytest.approx(c.sum_of_stages_s)
        utils.append(c.moe_gpu_utilization(c.closed_form_time_s))
    assert utils[0] < utils[1] < utils[2]


def test_batched_moe_and_draft_groups(mixtral):
    cm = mixtral
    pl = Placement(expert_cache_slots=(0,) * 32, draft_kv_gpu_sequences=100)
    a = cm.iteration(600, 3, 4, pl)
    b = cm.iteration(600, 3, 4, pl, batched_moe=True, draft_groups="micro_batch")
    assert (b.moe_gpu_s[:, 1:] == 0).all() and (b.moe_gpu_s[:, 0] > 0).all()
    # one GEMM over all tokens reads each touched expert once: no slower than three
    assert b.moe_gpu_s.sum() <= a.moe_gpu_s.sum()
    assert a.draft_gpu_s.shape == (1, 4) and b.draft_gpu_s.shape == (3, 4)
    assert b.draft_group_sizes.tolist() == [200, 200, 200]


def test_measured_source_on_h200():
    m, d = ModelSpec.preset("qwen3-30b-a3b"), ModelSpec.preset("qwen3-0.6b")
    wl = Workload(566, 1024, acceptance=load_acceptance(0.8))
    pl = Placement(expert_cache_slots=(64,) * 48, draft_kv_gpu_sequences=10)
    assert CostModel(m, HardwareSpec.preset("h200-host"), wl, d).iteration(100, 2, 2, pl).source == "measured"
    assert CostModel(m, HardwareSpec.preset("h200-host"), wl, d, use_measured=False).iteration(
        100, 2, 2, pl).source == "peak"
