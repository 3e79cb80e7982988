"""Which bundled draft the demo runs (runtime/demo.py, steps 2 and 3): the draft model models/tiny-draft
or the EAGLE head models/tiny-eagle, whichever the planner predicts faster for the job.

Each draft present is profiled (its acc(k)) and planned for the same job; the plan each would run (its
best speculative plan when the planner's best has k = 0: the demo measures speculation) is compared
by its predicted decode tokens/s (the job's, with the batch draining at its end), and one line names
the choice, both predictions and what each draft costs per step as the planner prices it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
DRAFT_DIR = REPO / "models" / "tiny-draft"
EAGLE_DIR = REPO / "models" / "tiny-eagle"
BUNDLED_DRAFTS = (DRAFT_DIR, EAGLE_DIR)


@dataclass
class DraftChoice:
    name: str
    kind: str                       # "draft model" or "EAGLE head"
    acc_path: Path
    plan: Any                       # planner.Plan
    plan_path: Path
    k0_pred: float | None
    planner_k: int
    candidates: dict[str, float] = field(default_factory=dict)   # draft -> predicted decode tokens/s


def draft_kind(draft_dir: Path) -> str:
    from specmoe.planner.model_spec import ModelSpec

    return "EAGLE head" if ModelSpec.from_hf_config(draft_dir).eagle else "draft model"


def step_flops_per_token(draft_dir: Path) -> float:
    """FLOPs of one draft step per token as the planner prices it (2 x the weights a token multiplies
    through: an EAGLE head's fc, layer and the target's LM head; a draft model's layers and LM head)."""
    from specmoe.planner.cost_terms import matmul_elems_per_token
    from specmoe.planner.model_spec import ModelSpec

    return 2.0 * matmul_elems_per_token(ModelSpec.from_hf_config(draft_dir))


def choose_draft(job, spec, batch: int | None, dev, dtype: str, profile_fn: Callable, plan_fn: Callable,
                 drafts: tuple[Path, ...] = BUNDLED_DRAFTS) -> DraftChoice:
    """Profile and plan the job with each bundled draft present (profile_fn, plan_fn: the demo's
    profile_pair and plan_demo), keep the one the planner predicts faster, set it as job.draft_dir and
    write its plan to plan.json -> the choice."""
    present = [d for d in drafts if (d / "config.json").is_file()]
    best: DraftChoice | None = None
    candidates: dict[str, float] = {}
    profiles = {d: profile_fn(job, dev, dtype, draft_dir=d) for d in present}     # step 2 for each, then step 3
    for d in present:
        profile, acc_path = profiles[d]
        plan, plan_path, k0_pred, planner_k = plan_fn(job, spec, profile, batch, dev, dtype, draft_dir=d)
        tps = float(plan.predicted.decode_tokens_per_s)
        candidates[d.name] = tps
        if best is None or tps > candidates[best.name]:
            best = DraftChoice(d.name, draft_kind(d), acc_path, plan, plan_path, k0_pred, planner_k)
    assert best is not None, "no bundled draft"       # demo._check_inputs refuses a missing tiny-draft first
    best.candidates = candidates
    job.draft_dir = next(d for d in present if d.name == best.name)
    best.plan.to_json(best.plan_path)                  # the chosen draft's plan is the one run
    others = [f"{d.name} ({draft_kind(d)}, {candidates[d.name]:.0f} tok/s, {step_flops_per_token(d) / 1e6:.2f} "
              "MFLOP per token per draft step)" for d in present if d.name != best.name]
    job.log(f"demo [3/5] draft: running {best.name} ({best.kind}, k = {best.plan.draft_len}): the planner predicts "
            f"{candidates[best.name]:.0f} tok/s for this job with it, {step_flops_per_token(job.draft_dir) / 1e6:.2f} "
            "MFLOP per token per draft step" + (f"; against {', '.join(others)}" if others else ""))
    return best
