"""`specmoe plan`: choose batch, micro-batches, draft length and placement with the planner's optimizer
(a MILP per enumerated point) and write plan.json; `specmoe plan --explain plan.json` says why.

Imports only `planner` (never torch). Numeric arguments are read as text and checked here, so every
bad value gets one message naming the flag and the fix (SpecError -> exit 2 in runtime/cli/main.py).
"""
from __future__ import annotations

import json
from pathlib import Path

from specmoe.planner.atomic_file import check_distinct, check_writable
from specmoe.planner.errors import SpecError
from specmoe.planner.workload import MAX_DRAFT_LEN

from specmoe.runtime.cli.args import int_arg as _int, pos_float_arg as _pos_float

GiB = 2 ** 30


def add_arguments(p) -> None:
    p.add_argument("--model", help="model preset name or path to a HF config.json")
    p.add_argument("--hardware", help="hardware preset name or path to a spec YAML")
    p.add_argument("--prompt-len", metavar="N", help="prompt tokens per sequence")
    p.add_argument("--gen-len", metavar="N", help="generated tokens per sequence")
    p.add_argument("--batch", default="max", metavar="B|max",
                   help="sequences decoded together (default: max, the optimizer chooses)")
    p.add_argument("--num-prompts", default=None, metavar="N",
                   help="prompts in the job: a finite job's batch drains at its end under speculation, which the "
                        "plan then prices in (default: an open stream, the batch stays full)")
    p.add_argument("--draft", default=None, metavar="PRESET|config.json",
                   help="draft model or EAGLE head: a preset, a config.json or a checkpoint directory (an EAGLE "
                        "head is told by its config.json, planner/eagle.py) (default: the target's default draft)")
    p.add_argument("--acceptance", default=None, metavar="ALPHA|table.csv",
                   help="per-token acceptance rate in [0, 1), or a CSV with columns k,accepted")
    p.add_argument("--gpu-mem-gib", "--gpu-mem-GiB", dest="gpu_mem_GiB", default=None, metavar="X",
                   help="override the GPU memory of the spec, in GiB")
    p.add_argument("--cpu-mem-gib", "--cpu-mem-GiB", dest="cpu_mem_GiB", default=None, metavar="Y",
                   help="override the CPU memory of the spec, in GiB")
    p.add_argument("--objective", default="throughput", help="throughput (default) or latency")
    p.add_argument("--min-throughput", default=None, metavar="TPS",
                   help="with --objective latency: the decode tokens/s the plan must reach")
    p.add_argument("--solver", default="cbc", help="cbc (bundled with pulp, default) or highs")
    p.add_argument("--max-draft-len", default=str(MAX_DRAFT_LEN), metavar="K",
                   help=f"draft lengths 0..K are tried (default {MAX_DRAFT_LEN})")
    p.add_argument("--micro-batches", default="1,2,4,8", metavar="M,M,...",
                   help="micro-batch counts to try (default 1,2,4,8)")
    p.add_argument("--kv-dtype", default="bf16", help="KV cache dtype: bf16, fp16, fp32, fp8 (default bf16)")
    p.add_argument("--weight-dtype", default="bf16", help="weight dtype: bf16, fp16, fp32, fp8 (default bf16)")
    p.add_argument("--routing-stats", default=None, metavar="stats.csv|stats.npy",
                   help="expert-hit counts per layer (rows) and expert (columns): caches each layer's hottest")
    p.add_argument("--time-limit", default=None, metavar="S", help="seconds per MILP (default 5; 1 with --routing-stats)")
    p.add_argument("--peak-only", action="store_true", help="ignore measured curves; use datasheet peaks")
    p.add_argument("--streaming", default=None, choices=("next", "predict", "off"),
                   help="fix the expert-streaming schedule (default: the hardware's: next on a GPU, off where the "
                        "CPU stands in for it); the plan is costed with it and the engine runs it")
    p.add_argument("--host-io", default=None, choices=("direct", "pinned", "zero-copy"),
                   help="fix how attention's transfers for host KV rows move (default: pinned on a GPU)")
    p.add_argument("--threads", default=None, metavar="N",
                   help="CPU threads the engine will run with (default: the spec's calibration threads, else its cores)")
    p.add_argument("--gpu-attention", action="store_true",
                   help="also consider streaming CPU KV to the GPU for attention (the cost model prices it; "
                        "`specmoe run` refuses such plans: the engine attends CPU KV on the CPU)")
    p.add_argument("-o", "--output", default=None, metavar="plan.json",
                   help="where to write the plan (default: not written, only printed)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (plan.json's content) instead of the summary")
    p.add_argument("--explain", default=None, metavar="plan.json", help="explain an existing plan and exit")


# ---------------------------------------------------------------------------------------------




