"""RunRecord: what the engine measured, the only thing the report takes from the engine (JSON).

Stage times use the names of planner/stages.py. `stages` holds, for every stage of a decode
iteration and for `iteration` itself, the mean measured seconds per decode iteration; for
`prefill`, the total prefill seconds of the run (prompts are prefilled when they enter the batch).
`stage_totals_s` holds the totals of every stage over the run.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from specmoe.planner.atomic_file import atomic_write_text
from specmoe.planner.stages import ITERATION_PARTS, STAGE_NAMES, STAGE_RESOURCE, Stage

_RESOURCE = {s.value: r for s, r in STAGE_RESOURCE.items()}

RUN_RECORD_VERSION = 1


class StageTimer:
    """Accumulates wall seconds per stage into the current phase ("decode" or "prefill").

    With `profile` on a CUDA device every stage is bracketed by a synchronisation of the compute
    stream (not the device: expert copies on the copy stream keep running across stage boundaries,
    and a stage that waits for them, target.moe, shows the wait) so the time is the stage's own;
    without it GPU stages measure only their launch (the CPU is synchronous). `counters` hold
    per-phase sums other than seconds (e.g. "h2d_bytes", finished expert copies).
    """

    def __init__(self, device: torch.device | None = None, profile: bool = False):
        self.sync = bool(profile and device is not None and device.type == "cuda")
        self.device = device
        self.totals: dict[str, dict[str, float]] = {"decode": {}, "prefill": {}}
        self.counters: dict[str, dict[str, int]] = {"decode": {}, "prefill": {}}
        self.phase = "decode"
        self.events: list[dict] | None = None     # while recording: one {stage, resource, start_s, end_s} per stage
        self._origin = 0.0

    def _sync(self) -> None:
        torch.cuda.current_stream(self.device).synchronize()

    @contextmanager
    def stage(self, stage: Stage | str):
        if self.sync:
            self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                self._sync()
            t1 = time.perf_counter()
            self.add(stage, t1 - t0)
            if self.events is not None:
                name = str(stage)
                self.events.append({"stage": name, "resource": _RESOURCE.get(name, "cpu"), "layer": -1,
                                    "micro_batch": -1, "start_s": t0 - self._origin, "end_s": t1 - self._origin})

    def start_events(self) -> None:
        """Record every stage from now on as a timeline event, times relative to now."""
        self.events, self._origin = [], time.perf_counter()

    def take_events(self) -> list[dict]:
        """The events recorded since start_events(); recording stops."""
        out, self.events = self.events or [], None
        return out

    def count(self, name: str, value: int, phase: str | None = None) -> None:
        d = self.counters[phase or self.phase]
        d[name] = d.get(name, 0) + int(value)

    def add_h2d(self, by_phase: dict[str, tuple[int, float]]) -> None:
        """ExpertStore.take_h2d()'s {phase: (bytes, busy s)} -> target.h2d seconds and h2d_bytes, per phase."""
        for phase, (nbytes, secs) in by_phase.items():
            d = self.totals[phase]
            d[Stage.TARGET_H2D.value] = d.get(Stage.TARGET_H2D.value, 0.0) + float(secs)
            self.count("h2d_bytes", nbytes, phase)

    def add(self, stage: Stage | str, seconds: float) -> None:
        name = str(stage)
        d = self.totals[self.phase]
        d[name] = d.get(name, 0.0) + float(seconds)

    @contextmanager
    def in_phase(self, phase: str):
        prev, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = prev


