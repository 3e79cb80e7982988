"""Model specs read from Hugging Face `config.json` files (facts only, no weights).

Notation (DESIGN.md): hidden h, expert intermediate h_e, experts E, active top-k n_a, layers l,
KV heads n_kv, head dim d, GQA group g = n_q / n_kv, weight bytes w_b.

Families: Mixtral, Qwen2-MoE (shared expert), Qwen3-MoE, OLMoE, DeepSeek-V2/V3 (MLA, shared
experts, leading dense layers), Phi-3.5-MoE, GPT-OSS, DBRX, and dense drafts (Llama, Mistral,
Qwen2/Qwen3, OLMo).
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from specmoe.planner.errors import SpecError
from specmoe.planner.hf_config import DENSE_FAMILIES, MOE_FAMILIES, parse_hf_config, read_config_file
from specmoe.planner.paths import exists, is_file

PRESET_DIR = Path(__file__).resolve().parent / "presets"

DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2,
               "float8": 1, "fp8": 1, "int8": 1, "int4": 0.5, "mxfp4": 0.5}

__all__ = ["ModelSpec", "load_model", "list_presets", "default_draft_name", "DEFAULT_DRAFTS", "DTYPE_BYTES",
           "MOE_FAMILIES", "DENSE_FAMILIES", "PRESET_DIR"]


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
    # ---- what the engine's forward needs beyond the cost model (planner/hf_config.py) ----
    hidden_act: str = "silu"
    rms_eps: float = 1e-6
    rope: dict = field(default_factory=dict)       # transformers' rope_parameters: rope_type, rope_theta, ...
    max_position_embeddings: int = 1 << 30
    qkv_bias: bool = False                         # q, k and v projections carry a bias
    o_bias: bool = False                           # the output projection carries one
    qk_norm: str = "none"                          # "none" | "head" (Qwen3: per head) | "full" (OLMoE: all heads)
    clip_qkv: float | None = None
    mlp_bias: bool = False
    sliding_window: int | None = None              # None: full attention
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    # an EAGLE draft head (planner/eagle.py): {"fc_bias", "base_model"}; {} for a model. A head's fc layer
    # (2h -> h) is counted with its weights; its embedding and LM head are the target's
    eagle: dict = field(default_factory=dict)

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
    def fusion_elems(self) -> int:
        """An EAGLE head's fc layer over [embedding; target hidden state]: 2h x h (+ h of bias); 0 otherwise."""
        if not self.eagle:
            return 0
        return 2 * self.hidden * self.hidden + (self.hidden if self.eagle.get("fc_bias") else 0)

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
        n_moe = len(set(self.moe_layers))       # per layer as non_expert_layer_elems, counted in O(L)
        per_layer = self.attn_elems + 2 * self.hidden
        n = (self.num_layers * per_layer + n_moe * (self.router_elems + self.shared_expert_elems)
             + (self.num_layers - n_moe) * self.dense_ffn_elems
             + self.embed_elems + self.lm_head_elems + self.hidden + self.fusion_elems)
        # an EAGLE-1 head has no input norm on its first layer and no final norm (the target's LM head
        # reads its output as it is)
        return n - 2 * self.hidden if self.eagle else n

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
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        d = dict(d)
        d["moe_layers"] = tuple(d.get("moe_layers", ()))
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)

    # ---- construction ----
    @classmethod
    def from_hf_config(cls, path_or_dict: str | Path | dict, name: str | None = None,
                       directory: str | Path | None = None) -> "ModelSpec":
        """Read a HF config.json (a path to the file or its directory, or the dict itself; directory: the
        checkpoint directory of a dict, where an EAGLE head's weights name it one, planner/eagle.py)."""
        if isinstance(path_or_dict, dict):
            cfg, src = path_or_dict, name or "dict"
        else:
            cfg, p = read_config_file(path_or_dict)
            src = str(p)
            name = name or (p.parent.name if p.name == "config.json" else p.stem)
            directory = p.parent
        return cls(name=name or "model", source=src, **parse_hf_config(cfg, name or "model", directory))

    @classmethod
    def preset(cls, name: str) -> "ModelSpec":
        p = PRESET_DIR / f"{name}.json"
        if not is_file(p):
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
    if is_file(PRESET_DIR / f"{s}.json"):
        return ModelSpec.preset(s)
    if exists(s):
        return ModelSpec.from_hf_config(s)
    cached = hf_cache_config(s)
    if cached is not None:
        return ModelSpec.from_hf_config(cached, name=s.split("/")[-1])
    raise SpecError("model", f"{s if len(s) <= 80 else s[:77] + '...'!r} is neither a preset, an existing path nor a "
                    "model id in the local Hugging Face cache",
                    f"choose a preset ({', '.join(list_presets())}), give a path to a config.json, or a model id "
                    "whose config.json is in the cache (huggingface-cli download ID config.json)")


_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")


def hf_cache_config(model_id: str) -> Path | None:
    """The config.json of a Hugging Face model id ("org/name") in the local cache, offline: the newest
    snapshot under $HF_HUB_CACHE, $HF_HOME/hub or ~/.cache/huggingface/hub (None when absent)."""
    if not _HF_ID.match(model_id) or ".." in model_id:
        return None
    roots = [os.environ.get("HF_HUB_CACHE"), os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME")
             else None, os.path.join(os.path.expanduser("~"), ".cache", "huggingface", "hub")]
    for root in (Path(r) for r in roots if r):
        repo = root / ("models--" + model_id.replace("/", "--"))
        ref = repo / "refs" / "main"
        snaps = [repo / "snapshots" / ref.read_text().strip()] if is_file(ref) else []
        try:
            snaps += sorted((repo / "snapshots").iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
        except OSError:
            pass
        for snap in snaps:
            if is_file(snap / "config.json"):
                return snap / "config.json"
    return None
