"""Checks written for mutants of runtime/speculative.py that survived scripts/mutation_check.sh: sampling, the
acceptance oracle and the inverse-CDF draw, on the fake models of test_guard_mutants_speculative.py, against
speculative sampling (Leviathan et al. 2023) worked out here on plain token lists with the same seeded
torch.Generator draws, in the order the decoder documents (every draw from its one host generator): each prefill
pass draws one uniform per prompt; each draft step of each draft KV part (device rows first) one per sequence;
each verification one per draft and one for the next token ([B, k+1]; [B] at k = 0).
"""
from __future__ import annotations

import pytest
import torch

from test_guard_mutants_speculative import (EOS, PROMPTS, V, FakeDraft, argmax, decoder, draft_rule, logits_of,
                                            run, sequences, target_rule)
from specmoe.runtime.speculative import sample_from

T = 0.7


# ---------------------------------------------------------------------------------------------- by hand
def test_sample_from_is_the_inverse_cdf():
    """Weights [1, 2, 1, 4] (cdf 1, 3, 4, 8 of 8): u picks the first token whose cdf exceeds 8u; a row of
    other weights beside it is drawn by its own cdf; u = 1 gives the last token."""
    probs = torch.tensor([[1.0, 2.0, 1.0, 4.0], [4.0, 0.0, 2.0, 2.0]])
    cases = [  # (u row 0, u row 1) -> tokens
        ((0.0, 0.0), (0, 0)), ((0.1, 0.1), (0, 0)), ((0.125, 0.5), (1, 2)), ((0.3, 0.49), (1, 0)),
        ((0.375, 0.75), (2, 3)), ((0.49, 0.74), (2, 2)), ((0.5, 0.9), (3, 3)), ((0.99, 0.6), (3, 2)),
        ((1.0, 1.0), (3, 3)),
    ]
    for u, want in cases:
        got = sample_from(probs, torch.tensor(u, dtype=torch.float32))
        assert got.dtype == torch.int64 and got.tolist() == list(want), (u, got)
    # one row, probabilities that sum to 1 already (float32 input, fp64 inside)
    p = torch.tensor([[0.25, 0.25, 0.5]])
    assert [int(sample_from(p, torch.tensor([u]))) for u in (0.2, 0.25, 0.49, 0.5, 0.7)] == [0, 1, 1, 2, 2]


def test_sample_from_never_draws_a_zero_probability_tail():
    """A row whose last tokens have probability 0: u = 1 gives the last positive token (not the last of the
    row), u just below 1 the same, and a row with one positive token always gives it."""
    probs = torch.tensor([[1.0, 3.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 5.0], [2.0, 0.0, 1.0, 0.0]])
    for u in (1.0, 1.0 - 1e-7, 0.999):
        got = sample_from(probs, torch.full((4,), u))
        assert got.tolist() == [1, 1, 3, 2], (u, got)
    assert sample_from(probs, torch.zeros(4)).tolist() == [0, 1, 3, 0]
    assert sample_from(probs, torch.full((4,), 0.5)).tolist() == [1, 1, 3, 0]
    assert sample_from(probs, torch.full((4,), 0.7)).tolist() == [1, 1, 3, 2]


def test_probs_pads_or_truncates_a_draft_vocabulary():
    """Tempered softmax over the target's V: a smaller vocabulary's extra tokens get probability 0, a larger
    one's tokens past V are dropped before the softmax (any number of leading dimensions)."""
    dec = decoder("dense", temperature=T)
    g = torch.Generator().manual_seed(1)
    for shape in ((3, V - 4), (2, 3, V - 4), (3, V + 5), (2, 2, V + 5), (2, 3, V), (V, V - 4), (2, V, V - 4),
                  (V, V + 5), (2, V, V + 5)):
        x = torch.randn(*shape, generator=g)
        p = dec._probs(x)
        assert p.shape == (*shape[:-1], V)
        w = min(V, shape[-1])
        e = torch.exp((x[..., :w].double() - x[..., :w].double().amax(-1, keepdim=True)) / T)
        assert torch.allclose(p[..., :w].double(), e / e.sum(-1, keepdim=True), atol=1e-6)
        assert torch.all(p[..., w:] == 0)


# ---------------------------------------------------------------------------------------------- the reference
def softmax_t(logits, vocab_out=V):
    x = torch.tensor(logits[:vocab_out], dtype=torch.float32)
    p = torch.softmax(x / T, -1)
    return torch.cat([p, torch.zeros(vocab_out - p.numel())]) if p.numel() < vocab_out else p


def inverse_cdf(w, u) -> int:
    """The first token whose cumulative weight (fp64, left to right) exceeds u times the total."""
    w = [float(x) for x in w]
    thr, c = float(u) * sum(w), 0.0
    for i, x in enumerate(w):
        c += x
        if c > thr:
            return i
    return max(i for i, x in enumerate(w) if x > 0)


