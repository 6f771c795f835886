"""One zero-copy layer's CPU share of a one-token decode step: which misses the CPU takes, the buffers it reads
and writes, and the handoff, all without a host sync, so the decode step stays one CUDA graph.

Why this shape: the launching thread must never wait mid-step, so every piece is ordered by CUDA streams. The
GPU decides the CPU's pairs and packs the layer's hidden state, those pairs' host-tier rows and the routing
weights into one device buffer (one Triton kernel where Triton runs, kernels/triton_hybrid.py, in place of ~20
tiny torch launches; else pack_share_torch). On a side stream that buffer is copied to a pinned mailbox, the CPU
computes its experts from the mailbox into pinned outputs, and those are copied back; the main stream runs the
GPU's share meanwhile, and the streams join before the K outputs are summed in the usual fixed order.

The CPU is handed its share through a doorbell (driver.py: the GPU rings a page-locked word and waits on another
while kernels/doorbell.py's spinning thread runs the compiled numba step, which never takes the GIL), or, where
the driver refuses stream memory operations or the kernel is torch's (which runs from Python), through a CUDA
host function.

Numerics: a CPU-computed expert rounds the same intermediates as the GPU kernels but accumulates in another
order, so outputs can differ from the all-GPU run by an ulp here and there (cpu_experts.py): the CPU path is
judged by the tolerance rule, not by bit-identity.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Callable

import numpy as np
import torch

from ..errors import MoeOffloadError
from ..kernels import triton_kernels
from ..tiers import HostTier, graph_host_buffer
from .cpu_experts import CpuExperts, is_silu
from .driver import HostFunction, NativeHostFunction, wait_then_clear


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
        # the split MOE_CPU_EXPERTS=auto measured (hybrid.enable), kept when a whole-decode check turned the path
        # off, so that a later check (hybrid.check_again) can try it again; None: nothing measured
        self.tuned_table: list[int] | None = None
        rows = [host.row_of.get(e, -1) for e in range(num_experts)]
        self.host_rows = torch.tensor(rows, dtype=torch.long, device=device)  # [E] host-tier row or -1
        on_cuda = device.type == "cuda"
        # [H + 2K] float32: hidden state (widened, exact), host row of each pair's expert (-1: not the CPU's),
        # routing weight of each pair (widened, exact)
        self._packed = torch.empty(hidden + 2 * top_k, dtype=torch.float32, device=device)
        self._gpu_ids = torch.empty((1, top_k), dtype=torch.long, device=device)  # [1, K] E where the CPU computes
        self._cpu_pair = torch.zeros(top_k, dtype=torch.uint8, device=device)  # [K] 1: the CPU computes this pair
        self._cpu_mask = self._cpu_pair.view(torch.bool).view(top_k, 1)  # [K, 1] the same bytes, for the merge
        fused = triton_kernels("moe_offload.hybrid.kernels.triton_hybrid", device)  # one launch where Triton runs
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
        # [1] one-token steps packed so far; also the value the GPU rings the doorbell with
        self._step = torch.zeros(1, dtype=torch.int32, device=device)
        self.tuning: dict = {}  # tune_cpu_path's: {kernel: tune_split's timings}
        self.stream_wait_refused: str | None = None  # why the driver refused the doorbell, if it did
        self._doorbell: torch.Tensor | None = None  # [DOORBELL_WORDS] int32, page-locked (use_stream_wait)

    @property
    def handoff(self) -> str:
        """How the GPU hands this layer's CPU experts over: stream_wait (the compiled numba step through the
        doorbell), else host_function (and why the driver refused stream_wait, if it did)."""
        if self._doorbell is not None and self.runner.compute == "numba":
            return "stream_wait"
        return "host_function" + (f" (stream_wait refused: {self.stream_wait_refused})"
                                  if self.stream_wait_refused else "")

    def use_stream_wait(self) -> None:
        """Hand the compiled step (numba kernel) to the CPU through a doorbell word and the doorbell server
        (kernels/doorbell.py) instead of a CUDA host function. CUDA only; check driver.stream_wait_available first."""
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
        """With the numba kernel on experts it computes (bf16, or int4/int8 straight from the tier's quantized
        rows; SiLU), the compiled step (no Python, no GIL); else _compute."""
        if self.runner.compute != "numba" or not is_silu(act_fn):
            return self._function  # (the numba runner's own checks then say what it cannot compute)
        from .kernels import cpu_numba

        if cpu_numba.why_not(self._dtype, self.host.gate_up, self.host.down) is not None:
            return self._function
        if self._native is None:
            inter, top_k = self.host.down.shape[2], self.top_k
            # the host tier's own views: each expert's planes contiguous, so nothing is copied (kept: the views)
            fields, kept = cpu_numba.weight_fields(self.host.gate_up, self.host.down, self._dtype,
                                                   self._weight_dtype)
            self._job_buffers = (np.empty(top_k, np.int64), np.empty(top_k, np.float32),
                                 np.empty((top_k, inter), np.float32), np.empty(top_k, np.int64), kept)
            pair_rows, weights, act, out_rows, _ = self._job_buffers  # [K], [K], [K, I], [K]: filled by the step
            self._job = cpu_numba.make_job(
                x=self._mailbox.data_ptr(), x_per_pair=0, pair_rows=pair_rows.ctypes.data,
                weights=weights.ctypes.data, act=act.ctypes.data, out=self._out_host.data_ptr(),
                out_rows=out_rows.ctypes.data, hidden=self.hidden, inter=inter, **fields)
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
            # (torch.set_num_threads also resizes torch's pthreadpool whenever the count changes: setting and
            # restoring it per call is avoidable work in every step, though what it cost was never isolated).
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
        wait_then_clear(self._stream, self._doorbell.data_ptr() + 4 * DONE)

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
    misses least likely to come back. On the shipped model's decode routing that kept more decode hits than
    giving the CPU the highest-weight misses (bench/hybrid_admission.py replays it).

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
