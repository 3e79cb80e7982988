"""Memory model: footprints by hand, the default placement fits and is maximal, max_batch is the
largest batch that fits, and what cannot fit says why."""
from __future__ import annotations

import pytest

from specmoe.planner.errors import InfeasibleError
from specmoe.planner.hardware_spec import HardwareSpec
from specmoe.planner.memory import (GPU_MEM_FRACTION, activation_bytes, default_placement, footprint,
                            kv_bytes_per_sequence, max_batch)
from specmoe.planner.model_spec import ModelSpec
from specmoe.planner.plan import Placement
from specmoe.planner.workload import Workload, load_acceptance

GiB = 2**30
EXPERT = 3 * 4096 * 14336 * 2          # one Mixtral expert in bf16: 352,321,536 bytes


@pytest.fixture(scope="module")
def mix():
    return (ModelSpec.preset("mixtral-8x7b"), ModelSpec.preset("mixtral-8x7b-eagle"),
            HardwareSpec.preset("a30-xeon6426y"), Workload(566, 1024, acceptance=load_acceptance(0.8)))


def test_footprint_by_hand(mix):
    m, d, hw, wl = mix
    pl = Placement(expert_cache_slots=(2,) * 16 + (1,) * 16, draft_kv_gpu_sequences=40, target_kv_gpu_sequences=3)
    fp = footprint(m, hw, wl, 100, 4, pl, d, micro_batches=2)
    g, c = fp.gpu_breakdown, fp.cpu_breakdown
    assert g["expert_cache"] == 48 * EXPERT
    assert g["streaming_buffers"] == 2 * 7 * EXPERT                   # two layers of the 7 uncached experts
    assert g["draft_weights"] == d.total_params * 2
    assert g["target_non_expert_weights"] == m.non_expert_elems * 2
    assert g["draft_kv"] == 40 * 1590 * 16 * 1024                       # 16 KiB per token
    assert g["target_kv"] == 3 * 1590 * 128 * 1024
    assert g["activations"] == activation_bytes(m, 100, 4, 2, d)
    assert c["experts_pinned"] == 32 * 8 * EXPERT
    assert c["target_kv"] == 97 * 1590 * 128 * 1024
    assert c["draft_kv"] == 60 * 1590 * 16 * 1024
    assert fp.gpu_bytes == sum(g.values()) and fp.cpu_bytes == sum(c.values())
    assert fp.gpu_usable_bytes == 24 * GiB * GPU_MEM_FRACTION
    assert fp.cpu_usable_bytes == 250e9 * 0.98       # the A30 spec's usable_mem_fraction
    # without speculation the draft takes nothing
    fp0 = footprint(m, hw, wl, 100, 0, pl, d)
    assert fp0.gpu_breakdown["draft_weights"] == fp0.gpu_breakdown["draft_kv"] == fp0.cpu_breakdown["draft_kv"] == 0
    # fully cached layers need no streaming buffer
    full = footprint(m, hw, wl, 10, 0, Placement(expert_cache_slots=(8,) * 32))
    assert full.gpu_breakdown["streaming_buffers"] == 0


def test_activations_grow():
    m = ModelSpec.preset("mixtral-8x7b")
    assert activation_bytes(m, 200, 0, 2) < activation_bytes(m, 400, 0, 2) < activation_bytes(m, 400, 4, 2)
    assert activation_bytes(m, 400, 4, 4) < activation_bytes(m, 400, 4, 2)


@pytest.mark.parametrize("target,draft,hw", [
    ("mixtral-8x7b", "mixtral-8x7b-eagle", "a30-xeon6426y"), ("qwen3-30b-a3b", "qwen3-0.6b", "h200-host"),
    ("mixtral-8x22b", "mixtral-8x22b-eagle", "h200-host:512"), ("deepseek-v2-lite", "deepseek-v2-lite-eagle", "t4-host"),
])
def test_max_batch_and_default_placement_are_maximal(target, draft, hw):
    hw, _, cpu_gib = hw.partition(":")
    m, d, h = ModelSpec.preset(target), ModelSpec.preset(draft), HardwareSpec.preset(hw)
    if cpu_gib:
        h = h.with_overrides(cpu_mem_GiB=float(cpu_gib))
    wl = Workload(566, 1024, acceptance=load_acceptance(0.8))
    for k in (0, 4):
        b = max_batch(m, h, wl, d, k, 2)
        pl = default_placement(m, h, wl, b, k, d, 2)
        assert footprint(m, h, wl, b, k, pl, d, 2).fits
        pl1 = default_placement(m, h, wl, b + 1, k, d, 2)
        assert not footprint(m, h, wl, b + 1, k, pl1, d, 2).fits
        if k:
            assert pl.draft_kv_gpu_sequences > 0
            more = Placement(expert_cache_slots=pl.expert_cache_slots,
                             draft_kv_gpu_sequences=pl.draft_kv_gpu_sequences + 1)
            assert pl.draft_kv_gpu_sequences == b or not footprint(m, h, wl, b, k, more, d, 2).fits_gpu
        # one more cache slot on the least-cached MoE layer does not fit (unless all are cached)
        slots = list(pl.expert_cache_slots)
        i = min(m.moe_layers, key=lambda j: slots[j])
        if slots[i] < m.num_experts:
            slots[i] += 1
            bigger = Placement(expert_cache_slots=tuple(slots), draft_kv_gpu_sequences=pl.draft_kv_gpu_sequences)
            assert not footprint(m, h, wl, b, k, bigger, d, 2).fits_gpu


def test_max_batch_monotone_in_memory(mix):
    m, d, hw, wl = mix
    prev = 0
    for gib in (150, 200, 300, 500):
        b = max_batch(m, hw.with_overrides(cpu_mem_GiB=gib), wl)
        assert b > prev
        prev = b
    # the paper's rule: (usable CPU memory - pinned experts) / KV per sequence at the longest context
    h = hw.with_overrides(cpu_mem_GiB=300)
    want = int((300 * GiB * h.cpu.usable_fraction - 32 * 8 * EXPERT) // kv_bytes_per_sequence(m, wl))
    assert max_batch(m, h, wl) == want


def test_infeasible_messages(mix):
    m, d, hw, wl = mix
    with pytest.raises(InfeasibleError) as ei:
        max_batch(m, hw.with_overrides(cpu_mem_GiB=64), wl)
    msg = str(ei.value)
    assert msg.startswith("cpu memory") and "experts_pinned 84.00 GiB" in msg and "usable" in msg
    assert "--cpu-mem-GiB" in msg
    with pytest.raises(InfeasibleError) as ei:
        max_batch(m, hw.with_overrides(gpu_mem_GiB=4), wl)
    msg = str(ei.value)
    assert msg.startswith("gpu memory") and "streaming_buffers" in msg and "--gpu-mem-GiB" in msg
    big = ModelSpec.preset("mixtral-8x22b")
    with pytest.raises(InfeasibleError, match="pinned experts alone exceed it"):
        max_batch(big, HardwareSpec.preset("h200-host"), wl)
    fp = footprint(m, hw, wl, 5000, 0, Placement(expert_cache_slots=(0,) * 32))
    with pytest.raises(InfeasibleError, match="use --batch 586 or less"):
        fp.check(batch=5000, max_fit=586)
