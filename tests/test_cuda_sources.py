"""The CUDA sources compile (no GPU needed): scripts/check_cuda_sources.py with nvcc and NVRTC.

This is how CI catches a broken cuda_kernels/*.cu. With nvcc on PATH the main test always runs.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from specmoe import cuda_kernels
from specmoe.runtime.kernels import cuda_ops

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "check_cuda_sources.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("check_cuda_sources", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


check = _load_script()
HAVE_NVCC = shutil.which("nvcc") is not None
HAVE_NVRTC = check._find_libnvrtc() is not None


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


def _entries(ptx: str) -> set[str]:
    return set(re.findall(r"\.entry\s+([A-Za-z_][A-Za-z0-9_]*)\s*\(", ptx))


@pytest.mark.skipif(not (HAVE_NVCC or HAVE_NVRTC), reason="neither nvcc on PATH nor an NVRTC library found")
def test_all_sources_compile_and_define_the_launched_kernels(tmp_path):
    proc = _run("--ptx-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in cuda_kernels.kernel_names(include_helpers=True):
        assert f"ok    {name}.cu" in proc.stdout
    # every kernel the Python side may launch is an entry of its file's PTX (catches name typos)
    for module, names in cuda_ops.kernel_functions_used().items():
        entries = _entries((tmp_path / f"{module}.ptx").read_text())
        missing = sorted(set(names) - entries)
        assert not missing, f"{module}.cu lacks kernels {missing}"


@pytest.mark.skipif(not HAVE_NVCC, reason="nvcc is not on PATH")
def test_nvcc_backend_reports_a_broken_file(tmp_path):
    bad = tmp_path / "broken_kernel.cu"
    bad.write_text('extern "C" __global__ void k(float* x) { x[0] = undefined_name; }\n')
    proc = _run("--backend", "nvcc", str(bad))
    assert proc.returncode == 1
    assert "broken_kernel.cu" in proc.stderr and "undefined_name" in proc.stderr


@pytest.mark.skipif(not HAVE_NVRTC, reason="no NVRTC library (pip install nvidia-cuda-nvrtc)")
def test_nvrtc_backend_compiles_and_reports_a_broken_file(tmp_path):
    # one real kernel file through the CLI (-I finds common.cu); all of them: the spliced test below
    proc = _run("--backend", "nvrtc", str(cuda_kernels.source_path("silu_mul")))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "NVRTC" in proc.stdout and "ok    silu_mul.cu" in proc.stdout
    bad = tmp_path / "broken_kernel.cu"
    bad.write_text('#include <cstdint>\nextern "C" __global__ void k(int64_t* x) { x[0] = 1; }\n')
    proc = _run("--backend", "nvrtc", str(bad))
    assert proc.returncode == 1
    assert "broken_kernel.cu" in proc.stderr and "cstdint" in proc.stderr


@pytest.mark.skipif(not HAVE_NVRTC, reason="no NVRTC library (pip install nvidia-cuda-nvrtc)")
def test_spliced_sources_compile_alone_under_nvrtc(tmp_path):
    """What cuda_ops hands to CuPy (load_source: includes spliced in) compiles with no include path."""
    nvrtc = check.Nvrtc(check._find_libnvrtc())
    for name in cuda_kernels.kernel_names():
        isolated = tmp_path / name
        isolated.mkdir()
        path = isolated / f"{name}.cu"
        path.write_text(cuda_kernels.load_source(name))
        assert not re.search(r"^\s*#\s*include", path.read_text(), re.MULTILINE)
        ok, msg = nvrtc.compile(path, "compute_90")
        assert ok, f"{name}: {msg}"


def test_no_compiler_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(check.shutil, "which", lambda _name: None)
    monkeypatch.setattr(check, "_find_libnvrtc", lambda: None)
    with pytest.raises(check.CompilerMissing, match="nvidia-cuda-nvrtc"):
        check.make_backend("auto")
    assert check.main(["--dir", str(tmp_path)]) == 1  # no *.cu there


def test_source_lookup():
    assert cuda_kernels.source_path("silu_mul") == cuda_kernels.source_path("silu_mul.cu")
    assert cuda_kernels.source_dir() == REPO / "cuda_kernels"
    with pytest.raises(cuda_kernels.KernelSourceError, match="no CUDA source named"):
        cuda_kernels.source_path("nope")
    assert set(cuda_ops.kernel_functions_used()) == set(cuda_kernels.kernel_names())
