"""The target MoE model's forward, split into the design's stages.

Per layer: `pre_attn` (RMSNorm, QKV, QK-norm, rotary), `attention` (write K/V into the KV cache and
attend: the CPU verify kernel for host-memory rows), `post_attn` (o_proj + residual, RMSNorm,
router softmax/top-k, Qwen2-MoE's shared expert with its sigmoid gate), `moe` (routed experts
grouped by expert through the permutation, SwiGLU, weighted combine, residual); then `lm_head`.
`forward` runs one pass through the micro-batch pipeline: per layer, pre_attn/attention/post_attn
per micro-batch (the next micro-batch's pre_attn is issued before this one's CPU attention, and
the experts a micro-batch routes to start streaming as soon as its routing is known), then moe
over the tokens of all micro-batches. With the "next" streaming schedule (the default on CUDA:
Engine(prefetch_next_layer=None)) layer i+1's non-resident experts stream while layer i computes
(double buffering: two buffers alternate between consecutive streaming layers), the first two
streaming layers' at the end of a pass (one per buffer), and pre_attn/post_attn run once per layer
over all tokens.

Dimensions: T tokens, B sequences, H hidden, Hq/Hkv heads, D head dim, E experts, K top-k,
F expert intermediate, V vocab.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as Fn

from specmoe.planner.stages import Stage

from specmoe.runtime.model.expert_store import ExpertStore
from specmoe.runtime.model.kv_cache import PassLayout, SplitKVCache
from specmoe.runtime.model.layers import AttnWeights, Rotary, dense_mlp, load_attention, load_mlp, qkv, rms_norm
from specmoe.runtime.run_record import StageTimer
from specmoe.runtime.weights.sources import WeightSource


@dataclass
class _Layer:
    attn: AttnWeights
    in_norm: torch.Tensor
    post_norm: torch.Tensor
    router: torch.Tensor | None = None          # [E, H]
    shared: tuple | None = None                 # (gate_up [2I, H], down [H, I], None, None)
    shared_gate: torch.Tensor | None = None     # [1, H]
    dense: tuple | None = None                  # dense FFN of a non-MoE layer, as `shared`


@dataclass
class _Routed:
    """post_attn's output for one micro-batch."""
    x: torch.Tensor            # [t, H] normed input of the FFN
    ids: torch.Tensor | None   # [t, K] int64
    w: torch.Tensor | None     # [t, K]
    extra: torch.Tensor | None  # [t, H] shared-expert output (gated) or dense FFN output


@dataclass
class _Pass:
    """What every layer of one forward pass shares."""
    mode: str                       # one of STREAM_MODES
    mbs: list                       # layout.split(micro_batches): (sub-layout, start, end) per micro-batch
    cos: torch.Tensor               # [T, D]
    sin: torch.Tensor               # [T, D]
    cs: list                        # (cos, sin) of each micro-batch's tokens
    kv: SplitKVCache
    timer: StageTimer
    host_io: str                    # one of HOST_IO
    next_streaming: dict[int, int]  # streaming layer -> the streaming layer after it
    record_routing: bool
    layout: PassLayout | None = None   # the whole pass (host_io pinned/zero-copy: one attention call per layer)


