"""What a run with and without speculation showed, in one line: the measured speedup beside the
predicted one, how much the repetitions spread, whether the planner's choice of k was right, and the
iteration error. `specmoe demo` builds it from its two modes' run records and prints it last; the
report shows the same numbers at its top.

    h = Headline(draft_len=1, planner_k=0, predicted_speedup=0.88, spec_runs=[(tok/s, iteration s)...],
                 k0_runs=[...], spec_pooled_tokens_per_s=2716.4, k0_pooled_tokens_per_s=3034.1)
    h.line(iteration_error_pct=-3.1, report="out/demo/report.html")
    # demo: speculation measured 0.90x (predicted 0.88x) over k=0, spread 12%; iteration time error -3.1% ...
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Headline:
    draft_len: int                                # k of the speculative runs
    planner_k: int                                # the planner's own best k (0: speculation does not pay by the model)
    predicted_speedup: float | None               # predicted decode tokens/s at draft_len over k = 0
    spec_runs: list[tuple[float, float]] = field(default_factory=list)   # (decode tokens/s, mean iteration s) per run
    k0_runs: list[tuple[float, float]] = field(default_factory=list)
    spec_pooled_tokens_per_s: float = 0.0         # decode tokens over decode seconds of all runs of the mode
    k0_pooled_tokens_per_s: float = 0.0

    @property
    def measured_speedup(self) -> float:
        return self.spec_pooled_tokens_per_s / self.k0_pooled_tokens_per_s if self.k0_pooled_tokens_per_s > 0 else 0.0

    @property
    def spread_pct(self) -> float:
        """The larger of the two modes' ranges of decode tokens/s over their runs, (max - min) / min."""
        out = 0.0
        for runs in (self.spec_runs, self.k0_runs):
            rates = [r[0] for r in runs if r[0] > 0]
            if len(rates) > 1:
                out = max(out, (max(rates) - min(rates)) / min(rates) * 100)
        return out

    def choice(self) -> str:
        """Whether the planner's choice was right, in words."""
        m, k = self.measured_speedup, self.draft_len
        pred = "" if self.predicted_speedup is None else f"{self.predicted_speedup:.2f}x"
        faster_spec = m > 1.0
        within = self.spread_pct > 0 and abs(m - 1.0) * 100 < self.spread_pct
        if self.planner_k == 0:
            said = f"the planner chose k = 0 (it predicted {pred} for k = {k})"
            seen = (f"k = {k} was faster (measured {m:.2f}x): its choice was wrong" if faster_spec else
                    f"k = 0 was faster (measured {m:.2f}x for k = {k}): its choice was right")
        else:
            said = f"the planner chose k = {self.planner_k} (it predicted {pred} over k = 0)"
            seen = (f"speculation was faster (measured {m:.2f}x): its choice was right" if faster_spec else
                    f"k = 0 was faster (measured {m:.2f}x): its choice was wrong")
        return f"{said} and {seen}" + ("; the difference is within the runs' spread" if within else "")

    def line(self, iteration_error_pct: float | None, report: str) -> str:
        err = "n/a" if iteration_error_pct is None else f"{iteration_error_pct:+.1f}%"
        pred = "n/a" if self.predicted_speedup is None else f"{self.predicted_speedup:.2f}x"
        return (f"demo: speculation measured {self.measured_speedup:.2f}x (predicted {pred}) over k=0, spread "
                f"{self.spread_pct:.0f}%; iteration time error {err} (predicted vs measured); report: {report}")

    def measured_points(self) -> list[tuple[int, float, float, float]]:
        """(k, pooled decode tokens/s, lowest run, highest run) of each mode, for the throughput chart."""
        out = []
        for k, runs, pooled in ((0, self.k0_runs, self.k0_pooled_tokens_per_s),
                                (self.draft_len, self.spec_runs, self.spec_pooled_tokens_per_s)):
            rates = [r[0] for r in runs]
            if rates and pooled > 0:
                out.append((k, pooled, min(rates), max(rates)))
        return out

    def to_dict(self) -> dict:
        return {**asdict(self), "measured_speedup": self.measured_speedup, "spread_pct": self.spread_pct,
                "choice": self.choice()}
