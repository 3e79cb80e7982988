"""`specmoe plan` and `specmoe plan --explain`: outputs, exit codes, bad plan files, no torch."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from specmoe.runtime.cli.main import main

ROOT = Path(__file__).resolve().parents[1]

TINY = {"model_type": "mixtral", "vocab_size": 512, "hidden_size": 128, "intermediate_size": 256,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4,
        "num_experts_per_tok": 2, "torch_dtype": "bfloat16"}
TINY_DRAFT = {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 4, "torch_dtype": "bfloat16"}
TINY_HW = {"name": "tiny-hw",
           "gpu": {"mem_GB": 0.003, "reserve_GiB": 0, "hbm_GBps": 900, "peak_TFLOPs": {"bf16": 100}, "source": "test"},
           "cpu": {"cores": 8, "mem_GB": 0.04, "reserve_GiB": 0, "dram_GBps": 100, "peak_TFLOPs": {"bf16": 1.0},
                   "source": "test"},
           "link": {"h2d_GBps": 8, "source": "test"}}


@pytest.fixture()
def files(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(TINY))
    (tmp_path / "draft.json").write_text(json.dumps(TINY_DRAFT))
    (tmp_path / "hw.yaml").write_text(yaml.safe_dump(TINY_HW))
    return tmp_path


def _args(files, *extra):
    return ["plan", "--model", str(files / "model"), "--hardware", str(files / "hw.yaml"), "--prompt-len", "48",
            "--gen-len", "48", "--draft", str(files / "draft.json"), "--acceptance", "0.8", "--max-draft-len", "2",
            *extra]


def test_plan_writes_and_explains(files, capsys):
    out = files / "plan.json"
    assert main(_args(files, "-o", str(out))) == 0
    text = capsys.readouterr().out
    assert "chosen: batch" in text and "alt 1" in text and "frontier against draft_len" in text
    assert f"written {out}" in text
    d = json.loads(out.read_text())
    assert d["schema_version"] == 2 and d["draft_len"] in (0, 1, 2) and "schedule" in d
    assert not list(files.glob("*.tmp"))                     # written atomically, nothing left over
    assert main(["plan", "--explain", str(out)]) == 0
    text = capsys.readouterr().out
    assert "bound resource" in text and "target.h2d" in text and "target.attention" in text
    assert "next-best plan" in text


def test_plan_latency_objective(files, capsys):
    out = files / "plan.json"
    assert main(_args(files, "--objective", "latency", "--min-throughput", "1000", "--micro-batches", "1,2",
                      "-o", str(out))) == 0
    d = json.loads(out.read_text())
    assert d["objective"] == "latency" and d["solver"]["closed_form_tokens_per_s"] >= 1000


@pytest.mark.parametrize("extra,field", [
    (["--prompt-len", "x"], "--prompt-len"),
    (["--batch", "-3"], "--batch"),
    (["--micro-batches", "1,0"], "--micro-batches"),
    (["--objective", "speed"], "--objective"),
    (["--min-throughput", "50"], "--min-throughput"),
    (["--solver", "gurobi"], "--solver"),
    (["--gpu-mem-GiB", "0"], "--gpu-mem-gib"),
])
def test_bad_arguments_exit_2(files, capsys, extra, field):
    assert main(_args(files, "-o", str(files / "p.json"), *extra)) == 2
    err = capsys.readouterr().err
    assert field in err and "Traceback" not in err
    assert not (files / "p.json").exists()


def test_missing_inputs_exit_2(files, capsys):
    args = [a for a in _args(files, "-o", str(files / "p.json")) if a not in ("--acceptance", "0.8")]
    assert main(args) == 2
    assert "--acceptance" in capsys.readouterr().err
    assert main(["plan", "--model", "mixtral-8x7b"]) == 2
    assert "required" in capsys.readouterr().err
    assert main(_args(files, "-o", str(files / "nodir" / "p.json"))) == 2
    assert "-o" in capsys.readouterr().err
    (files / "stats.csv").write_text("1,2,3\n4,5,6\n")
    assert main(_args(files, "-o", str(files / "p.json"), "--routing-stats", str(files / "stats.csv"))) == 2
    assert "--routing-stats" in capsys.readouterr().err


def test_infeasible_exit_2(files, capsys):
    assert main(_args(files, "-o", str(files / "p.json"), "--cpu-mem-GiB", "0.001")) == 2
    err = capsys.readouterr().err
    assert "cpu memory: needs" in err and "usable" in err
    assert main(_args(files, "-o", str(files / "p.json"), "--batch", "100000")) == 2
    assert "--batch" in capsys.readouterr().err


def test_explain_rejects_bad_plan_files(files, capsys):
    out = files / "plan.json"
    assert main(_args(files, "-o", str(out))) == 0
    capsys.readouterr()
    good = json.loads(out.read_text())
    cases = {
        "version.json": dict(good, schema_version=99),
        "edited.json": dict(good, model=dict(good["model"], num_experts=16)),
        "batch.json": dict(good, batch=0),
        "stages.json": dict(good, predicted=dict(good["predicted"], stages={"target.mlp": 1.0})),
    }
    for name, d in cases.items():
        (files / name).write_text(json.dumps(d))
    (files / "truncated.json").write_text(out.read_text()[:500])
    for name, field in (("version.json", "schema_version"), ("edited.json", "input_hashes.model"),
                        ("batch.json", "batch"), ("stages.json", "predicted.stages.target.mlp"),
                        ("truncated.json", "not valid JSON"), ("missing.json", "cannot read")):
        assert main(["plan", "--explain", str(files / name)]) == 2, name
        err = capsys.readouterr().err
        assert field in err and "Traceback" not in err, (name, err)


def test_routing_stats_file(files, capsys):
    (files / "stats.csv").write_text("e0,e1,e2,e3\n" + "\n".join(["10,1,1,1"] * 3) + "\n")
    out = files / "plan.json"
    assert main(_args(files, "-o", str(out), "--routing-stats", str(files / "stats.csv"))) == 0
    d = json.loads(out.read_text())
    assert d["solver"]["routing_stats"] is True
    for slots, cached in zip(d["placement"]["expert_cache_slots"], d["placement"]["cached_experts"]):
        assert len(cached) == slots and (slots == 0 or cached[0] == 0)     # expert 0 is the hot one


def test_cli_does_not_import_torch(tmp_path):
    """The real benchmark case in a fresh interpreter: exit 0, a plan file, and torch never imported."""
    out = tmp_path / "plan.json"
    code = ("import sys; from specmoe.runtime.cli.main import main; rc = main(['plan', '--model', 'mixtral-8x7b', '--hardware', "
            "'a30-xeon6426y', '--prompt-len', '566', '--gen-len', '1024', '--acceptance', '0.8', '-o', sys.argv[1]]); "
            "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["batch"] > 0
