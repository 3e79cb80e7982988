"""Routed experts: all in host memory (pinned with CUDA), a device cache per the plan, two streaming
buffers, byte and time accounting.

Each expert is one flat host row [gate (F*H) | up (F*H) | down (H*F)], so streaming it is one copy.
Per MoE layer the device cache holds `cache_slots[layer]` experts: the first ones until routing
statistics exist, then the most-used ones per layer from the counts gathered during prefill
(`rebalance()`). A pass through a layer streams only the non-resident experts its tokens touch,
into one of two buffers used by alternate layers: with CUDA on a separate copy stream, the copies
issued as soon as a micro-batch's routing is known (overlapping the other micro-batches' attention
and the resident experts' compute), with events guarding buffer reuse; on the CPU the copy is
synchronous. Optionally (TargetModel.forward(prefetch=True)) layer i+1's experts are predicted
from layer i's tokens and start streaming while layer i computes; mispredictions cost bytes
(`h2d_unused_experts`), never correctness: missing experts are fetched once the routing is known. Layers in `cpu_expert_layers`
never stream: their non-resident experts compute on the host weights.

Dimensions: E experts, F expert intermediate, H hidden, P = 3*F*H elements per expert.
"""
from __future__ import annotations

import time
from typing import Callable, Iterable

import torch

from .device import host_empty
from .weights import WeightSource


