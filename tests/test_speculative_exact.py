"""Proof of exactness of the speculative loop.

Greedy: the tokens are identical to plain greedy decoding of the target, both our k = 0 path and
transformers' generate(do_sample=False), for many ragged prompts, batch sizes 1..16, k in 0..6,
sequences finishing early (EOS), continuous batching, k changing between iterations, and draft
KV split between device and host rows. The pairs are built with clear logit margins
(engine_fixtures.make_pair); top-2 gaps under 1e-4 are counted by the engine (token_flips) and
must be 0 here, so a mismatch is a bug, not float noise.

Sampling: the empirical distribution of speculative output tokens on a 16-token vocabulary
matches the target's exact marginal (computed with transformers) by a chi-square test at
p > 1e-3 (seeded, so deterministic), and the same test rejects the draft's distribution.
"""
from __future__ import annotations

import pytest
import torch

from engine_fixtures import one_thread_per_module  # noqa: F401 (autouse: one torch thread)
from engine_fixtures import (TINY_DRAFT, TINY_MOE, have_tiny_pair, load_hf, make_pair, tiny_prompts)
from specmoe.runtime.engine import Engine, plan_for_checkpoint

MAX_NEW = 20




def hf_greedy(hf, prompts, max_new, eos=2):
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=max_new, eos_token_id=eos,
                              pad_token_id=0, attention_mask=torch.ones(1, len(p), dtype=torch.long))
            outs.append(ids[0, len(p):].tolist())
    return outs


def ragged_prompts(n, seed, vocab=96):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        L = int(torch.randint(1, 14, (1,), generator=g))
        p = torch.randint(3, vocab, (L,), generator=g).tolist()
        if i % 4 == 0:
            p[-1] = vocab - 4 + (i % 3)    # the "next id" chain reaches EOS (2) within a few tokens
        out.append(p)
    return out


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    t, d = make_pair(tmp_path_factory.mktemp("pair"), "mixtral", "llama", seed=5, scale=0.9)
    prompts = ragged_prompts(20, 1)
    return t, d, prompts, hf_greedy(load_hf(t), prompts, MAX_NEW)


def engine_for(t, d, batch, k, m=1, draft_gpu=None, **kw):
    plan = plan_for_checkpoint(t, d, "devbox-2core", batch=batch, draft_len=k, micro_batches=m,
                               draft_kv_gpu_sequences=draft_gpu, expert_cache_slots=kw.pop("slots", None))
    return Engine(plan, t, d, **kw)


def test_reference_is_nontrivial(pair):
    _, _, prompts, ref = pair
    lens = [len(r) for r in ref]
    assert min(lens) < MAX_NEW and max(lens) == MAX_NEW      # some finish early at EOS, some run to the limit
    assert sum(r[-1] == 2 for r in ref) >= 3


