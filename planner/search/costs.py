"""The cost model at one point of the optimizer's search, with routing statistics when given:
`iteration_costs` (CostModel.iteration with each streaming layer's H2D priced by its cold experts'
own touch probabilities) and `closed_form_s` (its closed-form iteration time).

Array dimension letters: L = target layers.
"""
from __future__ import annotations

import numpy as np

from specmoe.planner import milp
from specmoe.planner.cost_model import CostModel
from specmoe.planner.plan import Placement


def closed_form_s(cm: CostModel, B: int, m: int, k: int, placement: Placement, routing_stats=None) -> float:
    """The cost model's closed-form iteration time of a placement (with routing statistics: the H2D of
    each streaming layer replaced by its cold experts' own touch probabilities)."""
    return iteration_costs(cm, B, m, k, placement, routing_stats).closed_form_time_s


def iteration_costs(cm: CostModel, B: int, m: int, k: int, placement: Placement, routing_stats=None):
    """CostModel.iteration at (B, m, k, placement). With routing statistics, each streaming MoE layer's
    H2D is the time of one expert's bytes (the uniform model's time per uncached expert over the
    probability 1 - (1 - n_a/E)^N that it is touched) times the expected number of its cold experts
    the N tokens touch under those statistics."""
    c = cm.iteration(B, m, k, placement)
    if routing_stats is not None and cm.E:
        p_all = 1.0 - (1.0 - cm.na / cm.E) ** c.tokens
        per = c.h2d_s_per_uncached_expert / p_all if p_all > 0 else 0.0
        cpu = set(placement.cpu_expert_layers)
        h2d = np.zeros(cm.L)                                                                    # [L]
        for l in np.flatnonzero(cm.is_moe):
            if l not in cpu:
                h2d[l] = milp.stats_h2d_row(routing_stats[l], cm.na, c.tokens)[placement.expert_cache_slots[l]] * per
        c.h2d_s = h2d
    return c
