"""Helpers for the engine tests: tiny random checkpoints of every family, built with transformers'
own config classes and saved with save_pretrained (so they are real HF directories), plus the
trained tiny pair when it exists.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
TINY_MOE = REPO / "models" / "tiny-moe"
TINY_DRAFT = REPO / "models" / "tiny-draft"
TINY_PROMPTS = REPO / "models" / "prompts.jsonl"

COMMON = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)

TARGET_KINDS = ("mixtral", "qwen2_moe", "qwen3_moe", "qwen3_moe_nonorm", "olmoe")
DRAFT_KINDS = ("llama", "mistral", "qwen2", "qwen3")


def hf_config(kind: str, **over):
    import transformers as tf

    c = dict(COMMON)
    c.update(over)
    if kind == "mixtral":
        return tf.MixtralConfig(intermediate_size=48, num_local_experts=6, num_experts_per_tok=2, **c)
    if kind == "qwen2_moe":  # shared expert with its sigmoid gate, and one dense (mlp_only) layer
        if "num_hidden_layers" not in over:
            c["num_hidden_layers"] = 3
        return tf.Qwen2MoeConfig(intermediate_size=40, moe_intermediate_size=24, shared_expert_intermediate_size=36,
                                 num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
                                 mlp_only_layers=[1], **c)
    if kind in ("qwen3_moe", "qwen3_moe_nonorm"):
        return tf.Qwen3MoeConfig(intermediate_size=40, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=3,
                                 head_dim=8, norm_topk_prob=(kind == "qwen3_moe"), **c)
    if kind == "olmoe":
        return tf.OlmoeConfig(intermediate_size=24, num_experts=8, num_experts_per_tok=2, clip_qkv=None, **c)
    if kind == "llama":
        return tf.LlamaConfig(intermediate_size=48, **c)
    if kind == "mistral":
        return tf.MistralConfig(intermediate_size=48, sliding_window=None, **c)
    if kind == "qwen2":
        return tf.Qwen2Config(intermediate_size=48, **c)
    if kind == "qwen3":
        return tf.Qwen3Config(intermediate_size=48, head_dim=8, **c)
    raise ValueError(kind)


def make_checkpoint(kind: str, path: Path, seed: int = 0, fused: bool = False, scale: float = 1.0,
                    dtype: torch.dtype = torch.float32, **over) -> Path:
    """Save a random tiny model of `kind` to `path`; `scale` multiplies the init std (larger gives
    clearer logit margins)."""
    from transformers import AutoModelForCausalLM

    cfg = hf_config(kind, **over)
    cfg.initializer_range = 0.2 * scale
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    model.eval()
    path = Path(path)
    try:
        model.save_pretrained(path, save_original_format=not fused)
    except TypeError:  # an older transformers 5.x without the option saves the original layout
        if fused:
            raise
        model.save_pretrained(path)
    return path


def load_hf(path: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    m.eval()
    return m


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    """[L, V] fp32 logits of one sequence, no cache."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def have_tiny_pair() -> bool:
    return (TINY_MOE / "config.json").is_file() and (TINY_DRAFT / "config.json").is_file() and any(
        TINY_MOE.glob("*.safetensors")) and any(TINY_DRAFT.glob("*.safetensors"))


def tiny_prompts(n: int | None = None) -> list[str]:
    rows = [json.loads(line)["prompt"] for line in TINY_PROMPTS.read_text().splitlines() if line.strip()]
    return rows if n is None else rows[:n]


def make_pair(root: Path, kind: str = "mixtral", draft_kind: str = "llama", seed: int = 0, scale: float = 1.0,
              margin: float = 4.0, **over) -> tuple[Path, Path]:
    """A target/draft pair that agree often: both share an embedding E and an lm_head that predicts
    "the next token id" (row j = margin * E[j-1]), with independent random layers on top, so the
    draft's guesses are often but not always the target's (acceptance well inside (0, 1)) and the
    target's logits have clear top-2 margins."""
    from safetensors.torch import load_file, save_file

    root = Path(root)
    t = make_checkpoint(kind, root / f"target-{kind}", seed=seed, scale=scale, **over)
    d = make_checkpoint(draft_kind, root / f"draft-{draft_kind}", seed=seed + 1000, scale=scale, **over)
    g = torch.Generator().manual_seed(seed + 7)
    V, H = over.get("vocab_size", COMMON["vocab_size"]), COMMON["hidden_size"]
    E = torch.randn(V, H, generator=g)
    head = margin * torch.roll(E, shifts=1, dims=0) / H ** 0.5
    for p in (t, d):
        f = p / "model.safetensors"
        sd = load_file(str(f))
        sd["model.embed_tokens.weight"] = E.to(sd["model.embed_tokens.weight"].dtype).clone()
        sd["lm_head.weight"] = head.to(sd["lm_head.weight"].dtype).clone()
        save_file(sd, str(f), metadata={"format": "pt"})
    return t, d


def add_tokenizer(path: Path, vocab_size: int = 96) -> Path:
    """A word-level tokenizer.json: "w3 w17" <-> [3, 17] (ids 0-2 are <pad>, <s>, </s>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<pad>", "<s>", "</s>"])
    tok.save(str(Path(path) / "tokenizer.json"))
    return Path(path)


@pytest.fixture(autouse=True, scope="module")
def one_thread_per_module():
    """Engine tests run with one torch thread (faster and less noisy on 2 shared cores);
    a test module opts in by importing it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
