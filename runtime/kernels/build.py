"""Compile the C++ kernels in runtime/kernels/csrc/ on first use and load them with ctypes.

`load_cpp_kernel(name)` builds csrc/<name>.cpp with the system C++ compiler into

    ${SPECMOE_CACHE_DIR:-~/.cache/specmoe}/kernels/<key>/<name>.so

where <key> hashes the source (with the csrc/ files it includes by `#include "..."`), the flags, the compiler's version text and this CPU's feature
flags (the build uses -march=native). The library is written to a temporary file and renamed
into place, so two processes building at once never see a partial file; later loads, in this
process or another, reuse it without compiling. No compiler, or a failed build: a warning with
the compiler's message is logged and None is returned, so callers fall back to torch.

Environment: SPECMOE_CXX (compiler command, may carry flags; takes precedence over CXX, then
c++, g++, clang++ on PATH), SPECMOE_CXXFLAGS (extra flags appended to every kernel build, e.g.
"-mno-avx512f" to build the portable AVX2 path), SPECMOE_CACHE_DIR. OpenMP's thread count
follows OMP_NUM_THREADS.

This module never imports torch.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
import uuid
from pathlib import Path

log = logging.getLogger("specmoe.kernels")

CSRC_DIR = Path(__file__).resolve().parent / "csrc"
BASE_FLAGS = ("-O3", "-std=gnu++17", "-ffp-contract=fast", "-shared", "-fPIC")
# Each kept only if a test compile accepts it. -falign-loops=64: every loop starts on a 64-byte line,
# so an edit elsewhere in a kernel no longer moves a hot loop across a fetch boundary: measured on a
# Zen 4 VM, an unrelated change cost 6-7% at one shape through code placement alone, none with it.
OPTIONAL_FLAGS = ("-march=native", "-fopenmp", "-falign-loops=64")
_PROBE_SOURCE = "#include <omp.h>\nextern \"C\" int probe() { return omp_get_max_threads(); }\n"

_lock = threading.Lock()
_loaded: dict[tuple, ctypes.CDLL | None] = {}
_versions: dict[tuple, str | None] = {}
_probed: dict[tuple, tuple[str, ...]] = {}
build_count = 0  # compiles run by this process (tests check that a cached load does not rebuild)


def cache_root() -> Path:
    """Directory holding the built kernels: ${SPECMOE_CACHE_DIR:-~/.cache/specmoe}/kernels."""
    base = os.environ.get("SPECMOE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "specmoe")
    return Path(base) / "kernels"


def find_compiler() -> list[str] | None:
    """The compiler command: SPECMOE_CXX, else CXX, else c++ / g++ / clang++ on PATH."""
    for var in ("SPECMOE_CXX", "CXX"):
        value = os.environ.get(var, "").strip()
        if value:
            return shlex.split(value)
    for cand in ("c++", "g++", "clang++"):
        path = shutil.which(cand)
        if path:
            return [path]
    return None


def _run(cmd: list[str], timeout_s: float = 300.0) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)


def compiler_version(cxx: list[str]) -> str | None:
    """`<cxx> --version` output, or None if the compiler cannot be run."""
    key = tuple(cxx)
    if key not in _versions:
        try:
            res = _run([*cxx, "--version"], timeout_s=60.0)
            _versions[key] = res.stdout.strip() if res.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            _versions[key] = None
    return _versions[key]


def cpu_flags() -> str:
    """This CPU's model and feature flags (part of the cache key because of -march=native)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        import platform

        return f"{platform.machine()} {platform.processor()}"
    keep = []
    for line in text.splitlines():
        if line.split(":")[0].strip() in ("flags", "model name", "Features", "CPU part"):
            keep.append(line.strip())
            if len(keep) >= 2:
                break
    return "\n".join(keep)


def _probe_flags(cxx: list[str], version: str) -> tuple[str, ...]:
    """Which OPTIONAL_FLAGS the compiler accepts (test compiles, remembered on disk)."""
    key = (tuple(cxx), version)
    if key in _probed:
        return _probed[key]
    digest = hashlib.sha256("\0".join([*cxx, version, cpu_flags(), *OPTIONAL_FLAGS]).encode()).hexdigest()[:16]
    record = cache_root() / f"probe-{digest}.json"
    try:
        flags = tuple(json.loads(record.read_text())["flags"])
    except (OSError, ValueError, KeyError, TypeError):
        flags = ()
        with tempfile.TemporaryDirectory(prefix="specmoe-probe-") as tmp:
            src = Path(tmp) / "probe.cpp"
            for flag in OPTIONAL_FLAGS:
                body = _PROBE_SOURCE if flag == "-fopenmp" else "extern \"C\" int probe() { return 1; }\n"
                src.write_text(body)
                try:
                    res = _run([*cxx, *BASE_FLAGS, flag, str(src), "-o", str(Path(tmp) / "probe.so")], 120.0)
                except (OSError, subprocess.SubprocessError):
                    break
                if res.returncode == 0:
                    flags += (flag,)
                else:
                    log.warning("C++ compiler %s rejects %s; building without it:\n%s",
                                " ".join(cxx), flag, res.stderr.strip()[-2000:])
        _atomic_write_text(record, json.dumps({"flags": list(flags)}))
    _probed[key] = flags
    return flags


