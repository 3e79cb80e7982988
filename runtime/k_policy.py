"""How many tokens the draft proposes in each iteration.

A policy is a callable `policy(info) -> k` with `info` an IterationInfo; `max_k` bounds what it may
return (the KV caches are sized for it). ConstantK keeps one k; DynamicK re-chooses k each
iteration to maximise (acc(k) + 1) / T(k): T(k) from the planner's cost model
(planner.cost_model.CostModel for the current batch and mean context, timed by planner.simulator's
event simulator, as planner.estimate does) and acc(k) from
the acceptance measured so far in this run (per-token rate alpha; the plan's profile until enough
drafts were verified).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from specmoe.planner.workload import MAX_DRAFT_LEN


@dataclass
class IterationInfo:
    iteration: int
    active: int                   # sequences in this iteration
    mean_context: float           # mean target KV length of the active sequences
    accepted_total: int           # drafts accepted so far
    trials_total: int             # acceptance trials so far (accepted + first rejections)


class ConstantK:
    def __init__(self, k: int):
        self.k = int(k)
        self.max_k = self.k
        self.source = "constant"

    def __call__(self, info: IterationInfo) -> int:
        return self.k


class CallableK:
    """A user's callable with an explicit bound."""

    def __init__(self, fn: Callable[[IterationInfo], int], max_k: int):
        self.fn, self.max_k, self.source = fn, int(max_k), "callable"

    def __call__(self, info: IterationInfo) -> int:
        k = int(self.fn(info))
        if not 0 <= k <= self.max_k:
            raise ValueError(f"k policy returned {k}, outside [0, {self.max_k}]")
        return k


class DynamicK:
    MIN_TRIALS = 64

    def __init__(self, plan, k0: int, max_k: int = MAX_DRAFT_LEN):
        self.plan, self.k0 = plan, int(k0)
        self.max_k = max(int(max_k), self.k0)
        self._cache: dict[tuple[int, int, int], float] = {}
        self.cost = None
        self.source = "plan k (no cost model)"
        try:
            from specmoe.planner.cost_model import CostModel

            self.cost = CostModel(plan.model_spec(), plan.hardware_spec(), plan.workload_spec(), plan.draft_spec())
            self._acc = plan.workload_spec().acceptance
            self.source = "specmoe.planner.cost_model"
        except Exception as e:  # the cost model is optional: keep the plan's k
            self.source = f"plan k (cost model unavailable: {type(e).__name__})"

    def _time(self, batch: int, k: int, ctx: float) -> float:
        key = (batch, k, int(ctx) // 32)
        if key not in self._cache:
            from dataclasses import replace

            pl = self.plan.placement
            pl = replace(pl, draft_kv_gpu_sequences=min(pl.draft_kv_gpu_sequences, batch),
                         target_kv_gpu_sequences=min(pl.target_kv_gpu_sequences, batch))
            m = max(1, min(self.plan.micro_batches, batch))
            costs = self.cost.iteration(batch, m, k, pl, context_len=max(1.0, ctx))
            try:   # the planner's event simulator; its closed form where the simulator is missing
                from specmoe.planner.simulator import simulate_iteration

                t = simulate_iteration(costs, pl, record=False).iteration_time_s
            except ImportError:
                t = costs.closed_form_time_s
            self._cache[key] = float(t)
        return self._cache[key]

    def acc(self, k: int, info: IterationInfo) -> float:
        if info.trials_total >= self.MIN_TRIALS:
            a = min(info.accepted_total / max(1, info.trials_total), 0.999)
            return a * (1 - a ** k) / (1 - a) if a > 0 else 0.0
        return self._acc.acc(k)

    def __call__(self, info: IterationInfo) -> int:
        if self.cost is None or self.plan.draft is None:
            return self.k0
        best, best_rate = self.k0, -1.0
        try:
            for k in range(0, self.max_k + 1):
                t = self._time(info.active, k, info.mean_context)
                rate = (self.acc(k, info) + 1.0) / t if t > 0 else 0.0
                if rate > best_rate * (1 + 1e-9):
                    best, best_rate = k, rate
        except Exception as e:
            self.cost = None
            self.source = f"plan k (cost model failed: {type(e).__name__}: {e})"
            return self.k0
        return best
