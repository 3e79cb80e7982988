"""The inner problem of the optimizer: one mixed-integer program per point (batch B, micro-batches m,
draft length k, variant), in separate steps: `point_costs` (coefficients from the cost model and the
memory model), `lower_bound_s` and `lp_bound_s` (a cheap bound and the linear relaxation's, used to
skip points; `lp_bound_reference_s` is the same relaxation solved by scipy, for the tests), `build`
(the pulp model), `solve` (CBC or HiGHS, status checked) and `decode` (back to a Placement).

For a fixed point the tokens produced per iteration, B(acc(k)+1), are fixed, so maximising
throughput B(acc(k)+1)/T and minimising per-token latency T/(acc(k)+1) both reduce to minimising
the iteration time T: the ratio objective becomes linear once B is enumerated outside.

T is the cost model's closed form (CostModel.iteration(...).closed_form_time_s):

    T = sum_l max(pcie_l, cpu_l, gpu_l) + LM head + acceptance + D(g)

linearised with one epigraph variable T_l >= each of the three per layer. Variables:

    c_l   integer 0..E   expert cache slots of MoE layer l
    x_l   binary         layer l computes its non-resident experts on the CPU instead of streaming
                         (variant "per_layer"; variants "stream" / "cpu" fix every x_l to 0 / 1)
    z_l   continuous     = x_l (E - c_l), exact by McCormick (x_l binary, c_l bounded)
    t     integer 0..B   sequences whose target KV (and attention) live on the GPU
    g     integer 0..B   sequences whose draft KV lives on the GPU
    U     continuous     the most non-resident experts of any streaming layer (streaming buffers)
    D     continuous     the draft phase, piecewise linear in g through exact breakpoints

The variant also fixes y, where the verify attention of the CPU-KV sequences runs: "cpu" (next to
the KV) or "gpu" (their KV streamed over PCIe, FlexGen-style). Units inside the program: times
divided by `time_scale_s`, memory divided by the usable bytes, so coefficients are of order one.

Array dimension letters: L = target layers, E = experts (E+1: the slot table 0..E), P = breakpoints.
"""
from __future__ import annotations

import itertools

import time
from dataclasses import dataclass, field

import numpy as np

from .cost_model import CostModel
from .errors import SpecError
from .memory import activation_bytes, draft_kv_bytes_per_sequence, footprint, kv_bytes_per_sequence
from .plan import Placement

MEM_SLACK = 1e-6          # memory rows are tightened by this share of the usable bytes: more than the
                          # solvers' feasibility tolerance (1e-7), so a solution never overfills memory
SOLVERS = ("cbc", "highs")
X_MODES = ("stream", "cpu", "per_layer")


@dataclass(frozen=True)
class Variant:
    """The discrete choices fixed outside the program."""

    x_mode: str = "stream"            # stream | cpu | per_layer  (cold experts streamed / on the CPU / per layer)
    gpu_attention: bool = False       # y: verify attention of CPU-KV sequences on the GPU
    target_kv_gpu: bool = True        # t may be > 0
    streaming_buffers: int = 2

    def label(self) -> str:
        return f"experts:{self.x_mode},attention:{'gpu' if self.gpu_attention else 'cpu'}"


@dataclass
class PointCosts:
    """Everything the programs of one (B, m, k) point need, in seconds and bytes."""

    batch: int
    micro_batches: int
    draft_len: int
    tokens_per_iteration: float        # B (acc(k) + 1)
    num_experts: int
    is_moe: np.ndarray                 # [L] bool
    gpu_fixed_s: np.ndarray            # [L] pre + post attention on the GPU (placement-independent)
    moe_gpu_s: np.ndarray              # [L] routed experts on the GPU with every expert there
    h2d_table_s: np.ndarray            # [L, E+1] H2D of the layer with c = 0..E cache slots (convex in c)
    cpu_expert_s: float                # CPU seconds per non-resident expert of a CPU-expert layer
    attn_cpu_s_per_seq: np.ndarray     # [L]
    attn_gpu_s_per_seq: np.ndarray     # [L]
    fixed_s: float                     # LM head + acceptance
    draft_mm_s: float                  # sum over draft steps of the matmuls of all B sequences (bound only)
    draft_attn_gpu_s: float            # draft attention of all B sequences on the GPU (bound only)
    draft_attn_cpu_s: float            # ... on the CPU (bound only)
    gpu_fixed_bytes: float             # weights, draft weights, activations
    gpu_usable_bytes: float
    cpu_fixed_bytes: float             # pinned experts
    cpu_usable_bytes: float
    expert_bytes: float
    kv_target_bytes: float             # per sequence, at the longest context
    kv_draft_bytes: float
    time_scale_s: float
    gemm_rate_drop: float = 1.0                   # rho <= 1: min over M of GEMM rate(M) / best rate at M' <= M (bounds)
    # fixed per-invocation costs (planner/overhead.py, measured specs only; zeros otherwise):
    attn_cpu_fixed_s: np.ndarray | None = None    # [L] per micro-batch whose CPU-KV part is not empty
    attn_gpu_fixed_s: np.ndarray | None = None    # [L] per micro-batch whose GPU-KV part is not empty
    moe_fixed_s: np.ndarray | None = None         # [L] part of moe_gpu_s that CPU experts do not remove
    kv_h2d_s_per_seq: np.ndarray | None = None    # [L] streaming one sequence's KV of a layer (set lazily)
    draft_g: np.ndarray | None = None             # [P] breakpoints of the draft-KV split (set lazily)
    draft_s: np.ndarray | None = None             # [P] D(g) at the breakpoints, exact cost-model values
    draft_exact: bool = True                      # False: D interpolated between breakpoints somewhere
    layer_class: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))   # [L] identical layers share one
    serial: bool = False                          # GPU, CPU and PCIe are the same cores: T_l is their sum

    @property
    def num_layers(self) -> int:
        return len(self.is_moe)

    @property
    def uses_draft(self) -> bool:
        return self.draft_len > 0 and self.kv_draft_bytes > 0

    def h2d_lines(self, layer: int) -> list[tuple[float, float]]:
        """(intercept, slope) of the lines whose max is the H2D of `layer` against c (exact at
        integers: the table is convex in c). One line under uniform routing."""
        cache = self.__dict__.setdefault("_lines", {})
        if layer not in cache:
            tab = np.asarray(self.h2d_table_s[layer], dtype=float)                     # [E+1]
            sl = np.diff(tab)                                                          # [E]
            if sl.size == 0:
                cache[layer] = [(float(tab[0]), 0.0)]
            else:
                tol = 1e-12 * max(abs(float(tab[0])), 1e-300)
                keep = np.concatenate([[True], np.abs(np.diff(sl)) > tol])             # [E] slope changes
                js = np.flatnonzero(keep)
                cache[layer] = [(float(tab[j] - sl[j] * j), float(sl[j])) for j in js]
        return cache[layer]


# --------------------------------------------------------------------------------------------
def _draft_steps(cm: CostModel, k: int) -> list[tuple[float, int]]:
    """(tokens per sequence, how many steps): the first step re-reads acc(k)+1 tokens, the rest one."""
    q0 = cm.workload.acceptance.acc(k) + 1.0
    return [(q0, 1)] + ([(1.0, k - 1)] if k > 1 else [])


def draft_time_fn(cm: CostModel, batch: int, draft_len: int):
    """D(g): the cost model's closed-form draft phase when g of the B sequences keep their draft KV on
    the GPU (IterationCosts.draft_time_closed_s with one draft group: the busier of the GPU and the
    CPU part's chain of steps). Built from the cost model's own draft pieces because it is called
    some tens of times per point; tests check it against CostModel.iteration."""
    B, k = int(batch), int(draft_len)
    if k == 0 or cm.draft is None:
        return lambda g: 0.0
    s = float(cm.workload.mean_context)
    steps = _draft_steps(cm, k)
    memo: dict[int, float] = {}

    def D(g: int) -> float:
        g = int(g)
        if g not in memo:
            c = B - g
            srcs: set = set()
            gpu = cpu = cgpu = 0.0
            for q, n in steps:
                gpu += n * cm._draft_part(g, q, s, srcs, on_gpu=True)
                if c > 0:
                    cgpu += n * cm._draft_part(c, q, s, srcs, on_gpu=False)
                    cpu += n * cm._draft_cpu_attn(c, q, s, srcs)
            memo[g] = max(gpu + cgpu, cpu + cgpu)
        return memo[g]

    return D


