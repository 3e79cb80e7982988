"""Hugging Face checkpoint directories: config.json, safetensors (single or sharded), tokenizer.

Targets: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE. Drafts: Llama, Mistral, Qwen2, Qwen3 (dense).
Routed experts come in two layouts, both read here:
  per-expert  `...experts.{e}.w1/w3/w2.weight` (Mixtral 4.x, under `block_sparse_moe`) or
              `...experts.{e}.gate_proj/up_proj/down_proj.weight` (Qwen, OLMoE, under `mlp`),
  fused 3-D   `...experts.gate_up_proj` [E, 2F, H] (gate rows first, then up) and
              `...experts.down_proj` [E, H, F] (transformers 5.x in-memory layout,
              `save_pretrained(save_original_format=False)`).
safetensors only (safe_open): never unpickle, never trust_remote_code.

Tensors are read with pread(2) (safetensors' "pread" backend, 0.7 and later) into fresh memory that the
caller moves to its final place, so no page of the file stays mapped into the process; with an older
safetensors (mmap only) `release()` drops the open files, and with them their mappings, after each layer.

Dimensions: V vocab, H hidden, Hq/Hkv heads, D head dim, E experts, F expert intermediate,
I dense/shared intermediate.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from specmoe.planner.errors import SpecError
from specmoe.planner.hf_config import read_config_file

from specmoe.runtime.weights.arch import (DRAFT_FAMILIES, DTYPES, SUPPORTED_FAMILIES, TARGET_FAMILIES, ArchConfig,
                          expected_shapes, moe_prefix, parse_config, router_name)

__all__ = ["Checkpoint", "Tokenizer", "load_tokenizer", "read_config", "ArchConfig", "parse_config", "expected_shapes",
           "moe_prefix", "router_name", "DTYPES", "TARGET_FAMILIES", "DRAFT_FAMILIES", "SUPPORTED_FAMILIES"]


class Checkpoint:
    """A HF checkpoint directory opened for reading tensors by name (safetensors only)."""

    def __init__(self, path: str | Path, config: ArchConfig | None = None):
        """config: the architecture when the caller has read it already (an EAGLE head's, whose config.json
        describes its layer: runtime/weights/eagle.py)."""
        self.path = Path(path)
        where = str(self.path)
        if not self.path.is_dir():
            raise SpecError("checkpoint", f"{where} is not a directory", "give a HF checkpoint directory")
        cfg_path = self.path / "config.json"
        if not cfg_path.is_file():
            raise SpecError("checkpoint", f"no config.json in {where}", "give a HF checkpoint directory")
        self.raw_config, _ = read_config_file(cfg_path)
        gen_path = self.path / "generation_config.json"
        gen = _read_json(gen_path, where) if gen_path.is_file() else None
        self.config = config if config is not None else parse_config(self.raw_config, where, gen)
        self._handles: dict[Path, Any] = {}
        self._layout: dict[int, tuple[str, str]] = {}
        self._key_file = self._index(where)

    # ---- files ----
    def _index(self, where: str) -> dict[str, Path]:
        idx = self.path / "model.safetensors.index.json"
        files: list[Path]
        if idx.is_file():
            wm = _read_json(idx, where).get("weight_map")
            if not isinstance(wm, dict):
                raise SpecError(f"{idx}", "has no weight_map", "re-save the checkpoint")
            files = sorted({self._shard(f, idx) for f in wm.values()})
            for f in files:
                if not f.is_file():
                    raise SpecError("checkpoint", f"shard {f.name} listed in {idx.name} is missing from {where}",
                                    "download the missing shard")
        else:
            files = sorted(self.path.glob("*.safetensors"))
        if not files:
            pickled = [p.name for p in self.path.glob("*.bin")] + [p.name for p in self.path.glob("*.pt")]
            hint = f" (found {', '.join(pickled)}: pickled weights are never loaded)" if pickled else ""
            raise SpecError("checkpoint", f"no *.safetensors files in {where}{hint}",
                            "convert the checkpoint to safetensors")
        out: dict[str, Path] = {}
        for f in files:
            for k in self._open(f).keys():
                out[k] = f
        self.release()
        return out

    def _shard(self, name: Any, idx: Path) -> Path:
        """A weight_map file name: a file inside the checkpoint directory, never a path out of it."""
        root = self.path.resolve()
        f = (self.path / name) if isinstance(name, str) and name else None
        if f is None or Path(name).is_absolute() or (f.resolve() != root and root not in f.resolve().parents):
            raise SpecError(f"{idx.name}.weight_map", f"{name!r} is not a file inside {self.path}",
                            "list shard file names relative to the checkpoint directory")
        return f

    def _open(self, f: Path):
        from safetensors import safe_open

        h = self._handles.get(f)
        if h is None:
            try:
                try:
                    h = safe_open(str(f), framework="pt", backend="pread")   # no mapped pages
                except TypeError:      # safetensors before 0.7 has no backends: mmap, dropped by release()
                    h = safe_open(str(f), framework="pt")
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise SpecError("checkpoint", f"cannot read {f}: {e}", "re-download or re-save the file") from None
            self._handles[f] = h
        return h

    def release(self) -> None:
        """Close the open files (they reopen on the next read): whatever they map is unmapped."""
        self._handles.clear()

    def has(self, name: str) -> bool:
        return name in self._key_file

    def keys(self) -> list[str]:
        return sorted(self._key_file)

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        f = self._key_file.get(name)
        if f is None:
            raise SpecError("checkpoint", f"tensor {name} is missing from {self.path}",
                            "is the checkpoint complete and of the family its config.json names?")
        try:
            t = self._open(f).get_tensor(name)
        except Exception as e:
            raise SpecError("checkpoint", f"cannot read tensor {name} from {f}: {e}", "re-download the file") from None
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise SpecError("checkpoint", f"tensor {name} has shape {tuple(t.shape)}, config.json implies {tuple(shape)}",
                            "the weights do not match config.json")
        return checked_values(name, t, f)

    def _get_row(self, name: str, e: int, shape: tuple[int, ...]) -> torch.Tensor:
        f = self._key_file[name]
        try:
            sl = self._open(f).get_slice(name)
            full = tuple(sl.get_shape())
            if full != (self.config.num_experts, *shape):
                raise SpecError("checkpoint", f"tensor {name} has shape {full}, config.json implies "
                                f"{(self.config.num_experts, *shape)}", "the weights do not match config.json")
            return checked_values(name, sl[e], f)
        except SpecError:
            raise
        except Exception as e_:
            raise SpecError("checkpoint", f"cannot read tensor {name} from {f}: {e_}", "re-download the file") from None

    # ---- experts ----
    def expert_layout(self, layer: int) -> tuple[str, str]:
        """("fused", prefix) or ("mixtral"|"hf", prefix) for a MoE layer."""
        if layer in self._layout:
            return self._layout[layer]
        c = self.config
        base = f"model.layers.{layer}."
        for pre in (moe_prefix(c, layer), base + "mlp.", base + "block_sparse_moe."):
            if self.has(pre + "experts.gate_up_proj"):
                self._layout[layer] = ("fused", pre)
                return self._layout[layer]
            if self.has(pre + "experts.0.w1.weight"):
                self._layout[layer] = ("mixtral", pre)
                return self._layout[layer]
            if self.has(pre + "experts.0.gate_proj.weight"):
                self._layout[layer] = ("hf", pre)
                return self._layout[layer]
        raise SpecError("checkpoint", f"no expert tensors for layer {layer} in {self.path} "
                        f"(looked for {moe_prefix(c, layer)}experts.gate_up_proj and experts.0.*)",
                        "is the checkpoint complete?")

    def router(self, layer: int) -> torch.Tensor:
        c = self.config
        _, pre = self.expert_layout(layer)
        return self.get(pre + "gate.weight", (c.num_experts, c.hidden))

    def expert(self, layer: int, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate [F, H], up [F, H], down [H, F]) of expert e in a MoE layer."""
        c = self.config
        if not 0 <= e < c.num_experts:
            raise SpecError("expert", f"{e} outside [0, {c.num_experts})", "internal error")
        F, H = c.moe_intermediate, c.hidden
        kind, pre = self.expert_layout(layer)
        if kind == "fused":
            gu = self._get_row(pre + "experts.gate_up_proj", e, (2 * F, H))  # [2F, H]
            down = self._get_row(pre + "experts.down_proj", e, (H, F))       # [H, F]
            return gu[:F], gu[F:], down
        names = ("w1", "w3", "w2") if kind == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        p = f"{pre}experts.{e}."
        return (self.get(p + names[0] + ".weight", (F, H)), self.get(p + names[1] + ".weight", (F, H)),
                self.get(p + names[2] + ".weight", (H, F)))

    def validate(self) -> None:
        """Every tensor the forward needs exists with the right shape (reads headers only)."""
        c = self.config
        for name, shape in expected_shapes(c).items():
            self._check_shape(name, shape)
        for i in c.moe_layers:
            kind, pre = self.expert_layout(i)
            self._check_shape(pre + "gate.weight", (c.num_experts, c.hidden))
            F, H = c.moe_intermediate, c.hidden
            if kind == "fused":
                self._check_shape(pre + "experts.gate_up_proj", (c.num_experts, 2 * F, H))
                self._check_shape(pre + "experts.down_proj", (c.num_experts, H, F))
            else:
                names = ("w1", "w3", "w2") if kind == "mixtral" else ("gate_proj", "up_proj", "down_proj")
                for e in range(c.num_experts):
                    p = f"{pre}experts.{e}."
                    self._check_shape(p + names[0] + ".weight", (F, H))
                    self._check_shape(p + names[1] + ".weight", (F, H))
                    self._check_shape(p + names[2] + ".weight", (H, F))

    def shape(self, name: str) -> tuple[int, ...]:
        """A stored tensor's shape, from its file's header."""
        f = self._key_file.get(name)
        if f is None:
            raise SpecError("checkpoint", f"tensor {name} is missing from {self.path}",
                            "is the checkpoint complete and of the family its config.json names?")
        return tuple(self._open(f).get_slice(name).get_shape())

    def _check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        got = self.shape(name)
        if got != tuple(shape):
            raise SpecError("checkpoint", f"tensor {name} has shape {got}, config.json implies {tuple(shape)}",
                            "the weights do not match config.json")


