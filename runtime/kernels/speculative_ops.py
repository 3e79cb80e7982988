"""Speculative-decoding ops: greedy and rejection-sampling acceptance of the draft tokens, and the
draft's single-query decode attention over its KV cache, as torch references and dispatch to the
CuPy kernels (the same scheme as runtime/kernels/moe_ops.py: a ``*_reference`` beside every op,
which is also the engine's CPU path; CUDA tensors go to the kernels in ``cuda_kernels/*.cu``).

Dimensions:
  B sequences, k draft tokens per sequence (lower-case k), V vocabulary,
  Hq query heads, Hkv KV heads, G = Hq // Hkv, D head dim, R cache rows, S cache capacity,
  L keys attended (max over the batch).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from specmoe.runtime.kernels import cuda_ops
from specmoe.runtime.kernels.checks import FLOAT_DTYPES, KernelInputError, check_tensor, same_device, use_gpu


class AcceptResult(NamedTuple):
    accepted_len: torch.Tensor  # [B] int64: leading draft tokens accepted (0..k)
    next_token: torch.Tensor  # [B] int64: the correction, or the bonus token when all k were accepted


# ----------------------------------------------------------------------------- acceptance


def _check_greedy(draft_tokens, target_argmax):
    check_tensor("draft_tokens", draft_tokens, 2, (torch.int64,), "[B, k]")
    check_tensor("target_argmax", target_argmax, 2, (torch.int64,), "[B, k+1]")
    same_device(draft_tokens=draft_tokens, target_argmax=target_argmax)
    b, k = draft_tokens.shape
    if tuple(target_argmax.shape) != (b, k + 1):
        raise KernelInputError(
            f"target_argmax must be [B, k+1] = [{b}, {k + 1}] for draft_tokens {tuple(draft_tokens.shape)}, "
            f"got {tuple(target_argmax.shape)}"
        )


def greedy_accept_reference(draft_tokens: torch.Tensor, target_argmax: torch.Tensor) -> AcceptResult:
    """Accept the longest prefix of draft_tokens [B, k] matching target_argmax [B, k+1]."""
    _check_greedy(draft_tokens, target_argmax)
    k = draft_tokens.shape[1]
    match = (draft_tokens == target_argmax[:, :k]).long()  # [B, k]
    accepted = match.cumprod(1).sum(1)  # [B]
    return AcceptResult(accepted, target_argmax.gather(1, accepted.unsqueeze(1)).squeeze(1))


def greedy_accept(draft_tokens: torch.Tensor, target_argmax: torch.Tensor) -> AcceptResult:
    """Greedy acceptance: accepted_len [B] and next_token = target_argmax[b, accepted_len[b]]."""
    _check_greedy(draft_tokens, target_argmax)
    if use_gpu(draft_tokens.device) and draft_tokens.shape[0] > 0:
        return AcceptResult(*cuda_ops.greedy_accept(draft_tokens.contiguous(), target_argmax.contiguous()))
    return greedy_accept_reference(draft_tokens, target_argmax)


def draw_uniforms(
    batch: int, k: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The randoms rejection_sample_accept takes: u_accept [B, k] and u_sample [B], in [0, 1)."""
    u = torch.rand(batch, k + 1, generator=generator, device=device)  # [B, k+1]
    return u[:, :k].contiguous(), u[:, k].contiguous()


def _check_rejection(draft_tokens, draft_probs, target_probs, u_accept, u_sample):
    check_tensor("draft_tokens", draft_tokens, 2, (torch.int64,), "[B, k]")
    check_tensor("draft_probs", draft_probs, 3, FLOAT_DTYPES + (torch.float16, torch.float64), "[B, k, V]")
    check_tensor("target_probs", target_probs, 3, FLOAT_DTYPES + (torch.float16, torch.float64), "[B, k+1, V]")
    check_tensor("u_accept", u_accept, 2, (torch.float32,), "[B, k]")
    check_tensor("u_sample", u_sample, 1, (torch.float32,), "[B]")
    same_device(draft_tokens=draft_tokens, draft_probs=draft_probs, target_probs=target_probs,
                 u_accept=u_accept, u_sample=u_sample)
    b, k = draft_tokens.shape
    v = target_probs.shape[2]
    expect = {
        "draft_probs": (draft_probs, (b, k, v)),
        "target_probs": (target_probs, (b, k + 1, v)),
        "u_accept": (u_accept, (b, k)),
        "u_sample": (u_sample, (b,)),
    }
    for name, (t, shape) in expect.items():
        if tuple(t.shape) != shape:
            raise KernelInputError(f"{name} must have shape {list(shape)} (B, k, V from draft_tokens and "
                                   f"target_probs), got {tuple(t.shape)}")
    if v < 1:
        raise KernelInputError("target_probs must have a vocabulary dimension V >= 1")


