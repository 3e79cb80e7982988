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
import json
import math
import os
import platform
import random
import sys
import sysconfig
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("RAYON_NUM_THREADS", "2")  # tokenizers' thread pool: stay on the 2 cores
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
# OpenMP threads that sleep instead of spinning: with the 2 cores shared by other processes,
# spinning workers made small ops 10-40x slower. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from tiny_acceptance import measure_greedy_acceptance  # noqa: E402
from tiny_data import (BOS_ID, EOS_ID, MAX_POSITIONS, NUM_THREADS, PAD_ID, Settings,  # noqa: E402,F401
                       TrainTinyError, hf_tokenizer, sample_batch, split_corpus, stdlib_files,
                       token_stream, train_tokenizer, val_batches)
from tiny_outputs import (dir_bytes, load_fp32, make_prompts, safetensor_names, sample_text,  # noqa: E402
                          save_pair, write_readme)


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


def prepare_data(s: Settings) -> SimpleNamespace:
    """The corpus split, the tokenizer and the token streams (train, held-out batches)."""
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
    return SimpleNamespace(train=train, held=held, corpus_sha=corpus_sha, tok=tok, tok_hash=tok_hash, vocab=vocab,
                           stream=stream, vstream=vstream, vbatches=vbatches)


def train_pair(d: SimpleNamespace, s: Settings, seed: int, t_start: float, budget_s: float) -> SimpleNamespace:
    """Both models trained (each phase with a fixed share of the budget), held-out losses, expert use."""
    from transformers import LlamaForCausalLM, MixtralForCausalLM

    torch.manual_seed(seed)
    target = MixtralForCausalLM(target_config(d.vocab, s))
    torch.manual_seed(seed + 10)
    draft = LlamaForCausalLM(draft_config(d.vocab))
    # training phases get fixed shares of the budget (only bind if the machine is slow)
    t_hist, t_steps, t_time = train_target(target, d.stream, s, seed, Deadline(t_start, 0.55 * budget_s))
    d_hist, d_steps, d_time = train_draft(draft, target, d.stream, s, seed, Deadline(t_start, 0.80 * budget_s))
    t_val, d_val = val_loss(target, d.vbatches), val_loss(draft, d.vbatches)
    usage = expert_usage(target, d.vbatches)
    print(f"held-out loss: target {t_val:.3f}, draft {d_val:.3f}", flush=True)
    return SimpleNamespace(target=target, draft=draft, t_hist=t_hist, t_steps=t_steps, t_time=t_time,
                           d_hist=d_hist, d_steps=d_steps, d_time=d_time, t_val=t_val, d_val=d_val, usage=usage)


def measure_saved_pair(tr: SimpleNamespace, d: SimpleNamespace, s: Settings, seed: int, out: Path) -> SimpleNamespace:
    """Saves the pair, reloads it in fp32, writes the prompts and measures greedy acceptance on them."""
    dirs = save_pair(tr.target, tr.draft, hf_tokenizer(d.tok), out)
    target_r, tok_r = load_fp32(dirs["target"])
    draft_r, tok_d = load_fp32(dirs["draft"])
    if tok_r.get_vocab() != tok_d.get_vocab():
        raise RuntimeError("the two saved tokenizers differ")
    prompts = make_prompts(d.held, s.n_prompts, seed)
    with open(out / "prompts.jsonl", "w") as f:
        for p in prompts:
            f.write(json.dumps(p) + "\n")
    bad_rt = [p["id"] for p in prompts
              if tok_r.decode(tok_r(p["prompt"])["input_ids"], skip_special_tokens=True) != p["prompt"]]
    prompts_ids = [tok_r(p["prompt"])["input_ids"] for p in prompts]
    assert all(ids[0] == BOS_ID for ids in prompts_ids)
    t_acc = time.perf_counter()
    acc = measure_greedy_acceptance(target_r, draft_r, prompts_ids, range(1, s.max_k + 1), s.accept_new_tokens)
    acc["measure_time_s"] = time.perf_counter() - t_acc
    sample_prompts = ("def ", "import os\n", "class Foo:\n    def __init__(self")
    samples = {name: {p: sample_text(m, tok_r, p) for p in sample_prompts}
               for name, m in (("target", target_r), ("draft", draft_r))}
    return SimpleNamespace(dirs=dirs, target_r=target_r, draft_r=draft_r, bad_rt=bad_rt, acc=acc, samples=samples)


def _tail(vals, i):
    return float(np.mean([v[i] for v in vals[-20:]]))


def _cfg_dict(m):
    keys = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
            "head_dim", "intermediate_size", "num_local_experts", "num_experts_per_tok",
            "tie_word_embeddings", "vocab_size", "max_position_embeddings")
    return {k: getattr(m.config, k) for k in keys if hasattr(m.config, k)}


