"""The Plan: the only thing the engine takes from the planner. Frozen, with a versioned JSON round-trip.

A plan carries its inputs (model, draft, hardware, workload) with content hashes, every decision,
the predicted per-stage times under the design's stage names, the memory footprint, the bound
resource and the frontier it beat. Written by planner.optimizer.optimize (`specmoe plan`):

  frontier      {"by_k": [{draft_len, decode_tokens_per_s, closed_form_tokens_per_s, feasible,
                 iteration_time_s, per_token_latency_s, variant, optimality_gap}, ...],
                 "by_batch": [{batch, ...the same...}, ...]}: the best plan at each draft length
                 (chosen B and m) and at each batch candidate (chosen k and m)
  alternatives  next-best distinct (batch, micro_batches, draft_len): {batch, micro_batches, draft_len,
                 variant, decode_tokens_per_s, closed_form_tokens_per_s, iteration_time_s,
                 per_token_latency_s, relative_to_chosen, differs, placement}
  solver        {name, status, objective, time_s, milps, statuses, points, pruned_by_bound,
                 batch_candidates, refined_batch, closed_form_iteration_s, closed_form_tokens_per_s,
                 closed_form_check_rel_err, routing_stats(_sha256), ...}
decode_tokens_per_s values come from the event simulator; closed_form_* from the cost model's closed
form, which is what the optimizer maximises.
"""
from __future__ import annotations

import hashlib
import json
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from specmoe.planner.atomic_file import atomic_write_text
from specmoe.planner.errors import SpecError, check_known_keys
from specmoe.planner.schedule import Schedule, default_schedule
from specmoe.planner.stages import STAGE_NAMES

# 2: the plan carries the schedule the engine runs (planner/schedule.py)
SCHEMA_VERSION = 2


