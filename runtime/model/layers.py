"""Layer math shared by the target and the draft: RMSNorm, rotary embedding, QKV projection with the
family's QK-norm and bias, dense SwiGLU MLP. Numerics follow transformers' modules (RMSNorm in fp32
then cast; rotary cos/sin computed in fp32 and cast to the activation dtype).

Dimensions: T tokens, H hidden, Hq/Hkv heads, D head dim, I intermediate.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as Fn

from specmoe.planner.errors import SpecError

from specmoe.runtime.weights.checkpoint import ArchConfig

STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """[..., H] -> [..., H], as transformers' *RMSNorm (normalise in fp32, cast back, scale)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


class Rotary:
    """Rotary position embedding of one model (static rope types only)."""

    def __init__(self, cfg: ArchConfig, device: torch.device):
        rt = cfg.rope.get("rope_type", "default")
        if rt not in STATIC_ROPE_TYPES:
            raise SpecError("config.json rope_parameters.rope_type", f"{rt!r} is not supported",
                            f"supported: {', '.join(STATIC_ROPE_TYPES)}")
        D = cfg.head_dim
        if rt == "default":
            theta = float(cfg.rope.get("rope_theta", 10000.0))
            inv_freq = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
            self.scaling = 1.0
        else:  # the scaled variants: transformers' own init functions on the model's config
            from transformers import AutoConfig
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            raw = {k: v for k, v in cfg.raw.items() if k not in ("model_type", "architectures", "transformers_version")}
            hf = AutoConfig.for_model(cfg.family, **raw)
            inv_freq, self.scaling = ROPE_INIT_FUNCTIONS[rt](hf, torch.device("cpu"))
        self.inv_freq = inv_freq.float().to(device)  # [D/2]

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] int64 -> cos, sin [T, D] in `dtype`."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, h, D], cos/sin [T, D] -> [T, h, D]."""
    return x * cos[:, None, :] + _rotate_half(x) * sin[:, None, :]


@dataclass
class AttnWeights:
    qkv: torch.Tensor                  # [(Hq + 2 Hkv) * D, H]: q, k and v projections fused into one GEMM
    o: torch.Tensor                    # [H, Hq*D]
    q_out: int                         # Hq * D
    kv_out: int                        # Hkv * D
    qkv_b: torch.Tensor | None = None  # [(Hq + 2 Hkv) * D]
    ob: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None  # [D] (head) or [Hq*D] (full)
    k_norm: torch.Tensor | None = None


def load_attention(get, prefix: str, cfg: ArchConfig) -> AttnWeights:
    """`get(name)` returns a device tensor; prefix like "model.layers.3.self_attn."."""
    opt = (lambda n, on: get(prefix + n) if on else None)  # noqa: E731
    qkv_w = torch.cat([get(prefix + "q_proj.weight"), get(prefix + "k_proj.weight"), get(prefix + "v_proj.weight")])
    qkv_b = torch.cat([get(prefix + "q_proj.bias"), get(prefix + "k_proj.bias"),
                       get(prefix + "v_proj.bias")]) if cfg.qkv_bias else None
    return AttnWeights(
        qkv=qkv_w, o=get(prefix + "o_proj.weight"), q_out=cfg.num_q_heads * cfg.head_dim,
        kv_out=cfg.num_kv_heads * cfg.head_dim, qkv_b=qkv_b, ob=opt("o_proj.bias", cfg.o_bias),
        q_norm=opt("q_norm.weight", cfg.qk_norm != "none"), k_norm=opt("k_norm.weight", cfg.qk_norm != "none"),
    )


def qkv(aw: AttnWeights, cfg: ArchConfig, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """x [T, H] (already normed) -> q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D] with rotary applied."""
    T = x.shape[0]
    D, eps = cfg.head_dim, cfg.rms_eps
    qkv_ = Fn.linear(x, aw.qkv, aw.qkv_b)  # [T, (Hq + 2 Hkv) D]
    if cfg.qk_norm == "none":      # q and k are adjacent in the fused projection: one rotary over both heads
        if cfg.clip_qkv is not None:
            qkv_ = qkv_.clamp(-cfg.clip_qkv, cfg.clip_qkv)
        nqk = aw.q_out + aw.kv_out
        qk = apply_rotary(qkv_[:, :nqk].reshape(T, -1, D), cos, sin)  # [T, Hq + Hkv, D]
        q, k = qk.split([aw.q_out // D, aw.kv_out // D], dim=1)
        return q, k, qkv_[:, nqk:].reshape(T, -1, D)
    q, k, v = qkv_.split([aw.q_out, aw.kv_out, aw.kv_out], dim=-1)
    if cfg.qk_norm == "full":      # OLMoE: over the whole projection, before the head split
        q = rms_norm(q, aw.q_norm, eps)
        k = rms_norm(k, aw.k_norm, eps)
    if cfg.clip_qkv is not None:
        q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
    q = q.reshape(T, -1, D)
    k = k.reshape(T, -1, D)
    v = v.reshape(T, -1, D)
    if cfg.qk_norm == "head":      # Qwen3: per head over D
        q = rms_norm(q, aw.q_norm, eps)
        k = rms_norm(k, aw.k_norm, eps)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v


def load_mlp(get, prefix: str, bias: bool = False) -> tuple:
    """(gate_up [2I, H], down [H, I], gate_up bias, down bias) of a dense SwiGLU MLP under `prefix`."""
    gu = torch.cat([get(prefix + "gate_proj.weight"), get(prefix + "up_proj.weight")])
    gub = torch.cat([get(prefix + "gate_proj.bias"), get(prefix + "up_proj.bias")]) if bias else None
    return gu, get(prefix + "down_proj.weight"), gub, (get(prefix + "down_proj.bias") if bias else None)


def dense_mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, gub=None, db=None) -> torch.Tensor:
    """SwiGLU with the gate and up projections fused: down(silu(gate x) * up x); x [T, H] -> [T, H]."""
    from specmoe.runtime.kernels.moe_ops import silu_mul

    return Fn.linear(silu_mul(Fn.linear(x, gate_up, gub)), down, db)
