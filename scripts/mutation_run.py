"""Test the mutants of one module with mutmut 2's own mutations and cache, one pytest process per mutant.

    python scripts/mutation_run.py MODULE TESTS_DIR -- PYTEST COMMAND...

Run from the root of a copy of the tree (where `.mutmut-cache` is kept). MODULE is mutated in place and
restored after every mutant (and on any exit). The mutants are mutmut's (`list_mutations`, `mutate`, so
`# pragma: no mutate` lines are left alone) and the verdicts go to mutmut's cache with its rules:
a killed mutant stays killed; any other verdict stands only while the tests' hash (`hash_of_tests` of
TESTS_DIR) is the one it was reached with. scripts/mutation_summary.py reads that cache.

Why not `mutmut run`: on this 2-core VM its worker deadlocks every few minutes (a thread blocked on a full
pipe), busy-polls the pty it reads the tests through (half a core per job), passes over a few mutants in
every run (it looks a line's verdicts up by the line's text alone), and kills only the shell of a timed-out
run. Here each run is a plain subprocess in a session
of its own: a run that exceeds max(60 s, 10 x the unmutated run) is killed with its whole process group
and counts as killed (bad_timeout, as mutmut counts it); a run that fails (any non-zero exit: a failing
test, a collection error from a mutant that does not import) kills the mutant; exit 0 is a survivor.
"""
from __future__ import annotations

import glob
import os
import signal
import sqlite3
import subprocess
import sys
import time

from mutmut import BAD_SURVIVED, BAD_TIMEOUT, OK_KILLED, UNTESTED, Context, list_mutations, mutate
from mutmut.cache import hash_of_tests, update_line_numbers


def run_tests(cmd: list[str], timeout_s: float | None) -> str | int:
    """Exit status of one run of the tests, or "timeout" (the run and everything it started are killed)."""
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return "timeout"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def forget_stale_lines(module: str, source: str) -> None:
    """A `mutmut run` killed while a mutant was applied can leave the mutated text of a line in the cache
    under the clean file's hash, so mutmut never looks at the line again and its mutants have no row:
    where a cached line differs from the module's line at that number, the file's hash is forgotten and
    update_line_numbers re-reads every line (the stale line's verdicts go; its mutants are tested again)."""
    lines = source.split("\n")
    con = sqlite3.connect(".mutmut-cache")
    try:
        rows = con.execute("SELECT Line.line_number, Line.line FROM Line JOIN SourceFile ON Line.sourcefile = "
                           "SourceFile.id WHERE SourceFile.filename = ?", (module,)).fetchall()
        if any(n >= len(lines) or lines[n] != text for n, text in rows):
            con.execute("UPDATE SourceFile SET hash = '' WHERE filename = ?", (module,))
            con.commit()
    except sqlite3.OperationalError:       # no cache yet: mutmut creates it
        pass
    finally:
        con.close()


def cached_status(module: str, mid, tests_hash: str) -> str:
    """The verdict that stands for one mutant, by mutmut's rules (killed stays killed; any other verdict only
    under the tests' hash it was reached with). Looked up by the line's text and number: mutmut 2's own
    lookup (get_cached_mutation_statuses) keys lines by text alone, so a mutant on a line whose text appears
    earlier in the module took that line's verdict and was never tested."""
    con = sqlite3.connect(".mutmut-cache")
    try:
        row = con.execute("SELECT Mutant.status, Mutant.tested_against_hash FROM Mutant JOIN Line ON Mutant.line = "
                          "Line.id JOIN SourceFile ON Line.sourcefile = SourceFile.id WHERE SourceFile.filename = ? "
                          "AND Line.line = ? AND Line.line_number = ? AND Mutant.\"index\" = ?",
                          (module, mid.line, mid.line_number, mid.index)).fetchone()
    finally:
        con.close()
    if row is None:
        return UNTESTED
    status, tested_hash = row
    return status if status == OK_KILLED or tested_hash == tests_hash else UNTESTED


