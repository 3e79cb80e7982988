#!/usr/bin/env python
"""Engine memory at real size: a random checkpoint of a real model's shapes (OLMoE-1B-7B, cut to --layers
of its 16 layers), planned on a CPU-only host spec, run at k = 0 in a child process; its peak resident
set against the checkpoint's size and against the plan's host footprint.

    python bench/engine_memory.py [--config planner/presets/olmoe-1b-7b.json] [--layers 6]
                                  [--hardware devbox-2core-calibrated] [--prompts 8] [--max-new-tokens 8] [--keep]

The checkpoint is written layer by layer (one safetensors shard per layer, bf16, random N(0, 1/fan_in)
weights) into a temporary directory under /tmp, removed afterwards unless --keep. The plan is
plan_for_checkpoint's (every expert cached; on a host whose CPU stands in for the GPU the cache is
views of the host store). The child loads it with Engine(dtype=bfloat16) and generates; its peak RSS is
the child's ru_maxrss (os.wait4), the number `/usr/bin/time -v` prints. The report's memory rows
(predicted against measured, planner/report/memory_rows.py) are printed above the last line.
Ends with exactly one line:
    engine-memory: checkpoint C.C GB, plan P.P GB, peak RSS R.R GB (R/C X.XXx, R/P Y.YYx)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GB = 1e9


def write_checkpoint(config_path: Path, layers: int, out: Path, seed: int = 0) -> int:
    """A random bf16 checkpoint of the config's shapes cut to `layers` layers, one shard per layer (plus
    one for the embeddings and the head), each written before the next is drawn; returns its bytes."""
    import torch
    from safetensors.torch import save_file

    from specmoe.planner.atomic_file import atomic_write_text

    from specmoe.runtime.weights.arch import expected_shapes, moe_prefix
    from specmoe.runtime.weights.checkpoint import parse_config

    raw = json.loads(config_path.read_text())
    raw["num_hidden_layers"] = int(layers)
    raw["torch_dtype"] = "bfloat16"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.json", json.dumps(raw, indent=1))
    c = parse_config(raw, str(out))
    g = torch.Generator().manual_seed(seed)
    shapes = expected_shapes(c)

    def draw(name: str, shape: tuple) -> torch.Tensor:
        if len(shape) == 1:
            return torch.ones(shape, dtype=torch.bfloat16)
        scale = 1.0 if "embed_tokens" in name else shape[-1] ** -0.5
        return (torch.randn(shape, generator=g) * scale).to(torch.bfloat16)

    weight_map: dict[str, str] = {}

    def shard(fname: str, names: list[str], make) -> None:
        sd = {n: make(n) for n in names}
        save_file(sd, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in names})

    top = [n for n in shapes if not n.startswith("model.layers.")]
    shard("model-embed.safetensors", top, lambda n: draw(n, shapes[n]))
    F, H = c.moe_intermediate, c.hidden
    for i in range(c.num_layers):
        names = [n for n in shapes if n.startswith(f"model.layers.{i}.")]
        extra = {}
        if c.layer_is_moe(i):
            pre = moe_prefix(c, i)
            extra[pre + "gate.weight"] = (c.num_experts, H)
            for e in range(c.num_experts):
                p = f"{pre}experts.{e}."
                extra.update({p + "gate_proj.weight": (F, H), p + "up_proj.weight": (F, H), p + "down_proj.weight": (H, F)})
        allshapes = {**{n: shapes[n] for n in names}, **extra}
        shard(f"model-layer{i:03d}.safetensors", list(allshapes), lambda n: draw(n, allshapes[n]))
    atomic_write_text(out / "model.safetensors.index.json", json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sum(f.stat().st_size for f in out.glob("*.safetensors"))


def child(args) -> int:
    """Load the checkpoint with the plan and generate; write the run record."""
    import torch

    from specmoe.planner.plan import Plan
    from specmoe.runtime.engine import Engine

    plan = Plan.from_json(args.plan)
    eng = Engine(plan, args.ckpt, dtype=torch.bfloat16)
    V = eng.tcfg.vocab_size
    prompts = [[(17 + 31 * i + 7 * j) % V for j in range(args.prompt_len)] for i in range(args.prompts)]
    res = eng.generate(prompts, max_new_tokens=args.max_new_tokens, draft_len=0)
    res.record.to_json(args.run)
    return 0


def run_child(ckpt: Path, plan_path: Path, run_path: Path, args) -> int:
    """The child's peak RSS in bytes (ru_maxrss of the waited-for process)."""
    cmd = [sys.executable, __file__, "--child", "--ckpt", str(ckpt), "--plan", str(plan_path), "--run", str(run_path),
           "--prompts", str(args.prompts), "--prompt-len", str(args.prompt_len),
           "--max-new-tokens", str(args.max_new_tokens)]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"engine-memory: the engine run failed (exit {proc.returncode})")
    return int(usage.ru_maxrss) * 1024


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(REPO / "planner" / "presets" / "olmoe-1b-7b.json"))
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hardware", default="devbox-2core-calibrated")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint directory")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--plan", help=argparse.SUPPRESS)
    ap.add_argument("--run", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    import torch

    from specmoe.planner.report import compare
    from specmoe.planner.report.render import render_table
    from specmoe.runtime.device import machine_description
    from specmoe.runtime.engine import plan_for_checkpoint

    work = Path(tempfile.mkdtemp(prefix="engine-memory-", dir="/tmp"))
    try:
        ckpt = work / "checkpoint"
        C = write_checkpoint(Path(args.config), args.layers, ckpt)
        plan = plan_for_checkpoint(ckpt, None, args.hardware, batch=args.prompts, draft_len=0,
                                   prompt_len=args.prompt_len, gen_len=args.max_new_tokens, weight_dtype="bf16")
        plan_path, run_path = work / "plan.json", work / "run.json"
        plan.to_json(plan_path)
        P = float(plan.memory["host_bytes"])
        R = run_child(ckpt, plan_path, run_path, args)
        m = machine_description(torch.device("cpu"))
        print(f"machine: {m['cpu_model']}, {m['cpu_cores']} cores, torch {m['torch_version']}; "
              f"{Path(args.config).stem} cut to {args.layers} layers, {args.prompts} prompts of {args.prompt_len} "
              f"tokens, {args.max_new_tokens} new tokens, k = 0, bf16, plan on {args.hardware}")
        table = render_table(compare(plan, run_path)).splitlines()
        start = next((i for i, line in enumerate(table) if line.strip().startswith("memory")), len(table))
        print("\n".join(line for line in table[start:] if line.strip() and "mean |error|" not in line
                        and not line.strip().startswith(("PASS", "MISS"))))
        mem = json.loads(run_path.read_text())["memory"]
        print(f"process before any weight {mem['host_rss_start_bytes'] / GB:.2f} GB; load peak "
              f"{mem['host_rss_load_peak_bytes'] / GB:.2f} GB; run peak {mem['host_rss_peak_bytes'] / GB:.2f} GB")
        if args.keep:
            print(f"kept: {work}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"engine-memory: checkpoint {C / GB:.1f} GB, plan {P / GB:.1f} GB, peak RSS {R / GB:.1f} GB "
          f"(R/C {R / C:.2f}x, R/P {R / P:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
