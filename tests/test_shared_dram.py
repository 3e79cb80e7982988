"""Host DRAM shared by the expert stream and CPU attention (planner/shared_dram.py, DESIGN.md: 67 -> 53
GB/s of CPU DRAM read on the H200 host while H2D streamed).

The expected values are worked by hand below, or by brute force: a fixed-step integration of the
events' progress at their current rates, independent of the event scheduler's exact arithmetic.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest

from specmoe.planner.cost_model import CostModel
from specmoe.planner.errors import SpecError
from specmoe.planner.event_dag import Dag
from specmoe.planner.hardware_spec import HardwareSpec, parse_hardware
from specmoe.planner.model_spec import load_model
from specmoe.planner.plan import Placement
from specmoe.planner.roofline import OpCost, time_on, dram_sharing
from specmoe.planner.schedule import default_schedule
from specmoe.planner.shared_dram import SharedDram
from specmoe.planner.simulator import simulate_iteration
from specmoe.planner.workload import Workload, load_acceptance


def tiny_hw(**measured):
    """A host where every rate is 1e9 per second, so an operation takes max(flops, bytes) nanoseconds."""
    raw = {"name": "tiny-1g",
           "gpu": {"name": "g", "mem_GiB": 64, "hbm_GBps": 1, "peak_TFLOPs": {"bf16": 0.001}, "source": "test"},
           "cpu": {"name": "c", "cores": 1, "mem_GiB": 64, "dram_GBps": 1, "peak_TFLOPs": {"bf16": 0.001},
                   "source": "test"},
           "link": {"h2d_GBps": 1, "source": "test"}}
    if measured:
        raw["measured"] = dict(source="test", **measured)
    return parse_hardware(raw, "tiny.yaml")


H200_JSON = {"cpu_read_GBps_alone": 67.6, "cpu_read_GBps_during_h2d": 52.9, "h2d_GBps_alone": 52.4,
             "h2d_GBps_during_cpu_read": 49.9}


# ---- the spec ----
def test_h200_specs_carry_the_measured_contention():
    for name in ("h200-host", "h200-host-calibrated"):
        c = HardwareSpec.preset(name).measured.dram_contention
        assert c.cpu_share == pytest.approx(52.9 / 67.6) and c.h2d_share == pytest.approx(49.9 / 52.4)
    assert HardwareSpec.preset("a30-xeon6426y").measured.dram_contention is None


@pytest.mark.parametrize("change, field", [
    ({"h2d_GBps_alone": None}, "dram_contention.h2d_GBps_alone"),
    ({"cpu_read_GBps_during_h2d": 0}, "dram_contention.cpu_read_GBps_during_h2d"),
    ({"extra_GBps": 1.0}, "dram_contention.extra_GBps"),
    # keeps 0.4 + 0.5 < 1: both together slower than in turns
    ({"cpu_read_GBps_during_h2d": 0.4 * 67.6, "h2d_GBps_during_cpu_read": 0.5 * 52.4}, "dram_contention"),
])
def test_bad_contention_is_refused_with_the_field(change, field):
    d = {k: v for k, v in {**H200_JSON, **change}.items() if v is not None}
    with pytest.raises(SpecError) as e:
        tiny_hw(dram_contention=d)
    assert e.value.field.endswith(field)


# ---- one operation ----
def _contended(f_cpu: float, **measured):
    """The tiny host (every rate 1e9/s) with the CPU keeping f_cpu of its DRAM rate beside the stream."""
    return tiny_hw(dram_contention={"cpu_read_GBps_alone": 2.0, "cpu_read_GBps_during_h2d": 2.0 * f_cpu,
                                    "h2d_GBps_alone": 1.0, "h2d_GBps_during_cpu_read": 1.0}, **measured)


@pytest.mark.parametrize("flops, want", [
    (10.0, (2.0, 1.0)),          # DRAM-bound: 100 ns of reads at half the rate take 200 ns
    (150.0, (4 / 3, 2 / 3)),     # 150 ns of compute, its 100 ns of reads become 200: 200 / 150
    (300.0, (1.0, 1 / 3)),       # compute-bound even at half the DRAM rate
])
def test_roofline_sharing_by_hand(flops, want):
    hw = _contended(0.5)
    op = OpCost(flops=flops, dram_bytes=100.0)
    got = dram_sharing(hw, op, time_on("cpu", hw, op, dtype="bf16"))
    assert got == pytest.approx(want)
    # no contention measured, or measured numbers switched off: no sharing
    assert dram_sharing(tiny_hw(), op, time_on("cpu", tiny_hw(), op, dtype="bf16")) == (1.0, 0.0)
    assert dram_sharing(hw, op, time_on("cpu", hw, op, dtype="bf16"), use_measured=False) == (1.0, 0.0)


def test_measured_attention_curve_is_bounded_by_its_one_query_rate():
    """With a KV-GB/s curve the kernel's DRAM ceiling is its rate at one query (2 GB/s here): at four
    queries it reads at 1 GB/s, half that ceiling (pressure 0.5); beside the stream the ceiling is
    f_cpu x 2 GB/s, which slows it only when f_cpu < 0.5."""
    curve = {"q1": {512: 2.0}, "q4": {512: 1.0}}
    op = OpCost(flops=1.0, dram_bytes=1e6)
    for f, n_q, want in ((0.4, 4, (1.25, 0.5)), (0.6, 4, (1.0, 0.5)), (0.4, 1, (2.5, 1.0))):
        hw = _contended(f, cpu_attention_kv_GBps=curve)
        ot = time_on("cpu", hw, op, kind="attention", n_query=n_q, context=512)
        assert dram_sharing(hw, op, ot, kind="attention", context=512) == pytest.approx(want)


# ---- the event scheduler ----
def test_two_events_side_by_side_by_hand():
    # CPU 1 s at stretch 1.25, copy 1 s at stretch 1.05: the copy ends at 1.05, having let the CPU do
    # 1.05 / 1.25 = 0.84 s of its work; the last 0.16 s run alone
    d = Dag()
    a = d.add("cpu", 1.0, (), "a", share=(1.25, 1.0))
    b = d.add("pcie", 1.0, (), "b", share=(1.05, 1.0))
    _, end = d.schedule()
    assert end[a] == pytest.approx(1.21) and end[b] == pytest.approx(1.05)
    # a compute-bound CPU event (stretch 1, pressure 0.5) slows the copy by 1 + 0.05 x 0.5 until it ends
    d = Dag()
    a = d.add("cpu", 1.0, (), "a", share=(1.0, 0.5))
    b = d.add("pcie", 1.0, (), "b", share=(1.05, 1.0))
    _, end = d.schedule()
    assert end[a] == pytest.approx(1.0) and end[b] == pytest.approx(1.0 + (1.0 - 1.0 / 1.025))
    # a chain: the second CPU event starts when the copy is over and runs alone
    d = Dag()
    c1 = d.add("cpu", 0.5, (), "c1", share=(2.0, 1.0))
    c2 = d.add("cpu", 0.5, (c1,), "c2", share=(2.0, 1.0))
    d.add("pcie", 1.0, (), "p", share=(1.0, 1.0))
    start, end = d.schedule()
    assert (end[c1], start[c2], end[c2]) == pytest.approx((1.0, 1.0, 1.5))


def _integrate(chains: dict[str, list[tuple[float, float, float]]], dt: float) -> dict[str, list[float]]:
    """Brute force: a cpu chain and a pcie chain of (seconds alone, stretch, pressure) events, advanced
    in steps of dt at 1 / (1 + (stretch - 1) x the other side's pressure) while both run."""
    pos = {r: 0 for r in chains}
    left = {r: chains[r][0][0] if chains[r] else 0.0 for r in chains}
    ends: dict[str, list[float]] = {r: [] for r in chains}
    t = 0.0
    while any(pos[r] < len(chains[r]) for r in chains):
        run = {r: chains[r][pos[r]] for r in chains if pos[r] < len(chains[r])}
        for r, (_, stretch, _) in run.items():
            other = [run[o][2] for o in run if o != r]
            slow = 1.0 + (stretch - 1.0) * (other[0] if other else 0.0)
            left[r] -= dt / slow
        t += dt
        for r in run:
            if left[r] <= 0:
                ends[r].append(t)
                pos[r] += 1
                left[r] += chains[r][pos[r]][0] if pos[r] < len(chains[r]) else 0.0
    return ends


@pytest.mark.parametrize("seed", range(6))
def test_scheduler_matches_brute_force_integration(seed):
    rng = np.random.default_rng(seed)
    chains = {r: [(float(rng.uniform(0.05, 0.5)), float(rng.uniform(1.0, 1.6)) if r == "cpu" else 1.08,
                   float(rng.uniform(0.0, 1.0)) if r == "cpu" else 1.0) for _ in range(int(rng.integers(2, 6)))]
              for r in ("cpu", "pcie")}
    d = Dag()
    ids = {}
    for r, events in chains.items():
        prev = None
        ids[r] = []
        for dur, stretch, pressure in events:
            prev = d.add(r, dur, (prev,), r, share=(stretch, pressure))
            ids[r].append(prev)
    _, end = d.schedule()
    want = _integrate(chains, 2e-5)
    for r in chains:
        assert [end[i] for i in ids[r]] == pytest.approx(want[r], abs=2e-4)


@pytest.mark.parametrize("seed", range(8))
def test_pair_lines_are_the_brute_force_time(seed):
    """The closed form's pair max(t_c + a t_h, t_h + b t_c) is the time of one CPU event and one copy
    starting together (brute force), whichever ends first."""
    rng = np.random.default_rng(100 + seed)
    t_c, t_h = rng.uniform(0.1, 1.0, 2)
    stretch, pressure = float(rng.uniform(1.0, 1.5)), float(rng.uniform(0.0, 1.0))
    sd = SharedDram(attn_cpu=(stretch, pressure), moe_cpu=(1.0, 0.0), draft_cpu=(), pcie_stretch=1.2)
    a, b = sd.pair_coefficients(sd.attn_cpu)
    ends = _integrate({"cpu": [(t_c, stretch, pressure)], "pcie": [(t_h, 1.2, 1.0)]}, 1e-5)
    assert max(t_c + a * t_h, t_h + b * t_c) == pytest.approx(max(ends["cpu"][0], ends["pcie"][0]), abs=5e-5)


# ---- the cost model and the simulator on the H200 host, its experts streaming ----
@pytest.fixture(scope="module")
def h200_streaming():
    """Mixtral-8x7B on the H200 host with 40 GiB of GPU memory (so most experts stream), k = 0, two
    micro-batches, the engine's schedule; the same without the contention field."""
    hw = HardwareSpec.preset("h200-host").with_overrides(gpu_mem_GiB=40)
    raw = copy.deepcopy(hw.raw)
    raw["measured"].pop("dram_contention")
    hw0 = parse_hardware(raw, "h200-no-contention.yaml")
    m = load_model("mixtral-8x7b")
    wl = Workload(prompt_len=512, gen_len=256, acceptance=load_acceptance(0.8))
    pl = Placement(expert_cache_slots=(0,) * m.num_layers)
    out = {}
    for key, h in (("shared", hw), ("alone", hw0)):
        cm = CostModel(m, h, wl, schedule=default_schedule(h))
        c = cm.iteration(128, 2, 0, pl)
        out[key] = (c, simulate_iteration(c, pl, prefetch=True))
    return hw.measured.dram_contention, out


def test_without_the_field_nothing_changes(h200_streaming):
    _, out = h200_streaming
    c, sim = out["alone"]
    assert c.shared_dram is None
    assert c.layer_time_s == pytest.approx(np.maximum(np.maximum(c.pcie_s, c.cpu_s), c.gpu_s), rel=1e-15)
    assert sim.stages["target.attention"] == pytest.approx(c.attn_cpu_s.sum(), rel=1e-12)


def test_pcie_bound_iteration_slows_attention_by_the_measured_share(h200_streaming):
    """k = 0 attention is DRAM-bound (4 flops per KV byte, far under the CPU's 1 TFLOP/s / 67.6 GB/s), so
    its stretch is 1 / f_cpu and its pressure 1. The iteration is PCIe-bound: copies run back to back,
    so every attention event runs beside one: attention takes alone / f_cpu, and the copies, moving at
    f_h2d of their rate while it runs, lose (1 - f_h2d) of the attention's time."""
    c, out = h200_streaming
    (cs, ss), (ca, sa) = out["shared"], out["alone"]
    assert cs.shared_dram.attn_cpu == pytest.approx((67.6 / 52.9, 1.0))
    assert sa.bound == "pcie"
    att = ss.stages["target.attention"]
    assert att == pytest.approx(sa.stages["target.attention"] * 67.6 / 52.9, rel=1e-9)
    assert ss.stages["target.h2d"] == pytest.approx(sa.stages["target.h2d"] + (1.0 - 49.9 / 52.4) * att, rel=1e-9)
    assert ss.iteration_time_s > sa.iteration_time_s
    # the closed form sees it too: per layer max(t_c + a t_h, t_h + b t_c, t_gpu)
    a, b = cs.shared_dram.pair_coefficients(cs.shared_dram.attn_cpu)
    t_c, t_h = cs.cpu_s, cs.pcie_s
    assert cs.layer_time_s == pytest.approx(np.maximum(np.maximum(t_c + a * t_h, t_h + b * t_c), cs.gpu_s))
    assert cs.closed_form_time_s > ca.closed_form_time_s


def test_the_milp_prices_shared_dram_as_the_closed_form_does():
    """The optimizer's MILP carries the pair's rows: at the placement it decodes, its objective is the
    closed form's (which has the pair's lines), and the contention costs the best plan time."""
    from specmoe.planner.optimizer import optimize

    hw = HardwareSpec.preset("h200-host").with_overrides(gpu_mem_GiB=40)
    raw = copy.deepcopy(hw.raw)
    raw["measured"].pop("dram_contention")
    wl = Workload(prompt_len=512, gen_len=256, acceptance=load_acceptance(0.8))
    plans = [optimize("mixtral-8x7b", h, wl, k_values=[0, 2], micro_batch_values=[2], alternatives=0,
                      timeline=False) for h in (hw, parse_hardware(raw, "h200-no-contention.yaml"))]
    for p in plans:
        assert p.solver["closed_form_check_rel_err"] < 1e-6
    # every configuration's closed form only rises with the pair's lines, so the best throughput falls
    assert plans[0].solver["closed_form_tokens_per_s"] < plans[1].solver["closed_form_tokens_per_s"]
