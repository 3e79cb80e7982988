"""Our staged target forward against transformers' forward of the same checkpoint (fp32), for every
target family and both expert layouts: prefill of ragged prompts, then decode in chunks of 1..3
tokens per sequence through the KV cache, with micro-batches, a partial expert cache (streaming),
CPU expert layers and target KV split between device and host rows."""
from __future__ import annotations

import pytest
import torch

from engine_fixtures import one_thread_per_module  # noqa: F401 (autouse: one torch thread)
from engine_fixtures import TARGET_KINDS, hf_logits, load_hf, make_checkpoint
from specmoe.runtime.model.expert_store import ExpertStore
from specmoe.runtime.model.kv_cache import PassLayout, SplitKVCache
from specmoe.runtime.run_record import StageTimer
from specmoe.runtime.model.target import TargetModel
from specmoe.runtime.weights.sources import WeightSource

DEV = torch.device("cpu")
TOL = 1e-4




def run_chunked(forward, kv: SplitKVCache, seqs: list[list[int]], chunks: list[int]) -> list[torch.Tensor]:
    """Feed each sequence in chunks (first chunk = prefill); returns per-sequence logits [L, V]."""
    pos = [0] * len(seqs)
    outs: list[list[torch.Tensor]] = [[] for _ in seqs]
    for ch in chunks + [10 ** 6]:
        bs = [b for b, s in enumerate(seqs) if pos[b] < len(s)]
        if not bs:
            break
        n = [min(ch, len(seqs[b]) - pos[b]) for b in bs]
        lay = PassLayout(bs, [pos[b] for b in bs], n)
        toks = torch.tensor([t for b, k in zip(bs, n) for t in seqs[b][pos[b]:pos[b] + k]])
        out = forward(toks, lay)
        kv.commit(lay)
        o = 0
        for b, k in zip(bs, n):
            outs[b].append(out[o:o + k])
            o += k
            pos[b] += k
    return [torch.cat(x) for x in outs]


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


def check_target(path, slots_fn, micro_batches=2, cpu_layers=(), device_rows=1, seed=0):
    hf = load_hf(path)
    src = WeightSource.from_checkpoint(path)
    c = src.config
    slots = [slots_fn(c) if c.layer_is_moe(i) else 0 for i in range(c.num_layers)]
    store = ExpertStore(src, DEV, torch.float32, slots, cpu_expert_layers=cpu_layers)
    model = TargetModel(src, store, DEV, torch.float32)
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(3, c.vocab_size, (L,), generator=g).tolist() for L in (9, 14, 4, 11)]
    kv = SplitKVCache(c.num_layers, len(seqs), device_rows, c.num_kv_heads, 32, c.head_dim, DEV, torch.float32,
                      torch.float32, decode_kernel=False)
    timer = StageTimer(DEV)
    got = run_chunked(lambda t, lay: model.forward(t, lay, kv, timer, micro_batches, logits="all",
                                                   record_routing=True), kv, seqs, [5, 1, 3, 2, 1, 3])
    for s, x in zip(seqs, got):
        assert x.shape == (len(s), c.vocab_size)
        assert rel_err(x, hf_logits(hf, s)) < TOL
    return store, timer


