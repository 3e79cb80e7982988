"""Everything of `specmoe calibrate` (runtime/calibrate/run.py) that is not a measurement: the inputs
(model, base spec, output path), the machine fingerprint that keys the cache, the cache and output
files (written atomically), and the hardware spec assembled from cached results (`build_spec_raw`,
`dump_spec_yaml`).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from specmoe.planner.errors import SpecError
from specmoe.planner.hardware_spec import DramContention, load_hardware
from specmoe.planner.model_spec import ModelSpec, load_model

from specmoe.planner.atomic_file import atomic_write_text  # noqa: F401  (re-exported by runtime.calibrate)
from specmoe.runtime.calibrate.measure import GiB, Settings

FORMAT_VERSION = 3   # 3: low-percentile estimators and the quiet-machine checks
REPO_ROOT = Path(__file__).resolve().parents[2]   # runtime/calibrate/spec.py -> the checkout
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "tiny-moe"
DEFAULT_DRAFT_DIR = REPO_ROOT / "models" / "tiny-draft"
FALLBACK_MODEL = "mixtral-8x7b"
DEFAULT_CPU_BASE = "devbox-2core"


# ---------------------------------------------------------------------------------------------
# inputs, fingerprint, cache, files
def resolve_model(model) -> tuple[str, ModelSpec]:
    """(label, spec) of the model whose shapes are measured; the tiny target by default."""
    if model is None:
        if (DEFAULT_MODEL_DIR / "config.json").is_file():
            return "models/tiny-moe", load_model(DEFAULT_MODEL_DIR)
        return FALLBACK_MODEL, load_model(FALLBACK_MODEL)
    try:
        return str(model), load_model(model)
    except SpecError as e:
        raise SpecError("--model", e.problem if e.field == "model" else f"{e.field}: {e.problem}", e.fix) from None


def resolve_model_config(model) -> dict:
    """The HF config.json mapping of the calibration model (as resolve_model finds it)."""
    from specmoe.planner.model_spec import PRESET_DIR

    if model is None:
        p = DEFAULT_MODEL_DIR / "config.json"
        if not p.is_file():
            p = PRESET_DIR / f"{FALLBACK_MODEL}.json"
    elif (PRESET_DIR / f"{model}.json").is_file():
        p = PRESET_DIR / f"{model}.json"
    else:
        p = Path(model)
        if p.is_dir():
            p = p / "config.json"
    try:
        cfg = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SpecError("--model", f"cannot read {p}: {e}", "give a preset or a config.json") from None
    if not isinstance(cfg, dict):
        raise SpecError("--model", f"{p} is not a JSON object", "give a HF config.json")
    return cfg


def engine_configs(model_cfg: dict) -> dict:
    """The tiny target and drafts (1 and 2 layers) of the engine-stage measurement."""
    from specmoe.runtime.calibrate.overhead import draft_config, shrink_config

    target = shrink_config(model_cfg)
    base = None
    if (DEFAULT_DRAFT_DIR / "config.json").is_file():
        try:
            base = json.loads((DEFAULT_DRAFT_DIR / "config.json").read_text())
        except (OSError, ValueError):
            base = None
    return {"target": target, "drafts": {n: draft_config(target, base, n) for n in (1, 2)}}


def resolve_base(base) -> dict:
    """The raw mapping of the base hardware spec (a preset name or a spec YAML)."""
    try:
        return load_hardware(base).raw
    except SpecError as e:
        raise SpecError("--base", e.problem if e.field == "hardware" else f"{e.field}: {e.problem}", e.fix) from None


def measured_shapes(spec: ModelSpec, st: Settings) -> dict[str, Any]:
    """Expert GEMM and attention shapes; the CPU GEMM's F is halved until fp32 W fits the budget."""
    F = spec.expert_intermediate if spec.is_moe else spec.dense_intermediate
    if F <= 0 or spec.hidden <= 0:
        raise SpecError("--model", f"{spec.name} has no expert or FFN intermediate size", "give an MoE model")
    F_cpu = F
    while F_cpu > 64 and spec.hidden * F_cpu * 4 > st.cpu_gemm_weight_max_bytes:
        F_cpu = max(64, F_cpu // 2)
    structure = hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:12]
    return {"h": spec.hidden, "F": F, "F_cpu": F_cpu, "n_q": spec.num_q_heads, "n_kv": spec.num_kv_heads,
            "d": spec.head_dim, "structure": structure}