def prune(module: str, ids) -> None:
    """Drop the cache's rows of mutants the module no longer has (mutmut adds rows, never removes them), so
    the summary counts exactly the module's mutants."""
    want = {(m.line, m.line_number, m.index) for m in ids}
    con = sqlite3.connect(".mutmut-cache")
    try:
        with con:
            rows = con.execute('SELECT Mutant.id, Line.line, Line.line_number, Mutant."index" FROM Mutant JOIN Line ON '
                               'Mutant.line = Line.id JOIN SourceFile ON Line.sourcefile = SourceFile.id WHERE '
                               'SourceFile.filename = ?', (module,)).fetchall()
            gone = [(i,) for i, text, n, k in rows if (text, n, k) not in want]
            con.executemany("DELETE FROM Mutant WHERE id = ?", gone)
    finally:
        con.close()


def record(module: str, mid, status: str, tests_hash: str) -> None:
    """Write one verdict to the cache, adding the mutant's row (and its line's) where mutmut has none."""
    con = sqlite3.connect(".mutmut-cache")
    try:
        with con:
            sf = con.execute("SELECT id FROM SourceFile WHERE filename = ?", (module,)).fetchone()[0]
            row = con.execute("SELECT id FROM Line WHERE sourcefile = ? AND line = ? AND line_number = ?",
                              (sf, mid.line, mid.line_number)).fetchone()
            line_id = row[0] if row else con.execute(
                "INSERT INTO Line (sourcefile, line, line_number) VALUES (?, ?, ?)",
                (sf, mid.line, mid.line_number)).lastrowid
            m = con.execute('SELECT id FROM Mutant WHERE line = ? AND "index" = ?', (line_id, mid.index)).fetchone()
            if m:
                con.execute("UPDATE Mutant SET status = ?, tested_against_hash = ? WHERE id = ?", (status, tests_hash, m[0]))
            else:
                con.execute('INSERT INTO Mutant (line, "index", tested_against_hash, status) VALUES (?, ?, ?, ?)',
                            (line_id, mid.index, tests_hash, status))
    finally:
        con.close()


def test_mutants(module: str, tests_dir: str, cmd: list[str]) -> int:
    with open(module) as f:
        source = f.read()
    # Python trusts a .pyc whose source has the same size and mtime (in seconds): a mutant of the same size
    # written within a second of the last one would run as that one. No .pyc of the module is kept or written.
    for pyc in glob.glob(os.path.join(os.path.dirname(module) or ".", "__pycache__",
                                      os.path.splitext(os.path.basename(module))[0] + ".*.pyc")):
        os.remove(pyc)
    t0 = time.monotonic()
    if run_tests(cmd, None) != 0:
        print(f"mutation: {module}: the tests fail on the unmutated module; nothing was tested", file=sys.stderr)
        return 2
    timeout_s = max(60.0, 10 * (time.monotonic() - t0))
    forget_stale_lines(module, source)
    update_line_numbers(module)
    ids = list_mutations(Context(source=source, filename=module))
    tests_hash = hash_of_tests([tests_dir])
    prune(module, ids)
    todo = [m for m in ids if cached_status(module, m, tests_hash) == UNTESTED]
    print(f"mutation: {module}: {len(todo)} of {len(ids)} mutants to test (timeout {timeout_s:.0f} s)",
          file=sys.stderr, flush=True)
    try:
        for i, mid in enumerate(todo, 1):
            mutated, _ = mutate(Context(source=source, filename=module, mutation_id=mid))
            with open(module, "w") as f:
                f.write(mutated)
            rc = run_tests(cmd, timeout_s)
            status = BAD_TIMEOUT if rc == "timeout" else OK_KILLED if rc != 0 else BAD_SURVIVED
            record(module, mid, status, tests_hash)
            if i % 25 == 0 or i == len(todo):
                print(f"mutation: {module}: {i} of {len(todo)} tested", file=sys.stderr, flush=True)
    finally:
        with open(module, "w") as f:
            f.write(source)
    return 0


def main(argv: list[str]) -> int:
    if "--" not in argv or argv.index("--") != 2 or len(argv) < 4:
        print("usage: mutation_run.py MODULE TESTS_DIR -- PYTEST COMMAND...", file=sys.stderr)
        return 2
    return test_mutants(argv[0], argv[1], argv[3:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
