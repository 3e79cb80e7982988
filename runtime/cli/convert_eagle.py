"""`specmoe convert-eagle DIR [-o OUT]`: convert an EAGLE head published only as a PyTorch `.bin` to
safetensors, once. The `.bin` is read with torch.load(weights_only=True): tensors only, no code in the
file runs (runtime/weights/eagle.py); the engine itself reads safetensors only.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from specmoe.planner.errors import SpecError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("head", help="directory of the EAGLE head (config.json and pytorch_model*.bin)")
    p.add_argument("-o", "--output", default=None, metavar="DIR",
                   help="directory to write model.safetensors (and config.json) into (default: the head's own)")


def run(args: argparse.Namespace) -> int:
    from specmoe.runtime.weights.eagle import EagleWeights, convert_bin

    src = Path(args.head)
    if not src.is_dir():
        raise SpecError("head", f"{src} is not a directory", "give the EAGLE head's directory")
    out = convert_bin(src, args.output)
    EagleWeights(out.parent)           # the result reads back as an EAGLE head, every tensor in shape
    print(f"wrote {out}")
    return 0
