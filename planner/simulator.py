"""A small event simulator of the decode iteration (DESIGN.md: "a DAG of stage events per layer and
micro-batch, not a bare max") and a whole run (its prefill: planner/prefill.py).

Events (per target layer i, micro-batch j; durations from `cost_model.IterationCosts`):

    h2d(i)          pcie  the layer's non-resident experts; needs a free streaming buffer: with
                          `streaming_buffers` = 2 (double buffering) the n-th streaming layer's copy
                          waits for the MoE of the (n-2)-th streaming layer to finish with its buffer,
                          so h2d(i+1) runs while layer i computes
    pre(i,j)        gpu   after the previous layer's MoE of micro-batch j (batched_layer: one pre(i)
                          over all micro-batches, after the previous layer's MoE, and one post(i)
                          after every attn(i,j): the engine's schedule when it streams ahead)
    attn(i,j)       cpu   after pre(i,j)  (and/or on the GPU for GPU-KV sequences; with
                          attention_device "gpu" after a kv-h2d(i,j) on pcie)
    post(i,j)       gpu   after attn(i,j)
    moe(i,j)        gpu   after post(i,j) and h2d(i)   (the paper's per-micro-batch pipeline: GPU
                          Other1 -> CPU attention -> GPU Other2 -> GPU MoE). With batched_moe=True
                          one moe(i) needs every micro-batch's post(i,.) (the MoE over all tokens).
    moe-cpu(i,j)    cpu   cold experts of a cpu_expert_layer, after post(i,j)
    lm_head(j)      gpu   after the last layer of every micro-batch (of micro-batch j with
                          overlap_draft);  verify(j) gpu after lm_head(j)
    draft           k steps: draft.gpu on the GPU, draft.cpu as CPU attention then GPU FFN per step;
                    after all verifies (paper) or, with overlap_draft, micro-batch j's draft after
                    verify(j) while other micro-batches are still being verified; the next
                    iteration's pre(0,j) waits for the draft tokens it verifies.

Resources gpu, cpu and pcie each run one event at a time; on a host whose "GPU" is its CPU standing
in (`shares_host_cpu`, IterationCosts.serial) they are one resource, so nothing overlaps. Scheduling is list scheduling in a fixed
priority order (the order the engine issues the work: layer by layer, micro-batch by micro-batch):
whenever a resource is free it starts the highest-priority event whose inputs are ready
(planner/event_dag.py). Where host DRAM is shared (IterationCosts.shared_dram) the CPU's attention and
expert events and the copies slow each other while they run together, so a stage's time is its
event's wall time, not its duration alone. Two
iterations are chained and the second one is measured, so the steady state includes the experts
of the first layers prefetched during the previous iteration's draft phase; timeline times are
relative to the end of the first iteration (a negative start is such a prefetch).

Array dimension letters: E = events.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from specmoe.planner.cost_model import CostModel, IterationCosts, split_even
from specmoe.planner.event_dag import NO_SHARE, RES, Dag
from specmoe.planner.plan import Placement
from specmoe.planner.prefill import prefill_parts, prefill_time
from specmoe.planner.stages import Stage

_ST = {s: s.value for s in Stage}


@dataclass
class SimResult:
    iteration_time_s: float
    stages: dict[str, float]          # busy seconds per stage (design names), plus "iteration"
    resource_busy_s: dict[str, float]
    timeline: list[dict] = field(default_factory=list)

    @property
    def bound(self) -> str:
        return max(self.resource_busy_s, key=self.resource_busy_s.get)


def _share(c: IterationCosts, kind: str, step: int = 0) -> tuple[float, float]:
    """(stretch, pressure) of an event on shared host DRAM (planner/shared_dram.py): a copy ("pcie") reads
    at the full rate; CPU attention ("attn_cpu"), CPU experts ("moe_cpu") and the draft's CPU attention
    at a draft step ("draft_cpu") as the cost model found."""
    sd = c.shared_dram
    if sd is None:
        return NO_SHARE
    if kind == "pcie":
        return sd.pcie_stretch, 1.0
    if kind == "draft_cpu":
        return sd.draft_cpu[step]
    return getattr(sd, kind)


def _attention(dag: Dag, c: IterationCosts, i: int, j: int, pre: int, it: int) -> list[int]:
    """Layer i's verify attention of micro-batch j after its pre-attention event: the CPU-KV part on the
    CPU, the GPU-KV part on the GPU (after streaming CPU KV over PCIe when attention runs there)."""
    att = []
    TA, TH = _ST[Stage.TARGET_ATTENTION], _ST[Stage.TARGET_H2D]
    if c.attn_cpu_s[i, j] > 0:
        att.append(dag.add("cpu", c.attn_cpu_s[i, j], (pre,), TA, i, j, it, _share(c, "attn_cpu")))
    if c.attn_gpu_s[i, j] > 0:
        dk = pre
        if c.kv_h2d_s[i, j] > 0:
            dk = dag.add("pcie", c.kv_h2d_s[i, j], (pre,), TH, i, j, it, _share(c, "pcie"))
        att.append(dag.add("gpu", c.attn_gpu_s[i, j], (dk,), TA, i, j, it))
    return att


def _expert_copy(dag: Dag, c: IterationCosts, i: int, it: int, buf_wait: list, h2d_chain: list, gate: list,
                 nbuf: int) -> int | None:
    """Layer i's expert streaming (None when it streams nothing): it waits for a free buffer (the MoE
    of the layer nbuf streaming layers back), the previous copy, and `gate` (the previous iteration's
    draft, unless the schedule prefetches)."""
    if c.h2d_s[i] <= 0:
        return None
    dep = list(buf_wait[-nbuf]) if len(buf_wait) >= nbuf else []
    dep += h2d_chain + gate
    h = dag.add("pcie", c.h2d_s[i], dep, _ST[Stage.TARGET_H2D], i, -1, it, _share(c, "pcie"))
    h2d_chain[:] = [h]
    return h


def _layer_whole_batch(dag: Dag, c: IterationCosts, i: int, it: int, last: list) -> list[int]:
    """The engine's streaming-ahead schedule: pre_attn over every micro-batch, attention per
    micro-batch, post_attn over all of them. Returns the post_attn event (the MoE follows)."""
    M = len(last)
    p = dag.add("gpu", float(c.pre_s[i].sum()), sorted({e for j in range(M) for e in last[j]}),
                _ST[Stage.TARGET_PRE_ATTN], i, -1, it)
    att = [a for j in range(M) for a in _attention(dag, c, i, j, p, it)]
    return [dag.add("gpu", float(c.post_s[i].sum()), att or (p,), _ST[Stage.TARGET_POST_ATTN], i, -1, it)]


def _layer_per_micro_batch(dag: Dag, c: IterationCosts, i: int, it: int, last: list,
                           h: int | None) -> tuple[list[int], list[int]]:
    """pre_attn, attention and post_attn of each micro-batch in turn, each followed by its own MoE
    (GPU and CPU parts) unless the MoE runs batched. Updates last[j] to micro-batch j's MoE events;
    returns the post_attn events and the MoE events."""
    TM = _ST[Stage.TARGET_MOE]
    posts, moes = [], []
    for j in range(len(last)):
        p = dag.add("gpu", c.pre_s[i, j], last[j], _ST[Stage.TARGET_PRE_ATTN], i, j, it)
        att = _attention(dag, c, i, j, p, it)
        po = dag.add("gpu", c.post_s[i, j], att or (p,), _ST[Stage.TARGET_POST_ATTN], i, j, it)
        posts.append(po)
        if not c.batched_moe:
            ends = []
            if c.moe_gpu_s[i, j] > 0 or c.moe_cpu_s[i, j] == 0:
                ends.append(dag.add("gpu", c.moe_gpu_s[i, j], (po, h), TM, i, j, it))
            if c.moe_cpu_s[i, j] > 0:
                ends.append(dag.add("cpu", c.moe_cpu_s[i, j], (po,), TM, i, j, it, _share(c, "moe_cpu")))
            moes.extend(ends)
            last[j] = ends
    return posts, moes


def _moe_whole_batch(dag: Dag, c: IterationCosts, i: int, it: int, posts: list[int], h: int | None) -> list[int]:
    """Layer i's routed experts over all micro-batches at once, after every post_attn and the layer's
    expert copy: the GPU part (always, unless only the CPU computes) and the CPU part."""
    TM = _ST[Stage.TARGET_MOE]
    ends = []
    if c.moe_gpu_s[i, 0] > 0 or c.moe_cpu_s[i, 0] == 0:
        ends.append(dag.add("gpu", c.moe_gpu_s[i, 0], posts + [h], TM, i, -1, it))
    if c.moe_cpu_s[i, 0] > 0:
        ends.append(dag.add("cpu", c.moe_cpu_s[i, 0], posts, TM, i, -1, it, _share(c, "moe_cpu")))
    return ends


def _target_layer(dag: Dag, c: IterationCosts, i: int, it: int, last: list, h: int | None) -> tuple[list, list]:
    """Layer i of the target under the schedule the costs were made for (batched_layer, batched_moe).
    Returns the layer's MoE events and each micro-batch's last events (deps of the next layer)."""
    if c.batched_layer:
        posts, moes = _layer_whole_batch(dag, c, i, it, last), []
    else:
        posts, moes = _layer_per_micro_batch(dag, c, i, it, last, h)
    if c.batched_moe:
        moes = _moe_whole_batch(dag, c, i, it, posts, h)
        last = [list(moes) for _ in range(len(last))]
    return moes, last


def _lm_head_and_verify(dag: Dag, c: IterationCosts, it: int, last: list, overlap_draft: bool) -> list[int]:
    """Draft after target (the paper): the LM head and acceptance run once the whole batch has passed
    the last layer; with overlap_draft each micro-batch goes on as soon as it is through. Returns the
    acceptance event of each micro-batch."""
    everything = [e for ends in last for e in ends]
    verifies = []
    for j in range(len(last)):
        lm = dag.add("gpu", c.lm_head_s[j], last[j] if overlap_draft else everything,
                     _ST[Stage.TARGET_LM_HEAD], -1, j, it)
        verifies.append(dag.add("gpu", c.verify_s[j], (lm,), _ST[Stage.VERIFY_ACCEPT], -1, j, it))
    return verifies


def _draft_phase(dag: Dag, c: IterationCosts, it: int, verifies: list[int], overlap_draft: bool) -> tuple[list, int]:
    """Each draft group's k steps: the GPU part's chain, and the CPU part's chain of CPU attention then
    GPU rest. Returns the next iteration's per-micro-batch deps and the last event."""
    G, K = c.draft_gpu_s.shape
    M = len(verifies)
    DG, DC = _ST[Stage.DRAFT_GPU], _ST[Stage.DRAFT_CPU]
    group_end = []
    for g in range(G):
        deps = [verifies[g]] if G == M and overlap_draft else list(verifies)
        ge = gc = None
        for t in range(K):
            if c.draft_gpu_s[g, t] > 0:
                ge = dag.add("gpu", c.draft_gpu_s[g, t], deps if ge is None else (ge,), DG, -1, g, it)
            if c.draft_cpu_attn_s[g, t] > 0 or c.draft_cpu_gpu_s[g, t] > 0:
                a = dag.add("cpu", c.draft_cpu_attn_s[g, t], deps if gc is None else (gc,), DC, -1, g, it,
                            _share(c, "draft_cpu", t))
                gc = dag.add("gpu", c.draft_cpu_gpu_s[g, t], (a,), DC, -1, g, it)
        group_end.append([e for e in (ge, gc) if e is not None] or deps)
    if G == M and overlap_draft:
        nxt = [group_end[j] for j in range(M)]
    else:
        allend = [e for ge in group_end for e in ge]
        nxt = [allend for _ in range(M)]
    return nxt, max(e for ge in group_end for e in ge)


