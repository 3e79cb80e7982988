"""planner.report: compare / render_table / write_html on real plans (planner.what_if.fixed_plan over
planner.estimate), against run records built here with known numbers (errors checked against
hand-computed values) and against a real engine run; bad inputs; `specmoe report`."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from specmoe.planner import Workload, load_acceptance
from specmoe.planner.errors import SpecError
from specmoe.planner.report import compare, load_run, predicted_timeline, render_table, throughput_by_k, write_html
from specmoe.planner.stages import ITERATION_PARTS, STAGE_NAMES, Stage
from specmoe.planner.what_if import fixed_plan

ROOT = Path(__file__).resolve().parent.parent
WL = Workload(566, 1024, acceptance=load_acceptance(0.8))
PARTS = [s.value for s in ITERATION_PARTS]


@pytest.fixture(scope="module")
def plan():
    return fixed_plan("mixtral-8x7b", "a30-xeon6426y", WL, draft_len=2, batch=64, micro_batches=2)


def make_run(plan, factors: dict[str, float], iteration_factor: float, **over) -> dict:
    """A run record whose measured stage = predicted x factor (1 where not given)."""
    p = plan.predicted.stages
    stages = {s: p.get(s, 0.0) * factors.get(s, 1.0) for s in PARTS}
    stages[Stage.ITERATION.value] = plan.predicted.iteration_time_s * iteration_factor
    stages[Stage.PREFILL.value] = 2.0
    run = {"complete": True, "stages": stages, "iterations": 20, "decode_tokens_per_s": 40.0,
           "end_to_end_tokens_per_s": 30.0, "acceptance_histogram": {"0": 256, "1": 384, "2": 640},
           "mean_accepted": 1.3, "backends": {"verify_attention": "cpp-openmp"}, "machine": {"cpu_model": "test"},
           "git_commit": "abc", "plan_hashes": dict(plan.input_hashes), "draft_len": plan.draft_len,
           "batch": plan.batch, "micro_batches": plan.micro_batches, "h2d_bytes": 0, "decode_tokens": 2400,
           "sequences": plan.batch, "device": "cuda:0", "profile_stages": True}
    run.update(over)
    return run


def test_errors_match_hand_computed_values(plan):
    # measured = predicted x f  =>  error = (predicted - measured) / measured = 1/f - 1
    f = {"target.h2d": 1.25, "target.moe": 0.8, "target.attention": 2.0, "target.pre_attn": 1.0}
    run = make_run(plan, f, iteration_factor=1.05)
    cmp = compare(plan, run)
    want = {"target.h2d": -20.0, "target.moe": 25.0, "target.attention": -50.0, "target.pre_attn": 0.0}
    for name, w in want.items():
        assert cmp.row(name).error_pct == pytest.approx(w, abs=1e-9)
        assert cmp.row(name).measured == pytest.approx(plan.predicted.stages[name] * f[name], rel=1e-12)
    # every other stage with time is measured exactly as predicted (0%); draft.cpu has none (no error)
    assert plan.predicted.stages["draft.cpu"] == 0 and cmp.row("draft.cpu").error_pct is None
    measured = [s for s in PARTS if plan.predicted.stages.get(s, 0) > 0]
    assert len(measured) == 8
    assert cmp.mean_abs_error_pct == pytest.approx((20 + 25 + 50 + 0) / len(measured))
    assert cmp.iteration_error_pct == pytest.approx((1 / 1.05 - 1) * 100)
    assert cmp.passed and cmp.verdict.startswith("PASS")
    assert cmp.row("decode tokens/s").error_pct == pytest.approx((plan.predicted.decode_tokens_per_s / 40 - 1) * 100)
    assert cmp.row("tokens per iteration").measured == pytest.approx(2400 / 20)
    assert cmp.row("accepted drafts per sequence").predicted == pytest.approx(0.8 + 0.8 ** 2)
    # the largest miss by seconds is the H2D stage (the plan is PCIe-bound), named in the notes
    assert plan.bound == "pcie"
    assert any(n.startswith("Largest miss: target.h2d") for n in cmp.notes)
    miss = compare(plan, make_run(plan, {}, iteration_factor=1.2))
    assert not miss.passed and miss.verdict.startswith("MISS")
    assert miss.iteration_error_pct == pytest.approx((1 / 1.2 - 1) * 100)


def test_table_lists_every_stage_with_its_error(plan):
    cmp = compare(plan, make_run(plan, {"target.h2d": 1.25}, 1.05))
    text = render_table(cmp)
    for s in STAGE_NAMES:
        assert s in text
    h2d_line = next(line for line in text.splitlines() if line.strip().startswith("target.h2d"))
    assert h2d_line.split()[1] == "pcie" and h2d_line.endswith("-20.0%")
    assert "mean |error|" in text and "PASS: iteration time within 10%" in text


def test_mismatched_plan_and_run_name_the_input(plan):
    run = make_run(plan, {}, 1.0)
    run["plan_hashes"]["hardware"] = "0" * 64
    with pytest.raises(SpecError, match=r"run\.plan_hashes\.hardware.*its hardware differs"):
        compare(plan, run)
    # a real plan for another machine: only the hardware differs
    other = fixed_plan("mixtral-8x7b", "h200-host", WL, draft_len=2, batch=64, micro_batches=2, frontier_ks=None)
    with pytest.raises(SpecError, match="its hardware differs") as e:
        compare(other, make_run(plan, {}, 1.0))
    assert "model" not in str(e.value).split("differs")[0]
    run = make_run(plan, {}, 1.0)
    run["plan_hashes"].update(model="x", workload="y")
    with pytest.raises(SpecError, match="its model, workload differ"):
        compare(plan, run)


def test_swapped_missing_and_unreadable_inputs(plan, tmp_path):
    plan_path, run_path = tmp_path / "plan.json", tmp_path / "run.json"
    plan.to_json(plan_path)
    run = make_run(plan, {}, 1.0)
    run_path.write_text(json.dumps(run))
    assert compare(plan_path, run_path).passed
    with pytest.raises(SpecError, match="is a run record .*not a plan.*plan.json run.json"):
        compare(run_path, plan_path)
    with pytest.raises(SpecError, match="is a plan .*not a run record"):
        compare(plan_path, plan_path)
    for key in ("iterations", "stages", "plan_hashes", "complete"):
        bad = dict(run)
        del bad[key]
        with pytest.raises(SpecError, match=rf"run\.{key}: missing"):
            load_run(bad)
    (tmp_path / "trunc.json").write_text(run_path.read_text()[:200])
    with pytest.raises(SpecError, match="not valid JSON"):
        compare(plan_path, tmp_path / "trunc.json")
    with pytest.raises(SpecError, match="cannot read"):
        compare(plan_path, tmp_path / "nope.json")
    with pytest.raises(SpecError, match=r"run\.stages\.target\.bogus"):
        load_run({**run, "stages": {**run["stages"], "target.bogus": 1.0}})
    with pytest.raises(SpecError, match="no decode iteration"):
        load_run({**run, "iterations": 0})
    with pytest.raises(SpecError, match=r"run\.draft_len: must be an integer"):
        load_run({**run, "draft_len": None})
    with pytest.raises(SpecError, match=r"run\.decode_tokens_per_s: must be a number"):
        load_run({**run, "decode_tokens_per_s": "fast"})


def _outside_plotly_js(text: str) -> str:
    from plotly.offline import get_plotlyjs

    js = get_plotlyjs()
    assert js in text, "plotly.js is inlined"
    return text.replace(js, "")


def test_html_is_self_contained_and_complete(plan, tmp_path):
    tl = [{"stage": "target.h2d", "resource": "pcie", "layer": 0, "micro_batch": -1, "start_s": 0.0, "end_s": 0.1},
          {"stage": "target.moe", "resource": "gpu", "layer": 0, "micro_batch": 0, "start_s": 0.1, "end_s": 0.12}]
    run = make_run(plan, {"target.h2d": 1.25}, 1.05, timeline=tl)
    out = write_html(plan, run, tmp_path / "report.html")
    text = out.read_text()
    rest = _outside_plotly_js(text)
    assert "cdn." not in rest and "<script src" not in rest and "https://" not in rest
    for s in STAGE_NAMES:
        assert s in rest
    for title in ("Predicted timeline", "Measured timeline", "Decode throughput against draft length k",
                  "Where the model is off and why", "Mean absolute error", "PASS: iteration time within 10%"):
        assert title in rest, title
    assert list(tmp_path.iterdir()) == [out]


def test_html_written_atomically(plan, tmp_path):
    out = tmp_path / "report.html"
    out.write_text("previous report")
    bad = make_run(plan, {}, 1.0)
    bad["plan_hashes"]["model"] = "x"
    with pytest.raises(SpecError):
        write_html(plan, bad, out)
    assert out.read_text() == "previous report"
    with pytest.raises(SpecError, match="does not exist"):
        write_html(plan, make_run(plan, {}, 1.0), tmp_path / "missing" / "r.html")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]


def test_run_with_another_k_is_compared_at_its_k(plan):
    from specmoe.planner.estimator import estimate

    run = make_run(plan, {}, 1.0, draft_len=0, acceptance_histogram={}, mean_accepted=0.0)
    cmp = compare(plan, run)
    e0 = estimate(plan.model_spec(), plan.hardware_spec(), plan.workload_spec(), draft_len=0,
                  micro_batches=plan.micro_batches, placement=plan.placement, batch=plan.batch, timeline=False,
                  schedule=plan.schedule)
    assert cmp.row("iteration").predicted == pytest.approx(e0.iteration_time_s)
    assert any("k=0" in w for w in cmp.warnings)
    assert all(r.name != "accepted drafts per sequence" for r in cmp.metrics)


def test_thinning_batch_is_compared_at_its_live_size(plan):
    """A static batch thins out under speculation (sequences reach their length at different
    iterations): the histogram counts 20 iterations x 40 live sequences of the plan's 64, and the
    prediction is re-estimated at batch 40, with a warning; a full batch is compared as planned."""
    from specmoe.planner.estimator import estimate
    from specmoe.planner.report import live_batch

    full = make_run(plan, {}, 1.0)
    assert live_batch(full) == pytest.approx(64.0)
    assert compare(plan, full).row("iteration").predicted == pytest.approx(plan.predicted.iteration_time_s)
    thin = make_run(plan, {}, 1.0, acceptance_histogram={"0": 160, "1": 240, "2": 400})
    assert live_batch(thin) == pytest.approx(40.0)
    cmp = compare(plan, thin)
    pl = plan.placement
    from dataclasses import replace

    want = estimate(plan.model_spec(), plan.hardware_spec(), plan.workload_spec(), draft=plan.draft_spec(),
                    draft_len=2, micro_batches=2, batch=40, timeline=False, schedule=plan.schedule,
                    placement=replace(pl, target_kv_gpu_sequences=min(40, round(pl.target_kv_gpu_sequences * 40 / 64)),
                                      draft_kv_gpu_sequences=min(40, round(pl.draft_kv_gpu_sequences * 40 / 64))))
    assert cmp.row("iteration").predicted == pytest.approx(want.iteration_time_s, rel=1e-9)
    # this plan streams its experts ahead and is PCIe-bound: fewer live sequences cannot lengthen it
    assert cmp.row("iteration").predicted <= plan.predicted.iteration_time_s * (1 + 1e-12)
    assert cmp.row("tokens per iteration").predicted == pytest.approx(40 * (1 + WL.acceptance.acc(2)))
    # prefill runs over the whole batch: still the plan's
    assert cmp.row("prefill").predicted == pytest.approx(plan.predicted.prefill_time_s)
    assert any("40.0 live sequences" in w for w in cmp.warnings)


def test_run_is_compared_under_the_plans_schedule(plan):
    """The engine runs the plan's schedule exactly, so the prediction compared is the plan's own; a run
    record that says it ran another schedule (an override made a new plan) is refused, naming the
    field and where the run's own plan is."""
    from dataclasses import replace

    from specmoe.planner.errors import SpecError

    run = make_run(plan, {}, 1.0, schedule=plan.schedule.to_dict())
    assert compare(plan, run).row("iteration").predicted == pytest.approx(plan.predicted.iteration_time_s)
    other = replace(plan.schedule, expert_streaming="off", pre_post="per_micro_batch")
    with pytest.raises(SpecError, match=r"run\.schedule\.expert_streaming.*RUN\.plan\.json"):
        compare(plan, make_run(plan, {}, 1.0, schedule=other.to_dict()))
    # a record without the field is compared as planned
    assert compare(plan, make_run(plan, {}, 1.0)).row("iteration").predicted == \
        pytest.approx(plan.predicted.iteration_time_s)


