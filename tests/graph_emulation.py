"""A CUDA graph stand-in that really replays, on the CPU, for tests of code that records and replays graphs.

Between capture_begin and capture_end every aten op runs as usual and is also logged (TorchDispatchMode) with its
arguments and results; replay() runs the logged ops again on the same tensors, in order, writing each new result
into the tensor the op returned at capture. That is what a CUDA graph does with fixed addresses: later replays
see new values in the tensors the capture read, and leave theirs where the capture left its outputs. (Unlike a
real capture, the ops also execute while being recorded, and memory freed during capture is not reused.)
Launches of Triton kernels (the interpreter's, which are not aten ops) and host functions are logged whole, as
nodes (`record_graph_nodes`, `record_as_node`: pytest monkeypatches), and called again on replay.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten


_HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default}


class _Recorder(TorchDispatchMode):
    def __init__(self, log: list):
        super().__init__()
        self.log = log

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _HOST_READS:  # a CUDA capture cannot read a device value on the host either
            raise RuntimeError(f"{func} reads a tensor's value on the host during capture")
        result = func(*args, **kwargs)
        self.log.append((func, args, kwargs, result))
        return result


def _aliases(result: torch.Tensor, args, kwargs) -> bool:
    """The op returned (a view of) one of its inputs: in-place ops and views need no copy back."""
    inputs, _ = tree_flatten((args, kwargs))
    storage = result.untyped_storage().data_ptr()
    return any(isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() == storage for t in inputs)


_capturing: list = []  # the EmulatedGraph capturing now, if any


def record_as_node(monkeypatch, owner, name: str) -> None:
    """Log calls of owner.name (a method) whole in the capturing EmulatedGraph, to be called again on replay, as a
    CUDA graph replays a kernel launch or a host node; its own tensor ops are not logged one by one."""
    method = getattr(owner, name)

    def node(self, *args, **kwargs):
        if not _capturing:
            return method(self, *args, **kwargs)
        with _disable_current_modes():
            result = method(self, *args, **kwargs)
        _capturing[-1].log.append((method, (self, *args), kwargs, None))
        return result

    monkeypatch.setattr(owner, name, node)


def record_graph_nodes(monkeypatch) -> None:
    """What the engine launches besides aten ops becomes graph nodes: interpreted Triton kernels and the CPU
    expert path's host functions (hybrid.driver.HostFunction, and NativeHostFunction: the compiled numba step)."""
    from triton.runtime.interpreter import InterpretedFunction

    from moe_offload.hybrid.driver import HostFunction, NativeHostFunction

    record_as_node(monkeypatch, InterpretedFunction, "run")
    record_as_node(monkeypatch, HostFunction, "launch")
    record_as_node(monkeypatch, NativeHostFunction, "launch")


class EmulatedGraph:
    """torch.cuda.CUDAGraph's capture_begin / capture_end / replay, emulated on the CPU (see the module docstring)."""

    def __init__(self):
        self.log: list = []
        self._mode: _Recorder | None = None

    def capture_begin(self, **kwargs):
        self._mode = _Recorder(self.log)
        self._mode.__enter__()
        _capturing.append(self)

    def capture_end(self):
        _capturing.remove(self)
        self._mode.__exit__(None, None, None)
        self._mode = None

    def replay(self):
        for func, args, kwargs, recorded in self.log:
            result = func(*args, **kwargs)
            if recorded is None:  # a node (a Triton launch, a host function): it wrote its outputs itself
                continue
            outs, _ = tree_flatten(recorded)
            news, _ = tree_flatten(result)
            for out, new in zip(outs, news):
                if isinstance(out, torch.Tensor) and not _aliases(out, args, kwargs):
                    out.copy_(new)


def emulate_whole_graphs(monkeypatch, decoder) -> None:
    """torch.cuda.graph / CUDAGraph emulated for `decoder` (decoding.StaticDecoder) on the CPU.

    A real capture records without running; the emulation runs what it records. So the capture context here puts
    back what one recorded decode step changes that the next step reads (the decoder's token and position, the
    KV cache's tensors) before the decoder replays the graph for that same step. MoE state (cache maps, tallies)
    is left as it is: it changes no output.
    """
    monkeypatch.setattr(torch.cuda, "CUDAGraph", EmulatedGraph)

    class Capture:
        def __init__(self, graph, **kwargs):
            self.graph = graph

        def __enter__(self):
            state = [decoder._token, decoder._position]
            state += [value for layer in decoder.cache.layers for value in vars(layer).values()
                      if isinstance(value, torch.Tensor)]
            self.saved = [(value, value.clone()) for value in state]
            self.graph.capture_begin()

        def __exit__(self, *exc):
            self.graph.capture_end()
            for value, before in self.saved:
                value.copy_(before)
            return False

    monkeypatch.setattr(torch.cuda, "graph", Capture)
