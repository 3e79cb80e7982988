"""Checks written for mutants of planner/simulator.py that survived scripts/mutation_check.sh: small
synthetic iterations whose schedule is worked out by hand from the event rules in the simulator's module
docstring (list scheduling, creation order as priority, each resource one event at a time; on shared host
DRAM the rates of planner/event_dag.py). Times are whole seconds (or tenths) so every start and end can be
followed on paper; the measured iteration is the second one, with times relative to the end of the first."""
from __future__ import annotations

import numpy as np
import pytest

from specmoe.planner.iteration_costs import IterationCosts
from specmoe.planner.plan import Placement
from specmoe.planner.shared_dram import SharedDram
from specmoe.planner.simulator import SimResult, simulate_iteration


def _costs(L, M, *, pre=0.0, attn_cpu=0.0, attn_gpu=0.0, kv_h2d=0.0, post=0.0, moe_gpu=0.0, moe_cpu=0.0,
           h2d=0.0, lm=0.0, ver=0.0, draft_gpu=None, draft_cpu_attn=None, draft_cpu_gpu=None, shared=None,
           serial=False, batched_moe=False, batched_layer=False, other=0.0):
    """IterationCosts of L layers and M micro-batches; a per-layer stage may be given as an [L, M] array
    (or anything numpy broadcasts to it), h2d as [L], the draft as [G, K] arrays (default: no draft)."""
    def lm_(v):
        return np.broadcast_to(np.asarray(v, dtype=float), (L, M)).copy()

    dg = np.zeros((1, 0)) if draft_gpu is None else np.asarray(draft_gpu, dtype=float)
    K = dg.shape[1]
    dca = np.zeros_like(dg) if draft_cpu_attn is None else np.asarray(draft_cpu_attn, dtype=float)
    dcg = np.zeros_like(dg) if draft_cpu_gpu is None else np.asarray(draft_cpu_gpu, dtype=float)
    return IterationCosts(
        batch=M, micro_batches=M, draft_len=K, context_len=1.0, mb_sizes=np.ones(M, int), tokens=M * (K + 1),
        tokens_per_iteration=float(M), batched_moe=batched_moe, pre_s=lm_(pre), attn_cpu_s=lm_(attn_cpu),
        attn_gpu_s=lm_(attn_gpu), kv_h2d_s=lm_(kv_h2d), post_s=lm_(post), moe_gpu_s=lm_(moe_gpu),
        moe_cpu_s=lm_(moe_cpu), h2d_s=np.broadcast_to(np.asarray(h2d, dtype=float), (L,)).copy(),
        lm_head_s=np.full(M, float(lm)), verify_s=np.full(M, float(ver)), draft_group_sizes=np.array([M] * dg.shape[0]),
        draft_gpu_s=dg, draft_cpu_attn_s=dca, draft_cpu_gpu_s=dcg, touched=0.0, h2d_s_per_uncached_expert=0.0,
        cpu_expert_s_per_uncached_expert=0.0, moe_gpu_full_s=0.0, cpu_attn_s_per_seq=np.zeros(L),
        gpu_attn_s_per_seq=np.zeros(L), moe_flops_gpu=0.0, gpu_peak_flops=1.0, serial=serial,
        batched_layer=batched_layer, other_s=other, shared_dram=shared)


def _pl(L, buffers=2):
    return Placement(expert_cache_slots=(0,) * L, streaming_buffers=buffers)


def _events(r, stage, resource=None):
    """(start, end, layer, micro_batch) of the timeline's events of one stage (and resource), in start order."""
    return sorted((e["start_s"], e["end_s"], e["layer"], e["micro_batch"]) for e in r.timeline
                  if e["stage"] == stage and (resource is None or e["resource"] == resource))


def test_a_result_built_without_a_timeline_has_an_empty_one():
    a = SimResult(1.0, {"iteration": 1.0}, {"gpu": 1.0, "cpu": 0.0, "pcie": 0.0})
    b = SimResult(2.0, {"iteration": 2.0}, {"gpu": 2.0, "cpu": 0.0, "pcie": 0.0})
    assert a.timeline == [] and a.timeline is not b.timeline and a.bound == "gpu"


