"""Engine API: RunRecord contents, continuous batching, placement (expert cache, CPU expert layers,
KV splits) without changing the output, memory refusal before loading, faults keeping finished
output, determinism, dynamic k, the acceptance oracle, random weights, input errors."""
from __future__ import annotations

import json
import shutil
import socket

import pytest
import torch

from engine_fixtures import one_thread_per_module  # noqa: F401 (autouse: one torch thread)
from engine_fixtures import add_tokenizer, make_pair
from specmoe.planner.errors import SpecError
from specmoe.planner.stages import STAGE_NAMES
from specmoe.runtime.weights.checkpoint import read_config
from specmoe.runtime.engine import Engine, plan_for_checkpoint
from specmoe.runtime.run_record import RunRecord
from specmoe.runtime.weights.sources import WeightSource
from test_speculative_exact import ragged_prompts




@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    t, d = make_pair(tmp_path_factory.mktemp("eng"), "qwen2_moe", "llama", seed=6, scale=0.9)
    add_tokenizer(t)
    return t, d


def plan(t, d, batch=4, k=3, m=2, **kw):
    return plan_for_checkpoint(t, d, "devbox-2core", batch=batch, draft_len=k, micro_batches=m, **kw)


def test_run_record(pair, tmp_path):
    t, d = pair
    p = plan(t, d, batch=4, k=3, draft_kv_gpu_sequences=2, expert_cache_slots=[4, 0, 2])
    eng = Engine(p, t, d)
    finished = []
    res = eng.generate(ragged_prompts(11, 3), max_new_tokens=12, on_finish=finished.append)
    rec = res.record
    assert rec.complete and rec.error is None and rec.finished_sequences == 11 == len(res.outputs)
    assert sorted(o.index for o in finished) == list(range(11))   # every sequence reported once, as it finished
    assert set(rec.stages) == set(STAGE_NAMES) == set(rec.stage_totals_s)
    assert rec.iterations > 0 and rec.stages["iteration"] > 0 and rec.stages["prefill"] > 0
    for s in ("target.pre_attn", "target.attention", "target.post_attn", "target.moe",
              "target.lm_head", "draft.gpu", "draft.cpu", "verify.accept"):
        assert rec.stages[s] > 0, s
    assert rec.stages["target.h2d"] == 0.0      # a CPU device streams references to the host rows: no copy
    assert rec.stages["iteration"] >= sum(v for k, v in rec.stages.items() if k not in ("iteration", "prefill")) * 0.99
    assert rec.decode_tokens_per_s > 0 and rec.end_to_end_tokens_per_s > 0
    assert rec.generated_tokens == sum(len(o.token_ids) for o in res.outputs) == rec.decode_tokens + 11
    hist = {int(a): n for a, n in rec.acceptance_histogram.items()}
    assert max(hist) <= 3 and sum(hist.values()) > 0
    assert abs(rec.mean_accepted - sum(a * n for a, n in hist.items()) / sum(hist.values())) < 1e-9
    # per sequence: its decode iterations and accepted drafts add up to the run's histogram
    assert sum(o.decode_iterations for o in res.outputs) == sum(hist.values())
    assert sum(o.accepted_drafts for o in res.outputs) == sum(a * n for a, n in hist.items())
    assert all(o.decode_iterations <= len(o.token_ids) and o.accepted_drafts <= 3 * o.decode_iterations
               for o in res.outputs)
    assert {"decode_iterations", "accepted_drafts"} <= set(res.outputs[0].to_dict())
    assert len(rec.live_by_iteration) == rec.iterations and sum(rec.live_by_iteration) == sum(hist.values())
    assert 1 <= min(rec.live_by_iteration) and max(rec.live_by_iteration) <= 4      # never above the batch
    assert rec.plan_hashes == p.input_hashes and rec.batch == 4 and rec.micro_batches == 2 and rec.draft_len == 3
    assert rec.h2d_bytes > 0 and rec.h2d_experts > 0
    assert {"verify_attention", "expert_permutation", "greedy_accept", "draft_decode_attention"} <= set(rec.backends)
    assert rec.machine["gpu"] == "none" and rec.machine["torch_version"] == torch.__version__
    assert socket.gethostname() not in json.dumps(rec.machine)
    assert rec.git_commit
    path = tmp_path / "run.json"
    rec.to_json(path)
    required = {"complete", "stages", "iterations", "decode_tokens_per_s", "end_to_end_tokens_per_s",
                "acceptance_histogram", "mean_accepted", "backends", "machine", "git_commit", "plan_hashes",
                "draft_len", "batch", "micro_batches", "h2d_bytes", "token_flips"}
    assert required <= set(json.loads(path.read_text()))
    back = RunRecord.from_json(path)
    assert back.to_dict() == json.loads(path.read_text()) and back.stages == rec.stages
    # text in, text out through the checkpoint's tokenizer
    out = eng.generate(["w5 w6 w7", "w90"], max_new_tokens=5).outputs
    assert out[0].prompt == "w5 w6 w7" and out[0].text == eng.tokenizer.decode(out[0].token_ids)


