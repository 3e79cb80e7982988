"""The cost model on cases worked by hand beyond the Mixtral-like bf16 one (issue 15): weights of 4 and 1
bytes, Qwen2-MoE's shared expert, DeepSeek's MLA KV with a leading dense layer and a shared expert.

The machine is tests/tiny_specs.py's: every rate 1e9 per second, so an operation takes max(flops,
bytes) nanoseconds (bf16 peak only: fp32 and fp8 GEMMs fall back to it).
"""
from __future__ import annotations

import numpy as np
import pytest

from specmoe.planner.cost_model import CostModel
from specmoe.planner.memory import footprint
from specmoe.planner.model_spec import ModelSpec
from specmoe.planner.plan import Placement
from specmoe.planner.workload import Workload, load_acceptance
from tiny_specs import tiny_draft, tiny_hw, tiny_target

NS = 1e-9


@pytest.mark.parametrize("dtype,wb", [("float32", 4), ("bfloat16", 2), ("fp8", 1)])
def test_weight_bytes_per_dtype_one_token(dtype, wb):
    """tiny_target (h=8, 2 layers, 4 experts of 3*8*16 = 384 weights, top-2, V=32), B=1, k=0: N=1 token,
    so every weight read shows. Expert bytes w_e = 384 wb.
    pre_attn:  P=128 weights; flops 256; bytes 128 wb + (8 in + 16 out) x 2 = 128 wb + 48
    post_attn: o 64 + router 32 = 96 weights; flops 192; bytes 96 wb + (8 + 16) x 2 = 96 wb + 48
    moe:       touched(1) = 2 experts; flops 2*2*384 = 1536; bytes 2 w_e + 2*2*8*2 = 768 wb + 64
    h2d:       p = 1 - (1/2)^1 = 0.5 of each uncached expert: 192 wb ns; slots (1, 0): 3 and 4 of them
    lm_head:   flops 2*32*8 = 512; bytes 256 wb + 32*4 = 256 wb + 128
    """
    wl = Workload(prompt_len=10, gen_len=4, weight_dtype=dtype)
    c = CostModel(tiny_target(), tiny_hw(), wl).iteration(1, 1, 0, Placement(expert_cache_slots=(1, 0)),
                                                          context_len=10)
    assert c.pre_s[:, 0] == pytest.approx([max(256, 128 * wb + 48) * NS] * 2)
    assert c.post_s[:, 0] == pytest.approx([max(192, 96 * wb + 48) * NS] * 2)
    assert c.moe_gpu_s[:, 0] == pytest.approx([max(1536, 768 * wb + 64) * NS] * 2)
    assert c.h2d_s_per_uncached_expert == pytest.approx(192 * wb * NS)
    assert c.h2d_s == pytest.approx([3 * 192 * wb * NS, 4 * 192 * wb * NS])
    assert c.lm_head_s == pytest.approx([max(512, 256 * wb + 128) * NS])
    # a cold expert on the CPU reads its w_e bytes when touched (p = 0.5): 192 wb bytes, 1 token x 2/4
    cpu = CostModel(tiny_target(), tiny_hw(), wl).iteration(1, 1, 0, Placement(expert_cache_slots=(1, 0),
                                                                               cpu_expert_layers=(1,)), context_len=10)
    assert cpu.cpu_expert_s_per_uncached_expert == pytest.approx(max(2 * 0.5 * 384, 192 * wb) * NS)
    # the memory model prices the same bytes: 1 + 0 cached experts, two layers' buffers of 4 uncached
    fp = footprint(tiny_target(), tiny_hw(), wl, 1, 0, Placement(expert_cache_slots=(1, 0)))
    assert fp.gpu_breakdown["expert_cache"] == 384 * wb
    assert fp.gpu_breakdown["streaming_buffers"] == 2 * 4 * 384 * wb
    assert fp.cpu_breakdown["experts_pinned"] == 8 * 384 * wb


