"""Hybrid decode: a zero-copy layer's missed experts split between the CPU and the GPU, both working at once.

Why: on the H200 machine the GPU reads experts left in pinned host memory over PCIe at ~50 GB/s, and the CPU
computes one-token experts from that same memory: torch's kernels at ~18-28 GB/s on 16 cores, the numba kernels of
kernels/cpu_numba.py at ~66 GB/s for 8 experts a call on 14 threads, 0.235 ms for one expert, in the decode graph
(bench/results/2026-11-29-h200-hybrid-latency-spin-pool.json; which kernel runs is measured at load). Together they
could move more bytes per second than either alone, up to what the host DRAM gives (~85 GB/s plain read there). In a
one-token decode step the layer's misses are split by count: n_cpu of them, those whose experts were used least
recently (with LRU admission the GPU's misses are cached, so the CPU takes the ones least likely to come back), are
computed on the CPU where their weights lie, the rest are read in place by the GPU kernels; hits stay on the GPU.
n_cpu comes from a table over the number of misses, measured at load (tune_split: the layer's own decode forward
timed for every split it can take, and without the path), and the table is kept only if whole decodes run faster
with it (check_on_decode).

How, with no host sync (the decode step stays one CUDA graph): the GPU packs the layer's hidden state, the
host-tier rows of the CPU's experts and the routing weights into one device buffer (one Triton kernel where
Triton runs, kernels/triton_hybrid.py, which also masks the CPU's pairs out of the GPU's ids and counts them; else
pack_share_torch); on a side stream that buffer is copied to a pinned mailbox, the CPU computes its experts
from the mailbox into pinned outputs, and those are copied back. The main stream runs the GPU's share
meanwhile; the streams join before the K outputs are summed in the usual fixed order. CUDA orders every piece
inside the graph: the launching thread never syncs mid-step.
The CPU is handed its share (MOE_CPU_HANDOFF) either through a doorbell (stream_wait, the default: the GPU
writes a step counter to a page-locked word and waits for another with cuStreamWaitValue32, both recorded in the
graph; a spinning thread of kernels/doorbell.py runs the step) or through a host function (cuLaunchHostFunc,
which stream capture records as a graph host node run by the driver's callback thread). On the H200 the doorbell
cost a layer 0.068 ms with no expert for the CPU against 0.085 for the host node
(bench/results/2026-11-29-h200-hybrid-latency-stream-wait.json) and decoded faster at 3 of 4 ratios in one run
(-vs-llamacpp-handoffs.json). With the numba kernel the step is compiled code (cpu_numba.step_function /
step_kernel, on the threads of kernels/spin_pool.py) that never takes the GIL; torch's kernels run from Python,
through the host function only.

Numerics: a CPU-computed expert rounds the same intermediates as the GPU kernels but accumulates in another
order, so outputs can differ from the all-GPU run by an ulp here and there (cpu_experts.py): the CPU path is
judged by the tolerance rule, not by bit-identity.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import statistics
import time
import weakref
from typing import Callable

import numpy as np
import torch

from .cpu_experts import CpuExperts, is_silu
from .errors import MoeOffloadError
from .kernels import triton_kernels
from .tiers import HostTier, graph_host_buffer

_HOST_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_STREAM_WAIT_VALUE_EQ, _STREAM_WRITE_VALUE_DEFAULT = 0x1, 0x0  # CUstreamWaitValue_flags, CUstreamWriteValue_flags
_driver_lib = None


def _driver():
    """libcuda, for cuLaunchHostFunc (torch exposes no binding for it)."""
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


def stream_wait_available(device: torch.device) -> str | None:
    """None if stream memory operations on page-locked words work here, replayed from a CUDA graph as the
    stream_wait handoff uses them; else why not (one line)."""
    from .kernels.doorbell import DONE, DOORBELL_WORDS

    owner = type("_Probe", (), {})()
    try:
        word = graph_host_buffer(owner, DOORBELL_WORDS, torch.int32, True)
        if word is None:
            return "cannot page-lock a doorbell word"
        address, stream = word.data_ptr() + 4 * DONE, torch.cuda.Stream(device)
        graph = torch.cuda.CUDAGraph()
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            _stream_word_op("cuStreamWaitValue32_v2", stream, address, 1, _STREAM_WAIT_VALUE_EQ)
            _stream_word_op("cuStreamWriteValue32_v2", stream, address, 0, _STREAM_WRITE_VALUE_DEFAULT)
        word[DONE] = 1  # the graph waits for 1 (already there), then writes 0
        graph.replay()
        torch.cuda.synchronize(device)
        return None if int(word[DONE]) == 0 else "a replayed stream write did not reach host memory"
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
            # release calls CUDA, which a host function must not (on the H200 that aborted the process, while
            # the first numba call imported modules here). Collection resumes when the host function ends.
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


class CpuShare:
    """One layer's CPU side of hybrid decode: mailbox, CPU experts and their outputs (see the module docstring).

    host: the layer's host tier (pinned on CUDA), read in place by the CPU. split: n_cpu for 0..K misses.
    """

    def __init__(self, host: HostTier, num_experts: int, top_k: int, hidden: int, split: list[int],
                 runner: CpuExperts, device: torch.device):
        if len(split) != top_k + 1 or any(not 0 <= n <= m for m, n in enumerate(split)):
            raise MoeOffloadError(f"split table must give 0 <= n_cpu <= misses for 0..{top_k} misses, got {split}")
        self.host, self.top_k, self.hidden, self.runner, self.device = host, top_k, hidden, runner, device
        self.split_table = list(split)
        self.split = torch.tensor(split, dtype=torch.long, device=device)  # [K + 1]
        rows = [host.row_of.get(e, -1) for e in range(num_experts)]
        self.host_rows = torch.tensor(rows, dtype=torch.long, device=device)  # [E] host-tier row or -1
        on_cuda = device.type == "cuda"
        # [H + 2K] float32: hidden state (widened, exact), host row of each pair's expert (-1: not the CPU's),
        # routing weight of each pair (widened, exact)
        self._packed = torch.empty(hidden + 2 * top_k, dtype=torch.float32, device=device)
        self._gpu_ids = torch.empty((1, top_k), dtype=torch.long, device=device)  # [1, K] E where the CPU computes
        self._cpu_pair = torch.zeros(top_k, dtype=torch.uint8, device=device)  # [K] 1: the CPU computes this pair
        self._cpu_mask = self._cpu_pair.view(torch.bool).view(top_k, 1)  # [K, 1] the same bytes, for the merge
        fused = triton_kernels("triton_hybrid", device)  # the pack as one launch where Triton runs
        self._pack = fused.pack_share if fused is not None else pack_share_torch
        self._mailbox = self._host_buffer(hidden + 2 * top_k, on_cuda)  # [H + 2K]
        self._out_host = self._host_buffer(top_k * hidden, on_cuda).view(top_k, hidden)  # [K, H]
        self._out = torch.zeros((top_k, hidden), dtype=torch.float32, device=device)  # [K, H]
        self._mailbox_np, self._out_host_np = self._mailbox.numpy(), self._out_host.numpy()
        self._scratch = torch.empty((top_k, hidden), dtype=torch.float32)  # [K, H] the runner's compact output
        self._stream = torch.cuda.Stream(device) if on_cuda else None
        self._dtype = self._weight_dtype = None  # set by launch(); constant for a model
        self._act_fn: Callable | None = None
        self._function = HostFunction(self._compute)
        self._native: NativeHostFunction | None = None  # the numba kernel's compiled step (_host_function)
        self._descriptor: np.ndarray | None = None  # its int64 descriptor, kept alive here with its job's
        self._job: np.ndarray | None = None  # buffers (kernels/cpu_numba.make_job)
        self._job_buffers: tuple = ()
        self.tally = torch.zeros((), dtype=torch.long, device=device)  # experts computed on the CPU, device-side
        # which misses the CPU takes: those whose experts were used least recently (pack_share_torch says why)
        self._last_use = torch.zeros(num_experts, dtype=torch.int32, device=device)  # [E] step of last use, 0 never
        # [1] one-token steps packed so far; also the value the stream_wait handoff rings the doorbell with
        self._step = torch.zeros(1, dtype=torch.int32, device=device)
        self.tuning: dict = {}  # tune_cpu_path's: {kernel: tune_split's timings}
        self.stream_wait_refused: str | None = None  # why MOE_CPU_HANDOFF=stream_wait was not used, if it was asked
        self._doorbell: torch.Tensor | None = None  # [DOORBELL_WORDS] int32, page-locked (use_stream_wait)

    @property
    def handoff(self) -> str:
        """How the GPU hands this layer's CPU experts over: stream_wait (the compiled numba step through the
        doorbell), else host_function (and why stream_wait was not used, if it was asked for)."""
        if self._doorbell is not None and self.runner.compute == "numba":
            return "stream_wait"
        return "host_function" + (f" (stream_wait refused: {self.stream_wait_refused})"
                                  if self.stream_wait_refused else "")

    def use_stream_wait(self) -> None:
        """Hand the compiled step (numba kernel) to the CPU through a doorbell word and the doorbell server
        (kernels/doorbell.py) instead of a CUDA host function. CUDA only; check stream_wait_available first."""
        from .kernels import doorbell

        if self._stream is None:
            raise MoeOffloadError("the stream_wait handoff needs CUDA")
        word = graph_host_buffer(self, doorbell.DOORBELL_WORDS, torch.int32, True)
        if word is None:
            raise MoeOffloadError("cannot page-lock the CPU expert path's doorbell (cudaHostRegister failed)")
        self._doorbell = word
        doorbell.server()  # started (and compiled) now, not inside a capture

    def set_table(self, table: list[int]) -> None:
        """A whole split table at once (see set_split)."""
        for misses, n_cpu in enumerate(table):
            self.set_split(misses, n_cpu)

    @property
    def active(self) -> bool:
        """Some miss count sends work to the CPU; else (a table of zeros) the layer skips the CPU path and its
        copies altogether. Read when a forward runs: a captured graph keeps the path it was captured with."""
        return any(self.split_table)

    def set_split(self, misses: int, n_cpu: int) -> None:
        """Compute n_cpu of a step's `misses` misses on the CPU from now on (in place: graphs see it)."""
        if not 0 <= n_cpu <= misses <= self.top_k:
            raise MoeOffloadError(f"cannot compute {n_cpu} of {misses} misses on the CPU (top-k {self.top_k})")
        self.split_table[misses] = n_cpu
        self.split[misses] = n_cpu

    def _host_buffer(self, numel: int, pin: bool) -> torch.Tensor:
        """A zeroed float32 host buffer, page-locked on CUDA (copied from inside the decode graph)."""
        tensor = graph_host_buffer(self, numel, torch.float32, pin)
        if tensor is None:
            raise MoeOffloadError("cannot page-lock the CPU expert path's buffers (cudaHostRegister failed)")
        return tensor

    def _host_function(self, act_fn: Callable) -> HostFunction | NativeHostFunction:
        """With the numba kernel on bf16 SiLU experts, the compiled step (no Python, no GIL); else _compute."""
        if not (self.runner.compute == "numba" and self._dtype == self.host.gate_up.dtype == torch.bfloat16
                and is_silu(act_fn)):
            return self._function  # (the numba runner's own checks then say what it cannot compute)
        if self._native is None:
            from .kernels import cpu_numba

            inter, top_k = self.host.down.shape[2], self.top_k
            self._job_buffers = (np.empty(top_k, np.int64), np.empty(top_k, np.float32),
                                 np.empty((top_k, inter), np.float32), np.empty(top_k, np.int64))
            pair_rows, weights, act, out_rows = self._job_buffers  # [K], [K], [K, I], [K]: filled by the step
            self._job = cpu_numba.make_job(
                x=self._mailbox.data_ptr(), x_per_pair=0, gate_up=self.host.gate_up.data_ptr(),
                down=self.host.down.data_ptr(), rows=self.host.gate_up.shape[0], pair_rows=pair_rows.ctypes.data,
                weights=weights.ctypes.data, act=act.ctypes.data, out=self._out_host.data_ptr(),
                out_rows=out_rows.ctypes.data, hidden=self.hidden, inter=inter,
                round_product=self._weight_dtype == torch.bfloat16)
            fields = {"job": self._job.ctypes.data, "control": cpu_numba.pool(self.runner.threads).address,
                      "hidden": self.hidden, "top_k": top_k}
            self._descriptor = np.array([fields[name] for name in cpu_numba.DESCRIPTOR_FIELDS], dtype=np.int64)
            self._native = NativeHostFunction(cpu_numba.step_function(), self._descriptor.ctypes.data)
            if self._doorbell is not None:
                from .kernels import doorbell

                server = doorbell.server()
                registration = server.register(self._doorbell.numpy(), self._descriptor)
                weakref.finalize(self, server.unregister, registration)  # before this share's buffers go
        return self._native

    def _compute(self) -> None:
        """On the host, in stream order: the CPU's experts of the mailbox's step into _out_host rows."""
        if self._stream is not None and torch.get_num_threads() != self.runner.threads:
            # once, on the driver's thread: the runner then finds its count set and changes nothing per call
            # (torch.set_num_threads also resizes torch's pthreadpool whenever the count changes). On the H200,
            # while the runner still set and restored the count on every call, all 96 misses of a ratio-0 step on
            # the CPU took 62 ms (0.63 ms an expert, per-layer costs included) against 0.38 ms an expert measured
            # alone (bench/results/2026-11-29-h200-hybrid-costs-measured-apart.json); how much of that the
            # per-call thread setting was is not measured yet.
            torch.set_num_threads(self.runner.threads)
        box, hidden_size, top_k = self._mailbox_np, self.hidden, self.top_k  # numpy: no torch dispatch per field
        rows = box[hidden_size:hidden_size + top_k]  # [K]
        pairs = np.flatnonzero(rows >= 0)  # [n]
        if pairs.size == 0:
            return
        count = int(pairs.size)
        hidden = torch.from_numpy(box[:hidden_size]).to(self._dtype).expand(count, hidden_size)  # [n, H]
        weights = torch.from_numpy(box[hidden_size + top_k:][pairs]).to(self._weight_dtype)  # [n]
        out = self._scratch[:count]  # [n, H]
        self.runner(hidden, weights, self.host.gate_up, self.host.down, rows[pairs].astype(np.int64).tolist(),
                    [1] * count, self._act_fn, out)
        self._out_host_np[pairs] = out.numpy()

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                from_host: torch.Tensor, gpu_share: Callable[[torch.Tensor], torch.Tensor],
                act_fn: Callable) -> torch.Tensor:
        """contrib [K, H] float32 for one token: the CPU's pairs from the CPU, the others from gpu_share.

        hidden_states [1, H]; top_k_index / top_k_weights / from_host [1, K] (from_host: 1 = read from the host
        tier). gpu_share(ids [1, K]) runs the GPU kernels with the CPU's pairs' ids replaced by E (a slot of -1:
        skipped) and returns their contrib rows.
        """
        # K = top-k, H = hidden, E = routed experts
        self._dtype, self._weight_dtype, self._act_fn = hidden_states.dtype, top_k_weights.dtype, act_fn
        self._pack(hidden_states, top_k_index, top_k_weights, from_host, self.split, self.host_rows,
                   self.host_rows.numel(), self._packed, self._gpu_ids, self._cpu_pair, self.tally, self._last_use,
                   self._step)
        with self._side_stream():
            self._mailbox.copy_(self._packed, non_blocking=True)
            function = self._host_function(act_fn)
            if self._doorbell is not None and isinstance(function, NativeHostFunction):
                self._ring_doorbell()
            else:
                function.launch(self._stream)
            self._out.copy_(self._out_host, non_blocking=True)
        contrib = gpu_share(self._gpu_ids)  # [K, H]
        if self._stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._stream)
        return torch.where(self._cpu_mask, self._out, contrib)  # [K, H]

    def _ring_doorbell(self) -> None:
        """On the side stream, after the mailbox copy: the new RING value (stepped by the pack; the server then
        runs the step), a wait for DONE == 1 (the outputs are in), DONE back to 0 (kernels/doorbell.py)."""
        from .kernels.doorbell import DONE, RING

        self._doorbell[RING:RING + 1].copy_(self._step, non_blocking=True)
        done = self._doorbell.data_ptr() + 4 * DONE
        _stream_word_op("cuStreamWaitValue32_v2", self._stream, done, 1, _STREAM_WAIT_VALUE_EQ)
        _stream_word_op("cuStreamWriteValue32_v2", self._stream, done, 0, _STREAM_WRITE_VALUE_DEFAULT)

    @contextlib.contextmanager
    def _side_stream(self):
        """Run the block on the side stream, after the main stream's work so far (a no-op off CUDA)."""
        if self._stream is None:
            yield
            return
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            yield

    def check(self) -> None:
        """Raise the CPU side's error, if its host function failed since the last check."""
        self._function.check()


