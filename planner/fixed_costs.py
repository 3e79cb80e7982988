"""The fixed per-invocation costs of one decode iteration, added on top of the cost model's roofline
(planner/overhead.py holds the terms, planner/cost_model.py the roofline).

Where the hardware spec has `measured.op_overhead_us` or `measured.stage_overhead_us`, every stage
costs fixed + roofline, the fixed part counted per invocation as the engine makes them
(runtime/speculative.py, runtime/model/target.py):
  target.pre_attn    one per layer and micro-batch (one per layer with batched_layer), plus one per pass
                     (embedding), + per sequence per pass
  target.attention   one per layer and micro-batch on each KV part it has (host / device), + per sequence
                     per pass, + per query token per layer. The GPU-KV sequences spread over the
                     micro-batches as everywhere in the cost model (split_even, which planner.milp models
                     too); the engine puts the first rows on the device, so with m > 1 and 0 < GPU-KV
                     sequences < B its part count can differ
  target.post_attn   one per layer and micro-batch (one per layer with batched_layer), + per token per layer
  target.moe         one per layer (all micro-batches together) + one per touched expert, E(1-(1-n_a/E)^N),
                     + per token per MoE layer; spread evenly over the micro-batch columns when batched_moe is off
  target.h2d         one per streamed expert (folded into the per-uncached-expert slope, so it stays linear)
  target.lm_head     one per iteration (spread over the micro-batch columns)
  prefill.*          per target layer per prefill pass and (.token) per prompt token per target layer, in each
                     layer's target stage; in the LM head per pass and per token; prefill and prefill.token
                     outside the stages (per pass, per token and layer);
                     prefill.draft(.eagle)(.token) in the draft's own prefill, per draft layer (with a draft
                     step's fixed costs per pass); FixedCosts.prefill_parts only
  iteration.other    one per iteration + per sequence: engine work outside every stage, added to the
                     iteration (IterationCosts.other_s), not to a stage
  verify.accept      one per iteration + per sequence + per verified token
  draft.gpu/.cpu     per draft step of each non-empty part: step + L_d x layer + sequences x per-sequence,
                     each part its own keys (draft.* the device part, draft.cpu.* the host part); an
                     EAGLE head its draft.eagle.* / draft.cpu.eagle.* keys where the spec has them (step
                     with its first layer, + (L_d - 1) x layer, per sequence, catchup);
                     its first step also L_d x catchup x P(some sequence accepted all k drafts),
                     1 - (1 - P(A >= k))^seqs with P(A >= k) = acc(k) - acc(k-1) (all inside
                     CostModel.draft_part, which planner.milp's draft time uses too)
Without either field (and with use_measured=False) the fixed parts are zero: the bare roofline.
"""
from __future__ import annotations

import numpy as np

from specmoe.planner.cost_terms import touched_experts
from specmoe.planner.iteration_costs import IterationCosts
from specmoe.planner.model_spec import ModelSpec
from specmoe.planner.overhead import (DRAFT_PART_KEYS, EAGLE_PART_KEYS, PREFILL_DRAFT_KEYS, PREFILL_PART_KEYS,
                                      PREFILL_PART_PER_LAYER, OverheadKey as K, Overheads)
from specmoe.planner.stages import Stage as S
from specmoe.planner.workload import AcceptanceProfile


