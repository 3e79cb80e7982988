"""Checks written for mutants of runtime/speculative.py that survived scripts/mutation_check.sh (continued from
test_guard_mutants_speculative.py, whose fake models and textbook reference these use): emission against EOS
and max_new, prefill passes, what the decoder passes to the target, its defaults, and the near-tie (flip)
count, all worked out on plain token lists.
"""
from __future__ import annotations

import inspect

import pytest
import torch

from test_guard_mutants_speculative import (CAP, CPU, EOS, PROMPTS, V, FakeDraft, FakeTarget, argmax, decoder,
                                            draft_rule, logits_of, mix, reference, run, sequences, target_rule)
from specmoe.runtime.model.kv_cache import SplitKVCache
from specmoe.runtime.model.target import TargetModel
from specmoe.runtime.run_record import RunRecord, StageTimer
from specmoe.runtime.speculative import SpeculativeDecoder


# ---- emission: EOS against length, by hand
def _emit_case(prompt, max_new, ks, eos=(EOS,)):
    dec = decoder("twin", eos=eos)
    s = sequences([prompt], max_new)
    run(dec, s, ks)
    return s[0]


def test_emission_stops_at_max_new_exactly_and_at_eos():
    """Twin draft: every iteration offers k + 1 tokens of the target's greedy continuation g."""
    p = PROMPTS[2]
    g, _, _ = reference(p, 200, [0] * 200, eos=())
    # no EOS among them: max_new tokens exactly, "length", whatever k
    for max_new, ks in ((1, [3]), (2, [3]), (4, [2]), (5, [3]), (7, [2, 2, 2]), (9, [4, 4, 4])):
        s = _emit_case(p, max_new, ks, eos=(999,))
        assert (s.generated, s.finish_reason) == (g[:max_new], "length"), max_new
    # EOS: the position of each of several tokens of g as the EOS id; stops right after it
    for pos in (0, 1, 2, 3, 5):
        e = g[pos]
        first = g.index(e)
        s = _emit_case(p, 30, [3] * 10, eos=(e, 999))
        assert (s.generated, s.finish_reason) == (g[:first + 1], "eos"), pos
        # EOS on the very token that reaches max_new: "eos"
        s = _emit_case(p, first + 1, [3] * 10, eos=(e,))
        assert (s.generated, s.finish_reason) == (g[:first + 1], "eos"), pos
        # max_new one short of it: "length"
        if first:
            s = _emit_case(p, first, [3] * 10, eos=(e,))
            assert (s.generated, s.finish_reason) == (g[:first], "length"), pos


# ---- prefill
@pytest.mark.parametrize("lens,chunk,groups", [
    ([3, 4, 2, 6, 1], 7, [[0, 1], [2], [3, 4]]),      # 3 + 4 = 7 fits; 7 + 2 does not; 2 + 6 does not; 6 + 1 fits
    ([9, 2, 2], 5, [[0], [1, 2]]),                   # a prompt longer than a pass gets its own
    ([1, 1, 1], 1, [[0], [1], [2]]),
    ([1, 1, 1], 0, [[0], [1], [2]]),                 # at least one token per pass
    ([2, 3, 1], 6, [[0, 1, 2]]),
    ([2, 3, 2], 6, [[0, 1], [2]]),
    ([4, 1, 1], 5, [[0, 1], [2]]),
])
def test_prefill_passes_hold_whole_prompts_up_to_the_chunk(lens, chunk, groups):
    dec = decoder("dense", prefill_chunk_tokens=chunk)
    seqs = sequences([[3 + i] * n for i, n in enumerate(lens)], 5, rows=[2, 0, 1, 4, 3][:len(lens)])
    dec.prefill(seqs)
    calls = dec.target.calls
    assert [c["rows"] for c in calls] == [[seqs[i].row for i in g] for g in groups]
    assert all(c["ctx"] == [0] * len(c["rows"]) and c["phase"] == "prefill" for c in calls)
    assert [c["rows"] for c in dec.draft.calls] == [c["rows"] for c in calls]
    for s in seqs:
        assert s.target_len == dec.tkv.lens[s.row] == dec.dkv.lens[s.row] == len(s.prompt)
        assert s.generated == [argmax(logits_of(s.prompt, target_rule, V))] and s.draft_pending == s.generated
    assert "target.pre_attn" in dec.timer.totals["prefill"] and not dec.timer.totals["decode"]


