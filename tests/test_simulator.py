"""The event simulator: exact on the hand-worked tiny config, equal to the sum of stages when nothing
can overlap, tending to the bare max when balanced, always between the closed-form bounds."""
from __future__ import annotations

import random
from collections import defaultdict

import numpy as np
import pytest

from specmoe.planner.cost_model import CostModel, IterationCosts
from specmoe.planner.hardware_spec import HardwareSpec
from specmoe.planner.memory import default_placement
from specmoe.planner.model_spec import ModelSpec
from specmoe.planner.plan import Placement
from specmoe.planner.simulator import Dag, evaluate_config, prefill_time, simulate_iteration, simulate_run
from specmoe.planner.stages import Stage
from specmoe.planner.workload import Workload, load_acceptance
from tiny_specs import tiny_draft, tiny_hw, tiny_target

NS = 1e-9


def _tiny(slots=(1, 0), draft_gpu=1):
    cm = CostModel(tiny_target(), tiny_hw(), Workload(10, 4, acceptance=load_acceptance(0.5)), tiny_draft())
    pl = Placement(expert_cache_slots=slots, draft_kv_gpu_sequences=draft_gpu)
    return cm, pl


def test_tiny_iteration_by_hand():
    """Stage times from test_cost_model.test_tiny_config_by_hand (ns), m = 1:
    pcie: h2d0 [0, 2160], h2d1 [2160, 5040] (double buffering: no wait for a buffer yet)
    gpu/cpu, layer 0: pre [0, 1024], attn (cpu) [1024, 2496], post [2496, 3264], moe [3264, 9408]
    layer 1: pre [9408, 10432], attn [10432, 11904], post [11904, 12672], moe [12672, 18816]
    lm_head [18816, 20864], verify [20864, 21376]
    draft: draft.gpu on the GPU [21376, 24100]; draft.cpu attention on the CPU [21376, 21916],
    its GEMMs wait for the GPU: [24100, 26284]. The next iteration (and its first H2D) starts at
    26284 and repeats the same pattern: period 26284 ns."""
    cm, pl = _tiny()
    c = cm.iteration(2, 1, 1, pl, context_len=10)
    r = simulate_iteration(c, pl)
    assert r.iteration_time_s == pytest.approx(26284 * NS)
    assert c.closed_form_time_s <= r.iteration_time_s <= c.sum_of_stages_s
    ev = {(e["stage"], e["resource"], e["layer"]): (e["start_s"] / NS, e["end_s"] / NS) for e in r.timeline}
    assert ev[("target.h2d", "pcie", 0)] == pytest.approx((0, 2160))
    assert ev[("target.h2d", "pcie", 1)] == pytest.approx((2160, 5040))
    assert ev[("target.moe", "gpu", 0)] == pytest.approx((3264, 9408))
    assert ev[("target.moe", "gpu", 1)] == pytest.approx((12672, 18816))
    assert ev[("draft.cpu", "cpu", -1)] == pytest.approx((21376, 21916))
    assert ev[("draft.cpu", "gpu", -1)] == pytest.approx((24100, 26284))
    assert r.stages[Stage.ITERATION.value] == pytest.approx(26284 * NS)
    assert r.stages[Stage.TARGET_MOE.value] == pytest.approx(2 * 6144 * NS)
    assert r.bound == "gpu"


def test_serial_case_equals_sum_of_stages():
    """m = 1, every expert cached (no H2D), every draft KV on the GPU (no CPU draft part):
    each event waits for the previous one, so the iteration is the sum of its stages."""
    cm, pl = _tiny(slots=(4, 4), draft_gpu=2)
    for k in (0, 1):
        c = cm.iteration(2, 1, k, pl, context_len=10)
        r = simulate_iteration(c, pl)
        assert c.h2d_s.sum() == 0
        assert r.iteration_time_s == pytest.approx(c.sum_of_stages_s, rel=1e-12)


