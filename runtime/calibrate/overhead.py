"""The engine's fixed per-invocation costs (planner/overhead.py), measured by running the engine's own
stage code on tiny problems: part of `specmoe calibrate`.

    measure_stage_overheads(target_cfg, draft_cfg, ...) -> raw samples (cached by calibrate)

A tiny random target (the calibration model's config, shrunk to a few layers and small
widths if it is large) and a tiny random draft (a draft model of 1 and 2 layers, or an EAGLE head on
the target's embedding and LM head) run the real speculative loop
(runtime.speculative.SpeculativeDecoder.step: target_model's pre_attn/attention/post_attn/moe, the
draft steps, the acceptance check, the LM head) under the engine's StageTimer, at a handful of
configurations (batch, draft length, micro-batches, draft layers or kind, where the target and draft
KV live, full or half expert cache), interleaved in rounds. Each stage's mean (and median) seconds per iteration
are kept; the fit (runtime/calibrate/overhead_fit.py) uses the mean, as the engine's RunRecord reports
means, after dividing each round by the machine's speed in that round (round_speeds: a shared machine
runs whole rounds 20-50% slower or faster), so that the configurations are compared at one speed.
Acceptance comes from the engine's seeded Bernoulli oracle (random drafts agree with nothing), so
sequences catch up after fully accepted drafts as they do with a real draft. The torch operations
of each stage are counted (a TorchFunctionMode) in one more iteration per configuration.

Dimensions: B sequences, k draft tokens, m micro-batches, L layers, L_d draft layers, P prompt tokens.
"""
from __future__ import annotations

import statistics
import time
import weakref
from contextlib import contextmanager
from typing import Any, Callable

from specmoe.planner.errors import SpecError
from specmoe.planner.stages import Stage
from specmoe.runtime.calibrate.measure import low_quantile

# (B, k, m, draft layers, target-KV sequences on the device, expert cache[, draft-KV sequences on the
# device, default B[, draft kind, default "model"]]): every fitted term varies independently across
# these (see overhead_fit.stage_features), the draft's device-part terms (draft.gpu) over the
# configurations with draft KV on the device, its host-part terms (draft.cpu: attention by the verify
# kernel) over those with draft KV on the host; a draft model's over the "model" configurations, an EAGLE
# head's (one layer on the target's embedding and LM head) over the "eagle" ones. Where target or draft
# KV is split between device and host, m = 1, so the engine's micro-batches and the cost model's
# split_even hold the same parts.
CONFIGS: tuple[tuple, ...] = (
    (1, 0, 1, 1, 0, "full"),
    (16, 0, 2, 1, 0, "full"),
    (1, 3, 1, 1, 1, "full"),
    (32, 3, 1, 2, 0, "full"),
    (4, 1, 2, 2, 4, "half"),
    (8, 2, 4, 1, 0, "full"),
    (2, 4, 2, 2, 0, "full"),
    (32, 1, 1, 1, 8, "full", 16),
    (32, 0, 1, 1, 0, "full"),
    (24, 2, 1, 2, 0, "full"),
    (8, 2, 1, 1, 0, "full", 0),
    (24, 3, 2, 2, 0, "full", 0),
    (2, 1, 1, 2, 0, "full", 0),
    (16, 1, 2, 2, 0, "full", 0),
    (4, 4, 1, 2, 0, "half", 0),
    (4, 2, 1, 1, 0, "full", 4, "eagle"),
    (16, 1, 2, 1, 0, "full", 16, "eagle"),
    (8, 3, 1, 1, 0, "full", 0, "eagle"),
    (24, 1, 1, 1, 0, "full", 0, "eagle"),
    (16, 2, 1, 1, 0, "full", 8, "eagle"),
    (2, 4, 1, 1, 0, "half", 1, "eagle"),
)
DRAFT_KINDS = ("model", "eagle")
PROMPT_LEN = 16
ORACLE_ALPHA = 0.6     # per-draft acceptance rate of the measurement's oracle
# the stages the measurement times
STAGES = tuple(s.value for s in (Stage.TARGET_PRE_ATTN, Stage.TARGET_ATTENTION, Stage.TARGET_POST_ATTN, Stage.TARGET_MOE,
                                 Stage.TARGET_H2D, Stage.TARGET_LM_HEAD, Stage.VERIFY_ACCEPT, Stage.DRAFT_GPU,
                                 Stage.DRAFT_CPU))


