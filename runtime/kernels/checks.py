"""Input validation shared by the kernel ops (runtime/kernels/moe_ops.py, runtime/kernels/speculative_ops.py):
every op checks its tensors' shapes, dtypes and devices before dispatching, and raises
KernelInputError naming the tensor at fault.
"""

from __future__ import annotations

import torch

from specmoe.runtime.kernels import cuda_ops

FLOAT_DTYPES = (torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


class KernelInputError(ValueError):
    """A tensor handed to a kernel op has the wrong shape, dtype, device or values."""


def check_tensor(name: str, t, ndim: int | None = None, dtypes=None, dims: str = "") -> torch.Tensor:
    """t itself, once it is a tensor with `ndim` dimensions (named by `dims`) and a dtype in `dtypes`."""
    if not isinstance(t, torch.Tensor):
        raise KernelInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise KernelInputError(f"{name} must have {ndim} dimensions {dims}, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise KernelInputError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    return t


def same_device(**tensors: torch.Tensor) -> torch.device:
    """The one device all the named tensors are on."""
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise KernelInputError(f"all tensors must be on one device; got {listing}")
    return first


def use_gpu(device: torch.device) -> bool:
    """Whether tensors on `device` go to the CUDA kernels (a CUDA device and CuPy working)."""
    return device.type == "cuda" and cuda_ops.cuda_available()


def check_range(name: str, t: torch.Tensor, lo: int, hi: int, what: str) -> None:
    """All values of t in [lo, hi), else KernelInputError (syncs once on a GPU)."""
    if t.numel() == 0:
        return
    mn, mx = (int(v) for v in torch.stack([t.min(), t.max()]).tolist())
    if mn < lo or mx >= hi:
        raise KernelInputError(f"{name} values must be in [{lo}, {hi}) ({what}); found min {mn}, max {mx}")
