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

Fixed costs (planner/overhead.py): where the hardware spec has `measured.op_overhead_us` or
`measured.stage_overhead_us`, every stage costs fixed + roofline, the fixed part counted per
invocation as the engine makes them (runtime/speculative.py, runtime/model/target.py):
  target.pre_attn    one per layer and micro-batch (one per layer with batched_layer), plus one per pass
                     (embedding), + per sequence per pass
  target.attention   one per layer and micro-batch on each KV part it has (host / device), + per sequence
                     per pass. The GPU-KV sequences spread over the micro-batches as everywhere in the cost
                     model (split_even, which planner.milp models too); the engine puts the first rows on
                     the device, so with m > 1 and 0 < GPU-KV sequences < B its part count can differ
  target.post_attn   one per layer and micro-batch (one per layer with batched_layer), + per token per layer
  target.moe         one per layer (all micro-batches together) + one per touched expert, E(1-(1-n_a/E)^N),
                     + per token per MoE layer; spread evenly over the micro-batch columns when batched_moe is off
  target.h2d         one per streamed expert (folded into the per-uncached-expert slope, so it stays linear)
  target.lm_head     one per iteration (spread over the micro-batch columns)
  iteration.other    one per iteration + per sequence: engine work outside every stage, added to the
                     iteration (IterationCosts.other_s), not to a stage
  verify.accept      one per iteration + per sequence + per verified token
  draft.gpu/.cpu     per draft step of each non-empty part: step + L_d x layer + sequences x per-sequence;
                     its first step also L_d x catchup x P(some sequence accepted all k drafts),
                     1 - (1 - P(A >= k))^seqs with P(A >= k) = acc(k) - acc(k-1) (all inside draft_part,
                     which planner.milp's draft time uses too)
Without either field (and with use_measured=False) the fixed parts are zero: the bare roofline.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from specmoe.planner.errors import SpecError
from specmoe.planner.hardware_spec import HardwareSpec
from specmoe.planner.model_spec import ModelSpec
from specmoe.planner.overhead import Overheads
from specmoe.planner.plan import Placement
from specmoe.planner.roofline import OpCost, OpTime, h2d_rate, peak_flops, time_on
from specmoe.planner.stages import Stage
from specmoe.planner.workload import KV_DTYPES, Workload

ACT_BYTES = 2        # activations are bf16/fp16
LOGIT_BYTES = 4      # logits are fp32


def touched_experts(num_experts: int, top_k: int, tokens: float) -> float:
    """Expected distinct experts touched by `tokens` tokens under uniform top-k routing: E(1-(1-n_a/E)^N)."""
    if num_experts <= 0 or tokens <= 0:
        return 0.0
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


def split_even(total: int, parts: int) -> list[int]:
    """`total` split into `parts` near-equal integers, larger ones first."""
    q, r = divmod(int(total), int(parts))
    return [q + (1 if j < r else 0) for j in range(parts)]


def head_read_elems(spec: ModelSpec) -> float:
    """e_h: elements each query head reads per cached token (K and V). 2d with (G)QA; with MLA
    (latent KV, kv_elems != 2 n_kv d) every head reads the whole latent for K and again for V."""
    if spec.kv_elems_per_token_layer == 2 * spec.num_kv_heads * spec.head_dim:
        return 2.0 * spec.head_dim
    return 2.0 * spec.kv_elems_per_token_layer


def matmul_elems_per_token(spec: ModelSpec) -> float:
    """Weight elements a token multiplies through (active weights without the embedding lookup,
    plus the tied embedding when it doubles as the LM head)."""
    n = spec.active_params - spec.embed_elems
    if spec.tie_word_embeddings:
        n += spec.embed_elems
    return float(n)


@dataclass
class IterationCosts:
    """Seconds of every stage of one decode iteration of one configuration (arrays: see module doc)."""

    batch: int
    micro_batches: int
    draft_len: int
    context_len: float
    mb_sizes: np.ndarray            # [M] sequences per micro-batch
    tokens: int                     # N = B(k+1)
    tokens_per_iteration: float     # B(acc(k)+1)
    batched_moe: bool               # True: one target.moe event per layer over all micro-batches
    pre_s: np.ndarray               # [L, M]
    attn_cpu_s: np.ndarray          # [L, M]
    attn_gpu_s: np.ndarray          # [L, M]
    kv_h2d_s: np.ndarray            # [L, M] (attention_device == "gpu": CPU KV streamed to the GPU)
    post_s: np.ndarray              # [L, M]
    moe_gpu_s: np.ndarray           # [L, M] (batched_moe: whole-batch time in column 0)
    moe_cpu_s: np.ndarray           # [L, M] (cpu_expert_layers; batched_moe: column 0)
    h2d_s: np.ndarray               # [L]
    lm_head_s: np.ndarray           # [M]
    verify_s: np.ndarray            # [M]
    draft_group_sizes: np.ndarray   # [G]
    draft_gpu_s: np.ndarray         # [G, K] GPU-part draft step
    draft_cpu_attn_s: np.ndarray    # [G, K] CPU-part draft step: attention on the CPU
    draft_cpu_gpu_s: np.ndarray     # [G, K] CPU-part draft step: the rest on the GPU
    # ---- the linear pieces the optimizer uses ----
    touched: float                  # expected experts touched per MoE layer by the N tokens
    h2d_s_per_uncached_expert: float     # t_h2d(c) = (E - c) * this, on streaming MoE layers
    cpu_expert_s_per_uncached_expert: float  # t_cpu_moe(c) = (E - c) * this, on cpu_expert_layers
    moe_gpu_full_s: float           # GPU MoE time of a layer with all experts on the GPU (all micro-batches)
    cpu_attn_s_per_seq: np.ndarray  # [L] CPU verify attention per CPU-KV sequence (linear)
    gpu_attn_s_per_seq: np.ndarray  # [L] GPU verify attention per GPU-KV sequence (linear)
    moe_flops_gpu: float            # routed-expert flops done on the GPU per iteration
    gpu_peak_flops: float
    sources: frozenset = field(default_factory=frozenset)
    serial: bool = False            # the hardware's GPU is its CPU standing in: nothing overlaps
    batched_layer: bool = False     # pre_attn and post_attn once per layer too (column 0); attention per micro-batch
    other_s: float = 0.0            # fixed engine time outside every stage (iteration.other keys): adds to the period

    # ---- closed forms ----
    @property
    def gpu_s(self) -> np.ndarray:     # [L]
        return (self.pre_s + self.attn_gpu_s + self.post_s + self.moe_gpu_s).sum(axis=1)

    @property
    def cpu_s(self) -> np.ndarray:     # [L]
        return (self.attn_cpu_s + self.moe_cpu_s).sum(axis=1)

    @property
    def pcie_s(self) -> np.ndarray:    # [L]
        return self.h2d_s + self.kv_h2d_s.sum(axis=1)

    @property
    def layer_time_s(self) -> np.ndarray:   # [L] bare max per layer (the sum where nothing overlaps)
        if self.serial:
            return self.pcie_s + self.cpu_s + self.gpu_s
        return np.maximum(np.maximum(self.pcie_s, self.cpu_s), self.gpu_s)

    @property
    def draft_time_closed_s(self) -> float:
        """Lower bound of the draft phase: the busier of GPU and CPU, or the CPU part's step chain."""
        if self.draft_gpu_s.size == 0:
            return 0.0
        if self.serial:
            return float(self.draft_gpu_s.sum() + self.draft_cpu_gpu_s.sum() + self.draft_cpu_attn_s.sum())
        gpu = float(self.draft_gpu_s.sum() + self.draft_cpu_gpu_s.sum())
        cpu = float(self.draft_cpu_attn_s.sum())
        chain = float((self.draft_cpu_attn_s + self.draft_cpu_gpu_s).sum(axis=1).max())
        return max(gpu, cpu, chain)

    @property
    def closed_form_time_s(self) -> float:
        """Sum over layers of max(t_h2d, t_cpu, t_gpu), then LM head, acceptance and the draft phase."""
        return (float(self.layer_time_s.sum()) + float(self.lm_head_s.sum()) + float(self.verify_s.sum())
                + self.draft_time_closed_s + self.other_s)

    @property
    def sum_of_stages_s(self) -> float:
        """Everything serialised: the upper bound of the iteration."""
        return float(sum(self.stage_totals().values())) + self.other_s

    def stage_totals(self) -> dict[str, float]:
        """Busy seconds per stage per iteration, under the design's stage names."""
        return {
            Stage.TARGET_PRE_ATTN.value: float(self.pre_s.sum()),
            Stage.TARGET_ATTENTION.value: float(self.attn_cpu_s.sum() + self.attn_gpu_s.sum()),
            Stage.TARGET_POST_ATTN.value: float(self.post_s.sum()),
            Stage.TARGET_MOE.value: float(self.moe_gpu_s.sum() + self.moe_cpu_s.sum()),
            Stage.TARGET_H2D.value: float(self.h2d_s.sum() + self.kv_h2d_s.sum()),
            Stage.TARGET_LM_HEAD.value: float(self.lm_head_s.sum()),
            Stage.DRAFT_GPU.value: float(self.draft_gpu_s.sum()),
            Stage.DRAFT_CPU.value: float(self.draft_cpu_attn_s.sum() + self.draft_cpu_gpu_s.sum()),
            Stage.VERIFY_ACCEPT.value: float(self.verify_s.sum()),
        }

    def resource_busy_s(self) -> dict[str, float]:
        return {
            "gpu": float(self.gpu_s.sum() + self.lm_head_s.sum() + self.verify_s.sum()
                         + self.draft_gpu_s.sum() + self.draft_cpu_gpu_s.sum()),
            "cpu": float(self.cpu_s.sum() + self.draft_cpu_attn_s.sum()),
            "pcie": float(self.pcie_s.sum()),
        }

    def moe_gpu_utilization(self, iteration_time_s: float) -> float:
        """Achieved routed-expert FLOP rate on the GPU over the iteration, as a fraction of its peak."""
        if iteration_time_s <= 0:
            return 0.0
        return self.moe_flops_gpu / (iteration_time_s * self.gpu_peak_flops)

    @property
    def source(self) -> str:
        return "measured" if "measured" in self.sources else "peak"


class CostModel:
    """Model-, hardware- and workload-dependent constants, computed once; `iteration(...)` then
    evaluates one configuration in well under a millisecond (no timeline)."""

    def __init__(self, model: ModelSpec, hw: HardwareSpec, workload: Workload, draft: ModelSpec | None = None,
                 use_measured: bool = True):
        self.model, self.hw, self.workload, self.draft = model, hw, workload, draft
        self.use_measured = use_measured
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
                  context_len: float | None = None, batched_moe: bool = False,
                  draft_groups: str = "batch", draft_kv_gpu_sequences: int | None = None,
                  batched_layer: bool = False) -> IterationCosts:
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
        m, hw = self.model, self.hw
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
        s = float(self.workload.mean_context if context_len is None else context_len)
        k1 = k + 1
        acc = self.workload.acceptance.acc(k) if k > 0 else 0.0
        srcs: set = set()
        E, na = self.E, self.na
        N = B * k1
        mb = split_even(B, M)                                         # [M]
        tg = split_even(min(placement.target_kv_gpu_sequences, B), M)  # GPU-KV sequences per micro-batch
        cpu_attn_on_gpu = placement.attention_device == "gpu"
        wb = self.wb

        memo: dict = {}

        def per_b(b: int):
            if b in memo:
                return memo[b]
            n = b * k1
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
                p = 1.0 - (1.0 - na / E) ** n
                tok_e = n * na / E
                cpu_e = self._t("cpu", OpCost(2.0 * tok_e * m.expert_elems, dram_bytes=p * self.expert_bytes),
                                srcs, tokens=tok_e)
            else:
                moe = cpu_e = 0.0
            lm = self._t("gpu", OpCost(2.0 * n * m.vocab_size * m.hidden, m.vocab_size * m.hidden * wb
                                       + n * m.vocab_size * LOGIT_BYTES), srcs, tokens=n)
            ver = self._t("gpu", OpCost(float(n * m.vocab_size), n * m.vocab_size * LOGIT_BYTES), srcs, kind="memory")
            memo[b] = (pre, post_moe, post_dense, moe, cpu_e, lm, ver)
            return memo[b]

        # verify attention is linear in the sequences it covers (flops and bytes both are): the
        # per-sequence times are the slopes the optimizer uses, and the micro-batch times follow
        att_src: dict = {True: set(), False: set()}
        kvd = self.workload.kv_dtype
        one_gpu = self._t("gpu", self.attn_op(1, k1, s, True), att_src[True], dtype=kvd, kind="attention")
        one_cpu = self._t("cpu", self.attn_op(1, k1, s, False), att_src[False], dtype=kvd, kind="attention",
                          n_query=k1, context=s)

        def attn(seqs: int, on_gpu: bool) -> float:
            if seqs <= 0:
                return 0.0
            srcs.update(att_src[on_gpu])
            return seqs * (one_gpu if on_gpu else one_cpu)

        pre_mb = np.empty(M); pm_mb = np.empty(M); pd_mb = np.empty(M); moe_mb = np.empty(M)
        cpue_mb = np.empty(M); lm_mb = np.empty(M); ver_mb = np.empty(M)
        ac_mb = np.empty(M); ag_mb = np.empty(M); kvh_mb = np.empty(M)
        # the LM head and the acceptance run once over the whole batch (runtime/speculative.py), their time
        # spread over the micro-batch columns by share
        _, _, _, _, _, lm_all, ver_all = per_b(B)
        for j in range(M):
            pre_mb[j], pm_mb[j], pd_mb[j], moe_mb[j], cpue_mb[j], _, _ = per_b(mb[j])
            lm_mb[j], ver_mb[j] = lm_all * mb[j] / B, ver_all * mb[j] / B
            n_cpu = mb[j] - tg[j]
            ag_mb[j] = attn(tg[j], True)
            if cpu_attn_on_gpu and n_cpu > 0:
                kv_bytes = n_cpu * (s + k1) * self.kv_tok_layer_bytes
                kvh_mb[j] = self._t("pcie", OpCost(pcie_bytes=kv_bytes), srcs,
                                    chunk_bytes=(s + k1) * self.kv_tok_layer_bytes)
                ag_mb[j] += attn(n_cpu, True)
                ac_mb[j] = 0.0
            else:
                kvh_mb[j] = 0.0
                ac_mb[j] = attn(n_cpu, False)

        # ---- per layer ----
        L = self.L
        slots = np.asarray(placement.expert_cache_slots, dtype=float)      # [L]
        if np.any(slots < 0) or np.any(slots > max(E, 0)):
            raise SpecError("placement.expert_cache_slots", f"entries must lie in [0, {E}]", "fix the placement")
        cpu_layer = np.zeros(L, dtype=bool)                                 # [L]
        if placement.cpu_expert_layers:
            cpu_layer[list(placement.cpu_expert_layers)] = True
        cpu_layer &= self.is_moe
        stream = self.is_moe & ~cpu_layer                                   # [L]
        uncached = np.where(self.is_moe, E - slots, 0.0)                    # [L]
        if E:
            p_all = 1.0 - (1.0 - na / E) ** N
            h2d_unit = p_all * self.expert_bytes / self.h2d_Bps
            if self.has_ov:      # one copy per streamed expert
                h2d_unit += p_all * self.ov.get("target.h2d")
        else:
            p_all = h2d_unit = 0.0
        h2d = np.where(stream, uncached * h2d_unit, 0.0)                    # [L]
        if h2d.any():
            srcs.add(self.h2d_src)
        ones = np.ones((L, 1))
        pre = ones * pre_mb[None, :]                                        # [L, M]
        post = np.where(self.is_moe[:, None], pm_mb[None, :], pd_mb[None, :])  # [L, M]
        attn_cpu = ones * ac_mb[None, :]
        attn_gpu = ones * ag_mb[None, :]
        kv_h2d = ones * kvh_mb[None, :]
        gpu_share = np.where(cpu_layer, slots / max(E, 1), 1.0)             # [L]
        cpu_unit = float(cpue_mb.sum())          # CPU seconds per uncached expert, all micro-batches
        if batched_layer:
            batched_moe = True
            pre_w, pm_w, pd_w = per_b(B)[0:3]
            pre = np.zeros((L, M)); post = np.zeros((L, M))
            pre[:, 0] = pre_w
            post[:, 0] = np.where(self.is_moe, pm_w, pd_w)
        if batched_moe:
            moe_whole, cpue_whole = per_b(B)[3:5]
            moe_full = float(moe_whole)
            cpu_unit = float(cpue_whole)
            moe_gpu = np.zeros((L, M)); moe_cpu = np.zeros((L, M))
            moe_gpu[:, 0] = np.where(self.is_moe, moe_whole * gpu_share, 0.0)
            moe_cpu[:, 0] = np.where(cpu_layer, uncached * cpu_unit, 0.0)
        else:
            moe_full = float(moe_mb.sum())
            moe_gpu = np.where(self.is_moe[:, None], gpu_share[:, None] * moe_mb[None, :], 0.0)
            moe_cpu = np.where(cpu_layer[:, None], uncached[:, None] * cpue_mb[None, :], 0.0)
        moe_flops = 2.0 * N * na * m.expert_elems * float(np.where(self.is_moe, gpu_share, 0.0).sum())
        cpu_per_seq = np.full(L, one_cpu)                                   # [L]
        gpu_per_seq = np.full(L, one_gpu)                                   # [L]
        if self.has_ov:
            moe_full += self._add_fixed(B, M, k1, mb, tg, cpu_attn_on_gpu, batched_moe, pre, post, attn_cpu, attn_gpu,
                                        moe_gpu, lm_mb, ver_mb, cpu_per_seq, gpu_per_seq, batched_layer)
            srcs.add("measured")

        # ---- draft ----
        if k > 0:
            g_req = placement.draft_kv_gpu_sequences if draft_kv_gpu_sequences is None else draft_kv_gpu_sequences
            G_total = max(0, min(B, int(g_req)))
            groups = mb if draft_groups == "micro_batch" else [B]
            g_gpu = split_even(G_total, len(groups)) if len(groups) > 1 else [G_total]
            dg = np.zeros((len(groups), k)); dca = np.zeros((len(groups), k)); dcg = np.zeros((len(groups), k))
            dmemo: dict = {}
            for gi, (b, g) in enumerate(zip(groups, g_gpu)):
                c = b - g
                for t in range(k):
                    q = (acc + 1.0) if t == 0 else 1.0
                    key = (g, c, q)
                    if key not in dmemo:     # steps 1..k-1 are alike: one token per sequence
                        dmemo[key] = (self.draft_part(g, q, s, srcs, on_gpu=True),
                                      self.draft_part(c, q, s, srcs, on_gpu=False) if c > 0 else 0.0,
                                      self.draft_cpu_attn(c, q, s, srcs) if c > 0 else 0.0)
                    dg[gi, t], dcg[gi, t], dca[gi, t] = dmemo[key]
            dsz = np.asarray(groups)
        else:
            dg = dca = dcg = np.zeros((1, 0))
            dsz = np.asarray([B])

        return IterationCosts(
            batch=B, micro_batches=M, draft_len=k, context_len=s, mb_sizes=np.asarray(mb), tokens=N,
            tokens_per_iteration=B * (acc + 1.0), batched_moe=batched_moe, batched_layer=batched_layer,
            pre_s=pre, attn_cpu_s=attn_cpu, attn_gpu_s=attn_gpu, kv_h2d_s=kv_h2d, post_s=post,
            moe_gpu_s=moe_gpu, moe_cpu_s=moe_cpu, h2d_s=h2d, lm_head_s=lm_mb, verify_s=ver_mb,
            draft_group_sizes=dsz, draft_gpu_s=dg, draft_cpu_attn_s=dca, draft_cpu_gpu_s=dcg,
            touched=touched_experts(E, na, N), h2d_s_per_uncached_expert=h2d_unit,
            cpu_expert_s_per_uncached_expert=float(cpu_unit), moe_gpu_full_s=float(moe_full),
            cpu_attn_s_per_seq=cpu_per_seq, gpu_attn_s_per_seq=gpu_per_seq, moe_flops_gpu=moe_flops,
            gpu_peak_flops=self.gpu_peak, sources=frozenset(srcs), serial=self.hw.gpu.shares_host_cpu,
            other_s=(self.ov.get("iteration.other") + self.ov.get("iteration.other.sequence") * B) if self.has_ov else 0.0,
        )

    # ---- fixed per-invocation costs (module doc, planner/overhead.py) ----
    def _add_fixed(self, B: int, M: int, k1: int, mb: list[int], tg: list[int], attn_on_gpu: bool, batched_moe: bool,
                   pre, post, attn_cpu, attn_gpu, moe_gpu, lm_mb, ver_mb, cpu_per_seq, gpu_per_seq,
                   batched_layer: bool = False) -> float:
        """Add the fixed costs to the stage arrays in place (shapes as in IterationCosts); returns the
        fixed MoE seconds of one MoE layer (for moe_gpu_full_s)."""
        o = self.ov.get
        N = B * k1
        if batched_layer:                                                    # each layer, once over all micro-batches
            pre[:, 0] += o("target.pre_attn")
            post[:, 0] += o("target.post_attn") + o("target.post_attn.token") * k1 * B
        else:                                                                # [L, M] each layer x micro-batch
            pre += o("target.pre_attn")
            post += o("target.post_attn") + o("target.post_attn.token") * k1 * np.asarray(mb, dtype=float)[None, :]
        for j in range(M):
            pre[0, j] += o("target.pre_attn") / M + o("target.pre_attn.sequence") * mb[j]   # once per pass
            n_dev, n_host = tg[j], mb[j] - tg[j]
            if attn_on_gpu:
                n_dev, n_host = n_dev + n_host, 0
            if n_host > 0:
                attn_cpu[:, j] += o("target.attention")
                attn_cpu[0, j] += o("target.attention.sequence") * n_host
            if n_dev > 0:
                attn_gpu[:, j] += o("target.attention.gpu")
                attn_gpu[0, j] += o("target.attention.sequence") * n_dev
            lm_mb[j] += o("target.lm_head") / M + o("target.lm_head.token") * k1 * mb[j]
            ver_mb[j] += o("verify.accept") / M + (o("verify.accept.sequence") + o("verify.accept.token") * k1) * mb[j]
        cpu_per_seq[0] += o("target.attention.sequence")
        gpu_per_seq[0] += o("target.attention.sequence")
        per_moe_layer = (o("target.moe") + o("target.moe.expert") * touched_experts(self.E, self.na, N)
                         + o("target.moe.token") * N)
        fixed = np.where(self.is_moe, per_moe_layer, o("target.moe"))       # [L] dense layers: one invocation
        if batched_moe:
            moe_gpu[:, 0] += fixed
        else:
            moe_gpu += fixed[:, None] / M
        return float(per_moe_layer) if self.E else 0.0

    def prefill_fixed_s(self, batch: int, prompt_len: int, chunks: int) -> float:
        """Fixed seconds of the prefill: the same stage invocations as a decode pass with one
        micro-batch, once per chunk of prompt tokens, with per-token terms over all B*P tokens and
        per-sequence terms once per sequence; then the LM head and the draft's own prefill pass."""
        if not self.has_ov:
            return 0.0
        o = self.ov.get
        T = batch * prompt_len
        per_chunk = self.L * (o("target.pre_attn") + o("target.attention") + o("target.post_attn")) \
            + float(np.where(self.is_moe, o("target.moe") + o("target.moe.expert") * touched_experts(
                self.E, self.na, T / max(chunks, 1)), o("target.moe")).sum())
        t = chunks * per_chunk + o("target.pre_attn") + o("target.lm_head") + o("target.lm_head.token") * batch
        t += batch * (o("target.pre_attn.sequence") + o("target.attention.sequence"))
        t += T * self.L * o("target.post_attn.token") + T * float(self.is_moe.sum()) * o("target.moe.token")
        if self.draft is not None:
            t += o("draft.step") + self.draft.num_layers * o("draft.layer") + o("draft.sequence") * batch
        return t

    def _draft_fixed(self, seqs: int, q: float) -> float:
        """Fixed seconds of one draft step of one non-empty draft-KV part of `seqs` sequences, q tokens
        each; the first step (q = acc(k) + 1 > 1) also pays, with the probability that some sequence
        catches up two tokens, the attention group of its own those get."""
        if not self.has_ov or seqs <= 0:
            return 0.0
        o = self.ov.get
        t = o("draft.step") + self.draft.num_layers * o("draft.layer") + o("draft.sequence") * seqs
        if q > 1.0:
            t += self.draft.num_layers * o("draft.catchup") * (1.0 - (1.0 - self._full_accept_p(q)) ** seqs)
        return t

    def _full_accept_p(self, q: float) -> float:
        """P(A >= k) = acc(k) - acc(k-1) for the k whose first draft step reads q = acc(k) + 1 tokens (the
        smallest such k: a draft length inside a flat stretch of acc is never worth more than its first)."""
        memo = self.__dict__.setdefault("_full_accept", {})
        if q not in memo:
            acc = self.workload.acceptance.acc
            p = 0.0
            for k in range(1, 257):
                if acc(k) + 1.0 == q:
                    p = max(0.0, acc(k) - acc(k - 1))
                    break
            memo[q] = p
        return memo[q]

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
        return t + self._draft_fixed(seqs, q)

    def draft_cpu_attn(self, seqs: int, q: float, s: float, srcs: set) -> float:
        op = self.attn_op(seqs, q, s, False, spec=self.draft, e_h=self.d_e_h, kv_tok_bytes=self.d_kv_tok_bytes,
                           layers=self.draft.num_layers)
        return self._t("cpu", op, srcs, dtype=self.workload.kv_dtype, kind="attention", n_query=q, context=s)

    # ---- the optimizer's linear forms ----
    def h2d_s(self, costs: IterationCosts, slots) -> np.ndarray:
        """t_h2d per layer for cache slots `slots` ([L] or scalar): (E - c) p w_e / B_h2d on MoE layers."""
        c = np.broadcast_to(np.asarray(slots, dtype=float), (self.L,))
        return np.where(self.is_moe, (self.E - c) * costs.h2d_s_per_uncached_expert, 0.0)

    def cpu_attn_s(self, costs: IterationCosts, cpu_sequences) -> np.ndarray:
        """t_cpu_attn per layer for `cpu_sequences` CPU-KV sequences (linear)."""
        return costs.cpu_attn_s_per_seq * float(cpu_sequences)
