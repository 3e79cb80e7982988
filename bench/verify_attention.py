"""Verify-attention benchmark: our C++ kernel vs torch SDPA vs the torch reference, one run.

    python bench/verify_attention.py [--dtype fp32|bf16] [--quick] [--save] [--tag devbox-2core]

Shape: B=4 sequences, Hq=32, Hkv=8 (g=4), D=128, k+1 in {1,2,4,8,16} x context in
{512,2048,8192}, uniform context, cache rows = the batch (slots 0..B-1, capacity S = ctx+k+1, so
torch SDPA reads the cache through views without a gather). Figures are KV GB/s: KV bytes per
call / time, KV bytes = sum over sequences of 2*(ctx+N)*Hkv*D*elem_size. Each case is timed as the
median of several calls after a warm-up, side by side in this run, next to this machine's DRAM
read bandwidth (torch sum over a 1 GiB fp32 tensor) and fp32 GEMM rate (4096^3 torch.matmul),
both measured here. The last line is the one-line summary.

Roofline. Per (sequence, KV head), the g*N query rows each do one multiply-add (2 flops) with
every element of every K row they see (QK^T) and one with every element of every V row they see
(PV). So each KV element -- K or V -- costs 2*g*N flops, and a KV byte 2*g*N/elem_size flops
(fp32, g=4: 2*N flop/byte; the 2*g*N*2/elem_size sometimes quoted counts QK^T and PV against
only one of K, V). Causality inside the new block removes N*(N-1)/2 key visits per query
group: exact flops = 4*D*Hq*sum_b(N*ctx_b + N*(N+1)/2). The bound for a case is
    time >= max(KV bytes / DRAM read rate, exact flops / GEMM rate),
reported as KV bytes / that time; at ctx >= 512 it is within 1.5% of min(DRAM GB/s,
GEMM FLOP/s / (2*g*N/elem_size)). The GEMM rate is fp32 for both dtypes: the kernel widens bf16
to fp32 and computes in fp32.
"""

from __future__ import annotations

import os

# Waiting OpenMP threads sleep instead of spinning. libgomp (shared by torch and our kernel)
# reads this when torch is imported, so it is set first; it applies to every figure below. On a
# machine shared with other work a spinning thread uses up its share and is descheduled, and
# each parallel region then waits a scheduler tick for it (measured here: 2 threads 20 ms per
# call instead of 1.7 ms). Set OMP_WAIT_POLICY yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from specmoe.runtime.kernels.verify_attention import (  # noqa: E402
    kernel_info, verify_attention, verify_attention_backend, verify_attention_reference)

