"""Hostile inputs: each bad config, spec, acceptance table, plan, argument, prompt or checkpoint gets
exit 2 and one line naming the field at fault, never a traceback, a hang or a silently wrong result,
and no input file is changed. (Outputs: tests/test_hostile_outputs.py.)"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest
import torch
import yaml

from engine_fixtures import one_thread_per_module  # noqa: F401 (autouse: one torch thread)
from engine_fixtures import REPO, add_tokenizer, make_pair
from specmoe.runtime.cli.main import main
from specmoe.runtime.engine import plan_for_checkpoint

TINY = REPO / "models" / "tiny-moe"
BASE_CFG = json.loads((TINY / "config.json").read_text())
BASE_HW = yaml.safe_load((REPO / "hw_specs" / "devbox-2core.yaml").read_text())


def snapshot(*roots: Path) -> dict:
    """Every file under the roots, with its bytes: what must not change."""
    out = {}
    for r in roots:
        for p in ([r] if r.is_file() else sorted(r.rglob("*")) if r.is_dir() else []):
            if p.is_file():
                out[str(p)] = p.read_bytes()
    return out


def refused(capsys, argv: list[str], field: str, *keep: Path, code: int = 2) -> str:
    """Run the CLI; it must exit `code` with one line naming `field`, and leave the `keep` files as they were."""
    before = snapshot(*keep)
    assert main([str(a) for a in argv]) == code
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert field in err, err
    assert snapshot(*keep) == before
    return err


def write_cfg(tmp_path: Path, **changes) -> Path:
    cfg = copy.deepcopy(BASE_CFG)
    for k, v in changes.items():
        if v is ...:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    d = tmp_path / "model"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def write_hw(tmp_path: Path, section: str, key: str, value) -> Path:
    hw = copy.deepcopy(BASE_HW)
    if value is ...:
        hw[section].pop(key, None)
    else:
        hw.setdefault(section, {})[key] = value
    p = tmp_path / "hw.yaml"
    p.write_text(yaml.safe_dump(hw))
    return p


def estimate(model, hardware="devbox-2core", *extra) -> list:
    return ["estimate", "--model", model, "--hardware", hardware, "--prompt-len", "32", "--gen-len", "32",
            "--batch", "4", *extra]


# ---- config.json ----------------------------------------------------------------------------
CONFIG_CASES = [
    ("num_local_experts", 1_000_000_000), ("num_hidden_layers", 10_000_000), ("num_hidden_layers", 0),
    ("decoder_sparse_step", "x"), ("rms_norm_eps", "abc"), ("rms_norm_eps", -1.0), ("rms_norm_eps", float("nan")),
    ("rope_theta", "big"), ("rope_theta", float("inf")), ("hidden_size", "256"), ("hidden_size", 2.5),
    ("hidden_size", float("inf")), ("vocab_size", -5), ("vocab_size", 10 ** 12), ("num_attention_heads", None),
    ("num_key_value_heads", 3), ("num_experts_per_tok", 64), ("num_experts_per_tok", True),
    ("intermediate_size", [1, 2]), ("max_position_embeddings", "long"), ("max_position_embeddings", 10 ** 15),
    ("sliding_window", "wide"), ("head_dim", 0), ("rope_parameters", "linear"), ("hidden_act", 3),
    ("model_type", "gpt2"), ("model_type", 7),
]


@pytest.mark.parametrize("key,value", CONFIG_CASES, ids=[f"{k}={v!r}"[:40] for k, v in CONFIG_CASES])
def test_bad_config_field(tmp_path, capsys, key, value):
    d = write_cfg(tmp_path, **{key: value})
    t0 = time.perf_counter()
    field = "num_attention_heads" if key == "num_attention_heads" else key
    if key == "num_key_value_heads":
        field = "num_key_value_heads"
    refused(capsys, estimate(d), field if key != "model_type" else "model_type", d)
    assert time.perf_counter() - t0 < 5


def test_more_heads_than_hidden_is_refused_not_head_dim_0(tmp_path, capsys):
    d = write_cfg(tmp_path, num_attention_heads=512, num_key_value_heads=512, hidden_size=256, head_dim=...)
    assert "head dimension would be 0" in refused(capsys, estimate(d), "num_attention_heads", d)


def test_billion_experts_exit_2_within_5_seconds(tmp_path):
    import subprocess
    import sys

    d = write_cfg(tmp_path, num_local_experts=1_000_000_000)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "specmoe.runtime.cli.main", *estimate(str(d))],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "num_local_experts" in r.stderr and "Traceback" not in r.stderr
    assert time.perf_counter() - t0 < 5


def test_largest_legal_expert_count_plans_fast(tmp_path, capsys):
    d = write_cfg(tmp_path, num_local_experts=65536)
    t0 = time.perf_counter()
    assert main(estimate(str(d), "h200-host")) == 0
    assert time.perf_counter() - t0 < 5


def test_mlp_only_layers_of_the_wrong_type(tmp_path, capsys):
    d = write_cfg(tmp_path, model_type="qwen2_moe", mlp_only_layers=[[1]], moe_intermediate_size=64)
    refused(capsys, estimate(d), "mlp_only_layers", d)


def test_prompt_plus_generation_beyond_max_positions(capsys):
    argv = ["estimate", "--model", "mixtral-8x7b", "--hardware", "a30-xeon6426y", "--prompt-len", "100000",
            "--gen-len", "100000", "--batch", "1", "--micro-batches", "1"]
    assert "max_position_embeddings" in refused(capsys, argv, "gen_len")
    argv = ["plan", "--model", "mixtral-8x7b", "--hardware", "a30-xeon6426y", "--prompt-len", "100000",
            "--gen-len", "100000", "--acceptance", "0.8", "-o", "/tmp/never-written.json"]
    refused(capsys, argv, "gen_len")
    assert not Path("/tmp/never-written.json").exists()


@pytest.mark.parametrize("flag", ["--model", "--hardware"])
def test_very_long_preset_name(capsys, flag):
    argv = estimate("x" * 5000 if flag == "--model" else str(TINY), "x" * 5000 if flag == "--hardware" else "devbox-2core")
    err = refused(capsys, argv, flag.lstrip("-"))
    assert len(err) < 1000


# ---- hardware spec ----------------------------------------------------------------------------
SPEC_CASES = [
    ("link", "h2d_GBps", float("inf")), ("link", "h2d_GBps", 13000), ("link", "d2h_GBps", float("nan")),
    ("gpu", "mem_GiB", 24e9), ("gpu", "mem_GiB", "24"), ("cpu", "mem_GiB", float("inf")),
    ("gpu", "hbm_GBps", 264000), ("gpu", "hbm_GBps", 2.6e6), ("cpu", "dram_GBps", 26400),
    ("cpu", "cores", 10 ** 6), ("cpu", "cores", 2.5), ("gpu", "reserve_GiB", float("inf")),
    ("gpu", "peak_TFLOPs", {"bf16": 1e12}), ("gpu", "peak_TFLOPs", [1, 2]), ("cpu", "peak_TFLOPs", {"fp32": "fast"}),
    ("measured", "h2d_GBps_by_chunk_MB", [1, 2, 3]), ("measured", "cpu_attention_kv_GBps", [1, 2]),
    ("measured", "gpu_gemm_TFLOPs_by_M", {1: float("inf")}), ("measured", "h2d_GBps_by_chunk_MB", {1: 16000}),
    ("measured", "op_overhead_us", float("inf")), ("measured", "stage_overhead_us", {"target.moe": float("inf")}),
    ("measured", "dram_read_GBps", 1e9),
]


@pytest.mark.parametrize("section,key,value", SPEC_CASES, ids=[f"{s}.{k}={v!r}"[:40] for s, k, v in SPEC_CASES])
def test_bad_spec_field(tmp_path, capsys, section, key, value):
    if section == "measured":
        hw = copy.deepcopy(BASE_HW)
        hw["measured"] = {"source": "test", key: value}
        p = tmp_path / "hw.yaml"
        p.write_text(yaml.safe_dump(hw))
    else:
        p = write_hw(tmp_path, section, key, value)
    refused(capsys, estimate(TINY, p), key, p)


def test_bandwidth_in_mb_per_s_says_which_unit(tmp_path, capsys):
    p = write_hw(tmp_path, "link", "h2d_GBps", 25000)
    err = refused(capsys, estimate(TINY, p), "link.h2d_GBps", p)
    assert "GBps" in err and "MB/s" in err


# ---- acceptance tables ----------------------------------------------------------------------------
CSV_CASES = [
    ("k,accepted\n1,0.5\n1,0.6\n2,0.9\n", "repeats"), ("k,accepted\n1,0.5\n2,nan\n", "acceptance"),
    ("k,accepted\n1,inf\n", "acceptance"), ("k,accepted\n1000000000,0.5\n", "exceeds"),
    ("k,accepted\n1,0.5\n3,0.9\n", "every k"), ("k;accepted\n1;0.5\n", "acceptance"),
    ("k,accepted,accepted_sd\n1,0.5,inf\n", "acceptance"), ("\ufeffk,accepted\n1,0.5\n1,0.5\n", "repeats"),
]


@pytest.mark.parametrize("text,word", CSV_CASES, ids=[f"csv{i}" for i in range(len(CSV_CASES))])
def test_bad_acceptance_csv(tmp_path, capsys, text, word):
    p = tmp_path / "acc.csv"
    p.write_text(text, encoding="utf-8")
    err = refused(capsys, estimate(TINY, "devbox-2core", "--acceptance", p, "--draft-len", "1",
                                   "--draft", REPO / "models" / "tiny-draft"), "acceptance", p)
    assert word in err


def test_acceptance_csv_with_a_byte_order_mark_reads(tmp_path):
    from specmoe.planner.workload import AcceptanceProfile

    p = tmp_path / "acc.csv"
    p.write_bytes("k,accepted\n1,0.5\n2,0.8\n".encode("utf-8-sig"))
    assert AcceptanceProfile.from_csv(p).table == (0.0, 0.5, 0.8)


# ---- plan.json ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good_plan(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    p = root / "plan.json"
    assert main(["plan", "--model", str(TINY), "--hardware", "devbox-2core", "--prompt-len", "16", "--gen-len", "16",
                 "--batch", "4", "--max-draft-len", "0", "-o", str(p)]) == 0
    return json.loads(p.read_text())


PLAN_CASES = [("batch", None), ("batch", "8"), ("micro_batches", 0), ("draft_len", "x"), ("placement", None),
              ("placement", "cpu"), ("predicted", None), ("predicted", []), ("schedule", "fast"), ("model", None),
              ("hardware", "h200"), ("workload", None), ("memory", None), ("frontier", []), ("bound", None),
              ("alternatives", "x"), ("draft", "tiny"), ("objective", 3)]


@pytest.mark.parametrize("key,value", PLAN_CASES, ids=[f"{k}={v!r}" for k, v in PLAN_CASES])
def test_bad_plan_field(tmp_path, capsys, good_plan, key, value):
    d = copy.deepcopy(good_plan)
    d[key] = value
    p = tmp_path / "plan.json"
    p.write_text(json.dumps(d))
    refused(capsys, ["plan", "--explain", p], key, p)


@pytest.mark.parametrize("key,value", [("stages", None), ("iteration_time_s", "fast"), ("decode_tokens_per_s", None)])
def test_bad_plan_prediction(tmp_path, capsys, good_plan, key, value):
    d = copy.deepcopy(good_plan)
    d["predicted"][key] = value
    p = tmp_path / "plan.json"
    p.write_text(json.dumps(d))
    refused(capsys, ["plan", "--explain", p], f"predicted.{key}", p)


@pytest.mark.parametrize("key,value", [("target_kv_gpu_sequences", "2"), ("expert_cache_slots", None),
                                       ("streaming_buffers", None)])
def test_bad_plan_placement(tmp_path, capsys, good_plan, key, value):
    d = copy.deepcopy(good_plan)
    d["placement"][key] = value
    p = tmp_path / "plan.json"
    p.write_text(json.dumps(d))
    refused(capsys, ["plan", "--explain", p], "placement", p)


# ---- specmoe run: arguments, prompts, checkpoints ---------------------------------------------------------
@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    t, d = make_pair(root, "mixtral", "llama", seed=5)
    add_tokenizer(t)
    plan = root / "plan.json"
    plan_for_checkpoint(t, d, "devbox-2core", batch=2, draft_len=2).to_json(plan)
    prompts = root / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "w5 w6"}) + "\n" + json.dumps({"prompt": "w7"}) + "\n")
    return root, t, d, plan, prompts


def run_argv(pair, tmp_path, *extra, target=None) -> list:
    root, t, d, plan, prompts = pair
    return ["run", plan, "--target", target or t, "--draft", d, "--prompts", prompts, "--max-new-tokens", "4",
            "-o", tmp_path / "run.json", "--no-progress", "--no-speed-probe", *extra]


RUN_ARG_CASES = [("--temperature", "inf"), ("--temperature", "nan"), ("--temperature", "-1"),
                 ("--seed", str(10 ** 23)), ("--seed", "-3"), ("--max-new-tokens", "0"),
                 ("--max-new-tokens", str(10 ** 12)), ("--draft-len", "1000"), ("--draft-len", "-1"),
                 ("--acceptance-oracle", "7"), ("--threads", "0"), ("--dtype", "int8"), ("--device", "tpu")]


@pytest.mark.parametrize("flag,value", RUN_ARG_CASES, ids=[f"{f}={v}" for f, v in RUN_ARG_CASES])
def test_bad_run_argument(pair, tmp_path, capsys, flag, value):
    root = pair[0]
    field = {"--dtype": "dtype", "--device": "device"}.get(flag, flag)
    refused(capsys, run_argv(pair, tmp_path, flag, value), field, root)
    assert not (tmp_path / "run.json").exists()


def test_seed_in_scientific_notation_is_refused_by_its_flag(pair, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in run_argv(pair, tmp_path, "--seed", "1e23")])
    assert e.value.code == 2 and "--seed" in capsys.readouterr().err


@pytest.mark.parametrize("line", ['{"prompt": "w5 \\ud800 w6"}', '{"prompt": "\\udfff"}'])
def test_lone_surrogate_prompt(pair, tmp_path, capsys, line):
    p = tmp_path / "p.jsonl"
    p.write_text(line + "\n")
    argv = run_argv(pair, tmp_path)
    argv[argv.index("--prompts") + 1] = p
    assert "surrogate" in refused(capsys, argv, "--prompts", p, pair[0])


def test_lone_surrogate_through_the_api(pair):
    from specmoe.planner.errors import SpecError
    from specmoe.runtime.engine import Engine

    root, t, d, plan, _ = pair
    eng = Engine(plan, t, d)
    with pytest.raises(SpecError, match=r"prompts\[0\].*surrogate"):
        eng.generate(["w5 \ud800"], max_new_tokens=2)
    with pytest.raises(SpecError, match="temperature"):
        eng.generate(["w5"], max_new_tokens=2, temperature=float("inf"))


def _rewrite(ckpt: Path, tmp_path: Path, change) -> Path:
    """A copy of checkpoint `ckpt` with its tensors passed through change(name, tensor)."""
    import shutil

    from safetensors.torch import load_file, save_file

    out = tmp_path / "ckpt"
    shutil.copytree(ckpt, out)
    ts = load_file(out / "model.safetensors")
    save_file({k: change(k, v) for k, v in ts.items()}, out / "model.safetensors")
    return out


@pytest.mark.parametrize("what", ["nan", "inf", "int8_q_proj", "float64"])
def test_bad_weights_refused_at_load(pair, tmp_path, capsys, what):
    root, t, d, plan, prompts = pair

    def change(name, v):
        if "layers.1.self_attn.q_proj" not in name:
            return v
        if what == "nan":
            v = v.clone()
            v[0, 0] = float("nan")
        elif what == "inf":
            v = v.clone()
            v[1, 2] = float("inf")
        elif what == "int8_q_proj":
            v = v.to(torch.int8)
        else:
            v = v.double()
        return v

    bad = _rewrite(t, tmp_path, change)
    err = refused(capsys, run_argv(pair, tmp_path, target=bad), "q_proj", bad, root)
    assert "checkpoint" in err and not (tmp_path / "run.json").exists()


@pytest.mark.parametrize("shard", ["../../../etc/passwd", "/etc/passwd", "sub/../../x.safetensors", 3])
def test_weight_map_escaping_the_checkpoint(pair, tmp_path, capsys, shard):
    import shutil

    root, t, d, plan, prompts = pair
    bad = tmp_path / "ckpt"
    shutil.copytree(t, bad)
    from safetensors import safe_open

    with safe_open(str(bad / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    wm = {k: "model.safetensors" for k in keys}
    wm[keys[0]] = shard
    (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    refused(capsys, run_argv(pair, tmp_path, target=bad), "weight_map", bad, root)
