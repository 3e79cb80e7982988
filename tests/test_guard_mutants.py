"""Checks written for mutants that survived scripts/mutation_check.sh (bench/results/mutation_survivors.txt):
each pins a value a surviving mutant changed, worked out by hand."""
from __future__ import annotations

import pytest

from specmoe.planner.cost_terms import matmul_elems_per_token, touched_experts
from specmoe.planner.model_spec import load_model


def test_a_one_expert_layer_touches_its_expert():
    # E = 1, top-1: every token routes to the one expert, so any tokens touch exactly 1 (not 0)
    assert touched_experts(1, 1, 5) == 1.0
    assert touched_experts(1, 1, 0.5) == 1.0
    assert touched_experts(8, 2, 0) == 0.0 and touched_experts(0, 2, 10) == 0.0
    assert touched_experts(8, 2, 1) == pytest.approx(2.0)        # 8 (1 - (6/8)^1)


def test_a_tied_embedding_is_multiplied_once_as_the_lm_head():
    tied, untied = load_model("qwen3-0.6b"), load_model("mistral-7b")
    assert tied.tie_word_embeddings and not untied.tie_word_embeddings
    # tied: the lookup table is not multiplied, but it is the LM head: active - E + E = active (596,042,752)
    assert matmul_elems_per_token(tied) == 596_042_752.0 == float(tied.active_params)
    # untied: the input embedding (vocab 32000 x 4096) is a lookup only; the separate LM head is in active
    assert matmul_elems_per_token(untied) == float(untied.active_params - 32000 * 4096)


# ---- planner/cost_model.py ----
def _cm(hw="h200-host", dtype="bf16", schedule=None, model="mixtral-8x7b"):
    from specmoe.planner.cost_model import CostModel
    from specmoe.planner.hardware_spec import load_hardware
    from specmoe.planner.workload import Workload, load_acceptance

    wl = Workload(64, 32, acceptance=load_acceptance(0.5), weight_dtype=dtype, kv_dtype="bf16")
    return CostModel(load_model(model), load_hardware(hw), wl, schedule=schedule)


def test_a_gemm_is_costed_at_the_workloads_dtype():
    from specmoe.planner.roofline import OpCost

    # h200-host datasheet: fp32 67 TFLOP/s, bf16 989: a compute-bound op of 1e15 FLOP takes 1e15 / peak
    assert _cm(dtype="fp32")._t("gpu", OpCost(flops=1e15), set()) == pytest.approx(1e15 / 67e12)
    assert _cm(dtype="bf16")._t("gpu", OpCost(flops=1e15), set()) == pytest.approx(1e15 / 989e12)
    assert _cm(dtype="bf16")._t("gpu", OpCost(flops=1e15), set(), dtype="fp32") == pytest.approx(1e15 / 67e12)


def test_an_op_names_its_rate_source_only_when_it_takes_time():
    from specmoe.planner.roofline import OpCost

    cm, srcs = _cm(hw="h200-host-calibrated"), set()
    cm._t("gpu", OpCost(flops=0.0), srcs)
    assert srcs == set()                                          # a zero-time op says nothing about the rates
    cm._t("gpu", OpCost(flops=1e6, hbm_bytes=1e3), srcs, tokens=1)   # microseconds, from the measured curve
    assert srcs == {"measured"}


def test_zero_sequences_of_attention_take_no_time_and_name_no_source():
    from specmoe.planner.cost_model import _AttentionSlopes

    slopes, srcs = _AttentionSlopes(2.0, 3.0, {"measured"}, {"peak"}), set()
    assert slopes.time(0, True, srcs) == 0.0 and srcs == set()
    assert slopes.time(4, False, srcs) == 12.0 and srcs == {"peak"}


