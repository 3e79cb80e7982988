"""specmoe planner: specs, roofline, cost model, simulator, memory model, optimizer, plan.

Pure Python (numpy/scipy/pandas/pulp/yaml): never imports torch, cupy or `specmoe.runtime`. The names
below are loaded on first use, so `import specmoe.planner` stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ModelSpec": "model_spec", "load_model": "model_spec", "DEFAULT_DRAFTS": "model_spec",
    "HardwareSpec": "hardware_spec", "load_hardware": "hardware_spec",
    "Workload": "workload", "AcceptanceProfile": "workload", "load_acceptance": "workload",
    "Stage": "stages",
    "Plan": "plan", "Placement": "plan", "Prediction": "plan",
    "SpecError": "errors", "InfeasibleError": "errors",
    "estimate": "estimator", "Estimate": "estimator",
    "CostModel": "cost_model",
    "max_batch": "memory", "footprint": "memory", "default_placement": "memory",
    "simulate_iteration": "simulator", "simulate_run": "simulator", "evaluate_config": "simulator",
    "optimize": "optimizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'specmoe.planner' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
