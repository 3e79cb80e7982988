"""The thread environment every entry point sets before torch is imported, and what a run records of it.

    from specmoe.runtime.thread_env import apply_thread_env, thread_env_record
    apply_thread_env()          # first thing in a CLI or bench script (importing specmoe.runtime does it too)
    record.thread_env = thread_env_record()

torch and the verify-attention kernel must share one OpenMP runtime, which reads OMP_WAIT_POLICY once,
when it loads: idle OpenMP workers that spin (the default) slowed small operations up to 10x on shared
cores, and a calibration taken with them sleeping does not describe a run with them spinning. So the
policy is set before torch can load libgomp, and the run records which OpenMP runtimes are mapped
into the process (`openmp_runtimes`: more than one means the kernel and torch each have their own pool
of threads, competing for the same cores).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

THREAD_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
RECORDED = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_PROC_BIND", "GOMP_SPINCOUNT")
_OPENMP_LIB = re.compile(r"(/\S*/lib(?:gomp|iomp5|omp)[^/\s]*\.so[^/\s]*)")


def apply_thread_env() -> None:
    """Set THREAD_ENV where the user has not set it (call before torch is imported)."""
    for k, v in THREAD_ENV.items():
        os.environ.setdefault(k, v)


def openmp_runtimes(maps: str | None = None) -> list[str]:
    """The OpenMP runtime libraries mapped into this process (from /proc/self/maps; [] where unreadable)."""
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            return []
    return sorted({m.group(1) for m in _OPENMP_LIB.finditer(maps)})


def thread_env_record() -> dict:
    """What a run record keeps: the OpenMP variables, torch's thread counts and the runtimes mapped."""
    import torch

    return {"env": {k: os.environ.get(k) for k in RECORDED}, "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(), "openmp_runtimes": openmp_runtimes()}