def test_a_uniform_miss_is_named_as_machine_drift(plan):
    """Every stage 1.2-1.4x slower than predicted: the notes say the machine ran slower than when it
    was calibrated; a mixed miss (some stages faster, some slower) says nothing of the sort."""
    uniform = {s: 1.2 + 0.2 * (i % 2) for i, s in enumerate(PARTS)}
    notes = compare(plan, make_run(plan, uniform, 1.3)).notes
    assert any("machine running slower than when it was calibrated" in n for n in notes), notes
    mixed = {s: (0.8 if i % 2 else 1.25) for i, s in enumerate(PARTS)}
    assert not any("machine running" in n for n in compare(plan, make_run(plan, mixed, 1.0)).notes)


def test_a_prefill_miss_says_where_the_measured_prefill_went(plan):
    """A prefill 1.6x its prediction: a note with both times, the error and the measured target stages,
    largest first, and the time outside them; a prefill within the goal gets no note."""
    pred = plan.predicted.prefill_time_s
    by = {"target.moe": 0.5 * pred, "target.pre_attn": 0.25 * pred, "target.attention": 0.15 * pred}
    run = make_run(plan, {}, 1.0, prefill_stage_totals_s=by)
    run["stages"]["prefill"] = 1.6 * pred
    notes = [n for n in compare(plan, run).notes if n.startswith("Prefill:")]
    assert len(notes) == 1, notes
    n = notes[0]
    assert "underestimates it by 37.5%" in n
    assert n.index("moe") < n.index("pre_attn") < n.index("attention ")
    outside = 1.6 * pred - 0.9 * pred
    assert f"{outside * 1e3:.3g} ms outside them" in n or f"{outside:.3g} s outside them" in n
    run["stages"]["prefill"] = 1.05 * pred
    assert not any(n.startswith("Prefill:") for n in compare(plan, run).notes)


