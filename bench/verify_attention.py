"""Verify-attention benchmark: our C++ kernel vs torch SDPA vs the torch reference, one run;
then bf16 KV: the kernel's bf16 path (AMX / AVX512-BF16) vs its fp32 path vs torch SDPA.

    python bench/verify_attention.py [--dtype fp32|bf16] [--quick] [--save] [--tag devbox-2core]

Shape: B=4 sequences, Hq=32, Hkv=8 (g=4), D=128, k+1 in {1,2,4,8,16} x context in
{512,2048,8192}, uniform context, cache rows = the batch (slots 0..B-1, capacity S = ctx+k+1, so
torch SDPA reads the cache through views without a gather). Figures are KV GB/s: KV bytes per
call / time, KV bytes = sum over sequences of 2*(ctx+N)*Hkv*D*elem_size. Each case is timed as the
median of several calls after a warm-up, side by side in this run, next to this machine's DRAM
read bandwidth (torch sum over a 1 GiB fp32 tensor) and fp32 GEMM rate (torch.matmul),
both measured here, in the same rounds. The last line is the one-line summary.

Roofline. Per (sequence, KV head), the g*N query rows each do one multiply-add (2 flops) with
every element of every K row they see (QK^T) and one with every element of every V row they see
(PV). So each KV element -- K or V -- costs 2*g*N flops, and a KV byte 2*g*N/elem_size flops
(fp32, g=4: 2*N flop/byte; the 2*g*N*2/elem_size sometimes quoted counts QK^T and PV against
only one of K, V). Causality inside the new block removes N*(N-1)/2 key visits per query
group: exact flops = 4*D*Hq*sum_b(N*ctx_b + N*(N+1)/2). The bound for a case is
    time >= max(KV bytes / DRAM read rate, exact flops / GEMM rate),
reported as KV bytes / that time; at ctx >= 512 it is within 1.5% of min(DRAM GB/s,
GEMM FLOP/s / (2*g*N/elem_size)). Both rates are measured inside each case, by probes timed in the same
interleaved rounds as the kernels (a 1 GiB fp32 sum, a 2048^3 matmul): this machine's speed drifts
1.5x between spells, so rates taken once at the start hold for some cases and not for others. The
sum runs before every timed call, so every method of every case reads its KV from DRAM, as from a
real cache of many GB (it would otherwise sit in this machine's 300 MiB L3, and whichever method ran
second would read it from there). Between
that read and the timed call each method runs once on other inputs of PRIME_CTX = 16 cached keys, as
the previous layer's call would in an engine: it leaves the code, the Python wrapper and the work
buffers warm but not this call's KV, q or output (previous_layer). The read alone evicts those too;
the "cold" column times our kernel that way (measured 1.1-1.2x slower at ctx 512, ~1.05x at 2048,
SDPA about alike), and the line under each table gives its worst case. The
4096^3 figures at the start and end of the run are printed too, and each table's worst case against
the higher of them. A case measured in a slow spell of the host (its compute-bound sentinel, timed
before and after it, more than 15% over the fastest seen in this run) or beside other processes is
measured again, up to three tries, the cleanest kept, as calibration does (runtime/calibrate/quiet.py):
the DRAM probe, a bandwidth-bound sum, hardly moves in those spells while the kernels do, so a
case's ratio to its bound would move with them. The "spell" column gives the kept try's sentinel
ratio (* where no try was clean). The GEMM rate is fp32 for both dtypes: the kernel widens bf16
to fp32 and computes in fp32.

bf16 rows (second table, always bf16 KV, same shapes): the path verify_attention_path() picks
(AMX tiles where the CPU has them), the same kernel forced onto its fp32 path (K and V widened),
and torch SDPA two ways, on KV widened to fp32 inside the call and in bf16 throughout (q cast to
bf16); the faster SDPA is the one compared. Its bound is min(DRAM read, bf16 matrix rate /
intensity): time >= max(KV bytes / DRAM read rate, exact flops / bf16 GEMM rate), the bf16 rate
measured by the case's own probe (a 2048^3 bf16 torch.matmul in the same rounds). q holds bf16
values there, as a bf16 model's q projection does (the kernel gets it widened to fp32).
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

from specmoe.runtime.calibrate.quiet import QuietGuard  # noqa: E402
from specmoe.runtime.kernels.verify_attention import (  # noqa: E402
    kernel_info, verify_attention, verify_attention_backend, verify_attention_path, verify_attention_reference)

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


def timed_interleaved(fns: dict, *, repeats: int, min_time_s: float, probes=None, primes=None) -> dict:
    """Median seconds per call of each function, timed in alternating rounds after a warm-up,
    so a change in the machine's load hits all of them alike. With `probes` (a Probes), every call
    starts from a cache its DRAM read has just emptied (timed as "probe-dram") and each round also
    times its GEMM ("probe-gemm"). primes {name: fn}: run untimed between the DRAM read and that
    name's timed call (the previous layer's call, see PRIME_CTX)."""
    primes = primes or {}
    if probes is not None:
        fns = {**fns, "probe-gemm": probes.gemm}
    for fn in fns.values():
        fn()
    times: dict = {name: [] for name in (*fns, "probe-dram")}
    start = time.perf_counter()
    rounds = 0
    while rounds < repeats or (time.perf_counter() - start < min_time_s and rounds < 200):
        for name, fn in fns.items():
            if probes is not None:
                t0 = time.perf_counter()
                probes.dram()
                times["probe-dram"].append(time.perf_counter() - t0)
            if name in primes:
                primes[name]()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    return {name: statistics.median(ts) for name, ts in times.items() if ts}


def quiet_timing(guard: QuietGuard, measure):
    """measure() -> (its result, the try's quality): repeated while the machine is in a slow spell or
    other processes run (runtime/calibrate/quiet.py, as calibration does), the cleanest try kept."""
    held: dict = {}

    def step():
        held["r"] = measure()

    quality = guard.run(step, lambda: dict(held), lambda snap: (held.clear(), held.update(snap)))
    return held["r"], quality


def spell_cell(q: dict) -> str:
    """A case's sentinel slowdown against the machine's best, starred when no try was clean."""
    return f"{q['slowdown']:.2f}{'' if q['clean'] else '*'}"


def spell_line(qs: list[dict]) -> str:
    again = sum(q["tries"] > 1 for q in qs)
    unclean = [q for q in qs if not q["clean"]]
    worst = max((q["slowdown"] for q in qs), default=1.0)
    return (f"(slow spells: {again} of {len(qs)} cases measured again, {len(unclean)} kept from a try that was not "
            f"clean (*); sentinel up to {worst:.2f}x its best)")


def measure_dram_read_GBps(repeats: int) -> float:
    x = torch.ones(1 << 28, dtype=torch.float32)  # 1 GiB
    t = timed(lambda: x.sum(), repeats=repeats, min_time_s=0.0)
    return x.numel() * 4 / t / 1e9


PROBE_DRAM_BYTES = 1 << 30   # a 1 GiB fp32 sum: DRAM, not cache (this machine reports a 300 MiB L3)
PRIME_CTX = 16               # the "previous layer": the same call on other inputs of this many cached keys
PROBE_GEMM_N = 2048          # a 2048^3 matmul: 17 GFLOP, short enough to sit in every round


class Probes:
    """The bound's two rates measured inside each case's interleaved rounds, beside the kernels they bound:
    this machine's speed drifts 1.5x between spells, so a bound taken at the start or end of the run holds
    for some cases and not for others. The DRAM read runs before every timed call, so each call finds its
    KV out of cache, as a real cache of many GB would be, whichever method ran before it."""

    def __init__(self, gemm_dtype):
        self.x = torch.ones(PROBE_DRAM_BYTES // 4, dtype=torch.float32)
        n = PROBE_GEMM_N
        self.a, self.b = torch.randn(n, n).to(gemm_dtype), torch.randn(n, n).to(gemm_dtype)

    def dram(self):
        return self.x.sum()

    def gemm(self):
        return torch.matmul(self.a, self.b)

    @staticmethod
    def rates(t: dict) -> tuple[float, float]:
        """(DRAM GB/s, GEMM GFLOP/s) from one case's median seconds."""
        return PROBE_DRAM_BYTES / t["probe-dram"] / 1e9, 2 * PROBE_GEMM_N**3 / t["probe-gemm"] / 1e9


def measure_gemm_GFLOPs(repeats: int, dtype=torch.float32) -> float:
    n = 4096
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    t = timed(lambda: torch.matmul(a, b), repeats=repeats, min_time_s=0.0)
    return 2 * n**3 / t / 1e9


def roofline(kv_bytes: int, flops: int, dram_GBps: float, gemm_GFLOPs: float) -> tuple[float, str]:
    """(bound in KV GB/s, "mem" or "flop"): time >= max(KV bytes / DRAM rate, flops / GEMM rate)."""
    t_mem, t_flop = kv_bytes / (dram_GBps * 1e9), flops / (gemm_GFLOPs * 1e9)
    return kv_bytes / max(t_mem, t_flop) / 1e9, "mem" if t_mem >= t_flop else "flop"


def sdpa_fn(q, k_cache, v_cache, ctx: int, *, native: bool = False):
    """torch SDPA over cache views, causal inside the new block, GQA by enable_gqa. native: in the
    cache's dtype throughout (q cast to it, the output back to fp32)."""
    N = q.shape[1]
    L = ctx + N
    qs = q.transpose(1, 2).contiguous()  # [B, Hq, N, D]
    if native:
        qs = qs.to(k_cache.dtype)
    allowed = torch.arange(L)[None, :] <= (ctx + torch.arange(N))[:, None]  # [N, L] bool
    widen = k_cache.dtype != torch.float32 and not native

    def run():
        ks, vs = k_cache[:, :, :L], v_cache[:, :, :L]  # [B, Hkv, L, D] views
        if widen:  # SDPA takes one dtype: bf16 KV is widened to fp32 inside the timed call
            ks, vs = ks.float(), vs.float()
        return F.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed, enable_gqa=True).float()

    return run