B, HQ, HKV, D = 4, 32, 8, 128
KP1S = (1, 2, 4, 8, 16)
CONTEXTS = (512, 2048, 8192)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(fn, *, repeats: int, min_time_s: float) -> float:
    """Median seconds per call after one warm-up; at least `repeats` calls and min_time_s total."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start < min_time_s and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timed_interleaved(fns: dict, *, repeats: int, min_time_s: float) -> dict:
    """Median seconds per call of each function, timed in alternating rounds after a warm-up,
    so a change in the machine's load hits all of them alike."""
    for fn in fns.values():
        fn()
    times: dict = {name: [] for name in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < repeats or (time.perf_counter() - start < min_time_s and rounds < 200):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    return {name: statistics.median(ts) for name, ts in times.items()}


def measure_dram_read_GBps(repeats: int) -> float:
    x = torch.ones(1 << 28, dtype=torch.float32)  # 1 GiB
    t = timed(lambda: x.sum(), repeats=repeats, min_time_s=0.0)
    return x.numel() * 4 / t / 1e9


def measure_gemm_GFLOPs(repeats: int) -> float:
    n = 4096
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = timed(lambda: torch.matmul(a, b), repeats=repeats, min_time_s=0.0)
    return 2 * n**3 / t / 1e9


def sdpa_fn(q, k_cache, v_cache, ctx: int):
    """torch SDPA over cache views, causal inside the new block, GQA by enable_gqa."""
    N = q.shape[1]
    L = ctx + N
    qs = q.transpose(1, 2).contiguous()  # [B, Hq, N, D]
    allowed = torch.arange(L)[None, :] <= (ctx + torch.arange(N))[:, None]  # [N, L] bool
    widen = k_cache.dtype != torch.float32

    def run():
        ks, vs = k_cache[:, :, :L], v_cache[:, :, :L]  # [B, Hkv, L, D] views
        if widen:  # SDPA takes one dtype: bf16 KV is widened to fp32 inside the timed call
            ks, vs = ks.float(), vs.float()
        return F.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed, enable_gqa=True)

    return run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="KV cache dtype")
    ap.add_argument("--quick", action="store_true", help="fewer repeats (smoke test)")
    ap.add_argument("--save", action="store_true", help="also write bench/results/verify_attention_<tag>.txt")
    ap.add_argument("--tag", default=f"devbox-{os.cpu_count()}core", help="machine tag for --save")
    args = ap.parse_args(argv)
    kv_dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    elem = 4 if args.dtype == "fp32" else 2
    reps, min_t = (3, 0.05) if args.quick else (7, 0.3)
    lines: list[str] = []

    def say(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    torch.manual_seed(0)
    say(f"verify attention benchmark: B={B} Hq={HQ} Hkv={HKV} (g={HQ // HKV}) D={D}, KV {args.dtype}")
    say(f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"threads={torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
        f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
    say(f"kernel: {verify_attention_backend()} ({kernel_info()}); load average at start "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (other processes make every figure noisy)")
    dram0 = measure_dram_read_GBps(3 if args.quick else 5)
    gemm0 = measure_gemm_GFLOPs(2 if args.quick else 3)
    measured = []
    for ctx in CONTEXTS:
        for n in KP1S:
            L = ctx + n
            k_cache = torch.randn(B, HKV, L, D).to(kv_dtype)  # [R=B, Hkv, S=L, D]
            v_cache = torch.randn(B, HKV, L, D).to(kv_dtype)
            q = torch.randn(B, n, HQ, D)  # [B, N, Hq, D]
            slots = torch.arange(B, dtype=torch.int64)
            ctx_lens = torch.full((B,), ctx, dtype=torch.int64)
            out = torch.empty(B, n, HQ, D)
            kv_bytes = B * 2 * L * HKV * D * elem
            flops = 4 * D * HQ * B * (n * ctx + n * (n + 1) // 2)
            sdpa = sdpa_fn(q, k_cache, v_cache, ctx)
            verify_attention(q, k_cache, v_cache, slots, ctx_lens, out=out, backend="cpp")
            want = sdpa().transpose(1, 2)  # [B, N, Hq, D]
            err = ((out - want).abs().max() / want.abs().max()).item()
            if not err < 1e-4:  # the three implementations must compute the same thing
                raise SystemExit(f"verify_attention disagrees with torch SDPA at k+1={n} ctx={ctx}: {err:.2e}")
            t = timed_interleaved(
                {"ours": lambda: verify_attention(q, k_cache, v_cache, slots, ctx_lens, out=out, backend="cpp"),
                 "sdpa": sdpa}, repeats=reps, min_time_s=min_t)
            t_ours, t_sdpa = t["ours"], t["sdpa"]
            t_ref = timed(lambda: verify_attention_reference(q, k_cache, v_cache, slots, ctx_lens, out=out),
                          repeats=max(2, reps // 2), min_time_s=0.0)
            measured.append((n, ctx, kv_bytes, flops, t_ours, t_sdpa, t_ref))
            print(f"  measured k+1={n} ctx={ctx}", file=sys.stderr, flush=True)
            del k_cache, v_cache
    dram1 = measure_dram_read_GBps(3 if args.quick else 5)
    gemm1 = measure_gemm_GFLOPs(2 if args.quick else 3)
    dram, gemm = max(dram0, dram1), max(gemm0, gemm1)  # the machine's capability: the better figure
    say(f"measured here at start / end: DRAM read {dram0:.1f} / {dram1:.1f} GB/s (torch sum, 1 GiB fp32), "
        f"fp32 GEMM {gemm0:.0f} / {gemm1:.0f} GFLOP/s (4096^3 torch.matmul); bound uses the higher of each")
    say(f"load average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    say()
    say(f"{'k+1':>3} {'ctx':>5} | {'ours':>6} {'SDPA':>6} {'ref':>6} {'bound':>6} {'by':>4} | "
        f"{'ours/SDPA':>9} {'ours/bound':>10} | {'ours GFLOP/s':>12}")
    say(f"{'':>3} {'':>5} | {'KV GB/s':^27} {'':>4} |")
    results = {}
    for n, ctx, kv_bytes, flops, t_ours, t_sdpa, t_ref in measured:
        t_mem, t_flop = kv_bytes / (dram * 1e9), flops / (gemm * 1e9)
        bound = kv_bytes / max(t_mem, t_flop) / 1e9
        ours, sdpa, ref = (kv_bytes / t / 1e9 for t in (t_ours, t_sdpa, t_ref))
        results[(n, ctx)] = (ours / sdpa, ours / bound)
        say(f"{n:>3} {ctx:>5} | {ours:6.1f} {sdpa:6.1f} {ref:6.1f} {bound:6.1f} {'mem' if t_mem >= t_flop else 'flop':>4} | "
            f"{ours / sdpa:8.2f}x {100 * ours / bound:9.0f}% | {flops / t_ours / 1e9:12.1f}")
    say()
    worst = min(r[1] for (n, ctx), r in results.items() if n <= 16 and ctx >= 512)
    x8, b8 = results[(8, 2048)]
    summary = (f"verify-kernel: k+1=8 ctx=2048 {x8:.2f}x torch SDPA, {100 * b8:.0f}% of roofline; "
               f"worst case over k+1<=16: {100 * worst:.0f}% of roofline")
    if args.save:
        path = Path(__file__).resolve().parent / "results" / f"verify_attention_{args.tag}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join([*lines, summary]) + "\n")
        say(f"saved {path}")
    print(summary, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
