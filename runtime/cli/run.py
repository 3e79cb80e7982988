"""`specmoe run plan.json --target DIR --draft DIR --prompts FILE -o run.json`: execute a plan.

--prompts: JSON lines with a "prompt" field, or plain text with one prompt per line.
--outputs: JSONL, one object per finished sequence as it finishes (index, prompt, text, token_ids
= generated tokens only). Ctrl-C or an error mid-run keeps every finished sequence's output and
writes run.json with complete: false and the error (exit 130 on Ctrl-C, 1 on an error).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from specmoe.planner.errors import SpecError
from specmoe.planner.workload import MAX_PROFILE_K

from specmoe.runtime.cli.run_outputs import (Outputs, Terminated, check_run_paths, run_plan_path, save_record,
                                             stop_signals)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("plan", help="plan.json written by `specmoe plan`")
    p.add_argument("--target", required=True, help="target checkpoint directory (HF, safetensors)")
    p.add_argument("--draft", default=None,
                   help="draft checkpoint directory: a draft model or an EAGLE head (told by its config.json); "
                        "needed when k > 0")
    p.add_argument("--prompts", required=True, help="JSON lines with a 'prompt' field, or one prompt per line")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt (default 64)")
    p.add_argument("--draft-len", type=int, default=None, help="override the plan's k (0 = no speculation)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the sampler (temperature > 0) and of the acceptance oracle (default 0)")
    p.add_argument("--outputs", default=None, help="JSONL file receiving each finished sequence")
    p.add_argument("-o", "--output", required=True, help="run record to write (run.json)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="compute dtype (default: the checkpoint's)")
    p.add_argument("--dynamic-k", action="store_true", help="re-choose k each iteration from the cost model")
    p.add_argument("--profile-stages", action="store_true", help="synchronize the GPU around every stage")
    p.add_argument("--prefetch", nargs="?", const="next", default="auto", choices=("auto", "off", "next", "predict"),
                   help="expert streaming schedule: next = stream layer i+1's non-resident experts while layer i "
                        "computes (and layer 0's during the draft phase); predict = only those layer i+1's router "
                        "predicts; off = after routing; auto (default) = next on CUDA, off on the CPU")
    p.add_argument("--acceptance-oracle", type=float, default=None,
                   help="replace real acceptance by a seeded Bernoulli oracle at this rate (benchmarks only)")
    p.add_argument("--no-speed-probe", action="store_true",
                   help="skip the machine-speed probe before and after the run (it runs when the plan's hardware "
                        "spec was calibrated with one: about 0.3 s each on 2 cores)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: the plan's schedule, i.e. its calibration's); another count makes "
                        "a new plan, saved beside the run record")
    p.add_argument("--rebalance-experts", action="store_true",
                   help="re-choose the cached experts from the first prefill's routing even when the plan names them")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from JSON lines ({"prompt": ...}) or plain text (one per line); SpecError otherwise."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise SpecError("--prompts", f"cannot read {p}: {e.strerror or e}", "give an existing text file") from None
    if b"\x00" in raw:
        raise SpecError("--prompts", f"{p} is not a text file", "give JSON lines or plain text, one prompt per line")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError("--prompts", f"{p} is not UTF-8 text", "give JSON lines or plain text, one prompt per line") from None
    lines = [(i, line) for i, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        raise SpecError("--prompts", f"{p} is empty", "put one prompt per line (or JSON lines with a 'prompt' field)")
    if not lines[0][1].lstrip().startswith("{"):
        return [line for _, line in lines]
    out = []
    for i, line in lines:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise SpecError("--prompts", f"{p} line {i} is not valid JSON ({e.msg})", "fix the line") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise SpecError("--prompts", f"{p} line {i} has no string 'prompt' field", 'write {"prompt": "..."}')
        try:
            obj["prompt"].encode("utf-8")
        except UnicodeEncodeError:
            raise SpecError("--prompts", f"{p} line {i}: the prompt holds a lone surrogate (a \\ud800-\\udfff escape "
                            "without its pair): not text", "give valid Unicode text") from None
        out.append(obj["prompt"])
    return out


def run(args: argparse.Namespace) -> int:
    from specmoe.runtime.engine import Engine

    _check_args(args)
    prompts = read_prompts(args.prompts)
    out_path = Path(args.output)
    if args.threads is not None and args.threads < 1:
        raise SpecError("--threads", f"must be >= 1, got {args.threads}", "e.g. --threads 2")
    given, plan = _plan_at_draft_len(args)
    check_run_paths(args, plan is not given or args.prefetch != "auto" or args.threads is not None)
    engine = Engine(plan, args.target, args.draft, device=args.device, dtype=args.dtype,
                    profile_stages=args.profile_stages, dynamic_k=args.dynamic_k,
                    acceptance_oracle=args.acceptance_oracle,
                    prefetch_next_layer=None if args.prefetch == "auto" else args.prefetch,
                    rebalance_experts=True if args.rebalance_experts else None, threads=args.threads)
    if engine.plan is not given:
        _save_run_plan(engine.plan, out_path)
    engine.warm_up(prompts)   # the process's one-time costs out of the run's timings (Engine.warm_up)
    for w in engine.calibration_warnings:
        print(f"specmoe run: warning: this run differs from the calibration of {engine.plan.hardware.get('name', '?')}"
              f" -- {w}", file=sys.stderr)
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(prompts), unit="seq", desc="specmoe run", file=sys.stderr)
    outputs = Outputs(args.outputs)

    def on_finish(o):
        outputs.add(o)
        if bar is not None:
            bar.update(1)

    from specmoe.runtime.calibrate.speed_probe import RunProbe

    probe = RunProbe({} if args.no_speed_probe else engine.plan.hardware, engine.device)
    probe.before()
    try:
        with stop_signals() as stopping:
            code, record, error = _generate(engine, prompts, args, on_finish, probe, stopping)
            lost = save_record(record, out_path)
    finally:
        outputs.close()
        if bar is not None:
            bar.close()
    return _report(code, record, error, lost, outputs, out_path)


def _check_args(args) -> None:
    """The numbers of the command line, each refused with its flag named."""
    import math

    if args.max_new_tokens < 1:
        raise SpecError("--max-new-tokens", f"must be >= 1, got {args.max_new_tokens}", "e.g. 64")
    if args.max_new_tokens > 1 << 24:
        raise SpecError("--max-new-tokens", f"{args.max_new_tokens} is more than any model's positions", "e.g. 64")
    if args.draft_len is not None and not 0 <= args.draft_len <= MAX_PROFILE_K:
        raise SpecError("--draft-len", f"must be in [0, {MAX_PROFILE_K}], got {args.draft_len}",
                        "0 disables speculation")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise SpecError("--temperature", f"must be a finite number >= 0, got {args.temperature}", "0 for greedy")
    if not 0 <= args.seed < 2 ** 63:
        raise SpecError("--seed", f"must be in [0, 2^63), got {args.seed}", "e.g. --seed 0")
    if args.acceptance_oracle is not None and not 0 <= args.acceptance_oracle <= 1:
        raise SpecError("--acceptance-oracle", f"{args.acceptance_oracle} is outside [0, 1]", "e.g. 0.8")


def _generate(engine, prompts, args, on_finish, probe, stopping):
    """(exit code, run record, the error that stopped the run or None)."""
    try:
        res = engine.generate(prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              seed=args.seed, on_finish=on_finish)
        stopping["stopped"] = True
        probe.after(res.record)
        return 0, res.record, None
    except BaseException as e:  # noqa: BLE001
        stopping["stopped"] = True
        partial = getattr(e, "partial_result", None)
        if partial is None:
            raise
        code = 143 if isinstance(e, Terminated) else 130 if isinstance(e, KeyboardInterrupt) else \
            2 if isinstance(e, SpecError) else 1
        return code, partial.record, e


def _report(code: int, r, error, lost: str | None, outputs, out_path: Path) -> int:
    """One line on how the run ended: what was kept, where."""
    kept = r.finished_sequences if outputs.lines is None else outputs.lines
    where = f"run record (complete: false) in {out_path}" if lost is None else lost
    on_disk = "" if outputs.lines is None else f" in {outputs.path}"
    if code == 0 and lost is None:
        print(f"specmoe run: {r.finished_sequences} sequences, {r.generated_tokens} tokens; decode "
              f"{r.decode_tokens_per_s:.1f} tok/s, end-to-end {r.end_to_end_tokens_per_s:.1f} tok/s, mean accepted "
              f"{r.mean_accepted:.2f} (k={r.draft_len}); record in {out_path}")
        lat = r.latency or {}
        if lat:
            print("specmoe run: latency ms (mean / median / p99): " + "; ".join(
                f"{name} {lat[key]['mean']:.2f} / {lat[key]['median']:.2f} / {lat[key]['p99']:.2f}"
                for name, key in (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms")) if key in lat)
                + ("; accepted by draft position " + ", ".join(f"{a:.2f}" for a in r.acceptance_by_position)
                   if r.acceptance_by_position else ""))
        return 0
    if code == 0:
        print(f"specmoe run: error: {lost}; {kept} finished sequences kept{on_disk}", file=sys.stderr)
        return 1
    if isinstance(error, SpecError):
        raise error
    why = ("terminated (SIGTERM)" if isinstance(error, Terminated) else "interrupted" if code == 130
           else f"error: {_one_line(error)}")
    print(f"specmoe run: {why}; {kept} finished sequences kept{on_disk}, {where}", file=sys.stderr)
    return code


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}" + (f": {e.filename}" if e.filename else "")
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _plan_at_draft_len(args):
    """(plan.json, the plan to run): with --draft-len a new plan at that draft length (re-estimated)."""
    from specmoe.planner.model_spec import ModelSpec
    from specmoe.planner.plan import Plan
    from specmoe.planner.replan import replan

    plan = Plan.from_json(args.plan)
    if args.draft_len is None or args.draft_len == plan.draft_len:
        return plan, plan
    draft = ModelSpec.from_hf_config(args.draft) if (args.draft is not None and plan.draft is None) else None
    return plan, replan(plan, draft_len=args.draft_len, draft=draft)


def _save_run_plan(plan, out_path: Path) -> None:
    """Overrides (--draft-len, --prefetch, --threads) make a new plan: save it beside the run record, so
    `specmoe report RUN.plan.json RUN.json` compares the run with what the planner predicts for it."""
    p = run_plan_path(out_path)
    plan.to_json(p)
    changed = plan.solver.get("changed", {}) if isinstance(plan.solver, dict) else {}
    what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()) or "overrides"
    print(f"specmoe run: {what}: a new plan, re-estimated, in {p} (report the run against it)", file=sys.stderr)
