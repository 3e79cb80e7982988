"""Checks written for mutants of runtime/speculative.py that survived scripts/mutation_check.sh: the speculative
loop run on fake models whose answers are known without it, against textbook speculative decoding worked out
here on plain token lists.

The fakes are causal LMs over token histories: the next-token logits of a history h are a fixed function of
every token of h and its position (`logits_of`), with the top token 3.0 above noise in [0, 1), and at some
histories a runner-up 0.25 or exactly 0.5 below it (near ties for the flip count). A fake's KV row is a
list of tokens by position: a pass at context c reads positions < c and writes c, c+1, ... (what a real KV
cache does), so a wrong length or a token fed twice or never changes what the model sees, and with it the
proposals. The reference (`reference`) never calls the decoder: it drafts k tokens from the whole history,
accepts the longest prefix equal to the target's greedy tokens, appends it and the target's next token, and
stops after EOS or at max_new (EOS first where both fall on one token).

State the module docstring promises after every iteration (checked after each step): the target KV holds
every token but the last; a dense draft's KV plus its pending tokens hold every token (pending: 1 token, 2
after a fully accepted iteration, one more per k = 0 iteration); an EAGLE head's KV plus pending hold every
token but the first.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from specmoe.planner.stages import Stage
from specmoe.runtime.model.eagle import EagleHead
from specmoe.runtime.model.kv_cache import SplitKVCache
from specmoe.runtime.run_record import StageTimer
from specmoe.runtime.speculative import Sequence, SpeculativeDecoder

V, EOS, CAP = 12, 2, 96
CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------------- fake models
def mix(h) -> int:
    """A hash of a token history: every token and its position count."""
    x = 17
    for i, t in enumerate(h):
        x = (x * 31 + int(t) * 7 + i) % 1000003
    return x


def target_rule(h) -> int:
    return (mix(h) * 13 + 5) % 1009


def draft_rule(h) -> int:
    """The target's token at two histories of three, the next one at the third (partial acceptance)."""
    return target_rule(h) + (0 if mix(h) % 3 else 1)


def logits_of(h, rule, vocab: int) -> list[float]:
    x = mix(h)
    out = [((x * (v + 3)) % 97) / 97.0 for v in range(vocab)]
    top = rule(h) % vocab
    out[top] = 3.0
    if vocab > 1 and x % 5 < 2:            # a runner-up 0.25 (x % 5 == 0) or exactly 0.5 below the top
        out[(top + 1) % vocab] = 2.75 if x % 5 == 0 else 2.5
    return out


def argmax(xs) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))


class FakeLM:
    def __init__(self, vocab: int, rule):
        self.vocab, self.rule = vocab, rule
        self.kv: dict[int, list[int]] = {}        # row -> token at each position written
        self.calls: list[dict] = []

    def logits_of(self, h):
        return logits_of(h, self.rule, self.vocab)

    def _pass(self, tokens, layout):
        """Write the pass's tokens into the rows -> per sequence the histories of its new positions."""
        toks, hists = tokens.tolist(), []
        for b, (row, ctx, n) in enumerate(zip(layout.rows.tolist(), layout.ctx.tolist(), layout.n.tolist())):
            cache = self.kv.setdefault(row, [])
            assert ctx <= len(cache), f"row {row}: a pass at context {ctx} reads positions never written"
            new = toks[layout.offsets[b]:layout.offsets[b] + n]
            cache[ctx:ctx + n] = new
            hists.append([cache[:ctx + i + 1] for i in range(n)])
        return hists


class FakeTarget(FakeLM):
    def __init__(self, vocab: int = V, rule=target_rule):
        super().__init__(vocab, rule)
        self.config = SimpleNamespace(vocab_size=vocab)
        self.device = CPU
        self.last_hidden = None

    def forward(self, tokens, layout, kv, timer, micro_batches=1, logits="all", record_routing=False,
                prefetch=False, keep_hidden=False):
        self.calls.append(dict(rows=layout.rows.tolist(), ctx=layout.ctx.tolist(), n=layout.n.tolist(),
                               logits=logits, record_routing=record_routing, prefetch=prefetch,
                               keep_hidden=keep_hidden, phase=timer.phase))
        with timer.stage(Stage.TARGET_PRE_ATTN):
            hists = self._pass(tokens, layout)
        if keep_hidden:            # the feature of position p: [its token, p]
            self.last_hidden = torch.tensor([[h[-1], len(h) - 1] for hs in hists for h in hs], dtype=torch.float32,
                                            device=CPU)
        rows = [hs[-1:] if logits == "last" else hs for hs in hists]
        return torch.tensor([self.logits_of(h) for hs in rows for h in hs], dtype=torch.float32, device=CPU)


