"""How a finite job's batch drains: the mean live batch and the number of decode iterations.

A throughput job of N prompts, each generating `gen_len` tokens, runs B sequences at a time; a
finished sequence's row takes the next prompt until none are left (the engine's refill). Without
speculation every sequence needs the same gen_len - 1 decode iterations (prefill emits the first
token), so a batch of equal lengths stays full. Under speculation a sequence gains 1 + a tokens per
iteration, a its accepted drafts, so sequences finish at different iterations and the last ones
run with a thinning batch: the job takes more iterations than its tokens / (B (acc(k) + 1)), each
over fewer live sequences. This module predicts both, from the acceptance profile alone.

Per-sequence iterations N (L = gen_len - 1 decode tokens; r = tokens a sequence gains per iteration):
  N(r) = (L + (r - 1) / 2) / r        (the last iteration overshoots by (r - 1) / 2 tokens on average)
  * measured profiles with a per-sequence spread (AcceptanceProfile.spread[1], the standard deviation
    across prompts of a sequence's mean accepted drafts per iteration at k = 1, i.e. of its per-draft
    acceptance rate): each sequence has its own rate alpha_i ~ Beta(acc(1), spread[1]) (bounded,
    and skewed as measured rates near 1 are), so acc_i(k) = alpha_i + ... + alpha_i^k, scaled so that
    its mean over sequence-iterations (slow sequences verify more often; that is the mean the
    profile's acc(k) is) equals the profile's acc(k); r_i = 1 + acc_i(k), sampled at Q quantiles.
    That spread holds the within-sequence noise of the profile's lengths too. A profile that carries
    the rates' measured quantiles (AcceptanceProfile.quantiles[1], QUANTILE_LEVELS) takes alpha_i from
    them instead: a few prompts the draft fails on give a lower tail that a Beta of the same mean and
    spread thins out (the bundled EAGLE head on the demo's 32 prompts: one sequence at 0.27 against a
    mean of 0.79; the job's 37 iterations at k = 1 predicted 35.1 from the Beta, 35.9 from the
    quantiles, and at k = 2-8 -3.2 to -5.9% off against -2.3 to +2.0%; the bundled draft model's, whose
    tail the Beta follows, -1.6 to -6.4% either way).
  * otherwise i.i.d. iterations (a renewal process): the accepted count a has P(a >= j) = acc(j) -
    acc(j - 1) (acceptance stops at the first rejected draft, and greedy drafts do not depend on k),
    r = its mean 1 + acc(k), and N ~ Normal(N(r), L Var(1 + a) / r^3).
A static batch (N_prompts <= B) takes E[max of N_prompts draws of N] iterations. With refill, up to
REFILL_SIMULATED x B prompts, the engine's refill (each freed row takes the next prompt) is simulated
on SIMULATIONS seeded draws of N (so that a batch of equal lengths runs whole waves); beyond, where
finishing times are well staggered,
  iterations = N_prompts E[N] / B + (E[max of B draws of N] - E[N])
(the full-batch phase, then the last cohort's tail). The mean live batch is N_prompts E[N] / iterations. The decode time of the job is iterations x T(mean live batch) when the
iteration time T is affine in the batch (exact then: the sum over iterations of T(live) equals it).
"""
from __future__ import annotations

import heapq
import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Callable

import numpy as np

from specmoe.planner.errors import SpecError
from specmoe.planner.workload import QUANTILE_LEVELS, AcceptanceProfile, Workload

QUANTILES = 256          # points of the across-sequence rate distribution
GRID = 4096              # points of the integral of E[max]
REFILL_SIMULATED = 4     # refill simulated up to this many prompts per row, formula beyond
SIMULATIONS = 8         # seeded simulations averaged


