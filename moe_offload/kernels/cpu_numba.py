"""One-token SwiGLU experts on the CPU, from bf16 weights, as a numba kernel (cpu_experts.CpuExperts compute="numba").

Why: a one-token expert is two GEMVs, a memory stream over its weights. torch's CPU path (oneDNN) re-blocks a
plain weight matrix on every call and read expert weights at 24-35 GB/s on the H200 machine, whose plain read
runs at 84.6 GB/s (bench/results/2026-11-29-h200-cpu-experts.log). Widening each bf16 row to float32 (a 16-bit
shift of the bits) in a per-thread buffer and accumulating in float32 read them at 25.1 GB/s against torch's 18.2
on a 2-core machine (bench/cpu_gemv_numba.py, bench/results/2026-11-29-cpu-gemv-numba-2core.json); whole experts
here, 8 per call, 1.7-2.0x torch's (bench/cpu_numba_experts.py, bench/results/2026-11-29-cpu-numba-experts-2core.json).
hybrid.tune_cpu_path still times both on the serving machine and keeps the faster.

All (token, expert) pairs of a call run in two parallel loops: every pair's gate/up rows, then every pair's down
rows, in chunks of rows, so a call costs two parallel regions, not two per expert.

Rounding: torch rounds the gate/up GEMM output, silu(gate), silu(gate) * up, the down GEMM output and (bf16
routing weights) the weighted output to bf16; so does this (round to nearest even), accumulating in float32 in
another order (fastmath lets the compiler vectorise the sums), so outputs can differ from torch's by an ulp.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import torch

_CHUNK = 16  # output rows per parallel work item


def available() -> bool:
    return importlib.util.find_spec("numba") is not None


_kernel = None


def _compile():
    """The njit kernel, compiled on first use (importing numba costs ~0.5 s; most runs never need it)."""
    global _kernel
    if _kernel is not None:
        return _kernel
    from numba import njit, prange

    @njit(inline="always")
    def round_bf16(values):  # float32 [n] in place: round to nearest even at 8 significant bits
        bits = values.view(np.uint32)
        for j in range(bits.size):
            b = bits[j]
            if (b & np.uint32(0x7F800000)) != np.uint32(0x7F800000):  # finite: add half an ulp, ties to even
                b = b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))
            elif (b & np.uint32(0x007FFFFF)) != 0:  # NaN stays NaN
                b = np.uint32(0x7FC00000)
            bits[j] = b & np.uint32(0xFFFF0000)

    @njit(inline="always")
    def dot_bf16(row_bits, x, wide):  # bf16 row [K] (uint16) . x [K] float32, via wide [K] uint32 scratch
        for j in range(row_bits.size):
            wide[j] = np.uint32(row_bits[j]) << np.uint32(16)
        values = wide.view(np.float32)
        acc = np.float32(0.0)
        for j in range(values.size):
            acc += values[j] * x[j]
        return acc

    @njit(parallel=True, fastmath=True)
    def experts(x, gate_up, down, pair_rows, weights, round_product, act, out):
        # P = pairs, H = hidden, I = intermediate; x [P, H] f32, gate_up [N, 2I, H] u16, down [N, H, I] u16,
        # pair_rows [P] (the pool row of each pair's expert), weights [P] f32, act [P, I] f32 scratch, out [P, H]
        pairs, hidden = x.shape
        inter = down.shape[2]
        up_chunks = (inter + _CHUNK - 1) // _CHUNK
        for item in prange(pairs * up_chunks):
            p, first = item // up_chunks, (item % up_chunks) * _CHUNK
            rows = min(_CHUNK, inter - first)
            wide = np.empty(hidden, np.uint32)
            gate = np.empty(rows, np.float32)
            up = np.empty(rows, np.float32)
            for r in range(rows):
                gate[r] = dot_bf16(gate_up[pair_rows[p], first + r], x[p], wide)
                up[r] = dot_bf16(gate_up[pair_rows[p], inter + first + r], x[p], wide)
            round_bf16(gate)
            round_bf16(up)
            for r in range(rows):
                gate[r] = gate[r] / (np.float32(1.0) + np.exp(-gate[r]))  # silu
            round_bf16(gate)
            for r in range(rows):
                gate[r] = gate[r] * up[r]
            round_bf16(gate)
            act[p, first:first + rows] = gate
        down_chunks = (hidden + _CHUNK - 1) // _CHUNK
        for item in prange(pairs * down_chunks):
            p, first = item // down_chunks, (item % down_chunks) * _CHUNK
            rows = min(_CHUNK, hidden - first)
            wide = np.empty(inter, np.uint32)
            result = np.empty(rows, np.float32)
            for r in range(rows):
                result[r] = dot_bf16(down[pair_rows[p], first + r], act[p], wide)
            round_bf16(result)
            for r in range(rows):
                result[r] = result[r] * weights[p]
            if round_product:
                round_bf16(result)
            out[p, first:first + rows] = result

    _kernel = experts
    return _kernel


def _bits(tensor: torch.Tensor) -> np.ndarray:
    """The bf16 tensor's bits as a numpy uint16 array (no copy)."""
    return tensor.view(torch.int16).numpy().view(np.uint16)