def _model_entry(d: Path, model, steps: int, planned_steps: int, train_time_s: float) -> dict:
    """The fields tiny_pair.json holds for either model."""
    return {"dir": str(d), "config": _cfg_dict(model), "parameters": sum(p.numel() for p in model.parameters()),
            "dir_bytes": dir_bytes(d), "steps": steps, "stopped_early": steps < planned_steps,
            "train_time_s": train_time_s}


def build_results(args, argv, s: Settings, d: SimpleNamespace, tr: SimpleNamespace, ms: SimpleNamespace) -> dict:
    """What tiny_pair.json holds (total_time_s added by the caller)."""
    import transformers

    dirs = ms.dirs
    layer0 = safetensor_names(dirs["target"] / "model.safetensors")
    fused = any("gate_up_proj" in n for n, _, _ in layer0)
    layout = ("fused 3-D mlp.experts.gate_up_proj / mlp.experts.down_proj" if fused else
              "per-expert block_sparse_moe.experts.{e}.w1/w2/w3, the original Mixtral layout; "
              "transformers 5 fuses them into gate_up_proj/down_proj when loading and splits "
              "them again when saving")
    return {
        "command": " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]) if argv is None
                   else "scripts/train_tiny.py " + " ".join(argv),
        "seed": args.seed, "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "threads": NUM_THREADS,
        "host": f"{platform.machine()}, {os.cpu_count()} cores",
        "settings": s.__dict__,
        "data": {"stdlib": sysconfig.get_paths()["stdlib"], "train_files": len(d.train),
                 "train_chars": sum(len(t) for _, t in d.train), "train_tokens": int(len(d.stream)),
                 "heldout_files": len(d.held), "val_tokens": int(len(d.vstream)),
                 "train_file_list_sha256_16": d.corpus_sha},
        "tokenizer": {"vocab_size": d.vocab, "tokenizer_json_sha256_16": d.tok_hash, "bos": BOS_ID, "eos": EOS_ID,
                      "pad": PAD_ID, "prompt_roundtrip_failures": ms.bad_rt},
        "target": _model_entry(dirs["target"], ms.target_r, tr.t_steps, s.target_steps, tr.t_time) | {
                   "final_train_loss": _tail(tr.t_hist, 0), "final_aux_loss": _tail(tr.t_hist, 1),
                   "first_train_loss": tr.t_hist[0][0], "val_loss": tr.t_val,
                   "expert_share_per_layer": tr.usage, "expert_layout": layout,
                   "layer0_tensors": layer0, "samples": ms.samples["target"]},
        "draft": _model_entry(dirs["draft"], ms.draft_r, tr.d_steps, s.draft_steps, tr.d_time) | {
                  "final_train_ce": _tail(tr.d_hist, 0), "final_train_kl": _tail(tr.d_hist, 1),
                  "first_train_ce": tr.d_hist[0][0], "val_loss": tr.d_val,
                  "samples": ms.samples["draft"]},
        "total_dir_bytes": dir_bytes(dirs["target"]) + dir_bytes(dirs["draft"]),
        "weights_sha256_16": {n: hashlib.sha256((dd / "model.safetensors").read_bytes()).hexdigest()[:16]
                              for n, dd in dirs.items()},
        "acceptance": ms.acc,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    setup_determinism(args.seed)
    s = Settings(target_steps=args.target_steps, draft_steps=args.draft_steps,
                 n_prompts=args.n_prompts, accept_new_tokens=args.accept_new_tokens)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    d = prepare_data(s)
    tr = train_pair(d, s, args.seed, t_start, 60.0 * args.minutes_budget)
    ms = measure_saved_pair(tr, d, s, args.seed, out)
    res = build_results(args, argv, s, d, tr, ms)
    res["total_time_s"] = time.perf_counter() - t_start
    (out / "tiny_pair.json").write_text(json.dumps(res, indent=2) + "\n")
    write_readme(out, res)
    print(json.dumps({"total_time_s": round(res["total_time_s"], 1), "total_dir_bytes": res["total_dir_bytes"],
                      "alpha": {k: round(v["alpha"], 3) for k, v in ms.acc["per_k"].items()},
                      "margin": ms.acc["greedy_margin"]}, indent=1))
    for name, smp in ms.samples.items():
        for p, txt in smp.items():
            print(f"--- {name} {p!r}\n{txt}")
    if res["total_dir_bytes"] > 10_000_000:
        print(f"WARNING: the two model directories take {res['total_dir_bytes']:,} bytes (> 10 MB)",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except TrainTinyError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)