"""EAGLE draft heads: how a config.json says it is one, and whether a head fits its target.

An EAGLE-1 head (arXiv 2401.15077; the draft SpecMoEOff runs) is an fc layer over [the next token's
embedding; the target's last hidden state] (2h -> h) into one Llama decoder layer; it embeds tokens
and projects to the vocabulary with the target's own embedding and LM head. Its config.json is a
Llama config (one layer, the target's width and vocabulary). A head is recognised by:

  1. `model_type: "eagle"` (vLLM's EAGLEConfig: the layer's Llama config under `model`), or
  2. an `architectures` entry naming EAGLE (`EagleLlamaForCausalLM`, vLLM's name; `EAGLEModel`), or
  3. a dense Llama config whose safetensors hold `fc.weight` (the layout the EAGLE authors publish:
     `fc.weight`, `layers.0.self_attn.q_proj.weight`, ..., no `model.` prefix), read from the files'
     JSON headers only.

EAGLE-3 heads (several target layers fused, a reduced draft vocabulary) are a different model and are
refused. `eagle_base_model` (optional, written by scripts/train_eagle.py) names the target a head was
trained on; `check_head_matches` refuses a head whose width, vocabulary or named base differs from the
target's. Pure Python: the planner costs a head from its config without torch.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from specmoe.planner.errors import SpecError
from specmoe.planner.paths import is_dir, is_file

EAGLE_ARCHITECTURES = ("EagleLlamaForCausalLM", "EAGLEModel", "EagleModel")
# what eagle_base_model may name, each compared with the target's config.json
BASE_FIELDS = ("model_type", "hidden_size", "vocab_size", "num_hidden_layers", "config_sha256")
HEADER_MAX_BYTES = 100 << 20          # a safetensors header larger than this is not a head's


def _architectures(cfg: dict) -> list[str]:
    a = cfg.get("architectures") or []
    return [str(x) for x in a] if isinstance(a, list) else []


def layer_config(cfg: dict, where: str) -> dict:
    """The Llama config of the head's decoder layer: vLLM's EAGLEConfig nests it under `model`."""
    if cfg.get("model_type") != "eagle":
        return cfg
    inner = cfg.get("model")
    if not isinstance(inner, dict):
        raise SpecError(f"{where}.model", "an EAGLE config (model_type eagle) needs its layer's config under `model`",
                        "give the head's Llama config there (vLLM's EAGLEConfig layout)")
    return {**inner, **{k: cfg[k] for k in ("eagle_base_model", "bias") if k in cfg}}


def marked_eagle(cfg: dict, where: str) -> bool:
    """Whether the config itself says it is an EAGLE head (rules 1 and 2 of the module doc)."""
    inner = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}     # vLLM's EAGLEConfig: the layer
    archs = _architectures(cfg) + _architectures(inner)
    if any("eagle3" in a.lower() for a in archs):
        raise SpecError(f"{where}.architectures", f"{archs} is an EAGLE-3 head, which this engine does not run",
                        "use an EAGLE-1 head (fc over [embedding; last hidden state] into one decoder layer)")
    return cfg.get("model_type") == "eagle" or any(a in EAGLE_ARCHITECTURES for a in archs)


def safetensors_keys(directory: str | Path) -> set[str]:
    """Tensor names of a checkpoint directory's safetensors files, from the index or the JSON headers
    (nothing else is read); empty when there are none or a header is unreadable."""
    d = Path(directory)
    idx = d / "model.safetensors.index.json"
    try:
        if is_file(idx):
            wm = json.loads(idx.read_text()).get("weight_map")
            return set(wm) if isinstance(wm, dict) else set()
        keys: set[str] = set()
        for f in sorted(d.glob("*.safetensors")):
            with open(f, "rb") as fh:
                n = struct.unpack("<Q", fh.read(8))[0]
                if n > HEADER_MAX_BYTES:
                    return set()
                keys.update(k for k in json.loads(fh.read(n)) if k != "__metadata__")
        return keys
    except (OSError, ValueError, struct.error, UnicodeDecodeError):
        return set()


def has_fc_weights(directory: str | Path | None) -> bool:
    """Rule 3: the directory's safetensors hold an EAGLE fc layer (`fc.weight`, possibly under `model.`)."""
    if directory is None or not is_dir(directory):
        return False
    return any(k.split("model.")[-1] in ("fc.weight", "fusion_fc.weight") for k in safetensors_keys(directory))


def eagle_fields(cfg: dict, eagle: bool, directory: str | Path | None = None) -> dict[str, Any]:
    """ModelSpec.eagle: {} for a model; for a head {"fc_bias": bool, "base_model": {...}} (fc_bias: whether
    the weights hold fc.bias, else config.json's `bias`; base_model: what eagle_base_model names, {} when the
    config names none)."""
    if not eagle:
        return {}
    base = cfg.get("eagle_base_model") or {}
    if not isinstance(base, dict):
        raise SpecError("config.eagle_base_model", f"must be a JSON object, got {base!r}",
                        f"give some of {', '.join(BASE_FIELDS)} of the target")
    keys = {k.split("model.")[-1] for k in safetensors_keys(directory)} if directory is not None and is_dir(directory) \
        else set()
    fc_bias = bool({"fc.bias", "fusion_fc.bias"} & keys) if keys else bool(cfg.get("bias", False))
    return {"fc_bias": fc_bias, "base_model": {k: base[k] for k in BASE_FIELDS if k in base}}


def check_head_matches(model: Any, head: Any) -> None:
    """Refuse an EAGLE head (a ModelSpec with .eagle) that does not fit the target ModelSpec `model`, naming
    the mismatch: the head's width and vocabulary are the target's (it reads the target's hidden states and
    embeddings), and what eagle_base_model names must be the target's."""
    if not getattr(head, "eagle", None):
        return
    fix = "use the EAGLE head trained for this target, or train one with scripts/train_eagle.py"
    for field, ours, theirs in (("hidden_size", head.hidden, model.hidden), ("vocab_size", head.vocab_size,
                                                                              model.vocab_size)):
        if ours != theirs:
            raise SpecError(f"draft {head.name}: config.json {field}", f"is {ours} but the target "
                            f"{model.name} has {theirs}: the head reads the target's hidden states and embeddings", fix)
    target = {"model_type": model.family, "hidden_size": model.hidden, "vocab_size": model.vocab_size,
              "num_hidden_layers": model.num_layers, "config_sha256": model.config_sha256}
    for key, want in head.eagle.get("base_model", {}).items():
        if key in target and target[key] and want != target[key]:
            raise SpecError(f"draft {head.name}: config.json eagle_base_model.{key}",
                            f"is {want!r} but the target {model.name} has {target[key]!r}: the head was trained "
                            "for another base model", fix)
