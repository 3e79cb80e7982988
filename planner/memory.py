"""Memory footprint on the GPU and the CPU, the batch that fits, and the default placement.

Counted as the engine (runtime/) allocates it:
GPU: the target's non-expert weights; the draft's weights (an EAGLE-style head reads the target's
  embedding and LM head, `shares_target_embeddings`: they are counted once, with the target); expert
  cache slots; streaming buffers (two layers of non-resident experts: double buffering); draft KV of
  the GPU-draft sequences; target KV of the GPU-KV sequences; activations (`activation_bytes`: the
  largest of the engine's passes, with the fp32 logits of all B(k+1) verified tokens, the prefill
  passes and the staging of attention over GPU-resident KV).
CPU: every routed expert (pinned, the source of the H2D stream); target KV of the other sequences;
  draft KV of the CPU-draft sequences; the staging of the CPU attention's inputs and outputs
  (`host_staging_bytes`).

A CPU standing in for the GPU (`shares_host_cpu`): "GPU" and CPU are the same memory, and every byte is
counted once. The expert cache and the streaming buffers are views of (references to) the host store's
rows, not copies, so they take 0 bytes; the rest of the "GPU" part (non-expert weights, the draft, KV
rows on the device side, activations) is host memory too, and the host's footprint is the sum of the
two parts (`Footprint.host_bytes`). `host_components` / `device_components` group a footprint the way
the engine measures its memory (runtime/run_state.py), for the report's predicted-against-measured rows.

KV is budgeted at the positions a row holds (`kv_positions`): the longest context (prompt + output)
plus the k drafts and the 2 tokens the last verify pass writes past it (the engine's kv_capacity).
Memory must hold the last iteration, not the mean one.

Reserves: a plan may use each memory less a fixed reserve in GiB, the same rule on every host; a
hardware spec may set its own (`reserve_GiB` under gpu: or cpu:, hw_specs/README.md):
  GPU 2 GiB (DEFAULT_GPU_RESERVE_GiB): the CUDA context with the libraries' kernel images, cuBLAS
      workspaces and the caching allocator's rounding, none of them in a tensor counted here.
  CPU 6 GiB (DEFAULT_CPU_RESERVE_GiB): firmware and kernel (2.1 GiB of the H200 host's 128 GiB never
      reach MemTotal, 125.9 GiB), the OS (0.7 GiB in use on the idle dev box) and the engine process
      (Python, torch and the CUDA libraries' host images). It is also what the SpecMoEOff deployment
      left on its A30 host: 250 GiB less 84 GiB of pinned experts less 160 GiB of KV.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from specmoe.planner.eagle import check_head_matches
from specmoe.planner.errors import InfeasibleError, SpecError
from specmoe.planner.hardware_spec import HardwareSpec
from specmoe.planner.model_spec import ModelSpec
from specmoe.planner.plan import Placement
from specmoe.planner.workload import Workload

ACT_BYTES = 2                   # activations in bf16/fp16 (the weights' dtype when it is wider)
LOGIT_BYTES = 4                 # logits are converted to fp32
PREFILL_CHUNK_TOKENS = 16384    # tokens of one prefill pass (runtime/speculative.py, prefill_chunk_tokens)
ATTN_CHUNK_ELEMS = 1 << 24      # GPU attention's chunk: K and scores elements per chunk of sequences
                                #   (runtime/model/kv_cache.py, block_attention_torch)
BUSIEST_EXPERT_SHARE = 2.0      # the busiest expert's tokens over the uniform share (the tiny pair's
                                #   held-out routing: 0.207 against 0.125, models/README.md)
GiB = 1024 ** 3


def _g(x: float) -> str:
    return f"{x / GiB:.2f} GiB"


@dataclass(frozen=True)
class Footprint:
    gpu_bytes: float
    cpu_bytes: float
    gpu_capacity_bytes: float
    cpu_capacity_bytes: float
    gpu_usable_bytes: float
    cpu_usable_bytes: float
    gpu_breakdown: dict
    cpu_breakdown: dict
    shares_host: bool = False       # a CPU standing in for the GPU: both parts are host memory

    @property
    def host_bytes(self) -> float:
        """Host memory of the plan: the CPU part, plus the "GPU" part where the CPU stands in for the GPU."""
        return self.cpu_bytes + (self.gpu_bytes if self.shares_host else 0.0)

    @property
    def device_bytes(self) -> float:
        """Device memory of the plan (0 where the CPU stands in for the GPU: it is all host memory)."""
        return 0.0 if self.shares_host else self.gpu_bytes

    @property
    def gpu_fraction(self) -> float:
        return self.gpu_usable_bytes / self.gpu_capacity_bytes

    @property
    def cpu_fraction(self) -> float:
        return self.cpu_usable_bytes / self.cpu_capacity_bytes

    @property
    def gpu_reserve_bytes(self) -> float:
        return self.gpu_capacity_bytes - self.gpu_usable_bytes

    @property
    def cpu_reserve_bytes(self) -> float:
        return self.cpu_capacity_bytes - self.cpu_usable_bytes

    @property
    def fits_gpu(self) -> bool:
        return self.gpu_bytes <= self.gpu_usable_bytes

    @property
    def fits_cpu(self) -> bool:
        return self.cpu_bytes <= self.cpu_usable_bytes

    @property
    def fits(self) -> bool:
        return self.fits_gpu and self.fits_cpu

    def to_dict(self) -> dict:
        return {"gpu_bytes": self.gpu_bytes, "cpu_bytes": self.cpu_bytes,
                "gpu_capacity_bytes": self.gpu_capacity_bytes, "cpu_capacity_bytes": self.cpu_capacity_bytes,
                "gpu_usable_bytes": self.gpu_usable_bytes, "cpu_usable_bytes": self.cpu_usable_bytes,
                "gpu_reserve_bytes": self.gpu_reserve_bytes, "cpu_reserve_bytes": self.cpu_reserve_bytes,
                "gpu_fraction": self.gpu_fraction, "cpu_fraction": self.cpu_fraction,
                "gpu_breakdown": dict(self.gpu_breakdown), "cpu_breakdown": dict(self.cpu_breakdown),
                "shares_host": self.shares_host, "host_bytes": self.host_bytes, "device_bytes": self.device_bytes}

    def check(self, batch: int | None = None, max_fit: int | None = None, placement_given: bool = False) -> None:
        """Raise InfeasibleError naming the memory that overflows, by how much, and what would fix it.
        max_fit: the largest batch that fits with the default placement (named in the fix)."""
        if not self.fits_cpu:
            parts = ", ".join(f"{k} {_g(v)}" for k, v in self.cpu_breakdown.items() if v)
            if self.cpu_breakdown.get("experts_pinned", 0) > self.cpu_usable_bytes:
                fix = ("the pinned experts alone exceed it: use smaller weights (--weight-dtype fp8) "
                       "or a host with more memory (--cpu-mem-GiB)")
            else:
                if max_fit and placement_given:
                    fix = f"keep more draft/target KV off the CPU or lower the batch ({max_fit} fit with the default placement)"
                else:
                    fix = f"use --batch {max_fit} or less" if max_fit else "lower the batch"
                fix += (", a shorter prompt/output, a smaller KV dtype (--kv-dtype fp8), "
                        "or more host memory (--cpu-mem-GiB)")
            raise InfeasibleError("cpu memory", f"needs {_g(self.cpu_bytes)} ({parts}) but "
                                  f"{_g(self.cpu_usable_bytes)} is usable ({_g(self.cpu_capacity_bytes)} less a "
                                  f"{_g(self.cpu_reserve_bytes)} reserve)" + (f" at batch {batch}" if batch else ""),
                                  fix)
        if not self.fits_gpu:
            parts = ", ".join(f"{k} {_g(v)}" for k, v in self.gpu_breakdown.items() if v)
            raise InfeasibleError("gpu memory", f"needs {_g(self.gpu_bytes)} ({parts}) but "
                                  f"{_g(self.gpu_usable_bytes)} is usable ({_g(self.gpu_capacity_bytes)} less a "
                                  f"{_g(self.gpu_reserve_bytes)} reserve)" + (f" at batch {batch}" if batch else ""),
                                  "cache fewer experts, keep less draft/target KV on the GPU, lower the batch, "
                                  "or give more GPU memory (--gpu-mem-GiB)")


def row_positions(context_tokens: int, draft_len: int) -> int:
    """KV positions a sequence's row holds: its longest context (prompt + output), the k drafts the last
    verify pass writes past the accepted ones, and 2 more for its pending and bonus tokens. The engine
    sizes its rows with this too (runtime/model/kv_cache.py, kv_capacity)."""
    return int(context_tokens) + int(draft_len) + 2


def kv_positions(workload: Workload, draft_len: int = 0) -> int:
    """row_positions at the workload's longest context."""
    return row_positions(workload.max_context, draft_len)


