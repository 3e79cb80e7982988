"""Simulator guards, part 2 (planner/simulator.py and planner/prefill.py mutants): prefill, whole runs and evaluate_config
worked by hand; the shared helpers are in test_guard_mutants_simulator.py."""
from __future__ import annotations

import numpy as np
import pytest
from specmoe.planner.plan import Placement
from specmoe.planner.shared_dram import SharedDram
from specmoe.planner.simulator import simulate_iteration
from test_guard_mutants_simulator import NS, _PL, _costs, _events, _pl, _tiny_cm  # noqa: E402 (shared helpers)


def test_a_run_without_drafts_takes_exactly_gen_len_iterations():
    """k = 0: every sequence gains 1 token per iteration: 4 iterations of all 16 sequences at contexts
    10, 11, 12, 13 (one group each); the draft KV budget is irrelevant but still reported."""
    from specmoe.planner.simulator import simulate_run

    cm = _tiny_cm()
    pl = Placement(expert_cache_slots=(1, 0), draft_kv_gpu_sequences=4)
    rr = simulate_run(cm, 16, 2, 0, pl, groups=12)
    assert rr.iterations == 4.0
    assert [(g["iterations"], g["active"], g["context"]) for g in rr.groups] == [(1, 16, 10.0 + n) for n in range(4)]
    t = [simulate_iteration(cm.iteration(16, 2, 0, pl, context_len=10.0 + n), pl).iteration_time_s for n in range(4)]
    assert rr.decode_time_s == pytest.approx(sum(t), rel=1e-12)
    # two coarse groups of 2 iterations each, simulated at their mid-points 0.5 and 2.5
    r2 = simulate_run(cm, 16, 2, 0, pl, groups=2)
    assert [(g["iterations"], g["context"]) for g in r2.groups] == [(2, 10.5), (2, 12.5)]


# ---- more schedules on synthetic iterations ----
@pytest.mark.parametrize("batched", [False, True])
def test_cpu_experts_and_a_copy_slow_each_other_by_the_experts_share(batched):
    """Layer 0's experts all run on the CPU (2 s alone; stretch 2, pressure 0.5), layer 1 streams its
    experts (4 s alone; 3x slower beside pressure 1): both start with the iteration, each 2x slower
    together (as in the attention case above): the CPU experts [0, 4], the copy [0, 6]; layer 1's MoE
    [6, 7]. The same with the MoE batched over the (one) micro-batch."""
    sd = SharedDram(attn_cpu=(1.0, 0.0), moe_cpu=(2.0, 0.5), draft_cpu=(), pcie_stretch=3.0)
    c = _costs(2, 1, moe_gpu=[[0.0], [1.0]], moe_cpu=[[2.0], [0.0]], h2d=[0.0, 4.0], shared=sd, batched_moe=batched)
    r = simulate_iteration(c, _pl(2))
    assert r.iteration_time_s == pytest.approx(7.0)
    mb = -1 if batched else 0
    assert _events(r, "target.moe") == [pytest.approx((0.0, 4.0, 0, mb)), pytest.approx((6.0, 7.0, 1, mb))]
    assert _events(r, "target.h2d") == [pytest.approx((0.0, 6.0, 1, -1))]


@pytest.mark.parametrize("M", [1, 2])
def test_a_batched_layer_without_routed_experts_still_orders_the_next_layer(M):
    """As test_a_layer_without_routed_experts..., with one MoE over the batch: the dense layer 0 (pre,
    CPU attention, post of 1 s per micro-batch, no MoE) and the MoE layer 1 (1 s): with M micro-batches
    layer 1's pre waits for all of layer 0: M = 1: 3 + 4 = 7; M = 2: layer 0 pre [0,1], [1,2], attention
    [1,2], [2,3], post [2,3], [3,4]; layer 1 likewise [4, 8], its MoE [8, 9]."""
    c = _costs(2, M, pre=1.0, attn_cpu=1.0, post=1.0, moe_gpu=np.array([[0.0] * M, [1.0] + [0.0] * (M - 1)]),
               batched_moe=True)
    r = simulate_iteration(c, _pl(2))
    assert r.iteration_time_s == pytest.approx(7.0 if M == 1 else 9.0)
    assert _events(r, "target.pre_attn")[M][:3] == pytest.approx((3.0 if M == 1 else 4.0, 4.0 if M == 1 else 5.0, 1))


