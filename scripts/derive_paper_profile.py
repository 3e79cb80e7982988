"""Derive the `measured:` block of hw_specs/a30-xeon6426y.yaml from SpecMoEOff's own profile of
that host (arXiv 2508.21706, Table 3), so the cost model of the paper's host runs at the rates the
paper measured there rather than at datasheet peaks, and print how the rest of Table 3 compares
with what the cost model then predicts.

Table 3 (Mixtral-8x7B, input 512, output 128, "k = 5", two micro-batches; seconds per iteration,
measured): target model 4.39, CPU attention 4.29, GPU MoE 3.53, HtoD 3.70, draft model 0.56, draft
GPU part 0.42, draft CPU part 0.54, others 0.097, iteration 5.05.

The paper's draft length counts the tokens verified per sequence, not the tokens drafted: its Fig. 10
says draft length 1 means no speculation (one token verified, none drafted), and the system is built
on SGLang, whose speculative "draft tokens" include the one token decoding would produce anyway. So
Table 3's k = 5 verifies 5 tokens per sequence: our draft_len (tokens drafted) is 4.

The batch is not printed; the paper's rule is "the most that fits CPU memory", so the batch here is
the memory model's maximum at that workload. The schedule is the paper's (Fig. 5): each micro-batch
runs pre-attention, CPU attention, post-attention and its MoE; layer i+1's experts stream while
layer i computes; the draft runs after the target.

Four numbers are fitted, each to one measured stage time, in this order:
  cpu_attention_TFLOPs     = fp32 peak x (our CPU attention time at peak) / 4.29 s
  gpu_gemm_TFLOPs_by_M     = bf16 peak x (our GPU MoE time at peak) / 3.53 s, keyed by the tokens per
                             expert of one micro-batch's GEMM (a one-point curve is a constant)
  verify.accept.sequence   = (0.097 s - our verify.accept time) / batch      ("others": bookkeeping
                             per sequence after verification, which the paper says grows with b)
  draft.sequence           = per draft step and sequence, solved (bisection) so that the simulated
                             draft phase takes the measured 0.56 s
The other five measured times (target model, HtoD, the two draft parts, the iteration) are not
fitted: the cost model predicts them, and the script prints prediction against measurement.

    python scripts/derive_paper_profile.py            # print the block and the predictions
    python scripts/derive_paper_profile.py --check    # exit 1 if the committed spec differs by >1%
"""
from __future__ import annotations

import argparse
import copy
import sys

from specmoe.planner.estimator import Estimate, estimate
from specmoe.planner.hardware_spec import HardwareSpec, parse_hardware
from specmoe.planner.model_spec import load_model
from specmoe.planner.workload import Workload, load_acceptance

SPEC = "a30-xeon6426y"
PAPER_K = 5                                 # Table 3's draft length: tokens verified per sequence
DRAFT_LEN = PAPER_K - 1                     # tokens drafted per sequence (our draft_len)
MICRO_BATCHES = 2
WL = Workload(prompt_len=512, gen_len=128, acceptance=load_acceptance(0.8))
FITTED_S = {"target.attention": 4.29, "target.moe": 3.53, "others": 0.097, "draft": 0.56}
PREDICTED_S = {"target": 4.39, "target.h2d": 3.70, "draft.gpu": 0.42, "draft.cpu": 0.54, "iteration": 5.05}


def _run(raw: dict) -> Estimate:
    hw = parse_hardware(raw, f"{SPEC}.yaml")
    return estimate("mixtral-8x7b", hw, WL, draft="mixtral-8x7b-eagle", draft_len=DRAFT_LEN,
                    micro_batches=MICRO_BATCHES, overlap_draft=False, prefetch=False, batched_moe=False,
                    batched_layer=False, timeline=True, run=False)


def _wall_s(e: Estimate, prefix: str) -> float:
    """Seconds from the first start to the last end of the iteration's events whose stage starts with prefix."""
    ev = [t for t in e.timeline if t["stage"].startswith(prefix)]
    return max(t["end_s"] for t in ev) - min(t["start_s"] for t in ev) if ev else 0.0


