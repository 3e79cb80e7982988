"""The engine's memory as measured: the process's resident set (peak while loading the weights and peak
while generating, apart), the bytes of the tensors it allocated by component, and on a GPU the peak
allocated device memory. The RunRecord carries it (`memory`) beside the planner's footprint of the same
rows, and the report puts the two side by side (planner/report/memory_rows.py).

Peaks: VmHWM (/proc/self/status) is the peak RSS over the process's life; writing 5 to
/proc/self/clear_refs resets it to the current RSS (Linux 4.0+), so the load's peak (from the meter's
start: a calibration earlier in the process does not count) and the run's are measured apart. Where
that is refused, the peaks are the lifetime one (`host_peak_is_lifetime`).

File-backed pages (RssFile: the code of torch and the other libraries, paged in the first time an
operation runs, and any mapped file) are recorded apart (host_file_rss_*_bytes) and left out of every
measured row: they belong to the process's libraries, which the plan keeps in its reserve, not to the
engine's data, and they are clean pages the OS can drop. A standalone engine's first passes page in 24
MiB of them (libtorch_cpu 15, the tokenizer 5.5), more than the tiny pair's activations. A peak's data
part is VmHWM less the file-backed pages at the end: exact while those only grow after the peak (they do
once the engine's operations have run once); if the OS dropped some in between, it errs high.

Components (host, bytes): experts (the host store's rows), non_expert_weights (on a CPU device: the
target's other tensors), target_kv and draft (weights on a CPU device, and KV rows) in host memory, and
activations: the run's peak RSS above the RSS it started from (weights and KV in place; file-backed
pages left out), i.e. every transient and cached buffer of the passes. Memory that earlier work in the
process freed but the C allocator kept (a calibration before the run) would hide them: its pages are
reused, not faulted, so the RSS does not grow (the demo measured 0.03 MiB against 12.8 predicted). It is
released to the OS at the run's start (glibc's malloc_trim), so reuse is counted, and before the RSS
before any weight is read, so the peak above it is measured from the same kind of baseline. Buffers an
earlier run of the same engine allocated and kept (workspaces that grow only) are resident before the
run starts and so are not counted. On a GPU the same names for device memory, activations being the peak
allocated above the allocation at the start of the run.
"""
from __future__ import annotations

import ctypes
import resource
from pathlib import Path

import torch


def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def rss_bytes() -> int:
    """The process's resident set now (VmRSS), bytes."""
    v = _status_kib("VmRSS")
    return v * 1024 if v is not None else peak_rss_bytes()


def file_rss_bytes() -> int:
    """The file-backed part of the resident set now (RssFile: library code and mapped files), bytes; 0
    where /proc does not say."""
    v = _status_kib("RssFile")
    return v * 1024 if v is not None else 0


def peak_rss_bytes() -> int:
    """The peak resident set since the process began or the last reset_peak_rss() (VmHWM), bytes;
    getrusage's ru_maxrss (lifetime, KiB on Linux) where /proc is missing."""
    v = _status_kib("VmHWM")
    return v * 1024 if v is not None else int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel refuses (the peak then stays lifetime)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


_malloc_trim: list = []   # [glibc's malloc_trim or None], resolved once


def release_free_heap() -> bool:
    """Return the C heap's free pages to the OS (glibc malloc_trim), so that memory freed by earlier work
    is faulted in again, and counted, when reused; False where there is no glibc."""
    if not _malloc_trim:
        try:   # the process's own symbols: no library search (find_library runs ldconfig, ~2 ms a call)
            _malloc_trim.append(ctypes.CDLL(None).malloc_trim)
        except (OSError, AttributeError):
            _malloc_trim.append(None)
    if _malloc_trim[0] is None:
        return False
    _malloc_trim[0](0)
    return True


def tensor_bytes(*objs, seen: set | None = None) -> int:
    """Bytes of the distinct tensors reachable through tuples, lists, dicts and dataclass-like objects
    (their __dict__); a tensor viewed twice (or shared with `seen`) counts once, by its storage."""
    seen = set() if seen is None else seen
    total = 0
    stack = list(objs)
    while stack:
        o = stack.pop()
        if isinstance(o, torch.Tensor):
            key = (o.device.type, o.untyped_storage().data_ptr())
            if key not in seen:
                seen.add(key)
                total += o.untyped_storage().nbytes()
        elif isinstance(o, (list, tuple)):
            stack.extend(o)
        elif isinstance(o, dict):
            stack.extend(o.values())
        elif hasattr(o, "__dict__") and not isinstance(o, (type, torch.device, torch.dtype)):
            stack.extend(v for v in vars(o).values() if isinstance(v, (torch.Tensor, list, tuple, dict)) or
                         hasattr(v, "__dataclass_fields__"))
    return total


