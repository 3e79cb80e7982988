"""The EAGLE head in the engine (runtime/model/eagle.py, runtime/eagle_draft.py) on the bundled target and
its trained head: greedy output token for token the target's at every k (k changing between iterations,
draft KV split between the device part and host rows, continuous batching), the head's proposals equal to
a plain whole-sequence reference (scripts/train_eagle.py's EagleHeadRef over transformers' target), sampling,
`specmoe run --draft-len 3` against `--draft-len 0`, and `specmoe profile-acceptance` for k = 1..8."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from engine_fixtures import one_thread_per_module  # noqa: F401 (autouse: one torch thread)
from engine_fixtures import REPO, TINY_MOE, TINY_PROMPTS, load_hf, tiny_prompts
from eagle_fixtures import TINY_EAGLE, have_tiny_eagle
from script_loader import load_script
from specmoe.runtime.cli.main import main
from specmoe.runtime.engine import Engine, plan_for_checkpoint
from specmoe.runtime.speculative import SpeculativeDecoder

pytestmark = pytest.mark.skipif(not have_tiny_eagle(), reason="needs models/tiny-moe and models/tiny-eagle")
NEW = 20


@pytest.fixture(scope="module")
def engine():
    # batch 4 of 6 prompts (rows refill), 2 micro-batches, the head's KV of 2 rows on the device part, 2 on host
    plan = plan_for_checkpoint(TINY_MOE, TINY_EAGLE, "devbox-2core", batch=4, draft_len=3, micro_batches=2,
                               draft_kv_gpu_sequences=2)
    return Engine(plan, TINY_MOE, TINY_EAGLE, dtype="float32")


@pytest.fixture(scope="module")
def plain(engine):
    return {o.index: o.token_ids for o in engine.generate(tiny_prompts(6), max_new_tokens=NEW, draft_len=0).outputs}


@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_output_is_the_targets_at_every_k(engine, plain, k):
    res = engine.generate(tiny_prompts(6), max_new_tokens=NEW, draft_len=k)
    assert {o.index: o.token_ids for o in res.outputs} == plain
    assert res.record.token_flips == 0
    # a head reading the right features accepts often; one off by a position would accept ~never
    assert res.record.mean_accepted > 0.35 * min(k, 3)


def test_k_changing_between_iterations(engine, plain):
    """k = 0 iterations let pending pairs pile up (the head catches up on several at once), then k > 0."""
    ks = [0, 2, 0, 0, 3, 1, 0, 5]
    plan = engine.plan
    eng = Engine(plan, TINY_MOE, TINY_EAGLE, dtype="float32", k_policy=lambda info: ks[info.iteration % len(ks)])
    res = eng.generate(tiny_prompts(6), max_new_tokens=NEW)
    assert {o.index: o.token_ids for o in res.outputs} == plain
    assert set(res.record.draft_len_histogram) >= {"0", "2", "3"} and res.record.mean_accepted > 0


def _reference_steps(target, head, ctx: list[int], k: int) -> list[torch.Tensor]:
    """The head's k greedy steps after the tokens ctx, recomputed from scratch: the target's features
    f_0..f_{c-1} of ctx[:-1], pairs (f_i, ctx[i+1]), then the head's own output beside each proposal.
    Returns each step's output at the last position [H]."""
    with torch.no_grad():
        f = target.model(input_ids=torch.tensor([ctx[:-1]])).last_hidden_state.float()   # [1, c, H]
        emb_w, W = target.model.embed_tokens.weight, target.lm_head.weight
        toks, feats, outs = list(ctx[1:]), f, []
        for _ in range(k):
            h = head(emb_w[torch.tensor([toks])], feats)[:, -1]                         # [1, H]
            outs.append(h[0])
            toks.append(int((h @ W.T)[0].argmax()))
            feats = torch.cat([feats, h[:, None]], 1)
    return outs


