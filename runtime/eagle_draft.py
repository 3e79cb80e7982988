"""The EAGLE head's side of the speculative loop (runtime/speculative.py): the target features its
draft steps read.

Position i of the head's KV holds the pair (f_i, t_{i+1}): the target's hidden state at position i and
the token after it. The pairs a sequence has but the head has not read yet *pend*: their tokens are
Sequence.draft_pending, their features the first slots of the sequence's KV row in `feats` [R, P, H].
  prefill   the prompt's pairs (f_0, t_1) .. (f_{n-2}, t_{n-1}) fill the head's KV; (f_{n-1}, the first
            generated token) pends
  draft     step 1 reads the pending pairs (catch-up); steps 2..k read the head's own output as the
            feature beside its last proposal, as EAGLE does
  verify    the target's features g_0..g_k of [last, d1..dk] arrive: the a + 1 pairs (g_j, the j-th of
            the accepted drafts and the next token) pend, and every pair draft steps 2..k wrote is rolled
            back (their features were the head's guesses, not the target's)
  k = 0     one more pair pends: (g_0, the next token)
Each of these is one gather or scatter over the whole batch (index arithmetic in numpy on the host).

Dimensions: R KV rows, P pending slots per row, B sequences, T tokens, H hidden, k drafts.
"""
from __future__ import annotations

import numpy as np
import torch

from specmoe.runtime.model.eagle import EagleHead
from specmoe.runtime.model.kv_cache import PassLayout, SplitKVCache


def ragged_index(n: np.ndarray) -> np.ndarray:
    """[sum n] each element's index inside its own group: 0..n[0]-1, 0..n[1]-1, ..."""
    n = np.asarray(n, dtype=np.int64)
    return np.arange(int(n.sum()), dtype=np.int64) - np.repeat(np.cumsum(n) - n, n)


class EagleDrafter:
    def __init__(self, head: EagleHead, rows: int, device: torch.device, slots: int = 1):
        self.head, self.rows, self.device = head, int(rows), device
        self.feats = torch.zeros(self.rows, max(1, slots), head.config.hidden, dtype=head.dtype,
                                 device=device)                                      # [R, P, H]

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(self.device)

    def reserve(self, slots: int) -> None:
        """Room for `slots` pending pairs per row (the buffer at least doubles when it grows)."""
        P = self.feats.shape[1]
        if slots > P:
            grown = self.feats.new_zeros(self.rows, max(int(slots), 2 * P), self.feats.shape[2])   # [R, P', H]
            grown[:, :P] = self.feats
            self.feats = grown

    def prefill(self, rows: np.ndarray, n: np.ndarray, tokens: torch.Tensor, hidden: torch.Tensor,
                kv: SplitKVCache) -> None:
        """The pass's prompts (KV rows [B], n [B] tokens each, sequence-major tokens [T] and the target's
        features hidden [T, H]): their pairs into the head's KV from position 0 (lengths set to 0 before),
        each prompt's last feature pending in slot 0."""
        rows, n = np.asarray(rows, np.int64), np.asarray(n, np.int64)
        off = np.cumsum(n) - n                                                       # [B] first token
        self.feats[self._tensor(rows), 0] = hidden.index_select(0, self._tensor(off + n - 1)).to(self.feats.dtype)
        m = n - 1                                                                    # [B] pairs of each prompt
        sel = m > 0
        if not sel.any():
            return
        tok = np.repeat(off[sel] + 1, m[sel]) + ragged_index(m[sel])                 # [T'] t_1 .. t_{n-1}
        layout = PassLayout(rows[sel], np.zeros(int(sel.sum()), np.int64), m[sel])
        ti = self._tensor(tok)
        self.head.forward(tokens.index_select(0, ti), hidden.index_select(0, ti - 1), layout, kv, logits="none")
        kv.commit(layout)

    def pending(self, rows: np.ndarray, n: np.ndarray) -> torch.Tensor:
        """The pending features of sequences in KV rows [B], n [B] of them each -> [sum n, H], sequence-major."""
        R, P, H = self.feats.shape
        idx = np.repeat(np.asarray(rows, np.int64) * P, n) + ragged_index(n)
        return self.feats.view(R * P, H).index_select(0, self._tensor(idx))

    def keep(self, rows: np.ndarray, hidden: torch.Tensor) -> None:
        """After a drafting iteration: the target's features hidden [B, k+1, H] of [last, d1..dk] become the
        pending ones (the first a + 1 of them count: Sequence.draft_pending says how many)."""
        self.reserve(hidden.shape[1])
        self.feats[self._tensor(rows), :hidden.shape[1]] = hidden.to(self.feats.dtype)

    def append(self, rows: np.ndarray, n: np.ndarray, hidden0: torch.Tensor) -> None:
        """After an iteration without drafts: the feature hidden0 [B, H] of the verified token pends after the
        n [B] pending already."""
        n = np.asarray(n, np.int64)
        self.reserve(int(n.max()) + 1 if n.size else 1)
        self.feats[self._tensor(rows), self._tensor(n)] = hidden0.to(self.feats.dtype)
