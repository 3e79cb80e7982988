"""`specmoe demo`: the whole job on the bundled trained pair (models/tiny-moe + models/tiny-draft).

    res = run_demo("out/demo", n_prompts=32, max_new_tokens=48)
    res.summary_line   # demo: speculation X.XXx over k=0; iteration time error E.E% (predicted vs measured); report: PATH

1. calibrate this machine (runtime.calibrate, cached by machine fingerprint: the full measurement,
   about 30 s on 2 cores the first time; --quick accepts a cached quick one or measures one) ->
   hardware.yaml
2. profile acc(k) of each bundled draft (the draft model models/tiny-draft and the EAGLE head
   models/tiny-eagle) with the engine's greedy loop (runtime.acceptance_profile) on the job's prompts,
   cached in the out directory under a key of the models' content, the prompts and the settings
3. plan with planner.optimize on the calibrated spec, for each draft: prompt length from the prompts, gen =
   the new tokens, batch = the planner's choice capped by the number of prompts (or --batch), acceptance =
   the draft's profile, and the job's size (num_prompts: the batch drains at the end of a finite job,
   planner/batch_drain.py). When the planner's best has k = 0 (speculation does not pay by the
   model), the best plan with k >= 1 is run instead, so that speculation is measured; both
   predictions are printed. The draft whose plan the planner predicts faster for the job is the one run,
   and a line says which (runtime/demo_draft.py) -> plan.json. Without a GPU, CPU-computed experts are not
   offered to the planner: the "GPU" is the same cores, so they would only be the same work under another name.
4. run the prompts with speculation (the plan's k) and with k = 0 (same plan, draft_len = 0), five
   times each, interleaved spec, k=0, k=0, spec, ... (drift over the runs cancels out of the
   speedup) -> run.json and run_k0.json (each mode's fastest run by mean iteration time: the
   calibration keeps the fast end of its repetitions, runtime/calibrate/quiet.py, so the run compared
   with it is the one least touched by a slow spell; the median and the spread are printed beside it),
   outputs.jsonl, outputs_k0.jsonl, demo.json (summary)
5. predicted against measured (planner.report) -> the table on stdout, report.html

The iteration time error is signed: (predicted - measured) / measured of run.json's mean iteration,
as `specmoe report plan.json run.json` prints it (predicted at the run's mean live batch: a static
batch thins out under speculation as sequences finish at different iterations). The speedup is
decode tokens/s with speculation over k = 0, over all runs of each.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # before torch is imported (see runtime/calibrate/run.py)

import hashlib
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from specmoe.planner.atomic_file import atomic_write_text
from specmoe.planner.errors import SpecError
from specmoe.planner.workload import MAX_DRAFT_LEN

from specmoe.runtime.demo_draft import DRAFT_DIR, choose_draft

REPO = Path(__file__).resolve().parent.parent
TARGET_DIR = REPO / "models" / "tiny-moe"
PROMPTS = REPO / "models" / "prompts.jsonl"
STEPS = 5
REPEATS = 5          # runs per mode


@dataclass
class DemoResult:
    out_dir: Path
    spec_path: Path
    acceptance_path: Path
    plan_path: Path
    run_path: Path
    run_k0_path: Path
    report_path: Path
    speedup: float
    iteration_error_pct: float | None
    table: str
    draft_len: int
    batch: int
    micro_batches: int
    differing_sequences: int
    timings_s: dict = field(default_factory=dict)
    headline: Any = None          # planner.report.headline.Headline

    @property
    def summary_line(self) -> str:
        return self.headline.line(self.iteration_error_pct, str(self.report_path))


def content_hash(*paths: Path, extra: object = None) -> str:
    """sha256 of the files (name and bytes) under the given files/directories and of `extra` (JSON)."""
    h = hashlib.sha256()
    for root in paths:
        files = sorted(p for p in Path(root).rglob("*") if p.is_file()) if Path(root).is_dir() else [Path(root)]
        for f in files:
            h.update(str(f.relative_to(root) if Path(root).is_dir() else f.name).encode())
            h.update(f.read_bytes())
    if extra is not None:
        h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _check_inputs(n_prompts: int, max_new_tokens: int, batch: int | None) -> list[str]:
    from specmoe.runtime.cli.run import read_prompts

    for d in (TARGET_DIR, DRAFT_DIR):
        if not (d / "config.json").is_file():
            raise SpecError("models", f"the bundled model {d} is missing", "restore models/ (scripts/train_tiny.py makes it)")
    prompts = read_prompts(PROMPTS)
    for flag, v in (("--num-prompts", n_prompts), ("--max-new-tokens", max_new_tokens)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise SpecError(flag, f"must be a positive integer, got {v!r}", f"e.g. {flag} 32")
    if n_prompts > len(prompts):
        raise SpecError("--num-prompts", f"{n_prompts} exceeds the {len(prompts)} prompts of {PROMPTS.name}",
                        f"use at most {len(prompts)}")
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise SpecError("--batch", f"must be a positive integer, got {batch!r}", "e.g. --batch 16")
    return prompts


@dataclass
class DemoJob:
    """What the demo's steps share: the output directory, the prompts, the settings and the step timings."""
    out: Path
    prompts: list[str]          # the run's prompts (acceptance is profiled on them too)
    max_new_tokens: int
    quick: bool
    log: Callable[[str], None]
    times: dict[str, float] = field(default_factory=dict)
    draft_dir: Path = DRAFT_DIR   # the draft the job runs with (runtime/demo_draft.py chooses it)

    @property
    def max_k(self) -> int:
        """The largest draft length profiled and planned."""
        return 4 if self.quick else MAX_DRAFT_LEN


