#!/usr/bin/env python
"""Engine on the CPU, side by side in one run: speculative decoding (the plan's k, or the best k of a
quick sweep over 1..6) against k = 0 against transformers' generate, on the tiny trained pair.

    python bench/engine_cpu.py [--target models/tiny-moe] [--draft models/tiny-draft]
                               [--prompts models/prompts.jsonl] [--batch 8] [--max-new-tokens 48] [--k K]

Decode tokens/s: the engine's RunRecord (tokens emitted by decode iterations / their wall time).
transformers: generate() over the same prompts in batches of the same size (left padding), its
decode rate taken as (tokens(N) - tokens(1)) / (time(N) - time(1)) so prefill is excluded as well.
Every rate is the median of --rounds interleaved repetitions (the 2 cores are shared with other work).
Ends with exactly one line:
    engine: speculation X.XXx over k=0, Y.YYx over transformers generate (acceptance A.AA)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # shared cores: idle OpenMP workers sleep, not spin

REPO = Path(__file__).resolve().parent.parent

import torch  # noqa: E402


def read_prompts(path: Path, n: int) -> list[str]:
    from specmoe.runtime.cli.run import read_prompts as rp

    return rp(path)[:n]


def hf_generate_rate(target: Path, prompts_ids: list[list[int]], batch: int, max_new: int, dtype, eos: int | None,
                     rounds: int = 3):
    """Median over rounds of (decode tokens/s, tokens, seconds) of transformers' generate, prefill excluded
    by difference."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype)
    model.eval()

    def run(n_new: int) -> tuple[int, float]:
        toks, t0 = 0, time.perf_counter()
        for i in range(0, len(prompts_ids), batch):
            chunk = prompts_ids[i:i + batch]
            L = max(len(p) for p in chunk)
            ids = torch.tensor([[0] * (L - len(p)) + p for p in chunk])
            mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in chunk])
            with torch.no_grad():
                out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n_new,
                                     eos_token_id=eos, pad_token_id=0)
            for row in out[:, L:].tolist():
                n = len(row)
                if eos is not None and eos in row:
                    n = row.index(eos) + 1
                toks += n
        return toks, time.perf_counter() - t0

    run(2)  # warm-up
    rates = []
    for _ in range(rounds):
        t1, s1 = run(1)
        tn, sn = run(max_new)
        rates.append(((tn - t1) / max(sn - s1, 1e-9), tn, sn))
    return sorted(rates)[len(rates) // 2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default=str(REPO / "models" / "tiny-moe"))
    ap.add_argument("--draft", default=str(REPO / "models" / "tiny-draft"))
    ap.add_argument("--prompts", default=str(REPO / "models" / "prompts.jsonl"))
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--micro-batches", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--k", type=int, default=None, help="draft length (default: best of a quick sweep over 1..6)")
    ap.add_argument("--dtype", default="float32",
                    help="both engines' compute dtype (default float32: on CPUs without AMX, bf16 GEMMs this small "
                         "run about 2x slower than fp32); 'checkpoint' uses the checkpoint's")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; medians are reported")
    ap.add_argument("--draft-kv-gpu-sequences", type=int, default=None,
                    help="draft KV rows in the device part (default: 0 without a GPU, where both parts are host "
                         "memory and the host part's C++ verify kernel is the faster path; else all)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from specmoe.runtime.weights.checkpoint import read_config
    from specmoe.runtime.device import machine_description
    from specmoe.runtime.engine import Engine, plan_for_checkpoint

    target, draft = Path(args.target), Path(args.draft)
    for p in (target, draft, Path(args.prompts)):
        if not p.exists():
            print(f"engine_cpu: {p} does not exist (train the pair with scripts/train_tiny.py)", file=sys.stderr)
            return 2
    prompts = read_prompts(Path(args.prompts), args.num_prompts)
    B = min(args.batch, len(prompts))
    dtype = read_config(target).torch_dtype if args.dtype == "checkpoint" else args.dtype
    gpu_rows = args.draft_kv_gpu_sequences
    if gpu_rows is None:
        gpu_rows = B if torch.cuda.is_available() else 0
    machine = machine_description(torch.device("cpu"))
    print(f"machine: {machine['cpu_model']}, {machine['cpu_cores']} cores, torch {machine['torch_version']}, "
          f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.1f} (other processes share the cores)")
    print(f"pair: {target.name} / {draft.name}, dtype {dtype}, {len(prompts)} prompts, batch {B}, "
          f"{args.max_new_tokens} new tokens, draft KV rows on the device part: {min(gpu_rows, B)}")
    plan = plan_for_checkpoint(target, draft, "devbox-2core", batch=B, draft_len=args.k or 4,
                               micro_batches=args.micro_batches, draft_kv_gpu_sequences=min(gpu_rows, B))
    eng = Engine(plan, target, draft, dtype=dtype)
    eng.generate(prompts[:B], max_new_tokens=4, draft_len=2)   # warm-up (kernel build, caches)

    def measure(k: int, ps, n_new: int):
        return eng.generate(ps, max_new_tokens=n_new, draft_len=k).record

    def median_run(ks, ps, n_new, rounds):
        """Interleaved rounds (the cores are shared: load drifts), the median decode rate per k."""
        recs = {kk: [] for kk in ks}
        for _ in range(rounds):
            for kk in ks:
                recs[kk].append(measure(kk, ps, n_new))
        return {kk: sorted(rs, key=lambda r: r.decode_tokens_per_s)[len(rs) // 2] for kk, rs in recs.items()}

    k = args.k
    if k is None:
        sub = prompts[:B]
        sweep = median_run(range(0, 7), sub, min(24, args.max_new_tokens), 3)
        k = max(range(1, 7), key=lambda kk: sweep[kk].decode_tokens_per_s)
        print("quick sweep (median decode tok/s of 3 interleaved rounds, %d prompts): %s -> k=%d" % (len(sub), ", ".join(
            f"k={a}: {r.decode_tokens_per_s:.1f}" for a, r in sweep.items()), k))
    final = median_run((0, k), prompts, args.max_new_tokens, args.rounds)
    r0, rk = final[0], final[k]
    ids = [eng.tokenizer.encode(p) for p in prompts]
    eos = eng.eos_ids[0] if eng.eos_ids else None
    hf_rate, hf_tok, hf_s = hf_generate_rate(target, ids, B, args.max_new_tokens, eng.dtype, eos, args.rounds)
    rows = [("transformers generate", "-", hf_rate, hf_tok / hf_s, "-", "-"),
            ("engine k=0", 0, r0.decode_tokens_per_s, r0.end_to_end_tokens_per_s, "-", r0.token_flips),
            (f"engine k={k}", k, rk.decode_tokens_per_s, rk.end_to_end_tokens_per_s, f"{rk.mean_accepted:.2f}",
             rk.token_flips)]
    print(f"{'run':<24}{'k':>3}{'decode tok/s':>14}{'e2e tok/s':>12}{'accepted':>10}{'flips':>7}")
    for name, kk, dec, e2e, acc, fl in rows:
        print(f"{name:<24}{kk!s:>3}{dec:>14.1f}{e2e:>12.1f}{acc:>10}{fl!s:>7}")
    st = rk.stages
    print("engine k=%d stages (ms/iteration): %s" % (k, ", ".join(
        f"{n} {st[n] * 1e3:.2f}" for n in st if n not in ("prefill",) and st[n] > 0)))
    print(json.dumps({"acceptance_histogram": rk.acceptance_histogram, "backends": rk.backends}))
    print(f"engine: speculation {rk.decode_tokens_per_s / r0.decode_tokens_per_s:.2f}x over k=0, "
          f"{rk.decode_tokens_per_s / hf_rate:.2f}x over transformers generate (acceptance {rk.mean_accepted:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
