"""The dense draft forward against transformers' (fp32) for Llama, Mistral, Qwen2 and Qwen3, with the
draft KV split by sequence: device rows through draft_decode_attention (N = 1) or the torch block
attention (N > 1), host rows through the CPU verify kernel."""
from __future__ import annotations

import pytest
import torch

from engine_fixtures import one_thread_per_module  # noqa: F401 (autouse: one torch thread)
from engine_fixtures import DRAFT_KINDS, hf_logits, load_hf, make_checkpoint
from specmoe.runtime.model.draft import DraftModel
from specmoe.runtime.model.kv_cache import PassLayout, SplitKVCache, block_attention_torch
from specmoe.runtime.weights.sources import WeightSource
from test_target_forward import rel_err, run_chunked

DEV = torch.device("cpu")




@pytest.mark.parametrize("kind", DRAFT_KINDS)
@pytest.mark.parametrize("device_rows", [0, 2, 4])
def test_draft_matches_transformers(kind, device_rows, tmp_path):
    path = make_checkpoint(kind, tmp_path / kind, seed=21)
    hf = load_hf(path)
    src = WeightSource.from_checkpoint(path)
    c = src.config
    model = DraftModel(src, DEV, torch.float32)
    g = torch.Generator().manual_seed(device_rows)
    seqs = [torch.randint(3, c.vocab_size, (L,), generator=g).tolist() for L in (6, 13, 2, 9)]
    kv = SplitKVCache(c.num_layers, 4, device_rows, c.num_kv_heads, 24, c.head_dim, DEV, torch.float32,
                      torch.float32, decode_kernel=True)
    got = run_chunked(lambda t, lay: model.forward(t, lay, kv, logits="all"), kv, seqs, [4, 1, 1, 2, 1, 3, 1])
    for s, x in zip(seqs, got):
        assert rel_err(x, hf_logits(hf, s)) < 1e-4
    # "last" gives each sequence's last-token logits of a ragged pass
    kv2 = SplitKVCache(c.num_layers, 4, device_rows, c.num_kv_heads, 24, c.head_dim, DEV, torch.float32,
                       torch.float32, decode_kernel=True)
    lay = PassLayout([0, 1, 2, 3], [0] * 4, [len(s) for s in seqs])
    last = model.forward(torch.tensor([t for s in seqs for t in s]), lay, kv2, logits="last")
    for b, s in enumerate(seqs):
        assert rel_err(last[b], hf_logits(hf, s)[-1]) < 1e-4


def test_block_attention_matches_verify_reference():
    from specmoe.runtime.kernels.verify_attention import verify_attention_reference

    g = torch.Generator().manual_seed(0)
    R, Hkv, S, D, Hq = 5, 2, 17, 8, 6
    k = torch.randn(R, Hkv, S, D, generator=g)
    v = torch.randn(R, Hkv, S, D, generator=g)
    for N in (1, 3):
        rows = torch.tensor([4, 0, 2])
        ctx = torch.tensor([0, 7, 13])
        q = torch.randn(3, N, Hq, D, generator=g)
        ref = verify_attention_reference(q, k, v, rows, ctx)
        got = block_attention_torch(q, k, v, rows, ctx, D ** -0.5)
        assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)