def run_demo(out_dir: str | Path = "out/demo", n_prompts: int = 32, max_new_tokens: int = 48, batch: int | None = None,
             quick: bool = False, log: Callable[[str], None] = print, progress: bool = True,
             threads: int | None = 1) -> DemoResult:
    """The demo (module doc). `quick`: acceptance profiled for k = 1..4 (else 1..8) and the planner's draft
    lengths limited to 0..4. `threads`: torch intra-op threads for everything measured and run here
    (default 1: the tiny pair's operations are too small to split, and OpenMP hand-offs on shared cores
    only add time and noise; None keeps torch's default). The calibration is cached per thread count (it
    is part of the fingerprint)."""
    all_prompts = _check_inputs(n_prompts, max_new_tokens, batch)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise SpecError("--threads", f"must be a positive integer, got {threads!r}", "e.g. --threads 1")
    job = DemoJob(_make_out_dir(out_dir), all_prompts[:n_prompts], max_new_tokens, quick, log)
    import torch

    from specmoe.runtime.device import pick_device

    if threads is not None:
        torch.set_num_threads(threads)
    spec, info, spec_path = calibrate_machine(job, progress)
    dev = pick_device(None)
    dtype = "float32" if dev.type == "cpu" else "bfloat16"      # the CPU computes the bf16 pair in fp32
    choice = choose_draft(job, spec, batch, dev, dtype, profile_pair, plan_demo)
    acc_path, plan, plan_path, k0_pred, planner_k = (choice.acc_path, choice.plan, choice.plan_path, choice.k0_pred,
                                                    choice.planner_k)
    runs, differing = run_both_modes(job, plan, spec, dev, dtype)
    return report_demo(job, plan, plan_path, runs, k0_pred, differing, info, spec_path, acc_path, planner_k)


