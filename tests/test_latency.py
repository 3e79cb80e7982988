"""Per-token latencies (runtime/latency.py) worked by hand, and as the engine records them."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from engine_fixtures import one_thread_per_module  # noqa: F401 (autouse: one torch thread)
from specmoe.runtime import latency as L


def test_summary_and_acceptance_by_position_by_hand():
    s = L.summary_ms([0.001 * i for i in range(1, 101)])     # 1..100 ms
    assert s["mean"] == pytest.approx(50.5) and s["median"] == pytest.approx(50.5) and s["p99"] == pytest.approx(99.0)
    assert L.summary_ms([]) == {"mean": 0.0, "median": 0.0, "p99": 0.0, "n": 0}
    # 10 verifications at k = 3: accepted 0 x4, 1 x3, 2 x2, 3 x1
    assert L.acceptance_by_position({0: 4, 1: 3, 2: 2, 3: 1}) == pytest.approx([0.6, 0.3, 0.1])
    assert L.acceptance_by_position({}) == []


def test_tracker_spreads_an_emission_over_its_tokens(monkeypatch):
    clock = iter([1.0, 1.5, 2.5, 3.0])        # prefill, two iterations, then finish reads no clock
    monkeypatch.setattr(L.time, "perf_counter", lambda: next(clock))
    t = L.LatencyTracker(t_start=0.0)
    s = SimpleNamespace(generated=[7])
    t.prefilled([s])                           # first token at 1.0
    s.generated += [8, 9, 10]
    t.emitted([s])                             # three more at 1.5: 0.5 s over 3 tokens
    s.generated += [11]
    t.emitted([s])                             # one more at 2.5
    t.finished(s)
    assert t.ttft == [1.0]
    assert t.itl == pytest.approx([0.5 / 3] * 3 + [1.0])
    assert t.tpot == pytest.approx([(2.5 - 1.0) / 4])
    assert sum(t.itl) == pytest.approx(2.5 - 1.0)          # ITL adds up to the sequence's decode time


def test_the_run_record_carries_latency_and_acceptance_by_position(tmp_path):
    from engine_fixtures import add_tokenizer, make_pair
    from specmoe.runtime.engine import Engine, plan_for_checkpoint

    t, d = make_pair(tmp_path, "mixtral", "llama", seed=4)
    add_tokenizer(t)
    eng = Engine(plan_for_checkpoint(t, d, "devbox-2core", batch=2, draft_len=2), t, d)
    r = eng.generate([[5, 6, 7], [40], [9, 10]], max_new_tokens=5).record      # 3 prompts in 2 rows: one waits
    lat = r.latency
    assert lat["ttft_ms"]["n"] == 3 and lat["tpot_ms"]["n"] == 3
    assert lat["itl_ms"]["n"] == r.generated_tokens - 3                       # every token after the first
    assert lat["ttft_ms"]["p99"] > lat["ttft_ms"]["median"] > 0                # the third prompt waited for a row
    hist = {int(a): n for a, n in r.acceptance_histogram.items()}
    assert r.acceptance_by_position == pytest.approx(L.acceptance_by_position(hist))
    assert len(r.acceptance_by_position) == max(hist) and r.acceptance_by_position == sorted(
        r.acceptance_by_position, reverse=True)
