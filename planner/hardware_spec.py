"""Hardware specs from `hw_specs/*.yaml`: datasheet peaks with units and sources, plus optional
measured curves (calibration) that override the peaks where present.

YAML schema (every number carries its unit in the key; every section a `source`):

    name: a30-xeon6426y
    description: ...
    gpu:  {name, mem_GiB | mem_GB, hbm_GBps, peak_TFLOPs: {bf16, fp16, fp32}, source,
           reserve_GiB,              # optional, default 2: kept back from plans (planner/memory.py says why)
           shares_host_cpu}          # optional, default false: true where no GPU exists and the CPU
                                     #   stands in for it (GPU, CPU and link work then run one
                                     #   after another on the same cores)
    cpu:  {name, cores, mem_GiB | mem_GB, dram_GBps, peak_TFLOPs: {bf16, fp32}, source,
           reserve_GiB,              # optional, default 6: the OS and the engine's runtime
           amx_bf16,                 # optional, default false: AMX-BF16 tiles, so CPU verify
                                     #   attention on bf16/fp16 KV has peak_TFLOPs.bf16 as its roof
           avx512_bf16}              # optional, default false: AVX512-BF16 dot products (AMD Zen 4 / 5):
                                     #   the kernel's bf16 path where there is no AMX, the same roof
    link: {h2d_GBps, d2h_GBps, source}
    measured:                      # optional; each curve is {x: y} with units in the key
      source: ...
      h2d_GBps_by_chunk_MB:        {1: 36.0, 4: 48.6, ...}
      gpu_gemm_TFLOPs_by_M:        {1: 2.3, 2: 4.8, ...}        # bf16 expert GEMM against tokens M
      cpu_gemm_GFLOPs_by_M:        {1: 28.8, ...}               # CPU expert GEMM against M
      cpu_attention_kv_GBps:       {q1: {512: 66.9, 2048: ...}, q4: {...}}   # verify attention, KV GB/s
      cpu_attention_TFLOPs: 0.81   # sustained FLOP rate of the CPU verify-attention kernel, where a
                                   #   profile gives one rate rather than a KV GB/s curve (the curve wins)
      dram_read_GBps: 67.6
      hbm_copy_GBps: 4173
      op_overhead_us: 12.5         # optional: fixed cost of one torch operation (dispatch, launch)
      stage_overhead_us:           # optional: fixed cost per invocation of the engine's stages,
        target.pre_attn: 180       #   keys and units in planner/overhead.py (OVERHEAD_KEYS)
        target.moe.expert: 95
      dram_contention:             # optional: host DRAM shared by the expert stream and CPU reads,
        cpu_read_GBps_alone: 67.6  #   each side's rate alone and while the other runs (absent:
        cpu_read_GBps_during_h2d: 52.9   # no contention is modelled)
        h2d_GBps_alone: 52.4
        h2d_GBps_during_cpu_read: 49.9
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from specmoe.planner.errors import SpecError, check_known_keys
from specmoe.planner.paths import is_file
from specmoe.planner.overhead import Overheads, parse_op_overhead_us, parse_stage_overhead_us

GiB = 1024**3
GB = 1e9
# What every host keeps back from plans, in GiB, unless its spec says otherwise (`reserve_GiB`;
# planner/memory.py says what they hold): a plan may use the memory minus the reserve.
DEFAULT_GPU_RESERVE_GiB = 2.0
DEFAULT_CPU_RESERVE_GiB = 6.0
HW_SPEC_DIR = Path(__file__).resolve().parent.parent / "hw_specs"
# the largest value each unit can mean (several times any datasheet's): beyond it a number has the wrong
# unit (MB/s typed for GB/s, bytes for GiB) or a typo, and every prediction made with it would be off
LIMITS = {"link_GBps": 1000.0, "hbm_GBps": 50000.0, "dram_GBps": 5000.0, "mem_GiB": 65536.0,
          "TFLOPs": 1e5, "GFLOPs": 1e8, "us": 1e7, "x": 1e12}


@dataclass(frozen=True)
class Curve:
    """A measured y(x) curve, interpolated linearly in log(x) and clamped at the ends."""

    xs: tuple[float, ...]
    ys: tuple[float, ...]

    def __call__(self, x: float) -> float:
        lx = np.log(np.maximum(np.asarray(self.xs, dtype=float), 1e-12))
        return float(np.interp(np.log(max(float(x), 1e-12)), lx, np.asarray(self.ys, dtype=float)))

    @classmethod
    def from_mapping(cls, m: dict, field_name: str) -> "Curve":
        if not isinstance(m, dict) or not m:
            raise SpecError(field_name, "must be a non-empty mapping of x to y", "fix the YAML")
        try:
            pts = sorted((float(str(k).lstrip("qLM").rstrip("MB")), float(v)) for k, v in m.items()
                         if not isinstance(v, bool))
        except (TypeError, ValueError):
            raise SpecError(field_name, f"has a non-numeric point in {m!r}", "use numbers for x and y") from None
        if len(pts) != len(m):
            raise SpecError(field_name, f"has a non-numeric point in {m!r}", "use numbers for x and y")
        top = _limit_of(field_name)
        for x, y in pts:
            if not (0 < x <= LIMITS["x"] and 0 < y <= top):
                raise SpecError(field_name, f"point ({x:g}, {y:g}) is not in (0, {top:g}]",
                                "measured values are positive, in the key's unit")
        return cls(tuple(p[0] for p in pts), tuple(p[1] for p in pts))


@dataclass(frozen=True)
class GPUSpec:
    name: str
    mem_bytes: float
    hbm_Bps: float
    peak_flops: dict[str, float]      # dtype -> FLOP/s
    source: str
    reserve_bytes: float = DEFAULT_GPU_RESERVE_GiB * GiB   # kept back from plans
    shares_host_cpu: bool = False     # a CPU standing in for the GPU: no overlap between resources

    @property
    def usable_bytes(self) -> float:
        return self.mem_bytes - self.reserve_bytes


@dataclass(frozen=True)
class CPUSpec:
    name: str
    cores: int
    mem_bytes: float
    dram_Bps: float
    peak_flops: dict[str, float]      # dtype -> FLOP/s
    source: str
    reserve_bytes: float = DEFAULT_CPU_RESERVE_GiB * GiB   # kept back from plans
    amx_bf16: bool = False            # AMX-BF16 tiles: the verify kernel's bf16 path (peak_flops["bf16"])
    avx512_bf16: bool = False         # AVX512-BF16 dot products: its bf16 path where there is no AMX

    @property
    def bf16_attention(self) -> bool:
        """The verify kernel multiplies bf16/fp16 KV in bf16 here (AMX or AVX512-BF16), not widened to fp32."""
        return self.amx_bf16 or self.avx512_bf16

    @property
    def usable_bytes(self) -> float:
        return self.mem_bytes - self.reserve_bytes


@dataclass(frozen=True)
class LinkSpec:
    h2d_Bps: float
    d2h_Bps: float
    source: str


@dataclass(frozen=True)
class DramContention:
    """Host DRAM shared by the expert stream (pinned H2D DMA) and the CPU's reads (verify attention):
    each side's rate measured alone and while the other side runs. The cost model scales the CPU's DRAM
    rate by `cpu_share` while a copy streams, and a copy's rate by `h2d_share` while the CPU reads at
    its full rate (planner/cost_model.py, SharedDram)."""

    cpu_read_GBps_alone: float
    cpu_read_GBps_during_h2d: float
    h2d_GBps_alone: float
    h2d_GBps_during_cpu_read: float

    @property
    def cpu_share(self) -> float:
        """f_cpu: the share of its DRAM read rate the CPU keeps while the expert stream runs (<= 1)."""
        return min(1.0, self.cpu_read_GBps_during_h2d / self.cpu_read_GBps_alone)

    @property
    def h2d_share(self) -> float:
        """f_h2d: the share of its rate the expert stream keeps while the CPU reads (<= 1)."""
        return min(1.0, self.h2d_GBps_during_cpu_read / self.h2d_GBps_alone)


@dataclass(frozen=True)
class MeasuredCurves:
    source: str = ""
    h2d_GBps_by_chunk_MB: Curve | None = None
    gpu_gemm_TFLOPs_by_M: Curve | None = None
    cpu_gemm_GFLOPs_by_M: Curve | None = None
    # query tokens n -> Curve(context -> KV GB/s)
    cpu_attention_kv_GBps: dict[int, Curve] = field(default_factory=dict)
    dram_read_GBps: float | None = None
    hbm_copy_GBps: float | None = None
    cpu_attention_TFLOPs: float | None = None                            # one sustained rate (profile)
    op_overhead_us: float | None = None                                  # one torch operation
    stage_overhead_us: dict[str, float] = field(default_factory=dict)    # planner/overhead.py keys
    threads: int | None = None                                           # torch threads the curves were measured with
    dram_contention: DramContention | None = None                        # expert stream vs CPU reads

    @property
    def overheads(self) -> Overheads:
        """The fixed per-invocation costs (planner/overhead.py); none when neither field is given."""
        return Overheads.from_measured(self.op_overhead_us, self.stage_overhead_us)

    def cpu_attention_GBps(self, n_query: int, context: float) -> float | None:
        """Measured verify-attention KV GB/s at n queries and a context, interpolated over both."""
        if not self.cpu_attention_kv_GBps:
            return None
        ns = sorted(self.cpu_attention_kv_GBps)
        vals = [self.cpu_attention_kv_GBps[n](context) for n in ns]
        return float(np.interp(np.log(max(n_query, 1)), np.log(ns), vals))

    @property
    def empty(self) -> bool:
        return not any([self.h2d_GBps_by_chunk_MB, self.gpu_gemm_TFLOPs_by_M, self.cpu_gemm_GFLOPs_by_M,
                        self.cpu_attention_kv_GBps, self.dram_read_GBps, self.hbm_copy_GBps,
                        self.cpu_attention_TFLOPs, self.op_overhead_us, self.stage_overhead_us,
                        self.dram_contention])


@dataclass(frozen=True)
class HardwareSpec:
    name: str
    description: str
    gpu: GPUSpec
    cpu: CPUSpec
    link: LinkSpec
    measured: MeasuredCurves
    source_path: str = ""
    content_sha256: str = ""
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    def with_overrides(self, *, gpu_mem_GiB: float | None = None, cpu_mem_GiB: float | None = None,
                       h2d_GBps: float | None = None) -> "HardwareSpec":
        """A copy with memory sizes or PCIe bandwidth replaced (what-if studies, CLI flags)."""
        raw = json.loads(json.dumps(self.raw))
        if gpu_mem_GiB is not None:
            _positive(gpu_mem_GiB, "--gpu-mem-gib")
            raw["gpu"].pop("mem_GB", None)
            raw["gpu"]["mem_GiB"] = gpu_mem_GiB
        if cpu_mem_GiB is not None:
            _positive(cpu_mem_GiB, "--cpu-mem-gib")
            raw["cpu"].pop("mem_GB", None)
            raw["cpu"]["mem_GiB"] = cpu_mem_GiB
        if h2d_GBps is not None:
            _positive(h2d_GBps, "h2d_GBps")
            raw["link"]["h2d_GBps"] = h2d_GBps
            # a what-if on bandwidth replaces the measured H2D curve by the new peak
            if isinstance(raw.get("measured"), dict):
                raw["measured"].pop("h2d_GBps_by_chunk_MB", None)
        return parse_hardware(raw, self.source_path)

    def to_dict(self) -> dict:
        return self.raw

    @classmethod
    def from_yaml(cls, path: str | Path) -> "HardwareSpec":
        import yaml

        p = Path(path)
        if not is_file(p):
            raise SpecError("hardware", f"no spec file at {p}",
                            f"give a preset ({', '.join(list_hardware())}) or a path to a spec YAML")
        try:
            raw = yaml.safe_load(p.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise SpecError(f"hardware spec {p}", f"not valid YAML: {str(e).splitlines()[0]}", "fix the file") from None
        return parse_hardware(raw, str(p))

    @classmethod
    def preset(cls, name: str) -> "HardwareSpec":
        p = HW_SPEC_DIR / f"{name}.yaml"
        if not is_file(p):
            raise SpecError("hardware", f"unknown preset {name!r}",
                            f"choose one of: {', '.join(list_hardware())}, or give a path to a spec YAML")
        return cls.from_yaml(p)


def list_hardware() -> list[str]:
    return sorted(p.stem for p in HW_SPEC_DIR.glob("*.yaml"))


def load_hardware(spec: str | Path | HardwareSpec) -> HardwareSpec:
    if isinstance(spec, HardwareSpec):
        return spec
    s = str(spec)
    if is_file(HW_SPEC_DIR / f"{s}.yaml"):
        return HardwareSpec.preset(s)
    if is_file(s):
        return HardwareSpec.from_yaml(s)
    raise SpecError("hardware", f"{s if len(s) <= 80 else s[:77] + '...'!r} is neither a preset nor an existing file",
                    f"choose a preset ({', '.join(list_hardware())}) or give a path to a spec YAML")


# ---------------------------------------------------------------------------------------------
def _limit_of(field_name: str) -> float:
    """The largest value a field can mean, from the unit in its key (LIMITS)."""
    key = field_name.rsplit(".", 1)[-1]
    if "h2d" in key or "d2h" in key:
        return LIMITS["link_GBps"]
    if "hbm" in key:
        return LIMITS["hbm_GBps"]
    for unit in ("GBps", "mem_GiB", "mem-GiB", "TFLOPs", "GFLOPs", "_us"):
        if unit in field_name:
            return LIMITS[{"GBps": "dram_GBps", "_us": "us", "mem-GiB": "mem_GiB"}.get(unit, unit)]
    if key == "mem_GB":
        return LIMITS["mem_GiB"] * GiB / GB
    return LIMITS["x"]


def _positive(v: Any, field_name: str) -> float:
    """A positive finite number no larger than its unit can mean (LIMITS)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise SpecError(field_name, f"must be a number, got {v!r}", "fix the value")
    if not v > 0 or v != v:
        raise SpecError(field_name, f"must be positive, got {v}", "give a positive number")
    top = _limit_of(field_name)
    if v > top:
        unit = next((u for u in ("GBps", "GiB", "GB", "TFLOPs", "GFLOPs", "us") if u in field_name), "")
        raise SpecError(field_name, f"is {v:g}, beyond any hardware's ({top:g} {unit} at most)",
                        f"the key's unit is {unit}: was the number written in another unit (MB/s, bytes)?")
    return float(v)