@pytest.mark.parametrize("case", range(6))
def test_every_second_of_every_stage_is_simulated(case):
    """Sum rule: without shared DRAM each event runs for exactly its duration, so the simulated stage and
    resource times equal the cost arrays' totals (IterationCosts.stage_totals, resource_busy_s), for
    stage times under a second and zero in every pattern (a draft CPU part of attention only or of GPU
    work only, KV copies of tenths of a second)."""
    rng = np.random.default_rng(case)
    L, M, K = 2, 2, 2

    def some(shape):
        return rng.choice([0.0, 0.1, 0.25, 0.5, 0.75], size=shape)
    gpu_kv = some((L, M))
    c = _costs(L, M, pre=some((L, M)), attn_cpu=some((L, M)), attn_gpu=gpu_kv,
               kv_h2d=np.where(gpu_kv > 0, some((L, M)), 0.0), post=some((L, M)), moe_gpu=some((L, M)),
               moe_cpu=some((L, M)), h2d=some(L), lm=0.5, ver=0.25, draft_gpu=some((1, K)),
               draft_cpu_attn=[[0.5, 0.0]], draft_cpu_gpu=[[0.0, 0.5]])
    r = simulate_iteration(c, _pl(L), prefetch=case % 2 == 1)
    for key, v in c.stage_totals().items():
        assert r.stages[key] == pytest.approx(v, abs=1e-12), key
    assert r.resource_busy_s == pytest.approx(c.resource_busy_s(), abs=1e-12)
    assert c.closed_form_time_s - 1e-12 <= r.iteration_time_s <= c.sum_of_stages_s + 1e-12


def test_draft_groups_per_micro_batch_in_the_papers_order():
    """Draft groups per micro-batch but no overlap: each group's draft starts once the whole batch is
    verified, and the next iteration once every draft is done. Micro-batches: pre 1, CPU attention 1,
    post 1, MoE 1, acceptance 1: pre [0,1], [1,2], attention [1,2], [2,3], post(0) [2,3], MoE(0) [3,4],
    post(1) [4,5], MoE(1) [5,6], acceptance [6,7], [7,8]; then group 0's CPU draft attention [8, 13] and
    its GPU rest [13, 14], group 1's GPU step [8, 9]: period 14. (Group 0 after its own acceptance would
    start at 7.)"""
    c = _costs(1, 2, pre=1.0, attn_cpu=1.0, post=1.0, moe_gpu=1.0, ver=1.0, draft_gpu=[[0.0], [1.0]],
               draft_cpu_attn=[[5.0], [0.0]], draft_cpu_gpu=[[1.0], [0.0]])
    r = simulate_iteration(c, _pl(1))
    assert r.iteration_time_s == pytest.approx(14.0)
    assert _events(r, "draft.cpu") == [pytest.approx((8.0, 13.0, -1, 0)), pytest.approx((13.0, 14.0, -1, 0))]
    assert _events(r, "draft.gpu") == [pytest.approx((8.0, 9.0, -1, 1))]
    assert _events(r, "target.pre_attn")[0] == pytest.approx((0.0, 1.0, 0, 0))


# ---- evaluate_config: the optimizer's fast path ----
def _tiny_eval_cm():
    from specmoe.planner.cost_model import CostModel
    from specmoe.planner.workload import Workload, load_acceptance
    from tiny_specs import tiny_draft, tiny_hw, tiny_target

    return CostModel(tiny_target(), tiny_hw(), Workload(10, 4, acceptance=load_acceptance(0.5)), tiny_draft())


