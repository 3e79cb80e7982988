"""plan_for_checkpoint: a valid Plan for a checkpoint pair without the optimizer (tests, bench, demo).

All routed experts cached unless given, every sequence's draft KV on the device, target KV on the
CPU. Predicted stage times come from specmoe.planner.estimator when it is importable and accepts the
inputs, else zeros with source "none".
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from specmoe.planner.model_spec import ModelSpec
from specmoe.planner.plan import Placement, Plan, Prediction
from specmoe.planner.schedule import Schedule, default_schedule
from specmoe.planner.stages import STAGE_NAMES


def _predict(plan_kwargs: dict) -> tuple[Prediction, str]:
    """The planner's prediction for this configuration: planner.estimate (event simulator, whole run)
    if importable and it accepts the inputs, else zeros with source "none"."""
    zeros = Prediction(iteration_time_s=0.0, decode_tokens_per_s=0.0, stages={s: 0.0 for s in STAGE_NAMES},
                       source="none")
    try:
        from specmoe.planner.estimator import estimate
        from specmoe.planner.hardware_spec import parse_hardware
        from specmoe.planner.workload import Workload

        spec = ModelSpec.from_dict(plan_kwargs["model"])
        draft = ModelSpec.from_dict(plan_kwargs["draft"]) if plan_kwargs["draft"] else None
        k = plan_kwargs["draft_len"]
        est = estimate(spec, parse_hardware(plan_kwargs["hardware"]), Workload.from_dict(plan_kwargs["workload"]),
                       draft=draft if k > 0 else None, draft_len=k, micro_batches=plan_kwargs["micro_batches"],
                       placement=plan_kwargs["placement"], batch=plan_kwargs["batch"], timeline=False,
                       schedule=plan_kwargs["schedule"])
        pred = est.to_prediction()
        stages = {s: float(pred.stages.get(s, 0.0)) for s in STAGE_NAMES}
        return Prediction(iteration_time_s=float(pred.iteration_time_s),
                          decode_tokens_per_s=float(pred.decode_tokens_per_s), stages=stages,
                          prefill_time_s=float(pred.prefill_time_s),
                          end_to_end_tokens_per_s=float(pred.end_to_end_tokens_per_s),
                          tokens_per_iteration=float(pred.tokens_per_iteration), source=str(pred.source)), \
            "specmoe.planner.estimator"
    except Exception as e:  # the planner's estimate is optional here (e.g. a plan its memory model refuses)
        return zeros, f"none ({type(e).__name__}: {str(e)[:200]})"


def plan_for_checkpoint(target_dir: str | Path, draft_dir: str | Path | None, hardware: Any = "devbox-2core",
                        batch: int = 8, draft_len: int = 4, micro_batches: int = 1, *, prompt_len: int = 64,
                        gen_len: int = 64, acceptance: Any = None, expert_cache_slots: list[int] | None = None,
                        draft_kv_gpu_sequences: int | None = None, target_kv_gpu_sequences: int = 0,
                        cpu_expert_layers: tuple[int, ...] = (), schedule: Schedule | None = None,
                        weight_dtype: str | None = None) -> Plan:
    """schedule: None gives the hardware's default with the threads torch runs with in this process.
    weight_dtype: the dtype the plan is costed for (weights and KV); None: the checkpoint's."""
    from specmoe.planner.hardware_spec import load_hardware
    from specmoe.planner.memory import footprint
    from specmoe.planner.workload import Workload, load_acceptance

    spec = ModelSpec.from_hf_config(target_dir)
    dspec = ModelSpec.from_hf_config(draft_dir) if draft_dir is not None else None
    hw = load_hardware(hardware)
    dt = weight_dtype or spec.weight_dtype
    wl = Workload(prompt_len=prompt_len, gen_len=gen_len, batch=batch, acceptance=load_acceptance(acceptance),
                  weight_dtype=dt, kv_dtype="float32" if dt in ("float32", "fp32") else "bf16")
    slots = expert_cache_slots if expert_cache_slots is not None else [
        spec.num_experts if i in spec.moe_layers else 0 for i in range(spec.num_layers)]
    placement = Placement(expert_cache_slots=tuple(int(s) for s in slots),
                          draft_kv_gpu_sequences=batch if draft_kv_gpu_sequences is None else draft_kv_gpu_sequences,
                          target_kv_gpu_sequences=target_kv_gpu_sequences,
                          cpu_expert_layers=tuple(cpu_expert_layers))
    if schedule is None:
        schedule = default_schedule(hw).with_changes(cpu_threads=torch.get_num_threads())
    kw = dict(model=spec.to_dict(), hardware=hw.raw, workload=wl.to_dict(),
              draft=dspec.to_dict() if dspec else None, batch=batch, micro_batches=micro_batches,
              draft_len=draft_len, placement=placement, schedule=schedule)
    pred, source = _predict(kw)
    memory = footprint(spec, hw, wl, batch, draft_len, placement, dspec if draft_len > 0 else None,
                       micro_batches).to_dict()
    return Plan(**kw, predicted=pred, memory=memory, bound="gpu", frontier={"by_k": [], "by_batch": []},
                solver={"name": "plan_for_checkpoint", "prediction": source})
