"""How the engine executes an iteration: the part of the plan that changes time without changing
what is computed. The planner chooses it (or the user fixes it at plan time), costs the plan with it,
and the engine runs exactly it; a run-time change makes a new plan.

  expert_streaming  "next": the next layer's experts stream while this one computes (and the first
                    layers' during the draft phase); "predict": only the experts the router is
                    expected to pick stream ahead; "off": the touched experts copy after routing
  pre_post          "per_layer": norm/QKV and o-proj/router run once per layer over the whole batch
                    (the engine does this when it streams ahead); "per_micro_batch": once per micro-batch,
                    so one micro-batch's GPU work overlaps another's CPU attention
  moe               "per_layer": the routed experts of all micro-batches run together (the engine always
                    does); "per_micro_batch" is a what-if the cost model can price, not one the engine runs
  overlap_draft     one micro-batch's draft steps overlap another's verification (a what-if; the engine
                    drafts after the whole target pass)
  host_io           attention's transfers for host KV rows when streaming ahead: "direct", "pinned"
                    (once per layer through pinned buffers) or "zero-copy"
  cpu_threads       torch's intra-op threads (the verify kernel's OpenMP threads too)

`sim_options()` is what the cost model and the simulator take from it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from specmoe.planner.errors import SpecError

STREAMING = ("next", "predict", "off")
GROUPING = ("per_layer", "per_micro_batch")
HOST_IO = ("direct", "pinned", "zero-copy")


@dataclass(frozen=True)
class Schedule:
    expert_streaming: str = "off"
    pre_post: str = "per_micro_batch"
    moe: str = "per_layer"
    overlap_draft: bool = False
    host_io: str = "direct"
    cpu_threads: int = 1

    def __post_init__(self):
        for name, allowed in (("expert_streaming", STREAMING), ("pre_post", GROUPING), ("moe", GROUPING),
                              ("host_io", HOST_IO)):
            if getattr(self, name) not in allowed:
                raise SpecError(f"schedule.{name}", f"{getattr(self, name)!r} is not one of {', '.join(allowed)}",
                                "re-plan, or give one of those")
        if not isinstance(self.overlap_draft, bool):
            raise SpecError("schedule.overlap_draft", f"must be true or false, got {self.overlap_draft!r}",
                            "re-plan")
        t = self.cpu_threads
        if isinstance(t, bool) or not isinstance(t, int) or t < 1:
            raise SpecError("schedule.cpu_threads", f"must be a positive integer, got {t!r}", "e.g. 16")

    def sim_options(self) -> dict[str, bool]:
        """The cost model's and the simulator's options for this schedule."""
        return {"prefetch": self.expert_streaming == "next", "batched_layer": self.pre_post == "per_layer",
                "batched_moe": self.moe == "per_layer", "overlap_draft": self.overlap_draft}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> "Schedule":
        if not isinstance(d, dict):
            raise SpecError("schedule", f"must be a mapping, got {type(d).__name__}", "re-run `specmoe plan`")
        known = {f.name for f in fields(cls)}
        extra = sorted(set(d) - known)
        if extra:
            raise SpecError(f"schedule.{extra[0]}", "unknown field", f"known fields: {', '.join(sorted(known))}")
        return cls(**d)

    def with_changes(self, **changes: Any) -> "Schedule":
        """A copy with the given fields changed (None leaves a field as it is)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def default_schedule(hw) -> Schedule:
    """The engine's schedule on this hardware: on a GPU it streams the next layer's experts ahead, runs
    pre/post attention per layer and moves attention's transfers through pinned buffers; where the CPU
    stands in for the GPU every copy is synchronous, so nothing streams ahead. Threads: those the
    spec's curves were measured with, else one per core."""
    threads = hw.measured.threads or hw.cpu.cores
    if hw.gpu.shares_host_cpu:
        return Schedule(expert_streaming="off", pre_post="per_micro_batch", host_io="direct", cpu_threads=threads)
    return Schedule(expert_streaming="next", pre_post="per_layer", host_io="pinned", cpu_threads=threads)
