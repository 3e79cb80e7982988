"""acc(k), the expected accepted drafts per verified sequence, measured with the engine's own greedy
speculative loop: `specmoe profile-acceptance` and the demo.

    prof = profile_acceptance(target_dir, draft_dir, prompts, max_k=8, max_new_tokens=48)
    prof.write_csv("acceptance.csv")      # k,accepted,raw_accepted,verified,iterations,accepted_sd,accepted_p1..p99

Method: one Engine (a plan from plan_for_checkpoint at draft length max_k, so memory is checked for
the largest k once) generates every prompt greedily at each k = 1..max_k (generate(draft_len=k));
acc(k) is the RunRecord's accepted drafts / verified sequences over the whole run, exactly the
quantity the cost model's acc(k) stands for (tokens per iteration = acc(k) + 1), measured where the
engine's iterations really start. `accepted_sd` is the standard deviation across prompts of each
sequence's own mean accepted drafts per iteration, `accepted_p1` .. `accepted_p99` its quantiles
(planner.workload.QUANTILE_LEVELS): how unevenly a batch finishes under speculation (planner/batch_drain.py
turns them into the mean live batch of a finite job; the lower tail, a few prompts the draft fails on,
sets how long its slowest sequences run). Greedy acceptance is exact, so every k emits the target's greedy
text; sequences whose tokens differ between k (a top-2 logit gap inside float noise) are counted.

acc(k) = E[min(A, k)] (A: the run of draft tokens the target agrees with) cannot fall as k grows,
but each k's run visits its own iteration starts, so the raw means can dip by sampling noise; the
`accepted` column is their weighted isotonic (pool-adjacent-violators) fit, non-decreasing as
planner.workload.AcceptanceProfile requires, and `raw_accepted` keeps the measured means.
"""
from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from specmoe.planner.errors import SpecError

from specmoe.planner.atomic_file import atomic_write_text
from specmoe.planner.workload import MAX_DRAFT_LEN, QUANTILE_COLUMNS, QUANTILE_LEVELS