def specmoe_version() -> str:
    try:
        from importlib.metadata import version

        return version("specmoe")
    except Exception:  # noqa: BLE001 - not installed: the source tree's version
        return "source"


ENGINE_SOURCES = ("kernels/verify_attention.py", "kernels/moe_ops.py",
                  "kernels/speculative_ops.py", "kernels/checks.py", "model/target.py", "model/draft.py",
                  "speculative.py", "model/kv_cache.py", "model/layers.py", "model/expert_store.py", "run_record.py",
                  "calibrate/overhead.py", "calibrate/prefill.py")


def kernel_source_sha() -> str:
    """Hash of the kernels' and the engine's sources (the fixed costs are the engine's) and of the
    bundled draft's config (the draft of the engine-stage measurement)."""
    h = hashlib.sha256()
    csrc = sorted((REPO_ROOT / "runtime" / "kernels" / "csrc").glob("verify_attention*"))  # the kernel and its parts
    for p in [REPO_ROOT / "runtime" / f for f in ENGINE_SOURCES] + csrc + [DEFAULT_DRAFT_DIR / "config.json"]:
        try:
            h.update(p.read_bytes())
        except OSError:
            h.update(b"missing")
    return h.hexdigest()[:16]


def cache_dir(override: str | Path | None = None) -> Path:
    if override is not None:
        return Path(override)
    base = os.environ.get("SPECMOE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "specmoe")
    return Path(base) / "calibration"


def fingerprint(facts: dict, shapes: dict, mode: str) -> tuple[str, dict]:
    import torch

    fp = {"format": FORMAT_VERSION, "cpu": facts["cpu_name"], "cores": facts["cores"],
          "mem_GiB": round(facts["mem_total_bytes"] / GiB), "gpu": facts["gpu_name"] or "none",
          "torch": str(torch.__version__), "specmoe": specmoe_version(), "kernel_sha": kernel_source_sha(),
          "threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
          "shapes": shapes, "mode": mode}
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:20], fp


def check_output_path(out_path) -> Path:
    """The -o path, checked before anything is measured: a .yaml in a writable directory."""
    if out_path is None or str(out_path).strip() == "":
        raise SpecError("-o", "missing", "give the spec file to write, e.g. -o hw_specs/mybox.yaml")
    p = Path(out_path).expanduser()
    if p.suffix not in (".yaml", ".yml"):
        raise SpecError("-o", f"{p} does not end in .yaml", "name the output e.g. hw_specs/mybox.yaml")
    if p.is_dir():
        raise SpecError("-o", f"{p} is a directory", "give a file name ending in .yaml")
    if p.parent.exists() and not p.parent.is_dir():
        raise SpecError("-o", f"{p.parent} is not a directory", "choose a path inside a directory")
    if not p.parent.is_dir():
        raise SpecError("-o", f"directory {p.parent} does not exist", "create it first or choose another path")
    try:
        fd, probe = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise SpecError("-o", f"cannot write in {p.parent} ({e.strerror})", "choose a writable path") from None
    return p


def _r(x: float) -> float:
    return float(f"{x:.4g}")


def _curve(d: dict, scale: float = 1.0) -> dict:
    return {int(k): _r(v * scale) for k, v in sorted(d.items(), key=lambda kv: int(kv[0]))}


def plain(x: Any) -> Any:
    """Plain YAML-safe Python (int keys kept) from measurement results."""
    if isinstance(x, dict):
        return {(k if isinstance(k, (int, str)) else str(k)): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, bool) or x is None:
        return x
    if isinstance(x, int):
        return int(x)
    if isinstance(x, float):
        return float(x)
    return str(x)


class SpecDumper(yaml.SafeDumper):
    """Block style for sections, flow style for curves and other all-scalar mappings of numbers."""


def _represent_dict(dumper: yaml.SafeDumper, d: dict):
    flow = bool(d) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in d.values())
    return dumper.represent_mapping("tag:yaml.org,2002:map", d.items(), flow_style=flow)


SpecDumper.add_representer(dict, _represent_dict)