class TargetModel:
    def __init__(self, src: WeightSource, store: ExpertStore | None, device: torch.device, dtype: torch.dtype):
        c = src.config
        self.config, self.device, self.dtype, self.store = c, device, dtype, store
        if c.is_moe and store is None:
            raise ValueError("a MoE target needs an ExpertStore")
        get = lambda n: src.tensor(n).to(device=device, dtype=dtype)  # noqa: E731
        self.embed = get("model.embed_tokens.weight")  # [V, H]
        self.norm = get("model.norm.weight")
        self.lm_head_w = self.embed if c.tie_word_embeddings else get("lm_head.weight")  # [V, H]
        self.rotary = Rotary(c, device)
        self.host_io = "direct"        # see HOST_IO; set by the Engine
        self._io = HostIO(device)
        self.last_hidden: torch.Tensor | None = None   # [T, H] of the last forward(keep_hidden=True)
        self.layers: list[_Layer] = []
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            L = _Layer(load_attention(get, p + "self_attn.", c), get(p + "input_layernorm.weight"),
                       get(p + "post_attention_layernorm.weight"))
            if c.layer_is_moe(i):
                L.router = src.router(i).to(device=device, dtype=dtype)
                if c.shared_intermediate:
                    L.shared = load_mlp(get, p + "mlp.shared_expert.")
                    L.shared_gate = get(p + "mlp.shared_expert_gate.weight")
            else:
                L.dense = load_mlp(get, p + "mlp.")
            self.layers.append(L)
            src.release()          # layer by layer: the source keeps nothing of what is in place

    # ---- stages ----
    def pre_attn(self, layer: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """h [t, H] -> q [t, Hq, D], k, v [t, Hkv, D]."""
        L = self.layers[layer]
        return qkv(L.attn, self.config, rms_norm(h, L.in_norm, self.config.rms_eps), cos, sin)

    def post_attn(self, layer: int, h: torch.Tensor, o: torch.Tensor) -> tuple[torch.Tensor, _Routed]:
        """h [t, H] residual, o [t, Hq, D] attention output -> (h + o_proj(o), routing of the FFN input)."""
        c, L = self.config, self.layers[layer]
        h = h + Fn.linear(o.reshape(o.shape[0], -1), L.attn.o, L.attn.ob)  # [t, H]
        x = rms_norm(h, L.post_norm, c.rms_eps)
        if L.dense is not None:
            return h, _Routed(x, None, None, dense_mlp(x, *L.dense))
        probs = torch.softmax(Fn.linear(x, L.router).float(), dim=-1)  # [t, E]
        w, ids = torch.topk(probs, c.top_k, dim=-1)  # [t, K]
        if c.norm_topk_prob:
            w = w / w.sum(dim=-1, keepdim=True)
        if c.family != "mixtral":
            w = w.to(x.dtype)
        extra = None
        if L.shared is not None:
            extra = torch.sigmoid(Fn.linear(x, L.shared_gate)) * dense_mlp(x, *L.shared)
        return h, _Routed(x, ids, w, extra)

    def moe(self, layer: int, h: torch.Tensor, r: _Routed) -> torch.Tensor:
        """Routed experts over all tokens of the pass, grouped by expert; returns the new residual h [T, H]."""
        from specmoe.runtime.kernels.host_experts import host_experts_path
        from specmoe.runtime.kernels.moe_ops import expert_permutation, permute_tokens, unpermute_combine

        if r.ids is None:
            return h + r.extra
        c = self.config
        perm = expert_permutation(r.ids, c.num_experts, check=False)   # top-k ids: no range-check sync
        counts = perm.counts.tolist()           # one sync; expert e's tokens follow those of experts < e
        touched = [e for e, n in enumerate(counts) if n]
        stacked = self.store.stacked(layer)     # every expert's weights in host rows, or None
        path = "per-expert" if stacked is None else host_experts_path(counts, c.hidden, c.moe_intermediate,
                                                                      r.x.dtype, stacked[0].device)
        if path == "per-expert":
            ys = self._moe_per_expert(layer, permute_tokens(r.x, perm.perm, c.top_k), counts, touched)
        else:
            ys = self._moe_host(layer, r, perm, counts, touched, path, *stacked)
        out = unpermute_combine(ys, perm.inv, r.w, out_dtype=h.dtype, check=False)  # [T, H]: inv is perm's own
        h = h + out
        return h if r.extra is None else h + r.extra

    def _moe_per_expert(self, layer: int, xs: torch.Tensor, counts: list[int], touched: list[int]) -> torch.Tensor:
        """One GEMM pair per touched expert over its rows of xs [T*K, H] (grouped by expert) -> ys [T*K, H]."""
        from specmoe.runtime.kernels.moe_ops import silu_mul

        ys = torch.empty_like(xs)               # [T*K, H]
        segs, ysegs = torch.split(xs, counts), torch.split(ys, counts)   # E views each [counts[e], H], one op each
        resident = self.store.slot_of[layer]
        # resident experts first: their compute overlaps the streamed experts' copies
        for e in sorted(touched, key=lambda e: e not in resident):
            gate_up, down, on_host = self.store.weights(layer, e)
            if on_host:
                ysegs[e].copy_(Fn.linear(silu_mul(Fn.linear(segs[e].to("cpu"), gate_up)), down))
            else:
                ysegs[e].copy_(Fn.linear(silu_mul(Fn.linear(segs[e], gate_up)), down))
        return ys

    def _moe_host(self, layer: int, r: _Routed, perm, counts: list[int], touched: list[int], path: str,
                  gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        """Every expert of the layer in a fixed number of calls over its stacked host weights (gate_up
        [E, 2F, H], down [E, H, F]), "padded" or "grouped" (host_experts_path) -> ys [T*K, H] in expert order."""
        from specmoe.runtime.kernels.host_experts import expert_ffn_grouped, expert_ffn_padded
        from specmoe.runtime.kernels.moe_ops import permute_tokens

        w = gate_up.device      # the host when the layer's experts run on the CPU beside a GPU
        for e in touched:          # the store's bookkeeping of each expert used (streamed copies, waits)
            self.store.weights(layer, e)
        here = r.x.device == w
        move = (lambda t: t) if here else (lambda t: t.to(w))   # noqa: E731 (no-op .to calls are ops too)
        if path == "padded":
            ys = expert_ffn_padded(move(r.x), move(r.ids), move(perm.perm), move(perm.inv), counts, gate_up, down)
        else:
            ys = expert_ffn_grouped(move(permute_tokens(r.x, perm.perm, self.config.top_k)), move(perm.counts),
                                    gate_up, down)
        return ys if here else ys.to(r.x.device)

    def lm_head(self, h: torch.Tensor) -> torch.Tensor:
        """h [t, H] -> logits [t, V] fp32."""
        return Fn.linear(rms_norm(h, self.norm, self.config.rms_eps), self.lm_head_w).float()

    # ---- one pass ----
    def _prefetch_next(self, layer: int, x: torch.Tensor) -> None:
        """Mode "predict": predict layer+1's experts by its router on layer's FFN input x [T, H]; stream them."""
        c, store, nxt = self.config, self.store, layer + 1
        if nxt >= c.num_layers or not store.streams(nxt):
            return
        pred = torch.topk(Fn.linear(x, self.layers[nxt].router), c.top_k, dim=-1).indices  # [T, K]
        if store.begin_layer(nxt, ahead=True):
            store.fetch(nxt, torch.unique(pred).tolist())

    def _layer_batched(self, i: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mbs, kv: SplitKVCache,
                       timer: StageTimer, host_io: str,
                       layout: PassLayout | None = None) -> tuple[torch.Tensor, _Routed]:
        """pre_attn over all T tokens, attention per micro-batch, post_attn over all tokens -> (h [T, H], routing).
        host_io "pinned"/"zero-copy" (every KV row of the pass in host memory): q/k/v cross to the host in one
        copy into one pinned buffer, the verify kernel reads them there and writes its output into one pinned
        buffer at the tokens' rows, one call per layer over the whole `layout`, and the output comes back once
        (a pinned copy, or a GPU kernel reading the pinned buffer: no copy engine, so it never queues behind
        expert copies)."""
        with timer.stage(Stage.TARGET_PRE_ATTN):
            q, k, v = self.pre_attn(i, h, cos, sin)
        if host_io != "direct":
            with timer.stage(Stage.TARGET_ATTENTION):
                q, k, v = self._io.to_host_qkv(q, k, v)       # views of one pinned buffer [T, Hq+2Hkv, D]
                self._io.wait()
                o = kv.attend(i, q, k, v, layout, out=self._io.out_buffer(q.shape, q.dtype))
                o = self._io.to_device(o, zero_copy=host_io == "zero-copy")
            with timer.stage(Stage.TARGET_POST_ATTN):
                return self.post_attn(i, h, o)
        outs = []
        sizes = [e - s for _, s, e in mbs]
        with timer.stage(Stage.TARGET_ATTENTION):     # each micro-batch's q, k, v: one split op each, not m slices
            qs, ks, vs = (torch.split(x, sizes) if len(mbs) > 1 else (x,) for x in (q, k, v))
        for j, (sub, _, _) in enumerate(mbs):
            with timer.stage(Stage.TARGET_ATTENTION):
                outs.append(kv.attend(i, qs[j], ks[j], vs[j], sub))
        with timer.stage(Stage.TARGET_ATTENTION):
            o = torch.cat(outs) if len(outs) > 1 else outs[0]   # [T, Hq, D]
        with timer.stage(Stage.TARGET_POST_ATTN):
            return self.post_attn(i, h, o)

    def forward(self, tokens: torch.Tensor, layout: PassLayout, kv: SplitKVCache, timer: StageTimer,
                micro_batches: int = 1, logits: str = "all", record_routing: bool = False,
                prefetch: bool | str = False, keep_hidden: bool = False) -> torch.Tensor:
        """tokens [T] int64 (device), sequence-major per `layout` -> logits fp32 [T, V] ("all") or [B, V] ("last").
        keep_hidden: keep the final-normed hidden state of every token, the LM head's input, as
        `self.last_hidden` [T, H] (the features an EAGLE head reads).

        K/V of the pass are written at the layout's positions; the caller commits or rolls back lengths.
        prefetch (when experts stream), see STREAM_MODES: "off"/False: a layer's experts stream once its
        routing is known; "next"/True: all non-resident experts of the next streaming layer stream while
        this layer computes, and the first two streaming layers' at the end of the pass (over lm_head,
        acceptance and the next draft phase), and as no copy waits for routing, pre_attn and post_attn run
        once per layer over all tokens (attention per micro-batch, or in one call per layer where every KV
        row is in host memory and host_io is pinned / zero-copy); "predict": layer i+1's experts predicted
        by its router on layer i's input.
        """
        mode = stream_mode(prefetch)
        streaming = self._begin_pass(mode, timer)
        mbs = layout.split(micro_batches)
        host_io = self.host_io if (mode == "next" and bool((layout.rows >= kv.device_rows).all())
                                   and not kv.attends_fresh_on(layout, self.device)) else "direct"
        with timer.stage(Stage.TARGET_PRE_ATTN):
            h = self.embed.index_select(0, tokens)  # [T, H]
            cos, sin = self.rotary.cos_sin(layout.positions(self.device), self.dtype)  # [T, D]
            cs = [(cos[s:e], sin[s:e]) for _, s, e in mbs]
        ps = _Pass(mode, mbs, cos, sin, cs, kv, timer, host_io, dict(zip(streaming, streaming[1:])), record_routing,
                   layout=layout)
        for i in range(self.config.num_layers):
            h = self._layer(i, h, ps)
        self._end_pass(mode, streaming, timer)
        with timer.stage(Stage.TARGET_LM_HEAD):
            if keep_hidden:     # norm every token once; the logits read the same normed rows
                h = self.last_hidden = rms_norm(h, self.norm, self.config.rms_eps)   # [T, H]
            if logits == "last":
                h = h.index_select(0, layout.last_token_index(self.device))
            out = Fn.linear(h, self.lm_head_w).float() if keep_hidden else self.lm_head(h)
        return out

    def _begin_pass(self, mode: str, timer: StageTimer) -> list[int]:
        """Tag the pass's copies with its phase and set up the expert streams; returns the streaming layers."""
        store = self.store
        streaming = store.streaming_layers if store is not None else []
        if store is not None:
            store.ledger.tag = timer.phase    # copies issued by this pass count in its phase
        if streaming:
            store.drop_streams(keep=streaming[:2] if mode == "next" else ())   # leftovers of an interrupted pass
            if mode == "next":
                for layer in streaming[:2]:
                    store.prefetch_layer(layer)
        return streaming

    def _layer(self, i: int, h: torch.Tensor, ps: _Pass) -> torch.Tensor:
        """One layer of the pass: attention (batched or pipelined per micro-batch), then the MoE -> h [T, H]."""
        store = self.store
        moe_layer = self.config.layer_is_moe(i)
        if moe_layer:
            store.begin_layer(i)
            if ps.mode == "next" and i in ps.next_streaming:
                store.prefetch_layer(ps.next_streaming[i])   # its buffer's last reader (layer i-1) is issued
        need_fetch = moe_layer and not store.fully_streamed(i)
        if ps.mode == "next" and not need_fetch:
            # nothing waits for this layer's routing: the GPU stages run once over all tokens (2 calls
            # per layer instead of 2m), the CPU attention per micro-batch (pinned host I/O: once)
            h, r = self._layer_batched(i, h, ps.cos, ps.sin, ps.mbs, ps.kv, ps.timer, ps.host_io, ps.layout)
            if moe_layer and ps.record_routing:
                store.record_routing(i, r.ids)
        else:
            h, r = self._layer_pipelined(i, h, ps, need_fetch, moe_layer and ps.record_routing)
            if ps.mode == "predict" and store is not None:
                with ps.timer.stage(Stage.TARGET_POST_ATTN):
                    self._prefetch_next(i, r.x)
        with ps.timer.stage(Stage.TARGET_MOE):
            h = self.moe(i, h, r)
        if moe_layer:
            store.end_layer(i)
        return h

    def _layer_pipelined(self, i: int, h: torch.Tensor, ps: _Pass, need_fetch: bool,
                         record_routing: bool) -> tuple[torch.Tensor, _Routed]:
        """pre_attn/attention/post_attn per micro-batch, the next micro-batch's pre_attn issued before this
        one's CPU attention -> (h [T, H], routing of all tokens). need_fetch: the experts each micro-batch
        routes to start streaming as soon as its routing is known."""
        timer, mbs = ps.timer, ps.mbs
        parts: list[_Routed] = []
        new_h: list[torch.Tensor] = []
        with timer.stage(Stage.TARGET_PRE_ATTN):
            s0, e0 = mbs[0][1], mbs[0][2]
            nxt = self.pre_attn(i, h[s0:e0], *ps.cs[0])
        for j, (sub, s, e) in enumerate(mbs):
            cur = nxt
            if j + 1 < len(mbs):   # issue the next micro-batch's GPU work before this one's CPU attention
                with timer.stage(Stage.TARGET_PRE_ATTN):
                    s1, e1 = mbs[j + 1][1], mbs[j + 1][2]
                    nxt = self.pre_attn(i, h[s1:e1], *ps.cs[j + 1])
            with timer.stage(Stage.TARGET_ATTENTION):
                o = ps.kv.attend(i, *cur, sub)
            with timer.stage(Stage.TARGET_POST_ATTN):
                hj, r = self.post_attn(i, h[s:e], o)
            new_h.append(hj)
            parts.append(r)
            if need_fetch:   # the experts this micro-batch routes to start streaming now
                self.store.fetch(i, torch.unique(r.ids).tolist())
            if record_routing:
                self.store.record_routing(i, r.ids)
        return (torch.cat(new_h) if len(new_h) > 1 else new_h[0]), _cat_routed(parts)

    def _end_pass(self, mode: str, streaming: list[int], timer: StageTimer) -> None:
        """Start streaming the next pass's first two streaming layers and record the copies that have finished."""
        store = self.store
        if mode == "next" and streaming:       # the next pass's first two layers (one per buffer), over lm_head,
            for layer in streaming[:2]:          # acceptance and the draft phase
                store.prefetch_layer(layer)
        if store is not None:   # finished copy batches: bytes with their copy-stream busy time (never waits)
            timer.add_h2d(store.take_h2d(block=False))


STREAM_MODES = ("off", "next", "predict")
HOST_IO = ("direct", "pinned", "zero-copy")   # how the attention of host KV rows gets its inputs and output


class HostIO:
    """Device <-> host transfers of the attention's inputs and output through two host buffers kept across
    layers and passes (pinned with CUDA; plain host tensors without, where the same code runs as ordinary
    copies), grown when a pass is larger: q, k and v of a layer cross in one copy into one buffer
    [T, Hq+2Hkv, D]; the verify kernel writes its output into the other, [T, Hq, D], which crosses back in
    one copy (or is read in place by a GPU kernel: zero-copy). Reuse is safe in stream order: a layer's
    output has crossed (or been read) before the next layer's q/k/v copy ends, and the host waits for that
    copy (wait()) before the kernel writes the output buffer again."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self._event = None
        self._bufs: dict[str, torch.Tensor] = {}

    def _buffer(self, name: str, shape, dtype: torch.dtype) -> torch.Tensor:
        """The kept buffer `name` viewed as `shape` (its first elements), reallocated when too small."""
        numel = math.prod(shape)
        b = self._bufs.get(name)
        if b is None or b.dtype != dtype or b.numel() < numel:
            if b is not None and self.cuda:      # a zero-copy kernel may still read the old buffer
                torch.cuda.current_stream(self.device).synchronize()
            b = self._bufs[name] = torch.empty(numel, dtype=dtype, pin_memory=self.cuda)
        return b[:numel].view(shape)

    def to_host_qkv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """q [T, Hq, D], k, v [T, Hkv, D] (device) -> (q, k, v) views of one host buffer [T, Hq+2Hkv, D]
        filled by one copy; wait() before reading them."""
        Hq, Hkv = q.shape[1], k.shape[1]
        fused = torch.cat((q, k, v), dim=1)                          # [T, Hq+2Hkv, D] on the device
        hb = self._buffer("qkv", fused.shape, fused.dtype)
        hb.copy_(fused, non_blocking=self.cuda)
        if self.cuda:
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(self.device))
        return hb[:, :Hq], hb[:, Hq:Hq + Hkv], hb[:, Hq + Hkv:]

    def out_buffer(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """The host buffer the attention writes its output [T, Hq, D] into."""
        return self._buffer("out", tuple(shape), dtype)

    def wait(self) -> None:
        if self._event is not None:
            self._event.synchronize()
            self._event = None

    def to_device(self, hx: torch.Tensor, zero_copy: bool = False) -> torch.Tensor:
        """The output buffer -> the device: a non-blocking copy from pinned memory, or (zero_copy, CUDA) a
        kernel reading it in place over PCIe (unified addressing)."""
        if not self.cuda:
            return hx.to(self.device)
        if not zero_copy:
            return hx.to(self.device, non_blocking=True)
        idt = {2: torch.int16, 4: torch.int32}[hx.element_size()]
        view = torch.as_tensor(_CudaView(hx.view(idt)), device=self.device)   # the pinned bytes, as CUDA
        out = torch.empty(hx.shape, dtype=hx.dtype, device=self.device)
        torch.bitwise_or(view, 0, out=out.view(idt))          # an elementwise kernel reads host memory
        return out


class _CudaView:
    """__cuda_array_interface__ of a contiguous pinned host tensor (UVA: the host pointer is valid on the GPU)."""

    _TYPESTR = {torch.int16: "<i2", torch.int32: "<i4"}

    def __init__(self, t: torch.Tensor):
        if t.dtype not in self._TYPESTR:
            raise TypeError(f"no zero-copy view for {t.dtype}")
        self.__cuda_array_interface__ = {"shape": tuple(t.shape), "typestr": self._TYPESTR[t.dtype],
                                         "data": (t.data_ptr(), False), "version": 3, "strides": None}


def stream_mode(prefetch: bool | str | None) -> str:
    """True -> "next", False/None -> "off", or one of STREAM_MODES."""
    if prefetch is True:
        return "next"
    if prefetch is False or prefetch is None:
        return "off"
    if prefetch not in STREAM_MODES:
        raise ValueError(f"prefetch must be a bool or one of {STREAM_MODES}, got {prefetch!r}")
    return prefetch


def _cat_routed(parts: list[_Routed]) -> _Routed:
    if len(parts) == 1:
        return parts[0]
    cat = (lambda xs: None if xs[0] is None else torch.cat(xs))  # noqa: E731
    return _Routed(cat([p.x for p in parts]), cat([p.ids for p in parts]), cat([p.w for p in parts]),
                   cat([p.extra for p in parts]))
