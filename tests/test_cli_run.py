"""`specmoe run`: end to end, prompt files, bad input (exit 2, no output files), Ctrl-C keeping the
finished sequences and writing a run record marked incomplete."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from engine_fixtures import one_thread_per_module  # noqa: F401 (autouse: one torch thread)
from engine_fixtures import REPO, add_tokenizer, make_pair
from specmoe.runtime.cli.main import main
from specmoe.runtime.cli.run import read_prompts
from specmoe.runtime.engine import plan_for_checkpoint




@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    t, d = make_pair(root, "mixtral", "llama", seed=4, scale=0.9)
    add_tokenizer(t)
    plan = root / "plan.json"
    plan_for_checkpoint(t, d, "devbox-2core", batch=3, draft_len=3, micro_batches=2).to_json(plan)
    return root, t, d, plan


def test_run_end_to_end(setup, tmp_path, capsys):
    root, t, d, plan = setup
    prompts = tmp_path / "p.jsonl"
    texts = ["w5 w6 w7", "w40", "w93 w94", "w10 w11 w12 w13", "w77"]
    prompts.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(texts)))
    out, rec = tmp_path / "out.jsonl", tmp_path / "run.json"
    code = main(["run", str(plan), "--target", str(t), "--draft", str(d), "--prompts", str(prompts),
                 "--max-new-tokens", "8", "--outputs", str(out), "-o", str(rec), "--no-progress"])
    assert code == 0
    r = json.loads(rec.read_text())
    assert r["complete"] and r["finished_sequences"] == 5 and r["draft_len"] == 3
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(x["index"] for x in rows) == list(range(5))
    for x in rows:
        assert x["prompt"] == texts[x["index"]] and 1 <= len(x["token_ids"]) <= 8 and isinstance(x["text"], str)
    assert "tok/s" in capsys.readouterr().out
    # plain text prompts, --draft-len 0 (no speculation) gives the same tokens
    plain = tmp_path / "p.txt"
    plain.write_text("\n".join(texts) + "\n\n")
    out0, rec0 = tmp_path / "out0.jsonl", tmp_path / "run0.json"
    assert main(["run", str(plan), "--target", str(t), "--draft", str(d), "--prompts", str(plain), "--draft-len", "0",
                 "--max-new-tokens", "8", "--outputs", str(out0), "-o", str(rec0), "--no-progress"]) == 0
    rows0 = {x["index"]: x["token_ids"] for x in map(json.loads, out0.read_text().splitlines())}
    assert rows0 == {x["index"]: x["token_ids"] for x in rows}
    assert json.loads(rec0.read_text())["draft_len"] == 0


def test_read_prompts(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("one\n\n two \n")
    assert read_prompts(f) == ["one", " two "]
    f.write_text('{"prompt": "x"}\n{"prompt": "y", "meta": 1}\n')
    assert read_prompts(f) == ["x", "y"]


@pytest.mark.parametrize("content,match", [(b"", "is empty"), (b"  \n\n", "is empty"), (b"\x00\x01\x02", "not a text"),
                                           (b"\xff\xfe\xfa", "not UTF-8"), (b'{"prompt": "a"}\n{"x": 1}\n', "line 2"),
                                           (b'{"prompt": "a"}\n{oops\n', "not valid JSON")])
def test_bad_prompt_files_exit_2_without_outputs(setup, tmp_path, capsys, content, match):
    root, t, d, plan = setup
    p = tmp_path / "p"
    p.write_bytes(content)
    out, rec = tmp_path / "out.jsonl", tmp_path / "run.json"
    code = main(["run", str(plan), "--target", str(t), "--draft", str(d), "--prompts", str(p),
                 "--outputs", str(out), "-o", str(rec), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not rec.exists()


def test_bad_arguments_exit_2(setup, tmp_path, capsys):
    root, t, d, plan = setup
    p = tmp_path / "p.txt"
    p.write_text("w5\n")
    base = ["run", str(plan), "--target", str(t), "--prompts", str(p), "-o", str(tmp_path / "r.json"), "--no-progress"]
    assert main(base) == 2 and "no draft was given" in capsys.readouterr().err
    assert main(base + ["--draft", str(d), "--draft-len", "-1"]) == 2
    assert main(base + ["--draft", str(d), "--max-new-tokens", "0"]) == 2
    assert main(base[:1] + [str(tmp_path / "nope.json")] + base[2:] + ["--draft", str(d)]) == 2
    assert not (tmp_path / "r.json").exists()


def test_ctrl_c_keeps_finished_sequences(setup, tmp_path):
    root, t, d, plan = setup
    p = tmp_path / "p.txt"
    p.write_text("\n".join(f"w{3 + i % 90} w{4 + i % 90}" for i in range(400)) + "\n")
    out, rec = tmp_path / "out.jsonl", tmp_path / "run.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "specmoe.runtime.cli.main", "run", str(plan), "--target", str(t), "--draft", str(d),
                             "--prompts", str(p), "--max-new-tokens", "40", "--outputs", str(out), "-o", str(rec),
                             "--no-progress"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if out.exists() and len(out.read_text().splitlines()) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    r = json.loads(rec.read_text())
    assert r["complete"] is False and "KeyboardInterrupt" in r["error"]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert 3 <= len(rows) == r["finished_sequences"] < 400


def test_bad_prompt_ids_leave_no_files(setup, tmp_path, capsys):
    root, t, d, plan = setup
    p = tmp_path / "p.txt"
    p.write_text("w5 w6\n" + "w1 " * 600 + "\n")   # the second prompt is longer than max_position_embeddings
    out, rec = tmp_path / "out.jsonl", tmp_path / "run.json"
    code = main(["run", str(plan), "--target", str(t), "--draft", str(d), "--prompts", str(p), "--outputs", str(out),
                 "-o", str(rec), "--no-progress"])
    assert code == 2 and "max_position_embeddings" in capsys.readouterr().err
    assert not out.exists() and not rec.exists()


def test_run_probes_the_machine_when_the_spec_has_a_probe(setup, tmp_path):
    """A plan whose hardware spec carries a calibration speed probe: `specmoe run` times the same probe
    before and after the run and records the ratio; --no-speed-probe skips it; a spec without one
    (the setup's devbox-2core) records none."""
    from dataclasses import replace

    from specmoe.planner.plan import Plan
    from specmoe.runtime.calibrate.spec import engine_configs, resolve_model_config

    root, t, d, plan = setup
    p = Plan.from_json(plan)
    cfgs = engine_configs(resolve_model_config(None))
    cfgs = {"target": cfgs["target"], "drafts": {1: cfgs["drafts"][1]}}
    hw = {**p.hardware, "measured": {**p.hardware.get("measured", {}), "source": "test",
                                     "details": {"speed_probe": {"iteration_s": 0.01, "engine_configs": cfgs}}}}
    probed = tmp_path / "probed.json"
    replace(p, hardware=hw, input_hashes={}).to_json(probed)      # hashes recomputed for the new spec
    prompts = tmp_path / "p.txt"
    prompts.write_text("w5 w6\nw40\n")
    runs = {}
    for name, pl, extra in (("probed", probed, []), ("skipped", probed, ["--no-speed-probe"]), ("none", plan, [])):
        rec = tmp_path / f"run-{name}.json"
        assert main(["run", str(pl), "--target", str(t), "--draft", str(d), "--prompts", str(prompts),
                     "--max-new-tokens", "4", "-o", str(rec), "--no-progress", *extra]) == 0
        runs[name] = json.loads(rec.read_text())["speed_probe"]
    sp = runs["probed"]
    assert sp["calibration_iteration_s"] == 0.01 and sp["before_s"] > 0 and sp["after_s"] > 0
    assert sp["ratio"] == pytest.approx((sp["before_s"] + sp["after_s"]) / 2 / 0.01)
    assert runs["skipped"] is None and runs["none"] is None


def test_open_stream_plan_runs_on_five_prompts(setup, tmp_path):
    """`specmoe plan` without --num-prompts plans an open stream (a batch far above five for a small
    model); `specmoe run` of that plan on five prompts allocates KV for those five and finishes."""
    root, t, d, _ = setup
    plan = tmp_path / "open.json"
    assert main(["plan", "--model", str(t), "--draft", str(d), "--hardware", "devbox-2core", "--prompt-len", "64",
                 "--gen-len", "32", "--acceptance", "0.6", "--weight-dtype", "fp32", "--kv-dtype", "fp32",
                 "--micro-batches", "1,2", "--max-draft-len", "2", "-o", str(plan)]) == 0
    p = json.loads(plan.read_text())
    assert p["batch"] > 1000 and p["placement"]["attention_device"] == "cpu"
    prompts = tmp_path / "p.txt"
    prompts.write_text("w5 w6 w7\nw40\nw93 w94\nw10 w11 w12 w13\nw77\n")
    rec = tmp_path / "run.json"
    assert main(["run", str(plan), "--target", str(t), "--draft", str(d), "--prompts", str(prompts),
                 "--max-new-tokens", "6", "-o", str(rec), "--no-progress"]) == 0
    r = json.loads(rec.read_text())
    assert r["complete"] and r["finished_sequences"] == 5 and r["rows"] == 5 and r["batch"] == p["batch"]


def test_run_warms_the_engine_up_first(setup, tmp_path, monkeypatch):
    """`specmoe run` makes one short untimed generation before the run (Engine.warm_up), whose one-time costs
    then stay out of the run record; the run's tokens are those of an engine that never warmed up."""
    from specmoe.runtime.engine import Engine

    root, t, d, plan = setup
    prompts = tmp_path / "p.txt"
    prompts.write_text("w5 w6 w7\nw40\n")
    calls = []
    real = Engine.warm_up
    monkeypatch.setattr(Engine, "warm_up", lambda self, p=None: calls.append(len(p)) or real(self, p))
    out, rec = tmp_path / "out.jsonl", tmp_path / "run.json"
    assert main(["run", str(plan), "--target", str(t), "--draft", str(d), "--prompts", str(prompts),
                 "--max-new-tokens", "6", "--outputs", str(out), "-o", str(rec), "--no-progress"]) == 0
    assert calls == [2]                                  # on the run's own first batch (plan batch 3)
    r = json.loads(rec.read_text())
    assert r["finished_sequences"] == 2 and r["sequences"] == 2      # the warm-up's two prompts are not the run's
    cold = Engine(str(plan), t, d).generate(read_prompts(prompts), max_new_tokens=6)
    warm = {x["index"]: x["token_ids"] for x in map(json.loads, out.read_text().splitlines())}
    assert warm == {o.index: o.token_ids for o in cold.outputs}
