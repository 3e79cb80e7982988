"""How good the optimizer's choice is by the event simulator: its plan against a brute-force search over
(batch grid, micro-batches m, draft length k, placement), every candidate through the simulator.

    python bench/plan_quality.py [--quick] [--json out.json]

The brute force walks, for every batch of the optimizer's grid (the batches `batch_grid` enumerates
below `batch_limit` of each (k, m, cold-expert mode), plus the batch the optimizer refined), every m and
k the optimizer was given, and every placement of a grid: where the attention of CPU-KV sequences runs,
which layers' cold experts run on the CPU, the expert cache slots (every per-layer assignment on the
small cases, one count for all layers on the real ones), the GPU-KV sequences t and the draft-KV split
g (every integer on the small cases; 9 values spanning what memory admits on the real ones). A
placement is kept when memory.footprint says it fits, and scored by the simulator's decode tokens/s at
the mean context (CostModel.iteration with the plan's schedule, then simulate_iteration), the number
the plan predicts. A placement whose GPU or CPU busy time alone (a valid lower bound of the simulated
iteration: each resource runs one event at a time) cannot beat the best found is counted but not
simulated; so is a group of them (one attention device, CPU-expert layers and slots) whose least GPU
and CPU busy times over every t and g cannot.

Cases: small random MoE models (2 layers, 2-3 experts, tiny memories; some on a host whose CPU stands
in for the GPU, some under the per-micro-batch schedule where m matters), and the real benchmark
configurations (Mixtral-8x7B on the A30 host as in the README, Qwen3-30B-A3B on the H200 host).
--quick: three small cases only (the test runs it).

The last line: `plan-quality: chosen plan within X.X% of the simulator's best over N candidates; worst
case over M cases Y.Y%`, X for the README case (the first small case with --quick), N its brute-force
candidates; Y the worst over all M cases. Beside each case the table shows the closed form's own
optimum (optimize(rank="closed_form")) simulated, for comparison.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass, field, replace

import numpy as np

from specmoe.planner.cost_model import CostModel
from specmoe.planner.hardware_spec import load_hardware, parse_hardware
from specmoe.planner.atomic_file import atomic_write_text
from specmoe.planner.memory import draft_kv_bytes_per_sequence, footprint, kv_bytes_per_sequence
from specmoe.planner.model_spec import ModelSpec, default_draft_name, load_model
from specmoe.planner.optimizer import batch_grid, batch_limit, optimize
from specmoe.planner.plan import Placement
from specmoe.planner.schedule import Schedule, default_schedule
from specmoe.planner.search.inputs import search_variants
from specmoe.planner.simulator import simulate_iteration
from specmoe.planner.workload import Workload, load_acceptance

GB = 1e9
GRID = 9                    # t and g values per range on the real cases
SLOT_GRID = 9               # cache-slot counts spanning 0 .. the most that fit, on the real cases


@dataclass
class Case:
    name: str
    model: ModelSpec
    hw: object
    workload: Workload
    draft: ModelSpec | None
    ks: tuple[int, ...]
    mbs: tuple[int, ...]
    schedule: Schedule | None = None
    gpu_attention: bool = False
    exhaustive: bool = False                 # every per-layer slot / CPU-expert assignment
    every_kv_split: bool = False             # every t and g (else GRID values spanning each range)
    opt_kw: dict = field(default_factory=dict)

    @property
    def sched(self) -> Schedule:
        return self.schedule if self.schedule is not None else default_schedule(self.hw)


# ---------------------------------------------------------------------------------------------
# evaluation: one configuration through the simulator

def simulated_tps(cm: CostModel, B: int, m: int, k: int, pl: Placement) -> float:
    """Decode tokens/s of one configuration: the simulated steady-state iteration at the mean context."""
    c = cm.iteration(B, m, k, pl)
    o = cm.schedule.sim_options()
    sim = simulate_iteration(c, pl, overlap_draft=o["overlap_draft"], prefetch=o["prefetch"], record=False)
    return c.tokens_per_iteration / sim.iteration_time_s


def _busy_bound_tps(cm: CostModel, B: int, m: int, k: int, pl: Placement) -> float:
    """An upper bound of the simulated tokens/s: the iteration is at least the GPU's and the CPU's busy
    time (each runs one event at a time), plus the engine's time outside every stage."""
    c = cm.iteration(B, m, k, pl)
    busy = c.resource_busy_s()
    return c.tokens_per_iteration / (max(busy["gpu"], busy["cpu"]) + c.other_s)


# ---------------------------------------------------------------------------------------------
# the brute force

