"""The engine's fixed per-invocation costs (planner/overhead.py), measured by running the engine's own
stage code on tiny problems: part of `specmoe calibrate`.

    measure_stage_overheads(target_cfg, draft_cfg, ...) -> raw samples (cached by calibrate)
    fit_overheads(raw, hw_raw) -> (op_overhead_us, stage_overhead_us, details)

Measuring: a tiny random target (the calibration model's config, shrunk to a few layers and small
widths if it is large) and a tiny random draft (1 and 2 layers) run the real speculative loop
(runtime.speculative.SpeculativeDecoder.step: target_model's pre_attn/attention/post_attn/moe, the
draft steps, the acceptance check, the LM head) under the engine's StageTimer, at a handful of
configurations (batch, draft length, micro-batches, draft layers, where the target KV lives, full or
half expert cache), interleaved in rounds. Each stage's mean (and median) seconds per iteration
are kept; the fit uses the mean, as the engine's RunRecord reports means, after dividing each round
by the machine's speed in that round (round_speeds: a shared machine runs whole rounds 20-50%
slower or faster), so that the configurations are compared at one speed. Acceptance comes from the engine's seeded
Bernoulli oracle (random drafts agree with nothing), so sequences catch up after fully accepted
drafts as they do with a real draft.

Fitting: per stage, measured = roofline + sum_key theta_key x count_key, with the cost model's own
roofline (planner.cost_model on the just-measured curves, no fixed costs) and the counts of
planner/overhead.py (invocations per layer and micro-batch, per touched expert, per sequence, per
draft step and layer), solved by non-negative least squares over the configurations. So the fixed
terms are exactly what the cost model adds, and at the calibration points fixed + roofline
reproduces the measurement up to the fit residual (recorded). What no stage times (the iteration
minus its stages: the pass's layout and inputs, Python between stages) is fitted the same way to
iteration.other + iteration.other.sequence x B. `op_overhead_us` is the fitted fixed
time of the largest configuration divided by the torch operations it issued (counted by a
TorchFunctionMode per stage), the fallback for keys a spec lacks.

Dimensions: B sequences, k draft tokens, m micro-batches, L layers, L_d draft layers, P prompt tokens.
"""
from __future__ import annotations

import math
import statistics
import time
from contextlib import contextmanager
from typing import Any, Callable

# (B, k, m, draft layers, target-KV sequences on the device, expert cache): every fitted term varies
# independently across these (see fit_overheads' features). Where target KV is split between device
# and host, m = 1, so the engine's micro-batches and the cost model's split_even hold the same parts.
CONFIGS: tuple[tuple[int, int, int, int, int, str], ...] = (
    (1, 0, 1, 1, 0, "full"),
    (16, 0, 2, 1, 0, "full"),
    (1, 3, 1, 1, 1, "full"),
    (32, 3, 1, 2, 0, "full"),
    (4, 1, 2, 2, 4, "half"),
    (8, 2, 4, 1, 0, "full"),
    (2, 4, 2, 2, 0, "full"),
    (32, 1, 1, 1, 8, "full"),
    (32, 0, 1, 1, 0, "full"),
    (24, 2, 1, 2, 0, "full"),
)
PROMPT_LEN = 16
ORACLE_ALPHA = 0.6     # per-draft acceptance rate of the measurement's oracle
STAT = "normalized_s"  # fitted: mean seconds per iteration (as RunRecords report them), each round divided by
                       # the machine's speed in it (round_speeds) and scaled to a typical round; "mean_s" in
                       # caches written before
STAGES = ("target.pre_attn", "target.attention", "target.post_attn", "target.moe", "target.h2d",
          "target.lm_head", "verify.accept", "draft.gpu")


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
def _engine_parts(target_cfg: dict, device, dtype, cache: str):
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


def _tracking_timer(device, profile: bool):
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
    inner = store.weights

    def weights(layer, e):
        store.expert_calls += 1
        return inner(layer, e)

    store.weights = weights


