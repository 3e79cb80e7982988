"""EAGLE head checkpoints (planner/eagle.py, runtime/weights/eagle.py): how a head is recognised from its
config.json (or its weights' names), the published and vLLM layouts, the one-time .bin conversion with
torch.load(weights_only=True) only, and heads that do not fit the target refused with the field named."""
from __future__ import annotations

import json

import pytest
import torch

from engine_fixtures import one_thread_per_module  # noqa: F401 (autouse: one torch thread)
from engine_fixtures import TINY_DRAFT, TINY_MOE, have_tiny_pair
from eagle_fixtures import LLAMA, make_head
from specmoe.planner.errors import SpecError
from specmoe.planner.hf_config import config_sha256
from specmoe.planner.model_spec import ModelSpec
from specmoe.runtime.cli.main import main
from specmoe.runtime.weights.eagle import EagleWeights, canonical

pytestmark = pytest.mark.skipif(not have_tiny_pair(), reason="needs models/tiny-moe")


@pytest.mark.parametrize("style, prefix", [("marked", ""), ("plain", ""), ("eagle_type", ""), ("marked", "model."),
                                           ("plain", "model.model.")])
def test_published_layouts_are_recognised_and_read(tmp_path, style, prefix):
    d = make_head(tmp_path / "h", style=style, prefix=prefix, embed=True)
    spec = ModelSpec.from_hf_config(d)
    assert spec.eagle and spec.eagle["base_model"] == {} and spec.num_layers == 1 and spec.hidden == 128
    w = EagleWeights(d)
    assert w.config.eagle and w.config.family == "llama" and w.config.vocab_size == 2048
    assert tuple(w.tensor("fc.weight").shape) == (128, 256) and w.has("fc.bias")
    assert tuple(w.tensor("layers.0.mlp.down_proj.weight").shape) == (128, 96)
    assert not w.has("layers.0.input_layernorm.weight")      # EAGLE-1's first layer has none


def test_names_and_a_dense_model_is_no_head(tmp_path):
    assert canonical("model.model.layers.0.mlp.up_proj.weight") == "layers.0.mlp.up_proj.weight"
    assert canonical("fusion_fc.weight") == "fc.weight"
    assert not ModelSpec.from_hf_config(TINY_DRAFT).eagle           # a 2-layer Llama without fc: a draft model
    d = make_head(tmp_path / "h", style="plain")
    (d / "model.safetensors").unlink()                               # no weights to tell it by: a Llama config
    assert not ModelSpec.from_hf_config(d).eagle


def test_eagle3_and_a_missing_tensor_are_refused(tmp_path):
    d = make_head(tmp_path / "h3")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlamaForCausalLMEagle3"]}))
    with pytest.raises(SpecError, match="EAGLE-3"):
        ModelSpec.from_hf_config(d)
    from safetensors.torch import load_file, save_file

    d = make_head(tmp_path / "h")
    sd = load_file(str(d / "model.safetensors"))
    del sd["layers.0.self_attn.k_proj.weight"]
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(SpecError, match="k_proj.weight is missing"):
        EagleWeights(d)


def test_bin_only_head_is_converted_once_with_weights_only(tmp_path, monkeypatch, capsys):
    d = make_head(tmp_path / "h", bin_only=True)
    with pytest.raises(SpecError, match="convert-eagle"):
        EagleWeights(d)
    calls = []
    real = torch.load

    def spy(*a, **kw):
        calls.append(kw.get("weights_only"))
        return real(*a, **kw)

    monkeypatch.setattr(torch, "load", spy)
    out = tmp_path / "converted"
    assert main(["convert-eagle", str(d), "-o", str(out)]) == 0
    assert calls == [True]                              # never an unrestricted unpickle
    assert "wrote" in capsys.readouterr().out
    ref = real(d / "pytorch_model.bin", weights_only=True)
    w = EagleWeights(out)
    assert torch.equal(w.tensor("fc.weight"), ref["fc.weight"])
    assert ModelSpec.from_hf_config(out).eagle                       # the converted head reads as one


class _Evil:
    def __reduce__(self):
        return (open, ("/tmp/specmoe-eagle-pwned", "w"))


def test_a_pickle_with_code_is_refused_and_never_runs(tmp_path, capsys):
    import os

    d = make_head(tmp_path / "h", bin_only=True)
    sd = torch.load(d / "pytorch_model.bin", weights_only=True)
    sd["evil"] = _Evil()                  # torch.save pickles it: an unrestricted load would open the file
    torch.save(sd, d / "pytorch_model.bin")
    if os.path.exists("/tmp/specmoe-eagle-pwned"):
        os.unlink("/tmp/specmoe-eagle-pwned")
    assert main(["convert-eagle", str(d)]) == 2
    err = capsys.readouterr().err
    assert "not a plain state dict" in err and "UnpicklingError" in err     # weights_only refused it
    assert not os.path.exists("/tmp/specmoe-eagle-pwned") and not (d / "model.safetensors").exists()


def _base(**over):
    tcfg = json.loads((TINY_MOE / "config.json").read_text())
    return {"model_type": "mixtral", "hidden_size": 128, "vocab_size": 2048, "num_hidden_layers": 4,
            "config_sha256": config_sha256(tcfg), **over}


@pytest.mark.parametrize("over, base, field", [
    ({"hidden_size": 64, "head_dim": 16}, None, "hidden_size"),
    ({"vocab_size": 1024}, None, "vocab_size"),
    ({}, _base(num_hidden_layers=6), "eagle_base_model.num_hidden_layers"),
    ({}, _base(config_sha256="0" * 64), "eagle_base_model.config_sha256"),
    ({}, _base(model_type="qwen3_moe"), "eagle_base_model.model_type")])
def test_a_head_for_another_target_is_refused_by_plan_and_run(tmp_path, capsys, over, base, field):
    d = make_head(tmp_path / "h", base=base, **over)
    assert main(["plan", "--model", str(TINY_MOE), "--hardware", "devbox-2core", "--draft", str(d),
                 "--prompt-len", "16", "--gen-len", "8", "--acceptance", "0.5", "--max-draft-len", "2"]) == 2
    err = capsys.readouterr().err
    assert field in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    from specmoe.runtime.engine import plan_for_checkpoint

    plan = tmp_path / "plan.json"
    plan_for_checkpoint(TINY_MOE, TINY_DRAFT, "devbox-2core", batch=2, draft_len=2).to_json(plan)
    prompts = tmp_path / "p.txt"
    prompts.write_text("def f():\n")
    rec = tmp_path / "run.json"
    assert main(["run", str(plan), "--target", str(TINY_MOE), "--draft", str(d), "--prompts", str(prompts),
                 "-o", str(rec), "--no-progress", "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err
    assert field in err and "Traceback" not in err and not rec.exists()


def test_the_matching_base_is_accepted(tmp_path):
    from specmoe.planner.memory import check_context
    from specmoe.planner.workload import Workload

    d = make_head(tmp_path / "h", base=_base())
    spec = ModelSpec.from_hf_config(d)
    assert spec.eagle["base_model"]["config_sha256"] == _base()["config_sha256"]
    check_context(ModelSpec.from_hf_config(TINY_MOE), Workload(16, 8), spec)      # no error
    assert LLAMA["hidden_size"] == spec.hidden