def test_the_prefill_by_stage_rows(plan, tmp_path):
    """The prefill by part: each target stage's prediction against the run's prefill stage totals, and the time
    outside them. On a CPU host the parts add up to the prefill's prediction; on the A30 host, whose copies
    overlap compute, to at least it. The note of a missed prefill names the part furthest off; a run without
    the prefill's stage times has no such rows."""
    pred = plan.predicted.prefill_time_s
    by = {"target.moe": 0.5 * pred, "target.pre_attn": 0.25 * pred, "target.attention": 0.15 * pred}
    run = make_run(plan, {}, 1.0, prefill_stage_totals_s=by)
    run["stages"]["prefill"] = 1.6 * pred
    cmp = compare(plan, run)
    rows = {r.name: r for r in cmp.prefill_stages}
    assert list(rows)[-1] == "outside the stages" and {"target.moe", "target.pre_attn", "target.attention"} < set(rows)
    for name, v in by.items():
        assert rows[name].measured == pytest.approx(v, rel=1e-12)
    assert rows["outside the stages"].measured == pytest.approx(0.7 * pred, rel=1e-9)
    assert rows["target.attention"].resource == "gpu"
    assert sum(r.predicted for r in cmp.prefill_stages) >= pred * (1 - 1e-9)
    worst = max(cmp.prefill_stages, key=lambda r: abs(r.diff))
    note = next(n for n in cmp.notes if n.startswith("Prefill:"))
    assert f"furthest off: {worst.name}," in note
    assert "prefill by stage" in render_table(cmp)
    page = write_html(plan, run, tmp_path / "r.html").read_text()
    assert page.count("<h2>Prefill by stage</h2>") == 2              # the table and its chart
    assert compare(plan, make_run(plan, {}, 1.0)).prefill_stages == []
    cpu = fixed_plan(str(ROOT / "models" / "tiny-moe"), "devbox-2core-calibrated",
                     Workload(60, 64, acceptance=load_acceptance(0.8)), draft_len=0, batch=8, micro_batches=1)
    run = make_run(cpu, {}, 1.0, prefill_stage_totals_s={"target.moe": 1.0}, device="cpu", profile_stages=False,
                   acceptance_histogram={}, mean_accepted=0.0)
    parts = compare(cpu, run).prefill_stages
    assert sum(r.predicted for r in parts) == pytest.approx(cpu.predicted.prefill_time_s, rel=1e-9)


