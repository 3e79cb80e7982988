"""`specmoe estimate`: the table, the JSON keys, preset and path forms, and one line + exit 2 for
every bad input. It must not import torch."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from specmoe.planner.hardware_spec import HW_SPEC_DIR
from specmoe.planner.model_spec import PRESET_DIR
from specmoe.runtime.cli.main import main

ROOT = Path(__file__).resolve().parent.parent
BASE = ["estimate", "--model", "mixtral-8x7b", "--hardware", "a30-xeon6426y", "--prompt-len", "566",
        "--gen-len", "1024"]
JSON_KEYS = {"batch", "draft_len", "micro_batches", "iteration_time_s", "decode_tokens_per_s", "stages", "memory",
             "bound", "moe_gpu_utilization", "source"}
STAGES = {"target.pre_attn", "target.attention", "target.post_attn", "target.moe", "target.h2d", "target.lm_head",
          "draft.gpu", "draft.cpu", "verify.accept", "iteration"}


def _run(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_json_output(capsys):
    rc, out, err = _run(BASE + ["--batch", "max", "--draft-len", "4", "--acceptance", "0.8", "--json"], capsys)
    assert rc == 0 and err == ""
    d = json.loads(out)                       # exactly one JSON object
    assert JSON_KEYS <= set(d)
    assert STAGES <= set(d["stages"])
    assert d["batch"] > 0 and d["draft_len"] == 4 and d["micro_batches"] == 2
    assert d["memory"]["gpu_bytes"] > 0 and d["memory"]["cpu_bytes"] > 0
    assert d["bound"] in ("gpu", "cpu", "pcie") and d["source"] in ("peak", "measured")
    assert 0 < d["moe_gpu_utilization"] < 1
    assert d["decode_tokens_per_s"] == pytest.approx(d["batch"] * (1 + 0.8 + 0.64 + 0.512 + 0.4096)
                                                     / d["iteration_time_s"])
    assert d["draft"] == "mixtral-8x7b-eagle"       # the default draft
    assert "timeline" not in d
    # the prefill by part: its total is the prefill; on the A30 host the copies overlap compute, so the
    # parts' busy times add up to at least it, the MoE the largest (GEMM-bound at 566-token prompts)
    parts = d["prefill_parts"]
    assert parts["total"] == pytest.approx(d["prefill_time_s"], rel=1e-12)
    busy = {k: v for k, v in parts.items() if k != "total"}
    assert sum(busy.values()) >= parts["total"] * (1 - 1e-9) and max(busy, key=busy.get) == "target.moe"
    assert STAGES - {"draft.gpu", "draft.cpu", "verify.accept", "iteration"} < set(busy) and busy["draft"] > 0


def test_table_output(capsys):
    rc, out, err = _run(BASE + ["--batch", "64", "--draft-len", "2", "--acceptance", "0.7", "--micro-batches", "4"],
                        capsys)
    assert rc == 0
    for word in ("target.attention", "target.h2d", "iteration", "tokens/s", "GPU memory", "CPU memory", "bound"):
        assert word in out
    assert "batch 64, micro-batches 4, draft length 2" in out
    assert "prefill by part (busy s; copies overlap compute on a GPU host): target.moe " in out


def test_path_forms_and_measured(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    shutil.copy(PRESET_DIR / "qwen3-30b-a3b.json", tmp_path / "m" / "config.json")
    shutil.copy(PRESET_DIR / "qwen3-0.6b.json", tmp_path / "draft.json")
    shutil.copy(HW_SPEC_DIR / "h200-host.yaml", tmp_path / "hw.yaml")
    argv = ["estimate", "--model", str(tmp_path / "m"), "--hardware", str(tmp_path / "hw.yaml"), "--prompt-len",
            "100", "--gen-len", "50", "--batch", "32", "--draft-len", "3", "--acceptance", "0.6",
            "--draft", str(tmp_path / "draft.json"), "--json"]
    rc, out, _ = _run(argv, capsys)
    assert rc == 0
    d = json.loads(out)
    assert d["source"] == "measured" and d["batch"] == 32
    rc, out2, _ = _run(argv + ["--peak-only"], capsys)
    assert json.loads(out2)["source"] == "peak"
    # a config.json path with the family's default draft, an acceptance table
    (tmp_path / "acc.csv").write_text("k,accepted\n1,0.8\n2,1.4\n3,1.9\n")
    argv = ["estimate", "--model", str(tmp_path / "m" / "config.json"), "--hardware", "h200-host", "--prompt-len",
            "100", "--gen-len", "50", "--draft-len", "3", "--acceptance", str(tmp_path / "acc.csv"), "--json"]
    rc, out, _ = _run(argv, capsys)
    d = json.loads(out)
    assert rc == 0 and d["draft"] == "qwen3-0.6b" and d["accepted_per_iteration"] == pytest.approx(1.9)


def test_memory_overrides(capsys):
    rc, out, _ = _run(BASE + ["--json"], capsys)
    b0 = json.loads(out)["batch"]
    rc, out, _ = _run(BASE + ["--json", "--cpu-mem-GiB", "400", "--gpu-mem-GiB", "48"], capsys)
    d = json.loads(out)
    assert d["batch"] > b0 and d["memory"]["gpu_capacity_bytes"] == 48 * 2**30


@pytest.fixture
def bad_files(tmp_path):
    (tmp_path / "broken.json").write_text("{\"model_type\": \"mixtral\",")
    cfg = json.loads((PRESET_DIR / "mixtral-8x7b.json").read_text())
    del cfg["hidden_size"]
    (tmp_path / "incomplete.json").write_text(json.dumps(cfg))
    (tmp_path / "broken.yaml").write_text("gpu: {name: x\n")
    (tmp_path / "incomplete.yaml").write_text("name: x\ncpu: {}\n")
    return tmp_path


BAD = [
    (["--model", "mixtral-9x9b"], "model"),
    (["--hardware", "cray-1"], "hardware"),
    (["--model", "{d}/broken.json"], "not valid JSON"),
    (["--model", "{d}/incomplete.json"], "hidden_size"),
    (["--hardware", "{d}/broken.yaml"], "not valid YAML"),
    (["--hardware", "{d}/incomplete.yaml"], "gpu"),
    (["--prompt-len", "0"], "--prompt-len"),
    (["--gen-len", "-5"], "--gen-len"),
    (["--gen-len", "ten"], "--gen-len"),
    (["--batch", "0"], "--batch"),
    (["--batch", "2.5"], "--batch"),
    (["--micro-batches", "0"], "--micro-batches"),
    (["--batch", "4", "--micro-batches", "9"], "micro_batches"),
    (["--draft-len", "-1"], "--draft-len"),
    (["--draft-len", "4", "--acceptance", "1.0"], "acceptance"),
    (["--draft-len", "4", "--acceptance", "-0.2"], "acceptance"),
    (["--draft-len", "4", "--acceptance", "often"], "acceptance"),
    (["--draft-len", "4"], "--acceptance"),
    (["--draft-len", "4", "--acceptance", "0.8", "--draft", "tiny-llama"], "model"),
    (["--gpu-mem-GiB", "0"], "--gpu-mem-gib"),
    (["--cpu-mem-gib", "-1"], "--cpu-mem-gib"),
    (["--cpu-mem-GiB", "40"], "cpu memory"),
    (["--gpu-mem-GiB", "3"], "gpu memory"),
    (["--batch", "100000"], "cpu memory"),
    (["--kv-dtype", "fp12"], "--kv-dtype"),
]


@pytest.mark.parametrize("extra,field", BAD)
def test_bad_input_one_line_exit_2(extra, field, bad_files, capsys):
    argv = list(BASE)
    extra = [x.format(d=bad_files) for x in extra]
    for i in range(0, len(extra), 2):           # replace the flag if BASE has it, else append
        if extra[i] in argv:
            argv[argv.index(extra[i]) + 1] = extra[i + 1]
        else:
            argv += extra[i:i + 2]
    rc, out, err = _run(argv, capsys)
    assert rc == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("specmoe estimate: error: ")
    assert field in lines[0]
    assert "Traceback" not in err


def _sub(args, code=None):
    cmd = [sys.executable] + (["-c", code] if code else ["-m", "specmoe.runtime.cli.main"]) + args
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_subprocess_no_torch_and_no_traceback():
    code = ("import sys; from specmoe.runtime.cli.main import main; rc = main(sys.argv[1:]); "
            "bad = sorted(m for m in ('torch', 'cupy', 'transformers') if m in sys.modules); "
            "print('IMPORTED', bad, file=sys.stderr); sys.exit(rc)")
    p = _sub(BASE[0:1] + BASE[1:] + ["--draft-len", "4", "--acceptance", "0.8", "--json"], code)
    assert p.returncode == 0, p.stderr
    json.loads(p.stdout)
    assert "IMPORTED []" in p.stderr
    p = _sub(["estimate", "--model", "nope", "--hardware", "a30-xeon6426y", "--prompt-len", "5", "--gen-len", "5"])
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
