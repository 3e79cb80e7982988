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

Dimensions: B sequences, k draft tokens, V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from specmoe.planner.memory import PREFILL_CHUNK_TOKENS
from specmoe.planner.stages import Stage

from specmoe.runtime.model.draft import DraftModel
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
    """Inverse-CDF draw (fp64) from probs [B, V] at uniforms u [B] -> [B] int64."""
    cdf = probs.double().cumsum(-1)  # [B, V]
    thr = u.double().to(probs.device).unsqueeze(1) * cdf[:, -1:]
    return torch.searchsorted(cdf, thr, right=True).squeeze(1).clamp(max=probs.shape[-1] - 1)


class SpeculativeDecoder:
    def __init__(self, target: TargetModel, draft: DraftModel | None, target_kv: SplitKVCache,
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
                                         prefetch=self.prefetch)
            self.tkv.commit(layout)
            first, _ = self._choose(logits)
            if self.temperature <= 0 and logits.shape[-1] > 1:   # the first token is a greedy step too
                top2 = logits.topk(2, dim=-1).values
                self.flips += int(((top2[:, 0] - top2[:, 1]) < self.flip_gap).sum())
            if self.draft is not None:
                for s in seqs:
                    self.dkv.set_len(s.row, 0)
                self.draft.forward(tokens, layout, self.dkv, logits="none")
                self.dkv.commit(layout)
        for s, t in zip(seqs, first.tolist()):
            s.target_len = len(s.prompt)
            s.draft_pending = []
            self._emit(s, [t])
            s.draft_pending = [s.last]

    # ---- one decode iteration ----
    def _draft_part(self, seqs: list[Sequence], k: int):
        """k proposals for sequences of one draft KV part -> (tokens [b, k], probs [b, k, V] or None)."""
        dkv, dev = self.dkv, self.device
        layout = PassLayout([s.row for s in seqs], [dkv.lens[s.row] for s in seqs], [len(s.draft_pending) for s in seqs])
        tokens = torch.tensor([t for s in seqs for t in s.draft_pending], dtype=torch.int64, device=dev)
        toks, probs = [], []
        for j in range(k):
            logits = self.draft.forward(tokens, layout, dkv, logits="last")  # [b, V']
            dkv.commit(layout)
            if logits.shape[-1] > self.V:   # a larger draft vocabulary: never propose a token the target lacks
                logits = logits[:, :self.V]
            tok, p = self._choose(logits)
            toks.append(tok)
            if p is not None:
                probs.append(p)
            if j + 1 < k:
                layout = PassLayout(layout.rows, [dkv.lens[r] for r in layout.rows], [1] * len(seqs))
                tokens = tok
        return torch.stack(toks, 1), (torch.stack(probs, 1) if probs else None)

    def step(self, active: list[Sequence], k: int) -> IterationStats:
        """One decode iteration over `active` with k drafts each (k = 0: plain decoding)."""
        timer, dev, B = self.timer, self.device, len(active)
        use_draft = k > 0 and self.draft is not None
        k = k if use_draft else 0
        drafts = torch.zeros(B, 0, dtype=torch.int64, device=dev)  # [B, k]
        qprobs = None
        if use_draft:
            dpart = [i for i, s in enumerate(active) if s.row < self.dkv.device_rows]
            hpart = [i for i, s in enumerate(active) if s.row >= self.dkv.device_rows]
            drafts = torch.empty(B, k, dtype=torch.int64, device=dev)
            if self.temperature > 0:
                qprobs = torch.empty(B, k, self.V, dtype=torch.float32, device=dev)
            old_draft_len = {s.row: self.dkv.lens[s.row] for s in active}
            for idx, stage in ((dpart, Stage.DRAFT_GPU), (hpart, Stage.DRAFT_CPU)):
                if not idx:
                    continue
                with timer.stage(stage):
                    t, q = self._draft_part([active[i] for i in idx], k)
                    sel = torch.tensor(idx, dtype=torch.int64, device=dev)
                    drafts.index_copy_(0, sel, t)
                    if q is not None:
                        qprobs.index_copy_(0, sel, q)
        # verify: [last, d1..dk] per sequence in one pass
        layout = PassLayout([s.row for s in active], [s.target_len for s in active], [k + 1] * B)
        last = torch.tensor([s.last for s in active], dtype=torch.int64, device=dev)
        tokens = torch.cat([last[:, None], drafts], 1).reshape(-1)  # [B*(k+1)]
        logits = self.target.forward(tokens, layout, self.tkv, timer, self.m, logits="all",
                                     prefetch=self.prefetch).view(B, k + 1, -1)
        with timer.stage(Stage.VERIFY_ACCEPT):
            acc, nxt = self._accept(drafts, logits, qprobs)
            acc_l, nxt_l, drafts_l = acc.tolist(), nxt.tolist(), drafts.tolist()
            flips = 0
            if self.temperature <= 0:
                top2 = logits.topk(2, dim=-1).values if logits.shape[-1] > 1 else None  # [B, k+1, 2]
                if top2 is not None:
                    small = ((top2[..., 0] - top2[..., 1]) < self.flip_gap).tolist()
                    flips = sum(sum(row[:a + 1]) for row, a in zip(small, acc_l))
            self.flips += flips
            emitted = 0
            for i, s in enumerate(active):
                a = acc_l[i]
                s.decode_iterations += 1
                s.accepted_drafts += a
                new = drafts_l[i][:a] + [nxt_l[i]]
                emitted += self._emit(s, new)
                s.target_len += 1 + a
                self.tkv.set_len(s.row, s.target_len)
                if use_draft:
                    valid = old_draft_len[s.row] + len(s.draft_pending) + min(a, k - 1)
                    self.dkv.set_len(s.row, valid)
                    s.draft_pending = ([drafts_l[i][k - 1]] if a == k else []) + [nxt_l[i]]
                else:
                    s.draft_pending.append(nxt_l[i])
        return IterationStats(k, acc_l, emitted, flips)

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
