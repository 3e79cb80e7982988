#!/usr/bin/env python
"""Offloaded-MoE decode on one GPU host, side by side in one run (issue 6, item 4).

    python bench/gpu_offload.py --out DIR [--layers 8] [--time-budget-s 170] [--quick] [--run-accelerate]
    python bench/gpu_offload.py --cpu-smoke --out DIR        # the same code on a tiny model, CPU as the device

Target: Mixtral-8x7B shapes (planner preset mixtral-8x7b, vocabulary 32000 kept) with --layers of
its 32 layers, random bf16 weights drawn on the GPU and copied into pinned host memory (by the
engine's RandomWeights/ExpertStore). Draft: a random one-layer dense model of the
mixtral-8x7b-eagle preset's shape, on the GPU. Draft proposals are accepted by a seeded Bernoulli
oracle at rate alpha (Engine(acceptance_oracle=alpha)): every speculative number is ORACLE-DRIVEN.

Memory regime: the full 32-layer model in a 24 GiB GPU + 128 GB host, planned per mode. The CPU
budget is scaled by L/32 (everything in host memory scales with layers). The GPU budget cannot simply
be 24 GiB * L/32: the two streaming buffers of one layer's experts (5.25 GiB), the embeddings, the
draft, its KV and the activations do not shrink with fewer layers, and alone exceed 6 GiB less its reserve. So
each mode's slice gets the non-layer part of the full model's plan for that same mode (k=0 has no
draft and no draft KV) plus L/32 of the rest; the expert-cache share then matches the full model's in
that mode (about 12.5% speculative, 16% at k=0), at 8 layers and after a fallback to 4 alike.

Modes (each the planner's own plan, planner.optimize with cold experts streamed, target KV and its
attention on the CPU; where optimize cannot run, e.g. without pulp, planner.estimate over k and m
at planner.memory.max_batch): speculative at alpha 0.8, k = 0 (no draft, its own batch), alpha
0.6, then alpha 0.8 again with per-stage synchronisation (clean per-stage times) if time allows.
A speculative mode for which the planner prefers k = 0 runs the best k >= 1 plan, labelled
"[k>=1 forced]" with the planner's k = 0 figure beside it. Each mode prefills its batch (prompt
--prompt-len) and is stopped after --iterations decode iterations (a k-policy that raises after N
iterations; the engine keeps the partial record). The accelerate baseline is the figure measured
earlier on the same host (DESIGN.md), not re-run, unless --run-accelerate. Predicted stage times:
planner.estimate for exactly the mode's batch, m, k, placement and mean measured context, with
the first layers' experts prefetched during the draft phase when the engine streams ahead.

Engine schedule (--streaming, --host-io): on CUDA layer i+1's non-resident experts stream while
layer i computes and the first two streaming layers' over lm_head, acceptance and the draft phase
("next"). First a
copy-overlap probe (about 1 s) measures whether a small transfer waits behind an expert-sized
copy on the copy stream (pageable, pinned, D2H, and a zero-copy kernel read); --host-io auto
picks from it how the CPU attention's inputs and output cross PCIe (once per layer, pinned, or
read by a GPU kernel straight from pinned memory). A mode that fails with pinned/zero-copy
transfers is rerun once with the direct per-micro-batch transfers. H2D GB/s = decode-phase bytes
copied / copy-stream busy time (CUDA events around each copy batch); busy = that time / decode
wall time. The host experts are one layer's rows, pinned once (one registered region) and given to
every layer of the slice and to every engine (and kept across the layer fallback): the weights of
different layers are then the same, which changes nothing that is measured (bytes streamed, their
time, the oracle's acceptance) and spares pinning a copy per layer.

Warm-up: each mode's iteration time and tokens/s are over its iterations after the first
WARMUP_ITERATIONS (those pay cudaMalloc / cudaHostAlloc and first launches, implicit syncs); the
all-iteration figures are kept beside them (`*_all_iterations`). GPU memory is not emptied between
modes, so a mode reuses what the previous one cached.

Time: phases are printed with elapsed seconds. A small warm-up (8 sequences, 1 iteration)
compiles the kernels and measures prefill attention; if the alpha=0.8 and k=0 modes are projected
not to fit the budget, the slice falls back to half the layers. Before each mode the time left is
checked (a mode that would not fit is recorded as skipped); SIGALRM at the budget stops a mode in
flight (its partial record is kept). The JSON is written in any case.

Writes DIR/gpu_offload.json (after every mode, so a killed run leaves a file) and
DIR/gpu_offload.txt (everything printed). The last line printed is:
    gpu-offload: speculation X.XXx over k=0, Y.Yx over accelerate, H2D ZZ% busy, iteration error E.E%
"""
from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

# the thread environment the calibration ran with (idle OpenMP workers sleep), set before anything loads
# torch and its libgomp (runtime/thread_env.py; importing specmoe.runtime does the same)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# the parts live in bench/gpu_offload_parts/ (its __init__ lists them in the order a run uses them); the
# bench folder goes on sys.path so they import both when this runs as a script and when a test loads
# this file by path (tests/script_loader.py)
BENCH = str(Path(__file__).resolve().parent)
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

from gpu_offload_parts.accelerate_baseline import accelerate_step  # noqa: E402
from gpu_offload_parts.common import FULL_LAYERS, STREAMING  # noqa: E402
from gpu_offload_parts.modes import run_modes  # noqa: E402
from gpu_offload_parts.prepare import (  # noqa: E402
    build_and_warm_up, choose_transfers, describe_machine, fit_budget, plan_slice, warn_iteration_limit)