def test_evaluate_config_of_the_by_hand_tiny_iteration():
    """test_simulator.test_tiny_iteration_by_hand: B = 2, m = 1, k = 1, context 10 takes 26284 ns; the
    closed form (test_cost_model.test_tiny_config_by_hand) 2 x 7936 + 2048 + 512 + 4908 = 23340 ns;
    B (acc(1) + 1) = 3 tokens per iteration; the GPU is the busiest resource."""
    from specmoe.planner.simulator import evaluate_config

    pl = Placement(expert_cache_slots=(1, 0), draft_kv_gpu_sequences=1)
    ev = evaluate_config(_tiny_eval_cm(), 2, 1, 1, pl, context_len=10)
    assert ev.iteration_time_s == pytest.approx(26284 * NS) and ev.closed_form_s == pytest.approx(23340 * NS)
    assert ev.decode_tokens_per_s == pytest.approx(3 / (26284 * NS)) and ev.bound == "gpu"
    assert ev.moe_gpu_utilization == pytest.approx(2 * 6144 / (26284 * NS * 1e9))     # 1 GFLOP/s peak
    closed = evaluate_config(_tiny_eval_cm(), 2, 1, 1, pl, context_len=10, simulate=False)
    assert closed.iteration_time_s == pytest.approx(23340 * NS)
    assert closed.decode_tokens_per_s == pytest.approx(3 / (23340 * NS)) and closed.bound == "gpu"


@pytest.mark.parametrize("fast, options", [(False, ("overlap_draft", "batched_moe", "batched_layer")),
                                           (True, ("prefetch",))])
def test_evaluate_config_defaults_to_the_papers_schedule(fast, options):
    """No option given: per-micro-batch MoE and pre/post, drafts after the whole batch, no prefetch, the
    simulator (not the closed form): the same time as simulating the plain costs. Each option changes the
    time where it matters: overlap and batching on the tiny machine, prefetch where the copies bind (a GPU
    10x and a CPU 1000x faster than the tiny one)."""
    from specmoe.planner.simulator import evaluate_config

    cm = _tiny_cm(gpu_TFLOPs=0.01, hbm_GBps=10.0, cpu_fast=True) if fast else _tiny_cm()
    pl = Placement(expert_cache_slots=(1, 0), draft_kv_gpu_sequences=0)
    B = 4 if fast else 8
    plain = cm.iteration(B, 2, 1, pl, context_len=10, batched_moe=False, batched_layer=False, draft_groups="batch")
    want = simulate_iteration(plain, pl).iteration_time_s
    assert evaluate_config(cm, B, 2, 1, pl, context_len=10).iteration_time_s == pytest.approx(want, rel=1e-12)
    for opt in options:
        other = evaluate_config(cm, B, 2, 1, pl, context_len=10, **{opt: True}).iteration_time_s
        assert other != pytest.approx(want, rel=1e-3), opt
    assert evaluate_config(cm, B, 2, 1, pl, context_len=10, simulate=False).iteration_time_s != pytest.approx(want)


def test_prefill_on_a_memory_bound_gpu_by_hand():
    """A GPU of 1000 TFLOP/s and 1 GB/s of HBM: every GPU op takes its bytes in ns. Per layer and chunk
    the weights: q,k,v 128 x 2 = 256, o + router 96 x 2 = 192, all 4 experts 3072 bytes; per layer the K
    and V of the 20 tokens written and read, 2 x 20 x 16 = 640 bytes: 4160 ns, which hides layer 1's copy
    (3072) and the D2H (320). LM head weights 32 x 8 x 2 = 512; draft weights (728 less its LM head's 256,
    which its prefill does not run) 472 x 2 = 944 per chunk and its KV 20 x 32 = 640. One chunk:
    2304 + 2 x 4160 + 512 + 944 + 640 = 12720 ns. The engine prefills whole prompts (10 tokens each here):
    passes of at most 10 or 19 tokens, or of 8 (shorter than a prompt: one prompt each), are 2 passes,
    which re-read the weights: layers 2 x (2 x 3520 + 640), draft 2 x 944."""
    from specmoe.planner.simulator import prefill_time

    cm = _tiny_cm(gpu_TFLOPs=1000.0, hbm_GBps=1.0)
    assert prefill_time(cm, 2, _PL) == pytest.approx(12720 * NS, rel=1e-9)
    assert prefill_time(cm, 2, _PL, chunk_tokens=20) == pytest.approx(12720 * NS, rel=1e-9)
    two = (2304 + 2 * (2 * 3520 + 640) + 512 + 2 * 944 + 640) * NS
    for chunk in (19, 10, 8, 1):
        assert prefill_time(cm, 2, _PL, chunk_tokens=chunk) == pytest.approx(two, rel=1e-9), chunk