def test_a_copy_slows_cpu_attention_by_its_stretch_at_full_pressure():
    """One layer, one micro-batch: CPU attention (2 s alone; stretch 2, pressure 0.5) and the layer's expert
    copy (4 s alone; 3x slower beside a CPU event of pressure 1) both start when the iteration does.
    Together the attention runs 1 + (2 - 1) x 1 = 2x slower (a copy reads at the full rate, pressure 1) and
    the copy 1 + (3 - 1) x 0.5 = 2x slower: attention [0, 4] (2 s of its work), the copy's 2 s of work done
    by then, its last 2 s alone [4, 6]; the MoE (1 s) after it [6, 7]. shared_dram.py's pair formula says
    the same: max(2 + (1 - 1/2) 2 x 4, 4 + (1 - 1/2) 2 x 2) = 6."""
    sd = SharedDram(attn_cpu=(2.0, 0.5), moe_cpu=(1.0, 0.0), draft_cpu=(), pcie_stretch=3.0)
    c = _costs(1, 1, attn_cpu=2.0, moe_gpu=1.0, h2d=4.0, shared=sd)
    r = simulate_iteration(c, _pl(1))
    assert r.iteration_time_s == pytest.approx(7.0)
    assert _events(r, "target.attention") == [pytest.approx((0.0, 4.0, 0, 0))]
    assert _events(r, "target.h2d") == [pytest.approx((0.0, 6.0, 0, -1))]
    assert r.stages["target.attention"] == pytest.approx(4.0) and r.stages["target.h2d"] == pytest.approx(6.0)


def test_a_prefetched_copy_and_a_draft_step_slow_each_other_by_the_steps_share():
    """One streaming buffer, prefetch: the next iteration's copy (2 s alone) starts when this iteration's
    MoE frees the buffer, beside the draft's CPU attention (3 s alone; the step's share: stretch 2, pressure
    0.5). First iteration: copy [0, 2], MoE [2, 3], draft attention from 3 with the next copy: each 2x
    slower (1 + (2 - 1) x 1 and 1 + (3 - 1) x 0.5), so the copy ends at 7 (-5 to -1 relative to the end of
    the first iteration) having done 2 s, the draft 2 s of its 3: its last 1 s alone [7, 8]. Second
    iteration from 8: MoE [8, 9], draft attention alone [9, 12]: period 4."""
    sd = SharedDram(attn_cpu=(1.0, 0.0), moe_cpu=(1.0, 0.0), draft_cpu=((2.0, 0.5),), pcie_stretch=3.0)
    c = _costs(1, 1, moe_gpu=1.0, h2d=2.0, draft_gpu=[[0.0]], draft_cpu_attn=[[3.0]], shared=sd)
    r = simulate_iteration(c, _pl(1, buffers=1), prefetch=True)
    assert r.iteration_time_s == pytest.approx(4.0)
    assert _events(r, "target.h2d") == [pytest.approx((-5.0, -1.0, 0, -1))]
    assert _events(r, "draft.cpu", "cpu") == [pytest.approx((1.0, 4.0, -1, 0))]
    assert r.stages["target.h2d"] == pytest.approx(4.0) and r.stages["draft.cpu"] == pytest.approx(3.0)


def test_without_cpu_attention_a_micro_batch_does_not_wait_for_the_busy_cpu():
    """Every KV on the GPU (no CPU attention); the layer's experts all run on the CPU (10 s per micro-batch).
    Micro-batch 0: pre [0, 1], GPU attention [1, 2], post [2, 3], CPU experts [3, 13]; micro-batch 1: pre
    [3, 4], attention [4, 5], post [5, 6] (nothing of it waits for the CPU), its experts once the CPU is free
    [13, 23]: period 23 = 3 + 2 x 10."""
    c = _costs(1, 2, pre=1.0, attn_gpu=1.0, post=1.0, moe_cpu=10.0)
    r = simulate_iteration(c, _pl(1))
    assert r.iteration_time_s == pytest.approx(23.0)
    assert _events(r, "target.post_attn") == [pytest.approx((2.0, 3.0, 0, 0)), pytest.approx((5.0, 6.0, 0, 1))]
    assert _events(r, "target.moe", "cpu") == [pytest.approx((3.0, 13.0, 0, 0)), pytest.approx((13.0, 23.0, 0, 1))]
    assert r.resource_busy_s == pytest.approx({"gpu": 6.0, "cpu": 20.0, "pcie": 0.0})


