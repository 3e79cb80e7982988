"""SplitKVCache's pass plan (the index tensors one forward pass needs per KV part and per token
count), built vectorised, against a plain per-sequence construction on random ragged layouts."""
from __future__ import annotations

import random

import pytest
import torch

from specmoe.runtime.model.kv_cache import PassLayout, SplitKVCache

CPU = torch.device("cpu")


def _reference(cache: SplitKVCache, lay: PassLayout):
    """Per part: (tokens, local rows, positions, [(n, local rows, ctx, first tokens, max ctx)]); the host
    part's rows of several counts one group (n: the counts), as one ragged verify-kernel call takes them."""
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
        if p == 1 and len(by_n) > 1:     # host rows of several counts: one ragged group in pass order
            by_n = {tuple(lay.n[b] for b in seqs): seqs}
        groups = [(list(n) if isinstance(n, tuple) else int(n), [lay.rows[b] - (0 if p == 0 else cache.device_rows) for b in bs],
                   [lay.ctx[b] for b in bs], [lay.offsets[b] for b in bs], max(lay.ctx[b] for b in bs))
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
    for pp, (part, toks, lrows, pos, groups) in zip(got, want):
        assert pp.whole == (toks == list(range(lay.num_tokens)))
        assert (pp.tok_idx is None) == pp.whole and (pp.whole or pp.tok_idx.tolist() == toks)
        assert pp.rows.tolist() == lrows and pp.pos.tolist() == pos
        assert [(g.n if isinstance(g.n, int) else g.n.tolist(), g.local_rows.tolist(), g.ctx.tolist(), g.max_ctx)
                for g in pp.groups] == [(n, r, c, m) for n, r, c, _, m in groups]
        for g, (gn, _, _, firsts, _) in zip(pp.groups, groups):
            if part == 1:      # the verify kernel's token offsets: each sequence's first token of the pass
                assert g.tok_idx is None and g.first.tolist() == firsts
            else:              # a gather unless the group is the whole pass in order
                gtoks = [t + i for t in firsts for i in range(gn)]
                assert g.first is None and (g.tok_idx is None) == g.whole and (g.whole or g.tok_idx.tolist() == gtoks)
    assert lay.positions(CPU).tolist() == [c + i for c, k in zip(ctx, n) for i in range(k)]
    assert cache._plan(lay, CPU) is got                  # once per pass, whatever the layer


def test_plan_names_the_row_over_capacity():
    cache = SplitKVCache(1, 4, 2, 2, 16, 4, CPU, torch.float32, torch.float32, True)
    with pytest.raises(RuntimeError, match="KV row 3: 15\\+2 positions exceed the capacity 16"):
        cache._plan(PassLayout([0, 3], [1, 15], [1, 2]), CPU)
    assert PassLayout([], [], []).positions(CPU).shape == (0,)


def test_plans_are_kept_per_model_device():
    """A plan holds index tensors on the devices it was built for: a pass planned for one model device
    builds its own plan for another (the pinned path plans with host tensors, a later layer may not)."""
    cache = SplitKVCache(1, 4, 2, 2, 16, 4, CPU, torch.float32, torch.float32, True)
    lay = PassLayout([0, 3], [1, 5], [1, 2])
    a, b = cache._plan(lay, CPU), cache._plan(lay, torch.device("meta"))
    assert a is not b and cache._plan(lay, CPU) is a
    assert b[0].rows.device.type == "cpu" and b[0].groups[0].tok_idx.device.type == "meta"  # device part 0: CPU
    assert b[1].tok_idx.device.type == "meta" and b[1].groups[0].first.device.type == "cpu"
    assert b[1].groups[0].first.tolist() == [0]        # among the part's own tokens: q is staged per part


class _Transfers(torch.overrides.TorchFunctionMode):
    """Counts tensor copies between devices (.to with a device) and pinned-memory staging."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name == "pin_memory" or (name == "to" and any(isinstance(x, torch.device) for x in args[1:])):
            self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("B", [3, 40])
def test_one_upload_per_device_whatever_the_batch(B):
    """A pass's index tensors reach a device in one copy: on a device that is not the CPU ("meta" stands in
    for CUDA), one for positions + last tokens and one for the plan (none when the plan needs no gather on the
    model device), however many sequences and groups."""
    rng = random.Random(B)
    cache = SplitKVCache(1, B + 2, B // 2, 2, 64, 4, CPU, torch.float32, torch.float32, True)
    lay = PassLayout(rng.sample(range(B + 2), B), [rng.randint(0, 40) for _ in range(B)],
                     [rng.choice([1, 2, 5]) for _ in range(B)])
    meta = torch.device("meta")
    with _Transfers() as t:
        lay.positions(meta), lay.last_token_index(meta)
        plan = cache._plan(lay, meta)
        lay.positions(meta), cache._plan(lay, meta)       # cached: no copy more
    gathers = any(pp.tok_idx is not None or any(g.tok_idx is not None for g in pp.groups) for pp in plan)
    assert t.n == 1 + gathers and (B < 40 or gathers)
    with _Transfers() as t:                               # host indices: no copy at all
        lay.positions(CPU), cache._plan(lay, CPU)
    assert t.n == 0


def test_host_rows_are_written_in_place_at_their_token_rows():
    """q in host memory: the verify kernel reads q's rows and writes the output into the caller's buffer at
    the host sequences' token rows, in q's dtype, the device part's rows by its own path; the same result
    as attending each sequence alone."""
    torch.manual_seed(0)
    cache = SplitKVCache(1, 5, 2, 2, 32, 8, CPU, torch.bfloat16, torch.bfloat16, True)
    lay = PassLayout([3, 0, 4, 1], [4, 2, 0, 7], [3, 1, 3, 1])
    T = lay.num_tokens
    fused = torch.randn(T, 4 + 2 * 2, 8).bfloat16()               # [T, Hq + 2 Hkv, D] one buffer per pass
    q, k, v = fused[:, :4], fused[:, 4:6], fused[:, 6:]
    for r, c in zip(lay.rows, lay.ctx):                            # some cached context
        cache.k[0 if r < 2 else 1][0][r % 2 if r < 2 else r - 2, :, :c] = torch.randn(2, int(c), 8).bfloat16()
        cache.v[0 if r < 2 else 1][0][r % 2 if r < 2 else r - 2, :, :c] = torch.randn(2, int(c), 8).bfloat16()
    buf = torch.full((T, 4, 8), 5.0, dtype=torch.bfloat16)
    assert cache.attend(0, q, k, v, lay, out=buf) is buf and not (buf == 5.0).all(-1).all(-1).any()
    for b in range(4):
        s, e = int(lay.offsets[b]), int(lay.offsets[b + 1])
        one = PassLayout([lay.rows[b]], [lay.ctx[b]], [lay.n[b]])
        alone = cache.attend(0, q[s:e].contiguous(), k[s:e].contiguous(), v[s:e].contiguous(), one)
        assert alone.dtype == torch.bfloat16
        assert torch.allclose(alone.float(), buf[s:e].float(), atol=1e-2), b
