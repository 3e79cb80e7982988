"""The arguments of one optimizer search (planner/optimizer.py), checked before any work: the
objective and its throughput floor, routing statistics, the enumerated axes, the draft model and the
variants; and `raise_infeasible`, the one clear error when no point of the search fits.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from specmoe.planner import milp
from specmoe.planner.cost_model import CostModel
from specmoe.planner.errors import InfeasibleError, SpecError
from specmoe.planner.memory import Footprint, footprint
from specmoe.planner.model_spec import ModelSpec, default_draft_name, load_model
from specmoe.planner.plan import Placement
from specmoe.planner.search.batches import batch_limit
from specmoe.planner.search.state import Search
from specmoe.planner.workload import Workload

OBJECTIVES = ("throughput", "latency")
PER_LAYER_X_MAX_LAYERS = 8          # at most this many MoE layers: x_l per layer by default


def check_objective(workload, objective: str, min_throughput) -> None:
    """The workload's type, the objective's name and the throughput floor (latency objective only)."""
    if not isinstance(workload, Workload):
        raise SpecError("workload", f"must be a planner.Workload, got {type(workload).__name__}",
                        "build one with Workload(prompt_len, gen_len, ...)")
    if objective not in OBJECTIVES:
        raise SpecError("objective", f"unknown objective {objective!r}", "throughput or latency")
    if min_throughput is not None:
        if isinstance(min_throughput, bool) or not isinstance(min_throughput, (int, float)) or not min_throughput > 0:
            raise SpecError("min_throughput", f"must be a positive number of tokens/s, got {min_throughput!r}",
                            "give e.g. 100, or leave it out")
        if objective != "latency":
            raise SpecError("min_throughput", "only applies to the latency objective", "add --objective latency")


def pick_draft(model: ModelSpec, draft, ks: list[int]) -> tuple[ModelSpec | None, list[int]]:
    """The draft model and the draft lengths to enumerate: draft None is the target's default draft
    when it has one, False none; without a draft only k = 0 remains (an error when it is not allowed)."""
    d = None
    if draft is not False and any(k > 0 for k in ks):
        if draft is None:
            try:
                d = load_model(default_draft_name(model))
            except SpecError:
                d = None
        else:
            d = load_model(draft)
    if d is None:
        if 0 not in ks:
            raise SpecError("draft", "no draft model for speculation and k = 0 is not among the draft lengths",
                            "give a draft model or allow draft length 0")
        ks = [0]
    return d, ks


def check_stats(routing_stats, model: ModelSpec) -> np.ndarray | None:
    """Routing statistics as [layers, experts] shares that sum to 1 on every MoE layer (None stays None)."""
    if routing_stats is None:
        return None
    try:
        a = np.asarray(routing_stats, dtype=float)
    except (TypeError, ValueError):
        raise SpecError("routing_stats", "is not a numeric [layers, experts] array", "give expert-hit counts or shares") from None
    want = (model.num_layers, model.num_experts)
    if a.shape != want:
        raise SpecError("routing_stats", f"has shape {a.shape}, the model needs {want} (layers, experts)",
                        "give one row per layer (dense layers may be zeros) and one column per expert")
    if not np.all(np.isfinite(a)) or np.any(a < 0):
        raise SpecError("routing_stats", "has negative or non-finite entries", "give non-negative hit counts")
    out = np.zeros_like(a)
    for l in model.moe_layers:
        tot = a[l].sum()
        if tot <= 0:
            raise SpecError(f"routing_stats[{l}]", "is all zero on a MoE layer", "give that layer's expert-hit counts")
        out[l] = a[l] / tot
    return out


def search_variants(model: ModelSpec, cpu_expert_mode: str, gpu_attention: bool, target_kv_gpu: bool) -> list[milp.Variant]:
    """The variants enumerated: where cold experts run (streamed, on the CPU, or chosen per layer: by
    default per layer for models with at most PER_LAYER_X_MAX_LAYERS MoE layers, else the two uniform
    modes) times where the verify attention of CPU-KV sequences runs (CPU, or also the GPU when allowed)."""
    n_moe = len(model.moe_layers) if model.is_moe else 0
    if cpu_expert_mode not in ("auto", "uniform", "per_layer", "off"):
        raise SpecError("cpu_expert_mode", f"unknown mode {cpu_expert_mode!r}", "one of auto, uniform, per_layer, off")
    if n_moe == 0 or cpu_expert_mode == "off":
        modes = ["stream"]
    elif cpu_expert_mode == "per_layer" or (cpu_expert_mode == "auto" and n_moe <= PER_LAYER_X_MAX_LAYERS):
        modes = ["per_layer"]
    else:
        modes = ["stream", "cpu"]
    ys = [False, True] if gpu_attention else [False]
    return [milp.Variant(x_mode=x, gpu_attention=y, target_kv_gpu=target_kv_gpu) for x in modes for y in ys]


def int_list(vals: Iterable, name: str, minimum: int) -> list[int]:
    """The sorted distinct integers of an axis, each at least `minimum`, or a SpecError naming it."""
    try:
        out = sorted({int(v) for v in vals})
    except (TypeError, ValueError):
        raise SpecError(name, f"must be integers, got {vals!r}", f"give integers >= {minimum}") from None
    if not out or out[0] < minimum:
        raise SpecError(name, f"must be non-empty integers >= {minimum}, got {out}", f"give integers >= {minimum}")
    return out


def raise_infeasible(cm: CostModel, wl: Workload, ks, mbs, variants, S: Search) -> None:
    """No point is feasible: name the constraint that fails at the smallest configuration, and by how much."""
    if S.floor:
        raise InfeasibleError("min_throughput", f"no configuration reaches {S.floor:g} tokens/s",
                              "lower --min-throughput or use --objective throughput to see the best achievable")
    m = cm.model
    B = wl.batch or 1
    free_x = any(v.x_mode != "stream" for v in variants)
    cpu_layers = tuple(m.moe_layers) if free_x else ()
    pl = Placement(expert_cache_slots=(0,) * m.num_layers, cpu_expert_layers=cpu_layers)
    fp: Footprint = footprint(m, cm.hw, wl, B, 0, pl, None, 1)
    fit = None
    if wl.batch is not None and not fp.fits_cpu:
        fit = max([batch_limit(cm, 0, 1, "cpu" if free_x else "stream")] + [0]) or None
    fp.check(batch=B, max_fit=fit)
    # memory fits at the smallest configuration: the KV of `B` sequences is what does not
    if wl.batch is not None:
        raise InfeasibleError("batch", f"no placement fits batch {B} with draft lengths {ks} and micro-batches {mbs}",
                              "lower the batch (or --batch max), shorten the prompt/output, or give more memory")
    raise InfeasibleError("memory", "no configuration fits although the smallest one's weights do "
                          f"(GPU {fp.gpu_fraction:.0%} / CPU {fp.cpu_fraction:.0%} usable)",
                          "shorten the prompt/output or give more memory")