def test_gpu_attention_over_gpu_kv_does_not_wait_for_the_copy_engine():
    """Attention on the GPU over KV that is already there (no KV copy) while the layer's experts stream
    (5 s): pre [0, 1], attention [1, 2], post [2, 3], then the MoE waits for the copy [5, 6]: period 6."""
    c = _costs(1, 1, pre=1.0, attn_gpu=1.0, post=1.0, moe_gpu=1.0, h2d=5.0)
    r = simulate_iteration(c, _pl(1))
    assert r.iteration_time_s == pytest.approx(6.0)
    assert _events(r, "target.attention") == [pytest.approx((1.0, 2.0, 0, 0))]
    assert _events(r, "target.moe") == [pytest.approx((5.0, 6.0, 0, 0))]
    assert r.resource_busy_s["pcie"] == pytest.approx(5.0)


U = 0.1      # tenths of a second: KV copies shorter than a second must be simulated too


@pytest.mark.parametrize("shared", [False, True])
def test_host_kv_streamed_for_gpu_attention_by_hand(shared):
    """Micro-batch 0 attends on the CPU (2U alone; stretch 2, pressure 0.5), micro-batch 1 on the GPU after
    its host KV is copied (2U alone; 3x slower beside a CPU event of pressure 1); every expert cached.
    pre(0) [0, 1U], CPU attention(0) from 1U; pre(1) [1U, 2U], KV copy(1) from 2U.
    Without shared DRAM: attention(0) [1U, 3U], copy [2U, 4U], post(0) [3U, 4U], MoE(0) [4U, 5U], then
    attention(1) [5U, 6U], post(1) [6U, 7U], MoE(1) [7U, 8U]: period 8U.
    Shared: attention(0) alone 1U, then both 2x slower (1 + (2-1) x 1, 1 + (3-1) x 0.5): attention(0) ends
    at 4U, the copy has 1U of its 2U done and ends alone at 5U; post(0) [4U, 5U], MoE(0) [5U, 6U],
    attention(1) [6U, 7U], post(1), MoE(1): period 9U. The copy is micro-batch 1's, an H2D stage."""
    sd = SharedDram(attn_cpu=(2.0, 0.5), moe_cpu=(1.0, 0.0), draft_cpu=(), pcie_stretch=3.0) if shared else None
    c = _costs(1, 2, pre=U, attn_cpu=[[2 * U, 0.0]], attn_gpu=[[0.0, U]], kv_h2d=[[0.0, 2 * U]], post=U,
               moe_gpu=U, shared=sd)
    r = simulate_iteration(c, _pl(1))
    copy_end, att0_end = (5 * U, 4 * U) if shared else (4 * U, 3 * U)
    assert r.iteration_time_s == pytest.approx(9 * U if shared else 8 * U)
    assert _events(r, "target.h2d") == [pytest.approx((2 * U, copy_end, 0, 1))]
    assert _events(r, "target.attention") == [pytest.approx((U, att0_end, 0, 0)),
                                              pytest.approx((copy_end + U, copy_end + 2 * U, 0, 1))]
    assert r.stages["target.h2d"] == pytest.approx(copy_end - 2 * U)
    assert r.resource_busy_s["pcie"] == pytest.approx(copy_end - 2 * U)


