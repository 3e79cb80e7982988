"""Workload and acceptance profiles: formulas, tables, and one clear error per bad input."""
from __future__ import annotations

import pytest

from specmoe.planner.errors import SpecError
from specmoe.planner.workload import AcceptanceProfile, Workload, load_acceptance


def test_alpha_formula():
    a = AcceptanceProfile.from_alpha(0.8)
    for k in range(0, 10):
        assert a.acc(k) == pytest.approx(sum(0.8 ** j for j in range(1, k + 1)))
    assert a.tokens_per_iteration(4) == pytest.approx(1 + 0.8 + 0.64 + 0.512 + 0.4096)
    assert a.acc(40) == pytest.approx(0.8 * (1 - 0.8 ** 40) / 0.2)     # beyond the table: the formula
    assert AcceptanceProfile.from_alpha(0.0).acc(5) == 0.0


def test_csv_table(tmp_path):
    p = tmp_path / "acc.csv"
    p.write_text("k,accepted\n1,0.9\n2,1.6\n3,2.0\n")
    a = load_acceptance(str(p))
    assert a.table == (0.0, 0.9, 1.6, 2.0)
    assert a.acc(7) == 2.0            # beyond a measured table: no further gain
    assert a.alpha is None


@pytest.mark.parametrize("text,match", [
    ("k,accepted\n1,0.9\n3,2.0\n", "every k"),
    ("k,accepted\n1,0.9\n2,0.5\n", "below"),
    ("k,accepted\n1,1.5\n", "outside"),
    ("k,accepted\n1,x\n", "not numeric"),
    ("kk,acc\n1,0.5\n", "header"),
    ("k,acc\n1,0.5\n", "accepted"),
    ("k,accepted\n-1,0\n", "negative"),
])
def test_bad_csv(text, match):
    with pytest.raises(SpecError, match=match):
        AcceptanceProfile.from_csv_text(text)


@pytest.mark.parametrize("alpha", [1.0, -0.1, 1.5, True])
def test_bad_alpha(alpha):
    with pytest.raises(SpecError, match="acceptance"):
        AcceptanceProfile.from_alpha(alpha)


def test_load_acceptance_forms():
    assert load_acceptance("0.7").alpha == 0.7
    assert load_acceptance(0.5).acc(1) == 0.5
    assert load_acceptance(None).acc(3) == 0.0
    with pytest.raises(SpecError, match="acceptance"):
        load_acceptance("1.2")
    with pytest.raises(SpecError, match="neither a rate"):
        load_acceptance("fast")


@pytest.mark.parametrize("kw,field", [
    (dict(prompt_len=0, gen_len=5), "prompt_len"), (dict(prompt_len=5, gen_len=-1), "gen_len"),
    (dict(prompt_len=5, gen_len=5, batch=0), "batch"), (dict(prompt_len=5.5, gen_len=5), "prompt_len"),
    (dict(prompt_len=5, gen_len=5, kv_dtype="fp12"), "kv_dtype"),
    (dict(prompt_len=5, gen_len=5, weight_dtype="int3"), "weight_dtype"),
])
def test_bad_workload(kw, field):
    with pytest.raises(SpecError) as ei:
        Workload(**kw)
    assert field in str(ei.value)


def test_workload_contexts_and_round_trip():
    w = Workload(566, 1024, batch=8, acceptance=load_acceptance(0.8), kv_dtype="fp16")
    assert w.max_context == 1590 and w.mean_context == 1078
    assert w.kv_bytes_per_elem == 2
    assert Workload.from_dict(w.to_dict()) == w