def swiglu_experts(hidden: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                   pair_rows: list[int], out: torch.Tensor) -> None:
    """out [P, H] float32 = weights[p] * expert_{pair_rows[p]}(hidden[p]) for SiLU-gated experts.

    hidden [P, H] bf16, weights [P] (bf16 or float32: a float32 weight's product is not rounded, as in torch),
    gate_up [N, 2I, H] and down [N, H, I] bf16 pools on the CPU (a host tier's), pair_rows: a pool row per pair.
    """
    kernel = _compile()
    x = hidden.float().numpy()  # [P, H] exact widening
    rows = np.asarray(pair_rows, dtype=np.int64)  # [P]
    act = np.empty((len(pair_rows), down.shape[2]), dtype=np.float32)  # [P, I]
    kernel(x, _bits(gate_up), _bits(down), rows, weights.float().numpy(), weights.dtype == torch.bfloat16, act,
           out.numpy())


def warm_up() -> None:
    """Compile the kernel now, for the argument types a hybrid step passes (an expanded one-token hidden state),
    so no first call compiles it (seconds of work) inside a CUDA host function.

    It runs on one thread, so the calling thread gets no OpenMP team. Why: libgomp keeps a team of threads per
    thread that opens parallel regions, and once the teams' threads together outnumber the CPUs, every idle
    thread spins only 100 times (GOMP_SPINCOUNT's "throttled" count) before it sleeps on a futex, so each of a
    decode step's regions waits for threads to wake. A hybrid decode opens its regions on the CUDA driver's
    callback thread (the compiled host step): that thread's team should be the only one."""
    import numba

    hidden = torch.zeros((1, 8), dtype=torch.bfloat16).expand(2, 8)  # [P=2, H=8]
    gate_up, down = torch.zeros((1, 8, 8), dtype=torch.bfloat16), torch.zeros((1, 8, 4), dtype=torch.bfloat16)
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        swiglu_experts(hidden, torch.ones(2), gate_up, down, [0, 0], torch.empty((2, 8)))
    finally:
        numba.set_num_threads(threads)


# A hybrid layer's mailbox step as a C function (numba cfunc): field order of its int64 descriptor.
DESCRIPTOR_FIELDS = ("mailbox", "out", "gate_up", "down", "hidden", "inter", "top_k", "rows", "round_product",
                     "threads")
_step_function = None


def step_function() -> int:
    """Address of `void step(int64 *descriptor)`: the CPU share of one hybrid decode step (hybrid.CpuShare), with
    no Python in it, so a CUDA host node runs it without taking the GIL.

    Why: a host function written in Python waits for the GIL, and the thread that launches decode steps holds
    it while it runs Python between them: on the H200 a no-op host node took 0.05 ms while that thread blocked
    and 5.2 ms while it ran Python (bench/results/2026-11-29-h200-hybrid-latency.json).

    The descriptor holds addresses and sizes (DESCRIPTOR_FIELDS): the float32 mailbox [H + 2K] (hidden state,
    each pair's host-tier row or -1, each pair's weight), the float32 output rows [K, H], the bf16 pools
    gate_up [N, 2I, H] and down [N, H, I], then H, I, K, N, whether products round to bf16, and the thread count.
    It computes what swiglu_experts computes for the pairs whose row is >= 0, into their output rows: the same
    kernel on the same float32 inputs, so the same bits.
    """
    global _step_function
    if _step_function is not None:
        return _step_function
    import numba
    from numba import carray, cfunc, njit, types
    from numba.core import cgutils
    from numba.extending import intrinsic

    kernel = _compile()
    fields = len(DESCRIPTOR_FIELDS)

    @intrinsic
    def as_pointer(typingctx, address):  # int64 -> void*
        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], cgutils.voidptr_t)
        return types.voidptr(types.int64), codegen

    @njit
    def step(desc):
        hidden, inter, top_k, rows = desc[4], desc[5], desc[6], desc[7]
        box = carray(as_pointer(desc[0]), (hidden + 2 * top_k,), np.float32)
        out_rows = carray(as_pointer(desc[1]), (top_k, hidden), np.float32)
        gate_up = carray(as_pointer(desc[2]), (rows, 2 * inter, hidden), np.uint16)
        down = carray(as_pointer(desc[3]), (rows, hidden, inter), np.uint16)
        pairs = 0
        for k in range(top_k):
            if box[hidden + k] >= 0:
                pairs += 1
        if pairs == 0:
            return
        x = np.empty((pairs, hidden), np.float32)  # [P, H] the one token's hidden state, once per pair
        pair_rows = np.empty(pairs, np.int64)  # [P]
        weights = np.empty(pairs, np.float32)  # [P]
        slots = np.empty(pairs, np.int64)  # [P] each pair's k
        p = 0
        for k in range(top_k):
            if box[hidden + k] >= 0:
                x[p] = box[:hidden]
                pair_rows[p] = np.int64(box[hidden + k])
                weights[p] = box[hidden + top_k + k]
                slots[p] = k
                p += 1
        act = np.empty((pairs, inter), np.float32)  # [P, I]
        out = np.empty((pairs, hidden), np.float32)  # [P, H]
        numba.set_num_threads(desc[9])
        kernel(x, gate_up, down, pair_rows, weights, desc[8] != 0, act, out)
        for p in range(pairs):
            out_rows[slots[p]] = out[p]

    @cfunc(types.void(types.voidptr))
    def host_step(user_data):
        step(carray(user_data, (fields,), np.int64))

    _step_function = host_step.address
    _keep_alive.append(host_step)
    return _step_function


_keep_alive: list = []  # the compiled cfunc (its address must stay valid)
