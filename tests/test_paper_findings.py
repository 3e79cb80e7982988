"""The SpecMoEOff paper's qualitative findings, as predicted by our optimizer on the paper's setup.

A30 host (a30-xeon6426y), Mixtral-8x7B, APPS (prompt 566, output 1024), acceptance alpha = 0.8, the
mixtral-8x7b-eagle draft. The paper (Sec. 6, Figs. 10 and 12): decode throughput first rises, then
falls as the draft length grows; speculation gains 1.5x (APPS) over no speculation; more CPU memory
raises throughput clearly, more GPU memory has limited effect.

The paper's host is costed at the rates SpecMoEOff itself measured there (hw_specs/a30-xeon6426y.yaml,
`measured:`, fitted to its Table 3 by scripts/derive_paper_profile.py: CPU verify attention at
0.68 TFLOP/s, under a third of the datasheet FMA peak; GPU MoE GEMMs at 61 TFLOP/s; per-sequence draft and
bookkeeping costs). The paper's draft length counts the tokens verified (its Fig. 10: draft length 1 is
no speculation), so its draft length n is our k = n - 1 and with the paper's own memory use (`usable_mem_fraction: 0.98`: its 87 GB of
weights plus 160 GiB of KV fill the 250 GB host). At datasheet peaks and an 85% memory margin the
iteration stays PCIe-bound over k <= 8 and throughput rises monotonically (the test below that pins
this down keeps the two explanations honest).
"""
from __future__ import annotations

import pytest

from specmoe.planner.hardware_spec import HardwareSpec
from specmoe.planner.optimizer import optimize
from specmoe.planner.workload import Workload, load_acceptance

HW = "a30-xeon6426y"


def _draft() -> str:
    from specmoe.planner.model_spec import list_presets

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




# README ("A worked planning example", "Measured results: paper findings"): the plan is batch 777, k = 3 at
# 568.6 tokens/s; its frontier over k at that batch reads 0: 253, 1: 388, 2: 514, 3: 569, then 70, 64, 58,
# 54, 50 (k >= 4 leaves no room for the streaming buffers); the best plan without speculation is batch 819
# at 265 tokens/s, so the best k gains 2.1x.
README_BY_K = [253, 388, 514, 569, 70, 64, 58, 54, 50]


def test_throughput_rises_to_k3_then_falls(base_plan):
    tps = _by_k(base_plan)
    assert (base_plan.batch, base_plan.draft_len) == (777, 3)
    assert base_plan.predicted.decode_tokens_per_s == pytest.approx(568.6, rel=0.01)
    peak = max(range(len(tps)), key=tps.__getitem__)
    assert peak == 3, [round(x) for x in tps]
    assert all(tps[i] < tps[i + 1] for i in range(3)) and all(tps[i] > tps[i + 1] for i in range(3, 8))
    # the rise as printed within 1%; the collapse past k = 3 (CPU-computed cold experts only) within 10%
    assert tps[:4] == pytest.approx(README_BY_K[:4], rel=0.01)
    assert tps[4:] == pytest.approx(README_BY_K[4:], rel=0.10)


def test_speculation_gain_is_the_readme_2_1x(base_plan):
    """The best plan against the best plan without speculation, each at the batch it fits best (as
    the paper's SpecMoEOff-w/o-sd runs at its own batch)."""
    k0 = optimize("mixtral-8x7b", HW, WL, draft=_draft(), k_values=[0], alternatives=0)
    assert k0.batch == 819 and k0.predicted.decode_tokens_per_s == pytest.approx(265, rel=0.01)
    gain = base_plan.predicted.decode_tokens_per_s / k0.predicted.decode_tokens_per_s
    assert 2.05 <= gain < 2.15, f"best k gains {gain:.3f}x over k = 0 (README: 2.1x)"


def test_without_the_paper_profile_the_iteration_stays_pcie_bound():
    """The cause named in the module docstring: at the datasheet CPU peak (no `measured:` block),
    throughput still rises at k = 8, i.e. speculation never stops paying over k <= 8 on this host."""
    import copy

    from specmoe.planner.hardware_spec import parse_hardware

    raw = copy.deepcopy(HardwareSpec.preset(HW).raw)
    raw.pop("measured")
    plan = optimize("mixtral-8x7b", parse_hardware(raw, "a30-datasheet.yaml"), WL, draft=_draft(), alternatives=0)
    tps = _by_k(plan)
    assert tps[8] > tps[7] > tps[6], [round(x) for x in tps]


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
    # the paper gives no number ("clearly higher"); its GPU-memory effect is "limited": under half the CPU's
    assert t_cpu / t0 >= 1.15, f"doubling CPU memory gives only {t_cpu / t0:.2f}x"
    assert 0.0 <= gpu_gain < 0.5 * cpu_gain, f"GPU doubling +{gpu_gain:.0%} vs CPU doubling +{cpu_gain:.0%}"