# ---------------------------------------------------------------------------------------------
# the spec from the results
def _describe(facts: dict) -> str:
    gpu = facts["gpu_name"] or "no GPU"
    return (f"{facts['cpu_name']} ({facts['cores']} cores, {facts['mem_total_bytes'] / GiB:.1f} GiB RAM), {gpu}; "
            f"torch {facts['torch']} with {facts['threads']} threads")


def _base_note(base_raw: dict | None, section: str) -> str:
    return f" (base: {base_raw[section].get('source', '')})" if base_raw else ""


def build_spec_raw(cached: dict, base_raw: dict | None, base_label: str | None, name: str) -> dict:
    """The hardware spec (schema of planner/hardware_spec.py) from cached results and a base."""
    r, facts = cached["results"], cached["facts"]
    machine = _describe(facts)
    has_gpu = facts["gpu_name"] is not None
    tag = f"specmoe calibrate {cached['measured_at']}"
    gpu, cpu, link, peaks_from = _base_sections(base_raw, base_label)
    _fill_cpu(cpu, r, facts, tag, peaks_from, base_raw)
    if has_gpu:
        curves = _fill_gpu_and_link(gpu, cpu, link, r, facts, tag, peaks_from, base_raw)
    else:
        gpu, curves = _cpu_as_gpu(cpu, link, r, facts, tag, peaks_from)
    measured = _measured_section(cached, machine, tag, *curves)
    gpu, cpu, link = (_ordered(sec) for sec in (gpu, cpu, link))
    desc = (f"Calibrated by `specmoe calibrate` on {cached['measured_at']}: {machine}."
            + ("" if has_gpu else " No GPU: 'gpu' is this CPU standing in for it and 'link' is a host memory copy."))
    raw = {"name": name, "description": desc, "gpu": gpu, "cpu": cpu, "link": link, "measured": measured}
    if r.get("stage_overheads"):
        _add_fixed_costs(raw, r["stage_overheads"])
    return raw


def _raise_to(sec: dict, key: str, measured: float) -> None:
    """sec[key] becomes the measurement where that is higher than the value there (or there is none)."""
    old = sec.get(key)
    if not isinstance(old, (int, float)) or measured > old:
        sec[key] = _r(measured)


def _cpu_peaks(r: dict) -> dict[str, float]:
    """dtype -> the best measured CPU GEMM rate, TFLOP/s."""
    return {dt: max(c.values()) / 1e3 for dt, c in r["cpu_gemm_GFLOPs_by_M"].items()}


def _base_sections(base_raw: dict | None, base_label: str | None) -> tuple[dict, dict, dict, str]:
    """Copies of the base's gpu, cpu and link sections (empty ones without a base) and where the peaks come from."""
    if base_raw is None:
        return {"peak_TFLOPs": {}}, {"peak_TFLOPs": {}}, {}, "no base given: the best measured values are used as the peaks"
    gpu = dict(base_raw["gpu"])
    cpu = dict(base_raw["cpu"])
    link = dict(base_raw["link"])
    gpu["peak_TFLOPs"] = dict(gpu.get("peak_TFLOPs") or {})
    cpu["peak_TFLOPs"] = dict(cpu.get("peak_TFLOPs") or {})
    return gpu, cpu, link, f"peaks from base {base_label}, raised to a measured value where it was higher"


def _fill_cpu(cpu: dict, r: dict, facts: dict, tag: str, peaks_from: str, base_raw: dict | None) -> None:
    """This machine's CPU facts and its measured GEMM and DRAM read rates in the cpu section."""
    cpu.update(name=f"{facts['cpu_name']} ({facts['cores']} cores)", cores=int(facts["cores"]))
    cpu.pop("mem_GB", None)
    for dt, v in _cpu_peaks(r).items():
        _raise_to(cpu["peak_TFLOPs"], dt, v)
    _raise_to(cpu, "dram_GBps", r["dram_read_GBps"])
    paths = facts.get("verify_paths")
    if paths:  # this machine's bf16 verify paths (the kernel's cpuid checks), not the base spec's flags
        cpu["amx_bf16"], cpu["avx512_bf16"] = "amx" in paths, "avx512bf16" in paths
    cpu["source"] = (f"{tag}: name, cores, memory (/proc/meminfo) of this machine; DRAM read and GEMM "
                     f"measured; {peaks_from}" + _base_note(base_raw, "cpu"))