def _synthetic(L, M, pre, attn, post, moe, h2d, lm=0.0, ver=0.0):
    z = np.zeros((L, M))

    def full(v):
        return np.full((L, M), float(v))
    return IterationCosts(
        batch=M, micro_batches=M, draft_len=0, context_len=1.0, mb_sizes=np.ones(M, int), tokens=M,
        tokens_per_iteration=float(M), batched_moe=False, pre_s=full(pre), attn_cpu_s=full(attn),
        attn_gpu_s=z.copy(), kv_h2d_s=z.copy(), post_s=full(post), moe_gpu_s=full(moe), moe_cpu_s=z.copy(),
        h2d_s=np.full(L, float(h2d)), lm_head_s=np.full(M, lm), verify_s=np.full(M, ver),
        draft_group_sizes=np.array([M]), draft_gpu_s=np.zeros((1, 0)), draft_cpu_attn_s=np.zeros((1, 0)),
        draft_cpu_gpu_s=np.zeros((1, 0)), touched=0.0, h2d_s_per_uncached_expert=0.0,
        cpu_expert_s_per_uncached_expert=0.0, moe_gpu_full_s=0.0, cpu_attn_s_per_seq=np.zeros(L),
        gpu_attn_s_per_seq=np.zeros(L), moe_flops_gpu=0.0, gpu_peak_flops=1.0)


def _shared(**measured):
    """The tiny machine with its "GPU" being the CPU standing in (shares_host_cpu)."""
    from specmoe.planner.hardware_spec import parse_hardware
    from tiny_specs import TINY_HW

    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY_HW.items()}
    raw["gpu"]["shares_host_cpu"] = True
    if measured:
        raw["measured"] = dict(source="test", **measured)
    return parse_hardware(raw, "tiny-shared.yaml")


def test_shared_cores_run_everything_in_turn():
    """Where the CPU stands in for the GPU, H2D copies, CPU attention and GPU work share the same
    cores: the iteration is the sum of its stages (the by-hand case above overlaps to 26284 ns), the
    closed form is that sum too, and the prefill's layer pipeline is the sum of its parts."""
    wl = Workload(10, 4, acceptance=load_acceptance(0.5))
    cm_o, pl = _tiny()
    cm_s = CostModel(tiny_target(), _shared(), wl, tiny_draft())
    for M, k in ((1, 1), (2, 2), (1, 0)):
        c, co = cm_s.iteration(2, M, k, pl, context_len=10), cm_o.iteration(2, M, k, pl, context_len=10)
        assert c.serial and not co.serial
        r, ro = simulate_iteration(c, pl), simulate_iteration(co, pl)
        assert r.iteration_time_s == pytest.approx(c.sum_of_stages_s, rel=1e-12)
        assert c.closed_form_time_s == pytest.approx(c.sum_of_stages_s, rel=1e-12)
        # the same stage times but H2D: the CPU standing in streams references to host rows, no copy
        assert c.h2d_s.sum() == 0 and co.h2d_s.sum() > 0
        assert c.sum_of_stages_s == pytest.approx(co.sum_of_stages_s - co.h2d_s.sum(), rel=1e-12)
        assert r.iteration_time_s + co.h2d_s.sum() > ro.iteration_time_s      # in turn, were the copies made
        ends = sorted((e["start_s"], e["end_s"]) for e in r.timeline)
        assert all(b[0] >= a[1] - 1e-15 for a, b in zip(ends, ends[1:]))          # never two at once
    assert prefill_time(cm_s, 2, pl) > prefill_time(cm_o, 2, pl)