def _section(raw: dict, key: str, where: str) -> dict:
    s = raw.get(key)
    if not isinstance(s, dict):
        raise SpecError(f"{where}.{key}", "missing or not a mapping", f"add a `{key}:` section (see hw_specs/README.md)")
    return s


def _mem(sec: dict, where: str) -> float:
    if "mem_GiB" in sec:
        return _positive(sec["mem_GiB"], f"{where}.mem_GiB") * GiB
    if "mem_GB" in sec:
        return _positive(sec["mem_GB"], f"{where}.mem_GB") * GB
    raise SpecError(f"{where}.mem_GiB", "missing", "add mem_GiB (or mem_GB)")


def _flops(sec: dict, where: str) -> dict[str, float]:
    pk = sec.get("peak_TFLOPs")
    if not isinstance(pk, dict) or not pk:
        raise SpecError(f"{where}.peak_TFLOPs", "missing or empty", "add e.g. `peak_TFLOPs: {bf16: 165, fp32: 10}`")
    return {str(k): _positive(v, f"{where}.peak_TFLOPs.{k}") * 1e12 for k, v in pk.items()}


def _flag(sec: dict, key: str, where: str) -> bool:
    v = sec.get(key, False)
    if not isinstance(v, bool):
        raise SpecError(f"{where}.{key}", f"must be true or false, got {v!r}", "fix the YAML")
    return v