def measure_stage_overheads(target_cfg: dict, draft_cfgs: dict[int, dict], *, rounds: int = 6, per_round: int = 5,
                            warmup: int = 2, configs=CONFIGS, device=None,
                            progress: Callable[[str], None] | None = None) -> dict:
    """Median seconds per iteration of every stage at each configuration, plus the torch operations per
    stage of one iteration. The configurations run interleaved, `per_round` iterations each per round
    (a burst of other work on a shared machine then spoils a little of every configuration rather than
    all of one). Returns plain data (what the calibration cache holds)."""
    import torch

    from specmoe.runtime.device import pick_device
    from specmoe.runtime.model.draft import DraftModel
    from specmoe.runtime.model.kv_cache import SplitKVCache
    from specmoe.runtime.run_record import StageTimer
    from specmoe.runtime.speculative import Sequence, SpeculativeDecoder
    from specmoe.runtime.weights.sources import WeightSource

    dev = pick_device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    profile = dev.type == "cuda"     # GPU stages synchronised: a stage's time is its own, as the cost model's
    parts: dict[str, Any] = {}
    drafts: dict[int, Any] = {}
    g = torch.Generator().manual_seed(0)
    steps = warmup + rounds * per_round + 1
    runs = []
    if progress:
        progress("engine stages: build")
    for (B, k, M, Ld, tgpu, cache) in configs:
        if cache not in parts:
            parts[cache] = _engine_parts(target_cfg, dev, dtype, cache)
        target, store, slots = parts[cache]
        tc = target.config
        if k > 0 and Ld not in drafts:
            drafts[Ld] = DraftModel(WeightSource.random(draft_cfgs[Ld], seed=1, dtype=dtype), dev, dtype)
        draft = drafts.get(Ld) if k > 0 else None
        cap = PROMPT_LEN + steps * (k + 1) + k + 4
        tkv = SplitKVCache(tc.num_layers, B, tgpu, tc.num_kv_heads, cap, tc.head_dim, dev, dtype, dtype, decode_kernel=False)
        dkv = None
        if draft is not None:
            dc = draft.config
            dkv = SplitKVCache(dc.num_layers, B, B, dc.num_kv_heads, cap, dc.head_dim, dev, dtype, dtype, decode_kernel=True)
        timer = StageTimer(dev, profile)
        dec = SpeculativeDecoder(target, draft, tkv, dkv, timer, M, eos_ids=(), temperature=0.0, seed=0,
                                 oracle_alpha=ORACLE_ALPHA if k > 0 else None)
        seqs = []
        for i in range(B):
            s = Sequence(i, torch.randint(3, tc.vocab_size, (PROMPT_LEN,), generator=g).tolist(), 10**9)
            s.row = i
            seqs.append(s)
        dec.prefill(seqs)
        if store is not None and not hasattr(store, "expert_calls"):
            _count_expert_calls(store)
        runs.append({"cfg": (B, k, M, Ld, tgpu, cache), "dec": dec, "seqs": seqs, "store": store, "slots": slots,
                     "timer": timer, "samples": {s: [] for s in STAGES + ("iteration",)}, "copies": [], "ctx": [],
                     "catchup": [], "experts": []})

    def one(run: dict, record: bool) -> None:
        dec, seqs, store, timer = run["dec"], run["seqs"], run["store"], run["timer"]
        before = dict(timer.totals["decode"])
        c0 = store.h2d_experts if store is not None else 0
        e0 = store.expert_calls if store is not None else 0
        ctx = sum(s.target_len for s in seqs) / len(seqs)
        catchup = float(any(len(s.draft_pending) > 1 for s in seqs))
        t0 = time.perf_counter()
        dec.step(seqs, run["cfg"][1])
        dt = time.perf_counter() - t0
        if record:
            after = timer.totals["decode"]
            for st in STAGES:
                run["samples"][st].append(after.get(st, 0.0) - before.get(st, 0.0))
            run["samples"]["iteration"].append(dt)
            run["copies"].append((store.h2d_experts if store is not None else 0) - c0)
            run["experts"].append((store.expert_calls if store is not None else 0) - e0)
            run["ctx"].append(ctx)
            run["catchup"].append(catchup)

    for run in runs:
        for _ in range(warmup):
            one(run, False)
    for r in range(rounds):
        if progress:
            progress(f"engine stages: round {r + 1}/{rounds}")
        for run in runs:
            for _ in range(per_round):
                one(run, True)
    speed = round_speeds([run["samples"]["iteration"] for run in runs], rounds, per_round)
    ref = statistics.median(speed)
    out = []
    for run in runs:
        # one more iteration counting the torch operations of each stage
        dec = run["dec"]
        ctimer = _tracking_timer(dev, False)
        dec.timer = ctimer
        counts: dict[str, int] = {}
        with _count_mode(ctimer, counts):
            dec.step(run["seqs"], run["cfg"][1])
        B, k, M, Ld, tgpu, cache = run["cfg"]
        out.append({"B": B, "k": k, "m": M, "draft_layers": Ld, "target_kv_gpu": tgpu, "cache": cache,
                    "expert_cache_slots": list(run["slots"]), "context": statistics.fmean(run["ctx"]),
                    "copies_per_iteration": statistics.fmean(run["copies"]),
                    "experts_per_iteration": statistics.fmean(run["experts"]),
                    "catchup_per_iteration": statistics.fmean(run["catchup"]) if k > 0 else 0.0,
                    "median_s": {st: statistics.median(v) for st, v in run["samples"].items()},
                    "mean_s": {st: statistics.fmean(v) for st, v in run["samples"].items()},
                    "normalized_s": {st: ref * statistics.fmean(m / f for m, f in zip(_round_means(v, rounds, per_round),
                                                                                  speed))
                                     for st, v in run["samples"].items()},
                    "ops": {st: int(n) for st, n in sorted(counts.items())}})
    return {"device": str(dev), "dtype": str(dtype).replace("torch.", ""), "samples": rounds * per_round,
            "round_speed": [round(f / ref, 4) for f in speed],
            "prompt_len": PROMPT_LEN, "target_config": target_cfg,
            "draft_configs": {int(k): v for k, v in draft_cfgs.items()}, "configs": out}


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


