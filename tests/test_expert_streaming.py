"""Expert streaming on the CPU (the copy "stream" is synchronous here, so these check the schedule and
the accounting, not overlap): the order of begin/copy/wait/end calls in TargetModel.forward's modes,
buffers never claimed while a layer holds them, unused-expert accounting, greedy output identical
across the modes, and the H2D ledger (bytes with their busy seconds, per phase)."""
from __future__ import annotations

import pytest
import torch

from engine_fixtures import one_thread_per_module  # noqa: F401 (autouse: one torch thread)
from engine_fixtures import make_pair
from specmoe.planner.errors import SpecError
from specmoe.runtime.weights.checkpoint import read_config
from specmoe.runtime.engine import Engine, plan_for_checkpoint
from specmoe.runtime.model.expert_store import CopyLedger, ExpertStore
from specmoe.runtime.run_record import StageTimer
from specmoe.runtime.weights.sources import WeightSource
from test_speculative_exact import ragged_prompts


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    # mixtral: 2 MoE layers of 6 experts, top-2
    return make_pair(tmp_path_factory.mktemp("stream"), "mixtral", "llama", seed=4, scale=0.9, num_hidden_layers=3)


def plan(t, d, batch=4, k=2, m=2, **kw):
    return plan_for_checkpoint(t, d, "devbox-2core", batch=batch, draft_len=k, micro_batches=m, **kw)


def _replay(trace, store):
    """Check a store trace: a buffer is claimed only when free, copied into only by its holder at distinct
    indices below the capacity, waited on only while held; returns per-pass events."""
    holder: dict[int, int | None] = {b: None for b in range(store.num_buffers)}
    used_idx: dict[int, set] = {}
    unused_total = 0
    for ev in trace:
        kind, layer = ev[0], ev[1]
        if kind == "begin":
            b = ev[2]
            assert holder[b] is None, f"buffer {b} claimed by layer {layer} while layer {holder[b]} holds it"
            holder[b] = layer
            used_idx[b] = set()
        elif kind == "copy":
            _, _, e, b, i = ev
            assert holder[b] == layer, f"copy of layer {layer} into buffer {b} held by {holder[b]}"
            assert i not in used_idx[b] and 0 <= i < store.buffer_capacity
            assert e not in store.slot_of[layer] or True   # residency may change at rebalance (dropped first)
            used_idx[b].add(i)
        elif kind == "wait":
            assert layer in holder.values(), f"wait for layer {layer} that holds no buffer"
        elif kind in ("end", "drop"):
            b = ev[2]
            assert holder[b] == layer
            holder[b] = None
            unused_total += ev[3]
    return unused_total


@pytest.mark.parametrize("mode", ["next", "predict", "off"])
def test_modes_same_tokens_and_safe_schedule(pair, mode):
    t, d = pair
    prompts = ragged_prompts(6, 3)
    base = Engine(plan(t, d, batch=3, k=0, m=1), t, d).generate(prompts, max_new_tokens=8, draft_len=0)
    eng = Engine(plan(t, d, batch=3, k=2, m=2, expert_cache_slots=[1, 0, 2]), t, d, prefetch_next_layer=mode)
    eng.store.trace = []
    r = eng.generate(prompts, max_new_tokens=8)
    assert [o.token_ids for o in r.outputs] == [o.token_ids for o in base.outputs]
    assert r.record.expert_streaming == mode and r.record.prefetch_next_layer == (mode != "off")
    store = eng.store
    unused = _replay(store.trace, store)
    assert unused == store.h2d_unused_experts == r.record.h2d_unused_experts
    copies = [ev for ev in store.trace if ev[0] == "copy"]
    assert len(copies) == store.h2d_experts and r.record.h2d_bytes == len(copies) * store.expert_bytes
    if mode == "next":
        # within a pass: layer 1's experts are all issued before layer 0's compute waits for its own
        order = [(ev[0], ev[1]) for ev in store.trace if ev[0] in ("begin", "wait", "end")]
        assert order.count(("wait", 0)) >= r.record.iterations     # layer 0 waits once per pass
        for idx, ev in enumerate(order):
            if ev == ("wait", 0):
                seen = order[:idx]
                last_begin1 = max((i for i, e in enumerate(seen) if e == ("begin", 1)), default=None)
                last_end1 = max((i for i, e in enumerate(seen) if e[0] in ("end",) and e[1] == 1), default=-1)
                # layer 1 is begun (ahead) before layer 0 waits, in every pass but those after a drop
                assert last_begin1 is not None and last_begin1 > last_end1, (idx, seen[-6:])
        # the next pass's first two streaming layers (one per buffer) start streaming at the end of the pass,
        # before lm_head and the draft phase: all their experts are issued before anything waits
        ends = [i for i, ev in enumerate(store.trace) if ev[0] == "end" and ev[1] == 2]
        assert ends and all(store.trace[i + 1][:2] == ("begin", 0) for i in ends)
        for i in ends:
            nxt = store.trace[i + 1:]
            upto = next((j for j, ev in enumerate(nxt) if ev[0] in ("wait", "drop")), len(nxt))
            early = nxt[:upto]
            assert [ev[1] for ev in early if ev[0] == "begin"] == [0, 1], early[:4]
            assert sum(ev[0] == "copy" for ev in early) == 2 * store.E - store.slots[0] - store.slots[1]
    if mode == "off":
        assert unused == 0   # only what routing touched is streamed


