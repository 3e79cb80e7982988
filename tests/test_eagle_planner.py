"""The planner's EAGLE cost (planner/model_spec.py, planner/memory.py, planner/cost_terms.py) against what the
engine loads and runs: the head's own weights are its fc and layer (the target's embedding and LM head are
shared), a draft step multiplies through fc, the layer and the target's LM head, and the head's KV is one
layer's. Pure planner: no torch needed for any of it."""
from __future__ import annotations

import pytest

from engine_fixtures import TINY_DRAFT, TINY_MOE, have_tiny_pair
from eagle_fixtures import make_head
from specmoe.planner.cost_model import CostModel
from specmoe.planner.cost_terms import matmul_elems_per_token
from specmoe.planner.estimator import estimate
from specmoe.planner.hardware_spec import load_hardware
from specmoe.planner.memory import draft_weight_elems, shares_target_embeddings
from specmoe.planner.model_spec import ModelSpec
from specmoe.planner.workload import Workload, load_acceptance

pytestmark = pytest.mark.skipif(not have_tiny_pair(), reason="needs models/tiny-moe")
H, V = 128, 2048


def _stored_elems(d) -> int:
    """Elements of every tensor in the head's safetensors (what the engine loads of it), from the header."""
    import json
    import math
    import struct

    with open(d / "model.safetensors", "rb") as f:
        hdr = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    return sum(math.prod(v["shape"]) for k, v in hdr.items() if k != "__metadata__")


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    return make_head(tmp_path_factory.mktemp("eagle") / "head")


def test_head_weights_are_fc_and_layer_only(head):
    t, e = ModelSpec.from_hf_config(TINY_MOE), ModelSpec.from_hf_config(head)
    assert e.eagle == {"fc_bias": True, "base_model": {}}       # told by fc.bias in the weights
    assert shares_target_embeddings(t, e)
    assert draft_weight_elems(t, e) == _stored_elems(head)
    assert e.fusion_elems == 2 * H * H + H


def test_a_two_layer_head_still_shares_the_targets_embeddings(tmp_path):
    """An EAGLE head of two layers is no one-layer draft, yet it embeds and projects with the target's own
    weights: the planner counts only what its safetensors hold (fc and both layers)."""
    t, e = ModelSpec.from_hf_config(TINY_MOE), ModelSpec.from_hf_config(make_head(tmp_path / "h2", num_hidden_layers=2))
    assert e.num_layers == 2 and shares_target_embeddings(t, e)
    assert draft_weight_elems(t, e) == _stored_elems(tmp_path / "h2")


def test_check_context_refuses_a_head_of_another_width(tmp_path):
    """The workload check every plan and run makes (memory.check_context) also refuses an EAGLE head that
    cannot read the target's hidden states, naming the field; the matching head passes."""
    from specmoe.planner.errors import SpecError
    from specmoe.planner.memory import check_context

    t, wl = ModelSpec.from_hf_config(TINY_MOE), Workload(24, 16, batch=2, acceptance=load_acceptance(0.6))
    check_context(t, wl, ModelSpec.from_hf_config(make_head(tmp_path / "ok")))
    wide = ModelSpec.from_hf_config(make_head(tmp_path / "wide", hidden_size=2 * H))
    with pytest.raises(SpecError, match="config.json hidden_size"):
        check_context(t, wl, wide)


def test_a_draft_step_multiplies_fc_layer_and_the_targets_lm_head(head):
    e = ModelSpec.from_hf_config(head)
    assert matmul_elems_per_token(e) == _stored_elems(head) + V * H
    # as a plain one-layer Llama (the *-eagle presets' approximation) it would miss the fc and count two norms
    plain = ModelSpec.from_dict({**e.to_dict(), "eagle": {}})
    assert matmul_elems_per_token(e) - matmul_elems_per_token(plain) == 2 * H * H + H - 2 * H


def test_cost_model_prices_the_head_cheaper_per_step_than_the_draft_model(head):
    hw = load_hardware("devbox-2core")
    wl = Workload(24, 16, batch=8, acceptance=load_acceptance(0.6), kv_dtype="fp32", weight_dtype="fp32")
    t = ModelSpec.from_hf_config(TINY_MOE)
    e, d = ModelSpec.from_hf_config(head), ModelSpec.from_hf_config(TINY_DRAFT)
    assert CostModel(t, hw, wl, draft=e).d_mm == matmul_elems_per_token(e)
    est = {name: estimate(t, hw, wl, draft=spec, draft_len=3, batch=8, micro_batches=1, timeline=False)
           for name, spec in (("eagle", e), ("draft", d))}
    stage = {n: x.to_prediction().stages["draft.gpu"] for n, x in est.items()}
    assert 0 < stage["eagle"] < stage["draft"]
    # the head's KV: one layer of the target's KV heads
    assert e.kv_bytes_per_token(4) == 1 * 2 * 2 * 32 * 4


def test_a_plan_carries_the_head_and_its_memory(head):
    """`specmoe plan --draft DIR` costs the head from the same config: optimize at k = 2 here."""
    from specmoe.planner.optimizer import optimize

    wl = Workload(24, 16, batch=4, acceptance=load_acceptance(0.6), kv_dtype="bf16", weight_dtype="bf16")
    plan = optimize(ModelSpec.from_hf_config(TINY_MOE), load_hardware("devbox-2core"), wl,
                    draft=ModelSpec.from_hf_config(head), k_values=[2], micro_batch_values=(1,))
    assert plan.draft_len == 2 and plan.draft["eagle"] == {"fc_bias": True, "base_model": {}}
    assert plan.memory["gpu_breakdown"]["draft_weights"] == 2 * _stored_elems(head)     # bf16: 2 bytes each
