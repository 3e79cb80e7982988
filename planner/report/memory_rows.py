"""Memory, predicted against measured: the planner's footprint (planner/memory.py, the one memory model)
beside what the engine measured (the run record's `memory`, runtime/memory_usage.py), in MiB.

Rows (host; and on a GPU, device):
  host peak memory above start footprint host bytes      peak RSS during the run - RSS before any weight
  host load peak above start   footprint of the weights  peak RSS while loading - RSS before any weight
                                                          (each RSS less its file-backed pages, below)
  host <component>             footprint by component    the engine's tensors by component (experts,
                                                          non-expert weights, target KV, draft, activations)
  device peak allocated        footprint GPU bytes       torch.cuda.max_memory_allocated during the run
  device <component>           as for the host
The RSS before any weight (Python, torch, the libraries) is what the plan keeps in its reserve, so it is
left out of both sides; so are the file-backed pages (library code paged in by the first passes, mapped
files) that the record keeps apart (host_file_rss_*_bytes): each RSS above is taken less the file-backed
pages at the same point (a peak: at the end, runtime/memory_usage.py). A record without them is read as
it stands. The footprint is the planner's model at the rows and context the run allocated
(recorded by the engine); a run record without one is compared with the plan's own (plan.memory). A row
whose error is over MEMORY_GOAL_PCT is a miss (`misses`), except an RSS row (RSS_ROWS) whose predicted
and measured are both under RSS_FLOOR_MiB: the allocator hands freed heap back to later allocations
and RSS moves in pages and arenas, so a delta of a few MiB (a small model in a process that already
held more, as in the demo's warm engine) says nothing about the footprint.
"""
from __future__ import annotations

from specmoe.planner.memory import device_components, host_components
from specmoe.planner.plan import Plan
from specmoe.planner.report.comparison import Row

MEMORY_GOAL_PCT = 10.0
MiB = 2 ** 20
RSS_FLOOR_MiB = 64.0   # RSS deltas below this are allocator reuse and page rounding, not judged
RSS_ROWS = ("host peak memory above start", "host load peak above start", "host activations")


def _footprint(plan: Plan, mem: dict, key: str) -> dict | None:
    fp = mem.get(key)
    if isinstance(fp, dict) and "gpu_breakdown" in fp:
        return fp
    if key != "footprint" or not isinstance(plan.memory, dict) or "gpu_breakdown" not in plan.memory:
        return None
    fp = dict(plan.memory)                     # a plan written before footprints said whether they share memory
    fp.setdefault("shares_host", bool((plan.hardware.get("gpu") or {}).get("shares_host_cpu")))
    return fp


def _host_total(fp: dict) -> float:
    return float(fp.get("cpu_bytes", 0.0)) + (float(fp.get("gpu_bytes", 0.0)) if fp.get("shares_host") else 0.0)


def _num(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def memory_rows(plan: Plan, run: dict) -> list[Row]:
    """The memory rows of a run against its plan; [] when the run record has no memory measurements."""
    mem = run.get("memory")
    if not isinstance(mem, dict) or _num(mem.get("host_rss_peak_bytes")) is None:
        return []
    fp = _footprint(plan, mem, "footprint")
    if fp is None:
        return []
    file = lambda point: _num(mem.get(f"host_file_rss_{point}_bytes")) or 0.0  # noqa: E731
    start = (_num(mem.get("host_rss_start_bytes")) or 0.0) - file("start")
    peak = _num(mem["host_rss_peak_bytes"]) - file("end")
    rows = [Row("host peak memory above start", "cpu", _host_total(fp) / MiB, (peak - start) / MiB, "MiB")]
    fw, load = _footprint(plan, mem, "footprint_weights"), _num(mem.get("host_rss_load_peak_bytes"))
    if fw is not None and load:
        rows.append(Row("host load peak above start", "cpu", _host_total(fw) / MiB,
                        (load - file("loaded") - start) / MiB, "MiB"))
    measured = mem.get("host_by_component") or {}
    predicted = host_components(fp)
    for name in sorted(set(predicted) | {k for k, v in measured.items() if _num(v)}):
        m = _num(measured.get(name))
        rows.append(Row(f"host {name}", "cpu", predicted.get(name, 0.0) / MiB, None if m is None else m / MiB, "MiB"))
    dpeak = _num(mem.get("device_peak_allocated_bytes"))
    if dpeak is not None and not fp.get("shares_host"):
        rows.append(Row("device peak allocated", "gpu", float(fp.get("gpu_bytes", 0.0)) / MiB, dpeak / MiB, "MiB"))
        dm, dp = mem.get("device_by_component") or {}, device_components(fp)
        for name in sorted(set(dp) | {k for k, v in dm.items() if _num(v)}):
            m = _num(dm.get(name))
            rows.append(Row(f"device {name}", "gpu", dp.get(name, 0.0) / MiB, None if m is None else m / MiB, "MiB"))
    return rows


def below_rss_floor(r: Row) -> bool:
    """An RSS row too small for RSS to resolve (both sides under RSS_FLOOR_MiB)."""
    return r.name in RSS_ROWS and max(r.predicted, r.measured or 0.0) < RSS_FLOOR_MiB


def misses(rows: list[Row], goal_pct: float = MEMORY_GOAL_PCT) -> list[str]:
    """Names of the rows whose prediction is off the measurement by more than goal_pct (RSS rows below
    the floor are not judged)."""
    return [r.name for r in rows
            if r.error_pct is not None and abs(r.error_pct) > goal_pct and not below_rss_floor(r)]
