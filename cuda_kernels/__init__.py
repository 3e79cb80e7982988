"""CUDA C++ kernel sources of specmoe, compiled at run time by CuPy (NVRTC).

The ``*.cu`` files here are package data. ``common.cu`` holds shared device helpers and is
``#include``d by the others; :func:`load_source` splices it in textually, so the text handed to
NVRTC is self-contained (and CuPy's compile cache key covers the helpers too).
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["source_dir", "source_path", "kernel_names", "load_source", "KernelSourceError"]

_INCLUDE_RE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"[ \t]*$', re.MULTILINE)
# Files that define only helpers (no kernels); included by the others.
_HELPER_FILES = ("common",)


class KernelSourceError(ValueError):
    """A kernel source name that does not exist here, or a broken local #include."""


def source_dir() -> Path:
    """The directory holding the ``*.cu`` sources."""
    return Path(__file__).resolve().parent


def source_path(name: str) -> Path:
    """Path of kernel source ``name`` (with or without the ``.cu`` suffix)."""
    stem = name[:-3] if name.endswith(".cu") else name
    path = source_dir() / f"{stem}.cu"
    if not path.is_file():
        known = ", ".join(kernel_names(include_helpers=True))
        raise KernelSourceError(f"no CUDA source named {name!r} in {source_dir()}; known: {known}")
    return path


def kernel_names(include_helpers: bool = False) -> list[str]:
    """Stems of the ``*.cu`` files, sorted; helper-only files unless asked for are left out."""
    stems = sorted(p.stem for p in source_dir().glob("*.cu"))
    return stems if include_helpers else [s for s in stems if s not in _HELPER_FILES]


def load_source(name: str) -> str:
    """Text of kernel source ``name`` with its local ``#include "x.cu"`` lines expanded (once each)."""
    seen: set[str] = set()

    def expand(path: Path) -> str:
        def repl(match: re.Match) -> str:
            inc = match.group(1)
            inc_path = source_dir() / inc
            if not inc_path.is_file():
                raise KernelSourceError(f"{path.name}: #include \"{inc}\" not found in {source_dir()}")
            if inc in seen:
                return f"// (already included: {inc})"
            seen.add(inc)
            return f"// ---- begin {inc} ----\n{expand(inc_path)}\n// ---- end {inc} ----"

        return _INCLUDE_RE.sub(repl, path.read_text())

    return expand(source_path(name))
