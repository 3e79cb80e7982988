"""The decode-iteration cost model (DESIGN.md, "The cost model"): seconds of every stage of one
iteration, per layer and micro-batch, from the roofline of each operation.

Notation (the paper's): hidden h, expert intermediate h_e, experts E, active top-k n_a, layers l,
KV heads n_kv, head dim d, query heads n_q, weight bytes w_b, KV bytes kv_b. Configuration: batch
B, micro-batches m, mean context s, draft length k, acceptance acc(k). N = B(k+1) tokens go
through the target per iteration; B(acc(k)+1) tokens come out.

Array dimension letters: L = target layers, M = micro-batches, G = draft groups (1, or M when
one micro-batch's draft overlaps another's verification), K = draft steps.

Per layer i and micro-batch j (b_j sequences, n_j = b_j(k+1) tokens):
  target.pre_attn   GPU   norm + Q/K/V projections: 2 n_j P flops, P w_b weight bytes (P = pre-attention weights)
  target.attention  CPU   (k+1) queries per CPU-KV sequence over s cached + (k+1) new keys:
                          KV bytes b (s+k+1) kv_elems kv_b; flops 2 b n_q e_h ((k+1) s + (k+1)(k+2)/2),
                          e_h = elements each query head reads per key (2d; MLA: 2 x latent)
                    GPU   the same for sequences whose target KV is on the GPU (HBM bytes)
  target.post_attn  GPU   o-proj, router, shared experts (dense FFN on dense layers)
  target.moe        GPU   routed experts: 2 n_j n_a 3 h h_e flops, touched(n_j) experts' weights from HBM,
                          touched(n) = E (1 - (1 - n_a/E)^n) (uniform routing)
  target.h2d        PCIe  per layer: expected non-resident touched experts x expert bytes / H2D rate.
                          Each of the E - c non-cached experts is touched with probability
                          p = 1 - (1 - n_a/E)^N, so t_h2d(c) = (E - c) p w_e / B_h2d: linear in the cache
                          slots c, equal to (touched - c) when every cached expert is touched (p -> 1,
                          the large-batch case); unlike (touched - c)+ it stays right at small N.
                          A CPU standing in for the GPU (shares_host_cpu) streams by reference (the
                          engine's buffers are views of the host store's rows): t_h2d = 0, no copy.
                    CPU   (layers in placement.cpu_expert_layers) the non-cached experts compute on the
                          CPU instead: (E - c) experts x max(flops / CPU GEMM rate, p w_e / DRAM bw);
                          the GPU then computes only the cached share c/E of the routed tokens.
  target.lm_head    GPU   final projection over all B(k+1) tokens at once (logits for every draft
                          position), as the engine runs it; its time is spread over the micro-batch
                          columns by share
  verify.accept     GPU   read the B(k+1) V fp32 logits and compare (memory-bound), once per iteration
  draft.gpu         GPU   k draft steps for sequences with draft KV on the GPU (weights + KV from HBM)
  draft.cpu         CPU+GPU  the same for CPU-draft-KV sequences: attention on the CPU, the rest on the GPU
The draft's first step re-reads the acc(k)+1 accepted tokens, the other k-1 steps one token each.

Every layer's closed form is the bare max of its three resources (the design's check of the
simulator): layer_time = max(t_h2d, t_cpu, t_gpu).

Fixed costs (planner/fixed_costs.py, with the count of invocations per stage): where the hardware
spec has measured per-invocation overheads, every stage costs fixed + roofline; without them (and with
use_measured=False) the fixed parts are zero: the bare roofline.

The result, with its closed forms, is an IterationCosts (planner/iteration_costs.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from specmoe.planner.cost_terms import (ACT_BYTES, LOGIT_BYTES, head_read_elems, matmul_elems_per_token, split_even,
                                        touched_experts)
from specmoe.planner.errors import SpecError
from specmoe.planner.fixed_costs import FixedCosts
from specmoe.planner.hardware_spec import HardwareSpec
from specmoe.planner.iteration_costs import IterationCosts
from specmoe.planner.model_spec import ModelSpec
from specmoe.planner.overhead import Overheads
from specmoe.planner.plan import Placement
from specmoe.planner.schedule import Schedule
from specmoe.planner.roofline import OpCost, OpTime, h2d_rate, peak_flops, time_on
from specmoe.planner.shared_dram import SharedDram, shared_dram
from specmoe.planner.workload import KV_DTYPES, Workload

__all__ = ["ACT_BYTES", "LOGIT_BYTES", "CostModel", "IterationCosts", "head_read_elems", "matmul_elems_per_token",
           "split_even", "touched_experts"]


@dataclass
class _Config:
    """One configuration of `iteration`, resolved: sizes, the split of sequences over micro-batches,
    and the sources of the times computed for it (filled in as they are)."""

    B: int
    M: int
    k: int
    s: float                    # mean context
    acc: float                  # acc(k)
    mb: list[int]               # [M] sequences per micro-batch
    tg: list[int]               # [M] GPU-KV sequences per micro-batch
    attn_on_gpu: bool           # CPU-KV attention runs on the GPU (the KV streamed over PCIe)
    srcs: set = field(default_factory=set)
    ops_memo: dict = field(default_factory=dict)      # b -> _TargetOps

    def __post_init__(self):
        self.k1 = self.k + 1                           # tokens per sequence through the target
        self.N = self.B * self.k1                      # tokens through the target


class _TargetOps(NamedTuple):
    """Roofline seconds of the target's operations for b sequences of k+1 tokens (one layer)."""

    pre: float
    post_moe: float
    post_dense: float
    moe: float
    cpu_expert: float           # one non-cached expert on the CPU
    lm_head: float
    verify: float


