#!/usr/bin/env python
"""Train an EAGLE-1 draft head for the bundled target (models/tiny-moe) on its own hidden states.

    python scripts/train_eagle.py --out models/tiny-eagle [--steps 600] [--seed 0]

What it does, offline and reproducibly on a CPU (fixed seeds, deterministic torch ops, 2 threads):

1. data: scripts/train_tiny.py's training corpus (the stdlib's *.py files chosen by the hash of their
   path), tokenized with the target's own tokenizer.json; random windows of 256 tokens starting with <s>.
2. features: the target (transformers' MixtralForCausalLM, fp32) runs each window; f_i is the normed
   last-layer hidden state at position i (what its LM head reads, and what the engine hands the head).
3. the head (EAGLE-1, arXiv 2401.15077): x = fc([embed(t_{i+1}); f_i]) with the target's embedding, one
   Llama decoder layer without input norm, output x_i predicting f_{i+1}. Loss, as EAGLE's: smooth-L1
   between x_i and f_{i+1}, plus w x the cross-entropy of the head's token distribution lm_head(x_i)
   against the target's softmax(lm_head(f_{i+1})); uniform noise on the input features, as EAGLE adds,
   so that the head tolerates its own (imperfect) features at later draft steps.
4. saves the head in the layout EAGLE publishes and vLLM loads (`fc.weight`, `fc.bias`,
   `layers.0.self_attn.q_proj.weight`, ... in bfloat16 safetensors) with a config.json naming the
   architecture `EagleLlamaForCausalLM` and its base model (`eagle_base_model`), and writes
   OUT/../tiny_eagle.json (settings, losses, held-out agreement with the target, timings).

Dimensions: B windows, T tokens, H hidden, V vocabulary.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_tiny as tt  # noqa: E402  (sets the thread environment before torch is imported)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TARGET = REPO / "models" / "tiny-moe"


@dataclass(frozen=True)
class Settings:
    intermediate_size: int = 384
    steps: int = 600
    batch_size: int = 16
    lr: float = 3e-3
    token_loss_weight: float = 0.5     # w: EAGLE uses 0.1; the tiny head's tokens gain from more
    feature_noise: float = 0.2         # input features + U(-noise/2, noise/2), as EAGLE's AddUniformNoise
    val_windows: int = 64


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rotate(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding over positions 0..T-1 of x [B, heads, T, D] (transformers' half rotation)."""
    T, D = x.shape[-2], x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    f = torch.arange(T).float()[:, None] * inv[None, :]
    emb = torch.cat([f, f], -1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    half = D // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


class EagleHeadRef(torch.nn.Module):
    """The head over whole sequences (no KV cache): the training model, and the reference the engine's
    runtime/model/eagle.py is tested against. Parameter names are the published layout's."""

    def __init__(self, cfg: dict):
        super().__init__()
        H, I = cfg["hidden_size"], cfg["intermediate_size"]
        self.nq, self.nkv, self.D = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
        self.eps, self.theta = cfg["rms_norm_eps"], cfg["rope_theta"]
        self.fc = torch.nn.Linear(2 * H, H, bias=True)
        lin = lambda i, o: torch.nn.Linear(i, o, bias=False)  # noqa: E731
        attn = torch.nn.ModuleDict({"q_proj": lin(H, self.nq * self.D), "k_proj": lin(H, self.nkv * self.D),
                                    "v_proj": lin(H, self.nkv * self.D), "o_proj": lin(self.nq * self.D, H)})
        mlp = torch.nn.ModuleDict({"gate_proj": lin(H, I), "up_proj": lin(H, I), "down_proj": lin(I, H)})
        layer = torch.nn.Module()
        layer.self_attn, layer.mlp = attn, mlp
        layer.post_attention_layernorm = torch.nn.Module()
        layer.post_attention_layernorm.weight = torch.nn.Parameter(torch.ones(H))
        self.layers = torch.nn.ModuleList([layer])

    def forward(self, emb: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """emb [B, T, H] (embeddings of t_{i+1}), feats [B, T, H] (f_i) -> the head's output [B, T, H]."""
        B, T, _ = emb.shape
        L = self.layers[0]
        a = L.self_attn
        x = self.fc(torch.cat([emb, feats], -1))                                     # [B, T, H]
        q = rotate(a["q_proj"](x).view(B, T, self.nq, self.D).transpose(1, 2), self.theta)
        k = rotate(a["k_proj"](x).view(B, T, self.nkv, self.D).transpose(1, 2), self.theta)
        v = a["v_proj"](x).view(B, T, self.nkv, self.D).transpose(1, 2)
        g = self.nq // self.nkv
        o = F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), is_causal=True)
        x = x + a["o_proj"](o.transpose(1, 2).reshape(B, T, -1))
        n = rms_norm(x, L.post_attention_layernorm.weight, self.eps)
        return x + L.mlp["down_proj"](F.silu(L.mlp["gate_proj"](n)) * L.mlp["up_proj"](n))