def test_prefill_pays_the_fixed_costs_of_its_passes():
    """Prefill runs the stages as one micro-batch per chunk: with fixed costs it grows by exactly
    CostModel.prefill_fixed_s (one chunk here), which counts each invocation by hand."""
    wl = Workload(10, 4, acceptance=load_acceptance(0.5))
    _, pl = _tiny()
    table = {"target.pre_attn": 100, "target.attention": 200, "target.post_attn": 300, "target.moe": 400,
             "target.moe.expert": 10, "target.lm_head": 50, "target.lm_head.token": 9, "target.pre_attn.sequence": 7,
             "target.attention.sequence": 5, "draft.step": 20, "draft.layer": 30, "draft.sequence": 3}
    cm0 = CostModel(tiny_target(), tiny_hw(), wl, tiny_draft())
    cm1 = CostModel(tiny_target(), tiny_hw(stage_overhead_us=table), wl, tiny_draft())
    B, L = 2, 2
    touched = 4 * (1 - (1 - 2 / 4) ** (B * 10))      # 4 experts, top-2, 20 tokens in the chunk
    want_us = (L * (100 + 200 + 300 + 400 + 10 * touched) + 100 + 50 + 9 * B + B * (7 + 5) + 20 + 1 * 30 + 3 * B)
    assert cm1.prefill_fixed_s(B, 10, 1) == pytest.approx(want_us * 1e-6, rel=1e-9)
    assert prefill_time(cm1, B, pl) - prefill_time(cm0, B, pl) == pytest.approx(want_us * 1e-6, rel=1e-9)
    assert cm0.prefill_fixed_s(B, 10, 1) == 0.0


def test_the_drafts_prefill_computes_no_logits():
    """The draft's prefill only fills its KV (runtime/speculative.py: logits="none"): its part is the same
    for a draft of any vocabulary, and on the 1 GFLOP/s machine its GEMMs take at least 2 x T x 448 flops
    (q, k, v, o 4 x 64 and the MLP 3 x 64 weight elements a token; test_guard_mutants_simulator works it
    out whole)."""
    from specmoe.planner.prefill import prefill_parts
    from tiny_specs import TINY_DRAFT

    wl = Workload(10, 4, acceptance=load_acceptance(0.5))
    _, pl = _tiny()
    wide = ModelSpec.from_hf_config({**TINY_DRAFT, "vocab_size": 4096}, name="wide-vocab draft")
    base, big = (prefill_parts(CostModel(tiny_target(), tiny_hw(), wl, d), 2, pl) for d in (tiny_draft(), wide))
    assert base.draft_s == pytest.approx(big.draft_s, rel=1e-12) and base.draft_s > 0
    bare = prefill_parts(CostModel(tiny_target(), tiny_hw(), wl, None), 2, pl)
    assert bare.draft_s == 0.0 and base.total_s - bare.total_s == pytest.approx(base.draft_s, rel=1e-12)
    assert base.draft_s >= 2 * 20 * 448 * 1e-9


def test_perfect_balance_tends_to_bare_max():
    """Each layer: H2D = CPU = GPU = 1 s. The bare max is L seconds; the pipeline adds fill and drain,
    whose share shrinks with more layers and more micro-batches. With m = 1 CPU and GPU cannot overlap."""
    ratios = {}
    for L in (8, 32, 128):
        for M in (1, 2, 8):
            c = _synthetic(L, M, 0.05 / M, 1.0 / M, 0.05 / M, 0.9 / M, 1.0)
            r = simulate_iteration(c, Placement(expert_cache_slots=(0,) * L))
            assert c.closed_form_time_s == pytest.approx(L)
            ratios[L, M] = r.iteration_time_s / c.closed_form_time_s
            assert r.iteration_time_s >= c.closed_form_time_s * (1 - 1e-12)
    assert ratios[8, 1] == pytest.approx(2.0)
    assert ratios[128, 8] < 1.01
    assert ratios[128, 8] < ratios[32, 8] < ratios[8, 8]
    assert ratios[32, 8] < ratios[32, 2]


