"""The speculative loop: prefill, draft k tokens, verify all B*(k+1) in one target pass, accept, roll back.

State per sequence: the target KV holds every token but the last (`pending` for the target); the
draft KV holds every token but `draft_pending` (1 token normally, 2 when all k drafts were
accepted, more after iterations run with k = 0). One iteration:
  1. draft (per KV part, timed as draft.gpu / draft.cpu): the first step feeds draft_pending
     (catch-up), the next k-1 steps one token each; k proposals d1..dk (argmax, or sampled from the
     draft's tempered distribution q).
  2. verify: the target runs [last, d1..dk] of every sequence through one micro-batch pipelined
     pass -> logits [B, k+1, V].
  3. accept (verify.accept): greedy_accept (exact: the output equals plain greedy decoding of the
     target) or rejection_sample_accept (the output is distributed as the target's tempered
     distribution); lengths roll back: target to ctx + 1 + a, draft to its valid prefix.
A seeded Bernoulli oracle may replace real acceptance (benchmarks at a given acceptance rate).
An EAGLE head (runtime/model/eagle.py) drafts from the target's hidden states: the target keeps them
(TargetModel.forward(keep_hidden=True)) and runtime/eagle_draft.py holds each sequence's pending ones;
its draft_pending is the a + 1 tokens after every pair it has read (its drafts' KV is always rolled back).

Dimensions: B sequences, k draft tokens, V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from specmoe.planner.memory import PREFILL_CHUNK_TOKENS
from specmoe.planner.stages import Stage
from specmoe.planner.workload import MAX_DRAFT_LEN

from specmoe.runtime.eagle_draft import EagleDrafter
from specmoe.runtime.model.draft import DraftModel
from specmoe.runtime.model.eagle import EagleHead
from specmoe.runtime.model.kv_cache import PassLayout, SplitKVCache
from specmoe.runtime.run_record import StageTimer
from specmoe.runtime.model.target import TargetModel


@dataclass
class Sequence:
    index: int                     # position in the caller's prompt list
    prompt: list[int]
    max_new: int
    prompt_text: str | None = None
    row: int = -1                  # KV row (target and draft)
    generated: list[int] = field(default_factory=list)
    target_len: int = 0            # tokens in the target KV
    draft_pending: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    decode_iterations: int = 0     # decode iterations this sequence was live in
    accepted_drafts: int = 0       # drafts the target accepted over them (before length/EOS truncation)

    @property
    def last(self) -> int:
        return self.generated[-1]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class IterationStats:
    k: int
    accepted: list[int]            # accepted drafts per sequence (before EOS/length truncation)
    emitted: int                   # tokens appended over all sequences
    flips: int


def sample_from(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw (fp64) from probs [B, V] at uniforms u [B] -> [B] int64: the first token whose cdf
    exceeds u * total, which has positive probability; u = 1 (no such token) gives the last token with
    positive probability, not a zero-probability tail."""
    cdf = probs.double().cumsum(-1)  # [B, V]
    thr = u.double().to(probs.device).unsqueeze(1) * cdf[:, -1:]
    idx = torch.searchsorted(cdf, thr, right=True).squeeze(1)  # [B], V where thr reaches the total
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(-1)  # [B] last positive token
    return torch.minimum(idx, last)