def _fill_gpu_and_link(gpu: dict, cpu: dict, link: dict, r: dict, facts: dict, tag: str, peaks_from: str,
                       base_raw: dict | None) -> tuple[dict, dict, float]:
    """The measured GPU and PCIe link in their sections (and the host memory in cpu); returns the curves
    of the measured section: (H2D GB/s by chunk MB, GPU GEMM TFLOP/s by M, HBM copy GB/s)."""
    gf = r["gpu_facts"]
    cpu["mem_GiB"] = round(facts["mem_total_bytes"] / GiB, 1)
    gpu.pop("mem_GB", None)
    gpu.update(name=gf["name"], mem_GiB=gf["mem_GiB"])
    _raise_to(gpu, "hbm_GBps", r["hbm_copy_GBps"])
    _raise_to(gpu["peak_TFLOPs"], "bf16", max(r["gpu_gemm_TFLOPs_by_M"].values()))
    _raise_to(gpu["peak_TFLOPs"], "fp32", r["gpu_fp32_gemm_TFLOPs"])
    gpu["source"] = (f"{tag}: name and memory from torch.cuda (mem_get_info); HBM copy and bf16/fp32 GEMM "
                     f"measured; {peaks_from}" + _base_note(base_raw, "gpu"))
    _raise_to(link, "h2d_GBps", max(r["h2d_GBps_by_chunk_MB"].values()))
    _raise_to(link, "d2h_GBps", max(r["d2h_GBps_by_chunk_MB"].values()))
    link["source"] = f"{tag}: pinned H2D/D2H copies by chunk size; {peaks_from}"
    return r["h2d_GBps_by_chunk_MB"], _curve(r["gpu_gemm_TFLOPs_by_M"]), r["hbm_copy_GBps"]


def _cpu_as_gpu(cpu: dict, link: dict, r: dict, facts: dict, tag: str,
                peaks_from: str) -> tuple[dict, tuple[dict, dict, float]]:
    """Without a GPU the engine runs on this CPU: the gpu section is this CPU (a third of the RAM as
    device memory, half as CPU memory) and the link a host memory copy. Returns (gpu section, the
    curves of the measured section as _fill_gpu_and_link returns them)."""
    mem_GiB = facts["mem_total_bytes"] / GiB
    host_copy = r["host_copy_GBps_by_chunk_MB"]
    cpu["mem_GiB"] = round(mem_GiB / 2, 1)
    cpu["reserve_GiB"] = 0                   # the sixth of the RAM outside the two budgets is the reserve
    gpu = {"name": "CPU standing in for the GPU", "mem_GiB": round(mem_GiB / 3, 1), "reserve_GiB": 0,
           "shares_host_cpu": True,          # the same cores: the cost model overlaps nothing
           "hbm_GBps": _r(r["dram_read_GBps"]),
           "peak_TFLOPs": {dt: _r(v) for dt, v in sorted(_cpu_peaks(r).items())},
           "source": (f"{tag}: no GPU, so the engine runs on this CPU: DRAM read and best expert GEMM "
                      f"measured here; a third of the {mem_GiB:.1f} GiB RAM budgeted as device memory "
                      f"(and half as CPU memory)")}
    _raise_to(link, "h2d_GBps", max(host_copy.values()))
    _raise_to(link, "d2h_GBps", max(host_copy.values()))
    link["source"] = (f"{tag}: no GPU, so 'H2D' is a host memory copy (cold source, warm destination), "
                      f"best over chunk sizes; {peaks_from}")
    return gpu, (host_copy, _curve(r["cpu_gemm_GFLOPs_by_M"]["fp32"], 1e-3), 2 * host_copy[max(host_copy)])


