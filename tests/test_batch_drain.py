"""planner/batch_drain.py: a finite job's decode iterations and mean live batch, against plain
simulations of sequences drafting and accepting token by token (the engine's refill included); the
planner, estimate and CLI pricing it in; the acceptance spread column; bad input."""
from __future__ import annotations

import heapq
import math

import numpy as np
import pytest

from specmoe.planner import Workload, load_acceptance, optimize
from specmoe.planner.batch_drain import at_live_batch, drain, live_placement
from specmoe.planner.errors import SpecError
from specmoe.planner.plan import Placement
from specmoe.planner.workload import AcceptanceProfile


# ---------------------------------------------------------------------------------------------------
# plain references: sequences simulated iteration by iteration
def simulate(rng, alphas: np.ndarray, k: int, L: int) -> tuple[np.ndarray, np.ndarray]:
    """([n] decode iterations, [n] accepted drafts) of sequences needing L tokens each: per iteration a
    sequence drafts k tokens and the target accepts a prefix, each draft with the sequence's own rate
    alpha_i, plus one token of its own."""
    n = len(alphas)
    tokens, acc_tot = np.zeros(n), np.zeros(n)
    iters = np.zeros(n, dtype=int)
    live = np.ones(n, dtype=bool)
    while live.any():
        acc = np.zeros(n)
        going = live.copy()
        for _ in range(k):
            ok = going & (rng.random(n) < alphas)
            acc += ok
            going = ok
        acc_tot[live] += acc[live]
        tokens[live] += 1 + acc[live]
        iters[live] += 1
        live = tokens < L
    return iters, acc_tot


def sequence_iterations(rng, alphas: np.ndarray, k: int, L: int) -> np.ndarray:
    return simulate(rng, alphas, k, L)[0]


def engine_refill(durations: np.ndarray, batch: int) -> float:
    """Job iterations when each freed row takes the next prompt (runtime/engine.py's loop)."""
    rows = list(durations[:batch].astype(float))
    heapq.heapify(rows)
    for d in durations[batch:]:
        heapq.heappush(rows, heapq.heappop(rows) + d)
    return max(rows)


def profile_of(rng, alphas: np.ndarray, ks: range, L: int) -> AcceptanceProfile:
    """What `specmoe profile-acceptance` would measure on these sequences: acc(k) over all verified
    sequence-iterations and the spread across sequences of each one's mean at k = 1."""
    table, spread = [0.0], [0.0]
    for k in ks:
        its, acc_tot = simulate(rng, alphas, k, L)
        table.append(float(acc_tot.sum() / its.sum()))
        spread.append(float(np.std(acc_tot / its, ddof=1)))
    table = list(np.maximum.accumulate(table))
    return AcceptanceProfile(tuple(table), spread=tuple(spread))


# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,b,gen", [(32, 32, 48), (33, 32, 48), (96, 32, 10), (7, 32, 5), (100, 7, 2)])
def test_equal_lengths_run_whole_waves(n, b, gen):
    """Without speculation every sequence needs gen - 1 iterations: ceil(N / B) waves."""
    d = drain(Workload(16, gen, num_prompts=n), b, 0)
    assert d.iterations == pytest.approx(math.ceil(n / b) * (gen - 1))
    assert d.mean_live_batch == pytest.approx(n * (gen - 1) / d.iterations)
    assert d.decode_tokens == n * (gen - 1)
    assert d.mean_live_batch <= b + 1e-9


def test_open_stream_has_no_drain():
    assert drain(Workload(16, 48), 32, 3) is None
    assert drain(Workload(16, 48), 32, 3, num_prompts=32) is not None


@pytest.mark.parametrize("seed,alpha,k,L,b", [(0, 0.8, 4, 200, 64), (1, 0.5, 2, 47, 32), (2, 0.9, 6, 120, 16),
                                              (3, 0.3, 1, 63, 9), (4, 0.7, 3, 300, 128)])
def test_iid_static_batch_against_simulation(seed, alpha, k, L, b):
    """A profile without a spread (every sequence the same rate): the renewal model's E[max] against
    the mean over simulated batches."""
    rng = np.random.default_rng(seed)
    sims = [sequence_iterations(rng, np.full(b, alpha), k, L) for _ in range(60)]
    want_max = np.mean([s.max() for s in sims])
    want_mean = np.mean([s.mean() for s in sims])
    d = drain(Workload(16, L + 1, acceptance=load_acceptance(alpha), num_prompts=b), b, k)
    assert d.mean_sequence_iterations == pytest.approx(want_mean, rel=0.03)
    assert d.iterations == pytest.approx(want_max, rel=0.06)