def head_config(target_cfg: dict, s: Settings) -> dict:
    """config.json of the head: a one-layer Llama of the target's width, heads and vocabulary, marked EAGLE."""
    keys = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
            "max_position_embeddings", "rms_norm_eps", "rope_theta", "bos_token_id", "eos_token_id", "pad_token_id")
    cfg = {k: target_cfg[k] for k in keys}
    cfg.update(architectures=["EagleLlamaForCausalLM"], model_type="llama", num_hidden_layers=1,
               intermediate_size=s.intermediate_size, hidden_act="silu", attention_bias=False, mlp_bias=False,
               tie_word_embeddings=False, bias=True, dtype="bfloat16", torch_dtype="bfloat16",
               rope_parameters={"rope_theta": target_cfg["rope_theta"], "rope_type": "default"})
    from specmoe.planner.hf_config import config_sha256

    cfg["eagle_base_model"] = {"name": "tiny-moe", "model_type": target_cfg["model_type"],
                               "hidden_size": target_cfg["hidden_size"], "vocab_size": target_cfg["vocab_size"],
                               "num_hidden_layers": target_cfg["num_hidden_layers"],
                               "config_sha256": config_sha256(target_cfg)}
    return cfg


@torch.no_grad()
def features(target, x: torch.Tensor) -> torch.Tensor:
    """x [B, T] -> the target's normed last hidden states [B, T, H] (its LM head's input)."""
    return target.model(input_ids=x).last_hidden_state.float()


def losses(head, target, x: torch.Tensor, s: Settings, gen: torch.Generator | None):
    """(feature loss, token loss, top-1 agreement with the target) of the head on windows x [B, T]."""
    f = features(target, x)                                                          # [B, T, H]
    emb = target.model.embed_tokens(x[:, 1:]).detach()                               # [B, T-1, H] t_{i+1}
    inp = f[:, :-1]
    if gen is not None and s.feature_noise > 0:
        inp = inp + (torch.rand(inp.shape, generator=gen) - 0.5) * s.feature_noise
    out = head(emb, inp)                                                             # [B, T-1, H] ~ f_{i+1}
    fl = F.smooth_l1_loss(out, f[:, 1:])
    W = target.lm_head.weight.detach()
    with torch.no_grad():
        p = F.softmax(f[:, 1:] @ W.T, -1)                                            # [B, T-1, V]
    logp = F.log_softmax(out @ W.T, -1)
    tl = -(p * logp).sum(-1).mean()
    agree = (logp.argmax(-1) == p.argmax(-1)).float().mean()
    return fl, tl, agree


