"""Predicted against measured (DESIGN.md: planner.report(plan, run) -> table, plotly HTML, notebooks).

    cmp = compare(plan, run)          # a Comparison: one Row per stage plus the metric rows
    print(render_table(cmp))
    write_html(plan, run, "report.html")

Modules: `inputs` (loading and checking the plan and the run record), `comparison` (Row, Comparison
and the goal), `compare` (the rows and their errors), `explain` (where the model is off and why),
`render` (the text table, the HTML page, a plan's description), `predict` (what the cost model
predicts for the run that actually happened), `plots` (plotly figures; imported on first use).
"""
from specmoe.planner.report.compare import Comparison, Row, compare
from specmoe.planner.report.explain import explain
from specmoe.planner.report.inputs import check_match, load_plan, load_run
from specmoe.planner.report.predict import (job_prediction, live_batch, predicted_timeline,
                                            throughput_by_k)
from specmoe.planner.report.render import describe_plan, render_table, write_html

__all__ = ["Comparison", "Row", "check_match", "compare", "describe_plan", "explain",
           "job_prediction", "live_batch", "load_plan", "load_run", "predicted_timeline", "render_table",
           "throughput_by_k", "write_html"]
