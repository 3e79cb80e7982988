"""ArchConfig: what our forward needs from a HF config.json, for every supported family, and the
shapes of the non-expert tensors it reads (checkpoint validation and random weights share them).

Dimensions: V vocab, H hidden, Hq/Hkv heads, D head dim, E experts, F expert intermediate,
I dense/shared intermediate.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from specmoe.planner.errors import SpecError

TARGET_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
DRAFT_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_FAMILIES = TARGET_FAMILIES + DRAFT_FAMILIES

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class ArchConfig:
    """What our forward needs from a config.json (elements, not bytes)."""

    family: str
    vocab_size: int
    hidden: int                      # H
    num_layers: int
    num_q_heads: int                 # Hq
    num_kv_heads: int                # Hkv
    head_dim: int                    # D
    rms_eps: float
    rope: dict                       # {"rope_type", "rope_theta", ...} (transformers' rope_parameters)
    max_position_embeddings: int
    qkv_bias: bool
    o_bias: bool
    qk_norm: str                     # "none" | "head" (Qwen3: per head over D) | "full" (OLMoE: over Hq*D)
    clip_qkv: float | None
    moe_layers: tuple[int, ...]      # layers with routed experts
    num_experts: int                 # E (0: dense)
    top_k: int
    moe_intermediate: int            # F
    shared_intermediate: int         # Qwen2-MoE shared expert (0: none)
    dense_intermediate: int          # dense FFN of dense layers / dense models
    norm_topk_prob: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    sliding_window: int | None       # smallest window of any sliding layer (None: full attention)
    torch_dtype: str
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0 and bool(self.moe_layers)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES.get(self.torch_dtype, torch.float32)

    @property
    def expert_elems(self) -> int:
        return 3 * self.hidden * self.moe_intermediate

    def layer_is_moe(self, layer: int) -> bool:
        return layer in self.moe_layers


def _int(cfg: dict, key: str, where: str, *alts: str, default: Any = ...) -> int:
    for k in (key, *alts):
        v = cfg.get(k)
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v or v <= 0:
                raise SpecError(f"{where}: config.json {k}", f"must be a positive integer, got {v!r}", "fix config.json")
            return int(v)
    if default is ...:
        raise SpecError(f"{where}: config.json {key}", "missing", "is this a supported model family?")
    return default


def _ids(v: Any) -> tuple[int, ...]:
    if v is None:
        return ()
    if isinstance(v, int) and not isinstance(v, bool):
        return (v,)
    if isinstance(v, (list, tuple)):
        return tuple(int(x) for x in v if isinstance(x, int) and not isinstance(x, bool))
    return ()


def parse_config(cfg: dict, where: str = "config", generation_config: dict | None = None) -> ArchConfig:
    """ArchConfig from a config.json dict (and generation_config.json for the EOS ids)."""
    if not isinstance(cfg, dict):
        raise SpecError(f"{where}: config.json", "top level is not a JSON object", "fix the file")
    mt = cfg.get("model_type")
    if mt not in SUPPORTED_FAMILIES:
        raise SpecError(f"{where}: config.json model_type", f"unsupported family {mt!r}",
                        f"supported targets: {', '.join(TARGET_FAMILIES)}; drafts: {', '.join(DRAFT_FAMILIES)}")
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise SpecError(f"{where}: config.json hidden_act", f"{act!r} is not supported", "only SwiGLU (silu) models")
    H = _int(cfg, "hidden_size", where)
    L = _int(cfg, "num_hidden_layers", where)
    nq = _int(cfg, "num_attention_heads", where)
    nkv = _int(cfg, "num_key_value_heads", where, default=nq)
    if nq % nkv:
        raise SpecError(f"{where}: config.json num_key_value_heads", f"{nkv} does not divide {nq} query heads",
                        "fix config.json")
    D = _int(cfg, "head_dim", where, default=H // nq)
    rope = dict(cfg.get("rope_parameters") or {})
    if not rope:
        rope = dict(cfg.get("rope_scaling") or {})
        rope.setdefault("rope_type", rope.pop("type", "default"))
        rope["rope_theta"] = cfg.get("rope_theta", 10000.0)
    rope.setdefault("rope_type", "default")
    rope.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    moe_layers: tuple[int, ...] = ()
    E = topk = F = shared = 0
    dense = int(cfg.get("intermediate_size") or 0)
    if mt in TARGET_FAMILIES:
        E = _int(cfg, "num_local_experts", where, "num_experts")
        topk = _int(cfg, "num_experts_per_tok", where)
        if topk > E:
            raise SpecError(f"{where}: config.json num_experts_per_tok", f"{topk} exceeds {E} experts", "fix config.json")
        F = _int(cfg, "moe_intermediate_size", where) if mt in ("qwen2_moe", "qwen3_moe") else _int(
            cfg, "intermediate_size", where)
        if mt == "qwen2_moe":
            shared = int(cfg.get("shared_expert_intermediate_size") or 0)
        step = int(cfg.get("decoder_sparse_step") or 1)
        mlp_only = set(cfg.get("mlp_only_layers") or [])
        moe_layers = tuple(i for i in range(L) if (i + 1) % step == 0 and i not in mlp_only)
        if len(moe_layers) < L:
            _int(cfg, "intermediate_size", where)  # dense layers need it
    else:
        dense = _int(cfg, "intermediate_size", where)
    # sliding windows (Mistral: every layer; Qwen: when use_sliding_window, per layer_types)
    window = cfg.get("sliding_window")
    if mt in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe"):
        lt = cfg.get("layer_types")
        uses = bool(cfg.get("use_sliding_window", False)) and (lt is None or "sliding_attention" in lt)
        window = window if uses else None
    if mt == "olmoe":
        window = None
    eos = _ids((generation_config or {}).get("eos_token_id")) or _ids(cfg.get("eos_token_id"))
    V = _int(cfg, "vocab_size", where)
    clip = cfg.get("clip_qkv") if mt == "olmoe" else None
    return ArchConfig(
        family=mt, vocab_size=V, hidden=H, num_layers=L, num_q_heads=nq, num_kv_heads=nkv, head_dim=D,
        rms_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope=rope,
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 1 << 30),
        qkv_bias=bool(cfg.get("qkv_bias", True)) if mt == "qwen2_moe" else (
            True if mt == "qwen2" else bool(cfg.get("attention_bias", False))),
        o_bias=False if mt in ("qwen2", "qwen2_moe") else bool(cfg.get("attention_bias", False)),
        qk_norm={"qwen3": "head", "qwen3_moe": "head", "olmoe": "full"}.get(mt, "none"),
        clip_qkv=float(clip) if clip is not None else None,
        moe_layers=moe_layers, num_experts=E, top_k=topk, moe_intermediate=F, shared_intermediate=shared,
        dense_intermediate=dense,
        norm_topk_prob=True if mt == "mixtral" else bool(cfg.get("norm_topk_prob", False)),
        mlp_bias=bool(cfg.get("mlp_bias", False)) if mt == "llama" else False,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        sliding_window=int(window) if window else None,
        torch_dtype=str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"),
        eos_token_ids=eos, bos_token_id=cfg.get("bos_token_id") if isinstance(cfg.get("bos_token_id"), int) else None,
        raw=cfg,
    )


def expected_shapes(c: ArchConfig) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every non-expert tensor our forward reads (routers excluded: their prefix
    depends on the expert layout)."""
    H, D, nq, nkv = c.hidden, c.head_dim, c.num_q_heads, c.num_kv_heads
    s: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c.vocab_size, H), "model.norm.weight": (H,)}
    if not c.tie_word_embeddings:
        s["lm_head.weight"] = (c.vocab_size, H)
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        s.update({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                  a + "q_proj.weight": (nq * D, H), a + "k_proj.weight": (nkv * D, H),
                  a + "v_proj.weight": (nkv * D, H), a + "o_proj.weight": (H, nq * D)})
        if c.qkv_bias:
            s.update({a + "q_proj.bias": (nq * D,), a + "k_proj.bias": (nkv * D,), a + "v_proj.bias": (nkv * D,)})
        if c.o_bias:
            s[a + "o_proj.bias"] = (H,)
        if c.qk_norm == "head":
            s.update({a + "q_norm.weight": (D,), a + "k_norm.weight": (D,)})
        elif c.qk_norm == "full":
            s.update({a + "q_norm.weight": (nq * D,), a + "k_norm.weight": (nkv * D,)})
        if c.layer_is_moe(i):  # routers and experts: see Checkpoint.expert_layout
            if c.shared_intermediate:
                m = p + "mlp.shared_expert."
                I = c.shared_intermediate
                s.update({m + "gate_proj.weight": (I, H), m + "up_proj.weight": (I, H), m + "down_proj.weight": (H, I),
                          p + "mlp.shared_expert_gate.weight": (1, H)})
        else:
            I = c.dense_intermediate
            m = p + "mlp."
            s.update({m + "gate_proj.weight": (I, H), m + "up_proj.weight": (I, H), m + "down_proj.weight": (H, I)})
            if c.mlp_bias:
                s.update({m + "gate_proj.bias": (I,), m + "up_proj.bias": (I,), m + "down_proj.bias": (H,)})
    return s


def moe_prefix(c: ArchConfig, layer: int) -> str:
    return f"model.layers.{layer}." + ("block_sparse_moe." if c.family == "mixtral" else "mlp.")


def router_name(c: ArchConfig, layer: int) -> str:
    return moe_prefix(c, layer) + "gate.weight"