def pwl_breakpoints(f, lo: int, hi: int, exact_below: int = 64, rel_tol: float = 1e-9,
                    max_evals: int = 40) -> tuple[np.ndarray, np.ndarray, bool]:
    """Integer breakpoints of f on [lo, hi] such that linear interpolation between them reproduces f
    at every integer: all integers when the range is small, else kink finding. A segment whose end
    slopes differ has its kink where the two end lines cross; evaluating next to that point either
    confirms one kink (both sides linear) or splits the segment there. Segments are refined worst
    first (largest relative deviation of f from the chord at their midpoint), so when f is curved
    (measured rates) the evaluation budget goes where the interpolation is worst. Returns (points,
    values, exact); exact is False when the budget ran out before every segment was proven linear."""
    import heapq

    if hi - lo <= exact_below:
        xs = np.arange(lo, hi + 1)
        return xs, np.array([f(int(x)) for x in xs]), True
    val: dict[int, float] = {}

    def F(x: int) -> float:
        if x not in val:
            val[x] = f(x)
        return val[x]

    for x in (lo, lo + 1, hi - 1, hi):
        F(x)
    tol = rel_tol * (max(abs(v) for v in val.values()) or 1.0)
    keep = {lo, lo + 1, hi - 1, hi}          # the draft's time jumps at both ends (one part empty)
    todo: list = []

    def push(a: int, b: int) -> None:
        if b - a < 2:
            return
        m = (a + b) // 2
        dev = abs(F(m) - (F(a) + (F(b) - F(a)) * (m - a) / (b - a)))
        heapq.heappush(todo, (-dev / max(abs(F(m)), 1e-300), a, b))

    def on_line(x0: int, x1: int, x: int) -> bool:          # f(x) on the line through x0 and x1 = x0 +- 1
        return abs(F(x) - (F(x0) + (F(x1) - F(x0)) * (x - x0) / (x1 - x0))) <= tol

    push(lo + 1, hi - 1)
    exact = True
    while todo:
        _, a, b = heapq.heappop(todo)
        if len(val) >= max_evals:
            exact = False
            keep.update((a, b, (a + b) // 2))
            continue
        sl, sr = F(a + 1) - F(a), F(b) - F(b - 1)
        mid = (a + b) // 2
        if abs(sl - sr) <= tol and on_line(a, a + 1, mid) and on_line(a, a + 1, b):
            continue                                        # linear
        xc = (F(b) - F(a) + sl * a - sr * b) / (sl - sr) if abs(sl - sr) > 1e-300 else mid
        c0 = int(np.clip(np.floor(xc), a + 1, b - 1))
        c1 = min(c0 + 1, b - 1)
        if (c1 > c0 and on_line(a, a + 1, c0) and on_line(b, b - 1, c1)
                and on_line(a, a + 1, (a + c0) // 2) and on_line(b, b - 1, (c1 + b) // 2)):
            keep.update((c0, c1))                           # one kink between c0 and c1
            continue
        span = b - a
        cut = c0 if a + span // 8 < c0 < b - span // 8 else mid     # keep halving-like progress
        keep.add(cut)
        push(a, cut)
        push(cut, b)
    xs = np.array(sorted(keep))
    return xs, np.array([F(int(x)) for x in xs]), exact


def stats_h2d_row(shares: np.ndarray, top_k: int, tokens: int) -> np.ndarray:
    """[E+1] expected non-resident experts touched by N tokens when the c hottest are cached:
    sum over the E - c coldest of p_e = 1 - (1 - min(1, n_a share_e))^N (uniform shares: the cost
    model's (E - c) p)."""
    sh = np.sort(np.asarray(shares, dtype=float))[::-1]                       # [E] hottest first
    p = 1.0 - (1.0 - np.minimum(1.0, top_k * sh)) ** tokens                   # [E]
    return np.concatenate([np.cumsum(p[::-1])[::-1], [0.0]])                  # [E+1]


def point_costs(cm: CostModel, batch: int, micro_batches: int, draft_len: int,
                routing_stats: np.ndarray | None = None, streaming_buffers: int = 2) -> PointCosts:
    """Coefficients of the (B, m, k) programs: one cost-model evaluation plus the memory model.
    The draft breakpoints and the KV-streaming slopes are added later, only for points that are solved."""
    m, wl = cm.model, cm.workload
    B, M, k = int(batch), int(micro_batches), int(draft_len)
    L, E = cm.L, cm.E
    use_draft = k > 0 and cm.draft is not None
    empty = Placement(expert_cache_slots=(0,) * L, streaming_buffers=streaming_buffers)
    c0 = cm.iteration(B, M, k, empty)
    base = _memory_base(cm, k, streaming_buffers)
    gpu_fixed = base["weights"] + activation_bytes(m, B, k, M, cm.draft if use_draft else None)
    c = np.arange(E + 1, dtype=float)                                                       # [E+1]
    tab = np.where(cm.is_moe[:, None], (E - c)[None, :] * c0.h2d_s_per_uncached_expert, 0.0)  # [L, E+1]
    if routing_stats is not None and E:
        p_all = 1.0 - (1.0 - cm.na / E) ** c0.tokens
        per_expert_s = c0.h2d_s_per_uncached_expert / p_all if p_all > 0 else 0.0
        for layer in np.flatnonzero(cm.is_moe):
            tab[layer] = stats_h2d_row(routing_stats[layer], cm.na, c0.tokens) * per_expert_s
    mm = agpu = acpu = 0.0
    if use_draft:
        s, srcs = float(wl.mean_context), set()
        for q, n in _draft_steps(cm, k):
            one = cm._draft_part(B, q, s, srcs, on_gpu=False)
            mm += n * one
            agpu += n * (cm._draft_part(B, q, s, srcs, on_gpu=True) - one)
            acpu += n * cm._draft_cpu_attn(B, q, s, srcs)
    pc = PointCosts(
        batch=B, micro_batches=M, draft_len=k, tokens_per_iteration=float(c0.tokens_per_iteration),
        num_experts=E, is_moe=cm.is_moe.copy(),
        gpu_fixed_s=(c0.pre_s + c0.post_s + c0.attn_gpu_s).sum(axis=1), moe_gpu_s=c0.moe_gpu_s.sum(axis=1),
        h2d_table_s=tab, cpu_expert_s=float(c0.cpu_expert_s_per_uncached_expert),
        attn_cpu_s_per_seq=np.asarray(c0.cpu_attn_s_per_seq, float),
        attn_gpu_s_per_seq=np.asarray(c0.gpu_attn_s_per_seq, float),
        fixed_s=float(c0.lm_head_s.sum() + c0.verify_s.sum()),
        draft_mm_s=mm, draft_attn_gpu_s=agpu, draft_attn_cpu_s=acpu,
        gpu_fixed_bytes=float(gpu_fixed), gpu_usable_bytes=base["gpu_usable"],
        cpu_fixed_bytes=base["cpu_fixed"], cpu_usable_bytes=base["cpu_usable"],
        expert_bytes=float(m.expert_elems * wl.weight_bytes_per_elem),
        kv_target_bytes=float(kv_bytes_per_sequence(m, wl)),
        kv_draft_bytes=float(draft_kv_bytes_per_sequence(cm.draft, wl)) if use_draft else 0.0,
        time_scale_s=float(c0.closed_form_time_s) or 1.0, serial=bool(c0.serial),
    )
    pc.gemm_rate_drop = _gemm_rate_drop(cm, B * (cm.workload.acceptance.acc(k) + 1.0)) if use_draft else 1.0
    zeros = np.zeros(L)
    pc.attn_cpu_fixed_s, pc.attn_gpu_fixed_s, pc.moe_fixed_s = zeros, zeros.copy(), zeros.copy()
    if getattr(cm, "has_ov", False):
        # fixed costs per invocation: read off the cost model at placements that switch each one on
        mb0 = c0.mb_sizes[0]
        pc.attn_cpu_fixed_s = c0.attn_cpu_s[:, 0] - pc.attn_cpu_s_per_seq * mb0
        allgpu = cm.iteration(B, M, k, Placement(expert_cache_slots=(0,) * L, target_kv_gpu_sequences=B))
        pc.attn_gpu_fixed_s = allgpu.attn_gpu_s[:, 0] - pc.attn_gpu_s_per_seq * mb0
        if E:
            cpux = cm.iteration(B, M, k, Placement(expert_cache_slots=(0,) * L, cpu_expert_layers=tuple(cm.model.moe_layers)))
            pc.moe_fixed_s = np.where(cm.is_moe, cpux.moe_gpu_s.sum(axis=1), 0.0)
    pc.layer_class = _layer_classes(pc)
    return pc


def _memory_base(cm: CostModel, k: int, streaming_buffers: int) -> dict:
    """The placement- and batch-independent memory terms of planner.memory.footprint (cached per k):
    the weights on the GPU (everything there but cache, buffers, KV and activations), the CPU's fixed
    part (pinned experts), and the usable capacities. Tests check the sum against footprint()."""
    cache = cm.__dict__.setdefault("_milp_memory_base", {})
    key = (k > 0 and cm.draft is not None, streaming_buffers)
    if key not in cache:
        empty = Placement(expert_cache_slots=(0,) * cm.L, streaming_buffers=streaming_buffers)
        fp = footprint(cm.model, cm.hw, cm.workload, 1, k, empty, cm.draft if key[0] else None, 1)
        skip = ("expert_cache", "streaming_buffers", "draft_kv", "target_kv", "activations")
        cache[key] = {"weights": float(sum(v for n, v in fp.gpu_breakdown.items() if n not in skip)),
                      "cpu_fixed": float(sum(v for n, v in fp.cpu_breakdown.items() if n not in ("draft_kv", "target_kv"))),
                      "gpu_usable": float(fp.gpu_usable_bytes), "cpu_usable": float(fp.cpu_usable_bytes)}
    return cache[key]


def _gemm_rate_drop(cm: CostModel, max_tokens: float) -> float:
    """rho: how far the GPU's measured GEMM rate falls, at up to max_tokens tokens, below its best rate
    at fewer tokens. With a rate that never falls (rho = 1), splitting the draft's tokens in two never
    costs less than running them together (mm(a) + mm(b) >= mm(a + b)); otherwise up to the factor
    rho. The curve is linear in log(tokens) between its points, so its points and max_tokens suffice."""
    curve = cm.hw.measured.gpu_gemm_TFLOPs_by_M if cm.use_measured else None
    if curve is None:
        return 1.0
    from .roofline import interp_curve

    xs = [x for x in curve.xs if x <= max_tokens] + [max_tokens]
    ys = np.array([interp_curve(curve, x) for x in xs])
    return float(min(1.0, np.min(ys / np.maximum.accumulate(ys))))


def add_kv_streaming(pc: PointCosts, cm: CostModel) -> None:
    """Seconds to stream one sequence's KV of each layer to the GPU (variants with GPU attention)."""
    if pc.kv_h2d_s_per_seq is None:
        B = pc.batch
        cg = cm.iteration(B, pc.micro_batches, pc.draft_len,
                          Placement(expert_cache_slots=(0,) * pc.num_layers, attention_device="gpu"))
        pc.kv_h2d_s_per_seq = cg.kv_h2d_s.sum(axis=1) / B                        # [L]


def draft_range(pc: PointCosts) -> tuple[int, int]:
    """The draft-KV splits g that memory can allow at all: at most what fits in the free GPU memory,
    at least what the CPU cannot hold even with every target KV that fits moved to the GPU."""
    B = pc.batch
    if not pc.uses_draft:
        return 0, 0
    free = pc.gpu_usable_bytes * (1 - MEM_SLACK) - pc.gpu_fixed_bytes
    cpu_free = pc.cpu_usable_bytes * (1 - MEM_SLACK) - pc.cpu_fixed_bytes
    kt, kd = pc.kv_target_bytes, pc.kv_draft_bytes
    t_cap = min(B, max(0.0, free) / kt) if kt > 0 else 0.0
    hi = int(min(B, np.floor(max(0.0, free) / kd + 1e-9)))
    lo = int(max(0, np.ceil(B - (cpu_free - (B - t_cap) * kt) / kd - 1e-9)))
    return min(lo, hi), hi


def draft_is_piecewise_linear(cm: CostModel) -> bool:
    """Whether D(g) is piecewise linear (datasheet peaks: roofline maxima of linear terms), so that a few
    breakpoints reproduce it exactly; measured GEMM / attention curves bend it."""
    m = cm.hw.measured
    return not cm.use_measured or (m.gpu_gemm_TFLOPs_by_M is None and not m.cpu_attention_kv_GBps)


def add_draft(pc: PointCosts, D) -> None:
    """Breakpoints of the draft-time function D(g) over the splits memory allows (draft_range)."""
    if pc.draft_g is None:
        if pc.uses_draft:
            lo, hi = draft_range(pc)
            pc.draft_g, pc.draft_s, pc.draft_exact = pwl_breakpoints(D, lo, hi)
        else:
            pc.draft_g, pc.draft_s = np.array([0]), np.array([0.0])


def _layer_classes(pc: PointCosts) -> np.ndarray:
    """[L] class id; MoE layers with identical coefficients share one (for symmetry breaking)."""
    out = np.full(pc.num_layers, -1, dtype=int)
    moe = np.flatnonzero(pc.is_moe)
    if moe.size == 0:
        return out
    feats = np.column_stack([pc.gpu_fixed_s[moe], pc.moe_gpu_s[moe], pc.attn_cpu_s_per_seq[moe],
                             pc.attn_gpu_s_per_seq[moe], pc.h2d_table_s[moe]])          # [n, 4 + E+1]
    if np.all(feats == feats[0]):
        out[moe] = 0
        return out
    keys: dict = {}
    for i, l in enumerate(moe):
        out[l] = keys.setdefault(feats[i].tobytes(), len(keys))
    return out


# --------------------------------------------------------------------------------------------
def memory_feasible(pc: PointCosts, v: Variant) -> bool:
    """Necessary memory condition: KV that does not fit the CPU fits in the GPU memory left after the
    weights, activations and the fewest streaming buffers the variant allows."""
    B, E = pc.batch, pc.num_experts
    n_moe = int(pc.is_moe.sum())
    nb = max(1, v.streaming_buffers)
    buf_min = 0.0 if (v.x_mode != "stream" or E == 0 or n_moe == 0) else min(nb, n_moe) * E * pc.expert_bytes
    free = pc.gpu_usable_bytes - pc.gpu_fixed_bytes - buf_min
    cpu_free = pc.cpu_usable_bytes - pc.cpu_fixed_bytes
    if free < 0 or cpu_free < 0:
        return False
    over = B * (pc.kv_target_bytes + pc.kv_draft_bytes) - cpu_free
    movable = (B * pc.kv_target_bytes if v.target_kv_gpu else 0.0) + B * pc.kv_draft_bytes
    return over <= min(free, movable) + 1e-9 * max(1.0, over)


def lower_bound_s(pc: PointCosts, v: Variant) -> float:
    """A cheap valid lower bound of the program's optimum T (seconds); +inf when memory cannot fit.

    Relaxations: the KV that must leave the CPU is charged to the GPU first; the cache slots get the
    rest (continuous), the target KV the best place it could have on its own, the draft a relaxed
    D(g) >= max(matmuls of all B + GPU attention of g, CPU attention of B - g). Layers: identical
    layers (one class) by Jensen, n f(mean slots) <= sum_l f(c_l) for the convex per-layer time f;
    otherwise the max of the per-resource sums, with the fewest total H2D for the slot budget."""
    if not memory_feasible(pc, v):
        return float("inf")
    B, E, L = pc.batch, pc.num_experts, pc.num_layers
    eb, nb = pc.expert_bytes, max(1, v.streaming_buffers)
    moe = np.flatnonzero(pc.is_moe)
    n = len(moe)
    free = pc.gpu_usable_bytes - pc.gpu_fixed_bytes
    cpu_free = pc.cpu_usable_bytes - pc.cpu_fixed_bytes
    mand = max(0.0, B * (pc.kv_target_bytes + pc.kv_draft_bytes) - cpu_free)     # KV the GPU must hold
    buf_min = min(nb, n) * E * eb if (v.x_mode == "stream" and n and E) else 0.0
    slot_mem = max(0.0, free - mand)
    t_cap = min(B, max(0.0, free - buf_min) / pc.kv_target_bytes) if (v.target_kv_gpu and pc.kv_target_bytes > 0) else 0.0
    cpu_seqs = 0.0 if v.gpu_attention else max(0.0, B - t_cap)
    kv_seqs = max(0.0, B - t_cap) if v.gpu_attention else 0.0
    kvh = pc.kv_h2d_s_per_seq if pc.kv_h2d_s_per_seq is not None else np.zeros(L)
    a = pc.attn_cpu_s_per_seq * cpu_seqs                                           # [L]
    p = kvh * kv_seqs                                                              # [L]
    g = pc.gpu_fixed_s + (pc.attn_gpu_s_per_seq * B if v.gpu_attention else 0.0)   # [L]
    dense = np.flatnonzero(~pc.is_moe)
    total = float(np.maximum(np.maximum(p[dense], a[dense]), g[dense]).sum())
    if n:
        total += _moe_layers_bound(pc, v, moe, a, p, g, slot_mem)
    if pc.uses_draft:
        kd = pc.kv_draft_bytes
        g_hi = min(B, max(0.0, free - buf_min) / kd)
        g_lo = min(g_hi, max(0.0, B - (cpu_free - (B - t_cap) * pc.kv_target_bytes) / kd))
        ag, ac = pc.draft_attn_gpu_s / B, pc.draft_attn_cpu_s / B
        # rho: the matmul part relies on the GEMM rate not falling with more tokens (see _gemm_rate_drop)
        mm = pc.gemm_rate_drop * pc.draft_mm_s
        cands = [g_lo, g_hi] + ([min(max((ac * B - mm) / (ag + ac), g_lo), g_hi)] if ag + ac > 0 else [])
        total += min(max(mm + ag * x, ac * (B - x)) for x in cands)
    return total + pc.fixed_s


def _interp(tab: np.ndarray, c: float) -> float:
    lo = min(int(np.floor(c)), len(tab) - 1)
    return float(tab[lo] if lo >= len(tab) - 1 else tab[lo] + (tab[lo + 1] - tab[lo]) * (c - lo))


def _moe_layers_bound(pc: PointCosts, v: Variant, moe, a, p, g, slot_mem: float) -> float:
    E, eb, n = pc.num_experts, pc.expert_bytes, len(moe)
    nb = max(1, v.streaming_buffers)
    G = g[moe] + pc.moe_gpu_s[moe]
    cu = pc.cpu_expert_s
    one_class = len(set(pc.layer_class[moe].tolist())) == 1

    def f_cpu(l: int, c_cap: float) -> float:
        # min over c in [0, c_cap] of max(kv, A + cu (E - c), G + moe c / E)
        a1, b1 = a[l] + cu * E, cu
        a2, b2 = g[l], pc.moe_gpu_s[l] / E
        cs = [0.0, c_cap] + ([min(max((a1 - a2) / (b1 + b2), 0.0), c_cap)] if b1 + b2 > 0 else [])
        return max(p[l], min(max(a1 - b1 * c, a2 + b2 * c) for c in cs))

    if one_class and v.x_mode in ("stream", "cpu"):
        l = int(moe[0])
        if v.x_mode == "cpu":
            return n * f_cpu(l, min(float(E), slot_mem / (n * eb)))
        # mean slots c: n c w_e + nb w_e (E - c) <= slot memory (the buffers hold at least E - mean c)
        if n > nb:
            c_bar = min(float(E), max(0.0, (slot_mem - nb * E * eb) / (eb * (n - nb))))
        else:
            c_bar = float(E)
        return n * max(_interp(pc.h2d_table_s[l], c_bar) + p[l], a[l], G[0])
    c_cap = min(float(E), slot_mem / eb)
    if v.x_mode == "stream":
        # sum of maxes >= max of sums; the fewest total H2D for the slot budget takes the largest
        # decrements of the convex per-layer tables
        dec = np.sort(np.concatenate([-np.diff(pc.h2d_table_s[l]) for l in moe]))[::-1]
        budget = min(slot_mem / eb, float(len(dec)))
        k = int(np.floor(budget))
        saved = dec[:k].sum() + (dec[k] * (budget - k) if k < len(dec) else 0.0)
        h_tot = float(pc.h2d_table_s[moe, 0].sum() - saved)
        return max(h_tot + float(p[moe].sum()), float(a[moe].sum()), float(G.sum()))
    # per-layer x (or several classes with CPU experts): each layer alone, the better of its two modes
    total = 0.0
    for i, l in enumerate(moe):
        f = f_cpu(int(l), c_cap)
        if v.x_mode == "per_layer":
            f = min(f, max(_interp(pc.h2d_table_s[l], c_cap) + p[l], a[l], G[i]))
        total += f
    return total


def lp_bound_reference_s(pc: PointCosts, v: Variant, max_time_s: float | None = None) -> float:
    """The plain reference of `lp_bound_s`: the same linear program solved by scipy's HiGHS (scipy is
    imported here only: it costs half a second). A small linear program with one mean
    slot count per class of identical MoE layers (Jensen: n f(mean c) <= sum_l f(c_l) for the
    convex per-layer time f, and the buffers hold at least E - mean c), continuous t and g, the
    relaxed draft time, and the same memory rows as the MILP. +inf when it is infeasible. Variant
    "per_layer" (min of two convex modes is not convex) falls back to lower_bound_s."""
    from scipy.optimize import linprog

    if v.x_mode == "per_layer" or (v.gpu_attention and pc.kv_h2d_s_per_seq is None):
        return lower_bound_s(pc, v)
    if not memory_feasible(pc, v):
        return float("inf")
    B, E, L, S = pc.batch, pc.num_experts, pc.num_layers, pc.time_scale_s
    moe = np.flatnonzero(pc.is_moe)
    classes: dict[int, list[int]] = {}
    for l in moe:
        classes.setdefault(int(pc.layer_class[l]), []).append(int(l))
    reps = [m[0] for m in classes.values()]
    counts = [len(m) for m in classes.values()]
    dense = [int(l) for l in np.flatnonzero(~pc.is_moe)]
    J, Dn = len(reps), len(dense)
    # variable order: c_j (J), tau_j (J), tau_d (Dn), t, g, U, delta
    nv = 2 * J + Dn + 4
    it, ig, iU, idl = 2 * J + Dn, 2 * J + Dn + 1, 2 * J + Dn + 2, 2 * J + Dn + 3
    y = 1.0 if v.gpu_attention else 0.0
    kvh = pc.kv_h2d_s_per_seq if v.gpu_attention else np.zeros(L)
    rows, rhs = [], []

    def ge(coef: dict, const: float, var: int) -> None:
        # var >= const + sum coef_i x_i   ->   sum coef_i x_i - var <= -const
        r = np.zeros(nv)
        for i, a_ in coef.items():
            r[i] += a_
        r[var] -= 1.0
        rows.append(r)
        rhs.append(-const)

    def layer_terms(l: int, var: int) -> None:
        a_c, a_g, kv = pc.attn_cpu_s_per_seq[l] / S, pc.attn_gpu_s_per_seq[l] / S, kvh[l] / S
        # cpu attention a_c (1-y)(B - t); gpu attention a_g (t + y (B - t)); kv streaming kv y (B - t)
        cpu = ({it: -a_c * (1 - y)}, a_c * (1 - y) * B)
        gpu = ({it: a_g * (1 - y)}, pc.gpu_fixed_s[l] / S + a_g * y * B)
        pci = ({it: -kv * y}, kv * y * B)
        return cpu, gpu, pci

    for j, (l, n) in enumerate(zip(reps, counts)):
        cpu, gpu, pci = layer_terms(l, J + j)
        moe_s = pc.moe_gpu_s[l] / S
        if v.x_mode == "stream":
            for b, s_ in pc.h2d_lines(l):
                ge({**pci[0], j: s_ / S}, pci[1] + b / S, J + j)
            ge(cpu[0], cpu[1], J + j)
            ge(gpu[0], gpu[1] + moe_s, J + j)
            ge({j: -1.0}, float(E), iU)                                    # U >= E - c_j
        else:
            ge(pci[0], pci[1], J + j)
            ge({**cpu[0], j: -pc.cpu_expert_s / S}, cpu[1] + pc.cpu_expert_s * E / S, J + j)
            ge({**gpu[0], j: moe_s / E}, gpu[1], J + j)
    for d, l in enumerate(dense):
        cpu, gpu, pci = layer_terms(l, 2 * J + d)
        for coef, const in (cpu, gpu, pci):
            ge(coef, const, 2 * J + d)
    if pc.uses_draft:
        # relaxed draft: max(rho matmuls of all B + GPU attention of g, CPU attention of B - g)
        ag, ac = pc.draft_attn_gpu_s / B / S, pc.draft_attn_cpu_s / B / S
        ge({ig: ag}, pc.gemm_rate_drop * pc.draft_mm_s / S, idl)
        ge({ig: -ac}, ac * B, idl)
    Gb, Cb = pc.gpu_usable_bytes, pc.cpu_usable_bytes
    r = np.zeros(nv)
    for j, n in enumerate(counts):
        r[j] = n * pc.expert_bytes / Gb
    r[iU] = (max(1, v.streaming_buffers) * pc.expert_bytes / Gb) if v.x_mode == "stream" else 0.0
    r[ig], r[it] = pc.kv_draft_bytes / Gb, pc.kv_target_bytes / Gb
    rows.append(r)
    rhs.append(1.0 - MEM_SLACK - pc.gpu_fixed_bytes / Gb)                         # GPU memory
    r = np.zeros(nv)
    r[it], r[ig] = -pc.kv_target_bytes / Cb, -pc.kv_draft_bytes / Cb
    rows.append(r)
    rhs.append(1.0 - MEM_SLACK - (pc.cpu_fixed_bytes + B * (pc.kv_target_bytes + pc.kv_draft_bytes)) / Cb)   # CPU memory
    cost = np.zeros(nv)
    cost[J:2 * J] = counts
    cost[2 * J:2 * J + Dn] = 1.0
    cost[idl] = 1.0
    if max_time_s is not None:
        rows.append(cost.copy())
        rhs.append(max_time_s / S - pc.fixed_s / S)
    bounds = ([(0, E)] * J + [(0, None)] * (J + Dn) + [(0, B if v.target_kv_gpu else 0), (0, B if pc.uses_draft else 0),
              (0, E), (0, None)])
    res = linprog(cost, A_ub=np.array(rows), b_ub=np.array(rhs), bounds=bounds, method="highs")
    if res.status == 2:
        return float("inf")
    if res.status != 0:
        return lower_bound_s(pc, v)
    # the LP's own tolerance (~1e-9 relative) must not turn the bound into an overestimate
    return (float(res.fun) + pc.fixed_s / S) * S * (1 - 1e-7)


def lp_bound_s(pc: PointCosts, v: Variant) -> float:
    """The optimum of the linear relaxation of `lp_bound_reference_s` (one class of identical MoE
    layers), computed without an LP solver: for a fixed t the program in (mean slots c, draft split
    g) is convex and piecewise linear in g once c takes all the GPU memory g leaves (or its best
    value below that), so its minimum is at one of a few kinks; the value V(t) is convex in t
    (an LP's value function), minimised by golden section and bounded from below by the secants
    of the points evaluated. Several classes (routing statistics) or per-layer x: lower_bound_s."""
    moe = np.flatnonzero(pc.is_moe)
    if v.x_mode == "per_layer" or (v.gpu_attention and pc.kv_h2d_s_per_seq is None):
        return lower_bound_s(pc, v)
    if len(set(pc.layer_class[moe].tolist())) > 1:
        return lp_bound_reference_s(pc, v)          # several classes (routing statistics): the LP itself
    if not memory_feasible(pc, v):
        return float("inf")
    B, E, n = pc.batch, pc.num_experts, len(moe)
    slack = 1.0 - MEM_SLACK
    eb, nb = pc.expert_bytes, max(1, v.streaming_buffers)
    kt, kd = pc.kv_target_bytes, pc.kv_draft_bytes
    gfree = pc.gpu_usable_bytes * slack - pc.gpu_fixed_bytes
    cfree = pc.cpu_usable_bytes * slack - pc.cpu_fixed_bytes - B * (kt + kd)   # CPU room left with all KV there
    y = 1.0 if v.gpu_attention else 0.0
    kvh = pc.kv_h2d_s_per_seq if v.gpu_attention else np.zeros(pc.num_layers)
    stream = v.x_mode == "stream" and n > 0
    if n == 0:
        buf, coef = 0.0, 0.0
    elif stream and n <= nb:
        buf, coef = n * E * eb, 0.0          # every slot filled is cheapest (no buffers then)
    elif stream:
        buf, coef = nb * E * eb, (n - nb) * eb
    else:
        buf, coef = 0.0, n * eb
    l0 = int(moe[0]) if n else -1
    lines = pc.h2d_lines(l0) if stream else []
    # slots where the H2D table changes slope (between its consecutive lines)
    kinks = [(b2 - b1) / (s1 - s2) for (b1, s1), (b2, s2) in zip(lines[:-1], lines[1:]) if s1 != s2]
    dense = np.flatnonzero(~pc.is_moe)
    ag_d, ac_d = (pc.draft_attn_gpu_s / B, pc.draft_attn_cpu_s / B) if pc.uses_draft else (0.0, 0.0)

    def layer_parts(l: int, t: float) -> tuple[float, float, float]:
        off = B - t
        return (kvh[l] * y * off, pc.attn_cpu_s_per_seq[l] * (1 - y) * off,
                pc.gpu_fixed_s[l] + pc.attn_gpu_s_per_seq[l] * (t + y * off))

    def F(c: float, t: float) -> float:
        p, a, g = layer_parts(l0, t)
        if stream:
            return max(max(b + s * c for b, s in lines) + p, a, g + pc.moe_gpu_s[l0])
        return max(p, a + pc.cpu_expert_s * (E - c), g + pc.moe_gpu_s[l0] * c / E)

    def c_best(cmax: float, t: float) -> float:
        """The slots to use given at most cmax: all of them (streaming), or the crossing point (CPU experts)."""
        if stream or n == 0:
            return cmax
        p, a, g = layer_parts(l0, t)
        b1, b2 = pc.cpu_expert_s, pc.moe_gpu_s[l0] / E
        cross = (a + b1 * E - g) / (b1 + b2) if b1 + b2 > 0 else cmax
        return min(cmax, max(0.0, cross))

    mm_d = pc.gemm_rate_drop * pc.draft_mm_s
    hull = draft_lower_hull(pc) if pc.uses_draft else None

    def D(g: float) -> float:
        if not pc.uses_draft:
            return 0.0
        relaxed = max(mm_d + ag_d * g, ac_d * (B - g))
        if hull is None:
            return relaxed
        return max(relaxed, float(np.interp(g, hull[0], hull[1])))

    def V(t: float) -> float:
        R = gfree - buf - kt * t                                # memory left for slots and draft KV
        if R < -1e-9 * gfree:
            return float("inf")
        R = max(R, 0.0)
        dense_s = sum(max(layer_parts(int(l), t)) for l in dense)
        if kd > 0:
            g_lo = max(0.0, -(cfree + kt * t) / kd)             # CPU: kt (B - t) + kd (B - g) <= room
            g_hi = min(float(B), R / kd)
        else:
            if cfree + kt * t < -1e-9 * max(1.0, abs(cfree)):
                return float("inf")
            g_lo = g_hi = 0.0
        if g_lo > g_hi + 1e-9:
            return float("inf")

        def cmax(g: float) -> float:
            if n == 0:
                return 0.0
            if coef == 0.0:
                return float(E)
            return min(float(E), max(0.0, (R - kd * g) / coef))

        cands = {g_lo, g_hi}
        if pc.uses_draft and ag_d + ac_d > 0:
            cands.add((ac_d * B - mm_d) / (ag_d + ac_d))
        if hull is not None:
            cands.update(float(x) for x in hull[0])
        if kd > 0 and coef > 0:
            # g where the slots hit E, or where the per-layer time changes its active piece
            cs = [float(E)] + kinks
            if n:
                p, a, gg = layer_parts(l0, t)
                K = max(a, gg + pc.moe_gpu_s[l0]) if stream else None
                if stream:
                    cs += [(K - p - b) / s for b, s in lines if s != 0]
                else:
                    cs.append(c_best(float(E), t))
            cands.update((R - coef * c) / kd for c in cs)
        best = float("inf")
        for g in cands:
            g = min(max(g, g_lo), g_hi)
            c = c_best(cmax(g), t)
            best = min(best, n * F(c, t) + D(g)) if n else min(best, D(g))
        return best + dense_s

    t_hi = min(float(B) if v.target_kv_gpu else 0.0, (gfree - buf) / kt if kt > 0 else float(B))
    t_lo = max(0.0, -(cfree + B * kd) / kt) if kt > 0 else 0.0   # CPU: with every draft KV on the GPU
    if t_lo > t_hi + 1e-9:
        return float("inf")
    t_hi = max(t_hi, t_lo)
    pts = {t_lo: V(t_lo), t_hi: V(t_hi)}
    a_, b_ = t_lo, t_hi
    phi = (np.sqrt(5.0) - 1) / 2
    x1, x2 = b_ - phi * (b_ - a_), a_ + phi * (b_ - a_)
    f1, f2 = V(x1), V(x2)
    pts[x1], pts[x2] = f1, f2
    for _ in range(60):
        if b_ - a_ <= 1.0:               # the secant bound below stays valid at any bracket width
            break
        if f1 <= f2:
            b_, x2, f2 = x2, x1, f1
            x1 = b_ - phi * (b_ - a_)
            f1 = V(x1)
            pts[x1] = f1
        else:
            a_, x1, f1 = x1, x2, f2
            x2 = a_ + phi * (b_ - a_)
            f2 = V(x2)
            pts[x2] = f2
    lb = _convex_min_lower_bound(sorted(pts.items()))
    return (lb + pc.fixed_s) * (1 - 1e-9)


def draft_lower_hull(pc: PointCosts) -> tuple[np.ndarray, np.ndarray] | None:
    """A convex function below D(g): the lower convex hull of its breakpoints, when they reproduce D
    at every integer (peak rates). Not with measured rates: D is curved between its breakpoints there
    and their hull can lie above it (measured: up to 20%), so those bounds keep the relaxed draft."""
    if pc.draft_g is None or len(pc.draft_g) < 2 or not pc.draft_exact:
        return None
    return lower_hull(np.asarray(pc.draft_g, float), np.asarray(pc.draft_s, float))


def _convex_min_lower_bound(pts: list[tuple[float, float]]) -> float:
    """A lower bound of min V over [x_0, x_n] for a convex V known at the sorted points (x_i, V_i):
    between x_i and x_i+1, V lies above the secants of the neighbouring pairs extended."""
    xs = [p[0] for p in pts]
    fs = [p[1] for p in pts]
    if not all(np.isfinite(fs)):
        # the feasible set is an interval and V is +inf outside; keep the finite run
        fin = [i for i, f in enumerate(fs) if np.isfinite(f)]
        if not fin:
            return float("inf")
        xs, fs = xs[fin[0]:fin[-1] + 1], fs[fin[0]:fin[-1] + 1]
    lb = min(fs)
    for i in range(len(xs) - 1):
        cands = []
        if i >= 1 and xs[i] > xs[i - 1]:
            sl = (fs[i] - fs[i - 1]) / (xs[i] - xs[i - 1])
            cands.append((fs[i], sl, xs[i]))                    # line through x_i-1, x_i
        if i + 2 < len(xs) and xs[i + 2] > xs[i + 1]:
            sr = (fs[i + 2] - fs[i + 1]) / (xs[i + 2] - xs[i + 1])
            cands.append((fs[i + 1], sr, xs[i + 1]))            # line through x_i+1, x_i+2
        if not cands:
            lb = min(lb, min(fs[i], fs[i + 1]))                 # no information: only the ends
            continue
        # the max of the two extended lines, minimised over [x_i, x_i+1]
        grid = [xs[i], xs[i + 1]]
        if len(cands) == 2:
            (f_a, s_a, x_a), (f_b, s_b, x_b) = cands
            if s_a != s_b:
                xc = (f_b - s_b * x_b - f_a + s_a * x_a) / (s_a - s_b)
                if xs[i] < xc < xs[i + 1]:
                    grid.append(xc)
        lb = min(lb, min(max(f + s * (x - x0) for f, s, x0 in cands) for x in grid))
    return lb


# --------------------------------------------------------------------------------------------
@dataclass
class Milp:
    problem: object                   # pulp.LpProblem
    pc: PointCosts
    variant: Variant
    v: dict                           # variable handles
    build_s: float = 0.0


def _ge(prob, name: str, lhs_var, terms: list, const: float) -> None:
    """lhs_var >= sum(coef * var) + const, with numbers among the `var`s folded into the constant."""
    import pulp

    e: dict = {}                                 # variable -> coefficient (a variable may appear twice)
    if not isinstance(lhs_var, (int, float)):
        e[lhs_var] = 1.0
    k = -const + (float(lhs_var) if isinstance(lhs_var, (int, float)) else 0.0)
    for coef, var in terms:
        if isinstance(var, (int, float)):
            k -= coef * var
        elif coef != 0.0:
            e[var] = e.get(var, 0.0) - coef
    prob.addConstraint(pulp.LpConstraint(pulp.LpAffineExpression(list(e.items()), constant=k),
                                         pulp.LpConstraintGE, name=name))


def _layer_time(prob, T_l, res: list[list[tuple[str, list, float]]], serial: bool, layer: int) -> None:
    """T_l >= each resource's time (they overlap), or on a serial host (the CPU standing in for the
    GPU) T_l >= their sum. A resource whose time is the max of several lines contributes each line:
    the sum of maxima is the max over the combinations of one line per resource."""
    if not serial:
        for alts in res:
            for name, terms, const in alts:
                _ge(prob, name, T_l, terms, const)
        return
    for combo in itertools.product(*res):
        _ge(prob, f"serial_{layer}_" + "_".join(n.rsplit("_", 1)[-1] if n.count("_") > 1 else "0" for n, _, _ in combo),
            T_l, [t for _, terms, _ in combo for t in terms], sum(c for _, _, c in combo))


def build(pc: PointCosts, variant: Variant, max_time_s: float | None = None) -> Milp:
    """The pulp model of one point and variant (needs add_draft, and add_kv_streaming for GPU
    attention). max_time_s: an upper bound on T (the latency objective's throughput floor)."""
    import pulp

    if pc.draft_g is None or (variant.gpu_attention and pc.kv_h2d_s_per_seq is None):
        raise ValueError("build: call add_draft (and add_kv_streaming for GPU attention) first")
    t0 = time.perf_counter()
    B, E, L, S = pc.batch, pc.num_experts, pc.num_layers, pc.time_scale_s
    prob = pulp.LpProblem("specmoe_point", pulp.LpMinimize)
    moe = [int(l) for l in np.flatnonzero(pc.is_moe)]
    mode = variant.x_mode if moe else "stream"
    c = {l: pulp.LpVariable(f"c_{l}", 0, E, cat="Integer") for l in moe}
    x = {l: pulp.LpVariable(f"x_{l}", 0, 1, cat="Binary") for l in moe} if mode == "per_layer" else {}
    z = {l: pulp.LpVariable(f"z_{l}", 0, E) for l in x}
    T = [pulp.LpVariable(f"T_{l}", 0) for l in range(L)]
    t = pulp.LpVariable("t", 0, B, cat="Integer") if variant.target_kv_gpu else 0
    y = 1.0 if variant.gpu_attention else 0.0
    g = pulp.LpVariable("g", int(pc.draft_g[0]), int(pc.draft_g[-1]), cat="Integer") if pc.uses_draft else 0
    U = pulp.LpVariable("U", 0, E) if (moe and mode != "cpu") else 0
    Dv = _draft_pwl(prob, pc, g) if pc.uses_draft else 0.0
    for l in x:
        # z_l = x_l (E - c_l) exactly:  z <= E x ;  z <= E - c ;  z >= (E - c) - E (1 - x)
        _ge(prob, f"z_le_Ex_{l}", 0.0, [(1.0, z[l]), (-E, x[l])], 0.0)
        _ge(prob, f"z_le_uncached_{l}", 0.0, [(1.0, z[l]), (1.0, c[l])], -E)
        _ge(prob, f"z_ge_{l}", z[l], [(-1.0, c[l]), (E, x[l])], 0.0)
    kvh = pc.kv_h2d_s_per_seq if variant.gpu_attention else np.zeros(L)
    u_parts, v_parts = _attention_parts(prob, pc, variant, t)
    for l in range(L):
        # the layer's resource times, each a list of linear alternatives (the max of its lines);
        # T_l >= every one (the resources overlap), or >= their sum on a serial host
        res: list[list[tuple[str, list, float]]] = []
        a_c, a_g, kv = pc.attn_cpu_s_per_seq[l] / S, pc.attn_gpu_s_per_seq[l] / S, kvh[l] / S
        # CPU-KV sequences B - t: attention on the CPU (y = 0), or streamed and on the GPU (y = 1):
        #   cpu attention a_c (1 - y)(B - t); gpu attention a_g (t + y (B - t)); KV streaming kv y (B - t)
        cpu_att = ([(-a_c * (1 - y), t)] + [(pc.attn_cpu_fixed_s[l] / S, u) for u in u_parts], a_c * (1 - y) * B)
        gpu_att = ([(a_g * (1 - y), t)] + [(pc.attn_gpu_fixed_s[l] / S, vv) for vv in v_parts], a_g * y * B)
        kv_str = ([(-kv * y, t)], kv * y * B)
        G = pc.gpu_fixed_s[l] / S
        if l not in c:
            # dense layer: pcie_l = KV streaming, cpu_l = CPU attention, gpu_l = pre + post + dense FFN + GPU attention
            if y:
                res.append([(f"pcie_{l}", *kv_str)])
            res.append([(f"cpu_{l}", *cpu_att)])
            res.append([(f"gpu_{l}", gpu_att[0], gpu_att[1] + G)])
            _layer_time(prob, T[l], res, pc.serial, l)
            continue
        mfix = pc.moe_fixed_s[l] / S
        moe_s, cu = pc.moe_gpu_s[l] / S - mfix, pc.cpu_expert_s / S
        if mode == "cpu":
            # pcie_l = KV streaming; cpu_l = CPU attention + cold experts cu (E - c_l);
            # gpu_l = G + attention + MoE c_l / E (+ the MoE's fixed cost, which stays)
            if y:
                res.append([(f"pcie_{l}", *kv_str)])
            res.append([(f"cpu_{l}", cpu_att[0] + [(-cu, c[l])], cpu_att[1] + cu * E)])
            res.append([(f"gpu_{l}", gpu_att[0] + [(moe_s / E, c[l])], gpu_att[1] + G + mfix)])
            _layer_time(prob, T[l], res, pc.serial, l)
            continue
        zl, xl = z.get(l, 0), x.get(l, 0)
        lines = pc.h2d_lines(l)
        if len(lines) == 1:
            b, s = lines[0]
            # pcie_l: T_l >= (1 - x_l) H2D_l(c_l) + KV streaming; H2D_l = b + s c is linear with H2D_l(E) = 0,
            # so (1 - x)(b + s c) = b + s c + s z
            res.append([(f"pcie_{l}", kv_str[0] + [(s / S, c[l]), (s / S, zl)], kv_str[1] + b / S)])
        else:
            big = pc.h2d_table_s[l][0] / S
            # pcie_l: T_l >= H2D_l(c_l) - H2D_l(0) x_l + KV streaming (H2D_l convex: the max of its lines)
            res.append([(f"pcie_{l}_{j}", kv_str[0] + [(s / S, c[l]), (-big, xl)], kv_str[1] + b / S)
                        for j, (b, s) in enumerate(lines)])
        # cpu_l: T_l >= CPU attention + cold experts on the CPU: cu z_l
        res.append([(f"cpu_{l}", cpu_att[0] + [(cu, zl)], cpu_att[1])])
        # gpu_l: T_l >= pre + post + GPU attention + MoE (1 - z_l / E)  (cold experts on the CPU leave the GPU)
        res.append([(f"gpu_{l}", gpu_att[0] + [(-moe_s / E, zl)], gpu_att[1] + G + moe_s + mfix)])
        _layer_time(prob, T[l], res, pc.serial, l)
        # streaming buffers: U >= E - c_l on streaming layers:  U >= E - c_l - E x_l
        _ge(prob, f"buf_{l}", U, [(-1.0, c[l]), (-float(E), xl)], float(E))
    _symmetry(prob, pc, c, x, E)
    # GPU memory: fixed + w_e sum_l c_l + nbuf w_e U + kv_d g + kv_t t <= usable (1 - slack)
    Gb = pc.gpu_usable_bytes
    eb, nb = pc.expert_bytes / Gb, max(1, variant.streaming_buffers)
    _ge(prob, "gpu_memory", 1.0 - MEM_SLACK, [(eb, cv) for cv in c.values()]
        + [(nb * eb, U), (pc.kv_draft_bytes / Gb, g), (pc.kv_target_bytes / Gb, t)], pc.gpu_fixed_bytes / Gb)
    # CPU memory: pinned experts + kv_t (B - t) + kv_d (B - g) <= usable (1 - slack)
    C = pc.cpu_usable_bytes
    _ge(prob, "cpu_memory", 1.0 - MEM_SLACK, [(-pc.kv_target_bytes / C, t), (-pc.kv_draft_bytes / C, g)],
        (pc.cpu_fixed_bytes + B * (pc.kv_target_bytes + pc.kv_draft_bytes)) / C)
    total = pulp.lpSum(T) + pc.fixed_s / S + Dv
    if max_time_s is not None:
        # throughput floor: sum_l T_l + LM head + acceptance + D <= B (acc+1) / floor
        prob += total <= max_time_s / S, "throughput_floor"
    prob += total
    return Milp(prob, pc, variant, dict(c=c, x=x, t=t, g=g), time.perf_counter() - t0)


def _attention_parts(prob, pc: PointCosts, variant: Variant, t) -> tuple[list, list]:
    """Indicators of the micro-batches whose CPU-KV part (u_j) and GPU-KV part (v_j) are not empty,
    for the fixed cost each attention invocation has (only when the spec has fixed costs). The GPU-KV
    sequences split over micro-batches as the cost model does (split_even: larger parts first):
    t = sum_j tg_j,  tg_j - tg_j+1 in {0, 1},  tg_0 - tg_M-1 <= 1."""
    import pulp

    if not (np.any(pc.attn_cpu_fixed_s) or np.any(pc.attn_gpu_fixed_s)):
        return [], []
    from .cost_model import split_even

    M, B = pc.micro_batches, pc.batch
    mb = split_even(B, M)
    if variant.gpu_attention:                 # every sequence's attention on the GPU: all parts there
        return [], [1.0] * M
    if not isinstance(t, pulp.LpVariable):    # t fixed at 0: every part on the CPU
        return [1.0] * M, []
    tg = [pulp.LpVariable(f"tg_{j}", 0, mb[j], cat="Integer") for j in range(M)]
    u = [pulp.LpVariable(f"u_{j}", 0, 1, cat="Binary") for j in range(M)]
    v = [pulp.LpVariable(f"v_{j}", 0, 1, cat="Binary") for j in range(M)]
    # t = sum_j tg_j, split evenly with the larger parts first
    _ge(prob, "tg_sum_le", 0.0, [(1.0, x) for x in tg] + [(-1.0, t)], 0.0)
    _ge(prob, "tg_sum_ge", 0.0, [(-1.0, x) for x in tg] + [(1.0, t)], 0.0)
    for j in range(M - 1):
        _ge(prob, f"tg_order_{j}", tg[j], [(1.0, tg[j + 1])], 0.0)
        _ge(prob, f"tg_step_{j}", tg[j + 1], [(1.0, tg[j])], -1.0)
    if M > 1:
        _ge(prob, "tg_spread", tg[-1], [(1.0, tg[0])], -1.0)
    for j in range(M):
        # CPU part mb_j - tg_j > 0 forces u_j = 1; GPU part tg_j > 0 forces v_j = 1
        _ge(prob, f"u_{j}_on", 0.0, [(-float(mb[j]), u[j]), (-1.0, tg[j])], float(mb[j]))
        _ge(prob, f"v_{j}_on", 0.0, [(1.0, tg[j]), (-float(mb[j]), v[j])], 0.0)
    return u, v


def convex_runs(xs: np.ndarray, ys: np.ndarray) -> list[tuple[int, int]]:
    """Maximal index ranges [i, j] over which the piecewise-linear (xs, ys) is convex."""
    n = len(xs)
    if n <= 2:
        return [(0, n - 1)]
    slopes = np.diff(ys) / np.diff(xs)
    tol = 1e-12 * max(1.0, float(np.abs(slopes).max()))
    runs, start = [], 0
    for j in range(1, n - 1):           # breakpoint j joins slopes j-1 and j
        if slopes[j] < slopes[j - 1] - tol:
            runs.append((start, j))
            start = j
    runs.append((start, n - 1))
    return runs


def lower_hull(xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The lower convex hull of points sorted by x (monotone chain)."""
    hull: list[int] = []
    for i in range(len(xs)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            if (ys[b] - ys[a]) * (xs[i] - xs[a]) >= (ys[i] - ys[a]) * (xs[b] - xs[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    return xs[hull], ys[hull]


def _draft_pwl(prob, pc: PointCosts, g):
    """D(g) through its breakpoints p_j, in convex runs r (one binary u_r each when there are several):
    g = sum lam_rj p_j,  D = sum lam_rj D(p_j),  sum_j lam_rj = u_r,  sum_r u_r = 1.
    Within a convex run the cheapest combination for a given g uses the two neighbouring breakpoints,
    so D is exact at every breakpoint and linear between them."""
    import pulp

    xs, ys = pc.draft_g, pc.draft_s / pc.time_scale_s
    if not pc.draft_exact:
        # D is curved (measured rates) and only approximated anyway: its lower convex hull, no binaries
        xs, ys = lower_hull(xs, ys)
    runs = convex_runs(xs, ys)
    tg, td, us = [], [], []
    for r, (i, j) in enumerate(runs):
        lam = [pulp.LpVariable(f"lam_{r}_{q}", 0, 1) for q in range(i, j + 1)]
        u = pulp.LpVariable(f"run_{r}", 0, 1, cat="Binary") if len(runs) > 1 else 1
        us.append(u)
        prob += pulp.lpSum(lam) == u, f"draft_run_{r}"
        tg += [float(xs[q]) * lv for q, lv in zip(range(i, j + 1), lam)]
        td += [float(ys[q]) * lv for q, lv in zip(range(i, j + 1), lam)]
    if len(runs) > 1:
        prob += pulp.lpSum(us) == 1, "draft_one_run"
    prob += g == pulp.lpSum(tg), "draft_g"
    return pulp.lpSum(td)


def _symmetry(prob, pc: PointCosts, c: dict, x: dict, E: int) -> None:
    """Identical layers are interchangeable, and among identical layers with the same x the slots
    differ by at most one (a layer's time is convex in its slots, so evening two layers out never
    costs more; memory depends on the sum and on the fewest slots of a streaming layer). So order
    them: CPU-expert layers first, slots descending within each x, at most one apart."""
    by_class: dict[int, list[int]] = {}
    for l in c:
        by_class.setdefault(int(pc.layer_class[l]), []).append(l)
    for members in by_class.values():
        if len(members) < 2:
            continue
        first, last = members[0], members[-1]
        for a, b in zip(members[:-1], members[1:]):
            if x:
                prob += x[a] >= x[b], f"sym_x_{a}"
                # same x: c_a >= c_b; relaxed by E where the CPU-expert block ends
                prob += c[a] >= c[b] - E * (x[a] - x[b]), f"sym_c_{a}"
            else:
                prob += c[a] >= c[b], f"sym_c_{a}"
        if not x:
            prob += c[first] - c[last] <= 1, f"spread_{first}"
            continue
        for l in members[1:]:
            # CPU-expert block (starts at `first`): c_first - c_l <= 1 where x_l = 1
            prob += c[first] - c[l] <= 1 + E * (1 - x[l]), f"spread1_{l}"
        for l in members[:-1]:
            # streaming block (ends at `last`): c_l - c_last <= 1 where x_l = 0
            prob += c[l] - c[last] <= 1 + E * x[l], f"spread0_{l}"


# --------------------------------------------------------------------------------------------
@dataclass
class SolveResult:
    status: str            # Optimal | Infeasible | ...
    time_s: float
    objective_s: float     # the program's optimum T in seconds (nan unless Optimal)


def solver_for(name: str, time_limit_s: float | None = None, lean: bool = False):
    """A pulp solver. lean (CBC): no preprocessing, root cuts, strong branching or heuristics, which
    cost more than they save on programs of identical layers (measured 5-15x faster there, same
    optima) but can stall on others (layers that all differ)."""
    import pulp

    if name == "cbc":
        return pulp.PULP_CBC_CMD(msg=False, gapRel=1e-9, timeLimit=time_limit_s, threads=1,
                                 options=["preprocess off", "cuts off", "strong 0", "heuristics off"] if lean else [])
    if name == "highs":
        for cls in (getattr(pulp, "HiGHS", None), getattr(pulp, "HiGHS_CMD", None)):
            if cls is not None:
                s = cls(msg=False, gapRel=1e-9, timeLimit=time_limit_s)
                if s.available():
                    if hasattr(s, "optionsDict"):
                        s.optionsDict["output_flag"] = False       # no banner on stdout
                    return s
        raise SpecError("solver", "HiGHS is not available to pulp (neither highspy nor a `highs` binary)",
                        "pip install highspy, or use --solver cbc")
    raise SpecError("solver", f"unknown solver {name!r}", f"one of {', '.join(SOLVERS)}")


def solve(model: Milp, solver: str = "cbc", time_limit_s: float | None = None) -> SolveResult:
    """Solve and report the solver's status (never assumes success)."""
    import pulp

    t0 = time.perf_counter()
    prob = model.problem
    pc = model.pc
    lean = len(set(pc.layer_class[pc.is_moe].tolist())) <= 1
    try:
        prob.solve(solver_for(solver, time_limit_s, lean=lean))
    except pulp.PulpSolverError as e:
        # CBC 2.10.3 (the one bundled with pulp) can crash on an infeasible program when run lean
        # (segfault in tightenPrimalBounds); run it again with its defaults
        try:
            if not lean or solver != "cbc":
                raise
            prob.solve(solver_for(solver, time_limit_s, lean=False))
        except pulp.PulpSolverError:
            raise SpecError("solver", f"{solver} failed: {e}", "try the other solver (--solver cbc|highs)") from None
    status = pulp.LpStatus[prob.status]
    if status == "Optimal" and getattr(prob, "sol_status", 1) == 2:     # stopped by the time limit
        status = "Integer feasible (time limit)"
    usable = status in ("Optimal", "Integer feasible (time limit)")
    obj = float(pulp.value(prob.objective)) * model.pc.time_scale_s if usable else float("nan")
    return SolveResult(status, time.perf_counter() - t0, obj)


def decode(model: Milp, routing_stats: np.ndarray | None = None) -> Placement:
    """The Placement of a solved program (integers rounded from the solver's floats)."""
    import pulp

    pc, v, var = model.pc, model.v, model.variant
    L, E = pc.num_layers, pc.num_experts

    def val(e) -> int:
        return int(e) if isinstance(e, (int, float)) else int(round(pulp.value(e) or 0.0))

    slots = [0] * L
    for l, cv in v["c"].items():
        slots[l] = val(cv)
    moe = [int(l) for l in np.flatnonzero(pc.is_moe)]
    if var.x_mode == "cpu":
        cpu_layers = tuple(l for l in moe if slots[l] < E)
    else:
        cpu_layers = tuple(l for l, xv in v["x"].items() if val(xv) == 1 and slots[l] < E)
    cached: tuple = ()
    if routing_stats is not None and E:
        cached = tuple(tuple(int(e) for e in np.argsort(-np.asarray(routing_stats[l], float), kind="stable")[:slots[l]])
                       if pc.is_moe[l] else () for l in range(L))
    return Placement(expert_cache_slots=tuple(slots), target_kv_gpu_sequences=val(v["t"]),
                     draft_kv_gpu_sequences=val(v["g"]), attention_device="gpu" if var.gpu_attention else "cpu",
                     cpu_expert_layers=cpu_layers, streaming_buffers=var.streaming_buffers, cached_experts=cached)
