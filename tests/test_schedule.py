"""The plan is the contract: it carries the schedule the planner costed, the engine runs exactly that
schedule, and a run-time override makes a new plan (re-estimated) that the run is reported against."""
from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
import torch

from engine_fixtures import one_thread_per_module  # noqa: F401 (autouse: one torch thread)
from engine_fixtures import add_tokenizer, make_pair
from specmoe.planner.errors import SpecError
from specmoe.planner.estimator import estimate
from specmoe.planner.hardware_spec import load_hardware, parse_hardware
from specmoe.planner.optimizer import optimize
from specmoe.planner.plan import Plan
from specmoe.planner.schedule import Schedule, default_schedule
from specmoe.planner.workload import Workload, load_acceptance
from specmoe.runtime.cli.main import main
from specmoe.runtime.engine import Engine, plan_for_checkpoint


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    t, d = make_pair(tmp_path_factory.mktemp("sched"), "mixtral", "llama", seed=5, scale=0.9)
    add_tokenizer(t)
    return t, d


def test_default_schedule_follows_the_hardware():
    gpu, cpu = load_hardware("h200-host-calibrated"), load_hardware("devbox-2core-calibrated")
    assert default_schedule(gpu) == Schedule("next", "per_layer", "per_layer", False, "pinned", 16)
    assert default_schedule(cpu) == Schedule("off", "per_micro_batch", "per_layer", False, "direct", 2)
    assert default_schedule(load_hardware("a30-xeon6426y")).cpu_threads == 16      # no calibration: its cores
    with pytest.raises(SpecError, match=r"schedule\.pre_post"):
        Schedule(pre_post="sometimes")


def test_optimizer_costs_the_schedule_it_writes():
    """The plan's prediction is the estimate of its configuration under its own schedule, and a plan
    fixed to another schedule predicts differently (the schedule changes the time)."""
    wl = Workload(566, 1024, acceptance=load_acceptance(0.8))
    kw = dict(k_values=(0, 4), micro_batch_values=(2, 4), alternatives=0, timeline=False)
    plan = optimize("mixtral-8x7b", "h200-host", wl, **kw)
    assert plan.schedule == default_schedule(load_hardware("h200-host"))
    assert plan.to_dict()["schedule"]["expert_streaming"] == "next"
    e = estimate(plan.model_spec(), plan.hardware_spec(), wl, draft=plan.draft_spec(), draft_len=plan.draft_len,
                 micro_batches=plan.micro_batches, placement=plan.placement, batch=plan.batch, timeline=False,
                 schedule=plan.schedule)
    assert plan.predicted.iteration_time_s == pytest.approx(e.iteration_time_s, rel=1e-9)
    off = optimize("mixtral-8x7b", "h200-host", wl, schedule=replace(plan.schedule, expert_streaming="off",
                                                                      pre_post="per_micro_batch"), **kw)
    assert off.schedule.expert_streaming == "off"
    assert off.predicted.iteration_time_s != pytest.approx(plan.predicted.iteration_time_s, rel=1e-3)


def test_plan_json_carries_the_schedule_and_refuses_old_schemas(tmp_path):
    wl = Workload(64, 32, acceptance=load_acceptance(0.5))
    plan = optimize("qwen3-30b-a3b", "h200-host", wl, k_values=(0, 1), micro_batch_values=(1,), alternatives=0,
                    timeline=False)
    p = tmp_path / "plan.json"
    plan.to_json(p)
    back = Plan.from_json(p)
    assert back.schedule == plan.schedule
    d = json.loads(p.read_text())
    d["schema_version"] = 1
    d.pop("schedule")
    (tmp_path / "old.json").write_text(json.dumps(d))
    with pytest.raises(SpecError, match=r"schema_version.*older plans do not say how the engine runs them"):
        Plan.from_json(tmp_path / "old.json")


def test_engine_runs_the_plans_schedule_and_records_it(pair):
    t, d = pair
    plan = plan_for_checkpoint(t, d, "devbox-2core", batch=3, draft_len=2, micro_batches=2)
    assert plan.schedule.cpu_threads == torch.get_num_threads() == 1
    eng = Engine(plan, t, d)
    r = eng.generate([[5, 6, 7], [40], [9, 10]], max_new_tokens=4)
    assert r.record.schedule == plan.schedule.to_dict() and not r.record.replanned and eng.plan is plan
    assert r.record.expert_streaming == "off" and torch.get_num_threads() == 1