def _random_case(rng, uniform):
    name, draft, hwn = rng.choice([("mixtral-8x7b", "mixtral-8x7b-eagle", "a30-xeon6426y"),
                                   ("qwen3-30b-a3b", "qwen3-0.6b", "h200-host"),
                                   ("mixtral-8x7b", "mixtral-8x7b-eagle", "h200-host"),
                                   ("olmoe-1b-7b", "olmo-1b", "t4-host")])
    m, d, hw = ModelSpec.preset(name), ModelSpec.preset(draft), HardwareSpec.preset(hwn)
    wl = Workload(rng.choice([64, 566, 2000]), rng.choice([32, 1024]), acceptance=load_acceptance(rng.uniform(0, 0.95)))
    B = rng.randint(1, 600)
    M = rng.randint(1, min(B, 6))
    k = rng.randint(0, 7)
    E = m.num_experts
    slots = [rng.randint(0, E)] * m.num_layers if uniform else [rng.randint(0, E) for _ in range(m.num_layers)]
    extra = {} if uniform else dict(
        target_kv_gpu_sequences=rng.randint(0, B), attention_device=rng.choice(["cpu", "gpu"]),
        cpu_expert_layers=tuple(sorted(rng.sample(m.moe_layers, rng.randint(0, 4)))))
    pl = Placement(expert_cache_slots=tuple(slots), draft_kv_gpu_sequences=rng.randint(0, B), **extra)
    return CostModel(m, hw, wl, d), B, M, k, pl


@pytest.mark.parametrize("seed", range(16))
def test_bounds_on_random_configurations(seed):
    rng = random.Random(seed)
    cm, B, M, k, pl = _random_case(rng, uniform=seed % 2 == 0)
    c = cm.iteration(B, M, k, pl)
    r = simulate_iteration(c, pl)
    t = r.iteration_time_s
    lower = max(c.resource_busy_s().values())
    assert lower * (1 - 1e-9) <= t <= c.sum_of_stages_s * (1 + 1e-9)
    if seed % 2 == 0 and cm.model.num_dense_layers == 0:          # uniform layers: the bare max bounds it
        assert t >= c.closed_form_time_s * (1 - 1e-9)
    for key, v in c.stage_totals().items():
        if c.shared_dram is None:
            assert r.stages[key] == pytest.approx(v, rel=1e-9, abs=1e-15)
        else:       # on shared host DRAM (h200-host) the CPU's events and the copies only ever stretch
            assert r.stages[key] >= v * (1 - 1e-9)
    _check_timeline(r.timeline)
    if c.shared_dram is None:
        # prefetching the next iteration's experts during the draft can only help (on shared DRAM the
        # copies may slow a DRAM-bound draft CPU part on the critical path)
        assert simulate_iteration(c, pl, prefetch=True).iteration_time_s <= t * (1 + 1e-9)
    # overlapping a micro-batch's draft with another's verification stays within the bounds
    co = cm.iteration(B, M, k, pl, draft_groups="micro_batch")
    to = simulate_iteration(co, pl, overlap_draft=True, record=False).iteration_time_s
    assert max(co.resource_busy_s().values()) * (1 - 1e-9) <= to <= co.sum_of_stages_s * (1 + 1e-9)
    # one MoE over all micro-batches: the same bounds
    cb = cm.iteration(B, M, k, pl, batched_moe=True)
    tb = simulate_iteration(cb, pl, record=False).iteration_time_s
    assert max(cb.resource_busy_s().values()) * (1 - 1e-9) <= tb <= cb.sum_of_stages_s * (1 + 1e-9)


