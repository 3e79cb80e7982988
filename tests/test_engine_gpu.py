"""The engine on a CUDA GPU (skipped without one): the same exactness and distribution checks as on
the CPU through the GPU paths (copy stream + events for streamed experts, CuPy kernels, device/host
KV splits, per-stage synchronisation), and a 4-layer Mixtral-8x7B slice with random bf16 weights
drawn on the GPU (acceptance from a seeded oracle; every expert-streaming schedule, with and without
per-stage sync; numbers printed, and written to $SPECMOE_GPU_OUT/gpu_tests.json when set)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from engine_fixtures import load_hf, make_pair
from specmoe.planner.errors import SpecError
from specmoe.planner.model_spec import PRESET_DIR
from specmoe.runtime.weights.checkpoint import read_config
from specmoe.runtime.engine import Engine, plan_for_checkpoint
from specmoe.runtime.memory_fit import check_fits, plan_footprint
from specmoe.runtime.model.kv_cache import kv_capacity
from specmoe.runtime.weights.sources import WeightSource
from test_speculative_exact import _chi2_p, _exact_marginals, hf_greedy, ragged_prompts

pytestmark = pytest.mark.gpu
DEVICE = os.environ.get("SPECMOE_TEST_DEVICE", "cuda")


def _dump(name: str, obj) -> None:
    """Print, and merge into $SPECMOE_GPU_OUT/gpu_tests.json (one file: few files come back from the GPU host)."""
    out = os.environ.get("SPECMOE_GPU_OUT")
    print(name, json.dumps(obj, default=str)[:4000])
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        p = Path(out) / "gpu_tests.json"
        try:
            d = json.loads(p.read_text()) if p.exists() else {}
        except ValueError:
            d = {}
        d[name] = obj
        p.write_text(json.dumps(d, indent=1, default=str))


def test_gpu_greedy_exact(tmp_path):
    t, d = make_pair(tmp_path, "mixtral", "llama", seed=5, scale=0.9)
    prompts = ragged_prompts(12, 1)
    ref = hf_greedy(load_hf(t), prompts, 16)
    variants = {
        "stream": dict(expert_cache_slots=[2, 3], draft_kv_gpu_sequences=3, target_kv_gpu_sequences=2),
        "cpu_experts": dict(expert_cache_slots=[0, 6], cpu_expert_layers=(0,), draft_kv_gpu_sequences=6),
        "stream_host_kv": dict(expert_cache_slots=[1, 2], draft_kv_gpu_sequences=3, target_kv_gpu_sequences=0),
    }
    for name, v in variants.items():
        plan = plan_for_checkpoint(t, d, "h200-host", batch=6, draft_len=3, micro_batches=2, **v)
        eng = Engine(plan, t, d, device=DEVICE, dtype="float32", profile_stages=True)
        assert eng.expert_streaming() == ("next" if DEVICE == "cuda" and eng.store.streaming_layers else "off")
        for k in (0, 4):
            for mode in ((None, "off", "predict") if name == "stream" else (None,)):
                eng.prefetch_next_layer = mode
                r = eng.generate(prompts, max_new_tokens=16, draft_len=k)
                assert r.record.token_flips == 0
                assert [o.token_ids for o in r.outputs] == ref, (name, k, mode)
                if name == "stream":
                    rr = r.record
                    assert rr.h2d_decode_bytes + rr.h2d_prefill_bytes == rr.h2d_bytes > 0
                    assert rr.h2d_busy_s > 0 and 0 < rr.h2d_busy_fraction < 1
        eng.prefetch_next_layer = None
        r = eng.generate(prompts, max_new_tokens=16, draft_len=4)
        rec = r.record
        _dump(f"tiny_{name}", {"stages": rec.stages, "backends": rec.backends, "h2d_bytes": rec.h2d_bytes,
                               "machine": rec.machine, "hist": rec.acceptance_histogram})
        assert all(rec.stages[s] > 0 for s in ("target.attention", "target.moe", "draft.cpu" if name == "stream"
                                               else "draft.gpu"))
        if name == "stream":
            assert rec.h2d_bytes > 0 and rec.stages["target.h2d"] > 0
        if name == "stream_host_kv":   # the attention's host transfers, once per layer (next schedule)
            eng.prefetch_next_layer = "next"
            for hio in ("pinned", "zero-copy", "direct"):
                eng.host_io = hio
                r = eng.generate(prompts, max_new_tokens=16, draft_len=4)
                assert [o.token_ids for o in r.outputs] == ref, hio
                assert r.record.host_io == hio and r.record.expert_streaming == "next"


def test_gpu_sampling_distribution(tmp_path):
    V = 16
    t, d = make_pair(tmp_path, "mixtral", "llama", seed=3, scale=1.0, margin=1.5, vocab_size=V, eos_token_id=None)
    T, N, prompt = 1.3, 2000, [5, 9, 3]
    exact = _exact_marginals(load_hf(t), prompt, T, V)
    plan = plan_for_checkpoint(t, d, "h200-host", batch=64, draft_len=2, micro_batches=2, draft_kv_gpu_sequences=32,
                               expert_cache_slots=[3, 6])
    r = Engine(plan, t, d, device=DEVICE, dtype="float32").generate([prompt] * N, max_new_tokens=3, temperature=T,
                                                                    seed=5)
    toks = torch.tensor([o.token_ids for o in r.outputs])
    ps = [_chi2_p(torch.bincount(toks[:, j], minlength=V), exact[j]) for j in range(3)]
    _dump("sampling", {"p_values": ps, "mean_accepted": r.record.mean_accepted})
    assert min(ps) > 1e-3 and r.record.mean_accepted > 0.2


def _slice_configs(tmp: Path, layers: int, shrink: int) -> tuple[Path, Path]:
    """Mixtral-8x7B with `layers` layers (target) and Mistral-7B with 2 layers (draft); `shrink` > 1 divides
    the widths (for a CPU dry run of this test)."""
    out = []
    for name, preset, L in (("target", "mixtral-8x7b", layers), ("draft", "mistral-7b", 2)):
        cfg = json.loads((PRESET_DIR / f"{preset}.json").read_text())
        cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
        cfg["num_hidden_layers"] = L
        if shrink > 1:
            for k in ("hidden_size", "intermediate_size"):
                cfg[k] //= shrink
            cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
        cfg["dtype"] = "bfloat16"
        p = tmp / name
        p.mkdir()
        (p / "config.json").write_text(json.dumps(cfg))
        out.append(p)
    return out[0], out[1]


def test_mixtral_slice_random_weights(tmp_path):
    shrink = int(os.environ.get("SPECMOE_SLICE_SHRINK", "1"))
    tdir, ddir = _slice_configs(tmp_path, 4, shrink)
    B, k, alpha = 32, 3, 0.7
    plan = plan_for_checkpoint(tdir, ddir, "h200-host", batch=B, draft_len=k, micro_batches=2, prompt_len=64,
                               gen_len=32, expert_cache_slots=[2, 2, 2, 2], draft_kv_gpu_sequences=B // 2)
    gen_dev = DEVICE if DEVICE == "cuda" else "cpu"
    tsrc = WeightSource.random(read_config(tdir), seed=0, dtype=torch.bfloat16, device_for_generation=gen_dev)
    dsrc = WeightSource.random(read_config(ddir), seed=1, dtype=torch.bfloat16, device_for_generation=gen_dev)
    fp = plan_footprint(plan, B, kv_capacity(64, 32, k), k, torch.bfloat16, torch.bfloat16)
    try:
        check_fits(fp, torch.device(DEVICE))
        refused = None
    except SpecError as e:   # the VM's MemAvailable can start low and grow on use: record, then go on
        refused = str(e)
    eng = Engine(plan, tsrc, dsrc, device=DEVICE, dtype="bfloat16", acceptance_oracle=alpha, check_memory=False)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 32000, (64,), generator=g).tolist() for _ in range(B)]
    eng.generate(prompts[:4], max_new_tokens=4)   # warm-up (kernel compiles)
    res, outs = {}, {}
    for name, prof, pre in (("next", False, None), ("next_profiled", True, None), ("off", False, "off"),
                            ("predict", False, "predict")):
        eng.profile_stages, eng.prefetch_next_layer = prof, pre
        out = eng.generate(prompts, max_new_tokens=32)
        r = out.record
        outs[name] = [o.token_ids for o in out.outputs]
        res[name] = {
            "stages_ms": {s: v * 1e3 for s, v in r.stages.items()}, "iterations": r.iterations,
            "decode_tokens_per_s": r.decode_tokens_per_s, "end_to_end_tokens_per_s": r.end_to_end_tokens_per_s,
            "mean_accepted": r.mean_accepted, "h2d_bytes": r.h2d_bytes, "h2d_decode_bytes": r.h2d_decode_bytes,
            "h2d_unused_experts": r.h2d_unused_experts, "h2d_GBps": r.h2d_GBps, "h2d_busy_s": r.h2d_busy_s,
            "h2d_busy_fraction": r.h2d_busy_fraction, "expert_streaming": r.expert_streaming,
            "backends": r.backends, "machine": r.machine, "memory_check": refused or "fits",
            "token_flips": r.token_flips}
        assert r.complete and r.acceptance_oracle == alpha and r.h2d_bytes > 0
        assert r.expert_streaming == (pre or ("next" if DEVICE == "cuda" else "off"))
        if DEVICE == "cuda":   # bytes over copy-stream busy time: cannot beat PCIe Gen5 x16 (peak near 63 GB/s)
            assert 5 < r.h2d_GBps < 64, r.h2d_GBps
    _dump("mixtral_slice", res)
    # the schedules' GEMMs have different row counts (cuBLAS may pick other kernels): in bf16 a sequence may
    # differ only where some run met a near-tie (top-2 logits closer than bf16 resolves: token_flips)
    for name in ("next_profiled", "off", "predict"):
        differ = sum(a != b for a, b in zip(outs["next"], outs[name]))
        assert differ <= res["next"]["token_flips"] + res[name]["token_flips"], (name, differ)
