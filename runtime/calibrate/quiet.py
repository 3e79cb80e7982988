"""Is the machine quiet enough to measure? Each calibration step is checked, and repeated when it was not.

    guard = QuietGuard(best_known_s=..., max_tries=3)
    quality = guard.run(step, save, restore)      # runs step() until a clean try (or max_tries)
    state = machine_state()                       # threads, load, CPU MHz, governor, kernel, torch, ...

Two things spoil a measurement on a shared machine, and they are seen differently:

- **Other processes on this machine** (a test suite, a pip install): /proc/stat's busy time minus this
  process's own CPU time, over the step, as a share of all cores (`others_cpu_share`), and the
  hypervisor's steal time (`steal_share`). Both are exact and immediate, unlike the load average.
- **A slow spell of the host** (neighbours of the virtual machine, frequency, a shared memory bus):
  nothing local shows it; on this project's 2-core VM identical work runs 1.3-1.5x slower for seconds
  at a time with no steal recorded. A fixed small workload, the sentinel (a few fp32 matrix products
  at the calibration's thread count, best of three), is timed before and after each step; its ratio to
  the fastest sentinel seen on this machine (`slowdown`) says how slow the spell was.

With SPECMOE_CALIBRATE_STRICT=0 in the environment (a machine that is never quiet, such as a shared
CI runner) a calibration that was not clean is still cached and reused, and `specmoe demo` does not
re-measure a cached calibration that ran slower than the machine runs now.

A try is clean when its slowdown is at most 1 + SLOW_TOLERANCE and other processes used at most
OTHERS_MAX of the machine. A step that is not clean is repeated after a short wait (a spell passes
in seconds); after `max_tries` the cleanest try is kept and the step is reported as not clean.
"""
from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

SLOW_TOLERANCE = 0.15      # sentinel up to 15% slower than the machine's best: within its own spread
OTHERS_MAX = 0.15          # other processes may use up to 15% of all cores
STEAL_MAX = 0.05
RETRY_WAIT_S = 1.0
SENTINEL_N = 384           # the sentinel: SENTINEL_PRODUCTS products of [N, N] fp32 matrices
SENTINEL_PRODUCTS = 8


def strict() -> bool:
    """Whether unclean calibrations are kept out of the cache (SPECMOE_CALIBRATE_STRICT, default 1)."""
    return os.environ.get("SPECMOE_CALIBRATE_STRICT", "1").strip() not in ("0", "false", "no", "off")


@dataclass
class CpuWindow:
    """Counters at one moment: wall clock, /proc/stat busy and steal seconds, this process's CPU seconds."""

    wall_s: float
    busy_s: float | None
    steal_s: float | None
    own_cpu_s: float


def cpu_window() -> CpuWindow:
    busy = steal = None
    try:
        f = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        hz = os.sysconf("SC_CLK_TCK")
        user, nice, system, _idle, _iowait, irq, softirq, st = (int(x) for x in f[1:9])
        busy, steal = (user + nice + system + irq + softirq) / hz, st / hz
    except (OSError, ValueError, IndexError):
        pass
    t = os.times()
    return CpuWindow(time.perf_counter(), busy, steal, t.user + t.system)


def others_share(a: CpuWindow, b: CpuWindow, cores: int | None = None) -> tuple[float | None, float | None]:
    """(others_cpu_share, steal_share) between two windows: the CPU time other processes (and the
    hypervisor) took, as a share of all cores' wall time; None where /proc/stat is unreadable."""
    wall = max(b.wall_s - a.wall_s, 1e-6) * (cores or os.cpu_count() or 1)
    if a.busy_s is None or b.busy_s is None:
        return None, None
    others = max(0.0, (b.busy_s - a.busy_s) - (b.own_cpu_s - a.own_cpu_s)) / wall
    steal = max(0.0, b.steal_s - a.steal_s) / wall
    return min(1.0, others), min(1.0, steal)


def sentinel_s(reps: int = 3) -> float:
    """Best seconds of a fixed small workload at torch's current thread count (about 10-20 ms here)."""
    import torch

    g = torch.Generator().manual_seed(7)
    a = torch.rand(SENTINEL_N, SENTINEL_N, generator=g)  # [N, N]
    out = torch.empty_like(a)                            # [N, N]
    torch.matmul(a, a, out=out)
    best = float("inf")
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        for _ in range(SENTINEL_PRODUCTS):
            torch.matmul(a, a, out=out)
        best = min(best, time.perf_counter() - t0)
    return best


@dataclass
class TryQuality:
    """How one try of a step ran: slowdown = its worse sentinel over the machine's best."""

    slowdown: float
    others_cpu_share: float | None
    steal_share: float | None
    seconds: float

    @property
    def clean(self) -> bool:
        return (self.slowdown <= 1 + SLOW_TOLERANCE and (self.others_cpu_share or 0.0) <= OTHERS_MAX
                and (self.steal_share or 0.0) <= STEAL_MAX)

    def badness(self) -> float:
        return self.slowdown * (1 + (self.others_cpu_share or 0.0) + (self.steal_share or 0.0))

    def why(self) -> str:
        """What made the try not clean, in words."""
        out = []
        if self.slowdown > 1 + SLOW_TOLERANCE:
            out.append(f"the machine ran {self.slowdown:.2f}x slower than its best (a slow spell)")
        if (self.others_cpu_share or 0.0) > OTHERS_MAX:
            out.append(f"other processes used {self.others_cpu_share:.0%} of the CPUs")
        if (self.steal_share or 0.0) > STEAL_MAX:
            out.append(f"the hypervisor took {self.steal_share:.0%} (steal time)")
        return "; ".join(out) or "clean"


