"""The pulp model of one point and variant: `build` (after planner.milp.costs' add_draft, and
add_kv_streaming for GPU attention). Each constraint has its formula in the comment above it.

T is the cost model's closed form (CostModel.iteration(...).closed_form_time_s):

    T = sum_l max(pcie_l, cpu_l, gpu_l) + LM head + acceptance + D(g)

linearised with one epigraph variable T_l >= each of the three per layer (>= their sum on a serial
host). Where the copies and the CPU share host DRAM, T_l is also >= cpu_l + a pcie_l and >= pcie_l +
b cpu_l (planner/shared_dram.py), which covers the first two. Variables:

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

from specmoe.planner.milp.costs import MEM_SLACK, PointCosts, Variant, convex_runs, lower_hull


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


@dataclass
class _Vars:
    """The program's variables; a number where the variant fixes one (t = 0 without target KV on the
    GPU, g = 0 without a draft, U = 0 when every layer's cold experts run on the CPU)."""

    c: dict                           # MoE layer -> c_l
    x: dict                           # MoE layer -> x_l (variant "per_layer" only)
    z: dict                           # MoE layer -> z_l = x_l (E - c_l)
    T: list                           # T_l, every layer
    t: object
    g: object
    U: object
    y: float                          # 1: verify attention of CPU-KV sequences on the GPU
    mode: str                         # the variant's x mode ("stream" for a model without MoE layers)
    u_parts: list = field(default_factory=list)     # micro-batches with a CPU-KV part (fixed costs)
    v_parts: list = field(default_factory=list)     # micro-batches with a GPU-KV part (fixed costs)


def build(pc: PointCosts, variant: Variant, max_time_s: float | None = None) -> Milp:
    """The pulp model of one point and variant (needs add_draft, and add_kv_streaming for GPU
    attention). max_time_s: an upper bound on T (the latency objective's throughput floor)."""
    import pulp

    if pc.draft_g is None or (variant.gpu_attention and pc.kv_h2d_s_per_seq is None):
        raise ValueError("build: call add_draft (and add_kv_streaming for GPU attention) first")
    t0 = time.perf_counter()
    S, E = pc.time_scale_s, pc.num_experts
    prob = pulp.LpProblem("specmoe_point", pulp.LpMinimize)
    V = _variables(pc, variant)
    Dv = _draft_pwl(prob, pc, V.g) if pc.uses_draft else 0.0
    for l in V.x:
        # z_l = x_l (E - c_l) exactly:  z <= E x ;  z <= E - c ;  z >= (E - c) - E (1 - x)
        _ge(prob, f"z_le_Ex_{l}", 0.0, [(1.0, V.z[l]), (-E, V.x[l])], 0.0)
        _ge(prob, f"z_le_uncached_{l}", 0.0, [(1.0, V.z[l]), (1.0, V.c[l])], -E)
        _ge(prob, f"z_ge_{l}", V.z[l], [(-1.0, V.c[l]), (E, V.x[l])], 0.0)
    kvh = pc.kv_h2d_s_per_seq if variant.gpu_attention else np.zeros(pc.num_layers)   # [L]
    V.u_parts, V.v_parts = _attention_parts(prob, pc, variant, V.t)
    for l in range(pc.num_layers):
        _layer_rows(prob, pc, V, kvh, l)
    _symmetry(prob, pc, V.c, V.x, E)
    _memory_rows(prob, pc, variant, V)
    total = pulp.lpSum(V.T) + pc.fixed_s / S + Dv
    if max_time_s is not None:
        # throughput floor: sum_l T_l + LM head + acceptance + D <= B (acc+1) / floor
        prob += total <= max_time_s / S, "throughput_floor"
    prob += total
    return Milp(prob, pc, variant, dict(c=V.c, x=V.x, t=V.t, g=V.g), time.perf_counter() - t0)


