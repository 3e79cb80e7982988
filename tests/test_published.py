"""bench/published.py: the published cases parse, their presets exist, the script's last line has the
promised format, the error column is (predicted - measured) / measured, a bad file exits 2 naming the field."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from script_loader import load_script

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "published.py"
CASES = ROOT / "bench" / "published_cases.yaml"
LAST = re.compile(r"^published: (\d+) cases, median \|error\| (\d+)%, worst (\d+)% \(([\w.-]+)\)$")


pub = load_script(SCRIPT, "published_bench")

ONE_CASE = """
cases:
  - id: hand-made
    system: Test
    hardware: t4-host
    model: mixtral-8x7b
    prompt_len: 64
    gen_len: 8
    metric: end_to_end
    policy: {batch: 16, micro_batches: 2}
    measured: 10.0
    source: a hand-made case
"""


def test_cases_file_parses_and_presets_exist():
    cases = pub.load_cases(CASES)
    assert len(cases) >= 6
    pub.check_presets(cases)
    for c in cases:
        assert c.source and c.measured > 0 and c.batch > 0
        assert c.peer_factor == 1.0 or (c.peer_reason and c.peer_source)


def test_error_column_for_a_hand_made_case(tmp_path):
    p = tmp_path / "one.yaml"
    p.write_text(ONE_CASE)
    (case,) = pub.load_cases(p)
    r = pub.predict(case)
    assert r.predicted == pytest.approx(r.planner)
    assert r.error == pytest.approx((r.predicted - 10.0) / 10.0)
    assert pub.relative_error(12.0, 10.0) == pytest.approx(0.2)
    assert pub.relative_error(5.0, 10.0) == pytest.approx(-0.5)
    case.peer_factor = 0.5
    r2 = pub.predict(case)
    assert r2.predicted == pytest.approx(0.5 * r2.planner)
    assert r2.error == pytest.approx((0.5 * r2.planner - 10.0) / 10.0)


def test_summary_line_format_and_median():
    mk = lambda cid, err, fitted=False: pub.Result(  # noqa: E731
        pub.Case(id=cid, system="s", hardware="t4-host", model="mixtral-8x7b", prompt_len=1, gen_len=1, batch=1,
                 micro_batches=1, draft_len=0, acceptance=None, metric="end_to_end", measured=1.0, source="x",
                 fitted=fitted), 1.0, 1.0 + err, err, 1)
    line = pub.summary_line([mk("a", 0.10), mk("b", -0.30), mk("c", 0.20), mk("f", 0.0, fitted=True)])
    assert line == "published: 3 cases, median |error| 20%, worst 30% (b)"


def test_script_runs_and_last_line_matches():
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr
    last = out.stdout.strip().splitlines()[-1]
    m = LAST.match(last)
    assert m, last
    assert int(m.group(1)) >= 6


@pytest.mark.parametrize("mutation, field", [
    (("measured: 10.0", "measured: ten"), "cases[hand-made].measured"),
    (("policy: {batch: 16, micro_batches: 2}", "policy: {micro_batches: 2}"), "cases[hand-made].policy.batch"),
    (("metric: end_to_end", "metric: latency"), "cases[hand-made].metric"),
    (("hardware: t4-host", "hardware: no-such-host"), "cases[hand-made].hardware"),
])
def test_bad_cases_file_exits_2_naming_the_field(tmp_path, mutation, field):
    p = tmp_path / "bad.yaml"
    p.write_text(ONE_CASE.replace(*mutation))
    out = subprocess.run([sys.executable, str(SCRIPT), "--cases", str(p)], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 2
    assert field in out.stderr