def kv_bytes_per_sequence(model: ModelSpec, workload: Workload, draft_len: int = 0) -> float:
    """Target KV of one sequence's row (kv_positions)."""
    return model.kv_bytes_per_token(workload.kv_bytes_per_elem) * kv_positions(workload, draft_len)


def draft_kv_bytes_per_sequence(draft: ModelSpec | None, workload: Workload, draft_len: int = 0) -> float:
    if draft is None:
        return 0.0
    return draft.kv_bytes_per_token(workload.kv_bytes_per_elem) * kv_positions(workload, draft_len)


def shares_target_embeddings(model: ModelSpec, draft: ModelSpec | None) -> bool:
    """Whether `draft` is an EAGLE-style head over `model`, which embeds tokens and projects to the vocabulary
    with the target's own weights: an EAGLE head (planner/eagle.py), or one dense decoder layer of the
    target's width and vocabulary (the `*-eagle` presets)."""
    if draft is not None and draft.eagle:
        return True
    return (draft is not None and not draft.is_moe and draft.num_layers == 1 and draft.hidden == model.hidden
            and draft.vocab_size == model.vocab_size)


def draft_weight_elems(model: ModelSpec, draft: ModelSpec) -> int:
    """The draft's weights on the GPU beyond the target's (an EAGLE-style head's embedding and LM head
    are the target's)."""
    n = draft.total_params
    if shares_target_embeddings(model, draft):
        n -= draft.embed_elems + draft.lm_head_elems
    return n


