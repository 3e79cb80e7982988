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
from specmoe.planner.memory import default_placement, footprint, max_batch
from specmoe.planner.model_spec import ModelSpec, default_draft_name, load_model
from specmoe.planner.plan import Placement, Prediction
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
    moe_gpu_utilization: float             # routed-expert FLOP rate / GPU peak over the iteration
    source: str                            # peak | measured
    placement: Placement
    prefill_time_s: float = 0.0
    decode_time_s: float = 0.0             # whole run, all decode iterations
    end_to_end_tokens_per_s: float = 0.0   # generated tokens / (prefill + decode)
    run_decode_tokens_per_s: float = 0.0   # generated tokens / decode time of the whole run
    run_groups: list[dict] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    timeline: list[dict] = field(default_factory=list)
    job: dict[str, Any] = field(default_factory=dict)   # a finite job's drain (see Prediction.job); {} for a stream

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
             batched_layer: bool = False,
             timeline: bool = True, run: bool = True, use_measured: bool = True) -> Estimate:
    """Predict one configuration.

    batch: an int, "max" or None (None: workload.batch, else the most that fits).
    draft: needed when draft_len > 0; None then means the default draft of the target (DEFAULT_DRAFTS).
    placement: None gives the default (target KV on the CPU, draft KV on the GPU for as many
      sequences as fit, then as many expert cache slots as fit).
    overlap_draft / prefetch / batched_moe / batched_layer: simulator options (see planner.simulator;
      the engine always batches the MoE, and on a GPU also pre/post attention with prefetch, its
      default streaming-ahead schedule).
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
    if batch is None:
        batch = workload.batch if workload.batch is not None else "max"
    if batch == "max":
        B = max_batch(m, hw, workload, d, k, mb)
    else:
        B = _int_arg(batch, "batch", 1)
    if mb > B:
        raise SpecError("micro_batches", f"{mb} exceeds the batch {B}", f"use at most {B} micro-batches")
    placement_given = placement is not None
    if placement is None:
        placement = default_placement(m, hw, workload, B, k, d, mb)
    elif not isinstance(placement, Placement):
        raise SpecError("placement", f"must be a planner.Placement, got {type(placement).__name__}",
                        "build one with Placement(expert_cache_slots=...)")
    fp = footprint(m, hw, workload, B, k, placement, d, mb)
    if not fp.fits:
        fit = None
        if not fp.fits_cpu:
            try:
                fit = max_batch(m, hw, workload, d, k, mb)
            except SpecError:
                fit = None
        fp.check(batch=B, max_fit=fit, placement_given=placement_given)

    cm = CostModel(m, hw, workload, d, use_measured=use_measured)
    groups = "micro_batch" if overlap_draft else "batch"
    costs = cm.iteration(B, mb, k, placement, batched_moe=batched_moe, draft_groups=groups, batched_layer=batched_layer)
    sim = simulate_iteration(costs, placement, overlap_draft=overlap_draft, prefetch=prefetch, record=timeline)
    it = sim.iteration_time_s
    stages = dict(sim.stages)
    est = Estimate(
        model=m.name, hardware=hw.name, draft=d.name if d is not None else None, batch=B, micro_batches=mb,
        draft_len=k, accepted_per_iteration=workload.acceptance.acc(k) if k else 0.0,
        context_len=costs.context_len, tokens_per_iteration=costs.tokens_per_iteration, iteration_time_s=it,
        decode_tokens_per_s=costs.tokens_per_iteration / it if it > 0 else 0.0,
        closed_form_iteration_s=costs.closed_form_time_s, stages=stages, resource_busy_s=sim.resource_busy_s,
        memory=fp.to_dict(), bound=sim.bound, moe_gpu_utilization=costs.moe_gpu_utilization(it),
        source=costs.source, placement=placement, timeline=sim.timeline,
        options={"overlap_draft": overlap_draft, "prefetch": prefetch, "batched_moe": batched_moe,
                 "batched_layer": batched_layer,
                 "use_measured": use_measured, "acceptance": workload.acceptance.source},
    )
    if run:
        rr = simulate_run(cm, B, mb, k, placement, overlap_draft=overlap_draft, batched_moe=batched_moe,
                          prefetch=prefetch, batched_layer=batched_layer)
        est.prefill_time_s = rr.prefill_time_s
        est.decode_time_s = rr.decode_time_s
        est.end_to_end_tokens_per_s = rr.end_to_end_tokens_per_s
        est.run_decode_tokens_per_s = rr.decode_tokens_per_s
        est.run_groups = rr.groups
        est.stages[Stage.PREFILL.value] = rr.prefill_time_s
    d = drain(workload, B, k)
    if d is not None:
        def at(b: int) -> float:
            if b >= B:
                return it
            pl = live_placement(placement, B, b)
            c = cm.iteration(b, min(mb, b), k, pl, batched_moe=batched_moe, draft_groups=groups,
                             batched_layer=batched_layer)
            return simulate_iteration(c, pl, overlap_draft=overlap_draft, prefetch=prefetch, record=False).iteration_time_s

        est.job = job_summary(d, at_live_batch(at, B, d.mean_live_batch), est.prefill_time_s, workload.gen_len)
    return est
