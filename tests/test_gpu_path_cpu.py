"""Desk-review fixes of the GPU path that can be checked without a GPU (the real runs are `gpu` tests)."""
from __future__ import annotations

import torch

from engine_fixtures import make_pair
from specmoe.runtime.engine import _resolve_dtype, plan_for_checkpoint


def test_fp16_computes_in_bf16_on_a_gpu_and_fp32_on_a_cpu(tmp_path):
    """The CUDA kernels take bf16 or fp32 only: an fp16 checkpoint or plan must not reach them."""
    plan = plan_for_checkpoint(*make_pair(tmp_path, "mixtral", "llama", seed=1), "devbox-2core",
                               batch=2, draft_len=1, weight_dtype="fp16")
    assert _resolve_dtype(None, plan, torch.device("cuda")) == torch.bfloat16
    assert _resolve_dtype("float16", plan, torch.device("cuda")) == torch.bfloat16
    assert _resolve_dtype("float16", plan, torch.device("cpu")) == torch.float32
    assert _resolve_dtype(None, plan, torch.device("cpu")) == torch.float32
