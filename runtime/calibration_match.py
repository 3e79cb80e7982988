"""Does this run match the calibration its plan was costed with? A calibrated spec's rates hold for
the threads, device, torch and machine state it was measured in; a run that differs is predicted
wrongly without anything being broken (a run with 2 threads against a 1-thread calibration missed by
74%). The differences are named before the run starts, kept in the run record, and printed by the
report beside the error.

    warnings = calibration_mismatches(engine.plan, engine.device, engine.dtype)
"""
from __future__ import annotations

import os

import torch

# a 1-minute load average this much above the calibration's (per core) means other work shares the CPU
LOAD_MARGIN_PER_CORE = 0.5


def _environment(hw_raw: dict) -> dict:
    m = hw_raw.get("measured") if isinstance(hw_raw, dict) else None
    if not isinstance(m, dict):
        return {}
    env = dict((m.get("details") or {}).get("environment") or {})
    if "threads" not in env and isinstance(m.get("threads"), int):
        env["threads"] = m["threads"]
    loads = [x for x in (m.get("details") or {}).get("load_avg_1min") or [] if isinstance(x, (int, float))]
    if loads:
        env["load_avg_1min"] = max(loads)
    return env


def calibration_mismatches(plan, device: torch.device, dtype: torch.dtype) -> list[str]:
    """One sentence per way this run differs from the calibration of its plan's hardware spec (none for
    a spec without measured curves: its rates are datasheet peaks, not this machine's)."""
    env = _environment(plan.hardware)
    if not env:
        return []
    out = []
    threads = plan.schedule.cpu_threads
    if isinstance(env.get("threads"), int) and env["threads"] != threads:
        out.append(f"threads: the run uses {threads}, the calibration measured with {env['threads']} "
                   f"(its rates and fixed costs hold for {env['threads']})")
    dev = "cuda" if device.type == "cuda" else "cpu"
    if env.get("device") in ("cuda", "cpu") and env["device"] != dev:
        out.append(f"device: the run is on {dev}, the calibration on {env['device']}")
    want = str(plan.workload.get("weight_dtype", "")).replace("bf16", "bfloat16").replace("fp32", "float32") \
        .replace("fp16", "float16")
    got = str(dtype).replace("torch.", "")
    if want and want != got:
        out.append(f"dtype: the run computes in {got}, the plan was costed for {want} weights")
    if env.get("torch") and env["torch"] != str(torch.__version__):
        out.append(f"torch: the run uses {torch.__version__}, the calibration {env['torch']}")
    load = _load_now()
    cores = os.cpu_count() or 1
    then = float(env.get("load_avg_1min", 0.0))
    if load is not None and load - then > LOAD_MARGIN_PER_CORE * cores:
        out.append(f"machine load: {load:.2f} now (1-minute average) against {then:.2f} at calibration: other "
                   "work shares the CPU, so stages will run slower than predicted")
    return out


def _load_now() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None
