"""What a plan needs in device and host memory on this machine, checked against what is free
BEFORE any weight is loaded (device: torch.cuda.mem_get_info; host: /proc/meminfo MemAvailable).
On a CPU-only host the "device" is host memory too, so both needs are summed against MemAvailable.
"""
from __future__ import annotations

import math

import torch

from specmoe.planner.errors import SpecError

from specmoe.runtime.weights.checkpoint import ArchConfig, expected_shapes
from specmoe.runtime.device import device_mem_free_bytes, host_mem_available_bytes
from specmoe.runtime.model.expert_store import ExpertStore

GiB = 1024 ** 3


def non_expert_elems(c: ArchConfig) -> int:
    n = sum(math.prod(s) for s in expected_shapes(c).values())
    return n + len(c.moe_layers) * c.num_experts * c.hidden   # routers


def kv_elem_bytes(dtype: torch.dtype) -> int:
    return 2 if dtype == torch.bfloat16 else 4


def requirement(target: ArchConfig, draft: ArchConfig | None, plan, dtype: torch.dtype, capacity: int,
                tokens_per_pass: int) -> dict:
    """{device_bytes, host_bytes, breakdown} for executing `plan` with KV rows of `capacity` positions."""
    eb = torch.empty((), dtype=dtype).element_size()
    kvb = kv_elem_bytes(dtype)
    pl, B = plan.placement, plan.batch
    dev: dict[str, int] = {}
    host: dict[str, int] = {}
    dev["target_non_expert_weights"] = non_expert_elems(target) * eb
    if target.is_moe:
        dev["expert_cache_and_buffers"] = ExpertStore.device_bytes(target, pl.expert_cache_slots, pl.cpu_expert_layers,
                                                                   eb, pl.streaming_buffers)
        host["experts"] = len(target.moe_layers) * target.num_experts * target.expert_elems * eb
    kv_t = 2 * target.num_layers * target.num_kv_heads * target.head_dim * capacity * kvb   # per sequence
    gpu_t = min(pl.target_kv_gpu_sequences, B)
    dev["target_kv"] = gpu_t * kv_t
    host["target_kv"] = (B - gpu_t) * kv_t
    if draft is not None:
        dev["draft_weights"] = non_expert_elems(draft) * eb
        kv_d = 2 * draft.num_layers * draft.num_kv_heads * draft.head_dim * capacity * kvb
        gpu_d = min(pl.draft_kv_gpu_sequences, B)
        dev["draft_kv"] = gpu_d * kv_d
        host["draft_kv"] = (B - gpu_d) * kv_d
    V = max(target.vocab_size, draft.vocab_size if draft else 0)
    width = max(target.hidden, target.num_q_heads * target.head_dim)
    inter = max(target.moe_intermediate * max(target.top_k, 1), target.dense_intermediate, target.shared_intermediate)
    dev["activations"] = tokens_per_pass * (12 * width + 2 * inter + 3 * V) * 4
    return {"device_bytes": sum(dev.values()), "host_bytes": sum(host.values()),
            "device_breakdown": dev, "host_breakdown": host}


def check_fits(req: dict, device: torch.device, margin: float = 0.95) -> dict:
    """Raise SpecError with the numbers when `req` does not fit what is free now; return what was free."""
    host_free = host_mem_available_bytes()
    dfree = device_mem_free_bytes(device)
    need_d, need_h = req["device_bytes"], req["host_bytes"]

    def fmt(b):
        return f"{b / GiB:.2f} GiB"

    def top(d):
        return ", ".join(f"{k} {fmt(v)}" for k, v in sorted(d.items(), key=lambda kv: -kv[1]) if v)

    if dfree is None:   # CPU-only: both live in host memory
        if host_free and need_d + need_h > margin * host_free:
            raise SpecError("plan", f"needs {fmt(need_d + need_h)} of host memory ({top(req['device_breakdown'])}; "
                            f"{top(req['host_breakdown'])}) but only {fmt(host_free)} is available (MemAvailable)",
                            "plan with a smaller batch or context, or free memory")
        return {"host_free_bytes": host_free, "device_free_bytes": None}
    free, total = dfree
    if need_d > margin * free:
        raise SpecError("plan", f"needs {fmt(need_d)} of GPU memory ({top(req['device_breakdown'])}) but only "
                        f"{fmt(free)} of {fmt(total)} is free", "plan for this GPU's free memory (fewer cached "
                        "experts, smaller batch or fewer GPU KV sequences)")
    if host_free and need_h > margin * host_free:
        raise SpecError("plan", f"needs {fmt(need_h)} of host memory ({top(req['host_breakdown'])}) but only "
                        f"{fmt(host_free)} is available (MemAvailable)", "plan with a smaller batch or context")
    return {"host_free_bytes": host_free, "device_free_bytes": free}