def test_placements_do_not_change_output(pair):
    t, d = pair
    prompts = ragged_prompts(7, 4)
    base = Engine(plan(t, d, batch=3, k=0, m=1), t, d).generate(prompts, max_new_tokens=10, draft_len=0)
    E = read_config(t).num_experts
    variants = [(dict(expert_cache_slots=[0, 0, 0], draft_kv_gpu_sequences=0), E),
                (dict(expert_cache_slots=[E, 0, E], draft_kv_gpu_sequences=3, target_kv_gpu_sequences=3), 0),
                (dict(expert_cache_slots=[1, 0, 5], cpu_expert_layers=(2,), target_kv_gpu_sequences=1), E - 1)]
    chunked = Engine(plan(t, d, batch=5, k=2, m=2), t, d, prefill_chunk_tokens=4)   # prefill in many passes
    assert [o.token_ids for o in chunked.generate(prompts, max_new_tokens=10).outputs] == \
        [o.token_ids for o in base.outputs]
    pre = Engine(plan(t, d, batch=3, k=2, m=2, expert_cache_slots=[0, 0, 2]), t, d, prefetch_next_layer=True)
    rp = pre.generate(prompts, max_new_tokens=10)
    assert [o.token_ids for o in rp.outputs] == [o.token_ids for o in base.outputs]
    assert rp.record.prefetch_next_layer and rp.record.h2d_bytes > 0
    assert 0 <= rp.record.h2d_unused_experts < rp.record.h2d_experts
    for v, capacity in variants:
        eng = Engine(plan(t, d, batch=3, k=2, m=2, **v), t, d)
        r = eng.generate(prompts, max_new_tokens=10)
        assert [o.token_ids for o in r.outputs] == [o.token_ids for o in base.outputs], v
        store = eng.store
        assert store.buffer_capacity == capacity and store.num_buffers == (2 if capacity else 0)
        assert r.record.h2d_bytes == store.h2d_experts * store.P * store.host_elem_bytes
        assert (r.record.h2d_bytes > 0) == (capacity > 0)


def test_memory_refused_before_weights_load(pair, tmp_path, monkeypatch):
    """The plan's weights (the planner's footprint at no sequences) are checked against the memory free
    before a weight is read: on a machine with 1 KiB free the broken checkpoint is never opened."""
    t, d = pair
    broken = tmp_path / "t"
    shutil.copytree(t, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)   # loading it would fail with another error
    monkeypatch.setattr("specmoe.runtime.memory_fit.host_mem_available_bytes", lambda: 1 << 10)
    with pytest.raises(SpecError, match=r"needs [0-9.]+ MiB .*target_non_expert_weights.*only 0.001 MiB"):
        Engine(plan(broken, d, batch=2, k=2, m=1), broken, d)
    monkeypatch.undo()
    with pytest.raises(SpecError, match="cannot read"):  # with the machine's real memory it gets to the weights
        Engine(plan(broken, d, batch=2, k=2, m=1), broken, d)


