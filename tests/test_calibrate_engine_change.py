"""Stages are costed from what the engine does: calibration counts the torch operations each stage issues
(a profiler pass of the engine's own code), so an engine that does more work in a stage is measured doing
it, and a changed engine source is a new calibration (the cache key holds the sources' hash)."""
from __future__ import annotations

from engine_fixtures import one_thread_per_module  # noqa: F401 (autouse: one torch thread)
from specmoe.runtime.calibrate import spec as cspec
from specmoe.runtime.calibrate.overhead import measure_stage_overheads

CONFIG = ((4, 1, 1, 1, 0, "full"),)          # B 4, k 1, m 1, a one-layer draft, target KV on the host


def _ops(cfgs) -> dict:
    r = measure_stage_overheads(cfgs["target"], {int(k): v for k, v in cfgs["drafts"].items()}, rounds=1,
                                per_round=1, warmup=1, configs=CONFIG)
    return r["configs"][0]["ops"]


def test_work_added_to_a_stage_is_counted_in_that_stage(monkeypatch):
    import torch

    from specmoe.runtime.model.target import TargetModel

    cfgs = cspec.engine_configs(cspec.resolve_model_config(None))
    before = _ops(cfgs)
    inner = TargetModel.post_attn

    def heavier(self, layer, h, o):          # 7 more torch operations per post-attention call
        for _ in range(7):
            h = torch.add(h, 0.0)
        return inner(self, layer, h, o)

    monkeypatch.setattr(TargetModel, "post_attn", heavier)
    after = _ops(cfgs)
    layers = cfgs["target"]["num_hidden_layers"]
    calls = (after["target.post_attn"] - before["target.post_attn"]) // 7
    assert (after["target.post_attn"] - before["target.post_attn"]) % 7 == 0 and calls >= layers
    assert {k: v for k, v in after.items() if k != "target.post_attn"} == \
        {k: v for k, v in before.items() if k != "target.post_attn"}          # no other stage moved


def test_a_changed_engine_source_is_a_new_calibration(monkeypatch, tmp_path):
    src = tmp_path / "runtime"
    for f in cspec.ENGINE_SOURCES:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        (src / f).write_bytes((cspec.REPO_ROOT / "runtime" / f).read_bytes())
    monkeypatch.setattr(cspec, "REPO_ROOT", tmp_path)
    sha = cspec.kernel_source_sha()
    (src / "model" / "target.py").write_text((src / "model" / "target.py").read_text() + "\n# one more line\n")
    assert cspec.kernel_source_sha() != sha
    assert "model/target.py" in cspec.ENGINE_SOURCES and "speculative.py" in cspec.ENGINE_SOURCES


def test_each_draft_kv_part_is_timed_in_its_own_stage():
    """A configuration with the draft KV split (2 of 4 sequences on the device) times draft.gpu and
    draft.cpu apart, with the host part's catch-up recorded beside the device part's; all on the device
    or all on the host times only that part's stage. The fit needs both stages (draft.cpu's fixed costs
    are fitted from these, not borrowed from draft.gpu's)."""
    cfgs = cspec.engine_configs(cspec.resolve_model_config(None))
    r = measure_stage_overheads(cfgs["target"], {int(k): v for k, v in cfgs["drafts"].items()}, rounds=1,
                                per_round=2, warmup=1,
                                configs=((4, 2, 1, 1, 0, "full", 2), (4, 2, 1, 1, 0, "full"), (4, 2, 1, 1, 0, "full", 0)))
    split, device, host = r["configs"]
    assert (split["draft_kv_gpu"], device["draft_kv_gpu"], host["draft_kv_gpu"]) == (2, 4, 0)
    assert split["median_s"]["draft.gpu"] > 0 and split["median_s"]["draft.cpu"] > 0
    assert device["median_s"]["draft.gpu"] > 0 and device["median_s"]["draft.cpu"] == 0
    assert host["median_s"]["draft.cpu"] > 0 and host["median_s"]["draft.gpu"] == 0
    assert split["ops"]["draft.cpu"] > 0 and "draft.cpu" not in device["ops"]
    assert 0.0 <= split["catchup_host_per_iteration"] <= 1.0 and host["catchup_per_iteration"] == 0.0


def test_an_eagle_head_is_timed_as_the_engine_runs_it():
    """Configurations of kind "eagle" run an EAGLE head built on the configuration's own target (its
    embedding and LM head), not a draft model: its draft stages issue the head's operations (the fusion
    of embedding and feature, one layer with no norm before it), a different count from a one-layer
    draft model's; both parts are timed, and a sequence that accepted all k drafts has k + 1 pairs
    pending (recorded as the part's catch-up)."""
    cfgs = cspec.engine_configs(cspec.resolve_model_config(None))
    r = measure_stage_overheads(cfgs["target"], {int(k): v for k, v in cfgs["drafts"].items()}, rounds=1,
                                per_round=3, warmup=1,
                                configs=((4, 2, 1, 1, 0, "full", 2, "eagle"), (4, 2, 1, 1, 0, "full", 2)))
    eagle, model = r["configs"]
    assert (eagle["draft_kind"], model["draft_kind"]) == ("eagle", "model")
    assert r["eagle_config"]["hidden_size"] == cfgs["target"]["hidden_size"]
    assert eagle["median_s"]["draft.gpu"] > 0 and eagle["median_s"]["draft.cpu"] > 0
    assert eagle["ops"]["draft.gpu"] != model["ops"]["draft.gpu"]
    assert 0.0 <= eagle["catchup_per_iteration"] <= 1.0 and 0.0 <= eagle["catchup_host_per_iteration"] <= 1.0


def test_a_target_without_an_eagle_head_loses_only_the_eagle_configurations(monkeypatch):
    from specmoe.runtime.model import eagle

    def refuse(*args, **kwargs):
        raise NotImplementedError("no EAGLE head for this family")

    monkeypatch.setattr(eagle.EagleHead, "__init__", refuse)
    cfgs = cspec.engine_configs(cspec.resolve_model_config(None))
    r = measure_stage_overheads(cfgs["target"], {int(k): v for k, v in cfgs["drafts"].items()}, rounds=1,
                                per_round=1, warmup=1,
                                configs=((4, 2, 1, 1, 0, "full", 2, "eagle"), (4, 2, 1, 1, 0, "full", 2)))
    assert [c["draft_kind"] for c in r["configs"]] == ["model"]