def test_prefill_reuses_rows_of_finished_sequences():
    """A row's old contents (lengths set anywhere) do not leak into a new prompt's prefill."""
    dec = decoder("dense")
    first = sequences(PROMPTS[:2], 30)
    run(dec, first, [3, 2, 3])
    new = sequences([[8, 8, 1], [10, 2, 7, 7]], 12, rows=[1, 0])
    ks = [2, 3, 1, 0, 4]
    out = run(dec, new, ks)
    for s in new:
        assert (s.generated, s.finish_reason) == reference(s.prompt, 12, ks)[::2]
    assert out


def test_prefill_and_step_pass_the_schedule_and_record_routing():
    dec = decoder("dense", prefetch="next")
    run(dec, sequences(PROMPTS[:3], 8), [2, 0])
    pre = [c for c in dec.target.calls if c["phase"] == "prefill"]
    dec_calls = [c for c in dec.target.calls if c["phase"] == "decode"]
    assert pre and all(c["record_routing"] and c["logits"] == "last" for c in pre)
    assert all(c["prefetch"] == "next" for c in dec.target.calls)
    # the default: TargetModel.forward's own default schedule
    d2 = decoder("dense")
    run(d2, sequences(PROMPTS[:2], 4), [1])
    default = inspect.signature(TargetModel.forward).parameters["prefetch"].default
    assert all(c["prefetch"] == default for c in d2.target.calls)
    assert dec_calls and all(c["logits"] == "all" for c in dec_calls)


def test_defaults_are_greedy_with_the_records_flip_gap():
    """Made without temperature: greedy; without flip_gap: RunRecord's default gap (1e-4), so the fakes'
    0.25 gaps are no flips."""
    tkv = SplitKVCache(1, 4, 2, 1, CAP, 2, CPU, torch.float32, torch.float32, decode_kernel=False)
    dkv = SplitKVCache(1, 4, 2, 1, CAP, 2, CPU, torch.float32, torch.float32, decode_kernel=True)
    dec = SpeculativeDecoder(FakeTarget(), FakeDraft(), tkv, dkv, StageTimer(CPU), 1, (EOS,))
    seqs = sequences(PROMPTS[:4], 15)
    run(dec, seqs, [2, 3, 1, 0, 2, 4])
    for s in seqs:
        assert (s.generated, s.finish_reason) == reference(s.prompt, 15, [2, 3, 1, 0, 2, 4])[::2]
    assert dec.flip_gap == inspect.signature(RunRecord).parameters["flip_gap"].default and dec.flips == 0


# ---- flips: near ties counted over the positions the target's choice decided
def top2_gap(h, vocab=V, rule=target_rule) -> float:
    top = sorted(logits_of(h, rule, vocab))
    return top[-1] - top[-2]


