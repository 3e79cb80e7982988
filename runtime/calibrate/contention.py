"""Host DRAM shared by the expert stream and CPU verify attention, as `specmoe calibrate` measures it
where a GPU exists (the spec's `measured.dram_contention`, planner/shared_dram.py):

    cpu_read_GBps_alone        the verify-attention kernel's KV GB/s at one query (its most DRAM-bound
                               point) over a cold pool, with nothing else running
    cpu_read_GBps_during_h2d   the same while pinned host-to-GPU copies stream back to back
    h2d_GBps_alone             those copies' GB/s with the CPU idle
    h2d_GBps_during_cpu_read   their GB/s while the kernel runs

`contention_rates` is the bookkeeping (any reader and any asynchronous copy stream: the unit test
drives it with fakes); `measure_dram_contention` gives it the kernel and a CUDA copy stream.
"""
from __future__ import annotations

import time
from typing import Callable, Protocol

from specmoe.runtime.calibrate.measure import GB, MiB, kv_flat, kv_layers

CONTENTION_CONTEXT = 2048        # cache positions of the kernel's sequences
CONTENTION_KEYS = ("cpu_read_GBps_alone", "cpu_read_GBps_during_h2d", "h2d_GBps_alone", "h2d_GBps_during_cpu_read")


class CopyStream(Protocol):
    """Copies that run on their own once started (a DMA engine)."""

    nbytes: int                                  # bytes one start() copies

    def start(self) -> None: ...                 # enqueue the copies and return at once
    def done(self) -> bool: ...                  # have they all finished?
    def elapsed_s(self) -> float: ...            # seconds from the first copy's start to the last's end


def _read_for(read: Callable[[], int], until: Callable[[float], bool]) -> float:
    """Call read() until until(seconds so far) holds (at least once); its bytes per second."""
    nbytes, t0 = 0, time.perf_counter()
    while True:
        nbytes += read()
        t = time.perf_counter() - t0
        if until(t):
            return nbytes / t


def contention_rates(read: Callable[[], int], copies: CopyStream, window_s: float = 0.5,
                     reps: int = 3) -> dict[str, float]:
    """The four rates of the module docstring, GB/s, each the best of `reps` interleaved rounds (a burst
    of other work on a shared machine slows a round, never speeds it up). read() does one call of the
    CPU work and returns the bytes it read from DRAM. Alone, the CPU reads for window_s and the copies
    run with the CPU idle; together, the CPU reads until the copies are done, so the two overlap over
    the copies' whole time (start them with enough bytes to last several calls)."""
    best = dict.fromkeys(CONTENTION_KEYS, 0.0)

    def keep(key: str, rate_Bps: float) -> None:
        best[key] = max(best[key], rate_Bps / GB)

    for _ in range(max(1, reps)):
        keep("cpu_read_GBps_alone", _read_for(read, lambda t: t >= window_s))
        copies.start()
        while not copies.done():
            time.sleep(1e-4)
        keep("h2d_GBps_alone", copies.nbytes / copies.elapsed_s())
        copies.start()
        keep("cpu_read_GBps_during_h2d", _read_for(read, lambda t: copies.done()))
        keep("h2d_GBps_during_cpu_read", copies.nbytes / copies.elapsed_s())
    return best


class CudaCopyStream:
    """`copies` back-to-back copies of a pinned host chunk of chunk_MB into GPU memory, on a side
    stream, timed by CUDA events."""

    def __init__(self, chunk_MB: int = 256, copies: int = 16, device=None):
        import torch

        dev = torch.device("cuda", torch.cuda.current_device() if device is None else device)
        self.host = torch.empty(chunk_MB * MiB, dtype=torch.uint8, pin_memory=True)  # [bytes]
        self.host.fill_(1)
        self.gpu = torch.empty(chunk_MB * MiB, dtype=torch.uint8, device=dev)      # [bytes]
        self.stream = torch.cuda.Stream(dev)
        self.e0, self.e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.copies = copies
        self.nbytes = chunk_MB * MiB * copies
        self.start()                          # warm-up (the copy engine, the pinned pages)
        self.e1.synchronize()

    def start(self) -> None:
        import torch

        with torch.cuda.stream(self.stream):
            self.e0.record(self.stream)
            for _ in range(self.copies):
                self.gpu.copy_(self.host, non_blocking=True)
            self.e1.record(self.stream)

    def done(self) -> bool:
        return self.e1.query()

    def elapsed_s(self) -> float:
        self.e1.synchronize()
        return self.e0.elapsed_time(self.e1) / 1e3


def attention_reader(n_q_heads: int, n_kv_heads: int, head_dim: int, pool, kv_dtype: str,
                     call_bytes: int) -> Callable[[], int]:
    """One verify-attention call at one query per sequence over the next KV layer of the cold pool
    (walked cyclically); returns the KV bytes it read."""
    import torch

    from specmoe.runtime.kernels.verify_attention import verify_attention

    flat = kv_flat(pool, kv_dtype)
    Hq, Hkv, D, ctx = n_q_heads, n_kv_heads, head_dim, CONTENTION_CONTEXT
    B, layers = kv_layers(flat, Hkv, ctx + 1, D, call_bytes)
    q = torch.rand(B, 1, Hq, D, generator=torch.Generator().manual_seed(3)) - 0.5   # [B, 1, Hq, D]
    o = torch.empty(B, 1, Hq, D)                                                    # [B, 1, Hq, D]
    slots = torch.arange(B, dtype=torch.int64)                                      # [B]
    ctx_lens = torch.full((B,), ctx, dtype=torch.int64)                             # [B]
    nbytes = B * 2 * Hkv * (ctx + 1) * D * flat.element_size()
    cursor = [0]

    def read() -> int:
        k, v = layers[cursor[0]]
        cursor[0] = (cursor[0] + 1) % len(layers)
        verify_attention(q, k, v, slots, ctx_lens, out=o)
        return nbytes

    read()                                    # warm-up (threads, the kernel's first call)
    return read


def measure_dram_contention(n_q_heads: int, n_kv_heads: int, head_dim: int, *, pool, kv_dtype: str = "bf16",
                            call_bytes: int = 16 * MiB, reps: int = 3, device=None) -> dict[str, float]:
    """The four rates of the module docstring on this machine's CPU and GPU."""
    import torch

    read = attention_reader(n_q_heads, n_kv_heads, head_dim, pool, kv_dtype, call_bytes)
    copies = CudaCopyStream(device=device)
    try:
        return contention_rates(read, copies, reps=reps)
    finally:
        del copies
        torch.cuda.empty_cache()
