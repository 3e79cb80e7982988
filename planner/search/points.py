"""The points of one optimizer search (planner/optimizer.py) and the order they are solved in.

* `enumerate_points`: every (B, m, k, variant) with a cheap valid lower bound of its T, on a heap in
  score order. B runs over a grid per (k, m, variant) from the largest batch the memory admits
  (planner/search/batches.py), or is the workload's own batch when it gives one.
* `refine_grid`: one refined batch joins the grid, found by a golden-section search on the
  linear-relaxation bound between the grid neighbours of the point whose bound is best (the
  throughput against B has a knee where the KV stops fitting the GPU, often between grid points).
* `best_first`: pop points in bound order, tighten each cheap bound to the linear relaxation's, solve
  the tight ones two at a time, and stop when no remaining bound can beat the best plan found, which
  is then the exact optimum over the enumerated points.

Heap items: (score of the lower bound, B, m, k, variant index, whether the bound is the tight one).
"""
from __future__ import annotations

import heapq
import math

from specmoe.planner import milp
from specmoe.planner.search.batches import batch_grid, batch_limit
from specmoe.planner.search.state import Search


def enumerate_points(S: Search, ks: list[int], mbs: list[int], target_kv_gpu: bool) -> tuple[list, dict]:
    """The heap of every feasible point with its cheap bound, and the batch grid of each (k, m, x mode)."""
    wl = S.cm.workload
    limits: dict[tuple, int] = {}
    grids: dict[tuple, list[int]] = {}
    heap: list = []
    for k in ks:
        for mb in mbs:
            for vi, v in enumerate(S.variants):
                if wl.batch is not None:
                    Bs = [wl.batch]
                else:
                    key = (k, mb, v.x_mode == "stream")
                    if key not in limits:
                        limits[key] = batch_limit(S.cm, k, mb, v.x_mode, target_kv_gpu, v.streaming_buffers)
                        if wl.num_prompts is not None:     # rows beyond the job's prompts stay empty
                            limits[key] = min(limits[key], wl.num_prompts)
                    Bs = batch_grid(limits[key], S.objective)
                grids[(k, mb, v.x_mode)] = Bs
                for B in Bs:
                    if mb <= B:
                        _push_bound(S, heap, B, mb, k, vi)
    return heap, grids


def _push_bound(S: Search, heap: list, B: int, mb: int, k: int, vi: int) -> bool:
    """Push the point with its cheap bound when that bound is finite; whether it was pushed."""
    lb = S.bound(B, mb, k, S.variants[vi])
    if not math.isfinite(lb):
        return False
    heapq.heappush(heap, (S.score(lb, B, k), B, mb, k, vi, False))
    return True


def refine_grid(S: Search, heap: list, grids: dict, ks: list[int], mbs: list[int]) -> tuple[int | None, int]:
    """Refine B around the point with the best linear-relaxation bound, before any MILP: between its
    grid neighbours, for its (m, k, variant). The refined batch joins the grid of every (k, m, variant)
    whose largest batch is at least it, and its points join the heap. Returns the refined batch (None:
    the workload fixes the batch, or the best lies on the grid) and how many points were added."""
    lead = best_tight(S, heap)
    if S.cm.workload.batch is not None or lead is None:
        return None, 0
    B0, m0, k0, v0 = lead
    refined = refine_batch(S, B0, m0, k0, v0, grids.get((k0, m0, v0.x_mode), []))
    if refined is None:
        return None, 0
    added = 0
    for k in ks:
        for mb in mbs:
            for vi, v in enumerate(S.variants):
                if mb <= refined and refined <= max(grids.get((k, mb, v.x_mode), [0]) or [0]):
                    grids[(k, mb, v.x_mode)] = sorted(set(grids[(k, mb, v.x_mode)]) | {refined}, reverse=True)
                    added += _push_bound(S, heap, refined, mb, k, vi)
    return refined, added


def best_first(S: Search, heap: list, best: dict, width: int = 2) -> None:
    """Pop points in bound order: tighten cheap bounds to the linear relaxation, solve the MILPs of
    tight ones (up to `width` at a time, in parallel solver processes); stop, leaving the rest on the
    heap, when no bound can beat the best found so far (which is then the exact optimum)."""

    def threshold() -> float:
        return min((S.score_of(x) for x in best.values()), default=float("inf"))

    while heap:
        batch = []
        while heap and len(batch) < width:
            item = heapq.heappop(heap)
            lb_score, B, mb, k, vi, tight = item
            if lb_score >= threshold():
                heapq.heappush(heap, item)
                break
            cur = best.get((B, mb, k))
            if cur is not None and lb_score >= S.score_of(cur):
                continue
            v = S.variants[vi]
            if not tight:                   # tighten the bound (the linear relaxation) and queue it again
                lb = S.tight_bound(B, mb, k, v)
                if math.isfinite(lb):
                    heapq.heappush(heap, (S.score(lb, B, k), B, mb, k, vi, True))
                continue
            batch.append((B, mb, k, v))
        if not batch:
            if heap and heap[0][0] >= threshold():
                return
            continue
        S.solve_many(batch)
        for (B, mb, k, v) in batch:
            s = S.solved[(B, mb, k, v)]
            cur = best.get((B, mb, k))
            if s is not None and (cur is None or S.score_of(s) < S.score_of(cur)):
                best[(B, mb, k)] = s


def best_tight(S: Search, heap: list) -> tuple | None:
    """The point with the best linear-relaxation bound: tighten cheap bounds from the top of the heap
    until a tightened one is on top (it stays on the heap)."""
    while heap:
        lb_score, B, mb, k, vi, tight = heap[0]
        if tight:
            return B, mb, k, S.variants[vi]
        heapq.heappop(heap)
        lb = S.tight_bound(B, mb, k, S.variants[vi])
        if math.isfinite(lb):
            heapq.heappush(heap, (S.score(lb, B, k), B, mb, k, vi, True))
    return None


def refine_batch(S: Search, B0: int, m: int, k: int, v: milp.Variant, grid: list[int]) -> int | None:
    """Golden-section search over the batches between B0's neighbours on the grid, for (m, k, variant),
    on the linear-relaxation bound of the score (within a few percent of the MILP's). Returns the best
    batch found if it is not on the grid already."""
    g = sorted(set(grid) | {B0})
    i = g.index(B0)
    lo = g[i - 1] if i > 0 else max(m, B0 // 3)
    hi = g[i + 1] if i + 1 < len(g) else B0
    if hi - lo < 3:
        return None
    memo: dict[int, float] = {}

    def f(B: int) -> float:
        if B not in memo:
            memo[B] = S.score(S.tight_bound(B, m, k, v), B, k) if B >= m else float("inf")
        return memo[B]

    a, b = lo, hi
    while b - a > 2:
        x1 = a + int(round((b - a) * 0.382))
        x2 = a + int(round((b - a) * 0.618))
        if x1 == x2:
            x2 = x1 + 1
        if f(x1) <= f(x2):
            b = x2
        else:
            a = x1
    cands = [x for x in range(a, b + 1)] + [B0]
    best = min(cands, key=f)
    return None if best in grid or not math.isfinite(f(best)) else best
