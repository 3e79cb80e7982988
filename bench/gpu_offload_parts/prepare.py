"""The steps before the measured modes, in order: describe the machine, choose how the CPU attention's
tensors cross PCIe, plan the slice, build the weights and the first engine and warm up, then project the
essential modes' time and fall back to half the layers when they would not fit the budget."""
from __future__ import annotations

import math
import time

from .common import OPT, Deadline
from .machine import choose_host_io, copy_overlap_probe, machine_info
from .planning import budgets, full_model_plans, make_plans, model_configs, slice_setup
from .runner import Runner


def describe_machine(s) -> None:
    """Print the run's first phase line and the machine (GPU, CPU, torch, CUDA, cupy)."""
    args, log, res = s.args, s.log, s.res
    log.phase(f"gpu-offload benchmark{' (CPU SMOKE: tiny Mixtral-like model, CPU as the device)' if args.cpu_smoke else ''}"
              f"; budget {args.time_budget_s:g} s")
    try:
        res["machine"] = machine_info(s.device)
    except Exception as e:  # noqa: BLE001
        res["machine"] = {"device": str(s.device)}
        s.err("machine description", e)
    mi = res["machine"]
    log(f"machine: GPU {mi.get('gpu')}, CPU {mi.get('cpu_model')} ({mi.get('cpu_cores')} cores), torch "
        f"{mi.get('torch_version')} (CUDA {mi.get('cuda_version')}), cupy {mi.get('cupy_version')}")


def choose_transfers(s) -> None:
    """On CUDA, the copy-overlap probe; from it (or --host-io) args.host_io_used, the engines' host_io."""
    args, log, res, device = s.args, s.log, s.res, s.device
    if device.type == "cuda":
        try:
            pr = copy_overlap_probe(device)
            res["copy_overlap_probe"] = pr
            log(f"copy-overlap probe ({pr['small_MB']} MB transfer while a {pr['big_MB']} MB expert-size H2D runs on "
                f"the copy stream, {pr['big_copy_GBps']:.1f} GB/s): " + "; ".join(
                    f"{k} {v['alone_ms']:.2f} -> {v['during_big_copy_ms']:.2f} ms"
                    + (" (WAITS)" if v.get("waits_for_big_copy") else "") if "alone_ms" in v else f"{k} {v}"
                    for k, v in pr.items() if isinstance(v, dict)))
        except Exception as e:  # noqa: BLE001
            s.err("copy-overlap probe", e)
    args.host_io_used = choose_host_io(args.host_io, device, res.get("copy_overlap_probe"))
    res["config"]["host_io"] = args.host_io_used
    log(f"attention host transfers: host_io={args.host_io_used} (--host-io {args.host_io})")


def plan_slice(s) -> None:
    """The hardware spec (the datasheet h200-host where the calibrated one is missing), the full model's
    plans, the slice's budgets and its plan per mode; recorded in res['config']."""
    from specmoe.planner.errors import SpecError
    from specmoe.planner.hardware_spec import load_hardware
    from specmoe.planner.model_spec import ModelSpec

    args, log, res = s.args, s.log, s.res
    try:
        s.hw_base = load_hardware(args.hardware)
    except SpecError as e:      # no calibrated spec on this checkout: the datasheet one, said so
        log(f"hardware spec {args.hardware} unavailable ({e}); using h200-host")
        res["config"]["hardware_fallback"] = str(e)
        s.hw_base = load_hardware("h200-host")
    t0 = time.perf_counter()
    tcfg, s.dcfg = model_configs(args.layers, args.cpu_smoke)
    s.dspec = ModelSpec.from_hf_config(s.dcfg, name="draft-eagle-shape" if not args.cpu_smoke else "tiny-draft")
    s.full = full_model_plans(tcfg, s.dspec, s.hw_base, args, log)
    s.bud = budgets(s.full, args, log)
    s.tcfg, s.spec, s.hw_for = slice_setup(tcfg, args.layers, args.cpu_smoke, s.hw_base, s.bud)
    s.plans = make_plans(s.spec, s.dspec, s.hw_for, args, log, s.full["plans"])
    s.plan_notes = s.plans.pop("_notes")
    res["phases_s"]["planning"] = time.perf_counter() - t0
    res["config"].update(vocab_size=s.tcfg["vocab_size"], hardware=s.hw_base.name, budgets=s.bud, target=s.tcfg,
                         draft=s.dcfg, planner_options=dict(OPT), plan_notes=s.plan_notes,
                         expert_streaming=args.streaming)


def warn_iteration_limit(s) -> None:
    """Say so when the iterations at the largest k can emit more tokens than the planned output length."""
    args = s.args
    kmax = max(p.draft_len for p in s.plans.values())
    if args.iterations * (kmax + 1) + 1 > args.gen_len:
        s.log(f"note: {args.iterations} iterations of up to k+1 = {kmax + 1} tokens may exceed gen_len "
              f"{args.gen_len}: some sequences can finish early")