def test_a_cached_layer_holds_no_streaming_buffer():
    """One streaming buffer; layers 0 and 2 stream (1 s, 5 s), layer 1 is cached. Each layer: pre 1,
    CPU attention 1, post 1, MoE 1 in series: layer 0 [0, 4], layer 1 [4, 8], layer 2 [8, 12]. Layer 2's
    copy needs the buffer layer 0's MoE frees at 4 (layer 1 holds none): [4, 9], before its MoE at 11:
    period 12. The copies serve every micro-batch: micro_batch -1."""
    c = _costs(3, 1, pre=1.0, attn_cpu=1.0, post=1.0, moe_gpu=1.0, h2d=[1.0, 0.0, 5.0])
    r = simulate_iteration(c, _pl(3, buffers=1))
    assert r.iteration_time_s == pytest.approx(12.0)
    assert _events(r, "target.h2d") == [pytest.approx((0.0, 1.0, 0, -1)), pytest.approx((4.0, 9.0, 2, -1))]
    assert _events(r, "target.moe")[-1] == pytest.approx((11.0, 12.0, 2, 0))


def test_double_buffering_makes_a_prefetched_copy_wait_for_its_buffer():
    """Two layers, two streaming buffers, prefetch; copies 4 s and 1 s, MoE 3 s, nothing else. First
    iteration: copies [0, 4], [4, 5]; MoE 0 [4, 7], MoE 1 [7, 10]. The next iteration's layer-0 copy
    reuses layer 0's buffer, free at 7 (not at 5, when the copy engine is): [7, 11] (-3 to 1), so its MoE 0
    is [11, 14] (1 to 4) and MoE 1 (its copy [11, 12]) [14, 17]: period 7."""
    c = _costs(2, 1, moe_gpu=3.0, h2d=[4.0, 1.0])
    r = simulate_iteration(c, _pl(2), prefetch=True)
    assert r.iteration_time_s == pytest.approx(7.0)
    assert _events(r, "target.h2d") == [pytest.approx((-3.0, 1.0, 0, -1)), pytest.approx((1.0, 2.0, 1, -1))]
    assert _events(r, "target.moe") == [pytest.approx((1.0, 4.0, 0, 0)), pytest.approx((4.0, 7.0, 1, 0))]


def test_a_layer_without_routed_experts_still_orders_the_next_layer():
    """A leading dense layer (no MoE time at all) then a MoE layer, one micro-batch, nothing streamed:
    every event waits for the previous one: 3 + 4 = 7 s."""
    c = _costs(2, 1, pre=1.0, attn_cpu=1.0, post=1.0, moe_gpu=[[0.0], [1.0]])
    r = simulate_iteration(c, _pl(2))
    assert r.iteration_time_s == pytest.approx(7.0)
    assert _events(r, "target.pre_attn") == [pytest.approx((0.0, 1.0, 0, 0)), pytest.approx((3.0, 4.0, 1, 0))]


