"""A decode step as CUDA graphs broken at the MoE layers that must sync with the host (MOE_CUDA_GRAPH=auto).

Why: a layer whose misses come from disk (or that copies misses into its cache) decides on the host what to read,
so its step cannot be one CUDA graph, and the eager step is mostly Python launching transformers' small dense
kernels: a disk-tier step then takes several times what its reads and a resident step cost. Here the dense code
between two such layers is captured once as a graph segment and replayed; only those layers run eagerly, which
roughly halved the disk tier's step time.

How: recording runs the step once with the backend's calls diverted here (`moe_call`). At each syncing layer the
segment captured so far is closed and replayed at once (capture does not execute, and the layer needs its input),
the layer runs eagerly into a static output buffer, and the next segment's capture begins; that segment reads the
buffer. A replay then alternates: segment i, layer i eagerly on the tensors the segments keep at fixed addresses
(its hidden states, top-k ids and weights), its result copied into the static buffer, segment i + 1. Layers that
are sync-free (zero-copy, resident) stay inside the segments. All segments share one memory pool and are replayed
in capture order, as torch's make_graphed_callables does.

A syncing layer still routes on the host each step, but when every expert its step needs is cached (most steps:
a disk-tier layer misses in bursts), it replays a small graph of its own (_HitsGraph) instead of
launching its kernels from Python; only steps with misses run eagerly.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .tiers import graph_host_buffer

_state = threading.local()


def active() -> "PiecewiseStep | None":
    """The step being recorded on this thread, if any: the experts backend diverts syncing layers to it."""
    return getattr(_state, "recording", None)


@dataclass
class _MoeCall:
    """One syncing layer's call as recorded: its runtime and the fixed tensors it reads and writes."""

    runtime: Any  # cache.OffloadedExperts
    hidden: torch.Tensor  # [T, H] written by the segment before
    top_k_index: torch.Tensor  # [T, K]
    top_k_weights: torch.Tensor  # [T, K]
    act_fn: Callable
    out: torch.Tensor  # [T, H] read by the segment after
    hits_graph: "_HitsGraph | None" = None  # captured the first time a replayed step finds every expert cached
    hits_graph_failure: str | None = None  # why it could not be captured: the layer then always runs eagerly

    def run(self, graph_factory: Callable[[], Any]) -> None:
        """The layer's step between two segments: routed on the host (its sync), then, when every needed expert
        is cached and the Triton kernel serves the layer, replayed from _HitsGraph; else eagerly."""
        routing = self.runtime.route(self.top_k_index)
        if not routing.misses and self.runtime.fused_moe is not None and self._has_hits_graph(graph_factory):
            self.hits_graph.run([(expert, self.runtime.table.lookup(expert)) for expert in routing.hits])
            return
        self.out.copy_(self.runtime.forward_routed(self.hidden, self.top_k_index, self.top_k_weights, self.act_fn,
                                                   routing))

    def _has_hits_graph(self, graph_factory: Callable[[], Any]) -> bool:
        """The hits graph is there, captured now if need be; False if its capture failed (the layer stays eager)."""
        if self.hits_graph is None and self.hits_graph_failure is None:
            try:
                self.hits_graph = _HitsGraph(self, graph_factory)
            except RuntimeError as err:  # capture refused (and closed again)
                self.hits_graph_failure = str(err).splitlines()[0] if str(err) else type(err).__name__
        return self.hits_graph is not None


