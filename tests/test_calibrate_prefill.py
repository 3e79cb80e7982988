"""runtime/calibrate/prefill.py: the prompt lengths of the calibration's prefill passes, and the passes
themselves (each after the heap release every engine run starts with, one untimed pass first)."""
from __future__ import annotations

import json
import random

import pytest

from specmoe.runtime.calibrate import prefill as cp
from specmoe.runtime.calibrate.spec import DEFAULT_MODEL_DIR


@pytest.mark.parametrize("trial", range(20))
def test_prompt_lengths_spread_around_their_mean(trial):
    rng = random.Random(trial)
    B, P = rng.randint(1, 64), rng.randint(1, 200)
    lens = cp.prompt_lengths(B, P)
    assert len(lens) == B and sum(lens) == B * P and min(lens) >= 1
    if B > 1 and P >= 4:
        assert min(lens) <= 0.5 * P + 1 and max(lens) >= 1.5 * P - 1 - P / B     # the spread, not B copies of P
        assert len(set(lens)) > 1


def test_each_pass_follows_a_heap_release(monkeypatch):
    import specmoe.runtime.memory_usage as mu

    calls = []
    real = mu.release_free_heap
    monkeypatch.setattr(mu, "release_free_heap", lambda: calls.append(1) or real())
    cfg = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    r = cp.measure_prefills(cfg, rounds=2, configs=((3, 5), (2, 9)))
    assert len(calls) == 3 * 2                          # an untimed first pass and two timed, per configuration
    assert [(c["B"], c["P"], len(c["samples_s"])) for c in r["configs"]] == [(3, 5, 2), (2, 9, 2)]
    assert all(c["low_s"] == pytest.approx(min(c["samples_s"]), abs=1e-6) and c["low_s"] > 0 for c in r["configs"])
    assert all(c["median_s"] == pytest.approx(sum(c["samples_s"]) / 2, abs=1e-6) for c in r["configs"])  # 2 passes
    # each pass's target stages, timed inside it: the four a dense or MoE layer runs, each within the pass
    for c in r["configs"]:
        st = c["stages_s"]
        assert {"target.pre_attn", "target.attention", "target.post_attn", "target.moe"} <= set(st)
        assert all(v > 0 for k, v in st.items() if k != "target.h2d")
        assert sum(st.values()) <= max(c["samples_s"]) * 1.001        # each stage's median over the 2 passes


def test_passes_with_drafts_time_the_drafts_own_prefill():
    """Every (B, P) runs once with each kind of draft; the engine times the draft's own prefill as draft.gpu,
    inside the pass beside the target's stages."""
    from specmoe.runtime.calibrate.overhead import draft_config, eagle_config

    cfg = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    drafts = {"model": draft_config(cfg, None, 2), "eagle": eagle_config(cfg)}
    r = cp.measure_prefills(cfg, drafts, rounds=2, configs=((3, 5), (2, 9)))
    assert [(c["B"], c["P"], c["draft_kind"], c["draft_layers"]) for c in r["configs"]] == [
        (3, 5, "model", 2), (3, 5, "eagle", 1), (2, 9, "model", 2), (2, 9, "eagle", 1)]
    for c in r["configs"]:
        st = c["stages_s"]
        assert st["draft.gpu"] > 0 and st["target.moe"] > 0
        assert sum(st.values()) <= max(c["samples_s"]) * 1.001


def test_passes_timed_without_stages_fit_the_whole_pass_on_the_rest():
    """Samples of the whole pass only (no stage times) fit prefill and prefill.token, and nothing else."""
    from specmoe.planner.hardware_spec import load_hardware, parse_hardware
    from specmoe.planner.model_spec import ModelSpec

    cfg = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    raw_hw = load_hardware("devbox-2core-calibrated").raw
    spec = ModelSpec.from_hf_config(cfg, name="t")
    slots = [spec.num_experts if i in spec.moe_layers else 0 for i in range(spec.num_layers)]
    hw = parse_hardware(raw_hw, "x.yaml")
    L = spec.num_layers
    configs = [{"B": B, "P": P, "low_s": cp.model_prefill_s(spec, hw, "fp32", B, P, slots) + 1e-3 + 2e-6 * B * P * L}
               for B, P in cp.PREFILL_CONFIGS]
    theta, det = cp.fit_prefill({"prefill": {"expert_cache_slots": slots, "configs": configs}, "target_config": cfg,
                                 "dtype": "float32"}, lambda keys: parse_hardware(raw_hw, "x.yaml"))
    assert set(theta) == {"prefill", "prefill.token"}
    assert theta["prefill"] == pytest.approx(1e-3, rel=1e-6) and theta["prefill.token"] == pytest.approx(2e-6, rel=1e-6)
    assert max(abs(c["fit_rel_err"]) for c in det["configs"]) < 1e-6
    # passes with a median: the fit takes it, not the fastest pass
    for c in configs:
        c["median_s"], c["low_s"] = c["low_s"], 0.5 * c["low_s"]
    theta2, _ = cp.fit_prefill({"prefill": {"expert_cache_slots": slots, "configs": configs}, "target_config": cfg,
                                "dtype": "float32"}, lambda keys: parse_hardware(raw_hw, "x.yaml"))
    assert theta2 == pytest.approx(theta, rel=1e-6)