@pytest.mark.parametrize("ks", [None, [0, 2, 0, 0, 3, 1, 0, 0, 0, 4]])
def test_head_steps_equal_a_whole_sequence_reference(engine, monkeypatch, ks):
    """Every draft step's output (the predicted feature) against the head run over the whole context from
    scratch: the prompt's pairs, the pending features after each verify (several after k = 0 iterations),
    the head's own output fed back."""
    from specmoe.runtime.model.eagle import EagleHead

    if ks is not None:
        engine = Engine(engine.plan, TINY_MOE, TINY_EAGLE, dtype="float32",
                        k_policy=lambda info: ks[info.iteration % len(ks)])

    te = load_script(REPO / "scripts" / "train_eagle.py", "train_eagle_for_tests")
    target, head = load_hf(TINY_MOE), te.load_head(TINY_EAGLE)
    steps, calls = [], []
    real_fwd, real_draft = EagleHead.forward, SpeculativeDecoder._draft

    def fwd(self, *a, **kw):
        out = real_fwd(self, *a, **kw)
        steps.append(out[1])
        return out

    def draft(self, active, rows, k):
        ctx, n0 = active[0].prompt + active[0].generated, len(steps)
        out = real_draft(self, active, rows, k)
        calls.append((ctx, k, steps[n0:n0 + k]))
        return out

    monkeypatch.setattr(EagleHead, "forward", fwd)
    monkeypatch.setattr(SpeculativeDecoder, "_draft", draft)
    for p in tiny_prompts(2):                      # one sequence at a time: each draft call is its own
        engine.generate([p], max_new_tokens=12, draft_len=3)
    assert len(calls) >= 6
    for ctx, k, got in calls:
        for g, w in zip(got, _reference_steps(target, head, ctx, k)):
            torch.testing.assert_close(g[0], w, rtol=1e-3, atol=2e-3)


def test_sampling_runs_and_repeats_with_its_seed(engine):
    a = engine.generate(tiny_prompts(4), max_new_tokens=12, draft_len=3, temperature=0.8, seed=5)
    b = engine.generate(tiny_prompts(4), max_new_tokens=12, draft_len=3, temperature=0.8, seed=5)
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert all(0 <= t < 2048 for o in a.outputs for t in o.token_ids) and a.record.mean_accepted > 0


def test_specmoe_run_draft_len_3_equals_draft_len_0(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    assert main(["plan", "--model", str(TINY_MOE), "--hardware", "devbox-2core", "--draft", str(TINY_EAGLE),
                 "--prompt-len", "24", "--gen-len", "16", "--acceptance", "0.6", "--batch", "4",
                 "--max-draft-len", "3", "-o", str(plan)]) == 0
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(TINY_PROMPTS.read_text().splitlines(keepends=True)[:5]))
    outs = {}
    for k in ("3", "0"):
        out = tmp_path / f"out{k}.jsonl"
        assert main(["run", str(plan), "--target", str(TINY_MOE), "--draft", str(TINY_EAGLE), "--prompts",
                     str(prompts), "--draft-len", k, "--max-new-tokens", "16", "--outputs", str(out),
                     "-o", str(tmp_path / f"run{k}.json"), "--no-progress", "--no-speed-probe"]) == 0
        outs[k] = {r["index"]: r["token_ids"] for r in map(json.loads, out.read_text().splitlines())}
    assert outs["3"] == outs["0"] and len(outs["0"]) == 5
    run3 = json.loads((tmp_path / "run3.json").read_text())
    assert run3["draft_len"] == 3 and run3["mean_accepted"] > 0.5 and "EAGLE head" in run3["weights"]["draft"]


def test_profile_acceptance_writes_k_1_to_8(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(TINY_PROMPTS.read_text().splitlines(keepends=True)[:4]))
    out = tmp_path / "acc.csv"
    assert main(["profile-acceptance", "--target", str(TINY_MOE), "--draft", str(TINY_EAGLE), "--prompts",
                 str(prompts), "--max-new-tokens", "10", "-o", str(out), "--no-progress"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [int(r["k"]) for r in rows] == list(range(1, 9))
    from specmoe.planner.workload import QUANTILE_COLUMNS

    assert list(rows[0]) == ["k", "accepted", "raw_accepted", "verified", "iterations", "accepted_sd",
                             *QUANTILE_COLUMNS]
    acc = [float(r["accepted"]) for r in rows]
    assert acc == sorted(acc) and 0.3 < acc[0] <= 1.0 and acc[-1] > acc[0]
    assert "0 sequences differ between k" in capsys.readouterr().out