def content_hash(obj: Any) -> str:
    """sha256 of the object as JSON. Canonicalised through a JSON round trip first, so that a mapping
    with integer keys (measured curves in hardware specs) hashes the same before and after plan.json."""
    canon = json.loads(json.dumps(obj, default=str))
    return hashlib.sha256(json.dumps(canon, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Placement:
    """Where things live. Layers are indexed 0..num_layers-1 of the target."""

    expert_cache_slots: tuple[int, ...]      # per layer: routed experts resident on the GPU (0 on dense layers)
    target_kv_gpu_sequences: int = 0         # sequences whose target KV (and attention) live on the GPU
    draft_kv_gpu_sequences: int = 0          # sequences whose draft KV lives on the GPU (the rest: CPU)
    attention_device: str = "cpu"            # where the target's verify attention runs for CPU-KV sequences
    cpu_expert_layers: tuple[int, ...] = ()  # layers whose non-resident experts compute on the CPU instead of streaming
    streaming_buffers: int = 2               # per-layer expert buffers on the GPU (double buffering)
    cached_experts: tuple[tuple[int, ...], ...] = ()   # optional, per layer: which experts the slots hold
                                             # (hottest first, from routing statistics); () = the engine's choice

    def to_dict(self) -> dict:
        d = asdict(self)
        d["expert_cache_slots"] = list(self.expert_cache_slots)
        d["cpu_expert_layers"] = list(self.cpu_expert_layers)
        d["cached_experts"] = [list(x) for x in self.cached_experts]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Placement":
        d = _require(d, "placement", ("expert_cache_slots",))
        known = {f.name for f in fields(cls)}
        extra = set(d) - known
        if extra:
            raise SpecError(f"placement.{sorted(extra)[0]}", "unknown field", f"known fields: {', '.join(sorted(known))}")
        out = dict(d)
        out["expert_cache_slots"] = tuple(int(x) for x in d["expert_cache_slots"])
        out["cpu_expert_layers"] = tuple(int(x) for x in d.get("cpu_expert_layers", ()))
        try:
            out["cached_experts"] = tuple(tuple(int(e) for e in row) for row in d.get("cached_experts", ()))
        except (TypeError, ValueError):
            raise SpecError("placement.cached_experts", "must be a list of lists of expert ids, one per layer",
                            "re-run `specmoe plan`") from None
        return cls(**out)


@dataclass(frozen=True)
class Prediction:
    """Predicted times of the plan's configuration (seconds, SI)."""

    iteration_time_s: float
    decode_tokens_per_s: float
    stages: dict[str, float]                 # stage name -> seconds per iteration (busy time of that stage)
    prefill_time_s: float = 0.0
    end_to_end_tokens_per_s: float = 0.0
    tokens_per_iteration: float = 0.0        # B * (acc(k) + 1)
    source: str = "peak"                     # "peak" or "measured" (calibrated curves used)
    timeline: list[dict] = field(default_factory=list)   # optional Gantt events {stage, resource, layer, micro_batch, start_s, end_s}
    # a finite job (workload.num_prompts): planner/batch_drain.py's Drain fields plus iteration_time_s at
    # the mean live batch, decode_time_s, prefill_time_s and steady_decode_tokens_per_s (the full batch's
    # rate); decode_tokens_per_s above is then the job's. Empty for an open stream.
    job: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        if not d["job"]:
            d.pop("job")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Prediction":
        d = _require(d, "predicted", ("iteration_time_s", "decode_tokens_per_s", "stages"))
        if not isinstance(d["stages"], dict):
            raise SpecError("predicted.stages", "must be a JSON object of stage seconds", "re-run `specmoe plan`")
        for key in ("iteration_time_s", "decode_tokens_per_s", "prefill_time_s", "end_to_end_tokens_per_s",
                    "tokens_per_iteration", *(f"stages.{n}" for n in d["stages"])):
            v = d["stages"].get(key[7:]) if key.startswith("stages.") else d.get(key, 0.0)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise SpecError(f"predicted.{key}", f"must be a number >= 0, got {v!r}", "re-run `specmoe plan`")
        for name in d["stages"]:
            if name not in STAGE_NAMES:
                raise SpecError(f"predicted.stages.{name}", "unknown stage name", f"valid: {', '.join(STAGE_NAMES)}")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class Plan:
    model: dict                              # ModelSpec.to_dict()
    hardware: dict                           # the hardware spec as loaded (raw YAML mapping)
    workload: dict                           # Workload.to_dict()
    draft: dict | None                       # draft ModelSpec.to_dict(), None without a draft
    batch: int                               # B: sequences decoded together
    micro_batches: int                       # m
    draft_len: int                           # k (0 = no speculation)
    placement: Placement
    predicted: Prediction
    memory: dict                             # {gpu_bytes, cpu_bytes, gpu_capacity_bytes, cpu_capacity_bytes, gpu_breakdown, cpu_breakdown}
    bound: str                               # the resource that limits the iteration: gpu | cpu | pcie
    frontier: dict                           # {"by_k": [{draft_len, decode_tokens_per_s}...], "by_batch": [...]}
    objective: str = "throughput"
    alternatives: tuple[dict, ...] = ()      # next-best plans: {batch, micro_batches, draft_len, decode_tokens_per_s, ...}
    solver: dict = field(default_factory=dict)
    input_hashes: dict = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    schedule: Schedule | None = None        # how the engine runs it; None: the hardware's default

    def __post_init__(self):
        # the inputs as they read back from plan.json (e.g. integer keys of measured curves become strings)
        for name in ("model", "hardware", "workload", "draft"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, json.loads(json.dumps(v, default=str)))
        if not self.input_hashes:
            object.__setattr__(self, "input_hashes", self.compute_hashes())
        if self.schedule is None:
            object.__setattr__(self, "schedule", default_schedule(self.hardware_spec()))
        self.validate()

    def compute_hashes(self) -> dict:
        return {"model": content_hash(self.model), "hardware": content_hash(self.hardware),
                "workload": content_hash(self.workload),
                "draft": content_hash(self.draft) if self.draft is not None else None}

    def validate(self) -> None:
        """Consistency checks; a hand-edited or truncated plan fails here with the field named."""
        if self.schema_version != SCHEMA_VERSION:
            raise SpecError("schema_version", f"plan has version {self.schema_version}, this specmoe reads {SCHEMA_VERSION}",
                            "re-run `specmoe plan` to regenerate it")
        for f_, v in (("batch", self.batch), ("micro_batches", self.micro_batches)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise SpecError(f_, f"must be a positive integer, got {v!r}", "re-run `specmoe plan`")
        if isinstance(self.draft_len, bool) or not isinstance(self.draft_len, int) or self.draft_len < 0:
            raise SpecError("draft_len", f"must be an integer >= 0, got {self.draft_len!r}", "re-run `specmoe plan`")
        if self.micro_batches > self.batch:
            raise SpecError("micro_batches", f"{self.micro_batches} exceeds batch {self.batch}", "use at most one micro-batch per sequence")
        if self.draft_len > 0 and self.draft is None:
            raise SpecError("draft", f"draft_len is {self.draft_len} but the plan has no draft model", "set draft_len to 0 or plan with --draft")
        nl = int(self.model.get("num_layers", 0))
        pl = self.placement
        if len(pl.expert_cache_slots) != nl:
            raise SpecError("placement.expert_cache_slots", f"has {len(pl.expert_cache_slots)} entries, the model has {nl} layers",
                            "re-run `specmoe plan`")
        ne = int(self.model.get("num_experts", 0))
        for i, s in enumerate(pl.expert_cache_slots):
            if s < 0 or s > ne:
                raise SpecError(f"placement.expert_cache_slots[{i}]", f"{s} is outside [0, {ne}]", "re-run `specmoe plan`")
        for f_ in ("target_kv_gpu_sequences", "draft_kv_gpu_sequences", "streaming_buffers"):
            v = getattr(pl, f_)
            if isinstance(v, bool) or not isinstance(v, int):
                raise SpecError(f"placement.{f_}", f"must be an integer, got {v!r}", "re-run `specmoe plan`")
            if v < 0 or (f_ != "streaming_buffers" and v > self.batch):
                raise SpecError(f"placement.{f_}", f"{v} is outside [0, batch={self.batch}]", "re-run `specmoe plan`")
        if pl.attention_device not in ("cpu", "gpu"):
            raise SpecError("placement.attention_device", f"{pl.attention_device!r} is not cpu or gpu", "fix the plan")
        for i in pl.cpu_expert_layers:
            if not 0 <= i < nl:
                raise SpecError("placement.cpu_expert_layers", f"layer {i} is outside [0, {nl})", "re-run `specmoe plan`")
        if pl.cached_experts:
            if len(pl.cached_experts) != nl:
                raise SpecError("placement.cached_experts", f"has {len(pl.cached_experts)} entries, the model has {nl} layers",
                                "re-run `specmoe plan`")
            for i, (row, s) in enumerate(zip(pl.cached_experts, pl.expert_cache_slots)):
                if len(row) != s or len(set(row)) != len(row) or any(not 0 <= e < ne for e in row):
                    raise SpecError(f"placement.cached_experts[{i}]", f"{list(row)} is not {s} distinct expert ids in [0, {ne})",
                                    "re-run `specmoe plan`")
        if self.objective not in ("throughput", "latency"):
            raise SpecError("objective", f"{self.objective!r} is not throughput or latency", "re-run `specmoe plan`")
        if not isinstance(self.frontier, dict):
            raise SpecError("frontier", "is not a mapping", "re-run `specmoe plan`")
        if self.bound not in ("gpu", "cpu", "pcie"):
            raise SpecError("bound", f"{self.bound!r} is not gpu, cpu or pcie", "re-run `specmoe plan`")
        want = self.compute_hashes()
        for k, h in want.items():
            if self.input_hashes.get(k) != h:
                raise SpecError(f"input_hashes.{k}", "does not match the embedded inputs (edited by hand?)",
                                "re-run `specmoe plan` rather than editing plan.json")

    # ---- JSON ----
    def to_dict(self) -> dict:
        return {
            "schema_version": self.schema_version, "objective": self.objective,
            "batch": self.batch, "micro_batches": self.micro_batches, "draft_len": self.draft_len,
            "placement": self.placement.to_dict(), "predicted": self.predicted.to_dict(),
            "memory": self.memory, "bound": self.bound, "frontier": self.frontier,
            "alternatives": list(self.alternatives), "solver": self.solver,
            "input_hashes": self.input_hashes, "schedule": self.schedule.to_dict(),
            "model": self.model, "draft": self.draft, "hardware": self.hardware, "workload": self.workload,
        }

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=1, default=_json_default)
        if path is not None:
            atomic_write_text(path, text)   # never a half-written plan
        return text

    @classmethod
    def from_dict(cls, d: Any) -> "Plan":
        if not isinstance(d, dict):
            raise SpecError("plan", "top level is not a JSON object", "give a plan.json written by `specmoe plan`")
        if "schema_version" not in d:
            raise SpecError("schema_version", "missing", "this is not a plan.json written by `specmoe plan`")
        if d["schema_version"] != SCHEMA_VERSION:
            old = isinstance(d["schema_version"], int) and d["schema_version"] < SCHEMA_VERSION
            raise SpecError("schema_version", f"plan has version {d['schema_version']}, this specmoe reads {SCHEMA_VERSION}"
                            + (" (older plans do not say how the engine runs them: no `schedule`)" if old else ""),
                            "re-run `specmoe plan` with the same inputs to regenerate it")
        check_known_keys(d, PLAN_KEYS, "plan")
        d = _require(d, "plan", ("batch", "micro_batches", "draft_len", "placement", "predicted", "memory", "bound",
                                 "frontier", "model", "hardware", "workload", "schedule"))
        _check_types(d)
        with _field("placement"):
            placement = Placement.from_dict(d["placement"])
        with _field("predicted"):
            predicted = Prediction.from_dict(d["predicted"])
        with _field("schedule"):
            schedule = Schedule.from_dict(d["schedule"])
        with _field("plan"):
            plan = cls(
                model=d["model"], hardware=d["hardware"], workload=d["workload"], draft=d.get("draft"),
                batch=d["batch"], micro_batches=d["micro_batches"], draft_len=d["draft_len"],
                placement=placement, predicted=predicted, memory=d["memory"], bound=d["bound"],
                frontier=d["frontier"], objective=d.get("objective", "throughput"),
                alternatives=tuple(d.get("alternatives", ())), solver=d.get("solver", {}),
                input_hashes=d.get("input_hashes", {}), schema_version=d["schema_version"], schedule=schedule)
        for name, view in (("model", plan.model_spec), ("draft", plan.draft_spec), ("hardware", plan.hardware_spec),
                           ("workload", plan.workload_spec)):
            with _field(name):     # the embedded inputs must read back as the engine will read them
                view()
        return plan

    @classmethod
    def from_json(cls, path: str | Path) -> "Plan":
        p = Path(path)
        try:
            text = p.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise SpecError("plan", f"cannot read {p}: {e}", "give the path of a plan.json") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise SpecError("plan", f"{p} is not valid JSON ({e.msg} at line {e.lineno}; truncated?)",
                            "re-run `specmoe plan` to regenerate it") from None
        return cls.from_dict(d)

    # ---- typed views of the inputs ----
    def model_spec(self):
        from specmoe.planner.model_spec import ModelSpec
        return ModelSpec.from_dict(self.model)

    def draft_spec(self):
        from specmoe.planner.model_spec import ModelSpec
        return ModelSpec.from_dict(self.draft) if self.draft is not None else None

    def hardware_spec(self):
        from specmoe.planner.hardware_spec import parse_hardware
        return parse_hardware(self.hardware, self.hardware.get("name", ""))

    def workload_spec(self):
        from specmoe.planner.workload import Workload
        return Workload.from_dict(self.workload)


# plan.json's top-level fields and the JSON types they must have
# the keys of plan.json (Plan.to_dict); an unknown one is refused with the nearest valid key
PLAN_KEYS = frozenset({"schema_version", "objective", "batch", "micro_batches", "draft_len", "placement", "predicted",
                       "memory", "bound", "frontier", "alternatives", "solver", "input_hashes", "schedule", "model",
                       "draft", "hardware", "workload"})
_TYPES = {"model": dict, "hardware": dict, "workload": dict, "draft": (dict, type(None)), "memory": dict,
          "frontier": dict, "solver": dict, "input_hashes": dict, "alternatives": list, "placement": dict,
          "predicted": dict, "schedule": dict, "bound": str, "objective": str}
_NAMES = {dict: "a JSON object", list: "a list", str: "a string", type(None): "null"}


def _check_types(d: dict) -> None:
    for key, want in _TYPES.items():
        if key in d and not isinstance(d[key], want):
            names = " or ".join(_NAMES[t] for t in (want if isinstance(want, tuple) else (want,)))
            raise SpecError(key, f"must be {names}, got {json.dumps(d[key], default=str)[:60]}",
                            "re-run `specmoe plan` to regenerate it")


@contextmanager
def _field(name: str):
    """Any error but a SpecError while reading plan field `name` becomes one naming it."""
    try:
        yield
    except SpecError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError, IndexError) as e:
        raise SpecError(name, f"has a value of the wrong type or form ({type(e).__name__}: {str(e)[:120]})",
                        "re-run `specmoe plan` to regenerate it") from None


def _require(d: Any, where: str, keys: tuple[str, ...]) -> dict:
    if not isinstance(d, dict):
        raise SpecError(where, "is not a JSON object", "re-run `specmoe plan`")
    for k in keys:
        if k not in d:
            raise SpecError(f"{where}.{k}" if where != "plan" else k, "missing (truncated or edited plan?)",
                            "re-run `specmoe plan` to regenerate it")
    return d


def _json_default(o: Any):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"cannot serialise {type(o).__name__}")
