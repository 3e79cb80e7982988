#!/usr/bin/env python3
"""Time each CuPy kernel against its torch reference on the same GPU, at Mixtral-like sizes.

    python bench/gpu_kernels.py [--json results.json] [--quick]

Sizes: T = 4096 tokens, K = 2, E = 8, H = 4096, F = 14336 (SiLU-mul over the T*K expert rows);
acceptance B = 256, k = 4 (V = 32000 for rejection sampling); draft attention B = 256, Hq = 32,
Hkv = 8, D = 128, len = 1024, bf16 KV. Prints, side by side from one run: kernel and torch times,
their ratio, the bytes each op must move, the kernel's achieved GB/s and its fraction of the HBM
copy bandwidth measured in the same run (a big device-to-device copy; the H200 reference is
4.2 TB/s). Each op's kernel output is also checked against the reference. Without a GPU (or CuPy)
it prints one line and exits 0. Runs in well under 60 s on an H200.

Dimensions as in runtime/kernels/moe_ops.py.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path


import torch  # noqa: E402

from specmoe.runtime.kernels import cuda_ops  # noqa: E402
from specmoe.runtime.kernels import moe_ops as ops  # noqa: E402

HBM_REFERENCE_TBPS = 4.2


def time_gpu(fn, min_time_s: float = 0.15, max_reps: int = 50) -> float:
    """Median-free mean of repeated calls (CUDA events) after warm-up; seconds per call."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    one = max(start.elapsed_time(end) / 1e3, 1e-6)
    reps = int(max(3, min(max_reps, min_time_s / one)))
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def time_queued(fn, call_s: float, reps: int = 20) -> float:
    """GPU time per call without host gaps: the calls are queued while the GPU sleeps, then timed.

    Only for ops that never synchronise. Falls back to the host-paced time if torch lacks _sleep.
    """
    sleep = getattr(torch.cuda, "_sleep", None)
    if sleep is None:
        return call_s
    reps = int(max(3, min(reps, 4e-3 / max(call_s, 1e-6))))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    sleep(int(3e7))  # ~15 ms at 2 GHz: longer than queueing `reps` calls takes on the host
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def hbm_copy_GBps(nbytes: int = 2 << 30) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = time_gpu(lambda: dst.copy_(src), min_time_s=0.1, max_reps=20)
    del src, dst
    return 2 * nbytes / t / 1e9  # read + write


def _close(a, b, rtol: float, atol: float) -> bool:
    if isinstance(a, (tuple, list)):
        return all(_close(x, y, rtol, atol) for x, y in zip(a, b))
    if a.dtype in (torch.int64, torch.int32):
        return bool(torch.equal(a, b))
    return bool(torch.allclose(a.float(), b.float(), rtol=rtol, atol=atol))


