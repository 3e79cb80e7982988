"""`specmoe demo [-o DIR] [--num-prompts 32] [--max-new-tokens 48] [--batch B] [--quick]`: calibrate this
machine (cached), profile the bundled drafts' acceptance (the draft model and the EAGLE head), plan with
each and keep the one the planner predicts faster, run with speculation and with k = 0, and report
predicted against measured (runtime/demo.py). The last line is

    demo: speculation measured X.XXx (predicted Y.YYx) over k=0, spread S%; iteration time error E.E% (predicted vs measured); report: PATH
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = ("The last line reads `demo: speculation measured X.XXx (predicted Y.YYx) over k=0, spread S%; "
                "iteration time error E.E% (predicted vs measured); report: PATH`: the speedup is decode tokens/s "
                "with the plan's k over k = 0 (all five runs of each); the spread is the larger of the two modes' "
                "ranges over their runs; the error is signed, (predicted - measured) / measured of the fastest "
                "speculative run's mean iteration time (negative: the cost model is optimistic). The line before "
                "it says whether the planner's choice of k was right.")
    p.add_argument("-o", "--output", "--out", dest="out", default="out/demo",
                   help="output directory (default out/demo)")
    p.add_argument("--num-prompts", "--n-prompts", dest="n_prompts", type=int, default=32,
                   help="prompts of models/prompts.jsonl to run (default 32)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens generated per prompt (default 48)")
    p.add_argument("--batch", type=int, default=None,
                   help="batch to plan for (default: the planner's choice, capped by the number of prompts)")
    p.add_argument("--quick", action="store_true",
                   help="faster and rougher: a quick calibration (unless a full one is cached), acceptance for "
                        "k = 1..4, k <= 4 in the plan")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for the calibration and the runs (default 1: the tiny pair's operations are "
                        "too small to split over threads; 0 keeps torch's default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # before torch is imported (see runtime/calibrate/run.py)
    from specmoe.runtime.demo import run_demo

    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(msg, flush=True)

    res = run_demo(args.out, n_prompts=args.n_prompts, max_new_tokens=args.max_new_tokens, batch=args.batch,
                   quick=args.quick, log=log, progress=not args.no_progress,
                   threads=None if args.threads == 0 else args.threads)
    t = res.timings_s
    print(f"demo: done in {time.perf_counter() - t0:.0f} s (calibrate {t.get('calibrate', 0):.0f} s, acceptance "
          f"{t.get('acceptance', 0):.0f} s, plan {t.get('plan', 0):.0f} s, runs {t.get('run', 0):.0f} s); outputs, "
          f"plan.json, run.json, run_k0.json in {res.out_dir}", flush=True)
    print(f"demo: {res.headline.choice()}")
    sys.stdout.flush()
    print(res.summary_line)
    return 0