@dataclass(frozen=True)
class Drain:
    """The decode phase of a finite job (module doc)."""

    batch: int                          # B: rows decoded together
    num_prompts: int                    # N: sequences in the job
    draft_len: int                      # k
    decode_tokens_per_sequence: int     # L = gen_len - 1 (the first token comes from prefill)
    mean_sequence_iterations: float     # E[N]: decode iterations one sequence is live
    iterations: float                   # decode iterations of the job
    mean_live_batch: float              # sequences per decode iteration, averaged over the job

    @property
    def live_fraction(self) -> float:
        """mean live batch / B: 1 for a batch that stays full."""
        return self.mean_live_batch / self.batch if self.batch else 0.0

    @property
    def decode_tokens(self) -> int:
        return self.num_prompts * self.decode_tokens_per_sequence

    def decode_tokens_per_s(self, iteration_time_s: float) -> float:
        """Job decode throughput for `iteration_time_s`, the iteration at the mean live batch."""
        t = self.iterations * iteration_time_s
        return self.decode_tokens / t if t > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["live_fraction"] = self.live_fraction
        return d


def _norm_cdf(x: np.ndarray) -> np.ndarray:
    """Standard normal CDF (Abramowitz-Stegun 7.1.26 erf, |error| < 1.5e-7): numpy has no erf."""
    z = np.abs(x) / math.sqrt(2.0)
    t = 1.0 / (1.0 + 0.3275911 * z)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    erf = 1.0 - poly * np.exp(-z * z)
    return 0.5 * (1.0 + np.sign(x) * erf)


def _accepted_distribution(profile: AcceptanceProfile, k: int) -> np.ndarray:
    """P(a >= j) for j = 1..k under the prefix model, made non-increasing and within [0, 1]."""
    d = np.array([profile.acc(j) - profile.acc(j - 1) for j in range(1, k + 1)], dtype=float)
    return np.minimum.accumulate(np.clip(d, 0.0, 1.0))


def _iterations_of(L: float, r: np.ndarray) -> np.ndarray:
    return (L + (r - 1.0) / 2.0) / r


def _beta_quantiles(mean: float, sd: float, q: np.ndarray) -> np.ndarray:
    """Quantiles q of the Beta distribution with this mean and standard deviation (the variance capped
    at 90% of the largest a Beta allows), from its density on a fine grid: numpy has no Beta ppf."""
    var = min(sd * sd, 0.9 * mean * (1.0 - mean))
    if var <= 1e-12 or not 0.0 < mean < 1.0:
        return np.full_like(q, mean)
    c = mean * (1.0 - mean) / var - 1.0
    a, b = mean * c, (1.0 - mean) * c
    x = (np.arange(8192) + 0.5) / 8192
    logpdf = (a - 1.0) * np.log(x) + (b - 1.0) * np.log1p(-x)
    pdf = np.exp(logpdf - logpdf.max())
    cdf = np.cumsum(pdf)
    cdf /= cdf[-1]
    return np.interp(q, cdf, x)


def _match_iteration_weighted(shape: np.ndarray, target: float, k: int, L: int) -> np.ndarray:
    """shape x s, clipped to [0, k], with s such that the mean over sequence-iterations (each
    sequence weighted by its iterations, as the profile's acc(k) counts them: slow sequences verify
    more often) equals `target`; bisection (the weighted mean rises with s)."""
    if target <= 0 or float(np.max(shape)) <= 0:
        return np.zeros_like(shape)

    def weighted(sc: float) -> float:
        a = np.clip(shape * sc, 0.0, float(k))
        n = _iterations_of(L, 1.0 + a)
        return float(np.sum(a * n) / np.sum(n))

    lo, hi = 0.0, float(k) / float(np.min(shape[shape > 0]))
    if weighted(hi) <= target:
        return np.clip(shape * hi, 0.0, float(k))
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if weighted(mid) < target else (lo, mid)
    return np.clip(shape * 0.5 * (lo + hi), 0.0, float(k))