@pytest.mark.parametrize("batch,m", [(1, 1), (3, 2), (8, 3), (16, 4)])
def test_greedy_exact_all_k(pair, batch, m):
    t, d, prompts, ref = pair
    eng = engine_for(t, d, batch, 4, m, draft_gpu=batch // 2, slots=[3, 2])
    hists = {}
    for k in range(0, 7):
        r = eng.generate(prompts, max_new_tokens=MAX_NEW, draft_len=k)
        assert r.record.token_flips == 0
        assert [o.token_ids for o in r.outputs] == ref, f"batch {batch}, k {k}"
        assert [o.index for o in r.outputs] == list(range(len(prompts)))
        hists[k] = r.record.acceptance_histogram
        assert r.record.complete and r.record.finished_sequences == len(prompts)
    # acceptance was exercised: rejections at 0, full acceptance, and partial lengths in between
    h = hists[4]
    assert "0" in h and "4" in h and any(str(a) in h for a in (1, 2, 3))


def test_k_changes_between_iterations(pair):
    t, d, prompts, ref = pair
    ks = []

    def policy(info):
        k = (info.iteration * 5 + 3) % 7
        ks.append(k)
        return k

    eng = engine_for(t, d, 6, 2, 2, draft_gpu=3, k_policy=policy, max_k=6)
    r = eng.generate(prompts, max_new_tokens=MAX_NEW)
    assert [o.token_ids for o in r.outputs] == ref
    assert set(ks) >= {0, 1, 3, 6} and len(r.record.draft_len_histogram) >= 4


def test_draft_kv_all_on_host_and_all_on_device(pair):
    t, d, prompts, ref = pair
    for gpu_rows in (0, 5):
        r = engine_for(t, d, 5, 3, 1, draft_gpu=gpu_rows).generate(prompts, max_new_tokens=MAX_NEW)
        assert [o.token_ids for o in r.outputs] == ref
        st = r.record.stages
        assert (st["draft.cpu"] > 0) == (gpu_rows == 0) and (st["draft.gpu"] > 0) == (gpu_rows > 0)


@pytest.mark.parametrize("kind,draft_kind", [("qwen2_moe", "qwen2"), ("qwen3_moe", "qwen3"), ("olmoe", "mistral")])
def test_greedy_exact_other_families(tmp_path, kind, draft_kind):
    t, d = make_pair(tmp_path, kind, draft_kind, seed=8, scale=0.9)
    prompts = ragged_prompts(10, 2)
    ref = hf_greedy(load_hf(t), prompts, 16)
    eng = engine_for(t, d, 4, 3, 2, draft_gpu=2)
    for k in (0, 3, 6):
        r = eng.generate(prompts, max_new_tokens=16, draft_len=k)
        assert r.record.token_flips == 0
        assert [o.token_ids for o in r.outputs] == ref


@pytest.mark.skipif(not have_tiny_pair(), reason="models/tiny-moe and models/tiny-draft not built yet")
def test_trained_tiny_pair_greedy_exact():
    """The trained pair on real text: identical to our k=0 path and to transformers (fp32); any
    position whose top-2 gap is inside float noise is counted as a flip and reported."""
    prompts = tiny_prompts(12)
    plan = plan_for_checkpoint(TINY_MOE, TINY_DRAFT, "devbox-2core", batch=6, draft_len=4, micro_batches=2)
    eng = Engine(plan, TINY_MOE, TINY_DRAFT, dtype="float32")
    base = eng.generate(prompts, max_new_tokens=24, draft_len=0)
    ids = [eng.tokenizer.encode(p) for p in prompts]
    ref = hf_greedy(load_hf(TINY_MOE), ids, 24, eos=eng.eos_ids[0] if eng.eos_ids else None)
    flips = base.record.token_flips
    mism0 = sum(o.token_ids != r for o, r in zip(base.outputs, ref))
    assert mism0 <= flips, f"k=0 differs from transformers on {mism0} prompts with only {flips} flips counted"
    for k in (1, 4, 6):
        r = eng.generate(prompts, max_new_tokens=24, draft_len=k)
        mism = sum(a.token_ids != b.token_ids for a, b in zip(r.outputs, base.outputs))
        assert mism <= r.record.token_flips + flips, f"k={k}: {mism} sequences differ, {r.record.token_flips} flips"
        assert r.record.mean_accepted > 0.5


# ---------------------------------------------------------------------------------------------- sampling
def _exact_marginals(hf, prompt, temperature, V):
    """Exact distributions of generated tokens 1, 2 and 3 under the target at this temperature."""
    with torch.no_grad():
        p1 = torch.softmax(hf(torch.tensor([prompt])).logits[0, -1].double() / temperature, -1)    # [V]
        seq2 = torch.tensor([prompt + [a] for a in range(V)])
        p2_given = torch.softmax(hf(seq2).logits[:, -1].double() / temperature, -1)             # [V, V]
        seq3 = torch.tensor([prompt + [a, b] for a in range(V) for b in range(V)])
        p3_given = torch.softmax(hf(seq3).logits[:, -1].double() / temperature, -1).view(V, V, V)
    p12 = p1[:, None] * p2_given                      # [V, V]
    return p1, p12.sum(0), (p12[:, :, None] * p3_given).sum((0, 1))


def _chi2_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    from scipy.stats import chisquare

    n = counts.sum().item()
    exp = probs * n
    big = exp >= 5
    obs = torch.cat([counts[big].double(), counts[~big].double().sum()[None]])
    ex = torch.cat([exp[big], exp[~big].sum()[None]])
    keep = ex > 0
    return float(chisquare(obs[keep].numpy(), ex[keep].numpy()).pvalue)


@pytest.fixture(scope="module")
def small_vocab_pair(tmp_path_factory):
    V = 16
    t, d = make_pair(tmp_path_factory.mktemp("sv"), "mixtral", "llama", seed=3, scale=1.0, margin=1.5,
                     vocab_size=V, eos_token_id=None)
    return t, d, V


@pytest.mark.parametrize("k", [0, 2])
def test_sampling_matches_target_distribution(small_vocab_pair, k):
    t, d, V = small_vocab_pair
    T, N, prompt = 1.3, 3000, [5, 9, 3]
    hf = load_hf(t)
    exact = _exact_marginals(hf, prompt, T, V)
    eng = engine_for(t, d, 64, k, 2, draft_gpu=32)
    r = eng.generate([prompt] * N, max_new_tokens=3, temperature=T, seed=123, draft_len=k)
    toks = torch.tensor([o.token_ids for o in r.outputs])   # [N, 3]
    assert toks.shape == (N, 3)
    for j in range(3):
        counts = torch.bincount(toks[:, j], minlength=V)
        tv = 0.5 * (counts.double() / N - exact[j]).abs().sum().item()
        p = _chi2_p(counts, exact[j])
        assert p > 1e-3, f"token {j + 1}: chi-square p = {p:.2e}, total variation {tv:.3f}"
        assert tv < 2.0 * (V / N) ** 0.5          # E[TV] <= 0.5 sqrt(V / N); twice that as the bound
    if k > 0:
        assert r.record.mean_accepted > 0.2        # speculation really happened
        # power: the draft's own distribution differs from the target's and the test sees it
        with torch.no_grad():
            q2 = _exact_marginals(load_hf(d), prompt, T, V)[1]
        counts = torch.bincount(toks[:, 1], minlength=V)
        assert 0.5 * (q2 - exact[1]).abs().sum() > 0.05
        assert _chi2_p(counts, q2) < 1e-6
