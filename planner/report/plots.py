"""Plotly figure builders for the report and the notebooks. Each takes plain data (the report's
Comparison, timeline event dicts, pandas DataFrames from planner.what_if) and returns a
plotly.graph_objects.Figure; nothing here computes a model quantity.

Times are shown in milliseconds, throughput in tokens/s, rates in FLOP/s.
"""
from __future__ import annotations

from typing import Any

import plotly.graph_objects as go

from specmoe.planner.stages import ITERATION_PARTS, Stage

RESOURCE_ROWS = ("pcie", "cpu", "gpu")
_PALETTE = ("#4C78A8", "#F58518", "#54A24B", "#E45756", "#72B7B2", "#EECA3B", "#B279A2", "#FF9DA6", "#9D755D")
STAGE_COLORS: dict[str, str] = {s.value: _PALETTE[i % len(_PALETTE)] for i, s in enumerate(ITERATION_PARTS)}
RESOURCE_COLORS = {"gpu": "#54A24B", "cpu": "#4C78A8", "pcie": "#E45756"}
_LAYOUT = dict(template="plotly_white", margin=dict(l=60, r=20, t=50, b=50), height=420)


def stage_bars(cmp) -> go.Figure:
    """Predicted and measured milliseconds per iteration of every stage, side by side (a linear axis: bars
    on a log axis exaggerate the small stages)."""
    return _bars([r for r in cmp.stages if r.name != Stage.PREFILL.value],
                 "Milliseconds per decode iteration, by stage (error = predicted vs measured)", "ms per iteration")


def prefill_bars(cmp) -> go.Figure:
    """The prefill by part (cmp.prefill_stages): predicted and measured milliseconds of each target stage, the
    draft's own prefill and the time outside them, side by side."""
    return _bars(cmp.prefill_stages, "Milliseconds of the prefill, by stage (error = predicted vs measured)",
                 "ms of the prefill")


def _bars(rows, title: str, y_title: str) -> go.Figure:
    names = [r.name for r in rows]
    err = ["" if r.error_pct is None else f"{r.error_pct:+.0f}%" for r in rows]
    fig = go.Figure([
        go.Bar(name="predicted", x=names, y=[r.predicted * 1e3 for r in rows], marker_color="#9ecae9"),
        go.Bar(name="measured", x=names, y=[(r.measured or 0.0) * 1e3 for r in rows], marker_color="#3366aa",
               text=err, textposition="outside"),
    ])
    fig.update_layout(barmode="group", title=title, yaxis_title=y_title, **_LAYOUT)
    return fig


GANTT_MAX_BARS = 150      # beyond this a timeline is drawn one row per stage, adjacent bars merged


def merge_events(timeline: list[dict], gap_s: float) -> list[dict]:
    """Events of the same stage and resource closer than gap_s joined into one (a long iteration's hundreds
    of per-layer bars would otherwise read as a barcode)."""
    out: list[dict] = []
    last: dict[tuple, dict] = {}
    for ev in sorted(timeline, key=lambda e: e["start_s"]):
        key = (str(ev["stage"]), ev["resource"])
        prev = last.get(key)
        if prev is not None and ev["start_s"] - prev["end_s"] <= gap_s:
            prev["end_s"] = max(prev["end_s"], ev["end_s"])
            prev["layer"], prev["micro_batch"] = -1, -1
            continue
        cur = {**ev, "stage": key[0]}
        out.append(cur)
        last[key] = cur
    return out


def gantt(timeline: list[dict], label: str = "predicted") -> go.Figure:
    """One iteration as bars on the gpu / cpu / pcie rows, coloured by stage; with more than GANTT_MAX_BARS
    events, one row per stage with adjacent bars merged. Events: {stage, resource, layer, micro_batch,
    start_s, end_s} (a negative start is work the previous iteration prefetched)."""
    fig = go.Figure()
    end = max((ev["end_s"] for ev in timeline), default=0.0)
    start = min((ev["start_s"] for ev in timeline), default=0.0)
    by_stage_rows = len(timeline) > GANTT_MAX_BARS
    if by_stage_rows:
        timeline = merge_events(timeline, 0.01 * (end - start))
    by_stage: dict[str, list[dict]] = {}
    for ev in timeline:
        by_stage.setdefault(str(ev["stage"]), []).append(ev)
    order = sorted(by_stage, key=lambda s: list(STAGE_COLORS).index(s) if s in STAGE_COLORS else 99)
    for stage in order:
        evs = by_stage[stage]
        fig.add_trace(go.Bar(
            name=stage, orientation="h", y=[stage if by_stage_rows else ev["resource"] for ev in evs],
            x=[(ev["end_s"] - ev["start_s"]) * 1e3 for ev in evs], base=[ev["start_s"] * 1e3 for ev in evs],
            marker_color=STAGE_COLORS.get(stage, "#888"), marker_line_width=0.3, marker_line_color="white",
            customdata=[[ev.get("layer", -1), ev.get("micro_batch", -1), ev["start_s"] * 1e3,
                         (ev["end_s"] - ev["start_s"]) * 1e3] for ev in evs],
            hovertemplate=(f"{stage}<br>layer %{{customdata[0]}}, micro-batch %{{customdata[1]}}<br>"
                           "start %{customdata[2]:.3f} ms, %{customdata[3]:.3f} ms<extra></extra>")))
    fig.update_layout(barmode="overlay", title=f"{label.capitalize()} timeline of one decode iteration "
                      f"({end * 1e3:.2f} ms)" + (", one row per stage" if by_stage_rows else ""),
                      xaxis_title="ms from the iteration's start", **_LAYOUT)
    fig.update_yaxes(categoryorder="array", categoryarray=list(reversed(order)) if by_stage_rows
                     else list(RESOURCE_ROWS))
    return fig


