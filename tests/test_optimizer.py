"""The optimizer: benchmark plans, enumerating B, the MILP's pieces against their references, errors."""
from __future__ import annotations

import json

import numpy as np
import pytest

from specmoe.planner import milp
from specmoe.planner.cost_model import CostModel
from specmoe.planner.errors import InfeasibleError, SpecError
from specmoe.planner.hardware_spec import HardwareSpec, parse_hardware
from specmoe.planner.memory import footprint
from specmoe.planner.model_spec import ModelSpec
from specmoe.planner.optimizer import batch_limit, closed_form_s, optimize
from specmoe.planner.plan import Placement, Plan
from specmoe.planner.stages import STAGE_NAMES
from specmoe.planner.workload import Workload, load_acceptance

APPS = Workload(prompt_len=566, gen_len=1024, acceptance=load_acceptance(0.8))
CASES = {"a30": ("mixtral-8x7b", "a30-xeon6426y", "mixtral-8x7b-eagle"),
         "h200": ("qwen3-30b-a3b", "h200-host", "qwen3-0.6b")}


def tiny_model(L=3, E=4, topk=2) -> ModelSpec:
    return ModelSpec.from_hf_config({
        "model_type": "mixtral", "vocab_size": 512, "hidden_size": 128, "intermediate_size": 256,
        "num_hidden_layers": L, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_local_experts": E, "num_experts_per_tok": topk, "torch_dtype": "bfloat16"}, name="tiny")


TINY_DRAFT = ModelSpec.from_hf_config({
    "model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 4, "torch_dtype": "bfloat16"},
    name="tiny-draft")


def tiny_hw(gpu_MB=3.0, cpu_MB=40.0, h2d=8.0) -> HardwareSpec:
    return parse_hardware({
        "name": "tiny-hw",
        "gpu": {"mem_GB": gpu_MB / 1e3, "reserve_GiB": 0, "hbm_GBps": 900, "peak_TFLOPs": {"bf16": 100},
                "source": "test"},
        "cpu": {"cores": 8, "mem_GB": cpu_MB / 1e3, "reserve_GiB": 0, "dram_GBps": 100, "peak_TFLOPs": {"bf16": 1.0},
                "source": "test"},
        "link": {"h2d_GBps": h2d, "source": "test"}})


TINY_WL = Workload(prompt_len=48, gen_len=48, acceptance=load_acceptance(0.8))


@pytest.fixture(scope="module")
def bench_plans():
    return {name: optimize(m, hw, APPS, draft=d) for name, (m, hw, d) in CASES.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_benchmark_plan(bench_plans, case, tmp_path):
    plan = bench_plans[case]
    m, hw, d = CASES[case]
    assert plan.draft_len == 0 or plan.draft["name"] == d
    fp = footprint(plan.model_spec(), plan.hardware_spec(), plan.workload_spec(), plan.batch, plan.draft_len,
                   plan.placement, plan.draft_spec(), plan.micro_batches)
    assert fp.fits
    assert set(plan.predicted.stages) <= set(STAGE_NAMES) and "iteration" in plan.predicted.stages
    assert plan.predicted.decode_tokens_per_s > 0 and plan.bound in ("gpu", "cpu", "pcie")
    assert [e["draft_len"] for e in plan.frontier["by_k"]] == list(range(9))
    assert plan.batch in [e["batch"] for e in plan.frontier["by_batch"]]
    # the frontier it beat: nothing on it is better in the closed form the programs maximise
    best = plan.solver["closed_form_optimum"]["closed_form_tokens_per_s"]
    for e in plan.frontier["by_k"] + plan.frontier["by_batch"]:
        assert e["closed_form_tokens_per_s"] <= best * (1 + 1e-9)
    for a in plan.alternatives:
        assert (a["batch"], a["micro_batches"], a["draft_len"]) != (plan.batch, plan.micro_batches, plan.draft_len)
        assert a["closed_form_tokens_per_s"] <= best * (1 + 1e-9) and a["differs"]
    assert plan.solver["status"] == "Optimal" and plan.solver["milps"] >= 1
    assert plan.solver["closed_form_check_rel_err"] < 1e-6
    # JSON round trip
    f = tmp_path / "plan.json"
    plan.to_json(f)
    assert Plan.from_json(f) == plan
    d = json.loads(f.read_text())
    for key in ("schema_version", "batch", "micro_batches", "draft_len", "placement", "predicted", "bound", "frontier"):
        assert key in d


def test_enumerating_B():
    """batch=None: B runs over a grid from the largest batch that fits down by factors (plus one refined
    batch); the plan's B is the best of those, each solved with its own fixed batch."""
    m, hw = tiny_model(), tiny_hw()
    plan = optimize(m, hw, TINY_WL, draft=TINY_DRAFT, k_values=range(0, 3), micro_batch_values=(1, 2),
                    use_measured=False, timeline=False)
    cands = plan.solver["batch_candidates"]
    assert plan.batch in cands and len(cands) >= 3
    cm = CostModel(m, hw, TINY_WL, TINY_DRAFT)
    assert max(cands) == max(batch_limit(cm, plan.draft_len, plan.micro_batches, x, True) for x in ("stream", "cpu"))
    best = plan.solver["closed_form_optimum"]["closed_form_tokens_per_s"]
    for B in cands:
        wl = Workload(TINY_WL.prompt_len, TINY_WL.gen_len, batch=B, acceptance=TINY_WL.acceptance)
        p = optimize(m, hw, wl, draft=TINY_DRAFT, k_values=[plan.draft_len], micro_batch_values=[plan.micro_batches],
                     use_measured=False, alternatives=0, timeline=False)
        assert p.solver["closed_form_optimum"]["closed_form_tokens_per_s"] <= best * (1 + 1e-7)
    # one batch more than the limit does not fit any placement
    wl = Workload(TINY_WL.prompt_len, TINY_WL.gen_len, batch=max(cands) + 1, acceptance=TINY_WL.acceptance)
    with pytest.raises(InfeasibleError):
        optimize(m, hw, wl, draft=TINY_DRAFT, k_values=[plan.draft_len], micro_batch_values=[plan.micro_batches],
                 use_measured=False)


@pytest.mark.parametrize("case", list(CASES))
def test_draft_time_fn_matches_cost_model(case):
    m, hw, d = CASES[case]
    cm = CostModel(ModelSpec.preset(m), HardwareSpec.preset(hw), APPS, ModelSpec.preset(d))
    rng = np.random.default_rng(1)
    for B, k in ((575, 8), (37, 1), (200, 3)):
        D = milp.draft_time_fn(cm, B, k)
        for g in [0, 1, B - 1, B, *rng.integers(0, B + 1, 5)]:
            want = cm.iteration(B, 1, k, Placement(expert_cache_slots=(0,) * cm.L), draft_kv_gpu_sequences=int(g))
            assert D(int(g)) == pytest.approx(want.draft_time_closed_s, rel=1e-12)


def test_pwl_breakpoints():
    rng = np.random.default_rng(2)
    for _ in range(20):
        kinks = np.sort(rng.uniform(0, 600, rng.integers(1, 5)))
        slopes = rng.normal(size=len(kinks) + 1)
        f = lambda x: float(slopes[0] * x + sum((slopes[i + 1] - slopes[i]) * max(0.0, x - kk)
                                                for i, kk in enumerate(kinks)))
        xs, ys, exact = milp.pwl_breakpoints(f, 0, 600, max_evals=200)
        assert exact
        grid = np.arange(601)
        assert np.allclose(np.interp(grid, xs, ys), [f(x) for x in grid], atol=1e-9 * (1 + abs(ys).max()))
    xs, ys, exact = milp.pwl_breakpoints(lambda x: float(np.sqrt(x)), 0, 1000, max_evals=12)
    assert not exact and xs[0] == 0 and xs[-1] == 1000 and ys[-1] == pytest.approx(np.sqrt(1000))
    xs, ys, exact = milp.pwl_breakpoints(lambda x: x * x, 0, 10)           # small ranges: every integer
    assert exact and list(xs) == list(range(11))


@pytest.mark.parametrize("case", list(CASES))
def test_bounds_against_reference_and_milp(case):
    """lp_bound_s (no LP solver) equals the scipy LP it stands for; with the draft's exact breakpoints
    (peak rates) it uses their convex hull instead of the relaxed draft and can only rise;
    cheap bound <= LP bound <= MILP optimum."""
    m, hw, d = CASES[case]
    cm = CostModel(ModelSpec.preset(m), HardwareSpec.preset(hw), APPS, ModelSpec.preset(d))
    for (B, M, k) in ((520, 2, 0), (300, 1, 4), (120, 4, 8)):
        pc = milp.point_costs(cm, B, M, k)
        milp.add_kv_streaming(pc, cm)
        variants = (milp.Variant(), milp.Variant(x_mode="cpu"), milp.Variant(gpu_attention=True))
        before = [milp.lp_bound_s(pc, v) for v in variants]
        milp.add_draft(pc, milp.draft_time_fn(cm, B, k))
        for v, fast0 in zip(variants, before):
            ref = milp.lp_bound_reference_s(pc, v)
            fast = milp.lp_bound_s(pc, v)
            cheap = milp.lower_bound_s(pc, v)
            if not np.isfinite(ref):
                assert not np.isfinite(fast0) and not np.isfinite(fast)
                continue
            assert fast0 == pytest.approx(ref, rel=1e-6)
            assert fast >= fast0 * (1 - 1e-9) and (pc.draft_exact or fast == pytest.approx(fast0, rel=1e-12))
            assert cheap <= fast0 * (1 + 1e-6)
            res = milp.solve(milp.build(pc, v))
            if res.status == "Optimal" and pc.draft_exact:
                assert fast <= res.objective_s * (1 + 1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_milp_objective_is_the_closed_form(case):
    m, hw, d = CASES[case]
    cm = CostModel(ModelSpec.preset(m), HardwareSpec.preset(hw), APPS, ModelSpec.preset(d))
    for (B, M, k) in ((400, 2, 3), (64, 1, 0)):
        pc = milp.point_costs(cm, B, M, k)
        milp.add_draft(pc, milp.draft_time_fn(cm, B, k))
        for v in (milp.Variant(), milp.Variant(x_mode="cpu")):
            model = milp.build(pc, v)
            res = milp.solve(model)
            assert res.status == "Optimal"
            pl = milp.decode(model)
            assert footprint(cm.model, cm.hw, cm.workload, B, k, pl, cm.draft if k else None, M).fits
            cf = cm.iteration(B, M, k, pl).closed_form_time_s
            if pc.draft_exact:
                assert res.objective_s == pytest.approx(cf, rel=1e-6)
            else:                        # measured rates: the draft is interpolated between breakpoints
                assert res.objective_s == pytest.approx(cf, rel=2e-3)


def test_infeasible_names_the_constraint():
    m = tiny_model()
    with pytest.raises(InfeasibleError, match=r"cpu memory: needs .* GiB .* usable"):
        optimize(m, tiny_hw(cpu_MB=1.0), TINY_WL, draft=TINY_DRAFT, use_measured=False)
    with pytest.raises(InfeasibleError, match=r"gpu memory: needs .* usable"):
        optimize(m, tiny_hw(gpu_MB=0.2), TINY_WL, draft=TINY_DRAFT, use_measured=False)
    wl = Workload(48, 48, batch=100000, acceptance=TINY_WL.acceptance)
    with pytest.raises(InfeasibleError, match=r"cpu memory: .*use --batch \d+ or less"):
        optimize(m, tiny_hw(), wl, draft=TINY_DRAFT, use_measured=False)
    with pytest.raises(InfeasibleError, match="min_throughput"):
        optimize(m, tiny_hw(), TINY_WL, draft=TINY_DRAFT, objective="latency", min_throughput=1e15, use_measured=False)


def test_latency_objective():
    m, hw = tiny_model(), tiny_hw()
    thr = optimize(m, hw, TINY_WL, draft=TINY_DRAFT, use_measured=False, timeline=False)
    floor = 0.5 * thr.solver["closed_form_tokens_per_s"]
    lat = optimize(m, hw, TINY_WL, draft=TINY_DRAFT, objective="latency", min_throughput=floor,
                   use_measured=False, timeline=False)
    assert lat.objective == "latency" and lat.solver["closed_form_tokens_per_s"] >= floor * (1 - 1e-9)

    def per_token_s(p):
        return p.solver["closed_form_iteration_s"] * p.batch / p.predicted.tokens_per_iteration

    assert per_token_s(lat) <= per_token_s(thr) * (1 + 1e-9)
    assert lat.batch < thr.batch


def test_routing_stats_cache_the_hot_experts():
    """Layer 0 sends 97% of its tokens to expert 2; layers 1-3 are uniform. With room for one cache slot
    (beside the two streaming buffers), it goes to layer 0's hot expert: that removes nearly all of
    layer 0's H2D, where a slot in a uniform layer would remove a quarter of one layer's."""
    m = tiny_model(L=4, E=4, topk=1)
    eb = m.expert_elems * 2
    wl = Workload(48, 48, batch=1, acceptance=load_acceptance(0.0))
    probe = footprint(m, tiny_hw(), wl, 1, 0, Placement(expert_cache_slots=(0,) * 4), None, 1)
    fixed = probe.gpu_bytes - probe.gpu_breakdown["streaming_buffers"]
    hw = tiny_hw(gpu_MB=(fixed + 8 * eb + 1.5 * eb) / 1e6)        # 2 buffers of 4 experts + 1.5 slots
    stats = np.array([[0.01, 0.01, 0.97, 0.01]] + [[1, 1, 1, 1]] * 3)
    plan = optimize(m, hw, wl, draft=False, routing_stats=stats, cpu_expert_mode="off", gpu_attention=False,
                    micro_batch_values=(1,), use_measured=False, target_kv_gpu=False)
    assert plan.placement.expert_cache_slots == (1, 0, 0, 0)
    assert plan.placement.cached_experts == ((2,), (), (), ())
    assert plan.solver["routing_stats"] and len(plan.solver["routing_stats_sha256"]) == 64
    cm = CostModel(m, hw, wl, None, use_measured=False)
    shares = stats / stats.sum(1, keepdims=True)
    uniform = cm.iteration(1, 1, 0, plan.placement).closed_form_time_s
    assert closed_form_s(cm, 1, 1, 0, plan.placement, shares) < uniform
    assert plan.solver["closed_form_iteration_s"] == pytest.approx(closed_form_s(cm, 1, 1, 0, plan.placement, shares))
    # without statistics the one slot may go to any layer, and it saves less
    flat = optimize(m, hw, wl, draft=False, cpu_expert_mode="off", gpu_attention=False, micro_batch_values=(1,),
                    use_measured=False, target_kv_gpu=False)
    assert sum(flat.placement.expert_cache_slots) == 1
    assert plan.solver["closed_form_tokens_per_s"] > flat.solver["closed_form_tokens_per_s"]
    with pytest.raises(SpecError, match="routing_stats"):
        optimize(m, hw, wl, draft=False, routing_stats=np.ones((3, 4)))
    with pytest.raises(SpecError, match=r"routing_stats\[0\]"):
        optimize(m, hw, wl, draft=False, routing_stats=np.zeros((4, 4)))


def test_highs_matches_cbc():
    try:
        milp.solver_for("highs")
    except SpecError:
        pytest.skip("HiGHS not available to pulp (pip install highspy)")
    m, hw = tiny_model(), tiny_hw()
    kw = dict(draft=TINY_DRAFT, k_values=range(0, 3), micro_batch_values=(1, 2), use_measured=False, timeline=False)
    a = optimize(m, hw, TINY_WL, solver="cbc", **kw)
    b = optimize(m, hw, TINY_WL, solver="highs", **kw)
    assert b.solver["closed_form_tokens_per_s"] == pytest.approx(a.solver["closed_form_tokens_per_s"], rel=1e-6)


def test_bad_arguments():
    m, hw = tiny_model(), tiny_hw()
    for kw, field in ((dict(objective="speed"), "objective"), (dict(min_throughput=10.0), "min_throughput"),
                      (dict(solver="gurobi"), "solver"), (dict(k_values=[-1, 0]), "k_values"),
                      (dict(micro_batch_values=[]), "micro_batch_values"),
                      (dict(cpu_expert_mode="sometimes"), "cpu_expert_mode")):
        with pytest.raises(SpecError, match=field):
            optimize(m, hw, TINY_WL, draft=TINY_DRAFT, **kw)


def test_without_draft_only_k0():
    plan = optimize(tiny_model(), tiny_hw(), TINY_WL, draft=False, use_measured=False, timeline=False)
    assert plan.draft_len == 0 and plan.draft is None
    assert [e["draft_len"] for e in plan.frontier["by_k"]] == [0]


def test_hand_edited_cached_experts_rejected(tmp_path):
    m = tiny_model(L=2, E=4, topk=1)
    wl = Workload(48, 48, batch=1, acceptance=load_acceptance(0.0))
    plan = optimize(m, tiny_hw(), wl, draft=False, routing_stats=np.ones((2, 4)), use_measured=False, timeline=False)
    f = tmp_path / "plan.json"
    plan.to_json(f)
    d = json.loads(f.read_text())
    d["placement"]["cached_experts"] = [[9] * s for s in d["placement"]["expert_cache_slots"]]
    if sum(d["placement"]["expert_cache_slots"]) == 0:
        d["placement"]["cached_experts"] = [[0], []]
    f.write_text(json.dumps(d))
    with pytest.raises(SpecError, match="cached_experts"):
        Plan.from_json(f)
