"""scripts/mutation_run.py, the mutation check's runner, on a module of two functions of which the tests
guard one: its mutants are killed, the other's survive, the module is restored byte for byte, a second run
with the same tests tests nothing, and a test added for the other function sends only its survivors back
(and kills them). Verdicts are read from mutmut's cache as scripts/mutation_summary.py reads them."""
from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mutmut")
REPO = Path(__file__).resolve().parents[1]
MODULE = "def f(x):\n    return x + 1\n\n\ndef g(x):\n    return x * 3\n\n\ndef h(x):\n    return x + 1\n"


def run(tmp: Path) -> str:
    cmd = [sys.executable, str(REPO / "scripts" / "mutation_run.py"), "mod.py", "tests", "--",
           sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "tests"]
    p = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, env={"PYTHONPATH": str(tmp), "PATH": "/usr/bin"})
    assert p.returncode == 0, p.stderr
    return p.stderr


def verdicts(tmp: Path) -> dict[int, list[str]]:
    """{1-based line: [status of each of its mutants]}."""
    con = sqlite3.connect(tmp / ".mutmut-cache")
    rows = con.execute("SELECT Line.line_number, Mutant.status FROM Mutant JOIN Line ON Mutant.line = Line.id "
                       "ORDER BY Line.line_number, Mutant.\"index\"").fetchall()
    con.close()
    out: dict[int, list[str]] = {}
    for n, s in rows:
        out.setdefault(n + 1, []).append(s)
    return out


def test_runner_kills_survives_restores_and_resumes(tmp_path):
    (tmp_path / "mod.py").write_text(MODULE)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_mod.py").write_text("from mod import f\n\n\ndef test_f():\n    assert f(1) == 2\n")
    err = run(tmp_path)
    assert "6 of 6 mutants to test" in err          # x + 1: '+' and 1; x * 3: '*' and 3; h's x + 1 again
    # h's line has f's text: its mutants get verdicts of their own (mutmut 2's lookup by text gave it f's)
    assert verdicts(tmp_path) == {2: ["ok_killed", "ok_killed"], 6: ["bad_survived", "bad_survived"],
                                  10: ["bad_survived", "bad_survived"]}
    assert (tmp_path / "mod.py").read_text() == MODULE
    assert "0 of 6 mutants to test" in run(tmp_path)            # same tests: every verdict stands
    (tmp_path / "tests" / "test_mod.py").write_text(
        "from mod import f, g\n\n\ndef test_f():\n    assert f(1) == 2\n\n\ndef test_g():\n    assert g(2) == 6\n")
    assert "4 of 6 mutants to test" in run(tmp_path)            # the tests changed: the survivors again
    assert verdicts(tmp_path) == {2: ["ok_killed", "ok_killed"], 6: ["ok_killed", "ok_killed"],
                                  10: ["bad_survived", "bad_survived"]}
    assert (tmp_path / "mod.py").read_text() == MODULE


def test_runner_repairs_a_line_cached_in_its_mutated_form(tmp_path):
    """A `mutmut run` killed with a mutant applied can cache the mutated text of a line under the clean file's
    hash: the runner re-reads the file, tests that line's mutants again, and does not fail on them."""
    (tmp_path / "mod.py").write_text(MODULE)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_mod.py").write_text("from mod import f\n\n\ndef test_f():\n    assert f(1) == 2\n")
    run(tmp_path)
    con = sqlite3.connect(tmp_path / ".mutmut-cache")
    con.execute("UPDATE Line SET line = '    return x - 1' WHERE line_number = 1")
    con.commit()
    con.close()
    assert "2 of 6 mutants to test" in run(tmp_path)
    assert verdicts(tmp_path) == {2: ["ok_killed", "ok_killed"], 6: ["bad_survived", "bad_survived"],
                                  10: ["bad_survived", "bad_survived"]}


def test_runner_refuses_tests_that_fail_unmutated(tmp_path):
    (tmp_path / "mod.py").write_text(MODULE)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_mod.py").write_text("from mod import f\n\n\ndef test_f():\n    assert f(1) == 3\n")
    cmd = [sys.executable, str(REPO / "scripts" / "mutation_run.py"), "mod.py", "tests", "--",
           sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "tests"]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin"})
    assert p.returncode == 2 and "the tests fail on the unmutated module" in p.stderr
    assert (tmp_path / "mod.py").read_text() == MODULE