def test_a_schedule_this_machine_cannot_run_is_refused(pair):
    t, d = pair
    plan = plan_for_checkpoint(t, d, "devbox-2core", batch=3, draft_len=2, micro_batches=2)
    gpu_sched = default_schedule(load_hardware("h200-host")).with_changes(cpu_threads=1)
    with pytest.raises(SpecError, match=r"plan\.schedule\.expert_streaming.*needs a CUDA GPU"):
        Engine(replace(plan, schedule=gpu_sched), t, d, device="cpu")
    many = plan.schedule.with_changes(cpu_threads=(os.cpu_count() or 1) + 1)
    with pytest.raises(SpecError, match=r"plan\.schedule\.cpu_threads.*more than this machine"):
        Engine(replace(plan, schedule=many), t, d)
    with pytest.raises(SpecError, match=r"plan\.schedule\.moe"):
        Engine(replace(plan, schedule=replace(plan.schedule, moe="per_micro_batch")), t, d)


def test_an_override_runs_a_new_plan_re_estimated(pair):
    """Streaming ahead asked for at run time: the engine runs a new plan with that schedule, predicted
    by the planner under it; the record says so and carries the new schedule."""
    t, d = pair
    plan = plan_for_checkpoint(t, d, "devbox-2core", batch=3, draft_len=2, micro_batches=2,
                               expert_cache_slots=[1, 1])
    eng = Engine(plan, t, d, prefetch_next_layer="next")
    assert eng.replanned and eng.plan.schedule.expert_streaming == "next" and eng.plan.schedule.pre_post == "per_layer"
    e = estimate(plan.model_spec(), plan.hardware_spec(), plan.workload_spec(), draft=plan.draft_spec(), draft_len=2,
                 micro_batches=2, placement=plan.placement, batch=3, timeline=False, schedule=eng.plan.schedule)
    assert eng.plan.predicted.iteration_time_s == pytest.approx(e.iteration_time_s, rel=1e-9)
    assert eng.plan.solver["changed"]["expert_streaming"] == ["off", "next"]
    r = eng.generate([[5, 6, 7], [40]], max_new_tokens=4)
    assert r.record.replanned and r.record.schedule["expert_streaming"] == "next"
    eng.prefetch_next_layer = None                    # back to the plan's own
    r0 = eng.generate([[5, 6, 7], [40]], max_new_tokens=4)
    assert not r0.record.replanned and eng.plan is plan and r0.record.expert_streaming == "off"


def test_cli_overrides_write_the_run_plan_that_the_report_accepts(pair, tmp_path, capsys):
    t, d = pair
    plan = plan_for_checkpoint(t, d, "devbox-2core", batch=3, draft_len=2, micro_batches=2)
    pj = tmp_path / "plan.json"
    plan.to_json(pj)
    prompts = tmp_path / "p.txt"
    prompts.write_text("w5 w6 w7\nw40\n")
    rec = tmp_path / "run.json"
    assert main(["run", str(pj), "--target", str(t), "--draft", str(d), "--prompts", str(prompts),
                 "--max-new-tokens", "4", "--draft-len", "0", "-o", str(rec), "--no-progress"]) == 0
    assert "draft_len 2 -> 0" in capsys.readouterr().err
    run_plan = tmp_path / "run.plan.json"
    new = Plan.from_json(run_plan)
    assert new.draft_len == 0 and json.loads(rec.read_text())["draft_len"] == 0
    assert main(["report", str(run_plan), str(rec)]) == 0
    capsys.readouterr()
    # --threads differs from the plan's: the run's schedule is not the plan's, and the report says which plan
    assert main(["run", str(pj), "--target", str(t), "--draft", str(d), "--prompts", str(prompts),
                 "--max-new-tokens", "4", "--threads", "2", "-o", str(rec), "--no-progress"]) == 0
    assert Plan.from_json(run_plan).schedule.cpu_threads == 2
    assert main(["report", str(pj), str(rec)]) == 2
    assert "run.schedule.cpu_threads" in capsys.readouterr().err
    assert main(["report", str(run_plan), str(rec)]) == 0


def test_plan_cli_fixes_the_schedule(tmp_path, capsys):
    out = tmp_path / "p.json"
    args = ["plan", "--model", "mixtral-8x7b", "--hardware", "h200-host", "--prompt-len", "256", "--gen-len", "64",
            "--acceptance", "0.7", "--max-draft-len", "2", "--micro-batches", "2", "-o", str(out)]
    assert main(args + ["--streaming", "off", "--threads", "3"]) == 0
    s = Plan.from_json(out).schedule
    assert (s.expert_streaming, s.pre_post, s.cpu_threads, s.host_io) == ("off", "per_micro_batch", 3, "pinned")
    assert "schedule: experts stream off" in capsys.readouterr().out
    assert main(args + ["--threads", "0"]) == 2
    assert "--threads" in capsys.readouterr().err


