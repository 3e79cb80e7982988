"""Many host tensors in one allocation, page-locked by registering it with the CUDA driver once.

torch's pinned memory comes from its caching host allocator (cudaHostAlloc), which rounds every
request up to a power of two: per-layer expert rows of 2.8 GB take 4 GiB each (+42%), so the 32 layers
of Mixtral-8x7B would need 128 GiB pinned on a 128 GB host. `host_region` maps exactly the bytes its
tensors need (each starting on a page) as one private anonymous mapping, and with `register` page-locks it
with one cudaHostRegister, so copies from it are DMA at the full link rate like torch's pinned memory
(torch sees it as pinned: `is_pinned()`), at the cost of what it holds.

The tensors share the mapping's memory; the mapping lives while any of them (or a view) does, and is
unregistered from the driver right before it is unmapped.
"""
from __future__ import annotations

import ctypes
import mmap

import torch

PAGE_BYTES = mmap.PAGESIZE


class CudaHostDriver:
    """cudaHostRegister / cudaHostUnregister through torch's CUDA runtime bindings."""

    def register(self, ptr: int, nbytes: int) -> None:
        rc = torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 1)    # cudaHostRegisterPortable, as torch's own
        if int(rc) != 0:
            raise RuntimeError(f"cudaHostRegister of {nbytes / 2**30:.2f} GiB of host memory failed (CUDA error "
                               f"{int(rc)}): check the locked-memory limit (ulimit -l) and the memory free")

    def unregister(self, ptr: int) -> None:
        rc = torch.cuda.cudart().cudaHostUnregister(ptr)
        if int(rc) != 0:
            raise RuntimeError(f"cudaHostUnregister of the host region at {ptr:#x} failed (CUDA error {int(rc)})")


class _Mapping(mmap.mmap):
    """Anonymous host memory, unregistered from the CUDA driver (when registered) before it is unmapped."""

    def __del__(self):
        done, self._unregister = getattr(self, "_unregister", None), None
        if done is not None:
            done()


def _address(m: mmap.mmap) -> int:
    view = ctypes.c_char.from_buffer(m)
    try:
        return ctypes.addressof(view)
    finally:
        del view


def region_bytes(sizes: dict, dtype: torch.dtype) -> int:
    """Bytes of the mapping host_region(sizes, dtype) makes: each tensor rounded up to whole pages."""
    elem = torch.empty(0, dtype=dtype).element_size()
    return sum(-(-int(n) * elem // PAGE_BYTES) * PAGE_BYTES for n in sizes.values())


def host_region(sizes: dict, dtype: torch.dtype, register: bool,
                driver: CudaHostDriver | None = None) -> dict[object, torch.Tensor]:
    """{key: n elements} -> {key: flat uninitialised host tensor [n] of dtype}, views of one anonymous mapping
    of region_bytes(sizes, dtype) (each tensor page-aligned), page-locked with one cudaHostRegister when
    `register` (driver: the registrar, CudaHostDriver() by default). Empty tensors hold no mapping."""
    total = region_bytes(sizes, dtype)
    if total == 0:
        return {key: torch.empty(0, dtype=dtype) for key in sizes}
    m = _Mapping(-1, total, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)   # mmap's default is MAP_SHARED: shmem,
    # which takes no transparent huge pages where shmem_enabled is "never" (the usual setting)
    if hasattr(mmap, "MADV_HUGEPAGE"):        # fewer pages for the driver to lock and the TLB to hold
        m.madvise(mmap.MADV_HUGEPAGE)
    if register:
        drv = driver or CudaHostDriver()
        ptr = _address(m)
        drv.register(ptr, total)
        m._unregister = lambda: drv.unregister(ptr)
    flat = torch.frombuffer(m, dtype=torch.uint8)          # [total] bytes; keeps the mapping alive
    del m
    elem = torch.empty(0, dtype=dtype).element_size()
    out, at = {}, 0
    for key, n in sizes.items():
        nbytes = int(n) * elem
        out[key] = flat[at:at + nbytes].view(dtype)
        at += -(-nbytes // PAGE_BYTES) * PAGE_BYTES
    return out
