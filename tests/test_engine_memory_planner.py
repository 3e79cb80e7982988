"""Memory, planner side: on a host whose CPU stands in for the GPU (shares_host_cpu) every byte is counted
once (the expert cache and streaming buffers are views of the host store: 0 bytes), streaming costs
nothing, and the report puts the engine's measured memory beside the footprint, flagging a miss over 10%.
Worked by hand on the tiny target of tests/tiny_specs.py."""
from __future__ import annotations

import pytest

from specmoe.planner.cost_model import CostModel
from specmoe.planner.hardware_spec import parse_hardware
from specmoe.planner.memory import default_placement, device_components, footprint, host_components
from specmoe.planner.plan import Placement
from specmoe.planner.report.comparison import Row
from specmoe.planner.report.memory_rows import memory_rows, misses
from specmoe.planner.workload import Workload, load_acceptance
from tiny_specs import TINY_HW, tiny_target

# the tiny target (tests/tiny_specs.py): 2 layers, hidden 8, 4 experts of width 16; bf16
EXPERT_BYTES = 3 * 8 * 16 * 2            # 768 bytes per expert
ALL_EXPERTS = 2 * 4 * EXPERT_BYTES       # 6144 bytes


def shared_hw():
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY_HW.items()}
    raw["gpu"]["shares_host_cpu"] = True
    return parse_hardware(raw, "tiny-shared.yaml")


def gpu_hw():
    return parse_hardware({k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY_HW.items()}, "tiny.yaml")


@pytest.fixture
def wl():
    return Workload(prompt_len=4, gen_len=4, acceptance=load_acceptance(0.5), weight_dtype="bf16", kv_dtype="bf16")


def test_shared_host_counts_experts_once(wl):
    m = tiny_target()
    pl = Placement(expert_cache_slots=(1, 1), streaming_buffers=2)       # 3 of 4 experts stream per layer
    gpu = footprint(m, gpu_hw(), wl, 2, 0, pl)
    shared = footprint(m, shared_hw(), wl, 2, 0, pl)
    # a real GPU: 2 cached experts and two buffers of the 3 others, beside the host store of all 8
    assert gpu.gpu_breakdown["expert_cache"] == 2 * EXPERT_BYTES
    assert gpu.gpu_breakdown["streaming_buffers"] == 2 * 3 * EXPERT_BYTES
    assert gpu.cpu_breakdown["experts_pinned"] == ALL_EXPERTS
    assert not gpu.shares_host and gpu.host_bytes == gpu.cpu_bytes and gpu.device_bytes == gpu.gpu_bytes
    # the CPU standing in: cache and buffers are views of the host rows, so the experts count once
    assert shared.gpu_breakdown["expert_cache"] == 0 and shared.gpu_breakdown["streaming_buffers"] == 0
    assert shared.cpu_breakdown["experts_pinned"] == ALL_EXPERTS
    assert shared.host_bytes == shared.gpu_bytes + shared.cpu_bytes and shared.device_bytes == 0
    assert gpu.gpu_bytes - shared.gpu_bytes == 8 * EXPERT_BYTES        # 2 cached + 6 buffered, no longer held
    d = shared.to_dict()
    assert d["shares_host"] and d["host_bytes"] == shared.host_bytes
    comps = host_components(d)
    assert comps["experts"] == ALL_EXPERTS
    assert comps["non_expert_weights"] == m.non_expert_elems * 2
    assert sum(comps.values()) == pytest.approx(shared.host_bytes)     # every byte once, in one component
    assert device_components(d) == {}
    g = device_components(gpu.to_dict())
    assert g["experts"] == 8 * EXPERT_BYTES and sum(g.values()) == pytest.approx(gpu.gpu_bytes)


def test_shared_host_caches_every_expert_and_streams_for_free(wl):
    m = tiny_target()
    pl = default_placement(m, shared_hw(), wl, 2, 0)
    assert pl.expert_cache_slots == (4, 4)
    cm = CostModel(m, shared_hw(), wl, None)
    none_cached = Placement(expert_cache_slots=(0, 0))
    assert cm.iteration(2, 1, 0, none_cached).h2d_s.sum() == 0.0       # a reference, not a copy
    assert CostModel(m, gpu_hw(), wl, None).iteration(2, 1, 0, none_cached).h2d_s.sum() > 0