def config_fields(cfg: tuple) -> tuple[int, int, int, int, int, str, int, str]:
    """A CONFIGS entry as (B, k, m, draft layers, target-KV device sequences, cache, draft-KV device
    sequences, draft kind): draft-KV device sequences default to B (all draft KV on the device), the kind
    to "model" (a draft model; "eagle": an EAGLE head)."""
    B, k, M, Ld, tgpu, cache, *rest = cfg
    kind = str(rest[1]) if len(rest) > 1 else "model"
    if kind not in DRAFT_KINDS:
        raise ValueError(f"calibration config {cfg}: draft kind {kind!r} is not one of {DRAFT_KINDS}")
    return B, k, M, Ld, tgpu, cache, int(rest[0]) if rest else B, kind


# ---------------------------------------------------------------------------------------------
# the models
def shrink_config(cfg: dict, max_layers: int = 4) -> dict:
    """An HF config of the same family and structure (experts, top-k, GQA group, shared experts,
    dense layers) with at most `max_layers` layers and small widths: fixed costs count operations,
    which depend on the structure, not on the sizes."""
    c = dict(cfg)
    c.pop("quantization_config", None)
    L = int(c.get("num_hidden_layers", 1))
    if L > max_layers:
        c["num_hidden_layers"] = max_layers
        if isinstance(c.get("mlp_only_layers"), list):
            c["mlp_only_layers"] = [i for i in c["mlp_only_layers"] if i < max_layers]
    nq = int(c.get("num_attention_heads", 1))
    nkv = int(c.get("num_key_value_heads") or nq)
    if int(c.get("hidden_size", 0)) > 256 or int(c.get("head_dim") or 0) > 64:
        g = max(1, nq // max(nkv, 1))
        kv2 = min(nkv, 2)
        c.update(hidden_size=256, num_attention_heads=kv2 * min(g, 8), num_key_value_heads=kv2, head_dim=32)
    for key in ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size"):
        if isinstance(c.get(key), int) and c[key] > 512:
            c[key] = 512
    if int(c.get("vocab_size", 0)) > 4096:
        c["vocab_size"] = 4096
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = c.get(key)
        if isinstance(v, int) and v >= c["vocab_size"]:
            c[key] = 2
        elif isinstance(v, list):
            c[key] = [x for x in v if isinstance(x, int) and x < c["vocab_size"]] or [2]
    c["max_position_embeddings"] = max(int(c.get("max_position_embeddings") or 0), 512)
    c["sliding_window"] = None
    return c


def eagle_config(target_cfg: dict) -> dict:
    """An EAGLE-1 head for the (shrunk) target: one Llama layer of the target's widths, fc with a bias,
    the target's vocabulary (it embeds and projects with the target's tensors)."""
    H, nq = int(target_cfg["hidden_size"]), int(target_cfg["num_attention_heads"])
    return {"architectures": ["EagleLlamaForCausalLM"], "model_type": "llama", "hidden_size": H,
            "num_attention_heads": nq, "num_key_value_heads": int(target_cfg.get("num_key_value_heads") or nq),
            "head_dim": int(target_cfg.get("head_dim") or H // nq), "intermediate_size": 3 * H,
            "num_hidden_layers": 1, "vocab_size": int(target_cfg["vocab_size"]), "bias": True,
            "rms_norm_eps": 1e-5, "hidden_act": "silu", "rope_theta": 10000.0, "tie_word_embeddings": False,
            "max_position_embeddings": 512, "bos_token_id": 1, "eos_token_id": 2}


def draft_config(target_cfg: dict, base: dict | None, layers: int) -> dict:
    """The draft for the measurement: `base` (the bundled draft's config) or a Llama of the target's
    widths, with `layers` layers and the target's vocabulary."""
    if base is not None:
        d = shrink_config(base, max_layers=max(layers, 1))
    else:
        H = int(target_cfg["hidden_size"])
        nq = int(target_cfg["num_attention_heads"])
        d = {"model_type": "llama", "hidden_size": H, "num_attention_heads": nq,
             "num_key_value_heads": int(target_cfg.get("num_key_value_heads") or nq),
             "head_dim": int(target_cfg.get("head_dim") or H // nq), "intermediate_size": 3 * H,
             "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "hidden_act": "silu", "rope_theta": 10000.0,
             "max_position_embeddings": 512, "bos_token_id": 1, "eos_token_id": 2}
    d.update(num_hidden_layers=int(layers), vocab_size=int(target_cfg["vocab_size"]))
    return d


# ---------------------------------------------------------------------------------------------
# measuring
def engine_parts(target_cfg: dict, device, dtype, cache: str):
    from specmoe.runtime.model.expert_store import ExpertStore
    from specmoe.runtime.model.target import TargetModel
    from specmoe.runtime.weights.sources import WeightSource

    src = WeightSource.random(target_cfg, seed=0, dtype=dtype)
    c = src.config
    slots = [(c.num_experts if cache == "full" else c.num_experts // 2) if c.layer_is_moe(i) else 0
             for i in range(c.num_layers)]
    store = ExpertStore(src, device, dtype, slots) if c.is_moe else None
    return TargetModel(src, store, device, dtype), store, slots


def _count_mode(timer, counts: dict):
    """A TorchFunctionMode counting torch calls under the timer's current stage."""
    from torch.overrides import TorchFunctionMode

    class _Count(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            counts[timer.current] = counts.get(timer.current, 0) + 1
            return func(*args, **(kwargs or {}))

    return _Count()


def tracking_timer(device, profile: bool):
    """A StageTimer that also knows the stage it is in (`current`), for counting operations per stage."""
    from specmoe.runtime.run_record import StageTimer

    class _Tracking(StageTimer):
        current = "other"

        @contextmanager
        def stage(self, stage):
            prev, self.current = self.current, str(stage)
            try:
                with StageTimer.stage(self, stage):
                    yield
            finally:
                self.current = prev

    return _Tracking(device, profile)


def _count_expert_calls(store) -> None:
    """Count the expert GEMM chains the MoE runs (one ExpertStore.weights call per touched expert and
    layer): random weights route a sequence's repeated tokens alike, so small batches touch far fewer
    experts than the uniform-routing count the cost model uses (2.5 instead of 5.5 of 8 at 4 tokens)."""
    store.expert_calls = 0
    inner, ref = type(store).weights, weakref.ref(store)   # no reference back to the store: no cycle

    def weights(layer, e):
        s = ref()
        s.expert_calls += 1
        return inner(s, layer, e)

    store.weights = weights   # a closure over the store itself would keep it (and its host memory) until gc


def engine_device(device=None):
    """(device, dtype) the engine-stage measurements run in: the GPU in bf16 where there is one, else the CPU in fp32."""
    import torch

    from specmoe.runtime.device import pick_device

    dev = pick_device(device)
    return dev, (torch.bfloat16 if dev.type == "cuda" else torch.float32)


def measure_stage_overheads(target_cfg: dict, draft_cfgs: dict[int, dict], *, rounds: int = 6, per_round: int = 5,
                            warmup: int = 2, configs=CONFIGS, device=None,
                            progress: Callable[[str], None] | None = None) -> dict:
    """Median seconds per iteration of every stage at each configuration, plus the torch operations per
    stage of one iteration. The configurations run interleaved, `per_round` iterations each per round
    (a burst of other work on a shared machine then spoils a little of every configuration rather than
    all of one). Returns plain data (what the calibration cache holds)."""
    dev, dtype = engine_device(device)
    if progress:
        progress("engine stages: build")
    eagle_cfg = eagle_config(target_cfg)
    runs = _build_runs(target_cfg, draft_cfgs, eagle_cfg, configs, dev, dtype, steps=warmup + rounds * per_round + 1)
    _time_rounds(runs, rounds, per_round, warmup, progress)
    speed = round_speeds([run["samples"]["iteration"] for run in runs], rounds, per_round)
    ref = low_quantile(speed)      # the fast rounds: the state every CPU rate of the calibration is taken in
    out = [_summary(run, _count_ops(run, dev), speed, ref, rounds, per_round) for run in runs]
    return {"device": str(dev), "dtype": str(dtype).replace("torch.", ""), "samples": rounds * per_round,
            "round_speed": [round(f / ref, 4) for f in speed],
            "prompt_len": PROMPT_LEN, "target_config": target_cfg,
            "draft_configs": {int(k): v for k, v in draft_cfgs.items()}, "eagle_config": eagle_cfg, "configs": out}


def _build_runs(target_cfg: dict, draft_cfgs: dict[int, dict], eagle_cfg: dict, configs, dev, dtype,
                steps: int) -> list[dict]:
    """One prefilled SpeculativeDecoder per configuration, with its KV caches sized for `steps`
    iterations (configurations with the same expert cache share one target, with the same draft
    layers one draft model; an EAGLE head is built on its configuration's target)."""
    import torch

    parts: dict[str, Any] = {}
    drafts: dict[Any, Any] = {}
    g = torch.Generator().manual_seed(0)
    runs = []
    for cfg in configs:
        B, k, M, Ld, tgpu, cache, dgpu, kind = config_fields(cfg)
        if cache not in parts:
            parts[cache] = engine_parts(target_cfg, dev, dtype, cache)
        target, store, slots = parts[cache]
        tc = target.config
        key = ("eagle", cache) if kind == "eagle" else Ld
        if k > 0 and key not in drafts:
            drafts[key] = build_draft(kind, eagle_cfg if kind == "eagle" else draft_cfgs[Ld], target, dev, dtype)
        draft = drafts.get(key) if k > 0 else None
        if k > 0 and draft is None:
            continue
        dec, timer = stage_decoder(target, draft, B, k, M, tgpu, dgpu, PROMPT_LEN + steps * (k + 1) + k + 4, dev, dtype)
        seqs = random_sequences(B, tc.vocab_size, PROMPT_LEN, g)
        dec.prefill(seqs)
        if store is not None and not hasattr(store, "expert_calls"):
            _count_expert_calls(store)
        runs.append({"cfg": (B, k, M, Ld, tgpu, cache, dgpu), "kind": kind, "dec": dec, "seqs": seqs, "store": store, "slots": slots,
                     "timer": timer, "samples": {s: [] for s in STAGES + ("iteration",)}, "copies": [], "ctx": [],
                     "catchup": [], "catchup_host": [], "experts": []})
    return runs


def build_draft(kind: str, cfg: dict, target, dev, dtype):
    """A random draft of `kind` ("model": a draft model of config cfg; "eagle": an EAGLE head of config cfg on
    the target's embedding and LM head), or None where the engine's EAGLE head cannot sit on the target (only
    the EAGLE configurations are lost then)."""
    from specmoe.runtime.model.draft import DraftModel
    from specmoe.runtime.model.eagle import EagleHead
    from specmoe.runtime.weights.sources import WeightSource

    if kind != "eagle":
        return DraftModel(WeightSource.random(cfg, seed=1, dtype=dtype), dev, dtype)
    try:
        return EagleHead(WeightSource.random(cfg, seed=1, dtype=dtype), target.embed, target.lm_head_w, dev, dtype)
    except (SpecError, ValueError, NotImplementedError, RuntimeError):
        return None


def random_sequences(B: int, vocab_size: int, prompt_len: int | list[int], g) -> list:
    """B sequences of random prompt tokens (ids >= 3, past the special ones) in rows 0..B-1, no length limit;
    prompt_len tokens each, or prompt_len[i] for sequence i."""
    import torch

    from specmoe.runtime.speculative import Sequence

    lens = prompt_len if isinstance(prompt_len, list) else [prompt_len] * B
    seqs = []
    for i in range(B):
        s = Sequence(i, torch.randint(3, vocab_size, (lens[i],), generator=g).tolist(), 10**9)
        s.row = i
        seqs.append(s)
    return seqs


def stage_decoder(target, draft, B: int, k: int, M: int, tgpu: int, dgpu: int, cap: int, dev, dtype):
    """(SpeculativeDecoder, its StageTimer) of one configuration: target KV for B sequences, tgpu of them
    on the device, and the draft's KV, dgpu of them on the device, `cap` positions each."""
    from specmoe.runtime.model.kv_cache import SplitKVCache
    from specmoe.runtime.run_record import StageTimer
    from specmoe.runtime.speculative import SpeculativeDecoder

    profile = dev.type == "cuda"     # GPU stages synchronised: a stage's time is its own, as the cost model's
    tc = target.config
    tkv = SplitKVCache(tc.num_layers, B, tgpu, tc.num_kv_heads, cap, tc.head_dim, dev, dtype, dtype, decode_kernel=False)
    dkv = None
    if draft is not None:
        dc = draft.config
        dkv = SplitKVCache(dc.num_layers, B, dgpu, dc.num_kv_heads, cap, dc.head_dim, dev, dtype, dtype,
                           decode_kernel=True)
    timer = StageTimer(dev, profile)
    dec = SpeculativeDecoder(target, draft, tkv, dkv, timer, M, eos_ids=(), temperature=0.0, seed=0,
                             oracle_alpha=ORACLE_ALPHA if k > 0 else None)
    return dec, timer


def _step(run: dict, record: bool) -> None:
    """One decode iteration of a configuration; with `record`, its stage times, expert copies, expert
    calls, mean context and whether any sequence of the device / host draft-KV part (rows below / from
    dgpu: sequence i holds row i) had accepted all k drafts (a draft model's sequence then catches up two
    tokens; an EAGLE head's has k + 1 pairs pending) are appended to the run's samples."""
    dec, seqs, store, timer = run["dec"], run["seqs"], run["store"], run["timer"]
    full = run["cfg"][1] if run["kind"] == "eagle" else 1     # pending tokens past which all k were accepted
    before = dict(timer.totals["decode"])
    c0 = store.copied_experts if store is not None else 0     # copies made (none on a CPU device: references)
    e0 = store.expert_calls if store is not None else 0
    ctx = sum(s.target_len for s in seqs) / len(seqs)
    dgpu = run["cfg"][6]
    catchup = float(any(len(s.draft_pending) > full for s in seqs[:dgpu]))
    catchup_host = float(any(len(s.draft_pending) > full for s in seqs[dgpu:]))
    t0 = time.perf_counter()
    dec.step(seqs, run["cfg"][1])
    dt = time.perf_counter() - t0
    if record:
        after = timer.totals["decode"]
        for st in STAGES:
            run["samples"][st].append(after.get(st, 0.0) - before.get(st, 0.0))
        run["samples"]["iteration"].append(dt)
        run["copies"].append((store.copied_experts if store is not None else 0) - c0)
        run["experts"].append((store.expert_calls if store is not None else 0) - e0)
        run["ctx"].append(ctx)
        run["catchup"].append(catchup)
        run["catchup_host"].append(catchup_host)


def _time_rounds(runs: list[dict], rounds: int, per_round: int, warmup: int,
                 progress: Callable[[str], None] | None) -> None:
    """`warmup` untimed iterations of each configuration, then `rounds` rounds of `per_round` timed
    iterations of every configuration in turn."""
    for run in runs:
        for _ in range(warmup):
            _step(run, False)
    for r in range(rounds):
        if progress:
            progress(f"engine stages: round {r + 1}/{rounds}")
        for run in runs:
            for _ in range(per_round):
                _step(run, True)


def _count_ops(run: dict, dev) -> dict[str, int]:
    """The torch operations of each stage in one more iteration of the configuration."""
    dec = run["dec"]
    ctimer = tracking_timer(dev, False)
    dec.timer = ctimer
    counts: dict[str, int] = {}
    with _count_mode(ctimer, counts):
        dec.step(run["seqs"], run["cfg"][1])
    return counts


def _summary(run: dict, counts: dict[str, int], speed: list[float], ref: float, rounds: int, per_round: int) -> dict:
    """A configuration's plain-data record: its settings, per-iteration means of the counters, and per
    stage the median, the mean and the speed-normalised mean seconds per iteration."""
    B, k, M, Ld, tgpu, cache, dgpu = run["cfg"]
    return {"B": B, "k": k, "m": M, "draft_layers": Ld, "draft_kind": run["kind"], "target_kv_gpu": tgpu,
            "draft_kv_gpu": dgpu, "cache": cache,
            "expert_cache_slots": list(run["slots"]), "context": statistics.fmean(run["ctx"]),
            "copies_per_iteration": statistics.fmean(run["copies"]),
            "experts_per_iteration": statistics.fmean(run["experts"]),
            "catchup_per_iteration": statistics.fmean(run["catchup"]) if k > 0 else 0.0,        # device part
            "catchup_host_per_iteration": statistics.fmean(run["catchup_host"]) if k > 0 else 0.0,
            "median_s": {st: statistics.median(v) for st, v in run["samples"].items()},
            "mean_s": {st: statistics.fmean(v) for st, v in run["samples"].items()},
            "normalized_s": {st: ref * statistics.fmean(m / f for m, f in zip(_round_means(v, rounds, per_round),
                                                                          speed))
                             for st, v in run["samples"].items()},
            "ops": {st: int(n) for st, n in sorted(counts.items())}}


def _round_means(samples: list[float], rounds: int, per_round: int) -> list[float]:
    return [statistics.fmean(samples[r * per_round:(r + 1) * per_round]) for r in range(rounds)]


def round_speeds(iteration_samples: list[list[float]], rounds: int, per_round: int) -> list[float]:
    """The machine's relative slowness in each round: per round, the median over configurations of
    the round's mean iteration over that configuration's median round (1 = a typical round; 1.3 =
    everything ran 30% slower then). Dividing each round by it takes the machine's spells out of the
    comparison between configurations, which the fit depends on."""
    rel = []
    for v in iteration_samples:
        rm = _round_means(v, rounds, per_round)
        med = statistics.median(rm)
        rel.append([x / med if med > 0 else 1.0 for x in rm])
    return [statistics.median(col) for col in zip(*rel)]
