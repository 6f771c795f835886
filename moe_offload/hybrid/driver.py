"""The CUDA driver calls the hybrid path needs and torch does not bind: stream memory operations on page-locked
words, and host functions run in stream order.

Why the driver: a hybrid decode step hands the CPU its share from inside a CUDA graph, with no host sync. The
handoff is a doorbell: the GPU writes a step counter to a page-locked word and waits for the CPU's answer in
another (cuStreamWaitValue32 / cuStreamWriteValue32, which stream capture records as graph nodes), served by a
spinning thread of ours (kernels/doorbell.py). Some drivers refuse stream memory operations on host memory;
stream_wait_available finds out once at load, and then (and for torch's CPU kernels, which run from Python) the
handoff is a host function (cuLaunchHostFunc, recorded as a graph host node and run by the driver's callback
thread). The doorbell costs a layer less than a host node when the CPU has nothing to do, and whole decodes ran
faster with it at most ratios on an H200.
"""

from __future__ import annotations

import ctypes
import gc
from typing import Callable

import torch

from ..errors import MoeOffloadError
from ..tiers import graph_host_buffer

_HOST_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_STREAM_WAIT_VALUE_EQ, _STREAM_WRITE_VALUE_DEFAULT = 0x1, 0x0  # CUstreamWaitValue_flags, CUstreamWriteValue_flags
_driver_lib = None


def _driver():
    """libcuda, for cuLaunchHostFunc and the stream memory operations."""
    global _driver_lib
    if _driver_lib is None:
        try:
            lib = ctypes.CDLL("libcuda.so.1")
        except OSError as err:
            raise MoeOffloadError(f"the CPU expert path needs the CUDA driver library: {err}") from None
        lib.cuLaunchHostFunc.argtypes = [ctypes.c_void_p, _HOST_FN, ctypes.c_void_p]
        lib.cuLaunchHostFunc.restype = ctypes.c_int
        for name in ("cuStreamWaitValue32_v2", "cuStreamWriteValue32_v2"):  # the v1 symbols need a driver option
            if hasattr(lib, name):
                getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
                getattr(lib, name).restype = ctypes.c_int
        _driver_lib = lib
    return _driver_lib


def _stream_word_op(name: str, stream: torch.cuda.Stream, address: int, value: int, flags: int) -> None:
    """cuStreamWaitValue32 / cuStreamWriteValue32 on a page-locked word (its host address: unified addressing)."""
    function = getattr(_driver(), name, None)
    if function is None:
        raise RuntimeError(f"this CUDA driver has no {name}")
    status = function(ctypes.c_void_p(stream.cuda_stream), address, value, flags)
    if status != 0:
        raise RuntimeError(f"{name} failed (CUresult {status})")


def wait_then_clear(stream: torch.cuda.Stream, address: int) -> None:
    """On `stream`: wait until the page-locked int32 word at `address` is 1, then set it to 0."""
    _stream_word_op("cuStreamWaitValue32_v2", stream, address, 1, _STREAM_WAIT_VALUE_EQ)
    _stream_word_op("cuStreamWriteValue32_v2", stream, address, 0, _STREAM_WRITE_VALUE_DEFAULT)


def stream_wait_available(device: torch.device) -> str | None:
    """None if stream memory operations on page-locked words work here, replayed from a CUDA graph as the
    doorbell uses them; else why not (one line)."""
    owner = type("_Probe", (), {})()
    try:
        word = graph_host_buffer(owner, 1, torch.int32, True)
        if word is None:
            return "cannot page-lock a doorbell word"
        stream = torch.cuda.Stream(device)
        graph = torch.cuda.CUDAGraph()
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            wait_then_clear(stream, word.data_ptr())
        word[0] = 1  # the graph waits for 1 (already there), then writes 0
        graph.replay()
        torch.cuda.synchronize(device)
        return None if int(word[0]) == 0 else "a replayed stream write did not reach host memory"
    except (RuntimeError, OSError) as err:
        return str(err).splitlines()[0] if str(err) else type(err).__name__


def _launch_host_func(stream: torch.cuda.Stream, fn, user_data: int | None) -> None:
    """cuLaunchHostFunc(stream, fn, user_data): fn runs on a driver thread once the stream's earlier work is done."""
    status = _driver().cuLaunchHostFunc(ctypes.c_void_p(stream.cuda_stream), fn, ctypes.c_void_p(user_data))
    if status != 0:
        raise RuntimeError(f"cuLaunchHostFunc failed (CUresult {status})")  # a graph capture falls back


class HostFunction:
    """A Python callable run in stream order: after the stream's earlier work, before its later work.

    On CUDA it goes through cuLaunchHostFunc on a driver thread (it must not call CUDA itself); an exception
    there cannot propagate, so it is kept in `error` for the caller to raise (check()). Without a stream it runs
    at once.
    """

    def __init__(self, fn: Callable[[], None]):
        self.error: BaseException | None = None

        def trampoline(_user_data):
            # No garbage collection on the driver's thread: a collected cycle may hold a CUDA tensor, whose
            # release calls CUDA, which a host function must not (it has aborted the process, while the first
            # numba call imported modules here). Collection resumes when the host function ends.
            collecting = gc.isenabled()
            gc.disable()
            try:
                fn()
            except BaseException as err:  # an exception escaping into the driver's thread would abort
                self.error = err
            finally:
                if collecting:
                    gc.enable()

        self._fn = fn
        self._trampoline = _HOST_FN(trampoline)  # kept alive here: the driver only holds its address

    def launch(self, stream: torch.cuda.Stream | None) -> None:
        if stream is None:
            self._fn()
            return
        _launch_host_func(stream, self._trampoline, None)

    def check(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise MoeOffloadError(f"the CPU expert path failed: {error!r}") from error


class NativeHostFunction:
    """A compiled C function `void fn(void *user_data)` run in stream order, as HostFunction runs a Python one,
    but taking no GIL (kernels/cpu_numba.step_function). It cannot raise; user_data must outlive its launches."""

    def __init__(self, address: int, user_data: int):
        self._fn = _HOST_FN(address)
        self._user_data = user_data

    def launch(self, stream: torch.cuda.Stream | None) -> None:
        if stream is None:
            self._fn(self._user_data)  # a foreign function: ctypes releases the GIL around the call
            return
        _launch_host_func(stream, self._fn, self._user_data)
