"""Host KV rows in their first pass attend on the model's device (SplitKVCache.attends_fresh_on): a
prefill's keys are all the pass's own, so the engine computes their causal attention where they were
computed (a GPU), as the cost model costs the prefill, instead of in the CPU verify kernel. The same
code runs on a CPU when the cache is told to (fresh_device_types), so it is checked here against the
verify-kernel path on fresh random inputs: same outputs, same K/V written to the host rows, and
greedy generation identical to transformers' with it on."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from engine_fixtures import load_hf, make_pair
from specmoe.runtime.engine import Engine, plan_for_checkpoint
from specmoe.runtime.model.kv_cache import PassLayout, SplitKVCache
from test_speculative_exact import hf_greedy, ragged_prompts

CPU = torch.device("cpu")


def _cache(fresh_here: bool, R: int, device_rows: int, Hkv: int, S: int, D: int) -> SplitKVCache:
    c = SplitKVCache(2, R, device_rows, Hkv, S, D, CPU, torch.float32, torch.float32, False)
    if fresh_here:
        c.fresh_device_types = ("cpu", "cuda")
    return c


@pytest.mark.parametrize("trial", range(6))
def test_first_pass_on_the_model_device_matches_the_verify_kernel(trial):
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    R, Hkv, g, D = rng.randint(2, 12), rng.choice([1, 2]), rng.choice([1, 4]), rng.choice([16, 40])
    B = rng.randint(1, R)
    rows = rng.sample(range(R), B)
    n = [rng.randint(2, 40)] + [rng.choice([1, 3, 7, rng.randint(1, 40)]) for _ in range(B - 1)]
    lay = PassLayout(rows, [0] * B, n)
    T, Hq = sum(n), Hkv * g
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(T, h, D, generator=gen) for h in (Hq, Hkv, Hkv))
    dev_rows = rng.randint(0, rows[0])              # the first sequence (n >= 2) on a host row
    outs, caches = [], []
    for fresh in (False, True):
        c = _cache(fresh, R, dev_rows, Hkv, 48, D)
        assert c.attends_fresh_on(lay, CPU) == fresh
        assert [pp.fresh for pp in c._plan(lay, CPU)] == [fresh and pp.part == 1 for pp in c._plan(lay, CPU)]
        outs.append(c.attend(1, q, k, v, lay))
        caches.append(c)
    assert torch.allclose(outs[0], outs[1], atol=2e-5, rtol=1e-4), f"seed={seed}"
    for p in (0, 1):
        for kv in ("k", "v"):
            a, b = getattr(caches[0], kv)[p][1], getattr(caches[1], kv)[p][1]
            assert (a is None and b is None) or torch.equal(a, b), f"{kv} part {p} seed={seed}"


def test_a_later_pass_keeps_the_verify_kernel():
    """A pass over cached keys (decode, or a prompt continued) has keys only the host rows hold."""
    c = _cache(True, 4, 0, 2, 32, 16)
    assert c.attends_fresh_on(PassLayout([0, 1], [0, 0], [5, 3]), CPU)
    lay = PassLayout([0, 1], [0, 4], [5, 3])
    assert not c.attends_fresh_on(lay, CPU) and not any(pp.fresh for pp in c._plan(lay, CPU))
    assert not _cache(False, 4, 0, 2, 32, 16).attends_fresh_on(PassLayout([0], [0], [5]), CPU)   # a CPU model


def test_greedy_is_exact_with_first_passes_on_the_model_device(tmp_path, monkeypatch):
    monkeypatch.setattr(SplitKVCache, "fresh_device_types", ("cpu", "cuda"))
    t, d = make_pair(tmp_path, "mixtral", "llama", seed=5, scale=0.9)
    prompts = ragged_prompts(8, 3)
    ref = hf_greedy(load_hf(t), prompts, 12)
    plan = plan_for_checkpoint(t, d, "devbox-2core", batch=4, draft_len=2, draft_kv_gpu_sequences=0,
                               target_kv_gpu_sequences=0)
    r = Engine(plan, t, d, device="cpu", dtype="float32").generate(prompts, max_new_tokens=12)
    assert [o.token_ids for o in r.outputs] == ref


@pytest.mark.gpu
def test_first_pass_runs_on_the_gpu_without_the_verify_kernel(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from specmoe.runtime.model import kv_cache as kvm

    dev = torch.device("cuda")
    lay = PassLayout([0, 1, 2], [0, 0, 0], [9, 4, 9])
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(22, h, 32, generator=gen) for h in (8, 2, 2))
    ref = _cache(False, 3, 0, 2, 16, 32).attend(0, q, k, v, lay)                   # the verify kernel, CPU
    c = SplitKVCache(1, 3, 0, 2, 16, 32, dev, torch.float32, torch.float32, False)
    monkeypatch.setattr(kvm.SplitKVCache, "_attend_host", lambda *a: (_ for _ in ()).throw(AssertionError("CPU")))
    out = c.attend(0, q.to(dev), k.to(dev), v.to(dev), lay)
    assert out.device.type == "cuda" and torch.allclose(out.cpu(), ref, atol=1e-4)
    assert torch.equal(c.k[1][0][:, :, :9].cpu()[0], k[:9].transpose(0, 1))
    assert np.array_equal(c.lens, [0, 0, 0])            # lengths are the caller's to commit