@pytest.mark.parametrize("seed,mean,sd,k,L,n,b", [(0, 0.7, 0.2, 3, 47, 32, 32), (1, 0.6, 0.25, 2, 100, 64, 64),
                                                  (2, 0.8, 0.12, 5, 80, 48, 48), (3, 0.7, 0.2, 2, 60, 96, 32),
                                                  (4, 0.5, 0.2, 4, 47, 150, 64)])
def test_uneven_sequences_against_simulation(seed, mean, sd, k, L, n, b):
    """Sequences with their own acceptance rates (Beta across prompts): the profile measured on one
    set of them predicts the iterations and live batch of another job, static or refilled."""
    rng = np.random.default_rng(seed)
    c = mean * (1 - mean) / sd**2 - 1

    def alphas(m):
        return rng.beta(mean * c, (1 - mean) * c, m)

    prof = profile_of(rng, alphas(400), range(1, k + 1), L)
    got = drain(Workload(16, L + 1, acceptance=prof, num_prompts=n), b, k)
    jobs = [engine_refill(sequence_iterations(rng, alphas(n), k, L), b) for _ in range(40)]
    seq_mean = np.mean([sequence_iterations(rng, alphas(n), k, L).mean() for _ in range(10)])
    assert got.mean_sequence_iterations == pytest.approx(seq_mean, rel=0.05)
    assert got.iterations == pytest.approx(np.mean(jobs), rel=0.10)
    assert got.mean_live_batch == pytest.approx(n * seq_mean / np.mean(jobs), rel=0.12)


def test_refill_formula_joins_the_simulation():
    """Past REFILL_SIMULATED prompts per row the formula takes over without a jump."""
    from specmoe.planner import batch_drain as bd

    prof = AcceptanceProfile((0.0, 0.7, 1.2, 1.5), spread=(0.0, 0.2, 0.4, 0.6))
    b = 16
    n = bd.REFILL_SIMULATED * b
    inside = drain(Workload(16, 64, acceptance=prof, num_prompts=n), b, 2)
    outside = drain(Workload(16, 64, acceptance=prof, num_prompts=n + 1), b, 2)
    assert outside.iterations == pytest.approx(inside.iterations, rel=0.05)


def test_more_speculation_drains_more():
    """Longer drafts spread the finishing iterations: the live fraction falls with k."""
    prof = AcceptanceProfile((0.0, 0.7, 1.2, 1.55, 1.8), spread=(0.0, 0.2, 0.45, 0.7, 0.9))
    wl = Workload(16, 48, acceptance=prof, num_prompts=32)
    fr = [drain(wl, 32, k).live_fraction for k in range(5)]
    assert fr[0] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(fr, fr[1:]))


def test_live_batch_helpers():
    pl = Placement(expert_cache_slots=[4, 4], target_kv_gpu_sequences=32, draft_kv_gpu_sequences=16)
    lp = live_placement(pl, 32, 8)
    assert (lp.target_kv_gpu_sequences, lp.draft_kv_gpu_sequences, lp.expert_cache_slots) == (8, 4, [4, 4])
    f = lambda b: 1.0 + 0.5 * b                                  # noqa: E731
    assert at_live_batch(f, 32, 32.0) == f(32)
    assert at_live_batch(f, 32, 20.25) == pytest.approx(f(20) + 0.25 * (f(21) - f(20)))
    assert at_live_batch(f, 32, 0.4) == f(1)


@pytest.mark.parametrize("kw,what", [({"batch": 0}, "batch"), ({"batch": True}, "batch"),
                                     ({"draft_len": -1}, "draft_len"), ({"num_prompts": 0}, "num_prompts")])
def test_bad_arguments(kw, what):
    args = {"batch": 8, "draft_len": 2, "num_prompts": 16, **kw}
    with pytest.raises(SpecError, match=what):
        drain(Workload(16, 32, acceptance=load_acceptance(0.5)), args["batch"], args["draft_len"], args["num_prompts"])
    with pytest.raises(SpecError, match="num_prompts"):
        Workload(16, 32, num_prompts=-3)


# ---------------------------------------------------------------------------------------------------
def test_spread_column_round_trips(tmp_path):
    p = tmp_path / "acc.csv"
    p.write_text("k,accepted,accepted_sd\n1,0.7,0.2\n2,1.2,0.45\n")
    prof = AcceptanceProfile.from_csv(p)
    assert prof.spread == (0.0, 0.2, 0.45) and prof.spread_at(2) == 0.45 and prof.spread_at(9) == 0.45
    assert AcceptanceProfile.from_dict(prof.to_dict()) == prof
    old = AcceptanceProfile.from_csv_text("k,accepted\n1,0.7\n")
    assert old.spread is None and "spread" not in old.to_dict()
    p.write_text("k,accepted,accepted_sd\n1,0.7,x\n")
    with pytest.raises(SpecError, match="line 2"):
        AcceptanceProfile.from_csv(p)
    p.write_text("k,accepted,accepted_sd\n1,0.7,-0.1\n")
    with pytest.raises(SpecError, match="accepted_sd"):
        AcceptanceProfile.from_csv(p)