def _dense_cm(gpu_TFLOPs, hbm_GBps):
    """The tiny draft (a llama: 1 layer, hidden 8, 4 heads and 4 KV heads of d = 2, FFN 8) as a dense
    target, no draft."""
    from specmoe.planner.cost_model import CostModel
    from specmoe.planner.hardware_spec import parse_hardware
    from specmoe.planner.workload import Workload, load_acceptance
    from tiny_specs import TINY_HW, tiny_draft

    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY_HW.items()}
    raw["gpu"].update(peak_TFLOPs={"bf16": gpu_TFLOPs}, hbm_GBps=hbm_GBps)
    return CostModel(tiny_draft(), parse_hardware(raw, "tiny.yaml"), Workload(10, 4, acceptance=load_acceptance(0.0)))


def test_prefill_of_a_dense_target_by_hand():
    """One dense layer, 20 prompt tokens: q,k,v 3 x 64 = 192 weights, o 64 + FFN 3 x 8 x 8 = 256 weights,
    e_h 4, 32 KV bytes per token; nothing streams.
    Compute-bound (1 GFLOP/s): pre 2 x 20 x 192 = 7680, attention 2 x 2 x 4 x 4 x 55 = 3520 (1280 bytes),
    post 2 x 20 x 256 = 10240, D2H 20 x 32 = 640 hidden: 21440; LM head 1024: 22464 ns.
    Memory-bound (1000 TFLOP/s, 1 GB/s): 384 + 1280 + 512 = 2176 (the D2H's 640 hidden); LM head 512."""
    from specmoe.planner.simulator import prefill_time

    pl = Placement(expert_cache_slots=(0,))
    assert prefill_time(_dense_cm(0.001, 1.0), 2, pl) == pytest.approx(22464 * NS, rel=1e-9)
    assert prefill_time(_dense_cm(1000.0, 1.0), 2, pl) == pytest.approx((2176 + 512) * NS, rel=1e-9)


def test_prefill_reads_the_measured_gemm_rate_at_its_rows():
    """A measured GEMM curve, 1, 2 and 4 GFLOP/s at M = 2, 10 and 20 rows (peak 1 TFLOP/s, HBM 1 GB/s):
    the dense GEMMs of a chunk have M = 20 rows (4 GFLOP/s), an expert's M = 20 x 2 / 4 = 10 (2 GFLOP/s),
    the LM head M = 2 (1 GFLOP/s); attention runs at the peak (its 640 bytes bind).
    Per layer: pre 5120 / 4 = 1280, attention 640, post 3840 / 4 = 960, MoE 30720 / 2 = 15360: 18240;
    LM head 1024; draft GEMMs (no LM head) 18880 / 4 = 4720 and attention 640: 2304 + 2 x 18240 + 1024 + 5360."""
    from specmoe.planner.simulator import prefill_time

    from specmoe.planner.cost_model import CostModel
    from specmoe.planner.hardware_spec import parse_hardware
    from specmoe.planner.workload import Workload, load_acceptance
    from tiny_specs import TINY_HW, tiny_draft, tiny_target

    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY_HW.items()}
    raw["gpu"].update(peak_TFLOPs={"bf16": 1.0})
    raw["measured"] = {"source": "test", "gpu_gemm_TFLOPs_by_M": {2: 0.001, 10: 0.002, 20: 0.004}}
    cm = CostModel(tiny_target(), parse_hardware(raw, "tiny.yaml"), Workload(10, 4, acceptance=load_acceptance(0.5)),
                   tiny_draft())
    assert prefill_time(cm, 2, _PL) == pytest.approx((2304 + 2 * 18240 + 1024 + 5360) * NS, rel=1e-9)