def _act_bytes(workload: Workload) -> int:
    return max(ACT_BYTES, workload.weight_bytes_per_elem)


def _pass_elems(spec: ModelSpec, tokens: float) -> float:
    """Activation elements of one forward pass over `tokens` tokens at its largest point: the residual
    stream and its update, plus the larger of the attention side (normed input, q/k/v, the attention
    output, the o-projection) and the FFN side (normed input, the routed tokens' copies in and out,
    the combined output, the shared expert, and the SwiGLU intermediates of the busiest expert). The
    engine runs pre/post attention over the whole pass when it streams ahead, and the routed experts
    over all micro-batches' tokens always, so the micro-batch count does not lower this."""
    h = spec.hidden
    attn = 2 * h + (2 * spec.num_q_heads + 2 * spec.num_kv_heads) * spec.head_dim
    dense = 2 * h + 3 * spec.dense_intermediate
    ffn = dense if spec.num_dense_layers else 0
    if spec.is_moe:
        busiest = min(1.0, BUSIEST_EXPERT_SHARE * spec.top_k / spec.num_experts)
        ffn = max(ffn, (2 + 2 * spec.top_k) * h + 3 * busiest * spec.expert_intermediate
                  + 3 * spec.shared_expert_intermediate)
    return tokens * (2 * h + max(attn, ffn))


