"""Prefill passes of the engine, timed and fitted: part of `specmoe calibrate`'s engine-stage step.

    measure_prefills(target_cfg, ...) -> raw samples (kept with the stage overheads, under "prefill")
    fit_prefill(raw, hw_with) -> (prefill key -> seconds per unit, details)

The decode terms (runtime/calibrate/overhead.py) are fitted on passes of at most B (k+1) = 128 tokens.
A prefill pass carries thousands: its rotary and norms, the expert GEMMs' outputs and silu_mul over
[T*K, F], the permutation and combine, and the pages of every activation of that size, cost more per
token than the decode passes show (the demo's prefill ran 18-31% over its prediction in every run on a
2-core VM, 1065 tokens a pass). So the calibration runs the engine's own prefill (runtime/speculative.py
prefill: the target, then the draft's own, their KV in host memory) on tiny random prompts at a few (batch,
mean prompt length), each once with a draft model and once with an EAGLE head, the lengths spread over
P/2 .. 3P/2 as a real prompt set's are, timing each pass, its target stages and the draft's (draft.gpu),
and fits what the cost model's prefill (planner/prefill.py prefill_parts, with the fixed costs just
fitted) leaves out of each part, a target stage, the draft's own prefill or the rest of the pass outside
them, as two terms: per layer and pass, and per prompt token and layer (overhead.PREFILL_PART_KEYS, the
draft's PREFILL_DRAFT_KEYS of its kind per draft layer, fitted on the passes with that kind). One per-token
term for the whole pass left the passes here -27 to +13% off (small passes under, large ones over: a
pass pays a fixed part too, ~1 ms on this 2-core VM); the two terms per part leave them within ~10%,
and give the report a prediction for each stage of the prefill. The fit takes each configuration's
median pass, not its fastest: every pass starts on a released heap and pays its activations' page faults
anew, 3k-14k of them a pass here (the fastest pass the one with the fewest), and a run's one prefill is a
draw from that spread (side by side the engine's prefill and these passes measured alike); the fastest
left the demo's prefill 6-11% under its measurement (bench/fidelity.py runs H and I).

Dimensions: B sequences, P prompt tokens each, T = B*P tokens of a pass, L target layers.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

from specmoe.planner.stages import Stage
from specmoe.runtime.calibrate.measure import low_quantile

# (B, P): passes of 96 to 1280 tokens, prompts of 12 to 64 (the demo's: 32 prompts of 34 tokens)
PREFILL_CONFIGS: tuple[tuple[int, int], ...] = ((8, 12), (4, 64), (32, 24), (20, 64))
ROUNDS = 8          # timed passes of each configuration (at most), interleaved; one untimed pass each first


def measure_prefills(target_cfg: dict, drafts: dict[str, dict] | None = None, *, rounds: int = ROUNDS,
                     configs=PREFILL_CONFIGS, device=None, progress: Callable[[str], None] | None = None) -> dict:
    """Seconds of each configuration's prefill pass (wall, from the engine's call to its first tokens):
    every sample, the low quantile and the median, and each stage's median. A random target (the
    calibration's config) with every expert resident, on the device and in the dtype of the engine-stage
    measurement; fresh random prompts each pass, of the lengths prompt_lengths(B, P), each pass after the
    C heap's free pages are released, as the engine's runs start. `drafts` (kind -> config: "model", a
    draft model; "eagle", an EAGLE head): every (B, P) runs once with each, whose own prefill the engine
    times as draft.gpu; none: the target alone."""
    import torch

    from specmoe.runtime.calibrate.overhead import build_draft, engine_device, engine_parts, random_sequences, stage_decoder

    dev, dtype = engine_device(device)
    target, _, slots = engine_parts(target_cfg, dev, dtype, "full")
    g = torch.Generator().manual_seed(1)
    kinds = [(kind, cfg, build_draft(kind, cfg, target, dev, dtype)) for kind, cfg in (drafts or {}).items()]
    kinds = [(kind, cfg, d) for kind, cfg, d in kinds if d is not None] or [(None, None, None)]
    runs = []
    for B, P in configs:
        lens = prompt_lengths(B, P)
        for kind, cfg, draft in kinds:
            dec, timer = stage_decoder(target, draft, B, 0, 1, 0, 0, max(lens) + 4, dev, dtype)   # all KV on the host
            runs.append({"B": B, "P": P, "lens": lens, "dec": dec, "timer": timer, "samples": [], "stages": [],
                         "draft": {"draft_kind": kind, "draft_layers": int(cfg["num_hidden_layers"])} if kind else {}})
    vocab = target.config.vocab_size
    for r in range(rounds + 1):
        if progress:
            progress(f"prefill passes: round {r}/{rounds}")
        for run in runs:
            _time_pass(run, random_sequences(run["B"], vocab, run["lens"], g), timed=r > 0)
    return {"expert_cache_slots": list(slots), "rounds": rounds,
            "configs": [{"B": run["B"], "P": run["P"], **run["draft"], "samples_s": [round(x, 7) for x in run["samples"]],
                         "low_s": low_quantile(run["samples"]), "median_s": statistics.median(run["samples"]),
                         "stages_s": _stage_medians(run["stages"])}
                        for run in runs]}


def _time_pass(run: dict, seqs: list, timed: bool) -> None:
    """One prefill pass of a configuration, its wall time and stage times kept when `timed` (the first
    pass of each is not: its allocations)."""
    from specmoe.runtime.memory_usage import release_free_heap

    before = dict(run["timer"].totals["prefill"])
    # as every run of the engine starts (Engine.generate, MemoryMeter.run_started): its first prefill
    # faults its activations' pages in anew (5 of the demo's 50 ms on this VM, side by side)
    release_free_heap()
    t0 = time.perf_counter()
    run["dec"].prefill(seqs)
    if timed:
        run["samples"].append(time.perf_counter() - t0)
        run["stages"].append({k: v - before.get(k, 0.0) for k, v in run["timer"].totals["prefill"].items()})


def _stage_medians(passes: list[dict[str, float]]) -> dict[str, float]:
    """Each stage's median over the passes (stage -> seconds of one pass)."""
    names = sorted({k for p in passes for k in p})
    return {k: statistics.median([p.get(k, 0.0) for p in passes]) for k in names}