# ---------------------------------------------------------------------------------------------
# fitting
def engine_kv_parts(batch: int, micro_batches: int, gpu_sequences: int) -> list[tuple[int, int]]:
    """(device-KV, host-KV) sequences of each micro-batch as the engine forms them here: consecutive
    sequences (runtime.kv_cache.PassLayout.split: micro-batch j holds [B j / m, B (j+1) / m)), the
    first `gpu_sequences` rows on the device."""
    B, M, t = int(batch), max(1, min(int(micro_batches), int(batch))), int(gpu_sequences)
    out = []
    for j in range(M):
        s0, s1 = (B * j) // M, (B * (j + 1)) // M
        dev = max(0, min(s1, t) - s0)
        out.append((dev, s1 - s0 - dev))
    return out


def _features(c: dict, spec, n_moe: int, touched: float) -> dict[str, dict[str, float]]:
    """stage -> {key: how many units of the key one iteration of configuration c has}, counted as
    the engine runs (runtime/model/target.py forward, runtime/speculative.py step)."""
    B, k, M, Ld, tgpu = c["B"], c["k"], c["m"], c["draft_layers"], c["target_kv_gpu"]
    L = spec.num_layers
    M = max(1, min(M, B))
    parts = engine_kv_parts(B, M, tgpu)
    dev_mbs = sum(1 for d, _ in parts if d > 0)
    host_mbs = sum(1 for _, h in parts if h > 0)
    f = {
        "target.pre_attn": {"target.pre_attn": 1 + L * M, "target.pre_attn.sequence": B},
        "target.attention": {"target.attention": L * host_mbs, "target.attention.gpu": L * dev_mbs,
                             "target.attention.sequence": B},
        "target.post_attn": {"target.post_attn": L * M, "target.post_attn.token": L * B * (k + 1)},
        # the expert chains the engine ran (counted), else uniform routing's expected count
        "target.moe": {"target.moe": L, "target.moe.expert": c.get("experts_per_iteration") or n_moe * touched,
                       "target.moe.token": n_moe * B * (k + 1)},
        "target.lm_head": {"target.lm_head": 1, "target.lm_head.token": B * (k + 1)},
        "verify.accept": {"verify.accept": 1, "verify.accept.sequence": B, "verify.accept.token": B * (k + 1)},
    }
    if c["copies_per_iteration"] > 0:
        f["target.h2d"] = {"target.h2d": c["copies_per_iteration"]}
    if k > 0:
        f["draft.gpu"] = {"draft.step": k, "draft.layer": k * Ld, "draft.sequence": k * B,
                          "draft.catchup": Ld * c.get("catchup_per_iteration", 0.0)}
    return f