def _measured_section(cached: dict, machine: str, tag: str, h2d_curve: dict, gpu_gemm: dict, hbm_copy: float) -> dict:
    """The spec's `measured:` section: the curves the cost model reads, then informational details."""
    r, facts, shapes = cached["results"], cached["facts"], cached["shapes"]
    edt = "bf16" if facts["gpu_name"] is not None else "fp32"
    gemm = r["cpu_gemm_GFLOPs_by_M"]
    contention, contention_note = _dram_contention(r)
    return {
        "source": (f"{tag} on {machine}; {cached['mode']} mode; CPU: best of many timed calls, GPU: medians of "
                   f"CUDA-event timings; expert GEMM x[M,{shapes['h']}] @ W[{shapes['h']},F] with F="
                   f"{shapes['F']} on the GPU and F={shapes['F_cpu']} on the CPU ({cached['model']}); verify "
                   f"attention Hq={shapes['n_q']} Hkv={shapes['n_kv']} D={shapes['d']} {edt} KV by "
                   f"{facts['attention_backend']}"),
        "h2d_GBps_by_chunk_MB": _curve(h2d_curve),
        "gpu_gemm_TFLOPs_by_M": gpu_gemm,
        "cpu_gemm_GFLOPs_by_M": _curve(gemm[edt] if edt in gemm else gemm["fp32"]),
        "cpu_attention_kv_GBps": {f"q{n}": _curve(c) for n, c in
                                  sorted(r["cpu_attention_kv_GBps"].items(), key=lambda kv: int(kv[0]))},
        "dram_read_GBps": _r(r["dram_read_GBps"]),
        "hbm_copy_GBps": _r(hbm_copy),
        "threads": int(facts["threads"]),            # a plan's schedule runs the engine with these
        **contention,
        # informational, not read by the planner
        "details": {**_measured_details(cached), **contention_note},
    }


def _dram_contention(r: dict) -> tuple[dict, dict]:
    """({"dram_contention": the four rates}, {}) where a GPU host measured them (runtime/calibrate/
    contention.py); ({}, {"dram_contention_unused": ...}) when running both sides together came out slower
    than taking turns, which the planner's model does not take (planner/hardware_spec.py refuses it)."""
    c = r.get("dram_contention")
    if not c:
        return {}, {}
    rates = {k: _r(float(c[k])) for k in DramContention.__dataclass_fields__}
    dc = DramContention(**rates)
    if dc.cpu_share + dc.h2d_share < 1.0:
        return {}, {"dram_contention_unused": {**rates, "why": "both together slower than in turns: re-measure"}}
    return {"dram_contention": rates}, {}


def _measured_details(cached: dict) -> dict:
    """What the calibration measured beyond the cost model's curves: every dtype's CPU GEMM, the copies,
    what was skipped, the load around it, the fingerprint and the speed probe."""
    r = cached["results"]
    has_gpu = cached["facts"]["gpu_name"] is not None
    return {
        "cpu_gemm_GFLOPs_by_M_by_dtype": {dt: _curve(c) for dt, c in r["cpu_gemm_GFLOPs_by_M"].items()},
        "host_copy_GBps_by_chunk_MB": _curve(r["host_copy_GBps_by_chunk_MB"]),
        **({"d2h_GBps_by_chunk_MB": _curve(r["d2h_GBps_by_chunk_MB"])} if has_gpu else {}),
        "cold_buffer_MiB": r.get("pool_MiB"),
        "skipped": r.get("skipped", {}),
        "elapsed_s": r.get("elapsed_s"),
        "load_avg_1min": [r.get("load_avg_before"), r.get("load_avg_after")],
        # what a run is checked against before it starts (runtime/calibration_match.py)
        "environment": {"torch": cached["facts"]["torch"], "threads": cached["facts"]["threads"],
                        "device": "cuda" if has_gpu else "cpu", "cpu": cached["facts"]["cpu_name"],
                        "cores": cached["facts"]["cores"],
                        **{k: v for k, v in (r.get("state_before") or {}).items()
                           if k in ("omp_wait_policy", "cpu_MHz", "governor", "kernel", "python")}},
        # was the machine quiet while measuring (runtime/calibrate/quiet.py)
        **({"calibration_quality": _quality(r)} if r.get("quality") else {}),
        "fingerprint": cached["fingerprint_id"],
        **({"speed_probe": {"iteration_s": _r(min(r["speed_probe_s"])),
                            "samples_s": [_r(x) for x in r["speed_probe_s"]],
                            "method": "runtime/calibrate/speed_probe.py, twice before and twice after the engine-stage "
                                      "step; iteration_s is the fastest, the state the calibration's rates are "
                                      "taken in (low percentiles)",
                            "engine_configs": _probe_configs(r)}}
           if r.get("speed_probe_s") else {}),
    }


