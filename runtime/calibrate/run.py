"""`specmoe calibrate`: measure this machine and write a hardware spec with measured curves.

    calibrate(out_path, model=None, base=None, quick=False, force=False, progress=True) -> HardwareSpec

writes a YAML in the schema of planner/hardware_spec.py: `gpu`/`cpu`/`link` peaks (copied from a
base spec, with this machine's facts and raised to a measurement that exceeds them) and a
`measured:` section whose curves override the peaks in the cost model. Without a CUDA GPU the CPU
stands in for the GPU (the engine runs there): `gpu` is this CPU with a third of the RAM budgeted
as device memory, the GPU GEMM curve is the CPU's fp32 one and "H2D" is a host memory copy.

The work is in three modules; this one runs the steps (`run_measurements`), ties them together
(`calibrate`) and re-exports the others' names:

    runtime/calibrate/measure.py   the measurements (listed there) and the machine facts
    runtime/calibrate/overhead.py  the engine's own stage code timed on tiny random models
    runtime/calibrate/spec.py      inputs, fingerprint, cache and output files, the spec from the results

Set OMP_WAIT_POLICY=PASSIVE before torch is imported (the CLI does): spinning OpenMP threads of an
idle pool slow the engine's small operations several-fold on shared cores, and the fixed costs
measured here are those of the engine as it runs.

Results are cached by machine fingerprint (CPU, cores, memory, GPU, torch, threads, OMP wait policy,
the sources of the kernels and the engine, the measured shapes and the mode) under
${SPECMOE_CACHE_DIR:-~/.cache/specmoe}/calibration/<fingerprint>.yaml; `force` re-measures.
Every file is written to a temporary file and renamed, so an interrupted run leaves none behind.
"""
from __future__ import annotations

import datetime
import os
import sys
import time
from typing import Any, Callable

import yaml

from specmoe.planner.errors import SpecError
from specmoe.planner.hardware_spec import HardwareSpec, parse_hardware

from specmoe.runtime.calibrate.measure import (ATTN_CONTEXTS, ATTN_NS, FULL, GB, GEMM_MS, QUICK, GiB, MiB, Settings,
                                _machine_facts, _pool_bytes, attention_backend, cpu_model_name, gpu_facts,
                                l3_bytes, make_pool, measure_cpu_attention_kv_GBps, measure_cpu_gemm_GFLOPs_by_M,
                                measure_dram_read_GBps, measure_gpu_gemm_TFLOPs_by_M, measure_hbm_copy_GBps,
                                measure_host_copy_GBps_by_chunk_MB, measure_pinned_copy_GBps_by_chunk_MB,
                                mem_available_bytes, mem_total_bytes)
from specmoe.runtime.calibrate.spec import (DEFAULT_CPU_BASE, DEFAULT_DRAFT_DIR, DEFAULT_MODEL_DIR, ENGINE_SOURCES, FALLBACK_MODEL,
                             FORMAT_VERSION, REPO_ROOT, _load_cache, _plain, _SpecDumper, atomic_write_text,
                             build_spec_raw, cache_dir, check_output_path, dump_spec_yaml, engine_configs, fingerprint,
                             kernel_source_sha, measured_shapes, resolve_base, resolve_model, resolve_model_config,
                             specmoe_version)

__all__ = [
    "ATTN_CONTEXTS", "ATTN_NS", "DEFAULT_CPU_BASE", "DEFAULT_DRAFT_DIR", "DEFAULT_MODEL_DIR", "ENGINE_SOURCES",
    "FALLBACK_MODEL", "FORMAT_VERSION", "FULL", "GB", "GEMM_MS", "GiB", "MiB", "QUICK", "REPO_ROOT", "Settings",
    "atomic_write_text", "attention_backend", "build_spec_raw", "cache_dir", "calibrate", "calibrate_with_info",
    "check_output_path", "cpu_model_name", "dump_spec_yaml", "engine_configs", "fingerprint", "gpu_facts",
    "kernel_source_sha", "l3_bytes", "make_pool", "measure_cpu_attention_kv_GBps", "measure_cpu_gemm_GFLOPs_by_M",
    "measure_dram_read_GBps", "measure_gpu_gemm_TFLOPs_by_M", "measure_hbm_copy_GBps",
    "measure_host_copy_GBps_by_chunk_MB", "measure_pinned_copy_GBps_by_chunk_MB", "measured_shapes",
    "mem_available_bytes", "mem_total_bytes", "resolve_base", "resolve_model", "resolve_model_config",
    "run_measurements", "specmoe_version",
]


