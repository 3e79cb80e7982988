"""Shared test configuration: `gpu` tests skip cleanly where there is no CUDA GPU with cupy."""
from __future__ import annotations

import pytest


def _cuda_ok() -> bool:
    try:
        import torch
        if not torch.cuda.is_available():
            return False
        import cupy  # noqa: F401
        return True
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if any("gpu" in item.keywords for item in items) and not _cuda_ok():
        skip = pytest.mark.skip(reason="needs a CUDA GPU with cupy")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
