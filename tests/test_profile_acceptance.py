"""`specmoe profile-acceptance` (runtime/calibrate/acceptance.py, runtime/cli/profile.py): acc(k) measured
with the engine's greedy loop on the bundled pair, written as a CSV the planner reads; the monotone
fit against a plain reference; bad input exits 2 without writing anything."""
from __future__ import annotations

import csv
import random

import pytest

from specmoe.planner.workload import AcceptanceProfile
from specmoe.runtime.calibrate.acceptance import isotonic
from specmoe.runtime.cli.main import main

from engine_fixtures import TINY_DRAFT, TINY_MOE, TINY_PROMPTS

needs_pair = pytest.mark.skipif(not (TINY_MOE / "config.json").is_file(), reason="needs models/tiny-moe")


def isotonic_reference(values, weights):
    """The min-max formula of weighted isotonic regression: fit_i = max_{j<=i} min_{l>=i} mean_w(j..l)."""
    n = len(values)

    def mean(j, l):
        w = sum(weights[j:l + 1])
        return sum(v * x for v, x in zip(values[j:l + 1], weights[j:l + 1])) / w

    return [max(min(mean(j, l) for l in range(i, n)) for j in range(i + 1)) for i in range(n)]


@pytest.mark.parametrize("seed", range(40))
def test_isotonic_matches_the_min_max_formula(seed):
    rng = random.Random(seed)
    n = rng.choice([1, 2, 3, 5, 8, 13])
    vals = [rng.uniform(-2, 5) for _ in range(n)]
    if seed % 4 == 0:
        vals = sorted(vals)                          # already monotone: unchanged
    w = [rng.choice([1, 1, 7, rng.uniform(0.1, 50)]) for _ in range(n)]
    got = isotonic(vals, w)
    assert got == pytest.approx(isotonic_reference(vals, w), rel=1e-9, abs=1e-12)
    assert all(a <= b + 1e-12 for a, b in zip(got, got[1:]))
    if seed % 4 == 0:
        assert got == pytest.approx(vals)


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    d = tmp_path_factory.mktemp("acc")
    prompts = d / "p.jsonl"
    prompts.write_text("".join(line + "\n" for line in TINY_PROMPTS.read_text().splitlines()[:6]))
    out = d / "acc.csv"
    code = main(["profile-acceptance", "--target", str(TINY_MOE), "--draft", str(TINY_DRAFT), "--prompts", str(prompts),
                 "--max-k", "4", "--max-new-tokens", "10", "-o", str(out), "--no-progress"])
    return code, out, d


@needs_pair
def test_csv_loads_monotone_within_0_k(profiled, capsys):
    code, out, _ = profiled
    assert code == 0
    prof = AcceptanceProfile.from_csv(out)
    assert prof.max_k == 4 and prof.table[0] == 0
    acc = prof.table[1:]
    assert all(0.0 <= a <= k for k, a in enumerate(acc, start=1))
    assert all(a <= b + 1e-12 for a, b in zip(acc, acc[1:]))
    rows = list(csv.DictReader(out.open()))
    assert [int(r["k"]) for r in rows] == [1, 2, 3, 4]
    for r in rows:
        k, raw, ver, sd = int(r["k"]), float(r["raw_accepted"]), int(r["verified"]), float(r["accepted_sd"])
        assert 0.0 <= raw <= k and ver > 0 and 0.0 <= sd <= k
    assert prof.spread is not None and prof.spread[1:] == tuple(float(r["accepted_sd"]) for r in rows)
    # the across-sequence quantiles of each k: rising with their level, within [0, k], the spread's own sample
    from specmoe.planner.workload import QUANTILE_COLUMNS

    assert prof.quantiles is not None and len(prof.quantiles) == 5
    for k, r in enumerate(rows, start=1):
        q = [float(r[c]) for c in QUANTILE_COLUMNS]
        assert tuple(q) == prof.quantiles[k] and q == sorted(q) and 0.0 <= q[0] and q[-1] <= k
        assert (q[-1] - q[0] > 0) == (float(r["accepted_sd"]) > 0)
    # a trained pair: the draft agrees with the target often (acc(1) is an acceptance rate)
    assert 0.2 < acc[0] <= 1.0
    assert sorted(p.name for p in out.parent.iterdir()) == ["acc.csv", "p.jsonl"]     # no temporary file left


