"""What one optimizer search (planner/optimizer.py) reports about its points: the chosen one through
the event simulator (`evaluate`, `add_job`), the frontier it beat (`frontier`: the best plan at each k
for the chosen B, m, and at each grid batch for the chosen k, m), the alternatives (`alternative_rows`:
the next-best distinct (B, m, k) among the points solved) and the solver's summary (`solver_summary`).

Throughputs are simulated: steady state B (acc(k)+1) / T, or for a finite job (workload.num_prompts)
its decode tokens over its iterations at the mean live batch as the batch drains (planner/batch_drain.py).
"""
from __future__ import annotations

import math
import time
from dataclasses import replace

import numpy as np

from specmoe.planner.batch_drain import at_live_batch, job_summary, live_placement
from specmoe.planner.cost_model import CostModel
from specmoe.planner.estimator import estimate
from specmoe.planner.memory import footprint
from specmoe.planner.plan import Placement, Prediction
from specmoe.planner.search.costs import iteration_costs
from specmoe.planner.search.state import Search, Solved
from specmoe.planner.simulator import prefill_time, simulate_iteration
from specmoe.planner.stages import Stage

FRONTIER_GAP = 0.05                 # frontier points: variants whose bound is within 5% are not solved


def simulate(cm: CostModel, costs, placement, record: bool):
    """simulate_iteration with the schedule the cost model prices (its streaming ahead and draft overlap)."""
    opts = cm.schedule.sim_options() if cm.schedule is not None else {}
    return simulate_iteration(costs, placement, overlap_draft=opts.get("overlap_draft", False),
                              prefetch=opts.get("prefetch", False), record=record)


def simulated_s(cm: CostModel, s: Solved, stats) -> float:
    """The event simulator's iteration time of a solved point (no timeline)."""
    c = iteration_costs(cm, s.batch, s.micro_batches, s.draft_len, s.placement, stats)
    return simulate(cm, c, s.placement, record=False).iteration_time_s


def live_sim_s(S: Search, s: Solved, full_s: float, live: float) -> float:
    """The simulated iteration of s's placement at `live` (fractional) live sequences; full_s at s.batch."""
    def at(b: int) -> float:
        if b >= s.batch:
            return full_s
        pl = live_placement(s.placement, s.batch, b)
        return simulate(S.cm, iteration_costs(S.cm, b, min(s.micro_batches, b), s.draft_len, pl, S.stats), pl,
                        record=False).iteration_time_s
    return at_live_batch(at, s.batch, live)


def job_tokens_per_s(S: Search, s: Solved, sim_t: float, exact: bool = True) -> float:
    """Decode tokens/s of s: steady state (B (acc(k)+1) / T), or for a finite job its tokens over
    iterations x T(mean live batch), that T simulated at the live batch as the plan's prediction is
    (exact), or the simulated full-batch iteration scaled by the closed form's live/full ratio (the
    ranking's screening)."""
    d = S.drain_of(s.batch, s.draft_len) if S.objective == "throughput" else None
    if d is None or d.iterations <= 0:
        return s.tokens_per_iteration / sim_t
    if exact:
        return d.decode_tokens_per_s(live_sim_s(S, s, sim_t, d.mean_live_batch))
    return d.decode_tokens_per_s(sim_t * S.live_closed_form_s(s, d.mean_live_batch) / s.closed_form_s)


def add_job(S: Search, s: Solved, pred: Prediction) -> Prediction:
    """For a finite job (workload.num_prompts): pred with the predicted drain, the simulated iteration
    at the mean live batch, and the job's throughputs (decode_tokens_per_s becomes the job's)."""
    d = S.drain_of(s.batch, s.draft_len)
    if d is None or pred.job:        # none, or estimate() priced it in already
        return pred
    job = job_summary(d, live_sim_s(S, s, pred.iteration_time_s, d.mean_live_batch), pred.prefill_time_s,
                      S.cm.workload.gen_len)
    tps, e2e = job.pop("decode_tokens_per_s"), job.pop("end_to_end_tokens_per_s")
    return replace(pred, decode_tokens_per_s=tps, end_to_end_tokens_per_s=e2e,
                   job={**job, "steady_decode_tokens_per_s": pred.decode_tokens_per_s})