def test_prefetch_unused_accounting_and_buffer_guard(pair):
    t, _ = pair
    cfg = read_config(t)
    src = WeightSource.from_checkpoint(t)
    E = cfg.num_experts
    store = ExpertStore(src, torch.device("cpu"), torch.float32, [1, E, 2], streaming_buffers=2)
    store.trace = []
    assert store.streaming_layers == [0, 2] and store.buffer_capacity == E - 1
    assert store.prefetch_layer(0) and store.fully_streamed(0)
    assert store.h2d_experts == E - 1
    assert store.prefetch_layer(2)                       # the second buffer
    assert not store.streams(1) and not store.prefetch_layer(1)     # fully cached: nothing to stream
    # both buffers held: a third streaming layer cannot be begun ahead (and must not take a held buffer)
    store.slots[1] = 1
    assert store.begin_layer(1, ahead=True) is False and not store.begun(1)
    with pytest.raises(RuntimeError, match="held"):
        store.begin_layer(1)
    store.slots[1] = E
    # layer 0 uses 2 of its 5 streamed experts: 3 unused
    streamed0 = [e for e in range(E) if e not in store.slot_of[0]]
    for e in streamed0[:2]:
        gu, dn, on_host = store.weights(0, e)
        ref = src.expert(0, e)
        assert torch.equal(gu, torch.cat([ref[0], ref[1]]).float()) and torch.equal(dn, ref[2].float()) and not on_host
    store.end_layer(0)
    assert store.h2d_unused_experts == E - 1 - 2
    # the drop of an abandoned pass counts its streamed experts as unused; buffers are free again
    store.drop_streams()
    assert store.h2d_unused_experts == (E - 1 - 2) + (E - 2)
    assert [ev[0] for ev in store.trace if ev[0] in ("end", "drop")] == ["end", "drop"]
    assert not store._buf_of_layer and store.begin_layer(0, ahead=True)
    waits = [ev for ev in store.trace if ev[0] == "wait"]
    assert waits == [("wait", 0)]                        # one wait per copy batch, before the first use
    by_phase = store.take_h2d()
    assert set(by_phase) == {"decode"}
    nbytes, secs = by_phase["decode"]
    assert nbytes == store.h2d_bytes == (2 * E - 3) * store.expert_bytes
    assert secs == 0.0 and store.copied_bytes == 0      # a CPU device streams references: nothing is copied
    assert store.take_h2d() == {}


class _Ev:
    """An event whose completion the test sets (CopyLedger's CUDA-event protocol)."""

    def __init__(self, t_ms: float, done: bool = True):
        self.t_ms, self.done, self.synced = t_ms, done, False

    def query(self):
        return self.done

    def synchronize(self):
        self.synced = True
        self.done = True

    def elapsed_time(self, end):
        return end.t_ms - self.t_ms


def test_copy_ledger_takes_finished_batches_in_order():
    L = CopyLedger()
    L.tag = "prefill"
    L.add_sync(100, 0.5)
    L.add_events(1000, _Ev(0.0), _Ev(4.0))
    L.tag = "decode"
    L.add_events(2000, _Ev(4.0), _Ev(10.0, done=False))     # still copying
    L.add_events(3000, _Ev(10.0), _Ev(11.0))                  # done, but behind an unfinished one
    got = L.take(block=False)
    assert got == {"prefill": (1100, pytest.approx(0.504))}
    assert len(L.pending) == 2
    got = L.take(block=True)
    assert got["decode"][0] == 5000 and got["decode"][1] == pytest.approx(0.007)
    assert L.pending == [] and L.take() == {}


def test_stage_timer_h2d_per_phase():
    tm = StageTimer()
    tm.add_h2d({"prefill": (10, 0.25), "decode": (30, 0.5)})
    tm.add_h2d({"decode": (5, 0.25)})
    assert tm.totals["decode"]["target.h2d"] == 0.75 and tm.totals["prefill"]["target.h2d"] == 0.25
    assert tm.counters["decode"]["h2d_bytes"] == 35 and tm.counters["prefill"]["h2d_bytes"] == 10


