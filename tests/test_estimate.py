"""estimate(): every MoE preset on two hosts gives a consistent estimate or one clear SpecError."""
from __future__ import annotations

import json

import pytest

from specmoe.planner import Placement, Plan, Workload, estimate, load_acceptance, load_hardware, load_model
from specmoe.planner.errors import InfeasibleError, SpecError
from specmoe.planner.model_spec import DEFAULT_DRAFTS
from specmoe.planner.stages import ITERATION_PARTS, STAGE_NAMES

WL = Workload(566, 1024, acceptance=load_acceptance(0.8))


# the presets whose routed experts alone (bf16) exceed the host's usable memory: mixtral-8x22b's 56 x 8
# experts of 3 x 6144 x 16384 are 252 GiB, dbrx's 40 x 16 of 3 x 6144 x 10752 are 236.25 GiB, against 244 GiB
# usable on the A30 host and 122 GiB on the H200 host
TOO_BIG = {("mixtral-8x22b", "a30-xeon6426y"), ("mixtral-8x22b", "h200-host"), ("dbrx", "h200-host")}
ACC3 = 0.8 + 0.8 ** 2 + 0.8 ** 3          # acc(3) at a per-token rate of 0.8: 1.952 drafts accepted


@pytest.mark.parametrize("model", sorted(DEFAULT_DRAFTS))
@pytest.mark.parametrize("hw", ["a30-xeon6426y", "h200-host"])
def test_every_moe_preset(model, hw):
    m, h = load_model(model), load_hardware(hw)
    assert (m.routed_expert_elems_total * 2 > h.cpu.usable_bytes) == ((model, hw) in TOO_BIG)
    if (model, hw) in TOO_BIG:
        with pytest.raises(InfeasibleError, match=r"^cpu memory: .*the pinned experts alone exceed it"):
            estimate(model, hw, WL, draft_len=3, run=False)
        return
    e = estimate(model, hw, WL, draft_len=3, run=False)
    assert e.draft == DEFAULT_DRAFTS[model]
    # B (1 + acc(3)) tokens per iteration, acc(3) worked by hand
    assert e.tokens_per_iteration == pytest.approx(e.batch * (1 + ACC3), rel=1e-12)
    # the simulated iteration lies between its busiest single resource's stream of experts and all
    # stages run one after another
    parts = sum(e.stages[s.value] for s in ITERATION_PARTS)
    assert e.stages["target.h2d"] <= e.iteration_time_s * (1 + 1e-9) and e.iteration_time_s <= parts * (1 + 1e-9)
    assert set(e.stages) <= set(STAGE_NAMES)
    assert e.memory["gpu_bytes"] <= e.memory["gpu_usable_bytes"]
    assert e.memory["cpu_bytes"] <= e.memory["cpu_usable_bytes"]
    assert e.bound in ("gpu", "cpu", "pcie") and 0 <= e.moe_gpu_utilization < 1
    assert e.source == "measured"                  # both hosts carry measured rates
    json.dumps(e.to_dict())


def test_estimate_feeds_a_plan():
    m, hw = load_model("mixtral-8x7b"), load_hardware("a30-xeon6426y")
    e = estimate(m, hw, WL, draft_len=4, batch=256)
    assert e.batch == 256 and e.prefill_time_s > 0 and e.end_to_end_tokens_per_s > 0
    assert e.timeline and e.stages["prefill"] == e.prefill_time_s
    plan = Plan(model=m.to_dict(), hardware=hw.raw, workload=WL.to_dict(), draft=load_model(e.draft).to_dict(),
                batch=e.batch, micro_batches=e.micro_batches, draft_len=e.draft_len, placement=e.placement,
                predicted=e.to_prediction(), memory=e.memory, bound=e.bound, frontier={"by_k": [], "by_batch": []})
    assert Plan.from_dict(json.loads(plan.to_json())) == plan


def test_dense_target_and_options():
    e = estimate("mistral-7b", "a30-xeon6426y", WL, batch=64, run=False)
    assert e.stages["target.moe"] == 0 and e.stages["target.h2d"] == 0
    a = estimate("mixtral-8x7b", "a30-xeon6426y", WL, draft_len=4, batch=300, micro_batches=3, run=False)
    b = estimate("mixtral-8x7b", "a30-xeon6426y", WL, draft_len=4, batch=300, micro_batches=3, run=False,
                 prefetch=True)
    assert b.iteration_time_s <= a.iteration_time_s
    c = estimate("mixtral-8x7b", "a30-xeon6426y", WL, draft_len=4, batch=300, micro_batches=3, run=False,
                 overlap_draft=True, batched_moe=True)
    assert c.options["overlap_draft"] and c.options["batched_moe"]


@pytest.mark.parametrize("kw,match", [
    (dict(micro_batches=9, batch=4), "micro_batches"), (dict(draft_len=-1), "draft_len"),
    (dict(batch=0), "batch"), (dict(placement="all on gpu"), "placement"),
    (dict(placement=Placement(expert_cache_slots=(8,) * 32), batch=64), "gpu memory"),
    (dict(draft_len=2, draft="no-such-draft"), "model"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(SpecError, match=match):
        estimate("mixtral-8x7b", "a30-xeon6426y", WL, run=False, **kw)
    with pytest.raises(SpecError, match="workload"):
        estimate("mixtral-8x7b", "a30-xeon6426y", {"prompt_len": 5}, run=False)
