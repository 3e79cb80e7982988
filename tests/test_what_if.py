"""planner.what_if: the roofline operations agree with the cost model, the sweeps move the way the
hardware says they must, the breakeven is a sign change, and the plans it builds are the best of
what it evaluated."""
from __future__ import annotations

import math

import numpy as np
import pytest

from specmoe.planner import Workload, load_acceptance
from specmoe.planner.report import plots as report_plots
from specmoe.planner.estimator import estimate
from specmoe.planner.plan import Plan
from specmoe.planner import what_if as wi
from tiny_specs import datasheet

M = "mixtral-8x7b"
H = datasheet("a30-xeon6426y")         # bare roofline: no fixed costs outside the ops
WL = Workload(566, 1024, acceptance=load_acceptance(0.8))
TARGET_STAGES = ("target.pre_attn", "target.attention", "target.post_attn", "target.moe", "target.h2d",
                 "target.lm_head", "verify.accept")


@pytest.mark.parametrize("model,hw,k,batch,mb", [(M, H, 2, 64, 2), (M, H, 0, 96, 4),
                                                 ("qwen1.5-moe-a2.7b", "h200-host", 3, 40, 2),
                                                 ("deepseek-v2-lite", "l4-host", 1, 30, 3)])
def test_iteration_ops_sum_to_the_cost_model_stages(model, hw, k, batch, mb):
    """With an even micro-batch split, every target stage's ops x counts give the cost model's time."""
    ops = wi.iteration_ops(model, hw, WL, draft_len=k, batch=batch, micro_batches=mb)
    e = estimate(model, hw, WL, draft_len=k, batch=batch, micro_batches=mb, run=False, timeline=False)
    tot = (ops.time_s * ops["count"]).groupby(ops.stage).sum()
    for s in TARGET_STAGES:
        assert tot.get(s, 0.0) == pytest.approx(e.stages[s], rel=1e-9, abs=1e-15), s
    assert set(ops.resource) <= {"gpu", "cpu", "pcie"}
    assert np.allclose(ops.intensity_flop_per_byte, ops.flops / ops.bytes)
    assert np.allclose(ops.achieved_flops * ops.time_s, ops.flops)


def test_ops_sit_under_their_roofs():
    ops = wi.iteration_ops(M, H, WL, draft_len=2, batch=64, micro_batches=2, use_measured=False)
    r = wi.roofs(H, use_measured=False, intensities=ops.intensity_flop_per_byte.to_numpy())
    for i, op in enumerate(ops.itertuples()):
        roof = r[(r.resource == op.resource)].flops.to_numpy()[i]
        assert op.achieved_flops <= roof * (1 + 1e-9), op.op
    fig = wi.roofline_chart(M, H, WL, draft_len=2, batch=64)
    assert len(fig.data) == 3 + ops.resource.nunique()


def test_throughput_grid_and_best_by_k():
    g = wi.throughput_grid(M, H, WL, ks=range(0, 4), batches=[16, 64, 586, 5000])
    assert len(g) == 16
    assert not g[g.batch == 5000].fits.any() and g[g.batch == 5000].decode_tokens_per_s.isna().all()
    for k in range(4):
        row = g[(g.draft_len == k) & g.fits].sort_values("batch")
        assert (np.diff(row.decode_tokens_per_s.to_numpy()) > 0).all()   # PCIe-bound: batch amortises the stream
    fig = report_plots.heatmap(g)
    assert fig.data[0].z.shape == (4, 4)
    b = wi.best_by_k(M, H, WL, ks=range(0, 4), micro_batches=(1, 2))
    assert list(b.draft_len) == [0, 1, 2, 3] and b.fits.all()