def load_routing_stats(path: str, num_layers: int, num_experts: int):
    """[layers, experts] hit counts from a CSV (one row per layer, optional header) or a .npy file."""
    import numpy as np

    from specmoe.planner.paths import is_file

    p = Path(path)
    if not is_file(p):
        raise SpecError("--routing-stats", f"no file at {p}", "give a CSV (rows: layers, columns: experts) or a .npy")
    try:
        if p.suffix == ".npy":
            a = np.load(p, allow_pickle=False)
        else:
            rows = [r.strip() for r in p.read_text().splitlines() if r.strip()]
            if rows:
                try:
                    [float(x) for x in rows[0].split(",")]
                except ValueError:
                    rows = rows[1:]                  # a header line
            a = np.array([[float(x) for x in r.split(",")] for r in rows])
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise SpecError("--routing-stats", f"cannot read {p}: {e}", "numbers only, one row per layer") from None
    if a.shape != (num_layers, num_experts):
        raise SpecError("--routing-stats", f"{p} has shape {tuple(a.shape)}, the model needs ({num_layers}, {num_experts})",
                        "one row per layer (zeros on dense layers), one column per expert")
    return a


def _as_path(v):
    """A flag's value when it names an existing file or directory (not a preset name or a number)."""
    from specmoe.planner.paths import exists

    return v if v is not None and exists(v) else None


def build(args):
    """(model, hardware, workload, draft, keyword arguments of optimize) from parsed arguments."""
    from specmoe.planner.hardware_spec import load_hardware
    from specmoe.planner.model_spec import load_model
    from specmoe.planner.workload import KV_DTYPES, Workload, load_acceptance

    for flag, v in (("--model", args.model), ("--hardware", args.hardware), ("--prompt-len", args.prompt_len),
                    ("--gen-len", args.gen_len)):
        if v is None:
            raise SpecError(flag, "is required to make a plan", "see `specmoe plan --help` (or use --explain plan.json)")
    prompt = _int(args.prompt_len, "--prompt-len", 1)
    gen = _int(args.gen_len, "--gen-len", 1)
    kmax = _int(args.max_draft_len, "--max-draft-len", 0)
    batch = None if str(args.batch).lower() == "max" else _int(args.batch, "--batch", 1)
    n_prompts = None if args.num_prompts is None else _int(args.num_prompts, "--num-prompts", 1)
    mbs = [_int(x, "--micro-batches", 1) for x in str(args.micro_batches).split(",") if x.strip()]
    if not mbs:
        raise SpecError("--micro-batches", "is empty", "give e.g. 1,2,4,8")
    for flag, v in (("--kv-dtype", args.kv_dtype), ("--weight-dtype", args.weight_dtype)):
        if v not in KV_DTYPES:
            raise SpecError(flag, f"unknown dtype {v!r}", f"one of {', '.join(KV_DTYPES)}")
    if args.objective not in ("throughput", "latency"):
        raise SpecError("--objective", f"unknown objective {args.objective!r}", "throughput or latency")
    floor = _pos_float(args.min_throughput, "--min-throughput")
    if floor is not None and args.objective != "latency":
        raise SpecError("--min-throughput", "only applies with --objective latency", "add --objective latency")
    if args.solver not in ("cbc", "highs"):
        raise SpecError("--solver", f"unknown solver {args.solver!r}", "cbc or highs")
    time_limit = _pos_float(args.time_limit, "--time-limit")
    gpu_mem = _pos_float(args.gpu_mem_GiB, "--gpu-mem-gib")
    cpu_mem = _pos_float(args.cpu_mem_GiB, "--cpu-mem-gib")
    if args.output is not None:
        check_writable(args.output, "-o")
    check_distinct({"-o": args.output}, {"--model": _as_path(args.model), "--hardware": _as_path(args.hardware),
                                         "--draft": _as_path(args.draft), "--acceptance": _as_path(args.acceptance),
                                         "--routing-stats": args.routing_stats})
    model = load_model(args.model)
    hw = load_hardware(args.hardware)
    if gpu_mem is not None or cpu_mem is not None:
        hw = hw.with_overrides(gpu_mem_GiB=gpu_mem, cpu_mem_GiB=cpu_mem)
    if args.acceptance is None and kmax > 0:
        raise SpecError("--acceptance", "needed to plan speculative decoding",
                        "give a per-token acceptance rate such as 0.8, a CSV with columns k,accepted, "
                        "or --max-draft-len 0")
    acc = load_acceptance(args.acceptance if args.acceptance is not None else 0.0, max_k=max(16, kmax))
    wl = Workload(prompt_len=prompt, gen_len=gen, batch=batch, acceptance=acc, kv_dtype=args.kv_dtype,
                  weight_dtype=args.weight_dtype, num_prompts=n_prompts)
    draft = load_model(args.draft) if args.draft is not None else None
    stats = (load_routing_stats(args.routing_stats, model.num_layers, model.num_experts)
             if args.routing_stats is not None else None)
    kw = dict(objective=args.objective, min_throughput=floor, routing_stats=stats, solver=args.solver,
              k_values=range(0, kmax + 1), micro_batch_values=tuple(mbs), use_measured=not args.peak_only,
              time_limit_s=time_limit, gpu_attention=args.gpu_attention, schedule=_schedule(args, hw))
    return model, hw, wl, draft, kw