def read_config(path: str | Path) -> ArchConfig:
    """Only the config (no weights opened): for checks before anything is loaded."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise SpecError("checkpoint", f"no config.json in {p}", "give a HF checkpoint directory")
    gen = p / "generation_config.json"
    return parse_config(read_config_file(p)[0], str(p), _read_json(gen, str(p)) if gen.is_file() else None,
                        directory=p)


WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CHECK_CHUNK_ELEMS = 1 << 22     # elements checked for NaN/inf at a time (16 MiB of fp32 temporaries)


def checked_values(name: str, t: torch.Tensor, f: Path) -> torch.Tensor:
    """Refuse, at load, a weight of a dtype the engine does not compute with (an int8 or fp8 tensor
    would be upcast to garbage) or with NaN or infinite values (the run would complete with garbage
    tokens)."""
    if t.dtype not in WEIGHT_DTYPES:
        raise SpecError("checkpoint", f"tensor {name} in {f.name} is {str(t.dtype).replace('torch.', '')}, not a "
                        "float32, bfloat16 or float16 weight", "give an unquantised checkpoint")
    # in chunks: isfinite over a whole bf16 tensor would hold an fp32 copy and a mask of it at once
    if not all(bool(torch.isfinite(c).all()) for c in t.reshape(-1).split(CHECK_CHUNK_ELEMS)):
        bad = int((~torch.isfinite(t)).sum())
        raise SpecError("checkpoint", f"tensor {name} in {f.name} has {bad} NaN or infinite values",
                        "the file is corrupt or the training diverged: re-download or re-save it")
    return t


def _read_json(p: Path, where: str) -> dict:
    try:
        d = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SpecError("checkpoint", f"cannot read {p}: {e}", f"fix or re-download the files in {where}") from None
    if not isinstance(d, dict):
        raise SpecError("checkpoint", f"{p} is not a JSON object", "fix the file")
    return d


class Tokenizer:
    """tokenizer.json through the `tokenizers` library (no code from the checkpoint is run)."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as _T

        p = Path(path) / "tokenizer.json"
        try:
            self._tok = _T.from_file(str(p))
        except Exception as e:
            raise SpecError("tokenizer", f"cannot read {p}: {e}", "give a checkpoint with a tokenizer.json") from None

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text).ids)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)


def load_tokenizer(path: str | Path) -> Tokenizer | None:
    """The checkpoint's tokenizer, or None when it has no tokenizer.json."""
    return Tokenizer(path) if (Path(path) / "tokenizer.json").is_file() else None