class FakeDraft(FakeLM):
    def __init__(self, vocab: int = V, rule=draft_rule):
        super().__init__(vocab, rule)

    def forward(self, tokens, layout, kv, logits="last"):
        hists = self._pass(tokens, layout)
        self.calls.append(dict(rows=layout.rows.tolist(), ctx=layout.ctx.tolist(), n=layout.n.tolist()))
        if logits == "none":
            return None
        rows = [hs[-1:] if logits == "last" else hs for hs in hists]
        return torch.tensor([self.logits_of(h) for hs in rows for h in hs], dtype=torch.float32, device=CPU)


class FakeEagle(EagleHead):
    """An EAGLE head over the fake target's features ([token, position]): its KV position i holds the pair
    (f_i, t_{i+1}); it rebuilds the history t_0 .. t_{i+1} from the pairs, checking that every feature is the
    target's feature of the token before it (or its own prediction of it), and predicts with `rule`."""

    def __init__(self, rule=draft_rule, vocab: int = V):
        self.config, self.dtype, self.device = SimpleNamespace(hidden=2), torch.float32, CPU
        self.rule, self.vocab = rule, vocab
        self.kv: dict[int, list[tuple[int, int, int]]] = {}

    def forward(self, tokens, feats, layout, kv, logits="last"):
        toks, f = tokens.tolist(), feats.round().long().tolist()
        out_l, out_f = [], []
        for b, (row, ctx, n) in enumerate(zip(layout.rows.tolist(), layout.ctx.tolist(), layout.n.tolist())):
            cache = self.kv.setdefault(row, [])
            assert ctx <= len(cache), f"row {row}: a pass at context {ctx} reads positions never written"
            o = layout.offsets[b]
            cache[ctx:ctx + n] = [(f[o + i][0], f[o + i][1], toks[o + i]) for i in range(n)]
            hist = [cache[0][0]]
            for i, (ft, fp, t) in enumerate(cache[:ctx + n]):
                assert (ft, fp) == (hist[-1], i), f"row {row}: position {i} holds feature {(ft, fp)}"
                hist.append(t)
            out_l.append(logits_of(hist, self.rule, self.vocab))
            out_f.append([hist[-1], len(hist) - 1])
        if logits == "none":
            return None, None
        f32 = dict(dtype=torch.float32, device=CPU)
        return torch.tensor(out_l, **f32), torch.tensor(out_f, **f32)


def decoder(draft="dense", rows=6, draft_dev_rows=3, target_dev_rows=2, eos=(EOS,), temperature=0.0, **kw):
    target = kw.pop("target", None) or FakeTarget()
    d = {"dense": FakeDraft, "eagle": FakeEagle, "twin": lambda: FakeDraft(rule=target_rule),
         "eagle_twin": lambda: FakeEagle(rule=target_rule), None: lambda: None}[draft]() \
        if isinstance(draft, str) or draft is None else draft
    tkv = SplitKVCache(1, rows, target_dev_rows, 1, CAP, 2, CPU, torch.float32, torch.float32, decode_kernel=False)
    dkv = SplitKVCache(1, rows, draft_dev_rows, 1, CAP, 2, CPU, torch.float32, torch.float32, decode_kernel=True) \
        if d is not None else None
    return SpeculativeDecoder(target, d, tkv, dkv, StageTimer(CPU), 2, eos, temperature=temperature, **kw)


def sequences(prompts, max_new, rows=None):
    seqs = []
    for i, (p, m) in enumerate(zip(prompts, max_new if isinstance(max_new, list) else [max_new] * len(prompts))):
        s = Sequence(i, list(p), m)
        s.row = rows[i] if rows is not None else i
        seqs.append(s)
    return seqs