def throughput_vs_k(by_k: list[dict], plan_k: int, plan_tps: float, run_k: int | None = None,
                    run_tps: float | None = None,
                    measured: list[tuple[int, float, float, float]] | None = None) -> go.Figure:
    """Predicted decode throughput against k, the plan's point and the measured point(s): `measured` is
    (k, mean tokens/s, lowest run, highest run) of each mode a demo ran (bars span the runs); without it,
    the one run's (run_k, run_tps)."""
    fig = go.Figure(go.Scatter(x=[p["draft_len"] for p in by_k], y=[p["decode_tokens_per_s"] for p in by_k],
                               mode="lines+markers", name="predicted"))
    fig.add_trace(go.Scatter(x=[plan_k], y=[plan_tps], mode="markers", name=f"plan (k={plan_k})",
                             marker=dict(size=13, symbol="diamond", color="#F58518")))
    if measured:
        fig.add_trace(go.Scatter(
            x=[m[0] for m in measured], y=[m[1] for m in measured], mode="markers", name="measured (all runs)",
            marker=dict(size=14, symbol="star", color="#E45756"),
            error_y=dict(type="data", symmetric=False, array=[m[3] - m[1] for m in measured],
                         arrayminus=[m[1] - m[2] for m in measured], color="#E45756")))
    elif run_k is not None and run_tps is not None:
        fig.add_trace(go.Scatter(x=[run_k], y=[run_tps], mode="markers", name=f"measured (k={run_k})",
                                 marker=dict(size=14, symbol="star", color="#E45756")))
    fig.update_layout(title="Decode throughput against draft length k", xaxis_title="draft length k",
                      yaxis_title="decode tokens/s", **_LAYOUT)
    return fig


def live_batch(predicted: list[float] | None, measured: list[int], batch: int) -> go.Figure:
    """Live sequences per decode iteration: the run's counts and the drain the planner predicted
    (planner/batch_drain.py: expected live sequences of a static batch)."""
    fig = go.Figure(go.Scatter(x=list(range(1, len(measured) + 1)), y=list(measured), mode="lines+markers",
                               name="measured", line={"color": "#d62728"}, marker={"size": 4}))
    if predicted:
        fig.add_trace(go.Scatter(x=list(range(1, len(predicted) + 1)), y=list(predicted), mode="lines",
                                 name="predicted (expected)", line={"color": "#1f77b4", "dash": "dash"}))
    fig.update_layout(title=f"Live sequences per decode iteration (batch {batch}): how the job's batch drains",
                      xaxis_title="decode iteration", yaxis_title="live sequences", **_LAYOUT)
    fig.update_yaxes(rangemode="tozero")
    return fig


def acceptance_bars(acc: dict[str, Any]) -> go.Figure:
    """Measured share of verified sequences by accepted drafts, against the planned distribution."""
    k = acc["k"]
    xs = [str(j) for j in range(k + 1)]
    hist = acc["measured"]
    n = sum(hist.values()) or 1
    fig = go.Figure([go.Bar(name="planned", x=xs, y=[acc["planned"].get(j, 0.0) for j in xs], marker_color="#9ecae9"),
                     go.Bar(name="measured", x=xs, y=[hist.get(j, 0) / n for j in xs], marker_color="#3366aa")])
    fig.update_layout(barmode="group", title=f"Accepted drafts per verified sequence (k={k}, {n} verifications)",
                      xaxis_title="accepted drafts", yaxis_title="share", **_LAYOUT)
    return fig


ROOFLINE_LABELS = 6      # only the operations that take the most time are labelled (hover names the rest)