def _add_fixed_costs(raw: dict, stage_overheads: dict) -> None:
    """The fixed costs per stage invocation, fitted against the cost model's roofline on raw's curves
    (the fixed costs are the rest), into raw's measured section (its details last)."""
    from specmoe.runtime.calibrate.overhead_fit import fit_overheads

    measured = raw["measured"]
    op_us, stage_us, det = fit_overheads(stage_overheads, raw)
    details = measured.pop("details")
    if op_us:
        measured["op_overhead_us"] = op_us
    measured["stage_overhead_us"] = stage_us
    measured["source"] += ("; fixed costs per stage invocation (op_overhead_us, stage_overhead_us) fitted to the "
                           "engine's own stages timed on tiny random models, against the cost model's roofline "
                           "(runtime/calibrate/overhead.py)")
    measured["details"] = {**details, "stage_overheads": det}


_KEY_ORDER = {k: i for i, k in enumerate(("name", "cores", "mem_GiB", "hbm_GBps", "dram_GBps", "h2d_GBps",
                                           "d2h_GBps", "peak_TFLOPs"))}


def _ordered(sec: dict) -> dict:
    """A section's keys in the presets' order; other keys after them, `source` last."""
    return dict(sorted(sec.items(), key=lambda kv: _KEY_ORDER.get(kv[0], len(_KEY_ORDER) + (kv[0] == "source"))))


def dump_spec_yaml(raw: dict) -> str:
    head = ("# Written by `specmoe calibrate` (runtime/calibrate/run.py). Peaks in gpu/cpu/link; the measured:\n"
            "# curves override them in the cost model (schema: planner/hardware_spec.py).\n")
    return head + yaml.dump(plain(raw), Dumper=SpecDumper, sort_keys=False, width=120, allow_unicode=True)


def _probe_configs(r: dict) -> dict | None:
    """The tiny target and one-layer draft the probe ran (so a later process repeats the same probe)."""
    so = r.get("stage_overheads") or {}
    if "target_config" not in so or not so.get("draft_configs"):
        return None
    drafts = {int(k): v for k, v in so["draft_configs"].items()}
    return {"target": so["target_config"], "drafts": {1: drafts.get(1, next(iter(drafts.values())))}}


def _quality(r: dict) -> dict:
    """Whether every step was measured in a quiet spell, the steps that were not and why, the repeats,
    the spread of each step's repetitions and the sentinel that judged the spells."""
    from specmoe.runtime.calibrate.quiet import quality_summary

    sent = r.get("sentinel") or {}
    return {**quality_summary(r["quality"]), "steps": r["quality"], "spread_by_step": r.get("spread", {}),
            "sentinel_best_s": _r(sent["best_s"]) if sent.get("best_s") else None,
            "repeats_s": sent.get("retry_s", 0.0),
            "method": "each step bracketed by a sentinel (fixed fp32 matrix products) and /proc/stat; repeated when "
                      "the machine ran > 15% slower than its best or other processes used > 15% of the CPUs"}


SENTINEL_FILE = "sentinel.yaml"   # in the cache dir: {machine key: the fastest sentinel seconds seen}


def load_best_sentinel(cdir: Path, key: str) -> float | None:
    """The fastest sentinel earlier calibrations of this machine saw (None: none, or an unreadable file)."""
    try:
        data = yaml.safe_load((cdir / SENTINEL_FILE).read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    v = data.get(key) if isinstance(data, dict) else None
    return float(v) if isinstance(v, (int, float)) and v > 0 else None


def save_best_sentinel(cdir: Path, key: str, best_s: float) -> None:
    """Record a faster sentinel for this machine (an unwritable cache only loses the reference)."""
    try:
        data = yaml.safe_load((cdir / SENTINEL_FILE).read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        data = None
    data = data if isinstance(data, dict) else {}
    data[key] = float(best_s)
    try:
        cdir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cdir / SENTINEL_FILE, yaml.safe_dump(data, sort_keys=True))
    except OSError:
        pass


def load_cache(path: Path, fp: dict) -> dict | None:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or data.get("fingerprint") != fp or not isinstance(data.get("results"), dict):
        return None
    return data