def rejection_sample_accept_reference(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    u_accept: torch.Tensor,
    u_sample: torch.Tensor,
) -> AcceptResult:
    """Speculative sampling (Leviathan et al. 2023) with the randoms passed in.

    Draft token j (x = draft_tokens[b, j]) is accepted when u_accept[b, j] * q(x) < p(x), i.e. with
    probability min(1, p/q). At the first rejection n the next token is drawn from
    norm(max(0, p[n] - q[n])) (p[n] itself if that is all zero); if all k were accepted, the bonus
    token is drawn from p[k]. A draw is the inverse CDF (fp64) at u_sample[b] * total mass: the
    first token whose cumulative mass exceeds it (never a token of zero mass).
    """
    _check_rejection(draft_tokens, draft_probs, target_probs, u_accept, u_sample)
    b, k = draft_tokens.shape
    v = target_probs.shape[2]
    valid = (draft_tokens >= 0) & (draft_tokens < v)  # [B, k] an impossible token is rejected
    x = draft_tokens.clamp(0, v - 1).unsqueeze(2)  # [B, k, 1]
    qx = draft_probs.float().gather(2, x).squeeze(2)  # [B, k]
    px = target_probs[:, :k].float().gather(2, x).squeeze(2)  # [B, k]
    accept = (u_accept * qx < px) & valid  # [B, k]
    n = accept.long().cumprod(1).sum(1)  # [B] accepted_len
    rows = torch.arange(b, device=draft_tokens.device)
    p_n = target_probs[rows, n].float()  # [B, V]
    q_n = draft_probs[rows, n.clamp(max=max(k - 1, 0))].float() if k > 0 else torch.zeros_like(p_n)
    q_n = q_n * (n < k).unsqueeze(1)  # the bonus draw (n == k) is from p alone
    res = (p_n - q_n).clamp_min(0).double()  # [B, V]
    res_total = res.sum(1, keepdim=True)  # [B, 1]
    dist = torch.where(res_total > 0, res, p_n.double())  # [B, V]
    cdf = dist.cumsum(1)  # [B, V]
    thr = u_sample.double().unsqueeze(1) * cdf[:, -1:]  # [B, 1]
    tok = torch.searchsorted(cdf, thr, right=True).squeeze(1)  # [B] first index with cdf > thr
    last_pos = (v - 1) - (dist > 0).flip(1).long().argmax(1)  # [B] last index with mass
    tok = torch.minimum(tok, last_pos)  # thr >= total (u just under 1): the last token with mass
    return AcceptResult(n, tok)


def rejection_sample_accept(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    u_accept: torch.Tensor,
    u_sample: torch.Tensor,
) -> AcceptResult:
    """Rejection-sampling acceptance (see the reference). On a GPU: the CUDA kernel (fp32 probs).

    The kernel sums the CDF in another order than torch.cumsum, so where u_sample lands within
    rounding (~1e-12 of the mass) of a CDF step the two may pick neighbouring tokens.
    """
    _check_rejection(draft_tokens, draft_probs, target_probs, u_accept, u_sample)
    if use_gpu(draft_tokens.device) and draft_tokens.shape[0] > 0:
        return AcceptResult(
            *cuda_ops.rejection_sample_accept(
                draft_tokens.contiguous(),
                draft_probs.float().contiguous(),
                target_probs.float().contiguous(),
                u_accept.contiguous(),
                u_sample.contiguous(),
            )
        )
    return rejection_sample_accept_reference(draft_tokens, draft_probs, target_probs, u_accept, u_sample)


# ----------------------------------------------------------------------------- draft attention


