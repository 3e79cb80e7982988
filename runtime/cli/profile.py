"""`specmoe profile-acceptance --target DIR --draft DIR --prompts FILE [--max-k 8] [--max-new-tokens N]
-o acceptance.csv`: measure acc(k), k = 1..max_k, with the engine's greedy speculative loop
(runtime/calibrate/acceptance.py) and write the CSV `k,accepted,...` that `specmoe plan --acceptance`
and planner.workload.AcceptanceProfile.from_csv read.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from specmoe.planner.errors import SpecError
from specmoe.planner.workload import MAX_DRAFT_LEN


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", required=True, help="target checkpoint directory (HF, safetensors)")
    p.add_argument("--draft", required=True, help="draft checkpoint directory: a draft model or an EAGLE head")
    p.add_argument("--prompts", required=True, help="JSON lines with a 'prompt' field, or one prompt per line")
    p.add_argument("--max-k", type=int, default=MAX_DRAFT_LEN,
                   help=f"largest draft length to measure (default {MAX_DRAFT_LEN})")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens generated per prompt at each k (default 48)")
    p.add_argument("--batch", type=int, default=None, help="sequences decoded together (default: the prompts, at most 64)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="compute dtype (default: float32 on a CPU, else the checkpoint's)")
    p.add_argument("-o", "--output", required=True, help="CSV to write (k,accepted,...)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")     # before torch is imported (see runtime/calibrate/run.py)
    from specmoe.runtime.calibrate.acceptance import profile_acceptance
    from specmoe.runtime.cli.run import read_prompts

    for flag, v in (("--max-k", args.max_k), ("--max-new-tokens", args.max_new_tokens)):
        if v < 1:
            raise SpecError(flag, f"must be >= 1, got {v}", f"e.g. {flag} 8")
    if args.batch is not None and args.batch < 1:
        raise SpecError("--batch", f"must be >= 1, got {args.batch}", "e.g. --batch 16")
    out = Path(args.output)
    if out.is_dir() or not out.parent.is_dir():
        raise SpecError("-o", f"{out} is a directory or its directory does not exist", "give a CSV path in an existing directory")
    prompts = read_prompts(args.prompts)
    for flag, d in (("--target", args.target), ("--draft", args.draft)):
        if not Path(d).is_dir():
            raise SpecError(flag, f"{d} is not a directory", "give a HF checkpoint directory")
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=args.max_k, desc="specmoe profile-acceptance", unit="k", file=sys.stderr)

    def progress(k: int, row: dict) -> None:
        if bar is not None:
            bar.set_postfix_str(f"k={k} acc={row['raw']:.2f}")
            bar.update(1)

    try:
        res = profile_acceptance(args.target, args.draft, prompts, max_k=args.max_k, max_new_tokens=args.max_new_tokens,
                                 batch=args.batch, device=args.device, dtype=args.dtype, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    res.write_csv(out)
    print(res.table())
    print(f"wrote {out}")
    return 0
