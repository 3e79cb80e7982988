"""Plan JSON round-trip and validation of hand-edited, truncated or foreign plan files."""
from __future__ import annotations

import json

import pytest

from specmoe.planner.errors import SpecError
from specmoe.planner.hardware_spec import HardwareSpec
from specmoe.planner.model_spec import ModelSpec
from specmoe.planner.plan import SCHEMA_VERSION, Placement, Plan, Prediction
from specmoe.planner.stages import STAGE_NAMES, Stage, parse_stage
from specmoe.planner.workload import Workload, load_acceptance


def _plan(**over) -> Plan:
    m = ModelSpec.preset("mixtral-8x7b")
    d = ModelSpec.preset("mistral-7b")
    hw = HardwareSpec.preset("a30-xeon6426y")
    wl = Workload(566, 1024, acceptance=load_acceptance(0.8))
    kw = dict(
        model=m.to_dict(), draft=d.to_dict(), hardware=hw.raw, workload=wl.to_dict(),
        batch=64, micro_batches=2, draft_len=4,
        placement=Placement(expert_cache_slots=tuple([1] * m.num_layers), draft_kv_gpu_sequences=10),
        predicted=Prediction(iteration_time_s=1.5, decode_tokens_per_s=100.0,
                             stages={Stage.TARGET_MOE.value: 0.5, Stage.ITERATION.value: 1.5}),
        memory={"gpu_bytes": 1, "cpu_bytes": 2}, bound="pcie", frontier={"by_k": [], "by_batch": []},
    )
    kw.update(over)
    return Plan(**kw)


def test_round_trip(tmp_path):
    p = _plan()
    f = tmp_path / "plan.json"
    p.to_json(f)
    q = Plan.from_json(f)
    assert q == p
    d = json.loads(f.read_text())
    for key in ("schema_version", "batch", "micro_batches", "draft_len", "placement", "predicted", "bound", "frontier"):
        assert key in d
    assert d["schema_version"] == SCHEMA_VERSION
    assert q.model_spec().total_params == ModelSpec.preset("mixtral-8x7b").total_params


def test_hand_edit_detected(tmp_path):
    f = tmp_path / "plan.json"
    _plan().to_json(f)
    d = json.loads(f.read_text())
    d["model"]["num_experts"] = 16
    f.write_text(json.dumps(d))
    with pytest.raises(SpecError, match="input_hashes.model"):
        Plan.from_json(f)


@pytest.mark.parametrize("field,value,match", [
    ("batch", 0, "batch"), ("micro_batches", 1000, "micro_batches"), ("draft_len", -1, "draft_len"),
    ("bound", "disk", "bound"), ("schema_version", 99, "schema_version"),
])
def test_inconsistent_fields(tmp_path, field, value, match):
    f = tmp_path / "plan.json"
    _plan().to_json(f)
    d = json.loads(f.read_text())
    d[field] = value
    f.write_text(json.dumps(d))
    with pytest.raises(SpecError, match=match):
        Plan.from_json(f)


def test_truncated_and_missing(tmp_path):
    f = tmp_path / "plan.json"
    text = _plan().to_json()
    f.write_text(text[: len(text) // 2])
    with pytest.raises(SpecError, match="not valid JSON"):
        Plan.from_json(f)
    d = json.loads(text)
    del d["placement"]
    f.write_text(json.dumps(d))
    with pytest.raises(SpecError, match="placement"):
        Plan.from_json(f)
    with pytest.raises(SpecError, match="cannot read"):
        Plan.from_json(tmp_path / "missing.json")


def test_placement_checked_against_model():
    with pytest.raises(SpecError, match="expert_cache_slots"):
        _plan(placement=Placement(expert_cache_slots=(1, 2)))
    with pytest.raises(SpecError, match=r"expert_cache_slots\[0\]"):
        _plan(placement=Placement(expert_cache_slots=tuple([9] * 32)))
    with pytest.raises(SpecError, match="draft_kv_gpu_sequences"):
        _plan(placement=Placement(expert_cache_slots=tuple([0] * 32), draft_kv_gpu_sequences=65))
    with pytest.raises(SpecError, match="draft"):
        _plan(draft=None)


def test_stage_vocabulary():
    assert "target.attention" in STAGE_NAMES and "iteration" in STAGE_NAMES
    assert parse_stage("target.h2d") is Stage.TARGET_H2D
    assert f"{Stage.DRAFT_CPU}" == "draft.cpu"
    with pytest.raises(ValueError, match="valid stage names"):
        parse_stage("target.mlp")
    with pytest.raises(SpecError, match="predicted.stages.bogus"):
        Prediction.from_dict({"iteration_time_s": 1, "decode_tokens_per_s": 1, "stages": {"bogus": 1}})