def test_prefill_of_a_two_layer_draft_by_hand():
    """The tiny draft with 2 layers: 2 x 464 + final norm 8 + LM head 256 = 1192 multiplied weights per
    token, 936 in its prefill (no logits); its causal attention in both layers 2 x 2 x 2 x 4 x 4 x 55 =
    7040 flops (1280 KV bytes). Compute-bound (1 GFLOP/s): target 2304 + 2 x 43200 + 1024, draft
    2 x 20 x 936 = 37440 + 7040."""
    from specmoe.planner.cost_model import CostModel
    from specmoe.planner.model_spec import ModelSpec
    from specmoe.planner.simulator import prefill_time
    from specmoe.planner.workload import Workload, load_acceptance
    from tiny_specs import TINY_DRAFT, tiny_hw, tiny_target

    d2 = ModelSpec.from_hf_config(dict(TINY_DRAFT, num_hidden_layers=2), name="tiny-draft-2")
    cm = CostModel(tiny_target(), tiny_hw(), Workload(10, 4, acceptance=load_acceptance(0.5)), d2)
    assert cm.d_mm == 1192
    assert prefill_time(cm, 2, _PL) == pytest.approx((2304 + 2 * 43200 + 1024 + 37440 + 7040) * NS, rel=1e-9)


def _run_cm(gen, table=None, **hw):
    from specmoe.planner.cost_model import CostModel
    from specmoe.planner.workload import AcceptanceProfile, Workload, load_acceptance
    from tiny_specs import tiny_draft, tiny_target

    acc = AcceptanceProfile(table) if table else load_acceptance(0.5)
    cm = _tiny_cm(**hw)
    return CostModel(tiny_target(), cm.hw, Workload(10, gen, acceptance=acc), tiny_draft())


def test_a_run_whose_iteration_count_has_a_standard_deviation_of_one():
    """acc(1) = 0.5, acc(2) = 1 (the second draft is accepted whenever the first is), k = 2: T = 1 or 3
    tokens with equal odds: mean 2, variance 1. 8 tokens each: N ~ Normal(4, 8 x 1 / 2^3 = 1), stepped to
    ceil(4 + 4) = 8 iterations. Active after n: 16 P(N > n + 1/2) = 16, 15.9, 14.9, 11.1, 4.9, 1.07, 0.1,
    0.004, except that no sequence finishes before ceil(8 / 3) = 3 iterations (3 tokens at most each):
    16, 16, 16, 11, 5, 1, then none; contexts 10 + 2n up to 18.
    With 5 tokens and one sequence, N ~ Normal(2.5, 5/8): after 2 iterations exactly half a sequence is
    left (the mean): still simulated, as one sequence; after 3 only 0.1."""
    from specmoe.planner.simulator import _tokens_distribution, simulate_run

    cm = _run_cm(8, (0.0, 0.5, 1.0))
    assert _tokens_distribution(cm.workload.acceptance.acc, 2) == (2.0, 1.0)
    pl = Placement(expert_cache_slots=(1, 0))
    rr = simulate_run(cm, 16, 1, 2, pl)
    assert rr.iterations == 8.0
    assert [(g["iterations"], g["active"], g["context"]) for g in rr.groups] == [
        (1, 16, 10.0), (1, 16, 12.0), (1, 16, 14.0), (1, 11, 16.0), (1, 5, 18.0), (1, 1, 18.0)]
    one = simulate_run(_run_cm(5, (0.0, 0.5, 1.0)), 1, 1, 2, pl)
    assert one.iterations == 6.0
    assert [(g["active"], g["context"]) for g in one.groups] == [(1, 10.0), (1, 12.0), (1, 14.0)]