def test_attention_flops_by_hand():
    cm = _cm()
    m = load_model("mixtral-8x7b")           # 32 query heads, head dim 128: e_h = 2 x 128 = 256
    op = cm.attn_op(seqs=5, k1=2, s=10, on_gpu=True, layers=3)
    # 2 x layers x seqs x heads x e_h x (k1 s + k1 (k1 + 1) / 2) = 2 x 3 x 5 x 32 x 256 x (20 + 3)
    assert m.num_q_heads == 32 and op.flops == pytest.approx(2 * 3 * 5 * 32 * 256 * 23)
    assert op.hbm_bytes == pytest.approx(5 * 12 * cm.kv_tok_layer_bytes)


def test_a_dense_target_is_costed():
    from specmoe.planner.estimator import estimate
    from specmoe.planner.workload import Workload, load_acceptance

    cm = _cm(model="mistral-7b")
    assert cm.E == 0 and cm.h2d_src == "peak" and cm.h2d_Bps > 0
    e = estimate("mistral-7b", "h200-host", Workload(64, 32, acceptance=load_acceptance(0.0)), batch=8)
    assert e.decode_tokens_per_s > 0 and e.stages["target.h2d"] == 0.0


def test_the_schedule_changes_the_iteration():
    from dataclasses import replace

    from specmoe.planner.hardware_spec import load_hardware
    from specmoe.planner.memory import Placement
    from specmoe.planner.schedule import default_schedule

    per_layer = default_schedule(load_hardware("h200-host"))
    per_mb = replace(per_layer, pre_post="per_micro_batch", expert_streaming="off")
    pl = Placement(expert_cache_slots=(0,) * 32)
    a = _cm(schedule=per_layer).iteration(256, 4, 0, pl)
    b = _cm(schedule=per_mb).iteration(256, 4, 0, pl)
    # per layer: pre/post attention once over the batch (column 0), per micro-batch: four columns
    assert a.batched_layer and not b.batched_layer
    assert a.pre_s[:, 1:].sum() == 0.0 and (b.pre_s > 0).all()


@pytest.mark.parametrize("args, message", [
    ((0, 1, 0), "batch: must be a positive integer, got 0 (give a batch of at least 1)"),
    ((4, 0, 0), "micro_batches: 0 is not in [1, batch=4] (use between 1 and batch micro-batches)"),
    ((4, 5, 0), "micro_batches: 5 is not in [1, batch=4] (use between 1 and batch micro-batches)"),
    ((4, 1, -1), "draft_len: must be >= 0, got -1 (use 0 for no speculation)"),
    ((4, 1, 2), "draft: draft_len is 2 but no draft model was given (give a draft model or use draft_len 0)"),
])
def test_iteration_refuses_bad_inputs_in_words(args, message):
    from specmoe.planner.errors import SpecError
    from specmoe.planner.memory import Placement

    with pytest.raises(SpecError) as e:
        _cm().iteration(*args, Placement(expert_cache_slots=(0,) * 32))
    assert str(e.value) == message


def test_iteration_refuses_a_placement_of_the_wrong_length():
    from specmoe.planner.errors import SpecError
    from specmoe.planner.memory import Placement

    with pytest.raises(SpecError) as e:
        _cm().iteration(4, 1, 0, Placement(expert_cache_slots=(0,) * 3))
    assert str(e.value) == ("placement.expert_cache_slots: has 3 entries, the model has 32 layers "
                            "(give one entry per layer)")


