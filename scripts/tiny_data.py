"""train_tiny.py's data: the settings, the stdlib corpus and the shared byte-level BPE tokenizer.

Imported by scripts/train_tiny.py (which sets the thread environment before torch is imported) and,
through it, by scripts/train_eagle.py.
"""
from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

NUM_THREADS = 2
PAD, BOS, EOS = "<pad>", "<s>", "</s>"
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
MAX_POSITIONS = 512
# tests, installed packages and the codec tables of encodings/ (generated, repetitive data)
EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                 "encodings"}
MAX_FILE_CHARS = 200_000  # skips generated data files such as pydoc_data/topics.py


class TrainTinyError(ValueError):
    """A bad argument or environment; the message names the field and the fix."""


@dataclass(frozen=True)
class Settings:
    vocab_size: int = 2048
    train_chars: int = 4_000_000
    val_chars: int = 300_000
    seq_len: int = 256
    # target: batch 8 x 256 with twice the steps beat batch 16 at equal compute (held-out loss
    # 4.64 vs 4.95 after 1.2 M tokens) and peak lr 6e-3 beat 3e-3 slightly. The draft
    # (soft distillation targets) did worse with batch 8 and lr 5e-3 than with batch 16 and
    # lr 3e-3 at the same compute (held-out loss 4.39 against 4.31 in two full runs).
    batch_size: int = 8
    target_steps: int = 600
    target_lr: float = 5e-3
    draft_batch_size: int = 16
    draft_steps: int = 240
    draft_lr: float = 3e-3
    distill_weight: float = 0.7  # draft loss = w * KL(target || draft) + (1 - w) * CE(data)
    router_aux_loss_coef: float = 0.05  # times balance_loss (per layer, 1.0 when balanced)
    n_prompts: int = 64
    accept_new_tokens: int = 24
    max_k: int = 8


# ----------------------------------------------------------------------------- corpus


def stdlib_files() -> list[tuple[str, str]]:
    """(relative path, text) of the stdlib's *.py files, ordered by sha256 of the path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        parts = rel.split("/")
        if any(p in EXCLUDED_DIRS or p.startswith("config-") for p in parts[:-1]):
            continue
        if parts[-1].startswith("test_"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if 200 <= len(text) <= MAX_FILE_CHARS:
            out.append((rel, text))
    out.sort(key=lambda rt: hashlib.sha256(rt[0].encode()).hexdigest())
    if len(out) < 50:
        raise TrainTinyError(f"stdlib at {root} has only {len(out)} usable *.py files; "
                             "run with a full CPython installation")
    return out


def split_corpus(files, s: Settings):
    """Held-out: files whose path hash is 0 mod 8. Training: the others, up to train_chars."""
    train, held = [], []
    n_train = 0
    for rel, text in files:
        if int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16) % 8 == 0:
            held.append((rel, text))
        elif n_train < s.train_chars:
            train.append((rel, text))
            n_train += len(text)
    return train, held


# ----------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    assert tok.token_to_id(PAD) == PAD_ID and tok.token_to_id(BOS) == BOS_ID
    assert tok.token_to_id(EOS) == EOS_ID
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)])
    return tok


def hf_tokenizer(tok):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        model_max_length=MAX_POSITIONS, clean_up_tokenization_spaces=False)


def token_stream(tok, texts: list[str]) -> np.ndarray:
    """<s> file </s> <s> file </s> ... as one int64 array."""
    parts = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        parts.append(np.asarray([BOS_ID] + enc.ids + [EOS_ID], dtype=np.int64))
    return np.concatenate(parts)


def sample_batch(stream: np.ndarray, s: Settings, batch: int, gen: torch.Generator) -> torch.Tensor:
    """Random windows, each starting with <s> (as prompts do). Returns [B, T]."""
    starts = torch.randint(0, len(stream) - s.seq_len, (batch,), generator=gen).tolist()
    rows = [np.concatenate([[BOS_ID], stream[a:a + s.seq_len - 1]]) for a in starts]
    return torch.from_numpy(np.stack(rows))  # [B, T]


def val_batches(stream: np.ndarray, s: Settings, windows: int = 128) -> list[torch.Tensor]:
    """`windows` evenly spaced held-out windows of seq_len tokens, in batches."""
    step = max(1, (len(stream) - s.seq_len) // windows)
    starts = [i * step for i in range(windows)]
    rows = [np.concatenate([[BOS_ID], stream[a:a + s.seq_len - 1]]) for a in starts]
    x = torch.from_numpy(np.stack(rows))
    return list(x.split(s.batch_size))
