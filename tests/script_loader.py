"""Load a bench or scripts file (not a package) as a module, so tests can call its functions."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def load_script(path: Path, name: str):
    """The module of the script at `path`, registered as sys.modules[name] (dataclasses need it there)."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
