"""SplitKVCache's pass plan (the index tensors one forward pass needs per KV part and per token
count), built vectorised, against a plain per-sequence construction on random ragged layouts."""
from __future__ import annotations

import random

import pytest
import torch

from specmoe.runtime.model.kv_cache import PassLayout, SplitKVCache

CPU = torch.device("cpu")


def _reference(cache: SplitKVCache, lay: PassLayout):
    """Per part: (tokens, local rows, positions, [(n, local rows, ctx, token idx, max ctx)])."""
    out = []
    for p in (0, 1):
        seqs = [b for b, r in enumerate(lay.rows) if (r < cache.device_rows) == (p == 0)]
        if not seqs:
            continue
        toks, rows, pos, by_n = [], [], [], {}
        for b in seqs:
            lr = lay.rows[b] - (0 if p == 0 else cache.device_rows)
            o, c, n = lay.offsets[b], lay.ctx[b], lay.n[b]
            toks += range(o, o + n)
            rows += [lr] * n
            pos += range(c, c + n)
            by_n.setdefault(n, []).append(b)
        groups = [(n, [lay.rows[b] - (0 if p == 0 else cache.device_rows) for b in bs], [lay.ctx[b] for b in bs],
                   [t for b in bs for t in range(lay.offsets[b], lay.offsets[b] + n)], max(lay.ctx[b] for b in bs))
                  for n, bs in sorted(by_n.items())]
        out.append((p, toks, rows, pos, groups))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_plan_matches_the_per_sequence_construction(seed):
    rng = random.Random(seed)
    R = rng.randint(1, 40)
    cache = SplitKVCache(1, R, rng.randint(0, R), 2, 64, 4, CPU, torch.float32, torch.float32, True)
    B = rng.randint(1, R)
    rows = rng.sample(range(R), B)                       # any order, any part mix
    n = [rng.choice([1, 1, 2, 5, 9]) for _ in range(B)]
    ctx = [rng.randint(0, 64 - k) for k in n]
    lay = PassLayout(rows, ctx, n)
    got = cache._plan(lay, CPU)
    want = _reference(cache, lay)
    assert [pp.part for pp in got] == [w[0] for w in want]
    for pp, (_, toks, lrows, pos, groups) in zip(got, want):
        assert pp.tok_idx.tolist() == toks and pp.rows.tolist() == lrows and pp.pos.tolist() == pos
        assert [(g.n, g.local_rows.tolist(), g.ctx.tolist(), g.tok_idx.tolist(), g.max_ctx) for g in pp.groups] \
            == groups
    assert lay.positions(CPU).tolist() == [c + i for c, k in zip(ctx, n) for i in range(k)]
    assert cache._plan(lay, CPU) is got                  # once per pass, whatever the layer


def test_plan_names_the_row_over_capacity():
    cache = SplitKVCache(1, 4, 2, 2, 16, 4, CPU, torch.float32, torch.float32, True)
    with pytest.raises(RuntimeError, match="KV row 3: 15\\+2 positions exceed the capacity 16"):
        cache._plan(PassLayout([0, 3], [1, 15], [1, 2]), CPU)
    assert PassLayout([], [], []).positions(CPU).shape == (0,)
