"""The simulator's event graph and its list scheduler (planner/simulator.py builds the graph).

Resources gpu, cpu and pcie each run one event at a time (on a host whose "GPU" is its CPU standing in
they are one queue). Whenever a resource is free it starts the highest-priority ready event; priority is
creation order.

Shared host DRAM (planner/shared_dram.py): an event may carry a `share` (stretch, pressure). While a cpu
event and a pcie event run together, each advances at 1 / (1 + (its stretch - 1) x the other's pressure)
of its own rate, so its end moves whenever the other side starts or stops. A graph without shares is
scheduled by plain fixed durations.

Array dimension letters: E = events, R = resources.
"""
from __future__ import annotations

import heapq

RES = ("gpu", "cpu", "pcie")
_R = {r: i for i, r in enumerate(RES)}
NO_SHARE = (1.0, 0.0)


class Dag:
    """Events with a resource, a duration, dependencies; priority = creation order."""

    __slots__ = ("res", "lane", "dur", "succ", "npred", "meta", "serial", "share", "shared")

    def __init__(self, serial: bool = False):
        self.serial = serial        # every resource is the same one (a CPU standing in for the GPU)
        self.res: list[int] = []    # [E]
        self.lane: list[int] = []   # [E] the queue an event waits in: its resource, or 0 when serial
        self.dur: list[float] = []  # [E] seconds alone
        self.succ: list[list[int]] = []
        self.npred: list[int] = []
        self.meta: list[tuple] = []
        self.share: list[tuple[float, float]] = []    # [E] (stretch, pressure) on shared DRAM
        self.shared = False         # some event has a stretch: schedule by rates

    def add(self, res: str, dur: float, deps, stage: str, layer: int = -1, mb: int = -1, it: int = 0,
            share: tuple[float, float] = NO_SHARE) -> int:
        i = len(self.dur)
        self.res.append(_R[res])
        self.lane.append(0 if self.serial else _R[res])
        self.dur.append(float(dur))
        self.succ.append([])
        n = 0
        for d in deps:
            if d is not None:
                self.succ[d].append(i)
                n += 1
        self.npred.append(n)
        self.meta.append((stage, layer, mb, it))
        self.share.append(share)
        if share[0] != 1.0 and not self.serial:
            self.shared = True
        return i

    def schedule(self) -> tuple[list[float], list[float]]:
        """List scheduling: (start_s, end_s) per event."""
        if self.shared:
            return self._schedule_shared()
        n = len(self.dur)
        start = [0.0] * n
        end = [0.0] * n
        npred = list(self.npred)
        res, dur, succ = self.lane, self.dur, self.succ
        ready: list[list[int]] = [[] for _ in RES]
        for i in range(n):
            if npred[i] == 0:
                heapq.heappush(ready[res[i]], i)
        busy = [False] * len(RES)
        done: list[tuple[float, int]] = []
        t = 0.0
        finished = 0
        while finished < n:
            for r in range(len(RES)):
                if not busy[r] and ready[r]:
                    i = heapq.heappop(ready[r])
                    start[i] = t
                    end[i] = t + dur[i]
                    busy[r] = True
                    heapq.heappush(done, (end[i], i))
            if not done:
                raise RuntimeError("simulator deadlock: a dependency cycle in the event graph")
            t, i = heapq.heappop(done)
            batch = [i]
            while done and done[0][0] <= t:
                batch.append(heapq.heappop(done)[1])
            for i in batch:
                finished += 1
                busy[res[i]] = False
                for s_ in succ[i]:
                    npred[s_] -= 1
                    if npred[s_] == 0:
                        heapq.heappush(ready[res[s_]], s_)
        return start, end

    def _schedule_shared(self) -> tuple[list[float], list[float]]:
        """List scheduling where the running cpu and pcie events slow each other (module docstring):
        each running event keeps its remaining seconds-alone; time advances to the next end at the
        current rates."""
        n = len(self.dur)
        start, end = [0.0] * n, [0.0] * n
        npred = list(self.npred)
        res, dur, succ, share = self.lane, self.dur, self.succ, self.share
        ready: list[list[int]] = [[] for _ in RES]
        for i in range(n):
            if npred[i] == 0:
                heapq.heappush(ready[res[i]], i)
        running, left = [-1] * len(RES), [0.0] * len(RES)      # [R] event, its remaining seconds alone
        CPU, PCIE = _R["cpu"], _R["pcie"]
        t, finished = 0.0, 0
        while finished < n:
            for r in range(len(RES)):
                if running[r] < 0 and ready[r]:
                    i = heapq.heappop(ready[r])
                    start[i], running[r], left[r] = t, i, dur[i]
            lanes = [r for r in range(len(RES)) if running[r] >= 0]
            if not lanes:
                raise RuntimeError("simulator deadlock: a dependency cycle in the event graph")
            slow = [1.0] * len(RES)                              # [R] wall seconds per second alone
            c, p = running[CPU], running[PCIE]
            if c >= 0 and p >= 0:
                slow[CPU] = 1.0 + (share[c][0] - 1.0) * share[p][1]
                slow[PCIE] = 1.0 + (share[p][0] - 1.0) * share[c][1]
            to_end = {r: left[r] * slow[r] for r in lanes}
            dt = min(to_end.values())
            t += dt
            tol = 1e-12 * max(1.0, t)
            for r in lanes:
                if to_end[r] - dt > tol:
                    left[r] -= dt / slow[r]
                    continue
                i = running[r]
                end[i], running[r] = t, -1
                finished += 1
                for s_ in succ[i]:
                    npred[s_] -= 1
                    if npred[s_] == 0:
                        heapq.heappush(ready[res[s_]], s_)
        return start, end
