"""How fast `specmoe plan` is: the API call and the CLI in a fresh process, for the two benchmark cases.

    python bench/plan_speed.py [--repeat 3] [--goal 2.0] [--solver cbc]

Cases: Mixtral-8x7B on a30-xeon6426y and Qwen3-30B-A3B on h200-host, APPS lengths (prompt 566,
output 1024), acceptance alpha = 0.8, the default drafts. Each case is timed --repeat times; the best
wall time (the least disturbed by other work on the machine) is compared with the goal, side by side
with the median and the CPU time of the process and its solver subprocesses. Exits 1 when a best time
is over the goal. Prints the machine (CPU count, load average) because timings on a shared machine vary.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CASES = [("mixtral-8x7b", "a30-xeon6426y"), ("qwen3-30b-a3b", "h200-host")]


def _cpu_s() -> float:
    me, ch = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + ch.ru_utime + ch.ru_stime


def time_api(model: str, hw: str, solver: str) -> tuple[float, float, object]:
    from specmoe.planner.optimizer import optimize
    from specmoe.planner.workload import Workload, load_acceptance

    wl = Workload(prompt_len=566, gen_len=1024, acceptance=load_acceptance(0.8))
    c0, t0 = _cpu_s(), time.perf_counter()
    plan = optimize(model, hw, wl, solver=solver)
    return time.perf_counter() - t0, _cpu_s() - c0, plan


def time_cli(model: str, hw: str, solver: str) -> float:
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "specmoe.runtime.cli.main", "plan", "--model", model, "--hardware", hw, "--prompt-len", "566",
               "--gen-len", "1024", "--acceptance", "0.8", "--solver", solver, "-o", os.path.join(d, "plan.json")]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"CLI failed for {model} on {hw}:\n{r.stderr}")
    return dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--goal", type=float, default=2.0, help="seconds (default 2)")
    ap.add_argument("--solver", default="cbc")
    a = ap.parse_args()
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; python {platform.python_version()}; solver {a.solver}")
    print(f"{'case':38s} {'mode':4s} {'best s':>7s} {'median s':>9s} {'cpu s':>6s} {'best/goal':>9s}  plan")
    over = False
    for model, hw in CASES:
        api, cpu, plan = [], [], None
        for _ in range(a.repeat):
            dt, c, plan = time_api(model, hw, a.solver)
            api.append(dt)
            cpu.append(c)
        cli = [time_cli(model, hw, a.solver) for _ in range(a.repeat)]
        desc = (f"B={plan.batch} m={plan.micro_batches} k={plan.draft_len} "
                f"{plan.predicted.decode_tokens_per_s:.0f} tok/s bound {plan.bound}, {plan.solver['milps']} MILPs")
        for mode, ts, cs in (("api", api, cpu), ("cli", cli, None)):
            best = min(ts)
            over |= best > a.goal
            cpu_txt = f"{min(cs):6.2f}" if cs else f"{'-':>6s}"
            print(f"{model + ' on ' + hw:38s} {mode:4s} {best:7.2f} {statistics.median(ts):9.2f} {cpu_txt} "
                  f"{best / a.goal:9.2f}  {desc if mode == 'api' else ''}")
    print("result:", "OVER the goal" if over else f"all under {a.goal:g} s")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