def _build_iteration(dag: Dag, c: IterationCosts, it: int, prev_draft_end: list, buf_wait: list,
                     h2d_chain: list, placement: Placement, overlap_draft: bool, prefetch: bool) -> tuple[list, int]:
    """Add one iteration's events. prev_draft_end[j]: event(s) the micro-batch j's first layer waits
    for. buf_wait: MoE events of the streaming layers so far (for the buffer dependency). h2d_chain:
    the last H2D event (copies run in order on one copy stream). Returns the draft-end dependency
    list for the next iteration and the index of the last event."""
    L, M = c.pre_s.shape
    nbuf = max(1, placement.streaming_buffers)
    last = [list(prev_draft_end[j]) for j in range(M)]      # deps of pre(i, j)
    gate = [] if prefetch else sorted({e for j in range(M) for e in prev_draft_end[j]})
    for i in range(L):
        h = _expert_copy(dag, c, i, it, buf_wait, h2d_chain, gate, nbuf)
        moes, last = _target_layer(dag, c, i, it, last, h)
        if h is not None:
            gate = []
            buf_wait.append(moes)
    verifies = _lm_head_and_verify(dag, c, it, last, overlap_draft)
    if c.draft_gpu_s.shape[1] == 0:
        nxt = [[verifies[j]] if overlap_draft else list(verifies) for j in range(M)]
        return nxt, verifies[-1]
    return _draft_phase(dag, c, it, verifies, overlap_draft)


