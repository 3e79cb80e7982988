"""train_tiny.py's acceptance measurement: greedy speculative decoding with the saved pair, the draft
proposing k tokens and the target verifying them in one pass with its KV cache.
"""
from __future__ import annotations

import inspect

import numpy as np
import torch
from tqdm import tqdm

from tiny_data import TrainTinyError

# ----------------------------------------------------------------------------- acceptance


def _forward(model, ids: list[int], cache):
    """Logits [T, V] of `ids` appended to what `cache` holds; the cache grows by len(ids)."""
    # transformers >= 5.24 names the argument `cache` (`past_key_values` is deprecated)
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=torch.tensor([ids]), use_cache=True, **{key: cache})
    return out.logits[0].float()


def _truncate(cache, length: int) -> None:
    """Keep the first `length` positions (crop(-n) removes n in transformers 4.x and 5.x)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def _new_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # transformers 4.x
        return DynamicCache()


@torch.inference_mode()
def greedy_reference(target, prompt_ids: list[int], n: int):
    """Plain greedy decoding, one token per target pass. Returns (tokens, top1-top2 gaps)."""
    cache = _new_cache(target)
    logits = _forward(target, prompt_ids, cache)[-1]
    toks, gaps = [], []
    for _ in range(n):
        top2 = logits.topk(2).values
        gaps.append(float(top2[0] - top2[1]))
        t = int(logits.argmax())
        toks.append(t)
        logits = _forward(target, [t], cache)[-1]
    return toks, gaps


@torch.inference_mode()
def speculative_greedy(target, draft, prompt_ids: list[int], k: int, n: int):
    """Greedy speculative decoding: the draft proposes k tokens, the target checks all k+1
    positions in one pass with its KV cache, the longest agreeing prefix plus the target's
    own next token is kept and both caches roll back the rest. Returns (tokens, accepted,
    proposed, iterations)."""
    if len(prompt_ids) < 2:
        raise TrainTinyError("prompt_ids: need at least 2 tokens (<s> and one more)")
    tc, dc = _new_cache(target), _new_cache(draft)
    _forward(target, prompt_ids[:-1], tc)
    _forward(draft, prompt_ids[:-1], dc)
    last = prompt_ids[-1]
    pending = [last]  # committed tokens the draft cache has not seen yet
    out: list[int] = []
    accepted = proposed = iters = 0
    while len(out) < n:
        d_len = dc.get_seq_length()
        props, feed = [], pending
        for _ in range(k):
            t = int(_forward(draft, feed, dc)[-1].argmax())
            props.append(t)
            feed = [t]
        t_len = tc.get_seq_length()
        g = _forward(target, [last] + props, tc).argmax(-1).tolist()  # [K+1]
        a = 0
        while a < k and props[a] == g[a]:
            a += 1
        out.extend(props[:a] + [g[a]])
        accepted, proposed, iters = accepted + a, proposed + k, iters + 1
        _truncate(tc, t_len + 1 + a)
        _truncate(dc, d_len + len(pending) + a)
        pending = ([props[-1]] if a == k else []) + [g[a]]
        last = g[a]
    return out[:n], accepted, proposed, iters


@torch.inference_mode()
def teacher_forced_matches(draft, prompt_ids: list[int], ref: list[int]) -> list[bool]:
    """matches[i]: the draft's greedy token after prompt + ref[:i] equals ref[i]. When the
    draft's proposals so far all matched, its context equals the target's, so the run
    lengths of `matches` give the greedy acceptance for any k (a cross-check)."""
    ids = torch.tensor([prompt_ids + ref])
    pred = draft(input_ids=ids).logits[0].argmax(-1).tolist()  # [T]
    p = len(prompt_ids)
    return [pred[p - 1 + i] == ref[i] for i in range(len(ref))]


def simulate_acceptance(matches: list[bool], k: int, n: int):
    p = accepted = proposed = iters = 0
    while p < n:
        a = 0
        while a < k and matches[p + a]:
            a += 1
        accepted, proposed, iters = accepted + a, proposed + k, iters + 1
        p += a + 1
    return accepted, proposed, iters


def measure_greedy_acceptance(target, draft, prompts_ids: list[list[int]], ks=range(1, 9),
                              new_tokens: int = 32, progress: bool = True) -> dict:
    """Greedy acceptance per draft length k, measured by running the speculative loop.

    For every prompt: plain greedy decoding of the target (reference, also giving the top-1 vs
    top-2 logit gaps), then for each k the speculative loop; per k it reports
    alpha = accepted / proposed, acc = mean accepted drafts per iteration (the a(k) of the cost
    model), tokens per target pass, mismatches of the speculative output against the plain
    greedy output (float-noise flips), and the teacher-forced cross-check of alpha."""
    ks = list(ks)
    tot = {k: [0, 0, 0] for k in ks}
    sim = {k: [0, 0, 0] for k in ks}
    flips = {k: 0 for k in ks}
    gaps: list[float] = []
    near_ties = []  # (prompt index, step, gap) of greedy steps with a top-2 gap under 1e-3
    extra = max(ks) + 1
    for i, ids in enumerate(tqdm(prompts_ids, desc="acceptance", disable=not progress,
                                 dynamic_ncols=True)):
        ref, g = greedy_reference(target, ids, new_tokens + extra)
        gaps.extend(g[:new_tokens])
        near_ties += [[i, step, gap] for step, gap in enumerate(g[:new_tokens]) if gap < 1e-3]
        matches = teacher_forced_matches(draft, ids, ref)
        for k in ks:
            out, a, p, it = speculative_greedy(target, draft, ids, k, new_tokens)
            flips[k] += int(out != ref[:new_tokens])
            tot[k] = [tot[k][0] + a, tot[k][1] + p, tot[k][2] + it]
            a2, p2, it2 = simulate_acceptance(matches, k, new_tokens)
            sim[k] = [sim[k][0] + a2, sim[k][1] + p2, sim[k][2] + it2]
    gaps_a = np.asarray(gaps)
    per_k = {}
    for k in ks:
        a, p, it = tot[k]
        per_k[str(k)] = {
            "alpha": a / p, "mean_accepted_per_iteration": a / it,
            "tokens_per_target_pass": (a + it) / it, "accepted": a, "proposed": p,
            "iterations": it, "sequences_differing_from_plain_greedy": flips[k],
            "alpha_teacher_forced_check": sim[k][0] / sim[k][1]}
    return {
        "prompts": len(prompts_ids), "new_tokens_per_prompt": new_tokens, "per_k": per_k,
        "greedy_margin": {
            "steps": int(gaps_a.size),
            "fraction_top2_gap_below_1e-3": float((gaps_a < 1e-3).mean()),
            "min_gap": float(gaps_a.min()),
            "p01_gap": float(np.quantile(gaps_a, 0.01)),
            "median_gap": float(np.median(gaps_a)),
            "steps_below_1e-3": near_ties}}