class _AttentionSlopes(NamedTuple):
    """Verify attention is linear in the sequences it covers (flops and bytes both are): the
    per-sequence times are the slopes the optimizer uses, and the micro-batch times follow."""

    gpu: float
    cpu: float
    src_gpu: set
    src_cpu: set

    def time(self, seqs: int, on_gpu: bool, srcs: set) -> float:
        if seqs <= 0:
            return 0.0
        srcs.update(self.src_gpu if on_gpu else self.src_cpu)
        return seqs * (self.gpu if on_gpu else self.cpu)


@dataclass
class _Columns:
    """Per-micro-batch seconds of one layer ([M] each)."""

    pre: np.ndarray
    post_moe: np.ndarray
    post_dense: np.ndarray
    moe: np.ndarray
    cpu_expert: np.ndarray
    lm_head: np.ndarray
    verify: np.ndarray
    attn_cpu: np.ndarray
    attn_gpu: np.ndarray
    kv_h2d: np.ndarray


class _Streaming(NamedTuple):
    """Where each layer's experts live and what streaming the rest costs ([L] arrays)."""

    slots: np.ndarray
    cpu_layer: np.ndarray
    uncached: np.ndarray
    h2d_unit: float
    h2d: np.ndarray


class _Moe(NamedTuple):
    gpu: np.ndarray             # [L, M]
    cpu: np.ndarray             # [L, M]
    full_s: float               # GPU MoE time of a layer with all experts on the GPU
    cpu_unit: float             # CPU seconds per uncached expert, all micro-batches
    flops_gpu: float


