"""The SpecMoEOff paper's own roofline analysis (Sec. 3.3), reproduced with the real memory model
and cost model: Mixtral-8x7B, fp16 weights and KV, APPS (prompt 566, output 1024), A30 host.

- KV per token 2 (K,V) x 32 layers x 8 KV heads x 128 x 2 bytes = 128 KiB; per sequence at
  566 + 1024 tokens 0.194 GiB; with about 160 GiB of DRAM left for KV the batch is
  floor(160 / 0.19409) = 824 (the paper's number).
- MoE GPU utilisation without speculation: the MoE layer is H2D-bound, so utilisation =
  (2 N n_a 3 h h_e / P_gpu) / (E 3 h h_e w_b / B_h2d) = n_a b B_h2d / (E P_gpu) with w_b = 2
  = 2 x 824 x 25e9 / (8 x 165e12) = 3.12% (the paper: 3.13%).
"""
from __future__ import annotations

import pytest

from specmoe.planner.estimator import estimate
from specmoe.planner.hardware_spec import HardwareSpec
from specmoe.planner.memory import footprint, kv_bytes_per_sequence, max_batch
from specmoe.planner.model_spec import ModelSpec
from specmoe.planner.plan import Placement
from specmoe.planner.workload import Workload, load_acceptance

GiB = 2**30


@pytest.fixture(scope="module")
def setup():
    m = ModelSpec.preset("mixtral-8x7b")
    hw = HardwareSpec.preset("a30-xeon6426y")
    wl = Workload(566, 1024, acceptance=load_acceptance(0.8), kv_dtype="fp16", weight_dtype="fp16")
    return m, hw, wl


def test_kv_sizes(setup):
    m, hw, wl = setup
    assert m.kv_bytes_per_token(wl.kv_bytes_per_elem) == 128 * 1024
    assert kv_bytes_per_sequence(m, wl) / GiB == pytest.approx(0.19409, rel=1e-4)


def test_batch_824(setup):
    m, hw, wl = setup
    # the paper's rule with its "about 160 GB left for KV"
    assert max_batch(m, hw, wl, cpu_kv_budget_bytes=160 * GiB) == 824
    # the same through the whole memory model: a host whose usable memory minus the pinned experts
    # (84 GiB in fp16) leaves 160 GiB for KV
    experts = footprint(m, hw, wl, 1, 0, Placement(expert_cache_slots=(0,) * 32)).cpu_breakdown["experts_pinned"]
    assert experts == 84 * GiB
    host = hw.with_overrides(cpu_mem_GiB=(160 * GiB + experts) / hw.cpu.usable_fraction / GiB)
    assert max_batch(m, host, wl) == 824
    # bf16 and fp16 KV are the same size; fp32 KV halves the batch
    assert max_batch(m, host, Workload(566, 1024, kv_dtype="fp32", weight_dtype="fp16")) == 412
    # the A30 host as specified (250 GB, 98% usable as the paper ran it): fewer sequences than the
    # paper's 160 GiB, which with the 84 GiB of experts is more than the host has
    assert hw.cpu.usable_fraction == 0.98
    assert max_batch(m, hw, wl) == int((250e9 * 0.98 - experts) // kv_bytes_per_sequence(m, wl)) == 742


def test_moe_gpu_utilisation_without_speculation(setup):
    m, hw, wl = setup
    formula = m.top_k * 824 * hw.link.h2d_Bps / (m.num_experts * hw.gpu.peak_flops["fp16"])
    assert formula == pytest.approx(0.0312, abs=1e-4)
    host = hw.with_overrides(cpu_mem_GiB=(160 + 84) / hw.cpu.usable_fraction)
    e = estimate(m, host, wl, draft_len=0, batch=824, placement=Placement(expert_cache_slots=(0,) * 32), run=False)
    assert e.batch == 824
    assert e.moe_gpu_utilization == pytest.approx(formula, rel=0.02)
    # the paper's findings: the iteration is H2D-bound, PCIe almost saturated ...
    assert e.bound == "pcie"
    assert e.resource_busy_s["pcie"] / e.iteration_time_s > 0.98
    # ... and with speculation the same bytes serve k+1 tokens per sequence: several times the
    # utilisation (the draft's CPU-side KV takes some of the 160 GiB: batch 780 with k = 4)
    ek = estimate(m, host, wl, draft_len=4, batch=780, placement=Placement(expert_cache_slots=(0,) * 32,
                  draft_kv_gpu_sequences=450), run=False)
    assert ek.moe_gpu_utilization > 3 * e.moe_gpu_utilization
    assert ek.decode_tokens_per_s > 2 * e.decode_tokens_per_s