def _check_attention(q, k_cache, v_cache, slots, lens, scale):
    check_tensor("q", q, 3, FLOAT_DTYPES + (torch.float16,), "[B, Hq, D]")
    check_tensor("k_cache", k_cache, 4, FLOAT_DTYPES, "[R, Hkv, S, D]")
    check_tensor("v_cache", v_cache, 4, FLOAT_DTYPES, "[R, Hkv, S, D]")
    check_tensor("slots", slots, 1, (torch.int64,), "[B]")
    check_tensor("lens", lens, 1, (torch.int64,), "[B]")
    same_device(q=q, k_cache=k_cache, v_cache=v_cache, slots=slots, lens=lens)
    b, hq, d = q.shape
    if k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
        raise KernelInputError(f"k_cache and v_cache must match; got {tuple(k_cache.shape)} {k_cache.dtype} "
                               f"and {tuple(v_cache.shape)} {v_cache.dtype}")
    _, hkv, _, dk = k_cache.shape
    if dk != d:
        raise KernelInputError(f"head dim of q ({d}) and of the cache ({dk}) differ")
    if hkv < 1 or hq % hkv != 0:
        raise KernelInputError(f"query heads Hq={hq} must be a multiple of KV heads Hkv={hkv} (GQA)")
    if slots.shape[0] != b or lens.shape[0] != b:
        raise KernelInputError(f"slots and lens must be [B] = [{b}], got {tuple(slots.shape)}, {tuple(lens.shape)}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise KernelInputError(f"scale must be a positive finite number, got {scale!r}")


def _attention_stats(k_cache, slots, lens) -> int:
    """Validate slots and lens against the cache (one sync on a GPU); return max(lens)."""
    if lens.numel() == 0:
        return 0
    r, _, s, _ = k_cache.shape
    smin, smax, lmin, lmax = (int(v) for v in torch.stack([slots.min(), slots.max(), lens.min(), lens.max()]).tolist())
    if smin < 0 or smax >= r:
        raise KernelInputError(f"slots must be cache rows in [0, {r}); found min {smin}, max {smax}")
    if lmin < 1 or lmax > s:
        raise KernelInputError(f"lens must be in [1, {s}] (keys incl. the new one, <= capacity S); "
                               f"found min {lmin}, max {lmax}")
    return lmax


def draft_decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    lens: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """out[b, h] = softmax(q[b, h] . K[slot_b, h // G, :len_b] * scale) @ V[...], fp32 -> [B, Hq, D]."""
    _check_attention(q, k_cache, v_cache, slots, lens, scale)
    b, hq, d = q.shape
    hkv = k_cache.shape[1]
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    out = torch.empty(b, hq, d, dtype=torch.float32, device=q.device)  # [B, Hq, D]
    lmax = _attention_stats(k_cache, slots, lens)
    if b == 0:
        return out
    qf = q.float().view(b, hkv, g, d) * scale  # [B, Hkv, G, D]
    kv_view_k, kv_view_v = k_cache[:, :, :lmax], v_cache[:, :, :lmax]  # [R, Hkv, L, D] views
    pos = torch.arange(lmax, device=q.device)  # [L]
    step = max(1, (1 << 24) // max(1, hkv * lmax * d))  # sequences per chunk: <= 64 MB per fp32 K/V
    for b0 in range(0, b, step):
        b1 = min(b, b0 + step)
        kk = kv_view_k.index_select(0, slots[b0:b1]).float()  # [b, Hkv, L, D]
        vv = kv_view_v.index_select(0, slots[b0:b1]).float()  # [b, Hkv, L, D]
        scores = torch.matmul(qf[b0:b1], kk.transpose(-1, -2))  # [b, Hkv, G, L]
        masked = (pos.unsqueeze(0) >= lens[b0:b1].unsqueeze(1)).view(b1 - b0, 1, 1, lmax)  # [b, 1, 1, L]
        probs = torch.softmax(scores.masked_fill(masked, float("-inf")), dim=-1)
        out[b0:b1] = torch.matmul(probs, vv).view(b1 - b0, hq, d)
    return out


def draft_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    lens: torch.Tensor,
    scale: float | None = None,
    max_len: int | None = None,
) -> torch.Tensor:
    """Single-query decode attention over the draft's KV cache (GQA) -> [B, Hq, D] fp32.

    q [B, Hq, D]; k_cache, v_cache [R, Hkv, S, D] (bf16/fp32, unit stride over D); slots [B] cache
    rows; lens [B] valid keys including the new one (already written). ``scale`` defaults to
    1/sqrt(D). On a GPU, pass ``max_len`` (>= max(lens), a host int) to skip the one sync that
    validates slots/lens; rows with bad slot/len then come out NaN instead of raising.
    """
    _check_attention(q, k_cache, v_cache, slots, lens, scale)
    d = q.shape[2]
    if not use_gpu(q.device) or q.shape[0] == 0 or d > cuda_ops.DDA_MAX_HEAD_DIM:
        return draft_decode_attention_reference(q, k_cache, v_cache, slots, lens, scale)
    if max_len is None:
        max_len = _attention_stats(k_cache, slots, lens)
    elif not isinstance(max_len, int) or not 1 <= max_len <= k_cache.shape[2]:
        raise KernelInputError(f"max_len must be an int in [1, S={k_cache.shape[2]}], got {max_len!r}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        k_cache = k_cache if k_cache.stride(-1) == 1 else k_cache.contiguous()
        v_cache = v_cache if v_cache.stride(-1) == 1 else v_cache.contiguous()
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    return cuda_ops.draft_decode_attention(
        q.float().contiguous(), k_cache, v_cache, slots.contiguous(), lens.contiguous(), scale, max_len
    )