def test_the_drafts_own_prefill_is_a_row_of_its_own(plan):
    """A run that timed the draft's own prefill (draft.gpu among its prefill stage totals): a row of its own
    against the plan's draft part, `outside the stages` predicted without it, and the note names it; a run
    recorded before (no draft.gpu) keeps the draft's prediction outside the stages."""
    from specmoe.planner.report.predict import prefill_parts_for

    parts = prefill_parts_for(plan, plan.draft_len)
    assert parts.draft_s > 0
    pred = plan.predicted.prefill_time_s
    by = {"target.moe": 0.5 * pred, "draft.gpu": 0.3 * pred}
    run = make_run(plan, {}, 1.0, prefill_stage_totals_s=by)
    run["stages"]["prefill"] = 1.6 * pred
    cmp = compare(plan, run)
    rows = {r.name: r for r in cmp.prefill_stages}
    assert rows["draft.gpu"].predicted == pytest.approx(parts.draft_s, rel=1e-12)
    assert rows["draft.gpu"].measured == pytest.approx(0.3 * pred, rel=1e-12)
    assert rows["outside the stages"].predicted == pytest.approx(parts.other_s, rel=1e-12)
    assert rows["outside the stages"].measured == pytest.approx(0.8 * pred, rel=1e-9)
    note = next(n for n in cmp.notes if n.startswith("Prefill:"))
    assert "the draft's own " in note and "outside them (the first tokens' choice)" in note
    old = compare(plan, make_run(plan, {}, 1.0, prefill_stage_totals_s={"target.moe": 0.5 * pred}))
    rows = {r.name: r for r in old.prefill_stages}
    assert "draft.gpu" not in rows
    assert rows["outside the stages"].predicted == pytest.approx(parts.draft_s + parts.other_s, rel=1e-12)