def test_the_schedule_decides_moe_batching_and_draft_groups():
    from dataclasses import replace

    from specmoe.planner.hardware_spec import load_hardware
    from specmoe.planner.memory import Placement
    from specmoe.planner.schedule import default_schedule

    pl = Placement(expert_cache_slots=(0,) * 32, draft_kv_gpu_sequences=8)
    sched = default_schedule(load_hardware("h200-host"))
    none = _cm().iteration(8, 4, 0, pl)
    assert not none.batched_moe                                    # no schedule: everything per micro-batch
    moe_only = _cm(schedule=replace(sched, moe="per_layer", pre_post="per_micro_batch")).iteration(8, 4, 0, pl)
    assert moe_only.batched_moe and not moe_only.batched_layer

    def groups(overlap):
        from specmoe.planner.cost_model import CostModel
        from specmoe.planner.hardware_spec import load_hardware as lh
        from specmoe.planner.workload import Workload, load_acceptance

        wl = Workload(64, 32, acceptance=load_acceptance(0.5))
        cm = CostModel(load_model("mixtral-8x7b"), lh("h200-host"), wl, draft=load_model("mixtral-8x7b-eagle"),
                       schedule=replace(sched, overlap_draft=overlap))
        return list(cm.iteration(8, 4, 2, pl).draft_group_sizes)
    assert groups(False) == [8] and groups(True) == [2, 2, 2, 2]


def test_a_leading_dense_layer_post_attention_by_hand():
    from specmoe.planner.memory import Placement

    import json

    from specmoe.planner.cost_model import CostModel
    from specmoe.planner.hardware_spec import HardwareSpec, parse_hardware
    from specmoe.planner.workload import Workload, load_acceptance

    raw = json.loads(json.dumps(HardwareSpec.preset("h200-host").raw))
    raw["measured"] = {"source": "test", "gpu_gemm_TFLOPs_by_M": {1: 9e4, 8192: 9e4}}   # GEMMs memory-bound
    m = load_model("deepseek-v2-lite")                 # layer 0 is dense (first_k_dense_replace = 1)
    cm = CostModel(m, parse_hardware(raw, "fast"), Workload(64, 32, acceptance=load_acceptance(0.5)))
    assert 0 not in m.moe_layers and cm.num_dense == 1
    c = cm.iteration(1, 1, 0, Placement(expert_cache_slots=(0,) * m.num_layers))
    # one token: both layers' post-attention read their weights (bf16) and activations at the same HBM rate,
    # so their times stand as their bytes: o-proj 16 x 128 x 2048 + the dense FFN 67,239,936 against o-proj +
    # router + shared experts 21,626,880 elements; activations (16 x 128 + 2 x 2048) x 2 bytes each
    act = (16 * 128 + 2 * 2048) * 2
    dense_b = (16 * 128 * 2048 + 67_239_936) * 2 + act
    moe_b = 21_626_880 * 2 + act
    assert c.post_s[0, 0] / c.post_s[1, 0] == pytest.approx(dense_b / moe_b, rel=1e-6)


def test_the_moe_gemm_rate_is_read_at_the_tokens_per_expert():
    import json

    from specmoe.planner.cost_model import CostModel
    from specmoe.planner.hardware_spec import HardwareSpec, parse_hardware
    from specmoe.planner.memory import Placement
    from specmoe.planner.workload import Workload, load_acceptance

    raw = json.loads(json.dumps(HardwareSpec.preset("h200-host").raw))
    raw["measured"] = {"source": "test", "gpu_gemm_TFLOPs_by_M": {1: 0.005, 4096: 5.0}}     # compute-bound MoE
    hw = parse_hardware(raw, "steep")
    m = load_model("mixtral-8x7b")
    cm = CostModel(m, hw, Workload(64, 32, acceptance=load_acceptance(0.5)))
    c = cm.iteration(4, 1, 0, Placement(expert_cache_slots=(8,) * 32))
    n, tj = 4, touched_experts(8, 2, 4)                  # 4 tokens, top-2: 8 x (1 - (6/8)^4) = 5.47 experts
    M = n * 2 / tj                                       # 1.46 tokens per touched expert
    want = 2.0 * n * 2 * m.expert_elems / (hw.measured.gpu_gemm_TFLOPs_by_M(M) * 1e12)
    assert c.moe_gpu_s[0].sum() == pytest.approx(want, rel=1e-6)


