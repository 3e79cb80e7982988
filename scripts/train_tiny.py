#!/usr/bin/env python
"""Train the small target/draft pair that the demo and the tests run on.

    python scripts/train_tiny.py --out models [--minutes-budget 20] [--seed 0]

What it does, all offline and reproducibly on a CPU (fixed seeds, deterministic torch ops,
torch.set_num_threads(2)):

1. corpus: the *.py files of this Python's standard library (tests, site-packages and huge
   generated files excluded), ordered by sha256 of their relative path; 1 in 8 files is held
   out (validation loss, prompts), the rest fill a training corpus of about 4 MB.
2. one byte-level BPE tokenizer (`tokenizers`, ByteLevel pre-tokenizer and decoder, specials
   <pad>=0, <s>=1, </s>=2; the post-processor prepends <s>), shared by both models.
3. target: MixtralForCausalLM (8 experts, top-2, GQA), next-token LM with the router
   load-balancing loss on (output_router_logits, router_aux_loss_coef; applied per layer).
4. draft: LlamaForCausalLM (dense, 2 layers), trained on a mix of the data loss and a
   distillation loss (KL from the target's next-token distribution to the draft's).
5. saves both as Hugging Face directories (bfloat16 safetensors), reloads them in fp32 with
   AutoModelForCausalLM / AutoTokenizer, measures greedy acceptance per draft length k by
   running the speculative loop (draft proposes k tokens, the target verifies them in one
   pass with its KV cache) on held-out prompts, and writes models/tiny_pair.json,
   models/prompts.jsonl and models/README.md.

Dimension letters used in shape comments: B batch, T tokens in a sequence, V vocabulary,
K draft length.
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import os
import platform
import random
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "2")  # tokenizers' thread pool: stay on the 2 cores
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
# OpenMP threads that sleep instead of spinning: with the 2 cores shared by other processes,
# spinning workers made small ops 10-40x slower. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

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


# ----------------------------------------------------------------------------- models


def target_config(vocab_size: int, s: Settings):
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_local_experts=8,
        num_experts_per_tok=2, max_position_embeddings=MAX_POSITIONS, rms_norm_eps=1e-5,
        rope_theta=10000.0, sliding_window=None, router_aux_loss_coef=s.router_aux_loss_coef,
        output_router_logits=False, router_jitter_noise=0.0, tie_word_embeddings=False,
        use_cache=True, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)


def draft_config(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        max_position_embeddings=MAX_POSITIONS, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=True, use_cache=True, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
        pad_token_id=PAD_ID)


def lr_at(step: int, total: int, peak: float, warmup: int = 30) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac))))


def make_optimizer(model, lr: float):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95), eps=1e-8)


class Deadline:
    """Stops a training loop early (flagged in the results) if it would overrun its share."""

    def __init__(self, t0: float, budget_s: float):
        self.t0, self.budget_s = t0, budget_s

    def hit(self, done: int, total: int, loop_t0: float) -> bool:
        now = time.perf_counter()
        per_step = (now - loop_t0) / max(1, done)
        return now + per_step - self.t0 > self.budget_s


def balance_loss(router_logits, top_k: int):
    """Switch-style load-balancing loss applied to each layer separately and averaged
    (transformers' aux_loss pools the layers, which lets one layer's imbalance hide behind
    another's). E * sum_e f_e * P_e, where f_e is the share of top-k assignments and P_e the
    mean router probability of expert e; 1.0 when balanced."""
    losses = []
    for logits in router_logits:  # [B*T, E]
        n_exp = logits.shape[-1]
        probs = logits.float().softmax(-1)
        top = probs.topk(top_k, -1).indices  # [B*T, top_k]
        f = F.one_hot(top, n_exp).float().sum(1).mean(0) / top_k  # [E]
        losses.append(n_exp * (f * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def train_target(model, stream, s: Settings, seed: int, deadline: Deadline):
    gen = torch.Generator().manual_seed(seed + 1)
    opt = make_optimizer(model, s.target_lr)
    model.train()
    hist, t0, steps_done = [], time.perf_counter(), 0
    bar = tqdm(range(s.target_steps), desc="target", dynamic_ncols=True)
    for step in bar:
        if step > 0 and deadline.hit(step, s.target_steps, t0):
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, s.target_steps, s.target_lr)
        x = sample_batch(stream, s, s.batch_size, gen)  # [B, T]
        out = model(input_ids=x, output_router_logits=True)
        logits = out.logits[:, :-1].float()  # [B, T-1, V]
        lm = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        aux = balance_loss(out.router_logits, model.config.num_experts_per_tok)
        (lm + model.config.router_aux_loss_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        hist.append((lm.item(), aux.item()))
        steps_done = step + 1
        bar.set_postfix(lm=f"{lm.item():.3f}", aux=f"{aux.item():.3f}")
    bar.close()
    model.eval()
    return hist, steps_done, time.perf_counter() - t0


def train_draft(draft, target, stream, s: Settings, seed: int, deadline: Deadline):
    gen = torch.Generator().manual_seed(seed + 2)
    opt = make_optimizer(draft, s.draft_lr)
    draft.train()
    target.eval()
    w = s.distill_weight
    hist, t0, steps_done = [], time.perf_counter(), 0
    bar = tqdm(range(s.draft_steps), desc="draft", dynamic_ncols=True)
    for step in bar:
        if step > 0 and deadline.hit(step, s.draft_steps, t0):
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, s.draft_steps, s.draft_lr)
        x = sample_batch(stream, s, s.draft_batch_size, gen)  # [B, T]
        with torch.no_grad():
            t_logp = F.log_softmax(target(input_ids=x).logits[:, :-1].float(), -1)  # [B, T-1, V]
        d_logits = draft(input_ids=x).logits[:, :-1].float()  # [B, T-1, V]
        d_logp = F.log_softmax(d_logits, -1)
        kl = F.kl_div(d_logp.flatten(0, 1), t_logp.flatten(0, 1), log_target=True,
                      reduction="batchmean")
        ce = F.nll_loss(d_logp.flatten(0, 1), x[:, 1:].flatten())
        loss = w * kl + (1.0 - w) * ce
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        hist.append((ce.item(), kl.item()))
        steps_done = step + 1
        bar.set_postfix(ce=f"{ce.item():.3f}", kl=f"{kl.item():.3f}")
    bar.close()
    draft.eval()
    return hist, steps_done, time.perf_counter() - t0


@torch.no_grad()
def val_loss(model, batches) -> float:
    tot = 0.0
    for x in batches:
        logits = model(input_ids=x).logits[:, :-1].float()  # [B, T-1, V]
        tot += F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).item()
    return tot / len(batches)


@torch.no_grad()
def expert_usage(model, batches) -> list[list[float]]:
    """Share of top-k assignments each expert receives, per layer, on held-out text."""
    cfg = model.config
    counts = torch.zeros(cfg.num_hidden_layers, cfg.num_local_experts)
    for x in batches[:2]:
        out = model(input_ids=x, output_router_logits=True)
        for layer, logits in enumerate(out.router_logits):  # [B*T, E]
            top = logits.topk(cfg.num_experts_per_tok, -1).indices.flatten()
            counts[layer] += torch.bincount(top, minlength=cfg.num_local_experts).float()
    return (counts / counts.sum(-1, keepdim=True)).tolist()


# ----------------------------------------------------------------------------- acceptance


def _forward(model, ids: list[int], cache):
    """Logits [T, V] of `ids` appended to what `cache` holds; the cache grows by len(ids)."""
    # transformers >= 5.24 names the argument `cache` (`past_key_values` is deprecated)
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=torch.tensor([ids]), use_cache=True, **{key: cache})
    return out.logits[0].float()


def _truncate(cache, length: int) -> None:
    """Keep the first `length` positions (crop(-n) removes n in transformers 4.x and 5.x)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def _new_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # transformers 4.x
        return DynamicCache()


@torch.inference_mode()
def greedy_reference(target, prompt_ids: list[int], n: int):
    """Plain greedy decoding, one token per target pass. Returns (tokens, top1-top2 gaps)."""
    cache = _new_cache(target)
    logits = _forward(target, prompt_ids, cache)[-1]
    toks, gaps = [], []
    for _ in range(n):
        top2 = logits.topk(2).values
        gaps.append(float(top2[0] - top2[1]))
        t = int(logits.argmax())
        toks.append(t)
        logits = _forward(target, [t], cache)[-1]
    return toks, gaps


@torch.inference_mode()
def speculative_greedy(target, draft, prompt_ids: list[int], k: int, n: int):
    """Greedy speculative decoding: the draft proposes k tokens, the target checks all k+1
    positions in one pass with its KV cache, the longest agreeing prefix plus the target's
    own next token is kept and both caches roll back the rest. Returns (tokens, accepted,
    proposed, iterations)."""
    if len(prompt_ids) < 2:
        raise TrainTinyError("prompt_ids: need at least 2 tokens (<s> and one more)")
    tc, dc = _new_cache(target), _new_cache(draft)
    _forward(target, prompt_ids[:-1], tc)
    _forward(draft, prompt_ids[:-1], dc)
    last = prompt_ids[-1]
    pending = [last]  # committed tokens the draft cache has not seen yet
    out: list[int] = []
    accepted = proposed = iters = 0
    while len(out) < n:
        d_len = dc.get_seq_length()
        props, feed = [], pending
        for _ in range(k):
            t = int(_forward(draft, feed, dc)[-1].argmax())
            props.append(t)
            feed = [t]
        t_len = tc.get_seq_length()
        g = _forward(target, [last] + props, tc).argmax(-1).tolist()  # [K+1]
        a = 0
        while a < k and props[a] == g[a]:
            a += 1
        out.extend(props[:a] + [g[a]])
        accepted, proposed, iters = accepted + a, proposed + k, iters + 1
        _truncate(tc, t_len + 1 + a)
        _truncate(dc, d_len + len(pending) + a)
        pending = ([props[-1]] if a == k else []) + [g[a]]
        last = g[a]
    return out[:n], accepted, proposed, iters


@torch.inference_mode()
def teacher_forced_matches(draft, prompt_ids: list[int], ref: list[int]) -> list[bool]:
    """matches[i]: the draft's greedy token after prompt + ref[:i] equals ref[i]. When the
    draft's proposals so far all matched, its context equals the target's, so the run
    lengths of `matches` give the greedy acceptance for any k (a cross-check)."""
    ids = torch.tensor([prompt_ids + ref])
    pred = draft(input_ids=ids).logits[0].argmax(-1).tolist()  # [T]
    p = len(prompt_ids)
    return [pred[p - 1 + i] == ref[i] for i in range(len(ref))]


def simulate_acceptance(matches: list[bool], k: int, n: int):
    p = accepted = proposed = iters = 0
    while p < n:
        a = 0
        while a < k and matches[p + a]:
            a += 1
        accepted, proposed, iters = accepted + a, proposed + k, iters + 1
        p += a + 1
    return accepted, proposed, iters


def measure_greedy_acceptance(target, draft, prompts_ids: list[list[int]], ks=range(1, 9),
                              new_tokens: int = 32, progress: bool = True) -> dict:
    """Greedy acceptance per draft length k, measured by running the speculative loop.

    For every prompt: plain greedy decoding of the target (reference, also giving the top-1 vs
    top-2 logit gaps), then for each k the speculative loop; per k it reports
    alpha = accepted / proposed, acc = mean accepted drafts per iteration (the a(k) of the cost
    model), tokens per target pass, mismatches of the speculative output against the plain
    greedy output (float-noise flips), and the teacher-forced cross-check of alpha."""
    ks = list(ks)
    tot = {k: [0, 0, 0] for k in ks}
    sim = {k: [0, 0, 0] for k in ks}
    flips = {k: 0 for k in ks}
    gaps: list[float] = []
    near_ties = []  # (prompt index, step, gap) of greedy steps with a top-2 gap under 1e-3
    extra = max(ks) + 1
    for i, ids in enumerate(tqdm(prompts_ids, desc="acceptance", disable=not progress,
                                 dynamic_ncols=True)):
        ref, g = greedy_reference(target, ids, new_tokens + extra)
        gaps.extend(g[:new_tokens])
        near_ties += [[i, step, gap] for step, gap in enumerate(g[:new_tokens]) if gap < 1e-3]
        matches = teacher_forced_matches(draft, ids, ref)
        for k in ks:
            out, a, p, it = speculative_greedy(target, draft, ids, k, new_tokens)
            flips[k] += int(out != ref[:new_tokens])
            tot[k] = [tot[k][0] + a, tot[k][1] + p, tot[k][2] + it]
            a2, p2, it2 = simulate_acceptance(matches, k, new_tokens)
            sim[k] = [sim[k][0] + a2, sim[k][1] + p2, sim[k][2] + it2]
    gaps_a = np.asarray(gaps)
    per_k = {}
    for k in ks:
        a, p, it = tot[k]
        per_k[str(k)] = {
            "alpha": a / p, "mean_accepted_per_iteration": a / it,
            "tokens_per_target_pass": (a + it) / it, "accepted": a, "proposed": p,
            "iterations": it, "sequences_differing_from_plain_greedy": flips[k],
            "alpha_teacher_forced_check": sim[k][0] / sim[k][1]}
    return {
        "prompts": len(prompts_ids), "new_tokens_per_prompt": new_tokens, "per_k": per_k,
        "greedy_margin": {
            "steps": int(gaps_a.size),
            "fraction_top2_gap_below_1e-3": float((gaps_a < 1e-3).mean()),
            "min_gap": float(gaps_a.min()),
            "p01_gap": float(np.quantile(gaps_a, 0.01)),
            "median_gap": float(np.median(gaps_a)),
            "steps_below_1e-3": near_ties}}


# ----------------------------------------------------------------------------- outputs


def make_prompts(held, n: int, seed: int) -> list[dict]:
    """n snippets of 10-200 characters from held-out files, each starting at a line start."""
    rng = random.Random(seed + 3)
    prompts, seen = [], set()
    lengths = [10 + round(190 * i / (n - 1)) for i in range(n)]
    rng.shuffle(lengths)
    tries = 0
    while len(prompts) < n:
        tries += 1
        if tries > 100 * n:
            raise TrainTinyError("held-out files: could not cut enough prompts")
        rel, text = held[rng.randrange(len(held))]
        starts = [0] + [i + 1 for i, c in enumerate(text) if c == "\n"]
        a = rng.choice(starts)
        snippet = text[a:a + lengths[len(prompts)]]
        if (len(snippet) < lengths[len(prompts)] or len(snippet.strip()) < 5
                or not all(c.isprintable() or c in "\n\t" for c in snippet)
                or (rel, a) in seen):
            continue
        seen.add((rel, a))
        prompts.append({"id": len(prompts), "prompt": snippet, "source": rel, "offset": a})
    return prompts


def save_pair(target, draft, hf_tok, out: Path):
    from transformers import GenerationConfig

    dirs = {"target": out / "tiny-moe", "draft": out / "tiny-draft"}
    for name, model in (("target", target), ("draft", draft)):
        d = dirs[name]
        d.mkdir(parents=True, exist_ok=True)
        for f in d.iterdir():
            if f.is_file():
                f.unlink()
        model.generation_config = GenerationConfig(
            bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, do_sample=False,
            max_new_tokens=64)
        bf16 = model.to(torch.bfloat16)
        bf16.config.use_cache = True
        bf16.save_pretrained(d, safe_serialization=True)
        model.to(torch.float32)
        hf_tok.save_pretrained(d)
        cfg_path = d / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.setdefault("dtype", "bfloat16")
        # keys that transformers 4.x reads (5.x reads `dtype` and `rope_parameters`)
        cfg["torch_dtype"] = cfg["dtype"]
        cfg.setdefault("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        # `TokenizersBackend` (what 5.x writes) is unknown to 4.x; both map this name to the
        # fast tokenizer built from tokenizer.json
        tc_path = d / "tokenizer_config.json"
        tc = json.loads(tc_path.read_text())
        tc["tokenizer_class"] = "PreTrainedTokenizerFast"
        tc_path.write_text(json.dumps(tc, indent=2, sort_keys=True) + "\n")
    return dirs


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def safetensor_names(path: Path, layer: int = 0) -> list[list]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return [[k, list(f.get_slice(k).get_shape()), str(f.get_slice(k).get_dtype())]
                for k in sorted(f.keys()) if k.startswith(f"model.layers.{layer}.")]


def load_fp32(d: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    except TypeError:  # transformers 4.x
        model = AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(d)


@torch.no_grad()
def sample_text(model, tok, prompt: str, n: int = 60) -> str:
    enc = tok(prompt, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=n, do_sample=False)
    return tok.decode(out[0], skip_special_tokens=True)


def write_readme(out: Path, res: dict) -> None:
    t, d, acc = res["target"], res["draft"], res["acceptance"]
    rows = "\n".join(
        f"| {k} | {v['alpha']:.3f} | {v['mean_accepted_per_iteration']:.2f} | "
        f"{v['tokens_per_target_pass']:.2f} | {v['sequences_differing_from_plain_greedy']} |"
        for k, v in acc["per_k"].items())
    m = acc["greedy_margin"]
    lay = "\n".join(f"    {n:<55} {s} {dt}" for n, s, dt in t["layer0_tensors"])
    samples = "\n\n".join(
        f"{name}, prompt {json.dumps(p)}:\n\n```python\n{txt}\n```"
        for name, s in (("target", t["samples"]), ("draft", d["samples"])) for p, txt in s.items())
    text = f"""# The tiny target/draft pair

Made by `python {res['command']}` (the numbers below
come from that run, {res['host']}; timings taken while other jobs shared the 2 cores).
Both models share one byte-level BPE tokenizer (vocabulary {res['tokenizer']['vocab_size']},
`<pad>`=0, `<s>`=1, `</s>`=2; encoding prepends `<s>`; `decode(encode(x))` round-trips).
Weights are stored in bfloat16; load them in fp32 on a CPU.

| | `tiny-moe/` (target) | `tiny-draft/` (draft) |
|---|---|---|
| class | MixtralForCausalLM | LlamaForCausalLM |
| layers, hidden | {t['config']['num_hidden_layers']}, {t['config']['hidden_size']} | {d['config']['num_hidden_layers']}, {d['config']['hidden_size']} |
| heads / KV heads / head dim | {t['config']['num_attention_heads']} / {t['config']['num_key_value_heads']} / {t['config']['head_dim']} | {d['config']['num_attention_heads']} / {d['config']['num_key_value_heads']} / {d['config']['head_dim']} |
| FFN | {t['config']['num_local_experts']} experts, top-{t['config']['num_experts_per_tok']}, intermediate {t['config']['intermediate_size']} | dense, intermediate {d['config']['intermediate_size']} |
| tied embeddings | {t['config']['tie_word_embeddings']} | {d['config']['tie_word_embeddings']} |
| parameters | {t['parameters']:,} | {d['parameters']:,} |
| directory size | {t['dir_bytes']:,} B | {d['dir_bytes']:,} B |
| training | {t['steps']} steps x {res['settings']['batch_size']} x {res['settings']['seq_len']} tokens, {t['train_time_s']:.0f} s | {d['steps']} steps x {res['settings']['draft_batch_size']} x {res['settings']['seq_len']} tokens, {d['train_time_s']:.0f} s, loss {res['settings']['distill_weight']} KL(target‖draft) + {1 - res['settings']['distill_weight']:.1f} CE |
| final train loss (last 20 steps) | LM {t['final_train_loss']:.3f}, per-layer balance loss {t['final_aux_loss']:.3f} (1.0 = balanced) x {res['settings']['router_aux_loss_coef']} | CE {d['final_train_ce']:.3f}, KL {d['final_train_kl']:.3f} |
| held-out loss (nats/token) | {t['val_loss']:.3f} | {d['val_loss']:.3f} |

Data: {res['data']['train_files']} *.py files ({res['data']['train_chars']:,} characters,
{res['data']['train_tokens']:,} tokens) of the Python {res['python']} standard library, chosen by
sha256 of their path; {res['data']['heldout_files']} other files are held out for the
validation loss and for `prompts.jsonl` ({res['settings']['n_prompts']} snippets of 10-200
characters). Total wall time of the script: {res['total_time_s']:.0f} s.

Share of top-2 assignments per expert on held-out text (rows: layers): min
{min(min(r) for r in t['expert_share_per_layer']):.3f}, max {max(max(r) for r in t['expert_share_per_layer']):.3f} (uniform: {1 / t['config']['num_local_experts']:.3f}).

Expert tensors in `tiny-moe/model.safetensors` ({t['expert_layout']}), layer 0:

```
{lay}
```

## Greedy acceptance (reloaded fp32 checkpoints, {acc['prompts']} held-out prompts, {acc['new_tokens_per_prompt']} new tokens each)

Measured by running the speculative loop (`measure_greedy_acceptance` in the script): alpha =
accepted / proposed drafts; acc(k) = accepted drafts per iteration; the last column counts
prompts whose speculative output differs from the target's plain greedy output.

| k | alpha | acc(k) | tokens per target pass | differing outputs |
|---|---|---|---|---|
{rows}

Greedy margins of the target: over {m['steps']} greedy steps the top-1 minus top-2 logit gap is
below 1e-3 in {m['fraction_top2_gap_below_1e-3']:.4f} of steps (min {m['min_gap']:.4g},
1st percentile {m['p01_gap']:.4g}, median {m['median_gap']:.3g}); those steps, as
[prompt id, step, gap]: {json.dumps(m['steps_below_1e-3'])}.

## Samples (greedy, `model.generate`)

A prompt that ends in a space (`"def "`) ends in a lone space token, which training text
rarely has (a space usually merges with the word after it), so its continuation is worse.

{samples}
"""
    (out / "README.md").write_text(text)


# ----------------------------------------------------------------------------- main


def setup_determinism(seed: int) -> None:
    torch.set_num_threads(NUM_THREADS)
    torch.use_deterministic_algorithms(True)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="output folder, e.g. models")
    ap.add_argument("--minutes-budget", type=float, default=20.0,
                    help="wall-clock cap; training stops early (flagged) rather than overrun")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target-steps", type=int, default=Settings.target_steps)
    ap.add_argument("--draft-steps", type=int, default=Settings.draft_steps)
    ap.add_argument("--n-prompts", type=int, default=Settings.n_prompts)
    ap.add_argument("--accept-new-tokens", type=int, default=Settings.accept_new_tokens)
    a = ap.parse_args(argv)
    if a.minutes_budget <= 0:
        ap.error("--minutes-budget must be > 0 (minutes of wall time), e.g. 20")
    if a.target_steps < 1 or a.draft_steps < 1:
        ap.error("--target-steps / --draft-steps must be >= 1")
    if a.n_prompts < 2:
        ap.error("--n-prompts must be >= 2")
    if a.accept_new_tokens < 1:
        ap.error("--accept-new-tokens must be >= 1")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    import transformers

    t_start = time.perf_counter()
    setup_determinism(args.seed)
    s = Settings(target_steps=args.target_steps, draft_steps=args.draft_steps,
                 n_prompts=args.n_prompts, accept_new_tokens=args.accept_new_tokens)
    budget_s = 60.0 * args.minutes_budget
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    files = stdlib_files()
    train, held = split_corpus(files, s)
    corpus_sha = hashlib.sha256("".join(r for r, _ in train).encode()).hexdigest()[:16]
    print(f"corpus: {len(train)} train files ({sum(len(t) for _, t in train):,} chars), "
          f"{len(held)} held-out files", flush=True)
    t0 = time.perf_counter()
    tok = train_tokenizer([t for _, t in train], s.vocab_size)
    tok_hash = hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]
    vocab = tok.get_vocab_size()
    stream = token_stream(tok, [t for _, t in train])
    val_text, n = [], 0
    for _, t in held:
        if n >= s.val_chars:
            break
        val_text.append(t)
        n += len(t)
    vstream = token_stream(tok, val_text)
    vbatches = val_batches(vstream, s)
    print(f"tokenizer: vocab {vocab}, {len(stream):,} train tokens "
          f"({sum(len(t) for _, t in train) / len(stream):.2f} chars/token), "
          f"{time.perf_counter() - t0:.1f} s", flush=True)

    from transformers import LlamaForCausalLM, MixtralForCausalLM

    torch.manual_seed(args.seed)
    target = MixtralForCausalLM(target_config(vocab, s))
    torch.manual_seed(args.seed + 10)
    draft = LlamaForCausalLM(draft_config(vocab))
    # training phases get fixed shares of the budget (only bind if the machine is slow)
    t_hist, t_steps, t_time = train_target(target, stream, s, args.seed,
                                           Deadline(t_start, 0.55 * budget_s))
    d_hist, d_steps, d_time = train_draft(draft, target, stream, s, args.seed,
                                          Deadline(t_start, 0.80 * budget_s))
    t_val, d_val = val_loss(target, vbatches), val_loss(draft, vbatches)
    usage = expert_usage(target, vbatches)
    print(f"held-out loss: target {t_val:.3f}, draft {d_val:.3f}", flush=True)

    dirs = save_pair(target, draft, hf_tokenizer(tok), out)
    target_r, tok_r = load_fp32(dirs["target"])
    draft_r, tok_d = load_fp32(dirs["draft"])
    if tok_r.get_vocab() != tok_d.get_vocab():
        raise RuntimeError("the two saved tokenizers differ")
    prompts = make_prompts(held, s.n_prompts, args.seed)
    with open(out / "prompts.jsonl", "w") as f:
        for p in prompts:
            f.write(json.dumps(p) + "\n")
    bad_rt = [p["id"] for p in prompts
              if tok_r.decode(tok_r(p["prompt"])["input_ids"], skip_special_tokens=True) != p["prompt"]]
    prompts_ids = [tok_r(p["prompt"])["input_ids"] for p in prompts]
    assert all(ids[0] == BOS_ID for ids in prompts_ids)
    t_acc = time.perf_counter()
    acc = measure_greedy_acceptance(target_r, draft_r, prompts_ids, range(1, s.max_k + 1),
                                    s.accept_new_tokens)
    acc["measure_time_s"] = time.perf_counter() - t_acc
    sample_prompts = ("def ", "import os\n", "class Foo:\n    def __init__(self")
    samples = {name: {p: sample_text(m, tok_r, p) for p in sample_prompts}
               for name, m in (("target", target_r), ("draft", draft_r))}
    st = dirs["target"] / "model.safetensors"
    layer0 = safetensor_names(st)
    fused = any("gate_up_proj" in n for n, _, _ in layer0)
    layout = ("fused 3-D mlp.experts.gate_up_proj / mlp.experts.down_proj" if fused else
              "per-expert block_sparse_moe.experts.{e}.w1/w2/w3, the original Mixtral layout; "
              "transformers 5 fuses them into gate_up_proj/down_proj when loading and splits "
              "them again when saving")
    total_bytes = dir_bytes(dirs["target"]) + dir_bytes(dirs["draft"])

    def tail(vals, i):
        return float(np.mean([v[i] for v in vals[-20:]]))

    def cfg_dict(m):
        keys = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                "head_dim", "intermediate_size", "num_local_experts", "num_experts_per_tok",
                "tie_word_embeddings", "vocab_size", "max_position_embeddings")
        return {k: getattr(m.config, k) for k in keys if hasattr(m.config, k)}

    res = {
        "command": " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]) if argv is None
                   else "scripts/train_tiny.py " + " ".join(argv),
        "seed": args.seed, "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "threads": NUM_THREADS,
        "host": f"{platform.machine()}, {os.cpu_count()} cores",
        "settings": s.__dict__,
        "data": {"stdlib": sysconfig.get_paths()["stdlib"], "train_files": len(train),
                 "train_chars": sum(len(t) for _, t in train), "train_tokens": int(len(stream)),
                 "heldout_files": len(held), "val_tokens": int(len(vstream)),
                 "train_file_list_sha256_16": corpus_sha},
        "tokenizer": {"vocab_size": vocab, "tokenizer_json_sha256_16": tok_hash, "bos": BOS_ID, "eos": EOS_ID, "pad": PAD_ID,
                      "prompt_roundtrip_failures": bad_rt},
        "target": {"dir": str(dirs["target"]), "config": cfg_dict(target_r),
                   "parameters": sum(p.numel() for p in target_r.parameters()),
                   "dir_bytes": dir_bytes(dirs["target"]), "steps": t_steps,
                   "stopped_early": t_steps < s.target_steps, "train_time_s": t_time,
                   "final_train_loss": tail(t_hist, 0), "final_aux_loss": tail(t_hist, 1),
                   "first_train_loss": t_hist[0][0], "val_loss": t_val,
                   "expert_share_per_layer": usage, "expert_layout": layout,
                   "layer0_tensors": layer0, "samples": samples["target"]},
        "draft": {"dir": str(dirs["draft"]), "config": cfg_dict(draft_r),
                  "parameters": sum(p.numel() for p in draft_r.parameters()),
                  "dir_bytes": dir_bytes(dirs["draft"]), "steps": d_steps,
                  "stopped_early": d_steps < s.draft_steps, "train_time_s": d_time,
                  "final_train_ce": tail(d_hist, 0), "final_train_kl": tail(d_hist, 1),
                  "first_train_ce": d_hist[0][0], "val_loss": d_val,
                  "samples": samples["draft"]},
        "total_dir_bytes": total_bytes,
        "weights_sha256_16": {n: hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()[:16]
                              for n, d in dirs.items()},
        "acceptance": acc,
    }
    res["total_time_s"] = time.perf_counter() - t_start
    (out / "tiny_pair.json").write_text(json.dumps(res, indent=2) + "\n")
    write_readme(out, res)
    print(json.dumps({"total_time_s": round(res["total_time_s"], 1), "total_dir_bytes": total_bytes,
                      "alpha": {k: round(v["alpha"], 3) for k, v in acc["per_k"].items()},
                      "margin": acc["greedy_margin"]}, indent=1))
    for name, smp in samples.items():
        for p, txt in smp.items():
            print(f"--- {name} {p!r}\n{txt}")
    if total_bytes > 10_000_000:
        print(f"WARNING: the two model directories take {total_bytes:,} bytes (> 10 MB)",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except TrainTinyError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
