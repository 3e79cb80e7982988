"""estimate(): every MoE preset on two hosts gives a consistent estimate or one clear SpecError."""
from __future__ import annotations

import json

import pytest

from specmoe.planner import Placement, Plan, Workload, estimate, load_acceptance, load_hardware, load_model
from specmoe.planner.errors import InfeasibleError, SpecError
from specmoe.planner.model_spec import DEFAULT_DRAFTS
from specmoe.planner.stages import STAGE_NAMES

WL = Workload(566, 1024, acceptance=load_acceptance(0.8))


@pytest.mark.parametrize("model", sorted(DEFAULT_DRAFTS))
@pytest.mark.parametrize("hw", ["a30-xeon6426y", "h200-host"])
def test_every_moe_preset(model, hw):
    try:
        e = estimate(model, hw, WL, draft_len=3, run=False)
    except InfeasibleError as err:
        assert str(err).startswith(("cpu memory", "gpu memory"))
        return
    assert e.draft == DEFAULT_DRAFTS[model]
    assert e.decode_tokens_per_s == pytest.approx(e.tokens_per_iteration / e.iteration_time_s)
    assert set(e.stages) <= set(STAGE_NAMES)
    assert e.memory["gpu_bytes"] <= e.memory["gpu_usable_bytes"]
    assert e.memory["cpu_bytes"] <= e.memory["cpu_usable_bytes"]
    assert e.bound in ("gpu", "cpu", "pcie") and 0 <= e.moe_gpu_utilization < 1
    assert e.source == ("measured" if hw in ("h200-host", "a30-xeon6426y") else "peak")
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