def _frontier_entry(S: Search, s: Solved | None, axis: str, value: int) -> dict:
    """One frontier point: its best plan, simulated. `optimality_gap`: by how much (relative, closed form) a
    variant left unsolved could at most beat it (0: exact)."""
    if s is None:
        return {axis: value, "feasible": False, "decode_tokens_per_s": 0.0, "closed_form_tokens_per_s": 0.0}
    sim_t = simulated_s(S.cm, s, S.stats)
    return {axis: value, "feasible": True, "decode_tokens_per_s": job_tokens_per_s(S, s, sim_t),
            "closed_form_tokens_per_s": s.closed_form_tokens_per_s, "iteration_time_s": sim_t,
            "per_token_latency_s": sim_t / s.accepted_plus_one, "variant": s.variant.label(),
            "optimality_gap": S.gaps.get(s.key, 0.0)}


def evaluate(cm: CostModel, s: Solved, stats, timeline: bool) -> tuple[Prediction, str, dict]:
    """The chosen configuration through the event simulator: predicted stages, bound, memory."""
    if stats is None:
        est = estimate(cm.model, cm.hw, cm.workload, draft=cm.draft if s.draft_len else None, draft_len=s.draft_len,
                       micro_batches=s.micro_batches, placement=s.placement, batch=s.batch, timeline=timeline,
                       use_measured=cm.use_measured, schedule=cm.schedule)
        return est.to_prediction(), est.bound, est.memory
    c = iteration_costs(cm, s.batch, s.micro_batches, s.draft_len, s.placement, stats)
    sim = simulate(cm, c, s.placement, record=timeline)
    it = sim.iteration_time_s
    stages = dict(sim.stages)
    pre = prefill_time(cm, s.batch, s.placement)
    stages[Stage.PREFILL.value] = pre
    fp = footprint(cm.model, cm.hw, cm.workload, s.batch, s.draft_len, s.placement,
                   cm.draft if s.draft_len else None, s.micro_batches)
    pred = Prediction(iteration_time_s=it, decode_tokens_per_s=c.tokens_per_iteration / it, stages=stages,
                      prefill_time_s=pre, tokens_per_iteration=c.tokens_per_iteration, source=c.source,
                      timeline=sim.timeline)
    return pred, sim.bound, fp.to_dict()


def placement_summary(p: Placement) -> dict:
    """The placement in a few numbers (one slot count when every layer has the same) for the alternatives."""
    slots = sorted(set(p.expert_cache_slots))
    return {"expert_cache_slots": slots if len(slots) > 1 else (slots[0] if slots else 0),
            "target_kv_gpu_sequences": p.target_kv_gpu_sequences, "draft_kv_gpu_sequences": p.draft_kv_gpu_sequences,
            "attention_device": p.attention_device, "cpu_expert_layers": len(p.cpu_expert_layers)}


def differs(a: Solved, b: Solved) -> str:
    """What b changes against a: "name a -> b" for each configuration value and placement summary entry."""
    out = []
    for name, x, y in (("batch", a.batch, b.batch), ("micro_batches", a.micro_batches, b.micro_batches),
                       ("draft_len", a.draft_len, b.draft_len)):
        if x != y:
            out.append(f"{name} {x} -> {y}")
    pa, pb = placement_summary(a.placement), placement_summary(b.placement)
    for key in pa:
        if pa[key] != pb[key]:
            out.append(f"{key} {pa[key]} -> {pb[key]}")
    return "; ".join(out) or "same configuration"


