"""ArchConfig: what our forward needs of a model, built from the planner's ModelSpec (the one
config.json parser is planner/hf_config.py), and the shapes of the non-expert tensors it reads
(checkpoint validation and random weights share them).

Dimensions: V vocab, H hidden, Hq/Hkv heads, D head dim, E experts, F expert intermediate,
I dense/shared intermediate.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import torch

from specmoe.planner.errors import SpecError
from specmoe.planner.hf_config import token_ids
from specmoe.planner.model_spec import ModelSpec

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
    eagle: bool = False              # an EAGLE draft head (planner/eagle.py; runtime/model/eagle.py)

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


def arch_from_spec(spec: ModelSpec, raw: dict | None = None, generation_config: dict | None = None) -> ArchConfig:
    """The engine's view of a model the planner parsed (planner/hf_config.py is the only config.json
    parser). raw: the config.json object itself, which transformers' scaled-rope init functions read;
    generation_config: generation_config.json, whose EOS ids take precedence over config.json's."""
    where = spec.source or spec.name
    if spec.family not in SUPPORTED_FAMILIES:
        raise SpecError(f"{where}: config.json model_type", f"unsupported family {spec.family!r} for the engine",
                        f"supported targets: {', '.join(TARGET_FAMILIES)}; drafts: {', '.join(DRAFT_FAMILIES)}")
    if spec.hidden_act not in ("silu", "swish"):
        raise SpecError(f"{where}: config.json hidden_act", f"{spec.hidden_act!r} is not supported",
                        "only SwiGLU (silu) models")
    eos = token_ids((generation_config or {}).get("eos_token_id")) or tuple(spec.eos_token_ids)
    return ArchConfig(
        family=spec.family, vocab_size=spec.vocab_size, hidden=spec.hidden, num_layers=spec.num_layers,
        num_q_heads=spec.num_q_heads, num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim, rms_eps=spec.rms_eps,
        rope=dict(spec.rope), max_position_embeddings=spec.max_position_embeddings, qkv_bias=spec.qkv_bias,
        o_bias=spec.o_bias, qk_norm=spec.qk_norm, clip_qkv=spec.clip_qkv, moe_layers=tuple(spec.moe_layers),
        num_experts=spec.num_experts, top_k=spec.top_k, moe_intermediate=spec.expert_intermediate,
        shared_intermediate=spec.shared_expert_intermediate, dense_intermediate=spec.dense_intermediate,
        norm_topk_prob=spec.norm_topk_prob, mlp_bias=spec.mlp_bias, tie_word_embeddings=spec.tie_word_embeddings,
        sliding_window=spec.sliding_window, torch_dtype=spec.weight_dtype, eos_token_ids=eos,
        bos_token_id=spec.bos_token_id, raw=dict(raw or {}), eagle=bool(spec.eagle),
    )


def parse_config(cfg: dict, where: str = "config", generation_config: dict | None = None,
                 directory=None) -> ArchConfig:
    """ArchConfig from a config.json object, through the planner's parser (directory: the checkpoint's,
    where an EAGLE head's weights name it one)."""
    return arch_from_spec(ModelSpec.from_hf_config(cfg, name=where, directory=directory), cfg, generation_config)


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


def head_shapes(c: ArchConfig) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape of every tensor an EAGLE head's forward reads, fc.bias aside
    (runtime/weights/eagle.py gives the names; layers.0 has no input norm)."""
    H = c.hidden
    s = {"fc.weight": (H, 2 * H)}
    for name, shape in expected_shapes(c).items():
        if name.startswith("model.layers.") and name != "model.layers.0.input_layernorm.weight":
            s[name[len("model."):]] = shape
    return s
