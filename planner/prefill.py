"""The prefill's predicted time, by where it is spent (DESIGN.md: the prefill row of the report).

    parts = prefill_parts(cm, batch, placement)    # PrefillParts: per target stage, the draft, the rest, total
    prefill_time(cm, batch, placement) == parts.total_s

Per layer, every non-resident expert streams once (overlapped with the previous layer's compute), and
all B*P prompt tokens run through the layer in passes of whole prompts, at most chunk_tokens tokens
each as the engine groups them (one prompt when it is longer), on the GPU (attention on the GPU,
causal), and the new KV is copied to the CPU (D2H). The layer pipeline costs
h2d(0) + sum_i max(gpu_i, h2d_{i+1}, d2h_i) (the plain sum where the CPU stands in for the GPU), then
the LM head of the last tokens and the draft's own prefill on the GPU (its weights and KV are there;
it fills the draft's KV and computes no logits, runtime/speculative.py),
plus the fixed costs of those passes (FixedCosts.prefill_parts). A stage's part is its busy time
(roofline + fixed); with copies overlapped the total is less than the parts' sum.

Dimensions: B prompts of P tokens, T = B*P tokens, L target layers ([L] arrays).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from specmoe.planner.cost_model import CostModel
from specmoe.planner.memory import PREFILL_CHUNK_TOKENS
from specmoe.planner.plan import Placement
from specmoe.planner.stages import Stage

@dataclass(frozen=True)
class PrefillParts:
    """Predicted seconds of one prefill of the batch."""
    stages_s: dict[str, float]   # each target stage's busy time (pre_attn .. lm_head), roofline + its fixed costs
    draft_s: float               # the draft's own prefill (roofline + fixed)
    other_s: float               # outside every stage: the KV copy to the host, prefill.token
    total_s: float               # the whole prefill, copies overlapped with compute where they can be
    passes: int                  # the target's passes (chunks of whole prompts)

    def to_dict(self) -> dict[str, float]:
        return {**self.stages_s, "draft": self.draft_s, "other": self.other_s, "total": self.total_s}

    def part_s(self, part: str) -> float:
        """One part by name: a target stage, "draft" or "other"."""
        return {"draft": self.draft_s, "other": self.other_s}.get(part, self.stages_s.get(part, 0.0))


def prefill_parts(cm: CostModel, batch: int, placement: Placement,
                  chunk_tokens: int = PREFILL_CHUNK_TOKENS) -> PrefillParts:
    """The prefill of `batch` prompts of the workload's prompt length, by stage (module docstring)."""
    from specmoe.planner.roofline import OpCost, time_on

    m, hw, wl = cm.model, cm.hw, cm.workload
    P = wl.prompt_len
    T = batch * P
    chunk = min(T, max(P, chunk_tokens // P * P))   # whole prompts per pass, as the engine prefills
    nch = math.ceil(T / chunk)
    wb, dt, um = cm.wb, cm.dtype, cm.use_measured

    def g(flops, nbytes, tokens, kind="gemm"):
        return time_on("gpu", hw, OpCost(flops, nbytes), dtype=dt, kind=kind, tokens=tokens, use_measured=um).time_s

    pre = g(2.0 * T * cm.pre_elems, nch * cm.pre_elems * wb, chunk)
    att = g(2.0 * batch * m.num_q_heads * cm.e_h * P * (P + 1) / 2.0, T * cm.kv_tok_layer_bytes * 2, None, "attention")
    post = np.where(cm.is_moe, g(2.0 * T * cm.post_moe_elems, nch * cm.post_moe_elems * wb, chunk),
                    g(2.0 * T * cm.post_dense_elems, nch * cm.post_dense_elems * wb, chunk))              # [L]
    E = cm.E
    moe = g(2.0 * T * cm.na * m.expert_elems, nch * E * cm.expert_bytes, chunk * cm.na / max(E, 1)) if E else 0.0
    moe_l = np.where(cm.is_moe, moe, 0.0)                                                                # [L]
    d2h = T * cm.kv_tok_layer_bytes / hw.link.d2h_Bps
    gpu = pre + att + post + moe_l                                                                       # [L]
    slots = np.asarray(placement.expert_cache_slots, dtype=float)
    h2d = np.where(cm.is_moe, (E - slots) * cm.expert_bytes / cm.h2d_Bps, 0.0)                          # [L]
    nxt = np.append(h2d[1:], 0.0)
    if hw.gpu.shares_host_cpu:      # a CPU standing in for the GPU: copies and compute take turns
        layers = float(h2d.sum() + gpu.sum() + d2h * len(gpu))
    else:
        layers = float(h2d[0] + np.maximum(np.maximum(gpu, nxt), d2h).sum())
    L = len(gpu)
    lm = g(2.0 * batch * m.vocab_size * m.hidden, m.vocab_size * m.hidden * wb, batch)
    draft = 0.0
    if cm.draft is not None:
        d = cm.draft
        d_mm = max(0.0, cm.d_mm - d.vocab_size * d.hidden)   # no LM head: the draft's prefill only fills its KV
        draft = g(2.0 * T * d_mm, nch * d_mm * wb, chunk) + g(
            2.0 * d.num_layers * batch * d.num_q_heads * cm.d_e_h * P * (P + 1) / 2.0, T * cm.d_kv_tok_bytes, None,
            "attention")
    fixed = cm.fixed.prefill_parts(batch, P, nch)
    total = layers + lm + draft + sum(fixed.values())
    stages = {Stage.TARGET_PRE_ATTN.value: L * pre, Stage.TARGET_ATTENTION.value: L * att,
              Stage.TARGET_POST_ATTN.value: float(post.sum()), Stage.TARGET_MOE.value: float(moe_l.sum()),
              Stage.TARGET_H2D.value: float(h2d.sum()), Stage.TARGET_LM_HEAD.value: lm}
    for name in stages:
        stages[name] += fixed.get(name, 0.0)
    draft += fixed.get("draft", 0.0)
    other = fixed.get("other", 0.0) + (d2h * L if hw.gpu.shares_host_cpu else 0.0)
    return PrefillParts(stages_s=stages, draft_s=draft, other_s=other, total_s=total, passes=nch)


def prefill_time(cm: CostModel, batch: int, placement: Placement, chunk_tokens: int = PREFILL_CHUNK_TOKENS) -> float:
    """Seconds of the prefill of `batch` prompts (prefill_parts' total)."""
    return prefill_parts(cm, batch, placement, chunk_tokens).total_s


__all__ = ["PrefillParts", "prefill_parts", "prefill_time"]