def test_sweeps_move_the_right_way():
    pcie = wi.sweep_pcie(M, H, WL, [4, 16, 64])
    assert (np.diff(pcie.k0_tokens_per_s) > 0).all()                          # more bandwidth, faster
    acc = wi.sweep_acceptance(M, H, WL, [0.05, 0.5, 0.9])
    assert acc.k0_tokens_per_s.nunique() == 1                                 # k = 0 ignores acceptance
    assert acc.best_k.iloc[0] == 0 and acc.best_k.iloc[-1] > 0
    assert (np.diff(acc.best_tokens_per_s) >= 0).all()
    cpu = wi.sweep_cpu_memory(M, H, WL, [64, 192, 384])
    assert not math.isfinite(cpu.k0_tokens_per_s.iloc[0])                     # experts alone do not fit in 64 GiB
    assert cpu.k0_batch.iloc[2] > cpu.k0_batch.iloc[1]
    gpu = wi.sweep_gpu_memory(M, H, WL, [24, 80])
    assert gpu.k0_tokens_per_s.iloc[1] > gpu.k0_tokens_per_s.iloc[0]         # more experts cached
    fig = report_plots.sweep(acc, "acceptance", "t", breakeven=0.2)
    assert len(fig.data) == 3 and list(fig.data[2].x) == [0.2, 0.2]     # best k, k = 0, the breakeven line
    with pytest.raises(ValueError, match="unknown sweep parameter"):
        wi.sweep(M, H, WL, "nvlink", [1])


def test_breakeven_is_a_sign_change():
    r = wi.speculation_breakeven(M, H, WL, "acceptance", ks=range(0, 5))
    a = r["value"]
    assert r["gain_lo"] < 0 < r["gain_hi"] and 0 < a < 0.99
    below = wi.sweep_acceptance(M, H, WL, [a - 0.01, a + 0.01], ks=range(0, 5))
    assert below.spec_tokens_per_s.iloc[0] < below.k0_tokens_per_s.iloc[0]
    assert below.spec_tokens_per_s.iloc[1] > below.k0_tokens_per_s.iloc[1]
    assert "stops paying at a per-token acceptance rate of" in wi.describe_breakeven(r)
    none = wi.speculation_breakeven(M, H, WL, "h2d_GBps", 8, 64, ks=range(0, 3))
    assert none["value"] is None and none["gain_lo"] > 0 and none["gain_hi"] > 0
    assert "pays over the whole range" in wi.describe_breakeven(none)


def test_plans_are_valid_and_best_of_their_grid(tmp_path):
    p = wi.choose_plan(M, H, WL, ks=range(0, 4), micro_batches=(1, 2), use_optimizer=False)
    assert p.solver["name"] == "grid"
    best = max(pt["decode_tokens_per_s"] for pt in p.frontier["by_k"])
    assert p.predicted.decode_tokens_per_s == pytest.approx(best)
    assert p.predicted.timeline
    p.to_json(tmp_path / "p.json")
    assert Plan.from_json(tmp_path / "p.json").input_hashes == p.input_hashes
    f = wi.fixed_plan(M, H, WL, draft_len=2, batch=32, micro_batches=2, frontier_ks=range(0, 3))
    assert (f.batch, f.micro_batches, f.draft_len) == (32, 2, 2)
    assert [x["draft_len"] for x in f.frontier["by_k"]] == [0, 1, 2]
    assert f.frontier["by_k"][2]["decode_tokens_per_s"] == pytest.approx(f.predicted.decode_tokens_per_s)


def test_job_size_sweep_caps_the_batch_and_prices_the_drain():
    """Against the job's prompts: the batch never exceeds them, throughput at a job the size of the
    batch is below the open stream's (the batch drains), and a bad count is refused."""
    from specmoe.planner import Workload, load_acceptance, what_if
    from specmoe.planner.errors import SpecError

    wl = Workload(566, 1024, acceptance=load_acceptance(0.8))
    df = what_if.sweep_job_size("mixtral-8x7b", "a30-xeon6426y", wl, [16, 709])
    assert (df.k0_batch <= df.num_prompts).all() and (df.best_batch <= df.num_prompts).all()
    stream = what_if.best_by_k("mixtral-8x7b", "a30-xeon6426y", wl, ks=[4], batch=709)
    job = what_if.best_by_k("mixtral-8x7b", "a30-xeon6426y", Workload(566, 1024, acceptance=load_acceptance(0.8),
                                                                       num_prompts=709), ks=[4], batch=709)
    assert job.decode_tokens_per_s[0] < stream.decode_tokens_per_s[0]
    assert job.steady_decode_tokens_per_s[0] == pytest.approx(stream.decode_tokens_per_s[0])
    assert job.mean_live_batch[0] < 709
    with pytest.raises(SpecError, match="num_prompts"):
        what_if.sweep_job_size("mixtral-8x7b", "a30-xeon6426y", wl, [0])