def roofline(ops, roofs) -> go.Figure:
    """Every operation of one iteration at (arithmetic intensity, achieved FLOP/s) on its resource,
    with each resource's roof. ops: DataFrame with op, resource, intensity_flop_per_byte,
    achieved_flops, time_s, bound; roofs: DataFrame with resource, intensity_flop_per_byte, flops."""
    fig = go.Figure()
    for res, g in roofs.groupby("resource", sort=False):
        fig.add_trace(go.Scatter(x=g["intensity_flop_per_byte"], y=g["flops"], mode="lines", name=f"{res} roof",
                                 line=dict(color=RESOURCE_COLORS.get(res, "#888"), dash="dash")))
    labelled = set(ops.sort_values("time_s", ascending=False)["op"].head(ROOFLINE_LABELS))
    positions = ("top center", "bottom center", "middle right", "middle left")
    for res, g in ops.groupby("resource", sort=False):
        names = list(g["op"])
        fig.add_trace(go.Scatter(
            x=g["intensity_flop_per_byte"], y=g["achieved_flops"], mode="markers+text", name=f"{res} ops",
            text=[n if n in labelled else "" for n in names], hovertext=names,
            textposition=[positions[i % len(positions)] for i in range(len(names))],
            marker=dict(size=11, color=RESOURCE_COLORS.get(res, "#888")),
            customdata=(g[["time_s"]].to_numpy() * 1e3).round(4).tolist(),
            hovertemplate="%{hovertext}<br>%{x:.3g} FLOP/B, %{y:.3g} FLOP/s<br>%{customdata[0]} ms<extra></extra>"))
    fig.update_layout(title="Roofline of one decode iteration", xaxis_title="arithmetic intensity (FLOP/byte, log)",
                      yaxis_title="achieved FLOP/s (log)", xaxis_type="log", yaxis_type="log",
                      **{**_LAYOUT, "height": 520})
    return fig


def heatmap(grid, value: str = "decode_tokens_per_s", title: str | None = None,
            chosen: tuple[int, int] | None = None) -> go.Figure:
    """A k x batch grid (long DataFrame with draft_len, batch and `value`; NaN where it does not fit);
    chosen: the plan's (batch, k), marked with a star."""
    piv = grid.pivot(index="draft_len", columns="batch", values=value).sort_index()
    label = value.replace("_", " ").replace("tokens per s", "tokens/s")
    fig = go.Figure(go.Heatmap(z=piv.to_numpy(), x=[str(c) for c in piv.columns], y=piv.index.astype(int),
                               colorscale="Viridis", colorbar=dict(title=label),
                               hovertemplate="batch %{x}, k %{y}: %{z:.1f}<extra></extra>"))
    if chosen is not None and len(piv.columns):
        # the grid's batch nearest the plan's (the plan's own batch need not be a grid point)
        col = min(piv.columns, key=lambda c: abs(float(c) - chosen[0]))
        text = "plan" if float(col) == chosen[0] else f"plan (batch {chosen[0]})"
        fig.add_trace(go.Scatter(x=[str(col)], y=[chosen[1]], mode="markers+text", name="the plan",
                                 text=[text], textposition="top center", textfont=dict(color="white"),
                                 marker=dict(symbol="star", size=18, color="white", line=dict(color="black", width=1))))
    fig.update_layout(title=title or f"{label} over draft length k and batch (blank: does not fit)",
                      xaxis_title="batch", yaxis_title="draft length k", yaxis_dtick=1, **_LAYOUT)
    return fig


AXIS_TITLES = {"h2d_GBps": "host-to-device GB/s", "acceptance": "per-token acceptance rate",
               "num_prompts": "prompts in the job", "gpu_mem_GiB": "GPU memory (GiB)", "cpu_mem_GiB": "CPU memory (GiB)",
               "batch": "batch (sequences)", "draft_len": "draft length k", "prompt_len": "prompt tokens",
               "gen_len": "generated tokens per prompt", "cpu_cores": "CPU cores"}


def axis_title(column: str) -> str:
    """A DataFrame column's name in words (what_if's columns), else the name with spaces."""
    return AXIS_TITLES.get(column, column.replace("_", " "))


def sweep(df, x: str, title: str, log_x: bool = False, breakeven: float | None = None) -> go.Figure:
    """Best-k and k=0 throughput against a swept parameter (a DataFrame from planner.what_if), the best
    k as text, and an optional vertical line where speculation stops paying (drawn as a trace: a layout
    line's x on a log axis would be read as a power of ten)."""
    fig = go.Figure([
        go.Scatter(x=df[x], y=df["best_tokens_per_s"], mode="lines+markers+text", name="best k",
                   text=[f"k={int(k)}" if k == k else "" for k in df["best_k"]], textposition="top center"),
        go.Scatter(x=df[x], y=df["k0_tokens_per_s"], mode="lines+markers", name="k = 0 (no speculation)"),
    ])
    if breakeven is not None:
        ys = [v for v in list(df["best_tokens_per_s"]) + list(df["k0_tokens_per_s"]) if v == v]
        lo, hi = (min(ys), max(ys)) if ys else (0.0, 1.0)
        fig.add_trace(go.Scatter(x=[breakeven, breakeven], y=[lo, hi], mode="lines", line=dict(dash="dot",
                                 color="#666"), name=f"speculation stops paying: {breakeven:.3g}"))
    fig.update_layout(title=title, xaxis_title=axis_title(x) + (" (log)" if log_x else ""),
                      yaxis_title="decode tokens/s", **_LAYOUT)
    if log_x:
        fig.update_xaxes(type="log")
    return fig


__all__ = ["stage_bars", "gantt", "throughput_vs_k", "acceptance_bars", "roofline", "heatmap", "sweep",
           "STAGE_COLORS", "RESOURCE_COLORS"]
