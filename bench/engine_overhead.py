"""The engine's host overhead per decode iteration, measured without a GPU (issue 18).

The engine's real decode iteration (runtime.speculative.SpeculativeDecoder.step over TargetModel,
ExpertStore, DraftModel and SplitKVCache) runs at the shape of the planner's plan for the full
Mixtral-8x7B on the H200 host with a 24 GiB GPU budget (batch 369, k = 8, m = 8, 32 layers, 8 experts
top-2, one cached expert per layer, target KV on the host, the draft's KV on the device, the EAGLE
one-layer draft), with every width shrunk (hidden 64, 8/2 heads of 8, experts of width 64, vocabulary
512) so that arithmetic is negligible and what remains is the host's work: Python and torch dispatch.
Acceptance is the engine's seeded Bernoulli oracle at 0.8 (the rate the plan was made for).

Per iteration it reports the torch operations issued (aten operations, a TorchDispatchMode; of them
the kernels, i.e. not views or allocations; and every torch call per stage, a TorchFunctionMode, as the
calibration counts them), host time (wall time of step() on the CPU), the calls that would synchronise with a GPU
(.tolist(), .item(), copies to the host), and how these grow with batch, k, m and layers; it profiles
one iteration of the plan's shape with cProfile and names the five largest sources (own time).

    python bench/engine_overhead.py [--iterations N] [--quick]

Dimensions: B sequences, k draft tokens, m micro-batches, L target layers.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import time

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

PLAN = {"B": 369, "k": 8, "m": 8, "L": 32}
ALPHA = 0.8
PROMPT_LEN = 16
# the plan's schedule on the H200 host: the next layer's experts stream while this one computes, pre/post
# attention once per layer over the batch, attention per micro-batch (--schedule off: the CPU host's)
SCHEDULE = {"streaming": "next"}
GiB = 2 ** 30
LAUNCH_US = 5.0        # an assumed host cost of one eager CUDA kernel launch, for the estimate line only
# calls that wait for the device on a GPU (or copy device -> host), counted by name
SYNC_NAMES = {"tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero"}
# calls that move a tensor between devices (on this CPU run both ends are host memory): .to(<device>), copy_

TARGET_CFG = {"model_type": "mixtral", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 64,
              "num_hidden_layers": 32, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 8,
              "num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 4096,
              "rope_theta": 1e6, "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False,
              "bos_token_id": 1, "eos_token_id": 2, "sliding_window": None}
DRAFT_CFG = {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 64,
             "num_hidden_layers": 1, "num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": 8,
             "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "hidden_act": "silu",
             "tie_word_embeddings": False, "rope_theta": 1e4, "bos_token_id": 1, "eos_token_id": 2}


def predicted_iteration_s() -> float:
    """The planner's predicted iteration of the plan's shape for the full model on the H200 host
    (24 GiB GPU, 128 GB host, prompt 256, output 128, acceptance 0.8: the GPU bench's full-model plan)."""
    from specmoe.planner import AcceptanceProfile, Workload, estimate, load_hardware

    hw = load_hardware("h200-host").with_overrides(gpu_mem_GiB=24.0, cpu_mem_GiB=128e9 / GiB)
    wl = Workload(prompt_len=256, gen_len=128, acceptance=AcceptanceProfile.from_alpha(ALPHA))
    est = estimate("mixtral-8x7b", hw, wl, draft_len=PLAN["k"], micro_batches=PLAN["m"], batch=PLAN["B"], run=False)
    return est.iteration_time_s


class Counter(TorchFunctionMode):
    """Counts torch calls (per stage of `timer`, when it tracks one) and the calls that would sync on a GPU."""

    def __init__(self, timer=None):
        super().__init__()
        self.timer, self.ops, self.syncs, self.transfers, self.by_stage, self.sync_names = timer, 0, 0, 0, {}, {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        st = getattr(self.timer, "current", "other")
        self.by_stage[st] = self.by_stage.get(st, 0) + 1
        name = getattr(func, "__name__", str(func))
        if name in SYNC_NAMES:
            self.syncs += 1
            self.sync_names[name] = self.sync_names.get(name, 0) + 1
        elif name == "to" and any(isinstance(a, (str, torch.device)) for a in list(args[1:]) + list((kwargs or {}).values())):
            self.transfers += 1
        return func(*args, **(kwargs or {}))


class AtenCounter(TorchDispatchMode):
    """Counts the aten operations torch dispatches (on a GPU: the kernels launched, views included)."""

    NO_KERNEL = ("empty", "empty_strided", "lift_fresh", "detach", "alias", "_to_copy_noop")

    def __init__(self):
        super().__init__()
        self.ops = self.kernels = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        # views and allocations launch nothing on a GPU; the rest are kernels (or host copies)
        if not (getattr(func, "is_view", False) or func.overloadpacket.__name__ in self.NO_KERNEL):
            self.kernels += 1
        return func(*args, **(kwargs or {}))


def _tracking_timer():
    from specmoe.runtime.calibrate.overhead import tracking_timer

    return tracking_timer(torch.device("cpu"), False)


def build(B: int, k: int, m: int, L: int, iterations: int):
    """A prefilled SpeculativeDecoder of the shrunk plan's shape and its sequences."""
    from specmoe.runtime.model.draft import DraftModel
    from specmoe.runtime.model.expert_store import ExpertStore
    from specmoe.runtime.model.kv_cache import SplitKVCache
    from specmoe.runtime.model.target import TargetModel
    from specmoe.runtime.speculative import SpeculativeDecoder
    from specmoe.runtime.weights.sources import WeightSource

    dev, dt = torch.device("cpu"), torch.float32
    src = WeightSource.random(dict(TARGET_CFG, num_hidden_layers=L), seed=0, dtype=dt)
    c = src.config
    store = ExpertStore(src, dev, dt, [1] * L)   # 1 of 8 experts cached per layer, the rest stream
    target = TargetModel(src, store, dev, dt)
    draft = DraftModel(WeightSource.random(DRAFT_CFG, seed=1, dtype=dt), dev, dt) if k else None
    cap = PROMPT_LEN + (iterations + 4) * (k + 1) + k + 4
    tkv = SplitKVCache(L, B, 0, c.num_kv_heads, cap, c.head_dim, dev, dt, dt, decode_kernel=False)
    dkv = None
    if draft is not None:
        dc = draft.config
        dkv = SplitKVCache(dc.num_layers, B, B, dc.num_kv_heads, cap, dc.head_dim, dev, dt, dt, decode_kernel=True)
    timer = _tracking_timer()
    dec = SpeculativeDecoder(target, draft, tkv, dkv, timer, m, eos_ids=(), temperature=0.0, seed=0,
                             oracle_alpha=ALPHA if k else None, prefetch=SCHEDULE["streaming"])
    from specmoe.runtime.calibrate.overhead import random_sequences

    seqs = random_sequences(B, c.vocab_size, PROMPT_LEN, torch.Generator().manual_seed(0))
    dec.prefill(seqs)
    return dec, seqs


def measure(B: int, k: int, m: int, L: int, iterations: int) -> dict:
    """Ops, syncs and host time per iteration (means over `iterations` counted and as many timed)."""
    dec, seqs = build(B, k, m, L, 2 * iterations + 1)
    dec.step(seqs, k)                              # warm-up
    ops, kernels, calls, syncs, transfers, stages, names = [], [], [], [], [], {}, {}
    for _ in range(iterations):
        cm, am = Counter(dec.timer), AtenCounter()
        with cm, am:
            dec.step(seqs, k)
        ops.append(am.ops)
        kernels.append(am.kernels)
        calls.append(cm.ops)
        syncs.append(cm.syncs)
        transfers.append(cm.transfers)
        for st, n in cm.by_stage.items():
            stages[st] = stages.get(st, 0) + n / iterations
        for st, n in cm.sync_names.items():
            names[st] = names.get(st, 0) + n / iterations
    times = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        dec.step(seqs, k)
        times.append(time.perf_counter() - t0)
    return {"B": B, "k": k, "m": m, "L": L, "ops": statistics.fmean(ops), "kernels": statistics.fmean(kernels), "calls": statistics.fmean(calls), "syncs": statistics.fmean(syncs), "transfers": statistics.fmean(transfers),
            "host_ms": 1e3 * statistics.median(times), "stages": stages, "sync_names": names, "dec": dec,
            "seqs": seqs}


def top_sources(run: dict, n: int = 5) -> list[str]:
    """cProfile of one iteration: the n functions with the most own time."""
    dec, seqs = run["dec"], run["seqs"]
    prof = cProfile.Profile()
    prof.enable()
    dec.step(seqs, run["k"])
    prof.disable()
    st = pstats.Stats(prof, stream=io.StringIO())
    rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:n]   # (file, line, func) -> (cc, nc, tt, ct, callers)
    total = sum(v[2] for v in st.stats.values())
    out = []
    for (fname, line, func), (_, ncalls, tt, ct, _) in rows:
        where = f"{os.path.relpath(fname) if fname.startswith('/') else fname}:{line}({func})"
        out.append(f"{1e3 * tt:7.1f} ms own ({100 * tt / total:4.1f}%), {ncalls:6d} calls, {1e3 * ct:7.1f} ms cum  {where}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iterations", type=int, default=3, help="counted and timed iterations per point (default 3)")
    ap.add_argument("--quick", action="store_true", help="only the plan's shape and B=32")
    ap.add_argument("--schedule", choices=("next", "off"), default="next",
                    help="expert streaming schedule: next (the H200 plan's, default) or off (a CPU host's)")
    a = ap.parse_args(argv)
    SCHEDULE["streaming"] = a.schedule
    torch.manual_seed(0)
    torch.set_num_threads(1)      # host overhead is one thread's work; OpenMP teams on a shared machine only add noise
    it = max(1, a.iterations)
    print(f"engine overhead: torch {torch.__version__}, {torch.get_num_threads()} threads, load "
          f"{os.getloadavg()[0]:.2f}; shrunk Mixtral-8x7B (hidden 64, 8 experts top-2, vocab 512), "
          f"1-layer draft, oracle acceptance {ALPHA}, expert streaming {a.schedule!r}", flush=True)
    pred = predicted_iteration_s()
    print(f"planner: full Mixtral-8x7B on h200-host (24 GiB GPU), B={PLAN['B']} k={PLAN['k']} m={PLAN['m']}: "
          f"predicted iteration {1e3 * pred:.1f} ms", flush=True)
    base = (PLAN["B"], PLAN["k"], PLAN["m"], PLAN["L"])
    points = [base, (32, 8, 8, 32)]
    if not a.quick:
        points += [(369, 1, 8, 32), (369, 4, 8, 32), (369, 8, 1, 32), (369, 8, 8, 8)]
    print(f"{'B':>4} {'k':>2} {'m':>2} {'L':>3} {'ops/it':>9} {'kern/it':>8} {'calls/it':>9} {'syncs/it':>9} {'.to/it':>7} {'host ms/it':>11}  torch calls by stage")
    res = {}
    for p in points:
        r = measure(*p, iterations=it)
        res[p] = r
        stages = ", ".join(f"{s} {n:.0f}" for s, n in sorted(r["stages"].items(), key=lambda kv: -kv[1]))
        print(f"{p[0]:4d} {p[1]:2d} {p[2]:2d} {p[3]:3d} {r['ops']:9.1f} {r['kernels']:8.1f} {r['calls']:9.1f} {r['syncs']:9.1f} {r['transfers']:7.1f} {r['host_ms']:11.1f}  "
              f"{stages}", flush=True)
        if p is not base:
            r.pop("dec"), r.pop("seqs")
    big, small = res[base], res[(32, 8, 8, 32)]
    print("sync calls per iteration at B=369: " + ", ".join(f"{n} {c:.0f}" for n, c in
                                                            sorted(big["sync_names"].items(), key=lambda kv: -kv[1])))
    print(f"syncs per iteration: {small['syncs']:.0f} at B=32, {big['syncs']:.0f} at B=369")
    print("five largest sources of host time (cProfile, one iteration at the plan's shape, own time):")
    for line in top_sources(big):
        print("  " + line)
    ratio = big["ops"] / small["ops"]
    print(f"host time at B=32 (the same ops, a ninth of the arithmetic): {small['host_ms']:.1f} ms per iteration "
          f"({100 * small['host_ms'] / (1e3 * pred):.1f}% of the predicted iteration); on this CPU the device is the "
          f"host, so B=369's host time includes the shrunk model's arithmetic (the CPU verify attention above all)")
    print(f"launch estimate for a GPU: {big['kernels']:.0f} kernels x {LAUNCH_US:g} us (an assumed eager CUDA launch "
          f"cost, not measured here) = {big['kernels'] * LAUNCH_US / 1e3:.1f} ms per iteration "
          f"({100 * big['kernels'] * LAUNCH_US / 1e6 / pred:.1f}% of the predicted iteration)")
    print(f"engine-overhead: B={PLAN['B']} k={PLAN['k']} m={PLAN['m']}: {big['ops']:.0f} ops and "
          f"{big['host_ms']:.1f} ms host time per iteration ({100 * big['host_ms'] / (1e3 * pred):.1f}% of the "
          f"predicted H200 iteration); ops at B=32 vs B=369: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
