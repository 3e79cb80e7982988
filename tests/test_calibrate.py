"""`specmoe calibrate` (runtime/calibrate/run.py, runtime/cli/calibrate.py).

One real `--quick` calibration is run per module (shared by the tests below); the other tests
measure small things directly or check the inputs, the cache and the file handling. Timing
numbers are only checked for plausibility: the machine may be shared with other work.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml

from specmoe.planner.errors import SpecError
from specmoe.planner.hardware_spec import HardwareSpec, parse_hardware
from specmoe.runtime.calibrate import run as cal
from specmoe.runtime.cli.main import main as cli_main


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("calibrate")
    out = d / "box.yaml"
    t0 = time.perf_counter()
    with pytest.MonkeyPatch.context() as mp:   # the cache is checked below: keep it even if this machine was busy
        mp.setenv("SPECMOE_CALIBRATE_STRICT", "0")
        spec, info = cal.calibrate_with_info(out, quick=True, force=True, progress=False,
                                             cache_dir_override=d / "cache")
    return {"dir": d, "out": out, "spec": spec, "info": info, "text": out.read_text(),
            "elapsed_s": time.perf_counter() - t0}


def _positive_curve(c) -> None:
    assert c is not None and len(c.xs) >= 3
    assert all(y > 0 for y in c.ys) and all(x > 0 for x in c.xs)


def test_quick_run_writes_a_loadable_plausible_spec(quick_run):
    spec = HardwareSpec.from_yaml(quick_run["out"])
    assert spec.name == "box"
    m = spec.measured
    assert "specmoe calibrate" in m.source
    assert 1.0 <= m.dram_read_GBps <= 500.0
    assert m.hbm_copy_GBps > 0
    for c in (m.h2d_GBps_by_chunk_MB, m.gpu_gemm_TFLOPs_by_M, m.cpu_gemm_GFLOPs_by_M):
        _positive_curve(c)
    gemm = dict(zip(m.cpu_gemm_GFLOPs_by_M.xs, m.cpu_gemm_GFLOPs_by_M.ys))
    assert sorted(gemm) == [float(M) for M in cal.GEMM_MS]
    assert gemm[64] > gemm[1], gemm  # a GEMM of 64 rows runs faster per flop than a GEMV
    assert sorted(m.cpu_attention_kv_GBps) == list(cal.ATTN_NS)
    for n, c in m.cpu_attention_kv_GBps.items():
        assert c.xs == tuple(float(s) for s in cal.ATTN_CONTEXTS)
        assert all(0 < y < 1000 for y in c.ys), (n, c)
    assert spec.cpu.cores == os.cpu_count()
    assert spec.cpu.mem_bytes > 0 and spec.gpu.mem_bytes > 0
    if not torch.cuda.is_available():
        assert spec.gpu.name == "CPU standing in for the GPU"
        # the stand-in GPU's GEMM curve is the CPU's fp32 one, in TFLOP/s
        assert m.gpu_gemm_TFLOPs_by_M.ys == pytest.approx([y / 1e3 for y in m.cpu_gemm_GFLOPs_by_M.ys], rel=1e-3)
    # the speed probe ran before and after the engine-stage step; its fastest is what runs are compared with
    from specmoe.runtime.calibrate.speed_probe import calibration_probe_s

    probe = spec.raw["measured"]["details"]["speed_probe"]
    # each sample is one timed probe (about 0.45 s on this 2-core VM when quiet, 1 s under load): positive
    # and finite; its speed is a benchmark's business, not this test's
    assert len(probe["samples_s"]) == 4 and all(0 < x < 60 for x in probe["samples_s"])
    assert calibration_probe_s(spec.raw) == pytest.approx(min(probe["samples_s"]), rel=2e-3)   # the fast state
    # the engine's prefill passes were timed at every configuration, once with a draft model and once with an
    # EAGLE head, with their stages, and fitted into the prefill keys of each target stage, of each kind of
    # draft's own prefill and of the rest
    from specmoe.planner.overhead import PREFILL_DRAFT_KEYS, PREFILL_PART_KEYS
    from specmoe.runtime.calibrate.prefill import PREFILL_CONFIGS

    pre = spec.raw["measured"]["details"]["stage_overheads"]["prefill"]
    assert [(c["B"], c["P"], c["draft"]) for c in pre["configs"]] == [
        (B, P, kind) for B, P in PREFILL_CONFIGS for kind in ("model", "eagle")]
    assert all(c["measured_ms"] > 0 and c["model_ms"] > 0 for c in pre["configs"])
    keys = [key.value for group in (*PREFILL_PART_KEYS.values(), *PREFILL_DRAFT_KEYS.values()) for key in group]
    assert all(m.stage_overhead_us[key] >= 0.0 for key in keys)
    assert set(pre["parts"]) == set(PREFILL_PART_KEYS) | {keys[0].value for keys in PREFILL_DRAFT_KEYS.values()}
    # the progress bar's steps all ran and no temporary file was left beside the output
    assert sorted(p.name for p in quick_run["dir"].iterdir()) == ["box.yaml", "cache"]
    umask = os.umask(0)
    os.umask(umask)
    assert quick_run["out"].stat().st_mode & 0o777 == 0o666 & ~umask  # a normal file, not mkstemp's 0600


def _no_measurement(monkeypatch) -> list:
    """Every measurement step of the calibration records its call here (and measures nothing)."""
    calls: list = []

    def stop(name):
        def f(*a, **kw):
            calls.append(name)
            raise RuntimeError(f"{name} was called")
        return f

    for name in ("make_pool", "measure_dram_read_GBps", "measure_cpu_gemm_GFLOPs_by_M",
                 "measure_cpu_attention_kv_GBps", "measure_host_copy_GBps_by_chunk_MB"):
        monkeypatch.setattr(cal, name, stop(name))
    return calls


def test_second_call_hits_the_cache_with_the_same_content(quick_run, monkeypatch):
    out = quick_run["out"]
    calls = _no_measurement(monkeypatch)
    spec, info = cal.calibrate_with_info(out, quick=True, progress=False, cache_dir_override=quick_run["dir"] / "cache")
    assert info["cache_hit"] and info["cache_path"] == quick_run["info"]["cache_path"]
    assert calls == []                         # nothing measured: the cached numbers are reused
    assert out.read_text() == quick_run["text"]
    assert spec.content_sha256 == quick_run["spec"].content_sha256


def test_full_measurement_in_the_cache_answers_a_quick_request(quick_run, tmp_path):
    # make the quick cache entry look like a full one of this machine: a quick request must take it
    cached = yaml.safe_load(Path(quick_run["info"]["cache_path"]).read_text())
    _, mspec = cal.resolve_model(None)
    facts = cal._machine_facts()
    fid, fp = cal.fingerprint(facts, cal.measured_shapes(mspec, cal.FULL), "full")
    cached.update(fingerprint=fp, fingerprint_id=fid, mode="full")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / f"{fid}.yaml").write_text(yaml.safe_dump(cached))
    spec, info = cal.calibrate_with_info(tmp_path / "x.yaml", quick=True, progress=False,
                                         cache_dir_override=tmp_path / "cache")
    assert info["cache_hit"] and info["mode"] == "full"
    assert "full mode" in spec.measured.source


def test_fingerprint_depends_on_shapes_and_mode():
    facts = cal._machine_facts()
    _, mspec = cal.resolve_model("mixtral-8x7b")
    a = cal.fingerprint(facts, cal.measured_shapes(mspec, cal.FULL), "full")[0]
    b = cal.fingerprint(facts, cal.measured_shapes(mspec, cal.QUICK), "quick")[0]
    c = cal.fingerprint(facts, cal.measured_shapes(cal.resolve_model("olmoe-1b-7b")[1], cal.FULL), "full")[0]
    assert len({a, b, c}) == 3
    assert a == cal.fingerprint(facts, cal.measured_shapes(mspec, cal.FULL), "full")[0]


def test_fingerprint_covers_the_engine_sources_that_exist():
    """Every engine source the calibration cache is keyed on exists (a moved file would otherwise hash
    as "missing" and its edits would never invalidate a cached calibration), and so do the bundled
    models the engine-stage measurement runs."""
    from specmoe.runtime.calibrate.spec import DEFAULT_DRAFT_DIR, DEFAULT_MODEL_DIR, ENGINE_SOURCES, REPO_ROOT

    missing = [f for f in ENGINE_SOURCES if not (REPO_ROOT / "runtime" / f).is_file()]
    assert not missing, missing
    # the kernel's parts (#include "...") are hashed with it: the glob in kernel_source_sha finds them all
    csrc = REPO_ROOT / "runtime" / "kernels" / "csrc"
    parts = [line.split('"')[1] for line in (csrc / "verify_attention.cpp").read_text().splitlines()
             if line.startswith('#include "')]
    assert parts and all(p.startswith("verify_attention") and (csrc / p).is_file() for p in parts), parts
    assert (DEFAULT_MODEL_DIR / "config.json").is_file() and (DEFAULT_DRAFT_DIR / "config.json").is_file()


def test_cpu_gemm_shape_is_scaled_to_fit():
    _, mspec = cal.resolve_model("mixtral-8x7b")
    for st in (cal.FULL, cal.QUICK):
        sh = cal.measured_shapes(mspec, st)
        assert sh["F"] == 14336 and sh["h"] == 4096 and (sh["n_q"], sh["n_kv"], sh["d"]) == (32, 8, 128)
        assert sh["h"] * sh["F_cpu"] * 4 <= st.cpu_gemm_weight_max_bytes < sh["h"] * sh["F_cpu"] * 8


def test_interrupted_run_leaves_no_file(tmp_path, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cal, "measure_host_copy_GBps_by_chunk_MB", interrupted)
    out = tmp_path / "spec.yaml"
    with pytest.raises(KeyboardInterrupt):
        cal.calibrate(out, quick=True, force=True, progress=False, cache_dir_override=tmp_path / "cache")
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no spec, no temporary file, no cache entry
    # an existing spec is left as it was
    out.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        cal.calibrate(out, quick=True, force=True, progress=False, cache_dir_override=tmp_path / "cache")
    assert out.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["spec.yaml"]


def test_interrupted_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "a.yaml"
    target.write_text("old")

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(cal.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cal.atomic_write_text(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.yaml"]


@pytest.mark.parametrize("args, field", [
    (["--base", "no-such-machine"], "--base"),
    (["--model", "no-such-model"], "--model"),
    (["--model", "__FILE__"], "--model"),          # a file that is not a config.json
    (["-o", "__DIR__/missing/x.yaml"], "-o"),      # directory does not exist
    (["-o", "__FILE__/x.yaml"], "-o"),             # parent is a file
    (["-o", "__DIR__/x.json"], "-o"),              # not a .yaml
])
def test_cli_bad_input_exits_2_with_one_line(args, field, tmp_path, capsys, monkeypatch):
    calls = _no_measurement(monkeypatch)
    f = tmp_path / "not-a-config.txt"
    f.write_text("hello")
    argv = ["calibrate", "-o", str(tmp_path / "out.yaml"), "--quick", "--no-progress"]
    argv += [a.replace("__DIR__", str(tmp_path)).replace("__FILE__", str(f)) for a in args]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"error: {field}:" in err and "Traceback" not in err
    assert calls == []                          # rejected before anything is measured
    assert not (tmp_path / "out.yaml").exists()


def test_cli_prints_the_numbers(quick_run, capsys):
    d = quick_run["dir"]
    # the cache of the module's quick run is found through SPECMOE_CACHE_DIR
    env_dir = d / "env"
    (env_dir / "calibration").mkdir(parents=True)
    shutil.copy(quick_run["info"]["cache_path"], env_dir / "calibration")
    old = os.environ.get("SPECMOE_CACHE_DIR")
    os.environ["SPECMOE_CACHE_DIR"] = str(env_dir)
    try:
        assert cli_main(["calibrate", "-o", str(d / "cli.yaml"), "--quick", "--no-progress"]) == 0
    finally:
        if old is None:
            os.environ.pop("SPECMOE_CACHE_DIR")
        else:
            os.environ["SPECMOE_CACHE_DIR"] = old
    text = capsys.readouterr().out
    assert "cached measurement" in text and "DRAM read" in text and "q16" in text
    # the prefill passes' line: each configuration and how far the fitted model is off them
    pre = next(line for line in text.splitlines() if "prefill passes (" in line)
    assert "8x12, 4x64, 32x24, 20x64 prompts x tokens" in pre and "off them with the prefill keys" in pre
    HardwareSpec.from_yaml(d / "cli.yaml")


def test_small_measurements_return_positive_numbers():
    pool = cal.make_pool(64 * cal.MiB)
    assert pool.numel() == 16 * cal.MiB and -1 <= float(pool.min()) and float(pool.max()) < 1
    assert cal.measure_dram_read_GBps(pool, reps=2) > 0
    copy = cal.measure_host_copy_GBps_by_chunk_MB(pool, (1, 16, 4096), reps=1, min_time_s=0.01)
    assert sorted(copy) == [1, 16] and all(v > 0 for v in copy.values())  # 4096 MB does not fit the pool
    gemm = cal.measure_cpu_gemm_GFLOPs_by_M(96, 80, (1, 3, 17), "fp32", reps=1, min_time_s=0.001)
    assert sorted(gemm) == [1, 3, 17] and all(v > 0 for v in gemm.values())
    att = cal.measure_cpu_attention_kv_GBps(6, 2, 24, pool=pool, ns=(1, 3), contexts=(40, 100), kv_dtype="bf16",
                                            call_bytes=cal.MiB, reps=1, min_time_s=0.002)
    assert sorted(att) == [1, 3] and all(sorted(c) == [40, 100] and min(c.values()) > 0 for c in att.values())
    with pytest.raises(ValueError, match="multiple"):
        cal.measure_cpu_attention_kv_GBps(6, 4, 24, pool=pool)


def _synthetic_cache(gpu: bool) -> dict:
    """Results of the shape run_measurements returns, with fixed numbers (tests the assembly alone)."""
    r = {"dram_read_GBps": 60.0, "host_copy_GBps_by_chunk_MB": {1: 10.0, 64: 20.0},
         "cpu_gemm_GFLOPs_by_M": {"fp32": {1: 50.0, 64: 900.0}, "bf16": {1: 30.0, 64: 3000.0}},
         "cpu_attention_kv_GBps": {1: {512: 30.0, 8192: 40.0}, 16: {512: 5.0, 8192: 6.0}}, "pool_MiB": 1024}
    if gpu:
        r.update(gpu_facts={"name": "NVIDIA H200", "mem_GiB": 139.8, "free_GiB": 139.0},
                 h2d_GBps_by_chunk_MB={1: 36.0, 256: 55.4}, d2h_GBps_by_chunk_MB={1: 38.0, 256: 55.2},
                 gpu_gemm_TFLOPs_by_M={1: 2.3, 4096: 753.0}, gpu_fp32_gemm_TFLOPs=50.0, hbm_copy_GBps=4173.0)
    facts = {"cpu_name": "Test CPU", "cores": 16, "mem_total_bytes": 128 * cal.GiB,
             "gpu_name": "NVIDIA H200" if gpu else None, "torch": "x", "threads": 16,
             "attention_backend": "cpp-openmp"}
    return {"fingerprint": {}, "fingerprint_id": "f", "measured_at": "2026-01-01", "mode": "full", "model": "m",
            "facts": facts, "shapes": {"h": 4096, "F": 14336, "F_cpu": 3584, "n_q": 32, "n_kv": 8, "d": 128},
            "results": r}


def test_spec_assembly_with_a_gpu_and_a_base():
    base = cal.resolve_base("h200-host")
    raw = cal.build_spec_raw(_synthetic_cache(True), base, "h200-host", "gpu-box")
    spec = parse_hardware(yaml.safe_load(cal.dump_spec_yaml(raw)), "gpu-box.yaml")
    assert spec.gpu.name == "NVIDIA H200" and spec.gpu.mem_bytes == pytest.approx(139.8 * 2**30)
    assert not spec.gpu.shares_host_cpu
    assert spec.gpu.peak_flops["bf16"] == pytest.approx(989e12)          # datasheet peak kept
    assert spec.gpu.hbm_Bps == pytest.approx(4800e9)
    assert spec.link.h2d_Bps == pytest.approx(55.4e9)
    assert spec.cpu.cores == 16 and spec.cpu.mem_bytes == pytest.approx(128 * 2**30)
    assert spec.measured.gpu_gemm_TFLOPs_by_M(4096) == pytest.approx(753.0)
    assert spec.measured.cpu_gemm_GFLOPs_by_M(64) == pytest.approx(3000.0)  # bf16 on a GPU host
    assert spec.measured.h2d_GBps_by_chunk_MB(256) == pytest.approx(55.4)
    assert spec.measured.hbm_copy_GBps == pytest.approx(4173.0)
    assert spec.measured.cpu_attention_GBps(16, 8192) == pytest.approx(6.0)


def test_spec_assembly_with_a_gpu_and_no_base_uses_measured_peaks():
    raw = cal.build_spec_raw(_synthetic_cache(True), None, None, "gpu-box")
    spec = parse_hardware(yaml.safe_load(cal.dump_spec_yaml(raw)), "gpu-box.yaml")
    assert spec.gpu.peak_flops == {"bf16": pytest.approx(753e12), "fp32": pytest.approx(50e12)}
    assert spec.gpu.hbm_Bps == pytest.approx(4173e9) and spec.cpu.dram_Bps == pytest.approx(60e9)
    assert spec.link.d2h_Bps == pytest.approx(55.2e9)
    assert spec.cpu.peak_flops["bf16"] == pytest.approx(3e12)


def test_spec_assembly_without_gpu_raises_base_peaks_to_measurements():
    base = cal.resolve_base("devbox-2core")
    raw = cal.build_spec_raw(_synthetic_cache(False), base, "devbox-2core", "cpu-box")
    spec = parse_hardware(yaml.safe_load(cal.dump_spec_yaml(raw)), "cpu-box.yaml")
    assert spec.gpu.name == "CPU standing in for the GPU"
    assert spec.gpu.shares_host_cpu                                     # the simulator overlaps nothing
    assert spec.gpu.mem_bytes + spec.cpu.mem_bytes < 128 * 2**30
    assert spec.cpu.dram_Bps == pytest.approx(60e9)                    # 60 measured > 26.4 in the base
    assert spec.cpu.peak_flops["fp32"] == pytest.approx(0.9e12)        # 900 GFLOP/s > 176
    assert spec.link.h2d_Bps == pytest.approx(20e9)                    # host copy 20 > 13
    assert spec.measured.gpu_gemm_TFLOPs_by_M(64) == pytest.approx(0.9)  # the CPU's fp32 curve
    assert spec.measured.hbm_copy_GBps == pytest.approx(40.0)          # copy read + write
    with pytest.raises(SpecError, match="--base"):
        cal.resolve_base("no-such-machine")


@pytest.mark.parametrize("paths,amx,dpbf", [(["amx", "avx512bf16", "fp32"], True, True),
                                             (["avx512bf16", "fp32"], False, True), (["fp32"], False, False)])
def test_spec_takes_the_bf16_attention_flags_from_the_kernel_not_the_base(paths, amx, dpbf):
    """The calibrated spec's cpu.amx_bf16 / cpu.avx512_bf16 say which bf16 path the kernel found on this
    machine's CPU, whatever the base spec said (devbox-2core says avx512_bf16)."""
    cache = _synthetic_cache(False)
    cache["facts"] = {**cache["facts"], "verify_paths": paths}
    raw = cal.build_spec_raw(cache, cal.resolve_base("devbox-2core"), "devbox-2core", "cpu-box")
    spec = parse_hardware(yaml.safe_load(cal.dump_spec_yaml(raw)), "cpu-box.yaml")
    assert (spec.cpu.amx_bf16, spec.cpu.avx512_bf16, spec.cpu.bf16_attention) == (amx, dpbf, amx or dpbf)
    cache["facts"]["verify_paths"] = None     # no kernel here: the base's flags stay
    raw = cal.build_spec_raw(cache, cal.resolve_base("devbox-2core"), "devbox-2core", "cpu-box")
    assert raw["cpu"]["avx512_bf16"] is True


