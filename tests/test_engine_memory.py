"""Engine memory, runtime side: on a CPU device the expert cache and the streaming buffers are views of the
host store (their data pointers lie inside its rows, nothing is copied); loading a checkpoint leaves no
page of it mapped and peaks at the final footprint plus about one layer; the run record carries the
measured memory beside the planner's footprint of the same rows."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine_fixtures import one_thread_per_module  # noqa: F401 (autouse: one torch thread)
from engine_fixtures import REPO, make_checkpoint, make_pair
from specmoe.planner.memory import host_components
from specmoe.runtime.engine import Engine, plan_for_checkpoint
from specmoe.runtime.memory_usage import tensor_bytes
from specmoe.runtime.model.expert_store import ExpertStore
from specmoe.runtime.weights.sources import WeightSource


def inside(t: torch.Tensor, host: torch.Tensor) -> bool:
    lo = host.data_ptr()
    return lo <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= lo + host.numel() * host.element_size()


def test_cpu_cache_and_buffers_are_views_of_the_host_store(tmp_path):
    t = make_checkpoint("olmoe", tmp_path / "olmoe", seed=3)          # 2 MoE layers of 8 experts
    src = WeightSource.from_checkpoint(t)
    store = ExpertStore(src, torch.device("cpu"), torch.float32, [3, 8], streaming_buffers=2,
                        cached_experts=((5, 1, 7), ()))
    for layer in (0, 1):
        host = store.host[layer]
        for s, e in enumerate(store.cached[layer]):
            assert store.cache[layer][s].data_ptr() == host[e].data_ptr()      # the row itself, not a copy
    assert store.prefetch_layer(0)                                         # stream the 5 uncached experts
    b = store._buf_of_layer[0]
    streamed = store._streamed[0]
    assert sorted(streamed) == [0, 2, 3, 4, 6]
    for e, i in streamed.items():
        assert store.buffers[b][i].data_ptr() == store.host[0][e].data_ptr()
        gu, dn, on_host = store.weights(0, e)
        assert inside(gu, store.host[0]) and inside(dn, store.host[0]) and not on_host
    assert store.h2d_experts == 5 and store.copied_bytes == 0 and store.copied_experts == 0
    assert store.take_h2d() == {"decode": (5 * store.expert_bytes, 0.0)}
    assert store.memory_bytes() == {"host": 2 * 8 * store.expert_bytes, "cache": 0, "buffers": 0}
    store.end_layer(0)
    store.routing_counts[0][:] = torch.tensor([0, 0, 9, 8, 7, 0, 0, 0])
    assert store.rebalance() == 0                                          # re-pointing moves no byte
    assert sorted(store.cached[0]) == [2, 3, 4]
    for s, e in enumerate(store.cached[0]):
        assert store.cache[0][s].data_ptr() == store.host[0][e].data_ptr()


LOAD_PROBE = r"""
import json, sys, torch
from specmoe.runtime.memory_usage import peak_rss_bytes, reset_peak_rss, rss_bytes
from specmoe.runtime.model.expert_store import ExpertStore
from specmoe.runtime.model.target import TargetModel
from specmoe.runtime.weights.sources import WeightSource
path = sys.argv[1]
src = WeightSource.from_checkpoint(path)          # headers only; the libraries loaded before the baseline
src.expert(0, 0); src.release()
reset_peak_rss(); start = rss_bytes()
store = ExpertStore(src, torch.device("cpu"), torch.bfloat16, [8, 8])
target = TargetModel(src, store, torch.device("cpu"), torch.bfloat16)
maps = [l for l in open("/proc/self/maps") if path in l]
print(json.dumps({"start": start, "peak": peak_rss_bytes(), "end": rss_bytes(), "maps": maps,
                  "experts": store.memory_bytes()["host"]}))
