"""run_job(): a plan's prompts over a Ray cluster, planned and predicted like one run.

  1. the dataset read (bad rows refused or skipped, by line), the outputs directory scanned: the
     prompts already on disk are skipped (a resumed job), the rest are pending;
  2. the prediction: planner/fleet.py on W hosts running the plan, the pending prompts shared
     among them in batches of `batch_size` (each batch one Engine.generate, so each drains);
  3. Ray Data: the pending rows as a dataset, map_batches over W EngineWorker actors (one Engine
     each), the output rows streamed back and written by this process alone, once per index;
  4. a lost worker (killed, its node gone) fails the pass: the prompts not on disk are run again on
     the workers left (a new pool), up to max_retries times; Ctrl-C stops with every written row
     kept (run the same command to finish);
  5. the job record (record.py) and one line: `job: N prompts on W workers, T.T s, X tok/s
     (predicted Y tok/s)`.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from specmoe.planner.atomic_file import atomic_write_text
from specmoe.planner.errors import SpecError
from specmoe.planner.fleet import FleetJob, fleet
from specmoe.planner.plan import Plan

from specmoe.runtime.job.board import start_board
from specmoe.runtime.job.dataset import Dataset, Row, read_dataset
from specmoe.runtime.job.outputs import OnDisk, ShardWriter, check_directory, check_manifest, scan
from specmoe.runtime.job.record import job_record, to_json
from specmoe.runtime.job.worker import EngineWorker

PROMPT_LEN_SAMPLE = 2000     # prompts tokenized for the prediction's mean prompt length


@dataclass
class JobSpec:
    plan: Plan
    target: str
    draft: str | None
    prompts: str
    outputs: str
    workers: int = 2
    address: str | None = None           # None: a local Ray cluster (or the one this process already joined)
    max_new_tokens: int = 64
    temperature: float = 0.0
    seed: int = 0
    batch_size: int | None = None        # prompts per engine call; None: batch_size_for()
    bad_rows: str = "refuse"
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    engine_options: dict = field(default_factory=dict)   # Engine(...) keywords: device, dtype, threads, ...
    max_retries: int = 3
    rows_per_shard: int = 10000
    record: str | None = None            # the job record's path; None: OUTPUTS/job.json
    progress: bool = False


@dataclass
class JobResult:
    record: dict
    line: str
    complete: bool
    board: str = ""


def batch_size_for(plan_batch: int, pending: int, workers: int) -> int:
    """At least one plan batch per call (a call drains its batch), at most four; and at least four
    calls per worker where the prompts allow (a lost worker loses one call, the stream stays even)."""
    return max(1, min(4 * plan_batch, max(plan_batch, math.ceil(pending / (4 * workers)))))


def run_job(spec: JobSpec, on_row: Callable[[dict, "JobState"], None] | None = None,
            log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> JobResult:
    st = _prepare(spec, log)
    ray_started = _connect(spec)
    try:
        st.board_name = f"specmoe-job-{uuid.uuid4().hex[:12]}"
        st.board = start_board(st.board_name)
        return _execute(spec, st, on_row, log)
    finally:
        if ray_started:
            import ray

            ray.shutdown()


@dataclass
class JobState:
    dataset: Dataset
    directory: Path
    writer: ShardWriter
    pending: list[Row]
    resumed: int
    batch_size: int
    prediction: dict
    board_name: str = ""
    board: object = None
    written_batches: set = field(default_factory=set)
    tokens: int = 0
    retries: list = field(default_factory=list)


def _prepare(spec: JobSpec, log, dry: bool = False) -> JobState:
    """The dataset, what is on disk and the prediction; `dry`: nothing written (no directory, manifest or repair)."""
    if spec.workers < 1:
        raise SpecError("--workers", f"must be >= 1, got {spec.workers}", "e.g. --workers 2")
    _fit_local_threads(spec, log)
    ds = read_dataset(spec.prompts, spec.bad_rows)
    for line, index, why in ds.bad[:20]:
        log(f"specmoe job: skipped line {line} (index {index}): {why}")
    if len(ds.bad) > 20:
        log(f"specmoe job: skipped {len(ds.bad) - 20} more bad rows (all in the job record)")
    directory = check_directory(spec.outputs, create=not dry)
    disk = scan(directory, repair=not dry) if directory.is_dir() else OnDisk()
    for name in disk.repaired:
        log(f"specmoe job: {name} ended in half a line (a killed writer): cut; that prompt runs again")
    manifest = {"dataset_sha256": ds.sha256, "plan": spec.plan.input_hashes, "draft_len": spec.plan.draft_len,
                "max_new_tokens": spec.max_new_tokens, "temperature": spec.temperature, "seed": spec.seed}
    if not dry:
        check_manifest(directory, manifest, resuming=bool(disk.done))
    resumed = sum(1 for r in ds.rows if r.index in disk.done)
    pending = [r for r in ds.rows if r.index not in disk.done]
    if resumed:
        log(f"specmoe job: resuming: {resumed} prompts already in {directory}, {len(pending)} to run")
    bs = spec.batch_size or batch_size_for(spec.plan.batch, len(pending), spec.workers)
    writer = ShardWriter(directory, disk.next_shard, set(disk.done), spec.rows_per_shard)
    return JobState(ds, directory, writer, pending, resumed, bs, _predict(spec, pending, bs))


def _fit_local_threads(spec: JobSpec, log) -> None:
    """On a local cluster W workers share this machine's cores: a plan whose threads would
    oversubscribe them (OpenMP threads spinning against each other) runs re-planned (planner/replan.py)
    at cores // W threads per worker, and is predicted so."""
    from specmoe.planner.replan import replan

    threads = max(1, (os.cpu_count() or 1) // spec.workers)
    if spec.address is not None or "threads" in spec.engine_options or spec.plan.schedule.cpu_threads <= threads:
        return
    log(f"specmoe job: local cluster: {spec.workers} workers share {os.cpu_count()} cores, so each runs "
        f"{threads} threads (the plan's {spec.plan.schedule.cpu_threads}, re-planned)")
    spec.plan = replan(spec.plan, schedule=spec.plan.schedule.with_changes(cpu_threads=threads))


def _predict(spec: JobSpec, pending: list[Row], batch_size: int) -> dict:
    """The fleet plan of the pending prompts on `workers` hosts running the plan (to_dict)."""
    if not pending:
        return {}
    try:
        from specmoe.runtime.weights.checkpoint import load_tokenizer

        tok = load_tokenizer(spec.target)
        sample = pending[:PROMPT_LEN_SAMPLE]
        lengths = [len(tok.encode(r.prompt)) for r in sample] if tok is not None else []
        prompt_len = max(1, round(sum(lengths) / len(lengths))) if lengths else None
        job = FleetJob(len(pending), prompt_len or int(spec.plan.workload["prompt_len"]), spec.max_new_tokens)
        return fleet(spec.plan.model, [(spec.plan, spec.workers)], job, call_size=batch_size).to_dict()
    except (SpecError, ValueError, KeyError) as e:
        return {"error": str(e)[:300]}


def _connect(spec: JobSpec) -> bool:
    """Join the cluster at spec.address, or start a local one; True when this call started Ray."""
    try:
        import ray
    except ImportError:
        raise SpecError("ray", "is not installed", "pip install 'specmoe[ray]'") from None
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = spec.progress
    ctx.execution_options.preserve_order = False
    if not spec.progress:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    if ray.is_initialized():
        return False
    if spec.address:
        ray.init(address=spec.address, logging_level=logging.WARNING)
    else:
        cpus = max(os.cpu_count() or 1, math.ceil(spec.workers * spec.cpus_per_worker) + 1)
        ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING)
    return True


