"""train_tiny.py's outputs: the held-out prompts, the saved Hugging Face directories, their reload in
fp32, and models/README.md.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from tiny_data import BOS_ID, EOS_ID, PAD_ID, TrainTinyError

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
