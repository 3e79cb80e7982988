"""KV caches split by sequence between the device and host memory, and the attention over them.

Layout (the verify kernel's): per layer k, v [R, Hkv, S, D]; a sequence owns one row for its
lifetime. Rows [0, device_rows) live on the device, rows [device_rows, R) in host memory. Lengths
are host integers; rolling back rejected positions only lowers a length (no copy).

Attention dispatch per part (the code path differs even when the "device" is the CPU):
  host part      runtime.kernels.verify_attention_tokens, one call per token count N: it reads q at the
                 sequences' token rows and writes the output at the same rows, in q's dtype (fp32 or
                 bf16), in place when q is in host memory (the pinned path: no gather, cast or scatter);
                 q on a device is staged to the host once per part and the output back once.
  device part    N = 1 and `decode_kernel`: runtime.kernels.moe_ops.draft_decode_attention;
                 otherwise `block_attention_torch` below (plain torch, masked, on the device).

A pass's index tensors (PassLayout.positions / last_token_index, and per cache and model device the
parts' rows, positions and token indices) reach each device in one copy: pinned and non-blocking on
CUDA, no copy on the CPU (upload_int64).

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

ROW_DTYPES = (torch.float32, torch.bfloat16)   # q / output dtypes the verify kernel reads and writes


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
    """Sequences of one part with the same N (host part: or all of them, n their counts): what one
    kernel call needs."""
    n: int | torch.Tensor      # tokens per sequence; a host part of many counts: int64 [Bg] on the host, each
                               # sequence's own (one ragged verify-kernel call)
    local_rows: torch.Tensor   # [Bg] int64 on the part's device
    ctx: torch.Tensor          # [Bg] int64 on the part's device
    max_ctx: int = 0           # max(ctx) as a host int (spares the decode kernel a sync)
    whole: bool = False        # the group is every token of the pass, in order (no gather, no scatter)
    tok_idx: torch.Tensor | None = None   # device part, not whole: [Bg*N] its tokens (model device, b-major)
    first: torch.Tensor | None = None     # host part: [Bg] host, each sequence's first token in the q the kernel
                                          # reads (the pass's tokens with a host model device, else the part's)


@dataclass
class _PartPlan:
    part: int                  # 0 device, 1 host
    rows: torch.Tensor         # [Tp] local row per token (part device)
    pos: torch.Tensor          # [Tp] position per token (part device)
    tok_idx: torch.Tensor | None = None   # [Tp] tokens of this part (model device); None when whole
    groups: list[_Group] = field(default_factory=list)
    whole: bool = False        # the part is every token of the pass, in order (tok_idx = 0..T-1: no gather)
    fresh: bool = False        # host rows in their first pass attending on the model's device (attends_fresh_on)


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
        self._plans: dict[tuple, list[_PartPlan]] = {}             # (cache id, model device) -> its plan
        self._indices: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}   # device -> (positions, last token)

    @property
    def num_seqs(self) -> int:
        return int(self.rows.size)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions [T], last token index [B]) on `device`, both made by one copy, once per device."""
        key = str(device)
        if key not in self._indices:
            pos = np.repeat(self.ctx, self.n) + _within(self.n)
            self._indices[key] = tuple(upload_int64([pos, self.offsets[1:] - 1], torch.device(device)))
        return self._indices[key]

    def positions(self, device: torch.device) -> torch.Tensor:
        """[T] int64."""
        return self._on(device)[0]

    def last_token_index(self, device: torch.device) -> torch.Tensor:
        """[B] index of each sequence's last token."""
        return self._on(device)[1]

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


