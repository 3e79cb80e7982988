"""Host overhead of a decode iteration (issue 18): the operations the engine issues do not grow with
the batch, and the whole-batch bookkeeping of acceptance appends what the per-token rule would.

The operation counts come from bench/engine_overhead.py's own builder (the plan's structure, shrunk
widths) at a few layers, so the test runs in seconds; the emission rule is checked against a plain
loop that appends token by token and stops at EOS, then at max_new (EOS first on the same token).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine_fixtures import one_thread_per_module  # noqa: F401 (autouse: one torch thread)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import engine_overhead as eo  # noqa: E402


def _ops(B: int, k: int, m: int, L: int, schedule: str) -> tuple[float, float]:
    eo.SCHEDULE["streaming"] = schedule
    try:
        r = eo.measure(B, k, m, L, iterations=2)
    finally:
        eo.SCHEDULE["streaming"] = "next"
    return r["ops"], r["syncs"]


@pytest.mark.parametrize("schedule", ["next", "off"])
def test_ops_per_iteration_do_not_grow_with_batch(schedule):
    small, s_sync = _ops(8, 4, 4, 2, schedule)
    big, b_sync = _ops(96, 4, 4, 2, schedule)
    assert abs(big / small - 1) <= 0.05, (small, big)
    assert b_sync == s_sync


def test_ops_grow_with_layers_and_draft_steps():
    """Per-layer and per-draft-step work is there to count: more layers and more draft steps, more ops."""
    base, _ = _ops(16, 2, 2, 2, "next")
    assert _ops(16, 2, 2, 4, "next")[0] > base
    assert _ops(16, 4, 2, 2, "next")[0] > base


def _emit_reference(gen: list[int], max_new: int, toks: list[int], eos: set[int]):
    out, reason = list(gen), None
    for t in toks:
        out.append(t)
        if t in eos:
            reason = "eos"
            break
        if len(out) >= max_new:
            reason = "length"
            break
    return out, reason


def test_whole_batch_emission_matches_the_token_by_token_rule():
    from specmoe.runtime.speculative import Sequence

    dec, _ = eo.build(4, 3, 1, 1, 2)
    dec.eos = {2, 5}
    rng = np.random.default_rng(0)
    for _ in range(200):
        B, k = int(rng.integers(1, 6)), int(rng.integers(0, 5))
        seqs = []
        for i in range(B):
            s = Sequence(i, [1], int(rng.integers(2, 9)))
            s.generated = rng.integers(3, 8, int(rng.integers(1, s.max_new))).tolist()
            seqs.append(s)
        cand = rng.integers(0, 8, (B, k + 1)).astype(np.int64)
        a = rng.integers(0, k + 1, B).astype(np.int64)
        n, why = dec._emission(seqs, cand, a)
        for s, row, ai, ni, wi in zip(seqs, cand.tolist(), a.tolist(), n.tolist(), why.tolist()):
            ref, reason = _emit_reference(s.generated, s.max_new, row[:ai + 1], dec.eos)
            assert s.generated + row[:ni] == ref
            assert (None, "eos", "length")[wi] == reason


def test_split_kv_lengths_are_set_for_the_whole_batch():
    from specmoe.runtime.model.kv_cache import PassLayout, SplitKVCache

    kv = SplitKVCache(1, 6, 3, 1, 16, 4, torch.device("cpu"), torch.float32, torch.float32, decode_kernel=False)
    lay = PassLayout([4, 0, 2], [3, 5, 0], [2, 1, 4])
    kv.commit(lay)
    assert kv.lens.tolist() == [6, 0, 4, 0, 5, 0]
    kv.set_lens(np.array([4, 2]), np.array([1, 2]))
    assert kv.lens.tolist() == [6, 0, 2, 0, 1, 0]
    assert lay.last_token_index(torch.device("cpu")).tolist() == [1, 2, 6]
    assert [(s, e) for _, s, e in lay.split(2)] == [(0, 2), (2, 7)]
    with pytest.raises(AssertionError):
        kv.set_lens(np.array([1]), np.array([17]))


def test_prefill_and_decode_run_without_autograd_bookkeeping(monkeypatch):
    """Every op of a prefill and of a decode iteration runs under torch.inference_mode (no version counters or
    view tracking: 8-9% of a tiny-pair iteration on the dev box), and the engine's tensors stay usable after."""
    from specmoe.runtime.model.target import TargetModel

    seen = []
    real = TargetModel.forward
    monkeypatch.setattr(TargetModel, "forward",
                        lambda self, *a, **k: seen.append(torch.is_inference_mode_enabled()) or real(self, *a, **k))
    dec, seqs = eo.build(4, 2, 1, 2, iterations=2)
    prefill_calls = len(seen)
    dec.step(seqs, 2)
    assert prefill_calls >= 1 and len(seen) > prefill_calls and all(seen), seen
    assert not torch.is_inference_mode_enabled()
    dec.step(seqs, 1)            # state written inside inference mode (KV, routing counts) is reused in place
    assert all(s.target_len > 16 for s in seqs)
