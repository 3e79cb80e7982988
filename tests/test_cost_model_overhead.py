"""Fixed per-invocation costs in the cost model (planner/overhead.py): the spec fields parse with clear
errors, every stage grows by exactly (invocations counted as the engine makes them) x (its fixed
cost), specs without the fields are unchanged, and the optimizer then prefers fewer micro-batches
on hardware where fixed costs dominate."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

from specmoe.planner.cost_model import CostModel, touched_experts
from specmoe.planner.errors import SpecError
from specmoe.planner.hardware_spec import HardwareSpec, list_hardware, load_hardware, parse_hardware
from specmoe.planner.model_spec import load_model
from specmoe.planner.overhead import DRAFT_CPU_FALLBACK, OPS_PER_INVOCATION, OVERHEAD_KEYS
from specmoe.planner.plan import Placement
from specmoe.planner.simulator import prefill_time, simulate_iteration
from specmoe.planner.stages import Stage
from specmoe.planner.workload import Workload, load_acceptance
from tiny_specs import datasheet

TABLE = {key: 10.0 * (i + 1) for i, key in enumerate(OVERHEAD_KEYS)}     # distinct values, us


def _spec(base: str = "a30-xeon6426y", op: float | None = None, table: dict | None = None) -> HardwareSpec:
    raw = copy.deepcopy(datasheet(base).raw if base == "a30-xeon6426y" else load_hardware(base).raw)
    m = raw.setdefault("measured", {})
    m.setdefault("source", "test")
    if op is not None:
        m["op_overhead_us"] = op
    if table is not None:
        m["stage_overhead_us"] = dict(table)
    return parse_hardware(raw, "test.yaml")


def _wl(k_alpha: float = 0.6) -> Workload:
    return Workload(prompt_len=200, gen_len=100, acceptance=load_acceptance(k_alpha))


def _delta(model, draft, B, M, k, pl, batched, hw_with, hw_without=None):
    base = CostModel(model, hw_without or _spec(), _wl(), draft).iteration(B, M, k, pl, batched_moe=batched)
    withv = CostModel(model, hw_with, _wl(), draft).iteration(B, M, k, pl, batched_moe=batched)
    a, b = base.stage_totals(), withv.stage_totals()
    return {s: b[s] - a[s] for s in a}, base, withv


def _expected(model, draft, B, M, k, pl: Placement, cost) -> dict[str, float]:
    """Invocations x fixed cost, counted here by hand as runtime/model/target.py and speculative.py run."""
    us = 1e-6
    L = model.num_layers
    mb = [B // M + (1 if j < B % M else 0) for j in range(M)]          # split evenly, larger parts first
    t = min(pl.target_kv_gpu_sequences, B)
    tg = [t // M + (1 if j < t % M else 0) for j in range(M)]
    dev_mbs = sum(1 for j in range(M) if tg[j] > 0)
    host_mbs = sum(1 for j in range(M) if mb[j] - tg[j] > 0)
    N = B * (k + 1)
    n_moe = len(model.moe_layers)
    p = 1.0 - (1.0 - model.top_k / model.num_experts) ** N
    streamed = sum(model.num_experts - pl.expert_cache_slots[l] for l in model.moe_layers)
    out = {
        Stage.TARGET_PRE_ATTN.value: (1 + L * M) * cost("target.pre_attn") + B * cost("target.pre_attn.sequence"),
        Stage.TARGET_ATTENTION.value: (L * host_mbs * cost("target.attention") + L * dev_mbs * cost("target.attention.gpu")
                                       + B * cost("target.attention.sequence") + L * N * cost("target.attention.token")),
        Stage.TARGET_POST_ATTN.value: L * M * cost("target.post_attn") + L * N * cost("target.post_attn.token"),
        Stage.TARGET_MOE.value: L * cost("target.moe") + n_moe * touched_experts(model.num_experts, model.top_k, N)
        * cost("target.moe.expert") + n_moe * N * cost("target.moe.token"),
        Stage.TARGET_H2D.value: streamed * p * cost("target.h2d"),
        Stage.TARGET_LM_HEAD.value: cost("target.lm_head") + N * cost("target.lm_head.token"),
        Stage.VERIFY_ACCEPT.value: cost("verify.accept") + B * cost("verify.accept.sequence") + N * cost("verify.accept.token"),
        Stage.DRAFT_GPU.value: 0.0,
        Stage.DRAFT_CPU.value: 0.0,
    }
    if k > 0:
        g = min(B, pl.draft_kv_gpu_sequences)
        acc = _wl().acceptance
        full = acc.acc(k) - acc.acc(k - 1)          # P(all k drafts accepted): the next first step catches up 2 tokens
        # each draft-KV part its own keys: draft.* the device part's, draft.cpu.* the host part's
        for stage, n, pre in ((Stage.DRAFT_GPU.value, g, "draft."), (Stage.DRAFT_CPU.value, B - g, "draft.cpu.")):
            if n:
                step = cost(pre + "step") + draft.num_layers * cost(pre + "layer")
                out[stage] = k * (step + n * cost(pre + "sequence")) + draft.num_layers * cost(pre + "catchup") * (
                    1 - (1 - full) ** n)
    return {s: v * us for s, v in out.items()}


CASES = [  # model, draft, B, m, k, expert cache slots per layer, draft KV on GPU, target KV on GPU, batched MoE
    ("mixtral-8x7b", "mixtral-8x7b-eagle", 64, 4, 3, 2, 64, 0, False),
    ("mixtral-8x7b", "mixtral-8x7b-eagle", 37, 3, 5, 0, 20, 7, True),
    ("mixtral-8x7b", None, 16, 1, 0, 8, 0, 16, False),
    ("qwen1.5-moe-a2.7b", "qwen1.5-0.5b", 9, 2, 2, 30, 0, 3, True),
    ("olmoe-1b-7b", "olmo-1b", 128, 8, 1, 64, 100, 0, False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-B{c[2]}-m{c[3]}-k{c[4]}")
def test_each_stage_grows_by_invocations_times_its_fixed_cost(case):
    name, dname, B, M, k, slots, g, t, batched = case
    model = load_model(name)
    draft = load_model(dname) if dname else None
    pl = Placement(expert_cache_slots=tuple(slots if l in model.moe_layers else 0 for l in range(model.num_layers)),
                   draft_kv_gpu_sequences=g, target_kv_gpu_sequences=t)
    delta, base, withv = _delta(model, draft, B, M, k, pl, batched, _spec(table=TABLE))
    want = _expected(model, draft, B, M, k, pl, lambda key: TABLE[key])
    for s in want:
        assert delta[s] == pytest.approx(want[s], rel=1e-9, abs=1e-15), s
    assert withv.source == "measured"
    # the linear pieces the optimizer reads move with the arrays
    assert withv.h2d_s_per_uncached_expert - base.h2d_s_per_uncached_expert == pytest.approx(
        (1 - (1 - model.top_k / model.num_experts) ** (B * (k + 1))) * TABLE["target.h2d"] * 1e-6)
    per_seq = np.full(model.num_layers, TABLE["target.attention.token"] * (k + 1))   # [L] every layer, k+1 rows
    per_seq[0] += TABLE["target.attention.sequence"]                                  # once a pass
    for side in ("cpu_attn_s_per_seq", "gpu_attn_s_per_seq"):
        assert getattr(withv, side) - getattr(base, side) == pytest.approx(per_seq * 1e-6, rel=1e-9), side


def test_op_overhead_alone_costs_ops_per_invocation():
    model, draft = load_model("mixtral-8x7b"), load_model("mixtral-8x7b-eagle")
    pl = Placement(expert_cache_slots=(3,) * model.num_layers, draft_kv_gpu_sequences=10, target_kv_gpu_sequences=2)
    op = 7.0
    delta, _, _ = _delta(model, draft, 24, 2, 4, pl, False, _spec(op=op))
    # the host part's draft keys have no operation count of their own: they cost the device part's
    want = _expected(model, draft, 24, 2, 4, pl,
                     lambda key: op * OPS_PER_INVOCATION.get(DRAFT_CPU_FALLBACK.get(key, key), 0.0))
    for s in want:
        assert delta[s] == pytest.approx(want[s], rel=1e-9, abs=1e-15), s
    # a table entry wins over the fallback, the other keys keep it
    delta2, _, _ = _delta(model, draft, 24, 2, 4, pl, False, _spec(op=op, table={"target.post_attn": 0.0}))
    assert delta2[Stage.TARGET_POST_ATTN.value] == 0.0
    assert delta2[Stage.TARGET_PRE_ATTN.value] == pytest.approx(delta[Stage.TARGET_PRE_ATTN.value])


def test_serial_iteration_grows_by_the_sum_of_the_fixed_costs():
    """m = 1 and every expert cached: the simulated iteration is one chain, so it grows by exactly the sum."""
    model, draft = load_model("mixtral-8x7b"), load_model("mixtral-8x7b-eagle")
    pl = Placement(expert_cache_slots=(8,) * model.num_layers, draft_kv_gpu_sequences=32)
    delta, base, withv = _delta(model, draft, 32, 1, 3, pl, False, _spec(table=TABLE))
    t0 = simulate_iteration(base, pl, record=False).iteration_time_s
    t1 = simulate_iteration(withv, pl, record=False).iteration_time_s
    # ... plus the engine's work outside every stage, which no stage holds
    assert withv.other_s == pytest.approx((TABLE["iteration.other"] + 32 * TABLE["iteration.other.sequence"]) * 1e-6)
    assert base.other_s == 0.0
    assert t1 - t0 == pytest.approx(sum(delta.values()) + withv.other_s, rel=1e-9)
    # the closed form (bare max per layer) overlaps the CPU attention with the GPU work: it grows less
    assert 0 < withv.closed_form_time_s - base.closed_form_time_s <= sum(delta.values()) + withv.other_s


@pytest.mark.parametrize("name", list_hardware())
def test_specs_without_the_fields_are_unchanged(name):
    hw = load_hardware(name)
    model, draft = load_model("mixtral-8x7b"), load_model("mixtral-8x7b-eagle")
    pl = Placement(expert_cache_slots=(2,) * model.num_layers, draft_kv_gpu_sequences=8)
    raw = copy.deepcopy(hw.raw)
    if isinstance(raw.get("measured"), dict):
        raw["measured"].pop("op_overhead_us", None)
        raw["measured"].pop("stage_overhead_us", None)
    bare = parse_hardware(raw, "bare.yaml")
    assert not bare.measured.overheads.any
    c0 = CostModel(model, bare, _wl(), draft).iteration(16, 2, 2, pl)
    c1 = CostModel(model, hw, _wl(), draft, use_measured=False).iteration(16, 2, 2, pl)
    c2 = CostModel(model, bare, _wl(), draft, use_measured=False).iteration(16, 2, 2, pl)
    # use_measured=False ignores fixed costs as it ignores every measured curve
    assert c1.stage_totals() == c2.stage_totals()
    if not hw.measured.overheads.any:
        c3 = CostModel(model, hw, _wl(), draft).iteration(16, 2, 2, pl)
        assert c3.stage_totals() == c0.stage_totals()


def test_h200_estimate_reproduces_the_bench_residuals():
    """hw_specs/h200-host-calibrated.yaml's fixed costs are the per-stage residuals of the H200 offload
    bench (spec_alpha0.8_profiled) divided by the invocations: at that point they close those stages."""
    import json
    from pathlib import Path

    from specmoe.planner.model_spec import ModelSpec

    d = json.loads((Path(__file__).resolve().parent.parent / "bench" / "results" / "gpu_offload_h200.json").read_text())
    mode = d["modes"]["spec_alpha0.8_profiled"]
    t, dr = ModelSpec.from_hf_config(d["config"]["target"]), ModelSpec.from_hf_config(d["config"]["draft"])
    wl = Workload(prompt_len=256, gen_len=128, batch=369, acceptance=load_acceptance(0.8))
    pl = Placement(expert_cache_slots=tuple(mode["expert_cache_slots"]), draft_kv_gpu_sequences=369)
    c = CostModel(t, load_hardware("h200-host-calibrated"), wl, dr).iteration(
        369, 8, 8, pl, context_len=mode["measured_mean_context"])
    st, meas = c.stage_totals(), mode["stages_measured_s"]
    for s in ("target.pre_attn", "target.post_attn", "target.lm_head", "draft.gpu", "verify.accept"):
        assert st[s] == pytest.approx(meas[s], rel=0.01), s
    assert not load_hardware("h200-host").measured.overheads.any      # the peak-only spec stays bare


def test_optimizer_prefers_fewer_micro_batches_when_fixed_costs_dominate():
    """Under a schedule that runs pre/post attention per micro-batch (streaming ahead runs them once per
    layer, so their fixed costs would not grow with m), invocation costs that dominate favour m = 1."""
    from specmoe.planner import optimize
    from specmoe.planner.schedule import Schedule

    wl = _wl(0.7)
    kw = dict(draft="mixtral-8x7b-eagle", k_values=range(0, 4), micro_batch_values=(1, 2, 4, 8), alternatives=0,
              timeline=False, target_kv_gpu=False,
              schedule=Schedule(expert_streaming="off", pre_post="per_micro_batch", host_io="direct", cpu_threads=16))
    bare = optimize("mixtral-8x7b", _spec(), wl, **kw)
    heavy = optimize("mixtral-8x7b", _spec(table={"target.pre_attn": 2e5, "target.attention": 2e5,
                                                   "target.post_attn": 2e5}), wl, **kw)
    assert bare.micro_batches > 1          # without fixed costs overlapping micro-batches pays here
    assert heavy.micro_batches == 1        # 0.2 s per micro-batch invocation: one micro-batch
    assert heavy.predicted.source == "measured"


# ---- the spec fields ----
@pytest.mark.parametrize("field,value,msg", [
    ("op_overhead_us", 0, "positive"),
    ("op_overhead_us", -3.0, "positive"),
    ("op_overhead_us", "fast", "number"),
    ("stage_overhead_us", {"target.nonsense": 3}, "not a known key"),
    ("stage_overhead_us", {"target.moe": -1}, ">= 0"),
    ("stage_overhead_us", {"target.moe": "x"}, "number"),
    ("stage_overhead_us", [1, 2], "mapping"),
])
def test_bad_fields_name_the_field(field, value, msg):
    raw = copy.deepcopy(load_hardware("devbox-2core").raw)
    raw.setdefault("measured", {"source": "test"})[field] = value
    with pytest.raises(SpecError) as e:
        parse_hardware(raw, "bad.yaml")
    assert field in str(e.value) and msg in str(e.value)


def test_fields_parse():
    hw = _spec(op=4.5, table={"target.moe.expert": 95, "draft.layer": 0})
    assert hw.measured.op_overhead_us == 4.5
    assert hw.measured.stage_overhead_us == {"target.moe.expert": 95.0, "draft.layer": 0.0}
    ov = hw.measured.overheads
    assert ov.any and ov.get("target.moe.expert") == pytest.approx(95e-6) and ov.get("draft.layer") == 0.0
    assert ov.get("target.pre_attn") == pytest.approx(4.5e-6 * OPS_PER_INVOCATION["target.pre_attn"])
    assert ov.get("verify.accept.sequence") == 0.0
    assert np.isclose(HardwareSpec.from_yaml(load_hardware("devbox-2core-calibrated").source_path).measured.overheads.get(
        "target.pre_attn"), load_hardware("devbox-2core-calibrated").measured.overheads.get("target.pre_attn"))


# ---- the calibration's fit (runtime/calibrate/overhead.py) counts as the cost model does ----
def test_fit_recovers_known_fixed_costs_and_the_cost_model_reproduces_the_samples():
    """Samples made of the cost model's roofline plus known fixed costs x the calibration's invocation
    counts: the fit returns the known costs; and a spec holding them makes the cost model add, per stage,
    the known costs times the invocations counted by hand from the engine's pass (not its own samples)."""
    import json

    from specmoe.planner.model_spec import PRESET_DIR, ModelSpec
    from specmoe.runtime.calibrate.overhead import (CONFIGS, ORACLE_ALPHA, STAGES, config_fields, draft_config,
                                                    eagle_config, shrink_config)
    from specmoe.runtime.calibrate.overhead_fit import (fit_overheads, roofline_stages as _roofline_stages,
                                                        stage_features as _features)

    target = shrink_config(json.loads((PRESET_DIR / "mixtral-8x7b.json").read_text()))
    drafts = {n: draft_config(target, None, n) for n in (1, 2)}
    spec = ModelSpec.from_hf_config(target, name="t")
    dspecs = {n: ModelSpec.from_hf_config(d, name=f"d{n}") for n, d in drafts.items()}
    dspecs["eagle"] = ModelSpec.from_hf_config(eagle_config(target), name="e")
    assert dspecs["eagle"].eagle and not dspecs[1].eagle
    hw_raw = copy.deepcopy(load_hardware("devbox-2core-calibrated").raw)
    for key in ("op_overhead_us", "stage_overhead_us"):
        hw_raw["measured"].pop(key, None)
    hw = parse_hardware(hw_raw, "x.yaml")
    truth = {key: 15.0 + 7.0 * i for i, key in enumerate(OVERHEAD_KEYS)}
    E, n_moe = spec.num_experts, len(spec.moe_layers)
    configs = []
    catchup = lambda n: 1 - (1 - ORACLE_ALPHA ** k) ** n if k and n else 0.0  # noqa: E731 P(some of n catches up)
    for cfg in CONFIGS:
        B, k, M, Ld, t, cache, dgpu, kind = config_fields(cfg)
        slots = [(E if cache == "full" else E // 2) if l in spec.moe_layers else 0 for l in range(spec.num_layers)]
        N = B * (k + 1)
        p = 1 - (1 - spec.top_k / E) ** N
        c = {"B": B, "k": k, "m": M, "draft_layers": Ld, "draft_kind": kind, "target_kv_gpu": t, "draft_kv_gpu": dgpu,
             "cache": cache,
             "expert_cache_slots": slots, "context": 30.0,
             "copies_per_iteration": sum(E - s for s in slots if s) * p if cache == "half" else 0.0,
             "catchup_per_iteration": catchup(dgpu), "catchup_host_per_iteration": catchup(B - dgpu), "ops": {}}
        roof = _roofline_stages(c, spec, dspecs["eagle" if kind == "eagle" else Ld], hw, "fp32")
        feats = _features(c, spec, n_moe, touched_experts(E, spec.top_k, N))
        med = {st: roof.get(st, 0.0) + sum(truth[key] * 1e-6 * n for key, n in feats.get(st, {}).items()) for st in STAGES}
        med["iteration"] = sum(med.values()) + (truth["iteration.other"] + truth["iteration.other.sequence"] * B) * 1e-6
        c["median_s"] = c["mean_s"] = med
        configs.append(c)
    raw = {"device": "cpu", "dtype": "float32", "target_config": target, "draft_configs": drafts,
           "eagle_config": eagle_config(target), "configs": configs,
           "prefill": _prefill_samples(spec, hw_raw, truth, {"model": (dspecs[2], 2), "eagle": (dspecs["eagle"], 1)})}
    op_us, stage_us, det = fit_overheads(raw, hw_raw)
    for key, v in truth.items():
        assert stage_us[key] == pytest.approx(v, rel=1e-3 if not key.startswith("prefill") else 1e-2), key
    assert max(det["fit_max_rel_err_by_stage"].values()) < 1e-3
    assert max(abs(c["fit_rel_err"]) for c in det["prefill"]["configs"]) < 1e-2
    hw_raw["measured"]["stage_overhead_us"] = stage_us
    fitted = parse_hardware(hw_raw, "fitted.yaml")
    # the fixed part the cost model adds with the fitted spec (its stage times less the same model's without
    # fixed costs) against the invocations counted by hand from the engine's pass (runtime/model/target.py:
    # pre_attn once per pass for the embedding and once per layer and micro-batch, post_attn once per layer
    # and micro-batch, one LM head over all B(k+1) tokens; runtime/speculative.py: one acceptance), each
    # invocation at the known (truth) cost, not at the fitted one
    L = spec.num_layers
    for c in configs:
        B, k, M = c["B"], c["k"], min(c["m"], c["B"])
        wl = Workload(prompt_len=16, gen_len=64, acceptance=load_acceptance(ORACLE_ALPHA), kv_dtype="fp32",
                      weight_dtype="fp32")
        pl = Placement(expert_cache_slots=tuple(c["expert_cache_slots"]), draft_kv_gpu_sequences=c["draft_kv_gpu"],
                       target_kv_gpu_sequences=c["target_kv_gpu"])
        d = dspecs["eagle" if c["draft_kind"] == "eagle" else c["draft_layers"]] if k else None
        st, bare = (CostModel(spec, h, wl, d).iteration(B, M, k, pl, context_len=c["context"], batched_moe=True)
                    .stage_totals() for h in (fitted, hw))
        n = B * (k + 1)
        hand = {"target.pre_attn": truth["target.pre_attn"] * (1 + L * M) + truth["target.pre_attn.sequence"] * B,
                "target.post_attn": truth["target.post_attn"] * L * M + truth["target.post_attn.token"] * L * n,
                "target.lm_head": truth["target.lm_head"] + truth["target.lm_head.token"] * n,
                "verify.accept": truth["verify.accept"] + truth["verify.accept.sequence"] * B
                + truth["verify.accept.token"] * n}
        for s, us in hand.items():
            assert st[s] - bare[s] == pytest.approx(us * 1e-6, rel=1e-3), (B, k, M, s)


def _prefill_samples(spec, hw_raw: dict, truth: dict, drafts: dict) -> dict:
    """Prefill passes made of the cost model's prefill with the known fixed costs, the known prefill keys
    among them, each pass with its target stages and the draft's own (runtime/calibrate/prefill.py's raw
    form): every configuration once with each draft of `drafts` (kind -> (ModelSpec, layers))."""
    from specmoe.runtime.calibrate.prefill import PREFILL_CONFIGS, model_prefill_parts

    known = copy.deepcopy(hw_raw)
    known["measured"]["stage_overhead_us"] = dict(truth)
    hw = parse_hardware(known, "known.yaml")
    slots = [spec.num_experts if l in spec.moe_layers else 0 for l in range(spec.num_layers)]
    configs = []
    for B, P in PREFILL_CONFIGS:
        for kind, (dspec, layers) in drafts.items():
            parts = model_prefill_parts(spec, hw, "fp32", B, P, slots, dspec)
            configs.append({"B": B, "P": P, "draft_kind": kind, "draft_layers": layers, "low_s": parts.total_s,
                            "stages_s": {**parts.stages_s, "draft.gpu": parts.draft_s}})
    return {"expert_cache_slots": slots, "rounds": 1, "configs": configs}


def test_prefill_token_costs_every_prompt_token_of_every_layer():
    """prefill.token adds its cost once per prompt token and target layer to the prefill, nothing to decode."""
    model = load_model("mixtral-8x7b")
    wl = Workload(prompt_len=40, gen_len=64, kv_dtype="fp32", weight_dtype="fp32")
    pl = Placement(expert_cache_slots=(2,) * model.num_layers, draft_kv_gpu_sequences=0, target_kv_gpu_sequences=0)
    base = copy.deepcopy(load_hardware("devbox-2core-calibrated").raw)
    with_key = copy.deepcopy(base)
    with_key["measured"]["stage_overhead_us"]["prefill.token"] = 3.0
    cm0, cm1 = (CostModel(model, parse_hardware(r, "x.yaml"), wl, None) for r in (base, with_key))
    assert prefill_time(cm1, 6, pl) - prefill_time(cm0, 6, pl) == pytest.approx(3e-6 * 6 * 40 * model.num_layers,
                                                                                  rel=1e-9)
    it = [cm.iteration(6, 1, 0, pl, context_len=80.0).stage_totals() for cm in (cm0, cm1)]
    assert it[0] == it[1]


def test_prefill_keys_cost_their_part_per_layer_pass_and_per_token():
    """Each stage's prefill keys add L x passes and T x L of their cost to that stage's part of the prefill, the
    rest's (prefill, prefill.token) passes and T x L to "other"; a stage's prefill token key replaces its decode
    token key there; the parts add up to the total on a CPU host; decode is untouched."""
    from specmoe.planner.prefill import prefill_parts

    model = load_model("mixtral-8x7b")
    B, P = 40, 500                                       # T = 20,000 tokens: two passes of at most 16,384
    wl = Workload(prompt_len=P, gen_len=64, kv_dtype="fp32", weight_dtype="fp32")
    pl = Placement(expert_cache_slots=(2,) * model.num_layers, draft_kv_gpu_sequences=0, target_kv_gpu_sequences=0)
    base = copy.deepcopy(load_hardware("devbox-2core-calibrated").raw)
    added = {"prefill.target.pre_attn": 11.0, "prefill.target.attention.token": 0.5, "prefill.target.moe": 7.0,
             "prefill.target.moe.token": 0.25, "prefill": 900.0, "prefill.token": 0.125,
             "prefill.target.lm_head": 13.0, "prefill.target.lm_head.token": 0.75}
    with_keys = copy.deepcopy(base)
    with_keys["measured"]["stage_overhead_us"].update(added)
    cm0, cm1 = (CostModel(model, parse_hardware(r, "x.yaml"), wl, None) for r in (base, with_keys))
    p0, p1 = (prefill_parts(cm, B, pl) for cm in (cm0, cm1))
    L, T, n_moe, us = model.num_layers, B * P, len(model.moe_layers), 1e-6
    assert p1.passes == 2
    moe_token = base["measured"]["stage_overhead_us"]["target.moe.token"]
    want = {"target.pre_attn": 2 * L * 11.0, "target.attention": T * L * 0.5, "target.post_attn": 0.0,
            "target.moe": 2 * L * 7.0 + T * L * 0.25 - T * n_moe * moe_token,
            "target.lm_head": 2 * 13.0 + T * 0.75}                # once a pass, not per layer
    for stage, v in want.items():
        assert p1.stages_s[stage] - p0.stages_s[stage] == pytest.approx(v * us, rel=1e-9, abs=1e-12), stage
    assert p1.other_s - p0.other_s == pytest.approx((2 * 900.0 + T * L * 0.125) * us, rel=1e-9)
    o = cm0.fixed.ov.get                                 # the decode LM head's own keys: the LM head runs each pass
    assert cm0.fixed.prefill_parts(B, P, 2)["target.lm_head"] == pytest.approx(
        2 * o("target.lm_head") + B * o("target.lm_head.token"), rel=1e-12)
    for p in (p0, p1):
        assert p.total_s == pytest.approx(sum(p.stages_s.values()) + p.draft_s + p.other_s, rel=1e-12)
    it = [cm.iteration(6, 1, 0, pl, context_len=80.0).stage_totals() for cm in (cm0, cm1)]
    assert it[0] == it[1]


def test_attention_token_key_costs_a_prefill_token_until_its_prefill_key_replaces_it():
    """target.attention.token (per query token per layer) costs each prompt token of a prefill too, unless the
    spec has prefill.target.attention.token, fitted on prefill passes in its place."""
    from specmoe.planner.prefill import prefill_parts

    model = load_model("mixtral-8x7b")
    B, P = 6, 40
    wl = Workload(prompt_len=P, gen_len=64, kv_dtype="fp32", weight_dtype="fp32")
    pl = Placement(expert_cache_slots=(2,) * model.num_layers, draft_kv_gpu_sequences=0, target_kv_gpu_sequences=0)
    raws = [copy.deepcopy(load_hardware("devbox-2core-calibrated").raw) for _ in range(3)]
    for r in raws:
        r["measured"]["stage_overhead_us"].pop("prefill.target.attention.token", None)
    raws[1]["measured"]["stage_overhead_us"]["target.attention.token"] = 3.0
    raws[2]["measured"]["stage_overhead_us"].update({"target.attention.token": 3.0, "prefill.target.attention.token": 1.0})
    att = [prefill_parts(CostModel(model, parse_hardware(r, "x.yaml"), wl, None), B, pl).stages_s["target.attention"]
           for r in raws]
    T, L = B * P, model.num_layers
    assert att[1] - att[0] == pytest.approx(3e-6 * T * L, rel=1e-9)
    assert att[2] - att[0] == pytest.approx(1e-6 * T * L, rel=1e-9)


@pytest.mark.parametrize("draft_name", ["tiny-draft", "tiny-eagle"])
def test_prefill_draft_keys_cost_the_drafts_own_prefill(draft_name):
    """The draft's own prefill: one pass per chunk of prompts, each a draft step's fixed costs over the chunk's
    sequences, plus its prefill keys per draft layer and pass and per prompt token and draft layer: a draft
    model's prefill.draft keys, an EAGLE head's prefill.draft.eagle keys where the spec has them, else the
    draft model's. Only the draft part moves; decode is untouched."""
    from pathlib import Path

    from specmoe.planner.prefill import prefill_parts

    models = Path(__file__).resolve().parent.parent / "models"
    model, draft = load_model(str(models / "tiny-moe")), load_model(str(models / draft_name))
    B, P = 700, 40                                   # T = 28,000 tokens: two passes of at most 16,384
    wl = Workload(prompt_len=P, gen_len=64, kv_dtype="fp32", weight_dtype="fp32")
    pl = Placement(expert_cache_slots=(0,) * model.num_layers, draft_kv_gpu_sequences=B, target_kv_gpu_sequences=0)
    base = copy.deepcopy(load_hardware("devbox-2core-calibrated").raw)
    model_keys = {"prefill.draft": 300.0, "prefill.draft.token": 0.5}
    eagle_keys = {"prefill.draft.eagle": 70.0, "prefill.draft.eagle.token": 0.25}
    specs = [base]
    for added in (model_keys, {**model_keys, **eagle_keys}):
        r = copy.deepcopy(base)
        r["measured"]["stage_overhead_us"].update(added)
        specs.append(r)
    cms = [CostModel(model, parse_hardware(r, "x.yaml"), wl, draft) for r in specs]
    p0, p_model, p_both = (prefill_parts(cm, B, pl) for cm in cms)
    Ld, T, us = draft.num_layers, B * P, 1e-6
    assert p0.passes == 2 and bool(draft.eagle) == (draft_name == "tiny-eagle")
    want = (2 * Ld * 300.0 + T * Ld * 0.5) * us
    assert p_model.draft_s - p0.draft_s == pytest.approx(want, rel=1e-9)
    if draft.eagle:
        want = (2 * Ld * 70.0 + T * Ld * 0.25) * us
    assert p_both.draft_s - p0.draft_s == pytest.approx(want, rel=1e-9)
    fc = cms[0].fixed                                # the draft step's own fixed costs, once per pass
    assert fc.prefill_parts(B, P, 2)["draft"] == pytest.approx(2 * fc.draft_step_s(B / 2, 1.0), rel=1e-12)
    for p in (p_model, p_both):
        assert p.stages_s == p0.stages_s and p.other_s == p0.other_s
    it = [cm.iteration(6, 1, 2, pl, context_len=80.0).stage_totals() for cm in cms]
    assert it[0] == it[1] == it[2]


def test_a_spec_without_host_draft_keys_costs_the_host_part_as_the_device_part():
    """Specs calibrated before draft.cpu was timed hold only draft.*: the host part's keys cost those;
    a spec with draft.cpu.* keys costs the host part by them and the device part by draft.*."""
    from specmoe.planner.overhead import Overheads

    old = Overheads(op_s=2e-6, table_s={"draft.step": 3e-4, "draft.sequence": 4e-5})
    assert old.get("draft.cpu.step") == 3e-4 and old.get("draft.cpu.sequence") == 4e-5
    assert old.get("draft.cpu.layer") == old.get("draft.layer") == 2e-6 * OPS_PER_INVOCATION["draft.layer"]
    new = Overheads(op_s=2e-6, table_s={"draft.step": 3e-4, "draft.cpu.step": 1e-4, "draft.cpu.sequence": 0.0})
    assert new.get("draft.cpu.step") == 1e-4 and new.get("draft.step") == 3e-4
    assert new.get("draft.cpu.sequence") == 0.0           # a fitted 0 is a value, not a missing key
    model, draft = load_model("mixtral-8x7b"), load_model("mixtral-8x7b-eagle")
    table = {"draft.step": 300.0, "draft.layer": 50.0, "draft.sequence": 40.0, "draft.catchup": 9.0}
    pl = Placement(expert_cache_slots=(0,) * model.num_layers, draft_kv_gpu_sequences=0, target_kv_gpu_sequences=0)
    only_gpu_keys, _, _ = _delta(model, draft, 8, 1, 2, pl, False, _spec(table=table))
    cpu_keys = {**table, "draft.cpu.step": 100.0, "draft.cpu.layer": 5.0, "draft.cpu.sequence": 1.0,
                "draft.cpu.catchup": 2.0}
    own, _, _ = _delta(model, draft, 8, 1, 2, pl, False, _spec(table=cpu_keys))
    assert only_gpu_keys["draft.cpu"] == pytest.approx(_expected(model, draft, 8, 1, 2, pl, lambda k: table.get(
        DRAFT_CPU_FALLBACK.get(k, k), 0.0))["draft.cpu"], rel=1e-9)
    assert own["draft.cpu"] == pytest.approx(_expected(model, draft, 8, 1, 2, pl, lambda k: cpu_keys.get(k, 0.0))
                                             ["draft.cpu"], rel=1e-9)
    assert own["draft.cpu"] < only_gpu_keys["draft.cpu"]


@pytest.mark.parametrize("host_part", ["cheaper", "dearer"])
def test_the_draft_bound_stays_exact_at_both_ends_when_the_parts_cost_differently(host_part):
    """The MILP's bound splits all B sequences' draft steps into a shared part and each side's rest; with
    the host part's fixed costs fitted apart (cheaper or dearer than the device part's) every term stays
    >= 0, all-device and all-host each add up to the cost model's own draft pieces, and the bounds still
    sit under the MILP's optimum."""
    from specmoe.planner import milp

    model, draft = load_model("mixtral-8x7b"), load_model("mixtral-8x7b-eagle")
    scale = 0.2 if host_part == "cheaper" else 5.0
    table = {"draft.step": 300.0, "draft.layer": 80.0, "draft.sequence": 40.0, "draft.catchup": 20.0}
    table.update({f"draft.cpu.{k.split('.')[1]}": v * scale for k, v in table.items()})
    cm = CostModel(model, _spec(table=table), _wl(0.8), draft)
    B, M, k = 96, 2, 3
    pc = milp.point_costs(cm, B, M, k)
    assert pc.draft_mm_s >= 0 and pc.draft_attn_gpu_s >= 0 and pc.draft_attn_cpu_s >= 0
    s, steps = float(cm.workload.mean_context), milp.costs._draft_steps(cm, k)
    on_gpu = sum(n * cm.draft_part(B, q, s, set(), on_gpu=True) for q, n in steps)
    on_cpu = sum(n * (cm.draft_part(B, q, s, set(), on_gpu=False) + cm.draft_cpu_attn(B, q, s, set()))
                 for q, n in steps)
    assert pc.draft_mm_s + pc.draft_attn_gpu_s == pytest.approx(on_gpu, rel=1e-12)
    assert pc.draft_mm_s + pc.draft_attn_cpu_s == pytest.approx(on_cpu, rel=1e-12)
    assert min(pc.draft_attn_gpu_s, pc.draft_attn_cpu_s - sum(n * cm.draft_cpu_attn(B, q, s, set())
                                                              for q, n in steps)) == pytest.approx(0.0, abs=1e-15)
    milp.add_draft(pc, milp.draft_time_fn(cm, B, k))
    v = milp.Variant()
    res = milp.solve(milp.build(pc, v))
    assert res.status == "Optimal"
    assert milp.lower_bound_s(pc, v) <= milp.lp_bound_s(pc, v) * (1 + 1e-6) <= res.objective_s * (1 + 1e-5)


def test_an_eagle_head_costs_its_own_keys_where_the_spec_has_them():
    """An EAGLE head (a spec marked as one) costs each draft part by draft.eagle.* / draft.cpu.eagle.*
    (its step holding its one layer) where the spec has them, and as a draft model of its layers where it
    does not (specs calibrated before EAGLE heads were timed); a draft model never reads the EAGLE keys."""
    from specmoe.planner.model_spec import ModelSpec

    root = Path(__file__).resolve().parents[1] / "models"
    model, head = (ModelSpec.from_hf_config(root / n) for n in ("tiny-moe", "tiny-eagle"))
    plain = load_model("mixtral-8x7b-eagle")        # a one-layer draft model (not marked as an EAGLE head)
    assert head.eagle and not plain.eagle and head.num_layers == 1
    B, k, g = 8, 2, 3
    pl = Placement(expert_cache_slots=(0,) * model.num_layers, draft_kv_gpu_sequences=g, target_kv_gpu_sequences=0)
    acc = _wl().acceptance
    full = acc.acc(k) - acc.acc(k - 1)
    eagle_keys = {"draft.eagle.step": 70.0, "draft.eagle.sequence": 3.0, "draft.eagle.catchup": 11.0,
                  "draft.cpu.eagle.step": 50.0, "draft.cpu.eagle.sequence": 2.0, "draft.cpu.eagle.catchup": 7.0}
    model_keys = {key: v for key, v in TABLE.items() if ".eagle." not in key}
    with_eagle, _, _ = _delta(model, head, B, 1, k, pl, False, _spec(table={**model_keys, **eagle_keys}))
    for stage, n, pre in ((Stage.DRAFT_GPU.value, g, "draft.eagle."), (Stage.DRAFT_CPU.value, B - g, "draft.cpu.eagle.")):
        want = k * (eagle_keys[pre + "step"] + n * eagle_keys[pre + "sequence"]) + eagle_keys[pre + "catchup"] * (
            1 - (1 - full) ** n)
        assert with_eagle[stage] == pytest.approx(want * 1e-6, rel=1e-9), stage
    without, _, _ = _delta(model, head, B, 1, k, pl, False, _spec(table=model_keys))
    want = _expected(model, head, B, 1, k, pl, lambda key: model_keys[key])
    for stage in (Stage.DRAFT_GPU.value, Stage.DRAFT_CPU.value):
        assert without[stage] == pytest.approx(want[stage], rel=1e-9), stage
    as_model, _, _ = _delta(model, plain, B, 1, k, pl, False, _spec(table={**model_keys, **eagle_keys}))
    assert as_model[Stage.DRAFT_CPU.value] == pytest.approx(
        _expected(model, plain, B, 1, k, pl, lambda key: model_keys[key])[Stage.DRAFT_CPU.value], rel=1e-9)
