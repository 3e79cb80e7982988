"""The EAGLE-1 draft head (arXiv 2401.15077): weights on the device, KV split by sequence.

One step over a ragged set of new tokens per sequence (as DraftModel.forward): each token t at head
position i comes with the target's hidden state f_i of the position before it (the normed last-layer
state the target's LM head reads, TargetModel.forward(keep_hidden=True)), and

    x = fc([embed(t); f_i])                       (2H -> H; embed: the target's embedding)
    x = x + attn(x)                               (layer 0 without input norm, as EAGLE's cnets.py and vLLM)
    x = x + mlp(post_attention_norm(x))           (a Llama decoder layer; more layers norm their input)
    logits = lm_head(x)                           (the target's LM head, no norm: x predicts f_{i+1})

so the head's output x is its prediction of the target's next hidden state, which the next draft step
feeds back as its feature (runtime/eagle_draft.py keeps the real ones).

Dimensions: T tokens, B sequences, H hidden, V vocab.
"""
from __future__ import annotations

import torch
import torch.nn.functional as Fn

from specmoe.runtime.model.kv_cache import PassLayout, SplitKVCache
from specmoe.runtime.model.layers import Rotary, dense_mlp, load_attention, load_mlp, qkv, rms_norm
from specmoe.runtime.weights.sources import WeightSource


class EagleHead:
    def __init__(self, src: WeightSource, embed: torch.Tensor, lm_head_w: torch.Tensor, device: torch.device,
                 dtype: torch.dtype):
        """embed [V, H] and lm_head_w [V, H]: the target's own tensors (shared, not copied)."""
        c = src.config
        self.config, self.device, self.dtype = c, device, dtype
        get = lambda n: src.tensor(n).to(device=device, dtype=dtype)  # noqa: E731
        self.embed, self.lm_head_w = embed, lm_head_w
        self.fc = get("fc.weight")                                  # [H, 2H]
        self.fc_b = get("fc.bias") if src.has("fc.bias") else None  # [H]
        self.rotary = Rotary(c, device)
        self.layers = []
        for i in range(c.num_layers):
            p = f"layers.{i}."
            self.layers.append((load_attention(get, p + "self_attn.", c),
                                get(p + "input_layernorm.weight") if i > 0 else None,
                                get(p + "post_attention_layernorm.weight"), load_mlp(get, p + "mlp.", c.mlp_bias)))
        src.release()

    def forward(self, tokens: torch.Tensor, feats: torch.Tensor, layout: PassLayout, kv: SplitKVCache,
                logits: str = "last") -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """tokens [T] int64 and feats [T, H] (device) -> (logits fp32 [B, V], the head's output [B, H]) at each
        sequence's last token ("last"), or (None, None) ("none": the KV is filled only)."""
        c = self.config
        x = Fn.linear(torch.cat([self.embed.index_select(0, tokens), feats.to(self.dtype)], -1), self.fc,
                      self.fc_b)                                                      # [T, H]
        cos, sin = self.rotary.cos_sin(layout.positions(self.device), self.dtype)
        for i, (aw, in_norm, post_norm, mlp) in enumerate(self.layers):
            q, k, v = qkv(aw, c, x if in_norm is None else rms_norm(x, in_norm, c.rms_eps), cos, sin)
            o = kv.attend(i, q, k, v, layout)                                         # [T, Hq, D]
            x = x + Fn.linear(o.reshape(o.shape[0], -1), aw.o, aw.ob)
            x = x + dense_mlp(rms_norm(x, post_norm, c.rms_eps), *mlp)
        if logits == "none":
            return None, None
        x = x.index_select(0, layout.last_token_index(self.device))                  # [B, H]
        return Fn.linear(x, self.lm_head_w).float(), x