def _pass_s(c: dict) -> float:
    """The seconds of a configuration's pass that the fit takes: the median pass (a run has one prefill, a
    draw from the same spread of page faults; see the module docstring), the low quantile in samples that
    predate it."""
    return float(c.get("median_s", c["low_s"]))


def prompt_lengths(B: int, P: int) -> list[int]:
    """B prompt lengths spread evenly over P/2 .. 3P/2 (at least 1), their mean P, in a mixed order."""
    lens = [max(1, round(P * (0.5 + i / max(1, B - 1)))) if B > 1 else P for i in range(B)]
    lens[-1] += P * B - sum(lens)           # the mean exactly P
    return lens[::2] + lens[1::2]


def fit_prefill(raw: dict, hw_with: Callable[[dict[str, float]], Any]) -> tuple[dict[str, float], dict]:
    """(prefill key -> seconds per unit, details) from measure_prefills' samples (raw["prefill"] of the
    stage-overhead samples) against the cost model's prefill on hw_with(keys), the hardware spec with the
    fixed costs just fitted and these keys (microseconds) added. Each part of the pass (a target stage, the
    draft's own prefill, or the rest outside them) gets its two terms (PREFILL_PART_KEYS: per layer and pass,
    per token and layer; the draft's PREFILL_DRAFT_KEYS of its kind, per draft layer, over the passes with
    that kind of draft) by non-negative least squares of what the model's part leaves out, relative to each
    configuration's whole pass, the model's prefill taken with every prefill key at 0 (so without the decode
    token terms the prefill ones replace). Passes timed without their stages fit the whole pass on the
    rest's terms."""
    import numpy as np
    from scipy.optimize import nnls

    from specmoe.planner.model_spec import ModelSpec
    from specmoe.planner.overhead import PREFILL_DRAFT_KEYS, PREFILL_PART_KEYS, PREFILL_PART_PER_LAYER

    pre = raw["prefill"]
    cfgs = pre["configs"]
    spec = ModelSpec.from_hf_config(raw["target_config"], name="calibration target")
    dt = "bf16" if raw["dtype"] == "bfloat16" else "fp32"
    L = spec.num_layers
    meas = np.array([_pass_s(c) for c in cfgs], dtype=float)                                        # [configs]
    by_stage = all(isinstance(c.get("stages_s"), dict) for c in cfgs)
    zero = [key for keys in (*PREFILL_PART_KEYS.values(), *PREFILL_DRAFT_KEYS.values()) for key in keys]
    hw = hw_with({key.value: 0.0 for key in zero} if by_stage else {})
    dspecs = [_draft_spec(raw, c) for c in cfgs]
    parts = [model_prefill_parts(spec, hw, dt, c["B"], c["P"], pre["expert_cache_slots"], d) for c, d in zip(cfgs, dspecs)]
    model = np.array([p.total_s for p in parts], dtype=float)
    # (part, its keys, the configurations it is fitted on, [configs] layers a unit of its per-pass term counts,
    # and of its per-token term: a target part's L or 1 (PREFILL_PART_PER_LAYER), the draft's its own layers)
    every = list(range(len(cfgs)))
    fits = [(name, PREFILL_PART_KEYS[name], every, *([L if per_layer else 1] * len(cfgs)
                                                      for per_layer in PREFILL_PART_PER_LAYER[name]))
            for name in (list(PREFILL_PART_KEYS) if by_stage else ["other"])]
    for eagle in (False, True):
        on = [i for i, d in enumerate(dspecs) if d is not None and bool(d.eagle) == eagle and by_stage]
        if on:
            ld = [d.num_layers if d is not None else 0 for d in dspecs]
            fits.append(("draft", PREFILL_DRAFT_KEYS[eagle], on, ld, ld))
    theta: dict[str, float] = {}
    fitted = model.copy()
    part_rows = {}
    for name, keys, on, per_pass, per_token in fits:
        m_part = np.array([_measured_part(cfgs[i], name) if by_stage else _pass_s(cfgs[i]) for i in on], dtype=float)
        p_part = np.array([parts[i].part_s(name) if by_stage else parts[i].total_s for i in on], dtype=float)
        X = np.array([[parts[i].passes * per_pass[i], cfgs[i]["B"] * cfgs[i]["P"] * per_token[i]] for i in on],
                     dtype=float)                                                                   # [on, 2]
        sol, _ = nnls(X / meas[on, None], (m_part - p_part) / meas[on])
        for key, v in zip(keys, sol):
            theta[key.value] = float(v)
        fitted[on] += X @ sol
        part_rows[keys[0].value if name == "draft" else name] = {
            "measured_ms": [_r(x * 1e3) for x in m_part], "model_ms": [_r(x * 1e3) for x in p_part]}
    details = {"method": ("the engine's prefill (target, host KV; with each kind of draft where given) timed at (B, P), "
                          "with its stages; each part (a target stage, the draft's own prefill, the rest outside them) "
                          "gets what the cost model's part (roofline + fixed costs) leaves out as a term per layer and "
                          "pass and one per prompt token and layer, non-negative least squares relative to each whole "
                          "pass" if by_stage else
                          "the engine's prefill (target, host KV) timed at (B, P) without its stages: the whole pass's "
                          "miss on prefill and prefill.token"),
               "configs": [{"B": c["B"], "P": c["P"], **({"draft": c["draft_kind"]} if c.get("draft_kind") else {}),
                            "measured_ms": _r(m * 1e3), "model_ms": _r(p * 1e3), "fit_rel_err": _r(e)}
                           for c, m, p, e in zip(cfgs, meas, model, (fitted - meas) / meas)],
               "model_rel_err_before": [_r(e) for e in (model - meas) / meas], "parts": part_rows}
    return theta, details