class ExpertStore:
    def __init__(self, src: WeightSource, device: torch.device, dtype: torch.dtype, cache_slots: list[int] | tuple[int, ...],
                 cpu_expert_layers: Iterable[int] = (), streaming_buffers: int = 2,
                 progress: Callable[[int], None] | None = None):
        c = src.config
        self.config, self.device, self.dtype = c, device, dtype
        self.E, self.F, self.H = c.num_experts, c.moe_intermediate, c.hidden
        self.P = 3 * self.F * self.H
        self.cuda = device.type == "cuda"
        self.cpu_layers = set(int(i) for i in cpu_expert_layers)
        if len(cache_slots) != c.num_layers:
            raise ValueError(f"cache_slots has {len(cache_slots)} entries for {c.num_layers} layers")
        self.slots = {l: max(0, min(int(cache_slots[l]), self.E)) for l in c.moe_layers}
        FH = self.F * self.H
        # ---- host store: every expert, pinned when CUDA ----
        self.host: dict[int, torch.Tensor] = {}
        for l in c.moe_layers:
            h = host_empty((self.E, self.P), dtype, pin=self.cuda)  # [E, P]
            for e in range(self.E):
                gate, up, down = src.expert(l, e)
                h[e, :FH].copy_(gate.reshape(-1))
                h[e, FH:2 * FH].copy_(up.reshape(-1))
                h[e, 2 * FH:].copy_(down.reshape(-1))
                if progress:
                    progress(1)
            self.host[l] = h
        # ---- device cache ----
        self.cache: dict[int, torch.Tensor] = {}
        self.cached: dict[int, list[int]] = {}
        self.slot_of: dict[int, dict[int, int]] = {}
        for l in c.moe_layers:
            n = self.slots[l]
            self.cache[l] = torch.empty((n, self.P), dtype=dtype, device=device)  # [slots, P]
            self.cached[l] = list(range(n))
            self.slot_of[l] = {e: i for i, e in enumerate(self.cached[l])}
            if n:
                self.cache[l].copy_(self.host[l][:n])
        self.cache_fill_bytes = sum(self.slots.values()) * self.P * self.host_elem_bytes
        # ---- streaming buffers (each holds one layer's non-resident experts) ----
        need = max([self.E - self.slots[l] for l in c.moe_layers if l not in self.cpu_layers] or [0])
        self.num_buffers = max(1, int(streaming_buffers)) if need else 0
        self.buffers = [torch.empty((need, self.P), dtype=dtype, device=device) for _ in range(self.num_buffers)]
        self.buffer_capacity = need
        self._buf_of_layer: dict[int, int] = {}
        self._streamed: dict[int, dict[int, int]] = {}
        self._used: dict[int, set[int]] = {}
        self._next_buf = 0
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self._buf_free_event = [None] * self.num_buffers   # compute done with the buffer's last layer
        self._copy_done: dict[int, object] = {}            # layer -> event after its latest copy
        self._pending_timing: list[tuple[object, object]] = []
        # ---- accounting ----
        self.h2d_bytes = 0
        self.h2d_experts = 0
        self.h2d_unused_experts = 0     # streamed (prefetched on a prediction) but not used by the layer
        self._h2d_time_s = 0.0
        self.routing_counts = {l: torch.zeros(self.E, dtype=torch.int64) for l in c.moe_layers}
        self.has_statistics = False

    @property
    def host_elem_bytes(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @staticmethod
    def device_bytes(cfg, cache_slots, cpu_expert_layers, elem_bytes: int, streaming_buffers: int = 2) -> int:
        P = 3 * cfg.hidden * cfg.moe_intermediate
        cached = sum(min(int(cache_slots[l]), cfg.num_experts) for l in cfg.moe_layers)
        need = max([cfg.num_experts - min(int(cache_slots[l]), cfg.num_experts)
                    for l in cfg.moe_layers if l not in set(cpu_expert_layers)] or [0])
        return (cached + (streaming_buffers if need else 0) * need) * P * elem_bytes

    def split(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A flat expert row -> (gate_up [2F, H], down [H, F]) views."""
        FH = self.F * self.H
        return flat[:2 * FH].view(2 * self.F, self.H), flat[2 * FH:].view(self.H, self.F)

    # ---- one pass through a layer ----
    def begin_layer(self, layer: int) -> None:
        """Claim the next streaming buffer for `layer` (its copies wait until the buffer's previous layer is
        done). Idempotent: a layer begun early for prefetching keeps its buffer."""
        if layer in self._streamed:
            return
        self._streamed[layer] = {}
        self._used[layer] = set()
        if self.num_buffers == 0 or layer in self.cpu_layers or self.slots[layer] >= self.E:
            return
        b = self._next_buf
        self._next_buf = (b + 1) % self.num_buffers
        self._buf_of_layer[layer] = b
        if self.cuda and self._buf_free_event[b] is not None:
            self.copy_stream.wait_event(self._buf_free_event[b])

    def fetch(self, layer: int, experts: Iterable[int]) -> None:
        """Stream the non-resident experts among `experts` that this pass has not streamed yet."""
        if layer in self.cpu_layers or layer not in self._buf_of_layer:
            return
        todo = [e for e in experts if e not in self.slot_of[layer] and e not in self._streamed[layer]]
        if not todo:
            return
        buf = self.buffers[self._buf_of_layer[layer]]
        streamed = self._streamed[layer]
        host = self.host[layer]
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(self.copy_stream):
                start.record(self.copy_stream)
                for e in todo:
                    i = len(streamed)
                    streamed[e] = i
                    buf[i].copy_(host[e], non_blocking=True)
                end.record(self.copy_stream)
            self._copy_done[layer] = end
            self._pending_timing.append((start, end))
        else:
            t0 = time.perf_counter()
            for e in todo:
                i = len(streamed)
                streamed[e] = i
                buf[i].copy_(host[e])
            self._h2d_time_s += time.perf_counter() - t0
        self.h2d_bytes += len(todo) * self.P * self.host_elem_bytes
        self.h2d_experts += len(todo)

    def weights(self, layer: int, e: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(gate_up [2F, H], down [H, F], on_host) for expert e of `layer`, waiting for its copy if streamed."""
        s = self.slot_of[layer].get(e)
        if s is not None:
            return (*self.split(self.cache[layer][s]), False)
        i = self._streamed.get(layer, {}).get(e)
        if i is not None:
            self._used[layer].add(e)
            if self.cuda and layer in self._copy_done:
                torch.cuda.current_stream(self.device).wait_event(self._copy_done.pop(layer))
            return (*self.split(self.buffers[self._buf_of_layer[layer]][i]), False)
        if layer in self.cpu_layers:
            return (*self.split(self.host[layer][e]), True)
        raise RuntimeError(f"expert {e} of layer {layer} was neither cached nor fetched")

    def end_layer(self, layer: int) -> None:
        """The layer's compute is issued: its buffer may be reused once that compute finishes."""
        b = self._buf_of_layer.pop(layer, None)
        streamed = self._streamed.pop(layer, {})
        self.h2d_unused_experts += len(set(streamed) - self._used.pop(layer, set()))
        if b is not None and self.cuda:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            self._buf_free_event[b] = ev

    def take_h2d_time(self) -> float:
        """Seconds the copies took since the last call (CUDA events: synchronizes on them)."""
        t = self._h2d_time_s
        for start, end in self._pending_timing:
            end.synchronize()
            t += start.elapsed_time(end) / 1e3
        self._pending_timing.clear()
        self._h2d_time_s = 0.0
        return t

    # ---- statistics and cache choice ----
    def record_routing(self, layer: int, topk_ids: torch.Tensor) -> None:
        self.routing_counts[layer] += torch.bincount(topk_ids.reshape(-1).to("cpu"), minlength=self.E)
        self.has_statistics = True

    def rebalance(self) -> int:
        """Cache the most-used experts per layer (ties: lower id); returns bytes copied."""
        moved = 0
        for l in self.config.moe_layers:
            n = self.slots[l]
            if n == 0 or n >= self.E:
                continue
            counts = self.routing_counts[l].tolist()
            want = sorted(range(self.E), key=lambda e: (-counts[e], e))[:n]
            keep = set(want) & set(self.cached[l])
            incoming = [e for e in want if e not in keep]
            free_slots = [s for s, e in enumerate(self.cached[l]) if e not in keep]
            for s, e in zip(free_slots, incoming):
                self.cache[l][s].copy_(self.host[l][e], non_blocking=self.cuda)
                self.cached[l][s] = e
                moved += self.P * self.host_elem_bytes
            self.slot_of[l] = {e: s for s, e in enumerate(self.cached[l])}
        self.cache_fill_bytes += moved
        return moved