def test_quantile_columns_round_trip_and_bad_ones_are_named(tmp_path):
    from specmoe.planner.workload import QUANTILE_COLUMNS, QUANTILE_LEVELS

    head = "k,accepted,accepted_sd," + ",".join(QUANTILE_COLUMNS)
    q1 = [0.1, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 1.0, 1.0, 1.0]
    q2 = [2 * x for x in q1]
    row = lambda k, a, q: f"{k},{a},0.2," + ",".join(str(x) for x in q)  # noqa: E731
    p = tmp_path / "acc.csv"
    p.write_text("\n".join([head, row(1, 0.7, q1), row(2, 1.2, q2)]) + "\n")
    prof = AcceptanceProfile.from_csv(p)
    assert len(QUANTILE_LEVELS) == len(q1) and prof.quantiles == ((0.0,) * 11, tuple(q1), tuple(q2))
    assert prof.quantiles_at(2) == tuple(q2) and prof.quantiles_at(7) == tuple(q2) and prof.quantiles_at(0) is None
    assert AcceptanceProfile.from_dict(prof.to_dict()) == prof
    assert AcceptanceProfile.from_csv_text("k,accepted,accepted_sd\n1,0.7,0.2\n").quantiles is None
    bad = {"lacks accepted_p99": head.removesuffix(",accepted_p99") + "\n1,0.7,0.2," + ",".join(map(str, q1[:-1])),
           "fall": "\n".join([head, row(1, 0.7, q1[::-1])]),
           "in \\[0, 1\\]": "\n".join([head, row(1, 0.7, [x + 0.5 for x in q1])]),
           "not numeric": "\n".join([head, row(1, 0.7, q1[:-1] + ["x"])])}
    for what, text in bad.items():
        with pytest.raises(SpecError, match=what):
            AcceptanceProfile.from_csv_text(text + "\n")


def test_a_heavy_lower_tail_drains_longer_than_its_beta():
    """A profile carrying its quantiles drains by them: a few slow sequences (a low lower tail) keep a static
    batch longer than a Beta of the same mean and spread does; lowering only the tail lengthens the job; a
    profile whose quantiles show no spread falls back to the Beta of its standard deviation."""
    from specmoe.planner.workload import QUANTILE_LEVELS

    body = [0.3, 0.3, 0.5, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98]       # one sequence in 30 near 0.3
    mean = 0.8

    def prof(q1, sd=0.15):
        qs = ((0.0,) * len(QUANTILE_LEVELS), tuple(q1), tuple(min(2.0, 1.8 * x) for x in q1))
        return AcceptanceProfile((0.0, mean, 1.44), spread=(0.0, sd, 0.3), quantiles=qs)

    def iters(p, k=1):
        return drain(Workload(34, 48, acceptance=p, num_prompts=32), 32, k).iterations

    beta = AcceptanceProfile((0.0, mean, 1.44), spread=(0.0, 0.15, 0.3))
    assert iters(prof(body)) > iters(beta) + 1.0
    lower = [0.1, 0.1, 0.3] + body[3:]
    assert iters(prof(lower)) > iters(prof(body)) and iters(prof(lower), 2) > iters(prof(body), 2)
    flat = prof([mean] * len(QUANTILE_LEVELS))
    assert iters(flat) == pytest.approx(iters(beta), rel=1e-12)


def test_workload_dict_keeps_old_hashes():
    wl = Workload(16, 32)
    assert "num_prompts" not in wl.to_dict()
    w2 = Workload(16, 32, num_prompts=7)
    assert Workload.from_dict(w2.to_dict()) == w2


# ---------------------------------------------------------------------------------------------------
PROFILE = AcceptanceProfile((0.0, 0.72, 1.2, 1.57, 1.79), spread=(0.0, 0.2, 0.45, 0.73, 0.9))


@pytest.fixture(scope="module")
def plans():
    out = {}
    for n in (None, 32):
        wl = Workload(34, 48, batch=32, acceptance=PROFILE, num_prompts=n)
        out[n] = optimize("qwen3-30b-a3b", "h200-host", wl, k_values=range(0, 5), micro_batch_values=(1, 2))
    return out


