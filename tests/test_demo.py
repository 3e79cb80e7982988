"""`specmoe demo` end to end in a subprocess (fresh calibration cache): the last line's format, the files
it writes, `specmoe report` on them; a second run reuses the cached calibration and acceptance."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine_fixtures import REPO, TINY_MOE

LAST = re.compile(r"^demo: speculation measured (\d+\.\d\d)x \(predicted (\d+\.\d\dx|n/a)\) over k=0, spread "
                  r"(\d+)%; iteration time error ([+-]\d+\.\d)% \(predicted vs measured\); report: (.+)$")

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (TINY_MOE / "config.json").is_file(), reason="needs models/tiny-moe")]


def _demo(out: Path, cache: Path, *extra: str) -> tuple[subprocess.CompletedProcess, float]:
    # the cache is what these tests check: keep it whether or not this (shared) machine was quiet
    env = dict(os.environ, SPECMOE_CACHE_DIR=str(cache), PYTHONPATH=str(REPO), SPECMOE_CALIBRATE_STRICT="0")
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "specmoe.runtime.cli.main", "demo", "--quick", "--num-prompts", "8",
                        "--max-new-tokens", "16", "--out", str(out), "--no-progress", *extra],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return p, time.perf_counter() - t0


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo")
    out, cache = d / "out", d / "cache"
    p, secs = _demo(out, cache)
    return p, secs, out, cache


def test_demo_last_line_and_files(demo_run):
    p, _, out, _ = demo_run
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.strip().splitlines()
    m = LAST.match(lines[-1])
    assert m, lines[-1]
    speedup, err, report = float(m.group(1)), float(m.group(4)), Path(m.group(5))
    assert report == out / "report.html" and report.is_file() and "plotly" in report.read_text()[:400000].lower()
    for name in ("hardware.yaml", "plan.json", "run.json", "run_k0.json", "outputs.jsonl", "outputs_k0.jsonl", "demo.json"):
        assert (out / name).is_file(), name
    assert len(list(out.glob("acceptance-*.csv"))) == 1
    plan, run, run0, summary = (json.loads((out / n).read_text()) for n in ("plan.json", "run.json", "run_k0.json",
                                                                           "demo.json"))
    assert run["draft_len"] == plan["draft_len"] >= 1 and run0["draft_len"] == 0    # speculation is measured
    assert run["complete"] and run0["complete"] and run["finished_sequences"] == run0["finished_sequences"] == 8
    assert plan["batch"] <= 8                      # capped by the prompts
    assert 0 <= plan["draft_len"] <= 4             # --quick: k in 0..4
    # speedup and error as the last line says: decode tok/s over all five runs of each mode; signed
    # iteration error of run.json, each mode's fastest run by mean iteration time
    assert speedup == pytest.approx(summary["speedup"], abs=0.006)
    assert len(summary["spec_iteration_s"]) == len(summary["k0_iteration_s"]) == 5
    assert run["stages"]["iteration"] == pytest.approx(min(summary["spec_iteration_s"]))
    assert run0["stages"]["iteration"] == pytest.approx(min(summary["k0_iteration_s"]))
    i = summary["spec_iteration_s"].index(min(summary["spec_iteration_s"]))
    assert summary["spec_decode_tokens_per_s"][i] == pytest.approx(run["decode_tokens_per_s"])
    # pooled over the runs (decode tokens over decode seconds of all five): every run of either mode emits
    # the same greedy tokens, so the pooled rate of a mode is the harmonic mean of its runs' rates and the
    # speedup is sum(1 / k0 rate) / sum(1 / spec rate)
    assert run["decode_tokens"] == run0["decode_tokens"] > 0
    pooled = sum(1 / r for r in summary["k0_decode_tokens_per_s"]) / sum(1 / r for r in summary["spec_decode_tokens_per_s"])
    assert speedup == pytest.approx(pooled, abs=0.006)
    assert summary["threads"] == 1
    from specmoe.planner.report import compare, live_batch

    cmp = compare(out / "plan.json", out / "run.json")        # at the run's mean live batch
    it_p, it_m = cmp.row("iteration").predicted, run["stages"]["iteration"]
    assert err == pytest.approx((it_p - it_m) / it_m * 100, abs=0.06)
    if live_batch(run) < 0.97 * plan["batch"]:
        assert it_p != plan["predicted"]["iteration_time_s"]
    # the plan priced in the 8-prompt job's drain, and the demo printed predicted against measured speedup
    assert plan["workload"]["num_prompts"] == 8 and plan["predicted"]["job"]["num_prompts"] == 8
    assert summary["predicted_speedup"] > 0
    assert m.group(2) == f"{summary['predicted_speedup']:.2f}x"
    assert int(m.group(3)) == round(summary["spread_pct"])
    assert re.match(r"^demo: the planner chose k = \d .* its choice was (right|wrong)", lines[-2]), lines[-2]
    assert summary["choice"] in lines[-2]
    assert cmp.row("decode iterations").measured == run["iterations"]
    # every step said what it did; the first run measured the calibration (quick), the table was printed
    text = p.stdout
    for step in range(1, 6):
        assert f"demo [{step}/5]" in text
    assert "run 10/10" in text and "fastest run" in text
    # both bundled drafts were profiled and planned; the one the planner predicts faster ran, and a line says so
    draft = re.search(r"^demo \[3/5\] draft: running (tiny-draft|tiny-eagle) \((draft model|EAGLE head), k = (\d)\): "
                      r"the planner predicts (\d+) tok/s .*; against (tiny-draft|tiny-eagle) \(.*, (\d+) tok/s", text, re.M)
    assert draft, text
    assert draft.group(1) == summary["draft"] != draft.group(5) and int(draft.group(4)) >= int(draft.group(6))
    assert int(draft.group(3)) == plan["draft_len"] and run["weights"]["draft"].endswith(summary["draft"])
    assert len(list(out.glob("tiny-eagle-acceptance-*.csv"))) == 1
    assert "quick calibration measured now" in text and "iteration" in text and "error" in text
    # greedy speculation is exact: the two runs emit the same tokens
    o1 = [json.loads(x)["token_ids"] for x in (out / "outputs.jsonl").read_text().splitlines()]
    o0 = [json.loads(x)["token_ids"] for x in (out / "outputs_k0.jsonl").read_text().splitlines()]
    assert o1 == o0


def test_report_on_the_demo_files(demo_run):
    _, _, out, _ = demo_run
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, "-m", "specmoe.runtime.cli.main", "report", str(out / "plan.json"), str(out / "run.json"),
                        "--no-html"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert re.search(r"stage\s+resource\s+predicted s\s+measured s\s+error", p.stdout)
    assert re.search(r"^\s+iteration\s+all\s+\S+\s+\S+\s+[+-]\d+\.\d%$", p.stdout, re.M), p.stdout


def test_second_run_uses_the_caches(demo_run):
    p0, _, out, cache = demo_run
    p, secs = _demo(out, cache)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "using the cached quick calibration" in p.stdout
    assert "acceptance of tiny-draft: cached" in p.stdout and "acceptance of tiny-eagle: cached" in p.stdout
    assert LAST.match(p.stdout.strip().splitlines()[-1])


def test_bad_arguments_exit_2(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), SPECMOE_CACHE_DIR=str(tmp_path / "cache"))
    for extra, field in ((["--num-prompts", "0"], "--num-prompts"), (["--n-prompts", "1000"], "--num-prompts"),
                         (["--batch", "0"], "--batch")):
        p = subprocess.run([sys.executable, "-m", "specmoe.runtime.cli.main", "demo", "-o", str(tmp_path / "o"), *extra],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and field in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "cache").exists()       # checked before anything is measured
