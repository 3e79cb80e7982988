"""The target MoE model's forward, split into the design's stages.

Per layer: `pre_attn` (RMSNorm, QKV, QK-norm, rotary), `attention` (write K/V into the KV cache and
attend: the CPU verify kernel for host-memory rows), `post_attn` (o_proj + residual, RMSNorm,
router softmax/top-k, Qwen2-MoE's shared expert with its sigmoid gate), `moe` (routed experts
grouped by expert through the permutation, SwiGLU, weighted combine, residual); then `lm_head`.
`forward` runs one pass through the micro-batch pipeline: per layer, pre_attn/attention/post_attn
per micro-batch (the next micro-batch's pre_attn is issued before this one's CPU attention, and
the experts a micro-batch routes to start streaming as soon as its routing is known), then moe
over the tokens of all micro-batches.

Dimensions: T tokens, B sequences, H hidden, Hq/Hkv heads, D head dim, E experts, K top-k,
F expert intermediate, V vocab.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as Fn

from planner.stages import Stage

from .expert_store import ExpertStore
from .kv_cache import PassLayout, SplitKVCache
from .layers import AttnWeights, Rotary, dense_mlp, load_attention, load_mlp, qkv, rms_norm
from .run_record import StageTimer
from .weights import WeightSource


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
        from runtime.kernels.moe_ops import expert_permutation, permute_tokens, silu_mul, unpermute_combine

        if r.ids is None:
            return h + r.extra
        K = self.config.top_k
        perm = expert_permutation(r.ids, self.config.num_experts)
        counts = perm.counts.tolist()
        starts = perm.offsets.tolist()
        xs = permute_tokens(r.x, perm.perm, K)  # [T*K, H] by expert
        ys = torch.empty_like(xs)               # [T*K, H]
        touched = [e for e, n in enumerate(counts) if n]
        resident = self.store.slot_of[layer]
        # resident experts first: their compute overlaps the streamed experts' copies
        for e in sorted(touched, key=lambda e: e not in resident):
            start, n = starts[e], counts[e]
            gate_up, down, on_host = self.store.weights(layer, e)
            seg = xs[start:start + n]
            if on_host:
                seg_h = seg.to("cpu")
                ys[start:start + n] = Fn.linear(silu_mul(Fn.linear(seg_h, gate_up)), down).to(ys.device)
            else:
                ys[start:start + n] = Fn.linear(silu_mul(Fn.linear(seg, gate_up)), down)
        out = unpermute_combine(ys, perm.inv, r.w, out_dtype=h.dtype)  # [T, H]
        h = h + out
        return h if r.extra is None else h + r.extra

    def lm_head(self, h: torch.Tensor) -> torch.Tensor:
        """h [t, H] -> logits [t, V] fp32."""
        return Fn.linear(rms_norm(h, self.norm, self.config.rms_eps), self.lm_head_w).float()

    # ---- one pass ----
    def _prefetch_next(self, layer: int, x: torch.Tensor) -> None:
        """Predict layer+1's experts by its router on layer's FFN input x [T, H]; start streaming them."""
        c, store, nxt = self.config, self.store, layer + 1
        if nxt >= c.num_layers or not c.layer_is_moe(nxt) or nxt in store.cpu_layers or store.slots[nxt] >= c.num_experts:
            return
        pred = torch.topk(Fn.linear(x, self.layers[nxt].router), c.top_k, dim=-1).indices  # [T, K]
        store.begin_layer(nxt)
        store.fetch(nxt, torch.unique(pred).tolist())

    def forward(self, tokens: torch.Tensor, layout: PassLayout, kv: SplitKVCache, timer: StageTimer,
                micro_batches: int = 1, logits: str = "all", record_routing: bool = False,
                prefetch: bool = False) -> torch.Tensor:
        """tokens [T] int64 (device), sequence-major per `layout` -> logits fp32 [T, V] ("all") or [B, V] ("last").

        K/V of the pass are written at the layout's positions; the caller commits or rolls back lengths.
        prefetch: start streaming layer i+1's predicted experts before layer i's moe.
        """
        c, store = self.config, self.store
        mbs = layout.split(micro_batches)
        with timer.stage(Stage.TARGET_PRE_ATTN):
            h = self.embed.index_select(0, tokens)  # [T, H]
            cos, sin = self.rotary.cos_sin(layout.positions(self.device), self.dtype)  # [T, D]
        for i in range(c.num_layers):
            moe_layer = c.layer_is_moe(i)
            if moe_layer:
                store.begin_layer(i)
            parts: list[_Routed] = []
            new_h: list[torch.Tensor] = []
            with timer.stage(Stage.TARGET_PRE_ATTN):
                s0, e0 = mbs[0][1], mbs[0][2]
                nxt = self.pre_attn(i, h[s0:e0], cos[s0:e0], sin[s0:e0])
            for j, (sub, s, e) in enumerate(mbs):
                cur = nxt
                if j + 1 < len(mbs):   # issue the next micro-batch's GPU work before this one's CPU attention
                    with timer.stage(Stage.TARGET_PRE_ATTN):
                        s1, e1 = mbs[j + 1][1], mbs[j + 1][2]
                        nxt = self.pre_attn(i, h[s1:e1], cos[s1:e1], sin[s1:e1])
                with timer.stage(Stage.TARGET_ATTENTION):
                    o = kv.attend(i, *cur, sub)
                with timer.stage(Stage.TARGET_POST_ATTN):
                    hj, r = self.post_attn(i, h[s:e], o)
                new_h.append(hj)
                parts.append(r)
                if moe_layer:
                    touched = torch.unique(r.ids).tolist()
                    store.fetch(i, touched)   # timed by the store itself (CUDA events or a host clock)
                    if record_routing:
                        store.record_routing(i, r.ids)
            h = torch.cat(new_h) if len(new_h) > 1 else new_h[0]
            r = _cat_routed(parts)
            if prefetch and store is not None:
                with timer.stage(Stage.TARGET_POST_ATTN):
                    self._prefetch_next(i, r.x)
            with timer.stage(Stage.TARGET_MOE):
                h = self.moe(i, h, r)
            if moe_layer:
                store.end_layer(i)
        if store is not None:
            timer.add(Stage.TARGET_H2D, store.take_h2d_time())
        with timer.stage(Stage.TARGET_LM_HEAD):
            if logits == "last":
                h = h.index_select(0, layout.last_token_index(self.device))
            out = self.lm_head(h)
        return out


def _cat_routed(parts: list[_Routed]) -> _Routed:
    if len(parts) == 1:
        return parts[0]
    cat = (lambda xs: None if xs[0] is None else torch.cat(xs))  # noqa: E731
    return _Routed(cat([p.x for p in parts]), cat([p.ids for p in parts]), cat([p.w for p in parts]),
                   cat([p.extra for p in parts]))