def simulate_iteration(costs: IterationCosts, placement: Placement, overlap_draft: bool = False,
                       prefetch: bool = False, record: bool = True) -> SimResult:
    """Simulate two chained iterations of `costs`; report the second (the steady state).

    overlap_draft: a micro-batch's draft steps may run while other micro-batches are verified, and
      its next verification starts when its own drafts are ready (needs costs built with
      draft_groups="micro_batch"). Default off, as in the paper.
    prefetch: the next iteration's first expert copies may start during this iteration's draft
      phase (as soon as a streaming buffer is free). Default off: the paper's iteration is target
      (with its H2D) then draft.
    record=False is the optimizer's fast path: no timeline is built."""
    M = costs.pre_s.shape[1]
    dag = Dag(serial=costs.serial)
    buf_wait: list = []
    chain: list = []
    nxt, _ = _build_iteration(dag, costs, 0, [[] for _ in range(M)], buf_wait, chain, placement,
                                  overlap_draft, prefetch)
    first2 = len(dag.dur)
    nxt, _ = _build_iteration(dag, costs, 1, nxt, buf_wait, chain, placement, overlap_draft, prefetch)
    start, end = dag.schedule()
    t0 = max(end[:first2])
    t1 = max(end[first2:])
    stages = {s.value: 0.0 for s in Stage if s not in (Stage.ITERATION, Stage.PREFILL)}
    busy = {r: 0.0 for r in RES}
    tl = []
    for e in range(first2, len(dag.dur)):
        st, layer, mb, _ = dag.meta[e]
        d = end[e] - start[e] if dag.shared else dag.dur[e]
        stages[st] += d
        busy[RES[dag.res[e]]] += d
        if record and d > 0:
            tl.append({"stage": st, "resource": RES[dag.res[e]], "layer": layer, "micro_batch": mb,
                       "start_s": start[e] - t0, "end_s": end[e] - t0})
    period = t1 - t0 + costs.other_s       # the engine's work outside every stage, in series
    stages[Stage.ITERATION.value] = period
    return SimResult(iteration_time_s=period, stages=stages, resource_busy_s=busy, timeline=tl)


