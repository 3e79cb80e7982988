"""planner/fleet.py: a job's prompts shared among host kinds, worked by hand on small cases; the
share on real plans finishes every kind together; the CLI's --fleet --dry-run."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from specmoe.planner.errors import SpecError
from specmoe.planner.fleet import FleetJob, fleet, host_time, parse_hosts, share, split


class _Plan:
    """A stand-in plan with an affine host time T(n) = a n + b (b: the drain), a per-prompt cost a."""

    def __init__(self, a, b, batch=8):
        self.a, self.b, self.batch = a, b, batch
        self.draft_len, self.micro_batches = 0, 1
        self.predicted = SimpleNamespace(job={}, decode_tokens_per_s=batch / a)


def _affine(plan, n, prompt_len, gen_len, call_size):
    if n <= 0:
        return 0.0
    if call_size is not None and n > call_size:
        full, rest = divmod(n, call_size)
        return full * _affine(plan, call_size, prompt_len, gen_len, None) + _affine(plan, rest, prompt_len, gen_len, None)
    return plan.a * n + plan.b


def test_split_is_proportional_and_exact():
    # weights 2 x 3 = 6 and 1 x 6 = 6: 10 prompts split 5 / 5; 7 prompts: 3.5 / 3.5 -> the first gets the remainder
    assert split(10, [3.0, 6.0], [2, 1]) == [5, 5]
    assert split(7, [3.0, 6.0], [2, 1]) == [4, 3]
    assert sum(split(1_000_003, [1.7, 0.3, 2.9], [5, 11, 2])) == 1_000_003
    with pytest.raises(SpecError):
        split(10, [0.0], [1])


def test_share_by_hand_without_drain():
    # A: 1 s per prompt, B: 3 s per prompt, one host each, no drain: the fixed point gives A three times B's
    # prompts, 12 prompts -> 9 and 3, both done at 9 s
    job = FleetJob(12, 10, 10)
    n = share([_Plan(1.0, 0.0), _Plan(3.0, 0.0)], [1, 1], job, time_of=_affine)
    assert n == [9, 3]


def test_share_by_hand_with_drain_priced_in():
    # T_A(n) = n + 6, T_B(n) = n + 0, one host each, 20 prompts. Equal finish: n_A + 6 = n_B and n_A + n_B = 20
    # -> n_A = 7, n_B = 13, both at 13 s (proportion to steady rate alone would give 10 / 10: A done at 16 s)
    job = FleetJob(20, 10, 10)
    n = share([_Plan(1.0, 6.0), _Plan(1.0, 0.0)], [1, 1], job, time_of=_affine)
    assert n == [7, 13]
    f = fleet("m", [(_Plan(1.0, 6.0), 1), (_Plan(1.0, 0.0), 1)], job, time_of=_affine,
              optimize_fn=lambda m, spec, wl, draft=None: spec)
    assert f.completion_time_s == pytest.approx(13.0)
    assert f.tokens_per_s == pytest.approx(20 * 10 / 13.0)


def test_counts_split_a_kind_over_its_hosts():
    # 2 hosts of A (2 s per prompt) and 1 of B (1 s per prompt): per-host rates 1/2 and 1; weights 1 and 1;
    # 30 prompts -> 15 for A's two hosts (8 for the busiest: 16 s) and 15 for B (15 s); done at 16 s
    job = FleetJob(30, 10, 10)
    f = fleet("m", [(_Plan(2.0, 0.0), 2), (_Plan(1.0, 0.0), 1)], job, time_of=_affine,
              optimize_fn=lambda m, spec, wl, draft=None: spec)
    assert [k.prompts for k in f.kinds] == [15, 15]
    assert [k.prompts_per_host for k in f.kinds] == [8, 15]
    assert f.completion_time_s == pytest.approx(16.0)


def test_call_size_drains_every_call():
    # T(n) = n + 4 per call; 10 prompts in calls of 4: 4 + 4 + 2 -> 8 + 8 + 6 = 22 s (one stream: 14 s)
    assert _affine(_Plan(1.0, 4.0), 10, 1, 1, 4) == 22.0
    job = FleetJob(10, 10, 10)
    f = fleet("m", [(_Plan(1.0, 4.0), 1)], job, call_size=4, time_of=_affine,
              optimize_fn=lambda m, spec, wl, draft=None: spec)
    assert f.completion_time_s == pytest.approx(22.0)


def test_host_time_is_the_estimators_job_time():
    """host_time(plan, n) is the planner's own prefill + decode time of an n-prompt job at the plan's
    configuration: with the drain, n prompts take longer than n / steady rate."""
    from specmoe.planner.optimizer import optimize
    from specmoe.planner.workload import Workload, load_acceptance

    wl = Workload(128, 64, acceptance=load_acceptance(0.8), num_prompts=200)
    plan = optimize("mixtral-8x7b", "a30-xeon6426y", wl, k_values=(2,), micro_batch_values=(1, 2))
    t = host_time(plan, 200)
    job = plan.predicted.job
    assert t == pytest.approx(job["prefill_time_s"] + job["decode_time_s"], rel=1e-6)
    # more prompts cost more; the drain makes the per-prompt time of a short job higher than of a long one
    t2 = host_time(plan, 4000)
    assert t2 > t and t / 200 > t2 / 4000


def _quick_optimize(model, spec, wl, draft=None):
    from specmoe.planner.optimizer import optimize

    return optimize(model, spec, wl, draft=draft, k_values=(0, 2), micro_batch_values=(1, 2))


def test_fleet_on_two_real_host_kinds_finishes_together():
    job = FleetJob(20_000, 128, 64, 0.8)
    f = fleet("mixtral-8x7b", [("h200-host", 2), ("a30-xeon6426y", 4)], job, optimize_fn=_quick_optimize)
    a, b = f.kinds
    assert a.prompts + b.prompts == 20_000
    assert a.prompts_per_host > b.prompts_per_host          # the H200 host is the faster one
    # every kind finishes within one prompt's time of the others: the shares are at their fixed point
    slack = max(k.time_s / k.prompts_per_host for k in f.kinds)
    assert abs(a.time_s - b.time_s) <= 2 * slack
    assert f.completion_time_s == max(a.time_s, b.time_s)
    assert f.tokens_per_s == pytest.approx(20_000 * 64 / f.completion_time_s)
    # each kind's time is its own plan's job time at its share (recomputed independently)
    for k, plan in zip(f.kinds, f.plans):
        assert k.time_s == pytest.approx(host_time(plan, k.prompts_per_host, 128, 64))
    # the fleet is faster than either kind alone
    alone = fleet("mixtral-8x7b", [("a30-xeon6426y", 4)], job, optimize_fn=_quick_optimize)
    assert f.completion_time_s < alone.completion_time_s


def test_parse_hosts():
    assert parse_hosts("h200-host:64, a30-xeon6426y:256") == [("h200-host", 64), ("a30-xeon6426y", 256)]
    assert parse_hosts("h200-host") == [("h200-host", 1)]
    for bad in ("h200-host:x", "h200-host:0", ""):
        with pytest.raises(SpecError):
            parse_hosts(bad)


@pytest.mark.slow
def test_cli_fleet_dry_run(capsys):
    from specmoe.runtime.cli.main import main

    code = main(["job", "--fleet", "h200-host:2,a30-xeon6426y:4", "--model", "mixtral-8x7b", "--num-prompts",
                 "20000", "--prompt-len", "128", "--gen-len", "64", "--acceptance", "0.8", "--dry-run",
                 "--format", "json"])
    assert code == 0
    d = json.loads(capsys.readouterr().out)
    assert sum(k["prompts"] for k in d["kinds"]) == 20000
    assert d["completion_time_s"] == max(k["time_s"] for k in d["kinds"])
    assert math.isclose(d["tokens_per_s"], 20000 * 64 / d["completion_time_s"])
    assert main(["job", "--fleet", "h200-host:2", "--model", "mixtral-8x7b", "--num-prompts", "10",
                 "--prompt-len", "8", "--gen-len", "8"]) == 2         # --fleet without --dry-run is refused