def frontier(S: Search, win: Solved, ks: list[int], grids: dict) -> tuple[list[dict], list[dict], list[int]]:
    """The frontier: against k at the chosen (B, m), against B at the chosen (k, m), each point's best
    variant (a variant whose bound is within FRONTIER_GAP of the best found there is left unsolved).
    Returns by_k, by_batch and the batch axis."""
    Bw, mw, kw = win.batch, win.micro_batches, win.draft_len
    b_axis = sorted(set(grids.get((kw, mw, win.variant.x_mode), [])) | {Bw})
    pts = [(Bw, mw, k) for k in ks if k != kw] + [(B, mw, kw) for B in b_axis if B != Bw and mw <= B]
    front = S.best_at_many(pts, rel_gap=FRONTIER_GAP)
    front[(Bw, mw, kw)] = win
    by_k = [_frontier_entry(S, front.get((Bw, mw, k)), "draft_len", k) for k in ks]
    by_b = [_frontier_entry(S, front.get((B, mw, kw)), "batch", B) for B in b_axis]
    return by_k, by_b, b_axis


def set_chosen_frontier_tps(win: Solved, by_k: list[dict], by_b: list[dict], tokens_per_s: float) -> None:
    """The chosen point's own frontier entries take its simulated job throughput, exactly."""
    for e in [e for e in by_k if e.get("draft_len") == win.draft_len] + [e for e in by_b if e.get("batch") == win.batch]:
        e["decode_tokens_per_s"] = tokens_per_s


def solved_by_score(S: Search, best: dict[tuple, Solved]) -> list[Solved]:
    """The best solved variant of each distinct (B, m, k), among every point solved, best score first
    (`best` gains the points solved after the best-first search)."""
    for sv in S.solved.values():
        if sv is not None and (sv.key not in best or S.score_of(sv) < S.score_of(best[sv.key])):
            best[sv.key] = sv
    return sorted(best.values(), key=S.score_of)


def alternative_rows(S: Search, win: Solved, others: list[Solved], win_tps: float) -> list[dict]:
    """The rows of the alternatives: each one simulated, against the chosen plan's throughput."""
    alts = []
    for s in others:
        sim_t = simulated_s(S.cm, s, S.stats)
        tps = job_tokens_per_s(S, s, sim_t)
        alts.append({"batch": s.batch, "micro_batches": s.micro_batches, "draft_len": s.draft_len,
                     "variant": s.variant.label(), "decode_tokens_per_s": tps,
                     "closed_form_tokens_per_s": s.closed_form_tokens_per_s, "iteration_time_s": sim_t,
                     "per_token_latency_s": sim_t / s.accepted_plus_one,
                     "relative_to_chosen": tps / win_tps if win_tps else 0.0,
                     "differs": differs(win, s), "placement": placement_summary(s.placement)})
    return alts


def solver_summary(S: Search, win: Solved, t_start: float, t_search: float, points: int, pruned: int,
                   refined: int | None, batch_candidates: list[int], min_throughput, use_measured: bool) -> dict:
    """The plan's `solver` block: the programs solved and their statuses, the search's points and
    timings, and the chosen point's closed form next to its program's optimum."""
    info = {
        "name": S.solver, "status": "Optimal" if set(S.statuses) <= {"Optimal", "Infeasible", "Undefined"}
        else "Feasible (some programs stopped at the time limit; see statuses)", "objective": S.objective,
        "time_s": time.perf_counter() - t_start,
        "search_time_s": t_search, "milps": S.milps, "milp_time_s": S.milp_time_s, "statuses": S.statuses,
        "points": points, "pruned_by_bound": pruned, "refined_batch": refined,
        "variants": [v.label() for v in S.variants],
        "chosen_variant": win.variant.label(), "batch_candidates": batch_candidates,
        "closed_form_iteration_s": win.closed_form_s, "closed_form_tokens_per_s": win.closed_form_tokens_per_s,
        "milp_iteration_s": win.milp_s if math.isfinite(win.milp_s) else None, "closed_form_check_rel_err": S.max_check_err,
        "min_throughput": min_throughput, "routing_stats": S.stats is not None,
        "use_measured": use_measured, "draft_breakpoints_exact": all(
            pc.draft_exact for pc in S.costs.values() if pc.draft_g is not None),
    }
    if S.stats is not None:
        from specmoe.planner.plan import content_hash
        info["routing_stats_sha256"] = content_hash(np.round(S.stats, 12).tolist())
    return info