def _schedule(args, hw):
    """The hardware's default schedule with what the flags fix."""
    from specmoe.planner.schedule import default_schedule

    threads = _int(args.threads, "--threads", 1) if args.threads is not None else None
    pre_post = None if args.streaming is None else ("per_layer" if args.streaming == "next" else "per_micro_batch")
    return default_schedule(hw).with_changes(expert_streaming=args.streaming, pre_post=pre_post,
                                             host_io=args.host_io, cpu_threads=threads)


# ---------------------------------------------------------------------------------------------
def _slots(pl) -> str:
    s = sorted(set(pl.expert_cache_slots))
    if not s:
        return "0"
    n = len(pl.expert_cache_slots)
    return str(s[0]) if len(s) == 1 else f"{s[0]}-{s[-1]} (mean {sum(pl.expert_cache_slots) / n:.2f})"


def _schedule_line(s) -> str:
    return (f"experts stream {s.expert_streaming}, pre/post attention {s.pre_post.replace('_', ' ')}, MoE "
            f"{s.moe.replace('_', ' ')}, attention I/O {s.host_io}, {s.cpu_threads} CPU threads")


def format_plan(plan) -> str:
    pr, pl, sv = plan.predicted, plan.placement, plan.solver
    m = plan.model.get("name", "?")
    d = plan.draft.get("name") if plan.draft else None
    acc1 = pr.tokens_per_iteration / plan.batch if plan.batch else 0.0
    lines = [
        f"specmoe plan: {m} on {plan.hardware.get('name', '?')}" + (f", draft {d}" if d else "")
        + f"; objective {plan.objective}",
        f"  chosen: batch {plan.batch}, micro-batches {plan.micro_batches}, draft length {plan.draft_len} "
        f"(tokens per sequence per iteration {acc1:.2f})",
        f"  placement: expert cache slots per layer {_slots(pl)}; target KV on GPU for {pl.target_kv_gpu_sequences}"
        f"/{plan.batch}; draft KV on GPU for {pl.draft_kv_gpu_sequences}/{plan.batch}; attention of CPU-KV "
        f"sequences on the {pl.attention_device}; CPU-computed cold experts on {len(pl.cpu_expert_layers)} layers",
        f"  schedule: {_schedule_line(plan.schedule)}",
        f"  predicted (event simulator): {pr.decode_tokens_per_s:.1f} decode tokens/s, iteration {pr.iteration_time_s:.4f} s, "
        f"bound {plan.bound}; closed form {sv.get('closed_form_tokens_per_s', 0.0):.1f} tokens/s"
        + (f"; end-to-end {pr.end_to_end_tokens_per_s:.1f} tokens/s" if pr.end_to_end_tokens_per_s else ""),
    ]
    if plan.objective == "latency" and acc1 > 0:
        lines.append(f"  optimised: per-token latency {pr.iteration_time_s / acc1 * 1e3:.2f} ms (the iteration over "
                     f"the {acc1:.2f} tokens each sequence gains per iteration)")
    job = getattr(pr, "job", None) or {}
    if job:
        lines.append(f"  job of {job['num_prompts']} prompts: the batch drains to {job['mean_live_batch']:.1f} live "
                     f"sequences on average over {job['iterations']:.1f} decode iterations (iteration "
                     f"{job['iteration_time_s']:.4f} s there); job decode {pr.decode_tokens_per_s:.1f} tokens/s, "
                     f"full batch {job['steady_decode_tokens_per_s']:.1f}")
    mem = plan.memory
    if "gpu_usable_bytes" in mem:
        lines.append(f"  memory: GPU {mem['gpu_bytes'] / GiB:.2f} of {mem['gpu_usable_bytes'] / GiB:.2f} GiB usable, "
                     f"CPU {mem['cpu_bytes'] / GiB:.2f} of {mem['cpu_usable_bytes'] / GiB:.2f} GiB usable")
    lines.append(f"  solver: {sv.get('name')} ({sv.get('status')}), {sv.get('milps')} MILPs over {sv.get('points')} "
                 f"points, {sv.get('time_s', 0.0):.2f} s")
    lines += ["", f"  {'':9s}{'batch':>6s} {'mb':>3s} {'k':>3s} {'tokens/s':>10s} {'vs chosen':>10s}  differs"]
    lines.append(f"  {'chosen':9s}{plan.batch:6d} {plan.micro_batches:3d} {plan.draft_len:3d} "
                 f"{pr.decode_tokens_per_s:10.1f} {1.0:10.3f}")
    for i, a in enumerate(plan.alternatives, 1):
        lines.append(f"  {'alt ' + str(i):9s}{a['batch']:6d} {a['micro_batches']:3d} {a['draft_len']:3d} "
                     f"{a['decode_tokens_per_s']:10.1f} {a['relative_to_chosen']:10.3f}  {a['differs']}")
    for key, name in (("by_k", "draft_len"), ("by_batch", "batch")):
        pts = plan.frontier.get(key, [])
        if pts:
            lines.append(f"  frontier against {name}: " + ", ".join(
                f"{e[name]}: {e['decode_tokens_per_s']:.0f}" if e.get("feasible", True) else f"{e[name]}: -"
                for e in pts))
    return "\n".join(lines)


