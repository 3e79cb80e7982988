"""Acceptance against answers known without the engine (issue 15).

Greedy speculation emits the target's tokens whatever the draft does, so a bug in the draft's
bookkeeping (its KV missing a token after a fully accepted iteration) changes no token, only how
often drafts are accepted. These tests pin the acceptance itself:

- a one-expert Mixtral target whose attention and expert are a Llama draft's own weights is the same
  function as the draft (top-1 of one expert routes every token there with weight 1): every draft is
  accepted, so every iteration accepts exactly k;
- acc(k) of the bundled pair, recomputed from transformers' own argmaxes along the target's greedy
  continuation: an iteration starting at position t accepts the run of positions t, t+1, ... (at most
  k) where the draft's argmax equals the target's greedy token, and the next iteration starts 1 + a
  positions later.
"""
from __future__ import annotations

import json

import pytest
import torch

from engine_fixtures import one_thread_per_module  # noqa: F401 (autouse: one torch thread)
from engine_fixtures import (COMMON, TINY_DRAFT, TINY_MOE, have_tiny_pair, load_hf, make_checkpoint, tiny_prompts)
from specmoe.runtime.engine import Engine, plan_for_checkpoint


def _mixtral_copy_of(llama_dir, out_dir):
    """A one-expert Mixtral checkpoint with the Llama checkpoint's weights (the expert is its MLP)."""
    import transformers as tf
    from safetensors.torch import load_file

    sd = load_file(str(llama_dir / "model.safetensors"))
    rope = tf.AutoConfig.from_pretrained(llama_dir).rope_parameters      # Mixtral's default theta differs
    cfg = tf.MixtralConfig(intermediate_size=48, num_local_experts=1, num_experts_per_tok=1, rope_parameters=rope,
                           **COMMON)
    model = tf.AutoModelForCausalLM.from_config(cfg).float().eval()
    new = {}
    for name, p in model.state_dict().items():
        if name.endswith("mlp.gate.weight"):
            new[name] = torch.ones_like(p)                   # one expert: the router's softmax is 1 anyway
        elif name.endswith("mlp.experts.gate_up_proj"):
            pre = name[: -len("experts.gate_up_proj")]
            new[name] = torch.cat([sd[pre + "gate_proj.weight"], sd[pre + "up_proj.weight"]], 0)[None]
        elif name.endswith("mlp.experts.down_proj"):
            pre = name[: -len("experts.down_proj")]
            new[name] = sd[pre + "down_proj.weight"][None]
        else:
            new[name] = sd[name]
    model.load_state_dict(new)
    try:
        model.save_pretrained(out_dir, save_original_format=True)
    except TypeError:
        model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def twin_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("twin")
    d = make_checkpoint("llama", root / "draft", seed=11, scale=2.0)
    t = _mixtral_copy_of(d, root / "target")
    return t, d


def test_twin_pair_is_one_function_in_transformers(twin_pair):
    t, d = twin_pair
    ids = torch.tensor([[5, 17, 33, 60, 4, 90, 12]])
    with torch.no_grad():
        lt, ld = load_hf(t)(ids).logits, load_hf(d)(ids).logits
    assert torch.allclose(lt, ld, atol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_twin_pair_accepts_every_draft(twin_pair, k):
    t, d = twin_pair
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 96, (int(n),), generator=g).tolist() for n in torch.randint(2, 12, (10,), generator=g)]
    plan = plan_for_checkpoint(t, d, "devbox-2core", batch=4, draft_len=k, micro_batches=2, draft_kv_gpu_sequences=2)
    r = Engine(plan, t, d).generate(prompts, max_new_tokens=20, draft_len=k)
    rec = r.record
    assert rec.token_flips == 0
    assert rec.acceptance_histogram == {str(k): sum(rec.acceptance_histogram.values())}, rec.acceptance_histogram
    assert rec.mean_accepted == k
    # every decode iteration of a sequence emits k + 1 tokens until its last one
    for o in r.outputs:
        assert len(o.token_ids) == 20 or o.token_ids[-1] == 2


# ---------------------------------------------------------------------------------------------- bundled pair
MAX_NEW = 24


def _ids(texts):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TINY_MOE / "tokenizer.json"))
    return [tok.encode(t).ids for t in texts]


def _reference_acceptance(prompts, ks, eos):
    """{k: (accepted drafts, verified sequence-iterations)} from transformers alone (fp32)."""
    target, draft = load_hf(TINY_MOE), load_hf(TINY_DRAFT)
    target.generation_config.eos_token_id = None
    out = {k: [0, 0] for k in ks}
    extra = max(ks) + 1
    with torch.no_grad():
        for p in prompts:
            ids = target.generate(torch.tensor([p]), do_sample=False, max_new_tokens=MAX_NEW + extra,
                                  pad_token_id=0, attention_mask=torch.ones(1, len(p), dtype=torch.long))[0]
            gen = ids[len(p):].tolist()                       # the target's greedy tokens, past EOS and the limit
            assert torch.equal(target(ids[None]).logits[0, len(p) - 1:-1].argmax(-1), ids[len(p):])
            dpred = draft(ids[None]).logits[0, len(p) - 1:-1].argmax(-1).tolist()   # draft's guess of gen[t]
            end = MAX_NEW
            if eos in gen[:MAX_NEW]:
                end = gen.index(eos) + 1
            for k in ks:
                t = 1                                         # the first token comes from the prefill
                while t < end:
                    a = 0
                    while a < k and dpred[t + a] == gen[t + a]:
                        a += 1
                    out[k][0] += a
                    out[k][1] += 1
                    t += a + 1
    return out


@pytest.mark.skipif(not have_tiny_pair(), reason="models/tiny-moe and models/tiny-draft not built yet")
def test_bundled_pair_acceptance_matches_transformers_argmaxes():
    prompts = _ids(tiny_prompts(16))
    eos = json.loads((TINY_MOE / "config.json").read_text())["eos_token_id"]
    ks = (1, 3)
    ref = _reference_acceptance(prompts, ks, eos)
    plan = plan_for_checkpoint(TINY_MOE, TINY_DRAFT, "devbox-2core", batch=8, draft_len=max(ks), micro_batches=2)
    eng = Engine(plan, TINY_MOE, TINY_DRAFT, dtype="float32")
    for k in ks:
        rec = eng.generate(prompts, max_new_tokens=MAX_NEW, draft_len=k).record
        acc, ver = ref[k]
        assert rec.token_flips == 0
        hist = {int(a): n for a, n in rec.acceptance_histogram.items()}
        assert (sum(a * n for a, n in hist.items()), sum(hist.values())) == (acc, ver), (k, hist, acc, ver)
        assert rec.mean_accepted == pytest.approx(acc / ver, abs=1e-12)
    assert 0.5 < ref[1][0] / ref[1][1] < 0.9            # a real draft: acc(1) well inside (0, 1)