def test_open_stream_plan_runs_the_prompts_it_has(pair, monkeypatch):
    """A plan for thousands of sequences at a long context allocates KV for the prompts given, at their
    length; KV that does not fit the memory free is refused before it is allocated, naming the rows."""
    t, d = pair
    huge = plan(t, d, batch=100000, k=2, m=1, prompt_len=200000, gen_len=1000)
    eng = Engine(huge, t, d)
    r = eng.generate(ragged_prompts(5, 4), max_new_tokens=6)
    assert r.record.rows == 5 and r.record.batch == 100000 and len(r.outputs) == 5
    kv_row = eng.weights_footprint.to_dict()   # weights only: no KV rows in it
    assert kv_row["cpu_breakdown"]["target_kv"] == 0 and kv_row["gpu_breakdown"]["activations"] == 0
    monkeypatch.setattr("specmoe.runtime.memory_fit.host_mem_available_bytes", lambda: 1 << 10)
    with pytest.raises(SpecError, match=r"plan at 40 sequences: needs [0-9.]+ MiB .*target_kv"):
        eng.generate(ragged_prompts(40, 4), max_new_tokens=6)


def test_deterministic_with_seed(pair):
    t, d = pair
    eng = Engine(plan(t, d, batch=4, k=3), t, d)
    prompts = ragged_prompts(6, 5)
    a = eng.generate(prompts, max_new_tokens=10, temperature=1.0, seed=1)
    b = eng.generate(prompts, max_new_tokens=10, temperature=1.0, seed=1)
    c = eng.generate(prompts, max_new_tokens=10, temperature=1.0, seed=2)
    ta, tb, tc = ([o.token_ids for o in r.outputs] for r in (a, b, c))
    assert ta == tb and ta != tc


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_fault_mid_run_keeps_finished(pair, exc):
    t, d = pair
    finished = []

    def policy(info):
        if info.iteration == 12:
            raise exc
        return 2

    eng = Engine(plan(t, d, batch=2, k=2, m=1), t, d, k_policy=policy)
    with pytest.raises(type(exc)) as ei:
        eng.generate(ragged_prompts(9, 6), max_new_tokens=8, on_finish=finished.append)
    part = ei.value.partial_result
    assert part is eng.last_result
    rec = part.record
    assert not rec.complete and type(exc).__name__ in rec.error and rec.iterations == 12
    assert 0 < rec.finished_sequences < 9 and len(part.outputs) == rec.finished_sequences == len(finished)
    assert sorted(part.unfinished + [o.index for o in part.outputs]) == list(range(9))


def test_dynamic_k_and_oracle(pair):
    t, d = pair
    prompts = ragged_prompts(8, 7)
    base = Engine(plan(t, d, batch=4, k=0), t, d).generate(prompts, max_new_tokens=10)
    eng = Engine(plan(t, d, batch=4, k=3, acceptance=0.7), t, d, dynamic_k=True, max_k=6)
    r = eng.generate(prompts, max_new_tokens=10)
    assert r.record.dynamic_k and r.record.dynamic_k_source
    assert [o.token_ids for o in r.outputs] == [o.token_ids for o in base.outputs]
    alpha, k = 0.6, 4
    o = Engine(plan(t, d, batch=8, k=k), t, d, acceptance_oracle=alpha).generate(ragged_prompts(40, 8),
                                                                                max_new_tokens=30)
    want = alpha * (1 - alpha ** k) / (1 - alpha)
    n = sum(o.record.acceptance_histogram.values())
    assert o.record.acceptance_oracle == alpha and n > 200
    assert abs(o.record.mean_accepted - want) < 4 * 1.5 / n ** 0.5


def test_random_weights_engine(pair):
    t, d = pair
    tsrc = WeightSource.random(read_config(t), seed=1, dtype="float32")
    dsrc = WeightSource.random(read_config(d), seed=2, dtype="float32")
    r = Engine(plan(t, d, batch=2, k=2), tsrc, dsrc).generate(ragged_prompts(3, 9), max_new_tokens=6)
    assert r.record.complete and r.record.weights["target"].startswith("random seed=1")
    assert all(len(o.token_ids) >= 1 for o in r.outputs)


