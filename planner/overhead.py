"""Fixed per-invocation costs of the engine's stages: the dispatch overhead (Python, torch operator
dispatch, kernel launches) that the roofline has no term for. On small models, and for the small
per-layer operations of large ones, it dominates: every stage costs `fixed + roofline`.

A hardware spec carries them under `measured:` (written by `specmoe calibrate`, which times the
engine's own stage code on tiny problems and fits these terms; see runtime/calibrate/overhead.py):

    op_overhead_us: 12.5              # one torch operation; the fallback for a key the table lacks
    stage_overhead_us:                # microseconds, keys below; any subset
      target.pre_attn: 180
      target.moe.expert: 95
      ...

A key missing from `stage_overhead_us` costs `op_overhead_us` x OPS_PER_INVOCATION[key] (the
torch operations the engine issues per invocation, counted by calibrate); keys counted per
sequence or per token have no operation count (Python work per sequence; small elementwise work
per token that the roofline, which counts GEMMs and weight bytes, leaves out) and cost 0 then.
A spec with neither field has no fixed costs: its predictions are the bare roofline.

How many invocations an iteration makes (B sequences, m micro-batches, L target layers, L_d draft
layers, k drafts) is counted as runtime/speculative.py and runtime/model/target.py run them; the
cost model adds the terms in CostModel.iteration.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from specmoe.planner.errors import SpecError
from specmoe.planner.stages import Stage

US = 1e-6


class OverheadKey(str, Enum):
    """The keys of the fixed costs: a stage of planner/stages.py, or one of its per-unit terms (the
    stage name + ".sequence", ".token", ...). The draft's keys count draft steps and layers of one
    draft-KV part: draft.step ... draft.catchup the device part's (draft.gpu), draft.cpu.step ...
    draft.cpu.catchup the host part's (draft.cpu), whose attention is one verify-kernel call per group
    where the device part's is the device's attention path."""

    PRE_ATTN = Stage.TARGET_PRE_ATTN.value
    PRE_ATTN_SEQUENCE = f"{Stage.TARGET_PRE_ATTN.value}.sequence"
    ATTENTION = Stage.TARGET_ATTENTION.value
    ATTENTION_GPU = f"{Stage.TARGET_ATTENTION.value}.gpu"
    ATTENTION_SEQUENCE = f"{Stage.TARGET_ATTENTION.value}.sequence"
    ATTENTION_TOKEN = f"{Stage.TARGET_ATTENTION.value}.token"
    POST_ATTN = Stage.TARGET_POST_ATTN.value
    POST_ATTN_TOKEN = f"{Stage.TARGET_POST_ATTN.value}.token"
    MOE = Stage.TARGET_MOE.value
    MOE_EXPERT = f"{Stage.TARGET_MOE.value}.expert"
    MOE_TOKEN = f"{Stage.TARGET_MOE.value}.token"
    H2D = Stage.TARGET_H2D.value
    LM_HEAD = Stage.TARGET_LM_HEAD.value
    LM_HEAD_TOKEN = f"{Stage.TARGET_LM_HEAD.value}.token"
    ACCEPT = Stage.VERIFY_ACCEPT.value
    ACCEPT_SEQUENCE = f"{Stage.VERIFY_ACCEPT.value}.sequence"
    ACCEPT_TOKEN = f"{Stage.VERIFY_ACCEPT.value}.token"
    DRAFT_STEP = "draft.step"
    DRAFT_LAYER = "draft.layer"
    DRAFT_SEQUENCE = "draft.sequence"
    OTHER = f"{Stage.ITERATION.value}.other"
    OTHER_SEQUENCE = f"{Stage.ITERATION.value}.other.sequence"
    DRAFT_CATCHUP = "draft.catchup"
    DRAFT_CPU_STEP = f"{Stage.DRAFT_CPU.value}.step"
    DRAFT_CPU_LAYER = f"{Stage.DRAFT_CPU.value}.layer"
    DRAFT_CPU_SEQUENCE = f"{Stage.DRAFT_CPU.value}.sequence"
    DRAFT_CPU_CATCHUP = f"{Stage.DRAFT_CPU.value}.catchup"
    DRAFT_EAGLE_STEP = "draft.eagle.step"
    DRAFT_EAGLE_SEQUENCE = "draft.eagle.sequence"
    DRAFT_EAGLE_CATCHUP = "draft.eagle.catchup"
    DRAFT_CPU_EAGLE_STEP = f"{Stage.DRAFT_CPU.value}.eagle.step"
    DRAFT_CPU_EAGLE_SEQUENCE = f"{Stage.DRAFT_CPU.value}.eagle.sequence"
    DRAFT_CPU_EAGLE_CATCHUP = f"{Stage.DRAFT_CPU.value}.eagle.catchup"
    PREFILL = Stage.PREFILL.value
    PREFILL_TOKEN = f"{Stage.PREFILL.value}.token"
    PREFILL_PRE_ATTN = f"{Stage.PREFILL.value}.{Stage.TARGET_PRE_ATTN.value}"
    PREFILL_ATTENTION = f"{Stage.PREFILL.value}.{Stage.TARGET_ATTENTION.value}"
    PREFILL_POST_ATTN = f"{Stage.PREFILL.value}.{Stage.TARGET_POST_ATTN.value}"
    PREFILL_MOE = f"{Stage.PREFILL.value}.{Stage.TARGET_MOE.value}"
    PREFILL_PRE_ATTN_TOKEN = f"{Stage.PREFILL.value}.{Stage.TARGET_PRE_ATTN.value}.token"
    PREFILL_ATTENTION_TOKEN = f"{Stage.PREFILL.value}.{Stage.TARGET_ATTENTION.value}.token"
    PREFILL_POST_ATTN_TOKEN = f"{Stage.PREFILL.value}.{Stage.TARGET_POST_ATTN.value}.token"
    PREFILL_MOE_TOKEN = f"{Stage.PREFILL.value}.{Stage.TARGET_MOE.value}.token"
    PREFILL_LM_HEAD = f"{Stage.PREFILL.value}.{Stage.TARGET_LM_HEAD.value}"
    PREFILL_LM_HEAD_TOKEN = f"{Stage.PREFILL.value}.{Stage.TARGET_LM_HEAD.value}.token"
    PREFILL_DRAFT = f"{Stage.PREFILL.value}.draft"
    PREFILL_DRAFT_TOKEN = f"{Stage.PREFILL.value}.draft.token"
    PREFILL_DRAFT_EAGLE = f"{Stage.PREFILL.value}.draft.eagle"
    PREFILL_DRAFT_EAGLE_TOKEN = f"{Stage.PREFILL.value}.draft.eagle.token"

    def __str__(self) -> str:
        return self.value


# key -> what one unit is (the engine's invocations)
OVERHEAD_KEYS: dict[str, str] = {
    OverheadKey.PRE_ATTN.value: "per invocation: each layer and micro-batch, plus one per pass (embedding, rotary tables)",
    OverheadKey.PRE_ATTN_SEQUENCE.value: "per sequence per target pass (positions of the pass)",
    OverheadKey.ATTENTION.value: "per invocation over host-memory (CPU) KV: each layer and micro-batch that has such sequences",
    OverheadKey.ATTENTION_GPU.value: "per invocation over device (GPU) KV: each layer and micro-batch that has such sequences",
    OverheadKey.ATTENTION_SEQUENCE.value: "per sequence per target pass (the KV cache's index plan, built once per pass)",
    OverheadKey.ATTENTION_TOKEN.value: ("per query token per layer (each of a sequence's k+1 rows: the kernel packs, "
                                        "rescales and stores it, whatever the context); in a prefill "
                                        "prefill.target.attention.token takes its place where the spec has it"),
    OverheadKey.POST_ATTN.value: "per layer and micro-batch (o-proj, router, shared expert)",
    OverheadKey.POST_ATTN_TOKEN.value: "per token per layer (elementwise work, routing softmax/top-k the roofline omits)",
    OverheadKey.MOE.value: "per layer (the engine runs the routed experts of all micro-batches of a layer together)",
    OverheadKey.MOE_EXPERT.value: "per expert a layer's tokens touch (each expert is one small GEMM chain)",
    OverheadKey.MOE_TOKEN.value: "per token per MoE layer (permutation, gather and weighted combine the roofline omits)",
    OverheadKey.H2D.value: "per streamed expert (one copy)",
    OverheadKey.LM_HEAD.value: "per iteration",
    OverheadKey.LM_HEAD_TOKEN.value: ("per token through the LM head (the vocabulary-wide GEMM runs off the expert-shaped "
                             "GEMM curve the roofline uses, and the logits are cast to fp32)"),
    OverheadKey.ACCEPT.value: "per iteration",
    OverheadKey.ACCEPT_SEQUENCE.value: "per sequence per iteration (acceptance bookkeeping, KV roll-back)",
    OverheadKey.ACCEPT_TOKEN.value: "per verified token per iteration (argmax and top-2 over the vocabulary)",
    OverheadKey.DRAFT_STEP.value: "per draft step of the device draft-KV part (draft.gpu)",
    OverheadKey.DRAFT_LAYER.value: "per draft step per draft layer (device part)",
    OverheadKey.DRAFT_SEQUENCE.value: "per draft step per sequence (device part)",
    OverheadKey.OTHER.value: ("per iteration: the engine's work outside every stage (building the pass's layout and "
                        "inputs, Python between stages); no stage holds it, the iteration does"),
    OverheadKey.OTHER_SEQUENCE.value: "per sequence per iteration, outside every stage",
    OverheadKey.DRAFT_CATCHUP.value: ("per draft layer, once per iteration and draft-KV part in which some sequence catches up two "
                      "tokens (all k drafts were accepted): the first draft step attends those as a group of their own"),
    OverheadKey.DRAFT_CPU_STEP.value: "per draft step of the host draft-KV part (draft.cpu); a spec without it: draft.step",
    OverheadKey.DRAFT_CPU_LAYER.value: "per draft step per draft layer (host part); else draft.layer",
    OverheadKey.DRAFT_CPU_SEQUENCE.value: "per draft step per sequence (host part); else draft.sequence",
    OverheadKey.DRAFT_CPU_CATCHUP.value: "as draft.catchup, for the host part (else draft.catchup)",
    OverheadKey.DRAFT_EAGLE_STEP.value: ("per draft step of an EAGLE head's device part, its first layer included (the "
                                         "fusion of embedding and feature, no norm before it); a spec without the "
                                         "draft.eagle.* keys costs a head as a draft model of its layers"),
    OverheadKey.DRAFT_EAGLE_SEQUENCE.value: "per draft step per sequence of an EAGLE head's device part",
    OverheadKey.DRAFT_EAGLE_CATCHUP.value: "as draft.catchup, for an EAGLE head's device part",
    OverheadKey.DRAFT_CPU_EAGLE_STEP.value: "as draft.eagle.step, for the host part (else draft.eagle.step)",
    OverheadKey.DRAFT_CPU_EAGLE_SEQUENCE.value: "as draft.eagle.sequence, for the host part (else draft.eagle.sequence)",
    OverheadKey.DRAFT_CPU_EAGLE_CATCHUP.value: "as draft.eagle.catchup, for the host part (else draft.eagle.catchup)",
    OverheadKey.PREFILL.value: ("per prefill pass, outside the target's stages (the pass's layout and inputs, the KV "
                                "commit, the first tokens' choice); this and the prefill keys below are fitted to the "
                                "engine's own prefill passes (runtime/calibrate/prefill.py): what a pass of thousands of "
                                "tokens costs past the roofline and the decode-fitted terms"),
    OverheadKey.PREFILL_TOKEN.value: ("per prompt token per target layer of a prefill pass, outside the target's stages; a "
                                      "spec fitted before the per-stage prefill keys holds the whole prefill's miss here"),
    OverheadKey.PREFILL_PRE_ATTN.value: "per target layer per prefill pass, in target.pre_attn",
    OverheadKey.PREFILL_PRE_ATTN_TOKEN.value: ("per prompt token per target layer of a prefill pass, in target.pre_attn "
                                               "(rotary and norms over [T, H], first touches of activations that size)"),
    OverheadKey.PREFILL_ATTENTION.value: "per target layer per prefill pass, in target.attention (causal, ragged)",
    OverheadKey.PREFILL_ATTENTION_TOKEN.value: "per prompt token per target layer of a prefill pass, in target.attention",
    OverheadKey.PREFILL_POST_ATTN.value: "per target layer per prefill pass, in target.post_attn (o-proj, router)",
    OverheadKey.PREFILL_POST_ATTN_TOKEN.value: ("per prompt token per target layer of a prefill pass, in target.post_attn, "
                                                "in place of target.post_attn.token"),
    OverheadKey.PREFILL_MOE.value: "per target layer per prefill pass, in target.moe",
    OverheadKey.PREFILL_MOE_TOKEN.value: ("per prompt token per target layer of a prefill pass, in target.moe (silu_mul, "
                                          "permutation and combine over [T*K, F]), in place of target.moe.token"),
    OverheadKey.PREFILL_LM_HEAD.value: "per prefill pass, in target.lm_head (not per layer)",
    OverheadKey.PREFILL_LM_HEAD_TOKEN.value: ("per prompt token of a prefill pass, in target.lm_head (not per layer): "
                                              "picking the last tokens out of the pass's [T, H] rows and, with an "
                                              "EAGLE head, norming all of them for it"),
    OverheadKey.PREFILL_DRAFT.value: ("per draft layer per prefill pass, in a draft model's own prefill (its KV filled, no "
                                      "logits; draft.gpu of the prefill), past a draft step's fixed costs"),
    OverheadKey.PREFILL_DRAFT_TOKEN.value: "per prompt token per draft layer of a draft model's own prefill",
    OverheadKey.PREFILL_DRAFT_EAGLE.value: ("as prefill.draft, for an EAGLE head (its fc and its layer; a spec without "
                                            "the prefill.draft.eagle keys costs a head with the prefill.draft ones)"),
    OverheadKey.PREFILL_DRAFT_EAGLE_TOKEN.value: "as prefill.draft.token, for an EAGLE head",
}

# The prefill keys of each target stage and of the rest of the pass: (per pass, per prompt token), each per
# target layer as PREFILL_PART_PER_LAYER says, added by FixedCosts.prefill_parts and fitted by
# runtime/calibrate/prefill.py.
PREFILL_PART_KEYS: dict[str, tuple[OverheadKey, OverheadKey]] = {
    Stage.TARGET_PRE_ATTN.value: (OverheadKey.PREFILL_PRE_ATTN, OverheadKey.PREFILL_PRE_ATTN_TOKEN),
    Stage.TARGET_ATTENTION.value: (OverheadKey.PREFILL_ATTENTION, OverheadKey.PREFILL_ATTENTION_TOKEN),
    Stage.TARGET_POST_ATTN.value: (OverheadKey.PREFILL_POST_ATTN, OverheadKey.PREFILL_POST_ATTN_TOKEN),
    Stage.TARGET_MOE.value: (OverheadKey.PREFILL_MOE, OverheadKey.PREFILL_MOE_TOKEN),
    Stage.TARGET_LM_HEAD.value: (OverheadKey.PREFILL_LM_HEAD, OverheadKey.PREFILL_LM_HEAD_TOKEN),
    "other": (OverheadKey.PREFILL, OverheadKey.PREFILL_TOKEN),
}
# Whether a part's (per-pass, per-token) prefill keys count once per target layer: the layers' stages both, the
# rest outside them its per-token key only, the LM head (once a pass) neither.
PREFILL_PART_PER_LAYER: dict[str, tuple[bool, bool]] = {
    **{part: (True, True) for part in PREFILL_PART_KEYS},
    Stage.TARGET_LM_HEAD.value: (False, False),
    "other": (False, True),
}

# The prefill keys of the draft's own prefill pass, a draft model's (False) and an EAGLE head's (True): (per draft
# layer per pass, per prompt token per draft layer), added by FixedCosts.prefill_parts to its "draft" part and
# fitted by runtime/calibrate/prefill.py.
PREFILL_DRAFT_KEYS: dict[bool, tuple[OverheadKey, OverheadKey]] = {
    False: (OverheadKey.PREFILL_DRAFT, OverheadKey.PREFILL_DRAFT_TOKEN),
    True: (OverheadKey.PREFILL_DRAFT_EAGLE, OverheadKey.PREFILL_DRAFT_EAGLE_TOKEN),
}

# A draft part's keys: (step, layer, sequence, catchup) of a draft model's device and host parts, and
# (step, sequence, catchup) of an EAGLE head's, whose step holds its first layer.
DRAFT_PART_KEYS: dict[bool, tuple[OverheadKey, ...]] = {
    True: (OverheadKey.DRAFT_STEP, OverheadKey.DRAFT_LAYER, OverheadKey.DRAFT_SEQUENCE, OverheadKey.DRAFT_CATCHUP),
    False: (OverheadKey.DRAFT_CPU_STEP, OverheadKey.DRAFT_CPU_LAYER, OverheadKey.DRAFT_CPU_SEQUENCE,
            OverheadKey.DRAFT_CPU_CATCHUP),
}
EAGLE_PART_KEYS: dict[bool, tuple[OverheadKey, ...]] = {
    True: (OverheadKey.DRAFT_EAGLE_STEP, OverheadKey.DRAFT_EAGLE_SEQUENCE, OverheadKey.DRAFT_EAGLE_CATCHUP),
    False: (OverheadKey.DRAFT_CPU_EAGLE_STEP, OverheadKey.DRAFT_CPU_EAGLE_SEQUENCE, OverheadKey.DRAFT_CPU_EAGLE_CATCHUP),
}

# A host-part draft key a spec lacks costs what its device-part key does (specs calibrated before the
# calibration timed draft.cpu have only those).
DRAFT_CPU_FALLBACK: dict[str, str] = {
    OverheadKey.DRAFT_CPU_STEP.value: OverheadKey.DRAFT_STEP.value,
    OverheadKey.DRAFT_CPU_LAYER.value: OverheadKey.DRAFT_LAYER.value,
    OverheadKey.DRAFT_CPU_SEQUENCE.value: OverheadKey.DRAFT_SEQUENCE.value,
    OverheadKey.DRAFT_CPU_CATCHUP.value: OverheadKey.DRAFT_CATCHUP.value,
    OverheadKey.DRAFT_CPU_EAGLE_STEP.value: OverheadKey.DRAFT_EAGLE_STEP.value,
    OverheadKey.DRAFT_CPU_EAGLE_SEQUENCE.value: OverheadKey.DRAFT_EAGLE_SEQUENCE.value,
    OverheadKey.DRAFT_CPU_EAGLE_CATCHUP.value: OverheadKey.DRAFT_EAGLE_CATCHUP.value,
}

# Torch function calls the engine makes per invocation of each key (fp32 on a CPU device, the tiny
# Mixtral target, Llama drafts of 1 and 2 layers), counted by `specmoe calibrate` with a
# TorchFunctionMode inside the engine's stage brackets and solved per key over its configurations
# (runtime/calibrate/overhead.py; spec details `ops_per_invocation`, 2026-11-28). Per-sequence keys
# have none (their cost is Python per sequence).
OPS_PER_INVOCATION: dict[str, float] = {
    OverheadKey.PRE_ATTN.value: 36.0,
    OverheadKey.ATTENTION.value: 61.5,
    OverheadKey.ATTENTION_GPU.value: 63.5,
    OverheadKey.POST_ATTN.value: 20.0,
    OverheadKey.MOE.value: 87.5,
    OverheadKey.MOE_EXPERT.value: 24.0,    # the per-expert GEMM chain (a GPU); on host memory the engine groups
                                           # every expert in two GEMMs, whose per-expert cost calibration fits
    OverheadKey.H2D.value: 1.0,            # one copy per streamed expert (issued outside the stage brackets)
    OverheadKey.LM_HEAD.value: 11.0,
    OverheadKey.ACCEPT.value: 38.0,
    OverheadKey.DRAFT_STEP.value: 39.0,
    OverheadKey.DRAFT_LAYER.value: 180.0,
    OverheadKey.DRAFT_CATCHUP.value: 30.0,
}


@dataclass(frozen=True)
class Overheads:
    """Seconds per unit of each key (see OVERHEAD_KEYS); `get` falls back to the device-part key for a
    host-part draft key (DRAFT_CPU_FALLBACK), else to op x ops per invocation."""

    op_s: float = 0.0
    table_s: dict[str, float] = field(default_factory=dict)

    def get(self, key: str) -> float:
        if key in self.table_s:
            return self.table_s[key]
        if key in DRAFT_CPU_FALLBACK:
            return self.get(DRAFT_CPU_FALLBACK[key])
        return self.op_s * OPS_PER_INVOCATION.get(key, 0.0)

    def has(self, key: str) -> bool:
        """Whether the spec gives the key (or the device-part key a host-part key falls back to) a value."""
        return key in self.table_s or (key in DRAFT_CPU_FALLBACK and DRAFT_CPU_FALLBACK[key] in self.table_s)

    @property
    def any(self) -> bool:
        return self.op_s > 0 or any(v > 0 for v in self.table_s.values())

    @classmethod
    def from_measured(cls, op_overhead_us: float | None, stage_overhead_us: dict[str, float] | None) -> "Overheads":
        return cls(op_s=(op_overhead_us or 0.0) * US,
                   table_s={k: float(v) * US for k, v in (stage_overhead_us or {}).items()})


def parse_op_overhead_us(v: Any, field_name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise SpecError(field_name, f"must be a number of microseconds, got {v!r}", "e.g. `op_overhead_us: 12.5`")
    if not v > 0:
        raise SpecError(field_name, f"must be positive, got {v}", "give the fixed cost of one operation in us, or remove it")
    return float(v)


def parse_stage_overhead_us(m: Any, field_name: str) -> dict[str, float]:
    """The `stage_overhead_us` mapping: known keys, numbers >= 0 (a fitted term may be 0)."""
    if not isinstance(m, dict):
        raise SpecError(field_name, f"must be a mapping of key to microseconds, got {type(m).__name__}",
                        "e.g. `stage_overhead_us: {target.pre_attn: 180, target.moe: 250}`")
    out = {}
    for k, v in m.items():
        if str(k) not in OVERHEAD_KEYS:
            raise SpecError(f"{field_name}.{k}", "is not a known key",
                            f"use some of: {', '.join(OVERHEAD_KEYS)}")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
            raise SpecError(f"{field_name}.{k}", f"must be a number of microseconds, got {v!r}", "fix the value")
        if v < 0:
            raise SpecError(f"{field_name}.{k}", f"must be >= 0, got {v}", "fixed costs cannot be negative")
        out[str(k)] = float(v)
    return out
