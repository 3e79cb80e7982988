"""The report's renderings of a Comparison: the text table (render_table), the self-contained HTML
page with its plotly figures (write_html), and a few lines describing a plan (describe_plan)."""
from __future__ import annotations

import html
from pathlib import Path

from specmoe.planner.atomic_file import atomic_write_text
from specmoe.planner.errors import SpecError
from specmoe.planner.plan import Plan
from specmoe.planner.report.compare import compare
from specmoe.planner.report.comparison import Comparison, Row
from specmoe.planner.report.headline import Headline
from specmoe.planner.report.inputs import load_plan
from specmoe.planner.report.memory_rows import RSS_FLOOR_MiB, below_rss_floor, misses


def _fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "s":
        return f"{v:.6f}" if v < 10 else f"{v:.2f}"
    return f"{v:.2f}"


def _cell(v) -> str:
    """A header value in words: mappings as `key value, ...` and lists comma-separated, not Python reprs."""
    if isinstance(v, dict):
        return ", ".join(f"{str(k).replace('_', ' ')} {_cell(x)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return ", ".join(_cell(x) for x in v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _unit(unit: str) -> str:
    return "ms" if unit == "s" else unit


def _fmt_html(v: float | None, unit: str) -> str:
    """Times in milliseconds on the page (three significant decimals), other units as the table."""
    if v is None:
        return "-"
    return f"{v * 1e3:.3f}" if unit == "s" else _fmt(v, unit)


def _err(r: Row) -> str:
    e = r.error_pct
    return "n/a" if e is None else f"{e:+.1f}%"


def _miss(r: Row) -> str:
    """' MISS' after a memory row whose prediction is off by more than MEMORY_GOAL_PCT; a note after an
    RSS row too small for RSS to resolve."""
    if below_rss_floor(r):
        return f"  (under {RSS_FLOOR_MiB:g} MiB: below RSS resolution, not judged)"
    return "  MISS" if r.name in misses([r]) else ""


def render_table(cmp: Comparison) -> str:
    """The per-stage table with an error column, the throughput rows, the mean |error| and the verdict."""
    h = cmp.header
    k = h["run_draft_len"]
    lines = [f"specmoe report: {h['model']} on {h['hardware']}" + (f", draft {h['draft']}" if h["draft"] else "")
             + f"; batch {h['batch']}, micro-batches {h['micro_batches']}, k {k}; rates: {h['rates']}",
             f"  run: {h['iterations']} iterations on {h['device']} ({'complete' if h['complete'] else 'INCOMPLETE'}), "
             f"commit {str(h['git_commit'])[:12]}",
             "", f"  {'stage':30s} {'resource':8s} {'predicted s':>12s} {'measured s':>12s} {'error':>9s}"]
    for r in cmp.stages:
        lines.append(f"  {r.name:30s} {r.resource:8s} {_fmt(r.predicted, 's'):>12s} {_fmt(r.measured, 's'):>12s} "
                     f"{_err(r):>9s}")
    if cmp.prefill_stages:
        lines += ["", f"  {'prefill by stage':30s} {'resource':8s} {'predicted s':>12s} {'measured s':>12s} {'error':>9s}"]
        for r in cmp.prefill_stages:
            lines.append(f"  {r.name:30s} {r.resource:8s} {_fmt(r.predicted, 's'):>12s} {_fmt(r.measured, 's'):>12s} "
                         f"{_err(r):>9s}")
    lines += ["", f"  {'metric':30s} {'unit':8s} {'predicted':>12s} {'measured':>12s} {'error':>9s}"]
    for r in cmp.metrics:
        lines.append(f"  {r.name:30s} {r.unit:8s} {_fmt(r.predicted, r.unit):>12s} {_fmt(r.measured, r.unit):>12s} "
                     f"{_err(r):>9s}")
    if cmp.memory:
        lines += ["", f"  {'memory':30s} {'resource':8s} {'predicted':>12s} {'measured':>12s} {'error':>9s}"]
        for r in cmp.memory:
            lines.append(f"  {r.name:30s} {r.unit:8s} {_fmt(r.predicted, r.unit):>12s} {_fmt(r.measured, r.unit):>12s} "
                         f"{_err(r):>9s}{_miss(r)}")
    mae = "n/a" if cmp.mean_abs_error_pct is None else f"{cmp.mean_abs_error_pct:.1f}%"
    lines += ["", f"  mean |error| over the measured iteration stages: {mae}", f"  {cmp.verdict}"]
    if cmp.drift:
        r, noise = cmp.drift["ratio"], cmp.drift.get("calibration_spread")
        lines.append(f"  machine speed: the speed probe took {r:.2f}x its calibration time around this run "
                     f"({'slower' if r > 1 else 'faster'} than when calibrated"
                     + (f"; its calibration samples spread {noise:.0%}" if noise is not None else "")
                     + f"); with the prediction scaled by it the iteration error is {cmp.drift['scaled_error_pct']:+.1f}%")
    lines += [f"  warning: {w}" for w in cmp.warnings]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
def write_html(plan: Plan | dict | str | Path, run: dict | str | Path, path: str | Path,
               comparison: Comparison | None = None, headline: Headline | None = None) -> Path:
    """One self-contained HTML report (plotly's JS inlined, no network). Written atomically: on any
    error no file (and no partial file) is left at `path`. headline: both modes' runs of a run with and
    without speculation (planner/report/headline.py), shown first and on the throughput chart."""
    import specmoe.planner.report.plots as rp      # plotly, imported on first use

    out = Path(path)
    if not out.parent.is_dir():
        raise SpecError("-o", f"directory {out.parent} does not exist", "create it first or choose another path")
    plan_obj = load_plan(plan)
    cmp = comparison if comparison is not None else compare(plan_obj, run)
    page = _page(cmp, _figures(rp, cmp, plan_obj, headline), headline)
    return atomic_write_text(out, page)


def _figures(rp, cmp: Comparison, plan: Plan, headline: Headline | None = None) -> list:
    """(title, plotly figure) for each chart the comparison has data for; rp: planner/report/plots.py."""
    figs = [("Stage times per iteration", rp.stage_bars(cmp))]
    if cmp.prefill_stages:
        figs.append(("Prefill by stage", rp.prefill_bars(cmp)))
    if cmp.predicted_timeline:
        figs.append(("Predicted timeline of one iteration", rp.gantt(cmp.predicted_timeline, "predicted")))
    if cmp.measured_timeline:
        figs.append(("Measured timeline of one iteration", rp.gantt(cmp.measured_timeline, "measured")))
    if cmp.by_k:
        it_m = cmp.row("decode tokens/s").measured
        figs.append(("Decode throughput against draft length k",
                     rp.throughput_vs_k(cmp.by_k, plan.draft_len, plan.predicted.decode_tokens_per_s,
                                        cmp.header["run_draft_len"], it_m,
                                        measured=headline.measured_points() if headline else None)))
    if cmp.acceptance:
        figs.append(("Accepted drafts per verified sequence", rp.acceptance_bars(cmp.acceptance)))
    lives = cmp.live.get("measured") if cmp.live else None
    if lives:
        figs.append(("Live sequences per decode iteration", rp.live_batch(cmp.live.get("predicted"), lives,
                                                                          plan.batch)))
    return figs


_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{padding:3px 10px;border-bottom:1px solid #ddd;text-align:right}
td:first-child,th:first-child,td.l{text-align:left}.pass{color:#fff;background:#2a7;padding:4px 10px}
.miss{color:#fff;background:#c33;padding:4px 10px}.warn{color:#a60}h2{margin-top:1.6em}"""


def _headline_html(h: Headline, cmp: Comparison) -> str:
    """The headline numbers, the planner's choice in words and every run of both modes."""
    e = html.escape
    err = "n/a" if cmp.iteration_error_pct is None else f"{cmp.iteration_error_pct:+.1f}%"
    pred = "n/a" if h.predicted_speedup is None else f"{h.predicted_speedup:.2f}x"
    rows = "".join(f"<tr><td class=l>{mode}</td><td>{i + 1}</td><td>{tps:.1f}</td><td>{it * 1e3:.2f}</td></tr>"
                   for mode, runs in ((f"k = {h.draft_len}", h.spec_runs), ("k = 0", h.k0_runs))
                   for i, (tps, it) in enumerate(runs))
    return (f"<h2>Headline</h2><p>Speculation (k = {h.draft_len}) measured <b>{h.measured_speedup:.2f}x</b> "
            f"(predicted {pred}) over k = 0, spread {h.spread_pct:.0f}% over the runs; iteration time error "
            f"<b>{err}</b> (predicted vs measured).</p><p>{e(h.choice()[0].upper() + h.choice()[1:])}.</p>"
            f"<table><tr><th>mode</th><th>run</th><th>decode tokens/s</th><th>mean iteration ms</th></tr>{rows}</table>")


def _page(cmp: Comparison, figs: list, headline: Headline | None = None) -> str:
    e = html.escape
    h = cmp.header
    head_rows = "".join(f"<tr><td class=l>{e(str(k).replace('_', ' '))}</td><td class=l>{e(_cell(v))}</td></tr>"
                        for k, v in h.items() if v not in (None, "", {}))

    def table(rows, first="stage"):
        body = "".join(f"<tr><td>{e(r.name)}</td><td class=l>{e(r.resource)}</td><td class=l>{e(_unit(r.unit))}</td>"
                       f"<td>{_fmt_html(r.predicted, r.unit)}</td><td>{_fmt_html(r.measured, r.unit)}</td>"
                       f"<td>{_err(r)}</td></tr>" for r in rows)
        return (f"<table><tr><th>{first}</th><th>resource</th><th>unit</th><th>predicted</th><th>measured</th>"
                f"<th>error</th></tr>{body}</table>")

    mae = "n/a" if cmp.mean_abs_error_pct is None else f"{cmp.mean_abs_error_pct:.1f}%"
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>specmoe report: {e(h['model'])} on "
             f"{e(h['hardware'])}</title><style>{_CSS}</style></head><body>",
             f"<h1>specmoe report: {e(h['model'])} on {e(h['hardware'])}</h1>",
             f"<p><span class='{'pass' if cmp.passed else 'miss'}'>{e(cmp.verdict)}</span></p>",
             f"<p>Mean absolute error over the measured iteration stages: <b>{mae}</b>. Error = (predicted - measured)"
             f" / measured; negative means the model is optimistic.</p>",
             _headline_html(headline, cmp) if headline else "",
             "<h2>Where the model is off and why</h2><ul>" + "".join(f"<li>{e(n)}</li>" for n in cmp.notes) + "</ul>"]
    if cmp.warnings:
        parts.append("<ul>" + "".join(f"<li class=warn>{e(w)}</li>" for w in cmp.warnings) + "</ul>")
    parts += ["<h2>Stages</h2>", table(cmp.stages)]
    if cmp.prefill_stages:
        parts += ["<h2>Prefill by stage</h2>", table(cmp.prefill_stages, "prefill part")]
    parts += ["<h2>Throughput and acceptance</h2>", table(cmp.metrics, "metric")]
    if cmp.memory:
        parts += ["<h2>Memory</h2>", table(cmp.memory, "memory")]
    first = True
    for title, fig in figs:
        parts.append(f"<h2>{e(title)}</h2>")
        parts.append(fig.to_html(full_html=False, include_plotlyjs=True if first else False,
                                 config={"displaylogo": False}))
        first = False
    parts += ["<h2>Plan and run</h2>", f"<table>{head_rows}</table>", "</body></html>"]
    return "\n".join(parts)


def describe_plan(plan: Plan | dict | str | Path) -> str:
    """A few lines: the chosen configuration, placement, predicted throughput, memory and bound."""
    p = load_plan(plan)
    pl = p.placement
    slots = sorted(set(pl.expert_cache_slots))
    mem = p.memory or {}
    gib = 2 ** 30
    lines = [f"plan: {p.model.get('name')} on {p.hardware.get('name')}"
             + (f", draft {p.draft.get('name')}" if p.draft else ""),
             f"  batch {p.batch}, micro-batches {p.micro_batches}, draft length k {p.draft_len}",
             f"  predicted: iteration {p.predicted.iteration_time_s:.4f} s, decode {p.predicted.decode_tokens_per_s:.1f} "
             f"tokens/s, end-to-end {p.predicted.end_to_end_tokens_per_s:.1f} tokens/s (rates: {p.predicted.source})",
             f"  bound: {p.bound}; expert cache slots per layer {slots if len(slots) > 1 else slots[0]}; draft KV on GPU "
             f"for {pl.draft_kv_gpu_sequences}/{p.batch}; target KV on GPU for {pl.target_kv_gpu_sequences}"]
    if "gpu_bytes" in mem:
        lines.append(f"  memory: GPU {mem['gpu_bytes'] / gib:.2f} of {mem.get('gpu_capacity_bytes', 0) / gib:.1f} GiB, "
                     f"CPU {mem.get('cpu_bytes', 0) / gib:.2f} of {mem.get('cpu_capacity_bytes', 0) / gib:.1f} GiB")
    lines.append(f"  solver: {p.solver.get('name', '?') if isinstance(p.solver, dict) else p.solver}")
    return "\n".join(lines)


__all__ = ["render_table", "write_html", "describe_plan"]