def test_a_layer_without_cpu_experts_does_not_wait_for_the_busy_cpu():
    """Two micro-batches whose CPU attention (10 s each) keeps the CPU busy; the MoE is on the GPU only.
    CPU: attention(0,0) [1, 11], (0,1) [11, 21], (1,0) [21, 31], (1,1) [31, 41], back to back once pre(0,0)
    [0, 1] is done; micro-batch 0 passes layer 0 (post [11, 12], MoE [12, 13]) and pre(1,0) [13, 14] without
    waiting for the CPU; after the last attention, post and MoE [41, 43]: period 1 + 40 + 2 = 43."""
    c = _costs(2, 2, pre=1.0, attn_cpu=10.0, post=1.0, moe_gpu=1.0)
    r = simulate_iteration(c, _pl(2))
    assert r.iteration_time_s == pytest.approx(43.0)
    assert _events(r, "target.pre_attn")[2] == pytest.approx((13.0, 14.0, 1, 0))
    assert _events(r, "target.attention") == [pytest.approx((1.0 + 10 * n, 11.0 + 10 * n, n // 2, n % 2))
                                              for n in range(4)]


# ---- prefill, by hand on the tiny target and draft (tests/tiny_specs.py) ----
NS = 1e-9


def _tiny_cm(gpu_TFLOPs=0.001, hbm_GBps=1.0, d2h_GBps=None, shares_host_cpu=False, draft=True, cpu_fast=False):
    from specmoe.planner.cost_model import CostModel
    from specmoe.planner.hardware_spec import parse_hardware
    from specmoe.planner.workload import Workload, load_acceptance
    from tiny_specs import TINY_HW, tiny_draft, tiny_target

    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY_HW.items()}
    raw["gpu"].update(peak_TFLOPs={"bf16": gpu_TFLOPs}, hbm_GBps=hbm_GBps, shares_host_cpu=shares_host_cpu)
    if d2h_GBps is not None:
        raw["link"]["d2h_GBps"] = d2h_GBps
    if cpu_fast:
        raw["cpu"].update(peak_TFLOPs={"bf16": 1.0}, dram_GBps=1000.0)
    wl = Workload(10, 4, acceptance=load_acceptance(0.5))         # prompts of 10 tokens
    return CostModel(tiny_target(), parse_hardware(raw, "tiny.yaml"), wl, tiny_draft() if draft else None)


# Two prompts of 10 tokens: T = 20 tokens in one chunk. Per target layer on the tiny machine's GPU
# (1 GFLOP/s, 1 GB/s: max(flops, bytes) ns):
#   pre_attn   q,k,v 128 weights: 2 x 20 x 128 = 5120 flops (256 bytes)           5120 ns
#   attention  causal: 2 x 2 seqs x 4 heads x e_h 4 x (10 x 11 / 2) = 3520 flops;
#              K and V of 20 tokens read and written, 2 x 20 x 16 bytes = 640      3520 ns
#   post_attn  o 64 + router 32 weights: 2 x 20 x 96 = 3840 flops                  3840 ns
#   MoE        2 x 20 tokens x top-2 x 384 = 30720 flops; all 4 experts' 3072 bytes 30720 ns
#   GPU        43200 ns; new KV to the host (D2H): 20 x 16 bytes = 320 bytes
#   H2D        the uncached experts of 768 bytes: slots (1, 0): 3 x 768 = 2304, 4 x 768 = 3072 bytes
# LM head of the 2 last tokens: 2 x 2 x 32 x 8 = 1024 flops (512 bytes of weights)      1024 ns
# draft (728 multiplied weights less its LM head's 32 x 8 = 256: its prefill fills its KV and computes no
# logits; 1 layer of 4 heads, e_h 4, 32 KV bytes per token):
#   GEMMs 2 x 20 x 472 = 18880 flops; attention 2 x 1 x 2 x 4 x 4 x 55 = 3520 flops    22400 ns
_PL = Placement(expert_cache_slots=(1, 0))
_TAIL_NS = 1024 + 18880 + 3520


def test_prefill_on_a_slow_gpu_by_hand():
    """GPU-bound: the first layer's copy (2304 ns), then per layer the GPU's 43200 ns hides the next
    copy and the D2H: 2304 + 2 x 43200 + LM head + draft."""
    from specmoe.planner.simulator import prefill_time

    assert prefill_time(_tiny_cm(), 2, _PL) == pytest.approx((2304 + 2 * 43200 + _TAIL_NS) * NS, rel=1e-12)
    # chunks of 8 tokens: 3 chunks re-read the weights (still compute-bound), nothing else changes
    assert prefill_time(_tiny_cm(), 2, _PL, chunk_tokens=8) == pytest.approx((2304 + 2 * 43200 + _TAIL_NS) * NS,
                                                                           rel=1e-12)
    # no draft: no draft prefill
    assert prefill_time(_tiny_cm(draft=False), 2, _PL) == pytest.approx((2304 + 2 * 43200 + 1024) * NS, rel=1e-12)


def test_prefill_on_a_fast_gpu_is_copy_bound_by_hand():
    """A GPU 1000x faster (1 TFLOP/s, 1000 GB/s): every GPU time / 1000. Layer 0 waits for its copy
    (2304 ns), then streams layer 1's (3072 ns) while it computes; layer 1 then waits for its D2H:
    320 ns at 1 GB/s (3200 ns at 0.1 GB/s, longer than the copy as well)."""
    from specmoe.planner.simulator import prefill_time

    tail = _TAIL_NS / 1000
    fast = prefill_time(_tiny_cm(gpu_TFLOPs=1.0, hbm_GBps=1000.0), 2, _PL)
    assert fast == pytest.approx((2304 + 3072 + 320 + tail) * NS, rel=1e-12)
    slow_d2h = prefill_time(_tiny_cm(gpu_TFLOPs=1.0, hbm_GBps=1000.0, d2h_GBps=0.1), 2, _PL)
    assert slow_d2h == pytest.approx((2304 + 3200 + 3200 + tail) * NS, rel=1e-12)
    # every expert cached: nothing to stream, the D2H of each layer remains
    cached = prefill_time(_tiny_cm(gpu_TFLOPs=1.0, hbm_GBps=1000.0), 2, Placement(expert_cache_slots=(4, 4)))
    assert cached == pytest.approx((2 * 320 + tail) * NS, rel=1e-12)


def test_prefill_where_the_cpu_stands_in_takes_everything_in_turn():
    """shares_host_cpu: nothing overlaps (the docstring's plain sum). Every expert cached (as memory.py's
    placement does there: nothing streams), each layer's GPU work and its D2H in turn: 2 x (43200 + 320)."""
    from specmoe.planner.simulator import prefill_time

    t = prefill_time(_tiny_cm(shares_host_cpu=True), 2, Placement(expert_cache_slots=(4, 4)))
    assert t == pytest.approx((2 * (43200 + 320) + _TAIL_NS) * NS, rel=1e-12)


def test_tokens_gained_per_iteration_by_hand():
    """alpha = 0.5, k = 2: acc(1) = 0.5, acc(2) = 0.75, so P(T >= 2) = 0.5, P(T >= 3) = 0.25: T is 1, 2, 3
    with probabilities 0.5, 0.25, 0.25: mean 1.75, E[T^2] = 0.5 + 1 + 2.25 = 3.75, variance 0.6875."""
    from specmoe.planner.simulator import _tokens_distribution
    from specmoe.planner.workload import load_acceptance

    acc = load_acceptance(0.5).acc
    assert _tokens_distribution(acc, 2) == pytest.approx((1.75, 0.6875))
    assert _tokens_distribution(acc, 1) == pytest.approx((1.5, 0.25))        # Bernoulli(0.5) + 1
    assert _tokens_distribution(acc, 0) == (1.0, 0.0)


# ---- what the timeline names, and the iteration's other parts ----
def _labels(r):
    from collections import Counter

    return Counter((e["stage"], e["resource"], e["layer"], e["micro_batch"]) for e in r.timeline)


@pytest.mark.parametrize("schedule", ["per_micro_batch", "batched_moe", "batched_layer"])
def test_every_event_is_named_by_its_stage_resource_layer_and_micro_batch(schedule):
    """Two layers, two micro-batches, a draft of 2 steps with a GPU and a CPU part; micro-batch 1 also
    attends on the GPU over copied host KV; layer 1's cold experts run on the CPU. One timeline entry per
    event of the measured iteration: per-layer work under its layer, work over every micro-batch (expert
    copies, a batched MoE or pre/post) under micro-batch -1, LM head, acceptance and draft under layer -1."""
    bm, bl = schedule != "per_micro_batch", schedule == "batched_layer"
    col0 = [[1.0, 0.0]] * 2
    c = _costs(2, 2, pre=col0 if bl else 1.0, attn_cpu=1.0, attn_gpu=[[0.0, 1.0]], kv_h2d=[[0.0, 1.0]],
               post=col0 if bl else 1.0, moe_gpu=col0 if bm else 1.0,
               moe_cpu=[[0.0, 0.0], [1.0, 0.0 if bm else 1.0]], h2d=1.0, lm=1.0, ver=1.0,
               draft_gpu=[[1.0, 1.0]], draft_cpu_attn=[[1.0, 1.0]], draft_cpu_gpu=[[1.0, 1.0]],
               batched_moe=bm, batched_layer=bl)
    want = {}
    for i in (0, 1):
        want[("target.h2d", "pcie", i, -1)] = 1
        for j in (0, 1):
            want[("target.attention", "cpu", i, j)] = 1
        want[("target.h2d", "pcie", i, 1)] = 1                      # micro-batch 1's host KV
        want[("target.attention", "gpu", i, 1)] = 1
        for st in ("target.pre_attn", "target.post_attn"):
            for j in ((-1,) if bl else (0, 1)):
                want[(st, "gpu", i, j)] = 1
        for j in ((-1,) if bm else (0, 1)):
            want[("target.moe", "gpu", i, j)] = 1
            if i == 1:
                want[("target.moe", "cpu", i, j)] = 1
    for j in (0, 1):
        want[("target.lm_head", "gpu", -1, j)] = 1
        want[("verify.accept", "gpu", -1, j)] = 1
    want[("draft.gpu", "gpu", -1, 0)] = 2
    want[("draft.cpu", "cpu", -1, 0)] = 2
    want[("draft.cpu", "gpu", -1, 0)] = 2
    r = simulate_iteration(c, _pl(2))
    assert dict(_labels(r)) == want
    for post in _events(r, "target.post_attn"):            # after the attention of its layer (and micro-batch)
        assert all(a[1] <= post[0] + 1e-12 for a in _events(r, "target.attention")
                   if a[2] == post[2] and post[3] in (-1, a[3]))


def test_the_timeline_lists_only_events_that_take_time():
    """The by-hand iteration of test_gpu_attention_over_gpu_kv... with an LM head and acceptance of 0 s:
    pre, attention, post, MoE and the copy are listed, the 0-second events are not; the period is
    unchanged, and the engine's fixed time outside every stage (other_s, 0.5 s) adds to it."""
    c = _costs(1, 1, pre=1.0, attn_gpu=1.0, post=1.0, moe_gpu=1.0, h2d=5.0, other=0.5)
    r = simulate_iteration(c, _pl(1))
    assert r.iteration_time_s == pytest.approx(6.5) and r.stages["iteration"] == pytest.approx(6.5)
    assert sorted(e["stage"] for e in r.timeline) == ["target.attention", "target.h2d", "target.moe",
                                                      "target.post_attn", "target.pre_attn"]
    assert r.stages["target.lm_head"] == 0.0 and r.stages["verify.accept"] == 0.0
    assert r.resource_busy_s == pytest.approx({"gpu": 4.0, "cpu": 0.0, "pcie": 5.0})
    assert not simulate_iteration(c, _pl(1), record=False).timeline


def test_overlapped_micro_batches_start_the_next_iteration_on_their_own_verification():
    """overlap_draft without a draft: micro-batch 0 attends on the GPU (pre, attention, post, MoE, 1 s
    each, then acceptance 1 s), micro-batch 1 on the CPU for 6 s. First iteration: micro-batch 0 [0, 4],
    pre(1) [4, 5], its CPU attention [5, 11], acceptance(0) [5, 6]. Micro-batch 0 goes on at once: its
    next pass [6, 10], acceptance [10, 11] (-4 to -3 from the end of the first iteration); micro-batch 1's
    post, MoE, acceptance [11, 14] end the first iteration, its next pass [14, 24] (acceptance 9 to 10):
    period 10 (micro-batch 1's chain). In the paper's order (the LM heads after the whole batch, the next
    iteration after every acceptance) nothing overlaps: 4 + 1 + 6 + 2 + 2 x 1 = 15."""
    c = _costs(1, 2, pre=1.0, attn_gpu=[[1.0, 0.0]], attn_cpu=[[0.0, 6.0]], post=1.0, moe_gpu=1.0, ver=1.0)
    r = simulate_iteration(c, _pl(1), overlap_draft=True)
    assert r.iteration_time_s == pytest.approx(10.0)
    assert _events(r, "verify.accept") == [pytest.approx((-4.0, -3.0, -1, 0)), pytest.approx((9.0, 10.0, -1, 1))]
    assert simulate_iteration(c, _pl(1)).iteration_time_s == pytest.approx(15.0)     # the paper's order


def test_overlapped_draft_groups_each_wait_for_their_own_micro_batch():
    """As above with one 1-s GPU draft step per micro-batch (draft groups = micro-batches). First
    iteration: micro-batch 0 [0, 4], its acceptance [5, 6] and draft [6, 7] while micro-batch 1 attends on
    the CPU [5, 11]; micro-batch 0's next pass [7, 11] at once. Then older work first (creation order):
    micro-batch 1's post, MoE, acceptance, draft [11, 15] end the first iteration; its next pre [15, 16]
    (created before micro-batch 0's LM head), micro-batch 0's acceptance [16, 17] and draft [17, 18]
    (2 to 3), micro-batch 1's CPU attention [16, 22], post, MoE, acceptance, draft [22, 26] (10 to 11):
    period 11. In the paper's order: 15 as above, then both drafts: 17."""
    c = _costs(1, 2, pre=1.0, attn_gpu=[[1.0, 0.0]], attn_cpu=[[0.0, 6.0]], post=1.0, moe_gpu=1.0, ver=1.0,
               draft_gpu=[[1.0], [1.0]])
    r = simulate_iteration(c, _pl(1), overlap_draft=True)
    assert r.iteration_time_s == pytest.approx(11.0)
    assert _events(r, "draft.gpu") == [pytest.approx((2.0, 3.0, -1, 0)), pytest.approx((10.0, 11.0, -1, 1))]
    assert simulate_iteration(c, _pl(1)).iteration_time_s == pytest.approx(17.0)


# ---- a whole run ----
def test_a_whole_run_by_hand():
    """Tiny target and draft, 16 prompts of 10 tokens, 4 generated each, k = 1 at alpha = 0.5: a sequence
    gains T = 1 or 2 tokens per iteration (mean mu = 1.5, variance 0.25), so it needs about
    Normal(4 / 1.5, 4 x 0.25 / 1.5^3) = N(2.667, 0.544^2) iterations; the run is stepped to
    ceil(2.667 + 4 x 0.544) = 5 iterations, one group each (fewer than 12). After n iterations
    16 x P(N > n + 1/2) sequences are active: 16, 15.7, 9.9, 1.0, 0.006 (none: skipped); the context is
    10 + 1.5 n, at most 14; the draft KV budget of 4 sequences x 14 tokens = 56 holds 56 // context
    sequences (5, 4, 4, 4, at most the active ones); at most as many micro-batches and GPU-KV sequences
    as active sequences. Each group is one iteration of that configuration."""
    from scipy.stats import norm

    from specmoe.planner.simulator import prefill_time, simulate_run

    cm = _tiny_cm()
    pl = Placement(expert_cache_slots=(1, 0), draft_kv_gpu_sequences=4, target_kv_gpu_sequences=2)
    sd = (4 * 0.25 / 1.5 ** 3) ** 0.5
    assert [16 * norm.sf(n + 0.5, 4 / 1.5, sd) for n in range(5)] == pytest.approx(
        [16.0, 15.74, 9.92, 1.006, 0.006], abs=0.01)
    want = [(16, 10.0, 5), (16, 11.5, 4), (10, 13.0, 4), (1, 14.0, 1)]
    rr = simulate_run(cm, 16, 2, 1, pl)
    assert [(g["iterations"], g["active"], g["context"], g["draft_gpu_sequences"]) for g in rr.groups] == \
        [(1, B, ctx, g) for B, ctx, g in want]
    t = []
    for B, ctx, g in want:
        p = Placement(expert_cache_slots=(1, 0), draft_kv_gpu_sequences=g, target_kv_gpu_sequences=min(2, B))
        t.append(simulate_iteration(cm.iteration(B, min(2, B), 1, p, context_len=ctx), p).iteration_time_s)
    assert [g["iteration_time_s"] for g in rr.groups] == pytest.approx(t, rel=1e-12)
    assert rr.iterations == 5.0 and rr.generated_tokens == 64
    assert rr.decode_time_s == pytest.approx(sum(t), rel=1e-12)
    assert rr.prefill_time_s == pytest.approx(prefill_time(cm, 16, pl), rel=1e-12)
    assert rr.decode_tokens_per_s == pytest.approx(64 / sum(t), rel=1e-12)
    assert rr.end_to_end_tokens_per_s == pytest.approx(64 / (sum(t) + rr.prefill_time_s), rel=1e-12)