@pytest.mark.gpu
def test_cuda_measurements_are_plausible():
    h2d = cal.measure_pinned_copy_GBps_by_chunk_MB((1, 64), "h2d", reps=3)
    d2h = cal.measure_pinned_copy_GBps_by_chunk_MB((1, 64), "d2h", reps=3)
    assert all(0.5 < v < 500 for v in (*h2d.values(), *d2h.values()))
    gemm = cal.measure_gpu_gemm_TFLOPs_by_M(4096, 4096, (1, 256), "bf16", reps=3)
    assert 0 < gemm[1] < gemm[256] < 5000
    assert 50 < cal.measure_hbm_copy_GBps(256 * cal.MiB, reps=3) < 50_000
    f = cal.gpu_facts()
    assert f["mem_GiB"] > 0 and f["name"]


def test_the_spec_records_how_quiet_the_machine_was(quick_run):
    d = quick_run["spec"].raw["measured"]["details"]
    q = d["calibration_quality"]
    guarded = {"DRAM read", "host memory copy", "CPU GEMM fp32", "CPU verify attention", "speed probe",
               "engine stage overheads"}
    assert guarded <= set(q["steps"]) and "fill a cold buffer" not in q["steps"]
    assert q["clean"] == all(s["clean"] for s in q["steps"].values())
    assert set(q["unclean_steps"]) == {n for n, s in q["steps"].items() if not s["clean"]}
    assert all(s["tries"] >= 1 and s["slowdown"] > 0 for s in q["steps"].values())
    assert q["sentinel_best_s"] > 0 and set(q["spread_by_step"]) >= {"CPU GEMM fp32", "CPU verify attention"}
    env = d["environment"]
    assert env["threads"] == torch.get_num_threads() and env["kernel"] and env["python"]
    assert quick_run["info"]["quality"] == q


