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
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# the thread environment the calibration ran with (idle OpenMP workers sleep), set before anything loads
# torch and its libgomp (runtime/thread_env.py; importing specmoe.runtime does the same)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

FULL_LAYERS = 32
FULL_GPU_GiB, FULL_CPU_GB = 24.0, 128.0          # the full model's machine (issue 6)
H2D_REF_GBps = 55.0                              # pinned H2D measured on the H200 host
ACCEL_REF = {"tokens_per_s": 17.0, "step_s": 3.76, "batch": 64, "layers": 8, "gpu_budget_GiB": 6,
             "source": "reference (measured earlier, not re-run): transformers + accelerate CPU offload of the "
                       "same 8-layer Mixtral-8x7B slice on the H200 host, 6 GiB GPU budget, batch 64, 3.76 s per "
                       "decode step (DESIGN.md); batch 256 ran out of GPU memory"}
GOALS = {"spec0.8_over_k0": 2.5, "spec0.8_over_accelerate": 20.0, "h2d_busy_fraction": 0.90,
         "iteration_error_pct": 10.0}
ORACLE = "oracle-driven"
STREAMING = {"auto": None, "next": "next", "predict": "predict", "off": "off"}   # --streaming -> Engine
OPT = dict(cpu_expert_mode="off", gpu_attention=False, target_kv_gpu=False, timeline=False, alternatives=0)
GiB = 1024 ** 3
WARMUP_ITERATIONS = 2            # each mode's first iterations, left out of its iteration time and tokens/s


class Deadline(BaseException):
    """The time budget ran out (raised by SIGALRM; the engine keeps its partial record)."""


class StopAfter(Exception):
    """Raised by the k policy after the wanted number of decode iterations."""


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


# ---------------------------------------------------------------------------------------------
class Log:
    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, msg: str = "") -> None:
        for line in str(msg).split("\n"):
            print(line, flush=True)
            self.lines.append(line)

    def phase(self, msg: str) -> None:
        self(f"[{time.perf_counter() - T_START:7.1f} s] {msg}")


def elapsed() -> float:
    return time.perf_counter() - T_START


