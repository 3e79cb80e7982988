"""The batch axis of the optimizer's search (planner/optimizer.py): `batch_limit`, the largest batch
whose memory some placement of a variant satisfies, and `batch_grid`, the batches enumerated below it.

For a fixed batch B the tokens an iteration produces, B(acc(k)+1), are a constant, so the ratio
objective B(acc(k)+1)/T becomes "minimise T", linear; B is therefore enumerated outside the program.
"""
from __future__ import annotations

import numpy as np

from specmoe.planner import milp
from specmoe.planner.cost_model import CostModel
from specmoe.planner.memory import (activation_bytes, draft_kv_bytes_per_sequence, footprint, host_staging_bytes,
                                    kv_bytes_per_sequence)
from specmoe.planner.plan import Placement


def batch_limit(cm: CostModel, draft_len: int, micro_batches: int, x_mode: str = "stream",
                target_kv_gpu: bool = True, streaming_buffers: int = 2) -> int:
    """The largest batch whose memory some placement of the variant satisfies: KV beyond the CPU's
    room moved to the GPU (draft KV, and target KV when allowed), no expert cache, the fewest
    streaming buffers the variant needs (none when cold experts may run on the CPU). 0 when not even
    one sequence fits. Same memory model as planner.memory.footprint (checked in the tests)."""
    m, wl = cm.model, cm.workload
    k, M = int(draft_len), int(micro_batches)
    use_draft = k > 0 and cm.draft is not None
    d = cm.draft if use_draft else None
    n_moe, E = len(m.moe_layers), m.num_experts
    eb = m.expert_elems * wl.weight_bytes_per_elem
    buf_min = 0.0 if (x_mode != "stream" or not n_moe or not E) else min(max(1, streaming_buffers), n_moe) * E * eb
    kv_t = kv_bytes_per_sequence(m, wl, k)
    kv_d = draft_kv_bytes_per_sequence(cm.draft, wl, k) if use_draft else 0.0
    slack = 1.0 - milp.MEM_SLACK
    fp1 = footprint(m, cm.hw, wl, 1, k, Placement(expert_cache_slots=(0,) * m.num_layers), d, 1)
    weights = sum(v for key, v in fp1.gpu_breakdown.items()
                  if key not in ("expert_cache", "streaming_buffers", "draft_kv", "target_kv", "activations"))
    gu, cfree = fp1.gpu_usable_bytes * slack, fp1.cpu_usable_bytes * slack - fp1.cpu_breakdown["experts_pinned"]

    def fits(B: int) -> bool:
        gfree = gu - weights - activation_bytes(m, wl, B, k, d) - buf_min
        cfree_b = cfree - host_staging_bytes(m, wl, B, k)
        if gfree < 0 or cfree_b < 0:
            return False
        need = B * (kv_t + kv_d) - cfree_b
        if need <= 0:
            return True
        t = np.arange(B + 1 if target_kv_gpu else 1, dtype=float)               # [T]
        rest = need - kv_t * t                                                   # [T]
        if kv_d > 0:
            g = np.maximum(0.0, np.ceil(rest / kv_d - 1e-12))
        else:
            g = np.where(rest <= 0, 0.0, np.inf)
        ok = (g <= B) & (kv_t * t + kv_d * np.where(np.isfinite(g), g, 0.0) <= gfree)
        return bool(ok.any())

    if not fits(1):
        return 0
    per = kv_t + kv_d
    hi = int((max(cfree, 0.0) + gu) // per) + 2 if per > 0 else 1 << 20   # fits(hi) is false
    return _largest_true(fits, 1, hi)


def _largest_true(fits, lo: int, hi: int) -> int:
    """Bisection for the largest B in [lo, hi) with fits(B), given fits(lo) and not fits(hi)."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def batch_grid(b_hi: int, objective: str) -> list[int]:
    """Batch candidates from the largest that fits down by factors (enumerating B): throughput 1, 3/4,
    1/2 of it; latency halving down to 1."""
    if b_hi <= 0:
        return []
    if objective == "throughput":
        vals = {max(1, int(round(b_hi * f))) for f in (1.0, 0.75, 0.5)}
    else:
        vals, b = set(), b_hi
        while b >= 1:
            vals.add(b)
            b //= 2
    return sorted(vals, reverse=True)
