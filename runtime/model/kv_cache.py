"""KV caches split by sequence between the device and host memory, and the attention over them.

Layout (the verify kernel's): per layer k, v [R, Hkv, S, D]; a sequence owns one row for its
lifetime. Rows [0, device_rows) live on the device, rows [device_rows, R) in host memory. Lengths
are host integers; rolling back rejected positions only lowers a length (no copy).

Attention dispatch per part (the code path differs even when the "device" is the CPU):
  host part      runtime.kernels.verify_attention (any N new tokens per sequence)
  device part    N = 1 and `decode_kernel`: runtime.kernels.moe_ops.draft_decode_attention;
                 otherwise `block_attention_torch` below (plain torch, masked, on the device).

Dimensions: T tokens of a pass, B sequences, N new tokens per sequence, Hq/Hkv heads, D head dim,
R rows, S capacity, L keys.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from specmoe.planner.memory import ATTN_CHUNK_ELEMS, row_positions

from specmoe.runtime.device import host_empty


def block_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, rows: torch.Tensor,
                          ctx: torch.Tensor, scale: float, max_ctx: int | None = None) -> torch.Tensor:
    """q [B, N, Hq, D] against rows of k/v_cache [R, Hkv, S, D]; query i of b sees keys 0..ctx[b]+i.
    -> [B, N, Hq, D] fp32. The N new keys must already be written. max_ctx: max(ctx) when the caller
    knows it as a host int (spares a device sync)."""
    B, N, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    g = Hq // Hkv
    out = torch.empty(B, N, Hq, D, dtype=torch.float32, device=q.device)  # [B, N, Hq, D]
    if B == 0:
        return out
    L = (int(ctx.max()) if max_ctx is None else int(max_ctx)) + N
    qi = torch.arange(N, device=q.device)
    keys = torch.arange(L, device=q.device)
    # sequences per chunk: <= ATTN_CHUNK_ELEMS fp32 elements of K and of the scores (planner/memory.py counts it)
    step = max(1, ATTN_CHUNK_ELEMS // max(1, Hkv * L * max(D, g * N)))
    for b0 in range(0, B, step):
        b1 = min(B, b0 + step)
        kk = k_cache[:, :, :L].index_select(0, rows[b0:b1]).float()  # [b, Hkv, L, D]
        vv = v_cache[:, :, :L].index_select(0, rows[b0:b1]).float()  # [b, Hkv, L, D]
        qq = q[b0:b1].float().permute(0, 2, 1, 3).reshape(b1 - b0, Hkv, g * N, D)  # [b, Hkv, g*N, D]
        s = torch.matmul(qq, kk.transpose(-1, -2)) * scale  # [b, Hkv, g*N, L]
        lim = ctx[b0:b1, None] + qi[None, :]  # [b, N] last visible key
        mask = keys[None, None, :] > lim[:, :, None]  # [b, N, L]
        s = s.view(b1 - b0, Hkv, g, N, L).masked_fill(mask[:, None, None], float("-inf"))
        o = torch.matmul(s.softmax(-1).view(b1 - b0, Hkv, g * N, L), vv)  # [b, Hkv, g*N, D]
        out[b0:b1] = o.view(b1 - b0, Hq, N, D).permute(0, 2, 1, 3)
    return out


def kv_capacity(longest_prompt: int, max_new_tokens: int, max_k: int) -> int:
    """KV positions a row needs for these prompts: the planner's row_positions (one rule for both)."""
    return row_positions(int(longest_prompt) + int(max_new_tokens), max_k)


@dataclass
class _Group:
    """Sequences of one part with the same N: what one kernel call needs."""
    n: int
    local_rows: torch.Tensor   # [Bg] int64 on the part's device
    ctx: torch.Tensor          # [Bg] int64 on the part's device
    tok_idx: torch.Tensor      # [Bg*N] int64 on the model device (token order b-major)
    max_ctx: int = 0           # max(ctx) as a host int (spares the decode kernel a sync)
    whole: bool = False        # the group is every token of the pass, in order (tok_idx = 0..T-1: no gather)


@dataclass
class _PartPlan:
    part: int                  # 0 device, 1 host
    tok_idx: torch.Tensor      # [Tp] tokens of this part (model device)
    rows: torch.Tensor         # [Tp] local row per token (part device)
    pos: torch.Tensor          # [Tp] position per token (part device)
    groups: list[_Group] = field(default_factory=list)
    whole: bool = False        # the part is every token of the pass, in order (tok_idx = 0..T-1: no gather)


