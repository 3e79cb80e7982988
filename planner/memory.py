"""Memory footprint on the GPU and the CPU, the batch that fits, and the default placement.

GPU: non-expert target weights, draft weights, expert cache slots, streaming buffers (two layers
of non-resident experts: double buffering), draft KV of the GPU-draft sequences, target KV of the
GPU-KV sequences, activations of the N = B(k+1) tokens.
CPU: every routed expert (pinned, the source of the H2D stream), target KV of the other
sequences, draft KV of the CPU-draft sequences.

KV is budgeted at the longest context a sequence reaches (prompt + output): memory must hold the
last iteration, not the mean one.

Margins (the share of each memory the plan may use; a hardware spec may set its own with
`usable_mem_fraction` under gpu: or cpu:, e.g. to reproduce a published deployment):
  GPU_MEM_FRACTION = 0.90: CUDA context, cuBLAS workspaces and allocator fragmentation take the rest
                     (MoE-Lightning's optimizer uses 0.86, FlexGen leaves similar headroom).
  CPU_MEM_FRACTION = 0.85: the OS, page cache, the Python runtime and pinned-staging overheads
                     (MoE-Lightning uses 0.8).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from specmoe.planner.errors import InfeasibleError, SpecError
from specmoe.planner.hardware_spec import DEFAULT_CPU_USABLE_FRACTION, DEFAULT_GPU_USABLE_FRACTION, HardwareSpec
from specmoe.planner.model_spec import ModelSpec
from specmoe.planner.plan import Placement
from specmoe.planner.workload import Workload

GPU_MEM_FRACTION = DEFAULT_GPU_USABLE_FRACTION     # 0.90
CPU_MEM_FRACTION = DEFAULT_CPU_USABLE_FRACTION     # 0.85
ACT_BYTES = 2
LOGIT_BYTES = 4
GiB = 1024 ** 3


def _g(x: float) -> str:
    return f"{x / GiB:.2f} GiB"


@dataclass(frozen=True)
class Footprint:
    gpu_bytes: float
    cpu_bytes: float
    gpu_capacity_bytes: float
    cpu_capacity_bytes: float
    gpu_usable_bytes: float
    cpu_usable_bytes: float
    gpu_breakdown: dict
    cpu_breakdown: dict

    @property
    def gpu_fraction(self) -> float:
        return self.gpu_usable_bytes / self.gpu_capacity_bytes

    @property
    def cpu_fraction(self) -> float:
        return self.cpu_usable_bytes / self.cpu_capacity_bytes

    @property
    def fits_gpu(self) -> bool:
        return self.gpu_bytes <= self.gpu_usable_bytes

    @property
    def fits_cpu(self) -> bool:
        return self.cpu_bytes <= self.cpu_usable_bytes

    @property
    def fits(self) -> bool:
        return self.fits_gpu and self.fits_cpu

    def to_dict(self) -> dict:
        return {"gpu_bytes": self.gpu_bytes, "cpu_bytes": self.cpu_bytes,
                "gpu_capacity_bytes": self.gpu_capacity_bytes, "cpu_capacity_bytes": self.cpu_capacity_bytes,
                "gpu_usable_bytes": self.gpu_usable_bytes, "cpu_usable_bytes": self.cpu_usable_bytes,
                "gpu_fraction": self.gpu_fraction, "cpu_fraction": self.cpu_fraction,
                "gpu_breakdown": dict(self.gpu_breakdown), "cpu_breakdown": dict(self.cpu_breakdown)}

    def check(self, batch: int | None = None, max_fit: int | None = None, placement_given: bool = False) -> None:
        """Raise InfeasibleError naming the memory that overflows, by how much, and what would fix it.
        max_fit: the largest batch that fits with the default placement (named in the fix)."""
        if not self.fits_cpu:
            parts = ", ".join(f"{k} {_g(v)}" for k, v in self.cpu_breakdown.items() if v)
            if self.cpu_breakdown.get("experts_pinned", 0) > self.cpu_usable_bytes:
                fix = ("the pinned experts alone exceed it: use smaller weights (--weight-dtype fp8) "
                       "or a host with more memory (--cpu-mem-GiB)")
            else:
                if max_fit and placement_given:
                    fix = f"keep more draft/target KV off the CPU or lower the batch ({max_fit} fit with the default placement)"
                else:
                    fix = f"use --batch {max_fit} or less" if max_fit else "lower the batch"
                fix += (", a shorter prompt/output, a smaller KV dtype (--kv-dtype fp8), "
                        "or more host memory (--cpu-mem-GiB)")
            raise InfeasibleError("cpu memory", f"needs {_g(self.cpu_bytes)} ({parts}) but "
                                  f"{_g(self.cpu_usable_bytes)} is usable ({self.cpu_fraction:.0%} of "
                                  f"{_g(self.cpu_capacity_bytes)})" + (f" at batch {batch}" if batch else ""), fix)
        if not self.fits_gpu:
            parts = ", ".join(f"{k} {_g(v)}" for k, v in self.gpu_breakdown.items() if v)
            raise InfeasibleError("gpu memory", f"needs {_g(self.gpu_bytes)} ({parts}) but "
                                  f"{_g(self.gpu_usable_bytes)} is usable ({self.gpu_fraction:.0%} of "
                                  f"{_g(self.gpu_capacity_bytes)})" + (f" at batch {batch}" if batch else ""),
                                  "cache fewer experts, keep less draft/target KV on the GPU, lower the batch, "
                                  "or give more GPU memory (--gpu-mem-GiB)")


def kv_bytes_per_sequence(model: ModelSpec, workload: Workload) -> float:
    """Target KV of one sequence at its longest context (prompt + output)."""
    return model.kv_bytes_per_token(workload.kv_bytes_per_elem) * workload.max_context


def draft_kv_bytes_per_sequence(draft: ModelSpec | None, workload: Workload) -> float:
    if draft is None:
        return 0.0
    return draft.kv_bytes_per_token(workload.kv_bytes_per_elem) * workload.max_context


def activation_bytes(model: ModelSpec, batch: int, draft_len: int, micro_batches: int,
                     draft: ModelSpec | None = None) -> float:
    """GPU activations: the residual stream of all N = B(k+1) tokens, the working buffers of two
    micro-batches in flight (projections, routed-token copies and SwiGLU intermediates), one
    micro-batch's fp32 logits, and the draft's logits and hidden states."""
    k1 = draft_len + 1
    n = batch * k1
    n_mb = math.ceil(batch / max(1, micro_batches)) * k1
    h = model.hidden
    pre_out = (model.num_q_heads + 2 * model.num_kv_heads) * model.head_dim
    per_tok = pre_out + model.num_q_heads * model.head_dim + 2 * h
    if model.is_moe:
        per_tok += model.top_k * (h + 2 * model.expert_intermediate)
    else:
        per_tok += 2 * model.dense_intermediate
    act = ACT_BYTES * 2 * n * h + 2 * ACT_BYTES * n_mb * per_tok + LOGIT_BYTES * n_mb * model.vocab_size
    if draft is not None and draft_len > 0:
        act += LOGIT_BYTES * batch * draft.vocab_size + ACT_BYTES * 4 * n * draft.hidden
    return float(act)


def _streaming_layers(model: ModelSpec, placement: Placement) -> list[int]:
    cpu = set(placement.cpu_expert_layers)
    return [i for i in model.moe_layers if i not in cpu and placement.expert_cache_slots[i] < model.num_experts]


def footprint(model: ModelSpec, hw: HardwareSpec, workload: Workload, batch: int, draft_len: int,
              placement: Placement, draft: ModelSpec | None = None, micro_batches: int = 1,
              context: int | None = None) -> Footprint:
    """GPU and CPU bytes of one configuration, with a breakdown of each. context: KV positions per
    sequence (default the workload's longest context; the engine passes the rows it allocates).
    batch 0 gives what does not depend on the batch (weights, expert cache, streaming buffers)."""
    if len(placement.expert_cache_slots) != model.num_layers:
        raise SpecError("placement.expert_cache_slots", f"has {len(placement.expert_cache_slots)} entries, "
                        f"the model has {model.num_layers} layers", "give one entry per layer")
    wb = workload.weight_bytes_per_elem
    eb = model.expert_elems * wb
    use_draft = draft is not None and draft_len > 0
    S = workload.max_context if context is None else int(context)
    kv_t = model.kv_bytes_per_token(workload.kv_bytes_per_elem) * S
    kv_d = draft.kv_bytes_per_token(workload.kv_bytes_per_elem) * S if use_draft else 0.0
    tg = min(placement.target_kv_gpu_sequences, batch)
    dg = min(placement.draft_kv_gpu_sequences, batch) if use_draft else 0
    moe = set(model.moe_layers)
    cached = sum(c for i, c in enumerate(placement.expert_cache_slots) if i in moe)
    stream = _streaming_layers(model, placement)
    buf = max(1, placement.streaming_buffers) * max(
        (model.num_experts - placement.expert_cache_slots[i] for i in stream), default=0) * eb
    gpu = {
        "target_non_expert_weights": model.non_expert_elems * wb,
        "draft_weights": draft.total_params * wb if use_draft else 0.0,
        "expert_cache": cached * eb,
        "streaming_buffers": float(buf),
        "draft_kv": dg * kv_d,
        "target_kv": tg * kv_t,
        "activations": activation_bytes(model, batch, draft_len, micro_batches, draft if use_draft else None),
    }
    cpu = {
        "experts_pinned": model.routed_expert_elems_total * wb,
        "target_kv": (batch - tg) * kv_t,
        "draft_kv": (batch - dg) * kv_d,
    }
    gcap, ccap = hw.gpu.mem_bytes, hw.cpu.mem_bytes
    return Footprint(gpu_bytes=float(sum(gpu.values())), cpu_bytes=float(sum(cpu.values())),
                     gpu_capacity_bytes=gcap, cpu_capacity_bytes=ccap,
                     gpu_usable_bytes=gcap * hw.gpu.usable_fraction, cpu_usable_bytes=ccap * hw.cpu.usable_fraction,
                     gpu_breakdown={k: float(v) for k, v in gpu.items()},
                     cpu_breakdown={k: float(v) for k, v in cpu.items()})


def default_placement(model: ModelSpec, hw: HardwareSpec, workload: Workload, batch: int, draft_len: int = 0,
                      draft: ModelSpec | None = None, micro_batches: int = 2,
                      streaming_buffers: int = 2) -> Placement:
    """Target KV on the CPU; draft KV on the GPU for as many sequences as fit (draft data first: the
    draft runs k times per iteration); then as many expert cache slots per MoE layer as fit in what
    is left (uniform, the remainder one extra slot on the first layers). Never raises: a placement
    that cannot fit is caught by `footprint(...).check()`."""
    L, E = model.num_layers, model.num_experts
    empty = Placement(expert_cache_slots=(0,) * L, streaming_buffers=streaming_buffers)
    use_draft = draft is not None and draft_len > 0
    base = footprint(model, hw, workload, batch, draft_len, empty, draft if use_draft else None, micro_batches)
    free = base.gpu_usable_bytes - base.gpu_bytes          # streaming buffers at c = 0 included
    g = 0
    if use_draft:
        kv_d = draft.kv_bytes_per_token(workload.kv_bytes_per_elem) * workload.max_context
        g = max(0, min(batch, int(max(free, 0.0) // kv_d))) if kv_d > 0 else batch
        free -= g * kv_d
    slots = [0] * L
    n_moe = len(model.moe_layers)
    if E and n_moe:
        eb = model.expert_elems * workload.weight_bytes_per_elem
        nb = max(1, streaming_buffers)
        avail = free + nb * E * eb            # give back the c = 0 buffers, then charge them at c
        c = 0
        for cand in range(E, 0, -1):
            need = cand * n_moe * eb + (nb * (E - cand) * eb if cand < E else 0)
            if need <= avail:
                c = cand
                break
        left = avail - c * n_moe * eb - (nb * (E - c) * eb if c < E else 0)
        extra = 0 if c >= E else max(0, min(n_moe, int(left // eb)))
        for idx, layer in enumerate(model.moe_layers):
            slots[layer] = c + (1 if idx < extra else 0)
    return Placement(expert_cache_slots=tuple(slots), target_kv_gpu_sequences=0, draft_kv_gpu_sequences=g,
                     streaming_buffers=streaming_buffers)


def max_batch(model: ModelSpec, hw: HardwareSpec, workload: Workload, draft: ModelSpec | None = None,
              draft_len: int = 0, micro_batches: int = 2, cpu_kv_budget_bytes: float | None = None) -> int:
    """The most sequences whose KV fits (the paper's rule: b = CPU memory left for KV / KV per
    sequence at the longest context), with draft KV on the GPU first and the GPU's activations
    checked too. cpu_kv_budget_bytes replaces "CPU memory left for KV" (usable CPU memory minus
    the pinned experts) when given.

    Raises InfeasibleError when not even one sequence fits."""
    use_draft = draft is not None and draft_len > 0
    kv_t = kv_bytes_per_sequence(model, workload)

    def fits(b: int) -> tuple[bool, Footprint]:
        pl = default_placement(model, hw, workload, b, draft_len, draft, min(micro_batches, b))
        fp = footprint(model, hw, workload, b, draft_len, pl, draft if use_draft else None, min(micro_batches, b))
        if cpu_kv_budget_bytes is not None:
            ok_cpu = fp.cpu_breakdown["target_kv"] + fp.cpu_breakdown["draft_kv"] <= cpu_kv_budget_bytes
        else:
            ok_cpu = fp.fits_cpu
        return ok_cpu and fp.fits_gpu, fp

    ok, fp = fits(1)
    if not ok:
        if cpu_kv_budget_bytes is not None and fp.fits_gpu:
            raise InfeasibleError("cpu memory", f"one sequence needs {_g(kv_t)} of KV but the KV budget is "
                                  f"{_g(cpu_kv_budget_bytes)}", "shorten the prompt/output or raise the budget")
        fp.check(batch=1)
    if cpu_kv_budget_bytes is not None:
        hi = int(cpu_kv_budget_bytes // kv_t) + 1
    else:
        hi = int(max(0.0, fp.cpu_usable_bytes - fp.cpu_breakdown["experts_pinned"]) // kv_t) + 1
    hi = max(hi, 2)
    lo = 1                                   # fits(lo) is True, fits(hi) assumed False; check it
    if fits(hi)[0]:
        while fits(hi)[0]:
            lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid)[0]:
            lo = mid
        else:
            hi = mid
    return lo
