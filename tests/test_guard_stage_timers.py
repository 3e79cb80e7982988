"""Stage attribution in the run record, by counted operations (issue 15).

The engine's StageTimer reads a fake clock that only moves when one of the target's stage functions
runs, each by its own power of ten: pre_attn 1 s, post_attn 1e3 s, moe 1e6 s, lm_head 1e9 s. The run
record must then hold, under each stage's name, exactly (calls of that function) x its step, over
decode (stage_totals_s) and prefill (prefill_stage_totals_s) together; a time filed under the wrong
stage name moves a whole power of ten. No wall clock is read by the checks.
"""
from __future__ import annotations

import time as real_time

import pytest

from engine_fixtures import one_thread_per_module  # noqa: F401 (autouse: one torch thread)
from engine_fixtures import make_pair
from specmoe.runtime import run_record
from specmoe.runtime.engine import Engine, plan_for_checkpoint
from specmoe.runtime.model.target import TargetModel

STEPS = {"pre_attn": 1.0, "post_attn": 1e3, "moe": 1e6, "lm_head": 1e9}
STAGE = {"pre_attn": "target.pre_attn", "post_attn": "target.post_attn", "moe": "target.moe",
         "lm_head": "target.lm_head"}


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def __getattr__(self, name):          # everything else of the time module stays real
        return getattr(real_time, name)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("timers"), "mixtral", "llama", seed=2, scale=0.9)


@pytest.fixture()
def counted(monkeypatch):
    clock, calls = FakeClock(), {name: 0 for name in STEPS}
    monkeypatch.setattr(run_record, "time", clock)

    def wrap(name):
        orig = getattr(TargetModel, name)

        def f(self, *a, **kw):
            calls[name] += 1
            clock.now += STEPS[name]
            return orig(self, *a, **kw)
        monkeypatch.setattr(TargetModel, name, f)

    for name in STEPS:
        wrap(name)
    return calls


@pytest.mark.parametrize("streaming,m", [("off", 1), ("off", 3), ("next", 2)])
def test_each_stage_gets_exactly_its_own_time(pair, counted, streaming, m):
    t, d = pair
    plan = plan_for_checkpoint(t, d, "devbox-2core", batch=4, draft_len=2, micro_batches=m, draft_kv_gpu_sequences=2)
    eng = Engine(plan, t, d, prefetch_next_layer=streaming)
    assert eng.expert_streaming() == streaming
    r = eng.generate([[5, 6, 7], [9, 10], [20, 21, 22, 23], [40], [50, 51]], max_new_tokens=8)
    rec = r.record
    assert all(counted[n] > 0 for n in STEPS), counted
    for name, step in STEPS.items():
        got = rec.stage_totals_s[STAGE[name]] + rec.prefill_stage_totals_s.get(STAGE[name], 0.0)
        assert got == counted[name] * step, (name, got, counted)
    # the attention, the acceptance and the draft run none of the counted functions
    for other in ("target.attention", "verify.accept", "draft.gpu", "draft.cpu"):
        assert rec.stage_totals_s[other] == 0.0, other
    # the per-iteration means are the decode totals over the iterations
    for name in STEPS:
        assert rec.stages[STAGE[name]] == pytest.approx(rec.stage_totals_s[STAGE[name]] / rec.iterations)
