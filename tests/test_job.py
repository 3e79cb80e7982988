"""`specmoe job` on a real local Ray cluster started here (two engine workers on 127.0.0.1), with the
bundled pair: the job's greedy outputs are `specmoe run`'s token for token; a worker killed with
ray.kill mid-job loses and duplicates nothing; a job stopped with Ctrl-C resumes and finishes the
rest; bad rows are refused or skipped by line."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from engine_fixtures import TINY_DRAFT, TINY_MOE, TINY_PROMPTS
from specmoe.planner.errors import SpecError
from specmoe.runtime.job.dataset import read_dataset

PROMPTS, NEW_TOKENS = 16, 10
LINE = re.compile(r"^job: (\d+) prompts on (\d+) workers, \d+\.\d s, \d+\.\d tok/s \(predicted \d+\.\d tok/s\)$")

needs_pair = pytest.mark.skipif(not (TINY_MOE / "config.json").is_file(), reason="the bundled tiny pair is absent")


@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=3, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def job_inputs(tmp_path_factory):
    """The plan, the first PROMPTS prompts and `specmoe run`'s outputs of them (the reference)."""
    from specmoe.runtime.cli.main import main
    from specmoe.runtime.engine import plan_for_checkpoint

    d = tmp_path_factory.mktemp("job")
    plan = d / "plan.json"
    plan_for_checkpoint(TINY_MOE, TINY_DRAFT, "devbox-2core", batch=4, draft_len=3, gen_len=NEW_TOKENS).to_json(plan)
    prompts = d / "prompts.jsonl"
    prompts.write_text("".join(TINY_PROMPTS.read_text().splitlines(keepends=True)[:PROMPTS]))
    assert main(["run", str(plan), "--target", str(TINY_MOE), "--draft", str(TINY_DRAFT), "--prompts", str(prompts),
                 "--max-new-tokens", str(NEW_TOKENS), "--outputs", str(d / "run.jsonl"), "-o", str(d / "run.json"),
                 "--no-progress", "--no-speed-probe"]) == 0
    ref = {r["index"]: r["token_ids"] for r in map(json.loads, (d / "run.jsonl").read_text().splitlines())}
    assert sorted(ref) == list(range(PROMPTS))
    return {"dir": d, "plan": plan, "prompts": prompts, "reference": ref}


def _rows(outputs: Path) -> list[dict]:
    return [json.loads(line) for p in sorted(outputs.glob("part-*.jsonl")) for line in p.read_text().splitlines()]


def _spec(inp, outputs, **kw):
    from specmoe.planner.plan import Plan
    from specmoe.runtime.job.driver import JobSpec

    return JobSpec(Plan.from_json(inp["plan"]), str(TINY_MOE), str(TINY_DRAFT), str(inp["prompts"]), str(outputs),
                   workers=2, max_new_tokens=NEW_TOKENS, **kw)


def _check_exactly_once(inp, outputs: Path) -> None:
    rows = _rows(outputs)
    indices = [r["index"] for r in rows]
    assert sorted(indices) == list(range(PROMPTS)), "a prompt lost or written twice"
    for r in rows:
        assert r["token_ids"] == inp["reference"][r["index"]], f"prompt {r['index']} differs from `specmoe run`"


@needs_pair
@pytest.mark.slow
def test_job_cli_matches_specmoe_run(cluster, job_inputs, tmp_path, capsys):
    from specmoe.runtime.cli.main import main

    out = tmp_path / "out"
    code = main(["job", str(job_inputs["plan"]), "--target", str(TINY_MOE), "--draft", str(TINY_DRAFT), "--prompts",
                 str(job_inputs["prompts"]), "--workers", "2", "--outputs", str(out), "--max-new-tokens",
                 str(NEW_TOKENS), "--batch-size", "4"])
    assert code == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    m = LINE.match(last)
    assert m and m.groups() == (str(PROMPTS), "2"), last
    _check_exactly_once(job_inputs, out)
    rec = json.loads((out / "job.json").read_text())
    assert rec["complete"] and rec["written"] == PROMPTS and rec["retried"] == 0 and rec["retries"] == []
    # the workers' run records merged: every finished sequence and token counted once, by the worker that ran it
    assert sum(w["finished_sequences"] for w in rec["workers"].values()) == PROMPTS
    assert sum(w["generated_tokens"] for w in rec["workers"].values()) == rec["generated_tokens"] == \
        sum(len(t) for t in job_inputs["reference"].values())
    by_worker = {}
    for r in _rows(out):
        by_worker[r["worker"]] = by_worker.get(r["worker"], 0) + 1
    assert by_worker == {w: v["finished_sequences"] for w, v in rec["workers"].items() if v["finished_sequences"]}
    assert rec["predicted"]["tokens_per_s"] > 0 and rec["predicted"]["kinds"][0]["count"] == 2