def build_and_warm_up(s) -> None:
    """The kernel backends, the random weights (pinned host experts, drawn on the device) and the first
    engine, then the warm-up; a failed warm-up is recorded and the modes still run."""
    log, res, device = s.log, s.res, s.device
    log.phase("building the engine: random bf16 weights drawn on the "
              f"{'GPU, experts copied into pinned host memory' if device.type == 'cuda' else 'CPU'}")
    t0 = time.perf_counter()
    try:
        from specmoe.runtime.device import kernel_backends
        res["backends"] = kernel_backends()       # builds the C++ verify kernel now, not inside a mode
    except Exception as e:  # noqa: BLE001
        res["backends"] = {}
        s.err("kernel backends", e)
    res["phases_s"]["kernels"] = time.perf_counter() - t0
    s.runner = Runner(s.tcfg, s.dcfg, device, s.args, log)
    first = s.plans["spec_alpha0.8"]
    s.n_warm = min(8, first.batch)
    s.warm_rec = None
    try:
        warm_up(s, first)
    except Exception as e:  # noqa: BLE001  the modes still run (and report their own errors)
        s.err("first engine / warm-up", e)
        s.runner.release()


def warm_up(s, first) -> None:
    """Build the first plan's engine, then run it at s.n_warm sequences for one iteration (compiles the
    kernels, measures prefill attention for the projection): s.warm_rec, res['warmup']."""
    from dataclasses import replace

    log, res, runner, n_warm = s.log, s.res, s.runner, s.n_warm
    t0 = time.perf_counter()
    runner.engine_for(first)
    res["phases_s"]["weights_first_engine"] = time.perf_counter() - t0
    log.phase(f"engine built in {res['phases_s']['weights_first_engine']:.1f} s (backends: "
              f"{sorted(set(res['backends'].values()))})")
    fp = first.placement        # the first plan at a small batch (KV rows for n_warm sequences only)
    wplan = replace(first, batch=n_warm, micro_batches=min(first.micro_batches, n_warm),
                    placement=replace(fp, draft_kv_gpu_sequences=min(fp.draft_kv_gpu_sequences, n_warm),
                                      target_kv_gpu_sequences=min(fp.target_kv_gpu_sequences, n_warm)))
    s.warm_rec, st, _, wall = runner.run(wplan, 0.8, False, 1)
    if st.startswith("deadline"):
        raise Deadline("the time budget ran out during the warm-up")
    res["phases_s"]["warmup"] = wall
    warm = {"sequences": n_warm, "wall_s": wall, "status": st}
    if s.warm_rec is not None:
        warm.update(prefill_s=s.warm_rec.prefill_time_s, prefill_stage_totals_s=s.warm_rec.prefill_stage_totals_s)
    res["warmup"] = warm
    log.phase(f"warm-up ({n_warm} sequences, 1 iteration) {wall:.1f} s")


def project(s, plan, iters) -> float:
    """Projected seconds of one mode: a share of the engine build, prefill scaled from the warm-up, and
    1.5x the predicted iterations (0 without a warm-up record)."""
    warm_rec, runner = s.warm_rec, s.runner
    if warm_rec is None:
        return 0.0
    pre = warm_rec.prefill_stage_totals_s
    attn = pre.get("target.attention", 0.0) * plan.batch / s.n_warm
    other = max(0.0, warm_rec.prefill_time_s - pre.get("target.attention", 0.0))
    chunks = math.ceil(plan.batch * s.args.prompt_len / 32768)
    build = runner.build_s[0] if len(runner.build_s) > 0 else 0.0
    return 0.3 * build + attn + other * chunks + 1.5 * iters * plan.predicted.iteration_time_s + 2.0


def fit_budget(s) -> None:
    """Project the essential pair (alpha 0.8 and k=0); if it does not fit the time left, halve the layers:
    budgets, plans and runner rebuilt for the smaller slice (the pinned host experts kept)."""
    args, log, res = s.args, s.log, s.res
    ess = (project(s, s.plans["spec_alpha0.8"], args.iterations) + project(s, s.plans["k0"], args.iterations)) \
        * args.project_scale
    res["projection_s"] = {"essential_modes": ess, "remaining": s.remaining()}
    log(f"projected time of the alpha=0.8 and k=0 modes: {ess:.0f} s; {s.remaining():.0f} s left")
    if ess > s.remaining() and args.layers > 2:
        L2 = max(2, args.layers // 2)
        log.phase(f"budget tight: falling back to {L2} layers (budgets rescaled by {L2}/32)")
        s.runner.release()
        args.layers = L2
        s.bud = budgets(s.full, args, log)
        res["config"]["budgets"] = s.bud
        s.tcfg, s.spec, s.hw_for = slice_setup(s.tcfg, L2, args.cpu_smoke, s.hw_base, s.bud)
        s.plans = make_plans(s.spec, s.dspec, s.hw_for, args, log, s.full["plans"])
        s.plan_notes = s.plans.pop("_notes")
        res["config"]["plan_notes"] = s.plan_notes
        args.host_io_used = s.runner.host_io
        s.runner = Runner(s.tcfg, s.dcfg, s.device, args, log, expert_host=s.runner.expert_host)
        res["config"].update(layers=L2, target=s.tcfg, layer_fallback=True)
