"""The coefficients of the optimizer's integer programs (planner/milp/), one point (batch B,
micro-batches m, draft length k) at a time: `point_costs` (one cost-model evaluation plus the memory
model) gives a PointCosts; `add_draft` (the draft time D(g) through exact breakpoints,
`pwl_breakpoints`) and `add_kv_streaming` complete it for the points that are solved. Also the
Variant (the discrete choices fixed outside the program), the memory slack every program and bound
uses, and the piecewise-linear helpers the bounds and the program share (`convex_runs`, `lower_hull`).

Array dimension letters: L = target layers, E = experts (E+1: the slot table 0..E), P = breakpoints.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from specmoe.planner.cost_model import CostModel
from specmoe.planner.memory import (activation_bytes, draft_kv_bytes_per_sequence, footprint, host_staging_bytes,
                                    kv_bytes_per_sequence)
from specmoe.planner.plan import Placement

MEM_SLACK = 1e-6          # memory rows are tightened by this share of the usable bytes: more than the
                          # solvers' feasibility tolerance (1e-7), so a solution never overfills memory
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
    draft_mm_s: float                  # sum over draft steps of what all B sequences' steps cost with the draft
                                       # KV on either side: the matmuls, the smaller fixed part (bound only)
    draft_attn_gpu_s: float            # the rest with all draft KV on the GPU: attention, fixed (bound only)
    draft_attn_cpu_s: float            # ... on the CPU
    gpu_fixed_bytes: float             # weights, draft weights, activations
    gpu_usable_bytes: float
    cpu_fixed_bytes: float             # pinned experts, the CPU attention's staging
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
    # host DRAM shared by the copies and the CPU (planner/shared_dram.py): (a, b) of T_l >= t_c + a t_h and
    # T_l >= t_h + b t_c, for CPU attention's work and for CPU experts' work; None: no contention
    shared_dram_lines: tuple[tuple[float, float], tuple[float, float]] | None = None

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
    some tens of times per point; tests check it against CostModel.iteration. On a serial host the
    three parts add up."""
    B, k = int(batch), int(draft_len)
    if k == 0 or cm.draft is None:
        return lambda g: 0.0
    s = float(cm.workload.mean_context)
    steps = _draft_steps(cm, k)
    serial = bool(cm.hw.gpu.shares_host_cpu)
    memo: dict[int, float] = {}

    def D(g: int) -> float:
        g = int(g)
        if g not in memo:
            c = B - g
            srcs: set = set()
            gpu = cpu = cgpu = 0.0
            for q, n in steps:
                gpu += n * cm.draft_part(g, q, s, srcs, on_gpu=True)
                if c > 0:
                    cgpu += n * cm.draft_part(c, q, s, srcs, on_gpu=False)
                    cpu += n * cm.draft_cpu_attn(c, q, s, srcs)
            # on a serial host (the CPU standing in for the GPU) the parts add up, as in the closed form
            memo[g] = gpu + cgpu + cpu if serial else max(gpu + cgpu, cpu + cgpu)
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
    gpu_fixed = base["weights"] + activation_bytes(m, wl, B, k, cm.draft if use_draft else None)
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
            # all B sequences' step with the draft KV on the device / on the host; what both share (the
            # matmuls, the smaller fixed part) is mm, the rest each side's attention term, so that both
            # ends stay exact and every term >= 0 (the parts' fixed costs are fitted apart)
            on_gpu = cm.draft_part(B, q, s, srcs, on_gpu=True)
            on_cpu = cm.draft_part(B, q, s, srcs, on_gpu=False)
            common = min(on_gpu, on_cpu)
            mm += n * common
            agpu += n * (on_gpu - common)
            acpu += n * (cm.draft_cpu_attn(B, q, s, srcs) + on_cpu - common)
    pc = PointCosts(
        batch=B, micro_batches=M, draft_len=k, tokens_per_iteration=float(c0.tokens_per_iteration),
        num_experts=E, is_moe=cm.is_moe.copy(),
        gpu_fixed_s=(c0.pre_s + c0.post_s + c0.attn_gpu_s).sum(axis=1), moe_gpu_s=c0.moe_gpu_s.sum(axis=1),
        h2d_table_s=tab, cpu_expert_s=float(c0.cpu_expert_s_per_uncached_expert),
        attn_cpu_s_per_seq=np.asarray(c0.cpu_attn_s_per_seq, float),
        attn_gpu_s_per_seq=np.asarray(c0.gpu_attn_s_per_seq, float),
        fixed_s=float(c0.lm_head_s.sum() + c0.verify_s.sum() + c0.other_s),
        draft_mm_s=mm, draft_attn_gpu_s=agpu, draft_attn_cpu_s=acpu,
        gpu_fixed_bytes=float(gpu_fixed), gpu_usable_bytes=base["gpu_usable"],
        cpu_fixed_bytes=base["cpu_fixed"] + host_staging_bytes(m, wl, B, k), cpu_usable_bytes=base["cpu_usable"],
        # device bytes of one cached expert slot or buffer slot: none where the "GPU" is the host's CPU and
        # its cache is the host store itself (planner/memory.py counts it once, there)
        expert_bytes=0.0 if c0.serial else float(m.expert_elems * wl.weight_bytes_per_elem),
        kv_target_bytes=float(kv_bytes_per_sequence(m, wl, k)),
        kv_draft_bytes=float(draft_kv_bytes_per_sequence(cm.draft, wl, k)) if use_draft else 0.0,
        time_scale_s=float(c0.closed_form_time_s) or 1.0, serial=bool(c0.serial),
    )
    pc.gemm_rate_drop = _gemm_rate_drop(cm, B * (cm.workload.acceptance.acc(k) + 1.0)) if use_draft else 1.0
    sd = c0.shared_dram
    if sd is not None and not c0.serial:
        pc.shared_dram_lines = (sd.pair_coefficients(sd.attn_cpu), sd.pair_coefficients(sd.moe_cpu))
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
                      "cpu_fixed": float(sum(v for n, v in fp.cpu_breakdown.items()
                                             if n not in ("draft_kv", "target_kv", "attention_staging"))),
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
    from specmoe.planner.roofline import interp_curve

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