def _run(fp: dict, fw: dict, peak: float, components: dict) -> dict:
    MiB = 2 ** 20
    return {"memory": {"host_rss_start_bytes": 100 * MiB, "host_rss_load_peak_bytes": 100 * MiB + fw["host_bytes"],
                       "host_rss_peak_bytes": 100 * MiB + peak, "host_by_component": components,
                       "device_peak_allocated_bytes": None, "footprint": fp, "footprint_weights": fw}}


def test_memory_rows_and_the_miss_flag(wl):
    from specmoe.planner.plan import Plan

    m, hw = tiny_target(), shared_hw()
    pl = Placement(expert_cache_slots=(4, 4))
    fp = footprint(m, hw, wl, 2, 0, pl).to_dict()
    fw = footprint(m, hw, wl, 0, 0, pl).to_dict()
    plan = Plan.__new__(Plan)                # memory_rows reads only .memory and .hardware here
    object.__setattr__(plan, "memory", fp)
    object.__setattr__(plan, "hardware", hw.raw)
    comps = dict(host_components(fp))
    comps["activations"] = comps.get("activations", 0.0) * 1.5      # measured 1.5x the prediction: -33%
    rows = memory_rows(plan, _run(fp, fw, fp["host_bytes"], comps))
    by = {r.name: r for r in rows}
    assert by["host peak memory above start"].error_pct == pytest.approx(0.0)
    assert by["host load peak above start"].error_pct == pytest.approx(0.0)
    assert by["host experts"].predicted == ALL_EXPERTS / 2 ** 20
    assert by["host activations"].error_pct == pytest.approx((1 / 1.5 - 1) * 100)
    assert misses(rows) == []       # a few KiB of RSS: below what RSS resolves (RSS_FLOOR_MiB), not judged
    # the same miss at a size RSS resolves is flagged; exact tensor bytes are judged at any size
    assert misses([Row("host activations", "cpu", 100.0, 150.0, "MiB")]) == ["host activations"]
    assert misses([Row("host peak memory above start", "cpu", 42.7, 0.08, "MiB")]) == []   # the demo's warm engine
    assert misses([Row("host peak memory above start", "cpu", 142.7, 0.08, "MiB")]) == ["host peak memory above start"]
    assert misses([Row("host experts", "cpu", 10.0, 0.08, "MiB")]) == ["host experts"]
    assert misses([Row("x", "cpu", 109.0, 100.0, "MiB")]) == [] and misses([Row("x", "cpu", 111.0, 100.0, "MiB")])
    assert memory_rows(plan, {"stages": {}}) == []                  # a run record without memory: no rows


def test_memory_rows_leave_out_file_backed_pages(wl):
    """Library code the run pages in (file-backed RSS, recorded apart) is not the footprint's: the rows
    compare the rest. A record without the file-backed figures is read as it stands."""
    from specmoe.planner.plan import Plan

    MiB = 2 ** 20
    m, hw = tiny_target(), shared_hw()
    pl = Placement(expert_cache_slots=(4, 4))
    fp, fw = footprint(m, hw, wl, 2, 0, pl).to_dict(), footprint(m, hw, wl, 0, 0, pl).to_dict()
    plan = Plan.__new__(Plan)
    object.__setattr__(plan, "memory", fp)
    object.__setattr__(plan, "hardware", hw.raw)
    run = _run(fp, fw, fp["host_bytes"] + 24 * MiB, dict(host_components(fp)))   # + 24 MiB of torch's code
    run["memory"]["host_rss_load_peak_bytes"] += 3 * MiB                            # + 3 MiB paged in loading
    by = {r.name: r for r in memory_rows(plan, run)}
    assert by["host peak memory above start"].measured == pytest.approx(fp["host_bytes"] / MiB + 24)
    run["memory"].update(host_file_rss_start_bytes=40 * MiB, host_file_rss_loaded_bytes=43 * MiB,
                         host_file_rss_run_start_bytes=43 * MiB, host_file_rss_end_bytes=64 * MiB)
    by = {r.name: r for r in memory_rows(plan, run)}
    assert by["host peak memory above start"].error_pct == pytest.approx(0.0)
    assert by["host load peak above start"].error_pct == pytest.approx(0.0)