def _gpu_attention_staging(spec: ModelSpec, rows: int, n: int, keys: int, kv_bytes: int) -> float:
    """Bytes of attention over GPU-resident KV (block_attention_torch) for `rows` sequences of `n` new
    tokens against `keys` keys: one chunk of sequences (at most ATTN_CHUNK_ELEMS elements of K and of
    the scores, or one sequence) with K and V gathered and in fp32, two score-sized fp32 tensors and the
    mask; and the fp32 output of all rows."""
    if rows <= 0 or n <= 0:
        return 0.0
    hkv, d = spec.num_kv_heads, spec.head_dim
    per_k, per_s = hkv * keys * d, hkv * spec.group_size * n * keys
    step = min(rows, max(1, ATTN_CHUNK_ELEMS // max(per_k, per_s)))
    chunk = step * (per_k * (2 * LOGIT_BYTES + kv_bytes) + 2 * per_s * LOGIT_BYTES + n * keys)
    return float(chunk + rows * n * spec.num_q_heads * d * LOGIT_BYTES)


def _prefill_pass(workload: Workload, batch: int, positions: int) -> tuple[int, int, int]:
    """(sequences, tokens, prompt length) of the engine's largest prefill pass: whole prompts up to
    PREFILL_CHUNK_TOKENS tokens (a longer prompt gets a pass of its own). A prompt is at most the
    row's positions (the engine sizes rows for the prompts it has)."""
    prompt = max(1, min(workload.prompt_len, positions))
    rows = min(batch, max(1, PREFILL_CHUNK_TOKENS // prompt))
    return rows, rows * prompt, prompt


def activation_bytes(model: ModelSpec, workload: Workload, batch: int, draft_len: int,
                     draft: ModelSpec | None = None, context: int | None = None) -> float:
    """GPU activations: the largest of the engine's passes (their buffers are reused, not added).
      verify: the target's pass over N = B(k+1) tokens with the staging of attention over GPU KV rows,
        then its LM head: the logits of all N tokens at once, in the activation dtype and in fp32;
      prefill: the target's (and the draft's) largest prefill pass, and the staging of its attention;
      draft: one draft step over up to 2 tokens per sequence (the catch-up step), its staging and the
        logits of the B sequences.
    The staging of attention over GPU-resident KV is counted as if every row were on the GPU (an upper
    bound that does not depend on the placement, so the optimizer's memory rows match this footprint).
    context: KV positions per row (default kv_positions)."""
    B, k = int(batch), int(draft_len)
    if B <= 0:
        return 0.0
    a, kvb = _act_bytes(workload), workload.kv_bytes_per_elem
    S = kv_positions(workload, k) if context is None else int(context)
    rows_p, tok_p, P = _prefill_pass(workload, B, S)
    to_fp32 = LOGIT_BYTES + (a if a < LOGIT_BYTES else 0)      # the GEMM's output, then its fp32 copy
    router = LOGIT_BYTES * model.num_experts                  # fp32 routing probabilities per token
    n = B * (k + 1)
    verify = max(a * _pass_elems(model, n) + n * router + _gpu_attention_staging(model, B, k + 1, S, kvb),
                 a * 2 * n * model.hidden + n * model.vocab_size * to_fp32)
    prefill = (a * _pass_elems(model, tok_p) + tok_p * router + _gpu_attention_staging(model, rows_p, P, P, kvb)
               + rows_p * model.vocab_size * to_fp32)
    phases = [verify, prefill]
    if draft is not None and k > 0:
        phases.append(a * _pass_elems(draft, 2 * B) + _gpu_attention_staging(draft, B, 2, S, kvb)
                      + B * draft.vocab_size * to_fp32)
        phases.append(a * _pass_elems(draft, tok_p) + _gpu_attention_staging(draft, rows_p, P, P, kvb)
                      + rows_p * draft.vocab_size * to_fp32)
    return float(max(phases))


def host_staging_bytes(model: ModelSpec, workload: Workload, batch: int, draft_len: int,
                       context: int | None = None) -> float:
    """CPU bytes of the CPU attention's inputs and outputs over the largest pass (a verify pass of
    B(k+1) tokens or a prefill pass): q, k and v copied to (pinned) host memory, the verify kernel's
    fp32 queries and output, the output in the activation dtype and its pinned copy back. Pinned
    buffers stay with torch's caching host allocator after use. Counted as if every row were on the
    CPU. context: KV positions per row (default kv_positions)."""
    B = int(batch)
    if B <= 0:
        return 0.0
    a = _act_bytes(workload)
    S = kv_positions(workload, draft_len) if context is None else int(context)
    tokens = max(B * (int(draft_len) + 1), _prefill_pass(workload, B, S)[1])
    q, kv = model.num_q_heads * model.head_dim, 2 * model.num_kv_heads * model.head_dim
    return float(tokens * ((q + kv) * a + q * (2 * LOGIT_BYTES + 2 * a)))


def _streaming_layers(model: ModelSpec, placement: Placement) -> list[int]:
    cpu = set(placement.cpu_expert_layers)
    return [i for i in model.moe_layers if i not in cpu and placement.expert_cache_slots[i] < model.num_experts]


def footprint(model: ModelSpec, hw: HardwareSpec, workload: Workload, batch: int, draft_len: int,
              placement: Placement, draft: ModelSpec | None = None, micro_batches: int = 1,
              context: int | None = None) -> Footprint:
    """GPU and CPU bytes of one configuration, with a breakdown of each. context: KV positions per
    sequence (default kv_positions; the engine passes the rows it allocates). batch 0 gives what does
    not depend on the batch (weights, expert cache, streaming buffers). micro_batches does not change
    the footprint (see _pass_elems); it is accepted so callers can pass a configuration whole."""
    if len(placement.expert_cache_slots) != model.num_layers:
        raise SpecError("placement.expert_cache_slots", f"has {len(placement.expert_cache_slots)} entries, "
                        f"the model has {model.num_layers} layers", "give one entry per layer")
    wb = workload.weight_bytes_per_elem
    eb = model.expert_elems * wb
    use_draft = draft is not None and draft_len > 0
    S = kv_positions(workload, draft_len) if context is None else int(context)
    kv_t = model.kv_bytes_per_token(workload.kv_bytes_per_elem) * S
    kv_d = draft.kv_bytes_per_token(workload.kv_bytes_per_elem) * S if use_draft else 0.0
    tg = min(placement.target_kv_gpu_sequences, batch)
    dg = min(placement.draft_kv_gpu_sequences, batch) if use_draft else 0
    moe = set(model.moe_layers)
    cached = sum(c for i, c in enumerate(placement.expert_cache_slots) if i in moe)
    stream = _streaming_layers(model, placement)
    buf = max(1, placement.streaming_buffers) * max(
        (model.num_experts - placement.expert_cache_slots[i] for i in stream), default=0) * eb
    shared = bool(hw.gpu.shares_host_cpu)
    if shared:                      # cache and buffers are views of the host store's rows: no bytes of their own
        cached, buf = 0, 0.0
    gpu = {
        "target_non_expert_weights": model.non_expert_elems * wb,
        "draft_weights": draft_weight_elems(model, draft) * wb if use_draft else 0.0,
        "expert_cache": cached * eb,
        "streaming_buffers": float(buf),
        "draft_kv": dg * kv_d,
        "target_kv": tg * kv_t,
        "activations": activation_bytes(model, workload, batch, draft_len, draft if use_draft else None, S),
    }
    cpu = {
        "experts_pinned": model.routed_expert_elems_total * wb,
        "target_kv": (batch - tg) * kv_t,
        "draft_kv": (batch - dg) * kv_d,
        "attention_staging": host_staging_bytes(model, workload, batch, draft_len, S),
    }
    return Footprint(gpu_bytes=float(sum(gpu.values())), cpu_bytes=float(sum(cpu.values())),
                     gpu_capacity_bytes=hw.gpu.mem_bytes, cpu_capacity_bytes=hw.cpu.mem_bytes,
                     gpu_usable_bytes=hw.gpu.usable_bytes, cpu_usable_bytes=hw.cpu.usable_bytes,
                     gpu_breakdown={k: float(v) for k, v in gpu.items()},
                     cpu_breakdown={k: float(v) for k, v in cpu.items()}, shares_host=shared)


# the engine's measured components (runtime/run_state.py) -> the footprint's entries, "GPU" part and CPU part
HOST_COMPONENTS = {"experts": ((), ("experts_pinned",)),
                   "non_expert_weights": (("target_non_expert_weights",), ()),
                   "target_kv": (("target_kv",), ("target_kv",)),
                   "draft": (("draft_weights", "draft_kv"), ("draft_kv",)),
                   "activations": (("activations",), ("attention_staging",))}
DEVICE_COMPONENTS = {"non_expert_weights": ("target_non_expert_weights",),
                     "experts": ("expert_cache", "streaming_buffers"),
                     "target_kv": ("target_kv",), "draft": ("draft_weights", "draft_kv"),
                     "activations": ("activations",)}


def host_components(fp: dict) -> dict[str, float]:
    """Host bytes of a footprint (its to_dict()) by the engine's components: experts, non-expert weights,
    target KV, the draft (weights and KV) and activations (with the CPU attention's staging). The "GPU"
    part counts only where it is host memory (shares_host); a component that is 0 is left out."""
    g, c, shared = fp.get("gpu_breakdown") or {}, fp.get("cpu_breakdown") or {}, bool(fp.get("shares_host"))
    out = {}
    for name, (gk, ck) in HOST_COMPONENTS.items():
        v = sum(float(c.get(k, 0.0)) for k in ck) + (sum(float(g.get(k, 0.0)) for k in gk) if shared else 0.0)
        if v > 0:
            out[name] = v
    return out


def device_components(fp: dict) -> dict[str, float]:
    """Device bytes of a footprint (its to_dict()) by the engine's components; {} where the CPU stands in
    for the GPU (its "GPU" part is host memory: host_components)."""
    if fp.get("shares_host"):
        return {}
    g = fp.get("gpu_breakdown") or {}
    out = {name: sum(float(g.get(k, 0.0)) for k in keys) for name, keys in DEVICE_COMPONENTS.items()}
    return {k: v for k, v in out.items() if v > 0}


def default_placement(model: ModelSpec, hw: HardwareSpec, workload: Workload, batch: int, draft_len: int = 0,
                      draft: ModelSpec | None = None, micro_batches: int = 2,
                      streaming_buffers: int = 2) -> Placement:
    """Target KV on the CPU; draft KV on the GPU for as many sequences as fit (draft data first: the
    draft runs k times per iteration); then as many expert cache slots per MoE layer as fit in what
    is left (uniform, the remainder one extra slot on the first layers); where the CPU stands in for the
    GPU the cache is free (views of the host store), so every expert is cached. Never raises: a placement
    that cannot fit is caught by `footprint(...).check()`."""
    L, E = model.num_layers, model.num_experts
    empty = Placement(expert_cache_slots=(0,) * L, streaming_buffers=streaming_buffers)
    use_draft = draft is not None and draft_len > 0
    if hw.gpu.shares_host_cpu:      # the cache is views of the host store: every expert cached, nothing streams
        g = batch if use_draft else 0
        slots = tuple(E if i in set(model.moe_layers) else 0 for i in range(L))
        return Placement(expert_cache_slots=slots, target_kv_gpu_sequences=0, draft_kv_gpu_sequences=g,
                         streaming_buffers=streaming_buffers)
    base = footprint(model, hw, workload, batch, draft_len, empty, draft if use_draft else None, micro_batches)
    free = base.gpu_usable_bytes - base.gpu_bytes          # streaming buffers at c = 0 included
    g = 0
    if use_draft:
        kv_d = draft_kv_bytes_per_sequence(draft, workload, draft_len)
        g = max(0, min(batch, int(max(free, 0.0) // kv_d))) if kv_d > 0 else batch
        free -= g * kv_d
    slots = [0] * L
    n_moe = len(model.moe_layers)
    if E and n_moe:
        eb = model.expert_elems * workload.weight_bytes_per_elem
        nb = max(1, streaming_buffers)
        avail = free + nb * E * eb            # give back the c = 0 buffers, then charge them at c
        c = _uniform_slots(E, n_moe, nb, eb, avail)
        left = avail - c * n_moe * eb - (nb * (E - c) * eb if c < E else 0)
        extra = 0 if c >= E else max(0, min(n_moe, int(left // eb)))
        for idx, layer in enumerate(model.moe_layers):
            slots[layer] = c + (1 if idx < extra else 0)
    return Placement(expert_cache_slots=tuple(slots), target_kv_gpu_sequences=0, draft_kv_gpu_sequences=g,
                     streaming_buffers=streaming_buffers)


def check_context(model: ModelSpec, workload: Workload, draft: ModelSpec | None = None) -> None:
    """Refuse a workload whose sequences outgrow a model's positions (prompt + output beyond
    max_position_embeddings): its outputs past that point would be silently wrong; and an EAGLE head that
    does not fit the target (planner/eagle.py)."""
    if draft is not None:
        check_head_matches(model, draft)
    n = workload.prompt_len + workload.gen_len
    for m in (model, draft):
        if m is not None and n > m.max_position_embeddings:
            raise SpecError("gen_len", f"prompt_len ({workload.prompt_len}) + gen_len ({workload.gen_len}) = {n} "
                            f"exceeds {m.name}'s max_position_embeddings {m.max_position_embeddings}",
                            "shorten the prompts or the outputs")


def _uniform_slots(E: int, n_moe: int, nb: int, eb: float, avail: float) -> int:
    """The most expert cache slots c in 0..E per MoE layer whose bytes fit `avail`:
        need(c) = c n_moe eb + nb (E - c) eb   (c < E: nb layers' buffers stream the E - c others)
        need(E) = E n_moe eb                    (nothing streams)
    need is linear over 1..E-1 (slope (n_moe - nb) eb), so c is solved for, not searched."""
    def need(c: int) -> float:
        return c * n_moe * eb + (nb * (E - c) * eb if c < E else 0.0)

    if need(E) <= avail:
        return E
    if E == 1:
        return 0
    if n_moe <= nb:                         # need does not grow with c: E - 1 fits if anything does
        return E - 1 if need(E - 1) <= avail else 0
    c = max(0, min(E - 1, int((avail - nb * E * eb) // ((n_moe - nb) * eb))))
    for _ in range(3):                      # float rounding: a step either way at most
        if c > 0 and need(c) > avail:
            c -= 1
        elif c + 1 < E and need(c + 1) <= avail:
            c += 1
    return c if c > 0 and need(c) <= avail else 0


def max_batch(model: ModelSpec, hw: HardwareSpec, workload: Workload, draft: ModelSpec | None = None,
              draft_len: int = 0, micro_batches: int = 2, cpu_kv_budget_bytes: float | None = None) -> int:
    """The most sequences that fit with the default placement (the paper's rule: b = CPU memory left
    for KV / KV per sequence, here with the KV row as the engine allocates it and the CPU attention's
    staging counted), with draft KV on the GPU first and the GPU's activations checked too.
    cpu_kv_budget_bytes replaces "CPU memory left for KV" (usable CPU memory less the pinned experts
    and the staging) when given.

    Raises InfeasibleError when not even one sequence fits."""
    use_draft = draft is not None and draft_len > 0
    kv_t = kv_bytes_per_sequence(model, workload, draft_len)

    def fits(b: int) -> tuple[bool, Footprint]:
        pl = default_placement(model, hw, workload, b, draft_len, draft, min(micro_batches, b))
        fp = footprint(model, hw, workload, b, draft_len, pl, draft if use_draft else None, min(micro_batches, b))
        if cpu_kv_budget_bytes is not None:
            ok_cpu = fp.cpu_breakdown["target_kv"] + fp.cpu_breakdown["draft_kv"] <= cpu_kv_budget_bytes
        else:
            ok_cpu = fp.fits_cpu
        return ok_cpu and fp.fits_gpu, fp

    ok, fp = fits(1)
    if not ok:
        if cpu_kv_budget_bytes is not None and fp.fits_gpu:
            raise InfeasibleError("cpu memory", f"one sequence needs {_g(kv_t)} of KV but the KV budget is "
                                  f"{_g(cpu_kv_budget_bytes)}", "shorten the prompt/output or raise the budget")
        fp.check(batch=1)
    if cpu_kv_budget_bytes is not None:
        hi = int(cpu_kv_budget_bytes // kv_t) + 1
    else:
        hi = int(max(0.0, fp.cpu_usable_bytes - fp.cpu_breakdown["experts_pinned"]) // kv_t) + 1
    hi = max(hi, 2)
    lo = 1                                   # fits(lo) is True, fits(hi) assumed False; check it
    if fits(hi)[0]:
        while fits(hi)[0]:
            lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid)[0]:
            lo = mid
        else:
            hi = mid
    return lo
