"""A tiny target, draft and machine whose costs are worked by hand in test_cost_model.py.

Machine: every rate is 1e9 per second (1 GFLOP/s, 1 GB/s), so an operation takes
max(flops, bytes) nanoseconds.
"""
from __future__ import annotations

from specmoe.planner.hardware_spec import parse_hardware
from specmoe.planner.model_spec import ModelSpec

# 2 layers, hidden h = 8, 4 query heads, 2 KV heads (d = 2, g = 2), 4 experts of width h_e = 16, top-2.
TINY_TARGET = {"model_type": "mixtral", "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4,
               "num_experts_per_tok": 2, "vocab_size": 32, "tie_word_embeddings": False,
               "torch_dtype": "bfloat16"}
# 1 layer, hidden 8, 4 heads, 4 KV heads (d = 2), FFN 8, vocab 32.
TINY_DRAFT = {"model_type": "llama", "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
              "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 32, "tie_word_embeddings": False}

TINY_HW = {
    "name": "tiny-1g",
    "gpu": {"name": "g", "mem_GiB": 1, "reserve_GiB": 0, "hbm_GBps": 1, "peak_TFLOPs": {"bf16": 0.001}, "source": "test"},
    "cpu": {"name": "c", "cores": 1, "mem_GiB": 1, "reserve_GiB": 0, "dram_GBps": 1, "peak_TFLOPs": {"bf16": 0.001},
            "source": "test"},
    "link": {"h2d_GBps": 1, "source": "test"},
}


def tiny_target() -> ModelSpec:
    return ModelSpec.from_hf_config(dict(TINY_TARGET), name="tiny-target")


def tiny_draft() -> ModelSpec:
    return ModelSpec.from_hf_config(dict(TINY_DRAFT), name="tiny-draft")


def tiny_hw(**measured):
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY_HW.items()}
    if measured:
        raw["measured"] = dict(source="test", **measured)
    return parse_hardware(raw, "tiny.yaml")


def datasheet(preset: str):
    """A preset at its datasheet peaks: the `measured:` block (profiled rates, fixed costs) dropped,
    for tests of the bare roofline."""
    import copy

    from specmoe.planner.hardware_spec import HardwareSpec

    raw = copy.deepcopy(HardwareSpec.preset(preset).raw)
    raw.pop("measured", None)
    return parse_hardware(raw, f"{preset}-datasheet.yaml")
