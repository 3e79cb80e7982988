"""Engine: executes a Plan on a target (MoE) and a draft checkpoint and measures every stage.

    eng = Engine(plan, "models/tiny-moe", "models/tiny-draft")
    res = eng.generate(["Once upon a time"], max_new_tokens=32)   # greedy; temperature>0 samples
    res.outputs[0].text, res.record.to_json("run.json")

Continuous batching: min(plan.batch, prompts) KV rows; sequences leave at EOS or max_new_tokens and
queued prompts are prefilled into free rows at iteration boundaries. Memory is the planner's
footprint of the plan (runtime/memory_fit.py): its weights are checked against the memory free
before any weight is loaded, its KV rows when generate() knows the prompts. An error or Ctrl-C
inside generate() keeps what finished: the partial GenerateResult (record.complete = False) is in
`engine.last_result` and on the exception as `.partial_result`.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from specmoe.planner.errors import SpecError
from specmoe.planner.plan import Plan
from specmoe.planner.replan import replan
from specmoe.planner.schedule import Schedule
from specmoe.planner.stages import Stage
from specmoe.planner.memory import PREFILL_CHUNK_TOKENS
from specmoe.planner.workload import MAX_DRAFT_LEN

from specmoe.runtime.calibration_match import calibration_mismatches
from specmoe.runtime.weights.checkpoint import DTYPES, load_tokenizer
from specmoe.runtime.device import pick_device
from specmoe.runtime.model.draft import DraftModel
from specmoe.runtime.model.eagle import EagleHead
from specmoe.runtime.engine_plan import plan_for_checkpoint
from specmoe.runtime.model.expert_store import ExpertStore
from specmoe.runtime.k_policy import CallableK, ConstantK, DynamicK, IterationInfo
from specmoe.runtime.model.kv_cache import SplitKVCache, kv_capacity
from specmoe.runtime.memory_fit import check_fits, minus, plan_footprint, with_held_weights
from specmoe.runtime.memory_usage import MemoryMeter, measured_memory
from specmoe.runtime.run_record import StageTimer
from specmoe.runtime.run_state import RunState, build_record
from specmoe.runtime.speculative import Sequence, SpeculativeDecoder
from specmoe.runtime.model.target import HOST_IO, TargetModel, stream_mode
from specmoe.runtime.weights.eagle import check_head_for_target, draft_source
from specmoe.runtime.weights.sources import WeightSource, as_weight_source

__all__ = ["Engine", "GenerateResult", "SequenceOutput", "plan_for_checkpoint"]


@dataclass
class SequenceOutput:
    index: int
    prompt: str | list[int]
    token_ids: list[int]           # generated tokens only
    text: str | None
    finish_reason: str
    decode_iterations: int = 0     # decode iterations the sequence was live in
    accepted_drafts: int = 0       # drafts accepted over them

    def to_dict(self) -> dict:
        return {"index": self.index, "prompt": self.prompt, "text": self.text, "token_ids": self.token_ids,
                "finish_reason": self.finish_reason, "decode_iterations": self.decode_iterations,
                "accepted_drafts": self.accepted_drafts}


@dataclass
class GenerateResult:
    outputs: list[SequenceOutput]  # finished sequences in prompt order
    record: RunRecord
    unfinished: list[int] = field(default_factory=list)   # prompt indices without output (after an error)


def _config_of(x: Any):
    if isinstance(x, WeightSource):
        return x.config
    from specmoe.runtime.weights.checkpoint import read_config

    return read_config(x)


class Engine:
    def __init__(self, plan: Plan | str | Path, target_dir: str | Path | WeightSource,
                 draft_dir: str | Path | WeightSource | None = None, device: str | torch.device | None = None, *,
                 dtype: torch.dtype | str | None = None, profile_stages: bool = False, dynamic_k: bool = False,
                 k_policy: Callable[[IterationInfo], int] | None = None, max_k: int = MAX_DRAFT_LEN,
                 acceptance_oracle: float | None = None, check_memory: bool = True,
                 progress: Callable[[int], None] | None = None, flip_gap: float | None = None,
                 prefill_chunk_tokens: int = PREFILL_CHUNK_TOKENS, prefetch_next_layer: bool | str | None = None,
                 expert_host: dict | None = None, host_io: str = "auto", rebalance_experts: bool | None = None,
                 threads: int | None = None):
        """The plan's schedule (plan.schedule) is what runs. prefetch_next_layer (None: the plan's
        expert streaming), host_io ("auto": the plan's) and threads (None: the plan's) override it: the
        engine then runs a new plan, re-estimated with that schedule (`engine.plan`; `engine.replanned`).
        A plan whose own schedule this machine cannot run is refused with the field named.
        rebalance_experts: re-choose the cached experts from the routing of the first prefill (None:
        only when the plan names no cached experts)."""
        self.plan = self.given_plan = plan if isinstance(plan, Plan) else Plan.from_json(plan)
        self.device = pick_device(device)
        # ---- everything below up to the weights reads configs only ----
        tcfg = _config_of(target_dir)
        dcfg = _config_of(draft_dir) if draft_dir is not None else None
        self._check_plan(tcfg, dcfg)
        if dcfg is not None and dcfg.eagle:        # a head's width, vocabulary and base are the target's
            check_head_for_target(tcfg, dcfg, draft_dir if isinstance(draft_dir, (str, Path)) else None,
                                  Path(target_dir).name if isinstance(target_dir, (str, Path)) else "target")
        _check_options(host_io, prefetch_next_layer, acceptance_oracle)
        self.dtype = _resolve_dtype(dtype, self.plan, self.device)
        self.kv_dtype = torch.bfloat16 if self.dtype == torch.bfloat16 else torch.float32
        self.profile_stages, self.dynamic_k, self.max_k = profile_stages, dynamic_k, int(max_k)
        self.k_policy, self.acceptance_oracle = k_policy, acceptance_oracle
        self.flip_gap = FLIP_GAP[self.dtype] if flip_gap is None else float(flip_gap)
        self.prefill_chunk_tokens = int(prefill_chunk_tokens)
        self.replanned = False
        self.prefetch_next_layer, self.host_io, self.threads = prefetch_next_layer, host_io, threads
        if prefetch_next_layer is None and host_io == "auto" and threads is None:
            check_schedule_runs(self.plan.schedule, self.device)
        self._follow_overrides()
        self.rebalance_experts = not self.plan.placement.cached_experts if rebalance_experts is None \
            else bool(rebalance_experts)
        self.check_memory = check_memory
        # what does not depend on the prompts: weights, expert cache, streaming buffers
        self.weights_footprint = plan_footprint(self.plan, 0, 0, self.plan.draft_len, self.dtype, self.kv_dtype)
        self.memory = {"weights": self.weights_footprint.to_dict()}
        if check_memory:
            self.memory["free_at_start"] = check_fits(self.weights_footprint, self.device)
        self.meter = MemoryMeter(self.device)         # RSS before any weight; the load's peak apart
        self._load(target_dir, draft_dir, progress, expert_host)
        self.meter.loaded()
        self._run_footprint: dict = {}
        self.calibration_warnings = calibration_mismatches(self.plan, self.device, self.dtype)
        self.last_result: GenerateResult | None = None
        self.experts_rebalanced = False

    def _load(self, target_dir, draft_dir, progress, expert_host) -> None:
        tsrc = as_weight_source(target_dir)
        dsrc = draft_source(draft_dir) if draft_dir is not None else None
        self.target_source, self.draft_source = tsrc, dsrc
        self.tcfg, self.dcfg = tsrc.config, (dsrc.config if dsrc else None)
        pl = self.plan.placement
        self.store = ExpertStore(tsrc, self.device, self.dtype, pl.expert_cache_slots, pl.cpu_expert_layers,
                                 pl.streaming_buffers, progress, host=expert_host,
                                 cached_experts=pl.cached_experts) if self.tcfg.is_moe else None
        self.target = TargetModel(tsrc, self.store, self.device, self.dtype)
        self.draft = None
        if dsrc is not None:     # an EAGLE head embeds and projects with the target's own tensors
            self.draft = EagleHead(dsrc, self.target.embed, self.target.lm_head_w, self.device, self.dtype) \
                if dsrc.config.eagle else DraftModel(dsrc, self.device, self.dtype)
        self.tokenizer = load_tokenizer(tsrc.path) if tsrc.path is not None else None
        self.eos_ids = tuple(self.tcfg.eos_token_ids)

    # host_io: how the target's attention over host KV rows moves q/k/v and its output when the streaming
    # schedule is "next": "direct" (SplitKVCache.attend's own transfers per micro-batch), "pinned" (once per
    # layer through pinned buffers), "zero-copy" (pinned in, output read by a GPU kernel from pinned memory);
    # "auto": pinned on CUDA, direct on the CPU.

    def expert_streaming(self) -> str:
        """The expert-streaming schedule generate() runs: the plan's (after any override)."""
        self._follow_overrides()
        return self.plan.schedule.expert_streaming

    def _follow_overrides(self) -> None:
        """Make self.plan the plan of what will run: the overrides (prefetch_next_layer, host_io, threads,
        which may also be set on the engine after construction) applied to the plan's schedule, and
        the plan re-estimated with it when that changes anything."""
        s = self.given_plan.schedule
        changes = {}
        if self.prefetch_next_layer is not None:
            mode = stream_mode(self.prefetch_next_layer)
            changes.update(expert_streaming=mode, pre_post="per_layer" if mode == "next" else "per_micro_batch")
        if self.host_io != "auto":
            changes["host_io"] = self.host_io
        if self.threads is not None:
            changes["cpu_threads"] = self.threads
        new = s.with_changes(**changes)
        if new != self.plan.schedule:
            self.plan = replan(self.given_plan, schedule=new)
        self.replanned = self.plan is not self.given_plan

    # ---- checks ----
    def _check_plan(self, tcfg, dcfg) -> None:
        p = self.plan
        pm = p.model
        for key, ours in (("num_layers", tcfg.num_layers), ("num_experts", tcfg.num_experts),
                          ("hidden", tcfg.hidden)):
            if int(pm.get(key, -1)) != ours:
                raise SpecError(f"plan.model.{key}", f"is {pm.get(key)} but the target checkpoint has {ours}",
                                "this plan was made for another model: re-run `specmoe plan` for this checkpoint")
        if p.draft_len > 0 and dcfg is None:
            raise SpecError("draft", f"the plan speculates with k={p.draft_len} but no draft was given",
                            "pass --draft DIR, or --draft-len 0")
        if dcfg is not None and dcfg.vocab_size < tcfg.vocab_size // 2:
            raise SpecError("draft", f"vocabulary {dcfg.vocab_size} does not match the target's {tcfg.vocab_size}",
                            "use a draft with the target's tokenizer")
        pl = p.placement
        if pl.attention_device != "cpu" and pl.target_kv_gpu_sequences < p.batch:
            raise SpecError("plan.placement.attention_device",
                            f"is {pl.attention_device!r}: attention over CPU-resident KV streamed to the GPU is not "
                            "something this engine runs (it attends host KV rows on the CPU)",
                            "re-plan without `--gpu-attention` (optimize(..., gpu_attention=False))")

    def _prepare(self, prompts, max_new_tokens: int) -> list[Sequence]:
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise SpecError("prompts", "must be a non-empty list of strings or of token-id lists", "give prompts")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise SpecError("max_new_tokens", f"must be a positive integer, got {max_new_tokens!r}", "e.g. 64")
        seqs = []
        for i, p in enumerate(prompts):
            ids, text = self._token_ids(i, p)
            seqs.append(Sequence(i, ids, max_new_tokens, prompt_text=text))
        return seqs

    def _token_ids(self, i: int, p) -> tuple[list[int], str | None]:
        """(token ids, text) of prompt i: a string through the tokenizer, or a list of ids as given."""
        if isinstance(p, str):
            try:
                p.encode("utf-8")
            except UnicodeEncodeError as e:
                raise SpecError(f"prompts[{i}]", f"holds a lone surrogate (U+{ord(p[e.start]):04X}) at character "
                                f"{e.start}: not text", "give valid Unicode text") from None
            if self.tokenizer is None:
                raise SpecError("prompts", "text prompts need a tokenizer.json in the target checkpoint",
                                "give token ids, or a checkpoint with a tokenizer")
            ids, text = self.tokenizer.encode(p), p
        elif isinstance(p, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            ids, text = [int(t) for t in p], None
        else:
            raise SpecError(f"prompts[{i}]", f"is a {type(p).__name__}", "give a string or a list of token ids")
        if not ids:
            raise SpecError(f"prompts[{i}]", "is empty (no tokens)", "give at least one token")
        V = self.tcfg.vocab_size
        bad = [t for t in ids if not 0 <= t < V]
        if bad:
            raise SpecError(f"prompts[{i}]", f"token id {bad[0]} is outside the vocabulary [0, {V})", "fix the ids")
        return ids, text

    def _draft_len(self, draft_len: int | None, temperature: float) -> int:
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature < 1e6:
            raise SpecError("temperature", f"must be a finite number >= 0, got {temperature!r}", "0 for greedy decoding")
        k0 = self.plan.draft_len if draft_len is None else draft_len
        if isinstance(k0, bool) or not isinstance(k0, int) or k0 < 0:
            raise SpecError("draft_len", f"must be an integer >= 0, got {k0!r}", "0 disables speculation")
        if k0 > 0 and self.draft is None:
            raise SpecError("draft_len", f"is {k0} but the engine has no draft model", "give a draft or use 0")
        return k0

    def _policy(self, k0: int):
        if self.k_policy is not None:
            return CallableK(self.k_policy, max(self.max_k, k0))
        if self.dynamic_k and self.draft is not None and k0 > 0:
            return DynamicK(self.plan, k0, max(self.max_k, k0))
        return ConstantK(k0)

    def _capacity(self, seqs: list[Sequence], max_new_tokens: int, max_k: int) -> int:
        """KV positions per row for these prompts, checked against the models' context limits."""
        longest = max(len(s.prompt) for s in seqs)
        capacity = kv_capacity(longest, max_new_tokens, max_k)
        for name, cfg in (("target", self.tcfg), ("draft", self.dcfg)):
            if cfg is None:
                continue
            if capacity > cfg.max_position_embeddings:
                raise SpecError("max_new_tokens", f"prompt ({longest}) + new tokens ({max_new_tokens}) exceeds the "
                                f"{name}'s max_position_embeddings {cfg.max_position_embeddings}", "generate fewer tokens")
            if cfg.sliding_window is not None and capacity > cfg.sliding_window:
                raise SpecError("max_new_tokens", f"the context reaches {capacity} tokens, beyond the {name}'s sliding "
                                f"window {cfg.sliding_window} (not supported)", "use shorter prompts or outputs")
        return capacity

    def _kv_caches(self, rows: int, capacity: int, max_k: int):
        """The target and draft KV caches for `rows` sequences, once the planner's footprint of them (beyond
        the loaded weights) fits the memory free now. A run that never drafts (max_k 0) gets no draft KV;
        its footprint still holds the draft's weights, which stay loaded."""
        fp = plan_footprint(self.plan, rows, capacity, max_k, self.dtype, self.kv_dtype)
        if max_k == 0 and self.draft is not None:
            fp = with_held_weights(fp, self.weights_footprint, "draft_weights")
        self._run_footprint = fp.to_dict()
        if self.check_memory:
            check_fits(minus(fp, self.weights_footprint), self.device, what=f"plan at {rows} sequences")
        pl, t, d = self.plan.placement, self.tcfg, self.dcfg
        tkv = SplitKVCache(t.num_layers, rows, pl.target_kv_gpu_sequences, t.num_kv_heads, capacity, t.head_dim,
                           self.device, self.kv_dtype, self.kv_dtype, decode_kernel=False)
        dkv = SplitKVCache(d.num_layers, rows, pl.draft_kv_gpu_sequences, d.num_kv_heads, capacity, d.head_dim,
                           self.device, self.kv_dtype, self.kv_dtype, decode_kernel=True) \
            if d is not None and max_k > 0 else None
        return tkv, dkv

    def _decode(self, ids: list[int]) -> str | None:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else None

    # ---- generation ----
    def warm_up(self, prompts=None) -> None:
        """One short untimed generation (two new tokens, the plan's k) so that the one-time costs of a process
        (lazy imports, the verify kernel's load, each torch op's and GEMM shape's first call) stay out of the
        runs that follow: a fresh process's first prefill of the demo's 32 prompts took 185-240 ms against
        75 ms for the next ones (2-core VM), and a run's prefill is compared with a prediction from the
        calibration's warm passes. prompts: on the first batch of these (the run's own shapes), else on two
        short prompts of token ids."""
        if prompts:
            ids = list(prompts[:max(1, self.plan.batch)])
        else:
            V = self.tcfg.vocab_size
            ids = [[3 + i % max(1, V - 3) for i in range(n)] for n in (5, 9)]    # past the special ids 0-2
        self.generate(ids, max_new_tokens=2)

    def generate(self, prompts, max_new_tokens: int = 32, temperature: float = 0.0, seed: int = 0,
                 draft_len: int | None = None, on_finish: Callable[[SequenceOutput], None] | None = None) -> GenerateResult:
        seqs = self._prepare(prompts, max_new_tokens)
        k0 = self._draft_len(draft_len, temperature)
        policy = self._policy(k0)
        rows = min(self.plan.batch, len(seqs))      # an open-stream plan run on a few prompts: KV for those
        tkv, dkv = self._kv_caches(rows, self._capacity(seqs, max_new_tokens, policy.max_k), policy.max_k)
        self.meter.run_started()
        timer = StageTimer(self.device, self.profile_stages)
        mode = self.expert_streaming()
        self.target.host_io = self.plan.schedule.host_io
        torch.set_num_threads(self.plan.schedule.cpu_threads)
        self.calibration_warnings = calibration_mismatches(self.plan, self.device, self.dtype)
        # a run that never drafts has no draft KV (_kv_caches) and leaves the draft out: no draft prefill,
        # no EAGLE features kept
        draft = self.draft if dkv is not None else None
        dec = SpeculativeDecoder(self.target, draft, tkv, dkv, timer, self.plan.micro_batches, self.eos_ids,
                                 temperature, seed, flip_gap=self.flip_gap, oracle_alpha=self.acceptance_oracle,
                                 prefill_chunk_tokens=self.prefill_chunk_tokens, prefetch=mode)
        run = RunState(seqs, rows, self.store)
        outputs: dict[int, SequenceOutput] = {}

        def finish(s: Sequence):
            out = SequenceOutput(s.index, s.prompt_text if s.prompt_text is not None else s.prompt, list(s.generated),
                                 self._decode(s.generated), s.finish_reason or "length", s.decode_iterations,
                                 s.accepted_drafts)
            outputs[s.index] = out
            run.latency.finished(s)
            run.free_rows.append(s.row)
            if on_finish is not None:
                on_finish(out)

        error = self._run_loop(run, dec, policy, timer, finish)
        total_s = time.perf_counter() - run.t_start
        if self.store is not None:     # the copies still in flight (waits for them), in the phase that issued them
            try:
                timer.add_h2d(self.store.take_h2d(block=True))
            except BaseException as e:  # noqa: BLE001
                error = error or e
        run.memory = measured_memory(self, self.meter, tkv, dkv, self._run_footprint)
        run.memory["footprint_weights"] = self.weights_footprint.to_dict()
        rec = build_record(self, run, timer, dec, policy, outputs, error, total_s,
                           k0=k0, mode=mode, temperature=temperature, seed=seed, max_new_tokens=max_new_tokens)
        result = GenerateResult([outputs[i] for i in sorted(outputs)], rec,
                                [s.index for s in seqs if s.index not in outputs])
        self.last_result = result
        if error is not None:
            try:
                error.partial_result = result  # type: ignore[attr-defined]
            except Exception:
                pass
            raise error
        return result

    def _run_loop(self, run: RunState, dec: SpeculativeDecoder, policy, timer: StageTimer, finish) -> BaseException | None:
        """Decode iterations until every prompt has finished; queued prompts enter free rows between them.
        Returns the error that stopped it (KeyboardInterrupt included), None when it ran to the end."""
        try:
            while run.queue or run.active:
                if run.queue and run.free_rows:
                    self._admit(run, dec, finish)
                    if not run.active:
                        continue
                active = run.active
                info = IterationInfo(run.iterations, len(active), sum(s.target_len for s in active) / len(active),
                                     run.accepted, run.trials)
                k = policy(info)
                if run.iterations == TIMELINE_ITERATION:
                    timer.start_events()
                t0 = time.perf_counter()
                st = dec.step(active, k)
                dt = time.perf_counter() - t0
                if run.iterations == TIMELINE_ITERATION:
                    run.timeline = timer.take_events()
                run.latency.emitted(active)
                timer.add(Stage.ITERATION, dt)
                run.record_iteration(st, dt)
                still = []
                for s in active:
                    (finish if s.finished else still.append)(s)
                run.active = still
        except BaseException as e:  # noqa: BLE001  (KeyboardInterrupt included: keep what finished)
            return e
        return None

    def _admit(self, run: RunState, dec: SpeculativeDecoder, finish) -> None:
        """Prefill queued prompts into the free rows; after the first prefill, re-choose the cached experts
        from its routing when asked to."""
        newcomers = []
        while run.queue and run.free_rows:
            s = run.queue.popleft()
            s.row = run.free_rows.pop()
            newcomers.append(s)
        t0 = time.perf_counter()
        dec.prefill(newcomers)
        run.prefill_s += time.perf_counter() - t0
        run.latency.prefilled(newcomers)
        run.prompt_tokens += sum(len(s.prompt) for s in newcomers)
        run.generated += len(newcomers)
        if self.store is not None and self.rebalance_experts and not self.experts_rebalanced \
                and self.store.has_statistics:
            self.store.rebalance()
            self.experts_rebalanced = True
        for s in newcomers:
            if s.finished:
                finish(s)
            else:
                run.active.append(s)


def check_schedule_runs(s: Schedule, device: torch.device) -> None:
    """Refuse a plan's schedule that this engine cannot run here, naming the field."""
    if s.moe != "per_layer":
        raise SpecError("plan.schedule.moe", f"is {s.moe!r}: the engine runs the routed experts of all micro-batches "
                        "together", "re-plan with the default schedule (moe per_layer)")
    if s.overlap_draft:
        raise SpecError("plan.schedule.overlap_draft", "is true: the engine drafts after the whole target pass",
                        "re-plan with the default schedule")
    if (s.pre_post == "per_layer") != (s.expert_streaming == "next"):
        raise SpecError("plan.schedule.pre_post", f"is {s.pre_post!r} with expert streaming {s.expert_streaming!r}: "
                        "the engine runs pre/post attention once per layer exactly when it streams the next "
                        "layer ahead", "re-plan with the default schedule for the hardware")
    if device.type != "cuda" and (s.expert_streaming != "off" or s.host_io != "direct"):
        field = "expert_streaming" if s.expert_streaming != "off" else "host_io"
        raise SpecError(f"plan.schedule.{field}", f"is {getattr(s, field)!r}, which needs a CUDA GPU; this machine "
                        "has none", "plan for this machine (a spec with shares_host_cpu, e.g. devbox-2core), or "
                        "override with --prefetch off")
    cores = os.cpu_count() or 1
    if s.cpu_threads > cores:
        raise SpecError("plan.schedule.cpu_threads", f"is {s.cpu_threads}, more than this machine's {cores} cores",
                        f"re-plan with --threads {cores} or fewer, or run with --threads")


def _check_options(host_io: str, prefetch_next_layer, acceptance_oracle: float | None) -> None:
    if host_io not in ("auto",) + HOST_IO:
        raise SpecError("host_io", f"{host_io!r} is not a transfer mode", f"one of auto, {', '.join(HOST_IO)}")
    try:
        stream_mode(prefetch_next_layer if prefetch_next_layer is not None else False)
    except ValueError as e:
        raise SpecError("prefetch_next_layer", str(e), "give None (auto), True/False, 'next', 'predict' or 'off'") \
            from None
    if acceptance_oracle is not None and not 0 <= acceptance_oracle <= 1:
        raise SpecError("acceptance_oracle", f"{acceptance_oracle} is outside [0, 1]", "give a rate such as 0.8")


TIMELINE_ITERATION = 1    # the decode iteration whose stages the run record keeps as a timeline (warm, batch full)
# the top-2 logit gap under which a greedy token counts as a near-tie (RunRecord.token_flips): a gap the
# dtype's rounding of logits of magnitude ~30 can close (bf16 keeps 8 bits: 30 * 2^-8 ~ 0.12)
FLIP_GAP = {torch.float32: 1e-4, torch.float16: 0.016, torch.bfloat16: 0.125}


def _resolve_dtype(dtype: torch.dtype | str | None, plan: Plan, device: torch.device) -> torch.dtype:
    """The compute dtype: the one asked for, else exact where that is affordable: float32 on the CPU
    (where bf16 is no faster and greedy speculation would differ from k = 0 at near-ties), and on a
    GPU the dtype the plan was costed for (bf16 unless it says float32). fp16 computes in fp32 on a
    CPU and in bf16 on a GPU (the CUDA kernels take bf16 or fp32: same width, same cost)."""
    if dtype is None:
        want = str(plan.workload.get("weight_dtype", "bf16"))
        dtype = "float32" if device.type == "cpu" else {"fp32": "float32", "float32": "float32", "fp16": "float16",
                                                         "float16": "float16"}.get(want, "bfloat16")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise SpecError("dtype", f"unknown dtype {dtype!r}", f"one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if dtype not in FLIP_GAP:
        raise SpecError("dtype", f"{dtype} is not a compute dtype", "float32, bfloat16 or float16")
    if dtype == torch.float16:
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    return dtype
