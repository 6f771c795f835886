"""A decode step as CUDA graphs broken at the MoE layers that must sync with the host (MOE_CUDA_GRAPH=auto).

Why: a layer whose misses come from disk (or that copies misses into its cache) decides on the host what to read,
so its step cannot be one CUDA graph, and the eager step is mostly Python launching transformers' small dense
kernels: on the H200 the ratio-25 disk-tier step took 44.8 ms where reading its 18.2 MB from disk and computing a
ratio-100 step bound it at 16.5 ms (efficiency 0.34, bench/results/2026-11-29-h200-disk-eager.json). Here the
dense code between two such layers is captured once as a graph segment and replayed; only those layers run
eagerly: 21.0 ms a step, efficiency 0.78 (bench/results/2026-11-29-h200.json).

How: recording runs the step once with the backend's calls diverted here (`moe_call`). At each syncing layer the
segment captured so far is closed and replayed at once (capture does not execute, and the layer needs its input),
the layer runs eagerly into a static output buffer, and the next segment's capture begins; that segment reads the
buffer. A replay then alternates: segment i, layer i eagerly on the tensors the segments keep at fixed addresses
(its hidden states, top-k ids and weights), its result copied into the static buffer, segment i + 1. Layers that
are sync-free (zero-copy, resident) stay inside the segments. All segments share one memory pool and are replayed
in capture order, as torch's make_graphed_callables does.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch

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
                    call = self.calls[index]
                    call.out.copy_(call.runtime.forward(call.hidden, call.top_k_index, call.top_k_weights,
                                                        call.act_fn))
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