@dataclass
class RunRecord:
    complete: bool
    stages: dict[str, float]                  # stage name -> mean s per decode iteration (prefill: total s)
    stage_totals_s: dict[str, float]          # stage name -> total s over the run
    prefill_stage_totals_s: dict[str, float]  # the target's sub-stages while prefilling (total s)
    iterations: int
    decode_tokens_per_s: float
    end_to_end_tokens_per_s: float
    acceptance_histogram: dict[str, int]      # accepted drafts per verified sequence -> count
    mean_accepted: float
    backends: dict[str, str]
    machine: dict[str, Any]
    git_commit: str
    plan_hashes: dict[str, Any]
    draft_len: int                            # k requested (the plan's or the override)
    batch: int
    micro_batches: int
    h2d_bytes: int
    token_flips: int                          # emitted greedy tokens whose target top-2 logit gap < flip_gap
    flip_gap: float = 1e-4
    error: str | None = None
    sequences: int = 0                        # prompts given
    finished_sequences: int = 0
    generated_tokens: int = 0                 # incl. each sequence's first token (from prefill)
    decode_tokens: int = 0                    # tokens emitted by decode iterations
    prompt_tokens: int = 0
    prefill_time_s: float = 0.0
    decode_time_s: float = 0.0
    total_time_s: float = 0.0
    temperature: float = 0.0
    seed: int = 0
    max_new_tokens: int = 0
    dynamic_k: bool = False
    dynamic_k_source: str = ""
    draft_len_histogram: dict[str, int] = field(default_factory=dict)  # k used per iteration -> count
    acceptance_oracle: float | None = None    # set when a seeded Bernoulli oracle replaced real acceptance
    device: str = "cpu"
    dtype: str = ""
    weights: dict[str, str] = field(default_factory=dict)   # target/draft: checkpoint name or random source
    h2d_experts: int = 0
    h2d_unused_experts: int = 0               # streamed ahead of routing (prefetch) but not used by the pass
    prefetch_next_layer: bool = False         # expert_streaming != "off"
    expert_streaming: str = "off"             # "off" (after routing), "next" (next layer ahead), "predict"
    host_io: str = "direct"                   # attention transfers for host KV rows (runtime.target_model.HOST_IO)
    h2d_decode_bytes: int = 0                 # finished expert copies attributed to decode (with h2d_busy_s)
    h2d_busy_s: float = 0.0                   # copy-stream busy seconds of those copies (CUDA events)
    h2d_GBps: float | None = None             # achieved: h2d_decode_bytes / h2d_busy_s
    h2d_busy_fraction: float | None = None    # h2d_busy_s / decode_time_s
    h2d_prefill_bytes: int = 0
    cache_fill_bytes: int = 0
    draft_kv_gpu_sequences: int = 0
    target_kv_gpu_sequences: int = 0
    expert_cache_slots: list[int] = field(default_factory=list)
    rows: int = 0                             # KV rows allocated: min(plan batch, prompts)
    schedule: dict = field(default_factory=dict)   # the plan's schedule the engine ran (planner/schedule.py)
    replanned: bool = False                   # an override changed the given plan's schedule: a new plan ran
    calibration_warnings: list[str] = field(default_factory=list)   # how the run differed from its calibration
    cached_experts_planned: bool = False      # the cache started with the plan's placement.cached_experts
    experts_rebalanced: bool = False          # re-chosen from the first prefill's routing
    cached_experts: dict[str, list[int]] = field(default_factory=dict)   # MoE layer -> experts held at the end
    profile_stages: bool = False
    # runtime/calibrate/speed_probe.py around the run, against calibration: {calibration_iteration_s, before_s,
    # after_s, ratio (> 1: the machine ran slower than when calibrated)}; None when not probed
    speed_probe: dict | None = None
    live_by_iteration: list[int] = field(default_factory=list)   # sequences in each decode iteration
    iteration_times_s: list[float] = field(default_factory=list)  # wall seconds of each decode iteration
    emitted_by_iteration: list[int] = field(default_factory=list)  # tokens emitted by each decode iteration
    # one decode iteration (the second: warm, the batch still full), stage by stage as the engine ran it:
    # {stage, resource, layer, micro_batch, start_s, end_s}; GPU stages are launch times unless profiled
    timeline: list[dict] = field(default_factory=list)
    # what `vllm bench` users compare (runtime/latency.py): {"ttft_ms"|"tpot_ms"|"itl_ms": {mean, median, p99, n}}
    latency: dict[str, dict[str, float]] = field(default_factory=dict)
    acceptance_by_position: list[float] = field(default_factory=list)   # share accepted at draft position 1..k
    # OpenMP variables, torch's thread counts and the OpenMP runtimes mapped (runtime/thread_env.py)
    thread_env: dict[str, Any] = field(default_factory=dict)
    # memory as measured (runtime/memory_usage.py measured_memory): host RSS at start, load peak, after load,
    # run start and run peak (host_rss_*_bytes); host_by_component and, on a GPU, device_peak_allocated_bytes
    # and device_by_component (bytes); footprint (footprint_weights): the planner's footprint of the run's
    # rows (of the weights alone), its to_dict()
    memory: dict = field(default_factory=dict)
    schema_version: int = RUN_RECORD_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=1, default=str)
        if path is not None:
            atomic_write_text(path, text)
        return text

    @classmethod
    def from_dict(cls, d: dict) -> "RunRecord":
        from specmoe.planner.errors import SpecError

        if not isinstance(d, dict) or "stages" not in d or "complete" not in d:
            raise SpecError("run record", "not a run.json written by `specmoe run`", "give the run.json of a run")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_json(cls, path: str | Path) -> "RunRecord":
        from specmoe.planner.errors import SpecError

        try:
            d = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SpecError("run record", f"cannot read {path}: {e}", "give the run.json of a run") from None
        return cls.from_dict(d)


def stage_summary(timer: StageTimer, iterations: int, prefill_time_s: float) -> tuple[dict, dict, dict]:
    """(stages: mean s per iteration + prefill total, totals, prefill sub-stage totals)."""
    dec = timer.totals["decode"]
    totals = {name: float(dec.get(name, 0.0)) for name in STAGE_NAMES}
    totals[Stage.PREFILL.value] = float(prefill_time_s)
    means = {}
    for s in ITERATION_PARTS + (Stage.ITERATION,):
        means[s.value] = totals[s.value] / iterations if iterations else 0.0
    means[Stage.PREFILL.value] = float(prefill_time_s)
    pre = {k: float(v) for k, v in timer.totals["prefill"].items()}
    return means, totals, pre
