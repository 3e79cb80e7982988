"""The job record (JSON): the per-worker run records merged, predicted against measured per worker
and for the whole job.

Per worker, over the batches whose rows were written (a batch lost with a worker, or run twice,
counts once, under `retried`): sums of tokens and times, the acceptance histograms added (so its
mean accepted drafts is the mean over all its verified sequences), decode tokens/s = decode tokens /
decode seconds, busy tokens/s = generated tokens / the seconds its engine ran; against the plan's
predicted decode tokens/s and the fleet plan's per-host job rate."""
from __future__ import annotations

import json

SUMMED = ("finished_sequences", "generated_tokens", "decode_tokens", "prompt_tokens", "prefill_time_s",
          "decode_time_s", "total_time_s", "iterations", "token_flips")


def merge_worker(records: list[dict]) -> dict:
    """One worker's batches merged."""
    out = {k: sum(r.get(k) or 0 for r in records) for k in SUMMED}
    hist: dict[str, int] = {}
    for r in records:
        for a, n in (r.get("acceptance_histogram") or {}).items():
            hist[a] = hist.get(a, 0) + int(n)
    verified = sum(hist.values())
    out["batches"] = len(records)
    out["acceptance_histogram"] = dict(sorted(hist.items(), key=lambda kv: int(kv[0])))
    out["mean_accepted"] = sum(int(a) * n for a, n in hist.items()) / verified if verified else 0.0
    out["decode_tokens_per_s"] = out["decode_tokens"] / out["decode_time_s"] if out["decode_time_s"] else 0.0
    out["busy_tokens_per_s"] = out["generated_tokens"] / out["total_time_s"] if out["total_time_s"] else 0.0
    warnings = sorted({w for r in records for w in (r.get("calibration_warnings") or [])})
    if warnings:
        out["calibration_warnings"] = warnings
    return out


def job_record(*, complete: bool, workers: dict, records: dict, written_batches: set[str], prediction: dict,
               summary: dict, error: str | None = None) -> dict:
    """workers: the board's {id: info}; records: {batch id: record}; summary: the driver's counts
    (prompts, written, wall_s, generated_tokens, ...); prediction: the fleet plan's to_dict()."""
    kept = {b: r for b, r in records.items() if b in written_batches}
    per_worker = {}
    host = (prediction.get("kinds") or [{}])[0]
    for w, info in sorted(workers.items()):
        mine = [r for r in kept.values() if r.get("worker") == w]
        per_worker[w] = {**info, **merge_worker(mine),
                         "predicted_job_tokens_per_s": host.get("tokens_per_s"),
                         "predicted_steady_tokens_per_s": host.get("steady_tokens_per_s")}
    every = merge_worker(list(kept.values()))
    measured = summary.get("tokens_per_s") or 0.0
    predicted = prediction.get("tokens_per_s") or 0.0
    return {"complete": complete, "error": error, **summary,
            "mean_accepted": every["mean_accepted"], "acceptance_histogram": every["acceptance_histogram"],
            "decode_tokens_per_s": every["decode_tokens_per_s"],
            "predicted": prediction, "measured_over_predicted": measured / predicted if predicted else None,
            "retried": len(records) - len(kept), "workers": per_worker}


def to_json(record: dict) -> str:
    return json.dumps(record, indent=1, default=str)
