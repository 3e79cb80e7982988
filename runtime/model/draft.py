"""The dense draft model (Llama, Mistral, Qwen2, Qwen3): weights on the device, KV split by sequence.

One forward processes a ragged set of new tokens per sequence (catch-up after acceptance, prompts
at prefill, one token per draft step) and returns the logits of each sequence's last token. Its
attention goes through SplitKVCache.attend: device rows via draft_decode_attention (N = 1) and
host rows via the CPU verify kernel.

Dimensions: T tokens, B sequences, H hidden, V vocab.
"""
from __future__ import annotations

import torch
import torch.nn.functional as Fn

from specmoe.runtime.model.kv_cache import PassLayout, SplitKVCache
from specmoe.runtime.model.layers import Rotary, dense_mlp, load_attention, load_mlp, qkv, rms_norm
from specmoe.runtime.weights.sources import WeightSource


class DraftModel:
    def __init__(self, src: WeightSource, device: torch.device, dtype: torch.dtype):
        c = src.config
        if c.is_moe:
            from specmoe.planner.errors import SpecError

            raise SpecError("draft", f"{c.family} is a MoE model", "use a dense draft (llama, mistral, qwen2, qwen3)")
        self.config, self.device, self.dtype = c, device, dtype
        get = lambda n: src.tensor(n).to(device=device, dtype=dtype)  # noqa: E731
        self.embed = get("model.embed_tokens.weight")  # [V, H]
        self.norm = get("model.norm.weight")
        self.lm_head_w = self.embed if c.tie_word_embeddings else get("lm_head.weight")  # [V, H]
        self.rotary = Rotary(c, device)
        self.layers = []
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            self.layers.append((load_attention(get, p + "self_attn.", c), get(p + "input_layernorm.weight"),
                                get(p + "post_attention_layernorm.weight"), load_mlp(get, p + "mlp.", c.mlp_bias)))

    def forward(self, tokens: torch.Tensor, layout: PassLayout, kv: SplitKVCache, logits: str = "last") -> torch.Tensor | None:
        """tokens [T] int64 (device) -> logits fp32 [B, V] of each sequence's last token ("last"),
        [T, V] ("all") or None ("none": prefill only fills the cache)."""
        c = self.config
        h = self.embed.index_select(0, tokens)  # [T, H]
        cos, sin = self.rotary.cos_sin(layout.positions(self.device), self.dtype)
        for i, (aw, in_norm, post_norm, mlp) in enumerate(self.layers):
            q, k, v = qkv(aw, c, rms_norm(h, in_norm, c.rms_eps), cos, sin)
            o = kv.attend(i, q, k, v, layout)  # [T, Hq, D]
            h = h + Fn.linear(o.reshape(o.shape[0], -1), aw.o, aw.ob)
            h = h + dense_mlp(rms_norm(h, post_norm, c.rms_eps), *mlp)
        if logits == "none":
            return None
        if logits == "last":
            h = h.index_select(0, layout.last_token_index(self.device))
        return Fn.linear(rms_norm(h, self.norm, c.rms_eps), self.lm_head_w).float()