def _make_out_dir(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SpecError("-o/--output", f"cannot create {out}: {e.strerror}", "choose a writable directory") from None
    if not out.is_dir():
        raise SpecError("-o/--output", f"{out} is not a directory", "choose a directory")
    return out


def calibrate_machine(job: DemoJob, progress: bool):
    """Step 1: this machine's hardware spec (runtime.calibrate, cached by machine fingerprint) ->
    (spec, calibration info, hardware.yaml's path)."""
    import torch

    from specmoe.runtime.calibrate.run import calibrate_with_info
    from specmoe.runtime.calibrate.speed_probe import STALE_MARGIN, calibration_slowness
    from specmoe.runtime.calibrate.quiet import quality_lines, strict

    t0 = time.perf_counter()
    job.log(f"demo [1/{STEPS}] calibrating this machine with {torch.get_num_threads()} torch thread(s) (cached by "
            f"machine fingerprint) ...")
    spec_path = job.out / "hardware.yaml"
    spec, info = calibrate_with_info(spec_path, quick=job.quick, progress=progress)
    if info["cache_hit"] and strict():
        slow = calibration_slowness(spec.raw)
        if slow is not None and slow > STALE_MARGIN:
            job.log(f"demo [1/{STEPS}] the cached calibration ran the speed probe {slow:.2f}x slower than this machine "
                    "runs it now (it was taken in a busy or slow spell): measuring again ...")
            spec, info = calibrate_with_info(spec_path, quick=job.quick, force=True, progress=progress)
    job.times["calibrate"] = time.perf_counter() - t0
    for line in quality_lines(info.get("quality"), info["cache_hit"]):
        job.log(f"demo [1/{STEPS}] {line.strip()}")
    if info["cache_hit"]:
        how = f"the cached {info['mode']} calibration ({info['cache_path']})"
    else:
        cached = "cached for next time" if info["cache_path"] else "not cached: not every step was clean"
        how = (f"a {info['mode']} calibration measured now in {info['elapsed_s']:.0f} s ({cached}; "
               f"`specmoe calibrate -o SPEC.yaml --threads {torch.get_num_threads()}` measures the full one, which "
               f"the demo then uses)")
    job.log(f"demo [1/{STEPS}] using {how} -> {spec_path}")
    return spec, info, spec_path


def profile_pair(job: DemoJob, dev, dtype: str, draft_dir: Path | None = None):
    """Step 2: acc(k) of the target and a bundled draft (default: the job's), cached in the out directory under
    a key of the models' content, the prompts and the settings -> (AcceptanceProfile, the CSV's path)."""
    from specmoe.planner.workload import AcceptanceProfile
    from specmoe.runtime.calibrate.acceptance import profile_acceptance

    log, max_k = job.log, job.max_k
    # the job's own prompts, as a user planning a known batch job profiles it: the bundled 64 accept more than the
    # demo's first 32 (acc(1) 0.81 against 0.79), which the plan then carried as an error of its input
    prof_prompts = job.prompts
    draft_dir = job.draft_dir if draft_dir is None else Path(draft_dir)
    key = content_hash(TARGET_DIR, draft_dir, extra={"prompts": prof_prompts, "max_k": max_k, "format": 3,
                                                     "new": job.max_new_tokens, "dtype": dtype, "device": dev.type})
    tag = "" if draft_dir == DRAFT_DIR else f"{draft_dir.name}-"
    acc_path = job.out / f"{tag}acceptance-{key[:16]}.csv"
    t0 = time.perf_counter()
    profile = None
    if acc_path.is_file():
        try:
            profile = AcceptanceProfile.from_csv(acc_path)
            log(f"demo [2/{STEPS}] acceptance of {draft_dir.name}: cached {acc_path.name} (same models, prompts and "
                "settings)")
        except SpecError:
            profile = None
    if profile is None:
        log(f"demo [2/{STEPS}] profiling acceptance of {draft_dir.name}: k = 1..{max_k}, {len(prof_prompts)} prompts, "
            f"{job.max_new_tokens} new tokens, greedy ...")
        res = profile_acceptance(TARGET_DIR, draft_dir, prof_prompts, max_k=max_k, max_new_tokens=job.max_new_tokens,
                                 dtype=dtype,
                                 progress=lambda k, row: log(f"demo [2/{STEPS}]   k={k}: acc {row['raw']:.3f}"))
        res.write_csv(acc_path)
        profile = AcceptanceProfile.from_csv(acc_path)
        log(f"demo [2/{STEPS}] acc(k) = " + ", ".join(f"{a:.2f}" for a in profile.table[1:])
            + f" ({res.elapsed_s:.0f} s) -> {acc_path.name}")
    job.times["acceptance"] = job.times.get("acceptance", 0.0) + time.perf_counter() - t0     # over the drafts
    return profile, acc_path


def plan_demo(job: DemoJob, spec, profile, batch: int | None, dev, dtype: str, draft_dir: Path | None = None):
    """Step 3: planner.optimize on the calibrated spec with a bundled draft (default: the job's), the batch
    capped by the number of prompts; when its best has k = 0, its best speculative plan -> (plan, plan.json's
    path, predicted k = 0 tokens/s or None, the planner's own best k)."""
    log, prompts = job.log, job.prompts
    t0 = time.perf_counter()
    draft_dir = job.draft_dir if draft_dir is None else Path(draft_dir)
    plan_for = _planner(job, spec, profile, dev, dtype, draft_dir)
    ks = range(0, job.max_k + 1)
    plan = plan_for(batch, ks)
    if batch is None and plan.batch > len(prompts):
        log(f"demo [3/{STEPS}] the planner's batch {plan.batch} exceeds the {len(prompts)} prompts: planning again "
            f"at batch {len(prompts)}")
        batch = len(prompts)
        plan = plan_for(batch, ks)
    k0_pred = next((e["decode_tokens_per_s"] for e in plan.frontier.get("by_k", [])
                    if e.get("draft_len") == 0 and e.get("feasible", True)), None)
    planner_k = plan.draft_len
    if plan.draft_len == 0:
        plan, k0_pred = _best_speculative(job, plan, plan_for, batch)
    plan_path = job.out / "plan.json"
    plan.to_json(plan_path)
    job.times["plan"] = job.times.get("plan", 0.0) + time.perf_counter() - t0
    log(f"demo [3/{STEPS}] plan with {draft_dir.name}: batch {plan.batch}, micro-batches {plan.micro_batches}, k "
        f"{plan.draft_len}; predicted "
        f"iteration {plan.predicted.iteration_time_s * 1e3:.1f} ms, {plan.predicted.decode_tokens_per_s:.0f} tok/s "
        f"({plan.predicted.source} rates) -> {plan_path}")
    return plan, plan_path, k0_pred, planner_k


def _planner(job: DemoJob, spec, profile, dev, dtype: str, draft_dir: Path) -> Callable:
    """plan_for(batch, draft lengths) -> Plan: the demo's workload (prompt length = the prompts' mean tokens,
    gen = the new tokens, the job's size) planned on spec. Without a GPU, CPU-computed experts are not
    offered: the "GPU" is the same cores."""
    from specmoe.planner import optimize
    from specmoe.planner.model_spec import ModelSpec
    from specmoe.planner.workload import Workload
    from specmoe.runtime.weights.checkpoint import load_tokenizer

    prompts = job.prompts
    tok = load_tokenizer(TARGET_DIR)
    lens = [len(tok.encode(p)) for p in prompts]
    prompt_len = max(1, math.ceil(sum(lens) / len(lens)))
    wdt = "fp32" if dtype == "float32" else "bf16"
    tspec = ModelSpec.from_hf_config(TARGET_DIR, name="tiny-moe")
    dspec = ModelSpec.from_hf_config(draft_dir, name=draft_dir.name)
    job.log(f"demo [3/{STEPS}] planning (planner.optimize): prompt {prompt_len} tokens (mean of {len(prompts)}), "
            f"{job.max_new_tokens} new, k in 0..{job.max_k}, on {spec.name} ...")
    cpu_experts = "auto" if dev.type == "cuda" else "off"

    def plan_for(b, ks):
        wl = Workload(prompt_len=prompt_len, gen_len=job.max_new_tokens, batch=b, acceptance=profile,
                      kv_dtype=wdt, weight_dtype=wdt, name="demo", num_prompts=len(prompts))
        return optimize(tspec, spec, wl, draft=dspec, k_values=ks, micro_batch_values=(1, 2, 4, 8),
                        gpu_attention=False, cpu_expert_mode=cpu_experts, alternatives=2)

    return plan_for


def _best_speculative(job: DemoJob, best0, plan_for: Callable, batch: int | None):
    """The planner's best plan with k >= 1, run in place of its best (k = 0) so that speculation is measured;
    the k = 0 point joins its throughput-against-k frontier -> (plan, predicted k = 0 tokens/s)."""
    k0_pred = best0.predicted.decode_tokens_per_s
    plan = plan_for(batch if batch is not None else best0.batch, range(1, job.max_k + 1))
    if plan.batch == best0.batch:      # the k = 0 point of the throughput-against-k chart: the planner's best
        k0_pts = [e for e in best0.frontier.get("by_k", []) if e.get("draft_len") == 0]
        plan = replace(plan, frontier={**plan.frontier, "by_k": k0_pts + list(plan.frontier.get("by_k", []))})
    job.log(f"demo [3/{STEPS}] the planner's best is k = 0 ({best0.predicted.decode_tokens_per_s:.0f} tok/s "
            f"predicted; speculation does not pay by the model): running its best speculative plan, k = "
            f"{plan.draft_len} ({plan.predicted.decode_tokens_per_s:.0f} tok/s predicted), to measure speculation")
    return plan, k0_pred


def run_both_modes(job: DemoJob, plan, spec, dev, dtype: str):
    """Step 4: the prompts with speculation (the plan's k) and with k = 0, interleaved; each mode's fastest run
    written as run.json / run_k0.json with its outputs -> ({"spec": results, "k0": results}, the number of
    sequences whose greedy outputs differ between the two kept runs)."""
    from specmoe.runtime.engine import Engine

    t0 = time.perf_counter()
    job.log(f"demo [4/{STEPS}] loading the engine ({dev.type}, {dtype}) and warming up ...")
    eng = Engine(plan, TARGET_DIR, job.draft_dir, dtype=dtype)
    eng.warm_up(job.prompts)                                # one-time costs out of the timing
    runs, outs_by_run = _interleaved_runs(job, eng, plan, spec)
    _keep_fastest_runs(job, runs, outs_by_run)
    spec_res, k0_res = fastest_run(runs["spec"]), fastest_run(runs["k0"])
    differing = sum(1 for a, b in zip(spec_res.outputs, k0_res.outputs) if a.token_ids != b.token_ids)
    job.times["run"] = time.perf_counter() - t0
    return runs, differing


def _interleaved_runs(job: DemoJob, eng, plan, spec) -> tuple[dict[str, list], dict[int, list]]:
    """REPEATS runs of each mode in the order spec, k0, k0, spec, spec, k0, ... (slow spells of the machine
    hit both modes), the machine's speed probed around each -> (results by mode, outputs by id(result))."""
    from specmoe.runtime.calibrate.speed_probe import RunProbe

    prompts, max_new_tokens = job.prompts, job.max_new_tokens
    runs: dict[str, list] = {"spec": [], "k0": []}
    outs_by_run: dict[int, list] = {}
    order = [(("spec", plan.draft_len), ("k0", 0))[(i + i // 2) % 2] for i in range(2 * REPEATS)]
    probe = RunProbe(spec.raw, eng.device)          # the machine's speed around each run
    probe.before()
    for i, (mode, k) in enumerate(order):
        job.log(f"demo [4/{STEPS}] run {i + 1}/{len(order)}: {len(prompts)} prompts, {max_new_tokens} new tokens, "
                f"k = {k} ...")
        outs = []
        res = eng.generate(prompts, max_new_tokens=max_new_tokens, draft_len=k, on_finish=outs.append)
        outs_by_run[id(res)] = outs
        runs[mode].append(res)
        probe.after(res.record)
        r = res.record
        job.log(f"demo [4/{STEPS}]   k = {k}: decode {r.decode_tokens_per_s:.1f} tok/s, {r.iterations} iterations of "
                f"{r.stages['iteration'] * 1e3:.1f} ms, mean accepted {r.mean_accepted:.2f}"
                + (f"; machine speed probe {r.speed_probe['ratio']:.2f}x the calibration's time" if r.speed_probe
                   else ""))
    return runs, outs_by_run


def _keep_fastest_runs(job: DemoJob, runs: dict[str, list], outs_by_run: dict[int, list]) -> None:
    """Each mode's fastest run by mean iteration time (the calibration it is compared with keeps the fast end
    of its repetitions): run.json / run_k0.json and outputs.jsonl / outputs_k0.jsonl."""
    for mode, tag in (("spec", ""), ("k0", "_k0")):
        best = fastest_run(runs[mode])
        best.record.to_json(job.out / f"run{tag}.json")
        _write_jsonl(job.out / f"outputs{tag}.jsonl",
                     [o.to_dict() for o in sorted(outs_by_run[id(best)], key=lambda o: o.index)])
        its = sorted(r.record.stages["iteration"] for r in runs[mode])
        job.log(f"demo [4/{STEPS}] {'speculative' if mode == 'spec' else 'k = 0'} fastest run: "
                f"{best.record.stages['iteration'] * 1e3:.1f} ms per iteration (median "
                f"{its[(len(its) - 1) // 2] * 1e3:.1f} ms of {len(its)}) -> run{tag}.json")


def report_demo(job: DemoJob, plan, plan_path: Path, runs: dict[str, list], k0_pred: float | None, differing: int,
                info: dict, spec_path: Path, acc_path: Path, planner_k: int) -> DemoResult:
    """Step 5: predicted against measured (planner.report) -> the table on stdout, report.html (with the
    headline: both modes' runs); the speedups, the spread and whether the planner's choice was right on
    stdout, demo.json."""
    from specmoe.planner.report import compare, render_table, write_html
    from specmoe.planner.report.headline import Headline

    t0 = time.perf_counter()
    run_path = job.out / "run.json"
    cmp = compare(plan_path, run_path)
    table = render_table(cmp)
    pair = {m: [(r.record.decode_tokens_per_s, r.record.stages["iteration"]) for r in runs[m]] for m in runs}
    head = Headline(draft_len=plan.draft_len, planner_k=planner_k,
                    predicted_speedup=plan.predicted.decode_tokens_per_s / k0_pred if k0_pred else None,
                    spec_runs=pair["spec"], k0_runs=pair["k0"],
                    spec_pooled_tokens_per_s=_pooled_tokens_per_s(runs["spec"]),
                    k0_pooled_tokens_per_s=_pooled_tokens_per_s(runs["k0"]))
    report_path = write_html(plan_path, run_path, job.out / "report.html", comparison=cmp, headline=head)
    job.times["report"] = time.perf_counter() - t0
    _log_outcome(job, plan, table, head, differing)
    _write_summary(job, plan, runs, cmp, head, differing, info)
    return DemoResult(out_dir=job.out, spec_path=spec_path, acceptance_path=acc_path, plan_path=plan_path,
                      run_path=run_path, run_k0_path=job.out / "run_k0.json", report_path=report_path,
                      speedup=head.measured_speedup, iteration_error_pct=cmp.iteration_error_pct, table=table,
                      draft_len=plan.draft_len, batch=plan.batch, micro_batches=plan.micro_batches,
                      differing_sequences=differing, timings_s=job.times, headline=head)


def _pooled_tokens_per_s(rs: list) -> float:
    """Decode tokens/s over the runs of one mode."""
    secs = sum(r.record.decode_time_s for r in rs)
    return sum(r.record.decode_tokens for r in rs) / secs if secs > 0 else 0.0


def _log_outcome(job: DemoJob, plan, table: str, head, differing: int) -> None:
    """The comparison table, the measured (and predicted) speedup, the runs' spread and the planner's choice."""
    log, n = job.log, len(job.prompts)
    log(f"demo [5/{STEPS}] predicted against measured (the fastest speculative run, k = {plan.draft_len}):")
    log(table)
    log(f"demo [5/{STEPS}] speculation k = {plan.draft_len}: {head.spec_pooled_tokens_per_s:.1f} tok/s; k = 0: "
        f"{head.k0_pooled_tokens_per_s:.1f} tok/s (decode, all runs of each); greedy outputs identical in "
        f"{n - differing}/{n} sequences"
        + ("" if not differing else " (the rest: near-tie logits flipped, see token_flips in the run records)"))
    job_pred = plan.predicted.job
    if head.predicted_speedup is not None and job_pred:
        log(f"demo [5/{STEPS}] the {n}-prompt job's batch drains to {job_pred['mean_live_batch']:.1f} live sequences "
            f"on average over {job_pred['iterations']:.1f} iterations, predicted")
    for mode, runs in ((f"k = {plan.draft_len}", head.spec_runs), ("k = 0", head.k0_runs)):
        log(f"demo [5/{STEPS}] {mode} runs: " + ", ".join(f"{tps:.0f} tok/s ({it * 1e3:.2f} ms)" for tps, it in runs))


def _write_summary(job: DemoJob, plan, runs: dict[str, list], cmp, head, differing: int, info: dict) -> None:
    """demo.json: the headline, every run's decode rate and mean iteration, the plan's choices and timings."""
    import torch

    summary = {"speedup": head.measured_speedup, "predicted_speedup": head.predicted_speedup,
               "spread_pct": head.spread_pct, "choice": head.choice(), "planner_k": head.planner_k,
               "spec_decode_tokens_per_s": [r.record.decode_tokens_per_s for r in runs["spec"]],
               "k0_decode_tokens_per_s": [r.record.decode_tokens_per_s for r in runs["k0"]],
               "spec_iteration_s": [r.record.stages["iteration"] for r in runs["spec"]],
               "k0_iteration_s": [r.record.stages["iteration"] for r in runs["k0"]],
               "predicted_iteration_s": plan.predicted.iteration_time_s,
               "iteration_error_pct": cmp.iteration_error_pct, "draft_len": plan.draft_len, "batch": plan.batch,
               "micro_batches": plan.micro_batches, "differing_sequences": differing, "threads": torch.get_num_threads(),
               "draft": job.draft_dir.name,
               "calibration": {"mode": info["mode"], "cache_hit": info["cache_hit"]}, "timings_s": job.times}
    atomic_write_text(job.out / "demo.json", json.dumps(summary, indent=1))


def fastest_run(results: list):
    """The run with the lowest mean iteration time."""
    return min(results, key=lambda r: r.record.stages["iteration"])


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
