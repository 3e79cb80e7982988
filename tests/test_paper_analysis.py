"""The SpecMoEOff paper's own roofline analysis (Sec. 3.3), reproduced with the real memory model
and cost model from the hardware specs alone (no KV budget passed): Mixtral-8x7B, fp16 weights and
KV, APPS (prompt 566, output 1024).

- KV per token 2 (K,V) x 32 layers x 8 KV heads x 128 x 2 bytes = 128 KiB. The paper budgets a
  sequence at 566 + 1024 = 1590 positions (0.19409 GiB) and gets floor(160 / 0.19409) = 824 with
  "about 160 GB" of DRAM left for KV. The paper's sizes are binary (its 87 GB of fp16 weights are
  46.7e9 x 2 B = 87.0 GiB), so its A30 host has 250 GiB; less 84 GiB of pinned experts and the
  6 GiB reserve every host keeps back, 160 GiB are left for KV: the paper's figure.
- The engine's row holds 2 positions more (pending and bonus token: 1592, 0.19434 GiB) and its CPU
  attention stages the largest pass (a prefill pass of 28 prompts = 15,848 tokens at 61,440 bytes
  each, 0.91 GiB), so the A30 spec gives floor((160 GiB - 0.91 GiB) / 0.19434 GiB) = 818 sequences.
- The paper's other host (RTX 4090D, 190 GB): 190 - 84 - 6 = 100 GiB for KV, batch
  floor((100 GiB - 0.91 GiB) / 0.19434 GiB) = 509.
- MoE GPU utilisation without speculation, all experts streamed: the MoE layer is H2D-bound, so
  utilisation = (2 N n_a 3 h h_e / P_gpu) / (E 3 h h_e w_b / B_h2d) = n_a b B_h2d / (E P_gpu) with
  w_b = 2: 2 x 824 x 25e9 / (8 x 165e12) = 3.12% (the paper: 3.13%), 3.10% at b = 818.
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
ROW = 1592 * 128 * 1024                  # the engine's KV row at k = 0
STAGING = 15848 * 61440                  # the CPU attention's staging of a prefill pass
NO_CACHE = Placement(expert_cache_slots=(0,) * 32)


@pytest.fixture(scope="module")
def setup():
    m = ModelSpec.preset("mixtral-8x7b")
    hw = HardwareSpec.preset("a30-xeon6426y")
    wl = Workload(566, 1024, acceptance=load_acceptance(0.8), kv_dtype="fp16", weight_dtype="fp16")
    return m, hw, wl


def test_kv_sizes(setup):
    m, hw, wl = setup
    assert m.kv_bytes_per_token(wl.kv_bytes_per_elem) == 128 * 1024
    assert m.kv_bytes_per_token(wl.kv_bytes_per_elem) * wl.max_context / GiB == pytest.approx(0.19409, rel=1e-4)
    assert kv_bytes_per_sequence(m, wl) == ROW
    assert ROW / GiB == pytest.approx(0.19434, rel=1e-4)


def test_paper_batch_from_the_spec_alone(setup):
    m, hw, wl = setup
    experts = footprint(m, hw, wl, 1, 0, NO_CACHE).cpu_breakdown["experts_pinned"]
    assert experts == 84 * GiB
    # what the A30 spec leaves for KV: the paper's "about 160 GB"
    assert hw.cpu.mem_bytes - hw.cpu.reserve_bytes - experts == 160 * GiB
    assert max_batch(m, hw, wl) == (160 * GiB - STAGING) // ROW == 818
    # the paper's own rule on those 160 GiB: 824 at its 1590 positions, 823 at the engine's 1592
    assert 160 * GiB // (1590 * 128 * 1024) == 824
    assert max_batch(m, hw, wl, cpu_kv_budget_bytes=160 * GiB) == 160 * GiB // ROW == 823
    # bf16 and fp16 KV are the same size; fp32 KV halves the batch
    assert max_batch(m, hw, Workload(566, 1024, kv_dtype="bf16", weight_dtype="fp16")) == 818
    assert max_batch(m, hw, Workload(566, 1024, kv_dtype="fp32", weight_dtype="fp16"),
                     cpu_kv_budget_bytes=160 * GiB) == 160 * GiB // (2 * ROW) == 411


def test_other_paper_host_the_same_way(setup):
    m, _, wl = setup
    hw = HardwareSpec.preset("rtx4090d-xeon5418y")
    assert hw.cpu.mem_bytes - hw.cpu.reserve_bytes - 84 * GiB == 100 * GiB
    assert max_batch(m, hw, wl) == (100 * GiB - STAGING) // ROW == 509


def test_moe_gpu_utilisation_without_speculation(setup):
    m, hw, wl = setup
    formula = m.top_k * 824 * hw.link.h2d_Bps / (m.num_experts * hw.gpu.peak_flops["fp16"])
    assert formula == pytest.approx(0.0312, abs=1e-4)
    host = hw.with_overrides(cpu_mem_GiB=252)        # room for 824 rows of 1592 positions and the staging
    e = estimate(m, host, wl, draft_len=0, batch=824, placement=NO_CACHE, run=False)
    assert e.batch == 824
    assert e.moe_gpu_utilization == pytest.approx(formula, rel=0.02)
    # the paper's findings: the iteration is H2D-bound, PCIe almost saturated ...
    assert e.bound == "pcie"
    assert e.resource_busy_s["pcie"] / e.iteration_time_s > 0.98
    # ... and with speculation the same bytes serve k+1 tokens per sequence: several times the
    # utilisation (the draft's CPU-side KV takes some of the CPU memory: batch 780 with k = 4)
    ek = estimate(m, host, wl, draft_len=4, batch=780, placement=Placement(expert_cache_slots=(0,) * 32,
                  draft_kv_gpu_sequences=440), run=False)
    assert ek.moe_gpu_utilization > 3 * e.moe_gpu_utilization
    assert ek.decode_tokens_per_s > 2 * e.decode_tokens_per_s


def test_estimate_at_the_most_that_fits(setup):
    """`specmoe estimate ... --batch max --draft-len 0` on the A30 spec: the paper's batch (818 here,
    see the module docstring) and its MoE GPU utilisation, 3.1% (a layer's expert compute at peak over
    streaming its experts), whatever is cached. The utilisation achieved over the iteration is that
    too when every expert streams; the default placement caches the experts the GPU has room for (38
    of 256), which shortens the H2D-bound iteration by that share: 3.1% x 256 / 218 achieved."""
    m, hw, _ = setup
    wl = Workload(566, 1024, acceptance=load_acceptance(0.0))
    formula = 2 * 818 * 25e9 / (8 * 165e12)
    assert formula == pytest.approx(0.0310, abs=1e-4)
    streamed = estimate(m, hw, wl, draft_len=0, batch="max", placement=NO_CACHE, run=False, timeline=False)
    assert streamed.batch == 818 and streamed.bound == "pcie"
    assert streamed.moe_gpu_utilization == pytest.approx(formula, rel=1e-9)
    assert streamed.moe_gpu_utilization_achieved == pytest.approx(formula, rel=0.02)
    e = estimate(m, hw, wl, draft_len=0, batch="max", run=False, timeline=False)
    cached = sum(e.placement.expert_cache_slots)
    assert e.batch == 818 and cached == 38
    assert e.moe_gpu_utilization == pytest.approx(formula, rel=1e-9)
    assert e.moe_gpu_utilization_achieved == pytest.approx(formula * 256 / (256 - cached), rel=0.03)