def _reserve(sec: dict, where: str, default_GiB: float, mem_bytes: float) -> float:
    """The bytes of this memory kept back from plans: `reserve_GiB`, or the default."""
    if "usable_mem_fraction" in sec:
        raise SpecError(f"{where}.usable_mem_fraction", "is no longer read: every host keeps back a fixed reserve",
                        f"replace it by `reserve_GiB: X` (default {default_GiB:g}; hw_specs/README.md), or re-run "
                        "`specmoe plan` for a plan made with it")
    v = sec.get("reserve_GiB", default_GiB)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
        raise SpecError(f"{where}.reserve_GiB", f"must be a number >= 0, got {v!r}",
                        f"give the GiB the OS and runtime keep back (default {default_GiB:g})")
    if v * GiB >= mem_bytes:
        raise SpecError(f"{where}.reserve_GiB", f"{v:g} GiB leaves nothing of {mem_bytes / GiB:.1f} GiB for plans",
                        "give a reserve below the memory size")
    return float(v) * GiB


def _source(sec: dict, where: str) -> str:
    s = sec.get("source")
    if not isinstance(s, str) or not s.strip():
        raise SpecError(f"{where}.source", "missing", "say where the numbers come from (datasheet URL, measurement)")
    return s


# the keys each section may have (an unknown one is refused with the nearest valid key: a typo)
TOP_KEYS = frozenset({"name", "description", "gpu", "cpu", "link", "measured"})
GPU_KEYS = frozenset({"name", "mem_GiB", "mem_GB", "hbm_GBps", "peak_TFLOPs", "reserve_GiB", "shares_host_cpu", "source"})
CPU_KEYS = frozenset({"name", "cores", "mem_GiB", "mem_GB", "dram_GBps", "peak_TFLOPs", "reserve_GiB", "amx_bf16",
                      "avx512_bf16",
                      "source"})