# ---------------------------------------------------------------------------------------------
def run_measurements(st: Settings, shapes: dict, has_gpu: bool, progress: bool = True,
                     engine_cfgs: dict | None = None) -> dict[str, Any]:
    """All measurement steps under one tqdm bar; returns the raw results (what the cache holds).
    engine_cfgs: {"target": HF config, "drafts": {layers: HF config}} of the engine-stage step."""
    from tqdm import tqdm

    engine_dtype = "bf16" if has_gpu else "fp32"
    res: dict[str, Any] = {}
    state: dict[str, Any] = {}
    h, F, F_cpu = shapes["h"], shapes["F"], shapes["F_cpu"]

    def pool():
        state["pool"] = make_pool(_pool_bytes(st))
        res["pool_MiB"] = state["pool"].numel() * 4 // MiB

    def gemm(dtype):
        def step():
            try:
                res.setdefault("cpu_gemm_GFLOPs_by_M", {})[dtype] = measure_cpu_gemm_GFLOPs_by_M(
                    h, F_cpu, GEMM_MS, dtype, reps=st.reps, min_time_s=st.min_time_s)
            except RuntimeError as e:  # a dtype this CPU/torch cannot multiply: recorded, not fatal
                if dtype == engine_dtype:
                    raise
                res.setdefault("skipped", {})[f"cpu_gemm_{dtype}"] = str(e).splitlines()[0]
        return step

    def overheads():
        from specmoe.runtime.calibrate.overhead import measure_stage_overheads

        cfgs = engine_cfgs
        if not cfgs:
            res.setdefault("skipped", {})["stage_overheads"] = "no engine configuration for this model"
            return
        try:
            res["stage_overheads"] = measure_stage_overheads(
                cfgs["target"], {int(k): v for k, v in cfgs["drafts"].items()}, rounds=st.overhead_rounds,
                per_round=st.overhead_per_round, progress=lambda msg: bar.set_postfix_str(msg))
        except (SpecError, ValueError, NotImplementedError, RuntimeError) as e:   # a family the engine lacks
            res.setdefault("skipped", {})["stage_overheads"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"

    def probe():
        from specmoe.runtime.calibrate.speed_probe import probe_iteration_s

        if engine_cfgs and "stage_overheads" not in res.get("skipped", {}):
            try:
                for _ in range(2):       # twice before and twice after the engine-stage step: the median of four
                    res.setdefault("speed_probe_s", []).append(probe_iteration_s(engine_cfgs))
            except (SpecError, ValueError, NotImplementedError, RuntimeError) as e:
                res.setdefault("skipped", {})["speed_probe"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"

    steps: list[tuple[str, Callable[[], None]]] = [
        ("fill a cold buffer", pool),
        ("DRAM read", lambda: res.__setitem__("dram_read_GBps", measure_dram_read_GBps(
            state["pool"], reps=st.reps))),
        ("host memory copy", lambda: res.__setitem__("host_copy_GBps_by_chunk_MB", measure_host_copy_GBps_by_chunk_MB(
            state["pool"], st.chunks_MB, reps=st.reps, min_time_s=st.min_time_s))),
        ("CPU GEMM fp32", gemm("fp32")),
        ("CPU GEMM bf16", gemm("bf16")),
        ("CPU verify attention", lambda: res.__setitem__("cpu_attention_kv_GBps", measure_cpu_attention_kv_GBps(
            shapes["n_q"], shapes["n_kv"], shapes["d"], pool=state["pool"], kv_dtype=engine_dtype,
            call_bytes=st.attn_call_bytes, reps=st.reps, min_time_s=st.min_time_s))),
        ("speed probe", probe),
        ("engine stage overheads", overheads),
        ("speed probe again", probe),
        # read again at the end and keep the better: a burst of other work spoils one pass, not both
        ("DRAM read again", lambda: res.__setitem__("dram_read_GBps", max(res["dram_read_GBps"], measure_dram_read_GBps(
            state["pool"], reps=st.reps)))),
    ]
    if has_gpu:
        steps += [
            ("GPU facts", lambda: res.__setitem__("gpu_facts", gpu_facts())),
            ("pinned H2D", lambda: res.__setitem__("h2d_GBps_by_chunk_MB", measure_pinned_copy_GBps_by_chunk_MB(
                st.chunks_MB, "h2d"))),
            ("pinned D2H", lambda: res.__setitem__("d2h_GBps_by_chunk_MB", measure_pinned_copy_GBps_by_chunk_MB(
                st.chunks_MB, "d2h"))),
            ("GPU GEMM bf16", lambda: res.__setitem__("gpu_gemm_TFLOPs_by_M", measure_gpu_gemm_TFLOPs_by_M(
                h, F, st.gpu_Ms, "bf16"))),
            ("GPU GEMM fp32", lambda: res.__setitem__("gpu_fp32_gemm_TFLOPs", max(measure_gpu_gemm_TFLOPs_by_M(
                h, F, (max(st.gpu_Ms),), "fp32").values()))),
            ("HBM copy", lambda: res.__setitem__("hbm_copy_GBps", measure_hbm_copy_GBps())),
        ]
    t0 = time.perf_counter()
    res["load_avg_before"] = _load_avg()
    bar = tqdm(total=len(steps), desc="specmoe calibrate", unit="step", disable=not progress, file=sys.stderr,
               leave=True, bar_format="{desc}: {n}/{total} |{bar}| {elapsed} {postfix}")
    try:
        for name, fn in steps:
            bar.set_postfix_str(name)
            fn()
            bar.update(1)
    finally:
        bar.close()
        state.clear()
    res["elapsed_s"] = round(time.perf_counter() - t0, 1)
    res["load_avg_after"] = _load_avg()
    return res


def _load_avg() -> float | None:
    """1-minute load average: above the core count, other processes were competing for the CPU."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def calibrate_with_info(out_path, model=None, base=None, quick: bool = False, force: bool = False,
                        progress: bool = True, cache_dir_override=None) -> tuple[HardwareSpec, dict]:
    """calibrate(), also returning {"cache_path", "cache_hit", "elapsed_s", "mode"}."""
    t0 = time.perf_counter()
    out = check_output_path(out_path)
    model_label, mspec = resolve_model(model)
    st = QUICK if quick else FULL
    shapes = measured_shapes(mspec, st)
    base_raw, base_label = (resolve_base(base), str(base)) if base is not None else (None, None)
    facts = _machine_facts()
    has_gpu = facts["gpu_name"] is not None
    if base_raw is None and not has_gpu:
        base_raw, base_label = resolve_base(DEFAULT_CPU_BASE), DEFAULT_CPU_BASE
    cdir = cache_dir(cache_dir_override)
    cached, cache_path, hit = None, None, False
    # a full measurement also answers a quick request
    for s in ((FULL, QUICK) if quick else (FULL,)):
        fid, fp = fingerprint(facts, measured_shapes(mspec, s), s.mode)
        if not force and (c := _load_cache(cdir / f"{fid}.yaml", fp)) is not None:
            cached, cache_path, hit = c, cdir / f"{fid}.yaml", True
            break
    if cached is None:
        fid, fp = fingerprint(facts, shapes, st.mode)
        facts = {**facts, "attention_backend": attention_backend()}
        results = run_measurements(st, shapes, has_gpu, progress=progress,
                                   engine_cfgs=engine_configs(resolve_model_config(model)))
        cached = {"fingerprint": fp, "fingerprint_id": fid, "measured_at": datetime.date.today().isoformat(),
                  "mode": st.mode, "model": model_label, "facts": facts, "shapes": shapes,
                  "results": _plain(results)}
        cache_path = cdir / f"{fid}.yaml"
        try:
            cdir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(cache_path, yaml.dump(cached, Dumper=_SpecDumper, sort_keys=False, width=120))
        except OSError:
            cache_path = None  # an unwritable cache only costs a re-measure next time
    raw = build_spec_raw(cached, base_raw, base_label, out.stem)
    text = dump_spec_yaml(raw)
    parse_hardware(yaml.safe_load(text), str(out))  # validate exactly what is written, before writing it
    atomic_write_text(out, text)
    spec = HardwareSpec.from_yaml(out)
    return spec, {"cache_path": str(cache_path) if cache_path else None, "cache_hit": hit,
                  "elapsed_s": round(time.perf_counter() - t0, 1), "mode": cached["mode"]}


def calibrate(out_path, model=None, base=None, quick: bool = False, force: bool = False,
              progress: bool = True, cache_dir_override=None) -> HardwareSpec:
    """Measure this machine (or reuse the cached measurement) and write a hardware spec to out_path.

    model: a preset name or a config.json path (default: models/tiny-moe, else mixtral-8x7b shapes
    scaled to fit). base: a preset or spec YAML whose gpu/cpu/link peaks are copied (default
    devbox-2core without a GPU; with a GPU and no base the measured peaks are used). quick: ~20 s
    on 2 cores instead of <= 2 min. force: re-measure even if the cache holds this machine.
    Bad input raises SpecError before anything is measured; an interruption leaves no file.
    """
    return calibrate_with_info(out_path, model, base, quick, force, progress, cache_dir_override)[0]
