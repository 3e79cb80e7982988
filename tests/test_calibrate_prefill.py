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
