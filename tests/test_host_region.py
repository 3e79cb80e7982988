"""The expert store's host memory: one allocation of exactly its bytes (page-aligned per layer), page-locked
by one registration with the CUDA driver (a fake registrar here; the real one in the `gpu` tests), instead
of torch's pinned allocator, which rounds each layer up to a power of two; and the attention's host
buffers (HostIO) kept across layers. Allocation sizes are read from the tensors' storages."""
from __future__ import annotations

import gc
import math

import pytest
import torch

from specmoe.runtime import host_region as hr
from specmoe.runtime.model.expert_store import ExpertStore, layer_rows
from specmoe.runtime.model.target import HostIO
from specmoe.runtime.weights.sources import WeightSource

CFG = {"model_type": "mixtral", "vocab_size": 64, "hidden_size": 40, "intermediate_size": 24,
       "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 10,
       "num_local_experts": 6, "num_experts_per_tok": 2, "max_position_embeddings": 256,
       "rope_theta": 1e4, "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False}


class FakeDriver:
    def __init__(self):
        self.calls: list[tuple] = []

    def register(self, ptr, nbytes):
        self.calls.append(("register", ptr, nbytes))

    def unregister(self, ptr):
        self.calls.append(("unregister", ptr))


def _storage(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def test_one_registration_of_exactly_the_bytes_held():
    drv = FakeDriver()
    sizes = {0: 3 * 4096 + 7, 1: 5, 2: 2048}                 # elements of bf16
    ts = hr.host_region(sizes, torch.bfloat16, register=True, driver=drv)
    want = sum(math.ceil(n * 2 / hr.PAGE_BYTES) * hr.PAGE_BYTES for n in sizes.values())
    assert hr.region_bytes(sizes, torch.bfloat16) == want
    assert len({_storage(t) for t in ts.values()}) == 1 and _storage(ts[0])[1] == want   # one allocation
    assert drv.calls == [("register", _storage(ts[0])[0], want)]
    assert all(t.data_ptr() % hr.PAGE_BYTES == 0 and t.numel() == sizes[k] and t.dtype == torch.bfloat16
               for k, t in ts.items())
    ts[1].fill_(3.0)
    assert ts[1].tolist() == [3.0] * 5 and not ts[2].eq(3.0).all()
    keep = ts[2][:4]
    del ts
    gc.collect()
    assert len(drv.calls) == 1                               # a view still holds the region
    del keep
    gc.collect()
    assert drv.calls[1] == ("unregister", drv.calls[0][1]) and len(drv.calls) == 2


def test_region_is_private_memory_not_shared():
    """Shared anonymous memory (mmap's default) is shmem: no transparent huge pages where shmem_enabled is
    "never" (the usual setting), and RSS reports it apart. The region is private anonymous memory."""
    from specmoe.runtime.memory_usage import _status_kib   # the one reader of /proc/self/status
    if _status_kib("RssShmem") is None:
        pytest.skip("no /proc/self/status")
    _status_mib = lambda key: _status_kib(key) / 1024  # noqa: E731
    shmem0, anon0 = _status_mib("RssShmem"), _status_mib("RssAnon")
    ts = hr.host_region({0: 16 * 2 ** 20}, torch.uint8, register=False)
    ts[0].fill_(1)                                           # 16 MiB touched
    assert _status_mib("RssShmem") - shmem0 < 1.0
    assert _status_mib("RssAnon") - anon0 >= 15.0
    del ts


def test_store_holds_its_layers_in_one_allocation_of_their_bytes():
    """Every layer's rows in one region: the allocation is the rows' bytes plus under a page per layer (torch's
    pinned allocator would round each layer up to a power of two)."""
    src = WeightSource.random(CFG, seed=0, dtype=torch.float32)
    store = ExpertStore(src, torch.device("cpu"), torch.float32, [1, 0, 2])
    rows_bytes = [h.numel() * h.element_size() for h in store.host.values()]
    assert len({_storage(h) for h in store.host.values()}) == 1
    held = store.host_allocation_bytes()
    assert held == hr.region_bytes({l: store.E * store.P for l in store.host}, torch.float32)
    assert 0 <= held - sum(rows_bytes) < hr.PAGE_BYTES * len(rows_bytes)
    for l, h in store.host.items():                         # the rows hold the source's experts
        gate, up, down = src.expert(l, 4)
        assert torch.equal(h[4], torch.cat([gate.reshape(-1), up.reshape(-1), down.reshape(-1)]))


def test_one_layers_rows_can_stand_for_every_layer():
    """The GPU bench's reuse: one layer's rows (its own allocation) passed for every layer: no new allocation."""
    src = WeightSource.random(CFG, seed=1, dtype=torch.float32)
    rows = layer_rows(src, 0, torch.float32, register=False)
    store = ExpertStore(src, torch.device("cpu"), torch.float32, [1, 1, 1], host={l: rows for l in range(3)})
    assert all(h is rows for h in store.host.values())
    assert store.host_allocation_bytes() == _storage(rows)[1] == hr.region_bytes({0: rows.numel()}, torch.float32)


def test_registration_failure_is_a_clear_error(monkeypatch):
    class Cudart:
        def cudaHostRegister(self, ptr, nbytes, flags):
            return 2                                          # cudaErrorMemoryAllocation

    monkeypatch.setattr(torch.cuda, "cudart", lambda: Cudart())
    with pytest.raises(RuntimeError, match="cudaHostRegister of .* failed .*ulimit -l"):
        hr.host_region({0: 1024}, torch.float32, register=True)


def test_host_io_buffers_are_kept_and_grown():
    """q/k/v cross into one buffer (views of it), the output buffer is the same memory pass after pass, and a
    larger pass grows it."""
    io = HostIO(torch.device("cpu"))
    q, k, v = torch.randn(5, 4, 8), torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    hq, hk, hv = io.to_host_qkv(q, k, v)
    assert torch.equal(hq, q) and torch.equal(hk, k) and torch.equal(hv, v)
    assert hq.untyped_storage().data_ptr() == hv.untyped_storage().data_ptr() and hq.stride(0) == 8 * 8
    o1 = io.out_buffer((5, 4, 8), torch.float32)
    assert io.out_buffer((3, 4, 8), torch.float32).data_ptr() == o1.data_ptr()       # kept
    assert io.out_buffer((9, 4, 8), torch.float32).numel() == 9 * 32                 # grown
    assert io.to_device(o1) is o1                                                     # the CPU is the device


@pytest.mark.gpu
def test_registered_region_is_pinned_memory_on_cuda():
    dev = torch.device("cuda")
    ts = hr.host_region({"a": 1 << 20, "b": 777}, torch.bfloat16, register=True)
    assert ts["a"].is_pinned() and ts["b"].is_pinned()
    ts["a"].copy_(torch.arange(1 << 20).to(torch.bfloat16))
    d = ts["a"].to(dev, non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(d.cpu(), ts["a"])


@pytest.mark.gpu
def test_cuda_store_pins_one_region_of_its_bytes():
    src = WeightSource.random(CFG, seed=2, dtype=torch.bfloat16)
    store = ExpertStore(src, torch.device("cuda"), torch.bfloat16, [1, 0, 2])
    assert all(h.is_pinned() for h in store.host.values())
    assert store.host_allocation_bytes() == hr.region_bytes({l: store.E * store.P for l in store.host}, torch.bfloat16)
    assert store.prefetch_layer(1)
    gu, dn, _ = store.weights(1, 3)
    torch.cuda.synchronize()
    assert torch.equal(gu.cpu(), store.split(store.host[1][3])[0])


@pytest.mark.gpu
@pytest.mark.parametrize("zero_copy", [False, True])
def test_host_io_round_trip_on_cuda(zero_copy):
    dev = torch.device("cuda")
    io = HostIO(dev)
    for T in (7, 3, 40):                                      # kept, then grown
        q, k, v = (torch.randn(T, h, 16, device=dev).bfloat16() for h in (8, 2, 2))
        hq, hk, hv = io.to_host_qkv(q, k, v)
        io.wait()
        assert hq.is_pinned() and torch.equal(hq, q.cpu()) and torch.equal(hv, v.cpu())
        out = io.out_buffer(hq.shape, hq.dtype)
        out.copy_(hq * 2)
        back = io.to_device(out, zero_copy=zero_copy)
        assert torch.equal(back, q * 2)