LINK_KEYS = frozenset({"h2d_GBps", "d2h_GBps", "source"})
MEASURED_KEYS = frozenset({"source", "h2d_GBps_by_chunk_MB", "gpu_gemm_TFLOPs_by_M", "cpu_gemm_GFLOPs_by_M",
                           "cpu_attention_kv_GBps", "dram_read_GBps", "hbm_copy_GBps", "cpu_attention_TFLOPs",
                           "op_overhead_us", "stage_overhead_us", "threads", "dram_contention", "details"})


def parse_hardware(raw: Any, path: str = "") -> HardwareSpec:
    where = Path(path).name if path else "hardware spec"
    if not isinstance(raw, dict):
        raise SpecError(where, "top level is not a mapping", "see hw_specs/README.md for the schema")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise SpecError(f"{where}.name", "missing", "add `name: <short-id>`")
    g, c, lk = _section(raw, "gpu", where), _section(raw, "cpu", where), _section(raw, "link", where)
    for sec, keys, at in ((raw, TOP_KEYS, where), (g, GPU_KEYS, f"{where}.gpu"), (c, CPU_KEYS, f"{where}.cpu"),
                          (lk, LINK_KEYS, f"{where}.link")):
        check_known_keys(sec, keys, at)
    gmem = _mem(g, f"{where}.gpu")
    gpu = GPUSpec(name=str(g.get("name", "gpu")), mem_bytes=gmem,
                  hbm_Bps=_positive(g.get("hbm_GBps"), f"{where}.gpu.hbm_GBps") * GB,
                  peak_flops=_flops(g, f"{where}.gpu"), source=_source(g, f"{where}.gpu"),
                  reserve_bytes=_reserve(g, f"{where}.gpu", DEFAULT_GPU_RESERVE_GiB, gmem),
                  shares_host_cpu=_flag(g, "shares_host_cpu", f"{where}.gpu"))
    cores = c.get("cores")
    if isinstance(cores, bool) or not isinstance(cores, int) or not 0 < cores <= 4096:
        raise SpecError(f"{where}.cpu.cores", f"must be a positive integer, got {cores!r}", "fix the YAML")
    cmem = _mem(c, f"{where}.cpu")
    cpu = CPUSpec(name=str(c.get("name", "cpu")), cores=cores, mem_bytes=cmem,
                  dram_Bps=_positive(c.get("dram_GBps"), f"{where}.cpu.dram_GBps") * GB,
                  peak_flops=_flops(c, f"{where}.cpu"), source=_source(c, f"{where}.cpu"),
                  reserve_bytes=_reserve(c, f"{where}.cpu", DEFAULT_CPU_RESERVE_GiB, cmem),
                  amx_bf16=_flag(c, "amx_bf16", f"{where}.cpu"),
                  avx512_bf16=_flag(c, "avx512_bf16", f"{where}.cpu"))
    h2d = _positive(lk.get("h2d_GBps"), f"{where}.link.h2d_GBps")
    link = LinkSpec(h2d_Bps=h2d * GB, d2h_Bps=_positive(lk.get("d2h_GBps", h2d), f"{where}.link.d2h_GBps") * GB,
                    source=_source(lk, f"{where}.link"))
    measured = MeasuredCurves()
    m = raw.get("measured")
    if m is not None:
        if not isinstance(m, dict):
            raise SpecError(f"{where}.measured", "not a mapping", "fix the YAML or remove the section")
        mw = f"{where}.measured"
        check_known_keys(m, MEASURED_KEYS, mw)
        _check_numbers(m, mw)
        att = {}
        kv_curves = m.get("cpu_attention_kv_GBps") or {}
        if not isinstance(kv_curves, dict):
            raise SpecError(f"{mw}.cpu_attention_kv_GBps", "must be a mapping of q<N> to curves",
                            "e.g. `cpu_attention_kv_GBps: {q1: {512: 60.0}}`")
        for qk, curve in kv_curves.items():
            try:
                n = int(str(qk).lstrip("q"))
            except ValueError:
                raise SpecError(f"{mw}.cpu_attention_kv_GBps.{qk}", "keys must be q<N> (query tokens)",
                                "e.g. q1, q4, q8") from None
            att[n] = Curve.from_mapping(curve, f"{mw}.cpu_attention_kv_GBps.{qk}")

        def cv(key):
            return Curve.from_mapping(m[key], f"{mw}.{key}") if m.get(key) is not None else None

        measured = MeasuredCurves(
            source=_source(m, mw),
            h2d_GBps_by_chunk_MB=cv("h2d_GBps_by_chunk_MB"),
            gpu_gemm_TFLOPs_by_M=cv("gpu_gemm_TFLOPs_by_M"),
            cpu_gemm_GFLOPs_by_M=cv("cpu_gemm_GFLOPs_by_M"),
            cpu_attention_kv_GBps=att,
            dram_read_GBps=_positive(m["dram_read_GBps"], f"{mw}.dram_read_GBps") if "dram_read_GBps" in m else None,
            hbm_copy_GBps=_positive(m["hbm_copy_GBps"], f"{mw}.hbm_copy_GBps") if "hbm_copy_GBps" in m else None,
            cpu_attention_TFLOPs=(_positive(m["cpu_attention_TFLOPs"], f"{mw}.cpu_attention_TFLOPs")
                                  if m.get("cpu_attention_TFLOPs") is not None else None),
            op_overhead_us=(parse_op_overhead_us(m["op_overhead_us"], f"{mw}.op_overhead_us")
                            if m.get("op_overhead_us") is not None else None),
            stage_overhead_us=(parse_stage_overhead_us(m["stage_overhead_us"], f"{mw}.stage_overhead_us")
                               if m.get("stage_overhead_us") is not None else {}),
            threads=_threads(m.get("threads"), f"{mw}.threads"),
            dram_contention=_contention(m.get("dram_contention"), f"{mw}.dram_contention"),
        )
    sha = hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()
    return HardwareSpec(name=name, description=str(raw.get("description", "")), gpu=gpu, cpu=cpu, link=link,
                        measured=measured, source_path=str(path), content_sha256=sha, raw=raw)