@dataclass
class ConfigEval:
    """One configuration, evaluated without a timeline (the optimizer's fast path)."""

    iteration_time_s: float
    closed_form_s: float
    decode_tokens_per_s: float
    bound: str
    moe_gpu_utilization: float
    costs: IterationCosts


def evaluate_config(cm: CostModel, batch: int, micro_batches: int, draft_len: int, placement: Placement,
                    simulate: bool = True, context_len: float | None = None, overlap_draft: bool = False,
                    prefetch: bool = False, batched_moe: bool = False, batched_layer: bool = False) -> ConfigEval:
    """Cost model + (optionally) the simulator for one configuration, no timeline. simulate=False
    returns the closed form (sum over layers of the bare max) as the iteration time."""
    c = cm.iteration(batch, micro_batches, draft_len, placement, context_len=context_len, batched_moe=batched_moe,
                     draft_groups="micro_batch" if overlap_draft else "batch", batched_layer=batched_layer)
    closed = c.closed_form_time_s
    if simulate:
        r = simulate_iteration(c, placement, overlap_draft=overlap_draft, prefetch=prefetch, record=False)
        t, busy = r.iteration_time_s, r.resource_busy_s
    else:
        t, busy = closed, c.resource_busy_s()
    return ConfigEval(iteration_time_s=t, closed_form_s=closed,
                      decode_tokens_per_s=c.tokens_per_iteration / t if t > 0 else 0.0,
                      bound=max(busy, key=busy.get), moe_gpu_utilization=c.moe_gpu_utilization(t), costs=c)


@dataclass
class RunResult:
    prefill_time_s: float
    decode_time_s: float
    iterations: float
    generated_tokens: int
    end_to_end_tokens_per_s: float
    decode_tokens_per_s: float
    groups: list[dict]
    prefill_parts: dict[str, float] = field(default_factory=dict)   # PrefillParts.to_dict of the prefill