@dataclass
class AcceptanceResult:
    ks: list[int]
    accepted: list[float]          # monotone fit, k = 1..max_k
    raw: list[float]               # accepted / verified of each k's run
    verified: list[int]            # verified sequences (sequence-iterations) of each k's run
    iterations: list[int]
    tokens_per_s: list[float]      # decode tokens/s of each k's run (informational)
    differing_sequences: int       # sequences whose greedy tokens differ from the k = 1 run
    token_flips: int               # emitted tokens whose target top-2 gap was under the flip threshold
    prompts: int
    max_new_tokens: int
    elapsed_s: float
    info: dict = field(default_factory=dict)
    accepted_sd: list[float] = field(default_factory=list)   # across sequences, of each one's mean accepted drafts
    accepted_quantiles: list[list[float]] = field(default_factory=list)   # [k][QUANTILE_LEVELS] of the same

    def csv_text(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        sd = self.accepted_sd if len(self.accepted_sd) == len(self.ks) else None
        q = self.accepted_quantiles if len(self.accepted_quantiles) == len(self.ks) else None
        w.writerow(["k", "accepted", "raw_accepted", "verified", "iterations"] + (["accepted_sd"] if sd else [])
                   + (list(QUANTILE_COLUMNS) if q else []))
        for i, (k, a, r, v, n) in enumerate(zip(self.ks, self.accepted, self.raw, self.verified, self.iterations)):
            w.writerow([k, f"{a:.6f}", f"{r:.6f}", v, n] + ([f"{sd[i]:.6f}"] if sd else [])
                       + ([f"{x:.6f}" for x in q[i]] if q else []))
        return buf.getvalue()

    def write_csv(self, path: str | Path) -> Path:
        """Atomically (a temporary file renamed): an interruption leaves no half-written CSV."""
        p = Path(path)
        atomic_write_text(p, self.csv_text())
        return p

    def table(self) -> str:
        sd = self.accepted_sd if len(self.accepted_sd) == len(self.ks) else [float("nan")] * len(self.ks)
        lines = ["   k   acc(k)   measured   alpha   tokens/iter   verified   sd across sequences"]
        for k, a, r, v, s in zip(self.ks, self.accepted, self.raw, self.verified, sd):
            lines.append(f"  {k:2d}  {a:7.3f}  {r:9.3f}  {a / k:6.3f}  {a + 1:12.3f}  {v:9d}  {s:20.3f}")
        lines.append(f"  ({self.prompts} prompts, {self.max_new_tokens} new tokens, greedy; {self.differing_sequences} "
                     f"sequences differ between k, {self.token_flips} near-tie tokens; {self.elapsed_s:.1f} s)")
        return "\n".join(lines)


def isotonic(values: list[float], weights: list[float]) -> list[float]:
    """Weighted least-squares non-decreasing fit (pool adjacent violators)."""
    blocks: list[list[float]] = []          # [mean, weight, count]
    for v, w in zip(values, weights):
        blocks.append([float(v), max(float(w), 1e-12), 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, w2, n2 = blocks.pop()
            m1, w1, n1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    out = []
    for m, _, n in blocks:
        out.extend([m] * n)
    return out


def profile_acceptance(target_dir, draft_dir, prompts: list, max_k: int = MAX_DRAFT_LEN, max_new_tokens: int = 48,
                       batch: int | None = None, device=None, dtype=None,
                       progress: Callable[[int, dict], None] | None = None) -> AcceptanceResult:
    """Measure acc(k) for k = 1..max_k (see the module doc). progress(k, row) after each k."""
    from specmoe.runtime.engine import Engine
    from specmoe.runtime.engine_plan import plan_for_checkpoint

    for name, v, lo in (("--max-k", max_k, 1), ("--max-new-tokens", max_new_tokens, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise SpecError(name, f"must be an integer >= {lo}, got {v!r}", f"e.g. {name} 8")
    if not prompts:
        raise SpecError("--prompts", "no prompts", "give at least one prompt")
    if draft_dir is None:
        raise SpecError("--draft", "missing", "give the draft checkpoint directory")
    B = int(batch) if batch else min(len(prompts), 64)
    if B < 1:
        raise SpecError("--batch", f"must be >= 1, got {batch}", "e.g. --batch 16")
    longest = max(len(p.encode()) if isinstance(p, str) else len(p) for p in prompts) + 2
    if dtype is None:
        from specmoe.runtime.device import pick_device

        dtype = "float32" if pick_device(device).type == "cpu" else None   # the CPU computes the bf16 pair in fp32
    plan = plan_for_checkpoint(target_dir, draft_dir, "devbox-2core", batch=B, draft_len=max_k, micro_batches=1,
                               prompt_len=longest, gen_len=max_new_tokens)
    t0 = time.perf_counter()
    eng = Engine(plan, target_dir, draft_dir, device=device, dtype=dtype, max_k=max_k)
    raw, verified, iters, tps, sds, qs = [], [], [], [], [], []
    first: dict[int, list[int]] | None = None
    differing: set[int] = set()
    flips = 0
    for k in range(1, max_k + 1):
        res = eng.generate(list(prompts), max_new_tokens=max_new_tokens, temperature=0.0, draft_len=k)
        rec = res.record
        n_ver = sum(int(n) for n in rec.acceptance_histogram.values())
        raw.append(float(rec.mean_accepted))
        verified.append(n_ver)
        iters.append(int(rec.iterations))
        tps.append(float(rec.decode_tokens_per_s))
        sds.append(sequence_spread(res.outputs))
        qs.append(sequence_quantiles(res.outputs))
        flips += int(rec.token_flips)
        toks = {o.index: list(o.token_ids) for o in res.outputs}
        if first is None:
            first = toks
        else:
            differing.update(i for i, t in toks.items() if first.get(i) != t)
        if progress is not None:
            progress(k, {"raw": raw[-1], "verified": n_ver})
    fit = isotonic(raw, verified)
    fit = [min(max(a, 0.0), float(k)) for k, a in zip(range(1, max_k + 1), fit)]
    return AcceptanceResult(ks=list(range(1, max_k + 1)), accepted=fit, raw=raw, verified=verified, iterations=iters,
                            tokens_per_s=tps, differing_sequences=len(differing), token_flips=flips,
                            prompts=len(prompts), max_new_tokens=max_new_tokens,
                            elapsed_s=time.perf_counter() - t0,
                            info={"batch": B, "device": str(eng.device), "dtype": str(eng.dtype).replace("torch.", "")},
                            accepted_sd=sds, accepted_quantiles=qs)


def _sequence_means(outputs) -> list[float]:
    """Each sequence's mean accepted drafts per decode iteration (sequences without one left out)."""
    return [o.accepted_drafts / o.decode_iterations for o in outputs if o.decode_iterations > 0]


def sequence_quantiles(outputs) -> list[float]:
    """The quantiles at QUANTILE_LEVELS across sequences of each one's mean accepted drafts per decode
    iteration: the sorted means at plotting positions i/(m+1), i = 1..m, linear between them and flat past
    the ends (all 0 without a sequence)."""
    import numpy as np

    means = sorted(_sequence_means(outputs))
    if not means:
        return [0.0] * len(QUANTILE_LEVELS)
    pos = np.arange(1, len(means) + 1) / (len(means) + 1)
    return [float(x) for x in np.interp(QUANTILE_LEVELS, pos, means)]   # np.interp is flat past the ends


def sequence_spread(outputs) -> float:
    """Standard deviation across sequences of each one's mean accepted drafts per decode iteration
    (sequences without a decode iteration left out; 0 with fewer than two)."""
    means = _sequence_means(outputs)
    if len(means) < 2:
        return 0.0
    m = sum(means) / len(means)
    return math.sqrt(sum((x - m) ** 2 for x in means) / (len(means) - 1))
