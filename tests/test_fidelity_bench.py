"""bench/fidelity.py: the error distribution and its summary line, from hand-made rounds; bad arguments."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from script_loader import load_script

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "fidelity.py"
LAST = re.compile(r"^fidelity: (\d+) runs with fresh calibrations; iteration error median ([+-]\d+\.\d)%, "
                  r"worst ([+-]\d+\.\d)%; worst stage ([+-]\d+\.\d)% \((\S+)\)$")


@pytest.fixture(scope="module")
def fid():
    return load_script(SCRIPT, "fidelity_bench")


def _row(i, it, stages, clean=True, prefill=None):
    return {"round": i, "clean": clean, "iteration_predicted_ms": 10.0, "iteration_measured_ms": 10.0,
            "iteration_error_pct": it, "stage_error_pct": stages, "prefill_error_pct": prefill}


def test_summary_of_hand_made_rounds(fid):
    rows = [_row(1, -4.0, {"target.moe": -3.0, "draft.gpu": 12.5}, prefill=-8.0),
            _row(2, 2.0, {"target.moe": 1.0}, prefill=3.5),
            _row(3, -9.5, {"target.moe": -14.0, "draft.gpu": 2.0}, clean=False, prefill=-12.25)]
    s = fid.summarize(rows)
    assert s["iteration_error_median_pct"] == -4.0 and s["iteration_error_worst_pct"] == -9.5
    assert (s["worst_stage_error_pct"], s["worst_stage"]) == (-14.0, "target.moe")
    assert s["stage_error_median_pct"] == {"draft.gpu": pytest.approx(7.25), "target.moe": -3.0}
    assert s["clean_calibrations"] == 2
    m = LAST.match(fid.summary_line(s))
    assert m and m.groups() == ("3", "-4.0", "-9.5", "-14.0", "target.moe")
    t = fid.table(rows, s).splitlines()
    assert len(t) == 5 and "draft.gpu" in t[0] and t[3].split()[1] == "no" and t[-1].startswith("median")
    assert "prefill" in t[0] and t[1].split()[5] == "-8.0%" and t[-1].split()[2] == "-8.0%"
    assert fid.prefill_line(s) == ("prefill: error median -8.0%, worst -12.2% (the prompt pass before the first "
                                   "iteration)")
    assert fid.prefill_line(fid.summarize([_row(1, 1.0, {})])) == "prefill: not measured"
    # each prefill part's median error over the rounds that measured it, in the rows' order
    rows[0]["prefill_part_error_pct"] = {"target.moe": -4.0, "draft.gpu": 10.0}
    rows[2]["prefill_part_error_pct"] = {"target.moe": -2.0, "draft.gpu": 20.0, "outside the stages": -30.0}
    line = fid.prefill_line(fid.summarize(rows))
    assert line.endswith("; by part, median: target.moe -3.0%, draft.gpu +15.0%, outside the stages -30.0%"), line


def test_only_stages_over_five_percent_are_judged(fid):
    class R:
        def __init__(self, name, p, m):
            self.name, self.predicted, self.measured = name, p, m
            self.error_pct = (p - m) / m * 100 if m else None

    class C:
        stages = [R("target.moe", 0.0045, 0.005), R("verify.accept", 0.0001, 0.0004), R("target.h2d", 0.0, 0.0),
                  R("iteration", 0.0095, 0.01), R("prefill", 0.05, 0.06)]

        def row(self, name):
            return next(r for r in self.stages if r.name == name)
    e = fid.errors_of(C())
    assert e["stage_error_pct"] == {"target.moe": -10.0}       # accept is 4% of the iteration, h2d none
    assert e["iteration_error_pct"] == -5.0 and e["iteration_measured_ms"] == pytest.approx(10.0)
    assert e["prefill_error_pct"] == pytest.approx(-16.67, abs=0.01)
    assert e["prefill_part_error_pct"] == {}                     # a comparison without the prefill's parts
    C.prefill_stages = [R("draft.gpu", 0.009, 0.008), R("target.h2d", 0.0004, 0.0)]
    assert fid.errors_of(C())["prefill_part_error_pct"] == {"draft.gpu": 12.5}


def test_bad_arguments_exit_2():
    p = subprocess.run([sys.executable, str(SCRIPT), "--rounds", "0"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--rounds must be >= 1" in p.stderr


def test_the_draft_is_either_bundled_one(fid):
    assert fid.draft_dir(fid.parse_args([])).name == "tiny-draft"
    eagle = fid.draft_dir(fid.parse_args(["--draft", "tiny-eagle"]))
    assert eagle.name == "tiny-eagle" and (eagle / "config.json").is_file()
    with pytest.raises(SystemExit) as e:
        fid.parse_args(["--draft", "tiny-moe"])
    assert e.value.code == 2