def format_explain(plan) -> str:
    from specmoe.planner.stages import ITERATION_PARTS, STAGE_RESOURCE, Stage

    pr = plan.predicted
    it = pr.iteration_time_s or float("nan")
    busy: dict[str, float] = {}
    rows = []
    for st in ITERATION_PARTS:
        v = float(pr.stages.get(st.value, 0.0))
        res = STAGE_RESOURCE[st]
        busy[res] = busy.get(res, 0.0) + v
        if st is Stage.DRAFT_CPU:
            res = "cpu+gpu"
        rows.append((st.value, res, v))
    if pr.timeline:               # the simulator's own split (draft.cpu is part CPU, part GPU)
        busy = {}
        for e in pr.timeline:
            busy[e["resource"]] = busy.get(e["resource"], 0.0) + float(e["end_s"]) - float(e["start_s"])
    lines = [format_plan(plan).splitlines()[0],
             f"  why: of the {it:.4f} s iteration, the {plan.bound} is the bound resource "
             f"(busy {busy.get(plan.bound, 0.0):.4f} s, {busy.get(plan.bound, 0.0) / it:.0%}); "
             + ", ".join(f"{r} busy {v:.4f} s ({v / it:.0%})" for r, v in sorted(busy.items()) if r != plan.bound),
             "", f"  {'stage':18s} {'resource':8s} {'seconds/iter':>13s} {'share':>7s}"]
    for name, res, v in rows:
        mark = "  <- bound resource" if plan.bound in res.split("+") and v > 0 else ""
        lines.append(f"  {name:18s} {res:8s} {v:13.4f} {v / it:7.1%}{mark}")
    pl = plan.placement
    lines += ["", f"  placement: slots {_slots(pl)}, target KV on GPU {pl.target_kv_gpu_sequences}/{plan.batch}, "
                  f"draft KV on GPU {pl.draft_kv_gpu_sequences}/{plan.batch}, attention {pl.attention_device}, "
                  f"CPU-expert layers {len(pl.cpu_expert_layers)}"]
    if plan.alternatives:
        a = plan.alternatives[0]
        lost = 1.0 - a["relative_to_chosen"]
        lines.append(f"  the next-best plan ({a['differs']}) gives {a['decode_tokens_per_s']:.1f} tokens/s: "
                     + (f"it gives up {lost:.1%} of the throughput" if lost >= 0 else
                        f"the event simulator rates it {-lost:.1%} faster, the closed form the optimizer "
                        f"maximises rates it {a['closed_form_tokens_per_s']:.1f} tokens/s against "
                        f"{plan.solver.get('closed_form_tokens_per_s', 0.0):.1f}"))
    by_k = [e for e in plan.frontier.get("by_k", []) if e.get("feasible", True)]
    if by_k and any(e["draft_len"] == 0 for e in by_k):
        base = next(e for e in by_k if e["draft_len"] == 0)["decode_tokens_per_s"]
        top = max(by_k, key=lambda e: e["decode_tokens_per_s"])
        if base > 0:
            lines.append(f"  speculation: k = {top['draft_len']} gives {top['decode_tokens_per_s'] / base:.2f}x "
                         f"the throughput of k = 0 at this batch")
    return "\n".join(lines)


def run(args) -> int:
    from specmoe.planner.plan import Plan

    if args.explain is not None:
        print(format_explain(Plan.from_json(args.explain)))
        return 0
    from specmoe.planner.optimizer import optimize

    model, hw, wl, draft, kw = build(args)
    plan = optimize(model, hw, wl, draft=draft, **kw)
    if args.output is not None:
        plan.to_json(args.output)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=1))
        return 0
    print(format_plan(plan))
    print(f"  written {args.output}" if args.output is not None else "  not written (-o plan.json saves it)")
    return 0
