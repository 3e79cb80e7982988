"""specmoe planner: specs, roofline, cost model, simulator, memory model, optimizer, plan.

Pure Python (numpy/scipy/pandas/pulp/yaml): never imports torch, cupy or `runtime`. The names
below are loaded on first use, so `import planner` stays cheap.
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import Any

_EXPORTS = {
    "ModelSpec": "model_spec", "load_model": "model_spec", "DEFAULT_DRAFTS": "model_spec",
    "HardwareSpec": "hardware_spec", "load_hardware": "hardware_spec",
    "Workload": "workload", "AcceptanceProfile": "workload", "load_acceptance": "workload",
    "Stage": "stages",
    "Plan": "plan", "Placement": "plan", "Prediction": "plan",
    "SpecError": "errors", "InfeasibleError": "errors",
    "estimate": "estimate", "Estimate": "estimate",
    "CostModel": "cost_model",
    "max_batch": "memory", "footprint": "memory", "default_placement": "memory",
    "simulate_iteration": "simulator", "simulate_run": "simulator", "evaluate_config": "simulator",
    "optimize": "optimizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'planner' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """`planner.estimate` is both a submodule and the function it defines. Importing the submodule
    makes Python set the package attribute to the module; keep the exported function there instead
    (use `from planner.estimate import ...` to reach the module's other names)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
