"""`specmoe job PLAN --target DIR --draft DIR --prompts FILE --workers W --outputs DIR`: a job on Ray Data.

The prompts (JSON lines with a "prompt" field, or Parquet with a `prompt` column) go to W workers,
each holding one Engine running PLAN; the outputs are written as they come, as JSON lines sharded
under --outputs DIR (index, prompt, text, token_ids, finish_reason, worker), once per prompt. A local
Ray cluster starts when no --address is given. Ctrl-C keeps what was written: the same command
resumes, skipping the prompts on disk. The job record (-o, default DIR/job.json) merges the workers'
run records; the last line is `job: N prompts on W workers, T.T s, X tok/s (predicted Y tok/s)`.

`specmoe job --fleet h200-host:64,a30-xeon6426y:256 --model mixtral-8x7b --num-prompts 1000000
--prompt-len 566 --gen-len 1024 --acceptance 0.8 --dry-run`: the fleet plan alone (planner/fleet.py):
each host kind's plan and share, and when the job completes. Nothing runs; Ray is not needed.
"""
from __future__ import annotations

import argparse
import json
import sys

from specmoe.planner.errors import SpecError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("plan", nargs="?", help="plan.json written by `specmoe plan` (not needed with --fleet --dry-run)")
    p.add_argument("--target", help="target checkpoint directory (on every worker's host)")
    p.add_argument("--draft", default=None, help="draft checkpoint directory (needed when k > 0)")
    p.add_argument("--prompts", help="JSON lines with a 'prompt' field, or Parquet with a 'prompt' column")
    p.add_argument("--outputs", help="directory of the output shards (created if missing; resumed if it holds some)")
    p.add_argument("-o", "--record", default=None, help="the job record (default: OUTPUTS/job.json)")
    p.add_argument("--workers", type=int, default=2, help="engine actors: one per host or GPU (default 2)")
    p.add_argument("--address", default=None, help="an existing Ray cluster (ray://HOST:10001 or auto); "
                                                    "default: a local cluster")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--seed", type=int, default=0, help="seed of each batch's sampler (default 0)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="prompts per engine call (default: 1 to 4 plan batches, 4+ calls per worker)")
    p.add_argument("--bad-rows", choices=("refuse", "skip"), default="refuse",
                   help="a bad dataset row: refuse the job (default) or skip it; either way reported by line")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="Ray CPUs per worker (default 1)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="Ray GPUs per worker (default 0; 1 on GPUs)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if the worker has one)")
    p.add_argument("--dtype", default=None, help="compute dtype (default: the engine's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: the plan's)")
    p.add_argument("--max-retries", type=int, default=3, help="passes re-run after a lost worker (default 3)")
    p.add_argument("--rows-per-shard", type=int, default=10000, help="rows per output shard (default 10000)")
    p.add_argument("--progress", action="store_true", help="Ray Data's progress bars")
    g = p.add_argument_group("fleet plan (with --dry-run: predict only)")
    g.add_argument("--dry-run", action="store_true", help="predict the job and print the fleet plan; run nothing")
    g.add_argument("--fleet", default=None, help="host kinds and counts: h200-host:64,a30-xeon6426y:256")
    g.add_argument("--model", default=None, help="with --fleet: the model (preset, config path)")
    g.add_argument("--draft-model", default=None, help="with --fleet: the draft (default: the model's default)")
    g.add_argument("--num-prompts", type=int, default=None, help="with --fleet: prompts in the job")
    g.add_argument("--prompt-len", type=int, default=None, help="with --fleet: mean prompt tokens")
    g.add_argument("--gen-len", type=int, default=None, help="with --fleet: tokens generated per prompt")
    g.add_argument("--acceptance", default="0.0", help="with --fleet: acceptance rate or CSV (default 0)")
    g.add_argument("--format", choices=("table", "json"), default="table", help="the fleet plan's format")


def run(args: argparse.Namespace) -> int:
    if args.fleet is not None:
        return _fleet(args)
    for flag in ("plan", "target", "prompts", "outputs"):
        if getattr(args, flag) is None:
            raise SpecError(f"--{flag}" if flag != "plan" else "PLAN", "is required to run a job",
                            "see `specmoe job --help`")
    from specmoe.planner.plan import Plan
    from specmoe.runtime.job.driver import JobSpec, run_job

    for flag, v, lo in (("--max-new-tokens", args.max_new_tokens, 1), ("--workers", args.workers, 1),
                        ("--max-retries", args.max_retries, 0), ("--rows-per-shard", args.rows_per_shard, 1)):
        if v < lo:
            raise SpecError(flag, f"must be >= {lo}, got {v}", f"e.g. {flag} {max(lo, 2)}")
    if args.batch_size is not None and args.batch_size < 1:
        raise SpecError("--batch-size", f"must be >= 1, got {args.batch_size}", "e.g. --batch-size 64")
    opts = {k: v for k, v in (("device", args.device), ("dtype", args.dtype), ("threads", args.threads)) if v}
    spec = JobSpec(Plan.from_json(args.plan), args.target, args.draft, args.prompts, args.outputs,
                   workers=args.workers, address=args.address, max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, seed=args.seed, batch_size=args.batch_size, bad_rows=args.bad_rows,
                   cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker, engine_options=opts,
                   max_retries=args.max_retries, rows_per_shard=args.rows_per_shard, record=args.record,
                   progress=args.progress)
    if args.dry_run:
        from specmoe.runtime.job.driver import dry_run

        print(json.dumps(dry_run(spec), indent=1))
        return 0
    try:
        res = run_job(spec)
    except KeyboardInterrupt:
        print(f"specmoe job: interrupted; the rows written are kept in {args.outputs}: run the same command to "
              "finish the rest", file=sys.stderr)
        return 130
    print(res.line)
    return 0 if res.complete else 1


def _fleet(args) -> int:
    from specmoe.planner.fleet import FleetJob, fleet, parse_hosts

    for flag in ("model", "num_prompts", "prompt_len", "gen_len"):
        if getattr(args, flag) is None:
            raise SpecError(f"--{flag.replace('_', '-')}", "is required with --fleet", "see `specmoe job --help`")
    if not args.dry_run:
        raise SpecError("--fleet", "only predicts (a job runs one plan on its workers)",
                        "add --dry-run, or run PLAN with --workers W")
    acc = args.acceptance
    try:
        acc = float(acc)
    except ValueError:
        pass
    job = FleetJob(args.num_prompts, args.prompt_len, args.gen_len, acc)
    f = fleet(args.model, parse_hosts(args.fleet), job, draft=args.draft_model)
    if args.format == "json":
        print(json.dumps(f.to_dict(), indent=1))
        return 0
    print(f"{'host':<22} {'count':>6} {'B':>5} {'k':>3} {'m':>3} {'prompts':>10} {'per host':>9} {'host tok/s':>11} "
          f"{'steady':>9} {'done (h)':>9}")
    for k in f.kinds:
        print(f"{k.name:<22} {k.count:>6} {k.batch:>5} {k.draft_len:>3} {k.micro_batches:>3} {k.prompts:>10} "
              f"{k.prompts_per_host:>9} {k.tokens_per_s:>11.1f} {k.steady_tokens_per_s:>9.1f} {k.time_s / 3600:>9.2f}")
    print(f"fleet: {f.num_prompts} prompts on {sum(k.count for k in f.kinds)} hosts, completes in "
          f"{f.completion_time_s / 3600:.2f} h, {f.tokens_per_s:.0f} tok/s")
    return 0
