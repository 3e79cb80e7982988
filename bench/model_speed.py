"""How fast the planner's models evaluate: the timing goals the tests used to assert (tests must not
read the wall clock of a shared machine; issue 15).

    python bench/model_speed.py [--repeat 5]

Mixtral-8x7B on a30-xeon6426y (APPS lengths, alpha 0.8, the EAGLE draft):
  cost model    CostModel.iteration over 200 configurations      goal < 5 ms per configuration
  simulator     simulate_iteration at batch 512, m = 2, k = 4      goal < 50 us per event
  whole run     simulate_run at batch 512, m = 2, k = 4            goal < 1 s
Each is timed --repeat times and the best (least disturbed) is compared with its goal. Prints the
machine (CPU count, load average). Exits 1 when a best time misses its goal.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def _best(fn, repeat: int) -> float:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return min(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args(argv)

    from specmoe.planner.cost_model import CostModel
    from specmoe.planner.memory import default_placement
    from specmoe.planner.model_spec import ModelSpec
    from specmoe.planner.hardware_spec import HardwareSpec
    from specmoe.planner.plan import Placement
    from specmoe.planner.simulator import simulate_iteration, simulate_run
    from specmoe.planner.workload import Workload, load_acceptance

    m, d = ModelSpec.preset("mixtral-8x7b"), ModelSpec.preset("mixtral-8x7b-eagle")
    cm = CostModel(m, HardwareSpec.preset("a30-xeon6426y"), Workload(566, 1024, acceptance=load_acceptance(0.8)), d)
    pl = Placement(expert_cache_slots=(1,) * 32, draft_kv_gpu_sequences=300)
    cm.iteration(500, 2, 4, pl)
    per_config = _best(lambda: [cm.iteration(300 + k, 2, k % 6, pl) for k in range(200)], a.repeat) / 200
    dpl = default_placement(m, cm.hw, cm.workload, 512, 4, d)
    c = cm.iteration(512, 2, 4, dpl)
    n_events = 2 * (32 * (1 + 2 * 4) + 2 * 2 + 4 * 3)
    per_event = _best(lambda: simulate_iteration(c, dpl, record=False), a.repeat) / n_events
    whole = _best(lambda: simulate_run(cm, 512, 2, 4, dpl), a.repeat)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {os.cpu_count()} CPUs, load average {load:.2f}; best of {a.repeat}")
    rows = [("cost model", per_config * 1e3, "ms per configuration", 5.0),
            ("simulator", per_event * 1e6, "us per event", 50.0),
            ("whole run", whole, "s", 1.0)]
    ok = True
    for name, v, unit, goal in rows:
        met = v < goal
        ok &= met
        print(f"  {name:12s} {v:9.3f} {unit:22s} goal < {goal:g}: {'met' if met else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