def _threads(v: Any, field_name: str) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise SpecError(field_name, f"must be a positive integer (torch threads), got {v!r}", "e.g. `threads: 16`")
    return int(v)


def _contention(v: Any, field_name: str) -> DramContention | None:
    """The `dram_contention` mapping: four positive rates. Running both sides together must not be
    slower than running them in turns (cpu_share + h2d_share >= 1): the cost model's overlap of the
    two assumes it."""
    if v is None:
        return None
    if not isinstance(v, dict):
        raise SpecError(field_name, "not a mapping", "give the four rates of hw_specs/README.md, or remove it")
    names = [f.name for f in DramContention.__dataclass_fields__.values()]
    missing = [n for n in names if n not in v]
    extra = sorted(set(v) - set(names))
    if missing or extra:
        raise SpecError(f"{field_name}.{(missing or extra)[0]}", "missing" if missing else "unknown key",
                        f"give exactly {', '.join(names)}")
    c = DramContention(**{n: _positive(v[n], f"{field_name}.{n}") for n in names})
    if c.cpu_share + c.h2d_share < 1.0:
        raise SpecError(field_name, f"keeps {c.cpu_share:.2f} of the CPU's rate and {c.h2d_share:.2f} of the "
                        "stream's while both run: less than taking turns", "re-measure (specmoe calibrate)")
    return c


def _check_numbers(m: dict, where: str) -> None:
    """The fixed costs of `measured:` must be finite numbers (overhead.py reads the rest of them)."""
    vals = [("op_overhead_us", m.get("op_overhead_us"))]
    so = m.get("stage_overhead_us")
    if isinstance(so, dict):
        vals += [(f"stage_overhead_us.{k}", v) for k, v in so.items()]
    for key, v in vals:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not (abs(v) <= LIMITS["us"]):
            raise SpecError(f"{where}.{key}", f"is {v}, not a fixed cost in microseconds",
                            f"give a finite number up to {LIMITS['us']:g}")