class FixedCosts:
    """The fixed seconds of the engine's stage invocations for one model (and draft) on one machine."""

    def __init__(self, overheads: Overheads, is_moe: np.ndarray, num_experts: int, top_k: int,
                 draft: ModelSpec | None, acceptance: AcceptanceProfile):
        self.ov = overheads
        self.any = overheads.any
        self.is_moe = is_moe                  # [L]
        self.E, self.na = num_experts, top_k
        self.draft = draft
        self.acceptance = acceptance
        self._full_accept: dict[float, float] = {}

    # ---- decode iteration ----
    def add_to(self, costs: IterationCosts, gpu_kv_per_mb: list[int], attn_on_gpu: bool) -> None:
        """Add the fixed costs to the roofline stage arrays of `costs` in place: every layer's
        invocations, then each pass's, then the routed experts'; and the engine's time outside
        every stage to other_s. gpu_kv_per_mb: GPU-KV sequences per micro-batch."""
        mb = costs.mb_sizes.tolist()
        k1 = costs.draft_len + 1
        self._add_per_layer(costs, mb, k1)
        self._add_per_pass(costs, mb, gpu_kv_per_mb, attn_on_gpu, k1)
        costs.moe_gpu_full_s = float(costs.moe_gpu_full_s + self._add_moe(costs, costs.batch * k1))
        costs.sources = costs.sources | {"measured"}
        costs.other_s = self.iteration_other_s(costs.batch)

    def _add_per_layer(self, costs: IterationCosts, mb: list[int], k1: int) -> None:
        """pre_attn and post_attn: once per layer and micro-batch, or once per layer with batched_layer."""
        o = self.ov.get
        pre, post = costs.pre_s, costs.post_s
        if costs.batched_layer:                                              # each layer, once over all micro-batches
            pre[:, 0] += o(K.PRE_ATTN)
            post[:, 0] += o(K.POST_ATTN) + o(K.POST_ATTN_TOKEN) * k1 * costs.batch
        else:                                                                # [L, M] each layer x micro-batch
            pre += o(K.PRE_ATTN)
            post += o(K.POST_ATTN) + o(K.POST_ATTN_TOKEN) * k1 * np.asarray(mb, dtype=float)[None, :]

    def _add_per_pass(self, costs: IterationCosts, mb: list[int], tg: list[int], attn_on_gpu: bool,
                      k1: int) -> None:
        """The once-per-pass terms of each micro-batch (embedding, attention's index plan per KV part,
        LM head, acceptance), and the attention's per-sequence term on the optimizer's slopes."""
        o = self.ov.get
        M = costs.micro_batches
        pre, attn_cpu, attn_gpu = costs.pre_s, costs.attn_cpu_s, costs.attn_gpu_s
        for j in range(M):
            pre[0, j] += o(K.PRE_ATTN) / M + o(K.PRE_ATTN_SEQUENCE) * mb[j]   # once per pass
            n_dev, n_host = tg[j], mb[j] - tg[j]
            if attn_on_gpu:
                n_dev, n_host = n_dev + n_host, 0
            if n_host > 0:
                attn_cpu[:, j] += o(K.ATTENTION) + o(K.ATTENTION_TOKEN) * k1 * n_host
                attn_cpu[0, j] += o(K.ATTENTION_SEQUENCE) * n_host
            if n_dev > 0:
                attn_gpu[:, j] += o(K.ATTENTION_GPU) + o(K.ATTENTION_TOKEN) * k1 * n_dev
                attn_gpu[0, j] += o(K.ATTENTION_SEQUENCE) * n_dev
            costs.lm_head_s[j] += o(K.LM_HEAD) / M + o(K.LM_HEAD_TOKEN) * k1 * mb[j]
            costs.verify_s[j] += (o(K.ACCEPT) / M
                                  + (o(K.ACCEPT_SEQUENCE) + o(K.ACCEPT_TOKEN) * k1) * mb[j])
        for per_seq in (costs.cpu_attn_s_per_seq, costs.gpu_attn_s_per_seq):     # [L]
            per_seq[0] += o(K.ATTENTION_SEQUENCE)
            per_seq += o(K.ATTENTION_TOKEN) * k1

    def _add_moe(self, costs: IterationCosts, N: int) -> float:
        """target.moe on every layer (dense layers: one invocation); returns the fixed MoE seconds of
        one MoE layer (for moe_gpu_full_s)."""
        o = self.ov.get
        per_moe_layer = (o(K.MOE) + o(K.MOE_EXPERT) * touched_experts(self.E, self.na, N)
                         + o(K.MOE_TOKEN) * N)
        fixed = np.where(self.is_moe, per_moe_layer, o(K.MOE))       # [L] dense layers: one invocation
        if costs.batched_moe:
            costs.moe_gpu_s[:, 0] += fixed
        else:
            costs.moe_gpu_s += fixed[:, None] / costs.micro_batches
        return float(per_moe_layer) if self.E else 0.0

    def iteration_other_s(self, batch: int) -> float:
        """The engine's fixed time outside every stage in one iteration of `batch` sequences."""
        if not self.any:
            return 0.0
        return self.ov.get(K.OTHER) + self.ov.get(K.OTHER_SEQUENCE) * batch

    # ---- prefill ----
    def prefill_s(self, batch: int, prompt_len: int, chunks: int) -> float:
        """Fixed seconds of the prefill: the sum of prefill_parts."""
        return float(sum(self.prefill_parts(batch, prompt_len, chunks).values()))

    def prefill_parts(self, batch: int, prompt_len: int, chunks: int) -> dict[str, float]:
        """Fixed seconds of the prefill by where they are spent: each target stage (stage name), the draft's
        own prefill pass ("draft") and the rest ("other"). The stage invocations are a decode pass's with one
        micro-batch, once per chunk of prompt tokens, per-token terms over all B*P tokens, per-sequence terms
        once per sequence, plus each part's prefill terms (PREFILL_PART_KEYS, fitted to prefill passes: what the
        decode terms miss at thousands of tokens; a stage's prefill token term takes its decode token term's
        place). {} without fixed costs."""
        if not self.any:
            return {}
        o = self.ov.get
        L, n_moe = len(self.is_moe), float(self.is_moe.sum())
        T = batch * prompt_len
        moe = float(np.where(self.is_moe, o(K.MOE) + o(K.MOE_EXPERT) * touched_experts(
            self.E, self.na, T / max(chunks, 1)), o(K.MOE)).sum())
        parts = {
            S.TARGET_PRE_ATTN.value: (chunks * L + 1) * o(K.PRE_ATTN) + batch * o(K.PRE_ATTN_SEQUENCE),
            S.TARGET_ATTENTION.value: chunks * L * o(K.ATTENTION) + batch * o(K.ATTENTION_SEQUENCE)
            + T * L * self._decode_token(K.ATTENTION_TOKEN),
            S.TARGET_POST_ATTN.value: chunks * L * o(K.POST_ATTN) + T * L * self._decode_token(K.POST_ATTN_TOKEN),
            S.TARGET_MOE.value: chunks * moe + T * n_moe * self._decode_token(K.MOE_TOKEN),
            S.TARGET_LM_HEAD.value: chunks * o(K.LM_HEAD) + o(K.LM_HEAD_TOKEN) * batch,
        }
        parts["other"] = 0.0
        for part, (per_pass, per_token) in PREFILL_PART_KEYS.items():
            lp, lt = PREFILL_PART_PER_LAYER[part]
            parts[part] += chunks * (L if lp else 1) * o(per_pass) + T * (L if lt else 1) * o(per_token)
        parts["draft"] = self._draft_prefill_s(batch, T, chunks)
        return parts

    def _draft_prefill_s(self, batch: int, tokens: int, chunks: int) -> float:
        """The draft's own prefill, one pass per chunk (runtime/speculative.py): a draft step's fixed costs over
        the chunk's sequences (draft_step_s, the keys of its kind), plus its prefill keys per draft layer and pass
        and per prompt token and draft layer (PREFILL_DRAFT_KEYS; an EAGLE head takes a draft model's where the
        spec has none of its own)."""
        if self.draft is None:
            return 0.0
        o, Ld = self.ov.get, self.draft.num_layers
        eagle = bool(self.draft.eagle) and any(self.ov.has(k.value) for k in PREFILL_DRAFT_KEYS[True])
        per_pass, per_token = PREFILL_DRAFT_KEYS[eagle]
        return chunks * self.draft_step_s(batch / chunks, 1.0) + chunks * Ld * o(per_pass) + tokens * Ld * o(per_token)

    def _decode_token(self, key: K) -> float:
        """A decode-fitted per-token term in a prefill: none where the spec has its stage's prefill token key,
        which was fitted in its place (decode passes carry tens of tokens, a prefill pass thousands)."""
        prefill_key = {K.POST_ATTN_TOKEN: K.PREFILL_POST_ATTN_TOKEN, K.MOE_TOKEN: K.PREFILL_MOE_TOKEN,
                       K.ATTENTION_TOKEN: K.PREFILL_ATTENTION_TOKEN}[key]
        return 0.0 if self.ov.has(prefill_key) else self.ov.get(key)

    # ---- draft ----
    def draft_step_s(self, seqs: int, q: float, on_gpu: bool = True) -> float:
        """Fixed seconds of one draft step of one non-empty draft-KV part of `seqs` sequences, q tokens
        each (on_gpu: the device part, else the host part, each with its own keys); the first step
        (q = acc(k) + 1 > 1) also pays, with the probability that some sequence catches up two tokens,
        the attention group of its own those get."""
        if not self.any or seqs <= 0:
            return 0.0
        o, L = self.ov.get, self.draft.num_layers
        step, layer, seq, catchup = DRAFT_PART_KEYS[on_gpu]
        if self.draft.eagle and self.ov.has(EAGLE_PART_KEYS[on_gpu][0]):   # an EAGLE head, its own keys measured
            step, seq, catchup = EAGLE_PART_KEYS[on_gpu]
            t = o(step) + (L - 1) * o(layer) + o(seq) * seqs
        else:
            t = o(step) + L * o(layer) + o(seq) * seqs
        if q > 1.0:
            t += L * o(catchup) * (1.0 - (1.0 - self.full_accept_p(q)) ** seqs)
        return t

    def full_accept_p(self, q: float) -> float:
        """P(A >= k) = acc(k) - acc(k-1) for the k whose first draft step reads q = acc(k) + 1 tokens (the
        smallest such k: a draft length inside a flat stretch of acc is never worth more than its first)."""
        if q not in self._full_accept:
            acc = self.acceptance.acc
            p = 0.0
            for k in range(1, 257):
                if acc(k) + 1.0 == q:
                    p = max(0.0, acc(k) - acc(k - 1))
                    break
            self._full_accept[q] = p
        return self._full_accept[q]
