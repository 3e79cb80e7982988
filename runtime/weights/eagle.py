"""EAGLE head checkpoints (planner/eagle.py says how a config.json names one): the layout the EAGLE
authors publish and vLLM loads, and the one-time conversion of a PyTorch `.bin` head to safetensors.

Tensor names, after a leading `model.` (or `model.model.`, vLLM's converted heads) is dropped and
speculators' `fusion_fc` read as `fc`:
  fc.weight [H, 2H] (+ fc.bias [H])      the fusion of [token embedding; target hidden state]
  layers.{i}.self_attn.{q,k,v,o}_proj.weight, layers.{i}.post_attention_layernorm.weight,
  layers.{i}.mlp.{gate,up,down}_proj.weight, layers.{i}.input_layernorm.weight (i > 0: EAGLE-1's first
  layer has none, and one given for it is not read, as in EAGLE's cnets.py and vLLM)
  embed_tokens.weight [V, H] (optional)  a copy of the target's: its shape is checked, the target's is used
  lm_head.weight, norm.weight            not read: the logits are the target's LM head over the head's output

`convert_bin(dir)` reads `pytorch_model*.bin` with torch.load(weights_only=True) (tensors only: no code
in the file runs) and writes model.safetensors; nothing else ever reads a `.bin`.

Dimensions: V vocab, H hidden, Hq/Hkv heads, D head dim, I intermediate.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import torch

from specmoe.planner.atomic_file import atomic_write_bytes
from specmoe.planner.eagle import check_head_matches, layer_config
from specmoe.planner.errors import SpecError
from specmoe.planner.hf_config import config_sha256, read_config_file
from specmoe.planner.model_spec import ModelSpec

from specmoe.runtime.weights.arch import ArchConfig, arch_from_spec, head_shapes
from specmoe.runtime.weights.checkpoint import Checkpoint, read_config
from specmoe.runtime.weights.sources import WeightSource, as_weight_source

ALIASES = {"fusion_fc.": "fc."}      # speculators' names of the same tensors


def canonical(name: str) -> str:
    """A stored tensor name as this module's table names it (prefixes dropped, aliases read)."""
    while name.startswith("model."):
        name = name[len("model."):]
    for old, new in ALIASES.items():
        if name.startswith(old):
            name = new + name[len(old):]
    return name


class EagleWeights(WeightSource):
    """An EAGLE head directory opened for reading tensors by canonical name (safetensors only)."""

    def __init__(self, path: str | Path, validate: bool = True):
        self.path = Path(path)
        if not self.path.is_dir() or not (self.path / "config.json").is_file():
            raise SpecError("draft", f"{self.path} is not a checkpoint directory with a config.json",
                            "give the EAGLE head's directory")
        raw, _ = read_config_file(self.path)
        self.spec = ModelSpec.from_hf_config(self.path)
        if not self.spec.eagle:
            raise SpecError("draft", f"{self.path} is not an EAGLE head (no EAGLE architecture in config.json and "
                            "no fc.weight in its safetensors)", "give an EAGLE head's directory")
        self.config = arch_from_spec(self.spec, layer_config(raw, str(self.path)))
        self.description = f"EAGLE head {self.path.name}"
        if not any(self.path.glob("*.safetensors")):
            bins = sorted(p.name for p in self.path.glob("*.bin"))
            raise SpecError("draft", f"no *.safetensors in {self.path}" + (f" (found {', '.join(bins)}: a pickled "
                            "PyTorch file, never loaded as it is)" if bins else ""),
                            f"convert it once: specmoe convert-eagle {self.path}" if bins else "give the head's weights")
        self.ckpt = Checkpoint(self.path, config=self.config)
        self.names = {canonical(k): k for k in self.ckpt.keys()}     # canonical -> stored
        self.shapes = head_shapes(self.config)
        if "fc.bias" in self.names:
            self.shapes["fc.bias"] = (self.config.hidden,)
        if validate:
            self.validate()

    def has(self, name: str) -> bool:
        return name in self.names

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise SpecError("draft", f"tensor {name} is missing from the EAGLE head {self.path}",
                            "is it an EAGLE-1 head (fc over [embedding; hidden state] and Llama layers)?")
        return self.ckpt.get(self.names[name], self.shapes.get(name))

    def validate(self) -> None:
        """Every tensor the forward reads exists with its shape (headers only); an embedding, when given, is
        config.json's vocabulary x width."""
        for name, shape in self.shapes.items():
            got = self.ckpt.shape(self.names[name]) if name in self.names else None
            if got is None:
                raise SpecError("draft", f"tensor {name} is missing from the EAGLE head {self.path}",
                                "is it an EAGLE-1 head (fc over [embedding; hidden state] and Llama layers)?")
            if got != tuple(shape):
                raise SpecError(f"draft {self.path.name}: {name}", f"has shape {got}, config.json implies "
                                f"{tuple(shape)}", "the weights do not match config.json")
        if "embed_tokens.weight" in self.names:
            got = self.ckpt.shape(self.names["embed_tokens.weight"])
            want = (self.config.vocab_size, self.config.hidden)
            if got != want:
                raise SpecError(f"draft {self.path.name}: embed_tokens.weight", f"has shape {got}, not vocabulary x "
                                f"hidden {want} of its config.json", "the weights do not match config.json")

    def release(self) -> None:
        self.ckpt.release()


