"""The seconds of every stage of one decode iteration (planner/cost_model.py computes them), and the
closed forms over them: per-resource busy time per layer, the bare max of the three resources per layer
(layer_time = max(t_h2d, t_cpu, t_gpu), the design's check of the simulator), the draft phase's lower
bound, and the totals per stage.

Where host DRAM is shared (planner/shared_dram.py: the expert stream slows CPU attention and the other
way round), a layer's CPU work t_c and copies t_h take max(t_c + a t_h, t_h + b t_c) together, so
layer_time = max(that, t_gpu): still a max of lines, as the MILP needs.

Array dimension letters: L = target layers, M = micro-batches, G = draft groups (1, or M when
one micro-batch's draft overlaps another's verification), K = draft steps.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from specmoe.planner.shared_dram import SharedDram
from specmoe.planner.stages import Stage


@dataclass
class IterationCosts:
    """Seconds of every stage of one decode iteration of one configuration (arrays: see module doc)."""

    batch: int
    micro_batches: int
    draft_len: int
    context_len: float
    mb_sizes: np.ndarray            # [M] sequences per micro-batch
    tokens: int                     # N = B(k+1)
    tokens_per_iteration: float     # B(acc(k)+1)
    batched_moe: bool               # True: one target.moe event per layer over all micro-batches
    pre_s: np.ndarray               # [L, M]
    attn_cpu_s: np.ndarray          # [L, M]
    attn_gpu_s: np.ndarray          # [L, M]
    kv_h2d_s: np.ndarray            # [L, M] (attention_device == "gpu": CPU KV streamed to the GPU)
    post_s: np.ndarray              # [L, M]
    moe_gpu_s: np.ndarray           # [L, M] (batched_moe: whole-batch time in column 0)
    moe_cpu_s: np.ndarray           # [L, M] (cpu_expert_layers; batched_moe: column 0)
    h2d_s: np.ndarray               # [L]
    lm_head_s: np.ndarray           # [M]
    verify_s: np.ndarray            # [M]
    draft_group_sizes: np.ndarray   # [G]
    draft_gpu_s: np.ndarray         # [G, K] GPU-part draft step
    draft_cpu_attn_s: np.ndarray    # [G, K] CPU-part draft step: attention on the CPU
    draft_cpu_gpu_s: np.ndarray     # [G, K] CPU-part draft step: the rest on the GPU
    # ---- the linear pieces the optimizer uses ----
    touched: float                  # expected experts touched per MoE layer by the N tokens
    h2d_s_per_uncached_expert: float     # t_h2d(c) = (E - c) * this, on streaming MoE layers
    cpu_expert_s_per_uncached_expert: float  # t_cpu_moe(c) = (E - c) * this, on cpu_expert_layers
    moe_gpu_full_s: float           # GPU MoE time of a layer with all experts on the GPU (all micro-batches)
    cpu_attn_s_per_seq: np.ndarray  # [L] CPU verify attention per CPU-KV sequence (linear)
    gpu_attn_s_per_seq: np.ndarray  # [L] GPU verify attention per GPU-KV sequence (linear)
    moe_flops_gpu: float            # routed-expert flops done on the GPU per iteration
    gpu_peak_flops: float
    sources: frozenset = field(default_factory=frozenset)
    serial: bool = False            # the hardware's GPU is its CPU standing in: nothing overlaps
    batched_layer: bool = False     # pre_attn and post_attn once per layer too (column 0); attention per micro-batch
    other_s: float = 0.0            # fixed engine time outside every stage (iteration.other keys): adds to the period
    shared_dram: SharedDram | None = None   # the expert stream and CPU reads contend for host DRAM (None: they do not)

    # ---- closed forms ----
    @property
    def gpu_s(self) -> np.ndarray:     # [L]
        return (self.pre_s + self.attn_gpu_s + self.post_s + self.moe_gpu_s).sum(axis=1)

    @property
    def cpu_s(self) -> np.ndarray:     # [L]
        return (self.attn_cpu_s + self.moe_cpu_s).sum(axis=1)

    @property
    def pcie_s(self) -> np.ndarray:    # [L]
        return self.h2d_s + self.kv_h2d_s.sum(axis=1)

    @property
    def layer_time_s(self) -> np.ndarray:   # [L] bare max per layer (the sum where nothing overlaps)
        if self.serial:
            return self.pcie_s + self.cpu_s + self.gpu_s
        t_c, t_h = self.cpu_s, self.pcie_s
        if self.shared_dram is None:
            return np.maximum(np.maximum(t_h, t_c), self.gpu_s)
        a, b = self._shared_dram_lines()
        return np.maximum(np.maximum(t_c + a * t_h, t_h + b * t_c), self.gpu_s)

    def _shared_dram_lines(self) -> tuple[np.ndarray, np.ndarray]:
        """[L] each layer's (a, b) of the CPU-copy pair (SharedDram.pair_coefficients), its CPU work's
        stretch and pressure the time-weighted mean of its attention's and its CPU experts'."""
        sd = self.shared_dram
        att, moe = self.attn_cpu_s.sum(axis=1), self.moe_cpu_s.sum(axis=1)             # [L]
        busy = att + moe > 0
        tot = np.where(busy, att + moe, 1.0)
        stretch = np.where(busy, (att * sd.attn_cpu[0] + moe * sd.moe_cpu[0]) / tot, 1.0)
        pressure = (att * sd.attn_cpu[1] + moe * sd.moe_cpu[1]) / tot
        return sd.pair_coefficients((stretch, pressure))

    @property
    def draft_time_closed_s(self) -> float:
        """Lower bound of the draft phase: the busier of GPU and CPU, or the CPU part's step chain."""
        if self.draft_gpu_s.size == 0:
            return 0.0
        if self.serial:
            return float(self.draft_gpu_s.sum() + self.draft_cpu_gpu_s.sum() + self.draft_cpu_attn_s.sum())
        gpu = float(self.draft_gpu_s.sum() + self.draft_cpu_gpu_s.sum())
        cpu = float(self.draft_cpu_attn_s.sum())
        chain = float((self.draft_cpu_attn_s + self.draft_cpu_gpu_s).sum(axis=1).max())
        return max(gpu, cpu, chain)

    @property
    def closed_form_time_s(self) -> float:
        """Sum over layers of max(t_h2d, t_cpu, t_gpu), then LM head, acceptance and the draft phase."""
        return (float(self.layer_time_s.sum()) + float(self.lm_head_s.sum()) + float(self.verify_s.sum())
                + self.draft_time_closed_s + self.other_s)

    @property
    def sum_of_stages_s(self) -> float:
        """Everything serialised: the upper bound of the iteration."""
        return float(sum(self.stage_totals().values())) + self.other_s

    def stage_totals(self) -> dict[str, float]:
        """Busy seconds per stage per iteration, under the design's stage names."""
        return {
            Stage.TARGET_PRE_ATTN.value: float(self.pre_s.sum()),
            Stage.TARGET_ATTENTION.value: float(self.attn_cpu_s.sum() + self.attn_gpu_s.sum()),
            Stage.TARGET_POST_ATTN.value: float(self.post_s.sum()),
            Stage.TARGET_MOE.value: float(self.moe_gpu_s.sum() + self.moe_cpu_s.sum()),
            Stage.TARGET_H2D.value: float(self.h2d_s.sum() + self.kv_h2d_s.sum()),
            Stage.TARGET_LM_HEAD.value: float(self.lm_head_s.sum()),
            Stage.DRAFT_GPU.value: float(self.draft_gpu_s.sum()),
            Stage.DRAFT_CPU.value: float(self.draft_cpu_attn_s.sum() + self.draft_cpu_gpu_s.sum()),
            Stage.VERIFY_ACCEPT.value: float(self.verify_s.sum()),
        }

    def resource_busy_s(self) -> dict[str, float]:
        return {
            "gpu": float(self.gpu_s.sum() + self.lm_head_s.sum() + self.verify_s.sum()
                         + self.draft_gpu_s.sum() + self.draft_cpu_gpu_s.sum()),
            "cpu": float(self.cpu_s.sum() + self.draft_cpu_attn_s.sum()),
            "pcie": float(self.pcie_s.sum()),
        }

    def moe_gpu_utilization(self, iteration_time_s: float) -> float:
        """Achieved routed-expert FLOP rate on the GPU over the iteration, as a fraction of its peak."""
        if iteration_time_s <= 0:
            return 0.0
        return self.moe_flops_gpu / (iteration_time_s * self.gpu_peak_flops)

    @property
    def source(self) -> str:
        return "measured" if "measured" in self.sources else "peak"