# ---------------------------------------------------------------------------------------------- the reference
def reference(prompt, max_new, ks, draft_vocab=V, draft_rule_=draft_rule, eos=(EOS,)):
    """Greedy speculative decoding of one sequence by the textbook: (tokens, [(k, a) per iteration it was live
    in], finish reason). ks: k of every iteration of the batch, in order."""
    tgt = lambda h: argmax(logits_of(h, target_rule, V))                          # noqa: E731
    drf = lambda h: argmax(logits_of(h, draft_rule_, draft_vocab)[:V])             # noqa: E731
    gen, its, why = [], [], None

    def emit(toks):
        nonlocal why
        for t in toks:
            gen.append(t)
            if t in eos:
                why = "eos"
            elif len(gen) >= max_new:
                why = "length"
            if why:
                return

    emit([tgt(prompt)])
    for k in ks:
        if why:
            break
        h = prompt + gen
        d = []
        for _ in range(k):
            d.append(drf(h + d))
        a = 0
        while a < k and d[a] == tgt(h + d[:a]):
            a += 1
        its.append((k, a))
        emit(d[:a] + [tgt(h + d[:a])])
    return gen, its, why


def run(dec, seqs, ks, eagle=False, check=True):
    """Prefill, then one step per k over the unfinished sequences (as the engine does), checking the KV and
    pending state after every step. Returns the IterationStats with the sequences they covered."""
    dec.prefill(seqs)
    active, out = [s for s in seqs if not s.finished], []
    for k in ks:
        if not active:
            break
        pend0 = {s.index: list(s.draft_pending) for s in active}
        gen0 = {s.index: len(s.generated) for s in active}
        st = dec.step(active, k)
        out.append((list(active), st))
        used = k if dec.draft is not None else 0
        assert st.k == used and len(st.accepted) == len(active)
        assert st.emitted == sum(len(s.generated) - gen0[s.index] for s in active)
        for s, a in zip(active, st.accepted):
            if s.finished or not check:
                continue
            full = s.prompt + s.generated
            assert s.target_len == dec.tkv.lens[s.row] == len(full) - 1
            assert dec.target.kv[s.row][:s.target_len] == full[:-1]
            if dec.draft is None:
                continue
            pend = pend0[s.index] + [full[-1]] if used == 0 else (
                full[-(a + 1):] if eagle else full[-2:] if a == used else full[-1:])
            assert s.draft_pending == pend, (k, a)
            kept = int(dec.dkv.lens[s.row])
            if eagle:
                assert kept + len(pend) == len(full) - 1
                assert [t for _, _, t in dec.draft.kv[s.row][:kept]] == full[1:kept + 1]
            else:
                assert kept + len(pend) == len(full)
                assert dec.draft.kv[s.row][:kept] == full[:kept]
        active = [s for s in active if not s.finished]
    return out


PROMPTS = [[5, 9, 4], [7], [3, 3, 8, 1, 6, 10], [11, 4], [6, 6, 6, 6], [9, 1, 5, 7, 3]]
KS = [3, 0, 0, 2, 4, 1, 3, 0, 5, 2, 3, 4, 4, 1, 2, 6, 3, 2, 2, 1]


def check_against_reference(dec, seqs, ks, eagle=False, draft_vocab=V, drule=draft_rule):
    out = run(dec, seqs, ks, eagle=eagle)
    refs = [reference(s.prompt, s.max_new, ks, draft_vocab, drule) for s in seqs]
    for s, (gen, its, why) in zip(seqs, refs):
        assert (s.generated, s.finish_reason) == (gen, why), s.index
        assert s.decode_iterations == len(its)
        assert s.accepted_drafts == sum(a for _, a in its)
    for i, (active, st) in enumerate(out):
        assert st.accepted == [refs[s.index][1][i][1] for s in active], i
    return refs, out


# ---------------------------------------------------------------------------------------------- tests
def test_reference_data_reach_every_case():
    """The prompts and ks above give EOS and length finishes, EOS on the last allowed token, and
    iterations that accept nothing, some and all of k > 1 drafts."""
    refs = [reference(p, m, KS) for p, m in zip(PROMPTS, [20, 9, 25, 14, 30, 3])]
    whys = [r[2] for r in refs]
    assert {"eos", "length"} <= set(whys)
    accs = [(k, a) for r in refs for k, a in r[1] if k > 1]
    assert any(a == 0 for _, a in accs) and any(a == k for k, a in accs) and any(0 < a < k for k, a in accs)


@pytest.mark.parametrize("draft_dev_rows", [0, 3, 6])
def test_greedy_loop_matches_textbook_speculation(draft_dev_rows):
    """Ragged prompts in shuffled KV rows, k changing every iteration (0 included: the draft catches up on
    several tokens), draft KV all on the host, split, all on the device."""
    dec = decoder(draft_dev_rows=draft_dev_rows)
    seqs = sequences(PROMPTS, [20, 9, 25, 14, 30, 3], rows=[4, 0, 5, 2, 1, 3])
    check_against_reference(dec, seqs, KS)
    st = dec.timer.totals["decode"]
    assert ("draft.gpu" in st) == (draft_dev_rows > 0) and ("draft.cpu" in st) == (draft_dev_rows < 6)