def convert_bin(src: str | Path, out: str | Path | None = None) -> Path:
    """Convert a PyTorch-pickled head (`pytorch_model*.bin` in src) to out/model.safetensors (out: src by
    default; config.json is copied there). Read with torch.load(weights_only=True): tensors and plain
    containers only, so no code in the file runs; anything else is refused."""
    from safetensors.torch import save

    src = Path(src)
    out = src if out is None else Path(out)
    bins = sorted(src.glob("*.bin"))
    if not bins:
        raise SpecError("convert-eagle", f"no *.bin file in {src}", "give the directory of a PyTorch-pickled head")
    if not (src / "config.json").is_file():
        raise SpecError("convert-eagle", f"no config.json in {src}", "give the head's directory")
    tensors: dict[str, torch.Tensor] = {}
    for f in bins:
        try:
            sd = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:      # an object that is not a tensor (code, a class) is refused by weights_only
            raise SpecError("convert-eagle", f"{f.name} is not a plain state dict of tensors ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else ''})", "give the head's weights") from None
        if not isinstance(sd, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()):
            raise SpecError("convert-eagle", f"{f.name} is not a dict of named tensors", "give the head's weights")
        tensors.update({k: v.detach().clone().contiguous() for k, v in sd.items()})   # no shared storage
    out.mkdir(parents=True, exist_ok=True)
    if out.resolve() != src.resolve():
        shutil.copyfile(src / "config.json", out / "config.json")
    meta = {"format": "pt", "converted_from": json.dumps([f.name for f in bins])}
    return atomic_write_bytes(out / "model.safetensors", save(tensors, metadata=meta))


def is_eagle_dir(path) -> bool:
    """Whether a draft argument (a directory or a WeightSource) is an EAGLE head."""
    if isinstance(path, EagleWeights):
        return True
    if isinstance(path, WeightSource):
        return bool(path.config.eagle)
    return read_config(path).eagle


def draft_source(x) -> WeightSource:
    """The WeightSource of a draft argument: an EAGLE head's, or a draft model's."""
    if isinstance(x, WeightSource):
        return x
    return EagleWeights(x) if is_eagle_dir(x) else as_weight_source(x)


def check_head_for_target(tcfg: ArchConfig, head: ArchConfig, head_path=None, target_name: str = "target") -> None:
    """Refuse an EAGLE head that does not fit the target checkpoint (planner/eagle.py's check, on the
    checkpoint's own config.json)."""
    spec = ModelSpec.from_hf_config(head_path) if head_path is not None else \
        SimpleNamespace(name="head", eagle={"base_model": {}}, hidden=head.hidden, vocab_size=head.vocab_size)
    target = SimpleNamespace(name=target_name, family=tcfg.family, hidden=tcfg.hidden, vocab_size=tcfg.vocab_size,
                             num_layers=tcfg.num_layers, config_sha256=config_sha256(tcfg.raw) if tcfg.raw else "")
    check_head_matches(target, spec)
