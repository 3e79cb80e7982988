"""The one vocabulary of stages shared by the cost model, the simulator, the engine and the report.

The cost model predicts, and the engine times, these named stages of one decode iteration
(see DESIGN.md, "One vocabulary for stages"). Use the enum members or their string values;
never spell a stage name by hand elsewhere.
"""
from __future__ import annotations

from enum import Enum


class Stage(str, Enum):
    TARGET_PRE_ATTN = "target.pre_attn"      # GPU: norm + QKV projection of the micro-batch
    TARGET_ATTENTION = "target.attention"    # CPU: verify attention of (k+1) queries over the CPU KV cache
    TARGET_POST_ATTN = "target.post_attn"    # GPU: output projection, router, shared experts
    TARGET_MOE = "target.moe"                # GPU: routed experts over the tokens of all micro-batches
    TARGET_H2D = "target.h2d"                # PCIe: streaming the layer's non-resident experts
    TARGET_LM_HEAD = "target.lm_head"        # GPU: final norm + vocabulary projection
    DRAFT_GPU = "draft.gpu"                  # GPU: draft steps for sequences whose draft KV is on GPU
    DRAFT_CPU = "draft.cpu"                  # CPU (attention) + GPU (FFN): the other sequences' draft steps
    VERIFY_ACCEPT = "verify.accept"          # accept/reject drafts, roll back KV
    ITERATION = "iteration"                  # wall time of one full decode iteration
    PREFILL = "prefill"                      # prompt processing before the first decode iteration

    def __str__(self) -> str:  # so f"{Stage.TARGET_MOE}" prints "target.moe"
        return self.value


# Stages that make up one decode iteration (everything but the two totals).
ITERATION_PARTS: tuple[Stage, ...] = (
    Stage.TARGET_PRE_ATTN,
    Stage.TARGET_ATTENTION,
    Stage.TARGET_POST_ATTN,
    Stage.TARGET_MOE,
    Stage.TARGET_H2D,
    Stage.TARGET_LM_HEAD,
    Stage.DRAFT_GPU,
    Stage.DRAFT_CPU,
    Stage.VERIFY_ACCEPT,
)

ALL_STAGES: tuple[Stage, ...] = tuple(Stage)
STAGE_NAMES: tuple[str, ...] = tuple(s.value for s in Stage)

# The resource each stage occupies in the simulator (DRAFT_CPU uses both CPU and GPU;
# its CPU share is the attention, listed here as its bottleneck resource).
STAGE_RESOURCE: dict[Stage, str] = {
    Stage.TARGET_PRE_ATTN: "gpu",
    Stage.TARGET_ATTENTION: "cpu",
    Stage.TARGET_POST_ATTN: "gpu",
    Stage.TARGET_MOE: "gpu",
    Stage.TARGET_H2D: "pcie",
    Stage.TARGET_LM_HEAD: "gpu",
    Stage.DRAFT_GPU: "gpu",
    Stage.DRAFT_CPU: "cpu",
    Stage.VERIFY_ACCEPT: "gpu",
}


def parse_stage(name: str) -> Stage:
    """Stage from its string name, with a clear error listing the valid names."""
    try:
        return Stage(name)
    except ValueError:
        raise ValueError(
            f"unknown stage {name!r}; valid stage names: {', '.join(STAGE_NAMES)}"
        ) from None
