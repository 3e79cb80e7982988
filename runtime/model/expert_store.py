"""Routed experts: all in host memory (pinned with CUDA), a device cache per the plan, two streaming
buffers, byte and time accounting.

Each expert is one flat host row [gate (F*H) | up (F*H) | down (H*F)], so streaming it is one copy.
Per MoE layer the device cache holds `cache_slots[layer]` experts: the ones the plan names
(`cached_experts`, from the planner's routing statistics), else the first ones; `rebalance()` then
caches the most-used ones per layer from the counts gathered during prefill, when the engine is
asked to. A pass through a layer streams only the non-resident experts, into one of two
buffers (double buffering): with CUDA on a separate copy stream, with events guarding buffer reuse
(a buffer's next copies wait for the compute that read it) and compute waiting for the copies
(`weights()`); on the CPU the copy is synchronous. When the copies are issued is the caller's
schedule (TargetModel.forward, mode "next" by default on CUDA): `prefetch_layer(l)` streams every
non-resident expert of layer l ahead of its routing (layer i+1 while layer i computes; the first
layer between passes, over lm_head, acceptance and the draft phase); `fetch(l, experts)` streams
what routing touched and was not streamed yet. Experts streamed but not used by the pass are
counted (`h2d_unused_experts`), never a correctness matter. Layers in `cpu_expert_layers` never
stream: their non-resident experts compute on the host weights.

Host memory: every layer's rows not reused from another store live in one allocation of exactly their
bytes (runtime.host_region: one anonymous mapping, each layer page-aligned), with CUDA page-locked by one
cudaHostRegister, not torch's pinned allocator, which rounds each layer up to a power of two (+42% for a
Mixtral-8x7B layer); `host_allocation_bytes()` reads what the allocations hold.

Nothing is held twice. On a CPU device (the CPU standing in for the GPU) the "device" is host memory:
the cache slots and the streaming buffers are references to the host store's rows (views, no bytes of
their own), and "streaming" an expert puts a reference in the buffer: the schedule (which experts are
streamed when, the trace, the streamed-expert counts) is the GPU's, but no byte is copied
(`copied_bytes` stays 0 and the ledger's entries take 0 s), as the planner costs it (shares_host_cpu:
t_h2d = 0). With CUDA the pinned host store is the only host copy of the experts. The host store is
filled from the weight source one layer at a time, and `src.release()` after each layer drops what
the source holds of it (mapped checkpoint pages).

Accounting (`take_h2d`): each batch of streamed experts is one ledger entry (bytes, busy seconds); with CUDA
the seconds are CUDA events recorded on the copy stream around the batch, so they are the time the
copy stream was busy with it (batches on one stream never overlap). Entries are taken when they
have finished, so bytes and seconds always go together: achieved GB/s = bytes / busy seconds.

`trace` (a list, off by default) records the schedule for tests: ("begin", layer, buffer),
("copy", layer, expert, buffer, index), ("wait", layer), ("end", layer, buffer, unused),
("drop", layer, buffer, unused).

Dimensions: E experts, F expert intermediate, H hidden, P = 3*F*H elements per expert.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from specmoe.runtime.host_region import host_region
from specmoe.runtime.weights.sources import WeightSource


class CopyLedger:
    """Finished copy batches -> bytes and busy seconds per tag (the phase that issued them). An entry is
    (tag, bytes, seconds) when the copy was synchronous, or (tag, bytes, start, end) with CUDA events
    (anything with query/synchronize/elapsed_time) recorded on one stream around the batch: entries
    finish in order, so take() stops at the first unfinished one."""

    def __init__(self):
        self.pending: list[tuple] = []
        self.tag = "decode"

    def add_sync(self, nbytes: int, seconds: float) -> None:
        self.pending.append((self.tag, int(nbytes), float(seconds)))

    def add_events(self, nbytes: int, start, end) -> None:
        self.pending.append((self.tag, int(nbytes), start, end))

    def take(self, block: bool = False) -> dict[str, tuple[int, float]]:
        """{tag: (bytes, seconds)} of the entries finished since the last take; block: wait for all."""
        out: dict[str, tuple[int, float]] = {}
        done = 0
        for ent in self.pending:
            if len(ent) == 4:
                tag, b, start, end = ent
                if block:
                    end.synchronize()
                elif not end.query():
                    break
                secs = start.elapsed_time(end) / 1e3
            else:
                tag, b, secs = ent
            nb, ns = out.get(tag, (0, 0.0))
            out[tag] = (nb + b, ns + secs)
            done += 1
        del self.pending[:done]
        return out


def fill_layer_rows(src: WeightSource, layer: int, rows: torch.Tensor, progress=None) -> torch.Tensor:
    """Copy `layer`'s experts from the source into rows [E, P] (each [gate | up | down] flat), expert by
    expert; the source then releases what it holds of the layer. Returns rows."""
    F, H = src.config.moe_intermediate, src.config.hidden
    FH = F * H
    for e in range(rows.shape[0]):
        gate, up, down = src.expert(layer, e)
        rows[e, :FH].copy_(gate.reshape(-1))
        rows[e, FH:2 * FH].copy_(up.reshape(-1))
        rows[e, 2 * FH:].copy_(down.reshape(-1))
        del gate, up, down
        if progress:
            progress(1)
    src.release()
    return rows


def layer_rows(src: WeightSource, layer: int, dtype: torch.dtype, register: bool) -> torch.Tensor:
    """One layer's host rows [E, P] in an allocation of their own (page-locked when `register`), e.g. one
    layer's experts to stand for every layer's in a bandwidth benchmark (ExpertStore(host=...))."""
    c = src.config
    E, P = c.num_experts, 3 * c.moe_intermediate * c.hidden
    return fill_layer_rows(src, layer, host_region({0: E * P}, dtype, register)[0].view(E, P))


def initial_experts(planned: Iterable[int], slots: int, num_experts: int) -> list[int]:
    """The experts a layer's cache starts with: the planned ones (at most `slots`), then the lowest ids
    not planned, up to `slots`."""
    out = [int(e) for e in planned][:slots]
    if any(not 0 <= e < num_experts for e in out) or len(set(out)) != len(out):
        raise ValueError(f"cached experts {out} are not distinct ids in [0, {num_experts})")
    rest = (e for e in range(num_experts) if e not in set(out))
    return out + [next(rest) for _ in range(slots - len(out))]


class ExpertStore:
    def __init__(self, src: WeightSource, device: torch.device, dtype: torch.dtype, cache_slots: list[int] | tuple[int, ...],
                 cpu_expert_layers: Iterable[int] = (), streaming_buffers: int = 2,
                 progress: Callable[[int], None] | None = None, host: dict[int, torch.Tensor] | None = None,
                 cached_experts: tuple[tuple[int, ...], ...] = ()):
        """host: the host rows of another store of the same weights ({layer: [E, P]}, e.g. a previous
        engine's `store.host`) to reuse instead of reading and pinning the experts again.
        cached_experts: per layer, the experts the cache starts with (a plan's placement.cached_experts;
        () = the first cache_slots[layer] of each layer)."""
        c = src.config
        self.config, self.device, self.dtype = c, device, dtype
        self.E, self.F, self.H = c.num_experts, c.moe_intermediate, c.hidden
        self.P = 3 * self.F * self.H
        self.cuda = device.type == "cuda"
        self.shares_host = not self.cuda      # the device is host memory: cache and buffers reference host rows
        self.cpu_layers = set(int(i) for i in cpu_expert_layers)
        if len(cache_slots) != c.num_layers:
            raise ValueError(f"cache_slots has {len(cache_slots)} entries for {c.num_layers} layers")
        self.slots = {l: max(0, min(int(cache_slots[l]), self.E)) for l in c.moe_layers}
        # ---- host store: every expert, in one allocation page-locked with CUDA ----
        self.host: dict[int, torch.Tensor] = self._host_store(src, host or {}, progress)
        # ---- device cache: [slots, P] on CUDA; on the CPU a list of views of the host rows ----
        self.cache: dict[int, torch.Tensor | list[torch.Tensor]] = {}
        self.cached: dict[int, list[int]] = {}
        self.slot_of: dict[int, dict[int, int]] = {}
        for l in c.moe_layers:
            n = self.slots[l]
            self.cached[l] = initial_experts(cached_experts[l] if cached_experts else (), n, self.E)
            self.slot_of[l] = {e: i for i, e in enumerate(self.cached[l])}
            if self.shares_host:
                self.cache[l] = [self.host[l][e] for e in self.cached[l]]
                continue
            self.cache[l] = torch.empty((n, self.P), dtype=dtype, device=device)  # [slots, P]
            if n:
                self.cache[l].copy_(self.host[l][torch.tensor(self.cached[l], dtype=torch.int64)])
        self.cache_fill_bytes = 0 if self.shares_host else sum(self.slots.values()) * self.P * self.host_elem_bytes
        # ---- streaming buffers (each holds one layer's non-resident experts; on the CPU references) ----
        need = max([self.E - self.slots[l] for l in c.moe_layers if l not in self.cpu_layers] or [0])
        self.num_buffers = max(1, int(streaming_buffers)) if need else 0
        self.buffers = [[None] * need if self.shares_host else torch.empty((need, self.P), dtype=dtype, device=device)
                        for _ in range(self.num_buffers)]
        self.buffer_capacity = need
        self._split_views: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}   # see _views
        self.streaming_layers = [l for l in c.moe_layers if l not in self.cpu_layers and self.slots[l] < self.E
                                 and self.num_buffers]
        self._buf_of_layer: dict[int, int] = {}
        self._streamed: dict[int, dict[int, int]] = {}
        self._used: dict[int, set[int]] = {}
        self._next_buf = 0
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self._buf_free_event = [None] * self.num_buffers   # compute done with the buffer's last layer
        self._copy_done: dict[int, object] = {}            # layer -> event after its latest copy
        self.ledger = CopyLedger()
        self.trace: list[tuple] | None = None
        # ---- accounting ----
        self.h2d_bytes = 0              # streamed (all phases); take_h2d() gives finished bytes with their busy time
        self.h2d_experts = 0
        self.copied_bytes = 0           # of those, really copied (0 on a CPU device: references to host rows)
        self.copied_experts = 0
        self.h2d_unused_experts = 0     # streamed ahead of routing but not used by the layer's pass
        self.routing_counts = {l: torch.zeros(self.E, dtype=torch.int64) for l in c.moe_layers}
        self.has_statistics = False

    def _reusable(self, old) -> bool:
        return old is not None and tuple(old.shape) == (self.E, self.P) and old.dtype == self.dtype and \
            (old.is_pinned() or not self.cuda)

    def _host_store(self, src: WeightSource, host: dict, progress) -> dict[int, torch.Tensor]:
        """Every MoE layer's host rows [E, P]: reused from `host` where they fit, the others views of one
        allocation (host_region, registered with the CUDA driver when CUDA) filled layer by layer."""
        layers = self.config.moe_layers
        fresh = host_region({l: self.E * self.P for l in layers if not self._reusable(host.get(l))}, self.dtype,
                            register=self.cuda)
        out = {}
        for l in layers:
            if l in fresh:
                out[l] = fill_layer_rows(src, l, fresh[l].view(self.E, self.P), progress)
            else:
                out[l] = host[l]
                if progress:
                    progress(self.E)
        return out

    def host_allocation_bytes(self) -> int:
        """Bytes of the allocations that hold the host rows, read from their storages, each counted once
        (one region for the layers this store filled; rows reused from elsewhere count their own)."""
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in self.host.values()}
        return sum(storages.values())

    def memory_bytes(self) -> dict[str, int]:
        """Bytes the store allocated: host rows, device cache, streaming buffers (views count 0)."""
        dev = lambda ts: sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))  # noqa: E731
        return {"host": dev(self.host.values()),
                "cache": 0 if self.shares_host else dev(self.cache.values()),
                "buffers": 0 if self.shares_host else dev(self.buffers)}

    @property
    def host_elem_bytes(self) -> int:
        return self.dtype.itemsize

    @property
    def expert_bytes(self) -> int:
        return self.P * self.host_elem_bytes

    def _views(self, key: tuple, row) -> tuple[torch.Tensor, torch.Tensor]:
        """split(row()) made once per fixed storage row (a host row, a cache slot, a buffer slot): the views
        stay valid while copies change what the row holds, so a decode iteration issues no view ops."""
        v = self._split_views.get(key)
        if v is None:
            v = self._split_views[key] = self.split(row())
        return v

    def stacked(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(gate_up [E, 2F, H], down [E, H, F]): views of `layer`'s host rows, for one grouped GEMM over every
        expert, when weights() reads every expert of the layer from those rows (the device is host memory, or
        the layer's experts run on the CPU); else None."""
        if not (self.shares_host or layer in self.cpu_layers):
            return None
        v = self._split_views.get(("stack", layer))
        if v is None:
            rows, FH = self.host[layer], self.F * self.H        # [E, P]
            v = self._split_views[("stack", layer)] = (rows[:, :2 * FH].view(self.E, 2 * self.F, self.H),
                                                       rows[:, 2 * FH:].view(self.E, self.H, self.F))
        return v

    def split(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A flat expert row -> (gate_up [2F, H], down [H, F]) views."""
        FH = self.F * self.H
        return flat[:2 * FH].view(2 * self.F, self.H), flat[2 * FH:].view(self.H, self.F)

    def _log(self, *ev) -> None:
        if self.trace is not None:
            self.trace.append(ev)

    # ---- one pass through a layer ----
    def streams(self, layer: int) -> bool:
        """Whether passes through `layer` stream experts (MoE, not on the CPU, not fully cached)."""
        return layer in self.slots and layer not in self.cpu_layers and self.slots[layer] < self.E and self.num_buffers > 0

    def begun(self, layer: int) -> bool:
        return layer in self._streamed

    def begin_layer(self, layer: int, ahead: bool = False) -> bool:
        """Claim a free streaming buffer for `layer` (its copies wait until the buffer's previous layer's
        compute is done). Idempotent: a layer begun ahead keeps its buffer. A buffer held by a begun layer is
        never claimed: with none free, ahead=True returns False (nothing begun), ahead=False raises."""
        if layer in self._streamed:
            return True
        if not self.streams(layer):
            self._streamed[layer] = {}
            self._used[layer] = set()
            return True
        held = set(self._buf_of_layer.values())
        free = [(self._next_buf + j) % self.num_buffers for j in range(self.num_buffers)]
        free = [b for b in free if b not in held]
        if not free:
            if ahead:
                return False
            raise RuntimeError(f"layer {layer}: every streaming buffer is held by another layer {sorted(self._buf_of_layer)}")
        b = free[0]
        self._next_buf = (b + 1) % self.num_buffers
        self._streamed[layer] = {}
        self._used[layer] = set()
        self._buf_of_layer[layer] = b
        self._log("begin", layer, b)
        if self.cuda and self._buf_free_event[b] is not None:
            self.copy_stream.wait_event(self._buf_free_event[b])
        return True

    def fully_streamed(self, layer: int) -> bool:
        """Every non-resident expert of `layer` is streamed (or the layer never streams)."""
        if not self.streams(layer):
            return True
        s = self._streamed.get(layer)
        return s is not None and len(s) + self.slots[layer] >= self.E

    def prefetch_layer(self, layer: int) -> bool:
        """Begin `layer` ahead of its routing and stream all its non-resident experts; False when no buffer
        is free (the layer then streams after its routing, as without prefetching)."""
        if not self.streams(layer) or not self.begin_layer(layer, ahead=True):
            return False
        self.fetch(layer, range(self.E))
        return True

    def fetch(self, layer: int, experts: Iterable[int]) -> None:
        """Stream the non-resident experts among `experts` that this pass has not streamed yet."""
        if layer in self.cpu_layers or layer not in self._buf_of_layer:
            return
        streamed = self._streamed[layer]
        resident = self.slot_of[layer]
        todo = []
        for e in experts:
            e = int(e)
            if e not in resident and e not in streamed and e not in todo:
                todo.append(e)
        if not todo:
            return
        if len(streamed) + len(todo) > self.buffer_capacity:
            raise RuntimeError(f"layer {layer}: {len(streamed) + len(todo)} experts to stream exceed the buffer's "
                               f"{self.buffer_capacity} slots")
        b = self._buf_of_layer[layer]
        buf = self.buffers[b]
        host = self.host[layer]
        nbytes = len(todo) * self.expert_bytes
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(self.copy_stream):
                start.record(self.copy_stream)
                for e in todo:
                    i = len(streamed)
                    streamed[e] = i
                    self._log("copy", layer, e, b, i)
                    buf[i].copy_(host[e], non_blocking=True)
                end.record(self.copy_stream)
            self._copy_done[layer] = end
            self.ledger.add_events(nbytes, start, end)
            self.copied_bytes += nbytes
            self.copied_experts += len(todo)
        else:                                 # the device is host memory: a reference, no copy, no time
            for e in todo:
                i = len(streamed)
                streamed[e] = i
                self._log("copy", layer, e, b, i)
                buf[i] = host[e]
            self.ledger.add_sync(nbytes, 0.0)
            self._copy_done[layer] = None     # done already; the marker keeps the schedule traceable
        self.h2d_bytes += nbytes
        self.h2d_experts += len(todo)

    def weights(self, layer: int, e: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(gate_up [2F, H], down [H, F], on_host) for expert e of `layer`, waiting for its copy if streamed."""
        s = self.slot_of[layer].get(e)
        if s is not None:
            if self.shares_host:     # the slot references expert e's host row
                return (*self._views(("h", layer, e), lambda: self.host[layer][e]), False)
            return (*self._views(("c", layer, s), lambda: self.cache[layer][s]), False)
        i = self._streamed.get(layer, {}).get(e)
        if i is not None:
            self._used[layer].add(e)
            if layer in self._copy_done:
                ev = self._copy_done.pop(layer)
                self._log("wait", layer)
                if self.cuda:
                    torch.cuda.current_stream(self.device).wait_event(ev)
            if self.shares_host:
                return (*self._views(("h", layer, e), lambda: self.host[layer][e]), False)
            b = self._buf_of_layer[layer]
            return (*self._views(("b", b, i), lambda: self.buffers[b][i]), False)
        if layer in self.cpu_layers:
            return (*self._views(("h", layer, e), lambda: self.host[layer][e]), True)
        raise RuntimeError(f"expert {e} of layer {layer} was neither cached nor fetched")

    def _release(self, layer: int, kind: str) -> None:
        b = self._buf_of_layer.pop(layer, None)
        streamed = self._streamed.pop(layer, {})
        unused = len(set(streamed) - self._used.pop(layer, set()))
        self.h2d_unused_experts += unused
        self._copy_done.pop(layer, None)
        if b is not None:
            self._log(kind, layer, b, unused)
            if self.cuda:
                ev = torch.cuda.Event()
                ev.record(torch.cuda.current_stream(self.device))
                self._buf_free_event[b] = ev

    def end_layer(self, layer: int) -> None:
        """The layer's compute is issued: its buffer may be reused once that compute finishes."""
        self._release(layer, "end")

    def drop_streams(self, keep: Iterable[int] = ()) -> None:
        """Forget every begun layer but `keep` (an interrupted pass; the cache about to change): their
        streamed experts count as unused and their buffers are free once the current stream gets there."""
        keep = set(keep)
        for layer in [l for l in self._streamed if l not in keep]:
            self._release(layer, "drop")

    def take_h2d(self, block: bool = False) -> dict[str, tuple[int, float]]:
        """{phase: (bytes, copy-stream busy seconds)} of the copy batches finished since the last call, by
        the phase (`ledger.tag`) that issued them; block: wait for all (without block nothing waits)."""
        return self.ledger.take(block)

    # ---- statistics and cache choice ----
    def record_routing(self, layer: int, topk_ids: torch.Tensor) -> None:
        self.routing_counts[layer] += torch.bincount(topk_ids.reshape(-1).to("cpu"), minlength=self.E)
        self.has_statistics = True

    def rebalance(self) -> int:
        """Cache the most-used experts per layer (ties: lower id); returns bytes copied (0 on a CPU device,
        where the cache references host rows). Layers streamed
        ahead are dropped first (what is resident changes)."""
        self.drop_streams()
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
                if self.shares_host:
                    self.cache[l][s] = self.host[l][e]      # a reference: nothing moves
                else:
                    self.cache[l][s].copy_(self.host[l][e], non_blocking=self.cuda)
                    moved += self.P * self.host_elem_bytes
                self.cached[l][s] = e
            self.slot_of[l] = {e: s for s, e in enumerate(self.cached[l])}
        self.cache_fill_bytes += moved
        return moved