class QuietGuard:
    """Runs calibration steps until one try is clean (see the module docstring).

    best_known_s: the fastest sentinel seen by earlier calibrations of this machine (None: none yet).
    retry_budget_s: the most seconds all repeats together may add."""

    def __init__(self, best_known_s: float | None = None, max_tries: int = 3, retry_budget_s: float = 90.0,
                 wait_s: float = RETRY_WAIT_S, sentinel: Callable[[], float] = sentinel_s):
        self.max_tries, self.retry_budget_s, self.wait_s, self.sentinel = max_tries, retry_budget_s, wait_s, sentinel
        self.samples: list[float] = []
        self.best_s = best_known_s if best_known_s and best_known_s > 0 else None
        self.retry_s = 0.0

    def _sample(self) -> float:
        s = self.sentinel()
        self.samples.append(s)
        self.best_s = s if self.best_s is None else min(self.best_s, s)
        return s

    def warm_up(self, n: int = 3) -> None:
        """A few sentinels before the first step, so that the first step has a reference."""
        for _ in range(n):
            self._sample()

    def one_try(self, step: Callable[[], None]) -> TryQuality:
        before = self._sample()
        w0 = cpu_window()
        step()
        w1 = cpu_window()
        after = self._sample()
        others, steal = others_share(w0, w1)
        return TryQuality(max(before, after) / self.best_s, others, steal, w1.wall_s - w0.wall_s)

    def run(self, step: Callable[[], None], save: Callable[[], Any], restore: Callable[[Any], None]) -> dict:
        """Run step() until a clean try; keep the cleanest try's results (save/restore snapshot what the
        step writes). Returns the step's quality record (plain data)."""
        start = save()
        best: tuple[TryQuality, Any] | None = None
        tries = 0
        while True:
            tries += 1
            q = self.one_try(step)
            if best is None or q.badness() < best[0].badness():
                best = (q, save())
            if q.clean or tries >= self.max_tries or self.retry_s + q.seconds > self.retry_budget_s:
                break
            restore(start)
            time.sleep(self.wait_s)
            self.retry_s += q.seconds + self.wait_s
        q, snap = best
        restore(snap)
        return {"tries": tries, "clean": q.clean, "slowdown": round(q.slowdown, 3),
                "others_cpu_share": None if q.others_cpu_share is None else round(q.others_cpu_share, 3),
                "steal_share": None if q.steal_share is None else round(q.steal_share, 3),
                **({} if q.clean else {"why": q.why()})}


def machine_state() -> dict[str, Any]:
    """What the measurements hold for: threads, OpenMP wait policy, load, CPU clock and governor where
    readable, kernel, Python and torch versions."""
    import torch

    try:
        load = round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        load = None
    return {"threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
            "load_avg_1min": load, "cpu_MHz": _cpu_mhz(), "governor": _governor(),
            "kernel": platform.release(), "python": platform.python_version(), "torch": str(torch.__version__)}


def _cpu_mhz() -> float | None:
    """Mean of /proc/cpuinfo's "cpu MHz" lines (what the kernel reports; a VM often shows a constant)."""
    try:
        xs = [float(line.split(":")[1]) for line in Path("/proc/cpuinfo").read_text().splitlines()
              if line.startswith("cpu MHz")]
    except (OSError, ValueError, IndexError):
        return None
    return round(sum(xs) / len(xs), 1) if xs else None


def _governor() -> str | None:
    try:
        return Path("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor").read_text().strip() or None
    except OSError:
        return None


def quality_summary(steps: dict[str, dict]) -> dict[str, Any]:
    """{"clean": all steps clean, "unclean_steps": {name: why}, "retried_steps": [...]} of the step records."""
    return {"clean": all(q.get("clean", True) for q in steps.values()),
            "unclean_steps": {n: q.get("why", "") for n, q in steps.items() if not q.get("clean", True)},
            "retried_steps": [n for n, q in steps.items() if q.get("tries", 1) > 1]}


def quality_lines(q: dict | None, cache_hit: bool) -> list[str]:
    """Whether the calibration got a clean measurement of every step, in plain words."""
    if not q:
        return ["note: this calibration predates the quiet-machine checks; re-measure with --force to get them"]
    steps = q.get("steps", {})
    repeated = [f"{n} ({steps[n]['tries']} tries)" for n in q.get("retried_steps", [])]
    if q.get("clean"):
        return [f"quiet machine: all {len(steps)} steps measured clean"
                + (f"; repeated after a busy or slow spell: {', '.join(repeated)}" if repeated else "")]
    lines = [f"warning: could not get a clean measurement of {len(q['unclean_steps'])} of {len(steps)} steps:"]
    lines += [f"  {name}: {why} (kept the cleanest of {steps[name]['tries']} tries)"
              for name, why in q["unclean_steps"].items()]
    lines.append("  these rates may be low, so predictions will be pessimistic; "
                 + ("" if cache_hit else "this calibration is not cached; ")
                 + "run `specmoe calibrate --force` again when the machine is quiet")
    return lines
