"""Summarise a mutmut 2 run (scripts/mutation_check.sh): the kill rate over the mutated modules, and every
surviving mutant with its diff in one file.

    python scripts/mutation_summary.py CACHE[,CACHE...] SURVIVORS.txt EQUIVALENT.txt MODULE...

CACHE: the .mutmut-cache of each work copy (mutation_check.sh runs module groups in parallel copies);
a module's verdicts are read from every cache that holds them.

Killed: a test failed (ok_killed), the run timed out (bad_timeout) or crashed oddly (ok_suspicious).
Survivors explained as equivalent in EQUIVALENT.txt (lines `path:line | mutated line | reason`: that
mutation of that line changes nothing observable) leave the count; the rest are listed. Ends with one line:
    mutation: K killed of N (P.P%) over MODULES; S survivors listed in FILE
"""
from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

KILLED = ("ok_killed", "bad_timeout", "ok_suspicious")


def equivalents(path: Path) -> dict[tuple[str, int, str], str]:
    """{(file, line, mutated line): reason} from `path:line | mutated line | reason` lines (# comments and
    blank lines skipped; the reason is what follows the last " | "): a mutant is explained only when its
    own new line is the one named."""
    out: dict[tuple[str, int, str], str] = {}
    if not path.is_file():
        return out
    for raw in path.read_text().splitlines():
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        parts = [x.strip() for x in raw.split(" | ")]   # the mutated line may hold " | " (a type union)
        f, _, line = parts[0].rpartition(":")
        if len(parts) >= 3 and f and line.isdigit():
            out[(f, int(line), " | ".join(parts[1:-1]))] = parts[-1]
    return out


def new_line(diff: str) -> str:
    """The mutated line of a mutmut diff (its one added line), stripped."""
    return next((x[1:].strip() for x in diff.splitlines() if x.startswith("+") and not x.startswith("+++")), "")


def mutants(cache: Path, modules: list[str]) -> list[tuple[int, str, int, str, Path]]:
    """(id, file, 1-based line, status, cache) of every mutant of the modules in one cache."""
    con = sqlite3.connect(str(cache))
    rows = con.execute("SELECT Mutant.id, SourceFile.filename, Line.line_number, Mutant.status FROM Mutant "
                       "JOIN Line ON Mutant.line = Line.id JOIN SourceFile ON Line.sourcefile = SourceFile.id").fetchall()
    con.close()
    return [(i, f, n + 1, s, cache) for i, f, n, s in rows if f in modules]


def main(argv: list[str]) -> int:
    caches, out, eq_path, modules = [Path(c) for c in argv[0].split(",")], Path(argv[1]), Path(argv[2]), argv[3:]
    eq = equivalents(eq_path)
    ms = []
    for mod in modules:  # each module from the copy that tested most of it (one, unless MUTATION_JOBS changed)
        per = [[m for m in mutants(c, [mod])] for c in caches if c.is_file()]
        ms += max(per, key=lambda x: sum(m[3] not in ("untested", "skipped") for m in x), default=[])
    tested = [m for m in ms if m[3] not in ("untested", "skipped")]
    killed = [m for m in tested if m[3] in KILLED]
    mutmut = str(Path(sys.executable).parent / "mutmut")
    survivors, explained = [], []
    for i, f, n, _, cache in (m for m in tested if m[3] == "bad_survived"):
        diff = subprocess.run([mutmut, "show", str(i)], cwd=cache.parent, capture_output=True, text=True).stdout.strip()
        why = eq.get((f, n, new_line(diff)))
        (explained if why else survivors).append((i, f, n, diff, why))
    lines = [f"# surviving mutants of {', '.join(modules)} (mutmut 2.5.1, scripts/mutation_check.sh)",
             f"# {len(killed)} killed, {len(survivors)} survived, {len(explained)} equivalent (listed last), "
             f"{len(ms) - len(tested)} untested", ""]
    for i, f, n, diff, why in survivors + explained:
        lines += [f"## {f}:{n} (mutant {i})" + (f": equivalent: {why}" if why else ""), diff, ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    n = len(tested) - len(explained)
    pct = 100.0 * len(killed) / n if n else 0.0
    repo = Path(__file__).resolve().parent.parent
    rel = out.relative_to(repo) if out.is_absolute() and out.is_relative_to(repo) else out
    not_run = [mod for mod in modules if not any(m[1] == mod for m in ms)]
    if not_run:
        print(f"mutation: not run yet (no mutants in any cache): {', '.join(not_run)}")
    if len(ms) > len(tested):
        print(f"mutation: {len(ms) - len(tested)} of {len(ms)} mutants untested (the run stopped early): the rate "
              "below is over the tested ones")
    print(f"mutation: {len(killed)} killed of {n} ({pct:.1f}%) over {', '.join(modules)}; "
          f"{len(survivors)} survivors listed in {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
