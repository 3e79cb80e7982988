"""The one parser of Hugging Face `config.json` files: the planner's ModelSpec and the engine's
architecture (runtime/weights/arch.py) are both built from what `parse_hf_config` returns.

    cfg = read_config_file("models/tiny-moe")           # the JSON object (a file or its directory)
    fields = parse_hf_config(cfg, "tiny-moe")            # ModelSpec's fields, elements not bytes

Rules that differ by family are written once here: which attention projections carry a bias
(Qwen2: q, k and v; Qwen2-MoE: q, k and v unless `qkv_bias` is false; the rest: all four when
`attention_bias`), the QK-norm (Qwen3: per head; OLMoE: over all heads), the sliding window (Qwen
uses it only with `use_sliding_window`), which layers are MoE, and the defaults transformers' own
config classes use for keys a config.json leaves out (`FAMILY_DEFAULTS`). A config without a dtype
is taken as bfloat16, the dtype every supported family is published in.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from specmoe.planner.eagle import eagle_fields, has_fc_weights, layer_config, marked_eagle
from specmoe.planner.errors import SpecError
from specmoe.planner.paths import is_dir, is_file

MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3",
                "phimoe", "gpt_oss", "dbrx")
DENSE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "phi3", "gemma", "gemma2")
DEFAULT_WEIGHT_DTYPE = "bfloat16"
EAGLE_MAX_LAYERS = 2           # a plain Llama config this small is checked for an EAGLE head's fc weights

# transformers' config-class defaults for keys a config.json may leave out
FAMILY_DEFAULTS: dict[str, dict[str, float]] = {
    "mixtral": {"rope_theta": 1e6, "rms_norm_eps": 1e-5},
    "phimoe": {"rope_theta": 1e6, "rms_norm_eps": 1e-5},
    "olmoe": {"rope_theta": 1e4, "rms_norm_eps": 1e-5},
}
_DEFAULTS = {"rope_theta": 1e4, "rms_norm_eps": 1e-6}


def read_config_file(path: str | Path) -> tuple[dict, Path]:
    """The JSON object of a config.json (the file, or the directory holding it) and the file's path."""
    p = Path(path)
    if is_dir(p):
        p = p / "config.json"
    if not is_file(p):
        raise SpecError("model", f"no config.json at {p}",
                        "give a preset name (see `specmoe presets`) or a path to a HF config.json")
    try:
        cfg = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SpecError(f"model config {p}", f"not valid JSON: {e}", "fix the file") from None
    if not isinstance(cfg, dict):
        raise SpecError(f"model config {p}", "top level is not a JSON object", "fix the file")
    return cfg, p


# the largest value each size can mean (several times the largest published model's): beyond it a
# config is a typo, and loops over layers or experts would run for hours
SIZE_LIMITS: dict[str, int] = {
    "num_hidden_layers": 512, "n_layers": 512, "num_local_experts": 65536, "num_experts": 65536,
    "n_routed_experts": 65536, "moe_num_experts": 65536, "num_experts_per_tok": 1024, "experts_per_token": 1024,
    "moe_top_k": 1024, "num_attention_heads": 4096, "num_key_value_heads": 4096, "n_heads": 4096,
    "kv_n_heads": 4096, "hidden_size": 1 << 17, "d_model": 1 << 17, "head_dim": 1 << 14,
    "vocab_size": 1 << 23, "max_position_embeddings": 1 << 30, "sliding_window": 1 << 30,
}
DEFAULT_SIZE_LIMIT = 1 << 22        # intermediate sizes, ranks, counts of shared experts