def _roofline_stages(c: dict, spec, dspec, hw, dtype: str) -> dict[str, float]:
    """The cost model's stage times (no fixed costs) of configuration c."""
    from specmoe.planner.cost_model import CostModel
    from specmoe.planner.plan import Placement
    from specmoe.planner.workload import AcceptanceProfile, Workload

    wl = Workload(prompt_len=PROMPT_LEN, gen_len=64, acceptance=AcceptanceProfile.from_alpha(ORACLE_ALPHA),
                  kv_dtype=dtype, weight_dtype=dtype)
    cm = CostModel(spec, hw, wl, dspec if c["k"] > 0 else None)
    pl = Placement(expert_cache_slots=tuple(c["expert_cache_slots"]), draft_kv_gpu_sequences=c["B"],
                   target_kv_gpu_sequences=c["target_kv_gpu"])
    costs = cm.iteration(c["B"], max(1, min(c["m"], c["B"])), c["k"], pl, context_len=c["context"], batched_moe=True)
    return costs.stage_totals()


def _stat(c: dict) -> dict:
    return c.get(STAT) or c["mean_s"]


def fit_overheads(raw: dict, hw_raw: dict) -> tuple[float | None, dict[str, float], dict[str, Any]]:
    """(op_overhead_us, stage_overhead_us, details) from measure_stage_overheads' samples and a hardware
    spec (raw mapping) holding the measured curves but no fixed costs."""
    import numpy as np
    from scipy.optimize import nnls

    from specmoe.planner.cost_model import touched_experts
    from specmoe.planner.hardware_spec import parse_hardware
    from specmoe.planner.model_spec import ModelSpec

    hw_raw = dict(hw_raw)
    hw_raw["measured"] = {k: v for k, v in hw_raw.get("measured", {}).items()
                          if k not in ("op_overhead_us", "stage_overhead_us")}
    hw = parse_hardware(hw_raw, "calibration")
    spec = ModelSpec.from_hf_config(raw["target_config"], name="calibration target")
    dspecs = {int(k): ModelSpec.from_hf_config(v, name=f"calibration draft {k}") for k, v in raw["draft_configs"].items()}
    dt = "bf16" if raw["dtype"] == "bfloat16" else "fp32"
    n_moe = len(spec.moe_layers)
    rows: dict[str, list[tuple[dict, float, float]]] = {}
    for c in raw["configs"]:
        N = c["B"] * (c["k"] + 1)
        touched = touched_experts(spec.num_experts, spec.top_k, N) if spec.num_experts else 0.0
        roof = _roofline_stages(c, spec, dspecs[c["draft_layers"]], hw, dt)
        for st, feats in _features(c, spec, n_moe, touched).items():
            rows.setdefault(st, []).append((feats, _stat(c)[st], roof.get(st, 0.0)))
    theta: dict[str, float] = {}
    fit_err: dict[str, float] = {}
    fit_by_cfg: dict[str, list[float]] = {}
    roof_share: dict[str, float] = {}
    for st, rs in rows.items():
        keys = sorted({key for feats, _, _ in rs for key in feats})
        X = np.array([[feats.get(key, 0.0) for key in keys] for feats, _, _ in rs], dtype=float)   # [configs, keys]
        y = np.array([meas - roof for _, meas, roof in rs], dtype=float)                          # [configs]
        meas = np.array([m for _, m, _ in rs], dtype=float)
        roof = np.array([r for _, _, r in rs], dtype=float)
        scale = np.maximum(meas, 1e-9)                 # relative least squares: every configuration counts alike
        sol, _ = nnls(X / scale[:, None], y / scale)
        for key, v in zip(keys, sol):
            theta[key] = float(v)
        pred = roof + X @ sol
        fit_err[st] = float(np.max(np.abs(pred - meas) / scale))
        fit_by_cfg[st] = [_r(v) for v in (pred - meas) / scale]
        roof_share[st] = float(np.mean(roof / scale))
    # the engine's work outside every stage (layout and inputs of the pass, Python between stages):
    # iteration - sum of stages = iteration.other + iteration.other.sequence x B, relative to the iteration
    Xo = np.array([[1.0, float(c["B"])] for c in raw["configs"]])                          # [configs, 2]
    it_s = np.array([_stat(c)["iteration"] for c in raw["configs"]], dtype=float)          # [configs]
    yo = it_s - np.array([sum(_stat(c)[st] for st in STAGES) for c in raw["configs"]], dtype=float)
    so, _ = nnls(Xo / it_s[:, None], yo / it_s)
    theta["iteration.other"], theta["iteration.other.sequence"] = float(so[0]), float(so[1])
    fit_err["iteration.other"] = float(np.max(np.abs(Xo @ so - yo) / it_s))
    # ops per invocation (exact counts: the same features, least squares) and the per-operation cost
    ops_rows: dict[str, list[tuple[dict, float]]] = {}
    for c in raw["configs"]:
        N = c["B"] * (c["k"] + 1)
        touched = touched_experts(spec.num_experts, spec.top_k, N) if spec.num_experts else 0.0
        for st, feats in _features(c, spec, n_moe, touched).items():
            ops_rows.setdefault(st, []).append((feats, float(c["ops"].get(st, 0))))
    ops: dict[str, float] = {}
    for st, rs in ops_rows.items():
        keys = sorted({key for feats, _ in rs for key in feats if not key.endswith((".sequence", ".token"))})
        if not keys:
            continue
        X = np.array([[feats.get(key, 0.0) for key in keys] for feats, _ in rs], dtype=float)
        y = np.array([n for _, n in rs], dtype=float)
        sol, _ = nnls(X, y)
        ops.update({key: round(float(v), 1) for key, v in zip(keys, sol)})
    ref = max(raw["configs"], key=lambda c: _stat(c)["iteration"])
    N = ref["B"] * (ref["k"] + 1)
    touched = touched_experts(spec.num_experts, spec.top_k, N) if spec.num_experts else 0.0
    fixed_ref = sum(theta.get(key, 0.0) * n for feats in _features(ref, spec, n_moe, touched).values()
                    for key, n in feats.items())
    ops_ref = sum(n for st, n in ref["ops"].items() if st in STAGES)
    op_us = fixed_ref / ops_ref * 1e6 if ops_ref > 0 and fixed_ref > 0 else None
    untimed = [_stat(c)["iteration"] - sum(_stat(c)[st] for st in STAGES) for c in raw["configs"]]
    stage_us = {key: _r(v * 1e6) for key, v in sorted(theta.items())}
    details = {
        "method": ("engine stages timed on tiny random models (runtime/calibrate/overhead.py); per stage "
                   "measured = cost-model roofline + sum of fixed terms x invocations, non-negative least squares"),
        "device": raw["device"], "dtype": raw["dtype"], "configs": len(raw["configs"]),
        "fit_max_rel_err_by_stage": {st: _r(v) for st, v in sorted(fit_err.items())},
        "fit_rel_err_by_stage_and_config": dict(sorted(fit_by_cfg.items())),
        "roofline_share_by_stage": {st: _r(v) for st, v in sorted(roof_share.items())},
        "ops_per_invocation": dict(sorted(ops.items())),
        "untimed_per_iteration_us": _r(max(0.0, statistics.median(untimed)) * 1e6),
    }
    return (_r(op_us) if op_us else None), stage_us, details


def _r(x: float) -> float:
    return float(f"{x:.4g}") if x and math.isfinite(x) else 0.0