def test_input_errors(pair, tmp_path):
    t, d = pair
    eng = Engine(plan(t, d, batch=2, k=2), t, d)
    for bad, match in (([], "non-empty"), ([[]], "empty"), ([[5, 999]], "outside the vocabulary"),
                       ([3.5], "float")):
        with pytest.raises(SpecError, match=match):
            eng.generate(bad, max_new_tokens=4)
    with pytest.raises(SpecError, match="max_new_tokens"):
        eng.generate([[5]], max_new_tokens=0)
    with pytest.raises(SpecError, match="draft_len"):
        eng.generate([[5]], max_new_tokens=3, draft_len=-1)
    with pytest.raises(SpecError, match="max_position_embeddings"):
        eng.generate([[5]], max_new_tokens=10 ** 4)
    with pytest.raises(SpecError, match="no draft was given"):
        Engine(plan(t, d, batch=2, k=2), t, None)
    no_draft = Engine(plan(t, None, batch=2, k=0), t, None)
    with pytest.raises(SpecError, match="no draft model"):
        no_draft.generate([[5]], max_new_tokens=3, draft_len=2)
    other = make_pair(tmp_path, "mixtral", "llama", seed=1)[0]
    with pytest.raises(SpecError, match="another model"):
        Engine(plan(other, d, batch=2, k=2), t, d)
    plain = tmp_path / "plain"
    shutil.copytree(other, plain)
    with pytest.raises(SpecError, match="tokenizer"):
        Engine(plan(plain, d, batch=2, k=2), plain, d).generate(["hello"], max_new_tokens=2)


def test_planned_cached_experts_are_loaded_and_recorded(pair):
    """placement.cached_experts is what the cache starts with (the rows hold those experts' weights);
    the engine re-chooses them only when asked, and the run record says which it held."""
    from dataclasses import replace

    t, d = pair
    p = plan(t, d, batch=3, k=2, expert_cache_slots=[4, 0, 2])
    E, moe = p.model["num_experts"], p.model["moe_layers"]
    want = tuple(tuple(range(E - 1, E - 1 - n, -1)) for n in p.placement.expert_cache_slots)
    planned = replace(p, placement=replace(p.placement, cached_experts=want))
    prompts = ragged_prompts(5, 4)
    eng = Engine(planned, t, d)
    for layer in moe:
        assert eng.store.cached[layer] == list(want[layer])
        for slot, e in enumerate(want[layer]):
            assert torch.equal(eng.store.cache[layer][slot], eng.store.host[layer][e])
    r = eng.generate(prompts, max_new_tokens=8)
    assert r.record.cached_experts_planned and not r.record.experts_rebalanced
    assert r.record.cached_experts == {str(layer): list(want[layer]) for layer in moe}
    base = Engine(p, t, d).generate(prompts, max_new_tokens=8)          # no plan for them: first ids, rebalanced
    assert not base.record.cached_experts_planned and base.record.experts_rebalanced
    asked = Engine(planned, t, d, rebalance_experts=True).generate(prompts, max_new_tokens=8)
    held = {layer: sorted(ids) for layer, ids in asked.record.cached_experts.items()}
    assert asked.record.experts_rebalanced and held == {l: sorted(x) for l, x in base.record.cached_experts.items()}
    assert [o.token_ids for o in r.outputs] == [o.token_ids for o in base.outputs] == \
        [o.token_ids for o in asked.outputs]                              # what is cached never changes tokens


def test_gpu_attention_plan_refused(pair):
    from dataclasses import replace

    t, d = pair
    p = plan(t, d, batch=3, k=2)
    gpu_attn = replace(p, placement=replace(p.placement, attention_device="gpu"))
    with pytest.raises(SpecError, match=r"plan\.placement\.attention_device.*without `--gpu-attention`"):
        Engine(gpu_attn, t, d)
