"""MoE and speculative-decoding ops: torch references and dispatch to the CuPy kernels.

Every op has a plain, vectorised torch reference (``*_reference``), which is also the engine's
CPU path, and a CUDA kernel in ``cuda_kernels/*.cu``. The public functions dispatch on the
tensors' device: CUDA tensors with :func:`runtime.kernels.cuda_ops.cuda_available` -> CuPy
kernel; anything else -> the torch reference (on whatever device the tensors are).

Dimensions:
  T tokens, K experts per token (top-k), N = T*K flat assignments (index t*K + k), E experts,
  H hidden size, M rows, F expert intermediate size,
  B sequences, k draft tokens per sequence (lower-case k), V vocabulary,
  Hq query heads, Hkv KV heads, G = Hq // Hkv, D head dim, R cache rows, S cache capacity,
  L keys attended (max over the batch).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as Fn

from specmoe.runtime.kernels import cuda_ops

__all__ = [
    "KernelInputError",
    "ExpertPermutation",
    "AcceptResult",
    "expert_permutation",
    "expert_permutation_reference",
    "permute_tokens",
    "permute_tokens_reference",
    "unpermute_combine",
    "unpermute_combine_reference",
    "silu_mul",
    "silu_mul_reference",
    "greedy_accept",
    "greedy_accept_reference",
    "rejection_sample_accept",
    "rejection_sample_accept_reference",
    "draw_uniforms",
    "draft_decode_attention",
    "draft_decode_attention_reference",
    "kernel_backends",
]

_FLOAT_DTYPES = (torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)


class KernelInputError(ValueError):
    """A tensor handed to a kernel op has the wrong shape, dtype, device or values."""


class ExpertPermutation(NamedTuple):
    counts: torch.Tensor  # [E] int64: assignments per expert
    offsets: torch.Tensor  # [E+1] int64: exclusive prefix sum of counts
    perm: torch.Tensor  # [N] int64: sorted position -> flat index t*K + k (by expert, stable)
    inv: torch.Tensor  # [N] int64: flat index -> sorted position


class AcceptResult(NamedTuple):
    accepted_len: torch.Tensor  # [B] int64: leading draft tokens accepted (0..k)
    next_token: torch.Tensor  # [B] int64: the correction, or the bonus token when all k were accepted


# ----------------------------------------------------------------------------- validation


def _tensor(name: str, t, ndim: int | None = None, dtypes=None, dims: str = "") -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise KernelInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise KernelInputError(f"{name} must have {ndim} dimensions {dims}, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise KernelInputError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    return t


def _same_device(**tensors: torch.Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise KernelInputError(f"all tensors must be on one device; got {listing}")
    return first


def _use_gpu(device: torch.device) -> bool:
    return device.type == "cuda" and cuda_ops.cuda_available()


def _check_range(name: str, t: torch.Tensor, lo: int, hi: int, what: str) -> None:
    """All values of t in [lo, hi), else KernelInputError (syncs once on a GPU)."""
    if t.numel() == 0:
        return
    mn, mx = (int(v) for v in torch.stack([t.min(), t.max()]).tolist())
    if mn < lo or mx >= hi:
        raise KernelInputError(f"{name} values must be in [{lo}, {hi}) ({what}); found min {mn}, max {mx}")


# ----------------------------------------------------------------------------- permutation


def _check_topk(topk_ids, num_experts) -> torch.Tensor:
    _tensor("topk_ids", topk_ids, 2, _INDEX_DTYPES, "[T, K]")
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
        raise KernelInputError(f"num_experts must be a positive int, got {num_experts!r}")
    if topk_ids.numel() >= 2**31:
        raise KernelInputError(f"topk_ids has {topk_ids.numel()} entries; at most 2**31 - 1 are supported")
    return topk_ids


def expert_permutation_reference(topk_ids: torch.Tensor, num_experts: int) -> ExpertPermutation:
    """Stable counting sort of the flat (token, slot) assignments by expert."""
    _check_topk(topk_ids, num_experts)
    flat = topk_ids.reshape(-1).long()  # [N]
    _check_range("topk_ids", flat, 0, num_experts, "expert ids")
    counts = torch.bincount(flat, minlength=num_experts)  # [E]
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)  # [E+1]
    torch.cumsum(counts, 0, out=offsets[1:])
    perm = torch.sort(flat, stable=True).indices  # [N]
    inv = torch.empty_like(perm)  # [N]
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return ExpertPermutation(counts, offsets, perm, inv)


def expert_permutation(topk_ids: torch.Tensor, num_experts: int, check: bool = True) -> ExpertPermutation:
    """Token-to-expert permutation of topk_ids [T, K] (int32/int64) over num_experts experts.

    On a GPU, ``check=True`` reads back a device flag (one sync) and raises on ids outside
    [0, E); with ``check=False`` such ids are left out silently (inv = -1 there, perm incomplete).
    """
    _check_topk(topk_ids, num_experts)
    if _use_gpu(topk_ids.device):
        counts, offsets, perm, inv, bad = cuda_ops.expert_permutation(topk_ids.contiguous(), num_experts)
        if check and bad():
            _check_range("topk_ids", topk_ids, 0, num_experts, "expert ids")
            raise KernelInputError(f"topk_ids holds expert ids outside [0, {num_experts})")
        return ExpertPermutation(counts, offsets, perm, inv)
    return expert_permutation_reference(topk_ids, num_experts)


def _check_permute(x, perm, top_k) -> None:
    _tensor("x", x, 2, None, "[T, H]")
    _tensor("perm", perm, 1, (torch.int64,), "[N]")
    _same_device(x=x, perm=perm)
    if not isinstance(top_k, int) or top_k < 1:
        raise KernelInputError(f"top_k must be a positive int, got {top_k!r}")
    if perm.numel() != x.shape[0] * top_k:
        raise KernelInputError(
            f"perm must have T*K = {x.shape[0]}*{top_k} = {x.shape[0] * top_k} entries, got {perm.numel()}"
        )


def permute_tokens_reference(x: torch.Tensor, perm: torch.Tensor, top_k: int) -> torch.Tensor:
    """xs[p] = x[perm[p] // K]: tokens gathered into expert order. x [T, H] -> xs [N, H]."""
    _check_permute(x, perm, top_k)
    _check_range("perm", perm, 0, perm.numel(), "flat indices t*K + k")
    return x.index_select(0, torch.div(perm, top_k, rounding_mode="floor"))


def permute_tokens(x: torch.Tensor, perm: torch.Tensor, top_k: int) -> torch.Tensor:
    """Gather x [T, H] into expert order: xs [T*K, H], xs[p] = x[perm[p] // K].

    On a GPU, perm entries outside [0, N) give zero rows (no range check, no sync).
    """
    _check_permute(x, perm, top_k)
    if _use_gpu(x.device) and x.element_size() in (2, 4):
        return cuda_ops.permute_tokens(x.contiguous(), perm.contiguous(), top_k)
    return permute_tokens_reference(x, perm, top_k)


def _check_combine(ys, inv, weights, out_dtype):
    _tensor("ys", ys, 2, _FLOAT_DTYPES, "[N, H]")
    _tensor("inv", inv, 1, (torch.int64,), "[N]")
    _tensor("weights", weights, 2, (torch.float32, torch.bfloat16, torch.float16), "[T, K]")
    _same_device(ys=ys, inv=inv, weights=weights)
    n = weights.shape[0] * weights.shape[1]
    if inv.numel() != n or ys.shape[0] != n:
        raise KernelInputError(
            f"ys [N, H] and inv [N] need N = T*K = {n} (weights {tuple(weights.shape)}); "
            f"got ys {tuple(ys.shape)}, inv {tuple(inv.shape)}"
        )
    out_dtype = ys.dtype if out_dtype is None else out_dtype
    if out_dtype not in _FLOAT_DTYPES:
        raise KernelInputError(f"out_dtype must be bfloat16 or float32, got {out_dtype}")
    return out_dtype


def unpermute_combine_reference(
    ys: torch.Tensor, inv: torch.Tensor, weights: torch.Tensor, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """y[t] = sum_k weights[t, k] * ys[inv[t*K + k]], accumulated in fp32. -> [T, H] out_dtype."""
    out_dtype = _check_combine(ys, inv, weights, out_dtype)
    _check_range("inv", inv, 0, inv.numel(), "sorted positions")
    T, K = weights.shape
    H = ys.shape[1]
    w = weights.float().unsqueeze(1)  # [T, 1, K]
    y = torch.empty(T, H, dtype=out_dtype, device=ys.device)  # [T, H]
    step = max(1, (1 << 24) // max(1, K * H))  # tokens per chunk: <= 64 MB of fp32 gathered rows
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        rows = ys.index_select(0, inv[t0 * K : t1 * K]).float().view(t1 - t0, K, H)  # [t, K, H]
        y[t0:t1] = torch.bmm(w[t0:t1], rows).squeeze(1).to(out_dtype)
    return y


def unpermute_combine(
    ys: torch.Tensor, inv: torch.Tensor, weights: torch.Tensor, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Expert outputs ys [N, H] back to token order with the routing-weighted sum -> y [T, H].

    On a GPU, inv entries outside [0, N) contribute nothing (no range check, no sync).
    """
    out_dtype = _check_combine(ys, inv, weights, out_dtype)
    if _use_gpu(ys.device):
        return cuda_ops.unpermute_combine(ys.contiguous(), inv.contiguous(), weights, out_dtype)
    return unpermute_combine_reference(ys, inv, weights, out_dtype)


# ----------------------------------------------------------------------------- SiLU * mul


def _split_gate_up(gate_or_gate_up, up):
    if up is None:
        gu = _tensor("gate_up", gate_or_gate_up, None, _FLOAT_DTYPES)
        if gu.dim() < 1 or gu.shape[-1] % 2 != 0:
            raise KernelInputError(f"gate_up [..., 2F] must have an even last dimension, got shape {tuple(gu.shape)}")
        f = gu.shape[-1] // 2
        return gu[..., :f], gu[..., f:]
    gate = _tensor("gate", gate_or_gate_up, None, _FLOAT_DTYPES)
    up = _tensor("up", up, None, _FLOAT_DTYPES)
    _same_device(gate=gate, up=up)
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise KernelInputError(
            f"gate and up must have one shape and dtype; got {tuple(gate.shape)} {gate.dtype} "
            f"and {tuple(up.shape)} {up.dtype}"
        )
    return gate, up


def silu_mul_reference(gate_or_gate_up: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up in fp32, rounded once to the input dtype.

    One argument: gate_up [..., 2F] (first half gate, second half up) -> [..., F].
    Two arguments: gate [..., F], up [..., F] -> [..., F].
    """
    gate, up = _split_gate_up(gate_or_gate_up, up)
    return (Fn.silu(gate.float()) * up.float()).to(gate.dtype)


def silu_mul(gate_or_gate_up: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    """Fused SiLU-mul (see silu_mul_reference); the CUDA kernel on a GPU."""
    gate, up_t = _split_gate_up(gate_or_gate_up, up)
    if not _use_gpu(gate.device) or gate.numel() == 0:
        return silu_mul_reference(gate_or_gate_up, up)
    lead, f = gate.shape[:-1], gate.shape[-1]
    if up is None:
        gu = gate_or_gate_up.reshape(-1, 2 * f)
        if gu.stride(-1) != 1:
            gu = gu.contiguous()
        g2, u2 = gu[:, :f], gu[:, f:]  # [M, F] views with row stride gu.stride(0)
    else:
        g2, u2 = gate.reshape(-1, f), up_t.reshape(-1, f)
        g2 = g2 if g2.stride(-1) == 1 else g2.contiguous()
        u2 = u2 if u2.stride(-1) == 1 else u2.contiguous()
    return cuda_ops.silu_mul(g2, u2).view(*lead, f)


# ----------------------------------------------------------------------------- acceptance


def _check_greedy(draft_tokens, target_argmax):
    _tensor("draft_tokens", draft_tokens, 2, (torch.int64,), "[B, k]")
    _tensor("target_argmax", target_argmax, 2, (torch.int64,), "[B, k+1]")
    _same_device(draft_tokens=draft_tokens, target_argmax=target_argmax)
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
    if _use_gpu(draft_tokens.device) and draft_tokens.shape[0] > 0:
        return AcceptResult(*cuda_ops.greedy_accept(draft_tokens.contiguous(), target_argmax.contiguous()))
    return greedy_accept_reference(draft_tokens, target_argmax)


def draw_uniforms(
    batch: int, k: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The randoms rejection_sample_accept takes: u_accept [B, k] and u_sample [B], in [0, 1)."""
    u = torch.rand(batch, k + 1, generator=generator, device=device)  # [B, k+1]
    return u[:, :k].contiguous(), u[:, k].contiguous()


def _check_rejection(draft_tokens, draft_probs, target_probs, u_accept, u_sample):
    _tensor("draft_tokens", draft_tokens, 2, (torch.int64,), "[B, k]")
    _tensor("draft_probs", draft_probs, 3, _FLOAT_DTYPES + (torch.float16, torch.float64), "[B, k, V]")
    _tensor("target_probs", target_probs, 3, _FLOAT_DTYPES + (torch.float16, torch.float64), "[B, k+1, V]")
    _tensor("u_accept", u_accept, 2, (torch.float32,), "[B, k]")
    _tensor("u_sample", u_sample, 1, (torch.float32,), "[B]")
    _same_device(draft_tokens=draft_tokens, draft_probs=draft_probs, target_probs=target_probs,
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
    if _use_gpu(draft_tokens.device) and draft_tokens.shape[0] > 0:
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
    _tensor("q", q, 3, _FLOAT_DTYPES + (torch.float16,), "[B, Hq, D]")
    _tensor("k_cache", k_cache, 4, _FLOAT_DTYPES, "[R, Hkv, S, D]")
    _tensor("v_cache", v_cache, 4, _FLOAT_DTYPES, "[R, Hkv, S, D]")
    _tensor("slots", slots, 1, (torch.int64,), "[B]")
    _tensor("lens", lens, 1, (torch.int64,), "[B]")
    _same_device(q=q, k_cache=k_cache, v_cache=v_cache, slots=slots, lens=lens)
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
    if not _use_gpu(q.device) or q.shape[0] == 0 or d > cuda_ops.DDA_MAX_HEAD_DIM:
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


# ----------------------------------------------------------------------------- backends


def kernel_backends() -> dict[str, str]:
    """Which implementation each op uses for tensors on this machine's default device.

    "cupy-cuda" (the kernels in cuda_kernels/), "torch-cuda" (the references on a GPU, when
    CuPy is missing) or "torch-cpu" (the references, the engine's CPU path).
    """
    if cuda_ops.cuda_available():
        backend = "cupy-cuda"
    elif torch.cuda.is_available():
        backend = "torch-cuda"
    else:
        backend = "torch-cpu"
    ops = (
        "expert_permutation",
        "permute_tokens",
        "unpermute_combine",
        "silu_mul",
        "greedy_accept",
        "rejection_sample_accept",
        "draft_decode_attention",
    )
    return {op: backend for op in ops}