@lru_cache(maxsize=512)
def _finish_distribution(table: tuple, spread: tuple | None, quantiles: tuple | None, alpha, k: int,
                         L: int) -> tuple[np.ndarray, np.ndarray]:
    """(means, sds) of per-sequence iterations N: a mixture of normals (sd 0: a point)."""
    profile = AcceptanceProfile(table, alpha=alpha, spread=spread, quantiles=quantiles)
    mu = 1.0 + profile.acc(k)
    u = (np.arange(QUANTILES) + 0.5) / QUANTILES
    sd1, q1 = profile.spread_at(1), profile.quantiles_at(1)
    a_i = None
    if q1 is not None and max(q1) > min(q1):
        # the measured quantile function of the per-draft rates (piecewise linear, flat past its end levels)
        a_i = np.clip(np.interp(u, QUANTILE_LEVELS, q1), 0.0, 1.0)
    elif sd1 is not None and sd1 > 0:
        a_i = _beta_quantiles(profile.acc(1), sd1, u)           # alpha_i ~ Beta(mean acc(1), sd spread[1])
    if a_i is not None:
        # each sequence its own per-draft rate alpha_i; its acc_i(k) = alpha_i + ... + alpha_i^k, scaled so the
        # mean over sequences is the profile's acc(k)
        acc_i = _match_iteration_weighted(sum(a_i**j for j in range(1, k + 1)), profile.acc(k), k, L)
        return _iterations_of(L, 1.0 + acc_i), np.zeros_like(acc_i)
    p_ge = _accepted_distribution(profile, k)               # [k] P(a >= j)
    # E[X^2] for X = 1 + a: sum over x of (2x - 1) P(X >= x), P(X >= 1) = 1, P(X >= j + 1) = P(a >= j)
    ex2 = 1.0 + float(np.sum((2 * np.arange(2, k + 2) - 1) * p_ge))
    var = max(ex2 - mu * mu, 0.0)
    return np.array([_iterations_of(L, np.array(mu))]).reshape(1), np.array([math.sqrt(L * var / mu**3)])


def _expected_max(means: np.ndarray, sds: np.ndarray, n: int) -> float:
    """E[max of n i.i.d. draws] of the mixture (equal weights) of normals N(means, sds^2)."""
    if n <= 1:
        return float(np.mean(means))
    if np.all(sds <= 0):
        x = np.sort(means)
        q = len(x)
        w = (np.arange(1, q + 1) / q) ** n - (np.arange(q) / q) ** n
        return float(np.sum(w * x))
    lo = float(np.min(means - 8 * sds))
    hi = float(np.max(means + 8 * sds))
    grid = np.linspace(lo, hi, GRID)                           # [G]
    s = np.where(sds > 0, sds, 1e-12)
    F = np.mean(_norm_cdf((grid[:, None] - means[None, :]) / s[None, :]), axis=1)   # [G]
    return lo + float(np.trapezoid(1.0 - F**n, grid)) if hasattr(np, "trapezoid") else \
        lo + float(np.trapz(1.0 - F**n, grid))