def model_configs(layers: int, smoke: bool) -> tuple[dict, dict]:
    """(target, draft) HF config dicts; EOS disabled so no sequence leaves the batch early."""
    if smoke:
        t = {"model_type": "mixtral", "vocab_size": 2048, "hidden_size": 512, "intermediate_size": 1792,
             "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64, "num_local_experts": 8,
             "num_experts_per_tok": 2, "max_position_embeddings": 4096, "rope_theta": 1e6, "rms_norm_eps": 1e-5,
             "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
        d = {"model_type": "llama", "vocab_size": 2048, "hidden_size": 512, "intermediate_size": 1792,
             "num_hidden_layers": 1, "num_attention_heads": 8, "num_key_value_heads": 8,
             "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "hidden_act": "silu",
             "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    else:
        from specmoe.planner.model_spec import PRESET_DIR

        def load(name):
            return {k: v for k, v in json.loads((PRESET_DIR / f"{name}.json").read_text()).items()
                    if not k.startswith("_")}
        t, d = load("mixtral-8x7b"), load("mixtral-8x7b-eagle")
    t = dict(t, num_hidden_layers=layers, eos_token_id=None)
    d = dict(d, eos_token_id=None)
    return t, d


def smoke_full_budgets(tcfg: dict, prompt_len: int, gen_len: int, hw, batch: int = 16) -> tuple[float, float]:
    """The tiny model's 'full machine', sized against its 32-layer experts so that its plans land in the
    real run's regime (about 10% of experts cached, a speculative plan with several micro-batches), on
    top of the reserves `hw` keeps back."""
    from specmoe.planner.memory import host_staging_bytes
    from specmoe.planner.model_spec import ModelSpec
    from specmoe.planner.workload import Workload

    full = ModelSpec.from_hf_config(dict(tcfg, num_hidden_layers=FULL_LAYERS), name="tiny-full")
    experts = full.routed_expert_elems_total * 2
    kv = full.kv_bytes_per_token(2) * (prompt_len + gen_len) * (batch + 0.5)   # the CPU holds `batch` sequences' KV
    staging = host_staging_bytes(full, Workload(prompt_len, gen_len), batch, 8)
    return ((experts * 0.25 + 12e6 + hw.gpu.reserve_bytes) / GiB,
            (experts + kv + staging + hw.cpu.reserve_bytes) / 1e9)


def solver_missing(e: BaseException) -> bool:
    """The one failure of planner.optimize the bench plans around: no MILP solver (pulp not installed or not
    importable, as on a bare GPU host, or a solver pulp cannot find)."""
    from specmoe.planner.errors import SpecError

    return (isinstance(e, ImportError) and "pulp" in f"{e.name} {e}") or \
        (isinstance(e, SpecError) and e.field == "solver")


def plan_for(spec, hw, wl, dspec, log, k_min: int = 0, like=None):
    """planner.optimize (streamed cold experts, target KV and attention on the CPU) over k in k_min..8;
    where it cannot run (e.g. pulp missing on the GPU host), the same choice by enumeration:
    planner.estimate over those k and m in {1, 2, 4, 8}, each at planner.memory.max_batch with
    planner.memory.default_placement."""
    ks = range(k_min, 9) if dspec is not None else [0]
    kw = dict(OPT)
    if like is not None:     # the full model's configuration: only the placement is the slice's own
        from dataclasses import replace

        ks, wl = [like.draft_len], replace(wl, batch=like.batch)
        kw["micro_batch_values"] = (like.micro_batches,)
    from specmoe.planner.errors import InfeasibleError, SpecError

    try:
        from specmoe.planner.optimizer import optimize

        return optimize(spec, hw, wl, draft=dspec if dspec is not None else False, k_values=ks, **kw)
    except (ImportError, SpecError) as e:
        if not solver_missing(e):
            raise
        log(f"planner.optimize has no solver ({type(e).__name__}: {str(e)[:160]}); choosing by enumeration "
            f"with planner.estimate")
        why = f"{type(e).__name__}: {str(e)[:200]}"
    from specmoe.planner.estimator import estimate
    from specmoe.planner.memory import max_batch
    from specmoe.planner.plan import Plan

    best, tried = None, []
    for k in ks:
        for m in (1, 2, 4, 8):
            try:
                B = max_batch(spec, hw, wl, dspec if k else None, k, m)
                if m > B:
                    continue
                est = estimate(spec, hw, wl, draft=dspec if k else None, draft_len=k, micro_batches=m, batch=B,
                               timeline=False, run=False)
            except InfeasibleError:     # this (k, m) fits no batch
                continue
            tried.append({"draft_len": k, "micro_batches": m, "batch": B,
                          "decode_tokens_per_s": est.decode_tokens_per_s})
            if best is None or est.decode_tokens_per_s > best[0].decode_tokens_per_s:
                best = (est, k, m, B)
    if best is None:
        raise RuntimeError(f"no feasible configuration (optimize failed with {why})")
    est, k, m, B = best
    return Plan(model=spec.to_dict(), hardware=hw.raw, workload=wl.to_dict(),
                draft=dspec.to_dict() if (k and dspec is not None) else None, batch=B, micro_batches=m, draft_len=k,
                placement=est.placement, predicted=est.to_prediction(), memory=est.memory, bound=est.bound,
                frontier={"by_k": [], "by_batch": [], "enumerated": tried},
                solver={"name": "bench enumeration (planner.estimate at planner.memory.max_batch, default "
                                "placement)", "optimize_error": why})


MODES = (("spec_alpha0.8", 0.8), ("spec_alpha0.6", 0.6), ("k0", None))


def full_model_plans(tcfg, dspec, hw_base, args, log) -> dict:
    """The planner's plan of the full 32-layer model on the full machine, per mode (independent of the
    slice's layer count, so computed once)."""
    from specmoe.planner.model_spec import ModelSpec
    from specmoe.planner.workload import AcceptanceProfile, Workload

    full_gpu, full_cpu = (smoke_full_budgets(tcfg, args.prompt_len, args.gen_len, hw_base) if args.cpu_smoke
                          else (FULL_GPU_GiB, FULL_CPU_GB))
    full = ModelSpec.from_hf_config(dict(tcfg, num_hidden_layers=FULL_LAYERS), name="full-model")
    hw_full = hw_base.with_overrides(gpu_mem_GiB=full_gpu, cpu_mem_GiB=full_cpu * 1e9 / GiB)
    out = {"spec": full, "gpu_GiB": full_gpu, "cpu_GB": full_cpu, "plans": {},
           "gpu_reserve_bytes": hw_full.gpu.reserve_bytes, "cpu_reserve_bytes": hw_full.cpu.reserve_bytes}
    for name, alpha in MODES:
        wl = Workload(prompt_len=args.prompt_len, gen_len=args.gen_len,
                      acceptance=AcceptanceProfile.from_alpha(alpha or 0.0))
        p = plan_for(full, hw_full, wl, dspec if alpha is not None else None, log, k_min=1 if alpha else 0)
        out["plans"][name] = p
        cached = sum(p.placement.expert_cache_slots) / max(1, len(full.moe_layers) * full.num_experts)
        log(f"full model (32 layers, {full_gpu:.3g} GiB GPU, {full_cpu:.3g} GB host), {name}: batch {p.batch}, "
            f"k={p.draft_len}, m={p.micro_batches}, {cached:.1%} of experts cached")
    return out


def budgets(full: dict, args, log) -> dict:
    """GPU and CPU budgets of the L-layer slice per mode (see the module docstring): the CPU scales by
    L/32; the GPU gets the full model's non-layer part of that mode's plan (streaming buffers,
    embeddings, draft + its KV, activations) plus L/32 of the rest, so each mode's slice keeps the
    expert-cache share of the full model in that mode. Neither the reserves each memory keeps back nor
    the CPU attention's staging (sized by the largest pass) scale with layers."""
    spec = full["spec"]
    full_gpu, full_cpu = full["gpu_GiB"], full["cpu_GB"]
    rg, rc = full["gpu_reserve_bytes"], full["cpu_reserve_bytes"]
    wb = 2
    layer_weights = (spec.non_expert_elems - spec.embed_elems - spec.lm_head_elems) * wb
    usable_full = full_gpu * GiB - rg
    L = args.layers
    staging = max(p.memory["cpu_breakdown"].get("attention_staging", 0.0) for p in full["plans"].values())
    cpu_GiB = ((full_cpu * 1e9 - rc - staging) * L / FULL_LAYERS + rc + staging) / GiB
    out = {"cpu_GiB": cpu_GiB, "naive_gpu_GiB": full_gpu * L / FULL_LAYERS, "modes": {}, "full_model": {}}
    for name, p in full["plans"].items():
        gb = p.memory["gpu_breakdown"]
        layer_part = gb.get("expert_cache", 0.0) + layer_weights
        fixed = sum(gb.values()) - layer_part
        gpu_GiB = (fixed + (usable_full - fixed) * L / FULL_LAYERS + rg) / GiB
        cached = sum(p.placement.expert_cache_slots) / max(1, len(spec.moe_layers) * spec.num_experts)
        out["modes"][name] = {"gpu_GiB": gpu_GiB, "gpu_fixed_GiB": fixed / GiB}
        out["full_model"][name] = {"gpu_GiB": full_gpu, "cpu_GB": full_cpu, "batch": p.batch, "draft_len": p.draft_len,
                                   "micro_batches": p.micro_batches, "cached_expert_fraction": cached,
                                   "gpu_breakdown_GiB": {k: v / GiB for k, v in gb.items()}}
        log(f"slice budgets ({L} layers), {name}: GPU {gpu_GiB:.2f} GiB (non-layer part {fixed / GiB:.2f} GiB), "
            f"CPU {cpu_GiB:.2f} GiB")
    first = out["modes"]["spec_alpha0.8"]
    out.update(gpu_GiB=first["gpu_GiB"], gpu_fixed_GiB=first["gpu_fixed_GiB"])   # the headline mode's
    out["rule"] = (f"CPU: ({full_cpu:g} GB less its {rc / GiB:g} GiB reserve and the attention staging) * L/32, "
                   f"plus those. GPU, per "
                   f"mode: the full model's non-layer part in that mode's plan (streaming buffers, embeddings, "
                   f"draft + its KV, activations) + L/32 of the rest of {full_gpu:g} GiB less its {rg / GiB:g} GiB "
                   f"reserve, plus the reserve ({full_gpu:g} GiB * L/32 = {full_gpu * L / FULL_LAYERS:.1f} GiB cannot "
                   f"hold the two streaming buffers)")
    log(f"budget rule: {out['rule']}")
    return out


def make_plans(spec, dspec, hw_for, args, log, full_plans: dict | None = None) -> dict:
    """The slice's plan per mode. A speculative mode for which the planner prefers k=0 gets the best k>=1
    plan instead (a speculative row must speculate), and says so (`forced_k`). full_plans: the full
    model's plan per mode, whose batch, draft length and micro-batches the slice keeps (the memory that
    does not scale with layers then matches, so the slice caches the full model's share of experts)."""
    from specmoe.planner.workload import AcceptanceProfile, Workload

    plans, notes = {}, {}
    for name, alpha in MODES:
        wl = Workload(prompt_len=args.prompt_len, gen_len=args.gen_len,
                      acceptance=AcceptanceProfile.from_alpha(alpha or 0.0))
        hw = hw_for(name)
        t0 = time.perf_counter()
        like = (full_plans or {}).get(name)
        p = plan_for(spec, hw, wl, dspec if alpha is not None else None, log, like=like)
        note = ""
        if alpha is not None and p.draft_len == 0:
            best0 = p.predicted.decode_tokens_per_s
            p = plan_for(spec, hw, wl, dspec, log, k_min=1)
            note = (f"planner chose k=0 ({best0:.1f} tok/s predicted); the best k>=1 plan "
                    f"({p.predicted.decode_tokens_per_s:.1f} tok/s predicted) is run")
            notes[name] = {"forced_k": True, "planner_k0_tokens_per_s": best0, "note": note}
        plans[name] = p
        pl = p.placement
        log(f"plan {name:14s}: batch {p.batch}, k={p.draft_len}, m={p.micro_batches}, cache slots "
            f"{list(pl.expert_cache_slots)}, draft KV on GPU {pl.draft_kv_gpu_sequences}, predicted "
            f"{p.predicted.decode_tokens_per_s:.1f} tok/s ({p.solver.get('name', '?')}, {time.perf_counter() - t0:.1f} s)"
            + (f"  [{ORACLE} acceptance {alpha}]" if alpha else "") + (f"  [{note}]" if note else ""))
    plans["_notes"] = notes
    return plans


# ---------------------------------------------------------------------------------------------
def shared_expert_rows(tsrc, device, have: dict | None = None) -> dict:
    """{MoE layer: host rows [E, P]}: one layer's experts, read once into a region of their own (page-locked
    with CUDA), given to every MoE layer; `have` (a previous Runner's) is reused when it covers them."""
    from specmoe.runtime.model.expert_store import layer_rows

    layers = list(tsrc.config.moe_layers)
    if have and all(l in have for l in layers):
        return {l: have[l] for l in layers}
    rows = layer_rows(tsrc, layers[0], tsrc.dtype, register=device.type == "cuda") if layers else None
    return {l: rows for l in layers}


class Runner:
    """Builds engines (one at a time, reused while the expert placement is the same) and runs modes."""

    def __init__(self, tcfg, dcfg, device, args, log, expert_host: dict | None = None):
        import torch

        from specmoe.runtime.weights.sources import WeightSource

        self.torch, self.device, self.args, self.log = torch, device, args, log
        gen_dev = "cuda" if device.type == "cuda" else "cpu"
        self.tsrc = WeightSource.random(tcfg, seed=args.seed, dtype=torch.bfloat16, device_for_generation=gen_dev)
        self.dsrc = WeightSource.random(dcfg, seed=args.seed + 1, dtype=torch.bfloat16, device_for_generation=gen_dev)
        self.engine = None
        self.key = None
        self.build_s: list[float] = []
        # the host experts: one layer's rows, pinned once, stand for every layer's (bandwidth is what is
        # measured), kept across engines and across the layer fallback
        self.expert_host = shared_expert_rows(self.tsrc, device, expert_host)
        self.host_io = args.host_io_used

    def release(self) -> None:
        """Drop the engine; its GPU memory stays in torch's cache for the next one (no empty_cache: the
        next mode would pay cudaMalloc again inside its measured iterations)."""
        self.engine, self.key = None, None
        gc.collect()

    def engine_for(self, plan):
        from specmoe.runtime.engine import Engine

        pl = plan.placement      # what Engine() builds from; the KV split and batch are read per generate()
        key = (pl.expert_cache_slots, pl.cpu_expert_layers, pl.streaming_buffers, plan.draft_len > 0,
               plan.model.get("num_layers"))
        if self.engine is not None and key == self.key:
            self.engine.plan = plan
            return self.engine, 0.0
        self.release()
        t0 = time.perf_counter()
        eng = Engine(plan, self.tsrc, self.dsrc if plan.draft_len > 0 else None, device=self.device,
                     dtype=self.torch.bfloat16, check_memory=False, prefill_chunk_tokens=32768,
                     expert_host=self.expert_host, prefetch_next_layer=STREAMING[self.args.streaming],
                     host_io=self.host_io)
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        self.build_s.append(dt)
        self.engine, self.key = eng, key
        return eng, dt

    def run(self, plan, alpha, profile, iterations):
        """Prefill the plan's batch of random prompts and run `iterations` decode iterations;
        -> (RunRecord or None, status, build_s, wall_s)."""
        t0 = time.perf_counter()
        gc.collect()             # the previous mode's KV caches (held by its exception's traceback cycle)
        eng, build_s = self.engine_for(plan)
        k = plan.draft_len
        eng.acceptance_oracle = alpha if k > 0 else None
        eng.profile_stages = profile
        eng.prefetch_next_layer = STREAMING[self.args.streaming]
        eng.host_io = self.host_io
        eng.max_k = k

        def policy(info):
            if info.iteration >= iterations:
                raise StopAfter(f"stopped after {iterations} decode iterations (by design)")
            return k
        eng.k_policy = policy
        g = self.torch.Generator().manual_seed(self.args.seed + 7)
        V = self.tsrc.config.vocab_size
        prompts = self.torch.randint(3, V, (plan.batch, self.args.prompt_len), generator=g).tolist()
        rec, status = None, "ok"
        try:
            rec = eng.generate(prompts, max_new_tokens=self.args.gen_len, seed=self.args.seed).record
            status = "ok (all sequences finished before the iteration limit)"
        except StopAfter as e:
            pr = getattr(e, "partial_result", None) or eng.last_result
            rec = pr.record if pr is not None else None
        except Deadline as e:
            pr = getattr(e, "partial_result", None)
            rec = pr.record if pr is not None else None
            status = "deadline (time budget ran out inside this mode)"
        return rec, status, build_s, time.perf_counter() - t0


def warm_figures(rec) -> dict:
    """Iteration time and tokens/s over the iterations after the first WARMUP_ITERATIONS (all of them, said
    so, when there are no more)."""
    ts, em = list(rec.iteration_times_s), list(rec.emitted_by_iteration)
    skip = WARMUP_ITERATIONS if len(ts) > WARMUP_ITERATIONS else 0
    t, n = sum(ts[skip:]), len(ts) - skip
    return {"warmup_iterations_excluded": skip, "measured_iterations": n,
            "iteration_s": t / n if n else rec.stages.get("iteration", 0.0),
            "tokens_per_s": sum(em[skip:]) / t if t > 0 else rec.decode_tokens_per_s}


def summarize(rec, plan, alpha, spec, dspec, hw, args) -> dict:
    """Measured figures of one mode (iteration time and tokens/s without the warm-up iterations) and the
    planner's prediction for exactly its configuration."""
    from specmoe.planner.errors import SpecError
    from specmoe.planner.estimator import estimate
    from specmoe.planner.workload import AcceptanceProfile, Workload

    B, k = plan.batch, plan.draft_len
    h2d_s = rec.h2d_busy_s          # copy-stream busy seconds of the decode copies (CUDA events)
    dec_s = rec.decode_time_s
    pl = plan.placement
    n_slots = sum(pl.expert_cache_slots)
    d = {"oracle": k > 0, "alpha": alpha if k > 0 else None, "batch": B, "draft_len": k, "k": k,
         "micro_batches": plan.micro_batches, "m": plan.micro_batches, "expert_cache_slots": list(pl.expert_cache_slots),
         "cached_expert_fraction": n_slots / max(1, len(spec.moe_layers) * spec.num_experts),
         "draft_kv_gpu_sequences": pl.draft_kv_gpu_sequences if k else 0,
         "target_kv_gpu_sequences": pl.target_kv_gpu_sequences, "iterations": rec.iterations,
         "decode_tokens": rec.decode_tokens, "decode_time_s": dec_s,
         "tokens_per_s_all_iterations": rec.decode_tokens_per_s,
         "iteration_s_all_iterations": rec.stages.get("iteration", 0.0), "prefill_s": rec.prefill_time_s,
         "mean_accepted": rec.mean_accepted, "h2d_bytes": rec.h2d_decode_bytes, "h2d_s": h2d_s,
         "h2d_bytes_all_phases": rec.h2d_bytes, "h2d_prefill_bytes": rec.h2d_prefill_bytes,
         "h2d_GBps": rec.h2d_GBps, "h2d_busy_fraction": rec.h2d_busy_fraction,
         "h2d_unused_experts": rec.h2d_unused_experts, "expert_streaming": rec.expert_streaming,
         "host_io": rec.host_io,
         "stages_measured_s": dict(rec.stages), "profile_stages": rec.profile_stages,
         "planned": {"decode_tokens_per_s": plan.predicted.decode_tokens_per_s,
                     "iteration_s": plan.predicted.iteration_time_s, "gen_len": args.gen_len,
                     "planner": plan.solver.get("name", "")},
         "record_error": rec.error, "complete_record": rec.complete}
    d.update(warm_figures(rec))
    gen_eq = max(1, round(2 + rec.decode_tokens / max(1, B)))
    d["measured_mean_context"] = args.prompt_len + gen_eq / 2
    try:
        wl = Workload(prompt_len=args.prompt_len, gen_len=gen_eq, acceptance=AcceptanceProfile.from_alpha(alpha or 0.0))
        # the engine's schedule: the MoE of all micro-batches runs together; with streaming ahead the
        # first layers' experts stream during the draft phase and pre/post attention run once per layer
        ahead = rec.expert_streaming == "next"
        est = estimate(spec, hw, wl, draft=dspec if k > 0 else None, draft_len=k, micro_batches=plan.micro_batches,
                       placement=pl, batch=B, timeline=False, run=True, prefetch=ahead, batched_moe=True,
                       batched_layer=ahead)
        d["prediction_options"] = {"prefetch": ahead, "batched_moe": True, "batched_layer": ahead}
        d["stages_predicted_s"] = {s: float(v) for s, v in est.stages.items()}
        d["predicted_iteration_s"] = est.iteration_time_s
        d["predicted_tokens_per_s"] = est.decode_tokens_per_s
        d["prediction_source"] = est.source
        it = d["iteration_s"]
        d["iteration_error_pct"] = (est.iteration_time_s - it) / it * 100 if it > 0 else None
    except SpecError as e:  # the planner refuses this configuration: said so, the measurement stands
        d["prediction_error"] = f"{type(e).__name__}: {e}"
    return d


# ---------------------------------------------------------------------------------------------
def run_accelerate(tcfg, device, args, log, remaining_s) -> dict:
    """transformers + accelerate CPU offload of the same slice, batch 64, GPU budget scaled 6 GiB * L/8
    (guarded; off unless --run-accelerate). Decode step: the clock between generation steps (a logits
    processor stamps each step), prefill excluded."""
    import torch

    if remaining_s < (20 if args.cpu_smoke else 90):
        return {"status": f"skipped (only {remaining_s:.0f} s of the budget left)"}
    import accelerate
    from accelerate import dispatch_model, infer_auto_device_map
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = {k: v for k, v in tcfg.items() if k not in ("torch_dtype", "dtype", "architectures")}
    conf = MixtralConfig(**cfg)
    t0 = time.perf_counter()
    gen_dev = "cuda" if device.type == "cuda" else "cpu"
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(gen_dev):
            torch.manual_seed(args.seed)
            model = MixtralForCausalLM(conf)
    finally:
        torch.set_default_dtype(prev)
    model = model.to("cpu").eval()
    gpu_GiB = ACCEL_REF["gpu_budget_GiB"] * args.layers / ACCEL_REF["layers"]
    mm = {0: f"{gpu_GiB:.2f}GiB", "cpu": "200GiB"} if device.type == "cuda" else {"cpu": "200GiB"}
    dm = infer_auto_device_map(model, max_memory=mm, no_split_module_classes=list(model._no_split_modules or []))
    model = dispatch_model(model, device_map=dm)
    load_s = time.perf_counter() - t0
    B = 8 if args.cpu_smoke else ACCEL_REF["batch"]
    first = next(iter(dm.values()))
    dev0 = torch.device("cuda", first) if isinstance(first, int) else torch.device("cpu")
    g = torch.Generator().manual_seed(args.seed + 11)
    ids = torch.randint(3, tcfg["vocab_size"], (B, args.prompt_len), generator=g).to(dev0)
    steps = 3
    from transformers import LogitsProcessor, LogitsProcessorList

    class Stamp(LogitsProcessor):
        """Called once per generated token (after that step's forward): a clock per decode step."""

        def __init__(self):
            self.t: list[float] = []

        def __call__(self, input_ids, scores):
            self.t.append(time.perf_counter())
            return scores
    stamp = Stamp()
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=1 + steps,
                       min_new_tokens=1 + steps, pad_token_id=0, logits_processor=LogitsProcessorList([stamp]))
    total_s = time.perf_counter() - t0
    del model
    gc.collect()
    if len(stamp.t) < 2:
        return {"status": f"error: only {len(stamp.t)} generation steps were timed", "load_s": load_s}
    step_s = (stamp.t[-1] - stamp.t[0]) / (len(stamp.t) - 1)   # prefill (first token) excluded
    return {"status": "ok", "tokens_per_s": B / step_s, "step_s": step_s, "batch": B, "gpu_budget_GiB": gpu_GiB,
            "decode_steps_timed": len(stamp.t) - 1, "prefill_and_first_token_s": stamp.t[0] - t0,
            "generate_s": total_s, "load_s": load_s, "accelerate_version": accelerate.__version__,
            "device_map_devices": sorted({str(v) for v in dm.values()})}


# ---------------------------------------------------------------------------------------------
def copy_overlap_probe(device, big_MB: int = 1024, small_MB: int = 4, reps: int = 3) -> dict:
    """Does a small transfer on the compute stream wait for a large expert copy on the copy stream?
    The target's CPU attention moves q/k/v to the host and its output back while experts stream; if
    those transfers queue behind the expert copies, streaming cannot overlap attention. Times (ms) of
    a small_MB transfer alone and while a big_MB pinned H2D runs on another stream, for: pageable H2D
    (what torch's .to() of a plain host tensor does), pinned H2D, pinned D2H, and a kernel reading
    pinned host memory directly (zero-copy over UVA: no copy engine)."""
    import torch

    cs = torch.cuda.Stream(device)
    cur = torch.cuda.current_stream(device)
    big_h = torch.empty(big_MB << 20, dtype=torch.uint8, pin_memory=True)
    big_d = torch.empty(big_MB << 20, dtype=torch.uint8, device=device)
    n = small_MB << 20
    sp = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    spage = torch.empty(n, dtype=torch.uint8)
    sd = torch.empty(n, dtype=torch.uint8, device=device)
    out: dict = {"big_MB": big_MB, "small_MB": small_MB}
    variants = {"h2d_pageable": lambda: sd.copy_(spage), "h2d_pinned": lambda: sd.copy_(sp, non_blocking=True),
                "d2h_pinned": lambda: sp.copy_(sd, non_blocking=True)}
    try:
        class _HostView:     # pinned host memory seen as a CUDA array (UVA: same pointer)
            __cuda_array_interface__ = {"shape": (n,), "typestr": "|u1", "data": (sp.data_ptr(), False),
                                        "version": 3, "strides": None}
        zc = torch.as_tensor(_HostView(), device=device)
        variants["zero_copy_kernel"] = lambda: torch.bitwise_or(zc, 0, out=sd)
    except (RuntimeError, TypeError) as e:   # no zero-copy view on this torch / driver: recorded
        out["zero_copy_kernel"] = {"error": f"{type(e).__name__}: {e}"}

    def big():
        with torch.cuda.stream(cs):
            big_d.copy_(big_h, non_blocking=True)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    big()
    cs.synchronize()
    big_s = time.perf_counter() - t0
    out["big_copy_ms"], out["big_copy_GBps"] = big_s * 1e3, (big_MB << 20) / big_s / 1e9
    for name, fn in variants.items():
        try:
            alone, during = [], []
            for _ in range(reps):
                torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                fn()
                cur.synchronize()
                alone.append(time.perf_counter() - t0)
            for _ in range(reps):
                torch.cuda.synchronize(device)
                big()
                time.sleep(0.002)                 # the big copy is under way
                t0 = time.perf_counter()
                fn()
                cur.synchronize()
                during.append(time.perf_counter() - t0)
                cs.synchronize()
            a, d = min(alone) * 1e3, min(during) * 1e3
            out[name] = {"alone_ms": a, "during_big_copy_ms": d,
                         "waits_for_big_copy": bool(d > 0.5 * (big_s * 1e3 - 2.0) and d > 3 * a)}
        except RuntimeError as e:   # a CUDA error of this variant: recorded, the others still measured
            out[name] = {"error": f"{type(e).__name__}: {e}"}
    del big_h, big_d
    return out


def choose_host_io(asked: str, device, probe: dict | None) -> str:
    """--host-io auto: direct without CUDA; zero-copy when the probe saw a pinned H2D wait behind the expert
    copy and a zero-copy kernel not; pinned otherwise."""
    if asked != "auto":
        return asked
    if device.type != "cuda":
        return "direct"
    p = probe or {}
    pin, zc = p.get("h2d_pinned") or {}, p.get("zero_copy_kernel") or {}
    if pin.get("waits_for_big_copy") and "alone_ms" in zc and not zc.get("waits_for_big_copy"):
        return "zero-copy"
    return "pinned"


def machine_info(device) -> dict:
    from specmoe.runtime.device import machine_description

    m = machine_description(device)
    try:
        import cupy
        m["cupy_version"] = cupy.__version__
    except ImportError as e:
        m["cupy_version"] = f"none ({type(e).__name__})"
    if device.type == "cuda":
        import torch
        p = torch.cuda.get_device_properties(device)
        m["gpu_mem_GiB"] = p.total_memory / GiB
    return m


def fmt(x, spec=".1f", none="n/a"):
    return none if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def report(res: dict, log: Log) -> str:
    """Print the table, ratios and goals; fill res['goals'] etc.; return the last line."""
    modes = res["modes"]
    tps = res["tokens_per_s"]
    log("")
    log(f"decode, {res['config']['layers']}-layer Mixtral-8x7B slice, prompt {res['config']['prompt_len']}, "
        f"{res['config']['iterations']} decode iterations per mode (tok/s and iter ms over those after the first "
        f"{WARMUP_ITERATIONS}); speculative rows are {ORACLE} (seeded Bernoulli acceptance)")
    hdr = (f"{'mode':38s} {'B':>5s} {'k':>2s} {'m':>2s} {'cache':>6s} {'it':>3s} {'tok/s':>9s} {'iter ms':>8s} "
           f"{'pred ms':>8s} {'err%':>6s} {'H2D GB/s':>8s} {'busy':>5s} {'prefill s':>9s}  status")
    log(hdr)
    log("-" * len(hdr))
    for name, d in modes.items():
        label = name + (f" [{ORACLE}]" if d.get("oracle") else "") + (" [k>=1 forced]" if d.get("forced_k") else "")
        if "tokens_per_s" not in d:
            log(f"{label:38s} {'':>5s} {'':>2s} {'':>2s} {'':>6s} {'':>3s} {'':>9s} {'':>8s} {'':>8s} {'':>6s} "
                f"{'':>8s} {'':>5s} {'':>9s}  {d.get('status')}")
            continue
        log(f"{label:38s} {d['batch']:5d} {d['draft_len']:2d} {d['micro_batches']:2d} "
            f"{d['cached_expert_fraction']:6.1%} {d['iterations']:3d} {d['tokens_per_s']:9.1f} "
            f"{d['iteration_s'] * 1e3:8.1f} {fmt((d.get('predicted_iteration_s') or 0) * 1e3 or None):>8s} "
            f"{fmt(d.get('iteration_error_pct'), '+.1f'):>6s} {fmt(d.get('h2d_GBps')):>8s} "
            f"{fmt((d.get('h2d_busy_fraction') or 0) * 100, '.0f') + '%':>5s} {d['prefill_s']:9.1f}  {d['status']}")
    acc = res["accelerate"]
    log(f"{'accelerate':38s} {acc.get('batch', ''):>5} {'':>2s} {'':>2s} {'':>6s} {'':>3s} "
        f"{fmt(tps.get('accelerate')):>9s} {fmt((acc.get('step_s') or 0) * 1e3 or None):>8s}  {acc['label']}")
    log(f"H2D reference: {H2D_REF_GBps:g} GB/s pinned (measured on the H200 host). H2D GB/s = decode-phase bytes "
        f"copied / copy-stream busy time (CUDA events around each copy batch); busy = that time / decode wall time")
    streams = sorted({f"{d.get('expert_streaming')} (host_io {d.get('host_io')})" for d in modes.values()
                      if "expert_streaming" in d})
    if streams:
        log(f"expert streaming: {', '.join(streams)} (next = layer i+1's non-resident experts stream while layer i "
            f"computes, layer 0's during the draft phase; off = after routing)")
    for name, d in modes.items():
        if d.get("forced_k"):
            log(f"{name}: {d.get('note')}")
    pvm = res.get("predicted_vs_measured") or {}
    if pvm:
        log("")
        log(f"predicted vs measured, spec_alpha0.8 [{ORACLE}] (ms per decode iteration; prefill: s total; measured "
            f"per stage: {res.get('per_stage_source')})")
        for s, v in pvm.items():
            scale, unit = (1.0, "s") if s == "prefill" else (1e3, "ms")
            p, m = v.get("predicted"), v.get("measured")
            err = (p - m) / m * 100 if (p is not None and m) else None
            log(f"  {s:18s} predicted {fmt(p * scale if p is not None else None, '10.2f')} {unit:2s}  measured "
                f"{fmt(m * scale if m is not None else None, '10.2f')} {unit:2s}  {fmt(err, '+.0f')}%")
    s08, k0, ac = tps.get("spec_alpha0.8"), tps.get("k0"), tps.get("accelerate")
    r_k0 = s08 / k0 if (s08 and k0) else None
    r_ac = s08 / ac if (s08 and ac) else None
    busy = res.get("h2d_busy_fraction")
    err = res.get("iteration_error_pct")
    vals = {"spec0.8_over_k0": r_k0, "spec0.8_over_accelerate": r_ac, "h2d_busy_fraction": busy,
            "iteration_error_pct": abs(err) if err is not None else None}
    goals = {}
    for g, target in GOALS.items():
        v = vals[g]
        ok = None if v is None else (v <= target if g == "iteration_error_pct" else v >= target)
        goals[g] = {"target": (f"<= {target}" if g == "iteration_error_pct" else f">= {target}"), "value": v,
                    "result": "N/A" if ok is None else ("PASS" if ok else "MISS")}
    res["goals"] = goals
    res["ratios"] = {"spec0.8_over_k0": r_k0, "spec0.8_over_accelerate": r_ac,
                     "spec0.6_over_k0": (tps.get("spec_alpha0.6") / k0) if (tps.get("spec_alpha0.6") and k0) else None}
    log("")
    log(f"goals ({ORACLE} speculation; {'CPU SMOKE: tiny model, not the H200' if res['config']['smoke'] else 'H200 host'}):")
    for g, v in goals.items():
        log(f"  {g:26s} {v['target']:>8s}  value {fmt(v['value'], '.3f'):>8s}  {v['result']}")
    log(f"accelerate figure: {acc['label']}")
    return (f"gpu-offload: speculation {fmt(r_k0, '.2f')}x over k=0, {fmt(r_ac, '.1f')}x over accelerate, "
            f"H2D {fmt(busy * 100 if busy is not None else None, '.0f')}% busy, "
            f"iteration error {fmt(abs(err) if err is not None else None, '.1f')}%")


def write_json(res: dict, out: Path) -> None:
    from specmoe.planner.atomic_file import atomic_write_text

    res["elapsed_s"] = elapsed()
    atomic_write_text(out / "gpu_offload.json", json.dumps(res, indent=1, default=str))


# ---------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not args.cpu_smoke and not args.plan_only and not torch.cuda.is_available():
        print("gpu-offload: needs a CUDA GPU (none visible to torch); use --cpu-smoke to run the same code on a "
              "tiny model with the CPU as the device")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = Log()
    device = torch.device("cuda") if (torch.cuda.is_available() and not args.cpu_smoke) else torch.device("cpu")
    res: dict = {"benchmark": "gpu_offload", "oracle": True,
                 "oracle_note": "draft proposals accepted by a seeded Bernoulli oracle at rate alpha "
                                "(Engine(acceptance_oracle=alpha)): every speculative figure is oracle-driven",
                 "complete": False, "errors": [], "phases_s": {}, "modes": {},
                 "tokens_per_s": {"spec_alpha0.6": None, "spec_alpha0.8": None, "k0": None, "accelerate": None},
                 "h2d_GBps_achieved": None, "h2d_GBps_reference": H2D_REF_GBps, "h2d_busy_fraction": None,
                 "predicted_vs_measured": {}, "iteration_error_pct": None}
    res["config"] = {"smoke": args.cpu_smoke, "layers": args.layers, "prompt_len": args.prompt_len,
                     "gen_len_planned": args.gen_len, "iterations": args.iterations, "seed": args.seed,
                     "time_budget_s": args.time_budget_s}
    deadline = T_START + args.time_budget_s - 4.0

    def on_alarm(signum, frame):
        raise Deadline(f"time budget of {args.time_budget_s:g} s ran out")

    def arm():
        signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, max(0.5, deadline - time.perf_counter()))

    def disarm():
        signal.setitimer(signal.ITIMER_REAL, 0)

    def remaining():
        return deadline - time.perf_counter()

    def err(where, e):
        msg = f"{where}: {type(e).__name__}: {e}"
        res["errors"].append(msg)
        log(f"ERROR {msg}")
        tb = traceback.format_exc(limit=6)
        res.setdefault("tracebacks", []).append(tb)

    runner = None
    try:
        arm()
        log.phase(f"gpu-offload benchmark{' (CPU SMOKE: tiny Mixtral-like model, CPU as the device)' if args.cpu_smoke else ''}"
                  f"; budget {args.time_budget_s:g} s")
        try:
            res["machine"] = machine_info(device)
        except Exception as e:  # noqa: BLE001
            res["machine"] = {"device": str(device)}
            err("machine description", e)
        mi = res["machine"]
        log(f"machine: GPU {mi.get('gpu')}, CPU {mi.get('cpu_model')} ({mi.get('cpu_cores')} cores), torch "
            f"{mi.get('torch_version')} (CUDA {mi.get('cuda_version')}), cupy {mi.get('cupy_version')}")
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
                err("copy-overlap probe", e)
        args.host_io_used = choose_host_io(args.host_io, device, res.get("copy_overlap_probe"))
        res["config"]["host_io"] = args.host_io_used
        log(f"attention host transfers: host_io={args.host_io_used} (--host-io {args.host_io})")
        from specmoe.planner.errors import SpecError
        from specmoe.planner.hardware_spec import load_hardware
        from specmoe.planner.model_spec import ModelSpec

        try:
            hw_base = load_hardware(args.hardware)
        except SpecError as e:      # no calibrated spec on this checkout: the datasheet one, said so
            log(f"hardware spec {args.hardware} unavailable ({e}); using h200-host")
            res["config"]["hardware_fallback"] = str(e)
            hw_base = load_hardware("h200-host")
        t0 = time.perf_counter()
        tcfg, dcfg = model_configs(args.layers, args.cpu_smoke)
        dspec = ModelSpec.from_hf_config(dcfg, name="draft-eagle-shape" if not args.cpu_smoke else "tiny-draft")
        full = full_model_plans(tcfg, dspec, hw_base, args, log)
        bud = budgets(full, args, log)

        def setup(L):
            tc = dict(tcfg, num_hidden_layers=L)
            sp = ModelSpec.from_hf_config(tc, name=f"mixtral-8x7b-{L}-layers" if not args.cpu_smoke else "tiny")

            def hw_for(mode):
                return hw_base.with_overrides(gpu_mem_GiB=bud["modes"][mode]["gpu_GiB"], cpu_mem_GiB=bud["cpu_GiB"])
            return tc, sp, hw_for
        tcfg, spec, hw_for = setup(args.layers)
        plans = make_plans(spec, dspec, hw_for, args, log, full["plans"])
        plan_notes = plans.pop("_notes")
        res["phases_s"]["planning"] = time.perf_counter() - t0
        res["config"].update(vocab_size=tcfg["vocab_size"], hardware=hw_base.name, budgets=bud, target=tcfg,
                             draft=dcfg, planner_options=dict(OPT), plan_notes=plan_notes,
                             expert_streaming=args.streaming)
        if args.plan_only:
            res["plans"] = {n: p.to_dict() for n, p in plans.items()}
            res["complete"] = True
            return 0
        kmax = max(p.draft_len for p in plans.values())
        if args.iterations * (kmax + 1) + 1 > args.gen_len:
            log(f"note: {args.iterations} iterations of up to k+1 = {kmax + 1} tokens may exceed gen_len "
                f"{args.gen_len}: some sequences can finish early")

        # ---- weights (pinned host experts, drawn on the device) and the warm-up ----
        log.phase("building the engine: random bf16 weights drawn on the "
                  f"{'GPU, experts copied into pinned host memory' if device.type == 'cuda' else 'CPU'}")
        t0 = time.perf_counter()
        try:
            from specmoe.runtime.device import kernel_backends
            res["backends"] = kernel_backends()       # builds the C++ verify kernel now, not inside a mode
        except Exception as e:  # noqa: BLE001
            res["backends"] = {}
            err("kernel backends", e)
        res["phases_s"]["kernels"] = time.perf_counter() - t0
        runner = Runner(tcfg, dcfg, device, args, log)
        first = plans["spec_alpha0.8"]
        n_warm = min(8, first.batch)
        warm_rec = None
        try:
            t0 = time.perf_counter()
            runner.engine_for(first)
            res["phases_s"]["weights_first_engine"] = time.perf_counter() - t0
            log.phase(f"engine built in {res['phases_s']['weights_first_engine']:.1f} s (backends: "
                      f"{sorted(set(res['backends'].values()))})")
            from dataclasses import replace

            fp = first.placement        # the first plan at a small batch (KV rows for n_warm sequences only)
            wplan = replace(first, batch=n_warm, micro_batches=min(first.micro_batches, n_warm),
                            placement=replace(fp, draft_kv_gpu_sequences=min(fp.draft_kv_gpu_sequences, n_warm),
                                              target_kv_gpu_sequences=min(fp.target_kv_gpu_sequences, n_warm)))
            warm_rec, st, _, wall = runner.run(wplan, 0.8, False, 1)
            if st.startswith("deadline"):
                raise Deadline("the time budget ran out during the warm-up")
            res["phases_s"]["warmup"] = wall
            warm = {"sequences": n_warm, "wall_s": wall, "status": st}
            if warm_rec is not None:
                warm.update(prefill_s=warm_rec.prefill_time_s, prefill_stage_totals_s=warm_rec.prefill_stage_totals_s)
            res["warmup"] = warm
            log.phase(f"warm-up ({n_warm} sequences, 1 iteration) {wall:.1f} s")
        except Exception as e:  # noqa: BLE001  the modes still run (and report their own errors)
            err("first engine / warm-up", e)
            runner.release()

        # ---- projection: does the essential pair (alpha 0.8 and k=0) fit? else halve the layers ----
        def project(plan, iters):
            if warm_rec is None:
                return 0.0
            pre = warm_rec.prefill_stage_totals_s
            attn = pre.get("target.attention", 0.0) * plan.batch / n_warm
            other = max(0.0, warm_rec.prefill_time_s - pre.get("target.attention", 0.0))
            chunks = math.ceil(plan.batch * args.prompt_len / 32768)
            build = runner.build_s[0] if len(runner.build_s) > 0 else 0.0
            return 0.3 * build + attn + other * chunks + 1.5 * iters * plan.predicted.iteration_time_s + 2.0
        ess = (project(plans["spec_alpha0.8"], args.iterations) + project(plans["k0"], args.iterations)) \
            * args.project_scale
        res["projection_s"] = {"essential_modes": ess, "remaining": remaining()}
        log(f"projected time of the alpha=0.8 and k=0 modes: {ess:.0f} s; {remaining():.0f} s left")
        if ess > remaining() and args.layers > 2:
            L2 = max(2, args.layers // 2)
            log.phase(f"budget tight: falling back to {L2} layers (budgets rescaled by {L2}/32)")
            runner.release()
            args.layers = L2
            bud = budgets(full, args, log)
            res["config"]["budgets"] = bud
            tcfg, spec, hw_for = setup(L2)
            plans = make_plans(spec, dspec, hw_for, args, log, full["plans"])
            plan_notes = plans.pop("_notes")
            res["config"]["plan_notes"] = plan_notes
            args.host_io_used = runner.host_io
            runner = Runner(tcfg, dcfg, device, args, log, expert_host=runner.expert_host)
            res["config"].update(layers=L2, target=tcfg, layer_fallback=True)

        # ---- the modes ----
        order = [("spec_alpha0.8", 0.8, False), ("k0", None, False), ("spec_alpha0.6", 0.6, False)]
        if not args.quick:
            order.append(("spec_alpha0.8_profiled", 0.8, True))
        else:
            res["modes"]["spec_alpha0.8_profiled"] = {"status": "not run (--quick)", "oracle": True}
        prev_wall: dict[str, float] = {}
        for name, alpha, prof in order:
            plan = plans[name.replace("_profiled", "")]
            guess = max(prev_wall.values()) if prev_wall else project(plan, args.iterations)
            if remaining() < 0.8 * guess + 2:
                res["modes"][name] = {"status": f"skipped (needs ~{guess:.0f} s, {remaining():.0f} s left)",
                                      "oracle": alpha is not None}
                log.phase(f"{name}: skipped, ~{guess:.0f} s needed, {remaining():.0f} s left")
                continue
            log.phase(f"{name}: batch {plan.batch}, k={plan.draft_len}, m={plan.micro_batches}"
                      + (f", {ORACLE} acceptance {alpha}" if alpha else "") + (", per-stage sync" if prof else ""))
            try:
                try:
                    rec, st, build_s, wall = runner.run(plan, alpha, prof, args.iterations)
                except Exception as e:  # noqa: BLE001  untried host transfers on this GPU: once more, direct
                    if runner.host_io == "direct" or remaining() < 20:
                        raise
                    err(f"{name} with host_io={runner.host_io}", e)
                    log.phase(f"{name}: failed with host_io={runner.host_io}; this and later modes use host_io=direct")
                    res["host_io_fallback"] = f"{runner.host_io} failed in {name}: {type(e).__name__}: {e}"
                    runner.host_io = "direct"
                    res["config"]["host_io"] = "direct"
                    runner.release()
                    rec, st, build_s, wall = runner.run(plan, alpha, prof, args.iterations)
                prev_wall[name] = wall
                if rec is None or rec.iterations == 0:
                    res["modes"][name] = {"status": st + " (no decode iteration measured)",
                                          "oracle": alpha is not None, "wall_s": wall}
                    log.phase(f"{name}: no decode iteration measured ({st})")
                else:
                    d = summarize(rec, plan, alpha, spec, dspec, hw_for(name.replace("_profiled", "")), args)
                    if name.replace("_profiled", "") in plan_notes:
                        d.update(plan_notes[name.replace("_profiled", "")])
                    d.update(status=st, build_s=build_s, wall_s=wall)
                    res["modes"][name] = d
                    if not prof:
                        res["tokens_per_s"][name] = d["tokens_per_s"]
                    log.phase(f"{name}: {d['tokens_per_s']:.1f} tok/s" + (f" [{ORACLE}]" if alpha else "")
                              + f", iteration {d['iteration_s'] * 1e3:.1f} ms (predicted "
                              f"{fmt((d.get('predicted_iteration_s') or 0) * 1e3)} ms), prefill "
                              f"{d['prefill_s']:.1f} s, H2D {fmt(d['h2d_GBps'])} GB/s busy "
                              f"{fmt((d['h2d_busy_fraction'] or 0) * 100, '.0f')}%, wall {wall:.1f} s")
                if st.startswith("deadline"):
                    break
            except Deadline as e:
                res["modes"][name] = {"status": f"deadline: {e}", "oracle": alpha is not None}
                log.phase(f"{name}: time budget ran out")
                break
            except Exception as e:  # noqa: BLE001  a failed mode is reported, the rest still run
                res["modes"][name] = {"status": f"error: {type(e).__name__}: {e}", "oracle": alpha is not None}
                err(name, e)
                runner.release()
            finally:
                write_json(res, out)
        for name, _, _ in order:
            res["modes"].setdefault(name, {"status": "not run (time budget)"})
        runner.release()

        # ---- accelerate ----
        if args.run_accelerate:
            log.phase("accelerate baseline (--run-accelerate)")
            try:
                a = run_accelerate(tcfg, device, args, log, remaining())
            except BaseException as e:  # noqa: BLE001  Deadline included: never fatal
                a = {"status": f"error: {type(e).__name__}: {e}"}
                if not isinstance(e, Deadline):
                    err("accelerate", e)
            res["accelerate_run"] = a
        res["complete"] = all(str(d.get("status", "")).startswith("ok") for d in res["modes"].values())
    except BaseException as e:  # noqa: BLE001  the JSON is written whatever happened
        disarm()
        err("benchmark", e)
    finally:
        disarm()
        try:
            if runner is not None:
                runner.release()
        except Exception as e:  # noqa: BLE001  recorded; the JSON is still written
            err("release", e)
        # ---- headline figures ----
        a = res.get("accelerate_run") or {}
        cfgL = (res.get("config") or {}).get("layers", args.layers)
        if a.get("status") == "ok":
            res["accelerate"] = dict(a, label=f"measured in this run (batch {a['batch']})")
        else:
            scale = ACCEL_REF["layers"] / cfgL
            res["accelerate"] = dict(ACCEL_REF, tokens_per_s=ACCEL_REF["tokens_per_s"] * scale,
                                     label="reference (measured earlier, not re-run)"
                                     + (f", scaled by 8/{cfgL} layers" if cfgL != 8 else "")
                                     + (f"; run attempted: {a.get('status')}" if a else ""))
        res["tokens_per_s"]["accelerate"] = res["accelerate"]["tokens_per_s"]
        m08 = res["modes"].get("spec_alpha0.8") or {}
        prof = res["modes"].get("spec_alpha0.8_profiled") or {}
        if "tokens_per_s" in m08:
            res["h2d_GBps_achieved"] = m08.get("h2d_GBps")
            res["h2d_busy_fraction"] = m08.get("h2d_busy_fraction")
            res["iteration_error_pct"] = m08.get("iteration_error_pct")
            meas = prof.get("stages_measured_s") if "stages_measured_s" in prof else m08.get("stages_measured_s", {})
            res["per_stage_source"] = ("the per-stage-synchronised rerun" if "stages_measured_s" in prof else
                                       "the unsynchronised run (GPU stages measure launch only)")
            pred = m08.get("stages_predicted_s", {})
            pvm = {}
            for s in list(pred) or list(meas):
                if s in ("iteration", "prefill"):
                    continue
                pvm[s] = {"predicted": pred.get(s), "measured": meas.get(s)}
            pvm["iteration"] = {"predicted": m08.get("predicted_iteration_s"), "measured": m08.get("iteration_s")}
            pvm["prefill"] = {"predicted": pred.get("prefill"), "measured": m08.get("prefill_s")}
            res["predicted_vs_measured"] = pvm
        try:
            last = report(res, log)
        except Exception as e:  # noqa: BLE001
            err("report", e)
            last = "gpu-offload: speculation n/ax over k=0, n/ax over accelerate, H2D n/a% busy, iteration error n/a%"
        log.phase("done")
        log(last)
        res["summary_line"] = last
        try:
            write_json(res, out)
            (out / "gpu_offload.txt").write_text("\n".join(log.lines) + "\n")
        except Exception as e:  # noqa: BLE001
            print(f"could not write results: {e}", file=sys.stderr, flush=True)
            print(last, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