"""


def _write(tmp_path: Path, layers: int) -> tuple[Path, int]:
    """A bf16 OLMoE-shaped checkpoint of `layers` layers (hidden 512, 16 experts of 1024) by the bench's writer."""
    spec = importlib.util.spec_from_file_location("engine_memory_bench", REPO / "bench" / "engine_memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    raw = json.loads((REPO / "planner" / "presets" / "olmoe-1b-7b.json").read_text())
    raw.update(hidden_size=512, intermediate_size=1024, num_experts=16, num_attention_heads=8,
               num_key_value_heads=8, vocab_size=1024)
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(raw))
    out = tmp_path / "ckpt"
    return out, bench.write_checkpoint(cfg, layers, out)


def test_loading_maps_nothing_and_peaks_at_the_footprint_plus_a_layer(tmp_path):
    ckpt, size = _write(tmp_path, 2)
    layer = 16 * 3 * 512 * 1024 * 2                                # one layer's experts in bf16: 48 MiB
    r = subprocess.run([sys.executable, "-c", LOAD_PROBE, str(ckpt)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["maps"] == []                                         # read with pread: no page of the file is mapped
    assert m["experts"] == 2 * layer
    final = m["end"] - m["start"]
    assert final >= 0.9 * size                                     # the weights are in place, once
    assert final <= size + 24 * 2 ** 20                            # ... and only once (24 MiB: allocator, objects)
    assert m["peak"] - m["start"] <= final + layer + 32 * 2 ** 20   # loading: the footprint plus about a layer


def test_run_record_memory_beside_the_footprint(tmp_path):
    t, d = make_pair(tmp_path, "olmoe", "llama", seed=2)
    plan = plan_for_checkpoint(t, d, "devbox-2core-calibrated", batch=2, draft_len=2, expert_cache_slots=[3, 8])
    eng = Engine(plan, t, d)
    rec = eng.generate([[3, 4, 5], [6, 7]], max_new_tokens=4).record
    mem = rec.memory
    # the load adds well under a MiB here, and the RSS may lose a page or two meanwhile (the OS drops clean
    # file-backed pages), so the start is compared with a MiB of slack
    assert mem["host_rss_start_bytes"] - 2 ** 20 <= mem["host_rss_loaded_bytes"] <= mem["host_rss_load_peak_bytes"]
    assert mem["host_rss_run_start_bytes"] <= mem["host_rss_peak_bytes"] and not mem["host_peak_is_lifetime"]
    assert mem["device_peak_allocated_bytes"] is None and mem["device_by_component"] == {}
    fp = mem["footprint"]
    assert fp["shares_host"] and fp["gpu_breakdown"]["expert_cache"] == 0 and fp["host_bytes"] > 0
    got, want = mem["host_by_component"], host_components(fp)
    # by hand: 2 MoE layers x 8 experts x 3 x 24 x 32 fp32 weights (hidden 32, expert width 24)
    assert got["experts"] == want["experts"] == 2 * 8 * 3 * 24 * 32 * 4
    # the planner leaves out OLMoE's q/k-norm weights (hidden + KV width per layer: 2 x 48 here), nothing else
    assert got["non_expert_weights"] - want["non_expert_weights"] == 2 * (32 + 16) * 4
    assert got["target_kv"] == want["target_kv"]
    assert got["draft"] == pytest.approx(want["draft"])
    assert got["activations"] == max(0, (mem["host_rss_peak_bytes"] - mem["host_file_rss_end_bytes"])
                                     - (mem["host_rss_run_start_bytes"] - mem["host_file_rss_run_start_bytes"]))
    assert mem["host_file_rss_start_bytes"] > 0 and mem["host_file_rss_end_bytes"] > 0   # torch's code at least
    assert json.loads(rec.to_json())["memory"]["host_by_component"] == got


def test_a_run_without_drafts_holds_the_draft_weights_and_no_draft_kv(tmp_path):
    """generate(draft_len=0) on an engine built for k = 2 never drafts: no draft KV, no draft prefill; the
    draft's weights stay loaded, and the run's footprint (what the report predicts) holds exactly those,
    so the two sides of the memory row agree (before: 0 predicted against the weights and the KV)."""
    t, d = make_pair(tmp_path, "olmoe", "llama", seed=2)
    plan = plan_for_checkpoint(t, d, "devbox-2core-calibrated", batch=2, draft_len=2, expert_cache_slots=[3, 8])
    eng = Engine(plan, t, d)
    with_k = eng.generate([[3, 4, 5], [6, 7]], max_new_tokens=4).record.memory
    res = eng.generate([[3, 4, 5], [6, 7]], max_new_tokens=4, draft_len=0)
    mem = res.record.memory
    weights = tensor_bytes(eng.draft, seen=set())                  # the draft's tensors, as the record counts them
    assert mem["host_by_component"]["draft"] == weights < with_k["host_by_component"]["draft"]
    assert host_components(mem["footprint"])["draft"] == pytest.approx(weights)
    assert mem["footprint"]["gpu_breakdown"]["draft_kv"] == 0 and mem["footprint"]["cpu_breakdown"]["draft_kv"] == 0
    plain = Engine(plan_for_checkpoint(t, None, "devbox-2core-calibrated", batch=2, draft_len=0,
                                       expert_cache_slots=[3, 8]), t, None)
    want = plain.generate([[3, 4, 5], [6, 7]], max_new_tokens=4)
    assert [o.token_ids for o in res.outputs] == [o.token_ids for o in want.outputs]


def test_memory_freed_before_a_run_counts_when_the_run_reuses_it():
    """A calibration before the run frees memory the C allocator keeps; a pass reusing it must still
    show as activations (the demo measured 0.03 MiB of 12.8 predicted before run_started released it)."""
    from specmoe.runtime.memory_usage import MemoryMeter, peak_rss_bytes
    chunk, n = 64 * 1024, 800                                      # 50 MiB from the C heap (below mmap's threshold)
    earlier = [bytearray(chunk) for _ in range(n)]
    pin = bytearray(chunk)                                         # keeps the freed chunks off the heap's top
    del earlier
    meter = MemoryMeter(torch.device("cpu"))
    meter.run_started()
    run = [bytearray(chunk) for _ in range(n)]                     # the run's buffers, in the freed chunks
    assert peak_rss_bytes() - meter.run_start_rss >= 0.8 * n * chunk
    del run, pin


def test_the_load_peak_starts_at_the_meter_not_at_earlier_work():
    """A calibration's peak earlier in the process must not show as the engine's load peak."""
    from specmoe.runtime.memory_usage import MemoryMeter
    earlier = torch.ones(64 * 2 ** 20 // 4)                        # 64 MiB touched and freed (mmap: returned)
    del earlier
    meter = MemoryMeter(torch.device("cpu"))
    weights = torch.ones(8 * 2 ** 20 // 4)                         # the "load": 8 MiB
    meter.loaded()
    assert meter.load_peak - meter.start_rss < 32 * 2 ** 20
    del weights


def test_file_backed_pages_paged_in_during_a_run_are_not_activations(tmp_path):
    """Library code paged in by a run's first passes (24 MiB of torch and tokenizer code in the demo) is
    file-backed RSS: the run's activations leave it out and count what the run allocated."""
    import mmap
    from specmoe.runtime.memory_usage import MemoryMeter, file_rss_bytes, peak_rss_bytes
    MiB = 2 ** 20
    path = tmp_path / "pages.bin"
    path.write_bytes(b"\x01" * (48 * MiB))
    meter = MemoryMeter(torch.device("cpu"))
    meter.run_started()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
        touched = sum(mm[i] for i in range(0, len(mm), 4096))          # every page resident, file-backed
        buf = torch.ones(16 * MiB // 4)                                # what the "run" allocates: 16 MiB
        assert touched == 48 * MiB // 4096
        assert file_rss_bytes() - meter.run_start_file >= 40 * MiB, "the mapped file's pages are file-backed RSS"
        assert peak_rss_bytes() - meter.run_start_rss >= 56 * MiB     # the RSS counts both
        assert 14 * MiB <= meter.activations() <= 24 * MiB            # the activations only the tensor
    del buf
