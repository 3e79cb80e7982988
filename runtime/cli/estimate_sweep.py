"""`specmoe estimate` over several values, as `llama-bench` sweeps: comma lists in --batch, --draft-len,
--micro-batches, --prompt-len and --gen-len give one row per combination, printed as a table, markdown,
CSV or JSON (--format). Imports only `planner` (no torch).

    specmoe estimate --model mixtral-8x7b --hardware a30-xeon6426y --prompt-len 566 --gen-len 1024 \
        --batch 64,128 --draft-len 0,2 --acceptance 0.8 --format csv
"""
from __future__ import annotations

import csv
import io
import itertools
import json
from argparse import Namespace

from specmoe.planner.errors import SpecError

from specmoe.runtime.cli.args import int_arg

SWEPT = (("batch", "--batch", 1), ("micro_batches", "--micro-batches", 1), ("draft_len", "--draft-len", 0),
         ("prompt_len", "--prompt-len", 1), ("gen_len", "--gen-len", 1))
FORMATS = ("table", "md", "csv", "json")
MAX_ROWS = 4096
# (column, header, format) of a row
COLUMNS = (("batch", "batch", "{}"), ("micro_batches", "m", "{}"), ("draft_len", "k", "{}"),
           ("prompt_len", "prompt", "{}"), ("gen_len", "gen", "{}"), ("iteration_ms", "iteration ms", "{:.2f}"),
           ("tokens_per_iteration", "tokens/iter", "{:.1f}"), ("decode_tokens_per_s", "decode tok/s", "{:.1f}"),
           ("end_to_end_tokens_per_s", "e2e tok/s", "{:.1f}"), ("bound", "bound", "{}"),
           ("gpu_GiB", "GPU GiB", "{:.2f}"), ("cpu_GiB", "CPU GiB", "{:.2f}"))


def values(text, flag: str, minimum: int, allow_max: bool = False) -> list:
    """The comma-separated values of a flag ("64,128"), each checked; "max" where allowed (--batch)."""
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if allow_max and part.lower() == "max":
            out.append("max")
        else:
            out.append(int_arg(part, flag, minimum))
    if len(set(out)) != len(out):
        raise SpecError(flag, f"repeats a value in {text!r}", "list each value once, e.g. 64,128")
    return out


def is_sweep(args: Namespace) -> bool:
    """A sweep when any swept flag lists several values or a --format is asked for."""
    return args.format is not None or any("," in str(getattr(args, name)) for name, _, _ in SWEPT)


def combinations(args: Namespace) -> list[dict]:
    """Every combination of the swept flags' values, in the order llama-bench prints them."""
    lists = {name: values(getattr(args, name), flag, lo, allow_max=(name == "batch")) for name, flag, lo in SWEPT}
    rows = [dict(zip(lists, combo)) for combo in itertools.product(*lists.values())]
    if len(rows) > MAX_ROWS:
        raise SpecError("--batch/--draft-len/...", f"{len(rows)} combinations exceed {MAX_ROWS}",
                        "sweep fewer values at once")
    return rows


def one_row(args: Namespace, combo: dict, build, estimate) -> dict:
    """The estimate of one combination as a flat row (build: estimate.build on a copy of args)."""
    sub = Namespace(**{**vars(args), **{k: str(v) for k, v in combo.items()}})
    model, hw, wl, draft, k, mb, batch = build(sub)
    e = estimate(model, hw, wl, draft=draft, draft_len=k, micro_batches=mb, batch=batch if batch else "max",
                 overlap_draft=args.overlap_draft, timeline=False, use_measured=not args.peak_only)
    return {"batch": e.batch, "micro_batches": e.micro_batches, "draft_len": e.draft_len, "prompt_len": wl.prompt_len,
            "gen_len": wl.gen_len, "iteration_ms": e.iteration_time_s * 1e3,
            "tokens_per_iteration": e.tokens_per_iteration, "decode_tokens_per_s": e.decode_tokens_per_s,
            "end_to_end_tokens_per_s": e.end_to_end_tokens_per_s, "bound": e.bound,
            "gpu_GiB": e.memory["gpu_bytes"] / 2**30, "cpu_GiB": e.memory["cpu_bytes"] / 2**30}


def render(rows: list[dict], fmt: str) -> str:
    """The rows as an aligned table, a markdown table, CSV (header + one line per row) or a JSON list."""
    if fmt == "json":
        return json.dumps(rows, indent=1)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=[c for c, _, _ in COLUMNS], lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        return buf.getvalue().rstrip("\n")
    cells = [[f.format(r[c]) for c, _, f in COLUMNS] for r in rows]
    heads = [h for _, h, _ in COLUMNS]
    if fmt == "md":
        return "\n".join(["| " + " | ".join(heads) + " |", "|" + "|".join("---:" for _ in heads) + "|"]
                         + ["| " + " | ".join(c) + " |" for c in cells])
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    return "\n".join("  ".join(x.rjust(w) for x, w in zip(line, widths)) for line in [heads, *cells])


def run_sweep(args: Namespace, build, estimate) -> str:
    fmt = args.format or "table"
    if fmt not in FORMATS:
        raise SpecError("--format", f"unknown format {fmt!r}", f"one of {', '.join(FORMATS)}")
    return render([one_row(args, c, build, estimate) for c in combinations(args)], fmt)
