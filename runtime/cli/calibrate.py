"""`specmoe calibrate`: measure this machine and write a hardware spec with measured curves.

    specmoe calibrate -o hw_specs/NAME.yaml [--model PRESET|config.json] [--base PRESET|spec.yaml]
                      [--quick] [--force] [--threads N] [--no-progress]
"""
from __future__ import annotations

import os


def add_arguments(p) -> None:
    p.add_argument("-o", "--output", required=True, metavar="SPEC.yaml",
                   help="hardware spec to write (e.g. hw_specs/mybox.yaml); written atomically")
    p.add_argument("--model", default=None, metavar="PRESET|config.json",
                   help="model whose expert and attention shapes are measured (default: models/tiny-moe, "
                        "else mixtral-8x7b shapes scaled to fit)")
    p.add_argument("--base", default=None, metavar="PRESET|spec.yaml",
                   help="spec whose gpu/cpu/link peaks are copied (default without a GPU: devbox-2core; "
                        "with a GPU and no base the measured peaks are used)")
    p.add_argument("--quick", action="store_true", help="about 20 s instead of up to 2 minutes, less precise")
    p.add_argument("--force", action="store_true", help="measure again even if this machine is in the cache")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads to measure with (default: torch's default); the engine's fixed costs depend "
                        "on it, and the cache keeps one calibration per thread count (`specmoe demo` uses 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _fmt_curve(c: dict, digits: int = 1) -> str:
    return "  ".join(f"{k}:{v:.{digits}f}" for k, v in c.items())


DRAFT_NAMES = {"model": "a draft model", "eagle": "an EAGLE head"}   # the prefill passes' kinds of draft


def summary_lines(raw: dict) -> list[str]:
    """The measured numbers of a written spec, a few lines for the terminal."""
    m = raw.get("measured", {})
    lines = [f"  DRAM read            {m['dram_read_GBps']:.1f} GB/s",
             f"  H2D GB/s by chunk MB {_fmt_curve(m['h2d_GBps_by_chunk_MB'])}",
             f"  HBM copy (r+w)       {m['hbm_copy_GBps']:.1f} GB/s",
             f"  GPU GEMM TFLOP/s by M {_fmt_curve(m['gpu_gemm_TFLOPs_by_M'], 3)}",
             f"  CPU GEMM GFLOP/s by M {_fmt_curve(m['cpu_gemm_GFLOPs_by_M'])}"]
    for q, c in m.get("cpu_attention_kv_GBps", {}).items():
        lines.append(f"  verify attention {q:>3s} KV GB/s by context {_fmt_curve(c, 2)}")
    if m.get("op_overhead_us"):
        lines.append(f"  fixed cost per torch operation {m['op_overhead_us']:.1f} us")
    if m.get("stage_overhead_us"):
        lines.append("  fixed cost per stage invocation (us): "
                     + "  ".join(f"{k}:{v:.3g}" for k, v in m["stage_overhead_us"].items()))
    pre = ((m.get("details") or {}).get("stage_overheads") or {}).get("prefill")
    if isinstance(pre, dict) and pre.get("configs"):
        fit = [c["fit_rel_err"] for c in pre["configs"]]
        bare = pre.get("model_rel_err_before") or []
        shapes = ", ".join(dict.fromkeys(f"{c['B']}x{c['P']}" for c in pre["configs"]))
        kinds = [DRAFT_NAMES[k] for k in dict.fromkeys(c.get("draft") for c in pre["configs"]) if k in DRAFT_NAMES]
        drafts = f", each with {' and with '.join(kinds)}" if kinds else ""
        lines.append(f"  prefill passes ({shapes} prompts x tokens{drafts}): "
                     f"the cost model {min(fit):+.0%} to {max(fit):+.0%} off them with the prefill keys"
                     + (f", {min(bare):+.0%} to {max(bare):+.0%} without" if bare else ""))
    return lines


def run(args) -> int:
    # before torch is imported: an idle OpenMP pool that spins slows small operations several-fold on
    # shared cores; the fixed costs measured are those of the engine run the same way
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from specmoe.planner.errors import SpecError
    from specmoe.runtime.calibrate.quiet import quality_lines
    from specmoe.runtime.calibrate.run import calibrate_with_info

    if args.threads is not None:
        if args.threads < 1:
            raise SpecError("--threads", f"must be >= 1, got {args.threads}", "e.g. --threads 2")
        import torch

        torch.set_num_threads(args.threads)

    spec, info = calibrate_with_info(args.output, model=args.model, base=args.base, quick=args.quick,
                                     force=args.force, progress=not args.no_progress)
    how = "cached measurement" if info["cache_hit"] else f"{info['mode']} measurement"
    print(f"wrote {args.output} ({how}, {info['elapsed_s']:.1f} s; cache: {info['cache_path']})")
    print(f"  {spec.description}")
    for line in summary_lines(spec.raw):
        print(line)
    for line in quality_lines(info.get("quality"), info["cache_hit"]):
        print(line)
    return 0