def _place(o: torch.Tensor, g: "_Group | _PartPlan", q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """The output rows o [Bg*n, Hq, D] of a group (or of a whole KV part) into out [T, Hq, D] (made when
    None) at its tokens; one that is the whole pass is returned as it is when there is no out."""
    o = _like(o, q)
    if g.whole and out is None:
        return o
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if g.whole:
        out.copy_(o)
    else:
        out.index_copy_(0, g.tok_idx, o)
    return out


def _like(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """x on ref's device in ref's dtype (x itself when it is already: no copy, no call)."""
    return x if x.device == ref.device and x.dtype == ref.dtype else x.to(ref.device, ref.dtype)


def upload_int64(arrays: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """int64 host arrays -> tensors on `device`, views of one tensor made by one copy: from pinned memory
    and non-blocking on CUDA (no sync); on the CPU the arrays' concatenation, nothing more."""
    arrays = [np.ascontiguousarray(a, dtype=np.int64).reshape(-1) for a in arrays]
    flat = torch.from_numpy(np.concatenate(arrays))                     # [sum of sizes]
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    elif device.type != "cpu":
        flat = flat.to(device)
    return list(torch.split(flat, [a.size for a in arrays]))


class _Uploads:
    """Host int64 arrays bound for devices: add() returns a slot, run() copies each device's arrays in one
    transfer (upload_int64) and puts each array's tensor in its slot ([0])."""

    def __init__(self):
        self._todo: dict[str, list[tuple[np.ndarray, list]]] = {}

    def add(self, a: np.ndarray, device: torch.device | str) -> list:
        slot = [None]
        self._todo.setdefault(str(device), []).append((a, slot))
        return slot

    def run(self) -> None:
        for dev, items in self._todo.items():
            for (_, slot), t in zip(items, upload_int64([a for a, _ in items], torch.device(dev))):
                slot[0] = t
        self._todo.clear()


class SplitKVCache:
    """K/V of every layer for R sequences; rows [0, device_rows) on `device`, the rest in host memory."""

    # model devices on which host rows attend there in their first pass (attends_fresh_on); tests add "cpu"
    fresh_device_types: tuple[str, ...] = ("cuda",)

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

    def attends_fresh_on(self, layout: PassLayout, model_device: torch.device) -> bool:
        """Whether the pass's host rows attend on the model's device: a first pass (every cached length 0,
        so every key is the pass's own, computed there) with the model on a GPU. A prefill's causal
        attention grows with P^2 per prompt: the GPU's work, as the cost model costs it, where the CPU
        verify kernel would take seconds for long prompts; the new K/V still go to the host rows."""
        return model_device.type in self.fresh_device_types and bool((layout.ctx == 0).all())

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
        """The pass's index tensors for this cache, built once per pass and model device (a plan made for
        one device is never used with tensors of another)."""
        key = (id(self), str(model_device))
        if key not in layout._plans:
            layout._plans[key] = self._build_plan(layout, model_device)
        return layout._plans[key]

    def _build_plan(self, layout: PassLayout, model_device: torch.device) -> list[_PartPlan]:
        rows, ctx, n = layout.rows, layout.ctx, layout.n                 # [B] int64 each
        off = layout.offsets[:-1]                                        # [B] first token of each sequence
        over = np.flatnonzero(ctx + n > self.capacity)
        if over.size:
            b = int(over[0])
            raise RuntimeError(f"KV row {rows[b]}: {ctx[b]}+{n[b]} positions exceed the capacity {self.capacity}")
        up, specs = _Uploads(), []
        on_dev = rows < self.device_rows
        fresh = self.attends_fresh_on(layout, model_device)
        for p in (0, 1):
            dev = self.part_devices[p]
            seqs = np.flatnonzero(on_dev if p == 0 else ~on_dev)        # [B_p] in pass order
            if not seqs.size:
                continue
            whole = seqs.size == rows.size
            lr = rows[seqs] - (0 if p == 0 else self.device_rows)        # [B_p] rows local to the part
            ns, w = n[seqs], _within(n[seqs])                            # [B_p], [T_p]
            first = off[seqs] if model_device.type == "cpu" else np.cumsum(ns) - ns   # [B_p] q rows (host part)
            sizes = np.unique(ns)                                        # ascending token counts
            groups = []
            kernel = p == 1 and not fresh    # host rows the verify kernel attends
            if kernel and sizes.size > 1:    # host rows of many counts: one ragged kernel call
                groups.append(dict(n=up.add(ns, "cpu"), local_rows=up.add(lr, dev), ctx=up.add(ctx[seqs], dev),
                                   max_ctx=int(ctx[seqs].max()), first=up.add(first, "cpu")))
                sizes = sizes[:0]
            for nv in sizes:
                sel = ns == nv
                bs = seqs[sel]                                           # [B_g]
                g = dict(n=int(nv), local_rows=up.add(lr[sel], dev), ctx=up.add(ctx[bs], dev),
                         max_ctx=int(ctx[bs].max()), whole=whole and sizes.size == 1)
                if kernel:
                    g["first"] = up.add(first[sel], "cpu")
                elif not g["whole"]:
                    g["tok_idx"] = up.add((off[bs][:, None] + np.arange(nv)[None, :]).reshape(-1), model_device)
                groups.append(g)
            specs.append(dict(part=p, whole=whole, fresh=p == 1 and fresh, rows=up.add(np.repeat(lr, ns), dev),
                              groups=groups,
                              pos=up.add(np.repeat(ctx[seqs], ns) + w, dev),
                              tok_idx=None if whole else up.add(np.repeat(off[seqs], ns) + w, model_device)))
        up.run()
        t = lambda x: x[0] if isinstance(x, list) else x  # noqa: E731  a slot -> its tensor
        return [_PartPlan(**{k: t(v) for k, v in sp.items() if k != "groups"},
                          groups=[_Group(**{k: t(v) for k, v in g.items()}) for g in sp["groups"]]) for sp in specs]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PassLayout,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """Write the pass's new k, v [T, Hkv, D] at their positions, attend q [T, Hq, D] -> [T, Hq, D] (q's
        dtype, on q's device). out: where to write it (e.g. a pinned buffer of the caller's); else one is made
        unless a whole-pass result can be returned as it is."""
        plans = self._plan(layout, q.device)
        for pp in plans:
            kc, vc = self.k[pp.part][layer], self.v[pp.part][layer]
            kc[pp.rows, :, pp.pos] = _like(k if pp.whole else k.index_select(0, pp.tok_idx), kc)
            vc[pp.rows, :, pp.pos] = _like(v if pp.whole else v.index_select(0, pp.tok_idx), vc)
        for pp in plans:
            if pp.fresh:
                out = self._attend_fresh(q, k, v, pp, out)
            else:
                out = (self._attend_host if pp.part == 1 else self._attend_device)(layer, q, pp, out)
        return out if out is not None else torch.empty(q.shape, dtype=q.dtype, device=q.device)

    def _attend_device(self, layer: int, q: torch.Tensor, pp: _PartPlan, out: torch.Tensor | None) -> torch.Tensor:
        """Device rows: per group the decode kernel or block_attention_torch; -> out (None only for a whole
        part: then the group's result itself when it is the only one)."""
        from specmoe.runtime.kernels.speculative_ops import draft_decode_attention

        _, Hq, D = q.shape
        kc, vc = self.k[0][layer], self.v[0][layer]
        for g in pp.groups:
            Bg = g.local_rows.shape[0]
            qg = q.contiguous() if g.whole else q.index_select(0, g.tok_idx)  # [Bg*N, Hq, D]
            if g.n == 1 and self.decode_kernel:
                o = draft_decode_attention(qg.view(Bg, Hq, D), kc, vc, g.local_rows, g.ctx + 1, scale=self.scale,
                                           max_len=g.max_ctx + 1 if kc.device.type == "cuda" else None)
            else:
                o = block_attention_torch(qg.view(Bg, g.n, Hq, D), kc, vc, g.local_rows, g.ctx, self.scale,
                                          max_ctx=g.max_ctx)
            out = _place(o.reshape(Bg * g.n, Hq, D), g, q, out)
            if g.whole:
                return out
        return out

    def _attend_fresh(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pp: _PartPlan,
                      out: torch.Tensor | None) -> torch.Tensor:
        """Host rows in their first pass on the model's device (attends_fresh_on): per group of one prompt
        length, causal attention over the group's own k, v [Bg*n, Hkv, D] as they came, read as a cache of Bg
        rows -> out (None only for a whole part, as _attend_device)."""
        _, Hq, D = q.shape
        for g in pp.groups:
            Bg, n = g.local_rows.shape[0], g.n
            qg, kg, vg = (x if g.whole else x.index_select(0, g.tok_idx) for x in (q, k, v))
            kc, vc = (x.reshape(Bg, n, -1, D).transpose(1, 2) for x in (kg, vg))      # [Bg, Hkv, n, D] views
            rows = torch.arange(Bg, device=q.device)
            o = block_attention_torch(qg.reshape(Bg, n, Hq, D), kc, vc, rows, torch.zeros_like(rows), self.scale,
                                      max_ctx=0)
            out = _place(o.reshape(Bg * n, Hq, D), g, q, out)
            if g.whole:
                return out
        return out

    def _attend_host(self, layer: int, q: torch.Tensor, pp: _PartPlan, out: torch.Tensor | None) -> torch.Tensor:
        """Host rows: the verify kernel per group. q in host memory (fp32/bf16): read in place and written
        in place into out; q on a device: the part's tokens staged to the host once, the output back once."""
        from specmoe.runtime.kernels.verify_attention import verify_attention_tokens

        kc, vc = self.k[1][layer], self.v[1][layer]
        in_place = q.device.type == "cpu" and q.dtype in ROW_DTYPES
        if in_place:
            qh = q
            oh = out if out is not None else torch.empty(q.shape, dtype=q.dtype)   # [T, Hq, D]
        else:   # [T_p, Hq, D] the part's tokens (the pass's when q is on the host: `first` counts those)
            dt = q.dtype if q.dtype in ROW_DTYPES else torch.float32
            qh = (q if pp.whole or q.device.type == "cpu" else q.index_select(0, pp.tok_idx)).to("cpu", dt)
            oh = torch.empty(qh.shape, dtype=dt, pin_memory=q.device.type == "cuda")
        for g in pp.groups:
            verify_attention_tokens(qh, kc, vc, g.local_rows, g.ctx, g.first, g.n, oh, scale=self.scale,
                                    num_threads=torch.get_num_threads())
        if in_place:
            return oh
        if q.device.type == "cpu" and not pp.whole:     # a dtype the kernel lacks: oh holds the pass's rows
            oh = oh.index_select(0, pp.tok_idx)
        return _place(oh.to(q.device, q.dtype, non_blocking=q.device.type == "cuda"), pp, q, out)   # [T_p, Hq, D]