def _variables(pc: PointCosts, variant: Variant) -> _Vars:
    """The variables of the table in the module's docstring, bounded as it says."""
    import pulp

    B, E, L = pc.batch, pc.num_experts, pc.num_layers
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
    return _Vars(c=c, x=x, z=z, T=T, t=t, g=g, U=U, y=y, mode=mode)


def _layer_rows(prob, pc: PointCosts, V: _Vars, kvh: np.ndarray, l: int) -> None:
    """Layer l's resource times, each a list of linear alternatives (the max of its lines); T_l >= every
    one (the resources overlap), or >= their sum on a serial host. Streaming layers also bound U."""
    S, B, y, t = pc.time_scale_s, pc.batch, V.y, V.t
    a_c, a_g, kv = pc.attn_cpu_s_per_seq[l] / S, pc.attn_gpu_s_per_seq[l] / S, kvh[l] / S
    # CPU-KV sequences B - t: attention on the CPU (y = 0), or streamed and on the GPU (y = 1):
    #   cpu attention a_c (1 - y)(B - t); gpu attention a_g (t + y (B - t)); KV streaming kv y (B - t)
    cpu_att = ([(-a_c * (1 - y), t)] + [(pc.attn_cpu_fixed_s[l] / S, u) for u in V.u_parts], a_c * (1 - y) * B)
    gpu_att = ([(a_g * (1 - y), t)] + [(pc.attn_gpu_fixed_s[l] / S, vv) for vv in V.v_parts], a_g * y * B)
    kv_str = ([(-kv * y, t)], kv * y * B)
    if l not in V.c:
        res = _dense_layer(pc, V, l, cpu_att, gpu_att, kv_str)
    elif V.mode == "cpu":
        res = _cpu_expert_layer(pc, V, l, cpu_att, gpu_att, kv_str)
    else:
        res = _streaming_layer(pc, V, l, cpu_att, gpu_att, kv_str)
    if pc.shared_dram_lines is not None and not pc.serial:
        res += _shared_dram_rows(pc, V, res)
    _layer_time(prob, V.T[l], res, pc.serial, l)
    if l in V.c and V.mode != "cpu":
        # streaming buffers: U >= E - c_l on streaming layers:  U >= E - c_l - E x_l
        E = pc.num_experts
        _ge(prob, f"buf_{l}", V.U, [(-1.0, V.c[l]), (-float(E), V.x.get(l, 0))], float(E))


def _dense_layer(pc: PointCosts, V: _Vars, l: int, cpu_att, gpu_att, kv_str) -> list:
    """A dense layer's resource times."""
    # dense layer: pcie_l = KV streaming, cpu_l = CPU attention, gpu_l = pre + post + dense FFN + GPU attention
    G = pc.gpu_fixed_s[l] / pc.time_scale_s
    res = [[(f"pcie_{l}", *kv_str)]] if V.y else []
    res.append([(f"cpu_{l}", *cpu_att)])
    res.append([(f"gpu_{l}", gpu_att[0], gpu_att[1] + G)])
    return res


def _cpu_expert_layer(pc: PointCosts, V: _Vars, l: int, cpu_att, gpu_att, kv_str) -> list:
    """A MoE layer that computes its non-resident experts on the CPU (variant "cpu")."""
    # pcie_l = KV streaming; cpu_l = CPU attention + cold experts cu (E - c_l);
    # gpu_l = G + attention + MoE c_l / E (+ the MoE's fixed cost, which stays)
    S, E, c = pc.time_scale_s, pc.num_experts, V.c
    G, mfix = pc.gpu_fixed_s[l] / S, pc.moe_fixed_s[l] / S
    moe_s, cu = pc.moe_gpu_s[l] / S - mfix, pc.cpu_expert_s / S
    res = [[(f"pcie_{l}", *kv_str)]] if V.y else []
    res.append([(f"cpu_{l}", cpu_att[0] + [(-cu, c[l])], cpu_att[1] + cu * E)])
    res.append([(f"gpu_{l}", gpu_att[0] + [(moe_s / E, c[l])], gpu_att[1] + G + mfix)])
    return res


