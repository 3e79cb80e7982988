"""The planner's footprint of the plan being run (planner/memory.py, the one memory model), sized
for what the engine allocates, checked against the memory really free on this machine (device:
torch.cuda.mem_get_info; host: /proc/meminfo MemAvailable). On a CPU-only host the "device" is host
memory too, so both parts are summed against MemAvailable.

    fp = plan_footprint(plan, rows=0, context=0, ...)      # weights, expert cache, streaming buffers
    check_fits(fp, device)                                  # SpecError with the numbers, or what was free
"""
from __future__ import annotations

from dataclasses import replace

import torch

from specmoe.planner.errors import SpecError
from specmoe.planner.hardware_spec import parse_hardware
from specmoe.planner.memory import Footprint, footprint
from specmoe.planner.model_spec import ModelSpec
from specmoe.planner.plan import Plan
from specmoe.planner.workload import Workload

from specmoe.runtime.device import device_mem_free_bytes, host_mem_available_bytes

GiB = 1024 ** 3
# memory free now that a run leaves untouched: the allocator's rounding and the Python objects of a
# run, which the footprint does not count (the planner's reserve_GiB keeps back what the OS and the
# runtime hold before the run, which MemAvailable and mem_get_info already leave out)
FREE_MARGIN_BYTES = 256 * 2 ** 20


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def plan_footprint(plan: Plan, rows: int, context: int, draft_len: int, weight_dtype: torch.dtype,
                   kv_dtype: torch.dtype) -> Footprint:
    """The planner's footprint of `plan` with `rows` KV rows of `context` positions, the engine's dtypes
    and drafts of up to `draft_len` tokens."""
    wl = replace(Workload.from_dict(plan.workload), weight_dtype=dtype_name(weight_dtype),
                 kv_dtype=dtype_name(kv_dtype))
    draft = ModelSpec.from_dict(plan.draft) if plan.draft else None
    return footprint(ModelSpec.from_dict(plan.model), parse_hardware(plan.hardware), wl, rows, draft_len,
                     plan.placement, draft, max(1, min(plan.micro_batches, max(rows, 1))), context=context)


def with_held_weights(fp: Footprint, base: Footprint, key: str) -> Footprint:
    """fp with the GPU-part entry `key` (e.g. "draft_weights") as in `base`: weights the engine keeps
    loaded though fp's configuration would not load them (a run at k = 0 on an engine built with a draft)."""
    held = float(base.gpu_breakdown.get(key, 0.0)) - float(fp.gpu_breakdown.get(key, 0.0))
    if held <= 0.0:
        return fp
    return replace(fp, gpu_bytes=fp.gpu_bytes + held, gpu_breakdown={**fp.gpu_breakdown, key: fp.gpu_breakdown.get(
        key, 0.0) + held})


def minus(fp: Footprint, base: Footprint) -> Footprint:
    """What `fp` needs beyond `base` (e.g. the KV and activations of a run beyond the loaded weights)."""
    g = {k: v - base.gpu_breakdown.get(k, 0.0) for k, v in fp.gpu_breakdown.items()}
    c = {k: v - base.cpu_breakdown.get(k, 0.0) for k, v in fp.cpu_breakdown.items()}
    return replace(fp, gpu_bytes=sum(g.values()), cpu_bytes=sum(c.values()), gpu_breakdown=g, cpu_breakdown=c)


def _fmt(b: float) -> str:
    return f"{b / GiB:.2f} GiB" if b >= GiB / 10 else f"{b / 2 ** 20:.3f} MiB"


def _top(d: dict) -> str:
    return ", ".join(f"{k} {_fmt(v)}" for k, v in sorted(d.items(), key=lambda kv: -kv[1]) if v > 0)


def check_fits(fp: Footprint, device: torch.device, what: str = "plan") -> dict:
    """Raise SpecError with the numbers when `fp` does not fit what is free now; return what was free."""
    host_free = host_mem_available_bytes()
    dfree = device_mem_free_bytes(device)
    need_d, need_h = fp.gpu_bytes, fp.cpu_bytes
    if dfree is None:   # CPU-only: both parts live in host memory
        if host_free and need_d + need_h > host_free - FREE_MARGIN_BYTES:
            raise SpecError(what, f"needs {_fmt(need_d + need_h)} of host memory ({_top(fp.gpu_breakdown)}; "
                            f"{_top(fp.cpu_breakdown)}) but only {_fmt(host_free)} is available (MemAvailable)",
                            "run fewer prompts at once, plan with a smaller batch or context, or free memory")
        return {"host_free_bytes": host_free, "device_free_bytes": None}
    free, total = dfree
    if need_d > free - FREE_MARGIN_BYTES:
        raise SpecError(what, f"needs {_fmt(need_d)} of GPU memory ({_top(fp.gpu_breakdown)}) but only "
                        f"{_fmt(free)} of {_fmt(total)} is free", "plan for this GPU's free memory (fewer cached "
                        "experts, smaller batch or fewer GPU KV sequences)")
    if host_free and need_h > host_free - FREE_MARGIN_BYTES:
        raise SpecError(what, f"needs {_fmt(need_h)} of host memory ({_top(fp.cpu_breakdown)}) but only "
                        f"{_fmt(host_free)} is available (MemAvailable)", "plan with a smaller batch or context")
    return {"host_free_bytes": host_free, "device_free_bytes": free}