def test_a_run_is_stepped_in_twelve_groups_by_default():
    """k = 0, 24 tokens each: 24 iterations in 12 groups of 2, each simulated at its mid-point."""
    from specmoe.planner.simulator import simulate_run

    cm, pl = _run_cm(24), Placement(expert_cache_slots=(1, 0))
    rr = simulate_run(cm, 4, 1, 0, pl)
    assert [(g["iterations"], g["context"]) for g in rr.groups] == [(2, 10.5 + 2 * n) for n in range(12)]
    t = [simulate_iteration(cm.iteration(4, 1, 0, pl, context_len=10.5 + 2 * n), pl).iteration_time_s
         for n in range(12)]
    assert rr.decode_time_s == pytest.approx(2 * sum(t), rel=1e-12)       # each group's time twice


def test_a_run_of_one_token_prompts_fits_draft_kv_by_the_context():
    """Prompts of 1 token, 4 generated, k = 1 (alpha 0.5: active 16, 16, 10, 1 as in the by-hand run),
    contexts 1 + 1.5 n up to 5; a draft-KV budget of 2 sequences x 5 tokens = 10 token slots holds 10
    contexts of 1 token, 4 of 2.5, 2 of 4, 2 of 5 (of the 1 still active)."""
    from specmoe.planner.cost_model import CostModel
    from specmoe.planner.simulator import simulate_run
    from specmoe.planner.workload import Workload, load_acceptance
    from tiny_specs import tiny_draft, tiny_hw, tiny_target

    cm = CostModel(tiny_target(), tiny_hw(), Workload(1, 4, acceptance=load_acceptance(0.5)), tiny_draft())
    rr = simulate_run(cm, 16, 1, 1, Placement(expert_cache_slots=(1, 0), draft_kv_gpu_sequences=2))
    assert [(g["active"], g["context"], g["draft_gpu_sequences"]) for g in rr.groups] == [
        (16, 1.0, 10), (16, 2.5, 4), (10, 4.0, 2), (1, 5.0, 1)]


@pytest.mark.parametrize("fast", [False, True])
def test_a_run_simulates_each_group_with_the_runs_options(fast):
    """8 sequences in 2 micro-batches, k = 1, 4 tokens each, every draft KV on the CPU. Each group's time
    is one iteration of its configuration (active sequences, context: checked by hand above) simulated with
    the run's options; by default the paper's schedule (none of them), and each option changes the run
    where it matters (prefetch where the copies bind)."""
    from dataclasses import replace

    from specmoe.planner.simulator import simulate_run

    kw = dict(gpu_TFLOPs=0.01, hbm_GBps=10.0, cpu_fast=True) if fast else {}
    cm = _run_cm(4, **kw)
    pl = Placement(expert_cache_slots=(1, 0))
    options = [("prefetch",)] if fast else [("overlap_draft",), ("batched_moe",), ("batched_layer",)]
    base = simulate_run(cm, 8, 2, 1, pl)
    for opts in [()] + options:
        o = {k: True for k in opts}
        rr = simulate_run(cm, 8, 2, 1, pl, **o)
        want = []
        for g in rr.groups:
            p = replace(pl, draft_kv_gpu_sequences=g["draft_gpu_sequences"])
            c = cm.iteration(g["active"], min(2, g["active"]), 1, p, context_len=g["context"],
                             batched_moe=o.get("batched_moe", False), batched_layer=o.get("batched_layer", False),
                             draft_groups="micro_batch" if o.get("overlap_draft") else "batch")
            want.append(simulate_iteration(c, p, overlap_draft=o.get("overlap_draft", False),
                                           prefetch=o.get("prefetch", False)).iteration_time_s)
        assert [g["iteration_time_s"] for g in rr.groups] == pytest.approx(want, rel=1e-12), opts
        assert rr.decode_time_s == pytest.approx(sum(w * g["iterations"] for w, g in zip(want, rr.groups)), rel=1e-12)
        if opts:
            assert rr.decode_time_s != pytest.approx(base.decode_time_s, rel=1e-4), opts