def _streaming_layer(pc: PointCosts, V: _Vars, l: int, cpu_att, gpu_att, kv_str) -> list:
    """A MoE layer that streams its non-resident experts, or (x_l = 1) computes them on the CPU."""
    S, E, c = pc.time_scale_s, pc.num_experts, V.c
    G, mfix = pc.gpu_fixed_s[l] / S, pc.moe_fixed_s[l] / S
    moe_s, cu = pc.moe_gpu_s[l] / S - mfix, pc.cpu_expert_s / S
    zl, xl = V.z.get(l, 0), V.x.get(l, 0)
    lines = pc.h2d_lines(l)
    res = []
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
    return res


def _shared_dram_rows(pc: PointCosts, V: _Vars, res: list) -> list:
    """The copies and the CPU share host DRAM (planner/shared_dram.py): one pair of rows per line of the
    layer's PCIe time t_h, with its CPU time t_c. The CPU's work is its attention where attention runs
    there (y = 0; the CPU experts of an x_l = 1 layer then have no copies beside them), else its experts."""
    a, b = pc.shared_dram_lines[1 if V.y else 0]
    cpu = [alt for alts in res for alt in alts if alt[0].startswith("cpu_")]
    pcie = [alt for alts in res for alt in alts if alt[0].startswith("pcie_")]
    if not cpu or not pcie or (a <= 0.0 and b <= 0.0):
        return []
    (_, c_terms, c_const), = cpu
    rows = []
    for name, p_terms, p_const in pcie:
        tag = name[len("pcie_"):]
        # T_l >= t_c + a t_h  (the copies finish first) ;  T_l >= t_h + b t_c  (the CPU finishes first)
        rows.append([(f"dram_a_{tag}", c_terms + [(a * co, v) for co, v in p_terms], c_const + a * p_const)])
        rows.append([(f"dram_b_{tag}", p_terms + [(b * co, v) for co, v in c_terms], p_const + b * c_const)])
    return rows


def _memory_rows(prob, pc: PointCosts, variant: Variant, V: _Vars) -> None:
    """The GPU and CPU memory constraints."""
    B = pc.batch
    # GPU memory: fixed + w_e sum_l c_l + nbuf w_e U + kv_d g + kv_t t <= usable (1 - slack)
    Gb = pc.gpu_usable_bytes
    eb, nb = pc.expert_bytes / Gb, max(1, variant.streaming_buffers)
    _ge(prob, "gpu_memory", 1.0 - MEM_SLACK, [(eb, cv) for cv in V.c.values()]
        + [(nb * eb, V.U), (pc.kv_draft_bytes / Gb, V.g), (pc.kv_target_bytes / Gb, V.t)], pc.gpu_fixed_bytes / Gb)
    # CPU memory: pinned experts + kv_t (B - t) + kv_d (B - g) <= usable (1 - slack)
    C = pc.cpu_usable_bytes
    _ge(prob, "cpu_memory", 1.0 - MEM_SLACK, [(-pc.kv_target_bytes / C, V.t), (-pc.kv_draft_bytes / C, V.g)],
        (pc.cpu_fixed_bytes + B * (pc.kv_target_bytes + pc.kv_draft_bytes)) / C)


def _attention_parts(prob, pc: PointCosts, variant: Variant, t) -> tuple[list, list]:
    """Indicators of the micro-batches whose CPU-KV part (u_j) and GPU-KV part (v_j) are not empty,
    for the fixed cost each attention invocation has (only when the spec has fixed costs). The GPU-KV
    sequences split over micro-batches as the cost model does (split_even: larger parts first):
    t = sum_j tg_j,  tg_j - tg_j+1 in {0, 1},  tg_0 - tg_M-1 <= 1."""
    import pulp

    if not (np.any(pc.attn_cpu_fixed_s) or np.any(pc.attn_gpu_fixed_s)):
        return [], []
    from specmoe.planner.cost_model import split_even

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
