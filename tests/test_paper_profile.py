"""SpecMoEOff's Table 3 on its A30 host (Mixtral-8x7B, input 512, output 128, k = 5, two micro-batches).

Four numbers of hw_specs/a30-xeon6426y.yaml are fitted to four of the table's measured times by
scripts/derive_paper_profile.py (CPU attention, GPU MoE, others, draft model); the other five rows are
predictions of the cost model and the simulator, held here to the paper's own estimator's accuracy
(its Table 3: target 8.2%, HtoD 4.1%, draft GPU part 16.7%, draft CPU part 24.1%, iteration 9.7%).

The paper's draft length counts the tokens verified per sequence (Fig. 10: draft length 1 means no
speculation), so its k = 5 is our draft_len 4: the target verifies 5 tokens per sequence.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from specmoe.planner.cost_model import CostModel
from specmoe.planner.hardware_spec import HardwareSpec
from specmoe.planner.model_spec import load_model
from specmoe.planner.plan import Placement

ROOT = Path(__file__).resolve().parent.parent
TABLE3_S = {"target": 4.39, "target.attention": 4.29, "target.moe": 3.53, "target.h2d": 3.70, "draft": 0.56,
            "draft.gpu": 0.42, "draft.cpu": 0.54, "others": 0.097, "iteration": 5.05}
PAPER_ESTIMATOR_ERR = {"target": 0.082, "target.h2d": 0.041, "draft.gpu": 0.167, "draft.cpu": 0.241,
                       "iteration": 0.097}


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("derive_paper_profile", ROOT / "scripts" / "derive_paper_profile.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def view(script):
    return script.table3_view(script._run(HardwareSpec.preset(script.SPEC).raw))


def test_the_papers_k_verifies_five_tokens(script):
    """Fig. 10: draft length 1 is plain decoding, one token verified and none drafted; so k = 5 verifies 5."""
    assert script.PAPER_K == 5 and script.DRAFT_LEN == 4
    m = load_model("mixtral-8x7b")
    cm = CostModel(m, HardwareSpec.preset(script.SPEC), script.WL, load_model("mixtral-8x7b-eagle"))
    c = cm.iteration(100, 2, script.DRAFT_LEN, Placement(expert_cache_slots=(0,) * m.num_layers))
    assert c.tokens == 100 * 5


def test_the_fitted_rows_reproduce_table_3(view, script):
    assert set(script.FITTED_S) | set(script.PREDICTED_S) == set(TABLE3_S)
    for row in script.FITTED_S:
        assert view[row] == pytest.approx(TABLE3_S[row], rel=0.01), row


def test_the_predicted_rows_are_as_close_as_the_papers_own_estimate(view, script):
    """The rows nothing was fitted to: the target model, HtoD and the iteration within the paper's own
    estimator's error on each (rounded up to the next 5%); the draft's two parts, which the paper's
    estimator missed by 16.7% and 24.1%, within its worst row (the draft model, 26.8%)."""
    assert set(script.PREDICTED_S) == set(PAPER_ESTIMATOR_ERR)
    for row, err in PAPER_ESTIMATOR_ERR.items():
        bound = 0.268 if row.startswith("draft.") else 0.05 * -(-err // 0.05)
        assert abs(view[row] / TABLE3_S[row] - 1.0) <= bound, (row, view[row])