def _check_timeline(tl):
    """One event at a time per resource; per (layer, micro-batch): pre < attention < post < moe;
    a layer's MoE after its H2D."""
    by_res = defaultdict(list)
    for e in tl:
        assert e["end_s"] >= e["start_s"]
        by_res[e["resource"]].append((e["start_s"], e["end_s"]))
    for iv in by_res.values():
        iv.sort()
        for (s0, e0), (s1, e1) in zip(iv, iv[1:]):
            assert s1 >= e0 - 1e-12
    first = {}
    for e in tl:
        first.setdefault((e["stage"], e["layer"], e["micro_batch"]), e)
    for (st, layer, mb), e in first.items():
        if st == "target.attention" and ("target.pre_attn", layer, mb) in first:
            assert e["start_s"] >= first["target.pre_attn", layer, mb]["end_s"] - 1e-12
        if st == "target.post_attn" and ("target.attention", layer, mb) in first:
            assert e["start_s"] >= first["target.attention", layer, mb]["end_s"] - 1e-12
        if st == "target.moe" and e["resource"] == "gpu":
            if ("target.post_attn", layer, mb) in first:
                assert e["start_s"] >= first["target.post_attn", layer, mb]["end_s"] - 1e-12
            if ("target.h2d", layer, -1) in first:
                assert e["start_s"] >= first["target.h2d", layer, -1]["end_s"] - 1e-12


def test_timeline_is_plottable():
    cm, pl = _tiny()
    r = simulate_iteration(cm.iteration(2, 1, 1, pl, context_len=10), pl)
    keys = {"stage", "resource", "layer", "micro_batch", "start_s", "end_s"}
    assert r.timeline and all(set(e) == keys for e in r.timeline)
    assert {e["stage"] for e in r.timeline} <= {s.value for s in Stage}
    assert not simulate_iteration(cm.iteration(2, 1, 1, pl), pl, record=False).timeline


def test_dag_detects_cycles():
    d = Dag()
    a = d.add("gpu", 1.0, (), "x")
    b = d.add("cpu", 1.0, (a,), "y")
    d.succ[b].append(a)          # a cycle added by hand
    d.npred[a] += 1
    with pytest.raises(RuntimeError, match="cycle"):
        d.schedule()


@pytest.fixture(scope="module")
def mixtral_a30():
    m, d = ModelSpec.preset("mixtral-8x7b"), ModelSpec.preset("mixtral-8x7b-eagle")
    hw = HardwareSpec.preset("a30-xeon6426y")
    wl = Workload(566, 1024, acceptance=load_acceptance(0.8))
    return CostModel(m, hw, wl, d)


# timing goals (per event, whole run) live in bench/model_speed.py: no wall clock in the tests
def test_whole_run(mixtral_a30):
    cm = mixtral_a30
    B = 512
    pl = default_placement(cm.model, cm.hw, cm.workload, B, 4, cm.draft)
    rr = simulate_run(cm, B, 2, 4, pl)
    assert rr.generated_tokens == B * 1024
    assert rr.prefill_time_s > 0 and rr.decode_time_s > 0
    assert rr.end_to_end_tokens_per_s < rr.decode_tokens_per_s
    # contexts grow, the draft-KV split shifts towards the CPU, then sequences finish
    ctx = [g["context"] for g in rr.groups]
    assert ctx == sorted(ctx) and ctx[0] > 566 and ctx[-1] <= 1590
    gpu_draft = [g["draft_gpu_sequences"] for g in rr.groups]
    assert gpu_draft[0] >= gpu_draft[-1]
    assert rr.groups[-1]["active"] < B
    # without speculation every sequence needs exactly gen_len iterations
    r0 = simulate_run(cm, B, 2, 0, pl)
    assert r0.iterations == 1024 and all(g["active"] == B for g in r0.groups)
    assert sum(g["iterations"] for g in r0.groups) == 1024


def test_prefill_is_compute_bound(mixtral_a30):
    cm = mixtral_a30
    B = 256
    pl = Placement(expert_cache_slots=(0,) * 32)
    t = prefill_time(cm, B, pl)
    flops = 2 * B * 566 * cm.model.active_params
    assert t >= flops / 165e12
    assert t < 3 * flops / 165e12 + 32 * 8 * 352_321_536 / 25e9