def _gpu_attention_cm(hw="h200-host", kv="bf16"):
    from specmoe.planner.cost_model import CostModel
    from specmoe.planner.hardware_spec import load_hardware
    from specmoe.planner.workload import Workload, load_acceptance

    wl = Workload(64, 32, acceptance=load_acceptance(0.5), kv_dtype=kv, weight_dtype="bf16")
    return CostModel(load_model("mixtral-8x7b"), load_hardware(hw), wl, draft=load_model("mixtral-8x7b-eagle"))


def test_gpu_attention_reads_its_kv_from_hbm_by_hand():
    from specmoe.planner.memory import Placement

    cm = _gpu_attention_cm()
    c = cm.iteration(4, 1, 0, Placement(expert_cache_slots=(8,) * 32, target_kv_gpu_sequences=4), context_len=1000)
    # one token over 1001 positions of 8 KV heads x 128 x (K, V) in bf16: memory-bound, within HBM's reach
    # (4.8 TB/s) but no faster; its 16.4 MFLOP alone would take 0.02 us at the bf16 peak
    kv_bytes = 1001 * 8 * 128 * 2 * 2
    assert kv_bytes / 4.8e12 <= c.gpu_attn_s_per_seq[0] <= 1.3 * kv_bytes / 4.8e12
    assert c.attn_gpu_s[0, 0] == pytest.approx(4 * c.gpu_attn_s_per_seq[0], rel=1e-9)


def test_gpu_attention_is_costed_at_the_kv_dtype():
    from specmoe.planner.memory import Placement

    pl = Placement(expert_cache_slots=(8,) * 32, target_kv_gpu_sequences=4, draft_kv_gpu_sequences=4)
    # k = 8: 9 queries x 32 heads read each fp32 key: 2 x 32 x 256 x (9 x 1000 + 45) FLOP, compute-bound at the
    # H200's fp32 rate (67 TFLOP/s), where bf16 KV would be memory-bound
    slope = _gpu_attention_cm(kv="fp32").iteration(4, 1, 8, pl, context_len=1000).gpu_attn_s_per_seq[0]
    assert slope == pytest.approx(2 * 32 * 256 * (9 * 1000 + 45) / 67e12, rel=1e-9)


def test_attention_moved_to_the_gpu_streams_each_host_sequence_by_hand():
    from specmoe.planner.memory import Placement
    from specmoe.planner.roofline import h2d_rate

    cm = _gpu_attention_cm(hw="h200-host-calibrated")
    pl = Placement(expert_cache_slots=(8,) * 32, target_kv_gpu_sequences=1, attention_device="gpu")
    c = cm.iteration(2, 1, 0, pl, context_len=1000)       # 2 sequences, 1 of them with its KV on the host
    kv_seq = 1001 * cm.kv_tok_layer_bytes                 # one sequence's K and V of one layer, one copy
    rate, _ = h2d_rate(cm.hw, kv_seq)                     # the measured H2D curve at that chunk size
    assert rate != cm.hw.link.h2d_Bps
    assert c.kv_h2d_s[0, 0] == pytest.approx(kv_seq / rate, rel=1e-9)
    assert c.attn_gpu_s[0, 0] == pytest.approx(2 * c.gpu_attn_s_per_seq[0], rel=1e-9) and c.attn_cpu_s[0, 0] == 0.0


def test_a_dense_model_has_no_expert_slots():
    from specmoe.planner.errors import SpecError
    from specmoe.planner.memory import Placement

    with pytest.raises(SpecError) as e:
        _cm(model="mistral-7b").iteration(2, 1, 0, Placement(expert_cache_slots=(1,) * 32))
    assert str(e.value) == "placement.expert_cache_slots: entries must lie in [0, 0] (fix the placement)"
    with pytest.raises(SpecError) as e:
        _cm().iteration(2, 1, 0, Placement(expert_cache_slots=(9,) * 32))
    assert str(e.value) == "placement.expert_cache_slots: entries must lie in [0, 8] (fix the placement)"
