"""The end of a run: the headline figures (the accelerate figure, spec_alpha0.8's H2D and iteration error,
predicted vs measured per stage), the printed table, goals and summary line, and the JSON file."""
from __future__ import annotations

import json
from pathlib import Path

from .common import ACCEL_REF, GOALS, H2D_REF_GBps, ORACLE, WARMUP_ITERATIONS, Log, fmt


def headline_figures(res: dict, args) -> None:
    """Fill res with the accelerate figure (this run's when it ran, else the reference scaled to the
    slice's layers), spec_alpha0.8's H2D and iteration error, and its predicted vs measured stages
    (measured from the per-stage-synchronised rerun where it ran)."""
    a = res.get("accelerate_run") or {}
    cfgL = (res.get("config") or {}).get("layers", args.layers)
    if a.get("status") == "ok":
        res["accelerate"] = dict(a, label=f"measured in this run (batch {a['batch']})")
    else:
        scale = ACCEL_REF["layers"] / cfgL
        res["accelerate"] = dict(ACCEL_REF, tokens_per_s=ACCEL_REF["tokens_per_s"] * scale,
                                 label="reference (measured earlier, not re-run)"
                                 + (f", scaled by 8/{cfgL} layers" if cfgL != 8 else "")
                                 + (f"; run attempted: {a.get('status')}" if a else ""))
    res["tokens_per_s"]["accelerate"] = res["accelerate"]["tokens_per_s"]
    m08 = res["modes"].get("spec_alpha0.8") or {}
    prof = res["modes"].get("spec_alpha0.8_profiled") or {}
    if "tokens_per_s" in m08:
        res["h2d_GBps_achieved"] = m08.get("h2d_GBps")
        res["h2d_busy_fraction"] = m08.get("h2d_busy_fraction")
        res["iteration_error_pct"] = m08.get("iteration_error_pct")
        meas = prof.get("stages_measured_s") if "stages_measured_s" in prof else m08.get("stages_measured_s", {})
        res["per_stage_source"] = ("the per-stage-synchronised rerun" if "stages_measured_s" in prof else
                                   "the unsynchronised run (GPU stages measure launch only)")
        pred = m08.get("stages_predicted_s", {})
        pvm = {}
        for s in list(pred) or list(meas):
            if s in ("iteration", "prefill"):
                continue
            pvm[s] = {"predicted": pred.get(s), "measured": meas.get(s)}
        pvm["iteration"] = {"predicted": m08.get("predicted_iteration_s"), "measured": m08.get("iteration_s")}
        pvm["prefill"] = {"predicted": pred.get("prefill"), "measured": m08.get("prefill_s")}
        res["predicted_vs_measured"] = pvm