def sampling_reference(prompts, rows, dev_rows, max_new, ks, seed, draft_vocab=V, eos=(EOS,)):
    """Per sequence (tokens, finish reason) and per iteration the accepted counts, by speculative sampling."""
    g = torch.Generator().manual_seed(seed)
    P = lambda h: softmax_t(logits_of(h, target_rule, V))                      # noqa: E731
    Q = lambda h: softmax_t(logits_of(h, draft_rule, draft_vocab))             # noqa: E731
    gen = [[] for _ in prompts]
    why = [None] * len(prompts)

    def emit(i, toks):
        for t in toks:
            gen[i].append(t)
            why[i] = "eos" if t in eos else "length" if len(gen[i]) >= max_new else None
            if why[i]:
                return

    u = torch.rand(len(prompts), generator=g)                 # one prefill pass
    for i, p in enumerate(prompts):
        emit(i, [inverse_cdf(P(p), u[i])])
    accepted = []
    for k in ks:
        act = [i for i in range(len(prompts)) if not why[i]]
        if not act:
            break
        d = {i: [] for i in act}
        if k:
            for part in ([i for i in act if rows[i] < dev_rows], [i for i in act if rows[i] >= dev_rows]):
                for _ in range(k if part else 0):
                    u = torch.rand(len(part), generator=g)
                    for b, i in enumerate(part):
                        d[i].append(inverse_cdf(Q(prompts[i] + gen[i] + d[i]), u[b]))
            u = torch.rand(len(act), k + 1, generator=g)
        else:
            u = torch.rand(len(act), generator=g)[:, None]
        acc = []
        for b, i in enumerate(act):
            h = prompts[i] + gen[i]
            a = 0
            while a < k:
                x = d[i][a]
                p, q = P(h + d[i][:a])[x], Q(h + d[i][:a])[x]
                if not bool(u[b, a] * q < p):            # float32, as the acceptance test is written
                    break
                a += 1
            p = P(h + d[i][:a])
            if a < k:
                res = (p - Q(h + d[i][:a])).clamp_min(0)
                p = res if float(res.double().sum()) > 0 else p
            acc.append(a)
            emit(i, d[i][:a] + [inverse_cdf(p.double(), u[b, -1])])
        accepted.append(acc)
    return gen, why, accepted


@pytest.mark.parametrize("draft_dev_rows,draft_vocab", [(3, V), (0, V), (6, V - 4), (2, V + 3)])
def test_sampling_loop_matches_speculative_sampling(draft_dev_rows, draft_vocab):
    """Temperature 0.7 (not 1: a multiplied temperature would pass), k changing (0 included), draft KV split
    or in one part, draft vocabularies smaller (padded) and larger (truncated) than the target's."""
    rows = [4, 0, 5, 2, 1, 3]
    ks = [3, 0, 2, 4, 1, 0, 3, 2, 5, 2, 3, 1]
    dec = decoder(FakeDraft(draft_vocab, draft_rule), draft_dev_rows=draft_dev_rows, temperature=T, seed=5,
                  flip_gap=0.5)
    prompts = PROMPTS[:5] + [[3, 8]]            # a near tie (gap 0.25 < flip_gap) after [3, 8]: still no flip
    seqs = sequences(prompts, 16, rows=rows)
    out = run(dec, seqs, ks)
    gen, why, accepted = sampling_reference(prompts, rows, draft_dev_rows, 16, ks, 5, draft_vocab=draft_vocab)
    assert [s.generated for s in seqs] == gen
    assert [s.finish_reason for s in seqs] == why
    assert [st.accepted for _, st in out] == accepted
    assert dec.flips == 0 and all(st.flips == 0 for _, st in out)      # no greedy choice was made
    flat = [a for acc, k in zip(accepted, ks) for a in acc if k > 1]
    assert 0 in flat and any(a > 0 for a in flat)
    # a greedy run of the same prompts takes other tokens: the temperature is in force
    greedy = sequences(prompts, 16, rows=rows)
    run(decoder("dense", draft_dev_rows=draft_dev_rows), greedy, ks)
    assert [s.generated for s in greedy] != gen


def test_sampling_reference_is_not_greedy():
    gen, _, _ = sampling_reference(PROMPTS, list(range(6)), 3, 16, [2] * 10, 5)
    assert any(t != argmax(logits_of(p + g[:i], target_rule, V)) for p, g in zip(PROMPTS, gen)
               for i, t in enumerate(g))