def pack_share_torch(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                     from_host: torch.Tensor, split: torch.Tensor, host_rows: torch.Tensor, num_experts: int,
                     packed: torch.Tensor, gpu_ids: torch.Tensor, cpu_pair: torch.Tensor, tally: torch.Tensor,
                     last_use: torch.Tensor, step: torch.Tensor) -> None:
    """A one-token step's CPU share, decided and packed in place (kernels/triton_hybrid.pack_share does the same
    in one launch): the CPU's pairs are the split[misses] misses whose experts were used least recently, ties in
    top-k order (cpu_pair [K], 1 = the CPU's); packed [H + 2K] float32 = hidden state, each pair's host-tier row
    (-1: not the CPU's), each pair's routing weight; gpu_ids [1, K] = the ids with the CPU's pairs replaced by E
    (the GPU kernels skip them); tally += the CPU's pairs; step += 1 (also the doorbell's ring value) and
    last_use[ids] = step.

    Why least recently used: with LRU admission only the GPU's misses are admitted, so the CPU should take the
    misses least likely to come back. On the shipped model's decode routing that kept 0.980 / 1.397 decode hits
    per layer step (of 2) at ratios 25 / 50 where the highest-weight misses gave 0.869 / 1.298 and LRU without
    the CPU 0.963 / 1.529 (bench/results/2026-11-29-hybrid-admission-small-moe.json).

    hidden [1, H]; top_k_index, top_k_weights, from_host [1, K] (from_host: 1 = read from the host tier);
    split [K + 1]; host_rows [E]; last_use [E] int32 (the step each expert was last used, 0 = never); step [1]
    int32.
    """
    # K = top-k, E = routed experts
    n_cpu = split.index_select(0, from_host.sum().view(1))  # [1] misses the CPU computes
    stamp = last_use[top_k_index]  # [1, K]
    order = torch.arange(top_k_index.shape[-1], device=top_k_index.device)  # [K]
    earlier = (stamp.unsqueeze(-2) < stamp.unsqueeze(-1)) | \
        ((stamp.unsqueeze(-2) == stamp.unsqueeze(-1)) & (order < order.unsqueeze(-1)))  # [1, K, K] j before i
    rank = (earlier & (from_host > 0).unsqueeze(-2)).sum(-1)  # [1, K] among the misses
    pairs = (from_host > 0) & (rank < n_cpu)  # [1, K] the n_cpu misses used least recently
    step.add_(1)
    last_use.index_copy_(0, top_k_index.reshape(-1), step.expand(top_k_index.numel()))
    rows = torch.where(pairs, host_rows[top_k_index], -1)  # [1, K]
    torch.cat([hidden.reshape(-1).float(), rows.reshape(-1).float(), top_k_weights.reshape(-1).float()],
              out=packed)  # [H + 2K]
    gpu_ids.copy_(top_k_index.masked_fill(pairs, num_experts))
    cpu_pair.copy_(pairs.reshape(-1))
    tally.add_(pairs.sum())