def drain(workload: Workload, batch: int, draft_len: int, num_prompts: int | None = None) -> Drain | None:
    """The job's decode iterations and mean live batch at (batch, draft_len); None when the workload
    is an open stream (no num_prompts: rows are refilled forever and the batch stays full)."""
    n_p = workload.num_prompts if num_prompts is None else num_prompts
    if n_p is None:
        return None
    for name, v in (("batch", batch), ("num_prompts", n_p)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise SpecError(name, f"must be a positive integer, got {v!r}", "give an integer >= 1")
    if isinstance(draft_len, bool) or not isinstance(draft_len, int) or draft_len < 0:
        raise SpecError("draft_len", f"must be an integer >= 0, got {draft_len!r}", "0 disables speculation")
    L = workload.gen_len - 1
    b = min(batch, n_p)
    if L <= 0:
        return Drain(batch, n_p, draft_len, 0, 0.0, 0.0, float(b))
    acc = workload.acceptance
    means, sds = _finish_distribution(acc.table, acc.spread, acc.quantiles, acc.alpha, draft_len, L) if draft_len > 0 \
        else (np.array([float(L)]), np.array([0.0]))
    en = float(np.mean(means))
    if np.all(sds <= 0) and np.ptp(means) <= 1e-9 * en:      # equal lengths: whole waves of the batch
        iters = math.ceil(n_p / batch) * en
    elif n_p <= batch:
        iters = max(_expected_max(means, sds, b), en)
    elif n_p <= REFILL_SIMULATED * batch:
        iters = _simulated_refill(means, sds, batch, n_p)
    else:
        iters = n_p * en / batch + (max(_expected_max(means, sds, b), en) - en)
    return Drain(batch, n_p, draft_len, L, en, iters, n_p * en / iters)


@lru_cache(maxsize=256)
def _refill_cached(key: tuple, batch: int, n_p: int) -> float:
    means, sds = np.array(key[0]), np.array(key[1])
    rng = np.random.default_rng(12345)
    total = 0.0
    for _ in range(SIMULATIONS):
        q = rng.integers(0, len(means), n_p)
        dur = np.maximum(means[q] + sds[q] * rng.standard_normal(n_p), 1.0)      # [n_p] iterations each
        rows = list(dur[:batch])                                                 # busy-until per row
        heapq.heapify(rows)
        for d in dur[batch:]:
            heapq.heappush(rows, heapq.heappop(rows) + d)
        total += max(rows)
    return total / SIMULATIONS


def _simulated_refill(means: np.ndarray, sds: np.ndarray, batch: int, n_p: int) -> float:
    """Mean job iterations of the engine's refill (each freed row takes the next prompt), simulated."""
    return _refill_cached((tuple(means.tolist()), tuple(sds.tolist())), batch, n_p)


def job_summary(d: Drain, live_iteration_s: float, batch_prefill_s: float, gen_len: int) -> dict:
    """The job's figures from its drain, the iteration at its mean live batch and the prefill of one
    full batch: Drain's fields plus iteration_time_s, decode_time_s, prefill_time_s (all the job's
    prompts), decode_tokens_per_s and end_to_end_tokens_per_s (all generated tokens over both)."""
    dec_s = d.iterations * live_iteration_s
    pre_s = batch_prefill_s * (d.num_prompts / d.batch if d.num_prompts > d.batch else 1.0)
    gen = d.num_prompts * gen_len
    return {**d.to_dict(), "iteration_time_s": live_iteration_s, "decode_time_s": dec_s, "prefill_time_s": pre_s,
            "decode_tokens_per_s": d.decode_tokens_per_s(live_iteration_s),
            "end_to_end_tokens_per_s": gen / (pre_s + dec_s) if pre_s + dec_s > 0 else 0.0,
            "method": "planner/batch_drain.py: acceptance spread -> finishing iterations; "
                      "iteration simulated at the mean live batch"}


def live_placement(placement, batch: int, live: int):
    """`placement` (a planner.Placement made for `batch` sequences) for `live` of them: the GPU-resident
    KV sequence counts scaled to the live batch; the expert cache and the rest unchanged."""
    from dataclasses import replace

    B = max(1, int(batch))
    return replace(placement, target_kv_gpu_sequences=min(live, round(placement.target_kv_gpu_sequences * live / B)),
                   draft_kv_gpu_sequences=min(live, round(placement.draft_kv_gpu_sequences * live / B)))


def at_live_batch(time_at: Callable[[int], float], batch: int, live: float) -> float:
    """An iteration time at a fractional live batch: time_at(b) (seconds at b live sequences, b an
    integer) interpolated linearly between the neighbouring integers; time_at(batch) when none thin."""
    if live >= batch - 1e-9:
        return time_at(batch)
    lo = max(1, int(math.floor(live)))
    hi = min(batch, lo + 1)
    t_lo = time_at(lo)
    if hi == lo or live <= lo:
        return t_lo
    return t_lo + (time_at(hi) - t_lo) * (live - lo)


def live_curve(workload: Workload, batch: int, draft_len: int) -> list[float] | None:
    """Expected live sequences in decode iterations 1, 2, ... of a static batch (num_prompts <= batch:
    every sequence starts together), until fewer than 0.01 remain; None for an open stream or a
    refilled job. A sequence with N iterations (continuous) is live in iteration n when N > n - 1/2."""
    n_p = workload.num_prompts
    if n_p is None or n_p > batch:
        return None
    L = workload.gen_len - 1
    if L <= 0:
        return []
    acc = workload.acceptance
    means, sds = _finish_distribution(acc.table, acc.spread, acc.quantiles, acc.alpha, draft_len, L) if draft_len > 0 \
        else (np.array([float(L)]), np.array([0.0]))
    x = np.arange(1, int(np.ceil(float(np.max(means + 8 * sds)))) + 2) - 0.5          # [n]
    s = np.where(sds > 0, sds, 1e-12)
    alive = np.mean(1.0 - _norm_cdf((x[:, None] - means[None, :]) / s[None, :]), axis=1)   # P(N > n - 1/2)
    curve = n_p * alive
    keep = np.flatnonzero(curve >= 0.01)
    return [float(v) for v in curve[:keep[-1] + 1]] if keep.size else []