def test_fast_path_matches_full_simulation(mixtral_a30):
    cm = mixtral_a30
    pl = default_placement(cm.model, cm.hw, cm.workload, 400, 3, cm.draft)
    full = simulate_iteration(cm.iteration(400, 2, 3, pl), pl)
    fast = evaluate_config(cm, 400, 2, 3, pl)
    assert fast.iteration_time_s == pytest.approx(full.iteration_time_s, rel=1e-12)
    assert fast.bound == full.bound
    closed = evaluate_config(cm, 400, 2, 3, pl, simulate=False)
    assert closed.iteration_time_s == pytest.approx(fast.costs.closed_form_time_s)
    assert closed.decode_tokens_per_s == pytest.approx(fast.costs.tokens_per_iteration / closed.iteration_time_s)


def test_bare_max_bounds_uniform_layers_from_below():
    """Without prefetch, with every layer alike: the target phase holds each resource's L layers of
    work and ends with the LM head and acceptance, then the draft phase: the closed form (sum over
    layers of the bare max + tail + draft lower bound) cannot beat the simulator."""
    checked = 0
    for seed in range(100, 160):
        rng = random.Random(seed)
        cm, B, M, k, pl = _random_case(rng, uniform=True)
        if cm.model.num_dense_layers:
            continue
        c = cm.iteration(B, M, k, pl)
        t = simulate_iteration(c, pl, record=False).iteration_time_s
        assert c.closed_form_time_s * (1 - 1e-9) <= t <= c.sum_of_stages_s * (1 + 1e-9)
        checked += 1
    assert checked > 30


def test_batched_layer_schedule_is_the_engines_streaming_ahead():
    """batched_layer: one pre_attn and one post_attn event per layer over all micro-batches (fixed
    costs counted once per layer), attention per micro-batch between them, the MoE batched. With one
    micro-batch it is the per-micro-batch schedule exactly."""
    wl = Workload(10, 4, acceptance=load_acceptance(0.5))
    table = {"target.pre_attn": 100, "target.post_attn": 300, "target.post_attn.token": 2}
    cm = CostModel(tiny_target(), tiny_hw(stage_overhead_us=table), wl, tiny_draft())
    _, pl = _tiny()
    one_a = simulate_iteration(cm.iteration(4, 1, 1, pl, context_len=10, batched_moe=True), pl)
    one_b = simulate_iteration(cm.iteration(4, 1, 1, pl, context_len=10, batched_layer=True), pl)
    assert one_b.iteration_time_s == pytest.approx(one_a.iteration_time_s, rel=1e-12)
    per_mb = cm.iteration(4, 2, 1, pl, context_len=10, batched_moe=True)
    c = cm.iteration(4, 2, 1, pl, context_len=10, batched_layer=True)
    assert c.batched_moe and c.batched_layer and not per_mb.batched_layer
    L = 2
    # fixed costs: per-micro-batch counts 2 x L invocations of each, the batched schedule L (+1 per pass)
    fixed_pre = lambda x: x.pre_s.sum() - CostModel(tiny_target(), tiny_hw(), wl, tiny_draft()).iteration(
        4, 2, 1, pl, context_len=10, batched_layer=x.batched_layer, batched_moe=True).pre_s.sum()
    assert fixed_pre(per_mb) == pytest.approx((2 * L + 1) * 100e-6)
    assert fixed_pre(c) == pytest.approx((L + 1) * 100e-6)
    assert np.all(c.pre_s[1:, 1] == 0) and np.all(c.post_s[:, 1] == 0)     # (layer 0 carries the pass's share)
    r = simulate_iteration(c, pl)
    ev = defaultdict(list)
    for e in r.timeline:
        ev[(e["stage"], e["layer"])].append(e)
    for i in range(L):
        (pre,), (post,) = ev[("target.pre_attn", i)], ev[("target.post_attn", i)]
        atts = ev[("target.attention", i)]
        assert pre["micro_batch"] == post["micro_batch"] == -1 and len(atts) == 2
        assert all(pre["end_s"] <= a["start_s"] + 1e-15 and a["end_s"] <= post["start_s"] + 1e-15 for a in atts)
