"""MoE ops: the token-to-expert permutation, the gather into expert order, the weighted combine back
to token order and the fused SiLU-mul, as torch references and dispatch to the CuPy kernels.

Every op has a plain, vectorised torch reference (``*_reference``), which is also the engine's
CPU path, and a CUDA kernel in ``cuda_kernels/*.cu``. The public functions dispatch on the
tensors' device: CUDA tensors with :func:`runtime.kernels.cuda_ops.cuda_available` -> CuPy
kernel; anything else -> the torch reference (on whatever device the tensors are).

The speculative-decoding ops (acceptance, the draft's decode attention) live in
runtime/kernels/speculative_ops.py; this module also exports them, so that `moe_ops` is the one
namespace of every kernel op (`kernel_backends` lists them all).

Dimensions:
  T tokens, K experts per token (top-k), N = T*K flat assignments (index t*K + k), E experts,
  H hidden size, M rows, F expert intermediate size,
  B sequences, k draft tokens per sequence (lower-case k), V vocabulary,
  Hq query heads, Hkv KV heads, G = Hq // Hkv, D head dim, R cache rows, S cache capacity,
  L keys attended (max over the batch).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as Fn

from specmoe.runtime.kernels import cuda_ops
from specmoe.runtime.kernels.checks import (FLOAT_DTYPES, INDEX_DTYPES, KernelInputError, check_range, check_tensor,
                                            same_device, use_gpu)
from specmoe.runtime.kernels.speculative_ops import (AcceptResult, draft_decode_attention,
                                                     draft_decode_attention_reference, draw_uniforms, greedy_accept,
                                                     greedy_accept_reference, rejection_sample_accept,
                                                     rejection_sample_accept_reference)

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


class ExpertPermutation(NamedTuple):
    counts: torch.Tensor  # [E] int64: assignments per expert
    offsets: torch.Tensor  # [E+1] int64: exclusive prefix sum of counts
    perm: torch.Tensor  # [N] int64: sorted position -> flat index t*K + k (by expert, stable)
    inv: torch.Tensor  # [N] int64: flat index -> sorted position


# ----------------------------------------------------------------------------- permutation


def _check_topk(topk_ids, num_experts) -> torch.Tensor:
    check_tensor("topk_ids", topk_ids, 2, INDEX_DTYPES, "[T, K]")
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
        raise KernelInputError(f"num_experts must be a positive int, got {num_experts!r}")
    if topk_ids.numel() >= 2**31:
        raise KernelInputError(f"topk_ids has {topk_ids.numel()} entries; at most 2**31 - 1 are supported")
    return topk_ids


def expert_permutation_reference(topk_ids: torch.Tensor, num_experts: int, check: bool = True) -> ExpertPermutation:
    """Stable counting sort of the flat (token, slot) assignments by expert. check=False skips the range check
    (its min/max and read-back) for ids known to be in range, such as a router's top-k."""
    _check_topk(topk_ids, num_experts)
    flat = topk_ids.reshape(-1).long()  # [N]
    if check:
        check_range("topk_ids", flat, 0, num_experts, "expert ids")
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
    On the CPU, ``check=False`` leaves ids outside [0, E) to torch's own errors or to longer counts.
    """
    _check_topk(topk_ids, num_experts)
    if use_gpu(topk_ids.device):
        counts, offsets, perm, inv, bad = cuda_ops.expert_permutation(topk_ids.contiguous(), num_experts)
        if check and bad():
            check_range("topk_ids", topk_ids, 0, num_experts, "expert ids")
            raise KernelInputError(f"topk_ids holds expert ids outside [0, {num_experts})")
        return ExpertPermutation(counts, offsets, perm, inv)
    return expert_permutation_reference(topk_ids, num_experts, check)


def _check_permute(x, perm, top_k) -> None:
    check_tensor("x", x, 2, None, "[T, H]")
    check_tensor("perm", perm, 1, (torch.int64,), "[N]")
    same_device(x=x, perm=perm)
    if not isinstance(top_k, int) or top_k < 1:
        raise KernelInputError(f"top_k must be a positive int, got {top_k!r}")
    if perm.numel() != x.shape[0] * top_k:
        raise KernelInputError(
            f"perm must have T*K = {x.shape[0]}*{top_k} = {x.shape[0] * top_k} entries, got {perm.numel()}"
        )


def permute_tokens_reference(x: torch.Tensor, perm: torch.Tensor, top_k: int) -> torch.Tensor:
    """xs[p] = x[perm[p] // K]: tokens gathered into expert order. x [T, H] -> xs [N, H]."""
    _check_permute(x, perm, top_k)
    check_range("perm", perm, 0, perm.numel(), "flat indices t*K + k")
    return x.index_select(0, torch.div(perm, top_k, rounding_mode="floor"))


def permute_tokens(x: torch.Tensor, perm: torch.Tensor, top_k: int) -> torch.Tensor:
    """Gather x [T, H] into expert order: xs [T*K, H], xs[p] = x[perm[p] // K].

    On a GPU, perm entries outside [0, N) give zero rows (no range check, no sync).
    """
    _check_permute(x, perm, top_k)
    if use_gpu(x.device) and x.element_size() in (2, 4):
        return cuda_ops.permute_tokens(x.contiguous(), perm.contiguous(), top_k)
    return permute_tokens_reference(x, perm, top_k)


def _check_combine(ys, inv, weights, out_dtype):
    check_tensor("ys", ys, 2, FLOAT_DTYPES, "[N, H]")
    check_tensor("inv", inv, 1, (torch.int64,), "[N]")
    check_tensor("weights", weights, 2, (torch.float32, torch.bfloat16, torch.float16), "[T, K]")
    same_device(ys=ys, inv=inv, weights=weights)
    n = weights.shape[0] * weights.shape[1]
    if inv.numel() != n or ys.shape[0] != n:
        raise KernelInputError(
            f"ys [N, H] and inv [N] need N = T*K = {n} (weights {tuple(weights.shape)}); "
            f"got ys {tuple(ys.shape)}, inv {tuple(inv.shape)}"
        )
    out_dtype = ys.dtype if out_dtype is None else out_dtype
    if out_dtype not in FLOAT_DTYPES:
        raise KernelInputError(f"out_dtype must be bfloat16 or float32, got {out_dtype}")
    return out_dtype


def unpermute_combine_reference(
    ys: torch.Tensor, inv: torch.Tensor, weights: torch.Tensor, out_dtype: torch.dtype | None = None,
    check: bool = True,
) -> torch.Tensor:
    """y[t] = sum_k weights[t, k] * ys[inv[t*K + k]], accumulated in fp32. -> [T, H] out_dtype.
    check=False skips the range check of inv (an ExpertPermutation's own inv is in range)."""
    out_dtype = _check_combine(ys, inv, weights, out_dtype)
    if check:
        check_range("inv", inv, 0, inv.numel(), "sorted positions")
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
    ys: torch.Tensor, inv: torch.Tensor, weights: torch.Tensor, out_dtype: torch.dtype | None = None,
    check: bool = True,
) -> torch.Tensor:
    """Expert outputs ys [N, H] back to token order with the routing-weighted sum -> y [T, H].

    On a GPU, inv entries outside [0, N) contribute nothing (no range check, no sync); on the CPU they raise
    (KernelInputError, or torch's IndexError with check=False).
    """
    out_dtype = _check_combine(ys, inv, weights, out_dtype)
    if use_gpu(ys.device):
        return cuda_ops.unpermute_combine(ys.contiguous(), inv.contiguous(), weights, out_dtype)
    return unpermute_combine_reference(ys, inv, weights, out_dtype, check)


# ----------------------------------------------------------------------------- SiLU * mul


def _split_gate_up(gate_or_gate_up, up):
    if up is None:
        gu = check_tensor("gate_up", gate_or_gate_up, None, FLOAT_DTYPES)
        if gu.dim() < 1 or gu.shape[-1] % 2 != 0:
            raise KernelInputError(f"gate_up [..., 2F] must have an even last dimension, got shape {tuple(gu.shape)}")
        f = gu.shape[-1] // 2
        return gu[..., :f], gu[..., f:]
    gate = check_tensor("gate", gate_or_gate_up, None, FLOAT_DTYPES)
    up = check_tensor("up", up, None, FLOAT_DTYPES)
    same_device(gate=gate, up=up)
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
    if gate.dtype == torch.float32:   # already fp32: no dtype round trips to dispatch
        return Fn.silu(gate) * up
    return (Fn.silu(gate.float()) * up.float()).to(gate.dtype)


def silu_mul(gate_or_gate_up: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    """Fused SiLU-mul (see silu_mul_reference); the CUDA kernel on a GPU."""
    gate, up_t = _split_gate_up(gate_or_gate_up, up)
    if not use_gpu(gate.device) or gate.numel() == 0:
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
