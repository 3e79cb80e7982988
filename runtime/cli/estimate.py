"""`specmoe estimate`: stage times, iteration time, decode throughput, memory and the bound resource
of one configuration, from the planner's cost model. Imports only `planner` (no torch).

Numeric arguments are read as text and checked here, so that every bad value gets one message
naming the flag and the fix (SpecError -> exit 2 in runtime/cli/main.py).
"""
from __future__ import annotations

import json

from specmoe.planner.errors import SpecError

from specmoe.runtime.cli.args import int_arg as _int, pos_float_arg as _pos_float


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="model preset name or path to a HF config.json")
    p.add_argument("--hardware", required=True, help="hardware preset name or path to a spec YAML")
    p.add_argument("--prompt-len", required=True, metavar="N", help="prompt tokens per sequence")
    p.add_argument("--gen-len", required=True, metavar="N", help="generated tokens per sequence")
    p.add_argument("--batch", default="max", metavar="B|max",
                   help="sequences decoded together (default: max that fits); a comma list sweeps, e.g. 64,128")
    p.add_argument("--num-prompts", default=None, metavar="N",
                   help="prompts in the job: also predict how its batch drains and the job's throughput "
                        "(default: an open stream)")
    p.add_argument("--draft-len", default="0", metavar="K",
                   help="draft tokens per iteration (0: no speculation); a comma list sweeps, e.g. 0,2,4")
    p.add_argument("--acceptance", default=None, metavar="ALPHA|table.csv",
                   help="per-token acceptance rate in [0, 1), or a CSV with columns k,accepted")
    p.add_argument("--draft", default=None, metavar="PRESET|config.json",
                   help="draft model (default with --draft-len > 0: the target's default draft)")
    p.add_argument("--micro-batches", default="2", metavar="M", help="micro-batches of the pipeline (default 2)")
    p.add_argument("--gpu-mem-gib", "--gpu-mem-GiB", dest="gpu_mem_GiB", default=None, metavar="X",
                   help="override the GPU memory of the spec, in GiB")
    p.add_argument("--cpu-mem-gib", "--cpu-mem-GiB", dest="cpu_mem_GiB", default=None, metavar="Y",
                   help="override the CPU memory of the spec, in GiB")
    p.add_argument("--kv-dtype", default="bf16", help="KV cache dtype: bf16, fp16, fp32, fp8 (default bf16)")
    p.add_argument("--weight-dtype", default="bf16", help="weight dtype: bf16, fp16, fp32, fp8 (default bf16)")
    p.add_argument("--overlap-draft", action="store_true",
                   help="overlap one micro-batch's draft steps with another's verification")
    p.add_argument("--peak-only", action="store_true", help="ignore measured curves; use datasheet peaks")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--timeline", action="store_true", help="with --json: include the simulated event timeline")
    p.add_argument("--format", default=None, choices=("table", "md", "csv", "json"),
                   help="one row per combination of the comma lists in --batch, --micro-batches, --draft-len, "
                        "--prompt-len and --gen-len (a sweep, as llama-bench), printed in this format (default "
                        "table when a list is given)")


def build(args):
    """(model, hardware, workload, draft, draft_len, micro_batches, batch) from parsed arguments."""
    from specmoe.planner.hardware_spec import load_hardware
    from specmoe.planner.model_spec import default_draft_name, load_model
    from specmoe.planner.workload import KV_DTYPES, Workload, load_acceptance

    prompt = _int(args.prompt_len, "--prompt-len", 1)
    gen = _int(args.gen_len, "--gen-len", 1)
    k = _int(args.draft_len, "--draft-len", 0)
    mb = _int(args.micro_batches, "--micro-batches", 1)
    batch = None if str(args.batch).lower() == "max" else _int(args.batch, "--batch", 1)
    for flag, v in (("--kv-dtype", args.kv_dtype), ("--weight-dtype", args.weight_dtype)):
        if v not in KV_DTYPES:
            raise SpecError(flag, f"unknown dtype {v!r}", f"one of {', '.join(KV_DTYPES)}")
    gpu_mem = _pos_float(args.gpu_mem_GiB, "--gpu-mem-gib")
    cpu_mem = _pos_float(args.cpu_mem_GiB, "--cpu-mem-gib")
    model = load_model(args.model)
    hw = load_hardware(args.hardware)
    if gpu_mem is not None or cpu_mem is not None:
        hw = hw.with_overrides(gpu_mem_GiB=gpu_mem, cpu_mem_GiB=cpu_mem)
    if args.acceptance is None and k > 0:
        raise SpecError("--acceptance", f"needed with --draft-len {k}",
                        "give a per-token acceptance rate such as 0.8, or a CSV with columns k,accepted")
    acc = load_acceptance(args.acceptance if args.acceptance is not None else 0.0, max_k=max(16, k))
    n_prompts = None if args.num_prompts is None else _int(args.num_prompts, "--num-prompts", 1)
    wl = Workload(prompt_len=prompt, gen_len=gen, batch=batch, acceptance=acc, kv_dtype=args.kv_dtype,
                  weight_dtype=args.weight_dtype, num_prompts=n_prompts)
    draft = None
    if k > 0:
        draft = load_model(args.draft if args.draft is not None else default_draft_name(model))
    return model, hw, wl, draft, k, mb, batch