def all_on_cpu(top_k: int) -> list[int]:
    """Split table that sends every miss to the CPU (MOE_CPU_EXPERTS=all)."""
    return list(range(top_k + 1))


def tune_split(layer, act_fn: Callable, repeats: int = 7, tie: float = 0.02) -> tuple[list[int], dict]:
    """Split table measured on `layer` (an OffloadedExperts with a cpu_share), as it will run: for every count of
    misses m a decode step can have, one-token forwards of the layer with each n_cpu = 0..m, timed end to end
    (the CPU and the GPU reading the same DRAM at once, the host function's own latency, the merge; on CUDA
    replayed from a graph of the layer, as in a decode step: OffloadedExperts.decode_timer); the
    fastest n_cpu wins; with LRU admission the smallest within `tie` of it (what the GPU reads gets cached, what
    the CPU computes does not). Without it, nothing is cached either way: at ratio 0 on the H200 a 2% preference
    for fewer had taken 3 of 8 misses at 1.081 ms a layer over 4 at 1.066
    (2026-11-29-h200-vs-llamacpp-session7-run2.json).

    The path costs every step its copies and host node, even when a step sends nothing to the CPU, so the layer
    is also timed without it, and the table is kept only if its expected time beats that by `tie`, the miss
    count weighted as under uniform routing (binomial over top-k with the layer's non-resident share); else a
    table of zeros (the path off). On the H200 the table alone, chosen against the path's own n_cpu = 0, made
    ratio-50 decode 10% slower than none (95.2 vs 105.4 tok/s,
    bench/results/2026-11-29-h200-hybrid-14-threads.json) while its layer timings promised 18-22% less at the
    miss counts it split.

    Returns (table, {"split": {m: [median seconds for n_cpu = 0..m]}, "off": {m: seconds without the path},
    "expected": {"on": seconds, "off": seconds}}).

    Each forward takes other host-tier experts, so neither side times weights still in its caches (the H200
    machine's CPU has 300 MiB of L3, the GPU 50 MiB of L2). A model of per-expert costs measured apart (each side
    timed alone, the split chosen so both finish together) mispredicted badly on the H200: it sent 3 of 8 misses
    to the CPU, which made decode 1.65-1.8x slower than none
    (bench/results/2026-11-29-h200-hybrid-costs-measured-apart.json).
    """
    share: CpuShare = layer.cpu_share
    top_k, device = layer.top_k, share.device
    prefer_fewer = tie if layer.lru_admission else 0.0
    from_host = layer._direct_from_host.tolist()
    in_host = [e for e, remote in enumerate(from_host) if remote]
    resident = [e for e, remote in enumerate(from_host) if not remote]
    hidden = torch.randn((1, layer.hidden), dtype=layer.gate_up.dtype, device=device) * 0.1  # [1, H]
    weights = torch.full((1, top_k), 1.0 / top_k, dtype=torch.float32, device=device)  # [1, K]
    cursor = [0]

    def routing(misses: int) -> torch.Tensor:  # [1, K]: `misses` host-tier experts, the rest resident
        picked = [in_host[(cursor[0] + i) % len(in_host)] for i in range(misses)]
        cursor[0] += misses
        return torch.tensor([picked + resident[:top_k - misses]], device=device)

    def median_time(timer, misses: int) -> float:
        timer(routing(misses))  # warm-up: compiles, first-touch, thread pools
        return statistics.median(timer(routing(misses)) for _ in range(repeats))

    table, split_times, off_times = [0] * (top_k + 1), {}, {}
    possible = [m for m in range(top_k + 1) if top_k - m <= len(resident) and m <= len(in_host)]
    reachable = [m for m in possible if m > 0]
    if not reachable:
        share.set_table(table)
        return table, {"split": split_times, "off": off_times, "expected": {}}
    share.set_table(all_on_cpu(top_k))
    timer = layer.decode_timer(hidden, routing(reachable[-1]), weights, act_fn)  # captured with the CPU path on
    for misses in possible:
        times = []
        for n_cpu in range(misses + 1):
            share.set_split(misses, n_cpu)
            times.append(median_time(timer, misses))
        best = min(times)
        table[misses] = next(n for n, t in enumerate(times) if t <= best * (1 + prefer_fewer))
        share.set_split(misses, table[misses])
        split_times[misses] = times
    share.set_table([0] * (top_k + 1))  # inactive: the next capture leaves the path out
    timer_off = layer.decode_timer(hidden, routing(reachable[-1]), weights, act_fn)
    for misses in possible:
        off_times[misses] = median_time(timer_off, misses)
    share.check()
    miss_share = len(in_host) / len(from_host)
    weight = {m: math.comb(top_k, m) * miss_share ** m * (1 - miss_share) ** (top_k - m) for m in possible}
    total = sum(weight.values())
    expected = {"on": sum(weight[m] * split_times[m][table[m]] for m in possible) / total,
                "off": sum(weight[m] * off_times[m] for m in possible) / total}
    if not any(table) or expected["on"] > expected["off"] * (1 - tie):
        table = [0] * (top_k + 1)
    share.set_table(table)
    return table, {"split": split_times, "off": off_times, "expected": expected}