def test_planner_prices_the_drain_in(plans):
    """The finite job's plan: its prediction carries the drain, its job throughput is below the full
    batch's, and every k's frontier point is at or below the open stream's."""
    stream, job = plans[None], plans[32]
    assert not stream.predicted.job and "job" not in stream.predicted.to_dict()
    j = job.predicted.job
    assert j["num_prompts"] == 32 and j["batch"] == 32
    assert job.predicted.decode_tokens_per_s <= j["steady_decode_tokens_per_s"] * (1 + 1e-9)
    d = drain(job.workload_spec(), job.batch, job.draft_len)
    assert j["iterations"] == pytest.approx(d.iterations) and j["mean_live_batch"] == pytest.approx(d.mean_live_batch)
    fs = {e["draft_len"]: e["decode_tokens_per_s"] for e in stream.frontier["by_k"] if e["feasible"]}
    fj = {e["draft_len"]: e["decode_tokens_per_s"] for e in job.frontier["by_k"] if e["feasible"]}
    assert set(fs) == set(fj)
    assert all(fj[k] <= fs[k] * (1 + 1e-6) for k in fs)
    assert fj[0] == pytest.approx(fs[0], rel=1e-6)      # equal lengths: nothing drains at k = 0
    assert fj[job.draft_len] == pytest.approx(job.predicted.decode_tokens_per_s, rel=1e-6)
    assert max(fj.values()) < 0.75 * max(fs.values())  # PCIe-bound: a thinner batch is not faster per iteration
    assert job.draft_len <= stream.draft_len            # the drain costs long drafts most
    from specmoe.planner.plan import Plan

    assert Plan.from_dict(job.to_dict()).predicted.job == job.predicted.job


def test_batch_above_the_job_is_not_offered():
    wl = Workload(34, 48, acceptance=PROFILE, num_prompts=12)
    plan = optimize("qwen3-30b-a3b", "h200-host", wl, k_values=(0, 1), micro_batch_values=(1,))
    assert plan.batch <= 12


def test_cli_plan_and_estimate_take_num_prompts(tmp_path, capsys):
    from specmoe.runtime.cli.main import main

    acc = tmp_path / "acc.csv"
    acc.write_text("k,accepted,accepted_sd\n1,0.72,0.2\n2,1.2,0.45\n")
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", "qwen3-30b-a3b", "--hardware", "h200-host", "--prompt-len", "34", "--gen-len",
                 "48", "--acceptance", str(acc), "--num-prompts", "32", "--batch", "32", "--max-draft-len", "2",
                 "--micro-batches", "1", "-o", str(out)]) == 0
    assert "job of 32 prompts: the batch drains to" in capsys.readouterr().out
    assert main(["estimate", "--model", "qwen3-30b-a3b", "--hardware", "h200-host", "--prompt-len", "34",
                 "--gen-len", "48", "--acceptance", str(acc), "--num-prompts", "40", "--batch", "32",
                 "--draft-len", "2"]) == 0
    assert "job of 40 prompts" in capsys.readouterr().out
    for cmd in ("plan", "estimate"):
        args = [cmd, "--model", "qwen3-30b-a3b", "--hardware", "h200-host", "--prompt-len", "34", "--gen-len", "48",
                "--num-prompts", "0", "--acceptance", "0.5"] + (["-o", str(out)] if cmd == "plan" else [])
        assert main(args) == 2
        assert "--num-prompts" in capsys.readouterr().err


def test_live_curve_of_a_static_batch():
    """Expected live sequences per iteration: a full batch of equal lengths for gen - 1 iterations;
    under speculation it sums to the sequences' expected iterations (each is live N of them) and
    drains where the simulated sequences do."""
    from specmoe.planner.batch_drain import live_curve

    c0 = live_curve(Workload(16, 48, num_prompts=32), 32, 0)
    assert c0 == pytest.approx([32.0] * 47)
    prof = AcceptanceProfile((0.0, 0.7, 1.2, 1.55), spread=(0.0, 0.2, 0.45, 0.7))
    wl = Workload(16, 48, acceptance=prof, num_prompts=24)
    c = live_curve(wl, 32, 2)
    d = drain(wl, 32, 2)
    assert sum(c) == pytest.approx(24 * d.mean_sequence_iterations, rel=0.02)
    assert c[0] == pytest.approx(24.0) and all(a >= b - 1e-9 for a, b in zip(c, c[1:]))
    assert live_curve(Workload(16, 48, acceptance=prof), 32, 2) is None          # open stream
    assert live_curve(Workload(16, 48, acceptance=prof, num_prompts=40), 32, 2) is None   # refilled