def make_inputs(n: int, ctx: int, kv_dtype):
    L = ctx + n
    k_cache = torch.randn(B, HKV, L, D).to(kv_dtype)  # [R=B, Hkv, S=L, D]
    v_cache = torch.randn(B, HKV, L, D).to(kv_dtype)
    q = torch.randn(B, n, HQ, D)  # [B, N, Hq, D]
    if kv_dtype != torch.float32:
        q = q.bfloat16().float()  # a bf16 model's q: bf16 values, widened
    slots = torch.arange(B, dtype=torch.int64)
    ctx_lens = torch.full((B,), ctx, dtype=torch.int64)
    kv_bytes = B * 2 * L * HKV * D * k_cache.element_size()
    flops = 4 * D * HQ * B * (n * ctx + n * (n + 1) // 2)
    return q, k_cache, v_cache, slots, ctx_lens, kv_bytes, flops


def agree(out, want, tol: float, what: str) -> None:
    err = ((out - want).abs().max() / want.abs().max()).item()
    if not err < tol:  # the implementations must compute the same thing
        raise SystemExit(f"verify_attention disagrees with torch SDPA at {what}: {err:.2e}")


def previous_layer(n: int, kv_dtype, methods: dict) -> dict:
    """{name: the same method's call on other inputs of PRIME_CTX cached keys} for timed_interleaved's
    primes. methods {name: a kernel path, "sdpa" or "sdpa-bf16"}. In an engine the call before a layer's
    verify attention is the previous layer's: it leaves the code, the Python wrapper and the kernel's
    work buffers warm, while this layer's KV (part of a cache of many GB) comes from DRAM. The 1 GiB read
    evicts all of it; the previous layer's call brings back what it would have left, not this call's
    KV, q or output."""
    q, k_cache, v_cache, slots, ctx_lens, _, _ = make_inputs(n, PRIME_CTX, kv_dtype)
    out = torch.empty(B, n, HQ, D)
    primes = {}
    for name, how in methods.items():
        if how in ("sdpa", "sdpa-bf16"):
            primes[name] = sdpa_fn(q, k_cache, v_cache, PRIME_CTX, native=how == "sdpa-bf16")
        else:
            primes[name] = (lambda p=how: verify_attention(q, k_cache, v_cache, slots, ctx_lens, out=out,
                                                           backend="cpp", path=p))
    return primes


def measure_rows(kv_dtype, reps: int, min_t: float, guard: QuietGuard) -> list:
    """(n, ctx, kv_bytes, flops, t_ours, t_sdpa, t_ref, (DRAM GB/s, fp32 GFLOP/s), t_ours_cold) per case:
    the kernel's default path, and the bound's rates measured in the same rounds; t_ours_cold without
    the previous layer's call (everything cold), the case's quality (quiet_timing) last."""
    measured, probes = [], Probes(torch.float32)
    for ctx in CONTEXTS:
        for n in KP1S:
            q, k_cache, v_cache, slots, ctx_lens, kv_bytes, flops = make_inputs(n, ctx, kv_dtype)
            out = torch.empty(B, n, HQ, D)
            sdpa = sdpa_fn(q, k_cache, v_cache, ctx)
            verify_attention(q, k_cache, v_cache, slots, ctx_lens, out=out, backend="cpp", path="fp32")
            agree(out, sdpa().transpose(1, 2), 1e-4, f"k+1={n} ctx={ctx}")
            ours = lambda: verify_attention(q, k_cache, v_cache, slots, ctx_lens, out=out, backend="cpp",  # noqa: E731
                                            path="fp32")
            primes = previous_layer(n, kv_dtype, {"ours": "fp32", "sdpa": "sdpa"})
            t, quality = quiet_timing(guard, lambda: timed_interleaved(
                {"ours": ours, "ours-cold": ours, "sdpa": sdpa}, repeats=reps, min_time_s=min_t, probes=probes,
                primes=primes))
            t_ref = timed(lambda: verify_attention_reference(q, k_cache, v_cache, slots, ctx_lens, out=out),
                          repeats=max(2, reps // 2), min_time_s=0.0)
            measured.append((n, ctx, kv_bytes, flops, t["ours"], t["sdpa"], t_ref, Probes.rates(t), t["ours-cold"],
                             quality))
            print(f"  measured k+1={n} ctx={ctx}", file=sys.stderr, flush=True)
    return measured


def fp32_table(say, measured, dram_best: float, gemm_best: float) -> str:
    say(f"{'k+1':>3} {'ctx':>5} | {'ours':>6} {'cold':>6} {'SDPA':>6} {'ref':>6} {'bound':>6} {'by':>4} | "
        f"{'ours/SDPA':>9} {'ours/bound':>10} {'cold':>5} | {'ours GFLOP/s':>12} | {'DRAM':>5} {'GEMM':>5} | spell")
    say(f"{'':>3} {'':>5} | {'KV GB/s':^34} {'':>4} | {'':>27} | {'GB/s GFLOP/s':>11} |")
    results, at_best = {}, {}
    for n, ctx, kv_bytes, flops, t_ours, t_sdpa, t_ref, (dram, gemm), t_cold, quality in measured:
        at_best[(n, ctx)] = kv_bytes / t_ours / 1e9 / roofline(kv_bytes, flops, dram_best, gemm_best)[0]
        bound, by = roofline(kv_bytes, flops, dram, gemm)
        ours, cold, sdpa, ref = (kv_bytes / t / 1e9 for t in (t_ours, t_cold, t_sdpa, t_ref))
        results[(n, ctx)] = (ours / sdpa, ours / bound, cold / bound)
        say(f"{n:>3} {ctx:>5} | {ours:6.1f} {cold:6.1f} {sdpa:6.1f} {ref:6.1f} {bound:6.1f} {by:>4} | "
            f"{ours / sdpa:8.2f}x {100 * ours / bound:9.0f}% {100 * cold / bound:4.0f}% | "
            f"{flops / t_ours / 1e9:12.1f} | {dram:5.1f} {gemm:5.0f} | {spell_cell(quality)}")
    worst = min(r[1] for (n, ctx), r in results.items() if n <= 16 and ctx >= 512)
    say(spell_line([m[-1] for m in measured]))
    say(f"(against the run's best DRAM and GEMM figures instead of each case's own: worst case "
        f"{100 * min(at_best.values()):.0f}%, k+1=8 ctx=2048 {100 * at_best[(8, 2048)]:.0f}%; everything cold: "
        f"worst case {100 * min(r[2] for r in results.values()):.0f}% of roofline)")
    say()
    x8, b8, _ = results[(8, 2048)]
    return (f"verify-kernel: k+1=8 ctx=2048 {x8:.2f}x torch SDPA, {100 * b8:.0f}% of roofline; "
            f"worst case over k+1<=16: {100 * worst:.0f}% of roofline")


def measure_bf16_rows(path: str, reps: int, min_t: float, guard: QuietGuard) -> list:
    """(n, ctx, kv_bytes, flops, {name: seconds}) per case on bf16 KV: the bf16 path, the fp32
    path, SDPA on widened KV and SDPA in bf16, each after the previous layer's call, the bf16 path
    without it (PATH-cold), and the bound's probes (DRAM read, bf16 GEMM); the case's quality last."""
    measured, probes = [], Probes(torch.bfloat16)
    for ctx in CONTEXTS:
        for n in KP1S:
            q, k_cache, v_cache, slots, ctx_lens, kv_bytes, flops = make_inputs(n, ctx, torch.bfloat16)
            outs = {p: torch.empty(B, n, HQ, D) for p in (path, "fp32")}
            fns = {p: (lambda p=p: verify_attention(q, k_cache, v_cache, slots, ctx_lens, out=outs[p],
                                                    backend="cpp", path=p)) for p in outs}
            fns["sdpa"] = sdpa_fn(q, k_cache, v_cache, ctx)
            fns["sdpa-bf16"] = sdpa_fn(q, k_cache, v_cache, ctx, native=True)
            want = fns["sdpa"]().transpose(1, 2)  # [B, N, Hq, D]
            for p in outs:
                fns[p]()
                agree(outs[p], want, 1e-4 if p == "fp32" else 1e-2, f"bf16 {p} k+1={n} ctx={ctx}")  # bf16 P
            fns[f"{path}-cold"] = fns[path]
            primes = previous_layer(n, torch.bfloat16, {p: p for p in (path, "fp32", "sdpa", "sdpa-bf16")})
            t, quality = quiet_timing(guard, lambda: timed_interleaved(fns, repeats=reps, min_time_s=min_t,
                                                                       probes=probes, primes=primes))
            measured.append((n, ctx, kv_bytes, flops, t, quality))
            print(f"  measured bf16 k+1={n} ctx={ctx}", file=sys.stderr, flush=True)
    return measured


def bf16_table(say, measured, path: str, dram_best: float, gemm_best: float) -> str:
    say(f"{'k+1':>3} {'ctx':>5} | {path:>10} {'cold':>6} {'fp32 kern':>9} {'SDPA':>6} {'SDPAbf16':>8} {'bound':>6} "
        f"{'by':>4} | {'/fp32':>6} {'/SDPA':>6} {'/bound':>6} {'cold':>5} | {'GFLOP/s':>7} | {'DRAM':>5} {'GEMM':>5} | "
        f"spell")
    say(f"{'':>3} {'':>5} | {'KV GB/s (bf16 bytes)':^57} | {'':>35} | {'GB/s GFLOP/s':>11} |")
    results, at_best = {}, {}
    for n, ctx, kv_bytes, flops, t, quality in measured:
        dram, gemm_bf16 = Probes.rates(t)
        at_best[(n, ctx)] = kv_bytes / t[path] / 1e9 / roofline(kv_bytes, flops, dram_best, gemm_best)[0]
        bound, by = roofline(kv_bytes, flops, dram, gemm_bf16)
        ours, cold, f32, sd, sdb = (kv_bytes / t[k] / 1e9 for k in (path, f"{path}-cold", "fp32", "sdpa", "sdpa-bf16"))
        results[(n, ctx)] = (ours / f32, ours / max(sd, sdb), ours / bound, cold / bound)
        say(f"{n:>3} {ctx:>5} | {ours:10.1f} {cold:6.1f} {f32:9.1f} {sd:6.1f} {sdb:8.1f} {bound:6.1f} "
            f"{by:>4} | {ours / f32:5.2f}x {ours / max(sd, sdb):5.2f}x "
            f"{100 * ours / bound:5.0f}% {100 * cold / bound:4.0f}% | {flops / t[path] / 1e9:7.1f} | "
            f"{dram:5.1f} {gemm_bf16:5.0f} | {spell_cell(quality)}")
    worst = min(r[2] for (n, ctx), r in results.items() if n <= 16 and ctx >= 512)
    say(spell_line([m[-1] for m in measured]))
    say(f"(against the run's best DRAM and bf16 GEMM figures instead of each case's own: worst case "
        f"{100 * min(at_best.values()):.0f}%, k+1=16 ctx=2048 {100 * at_best[(16, 2048)]:.0f}%; everything cold: "
        f"worst case {100 * min(r[3] for r in results.values()):.0f}% of roofline)")
    say()
    xf, xs, b, _ = results[(16, 2048)]
    return (f"verify-kernel-bf16: {path} path; k+1=16 ctx=2048 {xf:.2f}x the fp32 kernel, {xs:.2f}x torch SDPA, "
            f"{100 * b:.0f}% of the bf16 roofline; worst case over k+1<=16: {100 * worst:.0f}% of roofline")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="KV dtype of the first table")
    ap.add_argument("--quick", action="store_true", help="fewer repeats (smoke test)")
    ap.add_argument("--save", action="store_true", help="also write bench/results/verify_attention_<tag>.txt "
                    "(first table) and verify_attention_bf16_<tag>.txt (everything)")
    ap.add_argument("--tag", default=f"devbox-{os.cpu_count()}core", help="machine tag for --save")
    args = ap.parse_args(argv)
    kv_dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    reps, min_t = (3, 0.05) if args.quick else (7, 0.3)
    lines: list[str] = []

    def say(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    torch.manual_seed(0)
    path = verify_attention_path(torch.bfloat16)
    say(f"verify attention benchmark: B={B} Hq={HQ} Hkv={HKV} (g={HQ // HKV}) D={D}, KV {args.dtype}")
    say(f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"threads={torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
        f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
    say(f"kernel: {verify_attention_backend()} ({kernel_info()}); bf16 KV path: {path}; load average at start "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (other processes make every figure noisy)")
    n_rep = 2 if args.quick else 3
    dram0, gemm0, bf0 = (measure_dram_read_GBps(n_rep + 2), measure_gemm_GFLOPs(n_rep),
                         measure_gemm_GFLOPs(n_rep, torch.bfloat16))
    guard = QuietGuard(max_tries=2 if args.quick else 3, retry_budget_s=60.0 if args.quick else 300.0)
    guard.warm_up()
    measured = measure_rows(kv_dtype, reps, min_t, guard)
    measured_bf16 = measure_bf16_rows(path, reps, min_t, guard)
    dram1, gemm1, bf1 = (measure_dram_read_GBps(n_rep + 2), measure_gemm_GFLOPs(n_rep),
                         measure_gemm_GFLOPs(n_rep, torch.bfloat16))
    dram, gemm, gemm_bf16 = max(dram0, dram1), max(gemm0, gemm1), max(bf0, bf1)  # the better figure
    say(f"measured here at start / end: DRAM read {dram0:.1f} / {dram1:.1f} GB/s (torch sum, 1 GiB fp32), "
        f"fp32 GEMM {gemm0:.0f} / {gemm1:.0f} GFLOP/s, bf16 GEMM {bf0:.0f} / {bf1:.0f} GFLOP/s (4096^3 "
        f"torch.matmul); each case's bound uses its own probes (a 1 GiB sum and a {PROBE_GEMM_N}^3 matmul timed in "
        f"the same interleaved rounds as the kernels), the line under each table the higher of these")
    say(f"load average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    say()
    summary = fp32_table(say, measured, dram, gemm)
    n_first = len(lines)
    say(f"bf16 KV: the {path} path against the same kernel's fp32 path and torch SDPA (bound: DRAM read, "
        f"bf16 GEMM rate / intensity)")
    summary_bf16 = bf16_table(say, measured_bf16, path, dram, gemm_bf16)
    if args.save:
        out_dir = Path(__file__).resolve().parent / "results"
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"verify_attention_{args.tag}.txt").write_text("\n".join([*lines[:n_first], summary]) + "\n")
        (out_dir / f"verify_attention_bf16_{args.tag}.txt").write_text(
            "\n".join([*lines, summary, summary_bf16]) + "\n")
        say(f"saved {out_dir}/verify_attention_{{,bf16_}}{args.tag}.txt")
    print(summary, flush=True)
    print(summary_bf16, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
