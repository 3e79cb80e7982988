"""The routed experts of a layer whose weights all sit in host memory, in a few calls instead of a GEMM
chain per expert.

Three ways to run them, all over the layer's stacked weights (gate_up [E, 2F, H], down [E, H, F]: views
of the store's host rows, never copied):

  padded      every expert's rows padded with zeros to the largest count, two batched GEMMs (torch.bmm)
              over [E, n_max, .]: a fixed number of calls whatever the routing, paying for the padding rows
  grouped     two torch._grouped_mm calls over the rows grouped by expert: no padding, but on a CPU torch
              runs one GEMM per expert inside, each with its own fixed cost
  per-expert  one GEMM pair per touched expert (TargetModel's loop; also the path of experts on a GPU)

`host_experts_path` picks one per layer and pass from the routing counts: padded while the work its
padding adds costs less than the GEMM calls it saves. SPECMOE_HOST_EXPERTS=padded|grouped|per-expert
forces one (grouped falls back to per-expert where torch has no grouped GEMM that matches it bit for bit).

Dimensions: T tokens, K experts per token, N = T*K, E experts, H hidden size, F expert intermediate size,
n_max the largest count of rows of one expert.
"""
from __future__ import annotations

import os
from itertools import accumulate

import torch
import torch.nn.functional as Fn

from specmoe.runtime.kernels.checks import KernelInputError
from specmoe.runtime.kernels.moe_ops import silu_mul_reference

HOST_EXPERTS_ENV = "SPECMOE_HOST_EXPERTS"
HOST_EXPERT_PATHS = ("auto", "padded", "grouped", "per-expert")

# The fixed cost of one GEMM call on a CPU expressed as arithmetic: about 10 us of call, thread wake-up and
# packing against about 100 GFLOP/s for these small fp32 GEMMs on the 2-core dev box (both scale together
# across CPUs, so their product moves less than either). Measured there as a break-even: on an 8-expert
# layer (H 128, F 256, 16 tokens top-2) the padded GEMMs stopped paying at about 3.5x the mean count on
# the busiest expert, 80 padding rows against 16 calls.
GEMM_CALL_FLOP = 1e6


def expert_ffn_reference(xs: torch.Tensor, counts: list[int], gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """xs [N, H] grouped by expert (counts[e] rows of expert e, in order), gate_up [E, 2F, H], down [E, H, F]
    -> [N, H]: down_e . silu_mul(gate_up_e . x) for each row x of expert e, one GEMM pair per expert."""
    ys = torch.empty_like(xs)
    for e, (seg, yseg) in enumerate(zip(torch.split(xs, counts), torch.split(ys, counts))):
        if seg.shape[0]:
            yseg.copy_(Fn.linear(silu_mul_reference(Fn.linear(seg, gate_up[e])), down[e]))
    return ys


def expert_ffn_grouped(xs: torch.Tensor, counts: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """expert_ffn_reference in two grouped GEMMs (torch._grouped_mm) over every expert, counts [E] a tensor on
    the weights' device: 4 operations instead of 4 per expert."""
    offs = torch.cumsum(counts, 0, dtype=torch.int32)                          # [E] end row of each group
    g = torch._grouped_mm(xs, gate_up.transpose(1, 2), offs=offs)              # [N, 2F]
    return torch._grouped_mm(silu_mul_reference(g), down.transpose(1, 2), offs=offs)    # [N, H]


def expert_ffn_padded(x: torch.Tensor, topk_ids: torch.Tensor, perm: torch.Tensor, inv: torch.Tensor,
                      counts: list[int], gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Every expert's FFN over its rows of x [T, H] in two batched GEMMs over rows padded to n_max.

    topk_ids [T, K]; perm and inv [N] (sorted position <-> flat index t*K + k) of the layer's
    ExpertPermutation; counts its counts as host ints. -> ys [N, H] in expert order, row for row what
    expert_ffn_reference gives for the permuted tokens (up to the GEMMs' rounding), so unpermute_combine
    takes it as it takes the grouped path's."""
    E, H = gate_up.shape[0], x.shape[1]
    T, K = topk_ids.shape
    n_max = max(counts, default=0)
    if len(counts) != E or inv.numel() != T * K or perm.numel() != T * K:
        raise KernelInputError(f"counts ({len(counts)}) must have one entry per expert ({E}) and perm, inv "
                               f"({perm.numel()}, {inv.numel()}) one per assignment ({T * K})")
    if n_max == 0:
        return x.new_zeros(0, H)
    start = accumulate(counts[:-1], initial=0)   # host ints: expert e's first sorted position
    # sorted position p of expert e -> padded row e * n_max + (p - start[e]) = p + shift[e]
    shift = torch.tensor([e * n_max - s for e, s in enumerate(start)], device=x.device)      # [E]
    slot = inv + shift[topk_ids.reshape(-1)]                                     # [N] flat -> padded row
    xp = x.new_zeros(E * n_max, H)
    xp[slot.view(T, K)] = x.unsqueeze(1)                                         # [E*n_max, H], x broadcast over K
    g = torch.bmm(xp.view(E, n_max, H), gate_up.transpose(1, 2))                 # [E, n_max, 2F]
    y = torch.bmm(silu_mul_reference(g), down.transpose(1, 2)).view(E * n_max, H)   # [E*n_max, H]
    return y.index_select(0, slot[perm])                                         # [N, H] in expert order


_grouped_ok: dict[tuple, bool] = {}


def grouped_mm_supported(dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether expert_ffn_grouped runs here for `dtype` and gives bit for bit what the per-expert GEMMs give
    (probed once per dtype and device on an uneven split with empty experts)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    key = (dtype, str(torch.device(device)))
    if key not in _grouped_ok:
        gen = torch.Generator().manual_seed(0)
        counts = [3, 0, 7, 1, 0, 5]                                            # E = 6, N = 16, H = 24, F = 40
        xs, gu, dn = (torch.randn(*s, generator=gen).to(dtype=dtype, device=device)
                      for s in ((16, 24), (6, 80, 24), (6, 24, 40)))
        try:
            got = expert_ffn_grouped(xs, torch.tensor(counts, device=device), gu, dn)
            _grouped_ok[key] = bool(torch.equal(got, expert_ffn_reference(xs, counts, gu, dn)))
        except (RuntimeError, NotImplementedError, TypeError):
            _grouped_ok[key] = False
    return _grouped_ok[key]


def host_experts_path(counts: list[int], hidden: int, intermediate: int, dtype: torch.dtype,
                      device: torch.device | str) -> str:
    """"padded", "grouped" or "per-expert" for one layer's routing counts [E] (host ints).

    padded when the arithmetic of its padding rows, (E * n_max - N) rows of 6 H F FLOPs, costs less than
    the GEMM calls the grouped path would issue (two per touched expert, GEMM_CALL_FLOP each)."""
    mode = os.environ.get(HOST_EXPERTS_ENV, "auto")
    if mode not in HOST_EXPERT_PATHS:
        raise ValueError(f"{HOST_EXPERTS_ENV}={mode!r}: expected one of {', '.join(HOST_EXPERT_PATHS)}")
    if mode == "auto":
        n, touched = sum(counts), sum(1 for c in counts if c)
        pad_rows = len(counts) * max(counts, default=0) - n
        mode = "padded" if pad_rows * 6 * hidden * intermediate <= 2 * touched * GEMM_CALL_FLOP else "grouped"
    if mode == "grouped" and not grouped_mm_supported(dtype, device):
        return "per-expert"
    return mode