def table3_view(e: Estimate) -> dict[str, float]:
    """The simulated iteration in Table 3's rows (phases as wall times, stages as busy times)."""
    return {"target": _wall_s(e, "target."), "target.attention": e.stages["target.attention"],
            "target.moe": e.stages["target.moe"], "target.h2d": e.stages["target.h2d"], "draft": _wall_s(e, "draft."),
            "draft.gpu": _wall_s(e, "draft.gpu"), "draft.cpu": _wall_s(e, "draft.cpu"),
            "others": e.stages["verify.accept"], "iteration": e.iteration_time_s}


def derive() -> dict:
    base = copy.deepcopy(HardwareSpec.preset(SPEC).raw)
    base.pop("measured", None)
    e = _run(base)
    B, st = e.batch, e.stages
    peak_cpu = float(base["cpu"]["peak_TFLOPs"]["fp32"])
    peak_gpu = float(base["gpu"]["peak_TFLOPs"]["bf16"])
    m = load_model("mixtral-8x7b")
    M = round(B / MICRO_BATCHES * (DRAFT_LEN + 1) * m.top_k / m.num_experts)   # tokens per expert, one micro-batch
    out = {
        "cpu_attention_TFLOPs": round(peak_cpu * st["target.attention"] / FITTED_S["target.attention"], 3),
        "gpu_gemm_TFLOPs_by_M": {M: round(peak_gpu * st["target.moe"] / FITTED_S["target.moe"], 1)},
    }
    raw = copy.deepcopy(base)
    raw["measured"] = {"source": "derive_paper_profile.py", **out, "stage_overhead_us": {}}
    e = _run(raw)
    ver_us = max(0.0, (FITTED_S["others"] - e.stages["verify.accept"]) / e.batch * 1e6)

    def draft_phase(draft_us: float) -> float:
        raw["measured"]["stage_overhead_us"] = {"draft.sequence": draft_us, "verify.accept.sequence": ver_us}
        return _wall_s(_run(raw), "draft.")

    lo, hi = 0.0, 1000.0
    if draft_phase(lo) >= FITTED_S["draft"]:
        hi = 0.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if draft_phase(mid) < FITTED_S["draft"] else (lo, mid)
    out["stage_overhead_us"] = {"draft.sequence": round(hi, 1), "verify.accept.sequence": round(ver_us, 1)}
    raw["measured"]["stage_overhead_us"] = out["stage_overhead_us"]
    out["batch"] = B
    out["table3"] = table3_view(_run(raw))
    return out


def _print(d: dict) -> None:
    print(f"batch {d['batch']} (the most that fits at input 512, output 128); draft_len {DRAFT_LEN} "
          f"(Table 3's k = {PAPER_K} tokens verified per sequence)")
    print(f"  cpu_attention_TFLOPs: {d['cpu_attention_TFLOPs']}")
    (M, g), = d["gpu_gemm_TFLOPs_by_M"].items()
    print(f"  gpu_gemm_TFLOPs_by_M: {{{M}: {g}}}")
    so = d["stage_overhead_us"]
    print(f"  stage_overhead_us: {{draft.sequence: {so['draft.sequence']}, "
          f"verify.accept.sequence: {so['verify.accept.sequence']}}}")
    print("Table 3 row          measured  model    error   ")
    for rows, what in ((FITTED_S, "fitted"), (PREDICTED_S, "predicted")):
        for k, want in rows.items():
            got = d["table3"][k]
            print(f"  {k:18s} {want:7.3f} s {got:7.3f} s {got / want - 1:+6.1%}  {what}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the committed spec; exit 1 on a >1%% difference")
    a = ap.parse_args()
    d = derive()
    _print(d)
    if not a.check:
        return 0
    m = HardwareSpec.preset(SPEC).raw.get("measured") or {}
    so = d["stage_overhead_us"]
    (_, g), = d["gpu_gemm_TFLOPs_by_M"].items()
    have = {"cpu_attention_TFLOPs": m.get("cpu_attention_TFLOPs"),
            "gpu_gemm": next(iter((m.get("gpu_gemm_TFLOPs_by_M") or {0: None}).values())),
            **{k: (m.get("stage_overhead_us") or {}).get(k) for k in so}}
    want = {"cpu_attention_TFLOPs": d["cpu_attention_TFLOPs"], "gpu_gemm": g, **so}
    bad = [k for k in want if have[k] is None or abs(have[k] - want[k]) > 0.01 * abs(want[k]) + 1e-9]
    for k in bad:
        print(f"MISMATCH {k}: spec has {have[k]}, Table 3 gives {want[k]}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
