"""Checks written for mutants that survived scripts/mutation_check.sh (bench/results/mutation_survivors.txt):
each pins a value a surviving mutant changed, worked out by hand."""
from __future__ import annotations

import pytest

from specmoe.planner.cost_terms import matmul_elems_per_token, touched_experts
from specmoe.planner.model_spec import load_model


def test_a_one_expert_layer_touches_its_expert():
    # E = 1, top-1: every token routes to the one expert, so any tokens touch exactly 1 (not 0)
    assert touched_experts(1, 1, 5) == 1.0
    assert touched_experts(1, 1, 0.5) == 1.0
    assert touched_experts(8, 2, 0) == 0.0 and touched_experts(0, 2, 10) == 0.0
    assert touched_experts(8, 2, 1) == pytest.approx(2.0)        # 8 (1 - (6/8)^1)


def test_a_tied_embedding_is_multiplied_once_as_the_lm_head():
    tied, untied = load_model("qwen3-0.6b"), load_model("mistral-7b")
    assert tied.tie_word_embeddings and not untied.tie_word_embeddings
    # tied: the lookup table is not multiplied, but it is the LM head: active - E + E = active (596,042,752)
    assert matmul_elems_per_token(tied) == 596_042_752.0 == float(tied.active_params)
    # untied: the input embedding (vocab 32000 x 4096) is a lookup only; the separate LM head is in active
    assert matmul_elems_per_token(untied) == float(untied.active_params - 32000 * 4096)