def _draft_spec(raw: dict, c: dict):
    """The ModelSpec of the draft a prefill configuration ran with (None: the target alone)."""
    from specmoe.planner.model_spec import ModelSpec

    kind = c.get("draft_kind")
    if kind == "eagle":
        return ModelSpec.from_hf_config(raw["eagle_config"], name="calibration EAGLE head")
    if kind == "model":
        dcfgs = {int(k): v for k, v in raw["draft_configs"].items()}
        return ModelSpec.from_hf_config(dcfgs[int(c["draft_layers"])], name=f"calibration draft {c['draft_layers']}")
    return None


def _measured_part(c: dict, name: str) -> float:
    """A configuration's measured seconds of one part: a target stage, "draft" (its own prefill, timed as
    draft.gpu) or "other" (the pass outside every stage)."""
    st = c["stages_s"]
    if name == "other":
        return max(0.0, _pass_s(c) - sum(st.values()))
    return float(st.get(Stage.DRAFT_GPU.value if name == "draft" else name, 0.0))


def model_prefill_parts(spec, hw, dtype: str, B: int, P: int, slots: list[int], draft=None):
    """The cost model's prefill of B prompts of P tokens (with the draft's own, where given) on hw, by part
    (planner/prefill.py)."""
    from specmoe.planner.cost_model import CostModel
    from specmoe.planner.plan import Placement
    from specmoe.planner.prefill import prefill_parts
    from specmoe.planner.workload import Workload

    wl = Workload(prompt_len=P, gen_len=64, kv_dtype=dtype, weight_dtype=dtype)
    pl = Placement(expert_cache_slots=tuple(slots), draft_kv_gpu_sequences=0, target_kv_gpu_sequences=0)
    return prefill_parts(CostModel(spec, hw, wl, draft), B, pl)


def model_prefill_s(spec, hw, dtype: str, B: int, P: int, slots: list[int]) -> float:
    """The cost model's prefill of B prompts of P tokens (no draft) on hw."""
    return model_prefill_parts(spec, hw, dtype, B, P, slots).total_s


def _r(x: float) -> float:
    return float(f"{x:.4g}")