class SpeculativeDecoder:
    def __init__(self, target: TargetModel, draft: DraftModel | EagleHead | None, target_kv: SplitKVCache,
                 draft_kv: SplitKVCache | None, timer: StageTimer, micro_batches: int, eos_ids: tuple[int, ...],
                 temperature: float = 0.0, seed: int = 0, flip_gap: float = 1e-4, oracle_alpha: float | None = None,
                 prefill_chunk_tokens: int = PREFILL_CHUNK_TOKENS, prefetch: bool | str = False):
        self.target, self.draft, self.tkv, self.dkv = target, draft, target_kv, draft_kv
        self.timer, self.m = timer, micro_batches
        self.eos = set(int(e) for e in eos_ids)
        self.temperature = float(temperature)
        self.device = target.device
        self.gen = torch.Generator().manual_seed(int(seed))          # every random draw comes from here (host)
        self.flip_gap = flip_gap
        self.prefill_chunk_tokens = max(1, int(prefill_chunk_tokens))
        self.prefetch = prefetch     # the expert-streaming schedule (TargetModel.forward's prefetch)
        self.oracle_alpha = oracle_alpha
        self.V = target.config.vocab_size
        self.flips = 0
        # an EAGLE head's pending target features, one slot per draft position and the next token
        self.eagle = EagleDrafter(draft, target_kv.rows, self.device, slots=MAX_DRAFT_LEN + 1) \
            if isinstance(draft, EagleHead) else None

    # ---- token choice ----
    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        """fp32 logits [..., V'] -> tempered probabilities over the target's V (draft vocab padded/truncated)."""
        if logits.shape[-1] != self.V:
            if logits.shape[-1] > self.V:
                logits = logits[..., :self.V]
            else:
                pad = logits.new_full((*logits.shape[:-1], self.V - logits.shape[-1]), float("-inf"))
                logits = torch.cat([logits, pad], -1)
        return torch.softmax(logits / self.temperature, dim=-1)

    def _choose(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[B, V'] -> (tokens [B], probs [B, V] when sampling)."""
        if self.temperature <= 0:
            return logits.argmax(-1), None
        p = self._probs(logits)
        u = torch.rand(logits.shape[0], generator=self.gen)
        return sample_from(p, u), p

    def _emit(self, s: Sequence, toks: list[int]) -> int:
        """Append tokens, stopping at EOS or max_new; returns how many were appended."""
        n = 0
        for t in toks:
            s.generated.append(int(t))
            n += 1
            if int(t) in self.eos:
                s.finish_reason = "eos"
                break
            if len(s.generated) >= s.max_new:
                s.finish_reason = "length"
                break
        return n

    # ---- prefill ----
    # no autograd bookkeeping (version counters, view tracking) on any op: 8-9% of a decode iteration on the
    # dev box (tests/test_engine_overhead.py checks both entry points run under it)
    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence]) -> None:
        """Run the prompts through target (and draft) in passes of at most prefill_chunk_tokens tokens
        (bounding activation memory; a longer prompt gets a pass of its own); choose each first token."""
        chunk_tokens, start, n = self.prefill_chunk_tokens, 0, 0
        for i, s in enumerate(seqs):
            if n and n + len(s.prompt) > chunk_tokens:
                self._prefill(seqs[start:i])
                start, n = i, 0
            n += len(s.prompt)
        self._prefill(seqs[start:])

    def _prefill(self, seqs: list[Sequence]) -> None:
        if not seqs:
            return
        layout = PassLayout([s.row for s in seqs], [0] * len(seqs), [len(s.prompt) for s in seqs])
        tokens = torch.tensor([t for s in seqs for t in s.prompt], dtype=torch.int64, device=self.device)
        for s in seqs:
            self.tkv.set_len(s.row, 0)
        with self.timer.in_phase("prefill"):
            logits = self.target.forward(tokens, layout, self.tkv, self.timer, self.m, logits="last", record_routing=True,
                                         prefetch=self.prefetch, keep_hidden=self.eagle is not None)
            self.tkv.commit(layout)
            first, _ = self._choose(logits)
            if self.temperature <= 0 and logits.shape[-1] > 1:   # the first token is a greedy step too
                top2 = logits.topk(2, dim=-1).values
                self.flips += int(((top2[:, 0] - top2[:, 1]) < self.flip_gap).sum())
            if self.draft is not None:
                for s in seqs:
                    self.dkv.set_len(s.row, 0)
                # the draft's own prefill (its KV filled, no logits), timed under draft.gpu: the stage the cost
                # model puts it in (planner/prefill.py), the report's "draft" row of the prefill
                with self.timer.stage(Stage.DRAFT_GPU):
                    if self.eagle is not None:
                        self.eagle.prefill(layout.rows, layout.n, tokens, self.target.last_hidden, self.dkv)
                    else:
                        self.draft.forward(tokens, layout, self.dkv, logits="none")
                        self.dkv.commit(layout)
        for s, t in zip(seqs, first.tolist()):
            s.target_len = len(s.prompt)
            s.draft_pending = []
            self._emit(s, [t])
            s.draft_pending = [s.last]

    # ---- one decode iteration ----
    def _draft_part(self, seqs: list[Sequence], rows: np.ndarray, k: int):
        """k proposals for sequences of one draft KV part (rows [b]) -> (tokens [b, k], probs [b, k, V] or None).
        Each draft step issues the same operations whatever b: the layout of step j+1 is step j's advanced
        by one position (whole-batch numpy), its tokens step j's proposals."""
        dkv, dev = self.dkv, self.device
        layout = PassLayout(rows, dkv.lens[rows], [len(s.draft_pending) for s in seqs])
        tokens = torch.tensor([t for s in seqs for t in s.draft_pending], dtype=torch.int64, device=dev)
        ones = np.ones(rows.size, dtype=np.int64)
        feats = self.eagle.pending(rows, layout.n) if self.eagle is not None else None    # [sum n, H]
        toks, probs = [], []
        for j in range(k):
            if feats is None:
                logits = self.draft.forward(tokens, layout, dkv, logits="last")  # [b, V']
            else:      # the next step reads the head's own output beside its proposal
                logits, feats = self.draft.forward(tokens, feats, layout, dkv)  # [b, V], [b, H]
            dkv.commit(layout)
            if logits.shape[-1] > self.V:   # a larger draft vocabulary: never propose a token the target lacks
                logits = logits[:, :self.V]
            tok, p = self._choose(logits)
            toks.append(tok)
            if p is not None:
                probs.append(p)
            if j + 1 < k:
                layout = PassLayout(rows, layout.ctx + layout.n, ones)
                tokens = tok
        return torch.stack(toks, 1), (torch.stack(probs, 1) if probs else None)

    def _draft(self, active: list[Sequence], rows: np.ndarray, k: int):
        """The draft phase: k proposals of every sequence, per draft KV part -> (drafts [B, k], qprobs or None)."""
        timer, dev, B = self.timer, self.device, len(active)
        on_dev = rows < self.dkv.device_rows
        parts = [(idx, st) for idx, st in ((np.flatnonzero(on_dev), Stage.DRAFT_GPU),
                                          (np.flatnonzero(~on_dev), Stage.DRAFT_CPU)) if idx.size]
        if len(parts) == 1:            # one KV part: its proposals are the batch's, in order
            with timer.stage(parts[0][1]):
                return self._draft_part(active, rows, k)
        drafts = torch.empty(B, k, dtype=torch.int64, device=dev)
        qprobs = torch.empty(B, k, self.V, dtype=torch.float32, device=dev) if self.temperature > 0 else None
        for idx, stage in parts:
            with timer.stage(stage):
                t, q = self._draft_part([active[i] for i in idx], rows[idx], k)
                sel = torch.from_numpy(idx).to(dev)
                drafts.index_copy_(0, sel, t)
                if q is not None:
                    qprobs.index_copy_(0, sel, q)
        return drafts, qprobs

    @torch.inference_mode()
    def step(self, active: list[Sequence], k: int) -> IterationStats:
        """One decode iteration over `active` with k drafts each (k = 0: plain decoding). Acceptance, emission
        and the KV lengths are whole-batch numpy over one transfer from the device; only _write_back visits
        each sequence, to store what the engine reads."""
        timer, dev, B = self.timer, self.device, len(active)
        use_draft = k > 0 and self.draft is not None
        k = k if use_draft else 0
        eagle = self.eagle
        rows = np.fromiter((s.row for s in active), np.int64, B)                    # [B]
        drafts, qprobs = torch.zeros(B, 0, dtype=torch.int64, device=dev), None     # [B, k]
        pend = np.fromiter((len(s.draft_pending) for s in active), np.int64, B)      # [B]
        if use_draft:
            old_draft_len = self.dkv.lens[rows].copy()                               # [B]
            drafts, qprobs = self._draft(active, rows, k)
        # verify: [last, d1..dk] per sequence in one pass
        target_len = np.fromiter((s.target_len for s in active), np.int64, B)       # [B]
        layout = PassLayout(rows, target_len, np.full(B, k + 1, dtype=np.int64))
        last = torch.tensor([s.last for s in active], dtype=torch.int64, device=dev)
        tokens = torch.cat([last[:, None], drafts], 1).reshape(-1)  # [B*(k+1)]
        logits = self.target.forward(tokens, layout, self.tkv, timer, self.m, logits="all",
                                     prefetch=self.prefetch, keep_hidden=eagle is not None).view(B, k + 1, -1)
        with timer.stage(Stage.VERIFY_ACCEPT):
            acc, nxt = self._accept(drafts, logits, qprobs)
            # one transfer: [acc, nxt, d1..dk, near-tie flags of the k+1 positions]  [B, 2k+3]
            if self.temperature <= 0 and logits.shape[-1] > 1:
                top2 = logits.topk(2, dim=-1).values                                 # [B, k+1, 2]
                small = (top2[..., 0] - top2[..., 1]) < self.flip_gap                # [B, k+1] near ties
            else:
                small = torch.zeros(B, k + 1, dtype=torch.bool, device=logits.device)
            host = torch.cat([acc[:, None], nxt[:, None], drafts, small.long()], 1).to("cpu").numpy()
            a, nx, dr, sm = host[:, 0], host[:, 1], host[:, 2:k + 2], host[:, k + 2:]
            cand = np.concatenate([dr, np.zeros((B, 1), np.int64)], 1)               # [B, k+1]: d1..da, next
            cand[np.arange(B), a] = nx
            n_emit, reason = self._emission(active, cand, a)
            flips = int(sm[np.arange(k + 1)[None, :] < n_emit[:, None]].sum())       # over the emitted tokens
            self.flips += flips
            self.tkv.set_lens(rows, target_len + 1 + a)
            if use_draft:        # an EAGLE head keeps only the pairs with the target's features
                self.dkv.set_lens(rows, old_draft_len + pend + (0 if eagle is not None else np.minimum(a, k - 1)))
            if eagle is not None:    # the target's features of [last, d1..dk] pend for the head's next steps
                hidden = self.target.last_hidden.view(B, k + 1, -1)                  # [B, k+1, H]
                if use_draft:
                    eagle.keep(rows, hidden)
                else:
                    eagle.append(rows, pend, hidden[:, 0])
            self._write_back(active, cand, a, n_emit, reason, use_draft, k)
        return IterationStats(k, a.tolist(), int(n_emit.sum()), flips)

    def _emission(self, active: list[Sequence], cand: np.ndarray, a: np.ndarray):
        """How many of cand [B, k+1] (the a accepted drafts and the next token) each sequence appends, stopping
        after EOS or at max_new (EOS first where both fall on one token) -> (n [B], reason [B]: 0 none, 1 eos,
        2 length)."""
        B, K1 = cand.shape
        room = np.fromiter((s.max_new - len(s.generated) for s in active), np.int64, B) - 1   # [B] last index
        eos = np.fromiter(self.eos, np.int64, len(self.eos))                                # [n_eos]
        is_eos = (cand[:, :, None] == eos).any(-1) & (np.arange(K1)[None, :] <= a[:, None])   # [B, k+1]
        first_eos = np.where(is_eos.any(1), is_eos.argmax(1), K1)                            # [B]
        stop = np.minimum(np.minimum(a, first_eos), np.maximum(room, 0))                     # [B] last index emitted
        reason = np.where(first_eos <= stop, 1, np.where(room <= a, 2, 0))
        return stop + 1, reason

    def _write_back(self, active, cand, a, n_emit, reason, use_draft: bool, k: int) -> None:
        """The per-sequence fields the engine reads (its interface): appended tokens, lengths, counters."""
        why = (None, "eos", "length")
        cand_l, a_l, n_l, r_l = cand.tolist(), a.tolist(), n_emit.tolist(), reason.tolist()
        for s, row, ai, n, r in zip(active, cand_l, a_l, n_l, r_l):
            s.decode_iterations += 1
            s.accepted_drafts += ai
            s.generated.extend(row[:n])
            if r:
                s.finish_reason = why[r]
            s.target_len += 1 + ai
            if use_draft and self.eagle is not None:
                s.draft_pending = row[:ai + 1]
            elif use_draft:
                s.draft_pending = row[k - 1:k + 1] if ai == k else [row[ai]]
            else:
                s.draft_pending.append(row[ai])

    def _accept(self, drafts: torch.Tensor, logits: torch.Tensor, qprobs: torch.Tensor | None):
        from specmoe.runtime.kernels.speculative_ops import greedy_accept, rejection_sample_accept

        B, k = drafts.shape
        if self.oracle_alpha is not None:   # seeded Bernoulli oracle in place of real acceptance
            ok = torch.rand(B, k, generator=self.gen) < self.oracle_alpha
            a = ok.long().cumprod(1).sum(1).to(logits.device) if k else torch.zeros(B, dtype=torch.int64,
                                                                                  device=logits.device)
            nxt = logits.argmax(-1).gather(1, a[:, None]).squeeze(1)
            return a, nxt
        if self.temperature <= 0:
            return greedy_accept(drafts, logits.argmax(-1))
        p = self._probs(logits)  # [B, k+1, V]
        if k == 0:
            u = torch.rand(B, generator=self.gen)
            return torch.zeros(B, dtype=torch.int64, device=logits.device), sample_from(p[:, 0], u)
        u = torch.rand(B, k + 1, generator=self.gen)
        u_acc, u_smp = u[:, :k].contiguous().to(logits.device), u[:, k].contiguous().to(logits.device)
        return rejection_sample_accept(drafts, qprobs, p, u_acc, u_smp)
