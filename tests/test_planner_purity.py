"""planner/ is pure Python: no torch, cupy or runtime, in its source or in what importing it loads."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = ("torch", "cupy", "runtime", "transformers", "safetensors")


def test_source_has_no_forbidden_imports():
    pat = re.compile(r"^\s*(?:import|from)\s+(" + "|".join(FORBIDDEN) + r")\b", re.M)
    files = sorted((ROOT / "planner").rglob("*.py"))
    assert files
    for f in files:
        hits = pat.findall(f.read_text())
        assert not hits, f"{f.relative_to(ROOT)} imports {hits}"


def test_importing_and_using_the_planner_loads_none_of_them():
    code = r"""
import sys, pkgutil, importlib
from specmoe import planner
assert 'specmoe.planner.cost_model' not in sys.modules and 'numpy' not in sys.modules, 'planner/__init__ is not import-light'
for m in pkgutil.iter_modules(planner.__path__):
    importlib.import_module('planner.' + m.name)
from specmoe.planner import estimate, Workload, load_acceptance, Stage, Plan, Placement, ModelSpec, HardwareSpec
from specmoe.planner import AcceptanceProfile, load_model, load_hardware
assert callable(estimate)
e = estimate('mixtral-8x7b', 'a30-xeon6426y', Workload(64, 32, acceptance=load_acceptance(0.8)), draft_len=2, batch=16)
assert e.iteration_time_s > 0
bad = [m for m in sys.modules if m.split('.')[0] in %r]
print('BAD', bad)
""" % (FORBIDDEN,)
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "BAD []" in p.stdout, p.stdout
