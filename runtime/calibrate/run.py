"""`specmoe calibrate`: measure this machine and write a hardware spec with measured curves.

    calibrate(out_path, model=None, base=None, quick=False, force=False, progress=True) -> HardwareSpec

writes a YAML in the schema of planner/hardware_spec.py: `gpu`/`cpu`/`link` peaks (copied from a
base spec, with this machine's facts and raised to a measurement that exceeds them) and a
`measured:` section whose curves override the peaks in the cost model. Without a CUDA GPU the CPU
stands in for the GPU (the engine runs there): `gpu` is this CPU with a third of the RAM budgeted
as device memory, the GPU GEMM curve is the CPU's fp32 one and "H2D" is a host memory copy.

The work is in four modules; this one runs the steps (`run_measurements`), ties them together
(`calibrate`) and re-exports the others' names:

    runtime/calibrate/measure.py   the measurements (listed there) and the machine facts
    runtime/calibrate/contention.py  host DRAM shared by the expert stream and verify attention (GPU hosts)
    runtime/calibrate/overhead.py  the engine's own stage code timed on tiny random models
    runtime/calibrate/overhead_fit.py  the fixed costs per stage invocation fitted to those times
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

import copy
import datetime
import os
import sys
import time
from typing import Any, Callable

import yaml

from specmoe.planner.errors import SpecError
from specmoe.planner.hardware_spec import HardwareSpec, parse_hardware

from specmoe.runtime.calibrate.measure import (ATTN_CONTEXTS, ATTN_NS, FULL, GB, GEMM_MS, QUICK, GiB, MiB, Settings,
                                               attention_backend, gpu_facts, l3_bytes, make_pool, verify_paths,
                                               measure_cpu_attention_kv_GBps, measure_cpu_gemm_GFLOPs_by_M,
                                               measure_dram_read_GBps, measure_gpu_gemm_TFLOPs_by_M,
                                               measure_hbm_copy_GBps, measure_host_copy_GBps_by_chunk_MB,
                                               measure_pinned_copy_GBps_by_chunk_MB, mem_available_bytes,
                                               mem_total_bytes, pool_bytes)
from specmoe.runtime.calibrate.spec import (DEFAULT_CPU_BASE, DEFAULT_DRAFT_DIR, DEFAULT_MODEL_DIR, ENGINE_SOURCES,
                                            FALLBACK_MODEL, FORMAT_VERSION, REPO_ROOT, SpecDumper, atomic_write_text,
                                            build_spec_raw, cache_dir, check_output_path, dump_spec_yaml,
                                            engine_configs, fingerprint, kernel_source_sha, load_cache,
                                            load_best_sentinel, measured_shapes, plain, resolve_base,
                                            resolve_model, save_best_sentinel,
                                            resolve_model_config, specmoe_version)
from specmoe.runtime.calibrate.quiet import strict
from specmoe.runtime.device import cpu_model_name

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
                     engine_cfgs: dict | None = None, best_sentinel_s: float | None = None) -> dict[str, Any]:
    """All measurement steps under one tqdm bar; returns the raw results (what the cache holds).
    engine_cfgs: {"target": HF config, "drafts": {layers: HF config}} of the engine-stage step.
    Each CPU step runs under a QuietGuard (runtime/calibrate/quiet.py): repeated while the machine was
    busy or in a slow spell; best_sentinel_s is the fastest sentinel earlier calibrations saw here."""
    from tqdm import tqdm

    from specmoe.runtime.calibrate.quiet import QuietGuard, machine_state

    m = _Measurements(st, shapes, has_gpu, engine_cfgs)
    steps = m.steps()
    guard = QuietGuard(best_sentinel_s, max_tries=st.max_tries, retry_budget_s=st.retry_budget_s)
    t0 = time.perf_counter()
    m.res["load_avg_before"] = _load_avg()
    m.res["state_before"] = machine_state()
    bar = tqdm(total=len(steps), desc="specmoe calibrate", unit="step", disable=not progress, file=sys.stderr,
               leave=True, bar_format="{desc}: {n}/{total} |{bar}| {elapsed} {postfix}")
    m.note = bar.set_postfix_str
    try:
        guard.warm_up()
        for name, fn in steps:
            bar.set_postfix_str(name)
            if name in UNGUARDED_STEPS:
                fn()
            else:
                m.res.setdefault("quality", {})[name] = guard.run(fn, m.snapshot, m.restore)
            bar.update(1)
    finally:
        bar.close()
        m.pool = None
    m.res["elapsed_s"] = round(time.perf_counter() - t0, 1)
    m.res["load_avg_after"] = _load_avg()
    m.res["state_after"] = machine_state()
    m.res["sentinel"] = {"best_s": guard.best_s, "samples_s": guard.samples, "retry_s": round(guard.retry_s, 1)}
    return m.res


# steps that are not timings of the CPU (the GPU ones time themselves with CUDA events, steady there)
UNGUARDED_STEPS = frozenset({"fill a cold buffer", "GPU facts", "pinned H2D", "pinned D2H", "GPU GEMM bf16",
                             "GPU GEMM fp32", "HBM copy"})


class _Measurements:
    """The calibration's steps, in order, writing into one results mapping `res` (what the cache holds);
    the cold buffer `pool` is shared by the CPU steps. `note` shows a step's progress (the bar's postfix)."""

    def __init__(self, st: Settings, shapes: dict, has_gpu: bool, engine_cfgs: dict | None):
        self.st, self.shapes, self.has_gpu, self.engine_cfgs = st, shapes, has_gpu, engine_cfgs
        self.engine_dtype = "bf16" if has_gpu else "fp32"
        self.res: dict[str, Any] = {}
        self.pool = None
        self.note: Callable[[str], Any] = lambda msg: None

    def snapshot(self) -> dict[str, Any]:
        """A copy of the results so far (a repeated step starts again from it)."""
        return copy.deepcopy(self.res)

    def restore(self, snap: dict[str, Any]) -> None:
        quality = self.res.get("quality")
        self.res = copy.deepcopy(snap)
        if quality is not None:
            self.res["quality"] = quality

    def steps(self) -> list[tuple[str, Callable[[], None]]]:
        """(name, step) in the order they run: the CPU and engine steps, then the GPU ones."""
        steps: list[tuple[str, Callable[[], None]]] = [
            ("fill a cold buffer", self.fill_pool),
            ("DRAM read", self.dram_read),
            ("host memory copy", self.host_copy),
            ("CPU GEMM fp32", self.cpu_gemm("fp32")),
            ("CPU GEMM bf16", self.cpu_gemm("bf16")),
            ("CPU verify attention", self.cpu_attention),
            ("speed probe", self.speed_probe),
            ("engine stage overheads", self.stage_overheads),
            ("speed probe again", self.speed_probe),
            ("DRAM read again", self.dram_read_again),
        ]
        if self.has_gpu:
            steps += [
                ("GPU facts", self.read_gpu_facts),
                ("pinned H2D", self.pinned_copy("h2d")),
                ("pinned D2H", self.pinned_copy("d2h")),
                ("DRAM shared by H2D and attention", self.dram_contention),
                ("GPU GEMM bf16", self.gpu_gemm_bf16),
                ("GPU GEMM fp32", self.gpu_gemm_fp32),
                ("HBM copy", self.hbm_copy),
            ]
        return steps

    def fill_pool(self) -> None:
        self.pool = make_pool(pool_bytes(self.st))
        self.res["pool_MiB"] = self.pool.numel() * 4 // MiB

    def dram_read(self) -> None:
        self.res["dram_read_GBps"] = measure_dram_read_GBps(self.pool, reps=self.st.reps)

    def dram_read_again(self) -> None:
        """Read again at the end and keep the better: a burst of other work spoils one pass, not both."""
        self.res["dram_read_GBps"] = max(self.res["dram_read_GBps"], measure_dram_read_GBps(self.pool, reps=self.st.reps))

    def _spread(self, name: str, by_point: dict) -> None:
        """Record the largest spread of a step's repetitions (quiet.py's estimators)."""
        if by_point:
            self.res.setdefault("spread", {})[name] = max(by_point.values())

    def host_copy(self) -> None:
        sp: dict = {}
        self.res["host_copy_GBps_by_chunk_MB"] = measure_host_copy_GBps_by_chunk_MB(
            self.pool, self.st.chunks_MB, reps=self.st.reps, min_time_s=self.st.min_time_s, spread_out=sp)
        self._spread("host memory copy", sp)

    def cpu_gemm(self, dtype: str) -> Callable[[], None]:
        def step():
            sp: dict = {}
            try:
                self.res.setdefault("cpu_gemm_GFLOPs_by_M", {})[dtype] = measure_cpu_gemm_GFLOPs_by_M(
                    self.shapes["h"], self.shapes["F_cpu"], GEMM_MS, dtype, reps=self.st.reps,
                    min_time_s=self.st.min_time_s, spread_out=sp)
                self._spread(f"CPU GEMM {dtype}", sp)
            except RuntimeError as e:  # a dtype this CPU/torch cannot multiply: recorded, not fatal
                if dtype == self.engine_dtype:
                    raise
                self.res.setdefault("skipped", {})[f"cpu_gemm_{dtype}"] = str(e).splitlines()[0]
        return step

    def cpu_attention(self) -> None:
        sh, st, sp = self.shapes, self.st, {}
        self.res["cpu_attention_kv_GBps"] = measure_cpu_attention_kv_GBps(
            sh["n_q"], sh["n_kv"], sh["d"], pool=self.pool, kv_dtype=self.engine_dtype,
            call_bytes=st.attn_call_bytes, reps=st.reps, min_time_s=st.min_time_s, spread_out=sp)
        self._spread("CPU verify attention", sp)

    def stage_overheads(self) -> None:
        from specmoe.runtime.calibrate.overhead import measure_stage_overheads
        from specmoe.runtime.calibrate.prefill import ROUNDS as PREFILL_ROUNDS, measure_prefills

        cfgs, res = self.engine_cfgs, self.res
        if not cfgs:
            res.setdefault("skipped", {})["stage_overheads"] = "no engine configuration for this model"
            return
        try:
            so = measure_stage_overheads(
                cfgs["target"], {int(k): v for k, v in cfgs["drafts"].items()}, rounds=self.st.overhead_rounds,
                per_round=self.st.overhead_per_round, progress=lambda msg: self.note(msg))
            dcfgs = so["draft_configs"]     # the prefill passes run with the deepest draft model and the EAGLE head
            drafts = {**({"model": dcfgs[max(dcfgs)]} if dcfgs else {}),
                      **({"eagle": so["eagle_config"]} if so.get("eagle_config") else {})}
            so["prefill"] = measure_prefills(   # fitted with the stage overheads (overhead_fit)
                cfgs["target"], drafts, rounds=min(self.st.overhead_rounds, PREFILL_ROUNDS),
                progress=lambda msg: self.note(msg))
            res["stage_overheads"] = so
        except (SpecError, ValueError, NotImplementedError, RuntimeError) as e:   # a family the engine lacks
            res.setdefault("skipped", {})["stage_overheads"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"

    def speed_probe(self) -> None:
        from specmoe.runtime.calibrate.speed_probe import probe_iteration_s

        res = self.res
        if self.engine_cfgs and "stage_overheads" not in res.get("skipped", {}):
            try:
                for _ in range(2):       # twice before and twice after the engine-stage step: the median of four
                    res.setdefault("speed_probe_s", []).append(probe_iteration_s(self.engine_cfgs))
            except (SpecError, ValueError, NotImplementedError, RuntimeError) as e:
                res.setdefault("skipped", {})["speed_probe"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"

    def read_gpu_facts(self) -> None:
        self.res["gpu_facts"] = gpu_facts()

    def pinned_copy(self, direction: str) -> Callable[[], None]:
        def step():
            self.res[f"{direction}_GBps_by_chunk_MB"] = measure_pinned_copy_GBps_by_chunk_MB(self.st.chunks_MB, direction)
        return step

    def dram_contention(self) -> None:
        """Verify attention's KV GB/s and pinned H2D GB/s, each alone and beside the other
        (runtime/calibrate/contention.py)."""
        from specmoe.runtime.calibrate.contention import measure_dram_contention

        sh, st = self.shapes, self.st
        self.res["dram_contention"] = measure_dram_contention(sh["n_q"], sh["n_kv"], sh["d"], pool=self.pool,
                                                              kv_dtype=self.engine_dtype,
                                                              call_bytes=st.attn_call_bytes, reps=st.reps)

    def gpu_gemm_bf16(self) -> None:
        self.res["gpu_gemm_TFLOPs_by_M"] = measure_gpu_gemm_TFLOPs_by_M(
            self.shapes["h"], self.shapes["F"], self.st.gpu_Ms, "bf16")

    def gpu_gemm_fp32(self) -> None:
        self.res["gpu_fp32_gemm_TFLOPs"] = max(measure_gpu_gemm_TFLOPs_by_M(
            self.shapes["h"], self.shapes["F"], (max(self.st.gpu_Ms),), "fp32").values())

    def hbm_copy(self) -> None:
        self.res["hbm_copy_GBps"] = measure_hbm_copy_GBps()


def _machine_facts() -> dict[str, Any]:
    """The facts of this machine that key the calibration cache (with torch's version and threads)."""
    import torch

    has_gpu = bool(torch.cuda.is_available())
    return {"cpu_name": cpu_model_name(), "cores": os.cpu_count() or 1, "mem_total_bytes": mem_total_bytes(),
            "gpu_name": torch.cuda.get_device_name() if has_gpu else None, "torch": str(torch.__version__),
            "threads": torch.get_num_threads()}


def _load_avg() -> float | None:
    """1-minute load average: above the core count, other processes were competing for the CPU."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def calibrate_with_info(out_path, model=None, base=None, quick: bool = False, force: bool = False,
                        progress: bool = True, cache_dir_override=None) -> tuple[HardwareSpec, dict]:
    """calibrate(), also returning {"cache_path", "cache_hit", "elapsed_s", "mode", "quality"} (quality:
    the measured spec's calibration_quality, None for a spec measured before quality was recorded)."""
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
        if not force and (c := load_cache(cdir / f"{fid}.yaml", fp)) is not None:
            cached, cache_path, hit = c, cdir / f"{fid}.yaml", True
            break
    if cached is None:
        cached, cache_path = _measure(st, facts, shapes, mspec, model, model_label, has_gpu, cdir, progress)
    raw = build_spec_raw(cached, base_raw, base_label, out.stem)
    text = dump_spec_yaml(raw)
    parse_hardware(yaml.safe_load(text), str(out))  # validate exactly what is written, before writing it
    atomic_write_text(out, text)
    spec = HardwareSpec.from_yaml(out)
    return spec, {"cache_path": str(cache_path) if cache_path else None, "cache_hit": hit,
                  "elapsed_s": round(time.perf_counter() - t0, 1), "mode": cached["mode"],
                  "quality": (spec.raw["measured"].get("details") or {}).get("calibration_quality")}


def _measure(st: Settings, facts: dict, shapes: dict, mspec, model, model_label: str, has_gpu: bool, cdir,
             progress: bool) -> tuple[dict, Any]:
    """Run the measurements; cache them when every step was clean (a calibration taken in a busy spell is
    not reused: the next one measures again). Returns (cached mapping, cache path or None)."""
    fid, fp = fingerprint(facts, shapes, st.mode)
    facts = {**facts, "attention_backend": attention_backend("bf16" if has_gpu else "fp32"),
             "verify_paths": verify_paths()}
    sentinel_key = f"{facts['cpu_name']}|{facts['cores']}|{facts['threads']}|{facts['torch']}"
    best = load_best_sentinel(cdir, sentinel_key)
    results = run_measurements(st, shapes, has_gpu, progress=progress,
                               engine_cfgs=engine_configs(resolve_model_config(model)), best_sentinel_s=best)
    cached = {"fingerprint": fp, "fingerprint_id": fid, "measured_at": datetime.date.today().isoformat(),
              "mode": st.mode, "model": model_label, "facts": facts, "shapes": shapes, "results": plain(results)}
    new_best = (results.get("sentinel") or {}).get("best_s")
    if new_best and (best is None or new_best < best):
        save_best_sentinel(cdir, sentinel_key, new_best)
    if strict() and not all(q.get("clean", True) for q in results.get("quality", {}).values()):
        return cached, None
    cache_path = cdir / f"{fid}.yaml"
    try:
        cdir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache_path, yaml.dump(cached, Dumper=SpecDumper, sort_keys=False, width=120))
    except OSError:
        cache_path = None  # an unwritable cache only costs a re-measure next time
    return cached, cache_path


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