def test_a_run_unlike_its_calibration_is_warned_before_it_runs(pair, tmp_path, capsys):
    """A calibrated spec measured with 1 thread; `specmoe run --threads 2` names both counts before the
    run starts, the run record keeps the warning and the report prints it beside the error."""
    t, d = pair
    hw = dict(load_hardware("devbox-2core-calibrated").raw)
    hw["measured"] = {**hw["measured"], "threads": 1,
                      "details": {**hw["measured"].get("details", {}), "load_avg_1min": [1000.0],   # never "busier"
                                  "environment": {"threads": 1, "device": "cpu", "torch": str(torch.__version__)}}}
    spec = parse_hardware(hw, "calibrated-1-thread")
    plan = plan_for_checkpoint(t, d, spec, batch=2, draft_len=1, micro_batches=1, schedule=default_schedule(spec))
    assert plan.schedule.cpu_threads == 1
    pj, rec = tmp_path / "plan.json", tmp_path / "run.json"
    plan.to_json(pj)
    (tmp_path / "p.txt").write_text("w5 w6 w7\nw40\n")
    base = ["run", str(pj), "--target", str(t), "--draft", str(d), "--prompts", str(tmp_path / "p.txt"),
            "--max-new-tokens", "3", "-o", str(rec), "--no-progress", "--no-speed-probe"]
    assert main(base) == 0
    assert "warning" not in capsys.readouterr().err
    assert main(base + ["--threads", "2"]) == 0
    err = capsys.readouterr().err
    assert "threads: the run uses 2, the calibration measured with 1" in err
    assert err.index("threads: the run uses 2") < err.index("a new plan") or "a new plan" in err
    r = json.loads(rec.read_text())
    assert any("the run uses 2" in w for w in r["calibration_warnings"])
    assert main(["report", str(tmp_path / "run.plan.json"), str(rec)]) == 0
    assert "the run differed from its calibration: threads: the run uses 2" in capsys.readouterr().out


def test_a_plan_re_costed_on_a_fresh_calibration():
    """bench/fidelity.py's step: the same plan (policy, placement, schedule) costed on another spec of the
    same machine predicts that spec's times, and says what changed."""
    from specmoe.planner.replan import replan

    wl = Workload(64, 32, acceptance=load_acceptance(0.5))
    plan = optimize("mixtral-8x7b", "h200-host-calibrated", wl, k_values=(2,), micro_batch_values=(2,),
                    alternatives=0, timeline=False)
    raw = json.loads(json.dumps(plan.hardware))
    raw["name"] = "h200-host-slow"
    raw["measured"]["h2d_GBps_by_chunk_MB"] = {k: v / 2 for k, v in raw["measured"]["h2d_GBps_by_chunk_MB"].items()}
    slow = parse_hardware(raw, "h200-host-slow")
    new = replan(plan, hardware=slow)
    assert (new.batch, new.micro_batches, new.draft_len, new.placement, new.schedule) == \
        (plan.batch, plan.micro_batches, plan.draft_len, plan.placement, plan.schedule)
    assert new.hardware["name"] == "h200-host-slow" and new.solver["changed"]["hardware"] == ["h200-host-calibrated",
                                                                                               "h200-host-slow"]
    e = estimate(plan.model_spec(), slow, wl, draft=plan.draft_spec(), draft_len=plan.draft_len,
                 micro_batches=plan.micro_batches, placement=plan.placement, batch=plan.batch, timeline=False,
                 schedule=plan.schedule)
    assert new.predicted.iteration_time_s == pytest.approx(e.iteration_time_s, rel=1e-9)
    assert new.predicted.iteration_time_s > plan.predicted.iteration_time_s    # half the PCIe: slower


def test_longer_drafts_at_run_time_shrink_a_batch_that_no_longer_fits():
    """`specmoe run --draft-len 3` on a plan made at k = 0 and the largest batch: each sequence now holds
    3 more KV positions, so the re-costed plan takes the largest batch that fits at k = 3, says so, and
    fits; a batch that still fits is kept."""
    from specmoe.planner.memory import default_placement, footprint, max_batch
    from specmoe.planner.model_spec import load_model
    from specmoe.planner.replan import replan

    eagle = load_model("mixtral-8x7b-eagle")

    wl = Workload(512, 128, acceptance=load_acceptance(0.8))
    plan = optimize("mixtral-8x7b", "a30-xeon6426y", wl, k_values=(0,), micro_batch_values=(2,), alternatives=0,
                    timeline=False)
    new = replan(plan, draft_len=3, draft=eagle)
    m, hw, d = plan.model_spec(), plan.hardware_spec(), new.draft_spec()
    assert new.batch == max_batch(m, hw, wl, d, 3, 2) < plan.batch
    assert new.solver["changed"]["batch"] == [plan.batch, new.batch]
    assert footprint(m, hw, wl, new.batch, 3, new.placement, d, 2).fits
    small = replace(plan, batch=64, placement=default_placement(m, hw, wl, 64, 0, None, 2))
    kept = replan(small, draft_len=3, draft=eagle)
    assert kept.batch == 64 and "batch" not in kept.solver["changed"]