def test_prefill_of_a_one_expert_target_reads_the_gemm_rate_at_every_token():
    """One expert, top-1 (router 8 x 1): every token of the 20-token chunk goes to the expert, M = 20 rows
    (4 GFLOP/s on the curve of the test above), not 10. Per layer: pre 5120 / 4 = 1280, attention 640,
    post (o 64 + router 8) 2 x 20 x 72 / 4 = 720, expert 2 x 20 x 384 / 4 = 3840: 6480; the uncached expert
    (768 bytes) streams in 768 ns; LM head 1024; no draft: 768 + 2 x 6480 + 1024."""
    from specmoe.planner.cost_model import CostModel
    from specmoe.planner.hardware_spec import parse_hardware
    from specmoe.planner.model_spec import ModelSpec
    from specmoe.planner.simulator import prefill_time
    from specmoe.planner.workload import Workload, load_acceptance
    from tiny_specs import TINY_HW, TINY_TARGET

    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY_HW.items()}
    raw["gpu"].update(peak_TFLOPs={"bf16": 1.0})
    raw["measured"] = {"source": "test", "gpu_gemm_TFLOPs_by_M": {2: 0.001, 10: 0.002, 20: 0.004}}
    one = ModelSpec.from_hf_config(dict(TINY_TARGET, num_local_experts=1, num_experts_per_tok=1), name="tiny-1e")
    cm = CostModel(one, parse_hardware(raw, "tiny.yaml"), Workload(10, 4, acceptance=load_acceptance(0.0)))
    assert prefill_time(cm, 2, Placement(expert_cache_slots=(0, 0))) == pytest.approx(
        (768 + 2 * 6480 + 1024) * NS, rel=1e-9)


def test_a_one_token_output_still_takes_one_decode_iteration():
    """gen_len 1 at k = 4 and acceptance 0.9: every sequence finishes in its first iteration, which all 16
    run together, so decode is exactly one full-batch iteration and 16 tokens (the normal approximation
    puts under half a sequence at that first iteration's mid-point; it must not skip it)."""
    from specmoe.planner.cost_model import CostModel
    from specmoe.planner.hardware_spec import parse_hardware
    from specmoe.planner.simulator import simulate_run
    from specmoe.planner.workload import Workload, load_acceptance
    from tiny_specs import TINY_HW, tiny_draft, tiny_target

    cm = CostModel(tiny_target(), parse_hardware(TINY_HW, "tiny.yaml"), Workload(10, 1, acceptance=load_acceptance(0.9)),
                   tiny_draft())
    pl = Placement(expert_cache_slots=(1, 0), draft_kv_gpu_sequences=16, target_kv_gpu_sequences=2)
    rr = simulate_run(cm, 16, 2, 4, pl)
    p = Placement(expert_cache_slots=(1, 0), draft_kv_gpu_sequences=16, target_kv_gpu_sequences=2)
    t = simulate_iteration(cm.iteration(16, 2, 4, p, context_len=10.0), p).iteration_time_s
    assert [(g["iterations"], g["active"]) for g in rr.groups] == [(1, 16)]
    assert rr.decode_time_s == pytest.approx(t, rel=1e-12)
    assert rr.decode_tokens_per_s == pytest.approx(16 / t, rel=1e-12)


def test_prefill_passes_hold_whole_prompts_only():
    """Prompts of 10 tokens and passes of at most 25 tokens hold 2 whole prompts each, exactly as passes of
    at most 20 do: 5 prompts take 3 passes either way (a pass of 25 tokens would split a prompt and take 2)."""
    from specmoe.planner.simulator import prefill_time

    cm = _tiny_cm(gpu_TFLOPs=1000.0, hbm_GBps=1.0)
    for batch in (2, 5, 7):
        assert prefill_time(cm, batch, _PL, chunk_tokens=25) == pytest.approx(
            prefill_time(cm, batch, _PL, chunk_tokens=20), rel=1e-12), batch
    assert prefill_time(cm, 5, _PL, chunk_tokens=20) > prefill_time(cm, 5, _PL, chunk_tokens=30)  # 3 passes vs 2
