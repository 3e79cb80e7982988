"""Per-token latencies of a run, as `vllm bench` reports them: time to first token (TTFT), time per
output token after the first (TPOT) and inter-token latency (ITL), each as mean, median and p99 in ms;
and the acceptance of each draft position.

    lat = LatencyTracker(t_start)                 # perf_counter() when generate() began
    lat.prefilled(seqs); lat.emitted(seqs); lat.finished(seq)
    record.latency = lat.summary()

An offline batch starts every prompt at the call's start, so TTFT includes the time a prompt waited for
a free row. With speculation one iteration emits several tokens of a sequence at once: ITL is the gap
between a sequence's emissions divided over the tokens of the later one (one sample per token), so
the ITL samples of a sequence add up to its decode time, as TPOT averages it.
"""
from __future__ import annotations

import statistics
import time


def summary_ms(xs: list[float]) -> dict[str, float]:
    """{"mean", "median", "p99", "n"} of seconds, in ms (p99 by the nearest rank); empty -> zeros."""
    if not xs:
        return {"mean": 0.0, "median": 0.0, "p99": 0.0, "n": 0}
    v = sorted(xs)
    p99 = v[min(len(v) - 1, max(0, int(round(0.99 * len(v))) - 1))]
    return {"mean": statistics.fmean(v) * 1e3, "median": statistics.median(v) * 1e3, "p99": p99 * 1e3, "n": len(v)}


class LatencyTracker:
    def __init__(self, t_start: float):
        self.t_start = t_start
        self.ttft: list[float] = []
        self.tpot: list[float] = []
        self.itl: list[float] = []
        self._last: dict[int, tuple[int, float]] = {}     # id(sequence) -> (tokens generated, time of that emission)
        self._first: dict[int, float] = {}

    def _now(self) -> float:
        return time.perf_counter() - self.t_start

    def prefilled(self, seqs) -> None:
        """The prefill emitted each sequence's first token."""
        now = self._now()
        for s in seqs:
            self.ttft.append(now)
            self._first[id(s)] = now
            self._last[id(s)] = (len(s.generated), now)

    def emitted(self, seqs) -> None:
        """After a decode iteration: the tokens each sequence gained, spread over the gap since its last ones."""
        now = self._now()
        for s in seqs:
            n = len(s.generated)
            prev_n, prev_t = self._last.get(id(s), (n, now))
            if n > prev_n:
                self.itl.extend([(now - prev_t) / (n - prev_n)] * (n - prev_n))
                self._last[id(s)] = (n, now)

    def finished(self, s) -> None:
        n, last = self._last.pop(id(s), (len(s.generated), self._now()))
        first = self._first.pop(id(s), last)
        if n > 1:
            self.tpot.append((last - first) / (n - 1))

    def summary(self) -> dict[str, dict[str, float]]:
        return {"ttft_ms": summary_ms(self.ttft), "tpot_ms": summary_ms(self.tpot), "itl_ms": summary_ms(self.itl)}


def acceptance_by_position(hist: dict[int, int]) -> list[float]:
    """Share of verifications whose draft token at position i (1..k) was accepted, from the histogram of
    accepted drafts per verification: position i is accepted when at least i drafts were."""
    total = sum(hist.values())
    if not total:
        return []
    k = max(hist)
    return [sum(n for a, n in hist.items() if a >= i) / total for i in range(1, k + 1)]
