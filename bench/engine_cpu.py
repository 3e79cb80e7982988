#!/usr/bin/env python
"""Engine on the CPU, side by side in one run: speculative decoding (the plan's k, or the best k of a
quick sweep over 1..6) against k = 0 against transformers' generate, on the tiny trained target with
each of its drafts (the small draft model and the EAGLE head, by default).

    python bench/engine_cpu.py [--target models/tiny-moe] [--draft models/tiny-draft models/tiny-eagle]
                               [--prompts models/prompts.jsonl] [--batch 8] [--max-new-tokens 48] [--k K]

Decode tokens/s: the engine's RunRecord (tokens emitted by decode iterations / their wall time).
transformers: generate() over the same prompts in batches of the same size (left padding), its
decode rate taken as (tokens(N) - tokens(1)) / (time(N) - time(1)) so prefill is excluded as well.
Each of --rounds rounds runs engine k=0, engine k and generate back to back (the cores are shared and the
machine's speed drifts); rates are medians over rounds, ratios medians of the per-round ratios.
Each draft ends with `engine[DRAFT k=K]: ...`; the run ends with `best: DRAFT k=K` (the draft and k of the
highest rate over generate) and then exactly one line for it:
    engine: speculation X.XXx over k=0, Y.YYx over transformers generate (acceptance A.AA)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # shared cores: idle OpenMP workers sleep, not spin

REPO = Path(__file__).resolve().parent.parent
DRAFTS = ("tiny-draft", "tiny-eagle")   # the drafts trained for tiny-moe: a small LM and an EAGLE head

import torch  # noqa: E402


def read_prompts(path: Path, n: int) -> list[str]:
    from specmoe.runtime.cli.run import read_prompts as rp

    return rp(path)[:n]


def hf_generate_round(target: Path, prompts_ids: list[list[int]], batch: int, max_new: int, dtype, eos: int | None):
    """A function measuring one round of transformers' generate over the prompts in batches of `batch` (left
    padding) -> (decode tokens/s, tokens, seconds), prefill excluded by difference."""
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

    def one_round() -> tuple[float, int, float]:
        t1, s1 = run(1)
        tn, sn = run(max_new)
        return (tn - t1) / max(sn - s1, 1e-9), tn, sn

    run(2)  # warm-up
    return one_round


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default=str(REPO / "models" / "tiny-moe"))
    ap.add_argument("--draft", nargs="+", default=[str(REPO / "models" / d) for d in DRAFTS],
                    help="one or more drafts, each measured on its own (default: the draft model and the EAGLE "
                         "head trained for tiny-moe); the summary line is the best of them")
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
    ap.add_argument("--rounds", type=int, default=5, help="interleaved repetitions; medians are reported")
    ap.add_argument("--draft-kv-gpu-sequences", type=int, default=None,
                    help="draft KV rows in the device part (default: 0 without a GPU, where both parts are host "
                         "memory and the host part's C++ verify kernel is the faster path; else all)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from specmoe.runtime.weights.checkpoint import read_config
    from specmoe.runtime.device import machine_description

    target, drafts = Path(args.target), [Path(d) for d in args.draft]
    for p in (target, *drafts, Path(args.prompts)):
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
    hf_round, best = None, None
    for draft in drafts:
        print(f"pair: {target.name} / {draft.name}, dtype {dtype}, {len(prompts)} prompts, batch {B}, "
              f"{args.max_new_tokens} new tokens, draft KV rows on the device part: {min(gpu_rows, B)}")
        eng = engine_for(target, draft, B, args, dtype, min(gpu_rows, B), prompts)
        k = args.k if args.k is not None else sweep_k(eng, prompts[:B], min(24, args.max_new_tokens))
        if hf_round is None:
            eos = eng.eos_ids[0] if eng.eos_ids else None
            hf_round = hf_generate_round(target, [eng.tokenizer.encode(p) for p in prompts], B, args.max_new_tokens,
                                         eng.dtype, eos)
        spec, over_hf, acc = report(side_by_side(eng, hf_round, k, prompts, args.max_new_tokens, args.rounds), k)
        print(f"engine[{draft.name} k={k}]: speculation {spec:.2f}x over k=0, {over_hf:.2f}x over transformers "
              f"generate (acceptance {acc:.2f})")
        if best is None or over_hf > best[2]:
            best = (f"{draft.name} k={k}", spec, over_hf, acc)
    name, spec, over_hf, acc = best
    print(f"best: {name}")
    print(f"engine: speculation {spec:.2f}x over k=0, {over_hf:.2f}x over transformers generate (acceptance {acc:.2f})")
    return 0


def engine_for(target: Path, draft: Path, B: int, args, dtype, gpu_rows: int, prompts: list[str]):
    """The engine for one pair, planned for the dev box and warmed up (kernel build, caches)."""
    from specmoe.runtime.engine import Engine, plan_for_checkpoint

    plan = plan_for_checkpoint(target, draft, "devbox-2core", batch=B, draft_len=args.k or 4,
                               micro_batches=args.micro_batches, draft_kv_gpu_sequences=gpu_rows)
    eng = Engine(plan, target, draft, dtype=dtype)
    eng.generate(prompts[:B], max_new_tokens=4, draft_len=2)
    return eng


def sweep_k(eng, prompts: list[str], n_new: int, rounds: int = 3) -> int:
    """The k in 1..6 of the best median decode rate over `rounds` interleaved rounds (load drifts)."""
    recs = {k: [] for k in range(0, 7)}
    for _ in range(rounds):
        for k in recs:
            recs[k].append(eng.generate(prompts, max_new_tokens=n_new, draft_len=k).record.decode_tokens_per_s)
    med = {k: statistics.median_high(r) for k, r in recs.items()}
    best = max(range(1, 7), key=lambda k: med[k])
    print("quick sweep (median decode tok/s of %d interleaved rounds, %d prompts): %s -> k=%d" % (
        rounds, len(prompts), ", ".join(f"k={k}: {r:.1f}" for k, r in med.items()), best))
    return best


def side_by_side(eng, hf_round, k: int, prompts: list[str], n_new: int, rounds: int) -> list[tuple]:
    """`rounds` rounds of (engine k=0 record, engine k record, transformers (tok/s, tokens, s)), each round
    running the three back to back so that every ratio compares runs taken in the same spell."""
    out = []
    for _ in range(rounds):
        r0 = eng.generate(prompts, max_new_tokens=n_new, draft_len=0).record
        rk = eng.generate(prompts, max_new_tokens=n_new, draft_len=k).record
        out.append((r0, rk, hf_round()))
    return out


def report(rounds: list[tuple], k: int) -> tuple[float, float, float]:
    """Print the table (median rates) and the stages -> (speculation over k=0, over generate, acceptance): the
    ratios medians of the per-round ratios."""
    med = statistics.median_high
    mid = lambda recs: sorted(recs, key=lambda r: r.decode_tokens_per_s)[len(recs) // 2]  # noqa: E731
    r0, rk, hf = mid([r[0] for r in rounds]), mid([r[1] for r in rounds]), med([r[2] for r in rounds])
    rows = [("transformers generate", "-", hf[0], hf[1] / hf[2], "-", "-"),
            ("engine k=0", 0, r0.decode_tokens_per_s, r0.end_to_end_tokens_per_s, "-", r0.token_flips),
            (f"engine k={k}", k, rk.decode_tokens_per_s, rk.end_to_end_tokens_per_s, f"{rk.mean_accepted:.2f}",
             rk.token_flips)]
    print(f"{'run':<24}{'k':>3}{'decode tok/s':>14}{'e2e tok/s':>12}{'accepted':>10}{'flips':>7}   (medians of {len(rounds)} rounds)")
    for name, kk, dec, e2e, acc, fl in rows:
        print(f"{name:<24}{kk!s:>3}{dec:>14.1f}{e2e:>12.1f}{acc:>10}{fl!s:>7}")
    spec = [b.decode_tokens_per_s / a.decode_tokens_per_s for a, b, _ in rounds]
    over_hf = [b.decode_tokens_per_s / h[0] for _, b, h in rounds]
    print("per round: engine k=%d / k=0 %s; engine k=%d / generate %s" % (
        k, " ".join(f"{x:.2f}" for x in spec), k, " ".join(f"{x:.2f}" for x in over_hf)))
    st = rk.stages
    print("engine k=%d stages (ms/iteration): %s" % (k, ", ".join(
        f"{n} {st[n] * 1e3:.2f}" for n in st if n not in ("prefill",) and st[n] > 0)))
    print(json.dumps({"acceptance_histogram": rk.acceptance_histogram, "backends": rk.backends}))
    return med(spec), med(over_hf), rk.mean_accepted


if __name__ == "__main__":
    sys.exit(main())
