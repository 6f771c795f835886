"""One-token SwiGLU experts on the CPU, from bf16 weights, as a numba kernel (cpu_experts.CpuExperts compute="numba").

Why: a one-token expert is two GEMVs, a memory stream over its weights, so what counts is how close a kernel
reads to the DRAM's bandwidth. torch's CPU path (oneDNN) re-blocks a plain weight matrix on every call and reads
expert weights at well under half of what a plain read of the same memory reaches. Widening each bf16 row to
float32 (a 16-bit shift of the bits) in a per-thread buffer and accumulating in float32 streams them faster, and
has run whole experts well ahead of torch's (bench/cpu_numba_experts.py measures it). tuning.tune_cpu_path still
times both on the serving machine and keeps the faster.

Every (token, expert) pair of a call is cut into work items of a few rows (UP_CHUNK, DOWN_CHUNK), handed out
to the threads of a spin_pool.SpinPool (phase 1: each pair's gate/up rows; phase 2, once phase 1 is done: its
down rows). Why not numba's parallel=True: its regions take the GIL and sleep between calls (spin_pool.py says
how much that cost).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import torch


def available() -> bool:
    return importlib.util.find_spec("numba") is not None


# A job's int64 descriptor (addresses and sizes), the unit a SpinPool runs: pair p computes
# out[out_rows[p]] = weights[p] * expert_{pair_rows[p]}(x[p if x_per_pair else 0]).
# gate_up / down: the pools' first expert; *_stride: bytes from one expert to the next (a host tier's rows hold
# both matrices, expert_format.py), each expert's matrix itself contiguous.
JOB_FIELDS = ("x", "x_per_pair", "gate_up", "down", "gate_up_stride", "down_stride", "pair_rows", "weights", "act",
              "out", "out_rows", "hidden", "inter", "round_product")
(_X, _X_PER_PAIR, _GATE_UP, _DOWN, _GATE_UP_STRIDE, _DOWN_STRIDE, _PAIR_ROWS, _WEIGHTS, _ACT, _OUT, _OUT_ROWS,
 _HIDDEN, _INTER, _ROUND_PRODUCT) = range(len(JOB_FIELDS))
UP_CHUNK, DOWN_CHUNK = 8, 32  # rows per work item: gate and up rows (64 KB of H=2048 weights), down rows (48 KB)

_compiled: dict = {}


def _functions():
    """(run_item, as_pointer), compiled on first use (importing numba costs ~0.5 s; most runs never need it)."""
    if "run_item" in _compiled:
        return _compiled["run_item"], _compiled["as_pointer"]
    from numba import carray, njit, types
    from numba.core import cgutils
    from numba.extending import intrinsic

    @intrinsic
    def as_pointer(typingctx, address):  # int64 -> void*
        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], cgutils.voidptr_t)
        return types.voidptr(types.int64), codegen

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

    @njit(inline="always", fastmath=True)
    def dot_bf16(row_bits, x, wide):  # bf16 row [K] (uint16) . x [K] float32, via wide [K] uint32 scratch
        for j in range(row_bits.size):
            wide[j] = np.uint32(row_bits[j]) << np.uint32(16)
        values = wide.view(np.float32)
        acc = np.float32(0.0)
        for j in range(values.size):
            acc += values[j] * x[j]
        return acc

    @njit(inline="always")
    def floats(address, count):
        return carray(as_pointer(address), (count,), np.float32)

    @njit(nogil=True, fastmath=True)
    def run_item(job_address, phase, index):
        # H = hidden, I = intermediate; an expert's gate_up [2I, H] and down [H, I] bf16 bits
        job = carray(as_pointer(job_address), (len(JOB_FIELDS),), np.int64)
        hidden, inter = job[_HIDDEN], job[_INTER]
        p_count = index + 1  # enough of the per-pair arrays to read pair p (p <= index)
        if phase == 1:  # gate/up rows [first, first + n) of pair p -> act[p, first:first + n]
            chunks = (inter + UP_CHUNK - 1) // UP_CHUNK
            p, first = index // chunks, (index % chunks) * UP_CHUNK
            n = min(UP_CHUNK, inter - first)
            expert = carray(as_pointer(job[_PAIR_ROWS]), (p_count,), np.int64)[p]
            gate_up = carray(as_pointer(job[_GATE_UP] + expert * job[_GATE_UP_STRIDE]), (2 * inter, hidden),
                             np.uint16)
            x = floats(job[_X] + 4 * hidden * p * job[_X_PER_PAIR], hidden)  # [H]
            wide = np.empty(hidden, np.uint32)
            gate = np.empty(n, np.float32)
            up = np.empty(n, np.float32)
            for r in range(n):
                gate[r] = dot_bf16(gate_up[first + r], x, wide)
                up[r] = dot_bf16(gate_up[inter + first + r], x, wide)
            round_bf16(gate)
            round_bf16(up)
            for r in range(n):
                gate[r] = gate[r] / (np.float32(1.0) + np.exp(-gate[r]))  # silu
            round_bf16(gate)
            for r in range(n):
                gate[r] = gate[r] * up[r]
            round_bf16(gate)
            floats(job[_ACT] + 4 * (p * inter + first), n)[:] = gate
        else:  # down rows [first, first + n) of pair p -> out[out_rows[p], first:first + n]
            chunks = (hidden + DOWN_CHUNK - 1) // DOWN_CHUNK
            p, first = index // chunks, (index % chunks) * DOWN_CHUNK
            n = min(DOWN_CHUNK, hidden - first)
            expert = carray(as_pointer(job[_PAIR_ROWS]), (p_count,), np.int64)[p]
            weight = floats(job[_WEIGHTS], p_count)[p]
            out_row = carray(as_pointer(job[_OUT_ROWS]), (p_count,), np.int64)[p]
            down = carray(as_pointer(job[_DOWN] + expert * job[_DOWN_STRIDE]), (hidden, inter), np.uint16)
            act = floats(job[_ACT] + 4 * p * inter, inter)  # [I]
            wide = np.empty(inter, np.uint32)
            result = np.empty(n, np.float32)
            for r in range(n):
                result[r] = dot_bf16(down[first + r], act, wide)
            round_bf16(result)
            for r in range(n):
                result[r] = result[r] * weight
            if job[_ROUND_PRODUCT]:
                round_bf16(result)
            floats(job[_OUT] + 4 * (out_row * hidden + first), n)[:] = result

    _compiled.update(run_item=run_item, as_pointer=as_pointer)
    return run_item, as_pointer


def as_pointer():
    """The numba intrinsic as_pointer(int64 address) -> void*, for carray views of raw addresses."""
    return _functions()[1]


def item_counts(pairs: int, hidden: int, inter: int) -> tuple[int, int]:
    """Work items of a job's two phases."""
    return pairs * -(-inter // UP_CHUNK), pairs * -(-hidden // DOWN_CHUNK)


_pools: dict[int, object] = {}


def pool(threads: int):
    """The process's SpinPool for `threads` threads in all (the driving thread and threads - 1 workers): one per
    count, started on first use and kept (its idle workers sleep after ~20 ms)."""
    from .spin_pool import SpinPool

    threads = max(1, int(threads))
    if threads not in _pools:
        _pools[threads] = SpinPool(threads - 1, _functions()[0])
    return _pools[threads]


def make_job(**fields: int) -> np.ndarray:
    """A job descriptor from JOB_FIELDS' values (addresses of C-contiguous buffers, sizes, flags)."""
    return np.array([int(fields[name]) for name in JOB_FIELDS], dtype=np.int64)


def _experts_contiguous(pool: torch.Tensor) -> torch.Tensor:
    """pool [N, R, C] itself where each expert's [R, C] matrix is contiguous (a host tier's rows), else a copy."""
    return pool if pool.stride()[1:] == (pool.shape[2], 1) else pool.contiguous()


def swiglu_experts(hidden: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                   pair_rows: list[int], out: torch.Tensor, threads: int) -> None:
    """out [P, H] float32 = weights[p] * expert_{pair_rows[p]}(hidden[p]) for SiLU-gated experts, on `threads`
    threads (this one and the pool's).

    hidden [P, H] bf16, weights [P] (bf16 or float32: a float32 weight's product is not rounded, as in torch),
    gate_up [N, 2I, H] and down [N, H, I] bf16 pools on the CPU (a host tier's views: any stride between experts,
    each expert's matrix contiguous), pair_rows: a pool row per pair; out contiguous.
    """
    count, hidden_size = hidden.shape
    if count == 0:
        return
    inter = down.shape[2]
    x = hidden.float().contiguous().numpy()  # [P, H] exact widening
    rows = np.asarray(pair_rows, dtype=np.int64)  # [P]
    scale = weights.float().contiguous().numpy()  # [P]
    act = np.empty((count, inter), dtype=np.float32)  # [P, I]
    out_rows = np.arange(count, dtype=np.int64)  # [P]
    gate_up, down = _experts_contiguous(gate_up), _experts_contiguous(down)
    out_array = out.numpy()
    job = make_job(x=x.ctypes.data, x_per_pair=1, gate_up=gate_up.data_ptr(), down=down.data_ptr(),
                   gate_up_stride=gate_up.stride(0) * 2, down_stride=down.stride(0) * 2,
                   pair_rows=rows.ctypes.data, weights=scale.ctypes.data,
                   act=act.ctypes.data, out=out_array.ctypes.data, out_rows=out_rows.ctypes.data,
                   hidden=hidden_size, inter=inter, round_product=weights.dtype == torch.bfloat16)
    pool(threads).run(job, *item_counts(count, hidden_size, inter))


def warm_up(threads: int) -> None:
    """Compile the kernel and start the pool for `threads` now, so no first call compiles (seconds of work) or
    starts threads inside a CUDA host function."""
    hidden = torch.zeros((1, 8), dtype=torch.bfloat16).expand(2, 8)  # [P=2, H=8]
    gate_up, down = torch.zeros((1, 8, 8), dtype=torch.bfloat16), torch.zeros((1, 8, 4), dtype=torch.bfloat16)
    swiglu_experts(hidden, torch.ones(2), gate_up, down, [0, 0], torch.empty((2, 8)), threads)


# A hybrid layer's mailbox step as a C function (numba cfunc): field order of its int64 descriptor.
DESCRIPTOR_FIELDS = ("job", "control", "hidden", "top_k")
_step_function = None


def step_function() -> int:
    """Address of `void step(int64 *descriptor)`: the CPU share of one hybrid decode step (share.CpuShare), with
    no Python in it and no GIL taken, so a CUDA host node runs it while the launching thread runs Python.

    The descriptor (DESCRIPTOR_FIELDS): the address of a job (make_job) whose x is the float32 mailbox
    [H + 2K] (hidden state, each pair's host-tier row or -1, each pair's weight), with x_per_pair 0, out the
    float32 output rows [K, H] and pair_rows / weights / out_rows buffers of K entries that the step fills from
    the mailbox; then the SpinPool's control block address, H and K. It computes what swiglu_experts computes for
    the pairs whose row is >= 0, into their output rows: the same work items on the same float32 inputs, so the
    same bits.
    """
    global _step_function
    if _step_function is not None:
        return _step_function
    from numba import carray, cfunc, types

    step = step_kernel()
    fields = len(DESCRIPTOR_FIELDS)

    @cfunc(types.void(types.voidptr))
    def host_step(user_data):
        step(carray(user_data, (fields,), np.int64))

    _step_function = host_step.address
    _keep_alive.append(host_step)
    return _step_function


def step_kernel():
    """step(descriptor: int64 [len(DESCRIPTOR_FIELDS)]): the body of step_function, as a nogil njit function for
    other compiled callers (kernels/doorbell.py)."""
    if "step" in _compiled:
        return _compiled["step"]
    from numba import carray, njit

    from .spin_pool import CONTROL_WORDS, pool_functions

    run_item, as_pointer = _functions()
    drive = pool_functions(run_item)[1]

    @njit(nogil=True)
    def step(desc):
        job_address, hidden, top_k = desc[0], desc[2], desc[3]
        job = carray(as_pointer(job_address), (len(JOB_FIELDS),), np.int64)
        box = carray(as_pointer(job[_X]), (hidden + 2 * top_k,), np.float32)
        pair_rows = carray(as_pointer(job[_PAIR_ROWS]), (top_k,), np.int64)
        weights = carray(as_pointer(job[_WEIGHTS]), (top_k,), np.float32)
        out_rows = carray(as_pointer(job[_OUT_ROWS]), (top_k,), np.int64)
        pairs = 0
        for k in range(top_k):
            if box[hidden + k] >= 0:
                pair_rows[pairs] = np.int64(box[hidden + k])
                weights[pairs] = box[hidden + top_k + k]
                out_rows[pairs] = k
                pairs += 1
        if pairs > 0:
            inter = job[_INTER]
            control = carray(as_pointer(desc[1]), (CONTROL_WORDS,), np.int64)
            drive(control, job_address, pairs * ((inter + UP_CHUNK - 1) // UP_CHUNK),
                  pairs * ((hidden + DOWN_CHUNK - 1) // DOWN_CHUNK))

    _compiled["step"] = step
    return step


_keep_alive: list = []  # the compiled cfunc (its address must stay valid)
