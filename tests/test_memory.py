"""Memory model: footprints by hand, the default placement fits and is maximal, max_batch is the
largest batch that fits, and what cannot fit says why."""
from __future__ import annotations

import pytest

from specmoe.planner.errors import InfeasibleError
from specmoe.planner.hardware_spec import HardwareSpec
from specmoe.planner.memory import (activation_bytes, default_placement, footprint, host_staging_bytes,
                                    kv_bytes_per_sequence, max_batch, shares_target_embeddings)
from specmoe.planner.model_spec import ModelSpec
from specmoe.planner.plan import Placement
from specmoe.planner.workload import Workload, load_acceptance

GiB = 2**30
EXPERT = 3 * 4096 * 14336 * 2          # one Mixtral expert in bf16: 352,321,536 bytes
# the engine's CPU attention staging for Mixtral per token of a pass: q (32 x 128) and k, v (2 x 8 x 128)
# in bf16, then the queries and output in fp32 and the output twice more in bf16
STAGING_PER_TOKEN = (4096 + 2048) * 2 + 4096 * (4 + 4 + 2 + 2)      # 61,440 bytes
PREFILL_TOKENS = (16384 // 566) * 566                                # 28 whole prompts of 566: 15,848


@pytest.fixture(scope="module")
def mix():
    return (ModelSpec.preset("mixtral-8x7b"), ModelSpec.preset("mixtral-8x7b-eagle"),
            HardwareSpec.preset("a30-xeon6426y"), Workload(566, 1024, acceptance=load_acceptance(0.8)))


def test_footprint_by_hand(mix):
    m, d, hw, wl = mix
    pl = Placement(expert_cache_slots=(2,) * 16 + (1,) * 16, draft_kv_gpu_sequences=40, target_kv_gpu_sequences=3)
    fp = footprint(m, hw, wl, 100, 4, pl, d, micro_batches=2)
    g, c = fp.gpu_breakdown, fp.cpu_breakdown
    rows = 566 + 1024 + 4 + 2                       # KV positions the engine's row holds at k = 4
    assert g["expert_cache"] == 48 * EXPERT
    assert g["streaming_buffers"] == 2 * 7 * EXPERT                   # two layers of the 7 uncached experts
    # the EAGLE head's own weights: one layer (q, k, v, o of 4096 x 4096; a 14336 SwiGLU; two norms) and
    # its final norm; its embedding and LM head are the target's, counted there
    assert g["draft_weights"] == (4 * 4096 * 4096 + 3 * 4096 * 14336 + 3 * 4096) * 2
    assert g["target_non_expert_weights"] == m.non_expert_elems * 2
    assert g["draft_kv"] == 40 * rows * 16 * 1024                       # 16 KiB per token
    assert g["target_kv"] == 3 * rows * 128 * 1024
    assert c["experts_pinned"] == 32 * 8 * EXPERT
    assert c["target_kv"] == 97 * rows * 128 * 1024
    assert c["draft_kv"] == 60 * rows * 16 * 1024
    assert c["attention_staging"] == PREFILL_TOKENS * STAGING_PER_TOKEN   # the prefill pass is the larger
    assert fp.gpu_bytes == sum(g.values()) and fp.cpu_bytes == sum(c.values())
    # one reserve rule: 2 GiB of the GPU's 24, 6 GiB of the host's 250
    assert fp.gpu_usable_bytes == 22 * GiB and fp.cpu_usable_bytes == 244 * GiB
    # without speculation the draft takes nothing
    fp0 = footprint(m, hw, wl, 100, 0, pl, d)
    assert fp0.gpu_breakdown["draft_weights"] == fp0.gpu_breakdown["draft_kv"] == fp0.cpu_breakdown["draft_kv"] == 0
    # fully cached layers need no streaming buffer
    full = footprint(m, hw, wl, 10, 0, Placement(expert_cache_slots=(8,) * 32))
    assert full.gpu_breakdown["streaming_buffers"] == 0
    # batch 0: only what does not depend on the prompts (the engine's loaded weights)
    fpw = footprint(m, hw, wl, 0, 4, pl, d, context=0)
    assert fpw.gpu_breakdown["activations"] == fpw.cpu_breakdown["attention_staging"] == 0


def test_draft_embeddings_counted_once():
    """An EAGLE-style head (one layer of the target's width and vocabulary) reads the target's embedding
    and LM head; a separate small model brings its own."""
    for target, draft, shared in (("mixtral-8x7b", "mixtral-8x7b-eagle", True), ("dbrx", "dbrx-eagle", True),
                                  ("qwen3-30b-a3b", "qwen3-0.6b", False), ("olmoe-1b-7b", "olmo-1b", False)):
        assert shares_target_embeddings(ModelSpec.preset(target), ModelSpec.preset(draft)) is shared, draft
    m, d = ModelSpec.preset("mixtral-8x7b"), ModelSpec.preset("mixtral-8x7b-eagle")
    hw, wl = HardwareSpec.preset("h200-host"), Workload(566, 1024)
    pl = Placement(expert_cache_slots=(0,) * 32)
    with_draft = footprint(m, hw, wl, 1, 1, pl, d).gpu_breakdown["draft_weights"]
    assert d.total_params * 2 - with_draft == 2 * 32000 * 4096 * 2          # 0.49 GiB no longer counted twice


def test_logits_of_all_verified_tokens_are_counted(mix):
    """The engine's LM head turns the hidden states of all B(k+1) verified tokens into logits at once,
    in bf16 and then fp32: at the A30 plan's batch 709, k = 6 that alone is 0.89 GiB (0.59 of it fp32)."""
    m, d, hw, wl = mix
    n = 709 * 7
    logits = n * 32000 * (2 + 4)
    assert logits / GiB == pytest.approx(0.888, abs=1e-3)
    act = activation_bytes(m, wl, 709, 6, d)
    assert act >= logits + 2 * n * 4096 * 2          # plus the residual stream and its normed copy
    # the largest pass there is the draft's prefill (28 prompts of 566 through a 14336-wide FFN:
    # 15,848 x 3 x 14336 bf16 intermediates alone are 1.27 GiB), which does not grow with B or k ...
    assert act == activation_bytes(m, wl, 709, 8, d) == activation_bytes(m, wl, 300, 2, d)
    assert act >= 15848 * 3 * 14336 * 2
    assert activation_bytes(m, wl, 28, 0, None) == activation_bytes(m, wl, 700, 0, None)
    # ... while the verify pass grows with B(k+1) and is the largest at batch 2000
    assert activation_bytes(m, wl, 2000, 8, d) > activation_bytes(m, wl, 2000, 6, d) > 2000 * 7 * 32000 * 6


def test_attention_staging_is_bounded_per_chunk():
    """Attention over GPU-resident KV works on chunks of at most 2^24 fp32 elements of K and of the
    scores, so a prefill pass of long prompts costs a bounded chunk plus its output; the CPU's staging
    is linear in the tokens of the largest pass."""
    m = ModelSpec.preset("mixtral-8x7b")
    a = activation_bytes(m, Workload(4000, 16), 4, 0)          # prefill: 4 prompts of 4000 tokens
    # one sequence's scores alone are 8 x 4 x 4000 x 4000 fp32 = 2 GiB: the chunk is that one sequence
    one_seq_scores = 8 * 4 * 4000 * 4000 * 4
    assert one_seq_scores <= a < 4 * one_seq_scores
    wl = Workload(566, 1024)
    assert host_staging_bytes(m, wl, 1000, 0) == PREFILL_TOKENS * STAGING_PER_TOKEN
    assert host_staging_bytes(m, wl, 4000, 4) == 4000 * 5 * STAGING_PER_TOKEN       # the verify pass is larger


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
    # the paper's rule: (host memory - reserve - pinned experts - staging) / KV per row (1592 positions)
    h = hw.with_overrides(cpu_mem_GiB=300)
    want = int((300 * GiB - 6 * GiB - 32 * 8 * EXPERT - PREFILL_TOKENS * STAGING_PER_TOKEN) // (1592 * 128 * 1024))
    assert max_batch(m, h, wl) == want == 1075
    assert kv_bytes_per_sequence(m, wl) == 1592 * 128 * 1024


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