class CostModel:
    """Model-, hardware- and workload-dependent constants, computed once; `iteration(...)` then
    evaluates one configuration in well under a millisecond (no timeline)."""

    def __init__(self, model: ModelSpec, hw: HardwareSpec, workload: Workload, draft: ModelSpec | None = None,
                 use_measured: bool = True, schedule: Schedule | None = None):
        """schedule: how the engine groups an iteration's work (planner/schedule.py); iteration() prices
        its MoE and pre/post grouping unless told otherwise (none: everything per micro-batch)."""
        self.model, self.hw, self.workload, self.draft = model, hw, workload, draft
        self.use_measured = use_measured
        self.schedule = schedule
        m = model
        self.wb = float(workload.weight_bytes_per_elem)
        self.kvb = float(KV_DTYPES[workload.kv_dtype])
        self.dtype = workload.weight_dtype
        self.L = m.num_layers
        self.E, self.na = m.num_experts, m.top_k
        self.is_moe = np.zeros(self.L, dtype=bool)                           # [L]
        self.is_moe[list(m.moe_layers)] = True
        self.num_dense = int(self.L - self.is_moe.sum())
        self.expert_bytes = m.expert_elems * self.wb
        self.o_elems = m.num_q_heads * m.head_dim * m.hidden
        self.pre_elems = m.attn_elems - self.o_elems
        self.pre_out = max(1, self.pre_elems // m.hidden)
        self.post_moe_elems = self.o_elems + m.router_elems + m.shared_expert_elems
        self.post_dense_elems = self.o_elems + m.dense_ffn_elems
        self.e_h = head_read_elems(m)
        self.kv_tok_layer_bytes = m.kv_elems_per_token_layer * self.kvb
        self.gpu_peak = peak_flops(hw, "gpu", self.dtype)
        if self.E:
            self.h2d_Bps, self.h2d_src = h2d_rate(hw, self.expert_bytes, use_measured)
        else:
            self.h2d_Bps, self.h2d_src = hw.link.h2d_Bps, "peak"
        # fixed per-invocation costs (planner/overhead.py): measured, so off with use_measured=False
        self.ov = hw.measured.overheads if use_measured else Overheads()
        self.has_ov = self.ov.any
        self.fixed = FixedCosts(self.ov, self.is_moe, self.E, self.na, draft, workload.acceptance)
        if draft is not None:
            self.d_mm = matmul_elems_per_token(draft)
            self.d_e_h = head_read_elems(draft)
            self.d_kv_tok_bytes = draft.kv_bytes_per_token(self.kvb)      # all draft layers

    # ---- single operations (memoised per call of `iteration`) ----
    def _t(self, res: str, op: OpCost, srcs: set, dtype: str | None = None, **kw) -> float:
        ot: OpTime = time_on(res, self.hw, op, dtype=dtype or self.dtype, use_measured=self.use_measured, **kw)
        if ot.time_s > 0:
            srcs.add(ot.source)
        return ot.time_s

    def attn_op(self, seqs: float, k1: float, s: float, on_gpu: bool, spec: ModelSpec | None = None,
                 e_h: float | None = None, kv_tok_bytes: float | None = None, layers: int = 1) -> OpCost:
        """Verify attention of `seqs` sequences, k1 query tokens each, over s cached + k1 new keys, in
        `layers` layers (kv_tok_bytes: KV bytes per token over those layers)."""
        spec = spec or self.model
        e_h = self.e_h if e_h is None else e_h
        kvt = self.kv_tok_layer_bytes if kv_tok_bytes is None else kv_tok_bytes
        flops = 2.0 * layers * seqs * spec.num_q_heads * e_h * (k1 * s + k1 * (k1 + 1) / 2.0)
        nbytes = seqs * (s + k1) * kvt
        return OpCost(flops=flops, hbm_bytes=nbytes) if on_gpu else OpCost(flops=flops, dram_bytes=nbytes)

    def iteration(self, batch: int, micro_batches: int, draft_len: int, placement: Placement,
                  context_len: float | None = None, batched_moe: bool | None = None,
                  draft_groups: str | None = None, draft_kv_gpu_sequences: int | None = None,
                  batched_layer: bool | None = None) -> IterationCosts:
        """Costs of one decode iteration.

        batched_moe: the routed experts of all micro-batches run together, once per layer (as the
        engine does). batched_layer: pre_attn and post_attn as well (the engine's schedule when it
        streams the next layer's experts ahead on a GPU); only attention stays per micro-batch.
        Both put the layer's whole time in micro-batch column 0.

        draft_groups: "batch" (one GPU part and one CPU part for the whole batch, the paper's
        draft-after-target) or "micro_batch" (one per micro-batch, for overlapping a micro-batch's
        draft with another's verification). draft_kv_gpu_sequences overrides the placement's (the
        whole-run simulation shrinks it as contexts grow).
        """
        opts = self.schedule.sim_options() if self.schedule is not None else {}
        batched_moe = opts.get("batched_moe", False) if batched_moe is None else batched_moe
        batched_layer = opts.get("batched_layer", False) if batched_layer is None else batched_layer
        if draft_groups is None:
            draft_groups = "micro_batch" if opts.get("overlap_draft") else "batch"
        cfg = self._configure(batch, micro_batches, draft_len, placement, context_len)
        att = self._attention_slopes(cfg)
        cols = self._micro_batch_columns(cfg, att)
        st = self._expert_streaming(cfg, placement)
        pre, post, attn_cpu, attn_gpu, kv_h2d = self._layer_arrays(cfg, cols, batched_layer)
        batched_moe = batched_moe or batched_layer
        moe = self._moe_arrays(cfg, cols, st, batched_moe)
        dg, dca, dcg, dsz = self._draft_arrays(cfg, placement, draft_groups, draft_kv_gpu_sequences)
        B, E, N = cfg.B, self.E, cfg.N
        costs = IterationCosts(
            batch=B, micro_batches=cfg.M, draft_len=cfg.k, context_len=cfg.s, mb_sizes=np.asarray(cfg.mb), tokens=N,
            tokens_per_iteration=B * (cfg.acc + 1.0), batched_moe=batched_moe, batched_layer=batched_layer,
            pre_s=pre, attn_cpu_s=attn_cpu, attn_gpu_s=attn_gpu, kv_h2d_s=kv_h2d, post_s=post,
            moe_gpu_s=moe.gpu, moe_cpu_s=moe.cpu, h2d_s=st.h2d, lm_head_s=cols.lm_head, verify_s=cols.verify,
            draft_group_sizes=dsz, draft_gpu_s=dg, draft_cpu_attn_s=dca, draft_cpu_gpu_s=dcg,
            touched=touched_experts(E, self.na, N), h2d_s_per_uncached_expert=st.h2d_unit,
            cpu_expert_s_per_uncached_expert=float(moe.cpu_unit), moe_gpu_full_s=float(moe.full_s),
            cpu_attn_s_per_seq=np.full(self.L, att.cpu), gpu_attn_s_per_seq=np.full(self.L, att.gpu),
            moe_flops_gpu=moe.flops_gpu, gpu_peak_flops=self.gpu_peak, sources=frozenset(cfg.srcs),
            serial=self.hw.gpu.shares_host_cpu, shared_dram=self._shared_dram(cfg, batched_moe),
        )
        if self.has_ov:
            self.fixed.add_to(costs, cfg.tg, cfg.attn_on_gpu)
        return costs

    # ---- the steps of `iteration` ----
    def _configure(self, batch, micro_batches, draft_len, placement: Placement,
                   context_len: float | None) -> _Config:
        """Check the configuration against the model and the placement, and resolve its sizes."""
        B, M, k = int(batch), int(micro_batches), int(draft_len)
        if B <= 0:
            raise SpecError("batch", f"must be a positive integer, got {batch!r}", "give a batch of at least 1")
        if M <= 0 or M > B:
            raise SpecError("micro_batches", f"{micro_batches!r} is not in [1, batch={B}]",
                            "use between 1 and batch micro-batches")
        if k < 0:
            raise SpecError("draft_len", f"must be >= 0, got {draft_len}", "use 0 for no speculation")
        if k > 0 and self.draft is None:
            raise SpecError("draft", f"draft_len is {k} but no draft model was given", "give a draft model or use draft_len 0")
        if len(placement.expert_cache_slots) != self.L:
            raise SpecError("placement.expert_cache_slots", f"has {len(placement.expert_cache_slots)} entries, "
                            f"the model has {self.L} layers", "give one entry per layer")
        return _Config(
            B=B, M=M, k=k, s=float(self.workload.mean_context if context_len is None else context_len),
            acc=self.workload.acceptance.acc(k) if k > 0 else 0.0, mb=split_even(B, M),
            tg=split_even(min(placement.target_kv_gpu_sequences, B), M),
            attn_on_gpu=placement.attention_device == "gpu")

    def _target_ops(self, cfg: _Config, b: int) -> _TargetOps:
        """Roofline seconds of one layer's target operations over b sequences (memoised per configuration)."""
        if b in cfg.ops_memo:
            return cfg.ops_memo[b]
        m, wb, srcs, E, na = self.model, self.wb, cfg.srcs, self.E, self.na
        n = b * cfg.k1
        pre = self._t("gpu", OpCost(2.0 * n * self.pre_elems, self.pre_elems * wb
                                    + n * (m.hidden + self.pre_out) * ACT_BYTES), srcs, tokens=n)
        post_act = n * (m.num_q_heads * m.head_dim + 2 * m.hidden) * ACT_BYTES
        post_moe = self._t("gpu", OpCost(2.0 * n * self.post_moe_elems, self.post_moe_elems * wb + post_act),
                           srcs, tokens=n)
        if self.num_dense:
            post_dense = self._t("gpu", OpCost(2.0 * n * self.post_dense_elems,
                                               self.post_dense_elems * wb + post_act), srcs, tokens=n)
        else:
            post_dense = 0.0
        if E:
            tj = touched_experts(E, na, n)
            moe = self._t("gpu", OpCost(2.0 * n * na * m.expert_elems,
                                        tj * self.expert_bytes + n * na * 2 * m.hidden * ACT_BYTES),
                          srcs, tokens=n * na / tj)
            op, tok_e = self._cpu_expert_op(n)
            cpu_e = self._t("cpu", op, srcs, tokens=tok_e)
        else:
            moe = cpu_e = 0.0
        lm = self._t("gpu", OpCost(2.0 * n * m.vocab_size * m.hidden, m.vocab_size * m.hidden * wb
                                   + n * m.vocab_size * LOGIT_BYTES), srcs, tokens=n)
        ver = self._t("gpu", OpCost(float(n * m.vocab_size), n * m.vocab_size * LOGIT_BYTES), srcs, kind="memory")
        cfg.ops_memo[b] = _TargetOps(pre, post_moe, post_dense, moe, cpu_e, lm, ver)
        return cfg.ops_memo[b]

    def _attention_slopes(self, cfg: _Config) -> _AttentionSlopes:
        """Verify attention of one sequence in one layer, its KV on the GPU and on the CPU."""
        src_gpu: set = set()
        src_cpu: set = set()
        kvd = self.workload.kv_dtype
        one_gpu = self._t("gpu", self.attn_op(1, cfg.k1, cfg.s, True), src_gpu, dtype=kvd, kind="attention")
        one_cpu = self._t("cpu", self.attn_op(1, cfg.k1, cfg.s, False), src_cpu, dtype=kvd, kind="attention",
                          n_query=cfg.k1, context=cfg.s)
        return _AttentionSlopes(one_gpu, one_cpu, src_gpu, src_cpu)

    def _micro_batch_columns(self, cfg: _Config, att: _AttentionSlopes) -> _Columns:
        """Each micro-batch's seconds in one layer. The LM head and the acceptance run once over the
        whole batch (runtime/speculative.py), their time spread over the micro-batch columns by share."""
        B, M, mb, tg, srcs = cfg.B, cfg.M, cfg.mb, cfg.tg, cfg.srcs
        cols = _Columns(*(np.empty(M) for _ in range(10)))
        whole = self._target_ops(cfg, B)
        for j in range(M):
            ops = self._target_ops(cfg, mb[j])
            cols.pre[j], cols.post_moe[j], cols.post_dense[j] = ops.pre, ops.post_moe, ops.post_dense
            cols.moe[j], cols.cpu_expert[j] = ops.moe, ops.cpu_expert
            cols.lm_head[j], cols.verify[j] = whole.lm_head * mb[j] / B, whole.verify * mb[j] / B
            n_cpu = mb[j] - tg[j]
            cols.attn_gpu[j] = att.time(tg[j], True, srcs)
            if cfg.attn_on_gpu and n_cpu > 0:
                kv_bytes = n_cpu * (cfg.s + cfg.k1) * self.kv_tok_layer_bytes
                cols.kv_h2d[j] = self._t("pcie", OpCost(pcie_bytes=kv_bytes), srcs,
                                         chunk_bytes=(cfg.s + cfg.k1) * self.kv_tok_layer_bytes)
                cols.attn_gpu[j] += att.time(n_cpu, True, srcs)
                cols.attn_cpu[j] = 0.0
            else:
                cols.kv_h2d[j] = 0.0
                cols.attn_cpu[j] = att.time(n_cpu, False, srcs)
        return cols

    def _expert_streaming(self, cfg: _Config, placement: Placement) -> _Streaming:
        """Which MoE layers stream their non-cached experts and which compute them on the CPU, and the
        H2D seconds of the streaming ones: (E - c) p w_e / B_h2d, plus one copy's fixed cost each."""
        E, na = self.E, self.na
        slots = np.asarray(placement.expert_cache_slots, dtype=float)      # [L]
        if np.any(slots < 0) or np.any(slots > max(E, 0)):
            raise SpecError("placement.expert_cache_slots", f"entries must lie in [0, {E}]", "fix the placement")
        cpu_layer = np.zeros(self.L, dtype=bool)                            # [L]
        if placement.cpu_expert_layers:
            cpu_layer[list(placement.cpu_expert_layers)] = True
        cpu_layer &= self.is_moe
        stream = self.is_moe & ~cpu_layer                                   # [L]
        uncached = np.where(self.is_moe, E - slots, 0.0)                    # [L]
        if E and not self.hw.gpu.shares_host_cpu:     # on a CPU standing in for the GPU nothing is copied
            p_all = 1.0 - (1.0 - na / E) ** cfg.N
            h2d_unit = p_all * self.expert_bytes / self.h2d_Bps
            if self.has_ov:      # one copy per streamed expert
                h2d_unit += p_all * self.ov.get("target.h2d")
        else:
            h2d_unit = 0.0
        h2d = np.where(stream, uncached * h2d_unit, 0.0)                    # [L]
        if h2d.any():
            cfg.srcs.add(self.h2d_src)
        return _Streaming(slots, cpu_layer, uncached, h2d_unit, h2d)

    def _layer_arrays(self, cfg: _Config, cols: _Columns, batched_layer: bool):
        """pre_attn, post_attn, attention (CPU, GPU) and KV streaming per layer and micro-batch ([L, M]);
        with batched_layer, pre_attn and post_attn once per layer over the whole batch (column 0)."""
        L, M = self.L, cfg.M
        ones = np.ones((L, 1))
        pre = ones * cols.pre[None, :]                                      # [L, M]
        post = np.where(self.is_moe[:, None], cols.post_moe[None, :], cols.post_dense[None, :])  # [L, M]
        attn_cpu = ones * cols.attn_cpu[None, :]
        attn_gpu = ones * cols.attn_gpu[None, :]
        kv_h2d = ones * cols.kv_h2d[None, :]
        if batched_layer:
            whole = self._target_ops(cfg, cfg.B)
            pre = np.zeros((L, M)); post = np.zeros((L, M))
            pre[:, 0] = whole.pre
            post[:, 0] = np.where(self.is_moe, whole.post_moe, whole.post_dense)
        return pre, post, attn_cpu, attn_gpu, kv_h2d

    def _moe_arrays(self, cfg: _Config, cols: _Columns, st: _Streaming, batched_moe: bool) -> _Moe:
        """Routed experts per layer and micro-batch: the GPU computes the cached share c/E on CPU-expert
        layers (all of it elsewhere), the CPU the uncached experts; batched_moe puts a layer's whole
        time in column 0."""
        L, M = self.L, cfg.M
        gpu_share = np.where(st.cpu_layer, st.slots / max(self.E, 1), 1.0)   # [L]
        if batched_moe:
            whole = self._target_ops(cfg, cfg.B)
            full_s, cpu_unit = float(whole.moe), float(whole.cpu_expert)
            moe_gpu = np.zeros((L, M)); moe_cpu = np.zeros((L, M))
            moe_gpu[:, 0] = np.where(self.is_moe, whole.moe * gpu_share, 0.0)
            moe_cpu[:, 0] = np.where(st.cpu_layer, st.uncached * cpu_unit, 0.0)
        else:
            full_s, cpu_unit = float(cols.moe.sum()), float(cols.cpu_expert.sum())
            moe_gpu = np.where(self.is_moe[:, None], gpu_share[:, None] * cols.moe[None, :], 0.0)
            moe_cpu = np.where(st.cpu_layer[:, None], st.uncached[:, None] * cols.cpu_expert[None, :], 0.0)
        flops = 2.0 * cfg.N * self.na * self.model.expert_elems * float(np.where(self.is_moe, gpu_share, 0.0).sum())
        return _Moe(moe_gpu, moe_cpu, full_s, cpu_unit, flops)

    def _draft_arrays(self, cfg: _Config, placement: Placement, draft_groups: str,
                      draft_kv_gpu_sequences: int | None):
        """Draft step seconds per group and step ([G, K]: GPU part, CPU part's attention, CPU part's
        rest on the GPU) and the group sizes [G]."""
        B, k = cfg.B, cfg.k
        if k == 0:
            return np.zeros((1, 0)), np.zeros((1, 0)), np.zeros((1, 0)), np.asarray([B])
        g_req = placement.draft_kv_gpu_sequences if draft_kv_gpu_sequences is None else draft_kv_gpu_sequences
        G_total = max(0, min(B, int(g_req)))
        groups = cfg.mb if draft_groups == "micro_batch" else [B]
        g_gpu = split_even(G_total, len(groups)) if len(groups) > 1 else [G_total]
        dg = np.zeros((len(groups), k)); dca = np.zeros((len(groups), k)); dcg = np.zeros((len(groups), k))
        dmemo: dict = {}
        for gi, (b, g) in enumerate(zip(groups, g_gpu)):
            c = b - g
            for t in range(k):
                q = (cfg.acc + 1.0) if t == 0 else 1.0
                key = (g, c, q)
                if key not in dmemo:     # steps 1..k-1 are alike: one token per sequence
                    dmemo[key] = (self.draft_part(g, q, cfg.s, cfg.srcs, on_gpu=True),
                                  self.draft_part(c, q, cfg.s, cfg.srcs, on_gpu=False) if c > 0 else 0.0,
                                  self.draft_cpu_attn(c, q, cfg.s, cfg.srcs) if c > 0 else 0.0)
                dg[gi, t], dcg[gi, t], dca[gi, t] = dmemo[key]
        return dg, dca, dcg, np.asarray(groups)

    # ---- fixed per-invocation costs (planner/fixed_costs.py) ----
    def prefill_fixed_s(self, batch: int, prompt_len: int, chunks: int) -> float:
        """Fixed seconds of the prefill (the sum of FixedCosts.prefill_parts)."""
        return self.fixed.prefill_s(batch, prompt_len, chunks)

    # ---- draft pieces ----
    def draft_part(self, seqs: int, q: float, s: float, srcs: set, on_gpu: bool) -> float:
        """One draft step of `seqs` sequences, q tokens each, on the GPU: the matmuls, plus the
        attention over the draft KV when that KV is on the GPU."""
        if seqs <= 0:
            return 0.0
        d = self.draft
        n = seqs * q
        t = self._t("gpu", OpCost(2.0 * n * self.d_mm, self.d_mm * self.wb + 2 * n * d.hidden * ACT_BYTES),
                    srcs, tokens=n)
        if on_gpu:
            op = self.attn_op(seqs, q, s, True, spec=d, e_h=self.d_e_h, kv_tok_bytes=self.d_kv_tok_bytes,
                               layers=d.num_layers)
            t += self._t("gpu", op, srcs, dtype=self.workload.kv_dtype, kind="attention")
        return t + self.fixed.draft_step_s(seqs, q, on_gpu)

    def draft_cpu_attn(self, seqs: int, q: float, s: float, srcs: set) -> float:
        return self._t("cpu", self._draft_attn_op(seqs, q, s), srcs, dtype=self.workload.kv_dtype, kind="attention",
                       n_query=q, context=s)

    def _draft_attn_op(self, seqs: float, q: float, s: float) -> OpCost:
        return self.attn_op(seqs, q, s, False, spec=self.draft, e_h=self.d_e_h, kv_tok_bytes=self.d_kv_tok_bytes,
                            layers=self.draft.num_layers)

    def _cpu_expert_op(self, n: float) -> tuple[OpCost, float]:
        """One non-cached expert computed on the CPU for n tokens: (its op, the tokens it gets, n n_a / E).
        It reads the expert's weights from DRAM when one of the n tokens touches it (probability p)."""
        p = 1.0 - (1.0 - self.na / self.E) ** n
        tok_e = n * self.na / self.E
        return OpCost(2.0 * tok_e * self.model.expert_elems, dram_bytes=p * self.expert_bytes), tok_e

    def _shared_dram(self, cfg: _Config, batched_moe: bool) -> SharedDram | None:
        """How the expert stream and the CPU's DRAM reads slow each other here (planner/shared_dram.py)
        from the CPU's operations: one sequence's attention, one CPU expert, one draft step's attention."""
        kvd, s = self.workload.kv_dtype, cfg.s
        att = (self.attn_op(1, cfg.k1, s, False), dict(dtype=kvd, kind="attention", n_query=cfg.k1, context=s))
        expert = None
        if self.E:
            op, tok_e = self._cpu_expert_op((cfg.B if batched_moe else cfg.mb[0]) * cfg.k1)
            expert = (op, dict(dtype=self.dtype, tokens=tok_e))
        qs = [cfg.acc + 1.0] + [1.0] * (cfg.k - 1) if cfg.k and self.draft is not None else []
        steps = [(self._draft_attn_op(1, q, s), dict(dtype=kvd, kind="attention", n_query=q, context=s)) for q in qs]
        return shared_dram(self.hw, self.use_measured, att, expert, steps)

    # ---- the optimizer's linear forms ----
    def h2d_s(self, costs: IterationCosts, slots) -> np.ndarray:
        """t_h2d per layer for cache slots `slots` ([L] or scalar): (E - c) p w_e / B_h2d on MoE layers."""
        c = np.broadcast_to(np.asarray(slots, dtype=float), (self.L,))
        return np.where(self.is_moe, (self.E - c) * costs.h2d_s_per_uncached_expert, 0.0)

    def cpu_attn_s(self, costs: IterationCosts, cpu_sequences) -> np.ndarray:
        """t_cpu_attn per layer for `cpu_sequences` CPU-KV sequences (linear)."""
        return costs.cpu_attn_s_per_seq * float(cpu_sequences)
