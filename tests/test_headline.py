"""The demo's headline (planner/report/headline.py): the measured and predicted speedup, the spread of the
runs, whether the planner's choice of k was right, and the report's rendering of it."""
from __future__ import annotations

import pytest

from specmoe.planner.report.headline import Headline


def _h(planner_k=0, spec=(900.0, 1000.0), k0=(1000.0, 1100.0), pooled=(950.0, 1050.0), pred=0.88):
    return Headline(draft_len=1, planner_k=planner_k, predicted_speedup=pred,
                    spec_runs=[(x, 0.01) for x in spec], k0_runs=[(x, 0.008) for x in k0],
                    spec_pooled_tokens_per_s=pooled[0], k0_pooled_tokens_per_s=pooled[1])


def test_speedup_spread_and_line_by_hand():
    h = _h()
    assert h.measured_speedup == pytest.approx(950 / 1050)
    assert h.spread_pct == pytest.approx(100 / 900 * 100)          # the spec runs' range is the larger
    assert h.line(-3.14, "r.html") == ("demo: speculation measured 0.90x (predicted 0.88x) over k=0, spread 11%; "
                                       "iteration time error -3.1% (predicted vs measured); report: r.html")
    assert _h(pred=None).line(None, "x").startswith("demo: speculation measured 0.90x (predicted n/a)")
    assert h.measured_points() == [(0, 1050.0, 1000.0, 1100.0), (1, 950.0, 900.0, 1000.0)]


def test_the_choice_in_words():
    assert _h().choice() == ("the planner chose k = 0 (it predicted 0.88x for k = 1) and k = 0 was faster "
                             "(measured 0.90x for k = 1): its choice was right; the difference is within the runs' "
                             "spread")
    right_by_far = _h(spec=(500.0, 505.0), k0=(1000.0, 1010.0), pooled=(502.0, 1005.0))
    assert right_by_far.choice().endswith("its choice was right")
    wrong = _h(pooled=(1200.0, 1000.0), spec=(1190.0, 1210.0), k0=(995.0, 1005.0))
    assert "k = 1 was faster (measured 1.20x): its choice was wrong" in wrong.choice()
    chose_spec = _h(planner_k=2, pred=1.3, pooled=(1300.0, 1000.0), spec=(1290.0, 1310.0), k0=(995.0, 1005.0))
    assert chose_spec.choice() == ("the planner chose k = 2 (it predicted 1.30x over k = 0) and speculation was "
                                   "faster (measured 1.30x): its choice was right")


def test_the_report_shows_the_headline_and_both_measured_points(tmp_path):
    import json

    from specmoe.planner.report.plots import throughput_vs_k

    h = _h()
    fig = throughput_vs_k([{"draft_len": 0, "decode_tokens_per_s": 1000.0}, {"draft_len": 1,
                                                                             "decode_tokens_per_s": 900.0}],
                          1, 900.0, measured=h.measured_points())
    meas = [t for t in fig.data if t.name == "measured (all runs)"][0]
    assert list(meas.x) == [0, 1] and list(meas.y) == [1050.0, 950.0]
    assert list(meas.error_y.array) == [50.0, 50.0] and list(meas.error_y.arrayminus) == [50.0, 50.0]
    d = h.to_dict()
    assert json.loads(json.dumps(d))["choice"] == h.choice() and d["spread_pct"] == pytest.approx(h.spread_pct)
    from types import SimpleNamespace

    from specmoe.planner.report import render

    page = render._headline_html(h, SimpleNamespace(iteration_error_pct=-3.14))
    assert "measured <b>0.90x</b> (predicted 0.88x)" in page and "error <b>-3.1%</b>" in page
    assert page.count("<tr><td class=l>k = 1</td>") == 2 and page.count("<tr><td class=l>k = 0</td>") == 2
    assert "The planner chose k = 0" in page