def build_cases(quick: bool):
    """(name, size text, kernel fn, reference fn, bytes moved, rtol, atol) per op."""
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    T, K, E, H, F = (1024, 2, 8, 4096, 14336) if quick else (4096, 2, 8, 4096, 14336)
    N = T * K
    ids = torch.rand(T, E, generator=g, device=dev).topk(K, dim=1).indices  # [T, K]
    x = torch.randn(T, H, generator=g, device=dev).to(torch.bfloat16)  # [T, H]
    perm_res = ops.expert_permutation(ids, E)
    ys = torch.randn(N, H, generator=g, device=dev).to(torch.bfloat16)  # [N, H]
    w = torch.softmax(torch.randn(T, K, generator=g, device=dev), dim=1)  # [T, K]
    gate_up = torch.randn(N, 2 * F, generator=g, device=dev).to(torch.bfloat16)  # [N, 2F]
    B, k, V = 256, 4, 32000
    tgt = torch.randint(0, 8, (B, k + 1), generator=g, device=dev)
    drf = torch.where(torch.rand(B, k, generator=g, device=dev) < 0.8, tgt[:, :k], (tgt[:, :k] + 1) % 8)
    q_probs = torch.softmax(torch.randn(B, k, V, generator=g, device=dev), dim=-1)
    p_probs = torch.softmax(torch.randn(B, k + 1, V, generator=g, device=dev), dim=-1)
    d_tok = torch.multinomial(q_probs.view(-1, V), 1, generator=g).view(B, k)
    u_acc, u_smp = ops.draw_uniforms(B, k, generator=g, device=dev)
    Ba, Hq, Hkv, D, L = (64 if quick else 256), 32, 8, 128, 1024
    qa = torch.randn(Ba, Hq, D, generator=g, device=dev)
    kc = torch.randn(Ba, Hkv, L, D, generator=g, device=dev).to(torch.bfloat16)
    vc = torch.randn(Ba, Hkv, L, D, generator=g, device=dev).to(torch.bfloat16)
    slots = torch.randperm(Ba, generator=g, device=dev)
    lens = torch.full((Ba,), L, dtype=torch.int64, device=dev)
    i8 = 8
    return [
        ("expert_permutation", f"T={T} K={K} E={E}",
         lambda: ops.expert_permutation(ids, E, check=False), lambda: ops.expert_permutation_reference(ids, E),
         N * i8 + 2 * N * i8, 0, 0),
        ("permute_tokens", f"N={N} H={H} bf16",
         lambda: ops.permute_tokens(x, perm_res.perm, K), lambda: ops.permute_tokens_reference(x, perm_res.perm, K),
         2 * N * H * 2 + N * i8, 0, 0),
        ("unpermute_combine", f"T={T} K={K} H={H} bf16",
         lambda: ops.unpermute_combine(ys, perm_res.inv, w),
         lambda: ops.unpermute_combine_reference(ys, perm_res.inv, w),
         N * H * 2 + T * H * 2 + N * (i8 + 4), 1e-2, 1e-2),
        ("silu_mul (fused gate_up)", f"M={N} F={F} bf16",
         lambda: ops.silu_mul(gate_up), lambda: ops.silu_mul_reference(gate_up),
         N * 2 * F * 2 + N * F * 2, 1e-2, 1e-3),
        ("greedy_accept", f"B={B} k={k}",
         lambda: ops.greedy_accept(drf, tgt), lambda: ops.greedy_accept_reference(drf, tgt),
         B * (2 * k + 1) * i8 + 2 * B * i8, 0, 0),
        ("rejection_sample_accept", f"B={B} k={k} V={V} fp32",
         lambda: ops.rejection_sample_accept(d_tok, q_probs, p_probs, u_acc, u_smp),
         lambda: ops.rejection_sample_accept_reference(d_tok, q_probs, p_probs, u_acc, u_smp),
         2 * 2 * B * V * 4, 0, 0),
        ("draft_decode_attention", f"B={Ba} Hq={Hq} Hkv={Hkv} D={D} len={L} bf16",
         lambda: ops.draft_decode_attention(qa, kc, vc, slots, lens, max_len=L),
         lambda: ops.draft_decode_attention_reference(qa, kc, vc, slots, lens),
         2 * Ba * Hkv * L * D * 2 + 2 * Ba * Hq * D * 4, 1e-3, 1e-3),
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    args = ap.parse_args(argv)
    if not cuda_ops.cuda_available():
        print(f"gpu_kernels: no GPU kernels to time here ({cuda_ops.unavailable_reason()}); nothing done")
        return 0
    t_start = time.perf_counter()
    import cupy  # noqa: PLC0415

    props = torch.cuda.get_device_properties(0)
    print(f"machine: {props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB; "
          f"host {platform.node()}; torch {torch.__version__} (CUDA {torch.version.cuda}), cupy {cupy.__version__}")
    t0 = time.perf_counter()
    cuda_ops.precompile()
    print(f"compiled {len(cuda_ops.kernel_functions_used())} kernel sources with NVRTC in "
          f"{time.perf_counter() - t0:.1f} s (CuPy caches them on disk)")
    copy_GBps = hbm_copy_GBps()
    print(f"HBM device copy measured: {copy_GBps:.0f} GB/s (read + write; H200 reference {HBM_REFERENCE_TBPS} TB/s)")

    rows, failures = [], 0
    cases = build_cases(args.quick)
    torch.cuda.synchronize()
    for name, size, kern, ref, nbytes, rtol, atol in cases:
        row = {"op": name, "size": size, "bytes": nbytes}
        try:
            out_k = kern()
            out_r = ref()
            torch.cuda.synchronize()
            row["check"] = "ok" if _close(out_k, out_r, rtol, atol) else "MISMATCH"
            row["kernel_s"] = time_gpu(kern)  # per call, back to back, host overhead included
            row["kernel_gpu_s"] = time_queued(kern, row["kernel_s"])  # device time alone
            row["torch_s"] = time_gpu(ref)
            torch.cuda.synchronize()
            row["speedup"] = row["torch_s"] / row["kernel_s"]
            row["kernel_GBps"] = nbytes / row["kernel_gpu_s"] / 1e9
            row["frac_of_copy"] = row["kernel_GBps"] / copy_GBps
            row["frac_of_4.2TBps"] = row["kernel_GBps"] / (HBM_REFERENCE_TBPS * 1e3)
        except Exception as exc:  # report and go on with the other ops
            failures += 1
            row["check"] = f"ERROR {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
            try:
                torch.cuda.synchronize()
            except Exception:
                pass
        if row["check"] != "ok" and not row["check"].startswith("ERROR"):
            failures += 1
        rows.append(row)

    hdr = f"{'op':<26} {'size':<40} {'kern gpu us':>11} {'kern call us':>12} {'torch call us':>13} " \
          f"{'torch/kern':>10} {'GB/s':>6} {'of copy':>8} {'of 4.2TB/s':>10}  check"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        if "kernel_s" in r:
            print(f"{r['op']:<26} {r['size']:<40} {r['kernel_gpu_s'] * 1e6:>11.1f} {r['kernel_s'] * 1e6:>12.1f} "
                  f"{r['torch_s'] * 1e6:>13.1f} {r['speedup']:>10.2f} {r['kernel_GBps']:>6.0f} "
                  f"{r['frac_of_copy']:>8.1%} {r['frac_of_4.2TBps']:>10.1%}  {r['check']}")
        else:
            print(f"{r['op']:<26} {r['size']:<40} {'-':>11} {'-':>12} {'-':>13} {'-':>10} {'-':>6} {'-':>8} "
                  f"{'-':>10}  {r['check']}")
    print("(kern gpu = device time per call with the calls queued ahead (no host gaps); kern call / torch call =")
    print(" time per call back to back, host overhead included (torch = the *_reference functions on the same GPU,")
    print(" with their validation syncs); torch/kern = torch call / kern call; GB/s = bytes the op must move /")
    print(f" kern gpu time; of copy = of the device copy measured above. Total {time.perf_counter() - t_start:.1f} s)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": props.name, "hbm_copy_GBps": copy_GBps, "rows": rows}, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
