"""Counting terms shared by the cost model and the planner's other estimates: byte widths of
activations and logits, the experts a batch of tokens touches, even splits of sequences over parts,
and the elements a token or a query head reads."""
from __future__ import annotations

from specmoe.planner.model_spec import ModelSpec

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