@pytest.mark.parametrize("draft", ["dense", "eagle", None])
def test_tensors_go_to_the_target_device_not_torchs_default(draft):
    """Every tensor the decoder makes is on target.device: with torch's default device set to "meta" (where no
    value can be read) the loop runs as before."""
    dec = decoder(draft, draft_dev_rows=3)
    seqs = sequences(PROMPTS, [20, 9, 25, 14, 30, 3], rows=[4, 0, 5, 2, 1, 3])
    with torch.device("meta"):
        check_against_reference(dec, seqs, [3, 0, 2, 4, 1] * 3 if draft else [0] * 15, eagle=draft == "eagle")


def test_twin_draft_accepts_every_draft():
    """A draft that is the target accepts all k drafts at every iteration, however k changes."""
    dec = decoder("twin")
    seqs = sequences(PROMPTS, 60)
    out = run(dec, seqs, KS)
    for active, st in out:
        assert st.accepted == [st.k] * len(active)
    assert all(s.accepted_drafts == sum(st.k for a, st in out if s in a) for s in seqs)


def test_greedy_output_is_plain_greedy_decoding():
    """Whatever the draft, the tokens are the target's greedy continuation (k = 0 throughout gives it)."""
    plain = sequences(PROMPTS, 18)
    run(decoder(None), plain, [0] * 40)
    for ks in ([2] * 30, [5, 1, 4, 0, 3] * 6):
        seqs = sequences(PROMPTS, 18)
        run(decoder("dense", draft_dev_rows=2), seqs, ks)
        assert [s.generated for s in seqs] == [s.generated for s in plain]
        assert [s.finish_reason for s in seqs] == [s.finish_reason for s in plain]


@pytest.mark.parametrize("draft", ["eagle", "eagle_twin"])
def test_eagle_head_bookkeeping(draft):
    """An EAGLE head (features from the target, pairs rolled back after drafting): the same tokens and
    acceptances as the textbook with its rule; a head that is the target accepts every draft."""
    dec = decoder(draft, draft_dev_rows=3)
    seqs = sequences(PROMPTS, [20, 9, 25, 14, 30, 3], rows=[4, 0, 5, 2, 1, 3])
    ks = [2, 0, 3, 0, 0, 4, 1, 3, 5, 2] * 2
    if draft == "eagle":
        check_against_reference(dec, seqs, ks, eagle=True)
    else:
        out = run(dec, seqs, ks, eagle=True)
        for active, st in out:
            assert st.accepted == [st.k] * len(active)
    assert all(c["keep_hidden"] for c in dec.target.calls)


def test_plain_decoder_keeps_no_hidden_state():
    dec = decoder("dense")
    run(dec, sequences(PROMPTS[:3], 6), [2, 0, 1])
    assert not any(c["keep_hidden"] for c in dec.target.calls)


@pytest.mark.parametrize("draft_vocab", [V - 4, V + 3])
def test_draft_vocabulary_other_than_the_target(draft_vocab):
    """A smaller draft vocabulary proposes only its tokens; a larger one never a token past the target's V
    (its proposal is its best among the target's tokens): the rule below puts its top past V at times."""
    big = lambda h: V + 1 if mix(h) % 4 == 0 else draft_rule(h)      # noqa: E731
    rule = big if draft_vocab > V else draft_rule
    dec = decoder(FakeDraft(draft_vocab, rule))
    seqs = sequences(PROMPTS, 16)
    check_against_reference(dec, seqs, [3, 2, 4, 1] * 6, draft_vocab=draft_vocab, drule=rule)


def test_sequence_counters_and_finish():
    s = Sequence(0, [4, 5], 8)
    assert not s.finished and s.decode_iterations == 0 and s.accepted_drafts == 0
    dec = decoder("dense")
    seqs = sequences(PROMPTS, 40)
    out = run(dec, seqs, [2, 3])
    for s in seqs:
        n = sum(s in a for a, _ in out)
        assert s.decode_iterations == n and s.accepted_drafts == sum(
            st.accepted[a.index(s)] for a, st in out if s in a)
        assert s.last == s.generated[-1] and s.finished == (s.finish_reason is not None)
