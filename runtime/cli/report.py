"""`specmoe report plan.json run.json [-o report.html]`: predicted against measured, per stage.

Prints the per-stage table (predicted s, measured s, error %) with the throughput rows, the mean
absolute error and PASS/MISS against the goal, then writes one self-contained HTML report (plotly
inlined; no network) and prints its path. Imports only `planner` (no torch): reports can be made
where the engine is not installed.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("plan", help="plan.json written by `specmoe plan`")
    p.add_argument("run", help="run.json written by `specmoe run` with that plan")
    p.add_argument("-o", "--output", default=None,
                   help="HTML report to write (default: report.html next to run.json)")
    p.add_argument("--no-html", action="store_true", help="print the table only")
    p.add_argument("--json", action="store_true", help="print the comparison as one JSON object instead of the table")


def run(args: argparse.Namespace) -> int:
    import json

    from specmoe.planner.report import compare, load_plan, render_table, write_html

    from specmoe.planner.atomic_file import check_distinct, check_writable

    out = Path(args.output) if args.output else Path(args.run).with_name("report.html")
    if not args.no_html:                                # checked before anything is printed
        check_writable(out, "-o")
        check_distinct({"-o": out}, {"plan": args.plan, "run": args.run})
    plan = load_plan(args.plan)
    cmp = compare(plan, args.run)
    if args.json:
        print(json.dumps(cmp.to_dict(), default=str))
    else:
        print(render_table(cmp))
    if not args.no_html:
        path = write_html(plan, args.run, out, comparison=cmp)
        if not args.json:
            print(f"report: {path}")
    return 0
