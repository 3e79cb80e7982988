"""Hostile outputs: an output path that is an input or another output, that cannot be written, a
second run on the same --outputs, a full disk, SIGTERM and a second Ctrl-C. Each is refused before
any work (exit 2, one line naming the option, nothing touched) or keeps every whole line and the run
record marked incomplete. Also exactness by default: greedy speculation on the CPU equals k = 0."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine_fixtures import one_thread_per_module  # noqa: F401 (autouse: one torch thread)
from engine_fixtures import REPO, add_tokenizer, have_tiny_pair, make_pair
from test_hostile_inputs import refused, snapshot
from specmoe.planner import atomic_file
from specmoe.planner.atomic_file import LineWriter, atomic_write_text
from specmoe.planner.errors import SpecError
from specmoe.runtime.cli.main import main
from specmoe.runtime.engine import plan_for_checkpoint

TINY = REPO / "models" / "tiny-moe"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("outs")
    t, d = make_pair(root, "mixtral", "llama", seed=6)
    add_tokenizer(t)
    plan = root / "plan.json"
    plan_for_checkpoint(t, d, "devbox-2core", batch=2, draft_len=2).to_json(plan)
    return root, t, d, plan


def prompts_file(tmp_path: Path, n: int = 3) -> Path:
    p = tmp_path / "p.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"w{5 + i} w{6 + i}"}) + "\n" for i in range(n)))
    return p


def run_argv(pair, prompts, output, *extra) -> list:
    root, t, d, plan = pair
    return ["run", plan, "--target", t, "--draft", d, "--prompts", prompts, "--max-new-tokens", "4", "-o", output,
            "--no-progress", "--no-speed-probe", *extra]


def no_weights_loaded(monkeypatch):
    """Make loading any weights fail loudly: a refusal must come before it."""
    import specmoe.runtime.engine as eng

    def boom(*a, **k):
        raise AssertionError("weights were loaded before the output paths were checked")
    monkeypatch.setattr(eng.Engine, "_load", boom)


# ---- outputs that are inputs or each other --------------------------------------------------------
def test_outputs_equal_to_prompts(pair, tmp_path, capsys, monkeypatch):
    no_weights_loaded(monkeypatch)
    p = prompts_file(tmp_path)
    refused(capsys, run_argv(pair, p, tmp_path / "r.json", "--outputs", p), "--outputs", p, pair[0])
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("case", ["outputs=-o", "-o=plan", "-o=prompts", "outputs=plan", "hardlink", "symlink",
                                  "dot-path", "outputs=checkpoint-file", "-o=checkpoint-file"])
def test_colliding_run_outputs(pair, tmp_path, capsys, monkeypatch, case):
    no_weights_loaded(monkeypatch)
    root, t, d, plan = pair
    p = prompts_file(tmp_path)
    rec = tmp_path / "r.json"
    rec.write_text("earlier run record")
    extra = []
    if case == "outputs=-o":
        out, extra, field = rec, ["--outputs", rec], "--outputs"
    elif case == "-o=plan":
        out, field = plan, "-o"
    elif case == "-o=prompts":
        out, field = p, "-o"
    elif case == "outputs=plan":
        out, extra, field = rec, ["--outputs", plan], "--outputs"
    elif case == "hardlink":
        os.link(p, tmp_path / "alias.jsonl")
        out, extra, field = rec, ["--outputs", tmp_path / "alias.jsonl"], "--outputs"
    elif case == "symlink":
        (tmp_path / "link.json").symlink_to(plan)
        out, field = tmp_path / "link.json", "-o"
    elif case == "dot-path":
        out, extra, field = rec, ["--outputs", tmp_path / "." / ".." / tmp_path.name / "p.jsonl"], "--outputs"
    elif case == "outputs=checkpoint-file":
        out, extra, field = rec, ["--outputs", t / "tokenizer.json"], "--outputs"
    else:
        out, field = t / "config.json", "-o"
    refused(capsys, run_argv(pair, p, out, *extra), field, p, rec, root)


def test_run_plan_beside_the_record_must_not_replace_the_given_plan(pair, tmp_path, capsys, monkeypatch):
    """--draft-len writes RUN.plan.json; when that is the plan given, refuse before any work."""
    no_weights_loaded(monkeypatch)
    root, t, d, plan = pair
    given = tmp_path / "r.plan.json"
    given.write_bytes(plan.read_bytes())
    p = prompts_file(tmp_path)
    argv = run_argv(pair, p, tmp_path / "r.json", "--draft-len", "1")
    argv[1] = given
    refused(capsys, argv, "plan.json", given, p)


# ---- outputs that cannot be written ----------------------------------------------------------------
@pytest.mark.parametrize("where", ["proc", "directory", "missing-parent", "parent-is-file", "device", "long-name",
                                   "nul-byte"])
def test_unwritable_run_record(pair, tmp_path, capsys, monkeypatch, where):
    no_weights_loaded(monkeypatch)
    p = prompts_file(tmp_path)
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    out = {"proc": "/proc/run.json", "directory": tmp_path / "adir", "missing-parent": tmp_path / "no" / "r.json",
           "parent-is-file": tmp_path / "afile" / "r.json", "device": "/dev/null",
           "long-name": tmp_path / ("r" * 300 + ".json"), "nul-byte": str(tmp_path / "r\x00.json")}[where]
    if where == "nul-byte":
        before = snapshot(tmp_path)
        assert main([str(a) for a in run_argv(pair, p, out)]) == 2
        assert "-o" in capsys.readouterr().err and snapshot(tmp_path) == before
        return
    refused(capsys, run_argv(pair, p, out), "-o", p, tmp_path)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["adir", "afile", "p.jsonl"]   # no DIR.tmp left behind
    assert Path("/dev/null").is_char_device()


@pytest.mark.parametrize("where", ["proc", "directory", "missing-parent"])
def test_unwritable_outputs(pair, tmp_path, capsys, monkeypatch, where):
    no_weights_loaded(monkeypatch)
    p = prompts_file(tmp_path)
    (tmp_path / "adir").mkdir()
    out = {"proc": "/proc/o.jsonl", "directory": tmp_path / "adir", "missing-parent": tmp_path / "no" / "o.jsonl"}[where]
    refused(capsys, run_argv(pair, p, tmp_path / "r.json", "--outputs", out), "--outputs", p, tmp_path)
    assert not (tmp_path / "r.json").exists()


PLAN_ARGS = ["plan", "--model", TINY, "--hardware", "devbox-2core", "--prompt-len", "16", "--gen-len", "16",
             "--batch", "2", "--max-draft-len", "0"]


@pytest.mark.parametrize("where", ["proc", "directory", "missing-parent", "model-config", "device"])
def test_plan_output_checked_before_planning(tmp_path, capsys, monkeypatch, where):
    import specmoe.planner.optimizer as opt

    monkeypatch.setattr(opt, "optimize", lambda *a, **k: (_ for _ in ()).throw(AssertionError("planned")))
    (tmp_path / "adir").mkdir()
    cfg = tmp_path / "config.json"
    cfg.write_bytes((TINY / "config.json").read_bytes())
    out = {"proc": "/proc/plan.json", "directory": tmp_path / "adir", "missing-parent": tmp_path / "no" / "p.json",
           "model-config": cfg, "device": "/dev/null"}[where]
    argv = [a if a is not TINY else cfg for a in PLAN_ARGS] + ["-o", out]
    refused(capsys, argv, "-o", cfg, tmp_path)


@pytest.fixture(scope="module")
def plan_and_run(pair, tmp_path_factory):
    root = tmp_path_factory.mktemp("rep")
    p = root / "p.jsonl"
    p.write_text(json.dumps({"prompt": "w5 w6"}) + "\n")
    assert main([str(a) for a in run_argv(pair, p, root / "run.json")]) == 0
    return pair[3], root / "run.json"


@pytest.mark.parametrize("where", ["plan", "run", "proc", "directory"])
def test_report_output_checked(tmp_path, capsys, plan_and_run, where):
    plan, run = plan_and_run
    (tmp_path / "adir").mkdir()
    out = {"plan": plan, "run": run, "proc": "/proc/report.html", "directory": tmp_path / "adir"}[where]
    refused(capsys, ["report", plan, run, "-o", out], "-o", plan, run, tmp_path)


# ---- the --outputs stream ---------------------------------------------------------------------------
def test_a_second_writer_is_refused(tmp_path):
    out = tmp_path / "o.jsonl"
    a = LineWriter(out, "--outputs")
    a.write_line('{"index": 0}')
    with pytest.raises(SpecError, match="--outputs.*another run"):
        LineWriter(out, "--outputs")
    a.write_line('{"index": 1}')
    a.close()
    assert out.read_text() == '{"index": 0}\n{"index": 1}\n'
    b = LineWriter(out, "--outputs")       # once the first has closed, a new run may rewrite it
    b.close()
    assert out.read_text() == ""


def test_a_full_disk_cuts_back_to_the_last_whole_line(tmp_path, monkeypatch):
    out = tmp_path / "o.jsonl"
    w = LineWriter(out, "--outputs")
    w.write_line('{"index": 0, "text": "first"}')
    calls = []

    def full(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return os.write(fd, data[:5])          # part of the line fits, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(atomic_file, "write_some", full)
    with pytest.raises(OSError):
        w.write_line('{"index": 1, "text": "second"}')
    w.close()
    assert out.read_text() == '{"index": 0, "text": "first"}\n' and w.lines == 1


def test_full_disk_during_a_run_keeps_whole_lines_and_says_so(pair, tmp_path, capsys, monkeypatch):
    p = prompts_file(tmp_path, 4)
    out = tmp_path / "o.jsonl"
    real = os.write
    state = {"n": 0}

    def full_after_two(fd, data):
        state["n"] += 1
        if state["n"] > 2:
            real(fd, bytes(data[:7]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)
    monkeypatch.setattr(atomic_file, "write_some", full_after_two)
    assert main([str(a) for a in run_argv(pair, p, tmp_path / "r.json", "--outputs", out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "2 finished sequences kept" in err, err
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 2 and out.read_text().endswith("\n")
    assert json.loads((tmp_path / "r.json").read_text())["complete"] is False


def test_atomic_writes_use_a_temporary_name_of_their_own(tmp_path, monkeypatch):
    names = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (names.append(Path(a).name), real(a, b))[1])
    for i in range(3):
        atomic_write_text(tmp_path / "plan.json", f"v{i}")
    assert len(set(names)) == 3 and all(n.startswith(".plan.json.") for n in names)
    assert [x.name for x in tmp_path.iterdir()] == ["plan.json"] and (tmp_path / "plan.json").read_text() == "v2"


# ---- stopping a run ---------------------------------------------------------------------------------
def _started(pair, tmp_path, n: int):
    root, t, d, plan = pair
    p = prompts_file(tmp_path, n)
    cmd = [sys.executable, "-m", "specmoe.runtime.cli.main", *map(str, run_argv(pair, p, tmp_path / "r.json",
                                                                                   "--outputs", tmp_path / "o.jsonl"))]
    cmd[cmd.index("--max-new-tokens") + 1] = "60"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while time.time() - t0 < 60:              # wait for the first finished sequence
        if (tmp_path / "o.jsonl").exists() and (tmp_path / "o.jsonl").read_text().count("\n") >= 1:
            return proc
        time.sleep(0.05)
    proc.kill()
    pytest.fail("no sequence finished")


@pytest.mark.parametrize("how", ["SIGTERM", "two Ctrl-C", "three Ctrl-C"])
def test_stopped_runs_keep_the_record(pair, tmp_path, how):
    proc = _started(pair, tmp_path, 400)
    if how == "SIGTERM":
        proc.send_signal(signal.SIGTERM)
    else:
        for _ in range(2 if how == "two Ctrl-C" else 3):
            proc.send_signal(signal.SIGINT)
            time.sleep(0.01)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == (143 if how == "SIGTERM" else 130), err
    assert "Traceback" not in err
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["complete"] is False
    lines = (tmp_path / "o.jsonl").read_text()
    assert lines.endswith("\n") and all(json.loads(x) for x in lines.splitlines())


# ---- exactness by default ----------------------------------------------------------------------------------
@pytest.mark.skipif(not have_tiny_pair(), reason="needs models/tiny-moe and models/tiny-draft")
def test_cpu_default_greedy_speculation_equals_k0(tmp_path, capsys):
    """On the CPU the default compute dtype is float32, so greedy k = 2 gives k = 0's tokens (in bf16
    one of 64 prompts differed from token 92 at 128 tokens)."""
    plan = tmp_path / "plan.json"
    assert main(["plan", "--model", str(TINY), "--draft", str(REPO / "models" / "tiny-draft"), "--hardware",
                 "devbox-2core", "--prompt-len", "32", "--gen-len", "96", "--acceptance", "0.6", "--batch", "16",
                 "--max-draft-len", "2", "-o", str(plan)]) == 0
    lines = (REPO / "models" / "prompts.jsonl").read_text().splitlines()[:24]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(lines) + "\n")
    outs = {}
    for k in (2, 0):
        o = tmp_path / f"o{k}.jsonl"
        assert main(["run", str(plan), "--target", str(TINY), "--draft", str(REPO / "models" / "tiny-draft"),
                     "--prompts", str(prompts), "--draft-len", str(k), "--max-new-tokens", "96",
                     "--outputs", str(o), "-o", str(tmp_path / f"r{k}.json"), "--no-progress"]) == 0
        outs[k] = {x["index"]: x["token_ids"] for x in map(json.loads, o.read_text().splitlines())}
        assert json.loads((tmp_path / f"r{k}.json").read_text())["dtype"] == "float32"
    assert outs[2] == outs[0] and len(outs[0]) == 24