def _gib(x: float) -> str:
    return f"{x / 2**30:8.2f} GiB"


def format_table(e) -> str:
    from specmoe.planner.stages import ITERATION_PARTS

    it = e.iteration_time_s
    lines = [f"specmoe estimate: {e.model} on {e.hardware}" + (f", draft {e.draft}" if e.draft else ""),
             f"  batch {e.batch}, micro-batches {e.micro_batches}, draft length {e.draft_len}, "
             f"acc(k) {e.accepted_per_iteration:.3f}, mean context {e.context_len:.0f}, rates: {e.source}",
             "", f"  {'stage':18s} {'resource':8s} {'seconds/iter':>13s} {'share':>7s}"]
    from specmoe.planner.stages import STAGE_RESOURCE, Stage
    for st in ITERATION_PARTS:
        v = e.stages.get(st.value, 0.0)
        res = "cpu+gpu" if st is Stage.DRAFT_CPU else STAGE_RESOURCE[st]
        lines.append(f"  {st.value:18s} {res:8s} {v:13.4f} {v / it if it else 0:7.1%}")
    lines += [f"  {'iteration':18s} {'all':8s} {it:13.4f}   (closed-form bare max {e.closed_form_iteration_s:.4f})",
              "", "  busy per iteration: " + ", ".join(f"{r} {v:.4f} s" for r, v in e.resource_busy_s.items())
              + f"; bound: {e.bound}",
              f"  tokens per iteration {e.tokens_per_iteration:.1f}; decode {e.decode_tokens_per_s:.1f} tokens/s; "
              f"MoE GPU utilisation {e.moe_gpu_utilization:.2%} of peak per streamed layer (achieved over the "
              f"iteration: {e.moe_gpu_utilization_achieved:.2%})"]
    if e.prefill_time_s:
        lines.append(f"  whole run: prefill {e.prefill_time_s:.2f} s, decode {e.decode_time_s:.2f} s, "
                     f"end-to-end {e.end_to_end_tokens_per_s:.1f} tokens/s (decode-only {e.run_decode_tokens_per_s:.1f})")
        parts = {k: v for k, v in e.prefill_parts.items() if k != "total" and v > 0}
        if parts:
            lines.append("  prefill by part (busy s; copies overlap compute on a GPU host): " + ", ".join(
                f"{k} {v:.3g}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1])))
    if e.job:
        j = e.job
        lines.append(f"  job of {j['num_prompts']} prompts: the batch drains to {j['mean_live_batch']:.1f} live sequences "
                     f"on average over {j['iterations']:.1f} decode iterations (iteration {j['iteration_time_s']:.4f} s "
                     f"there); job decode {j['decode_tokens_per_s']:.1f} tokens/s, end-to-end "
                     f"{j['end_to_end_tokens_per_s']:.1f}")
    mem = e.memory
    lines += ["", f"  GPU memory {_gib(mem['gpu_bytes'])} of {_gib(mem['gpu_usable_bytes'])} usable "
                  f"({mem['gpu_capacity_bytes'] / 2**30:.1f} GiB less a {mem['gpu_reserve_bytes'] / 2**30:g} GiB reserve)"]
    lines += [f"    {k:28s}{_gib(v)}" for k, v in mem["gpu_breakdown"].items() if v]
    lines += [f"  CPU memory {_gib(mem['cpu_bytes'])} of {_gib(mem['cpu_usable_bytes'])} usable "
              f"({mem['cpu_capacity_bytes'] / 2**30:.1f} GiB less a {mem['cpu_reserve_bytes'] / 2**30:g} GiB reserve)"]
    lines += [f"    {k:28s}{_gib(v)}" for k, v in mem["cpu_breakdown"].items() if v]
    pl = e.placement
    slots = sorted(set(pl.expert_cache_slots))
    lines += ["", f"  placement: expert cache slots per layer {slots if len(slots) > 1 else slots[0]}, "
                  f"draft KV on GPU for {pl.draft_kv_gpu_sequences}/{e.batch} sequences, "
                  f"target KV on GPU for {pl.target_kv_gpu_sequences}"]
    return "\n".join(lines)


def run(args) -> int:
    from specmoe.planner.estimator import estimate
    from specmoe.runtime.cli.estimate_sweep import is_sweep, run_sweep

    if is_sweep(args):
        if args.json and args.format is None:
            args.format = "json"
        print(run_sweep(args, build, estimate))
        return 0
    model, hw, wl, draft, k, mb, batch = build(args)
    e = estimate(model, hw, wl, draft=draft, draft_len=k, micro_batches=mb, batch=batch if batch else "max",
                 overlap_draft=args.overlap_draft, timeline=bool(args.json and args.timeline),
                 use_measured=not args.peak_only)
    if args.json:
        print(json.dumps(e.to_dict(timeline=bool(args.timeline)), default=_default))
    else:
        print(format_table(e))
    return 0


def _default(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"cannot serialise {type(o).__name__}")