def get_int(cfg: dict, key: str, where: str, *alts: str, default: Any = ..., minimum: int = 1) -> Any:
    """An integer in [minimum, SIZE_LIMITS] under `key` (or the first of `alts` present); `default` when none is."""
    for k in (key, *alts):
        if k in cfg and cfg[k] is not None:
            v = cfg[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or int(v) != v:
                raise SpecError(f"{where}.{k}", f"must be an integer, got {v!r}", "fix config.json")
            if int(v) < minimum:
                raise SpecError(f"{where}.{k}", f"must be >= {minimum}, got {int(v)}", "fix config.json")
            top = SIZE_LIMITS.get(k, DEFAULT_SIZE_LIMIT)
            if int(v) > top:
                raise SpecError(f"{where}.{k}", f"is {int(v)}, beyond any model's ({top} at most)",
                                "fix config.json (a typo?)")
            return int(v)
    if default is ...:
        raise SpecError(f"{where}.{key}", "missing from config.json",
                        "add it, or check that this is a supported model family")
    return default


def get_float(cfg: dict, key: str, where: str, default: float, lo: float, hi: float) -> float:
    """A finite number in (lo, hi] under `key`; `default` when absent or null."""
    v = cfg.get(key)
    if v is None:
        return float(default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo < v <= hi:
        raise SpecError(f"{where}.{key}", f"must be a number in ({lo:g}, {hi:g}], got {v!r}", "fix config.json")
    return float(v)


def _int_list(cfg: dict, key: str, where: str) -> list[int]:
    v = cfg.get(key) or []
    if not isinstance(v, list) or any(isinstance(x, bool) or not isinstance(x, int) for x in v):
        raise SpecError(f"{where}.{key}", f"must be a list of layer indices, got {v!r}", "fix config.json")
    return v


def _mapping(cfg: dict, key: str, where: str) -> dict:
    v = cfg.get(key) or {}
    if not isinstance(v, dict):
        raise SpecError(f"{where}.{key}", f"must be a JSON object, got {v!r}", "fix config.json")
    return v


def parse_hf_config(cfg: dict, name: str, directory: str | Path | None = None) -> dict[str, Any]:
    """ModelSpec's fields (without name and source) from a config.json object. directory: the checkpoint
    directory, where an EAGLE head written as a plain Llama config is told by its weights' names
    (planner/eagle.py)."""
    if not isinstance(cfg, dict):
        raise SpecError(f"{name}: config.json", "top level is not a JSON object", "fix the file")
    eagle = marked_eagle(cfg, name)
    cfg = layer_config(cfg, name)
    out = _parse_model(cfg, name)
    if not eagle and out["family"] in DENSE_FAMILIES and out["num_layers"] <= EAGLE_MAX_LAYERS:
        eagle = has_fc_weights(directory)
    if eagle:
        if out["family"] not in DENSE_FAMILIES:
            raise SpecError(f"{name}.model_type", f"an EAGLE head's layer must be dense, got {out['family']!r}",
                            "give the head's Llama config")
        out["tie_word_embeddings"] = False      # its logits come from the target's LM head: V x h per token
    out["eagle"] = eagle_fields(cfg, eagle, directory)
    return out


def _parse_model(cfg: dict, name: str) -> dict[str, Any]:
    mt = cfg.get("model_type")
    supported = ", ".join(MOE_FAMILIES + DENSE_FAMILIES)
    if not isinstance(mt, str):
        raise SpecError(f"{name}.model_type", "missing from config.json", f"supported: {supported}")
    if mt == "dbrx":
        return _parse_dbrx(cfg, name)
    if mt not in MOE_FAMILIES + DENSE_FAMILIES:
        raise SpecError(f"{name}.model_type", f"unsupported family {mt!r}", f"supported: {supported}")
    out = _heads(cfg, mt, name)
    out.update(_ffn(cfg, mt, name, out["num_layers"]))
    out.update(_details(cfg, mt, name))
    out.update(family=mt, vocab_size=get_int(cfg, "vocab_size", name),
               tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
               weight_dtype=str(cfg.get("dtype") or cfg.get("torch_dtype") or DEFAULT_WEIGHT_DTYPE),
               config_sha256=config_sha256(cfg), published_params=_published(cfg))
    if mt == "gpt_oss":
        out["weight_dtype"] = "bfloat16"   # MXFP4 experts: the planner budgets bf16 unless the workload says otherwise
    out["attn_elems"] += _attn_bias_elems(out)
    return out


def _bias_rule(cfg: dict, mt: str) -> tuple[bool, bool]:
    """(q/k/v projections have a bias, the output projection has one)."""
    if mt == "qwen2":
        return True, False
    if mt == "qwen2_moe":
        return bool(cfg.get("qkv_bias", True)), False
    bias = bool(cfg.get("attention_bias", False))
    return bias, bias


def _heads(cfg: dict, mt: str, where: str) -> dict[str, Any]:
    """Attention shape: heads, head dim, attention weight elements (biases apart), KV per token."""
    h = get_int(cfg, "hidden_size", where)
    nq = get_int(cfg, "num_attention_heads", where)
    nkv = get_int(cfg, "num_key_value_heads", where, default=nq)
    if nq % nkv:
        raise SpecError(f"{where}.num_key_value_heads", f"{nkv} does not divide num_attention_heads={nq}",
                        "fix config.json")
    if "head_dim" not in cfg and h // nq == 0:
        raise SpecError(f"{where}.num_attention_heads", f"{nq} heads exceed hidden_size={h}: the head dimension "
                        "would be 0", "fix config.json (or give head_dim)")
    d = get_int(cfg, "head_dim", where, default=h // nq)
    out = dict(hidden=h, num_layers=get_int(cfg, "num_hidden_layers", where), num_q_heads=nq)
    if mt in ("deepseek_v2", "deepseek_v3") and cfg.get("kv_lora_rank"):
        r_kv = get_int(cfg, "kv_lora_rank", where)
        d_nope = get_int(cfg, "qk_nope_head_dim", where)
        d_rope = get_int(cfg, "qk_rope_head_dim", where)
        d_v = get_int(cfg, "v_head_dim", where)
        r_q = get_int(cfg, "q_lora_rank", where, default=0)
        dq = d_nope + d_rope
        q = h * nq * dq if not r_q else h * r_q + r_q + r_q * nq * dq
        kv_a = h * (r_kv + d_rope) + r_kv            # down-projection + its norm
        kv_b = r_kv * nq * (d_nope + d_v)             # up-projection
        # MLA caches the latent and the rope key; its heads read one shared latent
        return {**out, "num_kv_heads": nq, "head_dim": d_v, "attn_elems": q + kv_a + kv_b + nq * d_v * h,
                "kv_elems_per_token_layer": r_kv + d_rope}
    attn = h * nq * d + 2 * h * nkv * d + nq * d * h
    if mt == "gpt_oss":
        attn += nq                                    # attention sinks
    return {**out, "num_kv_heads": nkv, "head_dim": d, "attn_elems": attn, "kv_elems_per_token_layer": 2 * nkv * d}


def _attn_bias_elems(f: dict) -> int:
    qkv = (f["num_q_heads"] + 2 * f["num_kv_heads"]) * f["head_dim"] if f["qkv_bias"] else 0
    return qkv + (f["hidden"] if f["o_bias"] else 0)


def _ffn(cfg: dict, mt: str, where: str, L: int) -> dict[str, Any]:
    """Routed experts, shared experts, dense FFN, and which layers are MoE."""
    if mt not in MOE_FAMILIES:
        return dict(moe_layers=(), num_experts=0, top_k=0, expert_intermediate=0, expert_matrices=3,
                    shared_expert_intermediate=0, dense_intermediate=get_int(cfg, "intermediate_size", where))
    E = get_int(cfg, "num_local_experts", where, "num_experts", "n_routed_experts")
    topk = get_int(cfg, "num_experts_per_tok", where, "experts_per_token")
    if topk > E:
        raise SpecError(f"{where}.num_experts_per_tok", f"{topk} exceeds the number of experts {E}", "fix config.json")
    if mt in ("qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"):
        h_e = get_int(cfg, "moe_intermediate_size", where)
    else:
        h_e = get_int(cfg, "intermediate_size", where)
    shared = 0
    if mt == "qwen2_moe":
        shared = get_int(cfg, "shared_expert_intermediate_size", where, default=0, minimum=0)
    if mt in ("deepseek_v2", "deepseek_v3"):
        shared = get_int(cfg, "n_shared_experts", where, default=0, minimum=0) * h_e
    first_dense = get_int(cfg, "first_k_dense_replace", where, default=0, minimum=0)
    freq = get_int(cfg, "moe_layer_freq", where, "decoder_sparse_step", default=1)
    mlp_only = set(_int_list(cfg, "mlp_only_layers", where))
    moe_layers = tuple(i for i in range(L) if i >= first_dense and (i + 1) % freq == 0 and i not in mlp_only)
    dense = 0 if mt in ("mixtral", "phimoe", "olmoe", "gpt_oss") else \
        get_int(cfg, "intermediate_size", where, default=0, minimum=0)
    if len(moe_layers) < L and not dense:
        dense = get_int(cfg, "intermediate_size", where)   # the dense layers need it
    return dict(moe_layers=moe_layers, num_experts=E, top_k=topk, expert_intermediate=h_e, expert_matrices=3,
                shared_expert_intermediate=shared, dense_intermediate=dense)


def _rope(cfg: dict, mt: str, where: str = "config") -> dict:
    """transformers' rope_parameters: {"rope_type", "rope_theta", ...scaling keys}."""
    theta = get_float(cfg, "rope_theta", where, FAMILY_DEFAULTS.get(mt, _DEFAULTS)["rope_theta"], 0.0, 1e12)
    rope = dict(_mapping(cfg, "rope_parameters", where))
    if not rope:
        rope = dict(_mapping(cfg, "rope_scaling", where))
        rope.setdefault("rope_type", rope.pop("type", "default"))
        rope["rope_theta"] = theta
    rope.setdefault("rope_type", "default")
    rope.setdefault("rope_theta", theta)
    rope["rope_theta"] = get_float(rope, "rope_theta", f"{where}.rope_parameters", theta, 0.0, 1e12)
    return rope


def _details(cfg: dict, mt: str, where: str = "config") -> dict[str, Any]:
    """What the engine's forward needs beyond the cost model's facts."""
    qkv_bias, o_bias = _bias_rule(cfg, mt)
    window = get_int(cfg, "sliding_window", where, default=None, minimum=0) or None
    if mt in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe"):
        lt = cfg.get("layer_types")
        uses = bool(cfg.get("use_sliding_window", False)) and (not isinstance(lt, list) or "sliding_attention" in lt)
        window = window if uses else None
    if mt == "olmoe":
        window = None
    clip = get_float(cfg, "clip_qkv", where, 0.0, 0.0, 1e6) if mt == "olmoe" and cfg.get("clip_qkv") is not None \
        else None
    bos = cfg.get("bos_token_id")
    act = cfg.get("hidden_act", "silu")
    if not isinstance(act, str):
        raise SpecError(f"{where}.hidden_act", f"must be a string, got {act!r}", "e.g. \"silu\"")
    return dict(
        hidden_act=act,
        rms_eps=get_float(cfg, "rms_norm_eps", where, FAMILY_DEFAULTS.get(mt, _DEFAULTS)["rms_norm_eps"], 0.0, 1.0),
        rope=_rope(cfg, mt, where),
        max_position_embeddings=get_int(cfg, "max_position_embeddings", where, default=1 << 30),
        qkv_bias=qkv_bias, o_bias=o_bias,
        qk_norm={"qwen3": "head", "qwen3_moe": "head", "olmoe": "full"}.get(mt, "none"),
        clip_qkv=clip,
        mlp_bias=bool(cfg.get("mlp_bias", False)) if mt == "llama" else False,
        sliding_window=window,
        norm_topk_prob=True if mt == "mixtral" else bool(cfg.get("norm_topk_prob", mt in ("phimoe", "gpt_oss"))),
        eos_token_ids=token_ids(cfg.get("eos_token_id")),
        bos_token_id=bos if isinstance(bos, int) and not isinstance(bos, bool) else None,
    )


def _parse_dbrx(cfg: dict, name: str) -> dict[str, Any]:
    a = _mapping(cfg, "attn_config", name)
    f = _mapping(cfg, "ffn_config", name)
    h = get_int(cfg, "d_model", name)
    L = get_int(cfg, "n_layers", name)
    nq = get_int(cfg, "n_heads", name)
    nkv = get_int(a, "kv_n_heads", f"{name}.attn_config", default=nq)
    if h // nq == 0:
        raise SpecError(f"{name}.n_heads", f"{nq} heads exceed d_model={h}: the head dimension would be 0",
                        "fix config.json")
    d = h // nq
    return dict(
        family="dbrx", vocab_size=get_int(cfg, "vocab_size", name), hidden=h, num_layers=L, num_q_heads=nq,
        num_kv_heads=nkv, head_dim=d, attn_elems=h * nq * d + 2 * h * nkv * d + nq * d * h,
        kv_elems_per_token_layer=2 * nkv * d, moe_layers=tuple(range(L)),
        num_experts=get_int(f, "moe_num_experts", f"{name}.ffn_config"),
        top_k=get_int(f, "moe_top_k", f"{name}.ffn_config"),
        expert_intermediate=get_int(f, "ffn_hidden_size", f"{name}.ffn_config"), expert_matrices=3,
        shared_expert_intermediate=0, dense_intermediate=0,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        weight_dtype=str(cfg.get("torch_dtype") or DEFAULT_WEIGHT_DTYPE), norm_topk_prob=True,
        config_sha256=config_sha256(cfg), published_params=_published(cfg),
    )


def token_ids(v: Any) -> tuple[int, ...]:
    """A config's token id field (an int or a list of ints) as a tuple."""
    if isinstance(v, int) and not isinstance(v, bool):
        return (v,)
    if isinstance(v, (list, tuple)):
        return tuple(int(x) for x in v if isinstance(x, int) and not isinstance(x, bool))
    return ()


def config_sha256(cfg: dict) -> str:
    core = {k: v for k, v in cfg.items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()


def _published(cfg: dict) -> dict[str, str]:
    p = cfg.get("_params")
    if isinstance(p, dict):
        return {k: str(v) for k, v in p.items() if k in ("total", "active")}
    return {}
