"""Model specs read from Hugging Face `config.json` files (facts only, no weights).

Notation (DESIGN.md): hidden h, expert intermediate h_e, experts E, active top-k n_a, layers l,
KV heads n_kv, head dim d, GQA group g = n_q / n_kv, weight bytes w_b.

Families: Mixtral, Qwen2-MoE (shared expert), Qwen3-MoE, OLMoE, DeepSeek-V2/V3 (MLA, shared
experts, leading dense layers), Phi-3.5-MoE, GPT-OSS, DBRX, and dense drafts (Llama, Mistral,
Qwen2/Qwen3, OLMo).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from specmoe.planner.errors import SpecError

PRESET_DIR = Path(__file__).resolve().parent / "presets"

DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2,
               "float8": 1, "fp8": 1, "int8": 1, "int4": 0.5, "mxfp4": 0.5}

MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3",
                "phimoe", "gpt_oss", "dbrx")
DENSE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "phi3", "gemma", "gemma2")


@dataclass(frozen=True)
class ModelSpec:
    """Everything the cost model needs to know about one model, in elements (not bytes)."""

    name: str
    family: str                     # HF model_type
    vocab_size: int
    hidden: int                     # h
    num_layers: int                 # l
    num_q_heads: int                # n_q
    num_kv_heads: int               # n_kv
    head_dim: int                   # d (of K and V as cached; for MLA see kv_elems_per_token_layer)
    attn_elems: int                 # attention weight elements per layer (q, k, v, o and their biases)
    kv_elems_per_token_layer: int   # K+V elements cached per token per layer (MLA: latent + rope key)
    moe_layers: tuple[int, ...]     # indices of layers with routed experts
    num_experts: int                # E (0 for a dense model)
    top_k: int                      # n_a
    expert_intermediate: int        # h_e
    expert_matrices: int            # matrices per expert (3 for SwiGLU)
    shared_expert_intermediate: int  # total intermediate of always-on shared experts (0 if none)
    dense_intermediate: int         # FFN intermediate of dense layers (dense models, leading dense layers)
    tie_word_embeddings: bool
    weight_dtype: str               # as in the config (torch_dtype); the plan may override
    norm_topk_prob: bool = False
    source: str = ""                # where the config came from (preset name or path)
    config_sha256: str = ""
    published_params: dict[str, str] = field(default_factory=dict)

    # ---- derived sizes (elements) ----
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0 and len(self.moe_layers) > 0

    @property
    def group_size(self) -> int:
        """GQA group g: query heads per KV head."""
        return max(1, self.num_q_heads // max(1, self.num_kv_heads))

    @property
    def expert_elems(self) -> int:
        """Weight elements of one routed expert: expert_matrices * h * h_e (plus nothing else)."""
        return self.expert_matrices * self.hidden * self.expert_intermediate

    @property
    def router_elems(self) -> int:
        return self.hidden * self.num_experts

    @property
    def shared_expert_elems(self) -> int:
        return 3 * self.hidden * self.shared_expert_intermediate

    @property
    def dense_ffn_elems(self) -> int:
        return 3 * self.hidden * self.dense_intermediate

    @property
    def num_dense_layers(self) -> int:
        return self.num_layers - len(self.moe_layers)

    @property
    def embed_elems(self) -> int:
        return self.vocab_size * self.hidden

    @property
    def lm_head_elems(self) -> int:
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden

    @property
    def norm_elems(self) -> int:
        return (2 * self.num_layers + 1) * self.hidden

    def non_expert_layer_elems(self, layer: int) -> int:
        """Weights of layer `layer` that are not routed experts (attention, norms, router, shared/dense FFN)."""
        n = self.attn_elems + 2 * self.hidden
        if layer in self.moe_layers:
            n += self.router_elems + self.shared_expert_elems
        else:
            n += self.dense_ffn_elems
        return n

    @property
    def non_expert_elems(self) -> int:
        """All weights except routed experts: they stay on the GPU."""
        return (sum(self.non_expert_layer_elems(i) for i in range(self.num_layers))
                + self.embed_elems + self.lm_head_elems + self.hidden)

    @property
    def routed_expert_elems_total(self) -> int:
        return len(self.moe_layers) * self.num_experts * self.expert_elems

    @property
    def total_params(self) -> int:
        return self.non_expert_elems + self.routed_expert_elems_total

    @property
    def active_params(self) -> int:
        """Parameters used per token: everything but the unselected routed experts
        (the input embedding counts in full, as the model cards of Mixtral and Qwen do)."""
        return self.non_expert_elems + len(self.moe_layers) * self.top_k * self.expert_elems

    @property
    def active_params_excl_embedding(self) -> int:
        """Active parameters without the input embedding (only one row of it is read per token);
        DeepSeek's and OpenAI's model cards count this way, Mistral's and Qwen's count the embedding."""
        return self.active_params - self.embed_elems

    @property
    def weight_bytes_per_elem(self) -> float:
        return DTYPE_BYTES.get(self.weight_dtype, 2)

    def kv_bytes_per_token(self, kv_bytes_per_elem: float) -> float:
        """KV cache bytes per token over all layers."""
        return self.num_layers * self.kv_elems_per_token_layer * kv_bytes_per_elem

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["moe_layers"] = list(self.moe_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        d = dict(d)
        d["moe_layers"] = tuple(d.get("moe_layers", ()))
        return cls(**d)

    # ---- construction ----
    @classmethod
    def from_hf_config(cls, path_or_dict: str | Path | dict, name: str | None = None) -> "ModelSpec":
        """Read a HF config.json (a path to the file or its directory, or the dict itself)."""
        if isinstance(path_or_dict, dict):
            cfg, src = path_or_dict, name or "dict"
        else:
            p = Path(path_or_dict)
            if p.is_dir():
                p = p / "config.json"
            if not p.is_file():
                raise SpecError("model", f"no config.json at {p}",
                                "give a preset name (see `specmoe presets`) or a path to a HF config.json")
            try:
                cfg = json.loads(p.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise SpecError(f"model config {p}", f"not valid JSON: {e}", "fix the file") from None
            if not isinstance(cfg, dict):
                raise SpecError(f"model config {p}", "top level is not a JSON object", "fix the file")
            src = str(p)
            name = name or (p.parent.name if p.name == "config.json" else p.stem)
        return _parse(cfg, name or "model", src)

    @classmethod
    def preset(cls, name: str) -> "ModelSpec":
        p = PRESET_DIR / f"{name}.json"
        if not p.is_file():
            raise SpecError("model", f"unknown preset {name!r}",
                            f"choose one of: {', '.join(list_presets())}, or give a path to a config.json")
        return cls.from_hf_config(p, name=name)


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


# Target preset -> the draft preset used when speculation is asked for without naming a draft.
# The *-eagle presets are our one-layer EAGLE-style approximations (see their `_note`); the dense
# presets are real small models of the same family and tokenizer.
DEFAULT_DRAFTS: dict[str, str] = {
    "mixtral-8x7b": "mixtral-8x7b-eagle",
    "mixtral-8x22b": "mixtral-8x22b-eagle",
    "deepseek-v2-lite": "deepseek-v2-lite-eagle",
    "gpt-oss-20b": "gpt-oss-20b-eagle",
    "phi-3.5-moe": "phi-3.5-moe-eagle",
    "dbrx": "dbrx-eagle",
    "qwen3-30b-a3b": "qwen3-0.6b",
    "qwen1.5-moe-a2.7b": "qwen1.5-0.5b",
    "olmoe-1b-7b": "olmo-1b",
}
# Family (HF model_type) -> draft preset, for targets given as a config.json rather than a preset.
FAMILY_DEFAULT_DRAFTS: dict[str, str] = {
    "mixtral": "mixtral-8x7b-eagle", "deepseek_v2": "deepseek-v2-lite-eagle", "gpt_oss": "gpt-oss-20b-eagle",
    "phimoe": "phi-3.5-moe-eagle", "dbrx": "dbrx-eagle", "qwen3_moe": "qwen3-0.6b",
    "qwen2_moe": "qwen1.5-0.5b", "olmoe": "olmo-1b",
}


def default_draft_name(model: "ModelSpec") -> str:
    """The draft preset for a target: by preset name, else by family; SpecError if there is none."""
    name = DEFAULT_DRAFTS.get(model.name) or FAMILY_DEFAULT_DRAFTS.get(model.family)
    if name is None:
        raise SpecError("draft", f"no default draft model for {model.name!r} (family {model.family})",
                        "name one with --draft PRESET|config.json, or use --draft-len 0")
    return name


def load_model(spec: str | Path | dict | ModelSpec) -> ModelSpec:
    """A ModelSpec from a preset name, a path to a config.json (or its directory), or a dict."""
    if isinstance(spec, ModelSpec):
        return spec
    if isinstance(spec, dict):
        return ModelSpec.from_hf_config(spec)
    s = str(spec)
    if (PRESET_DIR / f"{s}.json").is_file():
        return ModelSpec.preset(s)
    if Path(s).exists():
        return ModelSpec.from_hf_config(s)
    raise SpecError("model", f"{s!r} is neither a preset nor an existing path",
                    f"choose a preset ({', '.join(list_presets())}) or give a path to a config.json")


# ---------------------------------------------------------------------------------------------
def _get(cfg: dict, key: str, where: str, *alts: str, default: Any = ..., kind=int) -> Any:
    for k in (key, *alts):
        if k in cfg and cfg[k] is not None:
            v = cfg[k]
            if kind is int:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v:
                    raise SpecError(f"{where}.{k}", f"must be an integer, got {v!r}", "fix config.json")
                v = int(v)
                if v <= 0:
                    raise SpecError(f"{where}.{k}", f"must be positive, got {v}", "fix config.json")
            return v
    if default is ...:
        raise SpecError(f"{where}.{key}", "missing from config.json",
                        "add it, or check that this is a supported model family")
    return default


def _parse(cfg: dict, name: str, src: str) -> ModelSpec:
    mt = cfg.get("model_type")
    if not isinstance(mt, str):
        raise SpecError(f"{name}.model_type", "missing from config.json",
                        f"supported: {', '.join(MOE_FAMILIES + DENSE_FAMILIES)}")
    where = name
    if mt == "dbrx":
        return _parse_dbrx(cfg, name, src)
    if mt not in MOE_FAMILIES + DENSE_FAMILIES:
        raise SpecError(f"{name}.model_type", f"unsupported family {mt!r}",
                        f"supported: {', '.join(MOE_FAMILIES + DENSE_FAMILIES)}")
    h = _get(cfg, "hidden_size", where)
    L = _get(cfg, "num_hidden_layers", where)
    nq = _get(cfg, "num_attention_heads", where)
    nkv = _get(cfg, "num_key_value_heads", where, default=nq)
    if nq % nkv:
        raise SpecError(f"{where}.num_key_value_heads", f"{nkv} does not divide num_attention_heads={nq}",
                        "fix config.json")
    V = _get(cfg, "vocab_size", where)
    d = _get(cfg, "head_dim", where, default=h // nq)
    bias = bool(cfg.get("attention_bias", False)) or mt in ("qwen2", "qwen2_moe")  # Qwen2 has qkv bias
    # attention weights per layer
    if mt in ("deepseek_v2", "deepseek_v3") and cfg.get("kv_lora_rank"):
        r_kv = _get(cfg, "kv_lora_rank", where)
        d_nope = _get(cfg, "qk_nope_head_dim", where)
        d_rope = _get(cfg, "qk_rope_head_dim", where)
        d_v = _get(cfg, "v_head_dim", where)
        r_q = cfg.get("q_lora_rank")
        dq = d_nope + d_rope
        q = h * nq * dq if not r_q else h * r_q + r_q + r_q * nq * dq
        kv_a = h * (r_kv + d_rope) + r_kv            # down-projection + its norm
        kv_b = r_kv * nq * (d_nope + d_v)             # up-projection
        o = nq * d_v * h
        attn = q + kv_a + kv_b + o
        kv_per_tok = r_kv + d_rope                    # MLA caches the latent and the rope key
        d = d_v
        nkv = nq
    else:
        attn = h * nq * d + 2 * h * nkv * d + nq * d * h
        if bias:
            attn += nq * d + 2 * nkv * d + (h if mt in ("gpt_oss", "phimoe") else 0)
        if mt == "gpt_oss":
            attn += nq                                # attention sinks
        kv_per_tok = 2 * nkv * d
    # FFN
    moe_layers: tuple[int, ...] = ()
    E = topk = h_e = shared = 0
    dense_inter = int(cfg.get("intermediate_size") or 0)
    if mt in MOE_FAMILIES:
        E = _get(cfg, "num_local_experts", where, "num_experts", "n_routed_experts")
        topk = _get(cfg, "num_experts_per_tok", where, "experts_per_token")
        if topk > E:
            raise SpecError(f"{where}.num_experts_per_tok", f"{topk} exceeds the number of experts {E}",
                            "fix config.json")
        if mt in ("qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"):
            h_e = _get(cfg, "moe_intermediate_size", where)
        else:
            h_e = _get(cfg, "intermediate_size", where)
        if mt == "qwen2_moe":
            shared = int(cfg.get("shared_expert_intermediate_size") or 0)
        if mt in ("deepseek_v2", "deepseek_v3"):
            shared = int(cfg.get("n_shared_experts") or 0) * h_e
        first_dense = int(cfg.get("first_k_dense_replace") or 0)
        freq = int(cfg.get("moe_layer_freq") or cfg.get("decoder_sparse_step") or 1)
        mlp_only = set(cfg.get("mlp_only_layers") or [])
        moe_layers = tuple(i for i in range(L)
                           if i >= first_dense and (i + 1) % freq == 0 and i not in mlp_only)
        if mt in ("mixtral", "phimoe", "olmoe", "gpt_oss"):
            dense_inter = 0
    else:
        dense_inter = _get(cfg, "intermediate_size", where)
    expert_matrices = 3
    wd = cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"
    if mt == "gpt_oss":
        wd = "bfloat16"  # the planner budgets bf16 experts unless the workload says otherwise
    spec = ModelSpec(
        name=name, family=mt, vocab_size=V, hidden=h, num_layers=L, num_q_heads=nq, num_kv_heads=nkv,
        head_dim=d, attn_elems=attn, kv_elems_per_token_layer=kv_per_tok,
        moe_layers=moe_layers, num_experts=E, top_k=topk, expert_intermediate=h_e,
        expert_matrices=expert_matrices, shared_expert_intermediate=shared, dense_intermediate=dense_inter,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)), weight_dtype=str(wd),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", mt in ("mixtral", "phimoe", "gpt_oss", "dbrx"))),
        source=src, config_sha256=_sha(cfg), published_params=_published(cfg),
    )
    return spec


def _parse_dbrx(cfg: dict, name: str, src: str) -> ModelSpec:
    a = cfg.get("attn_config") or {}
    f = cfg.get("ffn_config") or {}
    h = _get(cfg, "d_model", name)
    L = _get(cfg, "n_layers", name)
    nq = _get(cfg, "n_heads", name)
    nkv = _get(a, "kv_n_heads", f"{name}.attn_config", default=nq)
    V = _get(cfg, "vocab_size", name)
    d = h // nq
    E = _get(f, "moe_num_experts", f"{name}.ffn_config")
    topk = _get(f, "moe_top_k", f"{name}.ffn_config")
    h_e = _get(f, "ffn_hidden_size", f"{name}.ffn_config")
    attn = h * nq * d + 2 * h * nkv * d + nq * d * h
    return ModelSpec(
        name=name, family="dbrx", vocab_size=V, hidden=h, num_layers=L, num_q_heads=nq, num_kv_heads=nkv,
        head_dim=d, attn_elems=attn, kv_elems_per_token_layer=2 * nkv * d,
        moe_layers=tuple(range(L)), num_experts=E, top_k=topk, expert_intermediate=h_e, expert_matrices=3,
        shared_expert_intermediate=0, dense_intermediate=0,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        weight_dtype=str(cfg.get("torch_dtype") or "bfloat16"), norm_topk_prob=True,
        source=src, config_sha256=_sha(cfg), published_params=_published(cfg),
    )


def _sha(cfg: dict) -> str:
    core = {k: v for k, v in cfg.items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()


def _published(cfg: dict) -> dict[str, str]:
    p = cfg.get("_params")
    if isinstance(p, dict):
        return {k: str(v) for k, v in p.items() if k in ("total", "active")}
    return {}