class PassLayout:
    """Which sequences a forward pass covers: KV row, cached length before the pass, new tokens each.

    Tokens of the pass are sequence-major: sequence b owns tokens offsets[b] .. offsets[b+1]-1,
    at positions ctx[b] .. ctx[b]+n[b]-1.
    """

    def __init__(self, rows, ctx, n):
        """rows, ctx, n: [B] sequences of ints (lists or numpy arrays), kept as int64 arrays."""
        self.rows = np.asarray(rows, dtype=np.int64).reshape(-1)   # [B]
        self.ctx = np.asarray(ctx, dtype=np.int64).reshape(-1)     # [B]
        self.n = np.asarray(n, dtype=np.int64).reshape(-1)         # [B]
        assert self.rows.size == self.ctx.size == self.n.size
        self.offsets = np.zeros(self.n.size + 1, dtype=np.int64)   # [B+1]
        np.cumsum(self.n, out=self.offsets[1:])
        self._plans: dict[int, list[_PartPlan]] = {}

    @property
    def num_seqs(self) -> int:
        return int(self.rows.size)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def positions(self, device: torch.device) -> torch.Tensor:
        """[T] int64."""
        return torch.from_numpy(np.repeat(self.ctx, self.n) + _within(self.n)).to(device)

    def last_token_index(self, device: torch.device) -> torch.Tensor:
        """[B] index of each sequence's last token."""
        return torch.from_numpy(self.offsets[1:] - 1).to(device)

    def split(self, m: int) -> list[tuple["PassLayout", int, int]]:
        """m micro-batches of consecutive sequences: (layout, first token, end token)."""
        B = self.num_seqs
        m = max(1, min(m, B))
        out = []
        for j in range(m):
            s0, s1 = (B * j) // m, (B * (j + 1)) // m
            sub = PassLayout(self.rows[s0:s1], self.ctx[s0:s1], self.n[s0:s1])
            out.append((sub, int(self.offsets[s0]), int(self.offsets[s1])))
        return out


def _within(n: np.ndarray) -> np.ndarray:
    """[sum n] each token's index inside its own sequence: 0..n[0]-1, 0..n[1]-1, ..."""
    total = int(n.sum())
    return np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(n) - n, n)


def _tensor(a: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device)