def kv_bytes(kv, part: int) -> int:
    """Bytes of a SplitKVCache's device rows (part 0) or host rows (part 1)."""
    if kv is None:
        return 0
    return sum(t.numel() * t.element_size() for t in kv.k[part] + kv.v[part] if t is not None)


class MemoryMeter:
    """RSS (and device memory) around an engine's load and each generate() call."""

    def __init__(self, device: torch.device):
        self.device = device
        release_free_heap()                     # the same baseline as each run's start (see run_started)
        self.start_rss = rss_bytes()            # the process before any weight: Python, torch, libraries
        self.start_file = file_rss_bytes()
        self.load_peak = self.loaded_rss = self.run_start_rss = self.loaded_file = self.run_start_file = 0
        # the load's peak from here, not the process's earlier work (a calibration before the engine)
        self.peak_is_lifetime = not reset_peak_rss()
        self.device_start = 0

    def loaded(self) -> None:
        """The weights are in place: the load's peak, then the peak restarts from here."""
        self.loaded_rss, self.loaded_file = rss_bytes(), file_rss_bytes()
        self.load_peak = max(peak_rss_bytes(), self.loaded_rss)   # read apart, a page may fault in between
        self.peak_is_lifetime = not reset_peak_rss()

    def run_started(self) -> None:
        """KV caches allocated, no pass yet: the run's peaks start here (the heap's free pages released)."""
        release_free_heap()
        self.peak_is_lifetime = not reset_peak_rss() or self.peak_is_lifetime
        self.run_start_rss, self.run_start_file = rss_bytes(), file_rss_bytes()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.device_start = int(torch.cuda.memory_allocated(self.device))

    def host_peak(self) -> int:
        return max(peak_rss_bytes(), rss_bytes())

    def activations(self, peak: int | None = None, end_file: int | None = None) -> int:
        """The run's peak RSS above its start, file-backed pages left out (module docstring); peak and
        end_file default to now's VmHWM and RssFile."""
        peak = peak_rss_bytes() if peak is None else peak
        end_file = file_rss_bytes() if end_file is None else end_file
        return max(0, (peak - end_file) - (self.run_start_rss - self.run_start_file))

    def device_peak(self) -> int | None:
        return int(torch.cuda.max_memory_allocated(self.device)) if self.device.type == "cuda" else None


def measured_memory(eng, meter: MemoryMeter, tkv, dkv, footprint: dict) -> dict:
    """The RunRecord's `memory`: RSS at start, load peak, after load, run start and run peak; host (and
    device) bytes by component; the planner's footprint of the run's rows (`footprint`, its to_dict())."""
    peak, end_file, on_cpu = meter.host_peak(), file_rss_bytes(), eng.device.type != "cuda"
    store = eng.store
    seen: set = set()
    experts = store.memory_bytes() if store is not None else {"host": 0, "cache": 0, "buffers": 0}
    if store is not None:
        tensor_bytes(store.host, seen=seen)
    target = tensor_bytes(eng.target.embed, eng.target.norm, eng.target.lm_head_w, eng.target.layers, seen=seen)
    draft_w = tensor_bytes(eng.draft, seen=seen) if eng.draft is not None else 0
    host = {"experts": experts["host"],
            "non_expert_weights": target if on_cpu else 0,
            "target_kv": kv_bytes(tkv, 1) + (kv_bytes(tkv, 0) if on_cpu else 0),
            "draft": kv_bytes(dkv, 1) + ((draft_w + kv_bytes(dkv, 0)) if on_cpu else 0),
            "activations": meter.activations(peak, end_file)}
    out = {"host_rss_start_bytes": meter.start_rss, "host_rss_load_peak_bytes": meter.load_peak,
           "host_rss_loaded_bytes": meter.loaded_rss, "host_rss_run_start_bytes": meter.run_start_rss,
           "host_rss_peak_bytes": peak, "host_peak_is_lifetime": meter.peak_is_lifetime,
           "host_file_rss_start_bytes": meter.start_file, "host_file_rss_loaded_bytes": meter.loaded_file,
           "host_file_rss_run_start_bytes": meter.run_start_file, "host_file_rss_end_bytes": end_file,
           "host_by_component": {k: int(v) for k, v in host.items()},
           "device_peak_allocated_bytes": meter.device_peak(), "device_by_component": {},
           "footprint": footprint}
    if not on_cpu:
        dpeak = out["device_peak_allocated_bytes"] or 0
        out["device_by_component"] = {
            "non_expert_weights": target, "experts": experts["cache"] + experts["buffers"],
            "target_kv": kv_bytes(tkv, 0), "draft": draft_w + kv_bytes(dkv, 0),
            "activations": max(0, dpeak - meter.device_start)}
    return out