@needs_pair
@pytest.mark.parametrize("content,what", [(b"", "empty"), (b"\n  \n", "empty"), (b"\x00\x01\x02binary", "not a text"),
                                          (b"\xff\xfe\xfa", "UTF-8"), (None, "cannot read"),
                                          (b'{"prompt": 3}\n', "prompt")])
def test_bad_prompts_exit_2(tmp_path, capsys, content, what):
    p = tmp_path / "prompts.txt"
    if content is not None:
        p.write_bytes(content)
    out = tmp_path / "acc.csv"
    code = main(["profile-acceptance", "--target", str(TINY_MOE), "--draft", str(TINY_DRAFT), "--prompts", str(p),
                 "-o", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "--prompts" in err and what in err
    assert "Traceback" not in err and not out.exists()


@needs_pair
def test_bad_arguments_exit_2(tmp_path, capsys):
    out = tmp_path / "acc.csv"
    base = ["profile-acceptance", "--target", str(TINY_MOE), "--draft", str(TINY_DRAFT), "--prompts", str(TINY_PROMPTS),
            "--no-progress"]
    assert main(base + ["--max-k", "0", "-o", str(out)]) == 2
    assert "--max-k" in capsys.readouterr().err
    assert main(base + ["-o", str(tmp_path / "missing" / "acc.csv")]) == 2
    assert "-o" in capsys.readouterr().err
    assert main(["profile-acceptance", "--target", str(tmp_path), "--draft", str(TINY_DRAFT), "--prompts",
                 str(TINY_PROMPTS), "-o", str(out), "--no-progress"]) == 2
    assert not out.exists()


def test_sequence_spread_is_the_sample_sd_of_per_sequence_means():
    import statistics
    from types import SimpleNamespace as NS

    from specmoe.runtime.calibrate.acceptance import sequence_spread

    outs = [NS(accepted_drafts=a, decode_iterations=n) for a, n in ((3, 10), (9, 12), (0, 7), (5, 0), (14, 15))]
    want = statistics.stdev([0.3, 0.75, 0.0, 14 / 15])        # the sequence without an iteration is left out
    assert sequence_spread(outs) == pytest.approx(want, rel=1e-12)
    assert sequence_spread(outs[:1]) == 0.0


@pytest.mark.parametrize("trial", range(10))
def test_sequence_quantiles_are_the_samples_at_their_plotting_positions(trial):
    """The across-sequence quantiles: the sorted means at positions i/(m+1), linear between, flat past the
    ends (by hand on small samples, against numpy's interpolation on fresh random ones); sequences without
    a decode iteration left out."""
    import random
    from types import SimpleNamespace as Out

    import numpy as np

    from specmoe.planner.workload import QUANTILE_LEVELS
    from specmoe.runtime.calibrate.acceptance import sequence_quantiles

    outs = lambda means: [Out(accepted_drafts=m * 10, decode_iterations=10) for m in means]  # noqa: E731
    assert sequence_quantiles(outs([0.6, 0.2, 0.4])) == pytest.approx([0.2] * 5 + [0.4] + [0.6] * 5)
    q = dict(zip(QUANTILE_LEVELS, sequence_quantiles(outs([1.0, 0.0, 0.75, 0.5]))))
    assert (q[0.25], q[0.5], q[0.75]) == pytest.approx((0.125, 0.625, 0.9375))
    assert sequence_quantiles([]) == [0.0] * len(QUANTILE_LEVELS)
    rng = random.Random(trial)
    means = [rng.random() * 3 for _ in range(rng.randint(1, 200))]
    got = sequence_quantiles(outs(means) + [Out(accepted_drafts=0, decode_iterations=0)])
    pos = np.arange(1, len(means) + 1) / (len(means) + 1)
    assert got == pytest.approx(np.interp(QUANTILE_LEVELS, pos, sorted(means)), abs=1e-12)