def tune_cpu_path(layer, act_fn: Callable, runners: dict[str, CpuExperts]) -> tuple[str, list[int], dict]:
    """The CPU kernel and split table for `layer`'s CPU share, both measured: tune_split with each runner, and
    the runner whose table's expected step time is least wins (the first on a tie). Returns (name, table,
    {name: tune_split's timings}); the table is all zeros (the path off) when no runner's split pays.

    Why measure the kernel too: the numba kernel ran 1.7-2.0x torch's on a 2-core VM
    (bench/results/2026-11-29-cpu-numba-experts-2core.json) and 2.2-2.8x with 8 experts on the H200
    (bench/results/2026-11-29-h200-hybrid-latency*.json), but the machine that serves decides."""
    share: CpuShare = layer.cpu_share
    best, tunings = None, {}
    for name, runner in runners.items():
        share.runner = runner
        table, timings = tune_split(layer, act_fn)
        tunings[name] = timings
        score = timings["expected"].get("on", math.inf)
        if best is None or score < best[0]:
            best = (score, name, table)
    _, name, table = best
    share.runner = runners[name]
    share.set_table(table)
    share.tuning = tunings
    return name, table, tunings


class _TokenStamps:
    """A streamer (put/end) that stamps each token's arrival; the first put is the prompt."""

    def __init__(self):
        self.stamps: list[float] = []

    def put(self, _value) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass

    def decode_tok_s(self, warm: int = 3) -> float:
        """Tokens per second after the first `warm` tokens: the prefill's, the eager first step's and the step
        that captures the graph (its capture differs with the path on and off; the replays are what decode runs)."""
        if len(self.stamps) < warm + 2:  # no step after the warm ones timed
            return 0.0
        tokens, first, last = len(self.stamps) - 1 - warm, self.stamps[warm], self.stamps[-1]
        return tokens / (last - first) if last > first else 0.0


