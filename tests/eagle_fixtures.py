"""EAGLE heads for the tests: random ones in each published layout (and as a PyTorch .bin), over the bundled
target's width and vocabulary unless told otherwise, plus the trained models/tiny-eagle."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from engine_fixtures import REPO, TINY_MOE

TINY_EAGLE = REPO / "models" / "tiny-eagle"
LLAMA = dict(hidden_size=128, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
             head_dim=32, vocab_size=2048, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
             hidden_act="silu", tie_word_embeddings=False, torch_dtype="float32", model_type="llama",
             bos_token_id=1, eos_token_id=2)


def have_tiny_eagle() -> bool:
    return (TINY_EAGLE / "config.json").is_file() and (TINY_MOE / "config.json").is_file()


def head_state(cfg: dict, seed: int = 0, fc_bias: bool = True, embed: bool = False) -> dict[str, torch.Tensor]:
    """Random weights of an EAGLE-1 head in the published layout (fc, layers.{i}.*)."""
    g = torch.Generator().manual_seed(seed)
    H, I, D = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    nq, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    r = lambda o, i: torch.randn(o, i, generator=g) * i ** -0.5  # noqa: E731
    sd = {"fc.weight": r(H, 2 * H)}
    if fc_bias:
        sd["fc.bias"] = 0.1 * torch.randn(H, generator=g)
    for i in range(cfg["num_hidden_layers"]):
        p = f"layers.{i}."
        sd.update({p + "self_attn.q_proj.weight": r(nq * D, H), p + "self_attn.k_proj.weight": r(nkv * D, H),
                   p + "self_attn.v_proj.weight": r(nkv * D, H), p + "self_attn.o_proj.weight": r(H, nq * D),
                   p + "post_attention_layernorm.weight": 1 + 0.1 * torch.randn(H, generator=g),
                   p + "mlp.gate_proj.weight": r(I, H), p + "mlp.up_proj.weight": r(I, H),
                   p + "mlp.down_proj.weight": r(H, I)})
        if i > 0:
            sd[p + "input_layernorm.weight"] = torch.ones(H)
    if embed:
        sd["embed_tokens.weight"] = torch.randn(cfg["vocab_size"], H, generator=g)
    return sd


def make_head(path: Path, *, style: str = "marked", prefix: str = "", seed: int = 0, bin_only: bool = False,
              base: dict | None = None, embed: bool = False, **over) -> Path:
    """An EAGLE head directory. style: "marked" (architectures EagleLlamaForCausalLM), "plain" (a
    LlamaForCausalLM config: told by its fc.weight), "eagle_type" (vLLM's model_type eagle with the layer's
    config under `model`). prefix: prepended to every tensor name ("model." as vLLM's converted heads)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    layer = {**LLAMA, **over}
    cfg: dict = dict(layer, architectures=["EagleLlamaForCausalLM" if style == "marked" else "LlamaForCausalLM"])
    if style == "eagle_type":
        cfg = {"model_type": "eagle", "architectures": ["EAGLEModel"], "model": layer}
    if base is not None:
        cfg["eagle_base_model"] = base
    (path / "config.json").write_text(json.dumps(cfg))
    sd = {prefix + k: v for k, v in head_state(layer, seed, embed=embed).items()}
    if bin_only:
        torch.save(sd, path / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file

        save_file(sd, str(path / "model.safetensors"))
    return path