from gpu_offload_parts.report import headline_figures, report, write_json  # noqa: E402
from gpu_offload_parts.session import Session  # noqa: E402
# the parts the tests call through this script
from gpu_offload_parts.machine import choose_host_io  # noqa: E402,F401
from gpu_offload_parts.planning import model_configs, plan_for, solver_missing  # noqa: E402,F401
from gpu_offload_parts.runner import Runner, shared_expert_rows, warm_figures  # noqa: E402,F401


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output folder (created)")
    ap.add_argument("--layers", type=int, default=8, help="layers of the 32 (default 8)")
    ap.add_argument("--time-budget-s", type=float, default=170.0, help="whole-script budget, weights included")
    ap.add_argument("--quick", action="store_true", help="6 iterations per mode, no per-stage-synchronised rerun")
    ap.add_argument("--iterations", type=int, default=None, help="decode iterations measured per mode (default 12)")
    ap.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 512; smoke 64)")
    ap.add_argument("--gen-len", type=int, default=None, help="planned output length (default 128; smoke 64)")
    ap.add_argument("--hardware", default=None,
                    help="hardware spec (default h200-host-calibrated, falling back to h200-host)")
    ap.add_argument("--plan-only", action="store_true", help="print the budgets and plans, run nothing")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run-accelerate", action="store_true", help="also run transformers+accelerate (guarded)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny Mixtral-like model with the CPU as the device")
    ap.add_argument("--host-io", choices=("auto", "direct", "pinned", "zero-copy"), default="auto",
                    help="how the attention over host KV moves q/k/v and its output (Engine host_io): auto = from the "
                         "copy-overlap probe on CUDA (zero-copy when a pinned H2D waits behind an expert copy and a "
                         "zero-copy kernel does not, else pinned), direct on the CPU")
    ap.add_argument("--streaming", choices=sorted(STREAMING), default="auto",
                    help="expert streaming schedule (Engine prefetch_next_layer): auto = next on CUDA (layer i+1's "
                         "experts stream while layer i computes, the first two layers' during the draft phase), off "
                         "on the CPU")
    ap.add_argument("--project-scale", type=float, default=1.0, help=argparse.SUPPRESS)  # tests the fallback
    a = ap.parse_args(argv)
    a.iterations = a.iterations or (6 if a.quick else (4 if a.cpu_smoke else 12))   # WARMUP_ITERATIONS of them too
    a.prompt_len = a.prompt_len or (64 if a.cpu_smoke else 512)
    a.gen_len = a.gen_len or (64 if a.cpu_smoke else 128)
    if a.cpu_smoke and a.layers == 8:
        a.layers = 4
    a.hardware = a.hardware or "h200-host-calibrated"
    for name, lo, hi in (("layers", 1, FULL_LAYERS), ("iterations", 1, 1000), ("prompt_len", 1, 32768),
                         ("gen_len", 2, 32768)):
        v = getattr(a, name)
        if not lo <= v <= hi:
            ap.error(f"--{name.replace('_', '-')} is {v}: give a value in [{lo}, {hi}]")
    if not a.time_budget_s > 10:
        ap.error("--time-budget-s must be more than 10 seconds")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not args.cpu_smoke and not args.plan_only and not torch.cuda.is_available():
        print("gpu-offload: needs a CUDA GPU (none visible to torch); use --cpu-smoke to run the same code on a "
              "tiny model with the CPU as the device")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda") if (torch.cuda.is_available() and not args.cpu_smoke) else torch.device("cpu")
    s = Session(args, device, out, T_START)
    try:
        s.arm()
        run_steps(s)
    except BaseException as e:  # noqa: BLE001  the JSON is written whatever happened
        s.disarm()
        s.err("benchmark", e)
    finally:
        finish(s)
    return 0


def run_steps(s: Session) -> None:
    """The run in order; --plan-only ends after the plans."""
    describe_machine(s)
    choose_transfers(s)
    plan_slice(s)
    if s.args.plan_only:
        s.res["plans"] = {n: p.to_dict() for n, p in s.plans.items()}
        s.res["complete"] = True
        return
    warn_iteration_limit(s)
    build_and_warm_up(s)
    fit_budget(s)
    run_modes(s)
    if s.args.run_accelerate:
        accelerate_step(s)
    s.res["complete"] = all(str(d.get("status", "")).startswith("ok") for d in s.res["modes"].values())


def finish(s: Session) -> None:
    """Whatever happened: stop the alarm, drop the engine, the headline figures, the report and its last
    line, then gpu_offload.json and gpu_offload.txt."""
    s.disarm()
    try:
        if s.runner is not None:
            s.runner.release()
    except Exception as e:  # noqa: BLE001  recorded; the JSON is still written
        s.err("release", e)
    headline_figures(s.res, s.args)
    try:
        last = report(s.res, s.log)
    except Exception as e:  # noqa: BLE001
        s.err("report", e)
        last = "gpu-offload: speculation n/ax over k=0, n/ax over accelerate, H2D n/a% busy, iteration error n/a%"
    s.log.phase("done")
    s.log(last)
    s.res["summary_line"] = last
    try:
        write_json(s.res, s.out, s.log.elapsed())
        (s.out / "gpu_offload.txt").write_text("\n".join(s.log.lines) + "\n")
    except Exception as e:  # noqa: BLE001
        print(f"could not write results: {e}", file=sys.stderr, flush=True)
        print(last, flush=True)


if __name__ == "__main__":
    sys.exit(main())