def test_an_unclean_calibration_is_not_cached_unless_told(tmp_path, monkeypatch):
    """Strict (the default): a calibration with a step measured in a busy spell is written but not cached."""
    unclean = {"quality": {"DRAM read": {"tries": 2, "clean": False, "slowdown": 1.4, "why": "a slow spell"}},
               "sentinel": {"best_s": 0.01}}
    monkeypatch.setattr(cal, "run_measurements", lambda *a, **k: dict(unclean))
    _, mspec = cal.resolve_model(None)
    shapes = cal.measured_shapes(mspec, cal.QUICK)
    args = (cal.QUICK, cal._machine_facts(), shapes, mspec, None, "tiny", False)
    monkeypatch.delenv("SPECMOE_CALIBRATE_STRICT", raising=False)
    cached, path = cal._measure(*args, tmp_path / "strict", False)
    assert path is None and cached["results"]["quality"] == unclean["quality"]
    assert not list((tmp_path / "strict").glob("*.yaml")) or \
        [p.name for p in (tmp_path / "strict").glob("*.yaml")] == ["sentinel.yaml"]
    monkeypatch.setenv("SPECMOE_CALIBRATE_STRICT", "0")
    _, path = cal._measure(*args, tmp_path / "lenient", False)
    assert path is not None and Path(path).is_file()