class SplitKVCache:
    """K/V of every layer for R sequences; rows [0, device_rows) on `device`, the rest in host memory."""

    def __init__(self, num_layers: int, rows: int, device_rows: int, num_kv_heads: int, capacity: int, head_dim: int,
                 device: torch.device, device_dtype: torch.dtype, host_dtype: torch.dtype, decode_kernel: bool,
                 scale: float | None = None):
        self.num_layers, self.rows, self.device_rows = num_layers, rows, max(0, min(device_rows, rows))
        self.capacity, self.head_dim, self.num_kv_heads = capacity, head_dim, num_kv_heads
        self.device = device
        self.decode_kernel = decode_kernel
        self.scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
        self.lens = np.zeros(rows, dtype=np.int64)   # [R] valid positions per row (host integers)
        host = torch.device("cpu")
        nd, nh = self.device_rows, rows - self.device_rows
        self.part_devices = (device, host)
        self.k: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        self.v: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        for _ in range(num_layers):
            for p, (n, dt, dev) in enumerate(((nd, device_dtype, device), (nh, host_dtype, host))):
                shape = (max(n, 1), num_kv_heads, capacity, head_dim)  # [R_part, Hkv, S, D]
                if n == 0:
                    self.k[p].append(None)  # type: ignore[arg-type]
                    self.v[p].append(None)  # type: ignore[arg-type]
                elif dev.type == "cpu":
                    self.k[p].append(host_empty(shape, dt, pin=False).zero_())
                    self.v[p].append(host_empty(shape, dt, pin=False).zero_())
                else:
                    self.k[p].append(torch.zeros(shape, dtype=dt, device=dev))
                    self.v[p].append(torch.zeros(shape, dtype=dt, device=dev))

    @staticmethod
    def bytes_needed(num_layers: int, rows: int, num_kv_heads: int, capacity: int, head_dim: int, elem_bytes: int) -> int:
        return 2 * num_layers * rows * num_kv_heads * capacity * head_dim * elem_bytes

    def part_of(self, row: int) -> tuple[int, int]:
        return (0, row) if row < self.device_rows else (1, row - self.device_rows)

    # ---- lengths: commit and roll back ----
    def commit(self, layout: PassLayout) -> None:
        self.lens[layout.rows] = layout.ctx + layout.n

    def set_len(self, row: int, length: int) -> None:
        """Roll back (or forward, after a commit) to `length` valid positions."""
        assert 0 <= length <= self.capacity
        self.lens[row] = length

    def set_lens(self, rows: np.ndarray, lengths: np.ndarray) -> None:
        """set_len for many rows at once: rows, lengths [B] int64."""
        lengths = np.asarray(lengths, dtype=np.int64)
        assert lengths.size == 0 or (lengths.min() >= 0 and lengths.max() <= self.capacity)
        self.lens[np.asarray(rows, dtype=np.int64)] = lengths

    # ---- attention ----
    def _plan(self, layout: PassLayout, model_device: torch.device) -> list[_PartPlan]:
        key = id(self)
        if key in layout._plans:
            return layout._plans[key]
        plans = []
        rows = np.asarray(layout.rows, dtype=np.int64)       # [B]
        ctx = np.asarray(layout.ctx, dtype=np.int64)         # [B]
        n = np.asarray(layout.n, dtype=np.int64)             # [B]
        off = np.asarray(layout.offsets[:-1], dtype=np.int64)  # [B] first token of each sequence
        over = np.flatnonzero(ctx + n > self.capacity)
        if over.size:
            b = int(over[0])
            raise RuntimeError(f"KV row {layout.rows[b]}: {layout.ctx[b]}+{layout.n[b]} positions exceed the "
                               f"capacity {self.capacity}")
        on_dev = rows < self.device_rows
        for p in (0, 1):
            dev = self.part_devices[p]
            seqs = np.flatnonzero(on_dev if p == 0 else ~on_dev)    # [B_p] in pass order
            if not seqs.size:
                continue
            lr = rows[seqs] - (0 if p == 0 else self.device_rows)    # [B_p] rows local to the part
            ns, w = n[seqs], _within(n[seqs])                        # [B_p], [T_p]
            pp = _PartPlan(p, _tensor(np.repeat(off[seqs], ns) + w, model_device), _tensor(np.repeat(lr, ns), dev),
                           _tensor(np.repeat(ctx[seqs], ns) + w, dev), whole=seqs.size == rows.size)
            sizes = np.unique(ns)                                    # ascending token counts
            for nv in sizes:
                sel = ns == nv
                bs = seqs[sel]                                       # [B_g]
                idx = (off[bs][:, None] + np.arange(nv)[None, :]).reshape(-1)   # [B_g * nv]
                pp.groups.append(_Group(int(nv), _tensor(lr[sel], dev), _tensor(ctx[bs], dev),
                                        _tensor(idx, model_device), int(ctx[bs].max()), pp.whole and sizes.size == 1))
            plans.append(pp)
        layout._plans[key] = plans
        return plans

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PassLayout) -> torch.Tensor:
        """Write the pass's new k, v [T, Hkv, D] at their positions, attend q [T, Hq, D] -> [T, Hq, D] (q's dtype)."""
        from specmoe.runtime.kernels.speculative_ops import draft_decode_attention
        from specmoe.runtime.kernels.verify_attention import verify_attention

        T, Hq, D = q.shape
        plans = self._plan(layout, q.device)
        whole = len(plans) == 1 and len(plans[0].groups) == 1 and plans[0].groups[0].whole
        # one part with one group of every token in order (the common decode pass): no gathers, no scatter
        out = None if whole else torch.empty(T, Hq, D, dtype=q.dtype, device=q.device)  # [T, Hq, D]
        for pp in plans:
            kc, vc = self.k[pp.part][layer], self.v[pp.part][layer]
            dev = kc.device
            kc[pp.rows, :, pp.pos] = (k if pp.whole else k.index_select(0, pp.tok_idx)).to(dev, kc.dtype)
            vc[pp.rows, :, pp.pos] = (v if pp.whole else v.index_select(0, pp.tok_idx)).to(dev, vc.dtype)
            for g in pp.groups:
                Bg = g.local_rows.shape[0]
                qg = q.contiguous() if g.whole else q.index_select(0, g.tok_idx)  # [Bg*N, Hq, D]
                if pp.part == 1:   # host memory: the CPU verify kernel
                    o = verify_attention(qg.to("cpu", torch.float32).view(Bg, g.n, Hq, D).contiguous(), kc, vc,
                                         g.local_rows, g.ctx, scale=self.scale, num_threads=torch.get_num_threads())
                elif g.n == 1 and self.decode_kernel:
                    o = draft_decode_attention(qg.view(Bg, Hq, D), kc, vc, g.local_rows, g.ctx + 1, scale=self.scale,
                                               max_len=g.max_ctx + 1 if dev.type == "cuda" else None)
                else:
                    o = block_attention_torch(qg.view(Bg, g.n, Hq, D), kc, vc, g.local_rows, g.ctx, self.scale,
                                              max_ctx=g.max_ctx)
                o = o.reshape(Bg * g.n, Hq, D).to(q.device, q.dtype)
                if whole:
                    return o
                out.index_copy_(0, g.tok_idx, o)
        return out