def _stream(spec: JobSpec, st: JobState, rows: list[Row], on_row) -> None:
    """One pass of Ray Data over `rows`: each returned row written (once), as it comes."""
    import ray.data

    gen = {"max_new_tokens": spec.max_new_tokens, "temperature": spec.temperature, "seed": spec.seed}
    ds = ray.data.from_items([{"index": r.index, "prompt": r.prompt} for r in rows],
                             override_num_blocks=max(1, math.ceil(len(rows) / st.batch_size)))
    mapped = ds.map_batches(EngineWorker, batch_size=st.batch_size, compute=ray.data.ActorPoolStrategy(size=spec.workers),
                            num_cpus=spec.cpus_per_worker, num_gpus=spec.gpus_per_worker or None,
                            fn_constructor_kwargs={"plan_json": spec.plan.to_json(), "target": str(spec.target),
                                                   "draft": None if spec.draft is None else str(spec.draft),
                                                   "engine_options": dict(spec.engine_options),
                                                   "generate_options": gen, "board": st.board_name})
    for batch in mapped.iter_batches(batch_size=None, batch_format="numpy"):
        for i in range(len(batch["index"])):
            row = {"index": int(batch["index"][i]), "prompt": str(batch["prompt"][i]), "text": str(batch["text"][i]),
                   "token_ids": [int(t) for t in batch["token_ids"][i]],
                   "finish_reason": str(batch["finish_reason"][i]), "worker": str(batch["worker"][i])}
            if st.writer.add(row):
                st.written_batches.add(str(batch["batch_id"][i]))
                st.tokens += len(row["token_ids"])
                if on_row is not None:
                    on_row(row, st)