def _atomic_write_text(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError:
        pass  # a cache we cannot write only costs a re-probe next time


def source_bytes(src: Path) -> bytes:
    """The source of src followed by that of every csrc/ file it includes with `#include "..."`
    (recursively, each once), so a change to a part of a kernel rebuilds it."""
    seen: list[Path] = []
    todo = [src]
    while todo:
        path = todo.pop(0)
        if path in seen or not path.is_file():
            continue
        seen.append(path)
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            parts = line.strip().split('"')
            if line.strip().startswith("#include") and len(parts) >= 3:
                todo.append(path.parent / parts[1])
    return b"\0".join(p.read_bytes() for p in seen)


def env_flags() -> tuple[str, ...]:
    """Extra compile flags from SPECMOE_CXXFLAGS."""
    return tuple(shlex.split(os.environ.get("SPECMOE_CXXFLAGS", "")))


def load_cpp_kernel(name: str, extra_flags: tuple[str, ...] | list[str] = (),
                    source: Path | None = None) -> ctypes.CDLL | None:
    """Build (or reuse) and load csrc/<name>.cpp (or `source`, e.g. a benchmark's model); None with a
    logged warning when impossible.

    extra_flags, then SPECMOE_CXXFLAGS, are appended to the compile command (and enter the
    cache key), e.g. ("-mno-avx512f",) to build the portable vector path on an AVX-512 machine.
    """
    global build_count
    src = Path(source) if source is not None else CSRC_DIR / f"{name}.cpp"
    if source is None and not src.is_file():
        raise ValueError(f"load_cpp_kernel: no kernel source {src}; name must be one of "
                         f"{sorted(p.stem for p in CSRC_DIR.glob('*.cpp'))}")
    extra = tuple(extra_flags) + env_flags()
    cxx = find_compiler()
    key = (name, str(src), extra, tuple(cxx or ()), str(cache_root()))
    with _lock:
        if key in _loaded:
            return _loaded[key]
        lib = None
        version = compiler_version(cxx) if cxx else None
        if cxx is None:
            log.warning("no C++ compiler found (looked for SPECMOE_CXX, CXX, c++, g++, clang++): "
                        "kernel %s unavailable, using the torch fallback", name)
        elif version is None:
            log.warning("C++ compiler %r cannot be run (set SPECMOE_CXX to a working compiler): "
                        "kernel %s unavailable, using the torch fallback", " ".join(cxx), name)
        else:
            flags = [*BASE_FLAGS, *_probe_flags(cxx, version), *extra]
            source = source_bytes(src)
            digest = hashlib.sha256(b"\0".join(
                [source, " ".join(flags).encode(), version.encode(), cpu_flags().encode()])).hexdigest()[:20]
            so_path = cache_root() / digest / f"{name}.so"
            if not so_path.is_file():
                so_path = _build(cxx, flags, src, so_path, name)
                if so_path is not None:
                    build_count += 1
            if so_path is not None:
                try:
                    lib = ctypes.CDLL(str(so_path))
                except OSError as exc:
                    log.warning("kernel %s built at %s but cannot be loaded (%s): using the torch fallback",
                                name, so_path, exc)
        _loaded[key] = lib
        return lib


def _build(cxx: list[str], flags: list[str], src: Path, so_path: Path, name: str) -> Path | None:
    try:
        so_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.warning("cannot create kernel cache directory %s (%s; set SPECMOE_CACHE_DIR): "
                    "kernel %s unavailable, using the torch fallback", so_path.parent, exc, name)
        return None
    tmp = so_path.with_name(f".{name}.{os.getpid()}.{uuid.uuid4().hex}.so.tmp")
    cmd = [*cxx, *flags, str(src), "-o", str(tmp)]
    log.info("building kernel %s: %s", name, " ".join(cmd))
    try:
        res = _run(cmd)
        ok, err = res.returncode == 0, res.stderr
    except (OSError, subprocess.SubprocessError) as exc:
        ok, err = False, str(exc)
    if not ok:
        tmp.unlink(missing_ok=True)
        log.warning("building kernel %s failed (%s); using the torch fallback. Compiler said:\n%s",
                    name, " ".join(cmd), err.strip()[-4000:])
        return None
    os.replace(tmp, so_path)  # atomic: a concurrent build of the same key writes identical bytes
    return so_path

