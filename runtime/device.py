"""The device the engine runs on, free memory, and a hostname-free description of the machine.

Without a CUDA GPU the CPU plays the GPU's part through the same code paths: `pick_device()`
returns torch.device("cpu"), "device" tensors are ordinary host tensors (a host-to-device copy is
still a real copy), and streams/events exist only on CUDA.
"""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

from specmoe.planner.errors import SpecError

REPO_ROOT = Path(__file__).resolve().parent.parent


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """torch.device("cuda") if available else "cpu"; an explicit choice is checked."""
    if device is None:
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise SpecError("device", f"{device!r} is not a torch device ({e})", "use 'cpu' or 'cuda'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SpecError("device", "cuda was requested but torch sees no CUDA GPU", "use --device cpu or omit it")
    if dev.type not in ("cpu", "cuda"):
        raise SpecError("device", f"{dev.type} is not supported", "use 'cpu' or 'cuda'")
    return dev


def is_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_empty(shape, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """An uninitialised host tensor, page-locked when `pin` (only meaningful with CUDA)."""
    return torch.empty(shape, dtype=dtype, pin_memory=bool(pin and torch.cuda.is_available()))


def host_mem_available_bytes() -> int:
    """MemAvailable from /proc/meminfo (falls back to total physical memory elsewhere)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def device_mem_free_bytes(device: torch.device) -> tuple[int, int] | None:
    """(free, total) device memory from torch.cuda.mem_get_info; None on the CPU."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return int(free), int(total)


def cpu_model_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_description(device: torch.device) -> dict:
    """CPU model, cores, GPU name or none, torch version; never the hostname."""
    gpu = "none"
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
    return {
        "cpu_model": cpu_model_name(),
        "cpu_cores": os.cpu_count() or 0,
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "device": str(device),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda or "none",
        "python_version": platform.python_version(),
        "os": f"{platform.system()} {platform.machine()}",
    }


def git_commit() -> str:
    """HEAD of the repository this code runs from ("+dirty" when tracked files differ), or "unknown"."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return "unknown"
        commit = head.stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=REPO_ROOT, capture_output=True,
                               timeout=10)
        return commit + ("+dirty" if dirty.returncode == 1 else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def kernel_backends() -> dict[str, str]:
    """Kernel name -> backend the engine uses on this machine (verify attention and the moe_ops)."""
    from specmoe.runtime.kernels import moe_ops
    from specmoe.runtime.kernels.verify_attention import verify_attention_backend

    out = {"verify_attention": verify_attention_backend()}
    out.update(moe_ops.kernel_backends())
    return out