def check_on_decode(decoder, shares: list[CpuShare], prompt: torch.Tensor, new_tokens: int = 32,
                    rounds: int = 2, tie: float = 0.02) -> dict:
    """Keep the tuned split tables of `shares` only if whole greedy decodes run faster with them than with the
    CPU path left out: `rounds` generations of `new_tokens` from `prompt` [1, T] each way, alternating, best
    steady rate of each (the first "on" one also warms up).
    Returns {"decode_tok_s": {"on": .., "off": ..}, "kept": bool}.

    Why: tune_split times one layer alone, replayed from its own graph while the launching thread blocks. In a
    real decode the launching thread runs Python between steps, and a Python host function then waits for the
    GIL: on the H200 a no-op one took 0.05 ms while that thread blocked and 5.2 ms while it ran Python
    (bench/results/2026-11-29-h200-hybrid-latency.json; numba's parallel regions took it too, 21 ms a 1-expert
    share, -latency-libgomp-*.json: hence kernels/spin_pool.py). Then, tables whose layer timings promised 4%
    (ratio 50) made decode 15% slower (89.6 vs 105.5 tok/s, bench/results/2026-11-29-h200-hybrid-expected-vs-off.json).
    With the spin pool, at ratio 75 layer timings promised 13% and decodes ran 3% slower with the table (159.9 vs
    164.7 tok/s, bench/results/2026-11-29-h200-vs-llamacpp-session5.json): the check left the path off.
    """
    tables = [list(share.split_table) for share in shares]

    def use(on: bool) -> None:
        for share, table in zip(shares, tables):
            share.set_table(table if on else [0] * len(table))
        decoder.graph = None  # the path is captured into the step's graph, or left out of it: capture anew

    rates: dict[str, list[float]] = {"on": [], "off": []}
    for _ in range(rounds):
        for state in ("on", "off"):
            use(state == "on")
            stamps = _TokenStamps()
            decoder.generate(prompt, new_tokens, new_tokens, streamer=stamps)
            rates[state].append(stamps.decode_tok_s())
    best = {state: max(values) for state, values in rates.items()}
    kept = best["on"] > best["off"] * (1 + tie)
    use(kept)
    for share in shares:
        share.check()
    return {"decode_tok_s": best, "kept": kept}
