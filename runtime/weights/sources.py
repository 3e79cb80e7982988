"""Where weights come from: a checkpoint directory, or a seeded random generator (benchmarks at scale).

Both give the same interface: `config` (ArchConfig), `tensor(name)` for every non-expert tensor
by its HF name (see checkpoint.expected_shapes), `router(layer)` and `expert(layer, e)`.
The random source draws each tensor from its own generator seeded by (seed, name), so the
same seed gives the same weights in any order and on any generation device.

Dimensions: V vocab, H hidden, E experts, F expert intermediate.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from specmoe.planner.errors import SpecError

from specmoe.planner.model_spec import ModelSpec
from specmoe.runtime.weights.arch import arch_from_spec, head_shapes
from specmoe.runtime.weights.checkpoint import DTYPES, ArchConfig, Checkpoint, expected_shapes, parse_config


class WeightSource:
    """Base: subclasses implement tensor(), router(), expert()."""

    config: ArchConfig
    path: Path | None = None
    description: str = ""

    def tensor(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def has(self, name: str) -> bool:
        return name in expected_shapes(self.config)

    def router(self, layer: int) -> torch.Tensor:  # [E, H]
        raise NotImplementedError

    def expert(self, layer: int, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate [F, H], up [F, H], down [H, F])."""
        raise NotImplementedError

    def release(self) -> None:
        """Drop what the source holds of the tensors read so far (open files, mapped pages); reads go on."""

    @staticmethod
    def from_checkpoint(path: str | Path, validate: bool = True) -> "CheckpointWeights":
        return CheckpointWeights(path, validate=validate)

    @staticmethod
    def random(model: Any, seed: int = 0, dtype: torch.dtype | str = torch.bfloat16,
               device_for_generation: str | torch.device = "cpu") -> "RandomWeights":
        return RandomWeights(model, seed=seed, dtype=dtype, device_for_generation=device_for_generation)


class CheckpointWeights(WeightSource):
    def __init__(self, path: str | Path, validate: bool = True):
        self.ckpt = Checkpoint(path)
        self.config = self.ckpt.config
        self.path = Path(path)
        self.description = f"checkpoint {self.path.name}"
        self._shapes = expected_shapes(self.config)
        if validate:
            self.ckpt.validate()

    def tensor(self, name: str) -> torch.Tensor:
        return self.ckpt.get(name, self._shapes.get(name))

    def router(self, layer: int) -> torch.Tensor:
        return self.ckpt.router(layer)

    def expert(self, layer: int, e: int):
        return self.ckpt.expert(layer, e)

    def release(self) -> None:
        self.ckpt.release()


def config_from_model_spec(spec: Any) -> ArchConfig:
    """The engine's ArchConfig of a planner ModelSpec (or its dict, as a plan carries it)."""
    return arch_from_spec(spec if isinstance(spec, ModelSpec) else ModelSpec.from_dict(spec))


class RandomWeights(WeightSource):
    """Seeded random weights, drawn on `device_for_generation` (e.g. the GPU: fast) in `dtype`.

    Linear weights ~ N(0, 1/fan_in) so activations keep their scale through many layers; norms are 1;
    embeddings ~ N(0, 1). Tensors are returned on the generation device; callers move them.
    """

    def __init__(self, model: Any, seed: int = 0, dtype: torch.dtype | str = torch.bfloat16,
                 device_for_generation: str | torch.device = "cpu"):
        if isinstance(model, ArchConfig):
            self.config = model
        elif isinstance(model, dict) and "model_type" in model:
            self.config = parse_config(model, "random weights")
        else:
            self.config = config_from_model_spec(model)
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise SpecError("dtype", f"unknown dtype {dtype!r}", f"one of {', '.join(DTYPES)}")
            dtype = DTYPES[dtype]
        self.dtype = dtype
        self.seed = int(seed)
        self.gen_device = torch.device(device_for_generation)
        self._shapes = expected_shapes(self.config)
        if self.config.eagle:    # an EAGLE head: fc and its layers, by runtime/weights/eagle.py's names
            self._shapes = {**head_shapes(self.config), "fc.bias": (self.config.hidden,)}
        self.description = f"random seed={seed} dtype={str(dtype).replace('torch.', '')}"

    def _gen(self, name: str) -> torch.Generator:
        h = int.from_bytes(hashlib.sha256(f"{self.seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)
        g = torch.Generator(device=self.gen_device)
        g.manual_seed(h)
        return g

    def _draw(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name.endswith("norm.weight") or "layernorm" in name:
            return torch.ones(shape, dtype=self.dtype, device=self.gen_device)
        g = self._gen(name)
        t = torch.randn(shape, generator=g, device=self.gen_device, dtype=torch.float32)
        if name.endswith(".bias"):
            t.mul_(0.02)
        elif "embed_tokens" not in name:
            t.mul_(shape[-1] ** -0.5)
        return t.to(self.dtype)

    def has(self, name: str) -> bool:
        return name in self._shapes

    def tensor(self, name: str) -> torch.Tensor:
        shape = self._shapes.get(name)
        if shape is None:
            raise SpecError("weights", f"no tensor {name} in a {self.config.family} model", "internal error")
        return self._draw(name, shape)

    def router(self, layer: int) -> torch.Tensor:
        return self._draw(f"model.layers.{layer}.router", (self.config.num_experts, self.config.hidden))

    def expert(self, layer: int, e: int):
        c = self.config
        F, H = c.moe_intermediate, c.hidden
        p = f"model.layers.{layer}.experts.{e}."
        return self._draw(p + "gate", (F, H)), self._draw(p + "up", (F, H)), self._draw(p + "down", (H, F))


def as_weight_source(x: Any) -> WeightSource:
    """A WeightSource from itself or a checkpoint directory path."""
    if isinstance(x, WeightSource):
        return x
    if isinstance(x, (str, Path)):
        return WeightSource.from_checkpoint(x)
    raise SpecError("weights", f"{type(x).__name__} is neither a checkpoint directory nor a WeightSource",
                    "pass a path")
