"""`estimate(...)`: stage times, throughput, memory and the bound resource of one configuration.

The public entry point of the cost model: loads the specs, picks the batch (the most that fits
when none is given) and a default placement, checks memory, evaluates the decode iteration at the
mean context with the event simulator, simulates the whole run (prefill + decode as contexts
grow) and returns an `Estimate`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from specmoe.planner.batch_drain import at_live_batch, drain, job_summary, live_placement
from specmoe.planner.cost_model import CostModel
from specmoe.planner.errors import SpecError
from specmoe.planner.hardware_spec import HardwareSpec, load_hardware
from specmoe.planner.memory import check_context, default_placement, footprint, max_batch
from specmoe.planner.model_spec import ModelSpec, default_draft_name, load_model
from specmoe.planner.plan import Placement, Prediction
from specmoe.planner.schedule import Schedule
from specmoe.planner.simulator import simulate_iteration, simulate_run
from specmoe.planner.stages import Stage
from specmoe.planner.workload import Workload


@dataclass
class Estimate:
    model: str
    hardware: str
    draft: str | None
    batch: int
    micro_batches: int
    draft_len: int
    accepted_per_iteration: float          # acc(k): expected accepted drafts per sequence
    context_len: float                     # mean context the iteration was evaluated at
    tokens_per_iteration: float            # B (acc(k) + 1)
    iteration_time_s: float                # simulated steady-state iteration at the mean context
    decode_tokens_per_s: float             # tokens_per_iteration / iteration_time_s
    closed_form_iteration_s: float         # sum over layers of max(h2d, cpu, gpu) + LM head + accept + draft
    stages: dict[str, float]               # stage name -> busy seconds per iteration, plus "iteration", "prefill"
    resource_busy_s: dict[str, float]      # gpu / cpu / pcie busy seconds per iteration
    memory: dict[str, Any]                 # Footprint.to_dict()
    bound: str                             # gpu | cpu | pcie: the busiest resource in the iteration
    # the paper's MoE GPU utilization (its Sec. 3.3 roofline): a MoE layer's routed-expert compute at the
    # GPU's peak over the time its touched experts take over PCIe (3.1% for Mixtral on the A30 host at k=0)
    moe_gpu_utilization: float
    source: str                            # peak | measured
    placement: Placement
    prefill_time_s: float = 0.0
    decode_time_s: float = 0.0             # whole run, all decode iterations
    end_to_end_tokens_per_s: float = 0.0   # generated tokens / (prefill + decode)
    run_decode_tokens_per_s: float = 0.0   # generated tokens / decode time of the whole run
    run_groups: list[dict] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    timeline: list[dict] = field(default_factory=list)
    moe_gpu_utilization_achieved: float = 0.0   # routed-expert FLOP rate / GPU peak over the simulated iteration
    job: dict[str, Any] = field(default_factory=dict)   # a finite job's drain (see Prediction.job); {} for a stream
    # the prefill by part (planner/prefill.py PrefillParts.to_dict: each target stage's busy seconds, "draft",
    # "other", "total"); {} without the whole run
    prefill_parts: dict[str, float] = field(default_factory=dict)

    def to_dict(self, timeline: bool = True) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("placement", "timeline")}
        d["placement"] = self.placement.to_dict()
        if timeline:
            d["timeline"] = list(self.timeline)
        return d

    def to_prediction(self) -> Prediction:
        """The Plan's `predicted` block (for a finite job, its decode and end-to-end tokens/s are the job's)."""
        job = self.job
        return Prediction(iteration_time_s=self.iteration_time_s,
                          decode_tokens_per_s=job["decode_tokens_per_s"] if job else self.decode_tokens_per_s,
                          stages=dict(self.stages), prefill_time_s=self.prefill_time_s,
                          end_to_end_tokens_per_s=job["end_to_end_tokens_per_s"] if job else self.end_to_end_tokens_per_s,
                          tokens_per_iteration=self.tokens_per_iteration, source=self.source,
                          timeline=list(self.timeline), job={k: v for k, v in job.items()
                                                             if k not in ("decode_tokens_per_s", "end_to_end_tokens_per_s")}
                          | ({"steady_decode_tokens_per_s": self.decode_tokens_per_s} if job else {}))


def _int_arg(v: Any, name: str, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise SpecError(name, f"must be an integer >= {minimum}, got {v!r}", f"give an integer >= {minimum}")
    return v


def estimate(model: str | Path | dict | ModelSpec, hardware: str | Path | HardwareSpec, workload: Workload,
             draft: str | Path | dict | ModelSpec | None = None, draft_len: int = 0, micro_batches: int = 2,
             placement: Placement | None = None, batch: int | str | None = None, *,
             overlap_draft: bool = False, prefetch: bool = False, batched_moe: bool = False,
             batched_layer: bool = False, schedule: Schedule | None = None,
             timeline: bool = True, run: bool = True, use_measured: bool = True) -> Estimate:
    """Predict one configuration.

    batch: an int, "max" or None (None: workload.batch, else the most that fits).
    draft: needed when draft_len > 0; None then means the default draft of the target (DEFAULT_DRAFTS).
    placement: None gives the default (target KV on the CPU, draft KV on the GPU for as many
      sequences as fit, then as many expert cache slots as fit).
    overlap_draft / prefetch / batched_moe / batched_layer: simulator options (see planner.simulator).
    schedule: how the engine runs the iteration (planner/schedule.py); when given, its options replace
      the four above (a plan's prediction is always made with its schedule).
    run: also simulate prefill and the whole run (end-to-end throughput).
    """
    m = load_model(model)
    hw = load_hardware(hardware)
    if not isinstance(workload, Workload):
        raise SpecError("workload", f"must be a planner.Workload, got {type(workload).__name__}",
                        "build one with Workload(prompt_len, gen_len, ...)")
    k = _int_arg(draft_len, "draft_len", 0)
    mb = _int_arg(micro_batches, "micro_batches", 1)
    d = None
    if k > 0:
        d = load_model(draft if draft is not None else default_draft_name(m))
    check_context(m, workload, d)
    B = _batch_size(m, hw, workload, d, k, mb, batch)
    placement_given = placement is not None
    if placement is None:
        placement = default_placement(m, hw, workload, B, k, d, mb)
    elif not isinstance(placement, Placement):
        raise SpecError("placement", f"must be a planner.Placement, got {type(placement).__name__}",
                        "build one with Placement(expert_cache_slots=...)")
    fp = _checked_footprint(m, hw, workload, B, k, placement, d, mb, placement_given)

    if schedule is not None:
        o = schedule.sim_options()
        overlap_draft, prefetch, batched_moe, batched_layer = (o["overlap_draft"], o["prefetch"], o["batched_moe"],
                                                               o["batched_layer"])
    cm = CostModel(m, hw, workload, d, use_measured=use_measured, schedule=schedule)
    sim = _SimOptions(overlap_draft, prefetch, batched_moe, batched_layer)
    est = _steady_state(cm, sim, B, mb, k, placement, fp, timeline)
    if run:
        _add_run(est, cm, sim)
    dr = drain(workload, B, k)
    if dr is not None:
        def at(b: int) -> float:
            if b >= B:
                return est.iteration_time_s
            pl = live_placement(placement, B, b)
            return sim.simulate(sim.costs(cm, b, min(mb, b), k, pl), pl, record=False).iteration_time_s

        est.job = job_summary(dr, at_live_batch(at, B, dr.mean_live_batch), est.prefill_time_s, workload.gen_len)
    return est


def _batch_size(m: ModelSpec, hw: HardwareSpec, workload: Workload, d: ModelSpec | None, k: int, mb: int,
                batch: int | str | None) -> int:
    """The batch: the given one, workload.batch, or (None / "max") the most that fits; at least mb."""
    if batch is None:
        batch = workload.batch if workload.batch is not None else "max"
    if batch == "max":
        B = max_batch(m, hw, workload, d, k, mb)
    else:
        B = _int_arg(batch, "batch", 1)
    if mb > B:
        raise SpecError("micro_batches", f"{mb} exceeds the batch {B}", f"use at most {B} micro-batches")
    return B


def _checked_footprint(m: ModelSpec, hw: HardwareSpec, workload: Workload, B: int, k: int, placement: Placement,
                       d: ModelSpec | None, mb: int, placement_given: bool):
    """The memory footprint; a clear error (with the largest batch that fits the CPU) when it does not fit."""
    fp = footprint(m, hw, workload, B, k, placement, d, mb)
    if not fp.fits:
        fit = None
        if not fp.fits_cpu:
            try:
                fit = max_batch(m, hw, workload, d, k, mb)
            except SpecError:
                fit = None
        fp.check(batch=B, max_fit=fit, placement_given=placement_given)
    return fp


@dataclass(frozen=True)
class _SimOptions:
    """The simulator options of one estimate, passed the same way to every evaluation."""

    overlap_draft: bool
    prefetch: bool
    batched_moe: bool
    batched_layer: bool

    @property
    def draft_groups(self) -> str:
        return "micro_batch" if self.overlap_draft else "batch"

    def costs(self, cm: CostModel, B: int, mb: int, k: int, placement: Placement):
        return cm.iteration(B, mb, k, placement, batched_moe=self.batched_moe, draft_groups=self.draft_groups,
                            batched_layer=self.batched_layer)

    def simulate(self, costs, placement: Placement, record: bool):
        return simulate_iteration(costs, placement, overlap_draft=self.overlap_draft, prefetch=self.prefetch,
                                  record=record)

    def to_dict(self) -> dict[str, bool]:
        return {"overlap_draft": self.overlap_draft, "prefetch": self.prefetch, "batched_moe": self.batched_moe,
                "batched_layer": self.batched_layer}


def _steady_state(cm: CostModel, sim: _SimOptions, B: int, mb: int, k: int, placement: Placement, fp,
                  timeline: bool) -> Estimate:
    """The Estimate of the decode iteration at the mean context, through the event simulator."""
    workload = cm.workload
    costs = sim.costs(cm, B, mb, k, placement)
    s = sim.simulate(costs, placement, record=timeline)
    it = s.iteration_time_s
    return Estimate(
        model=cm.model.name, hardware=cm.hw.name, draft=cm.draft.name if cm.draft is not None else None, batch=B,
        micro_batches=mb, draft_len=k, accepted_per_iteration=workload.acceptance.acc(k) if k else 0.0,
        context_len=costs.context_len, tokens_per_iteration=costs.tokens_per_iteration, iteration_time_s=it,
        decode_tokens_per_s=costs.tokens_per_iteration / it if it > 0 else 0.0,
        closed_form_iteration_s=costs.closed_form_time_s, stages=dict(s.stages), resource_busy_s=s.resource_busy_s,
        memory=fp.to_dict(), bound=s.bound, moe_gpu_utilization=moe_layer_utilization(cm, costs),
        moe_gpu_utilization_achieved=costs.moe_gpu_utilization(it),
        source=costs.source, placement=placement, timeline=s.timeline,
        options={**sim.to_dict(), "use_measured": cm.use_measured, "acceptance": workload.acceptance.source},
    )


def moe_layer_utilization(cm: CostModel, costs) -> float:
    """A MoE layer's routed-expert FLOPs at the GPU's peak over the time its touched experts take over
    PCIe: N n_a 2 (3 h h_e) / P_GPU over touched (3 h h_e w_b) / B_h2d, i.e. n_a N B_h2d / (E P_GPU) for
    a batch that touches every expert (the paper's "theoretical GPU utilization", whatever is cached)."""
    m = cm.model
    if not m.is_moe or cm.gpu_peak <= 0 or costs.touched <= 0:
        return 0.0
    compute_s = 2.0 * m.expert_elems * m.top_k * costs.tokens / cm.gpu_peak
    stream_s = costs.touched * cm.expert_bytes / cm.h2d_Bps
    return compute_s / stream_s


def _add_run(est: Estimate, cm: CostModel, sim: _SimOptions) -> None:
    """Prefill and the whole run (decode as contexts grow): end-to-end throughput."""
    rr = simulate_run(cm, est.batch, est.micro_batches, est.draft_len, est.placement, overlap_draft=sim.overlap_draft,
                      batched_moe=sim.batched_moe, prefetch=sim.prefetch, batched_layer=sim.batched_layer)
    est.prefill_time_s = rr.prefill_time_s
    est.prefill_parts = rr.prefill_parts
    est.decode_time_s = rr.decode_time_s
    est.end_to_end_tokens_per_s = rr.end_to_end_tokens_per_s
    est.run_decode_tokens_per_s = rr.decode_tokens_per_s
    est.run_groups = rr.groups
    est.stages[Stage.PREFILL.value] = rr.prefill_time_s