@pytest.mark.parametrize("kind", TARGET_KINDS)
def test_target_matches_transformers(kind, tmp_path):
    store, timer = check_target(make_checkpoint(kind, tmp_path / kind, seed=11), lambda c: c.num_experts // 2)
    assert store.h2d_bytes > 0          # half the experts are not cached: some were streamed
    assert set(timer.totals["decode"]) >= {"target.pre_attn", "target.attention", "target.post_attn",
                                             "target.moe", "target.lm_head", "target.h2d"}


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_target_fused_layout_matches_transformers(kind, tmp_path):
    check_target(make_checkpoint(kind, tmp_path / kind, seed=12, fused=True), lambda c: 0, micro_batches=3,
                 device_rows=0)


def test_cpu_expert_layers_and_full_cache(tmp_path):
    p = make_checkpoint("olmoe", tmp_path / "o", seed=13)
    store, _ = check_target(p, lambda c: 2, cpu_layers=(1,), micro_batches=1, device_rows=4)
    assert store.h2d_bytes > 0 and store.buffer_capacity == 6
    store, _ = check_target(p, lambda c: c.num_experts, micro_batches=4)
    assert store.h2d_bytes == 0 and store.num_buffers == 0


def test_rebalance_caches_the_most_used(tmp_path):
    p = make_checkpoint("mixtral", tmp_path / "m", seed=14)
    store, _ = check_target(p, lambda c: 2)
    store.rebalance()
    for layer in store.config.moe_layers:
        counts = store.routing_counts[layer].tolist()
        top = sorted(range(store.E), key=lambda e: (-counts[e], e))[:2]
        assert sorted(store.cached[layer]) == sorted(top)
        for s, e in enumerate(store.cached[layer]):
            assert torch.equal(store.cache[layer][s], store.host[layer][e])


def _host_expert_runs(tmp_path, monkeypatch, modes):
    """Logits of every token of a chunked qwen2_moe forward, streamed bytes, routing counts and the number of
    batched GEMM calls (torch._grouped_mm and torch.bmm) for each SPECMOE_HOST_EXPERTS mode."""
    from specmoe.runtime.kernels import host_experts

    p = make_checkpoint("qwen2_moe", tmp_path / "q", seed=15)
    calls = []
    for name in ("_grouped_mm", "bmm"):
        real = getattr(torch, name, None)
        if real is not None:
            monkeypatch.setattr(torch, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    runs = {}
    for mode in modes:
        monkeypatch.setenv(host_experts.HOST_EXPERTS_ENV, mode)
        calls.clear()
        src = WeightSource.from_checkpoint(p)
        c = src.config
        store = ExpertStore(src, DEV, torch.float32, [2 if c.layer_is_moe(i) else 0 for i in range(c.num_layers)])
        model = TargetModel(src, store, DEV, torch.float32)
        kv = SplitKVCache(c.num_layers, 3, 1, c.num_kv_heads, 32, c.head_dim, DEV, torch.float32, torch.float32,
                          decode_kernel=False)
        seqs = [torch.randint(3, c.vocab_size, (L,), generator=torch.Generator().manual_seed(L)).tolist()
                for L in (7, 12, 5)]
        out = run_chunked(lambda t, lay: model.forward(t, lay, kv, StageTimer(DEV), 2, logits="all",
                                                       record_routing=True), kv, seqs, [4, 1, 2])
        runs[mode] = (out, store.h2d_bytes, {l: x.tolist() for l, x in store.routing_counts.items()}, list(calls))
    return runs, len(c.moe_layers)


def test_grouped_experts_match_per_expert_bit_for_bit(tmp_path, monkeypatch):
    """The grouped-GEMM MoE (all experts of a layer in two torch._grouped_mm calls, used where the store
    reads every expert from its host rows) gives the same logits bit for bit as one GEMM pair per expert,
    with the same streamed bytes and routing counts (the store's bookkeeping still sees every expert)."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no grouped GEMM")
    runs, n_moe = _host_expert_runs(tmp_path, monkeypatch, ("grouped", "per-expert"))
    (g_out, g_bytes, g_counts, g_calls), (e_out, e_bytes, e_counts, e_calls) = runs["grouped"], runs["per-expert"]
    assert "_grouped_mm" not in e_calls and g_calls.count("_grouped_mm") >= 2 * n_moe   # two per MoE layer and pass
    assert all(torch.equal(a, b) for a, b in zip(g_out, e_out))
    assert (g_bytes, g_counts) == (e_bytes, e_counts) and g_bytes > 0


def test_padded_experts_match_per_expert(tmp_path, monkeypatch):
    """The padded batched GEMMs give the per-expert logits to fp32 rounding, the same greedy tokens, the same
    streamed bytes and routing counts; auto takes them on this small model's routing."""
    runs, n_moe = _host_expert_runs(tmp_path, monkeypatch, ("padded", "per-expert", "auto"))
    (p_out, p_bytes, p_counts, p_calls), (e_out, e_bytes, e_counts, e_calls) = runs["padded"], runs["per-expert"]
    # two batched GEMMs per MoE layer and pass beyond the combine's bmm, which every path issues
    assert p_calls.count("bmm") - e_calls.count("bmm") >= 2 * n_moe and "_grouped_mm" not in p_calls
    for a, b in zip(p_out, e_out):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert torch.equal(a.argmax(-1), b.argmax(-1))
    assert (p_bytes, p_counts) == (e_bytes, e_counts) and p_bytes > 0
    assert all(torch.equal(a, b) for a, b in zip(runs["auto"][0], p_out))