class _HitsGraph:
    """A syncing layer's step when all its experts are cached, as a graph of its own: the slot map copied from a
    page-locked buffer, the Triton kernels over the cache, the fixed-order K-sum into the call's output.

    Why: in a replayed step such a layer otherwise launches ~8 kernels from Python after its sync while the GPU
    waits. The same kernel, rows and sum as the eager path (cache._fused_pool_runner): the same bits. Its own
    memory pool: it is captured after the segments, and replays between them. What the step still spends on the
    host is the route itself (a device-to-host copy and a sync per layer).
    """

    def __init__(self, call: _MoeCall, graph_factory: Callable[[], Any]):
        runtime, device = call.runtime, call.hidden.device
        num_tokens, top_k = call.top_k_index.shape  # [T, K]
        on_cuda = device.type == "cuda"
        self._slot_map_host = graph_host_buffer(self, runtime.num_experts, torch.int32, on_cuda)  # [E]
        if self._slot_map_host is None:
            raise RuntimeError("cannot page-lock the slot map of a layer's graph (cudaHostRegister failed)")
        self._slot_map_host_np = self._slot_map_host.numpy()
        self._slot_map = torch.full((runtime.num_experts,), -1, dtype=torch.int32, device=device)  # [E]
        self._slot_map_host.fill_(-1)
        self.graph = graph_factory()
        if on_cuda:
            self.graph.capture_begin(capture_error_mode="thread_local")
        else:
            self.graph.capture_begin()
        try:
            self._slot_map.copy_(self._slot_map_host, non_blocking=True)
            contrib = torch.zeros((num_tokens * top_k, call.hidden.shape[1]), dtype=torch.float32,
                                  device=device)  # [T*K, H]
            runtime.fused_moe(call.hidden, call.top_k_index, call.top_k_weights, runtime.gate_up, runtime.down,
                              self._slot_map, contrib=contrib)
            call.out.copy_(contrib.view(num_tokens, top_k, -1).sum(dim=1).to(call.hidden.dtype))  # [T, H]
        finally:
            self.graph.capture_end()

    def run(self, slots: list[tuple[int, int]]) -> None:
        """Replay with these (expert, slot) pairs, every expert the step needs."""
        box = self._slot_map_host_np
        box.fill(-1)
        for expert, slot in slots:
            box[expert] = slot
        self.graph.replay()


class PiecewiseStep:
    """`record(step)` once, then `replay()` for each later step (the same interface as a torch CUDAGraph)."""

    graph_factory: Callable[[], Any] = torch.cuda.CUDAGraph  # tests swap in a stand-in

    def __init__(self, device: torch.device):
        self.device = device
        self.segments: list[Any] = []
        self.calls: list[_MoeCall] = []
        self._pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._open = None  # the segment being captured

    def record(self, step: Callable[[], Any]) -> Any:
        """Run `step` once, capturing its dense parts; returns what it returned. Raises (and leaves nothing open)
        if something in it cannot be captured."""
        if self._stream is not None:
            torch.cuda.synchronize(self.device)
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
        _state.recording = self
        try:
            with self._on_stream():
                self._begin()
                result = step()
                self._close()
        except BaseException:
            self._abort()
            raise
        finally:
            _state.recording = None
        if self._stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._stream)
        return result

    def moe_call(self, runtime, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                 top_k_weights: torch.Tensor, act_fn: Callable) -> torch.Tensor:
        """While recording: the experts backend's call for a layer that syncs with the host."""
        self._close()  # executes the segment so far: this layer needs its input
        out = runtime.forward(hidden_states, top_k_index, top_k_weights, act_fn).clone()  # [T, H] kept
        self.calls.append(_MoeCall(runtime, hidden_states, top_k_index, top_k_weights, act_fn, out))
        self._begin()
        return out

    def replay(self) -> None:
        if self._stream is not None:  # after what the caller queued before (the EOS bias, the last token's copy)
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with self._on_stream():
            for index, segment in enumerate(self.segments):
                segment.replay()
                if index < len(self.calls):
                    self.calls[index].run(self.graph_factory)
        if self._stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._stream)

    def _on_stream(self):
        return torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()

    def _begin(self) -> None:
        graph = self.graph_factory()
        if self._pool is not None:
            graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
        else:
            graph.capture_begin()
        self._open = graph

    def _close(self) -> None:
        graph, self._open = self._open, None
        graph.capture_end()
        self.segments.append(graph)
        graph.replay()

    def _abort(self) -> None:
        """End a capture left open by an error, so the stream is usable again; the step stays unrecorded."""
        graph, self._open = self._open, None
        if graph is not None:
            try:
                graph.capture_end()
            except RuntimeError:
                pass
        self.segments.clear()
        self.calls.clear()
