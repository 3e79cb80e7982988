"""The machine: its description, the CUDA copy-overlap probe (does a small transfer wait behind an
expert-sized copy on the copy stream?) and the --host-io choice made from it."""
from __future__ import annotations

import time

from .common import GiB


def copy_overlap_probe(device, big_MB: int = 1024, small_MB: int = 4, reps: int = 3) -> dict:
    """Does a small transfer on the compute stream wait for a large expert copy on the copy stream?
    The target's CPU attention moves q/k/v to the host and its output back while experts stream; if
    those transfers queue behind the expert copies, streaming cannot overlap attention. Times (ms) of
    a small_MB transfer alone and while a big_MB pinned H2D runs on another stream, for: pageable H2D
    (what torch's .to() of a plain host tensor does), pinned H2D, pinned D2H, and a kernel reading
    pinned host memory directly (zero-copy over UVA: no copy engine)."""
    import torch

    cs = torch.cuda.Stream(device)
    cur = torch.cuda.current_stream(device)
    big_h = torch.empty(big_MB << 20, dtype=torch.uint8, pin_memory=True)
    big_d = torch.empty(big_MB << 20, dtype=torch.uint8, device=device)
    n = small_MB << 20
    sp = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    spage = torch.empty(n, dtype=torch.uint8)
    sd = torch.empty(n, dtype=torch.uint8, device=device)
    out: dict = {"big_MB": big_MB, "small_MB": small_MB}
    variants = {"h2d_pageable": lambda: sd.copy_(spage), "h2d_pinned": lambda: sd.copy_(sp, non_blocking=True),
                "d2h_pinned": lambda: sp.copy_(sd, non_blocking=True)}
    try:
        class _HostView:     # pinned host memory seen as a CUDA array (UVA: same pointer)
            __cuda_array_interface__ = {"shape": (n,), "typestr": "|u1", "data": (sp.data_ptr(), False),
                                        "version": 3, "strides": None}
        zc = torch.as_tensor(_HostView(), device=device)
        variants["zero_copy_kernel"] = lambda: torch.bitwise_or(zc, 0, out=sd)
    except (RuntimeError, TypeError) as e:   # no zero-copy view on this torch / driver: recorded
        out["zero_copy_kernel"] = {"error": f"{type(e).__name__}: {e}"}

    def big():
        with torch.cuda.stream(cs):
            big_d.copy_(big_h, non_blocking=True)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    big()
    cs.synchronize()
    big_s = time.perf_counter() - t0
    out["big_copy_ms"], out["big_copy_GBps"] = big_s * 1e3, (big_MB << 20) / big_s / 1e9
    for name, fn in variants.items():
        try:
            alone, during = [], []
            for _ in range(reps):
                torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                fn()
                cur.synchronize()
                alone.append(time.perf_counter() - t0)
            for _ in range(reps):
                torch.cuda.synchronize(device)
                big()
                time.sleep(0.002)                 # the big copy is under way
                t0 = time.perf_counter()
                fn()
                cur.synchronize()
                during.append(time.perf_counter() - t0)
                cs.synchronize()
            a, d = min(alone) * 1e3, min(during) * 1e3
            out[name] = {"alone_ms": a, "during_big_copy_ms": d,
                         "waits_for_big_copy": bool(d > 0.5 * (big_s * 1e3 - 2.0) and d > 3 * a)}
        except RuntimeError as e:   # a CUDA error of this variant: recorded, the others still measured
            out[name] = {"error": f"{type(e).__name__}: {e}"}
    del big_h, big_d
    return out


def choose_host_io(asked: str, device, probe: dict | None) -> str:
    """--host-io auto: direct without CUDA; zero-copy when the probe saw a pinned H2D wait behind the expert
    copy and a zero-copy kernel not; pinned otherwise."""
    if asked != "auto":
        return asked
    if device.type != "cuda":
        return "direct"
    p = probe or {}
    pin, zc = p.get("h2d_pinned") or {}, p.get("zero_copy_kernel") or {}
    if pin.get("waits_for_big_copy") and "alone_ms" in zc and not zc.get("waits_for_big_copy"):
        return "zero-copy"
    return "pinned"


def machine_info(device) -> dict:
    from specmoe.runtime.device import machine_description

    m = machine_description(device)
    try:
        import cupy
        m["cupy_version"] = cupy.__version__
    except ImportError as e:
        m["cupy_version"] = f"none ({type(e).__name__})"
    if device.type == "cuda":
        import torch
        p = torch.cuda.get_device_properties(device)
        m["gpu_mem_GiB"] = p.total_memory / GiB
    return m
