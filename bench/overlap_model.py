"""How much compute this CPU overlaps with streaming KV from DRAM: a model of the verify kernel's
memory pattern (bench/overlap_model.cpp) with register arithmetic or AMX tile work between its reads.

    python bench/overlap_model.py [--rounds 5] [--items 256]

Each kind of work runs alone (the same loop without the reads) and with the reads (K and V evicted
first by a 1 GiB read, as bench/verify_attention.py evicts them), in interleaved rounds beside the DRAM
probe that bench uses (a 1 GiB fp32 torch sum on every thread); figures are medians, in GB/s of K and
V and as a share of the probe. "no overlap" is what the two would give one after the other, 1/(1/alone
+ 1/reads alone); "full overlap" what they would give side by side, min(alone, reads alone). The
verify kernel at k+1 = 8, ctx 512 runs its arithmetic alone at about 0.8x the reads' rate; a kind of
work as fast as the reads alone shows where such a kernel can get.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as bench/verify_attention.py, before torch

import torch  # noqa: E402

from specmoe.runtime.kernels.build import load_cpp_kernel  # noqa: E402

SOURCE = Path(__file__).with_name("overlap_model.cpp")
# (name, kind, amount): kind 0 register arithmetic (a dependent 512-bit multiply-add), 1 AMX (a tile load
# and a TDPBF16PS); amount units per four line pairs (K and V lines) read
WORK = (("reads only", 0, 0), ("arithmetic 1", 0, 4), ("arithmetic 2", 0, 8), ("AMX 1/4", 1, 1), ("AMX 1/2", 1, 2),
        ("AMX 1", 1, 4), ("AMX 2", 1, 8))


def build() -> ctypes.CDLL:
    """The model compiled for this CPU by the kernels' own build (-march=native, OpenMP, cached);
    SystemExit(2) when it cannot be (the build's warning says why)."""
    lib = load_cpp_kernel("overlap_model", source=SOURCE)
    if lib is None:
        print("overlap_model: the model could not be built here (see the warning above)", file=sys.stderr)
        raise SystemExit(2)
    lib.overlap_model_run.restype = ctypes.c_double
    lib.overlap_model_run.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_int,
                                      ctypes.c_int, ctypes.c_int]
    lib.overlap_model_bytes.restype = ctypes.c_long
    lib.overlap_model_bytes.argtypes = [ctypes.c_long]
    lib.overlap_model_has_amx.restype = ctypes.c_int
    return lib


def measure(lib, items: int, rounds: int, probe_bytes: int, threads: int) -> dict:
    """Median seconds of each (name, with_memory) and of the probe over interleaved rounds."""
    half = lib.overlap_model_bytes(items) // 2
    k, v = torch.ones(half, dtype=torch.uint8), torch.ones(half, dtype=torch.uint8)
    flush = torch.ones(probe_bytes // 4, dtype=torch.float32)
    work = [w for w in WORK if w[1] == 0 or lib.overlap_model_has_amx()]
    times: dict = {"probe": []}
    for r in range(rounds):
        t = time.perf_counter()
        flush.sum()
        times["probe"].append(time.perf_counter() - t)
        for name, kind, amount in work[r % len(work):] + work[:r % len(work)]:
            for mem in (0, 1):
                if mem:
                    flush.sum()  # K and V out of every cache
                s = lib.overlap_model_run(k.data_ptr(), v.data_ptr(), items, kind, amount, mem, threads)
                times.setdefault((name, mem), []).append(s)
    return {key: statistics.median(ts) for key, ts in times.items()}


def table(med: dict, items_bytes: int, probe_bytes: int) -> tuple[list[str], dict]:
    """The table's lines and {name: share of the probe with the reads}."""
    probe = probe_bytes / med["probe"] / 1e9
    reads = items_bytes / med[("reads only", 1)] / 1e9
    lines = [f"DRAM probe {probe:.1f} GB/s; the reads alone {reads:.1f} GB/s ({100 * reads / probe:.0f}%); "
             "work: units per line pair",
             f"{'work':<14} | {'alone':>13} | {'with reads':>13} | {'no overlap':>10} | {'full overlap':>12}",
             f"{'':<14} | {'GB/s  %probe':>13} | {'GB/s  %probe':>13} | {'%probe':>10} | {'%probe':>12}"]
    shares = {}
    for name, _, _ in WORK[1:]:
        if (name, 0) not in med:
            lines.append(f"{name:<14} | (no AMX here)")
            continue
        alone, both = items_bytes / med[(name, 0)] / 1e9, items_bytes / med[(name, 1)] / 1e9
        serial, parallel = 1 / (1 / alone + 1 / reads), min(alone, reads)
        shares[name] = both / probe
        lines.append(f"{name:<14} | {alone:5.1f} {100 * alone / probe:6.0f}% | {both:5.1f} {100 * both / probe:6.0f}% | "
                     f"{100 * serial / probe:9.0f}% | {100 * parallel / probe:11.0f}%")
    return lines, shares


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--items", type=int, default=256, help="items of 520 keys x 2 x 256 B per run")
    ap.add_argument("--probe-mib", type=int, default=1024, help="the DRAM probe's (and eviction's) read, MiB")
    args = ap.parse_args(argv)
    for field in ("rounds", "items", "probe_mib"):
        if getattr(args, field) < 1:
            print(f"overlap_model: --{field.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    threads = torch.get_num_threads()
    lib = build()
    print(f"overlap model: {threads} threads, {args.rounds} rounds, {args.items} items "
          f"(AMX work {'runs' if lib.overlap_model_has_amx() else 'cannot run'} here)", flush=True)
    probe_bytes = args.probe_mib << 20
    med = measure(lib, args.items, args.rounds, probe_bytes, threads)
    lines, shares = table(med, lib.overlap_model_bytes(args.items), probe_bytes)
    print("\n".join(lines))
    summary = ", ".join(f"{name} {100 * s:.0f}%" for name, s in shares.items())
    print(f"overlap-model: with the reads, of the DRAM probe: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