def report(res: dict, log: Log) -> str:
    """Print the table, ratios and goals; fill res['goals'] etc.; return the last line."""
    modes = res["modes"]
    tps = res["tokens_per_s"]
    log("")
    log(f"decode, {res['config']['layers']}-layer Mixtral-8x7B slice, prompt {res['config']['prompt_len']}, "
        f"{res['config']['iterations']} decode iterations per mode (tok/s and iter ms over those after the first "
        f"{WARMUP_ITERATIONS}); speculative rows are {ORACLE} (seeded Bernoulli acceptance)")
    hdr = (f"{'mode':38s} {'B':>5s} {'k':>2s} {'m':>2s} {'cache':>6s} {'it':>3s} {'tok/s':>9s} {'iter ms':>8s} "
           f"{'pred ms':>8s} {'err%':>6s} {'H2D GB/s':>8s} {'busy':>5s} {'prefill s':>9s}  status")
    log(hdr)
    log("-" * len(hdr))
    for name, d in modes.items():
        label = name + (f" [{ORACLE}]" if d.get("oracle") else "") + (" [k>=1 forced]" if d.get("forced_k") else "")
        if "tokens_per_s" not in d:
            log(f"{label:38s} {'':>5s} {'':>2s} {'':>2s} {'':>6s} {'':>3s} {'':>9s} {'':>8s} {'':>8s} {'':>6s} "
                f"{'':>8s} {'':>5s} {'':>9s}  {d.get('status')}")
            continue
        log(f"{label:38s} {d['batch']:5d} {d['draft_len']:2d} {d['micro_batches']:2d} "
            f"{d['cached_expert_fraction']:6.1%} {d['iterations']:3d} {d['tokens_per_s']:9.1f} "
            f"{d['iteration_s'] * 1e3:8.1f} {fmt((d.get('predicted_iteration_s') or 0) * 1e3 or None):>8s} "
            f"{fmt(d.get('iteration_error_pct'), '+.1f'):>6s} {fmt(d.get('h2d_GBps')):>8s} "
            f"{fmt((d.get('h2d_busy_fraction') or 0) * 100, '.0f') + '%':>5s} {d['prefill_s']:9.1f}  {d['status']}")
    acc = res["accelerate"]
    log(f"{'accelerate':38s} {acc.get('batch', ''):>5} {'':>2s} {'':>2s} {'':>6s} {'':>3s} "
        f"{fmt(tps.get('accelerate')):>9s} {fmt((acc.get('step_s') or 0) * 1e3 or None):>8s}  {acc['label']}")
    log(f"H2D reference: {H2D_REF_GBps:g} GB/s pinned (measured on the H200 host). H2D GB/s = decode-phase bytes "
        f"copied / copy-stream busy time (CUDA events around each copy batch); busy = that time / decode wall time")
    streams = sorted({f"{d.get('expert_streaming')} (host_io {d.get('host_io')})" for d in modes.values()
                      if "expert_streaming" in d})
    if streams:
        log(f"expert streaming: {', '.join(streams)} (next = layer i+1's non-resident experts stream while layer i "
            f"computes, layer 0's during the draft phase; off = after routing)")
    for name, d in modes.items():
        if d.get("forced_k"):
            log(f"{name}: {d.get('note')}")
    pvm = res.get("predicted_vs_measured") or {}
    if pvm:
        log("")
        log(f"predicted vs measured, spec_alpha0.8 [{ORACLE}] (ms per decode iteration; prefill: s total; measured "
            f"per stage: {res.get('per_stage_source')})")
        for s, v in pvm.items():
            scale, unit = (1.0, "s") if s == "prefill" else (1e3, "ms")
            p, m = v.get("predicted"), v.get("measured")
            err = (p - m) / m * 100 if (p is not None and m) else None
            log(f"  {s:18s} predicted {fmt(p * scale if p is not None else None, '10.2f')} {unit:2s}  measured "
                f"{fmt(m * scale if m is not None else None, '10.2f')} {unit:2s}  {fmt(err, '+.0f')}%")
    s08, k0, ac = tps.get("spec_alpha0.8"), tps.get("k0"), tps.get("accelerate")
    r_k0 = s08 / k0 if (s08 and k0) else None
    r_ac = s08 / ac if (s08 and ac) else None
    busy = res.get("h2d_busy_fraction")
    err = res.get("iteration_error_pct")
    vals = {"spec0.8_over_k0": r_k0, "spec0.8_over_accelerate": r_ac, "h2d_busy_fraction": busy,
            "iteration_error_pct": abs(err) if err is not None else None}
    goals = {}
    for g, target in GOALS.items():
        v = vals[g]
        ok = None if v is None else (v <= target if g == "iteration_error_pct" else v >= target)
        goals[g] = {"target": (f"<= {target}" if g == "iteration_error_pct" else f">= {target}"), "value": v,
                    "result": "N/A" if ok is None else ("PASS" if ok else "MISS")}
    res["goals"] = goals
    res["ratios"] = {"spec0.8_over_k0": r_k0, "spec0.8_over_accelerate": r_ac,
                     "spec0.6_over_k0": (tps.get("spec_alpha0.6") / k0) if (tps.get("spec_alpha0.6") and k0) else None}
    log("")
    log(f"goals ({ORACLE} speculation; {'CPU SMOKE: tiny model, not the H200' if res['config']['smoke'] else 'H200 host'}):")
    for g, v in goals.items():
        log(f"  {g:26s} {v['target']:>8s}  value {fmt(v['value'], '.3f'):>8s}  {v['result']}")
    log(f"accelerate figure: {acc['label']}")
    return (f"gpu-offload: speculation {fmt(r_k0, '.2f')}x over k=0, {fmt(r_ac, '.1f')}x over accelerate, "
            f"H2D {fmt(busy * 100 if busy is not None else None, '.0f')}% busy, "
            f"iteration error {fmt(abs(err) if err is not None else None, '.1f')}%")


def write_json(res: dict, out: Path, elapsed_s: float) -> None:
    from specmoe.planner.atomic_file import atomic_write_text

    res["elapsed_s"] = elapsed_s
    atomic_write_text(out / "gpu_offload.json", json.dumps(res, indent=1, default=str))
