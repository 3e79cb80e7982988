"""bench/gpu_offload.py end to end on the CPU (--cpu-smoke: a tiny Mixtral-like model with the CPU as the
device, through the same planner, engine and report code as the GPU run), and its no-GPU message."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_offload.py"
LAST = re.compile(r"^gpu-offload: speculation (\d+\.\d\d|n/a)x over k=0, (\d+\.\d|n/a)x over accelerate, "
                  r"H2D (\d+|n/a)% busy, iteration error (\d+\.\d|n/a)%$")


def _run(args, tmp_path, timeout=120):
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_cpu_smoke_writes_json_and_summary_line(tmp_path):
    out = tmp_path / "out"
    p = _run(["--cpu-smoke", "--out", str(out)], tmp_path, timeout=200)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.strip().splitlines()
    m = LAST.match(lines[-1])
    assert m, lines[-1]
    assert "n/a" not in lines[-1], p.stdout[-3000:]          # every headline figure was measured
    d = json.loads((out / "gpu_offload.json").read_text())
    for key in ("machine", "oracle", "tokens_per_s", "h2d_GBps_achieved", "h2d_busy_fraction",
                "predicted_vs_measured", "goals", "modes", "config", "iteration_error_pct"):
        assert key in d, key
    assert d["oracle"] is True and d["config"]["smoke"] is True and not d["errors"], d["errors"]
    for key in ("gpu", "cpu_model", "cpu_cores", "torch_version", "cupy_version"):
        assert key in d["machine"]
    tps = d["tokens_per_s"]
    assert set(tps) == {"spec_alpha0.6", "spec_alpha0.8", "k0", "accelerate"}
    assert all(isinstance(tps[k], float) and tps[k] > 0 for k in tps), tps
    # the headline ratio is the one the JSON holds
    assert float(m.group(1)) == pytest.approx(tps["spec_alpha0.8"] / tps["k0"], abs=0.006)
    pvm = d["predicted_vs_measured"]
    assert {"iteration", "target.h2d", "target.attention", "target.moe", "prefill"} <= set(pvm)
    assert all(set(v) == {"predicted", "measured"} for v in pvm.values())
    assert pvm["iteration"]["measured"] > 0 and pvm["iteration"]["predicted"] > 0
    for name in ("spec_alpha0.8", "spec_alpha0.6", "k0"):
        md = d["modes"][name]
        assert md["status"].startswith("ok"), md
        assert md["iterations"] == d["config"]["iterations"] == 4
        for key in ("batch", "draft_len", "micro_batches", "expert_cache_slots", "h2d_GBps", "h2d_busy_fraction",
                    "stages_predicted_s", "stages_measured_s"):
            assert key in md, (name, key)
        assert md["h2d_bytes"] > 0 and md["oracle"] == (md["draft_len"] > 0)
    assert d["modes"]["k0"]["draft_len"] == 0 and d["modes"]["spec_alpha0.8"]["draft_len"] > 0
    prof = d["modes"]["spec_alpha0.8_profiled"]       # per-stage-synchronised rerun (skipped only if slow)
    assert prof["status"].startswith(("ok", "skipped")), prof
    if prof["status"].startswith("ok"):
        assert prof["profile_stages"] is True and d["per_stage_source"] == "the per-stage-synchronised rerun"
        assert prof["stages_measured_s"]["target.moe"] == pvm["target.moe"]["measured"]
    assert set(d["goals"]) == {"spec0.8_over_k0", "spec0.8_over_accelerate", "h2d_busy_fraction",
                               "iteration_error_pct"}
    # each goal's value recomputed from the JSON's own measurements, and its verdict from its target
    m08 = d["modes"]["spec_alpha0.8"]
    assert m08["iteration_error_pct"] == pytest.approx(
        (m08["predicted_iteration_s"] - m08["iteration_s"]) / m08["iteration_s"] * 100, rel=1e-9)
    want = {"spec0.8_over_k0": tps["spec_alpha0.8"] / tps["k0"],
            "spec0.8_over_accelerate": tps["spec_alpha0.8"] / tps["accelerate"],
            "h2d_busy_fraction": m08["h2d_busy_fraction"], "iteration_error_pct": abs(m08["iteration_error_pct"])}
    for name, g in d["goals"].items():
        assert g["value"] == pytest.approx(want[name], rel=1e-9), name
        op, target = g["target"].split()
        ok = want[name] <= float(target) if op == "<=" else want[name] >= float(target)
        assert g["result"] == ("PASS" if ok else "MISS"), (name, g)
    assert d["accelerate"]["label"].startswith("reference (measured earlier, not re-run)")
    text = (out / "gpu_offload.txt").read_text()
    assert "oracle-driven" in text and text.strip().splitlines()[-1] == lines[-1]
    for line in lines:                                      # every speculative row is labelled
        if line.startswith("spec_alpha"):
            assert "oracle-driven" in line, line


def test_plan_only_and_bad_arguments(tmp_path):
    out = tmp_path / "plans"
    p = _run(["--plan-only", "--out", str(out)], tmp_path, timeout=60)
    assert p.returncode == 0, p.stderr[-3000:]
    d = json.loads((out / "gpu_offload.json").read_text())
    plans = d["plans"]
    b = d["config"]["budgets"]
    # L/32 of the host, except its 6 GiB reserve and the CPU attention's staging of a prefill pass (32
    # prompts of 512 tokens at 61,440 bytes each), which do not shrink with layers
    fixed = 6 * 2 ** 30 + 32 * 512 * 61440
    assert d["config"]["layers"] == 8 and b["cpu_GiB"] == pytest.approx(((128e9 - fixed) / 4 + fixed) / 2 ** 30)
    assert b["naive_gpu_GiB"] == 6.0 and b["gpu_GiB"] > b["naive_gpu_GiB"]
    for name in ("spec_alpha0.8", "spec_alpha0.6"):
        slots = plans[name]["placement"]["expert_cache_slots"]
        assert plans[name]["draft_len"] > 0 and len(slots) == 8 and sum(slots) < 0.25 * 64   # streaming regime
        assert plans[name]["model"]["num_layers"] == 8 and plans[name]["model"]["vocab_size"] == 32000
    assert plans["k0"]["draft_len"] == 0
    assert LAST.match(p.stdout.strip().splitlines()[-1])
    bad = _run(["--layers", "40", "--out", str(out)], tmp_path, timeout=60)
    assert bad.returncode == 2 and "--layers" in bad.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed without a GPU")
def test_without_gpu_prints_one_line(tmp_path):
    p = _run(["--out", str(tmp_path / "x")], tmp_path, timeout=60)
    assert p.returncode == 0
    assert len(p.stdout.strip().splitlines()) == 1 and "GPU" in p.stdout
    assert not (tmp_path / "x").exists()


def test_a_failing_mode_is_reported_and_the_rest_still_runs(tmp_path):
    """Fail-soft: the k=0 mode raises (injected by wrapping Runner.run); the speculative modes still run,
    the JSON names the error, and the summary line still closes the output (k=0 ratio n/a). pulp is made
    unimportable too (it may be missing on the GPU host): the plans then come from the enumeration."""
    out = tmp_path / "out"
    block = tmp_path / "block"
    block.mkdir()
    (block / "pulp.py").write_text("raise ImportError('pulp blocked by the test')\n")
    args = ["--cpu-smoke", "--quick", "--iterations", "2", "--prompt-len", "32", "--out", str(out)]
    code = (
        "import importlib.util, sys\n"
        f"sys.argv = ['gpu_offload.py', *{args!r}]\n"
        f"spec = importlib.util.spec_from_file_location('gpu_offload', {str(SCRIPT)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "orig = m.Runner.run\n"
        "def run(self, plan, alpha, profile, iterations):\n"
        "    if plan.draft_len == 0:\n"
        "        raise RuntimeError('injected failure')\n"
        "    return orig(self, plan, alpha, profile, iterations)\n"
        "m.Runner.run = run\n"
        "sys.exit(m.main(sys.argv[1:]))\n")
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=f"{block}{os.pathsep}{REPO}")
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    last = p.stdout.strip().splitlines()[-1]
    assert LAST.match(last) and last.startswith("gpu-offload: speculation n/ax over k=0"), last
    d = json.loads((out / "gpu_offload.json").read_text())
    assert d["modes"]["k0"]["status"] == "error: RuntimeError: injected failure"
    assert any("injected failure" in e for e in d["errors"]) and d["complete"] is False
    assert d["tokens_per_s"]["k0"] is None and d["tokens_per_s"]["spec_alpha0.8"] > 0
    assert d["modes"]["spec_alpha0.6"]["status"].startswith("ok")
    assert d["goals"]["spec0.8_over_k0"]["result"] == "N/A"
    assert d["modes"]["spec_alpha0.8"]["planned"]["planner"].startswith("bench enumeration")
    assert d["modes"]["spec_alpha0.8"]["draft_len"] > 0


def test_four_layer_budgets_stay_in_the_full_models_regime(tmp_path):
    """After the 4-layer fallback every mode keeps the full model's expert-cache share for that mode (the
    H200 run cached 6 of 8 experts at k=0 there), and a speculative row never runs k=0 (a plan the planner
    did not prefer is forced to k>=1 and says so)."""
    out = tmp_path / "plans4"
    p = _run(["--plan-only", "--layers", "4", "--out", str(out)], tmp_path, timeout=90)
    assert p.returncode == 0, p.stderr[-3000:]
    d = json.loads((out / "gpu_offload.json").read_text())
    b = d["config"]["budgets"]
    for name, plan in d["plans"].items():
        slots = plan["placement"]["expert_cache_slots"]
        frac = sum(slots) / (4 * 8)
        full = b["full_model"][name]["cached_expert_fraction"]
        assert len(slots) == 4 and frac <= 0.25 and abs(frac - full) <= 0.1, (name, slots, full)
        assert b["modes"][name]["gpu_GiB"] > 0
    for name in ("spec_alpha0.8", "spec_alpha0.6"):
        assert d["plans"][name]["draft_len"] >= 1, name
        note = d["config"]["plan_notes"].get(name)
        if note:
            assert note["forced_k"] and "k=0" in note["note"]
            assert f"{name}: {note['note']}" in p.stdout or "k>=1" in p.stdout
    assert b["modes"]["k0"]["gpu_GiB"] < b["modes"]["spec_alpha0.8"]["gpu_GiB"]   # no draft, no draft KV


def test_choose_host_io():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_offload_mod", SCRIPT)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    waits = {"h2d_pinned": {"alone_ms": 0.1, "during_big_copy_ms": 18.0, "waits_for_big_copy": True},
             "zero_copy_kernel": {"alone_ms": 0.2, "during_big_copy_ms": 0.3, "waits_for_big_copy": False}}
    assert m.choose_host_io("auto", cuda, waits) == "zero-copy"
    assert m.choose_host_io("auto", cuda, dict(waits, zero_copy_kernel={"error": "TypeError"})) == "pinned"
    assert m.choose_host_io("auto", cuda, None) == "pinned"
    assert m.choose_host_io("auto", cpu, waits) == "direct"
    assert m.choose_host_io("direct", cuda, waits) == "direct"


def _module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_offload_mod", SCRIPT)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


def test_warm_figures_leave_out_the_first_iterations():
    """A mode's iteration time and tokens/s are over its iterations after the first two (which pay cudaMalloc,
    cudaHostAlloc, first launches); with no more than two, over all of them, said so."""
    from types import SimpleNamespace

    m = _module()
    rec = SimpleNamespace(iteration_times_s=[0.9, 0.5, 0.2, 0.3], emitted_by_iteration=[40, 40, 30, 50],
                          stages={"iteration": 0.475}, decode_tokens_per_s=160 / 1.9)
    w = m.warm_figures(rec)
    assert w == {"warmup_iterations_excluded": 2, "measured_iterations": 2, "iteration_s": pytest.approx(0.25),
                 "tokens_per_s": pytest.approx(80 / 0.5)}
    short = SimpleNamespace(**dict(vars(rec), iteration_times_s=[0.9, 0.5], emitted_by_iteration=[40, 40]))
    assert m.warm_figures(short)["warmup_iterations_excluded"] == 0
    assert m.warm_figures(short)["iteration_s"] == pytest.approx(0.7)


def test_only_a_missing_solver_falls_back_to_enumeration(monkeypatch):
    """plan_for plans by enumeration only when planner.optimize has no solver; any other failure is raised
    (never a silent fallback), and the enumeration skips only infeasible points."""
    from specmoe.planner.errors import InfeasibleError, SpecError

    m = _module()
    missing = ModuleNotFoundError("No module named 'pulp'", name="pulp")
    assert m.solver_missing(missing) and m.solver_missing(ImportError("pulp blocked by the test"))
    assert m.solver_missing(SpecError("solver", "HiGHS is not available to pulp"))
    assert not m.solver_missing(ModuleNotFoundError("No module named 'scipy'", name="scipy"))
    assert not m.solver_missing(InfeasibleError("gpu memory", "needs 30 GiB"))
    import specmoe.planner.optimizer as opt

    def broken(*a, **k):
        raise ZeroDivisionError("a bug in the planner")
    monkeypatch.setattr(opt, "optimize", broken)
    with pytest.raises(ZeroDivisionError):
        m.plan_for(None, None, None, None, print)


def test_one_pinned_layer_stands_for_every_layer():
    from specmoe.runtime.weights.sources import WeightSource

    m = _module()
    tcfg, _ = m.model_configs(3, smoke=True)
    src = WeightSource.random(tcfg, seed=0, dtype=torch.bfloat16)
    rows = m.shared_expert_rows(src, torch.device("cpu"))
    assert sorted(rows) == [0, 1, 2] and rows[0] is rows[1] is rows[2]
    assert tuple(rows[0].shape) == (8, 3 * 1792 * 512)
    assert m.shared_expert_rows(src, torch.device("cpu"), rows) == rows           # kept across runners