def _values(lo: int, hi: int, exhaustive: bool, n: int = GRID) -> list[int]:
    """Every integer in [lo, hi] (exhaustive, or when there are at most n), else n spanning it."""
    if hi < lo:
        return []
    if exhaustive or hi - lo < n:
        return list(range(lo, hi + 1))
    return sorted({int(round(x)) for x in np.linspace(lo, hi, n)})


def _slots_hi(case: Case, B: int, m: int, k: int) -> int:
    """The most cache slots per MoE layer whose placement (every KV on the CPU) fits the GPU."""
    mod = case.model
    d = case.draft if k > 0 else None

    def room(c: int) -> float:
        pl = Placement(expert_cache_slots=tuple(c if i in mod.moe_layers else 0 for i in range(mod.num_layers)))
        fp = footprint(mod, case.hw, case.workload, B, k, pl, d, m)
        return fp.gpu_usable_bytes - fp.gpu_bytes

    lo, hi = 0, mod.num_experts
    if room(hi) >= 0:
        return hi
    while hi - lo > 1:                 # room falls with c except where the streaming buffers vanish (c = E)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if room(mid) >= 0 else (lo, mid)
    return lo


def placement_groups(case: Case, B: int, m: int, k: int):
    """The placement grid at (B, m, k) in groups of one attention device, CPU-expert layers and cache
    slots: (that group's placement with t = g = 0, its placements that fit memory)."""
    mod, hw, wl = case.model, case.hw, case.workload
    L, E = mod.num_layers, mod.num_experts
    moe = list(mod.moe_layers)
    d = case.draft if k > 0 else None
    kt = kv_bytes_per_sequence(mod, wl)
    kd = draft_kv_bytes_per_sequence(d, wl) if d is not None else 0.0
    atts = ("cpu", "gpu") if case.gpu_attention else ("cpu",)
    if case.exhaustive:
        xs = [tuple(l for l, f in zip(moe, flags) if f) for flags in itertools.product((0, 1), repeat=len(moe))]
        slot_sets = list(itertools.product(range(E + 1), repeat=len(moe)))
    else:
        xs = [(), tuple(moe)]
        slot_sets = [(c,) * len(moe) for c in _values(0, _slots_hi(case, B, m, k), False, SLOT_GRID)]
    for att, x, cs in itertools.product(atts, xs, slot_sets):
        slots = [0] * L
        for l, c in zip(moe, cs):
            slots[l] = c
        base = Placement(expert_cache_slots=tuple(slots), attention_device=att, cpu_expert_layers=x)
        fp = footprint(mod, hw, wl, B, k, base, d, m)
        gpu_room = fp.gpu_usable_bytes - fp.gpu_bytes          # with t = g = 0: every KV on the CPU
        cpu_over = fp.cpu_bytes - fp.cpu_usable_bytes
        if gpu_room < 0:
            continue
        out = []
        for t in _values(0, min(B, int(gpu_room // kt)), case.every_kv_split):
            if d is None:
                gs = [0] if cpu_over - t * kt <= 0 else []
            else:
                gs = _values(max(0, math.ceil((cpu_over - t * kt) / kd - 1e-9)), min(B, int((gpu_room - t * kt) // kd)),
                             case.every_kv_split)
            for g in gs:
                pl = replace(base, target_kv_gpu_sequences=t, draft_kv_gpu_sequences=g)
                if footprint(mod, hw, wl, B, k, pl, d, m).fits:
                    out.append(pl)
        if out:
            yield base, out


def batch_axis(case: Case, k: int, m: int, refined: int | None) -> list[int]:
    """The optimizer's batches at (k, m): its grid below batch_limit for each cold-expert mode it
    searches, plus the batch it refined where that grid reaches it (planner/search/points.py)."""
    if case.workload.batch is not None:
        return [case.workload.batch]
    cm = CostModel(case.model, case.hw, case.workload, case.draft if k > 0 else None, schedule=case.sched)
    out: set[int] = set()
    for x in {v.x_mode for v in search_variants(case.model, "auto", case.gpu_attention, True)}:
        grid = batch_grid(batch_limit(cm, k, m, x, True), "throughput")
        out.update(grid)
        if refined and grid and refined <= max(grid):
            out.add(refined)
    return sorted(b for b in out if b >= m)


def _group_bound_tps(cm: CostModel, B: int, m: int, k: int, base: Placement) -> float:
    """An upper bound of the simulated tokens/s of every placement of a group (base with any t and g):
    the target's GPU busy time is least with no target KV on the GPU, the CPU's busy time with all KV
    there, and each placement's iteration is at least the larger of the two."""
    lo = cm.iteration(B, m, k, base)
    hi = cm.iteration(B, m, k, replace(base, target_kv_gpu_sequences=B, draft_kv_gpu_sequences=B))
    gpu = lo.resource_busy_s()["gpu"] - float(lo.draft_gpu_s.sum() + lo.draft_cpu_gpu_s.sum())
    return lo.tokens_per_iteration / (max(gpu, hi.resource_busy_s()["cpu"]) + min(lo.other_s, hi.other_s))


def brute_force(case: Case, refined: int | None, start_tps: float = 0.0) -> tuple[float, tuple | None, int, int]:
    """(best simulated tokens/s, its (B, m, k, placement), candidates, simulations) over the grid.
    start_tps: a score some configuration reaches (the optimizer's). A group of placements, or one
    placement, whose busy bound cannot beat the best is counted but not simulated, so the result is the
    grid's best whenever that beats start_tps."""
    best, arg, n, sims = start_tps, None, 0, 0
    for k in case.ks:
        d = case.draft if k > 0 else None
        if k > 0 and d is None:
            continue
        cm = CostModel(case.model, case.hw, case.workload, d, schedule=case.sched,
                       use_measured=case.opt_kw.get("use_measured", True))
        for m, B in ((m, B) for m in case.mbs for B in batch_axis(case, k, m, refined)):
            for base, pls in placement_groups(case, B, m, k):
                n += len(pls)
                if _group_bound_tps(cm, B, m, k, base) <= best:
                    continue
                for pl in pls:
                    if _busy_bound_tps(cm, B, m, k, pl) <= best:
                        continue
                    sims += 1
                    tps = simulated_tps(cm, B, m, k, pl)
                    if tps > best:
                        best, arg = tps, (B, m, k, pl)
    return best, arg, n, sims


# ---------------------------------------------------------------------------------------------
# cases

def _tiny_model(rng, L: int, E: int) -> ModelSpec:
    return ModelSpec.from_hf_config({
        "model_type": "mixtral", "vocab_size": 512, "hidden_size": int(rng.choice([64, 128])),
        "intermediate_size": int(rng.choice([128, 256, 512])), "num_hidden_layers": L, "num_attention_heads": 4,
        "num_key_value_heads": int(rng.choice([2, 4])), "num_local_experts": E,
        "num_experts_per_tok": int(rng.integers(1, min(2, E) + 1)), "torch_dtype": "bfloat16"}, name=f"tiny-{L}x{E}")


TINY_DRAFT = ModelSpec.from_hf_config({
    "model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 4, "torch_dtype": "bfloat16"},
    name="tiny-draft")


def _tiny_hw(rng, name: str, gpu_bytes: float, cpu_bytes: float, shares_host_cpu: bool = False):
    raw = {"name": name,
           "gpu": {"name": "g", "mem_GB": gpu_bytes / GB, "reserve_GiB": 0, "source": "test",
                   "hbm_GBps": float(rng.uniform(100, 3000)), "peak_TFLOPs": {"bf16": float(rng.uniform(10, 500))}},
           "cpu": {"name": "c", "cores": 8, "mem_GB": cpu_bytes / GB, "reserve_GiB": 0,
                   "dram_GBps": float(rng.uniform(20, 400)), "peak_TFLOPs": {"bf16": float(rng.uniform(0.1, 4.0))},
                   "source": "test"},
           "link": {"h2d_GBps": float(rng.uniform(1, 60)), "source": "test"}}
    if shares_host_cpu:
        raw["gpu"]["shares_host_cpu"] = True            # the CPU stands in for the GPU: nothing overlaps
    return parse_hardware(raw, f"{name}.yaml")


def small_case(seed: int) -> Case:
    """A random tiny MoE model and machine whose memories cut through the placements (seeded). Every
    third case runs on a host whose CPU stands in for the GPU, every third under the per-micro-batch
    schedule (where m matters); seeds 3-5, 9-11, ... leave the batch to the optimizer's grid."""
    rng = np.random.default_rng(seed)
    m = _tiny_model(rng, 2, int(rng.integers(2, 4)))
    B = int(rng.integers(2, 5))
    grid = (seed // 3) % 2 == 1                         # the batch from the optimizer's grid, memory sized for ~B
    wl = Workload(prompt_len=int(rng.integers(8, 64)), gen_len=int(rng.integers(8, 64)), batch=None if grid else B,
                  acceptance=load_acceptance(float(rng.choice([0.5, 0.8, 0.95]))))
    eb, kv = m.expert_elems * 2, kv_bytes_per_sequence(m, wl) + draft_kv_bytes_per_sequence(TINY_DRAFT, wl)
    probe = footprint(m, _tiny_hw(rng, "probe", 1e12, 1e12), wl, B, 2, Placement((0,) * m.num_layers), TINY_DRAFT, 1)
    fixed_gpu = probe.gpu_bytes - probe.gpu_breakdown["streaming_buffers"]
    fixed_cpu = probe.cpu_bytes - probe.cpu_breakdown.get("target_kv", 0.0) - probe.cpu_breakdown.get("draft_kv", 0.0)
    kind = seed % 3
    hw = _tiny_hw(rng, f"tiny-hw-{seed}", fixed_gpu + rng.uniform(0.2, 1.0) * (4 * m.num_experts * eb + B * kv),
                  fixed_cpu + rng.uniform(0.3, 1.3) * B * kv, shares_host_cpu=kind == 1)
    sched = None
    if kind == 2:                                       # the per-micro-batch pipeline, where m matters
        sched = Schedule(expert_streaming="next", pre_post="per_micro_batch", host_io="pinned", cpu_threads=8)
    return Case(f"small-{seed}", m, hw, wl, TINY_DRAFT, (0, 1, 2), (1, 2), schedule=sched, gpu_attention=True,
                exhaustive=True, every_kv_split=not grid, opt_kw={"use_measured": False})


def real_cases() -> list[Case]:
    apps = Workload(prompt_len=566, gen_len=1024, acceptance=load_acceptance(0.8))
    out = []
    for name, model, hw in (("readme: mixtral-8x7b / a30", "mixtral-8x7b", "a30-xeon6426y"),
                            ("qwen3-30b-a3b / h200", "qwen3-30b-a3b", "h200-host")):
        m = load_model(model)
        out.append(Case(name, m, load_hardware(hw), apps, load_model(default_draft_name(m)), tuple(range(9)),
                        (1, 2, 4, 8)))
    return out


# ---------------------------------------------------------------------------------------------

def run_case(case: Case) -> dict:
    kw = dict(draft=case.draft, k_values=case.ks, micro_batch_values=case.mbs, schedule=case.schedule,
              gpu_attention=case.gpu_attention, alternatives=0, timeline=False, **case.opt_kw)
    t0 = time.perf_counter()
    plan = optimize(case.model, case.hw, case.workload, **kw)
    plan_s = time.perf_counter() - t0
    cf_plan = optimize(case.model, case.hw, case.workload, rank="closed_form", **kw)
    cm = CostModel(case.model, case.hw, case.workload, case.draft, schedule=case.sched,
                   use_measured=case.opt_kw.get("use_measured", True))

    def tps_of(p) -> float:
        return simulated_tps(cm, p.batch, p.micro_batches, p.draft_len, p.placement)

    chosen, cf_tps = tps_of(plan), tps_of(cf_plan)
    t1 = time.perf_counter()
    best, arg, n, sims = brute_force(case, plan.solver.get("refined_batch"), start_tps=chosen)
    gap = 100.0 * (best - chosen) / best
    row = {"case": case.name, "chosen": [plan.batch, plan.micro_batches, plan.draft_len],
           "chosen_tokens_per_s": chosen, "predicted_tokens_per_s": plan.predicted.decode_tokens_per_s,
           "brute_force_tokens_per_s": best, "candidates": n, "simulated": sims, "gap_percent": gap,
           "brute_force_best": [arg[0], arg[1], arg[2]] if arg else [plan.batch, plan.micro_batches, plan.draft_len],
           "closed_form_choice": [cf_plan.batch, cf_plan.micro_batches, cf_plan.draft_len],
           "closed_form_choice_gap_percent": 100.0 * (best - cf_tps) / best, "plan_s": plan_s,
           "brute_force_s": time.perf_counter() - t1}
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="three small cases only")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)
    cases = [small_case(s) for s in range(3)] if args.quick else real_cases() + [small_case(s) for s in range(12)]
    rows = []
    print(f"{'case':28s} {'chosen B,m,k':>14s} {'tokens/s':>10s} {'brute force':>11s} {'cands':>7s} {'gap':>6s} "
          f"{'closed-form choice gap':>22s} {'plan s':>6s} {'bf s':>6s}")
    for c in cases:
        r = run_case(c)
        rows.append(r)
        print(f"{r['case']:28s} {','.join(map(str, r['chosen'])):>14s} {r['chosen_tokens_per_s']:10.1f} "
              f"{r['brute_force_tokens_per_s']:11.1f} {r['candidates']:7d} {r['gap_percent']:5.2f}% "
              f"{r['closed_form_choice_gap_percent']:21.2f}% {r['plan_s']:6.2f} {r['brute_force_s']:6.1f}", flush=True)
    if args.json:
        atomic_write_text(args.json, json.dumps(rows, indent=1))
    head = rows[0]
    worst = max(max(0.0, r["gap_percent"]) for r in rows)
    print(f"plan-quality: chosen plan within {max(0.0, head['gap_percent']):.1f}% of the simulator's best over "
          f"{head['candidates']} candidates; worst case over {len(rows)} cases {worst:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