@needs_pair
@pytest.mark.slow
@pytest.mark.parametrize("restart", [False, True], ids=["killed", "killed-and-restarted"])
def test_killed_worker_loses_and_duplicates_nothing(cluster, job_inputs, tmp_path, restart):
    from specmoe.runtime.job.board import worker_handles
    from specmoe.runtime.job.driver import run_job

    killed = []

    def kill_one(row, st):
        if not killed:
            handles = worker_handles(st.board_name)
            victim = next(w for w in handles if w != row["worker"]) if len(handles) > 1 else next(iter(handles))
            cluster.kill(handles[victim], no_restart=not restart)
            killed.append(victim)

    res = run_job(_spec(job_inputs, tmp_path / "out", batch_size=2), on_row=kill_one)
    assert killed and res.complete
    _check_exactly_once(job_inputs, tmp_path / "out")
    rec = res.record
    assert rec["written"] == PROMPTS and rec["duplicates_dropped"] >= 0
    if not restart:
        assert len(rec["retries"]) >= 1            # the pass failed and the unfinished prompts ran again
    # the merged record counts each written prompt once, whatever ran twice
    assert sum(w["finished_sequences"] for w in rec["workers"].values()) == PROMPTS


@needs_pair
@pytest.mark.slow
def test_interrupted_job_resumes_and_finishes_the_rest(cluster, job_inputs, tmp_path):
    from specmoe.runtime.job.driver import run_job

    out = tmp_path / "out"

    def ctrl_c(row, st):
        if st.writer.written >= 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_job(_spec(job_inputs, out, batch_size=2), on_row=ctrl_c)
    first = _rows(out)
    assert len(first) == 5 and len({r["index"] for r in first}) == 5
    assert json.loads((out / "job.json").read_text())["complete"] is False
    # another job's settings are refused, before any work
    with pytest.raises(SpecError, match="another job"):
        run_job(_spec(job_inputs, out, batch_size=2).__class__(**{**_spec(job_inputs, out).__dict__,
                                                                 "max_new_tokens": NEW_TOKENS + 1}))
    logs = []
    res = run_job(_spec(job_inputs, out, batch_size=2), log=logs.append)
    assert res.complete and res.record["resumed"] == 5 and res.record["written"] == PROMPTS - 5
    assert any("resuming: 5 prompts" in m for m in logs)
    assert LINE.match(res.line) and res.line.startswith(f"job: {PROMPTS - 5} prompts")
    _check_exactly_once(job_inputs, out)


def test_bad_rows_are_reported_by_line(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "a"}\n\n{"prompt": 3}\nnot json\n{"prompt": ""}\n{"prompt": "b"}\n')
    with pytest.raises(SpecError, match=r"line 3: the prompt is a int.*\(and 2 more bad rows\)"):
        read_dataset(p, "refuse")
    ds = read_dataset(p, "skip")
    assert [(r.index, r.line, r.prompt) for r in ds.rows] == [(0, 1, "a"), (4, 6, "b")]
    assert [(line, index) for line, index, _ in ds.bad] == [(3, 1), (4, 2), (5, 3)]
    assert "not valid JSON" in ds.bad[1][2] and "empty" in ds.bad[2][2]


def test_parquet_prompts(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    p = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["x", None, "y"]}), p)
    with pytest.raises(SpecError, match="line 2: the prompt is missing"):
        read_dataset(p)
    assert [(r.index, r.prompt) for r in read_dataset(p, "skip").rows] == [(0, "x"), (2, "y")]
    q = tmp_path / "q.parquet"
    pq.write_table(pa.table({"text": ["x"]}), q)
    with pytest.raises(SpecError, match="no 'prompt' column"):
        read_dataset(q)


def test_a_torn_shard_is_cut_to_its_whole_lines(tmp_path):
    from specmoe.runtime.job.outputs import scan

    (tmp_path / "part-00000.jsonl").write_text('{"index": 0}\n{"index": 1}\n{"ind')
    found = scan(tmp_path)
    assert found.done == {0, 1} and found.repaired == ["part-00000.jsonl"] and found.next_shard == 1
    assert (tmp_path / "part-00000.jsonl").read_text() == '{"index": 0}\n{"index": 1}\n'