def test_prediction_helpers(plan):
    assert predicted_timeline(plan) == plan.predicted.timeline
    by_k = throughput_by_k(plan)
    assert [p["draft_len"] for p in by_k] == list(range(9))
    at_k = next(p for p in by_k if p["draft_len"] == plan.draft_len)
    assert at_k["decode_tokens_per_s"] == pytest.approx(plan.predicted.decode_tokens_per_s)


# ---------------------------------------------------------------------------------------------------
def test_cli_prints_table_then_html_path(plan, tmp_path):
    plan.to_json(tmp_path / "plan.json")
    (tmp_path / "run.json").write_text(json.dumps(make_run(plan, {"target.moe": 0.8}, 1.05)))
    code = ("import sys; from specmoe.runtime.cli.main import main; rc = main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'report imported torch'; sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code, "report", str(tmp_path / "plan.json"), str(tmp_path / "run.json"),
                        "-o", str(tmp_path / "r.html")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert lines[-1] == f"report: {tmp_path / 'r.html'}"
    assert (tmp_path / "r.html").is_file()
    moe = next(line for line in lines if line.strip().startswith("target.moe"))
    assert moe.endswith("+25.0%")
    # swapped arguments: exit 2, one line on stderr, nothing on stdout, no HTML
    p = subprocess.run([sys.executable, "-m", "specmoe.runtime.cli.main", "report", str(tmp_path / "run.json"),
                        str(tmp_path / "plan.json"), "-o", str(tmp_path / "x.html")],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and "is a run record" in p.stderr
    assert not (tmp_path / "x.html").exists()


# ---------------------------------------------------------------------------------------------------
def _tiny_pair(tmp_path_factory):
    tiny = ROOT / "models"
    if all((tiny / d / "config.json").is_file() and any((tiny / d).glob("*.safetensors"))
           for d in ("tiny-moe", "tiny-draft")):
        return tiny / "tiny-moe", tiny / "tiny-draft", None
    sys.path.insert(0, str(Path(__file__).parent))
    from engine_fixtures import make_pair

    t, d = make_pair(tmp_path_factory.mktemp("pair"), "mixtral", "llama", seed=3)
    return t, d, [[5, 6, 7], [9, 10, 11, 12], [20, 21]]


@pytest.mark.slow
def test_report_of_a_real_engine_run(tmp_path_factory):
    pytest.importorskip("torch")
    from specmoe.runtime.engine import Engine

    target, draft, ids = _tiny_pair(tmp_path_factory)
    wl = Workload(16, 8, acceptance=load_acceptance(0.5))
    plan = fixed_plan(target, "devbox-2core", wl, draft=draft, draft_len=2, batch=3, micro_batches=1)
    if ids is None:
        from specmoe.runtime.cli.run import read_prompts

        prompts = read_prompts(ROOT / "models" / "prompts.jsonl")[:3]
    else:
        prompts = ids
    rec = Engine(plan, target, draft).generate(prompts, max_new_tokens=8).record.to_dict()
    cmp = compare(plan, rec)
    for s in PARTS + [Stage.ITERATION.value]:
        assert cmp.row(s).measured == rec["stages"][s]
        assert cmp.row(s).predicted == plan.predicted.stages[s]
    assert cmp.row("decode tokens/s").measured == rec["decode_tokens_per_s"]
    assert cmp.row("tokens per iteration").measured == pytest.approx(rec["decode_tokens"] / rec["iterations"])
    it = cmp.row("iteration")
    assert cmp.iteration_error_pct == pytest.approx((it.predicted - it.measured) / it.measured * 100)
    out = write_html(plan, rec, tmp_path_factory.mktemp("html") / "report.html")
    assert "target.moe" in out.read_text()
    assert render_table(cmp).count("\n") > len(PARTS)


def test_job_rows_predict_the_drain(plan):
    """The job the run was (its sequences, the run's k and new tokens): the predicted mean live batch
    and iterations are planner/batch_drain.py's, against the run's own; the job's decode tokens/s is
    its tokens over iterations x the iteration simulated at that live batch."""
    from dataclasses import replace

    from specmoe.planner.batch_drain import drain
    from specmoe.planner.estimator import estimate
    from specmoe.planner.report import live_batch

    run = make_run(plan, {}, 1.0, acceptance_histogram={"0": 160, "1": 240, "2": 400}, max_new_tokens=49,
                   sequences=64)
    cmp = compare(plan, run)
    d = drain(replace(WL, num_prompts=64, gen_len=49), 64, 2)
    assert cmp.row("mean live batch").predicted == pytest.approx(d.mean_live_batch)
    assert cmp.row("mean live batch").measured == pytest.approx(live_batch(run)) == pytest.approx(40.0)
    assert cmp.row("decode iterations").predicted == pytest.approx(d.iterations)
    assert cmp.row("decode iterations").measured == 20
    lo = int(d.mean_live_batch)
    if lo < 64:
        pl = plan.placement

        def t(b):
            return estimate(plan.model_spec(), plan.hardware_spec(), plan.workload_spec(), draft=plan.draft_spec(),
                            draft_len=2, micro_batches=2, batch=b, timeline=False, run=False,
                            schedule=plan.schedule, placement=replace(pl, target_kv_gpu_sequences=min(b, round(pl.target_kv_gpu_sequences * b / 64)),
                                              draft_kv_gpu_sequences=min(b, round(pl.draft_kv_gpu_sequences * b / 64)))
                            ).iteration_time_s
        t_live = t(lo) + (t(lo + 1) - t(lo)) * (d.mean_live_batch - lo)
    else:
        t_live = plan.predicted.iteration_time_s
    assert cmp.row("job decode tokens/s").predicted == pytest.approx(d.decode_tokens / (d.iterations * t_live), rel=1e-6)
    assert "mean live batch" in render_table(cmp)
    # a run record that does not say how many sequences it ran: no job rows
    run.pop("sequences")
    with pytest.raises(KeyError):
        compare(plan, run).row("decode iterations")


def test_live_sequences_chart(plan, tmp_path):
    """A run with per-iteration live counts gets the drain chart (its counts against the predicted
    curve of a static batch); the mean live batch is taken from those counts."""
    from specmoe.planner.report import live_batch

    lives = [64] * 10 + [60, 50, 40, 30, 20, 10]
    run = make_run(plan, {}, 1.0, live_by_iteration=lives, iterations=len(lives), sequences=64, max_new_tokens=20)
    assert live_batch(run) == pytest.approx(sum(lives) / len(lives))
    cmp = compare(plan, run)
    assert cmp.live["measured"] == lives and cmp.live["predicted"] and cmp.live["predicted"][0] == pytest.approx(64)
    html = write_html(plan, run, tmp_path / "r.html", comparison=cmp).read_text()
    assert "Live sequences per decode iteration" in html
    run.pop("live_by_iteration")
    assert compare(plan, run).live == {}
