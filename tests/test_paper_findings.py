"""The SpecMoEOff paper's qualitative findings, as predicted by our optimizer on the paper's setup.

A30 host (a30-xeon6426y), Mixtral-8x7B, APPS (prompt 566, output 1024), acceptance alpha = 0.8, the
mixtral-8x7b-eagle draft. The paper (Sec. 6, Figs. 10 and 12): decode throughput first rises, then
falls as the draft length grows; speculation gains 1.5x (APPS) over no speculation; more CPU memory
raises throughput clearly, more GPU memory has limited effect.

Two of the findings do NOT hold under the current cost model, and are marked strict xfail (they turn
into failures the day the cost model reproduces them, so the marker gets removed). Investigation
(numbers in the report to the lead):
  * CPU verify attention is costed at the spec's datasheet CPU peak, 2.43 TFLOP/s (Table 1's single
    rate, the fp32 vector rate the verify kernel runs at). At the paper's
    own Table 3 setting (A30, s = 512 + 64, k = 5, about 1900 sequences) the cost model gives 1.43 s
    of CPU attention per iteration against the paper's 3.88 s estimate (4.29 s measured), 2.7x
    less, while H2D agrees (3.61 s against 3.55 s). The paper's kernel computes in fp32 (the spec's
    fp32 peak is 1.2 TFLOP/s) and reaches about 0.9 TFLOP/s by its own numbers.
  * The memory model keeps 85% of host memory usable, so the KV budget gives about 520-575
    sequences rather than the paper's 824.
  With CPU attention that cheap and a batch that small, the iteration stays PCIe-bound up to about
  k = 16 at APPS lengths, so throughput rises monotonically over k <= 8 and the best k gains about
  3.9x over k = 0 (the i.i.d. alpha = 0.8 profile gives acc(8) + 1 = 4.3 tokens per iteration).
"""
from __future__ import annotations

import pytest

from planner.hardware_spec import HardwareSpec
from planner.optimizer import optimize
from planner.workload import Workload, load_acceptance

HW = "a30-xeon6426y"


def _draft() -> str:
    from planner.model_spec import list_presets

    return "mixtral-8x7b-eagle" if "mixtral-8x7b-eagle" in list_presets() else "mistral-7b"


WL = Workload(prompt_len=566, gen_len=1024, acceptance=load_acceptance(0.8))


@pytest.fixture(scope="module")
def base_plan():
    return optimize("mixtral-8x7b", HW, WL, draft=_draft(), alternatives=1)


def _by_k(plan) -> list[float]:
    pts = sorted(plan.frontier["by_k"], key=lambda e: e["draft_len"])
    assert [e["draft_len"] for e in pts] == list(range(9))
    assert all(e["feasible"] for e in pts)
    return [e["decode_tokens_per_s"] for e in pts]


COST_MODEL_GAP = ("cost model: CPU verify attention at the CPU's datasheet peak is ~2.7x cheaper than the paper's "
                  "Table 3 and the usable-memory rule gives ~520-575 sequences instead of 824, so the A30 "
                  "iteration stays PCIe-bound over k <= 8 (see the module docstring and the report)")


@pytest.mark.xfail(strict=True, reason=COST_MODEL_GAP)
def test_throughput_rises_then_falls_with_k(base_plan):
    tps = _by_k(base_plan)
    peak = max(range(len(tps)), key=tps.__getitem__)
    assert 0 < peak < len(tps) - 1, f"no interior peak over k: {[round(x) for x in tps]}"
    assert all(tps[i] <= tps[i + 1] * 1.001 for i in range(peak)), "does not rise up to the peak"
    assert all(tps[i] >= tps[i + 1] * 0.999 for i in range(peak, len(tps) - 1)), "does not fall after the peak"


@pytest.mark.xfail(strict=True, reason=COST_MODEL_GAP)
def test_speculation_gain_is_paper_like(base_plan):
    tps = _by_k(base_plan)
    gain = max(tps) / tps[0]
    assert 1.3 <= gain <= 3.0, f"best k gains {gain:.2f}x over k = 0"


def test_speculation_pays_and_rises_at_first(base_plan):
    """What does hold: speculation pays, and throughput rises from k = 0 over the first draft lengths."""
    tps = _by_k(base_plan)
    assert base_plan.draft_len > 0
    assert tps[0] < tps[1] < tps[2] < tps[3]
    assert max(tps) / tps[0] > 1.3


def test_more_cpu_memory_pays_more_than_gpu_memory(base_plan):
    base = HardwareSpec.preset(HW)
    cpu2 = base.with_overrides(cpu_mem_GiB=2 * base.cpu.mem_bytes / 2 ** 30)
    gpu2 = base.with_overrides(gpu_mem_GiB=2 * base.gpu.mem_bytes / 2 ** 30)
    t0 = base_plan.predicted.decode_tokens_per_s
    t_cpu = optimize("mixtral-8x7b", cpu2, WL, draft=_draft(), alternatives=0).predicted.decode_tokens_per_s
    t_gpu = optimize("mixtral-8x7b", gpu2, WL, draft=_draft(), alternatives=0).predicted.decode_tokens_per_s
    cpu_gain, gpu_gain = t_cpu / t0 - 1.0, t_gpu / t0 - 1.0
    assert t_cpu / t0 >= 1.3, f"doubling CPU memory gives only {t_cpu / t0:.2f}x"
    assert 0.0 <= gpu_gain < 0.5 * cpu_gain, f"GPU doubling +{gpu_gain:.0%} vs CPU doubling +{cpu_gain:.0%}"