QWEN2_MOE = {"model_type": "qwen2_moe", "hidden_size": 8, "moe_intermediate_size": 16,
             "shared_expert_intermediate_size": 12, "intermediate_size": 20, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 4, "num_experts_per_tok": 2,
             "vocab_size": 32, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def _cm(spec, acc=0.5, **wl):
    return CostModel(spec, tiny_hw(), Workload(prompt_len=10, gen_len=4, acceptance=load_acceptance(acc), **wl),
                     tiny_draft())


def test_qwen2_moe_shared_expert_in_post_attention():
    """Qwen2-MoE: q/k/v carry biases (4*2 + 2*2*2 = 16), a shared expert of 3*8*12 = 288 weights runs for
    every token after the router. B=2, k=1: N=4 tokens.
    pre_attn:  P = 128 + 16 = 144 weights, 144 // 8 = 18 outputs per token; flops 2*4*144 = 1152;
               bytes 288 + 4*(8 + 18)*2 = 496                                          -> 1152 ns
    post_attn: o 64 + router 32 + shared 288 = 384; flops 2*4*384 = 3072; bytes 768 + 192 -> 3072 ns
    moe:       as tiny_target's (experts of 3*8*16): flops 6144                         -> 6144 ns"""
    spec = ModelSpec.from_hf_config(dict(QWEN2_MOE), name="tiny-qwen2-moe")
    assert spec.shared_expert_elems == 288 and spec.moe_layers == (0, 1)
    c = _cm(spec).iteration(2, 1, 1, Placement(expert_cache_slots=(1, 0), draft_kv_gpu_sequences=1), context_len=10)
    assert c.pre_s[:, 0] == pytest.approx([1152 * NS] * 2)
    assert c.post_s[:, 0] == pytest.approx([3072 * NS] * 2)
    assert c.moe_gpu_s[:, 0] == pytest.approx([6144 * NS] * 2)
    assert c.h2d_s == pytest.approx([2160 * NS, 2880 * NS])


DEEPSEEK = {"model_type": "deepseek_v2", "hidden_size": 8, "num_hidden_layers": 3, "num_attention_heads": 4,
            "kv_lora_rank": 4, "qk_rope_head_dim": 2, "qk_nope_head_dim": 2, "v_head_dim": 2,
            "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "n_shared_experts": 1,
            "first_k_dense_replace": 1, "intermediate_size": 24, "vocab_size": 32, "tie_word_embeddings": False,
            "torch_dtype": "bfloat16"}


def test_deepseek_mla_kv_leading_dense_layer_and_shared_expert():
    """DeepSeek-V2-like, 3 layers, layer 0 dense (first_k_dense_replace = 1), 4 heads, MLA with latent
    rank 4 and a rope key of 2: 6 KV elements per token and layer (not 2 n_kv d = 16); every head reads
    the latent for K and again for V: e_h = 12. Weights: q 8*4*(2+2) = 128, kv_a 8*(4+2) + 4 = 52,
    kv_b 4*4*(2+2) = 64, o 4*2*8 = 64: P = 244 (30 outputs per token). B=2, k=1 (N=4), s=10.
    pre_attn:        flops 2*4*244 = 1952; bytes 488 + 4*(8+30)*2 = 792                -> 1952 ns
    post (dense 0):  o 64 + FFN 3*8*24 = 576 -> 640; flops 5120; bytes 1280 + 4*(8+16)*2 -> 5120 ns
    post (MoE 1, 2): o 64 + router 32 + shared 3*8*16 = 384 -> 480; flops 3840           -> 3840 ns
    attention (CPU): flops 2*2 seqs*4 heads*12*(2*10 + 3) = 4416; KV 2*12*6*2 = 288 B    -> 4416 ns
    KV to the GPU (attention_device gpu): 2 seqs x 12 positions x 12 bytes = 288 B       ->  288 ns
    moe and h2d on layers 1, 2 as tiny_target's; nothing on layer 0."""
    spec = ModelSpec.from_hf_config(dict(DEEPSEEK), name="tiny-deepseek")
    assert spec.kv_elems_per_token_layer == 6 and spec.moe_layers == (1, 2)
    cm = _cm(spec)
    pl = Placement(expert_cache_slots=(0, 1, 0), draft_kv_gpu_sequences=1)
    c = cm.iteration(2, 1, 1, pl, context_len=10)
    assert c.pre_s[:, 0] == pytest.approx([1952 * NS] * 3)
    assert c.post_s[:, 0] == pytest.approx([5120 * NS, 3840 * NS, 3840 * NS])
    assert c.attn_cpu_s[:, 0] == pytest.approx([4416 * NS] * 3)
    assert c.moe_gpu_s[:, 0] == pytest.approx([0.0, 6144 * NS, 6144 * NS])
    assert c.h2d_s == pytest.approx([0.0, 2160 * NS, 2880 * NS])
    g = cm.iteration(2, 1, 1, Placement(expert_cache_slots=(0, 1, 0), draft_kv_gpu_sequences=1,
                                        attention_device="gpu"), context_len=10)
    assert g.kv_h2d_s[:, 0] == pytest.approx([288 * NS] * 3)
    # k = 0 on the CPU reads the same latent KV: memory-bound only if bytes beat flops, which MLA's do not
    c0 = cm.iteration(2, 1, 0, pl, context_len=10)
    assert c0.attn_cpu_s[:, 0] == pytest.approx([2 * 2 * 4 * 12 * 11 * NS] * 3)
    # the memory model holds 3 layers x 6 elements x 2 bytes = 36 bytes per token per sequence
    wl = Workload(prompt_len=10, gen_len=4)
    fp = footprint(spec, tiny_hw(), wl, 3, 0, Placement(expert_cache_slots=(0, 1, 0), target_kv_gpu_sequences=1))
    rows = 10 + 4 + 0 + 2
    assert fp.gpu_breakdown["target_kv"] == 1 * rows * 36 and fp.cpu_breakdown["target_kv"] == 2 * rows * 36
    assert fp.cpu_breakdown["experts_pinned"] == 2 * 4 * 384 * 2       # two MoE layers only
    assert np.isclose(fp.gpu_breakdown["expert_cache"], 1 * 384 * 2)
