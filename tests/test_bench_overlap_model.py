"""bench/overlap_model.py: the model builds, times every kind of work alone and with the reads, and its
table's arithmetic (no overlap = one after the other, full overlap = the slower of the two) holds."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import overlap_model as model  # noqa: E402

from specmoe.runtime.kernels.build import cpu_flags  # noqa: E402


def test_table_bounds_from_the_medians():
    nbytes, probe_bytes = 10**9, 2 * 10**9
    med = {"probe": 0.1,                                  # 20 GB/s
           ("reads only", 1): 0.1, ("reads only", 0): 0.0,  # reads alone 10 GB/s
           ("arithmetic 1", 0): 0.05, ("arithmetic 1", 1): 0.125}  # alone 20 GB/s, with reads 8
    lines, shares = model.table(med, nbytes, probe_bytes)
    assert shares == {"arithmetic 1": pytest.approx(0.4)}
    row = next(line for line in lines if line.startswith("arithmetic 1"))
    cells = row.split("|")
    assert cells[3].strip() == "33%"   # 1 / (1/20 + 1/10) = 6.67 GB/s of a 20 GB/s probe
    assert cells[4].strip() == "50%"   # min(20, 10)
    assert any(line.startswith("AMX 1 ") and "no AMX" in line for line in lines)


@pytest.mark.skipif("avx512f" not in cpu_flags().split(), reason="the model needs AVX-512")
def test_runs_every_kind_of_work_here(capsys):
    assert model.main(["--rounds", "1", "--items", "4", "--probe-mib", "64"]) == 0
    out = capsys.readouterr().out
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("overlap-model: with the reads, of the DRAM probe: arithmetic 1 ")
    with_amx = "AMX work runs here" in out
    assert ("AMX 2" in summary) == with_amx


def test_a_bad_count_is_one_clear_error(capsys):
    assert model.main(["--rounds", "0"]) == 2
    assert "--rounds must be >= 1" in capsys.readouterr().err