def test_flips_count_near_ties_of_prefill_and_accepted_positions():
    """flip_gap 0.5: the 0.25 gaps count, the gaps of exactly 0.5 do not; prefill in two passes."""
    for draft, ks in (("dense", [3, 0, 2, 4, 1, 3, 2]), ("twin", [2, 4, 3]), (None, [0, 0, 0, 0])):
        dec = decoder(draft, rows=8, flip_gap=0.5, prefill_chunk_tokens=8, eos=(999,))   # no iteration cut short
        seqs = sequences(PROMPTS + [[3, 8], [5, 6, 4]], 40)     # near ties after these two, in passes 4 and 5
        dec.prefill(seqs)
        want = sum(top2_gap(s.prompt) < 0.5 for s in seqs)
        assert len(dec.target.calls) == 5 and dec.flips == want == 2
        active = list(seqs)
        for k in ks:
            step_want = 0
            for s in active:
                h = s.prompt + s.generated
                drf = FakeDraft(rule=target_rule if draft == "twin" else draft_rule)
                d = []
                for _ in range(k if draft else 0):
                    d.append(argmax(drf.logits_of(h + d)))
                a = 0
                while a < len(d) and d[a] == argmax(logits_of(h + d[:a], target_rule, V)):
                    a += 1
                step_want += sum(top2_gap(h + d[:j]) < 0.5 for j in range(a + 1))
            st = dec.step(active, k)
            assert st.flips == step_want
            want += step_want
            assert dec.flips == want
            active = [s for s in active if not s.finished]


@pytest.mark.parametrize("vocab", [1, 2])
def test_tiny_vocabularies(vocab):
    """A 2-token vocabulary counts its near ties (0.25 gaps); a 1-token one has none and still decodes."""
    rule = lambda h: target_rule(h) % vocab          # noqa: E731
    dec = decoder(FakeDraft(vocab, rule), target=FakeTarget(vocab, rule), rows=7, flip_gap=0.5, eos=(99,))
    seqs = sequences(PROMPTS + [[3, 8]], 40)              # a near tie right after [3, 8] (prefill)
    ks = [2, 1, 3, 0, 2, 2, 2, 2]                          # 23 tokens each: no iteration is cut short
    steps = run(dec, seqs, ks)
    assert all(st.accepted == [st.k] * len(a) for a, st in steps)      # the draft is the target
    want = 0
    for s in seqs:     # every emitted token was a greedy choice of the target
        g = []
        for _ in range(23):
            g.append(argmax(logits_of(s.prompt + g, rule, vocab)))
        assert s.generated == g and (vocab > 1 or g == [0] * 23)
        want += sum(mix(s.prompt + g[:t]) % 5 == 0 for t in range(23))
    assert dec.flips == (want if vocab > 1 else 0) and want > 1


def test_step_without_draft_model_is_plain_decoding():
    dec = decoder(None)
    seqs = sequences(PROMPTS, 12)
    out = run(dec, seqs, [3] * 12)
    assert all(st.k == 0 and st.accepted == [0] * len(a) for a, st in out)
    assert all(c["n"] == [1] * len(c["n"]) for c in dec.target.calls if c["phase"] == "decode")
    for s in seqs:
        assert (s.generated, s.finish_reason) == reference(s.prompt, 12, [0] * 12)[::2]


def test_flips_count_only_emitted_tokens():
    """A near tie at a position the target decided but that is cut off (after max_new) is no emitted greedy
    token (RunRecord.token_flips): with the draft the target itself, max_new = 10 and k = 3, the third
    iteration's last 3 positions are never emitted."""
    rule = lambda h: target_rule(h) % 2          # noqa: E731
    dec = decoder(FakeDraft(2, rule), target=FakeTarget(2, rule), rows=7, flip_gap=0.5, eos=(99,))
    seqs = sequences(PROMPTS + [[3, 8]], 10)
    run(dec, seqs, [3, 3, 3, 3])
    want, cut = 0, 0
    for s in seqs:
        g = []
        for _ in range(13):                      # 1 + 3 x 4 positions decided, the first 10 emitted
            g.append(argmax(logits_of(s.prompt + g, rule, 2)))
        assert s.generated == g[:10] and s.finish_reason == "length"
        want += sum(mix(s.prompt + g[:t]) % 5 == 0 for t in range(10))
        cut += sum(mix(s.prompt + g[:t]) % 5 == 0 for t in range(10, 13))
    assert cut > 0 and dec.flips == want