def _lost_worker(e: BaseException) -> str | None:
    """Why the pass failed when a worker (or its node) was lost; None for any other error."""
    from ray import exceptions as rex

    lost = tuple(getattr(rex, n) for n in ("RayActorError", "WorkerCrashedError", "NodeDiedError",
                                           "ObjectLostError", "OwnerDiedError") if hasattr(rex, n))
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, lost):
            return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        e = e.__cause__ or e.__context__
    return None


def _user_error(e: BaseException) -> SpecError | None:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, SpecError):
            return e
        e = e.__cause__ or e.__context__
    return None


def _run_passes(spec: JobSpec, st: JobState, on_row, log) -> None:
    """Passes until every pending prompt is on disk; a pass failed by a lost worker is retried."""
    while True:
        left = [r for r in st.pending if r.index not in st.writer.done]
        if not left:
            return
        before = st.writer.written
        try:
            _stream(spec, st, left, on_row)
        except Exception as e:  # noqa: BLE001  (Ray wraps the workers' errors in its own)
            why = _lost_worker(e)
            if why is None:
                raise (_user_error(e) or e)
            if len(st.retries) >= spec.max_retries:
                raise RuntimeError(f"a worker was lost {len(st.retries) + 1} times (last: {why})") from e
            st.retries.append(why)
            left = sum(1 for r in st.pending if r.index not in st.writer.done)
            log(f"specmoe job: a worker was lost ({why}); its unfinished prompts run again on the workers left: "
                f"{left} prompts (retry {len(st.retries)} of {spec.max_retries})")
            continue
        if st.writer.written == before:
            raise RuntimeError(f"a pass over {len(left)} prompts returned none of them")


def _execute(spec: JobSpec, st: JobState, on_row, log) -> JobResult:
    t0 = time.perf_counter()
    error, complete = None, False
    try:
        _run_passes(spec, st, on_row, log)
        complete = True
    except BaseException as e:
        error = "interrupted" if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {str(e)[:300]}"
        raise
    finally:
        st.writer.close()
        wall = time.perf_counter() - t0
        record = _record(spec, st, complete, error, wall)
        atomic_write_text(Path(spec.record) if spec.record else st.directory / "job.json", to_json(record))
    n = st.writer.written
    predicted = st.prediction.get("tokens_per_s")
    line = (f"job: {n} prompts on {spec.workers} workers, {wall:.1f} s, {st.tokens / wall if wall else 0.0:.1f} tok/s "
            f"(predicted {predicted:.1f} tok/s)" if predicted is not None else
            f"job: {n} prompts on {spec.workers} workers, {wall:.1f} s, {st.tokens / wall if wall else 0.0:.1f} tok/s "
            f"(predicted n/a: {st.prediction.get('error', 'nothing to run')})")
    return JobResult(record, line, complete, st.board_name)


def _record(spec: JobSpec, st: JobState, complete: bool, error: str | None, wall: float) -> dict:
    import ray

    try:
        workers, records = ray.get(st.board.snapshot.remote())
    except Exception:  # noqa: BLE001  (the record is still written without the board)
        workers, records = {}, {}
    summary = {"prompts": st.dataset.size, "resumed": st.resumed, "pending": len(st.pending),
               "written": st.writer.written, "on_disk": len(st.writer.done), "duplicates_dropped": st.writer.duplicates,
               "bad_rows": [{"line": ln, "index": i, "why": w} for ln, i, w in st.dataset.bad],
               "workers_requested": spec.workers, "batch_size": st.batch_size, "wall_s": wall,
               "generated_tokens": st.tokens, "tokens_per_s": st.tokens / wall if wall else 0.0,
               "retries": list(st.retries), "shards": list(st.writer.shards), "dataset": st.dataset.path,
               "dataset_sha256": st.dataset.sha256, "plan_hashes": spec.plan.input_hashes,
               "max_new_tokens": spec.max_new_tokens, "temperature": spec.temperature, "seed": spec.seed,
               "address": spec.address or "local"}
    return job_record(complete=complete, workers=workers, records=records, written_batches=st.written_batches,
                      prediction=st.prediction, summary=summary, error=error)


__all__ = ["JobResult", "JobSpec", "JobState", "batch_size_for", "dry_run", "run_job"]


def dry_run(spec: JobSpec) -> dict:
    """What run_job would do, without Ray: the prompts pending and the prediction."""
    st = _prepare(spec, lambda m: print(m, file=sys.stderr), dry=True)
    return {"prompts": st.dataset.size, "bad_rows": len(st.dataset.bad), "resumed": st.resumed,
            "pending": len(st.pending), "batch_size": st.batch_size, "predicted": st.prediction}
