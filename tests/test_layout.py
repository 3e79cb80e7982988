"""The layout's own rules (README "Layout"): one import name, functions a screen long, files under
500 lines, no two modules importing each other, no module reaching for another's private names."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"planner": "specmoe.planner", "runtime": "specmoe.runtime", "cuda_kernels": "specmoe.cuda_kernels"}
MAX_FUNCTION_LINES, MAX_FILE_LINES = 80, 500


def _modules() -> dict[str, Path]:
    """Dotted import name -> source file, for every module of the three packages."""
    out = {}
    for folder, name in PACKAGES.items():
        for p in sorted((ROOT / folder).rglob("*.py")):
            parts = p.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((name, *parts))] = p
    return out


MODULES = _modules()


def _imports(path: Path, mods: dict[str, Path]) -> set[str]:
    """The package modules `path` imports anywhere in its body (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found.update(n for n in names if n in mods)
    return found


def test_installed_under_one_name_only(tmp_path):
    """From outside the checkout only the specmoe.* names import: nothing named planner or runtime."""
    ok = subprocess.run([sys.executable, "-c", "import specmoe.planner, specmoe.runtime, specmoe.cuda_kernels"],
                        cwd=tmp_path, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    for bare in ("planner", "runtime", "cuda_kernels"):
        p = subprocess.run([sys.executable, "-c", f"import {bare}"], cwd=tmp_path, capture_output=True, text=True)
        assert p.returncode != 0 and "ModuleNotFoundError" in p.stderr, bare


@pytest.mark.parametrize("module", sorted(MODULES))
def test_sizes(module):
    path = MODULES[module]
    src = path.read_text()
    assert src.count("\n") <= MAX_FILE_LINES, f"{path}: {src.count(chr(10))} lines"
    long = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in ast.walk(ast.parse(src))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno >= MAX_FUNCTION_LINES]
    assert not long, f"{path}: functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_no_two_modules_import_each_other():
    graph = {m: _imports(p, MODULES) - {m} for m, p in MODULES.items()}
    pairs = sorted({tuple(sorted((a, b))) for a, deps in graph.items() for b in deps
                    if a in graph.get(b, ()) and not b.startswith(a + ".") and not a.startswith(b + ".")})
    assert not pairs, f"modules that import each other: {pairs}"


def test_no_private_names_imported_across_modules():
    bad = []
    for m, p in MODULES.items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("specmoe"):
                bad += [f"{m}: from {node.module} import {a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad, bad


def test_the_rule_checks_catch_what_they_look_for(tmp_path):
    """The helpers above find a mutual import and a long function when there is one."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("def f():\n    from specmoe.x.b import g\n" + "    pass\n" * 90)
    b.write_text("from specmoe.x.a import f\n")
    mods = {"specmoe.x.a": a, "specmoe.x.b": b}
    assert _imports(a, mods) == {"specmoe.x.b"} and _imports(b, mods) == {"specmoe.x.a"}
    fn = next(n for n in ast.walk(ast.parse(a.read_text())) if isinstance(n, ast.FunctionDef))
    assert fn.end_lineno - fn.lineno >= MAX_FUNCTION_LINES