# ---------------------------------------------------------------------------------------------- the oracle
def test_oracle_accepts_by_its_seeded_draws():
    """oracle_alpha: draft j of a sequence counts as accepted while the uniforms u[b, 1..j] of its iteration's
    [B, k] draw are all below alpha (strictly: alpha is set to one of the draws itself); the next token is the
    target's greedy choice after the accepted drafts, whatever they are; k = 0 iterations draw nothing."""
    seed, ks = 9, [3, 2, 0, 4, 1, 3, 0, 2, 2, 3]
    probe = torch.Generator().manual_seed(seed)
    alpha = float(torch.rand(6, 3, generator=probe)[1, 0])      # draw (1, 0) of the first iteration equals alpha
    dec = decoder("dense", oracle_alpha=alpha, seed=seed)
    seqs = sequences(PROMPTS, 14)
    out = run(dec, seqs, ks)
    g = torch.Generator().manual_seed(seed)
    gen = {i: [argmax(logits_of(p, target_rule, V))] for i, p in enumerate(PROMPTS)}
    done = {i: gen[i][-1] == EOS for i in gen}
    for (active, st), k in zip(out, ks):
        act = [s.index for s in active]
        assert act == [i for i in gen if not done[i]]
        u = torch.rand(len(act), k, generator=g) if k else None
        want = []
        for b, i in enumerate(act):
            a = 0
            while a < k and float(u[b, a]) < alpha:
                a += 1
            want.append(a)
            h = PROMPTS[i] + gen[i]
            d = []
            for _ in range(k):
                d.append(argmax(logits_of(h + d, draft_rule, V)))
            for t in d[:a] + [argmax(logits_of(h + d[:a], target_rule, V))]:
                gen[i].append(t)
                if t == EOS or len(gen[i]) >= 14:
                    done[i] = True
                    break
        assert st.accepted == want
    assert out[0][1].accepted[1] == 0 and 0 < alpha < 1
    assert [s.generated for s in seqs] == [gen[i] for i in range(6)]
    flat = [a for _, st in out for a in st.accepted]
    assert 0 in flat and any(a > 1 for a in flat)


# ---------------------------------------------------------------------------------------------- real models
CFG = {"model_type": "mixtral", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 24,
       "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
       "num_local_experts": 4, "num_experts_per_tok": 2, "max_position_embeddings": 256,
       "rope_theta": 1e4, "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False}
DCFG = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "max_position_embeddings": 256, "rope_theta": 1e4, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "tie_word_embeddings": False}


def test_real_models_greedy_exact_and_prefill_records_routing():
    """A random tiny Mixtral target and Llama draft: greedy speculation gives the k = 0 tokens, and the
    prefill pass records the experts it routed to (what the engine's expert rebalancing reads)."""
    from specmoe.runtime.model.draft import DraftModel
    from specmoe.runtime.model.expert_store import ExpertStore
    from specmoe.runtime.model.kv_cache import SplitKVCache
    from specmoe.runtime.model.target import TargetModel
    from specmoe.runtime.run_record import StageTimer
    from specmoe.runtime.speculative import Sequence, SpeculativeDecoder
    from specmoe.runtime.weights.sources import WeightSource

    cpu, f32 = torch.device("cpu"), torch.float32
    tsrc = WeightSource.random(CFG, seed=0, dtype=f32)
    c = tsrc.config
    store = ExpertStore(tsrc, cpu, f32, [c.num_experts] * c.num_layers)
    target = TargetModel(tsrc, store, cpu, f32)
    draft = DraftModel(WeightSource.random(DCFG, seed=1, dtype=f32), cpu, f32)
    prompts = [[5, 9, 33, 4], [17], [40, 41, 3, 8, 60, 12]]
    outs = []
    for ks in ([0] * 12, [3, 2, 4, 1, 3, 2, 3]):
        tkv = SplitKVCache(c.num_layers, 3, 1, c.num_kv_heads, 48, c.head_dim, cpu, f32, f32, decode_kernel=False)
        d = draft.config
        dkv = SplitKVCache(d.num_layers, 3, 2, d.num_kv_heads, 48, d.head_dim, cpu, f32, f32, decode_kernel=True)
        dec = SpeculativeDecoder(target, draft, tkv, dkv, StageTimer(cpu), 2, (), temperature=0.0, seed=0)
        seqs = []
        for i, p in enumerate(prompts):
            s = Sequence(i, p, 13)
            s.row = 2 - i
            seqs.append(s)
        store.has_statistics = False
        dec.prefill(seqs)
        assert store.has_statistics
        active, i = list(seqs), 0
        while active:
            dec.step(active, ks[i % len(ks)])
            active, i = [s for s in active if not s.finished], i + 1
        assert all(len(s.generated) == 13 for s in seqs)
        outs.append([s.generated for s in seqs])
    assert outs[0] == outs[1]
