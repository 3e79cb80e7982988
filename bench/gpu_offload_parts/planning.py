"""The planner's side: the target and draft configs, the full 32-layer model's plan per mode, the
slice's GPU and CPU budgets derived from them, and the slice's own plan per mode (planner.optimize, or
planner.estimate by enumeration where optimize has no solver)."""
from __future__ import annotations

import json
import time

from .common import FULL_CPU_GB, FULL_GPU_GiB, FULL_LAYERS, MODES, OPT, ORACLE, GiB


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



def slice_setup(tcfg: dict, L: int, smoke: bool, hw_base, bud: dict):
    """The L-layer slice: (target config, its ModelSpec, mode -> hw_base with that mode's budgets in `bud`)."""
    from specmoe.planner.model_spec import ModelSpec

    tc = dict(tcfg, num_hidden_layers=L)
    sp = ModelSpec.from_hf_config(tc, name=f"mixtral-8x7b-{L}-layers" if not smoke else "tiny")

    def hw_for(mode):
        return hw_base.with_overrides(gpu_mem_GiB=bud["modes"][mode]["gpu_GiB"], cpu_mem_GiB=bud["cpu_GiB"])
    return tc, sp, hw_for
