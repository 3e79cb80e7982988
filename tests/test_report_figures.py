"""The report's and notebooks' figures (planner/report/plots.py): what each draws, checked on its data, and
every figure rendered to PNG in headless Chromium (skipped where Chromium is not installed)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from engine_fixtures import one_thread_per_module  # noqa: F401 (autouse: one torch thread)
from specmoe.planner.report import plots


def _ev(stage, start, end, res="gpu"):
    return {"stage": stage, "resource": res, "layer": 0, "micro_batch": 0, "start_s": start, "end_s": end}


def test_merge_events_joins_adjacent_bars_of_one_stage():
    evs = [_ev("target.moe", 0.0, 1.0), _ev("target.moe", 1.001, 2.0), _ev("target.attention", 2.0, 3.0, "cpu"),
           _ev("target.moe", 3.5, 4.0)]
    out = plots.merge_events(evs, gap_s=0.01)
    assert [(e["stage"], e["start_s"], e["end_s"]) for e in out] == [
        ("target.moe", 0.0, 2.0), ("target.attention", 2.0, 3.0), ("target.moe", 3.5, 4.0)]
    assert out[0]["layer"] == -1 and evs[0]["end_s"] == 1.0          # inputs untouched


def test_a_long_timeline_is_drawn_one_row_per_stage():
    many = [_ev("target.moe" if i % 2 else "target.pre_attn", i * 0.01, i * 0.01 + 0.009) for i in range(400)]
    fig = plots.gantt(many, "measured")
    assert "one row per stage" in fig.layout.title.text
    assert {y for tr in fig.data for y in tr.y} == {"target.moe", "target.pre_attn"}
    assert sum(len(tr.x) for tr in fig.data) < 400                   # merged
    few = plots.gantt(many[:10], "measured")
    assert {y for tr in few.data for y in tr.y} == {"gpu"} and "one row per stage" not in few.layout.title.text


def test_sweep_breakeven_on_a_log_axis_stays_in_range():
    df = pd.DataFrame({"h2d_GBps": [4.0, 16.0, 64.0], "best_tokens_per_s": [10.0, 30.0, 60.0],
                       "k0_tokens_per_s": [8.0, 28.0, 61.0], "best_k": [4, 2, 0]})
    fig = plots.sweep(df, "h2d_GBps", "t", log_x=True, breakeven=48.0)
    assert not fig.layout.shapes                                      # no layout line read as 10^48
    line = [tr for tr in fig.data if tr.name.startswith("speculation stops paying")][0]
    assert list(line.x) == [48.0, 48.0] and list(line.y) == [8.0, 61.0]
    assert fig.layout.xaxis.title.text == "host-to-device GB/s (log)" and fig.layout.xaxis.type == "log"


def test_heatmap_marks_the_chosen_plan_at_the_nearest_batch():
    grid = pd.DataFrame([{"draft_len": k, "batch": b, "decode_tokens_per_s": float(k * b)}
                         for k in (0, 1, 2) for b in (64, 128, 256)])
    fig = plots.heatmap(grid, chosen=(128, 2))
    star = fig.data[-1]
    assert list(star.x) == ["128"] and list(star.y) == [2] and list(star.text) == ["plan"]
    assert list(plots.heatmap(grid, chosen=(150, 1)).data[-1].text) == ["plan (batch 150)"]
    assert fig.data[0].colorbar.title.text == "decode tokens/s"


def test_roofline_labels_only_the_longest_operations():
    ops = pd.DataFrame([{"op": f"op{i}", "resource": "gpu", "intensity_flop_per_byte": 1.0 + i,
                         "achieved_flops": 1e9 * (i + 1), "time_s": i * 1e-3, "bound": "memory"} for i in range(10)])
    roofs = pd.DataFrame([{"resource": "gpu", "intensity_flop_per_byte": x, "flops": 1e12} for x in (0.1, 100.0)])
    fig = plots.roofline(ops, roofs)
    labels = [t for tr in fig.data if tr.mode == "markers+text" for t in tr.text if t]
    assert sorted(labels) == sorted(f"op{i}" for i in range(10 - plots.ROOFLINE_LABELS, 10))


def test_the_run_record_keeps_a_measured_timeline(tmp_path):
    from engine_fixtures import add_tokenizer, make_pair
    from specmoe.runtime.engine import Engine, plan_for_checkpoint

    t, d = make_pair(tmp_path, "mixtral", "llama", seed=3)
    add_tokenizer(t)
    eng = Engine(plan_for_checkpoint(t, d, "devbox-2core", batch=3, draft_len=2), t, d)
    rec = eng.generate([[5, 6, 7], [40], [9, 10]], max_new_tokens=6).record
    tl = rec.timeline
    stages = {e["stage"] for e in tl}
    assert {"target.pre_attn", "target.attention", "target.moe", "draft.gpu", "verify.accept"} <= stages
    assert all(0 <= e["start_s"] <= e["end_s"] for e in tl)
    assert all(e["resource"] == ("cpu" if e["stage"] == "target.attention" else "gpu") for e in tl
               if e["stage"] != "draft.cpu")
    assert max(e["end_s"] for e in tl) < 10 * rec.stages["iteration"]      # one iteration, not the run
    assert sum(e["stage"] == "target.moe" for e in tl) == eng.target.config.num_layers


def _screenshot(html: Path, png: Path) -> int:
    """Render html in headless Chromium to png; the PNG's size in bytes (a blank page compresses to little)."""
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=900,650", "--virtual-time-budget=4000", f"--screenshot={png}", html.as_uri()],
                   capture_output=True, timeout=120)
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    return png.stat().st_size


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Chromium (Debian package chromium) not installed")
def test_every_figure_renders_to_png(tmp_path):
    grid = pd.DataFrame([{"draft_len": k, "batch": b, "decode_tokens_per_s": float(k + b)}
                         for k in (0, 1) for b in (8, 16)])
    df = pd.DataFrame({"h2d_GBps": [4.0, 16.0], "best_tokens_per_s": [1.0, 2.0], "k0_tokens_per_s": [1.0, 1.5],
                       "best_k": [1, 2]})
    figs = {"gantt": plots.gantt([_ev("target.moe", 0.0, 0.002)], "measured"),
            "sweep": plots.sweep(df, "h2d_GBps", "sweep", log_x=True, breakeven=8.0),
            "heatmap": plots.heatmap(grid, chosen=(8, 1)),
            "throughput": plots.throughput_vs_k([{"draft_len": 0, "decode_tokens_per_s": 10.0}], 0, 10.0,
                                                measured=[(0, 9.0, 8.0, 10.0)]),
            "stage_bars": plots.stage_bars(SimpleNamespace(stages=[
                SimpleNamespace(name="target.moe", predicted=0.004, measured=0.005, error_pct=-20.0),
                SimpleNamespace(name="iteration", predicted=0.009, measured=0.010, error_pct=-10.0)])),
            "prefill_bars": plots.prefill_bars(SimpleNamespace(prefill_stages=[
                SimpleNamespace(name="target.moe", predicted=0.030, measured=0.033, error_pct=-9.1),
                SimpleNamespace(name="outside the stages", predicted=0.009, measured=0.010, error_pct=-10.0)])),
            "live_batch": plots.live_batch([8.0, 7.5, 6.0], [8, 7, 5], 8),
            "acceptance": plots.acceptance_bars({"k": 2, "measured": {"0": 3, "1": 5, "2": 2},
                                                 "planned": {"0": 0.3, "1": 0.4, "2": 0.3}}),
            "roofline": plots.roofline(
                pd.DataFrame([{"op": "moe", "resource": "gpu", "intensity_flop_per_byte": 4.0, "achieved_flops": 1e12,
                               "time_s": 1e-3, "bound": "memory"}]),
                pd.DataFrame([{"resource": "gpu", "intensity_flop_per_byte": x, "flops": min(1e14, 3e12 * x)}
                              for x in (0.1, 10.0, 1000.0)]))}
    (tmp_path / "blank.html").write_text("<html><body></body></html>")
    blank = _screenshot(tmp_path / "blank.html", tmp_path / "blank.png")
    for name, fig in figs.items():
        html = tmp_path / f"{name}.html"
        fig.write_html(str(html), include_plotlyjs=True)
        assert _screenshot(html, tmp_path / f"{name}.png") > 3 * blank, f"{name} rendered (almost) blank"