def _tokens_distribution(acc_table, k: int) -> tuple[float, float]:
    """Mean and variance of tokens a sequence gains per iteration, min(A, k) + 1, with
    P(A >= j) = acc(j) - acc(j-1) (a chain of drafts)."""
    if k == 0:
        return 1.0, 0.0
    surv = [max(0.0, acc_table(j) - acc_table(j - 1)) for j in range(1, k + 1)]   # P(T >= j+1)
    mean = 1.0 + sum(surv)
    # E[T^2] = sum_t (2t-1) P(T >= t) for t = 1..k+1
    e2 = 1.0 + sum((2 * (j + 1) - 1) * surv[j - 1] for j in range(1, k + 1))
    return mean, max(0.0, e2 - mean * mean)


def simulate_run(cm: CostModel, batch: int, micro_batches: int, draft_len: int, placement: Placement,
                 groups: int = 12, overlap_draft: bool = False, batched_moe: bool = False,
                 prefetch: bool = False, batched_layer: bool = False) -> RunResult:
    """A whole static-batch run: prefill, then decode iterations while contexts grow by acc(k)+1
    tokens per iteration and sequences finish once they have gen_len tokens.

    Iterations to finish N_G is about Normal(G/mu, G var/mu^3) (renewal theory; mu, var of tokens per
    iteration), so the expected active count after n iterations is B P(N_G > n). Iterations are
    stepped in `groups` coarse groups, each simulated once at its mid-point (active sequences,
    context, draft sequences whose KV still fits the GPU's draft-KV budget)."""
    wl = cm.workload
    Gn = wl.gen_len
    P = wl.prompt_len
    parts = prefill_parts(cm, batch, placement)
    prefill = parts.total_s
    mu, var = _tokens_distribution(wl.acceptance.acc, draft_len)
    n_mean = Gn / mu
    sd = math.sqrt(Gn * var / mu ** 3) if var > 0 else 0.0
    n_lo = math.ceil(Gn / (draft_len + 1))
    n_end = max(n_lo, math.ceil(n_mean + 4 * sd)) if sd > 0 else math.ceil(n_mean)

    def active(n: float) -> float:
        if n < n_lo:        # no sequence finishes in fewer than n_lo iterations (k + 1 tokens at most each)
            return float(batch)
        if sd == 0:
            return float(batch) if n < n_mean else 0.0
        z = (n + 0.5 - n_mean) / sd
        return batch * 0.5 * math.erfc(z / math.sqrt(2))

    draft_kv_budget = placement.draft_kv_gpu_sequences * wl.max_context   # token-slots of draft KV on the GPU
    edges = np.unique(np.linspace(0, n_end, min(groups, n_end) + 1).round().astype(int))
    decode = 0.0
    out = []
    for a, b in zip(edges[:-1], edges[1:]):
        mid = (a + b - 1) / 2.0
        act = active(mid)
        if act < 0.5:
            continue
        B = max(1, int(round(act)))
        ctx = min(P + mid * mu, P + Gn)
        mb = min(micro_batches, B)
        g_seq = min(B, int(draft_kv_budget / max(ctx, 1.0) + 1e-9))   # whole sequences; 31 / 6.2 is 5
        pl = replace(placement, target_kv_gpu_sequences=min(placement.target_kv_gpu_sequences, B),
                     draft_kv_gpu_sequences=g_seq)
        c = cm.iteration(B, mb, draft_len, pl, context_len=ctx, batched_moe=batched_moe,
                         draft_groups="micro_batch" if overlap_draft else "batch", batched_layer=batched_layer)
        t = simulate_iteration(c, pl, overlap_draft=overlap_draft, prefetch=prefetch, record=False).iteration_time_s
        decode += t * (b - a)
        out.append({"iterations": int(b - a), "active": B, "context": float(ctx), "draft_gpu_sequences": g_seq,
                    "iteration_time_s": t})
    gen = batch * Gn
    total = prefill + decode
    return RunResult(prefill_time_s=prefill, decode_time_s=decode, iterations=float(n_end), generated_tokens=gen,
                     end_to_end_tokens_per_s=gen / total if total > 0 else 0.0,
                     decode_tokens_per_s=gen / decode if decode > 0 else 0.0, groups=out,
                     prefill_parts=parts.to_dict())


__all__ = ["Dag", "SimResult", "RunResult", "ConfigEval", "simulate_iteration", "simulate_run", "evaluate_config",
           "prefill_time", "split_even"]