def train(head, target, stream, s: Settings, seed: int):
    gen = torch.Generator().manual_seed(seed + 21)
    data = tt.Settings()
    opt = tt.make_optimizer(head, s.lr)
    hist, t0 = [], time.perf_counter()
    bar = tt.tqdm(range(s.steps), desc="eagle head", dynamic_ncols=True)
    for step in bar:
        for grp in opt.param_groups:
            grp["lr"] = tt.lr_at(step, s.steps, s.lr)
        x = tt.sample_batch(stream, data, s.batch_size, gen)                         # [B, T]
        fl, tl, agree = losses(head, target, x, s, gen)
        (fl + s.token_loss_weight * tl).backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        hist.append((fl.item(), tl.item(), agree.item()))
        bar.set_postfix(feat=f"{fl.item():.3f}", tok=f"{tl.item():.3f}", agree=f"{agree.item():.2f}")
    bar.close()
    return hist, time.perf_counter() - t0


def save_head(head, cfg: dict, out: Path) -> Path:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in head.state_dict().items()}
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(out / "model.safetensors", 0o644)        # a plain file's mode, as the bundled pair's
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out


def load_head(d: Path) -> EagleHeadRef:
    """A saved head back as an EagleHeadRef (fp32)."""
    from safetensors.torch import load_file

    head = EagleHeadRef(json.loads((d / "config.json").read_text()))
    head.load_state_dict({k: v.float() for k, v in load_file(str(d / "model.safetensors")).items()})
    return head.eval()


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="output directory, e.g. models/tiny-eagle")
    ap.add_argument("--target", type=Path, default=TARGET, help="the target checkpoint (default models/tiny-moe)")
    ap.add_argument("--steps", type=int, default=Settings.steps)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.steps < 1:
        ap.error("--steps must be >= 1")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    tt.setup_determinism(args.seed)
    s = Settings(steps=args.steps)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(args.target / "tokenizer.json"))
    train_files, held = tt.split_corpus(tt.stdlib_files(), tt.Settings())
    stream = tt.token_stream(tok, [t for _, t in train_files])
    val_text, n = [], 0
    for _, t in held:
        if n >= tt.Settings().val_chars:
            break
        val_text.append(t)
        n += len(t)
    vx = torch.cat(tt.val_batches(tt.token_stream(tok, val_text), tt.Settings(), s.val_windows))
    print(f"data: {len(stream):,} training tokens, {vx.numel():,} held-out tokens", flush=True)
    target, _ = tt.load_fp32(args.target)
    for p in target.parameters():
        p.requires_grad_(False)
    tcfg = json.loads((args.target / "config.json").read_text())
    cfg = head_config(tcfg, s)
    torch.manual_seed(args.seed + 20)
    head = EagleHeadRef(cfg)
    hist, train_s = train(head, target, stream, s, args.seed)
    head.eval()
    with torch.no_grad():
        vals = [losses(head, target, b, s, None) for b in vx.split(s.batch_size)]
    vf, vt, va = (float(np.mean([v[i].item() for v in vals])) for i in range(3))
    save_head(head, cfg, args.out)
    res = {"command": "scripts/train_eagle.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "seed": args.seed, "settings": asdict(s), "python": platform.python_version(), "torch": torch.__version__,
           "threads": tt.NUM_THREADS, "host": f"{platform.machine()}, {os.cpu_count()} cores", "parameters": sum(p.numel() for p in head.parameters()),
           "train_tokens": int(len(stream)), "train_time_s": train_s,
           "final_train": {k: float(np.mean([h[i] for h in hist[-20:]])) for i, k in
                           enumerate(("feature_loss", "token_loss", "top1_agreement"))},
           "heldout": {"feature_loss": vf, "token_loss": vt, "top1_agreement": va},
           "weights_sha256_16": hashlib.sha256((args.out / "model.safetensors").read_bytes()).hexdigest()[:16],
           "total_time_s": time.perf_counter() - t_start}
    (args.out.parent / "tiny_eagle.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: res[k] for k in ("parameters", "heldout", "train_time_s", "total_time_s")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
