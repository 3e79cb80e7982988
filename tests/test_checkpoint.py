"""Checkpoint reading: both expert layouts, shards, every failure a SpecError naming the problem;
random weight sources."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from engine_fixtures import make_checkpoint
from specmoe.planner.errors import SpecError
from specmoe.planner.model_spec import ModelSpec
from specmoe.runtime.weights.checkpoint import Checkpoint, expected_shapes, load_tokenizer, read_config
from specmoe.runtime.weights.sources import RandomWeights, WeightSource, config_from_model_spec


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {
        "mixtral": make_checkpoint("mixtral", root / "mixtral", seed=1),
        "mixtral_fused": make_checkpoint("mixtral", root / "mixtral_fused", seed=1, fused=True),
        "qwen2_moe": make_checkpoint("qwen2_moe", root / "qwen2_moe", seed=2),
        "qwen2_moe_fused": make_checkpoint("qwen2_moe", root / "qwen2_moe_fused", seed=2, fused=True),
        "root": root,
    }


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_fused_and_per_expert_layouts_read_the_same(ckpts, kind):
    a, b = Checkpoint(ckpts[kind]), Checkpoint(ckpts[kind + "_fused"])
    assert a.expert_layout(0)[0] in ("mixtral", "hf") and b.expert_layout(0)[0] == "fused"
    a.validate()
    b.validate()
    c = a.config
    for layer in c.moe_layers:
        assert torch.equal(a.router(layer), b.router(layer))
        for e in range(c.num_experts):
            for x, y in zip(a.expert(layer, e), b.expert(layer, e)):
                assert x.shape == y.shape and torch.equal(x, y)
    for name in expected_shapes(c):
        assert torch.equal(a.get(name), b.get(name))


def test_fused_orientation_matches_transformers(ckpts):
    """gate_up_proj [E, 2F, H]: gate rows first; down_proj [E, H, F] (the installed transformers' layout)."""
    from engine_fixtures import load_hf

    m = load_hf(ckpts["mixtral_fused"])
    ck = Checkpoint(ckpts["mixtral_fused"])
    experts = m.model.layers[1].mlp.experts
    F = ck.config.moe_intermediate
    g, u, d = ck.expert(1, 3)
    assert torch.equal(experts.gate_up_proj[3, :F], g) and torch.equal(experts.gate_up_proj[3, F:], u)
    assert torch.equal(experts.down_proj[3], d)


def test_config_fields(ckpts):
    c = read_config(ckpts["qwen2_moe"])
    assert c.family == "qwen2_moe" and c.shared_intermediate == 36 and c.moe_layers == (0, 2)
    assert c.qkv_bias and not c.norm_topk_prob and c.dense_intermediate == 40
    m = read_config(ckpts["mixtral"])
    assert m.norm_topk_prob and m.eos_token_ids == (2,) and m.num_experts == 6


def test_sharded_checkpoint(ckpts, tmp_path):
    from engine_fixtures import load_hf

    m = load_hf(ckpts["mixtral"])
    m.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    files = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(files) > 1 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    a, b = Checkpoint(ckpts["mixtral"]), Checkpoint(tmp_path / "sharded")
    b.validate()
    for e in range(a.config.num_experts):
        assert all(torch.equal(x, y) for x, y in zip(a.expert(0, e), b.expert(0, e)))
    # a shard named in the index but missing
    (tmp_path / "sharded" / files[-1]).unlink()
    with pytest.raises(SpecError, match=files[-1]):
        Checkpoint(tmp_path / "sharded")


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_tensor_is_named(ckpts, tmp_path):
    from safetensors.torch import load_file, save_file

    d = _copy(ckpts["mixtral"], tmp_path / "m")
    sd = load_file(str(d / "model.safetensors"))
    del sd["model.layers.1.self_attn.k_proj.weight"]
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(SpecError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight is missing"):
        WeightSource.from_checkpoint(d)


def test_wrong_shape_is_named(ckpts, tmp_path):
    from safetensors.torch import load_file, save_file

    d = _copy(ckpts["mixtral"], tmp_path / "m")
    sd = load_file(str(d / "model.safetensors"))
    sd["model.layers.0.block_sparse_moe.experts.2.w2.weight"] = torch.zeros(3, 3)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(SpecError, match=r"experts\.2\.w2\.weight has shape \(3, 3\)"):
        WeightSource.from_checkpoint(d)


def test_unsupported_family(ckpts, tmp_path):
    d = _copy(ckpts["mixtral"], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SpecError, match="unsupported family 'gpt2'"):
        Checkpoint(d)


def test_unreadable_and_pickled_files(ckpts, tmp_path):
    d = _copy(ckpts["mixtral"], tmp_path / "m")
    (d / "model.safetensors").write_bytes(b"\x12\x00garbage that is not a safetensors header")
    with pytest.raises(SpecError, match="cannot read"):
        Checkpoint(d)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(SpecError, match="pickled weights are never loaded"):
        Checkpoint(d)
    with pytest.raises(SpecError, match="no config.json"):
        Checkpoint(tmp_path)
    (d / "config.json").write_text("{not json")
    with pytest.raises(SpecError, match="config.json"):
        read_config(d)


def test_random_weights_deterministic_and_shaped():
    spec = ModelSpec.preset("mixtral-8x7b")
    c = config_from_model_spec(spec)
    assert (c.hidden, c.num_experts, c.top_k, c.moe_intermediate, c.num_kv_heads) == (4096, 8, 2, 14336, 8)
    assert c.rope["rope_theta"] == 1e6 and c.norm_topk_prob
    a = RandomWeights(spec, seed=3, dtype="bfloat16")
    b = RandomWeights(spec, seed=3, dtype=torch.bfloat16)
    x = a.tensor("model.layers.5.self_attn.k_proj.weight")
    assert x.shape == (1024, 4096) and x.dtype == torch.bfloat16
    assert torch.equal(x, b.tensor("model.layers.5.self_attn.k_proj.weight"))
    assert not torch.equal(x, RandomWeights(spec, seed=4).tensor("model.layers.5.self_attn.k_proj.weight"))
    assert torch.equal(a.tensor("model.norm.weight"), torch.ones(4096, dtype=torch.bfloat16))
    assert a.router(0).shape == (8, 4096)
    small = RandomWeights(read_config_dict(), seed=0, dtype=torch.float32)
    g, u, d = small.expert(0, 1)
    assert g.shape == (48, 32) and d.shape == (32, 48) and 0.1 < float(g.std()) * 32 ** 0.5 < 10


def read_config_dict():
    return {"model_type": "mixtral", "vocab_size": 96, "hidden_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 48, "num_local_experts": 6,
            "num_experts_per_tok": 2}


def test_tokenizer_optional(ckpts, tmp_path):
    assert load_tokenizer(ckpts["mixtral"]) is None
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1, "world": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    t = load_tokenizer(tmp_path)
    assert t.encode("hello world") == [1, 2] and t.decode([1, 2]) == "hello world"
    (tmp_path / "tokenizer.json").write_text("{")
    with pytest.raises(SpecError, match="tokenizer"):
        load_tokenizer(tmp_path)