def test_record_h2d_rate_is_decode_bytes_over_decode_busy_time(pair):
    """The achieved rate divides the bytes copied in decode by the copy time of decode alone (the H200 run
    divided all bytes, prefill's included, by decode's copy time: 69 GB/s over a 55 GB/s link)."""
    t, d = pair
    eng = Engine(plan(t, d, batch=3, k=2, m=2, expert_cache_slots=[0, 0, 0]), t, d, prefetch_next_layer="off",
                 prefill_chunk_tokens=4)
    r = eng.generate(ragged_prompts(6, 3), max_new_tokens=6).record
    assert r.h2d_prefill_bytes > 0 and r.h2d_decode_bytes > 0
    assert r.h2d_decode_bytes + r.h2d_prefill_bytes == r.h2d_bytes      # every issued copy finished and counted
    # on a CPU device streaming is a reference to the host row: no copy, so no busy time and no rate
    # (with CUDA the rate is decode bytes over decode busy time: tests/test_engine_gpu.py)
    assert r.h2d_busy_s == pytest.approx(r.stage_totals_s["target.h2d"]) == 0.0
    assert r.h2d_GBps is None and r.h2d_busy_fraction == 0.0
    # decode bytes alone: every decode pass streams all 6 experts of both MoE layers here (no cache, and
    # 3 sequences x (k+1) tokens x top-2 touch them all with this checkpoint) -- counted independently
    E = read_config(t).num_experts
    passes = r.iterations
    per_pass = len(eng.store.streaming_layers) * E * eng.store.expert_bytes
    assert r.h2d_decode_bytes <= passes * per_pass
    assert r.h2d_decode_bytes >= passes * len(eng.store.streaming_layers) * 2 * eng.store.expert_bytes


def test_bad_streaming_mode(pair):
    t, d = pair
    with pytest.raises(SpecError, match="prefetch_next_layer"):
        Engine(plan(t, d), t, d, prefetch_next_layer="sometimes")
    eng = Engine(plan(t, d, expert_cache_slots=[1, 0, 2]), t, d)
    assert eng.expert_streaming() == "off"            # auto on the CPU
    eng.prefetch_next_layer = True
    assert eng.expert_streaming() == "next"


@pytest.mark.parametrize("kind", ["qwen3_moe", "olmoe"])
def test_next_mode_batched_stages_match_per_micro_batch(tmp_path, kind):
    """Mode "next" runs pre_attn/post_attn once per layer over all tokens (QK-norm per head and over the
    whole projection here); greedy output equals the per-micro-batch path ("off") token for token."""
    t, d = make_pair(tmp_path, kind, "qwen3" if kind == "qwen3_moe" else "llama", seed=8, scale=0.9)
    prompts = ragged_prompts(5, 2)
    p = plan(t, d, batch=5, k=3, m=3, expert_cache_slots=[2, 1])
    outs = {}
    for mode in ("off", "next"):
        r = Engine(p, t, d, prefetch_next_layer=mode).generate(prompts, max_new_tokens=8)
        assert r.record.token_flips == 0
        outs[mode] = [o.token_ids for o in r.outputs]
    assert outs["off"] == outs["next"]


@pytest.mark.parametrize("host_io", ["pinned", "zero-copy"])
def test_host_io_paths_same_tokens(pair, host_io):
    """The once-per-layer host transfers of the attention (pinned buffers; zero-copy falls back to a copy
    without CUDA) give the per-micro-batch path's tokens; a pass with device KV rows keeps the direct path."""
    t, d = pair
    prompts = ragged_prompts(6, 3)
    ref = None
    for tgpu in (0, 2):
        p = plan(t, d, batch=4, k=2, m=2, expert_cache_slots=[1, 0, 2], target_kv_gpu_sequences=tgpu)
        base = Engine(p, t, d, prefetch_next_layer="off").generate(prompts, max_new_tokens=8)
        r = Engine(p, t, d, prefetch_next_layer="next", host_io=host_io).generate(prompts, max_new_tokens=8)
        assert [o.token_ids for o in r.outputs] == [o.token_ids for o in base.outputs]
        assert r.record.host_io == host_io and r.record.expert_streaming == "next"
        ref = ref or [o.token_ids for o in base.outputs]
        assert [o.token_ids for o in base.outputs] == ref
    with pytest.raises(SpecError, match="host_io"):
        Engine(p, t, d, host_io="dma")
