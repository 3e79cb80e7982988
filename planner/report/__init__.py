"""Predicted against measured (DESIGN.md: planner.report(plan, run) -> table, plotly HTML, notebooks).

    cmp = compare(plan, run)          # a Comparison: one Row per stage plus the metric rows
    print(render_table(cmp))
    write_html(plan, run, "report.html")

Modules: `compare` (the rows and their errors), `predict` (what the cost model predicts for the run
that actually happened), `plots` (plotly figures; imported on first use).
"""
from specmoe.planner.report.compare import (Comparison, Row, check_match, compare, describe_plan, explain,
                                            load_plan, load_run, render_table, write_html)
from specmoe.planner.report.predict import (engine_schedule, job_prediction, live_batch, predicted_timeline,
                                            throughput_by_k)

__all__ = ["Comparison", "Row", "check_match", "compare", "describe_plan", "engine_schedule", "explain",
           "job_prediction", "live_batch", "load_plan", "load_run", "predicted_timeline", "render_table",
           "throughput_by_k", "write_html"]
