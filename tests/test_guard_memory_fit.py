"""The engine's memory check (runtime/memory_fit.py) on cases worked by hand, and against what the engine
really allocates (issue 15).

The pair (engine_fixtures.make_pair, fp32): target Mixtral and draft Llama, each 2 layers, 2 KV heads of
dimension 8: K and V of one position take 2 layers x 2 x 2 x 8 x 4 bytes = 256 bytes in either model.
The target has 2 x 6 experts of 3 x 32 x 48 = 4608 weights (18,432 bytes each in fp32).
"""
from __future__ import annotations

import pytest
import torch

from engine_fixtures import one_thread_per_module  # noqa: F401 (autouse: one torch thread)
from engine_fixtures import make_pair
from specmoe.planner.errors import SpecError
from specmoe.runtime import memory_fit
from specmoe.runtime.engine import Engine, plan_for_checkpoint

POS = 256                  # KV bytes per position, all layers, target or draft
EXPERT = 3 * 32 * 48 * 4   # 18,432


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("memfit"), "mixtral", "llama", seed=4)


def _plan(pair, **kw):
    t, d = pair
    return plan_for_checkpoint(t, d, "devbox-2core", batch=4, draft_len=2, micro_batches=1,
                               expert_cache_slots=kw.pop("slots", [2, 1]), draft_kv_gpu_sequences=1,
                               target_kv_gpu_sequences=1, **kw)


def test_plan_footprint_by_hand(pair):
    """3 rows of 20 positions, one target row and one draft row on the device:
    KV: device 1 x 20 x 256 = 5120 bytes each model, host 2 x 20 x 256 = 10,240 each;
    experts: all 12 on the host (221,184); devbox-2core's CPU stands in for the GPU, so the 2 + 1 cached
    and the two buffers of the larger layer's 5 uncached are views of those rows: 0 bytes."""
    fp = memory_fit.plan_footprint(_plan(pair), 3, 20, 2, torch.float32, torch.float32)
    g, c = fp.gpu_breakdown, fp.cpu_breakdown
    assert (g["target_kv"], g["draft_kv"]) == (5120, 5120)
    assert (c["target_kv"], c["draft_kv"]) == (10240, 10240)
    assert g["expert_cache"] == 0 and g["streaming_buffers"] == 0
    assert c["experts_pinned"] == 12 * EXPERT
    # bf16 halves every byte of weights and KV
    fb = memory_fit.plan_footprint(_plan(pair), 3, 20, 2, torch.bfloat16, torch.bfloat16)
    assert (fb.gpu_breakdown["target_kv"], fb.cpu_breakdown["draft_kv"]) == (2560, 5120)
    assert fb.cpu_breakdown["experts_pinned"] == 6 * EXPERT
    # the loaded weights alone (no rows): no KV, no activations; what a run adds is the rest
    w = memory_fit.plan_footprint(_plan(pair), 0, 0, 2, torch.float32, torch.float32)
    assert w.gpu_breakdown["target_kv"] == w.cpu_breakdown["target_kv"] == w.gpu_breakdown["activations"] == 0
    extra = memory_fit.minus(fp, w)
    assert extra.cpu_breakdown["target_kv"] == 10240 and extra.cpu_breakdown["experts_pinned"] == 0
    assert extra.gpu_bytes + extra.cpu_bytes == pytest.approx(fp.gpu_bytes + fp.cpu_bytes - w.gpu_bytes - w.cpu_bytes)


def test_check_fits_at_the_boundary(pair, monkeypatch):
    """On a CPU-only host both parts are summed against MemAvailable less the 256 MiB margin."""
    fp = memory_fit.plan_footprint(_plan(pair), 3, 20, 2, torch.float32, torch.float32)
    need = fp.gpu_bytes + fp.cpu_bytes
    dev = torch.device("cpu")
    monkeypatch.setattr(memory_fit, "device_mem_free_bytes", lambda device: None)
    monkeypatch.setattr(memory_fit, "host_mem_available_bytes", lambda: int(need + memory_fit.FREE_MARGIN_BYTES) + 1)
    assert memory_fit.check_fits(fp, dev)["device_free_bytes"] is None
    monkeypatch.setattr(memory_fit, "host_mem_available_bytes", lambda: int(need + memory_fit.FREE_MARGIN_BYTES) - 1)
    with pytest.raises(SpecError, match="target_kv"):
        memory_fit.check_fits(fp, dev)


def test_engine_checks_the_kv_it_allocates(pair, monkeypatch):
    """The footprint the engine checks before a run holds exactly the bytes of the KV caches it then
    allocates (counted from the tensors), row for row."""
    t, d = pair
    eng = Engine(_plan(pair), t, d)
    checked, made = [], []
    real_fp, real_kv = memory_fit.plan_footprint, Engine._kv_caches

    def fp_spy(*a, **kw):
        checked.append(real_fp(*a, **kw))
        return checked[-1]

    def kv_spy(self, rows, capacity, max_k):
        made.append(real_kv(self, rows, capacity, max_k))
        return made[-1]

    monkeypatch.setattr("specmoe.runtime.engine.plan_footprint", fp_spy)
    monkeypatch.setattr(Engine, "_kv_caches", kv_spy)
    eng.generate([[5, 6, 7, 8], [9, 10], [11, 12, 13]], max_new_tokens=6)
    (fp,), ((tkv, dkv),) = checked, made

    def nbytes(kv, part):
        return sum(x.numel() * x.element_size() for x in kv.k[part] + kv.v[part] if x is not None)

    assert tkv.rows == 3 and tkv.capacity == 4 + 6 + 2 + 2
    assert fp.gpu_breakdown["target_kv"] == nbytes(tkv, 0) == 1 * tkv.capacity * POS
    assert fp.cpu_breakdown["target_kv"] == nbytes(tkv, 1) == 2 * tkv.capacity * POS
    assert fp.gpu_breakdown["draft_kv"] == nbytes(dkv, 0) and fp.cpu_breakdown["draft_kv"] == nbytes(dkv, 1)
