"""CPU expert path: routed experts' outputs computed on the CPU straight from the host tier.

share.py runs it for part of a decode step's misses (MOE_CPU_EXPERTS). The engine streams a miss's weights to the
GPU; for a batch-1 decode step the same expert can instead be computed where its weights already are. One token
per expert makes an expert two GEMVs over its weights, each weight read once and used once: the cost is memory
bandwidth plus a fixed cost per call and per expert (Python dispatch, OpenMP fork/join).

Kernels (`compute`): "native" runs transformers' own torch ops on the tier as stored (bf16: half the bytes of
float32; oneDNN re-blocks the weight on every call, so a core is compute-bound well below what a plain read of the
same bytes reaches); "float32" widens bf16 to float32 in L2-sized blocks for CPUs where torch has no bf16 GEMM;
"numba" (kernels/cpu_numba.py, bf16 SiLU experts) reads the weights at close to memory speed with no Python in the
loop, which is why the hybrid path prefers it where it applies; "int4pack" (int4pack.py) runs symmetric int4
experts on torch's compiled int4 kernel from a repacked copy of the pools (prepare), the rest as "float32" does.

Quantized experts (int4/int8, expert_format.QuantMatrix views of the host tier's rows) run in every mode:
"numba" computes them from the packed bytes inside its dot products, each group's sum scaled once, its weights
not rounded as reference.dense rounds them (within rounding, not the same bits; bf16 or float32 hidden states,
float32 ones only on float32 scales; what it cannot take goes to "float32"); "float32" dequantizes block by
block of rows into the same L2-sized float32 buffer it widens bf16 into, so a whole dequantized expert never
exists; "native" is the reference's own ops (reference.dense dequantizes the whole expert each call: the oracle,
not a fast path). "float32" and "native" dequantize as reference.dense does: (u - z) * scale exact in float32,
rounded to the scale's dtype, then to the compute dtype. FP8 block-quantized experts (expert_format.FP8Matrix)
run in all three: "numba" decodes the e4m3 codes in its dot products (cpu_numba.dot_fp8), the others
float(fp8) * block scale, rounded once to the compute dtype, block by block of rows as above.

Threads: a pool of workers, each a fixed small team, overlaps Python dispatch where torch releases the GIL. How
libgomp's idle threads wait decides the rest: a spinning team steals the cores the pool's workers need, and with
other work on the cores a spinning team collapses to one region per scheduler tick. So: threads = the cores
nothing else needs (leave the GPU-driving thread its core), one fixed configuration (teams of one size), and
OMP_WAIT_POLICY=PASSIVE or a short GOMP_SPINCOUNT when it shares cores.

Rounding: the same torch ops as transformers' eager experts (reference.weighted_expert_output), so every
intermediate is rounded to the hidden dtype at the same points: the gate/up GEMM output, act(gate),
act(gate) * up, the down GEMM output and the weighted output (in the routing weight's dtype), then widened to
float32. compute="native" with one worker is the reference's own ops: the same bits as the reference run on the
CPU. Against the GPU (cuBLAS or the Triton kernel: float32 accumulation, rounded once) results differ where
another accumulation order moves one of those roundings by an ulp, which then propagates: bit-identical results
across devices are not to be expected, and mixing CPU- and GPU-computed experts in one step gives up the
engine's "the same bits at every ratio" (the CPU path is held to a tolerance instead).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..errors import MoeOffloadError
from ..expert_format import FP8Matrix, Matrix, QuantMatrix
from ..kernels.reference import dense, dequantize
from . import int4pack
from .int4pack import Int4PackCopy

ActFn = Callable[[torch.Tensor], torch.Tensor]
COMPUTE_MODES = ("native", "float32", "numba", "int4pack")
# compute="float32": bytes of float32 weight converted per block, small enough to stay in a core's L2 so the
# conversion costs no DRAM traffic; the GEMV then reads the block from L2 (smaller blocks pay more per-op cost).
DEFAULT_BLOCK_BYTES = 2 * 1024 * 1024

_scratch = threading.local()


def _expert_native(x: torch.Tensor, weights: torch.Tensor, gate_up: Matrix, down: Matrix,
                   act_fn: ActFn, out: torch.Tensor) -> None:
    """out [n, H] float32 = weights[:, None] * expert(x), with reference.weighted_expert_output's ops (a quantized
    expert dequantized whole by reference.dense, as the reference does)."""
    gate, up = F.linear(x, dense(gate_up, x.dtype)).chunk(2, dim=-1)  # [n, I] each, rounded to x's dtype
    # copy_ widens exactly, as .float() does
    out.copy_(F.linear(act_fn(gate) * up, dense(down, x.dtype)) * weights[:, None])


def dequantize_rows(matrix: QuantMatrix | FP8Matrix, start: int, stop: int, dtype: torch.dtype,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows [start, stop) of one quantized matrix [N, K] as float32 [stop - start, K] holding exactly what
    reference.dense(matrix, dtype) holds there: (u - z) * scale in float32, rounded to the scale's dtype, then to
    `dtype`. Why rows: the float32 path dequantizes an L2-sized block at a time, never a whole expert. out: an
    optional float32 [stop - start, K] destination."""
    weight = dequantize(matrix, start, stop)  # [r, K] float32
    if isinstance(matrix, QuantMatrix):
        weight = weight.to(matrix.scale.dtype)  # as dense() rounds (FP8: once, to dtype)
    weight = weight.to(dtype)
    return weight.float() if out is None else out.copy_(weight)


def _block_scratch(numel: int) -> torch.Tensor:
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.numel() < numel:
        buffer = torch.empty(numel, dtype=torch.float32)
        _scratch.buffer = buffer
    return buffer


def _widen_rows(weight: Matrix, start: int, stop: int, dtype: torch.dtype, out: torch.Tensor) -> torch.Tensor:
    """out float32 [stop - start, K] = rows [start, stop) of weight as the compute sees them: a dense weight
    widened exactly, a quantized one dequantized (dequantize_rows)."""
    if isinstance(weight, (QuantMatrix, FP8Matrix)):
        return dequantize_rows(weight, start, stop, dtype, out)
    return out.copy_(weight[start:stop])


def _linear_widened(x32: torch.Tensor, weight: Matrix, block_bytes: int | None,
                    dtype: torch.dtype) -> torch.Tensor:
    """x32 [n, K] float32 times weight [N, K] (any dtype, or quantized: its values in `dtype`, the compute
    dtype) in float32 -> [n, N] float32.

    The weight is converted block by block of rows into a per-thread float32 scratch buffer (L2-sized), so the
    float32 copy never goes to DRAM; block_bytes None converts it whole.
    """
    n_out, k = weight.shape
    rows = n_out if not block_bytes else max(1, min(n_out, block_bytes // (4 * k)))
    if rows >= n_out:
        return F.linear(x32, _widen_rows(weight, 0, n_out, dtype, torch.empty((n_out, k), dtype=torch.float32)))
    scratch = _block_scratch(rows * k)
    out_t = torch.empty((n_out, x32.shape[0]), dtype=torch.float32)  # [N, n]: row blocks are contiguous
    for start in range(0, n_out, rows):
        stop = min(n_out, start + rows)
        block = _widen_rows(weight, start, stop, dtype, scratch[:(stop - start) * k].view(stop - start, k))
        torch.mm(block, x32.t(), out=out_t[start:stop])
    return out_t.t()


def _expert_float32(x: torch.Tensor, weights: torch.Tensor, gate_up: Matrix, down: Matrix,
                    act_fn: ActFn, out: torch.Tensor, block_bytes: int | None) -> None:
    """As _expert_native, but the GEMMs run in float32 on weights widened (or dequantized) on the fly.

    Products of two bf16 (or fp16) values are exact in float32, so this rounds the same intermediates at the
    same points as the native path; only the float32 accumulation order differs.
    """
    dtype = x.dtype
    gate, up = _linear_widened(x.float(), gate_up, block_bytes, dtype).to(dtype).chunk(2, dim=-1)  # [n, I] each
    hidden = act_fn(gate) * up  # [n, I]
    out.copy_(_linear_widened(hidden.float(), down, block_bytes, dtype).to(dtype) * weights[:, None])


class CpuExperts:
    """Computes routed experts on the CPU from host-resident weights; see the module docstring.

    threads: intra-op threads in all (default: torch.get_num_threads() of the constructing thread). Leave a core
    to the thread that drives the GPU when both run at once.
    workers: how many experts run at once; each gets threads // workers intra-op threads (the remainder to the
    first ones). A call with fewer experts than workers uses fewer, each with more threads. The calling thread
    runs one share itself; workers - 1 pool threads run the rest. submit() runs a call in the background.
    compute: "native" (GEMMs in the weights' dtype: oneDNN for bf16), "float32" (weights widened block by
    block; for CPUs without a bf16 GEMM kernel), "numba" (kernels/cpu_numba.py: every pair's GEMVs cut into work
    items for a pool of `threads` spinning threads, kernels/spin_pool.py; bf16 or int4/int8 pools, SiLU experts,
    workers ignored) or "int4pack" (symmetric int4 pools on torch's int4 kernel from a repacked copy, made by
    prepare or the first call; hidden states in the scales' dtype; other pools as "float32"). Quantized pools: see
    the module docstring.
    """

    def __init__(self, threads: int | None = None, workers: int = 1, compute: str = "native",
                 block_bytes: int | None = DEFAULT_BLOCK_BYTES):
        if compute not in COMPUTE_MODES:
            raise MoeOffloadError(f"unknown CPU expert compute mode {compute!r}; expected one of {COMPUTE_MODES}")
        self.threads = int(threads) if threads else torch.get_num_threads()
        if self.threads < 1 or workers < 1:
            raise MoeOffloadError(f"CpuExperts needs threads >= 1 and workers >= 1, got {threads}, {workers}")
        self.workers = min(int(workers), self.threads)
        self.compute = compute
        self.block_bytes = block_bytes
        self._pool = (ThreadPoolExecutor(self.workers - 1, thread_name_prefix="moe-cpu-experts")
                      if self.workers > 1 else None)
        self._driver: ThreadPoolExecutor | None = None
        self._copies: dict[int, Int4PackCopy] = {}  # "int4pack": gate_up pool's packed data_ptr -> its copy
        if compute == "numba":
            from .kernels import cpu_numba

            cpu_numba.warm_up(self.threads)  # compiled and started here, not in a first call on a driver's thread

    def submit(self, *args, **kwargs) -> Future:
        """Run __call__(*args, **kwargs) on a background thread and return its Future, so the calling thread
        can go on streaming other experts to the GPU meanwhile (torch ops release the GIL while they run)."""
        if self._driver is None:
            self._driver = ThreadPoolExecutor(1, thread_name_prefix="moe-cpu-experts-driver")
        return self._driver.submit(self, *args, **kwargs)

    def prepare(self, gate_up: Matrix, down: Matrix) -> int:
        """compute="int4pack": make the repacked copy of these pools (a host tier's) now rather than in a first
        call; returns its bytes (0: no copy, the pools are not what the kernel takes)."""
        copy = self._copy(gate_up, down) if self.compute == "int4pack" else None
        return copy.nbytes if copy else 0

    def _copy(self, gate_up: Matrix, down: Matrix) -> Int4PackCopy | None:
        if not (int4pack.takes(gate_up) and int4pack.takes(down)):
            return None
        key = gate_up.packed.data_ptr()
        if key not in self._copies:
            self._copies[key] = Int4PackCopy(gate_up, down)
        return self._copies[key]

    @property
    def copy_bytes(self) -> int:
        """Host bytes of the repacked copies this runner holds (compute="int4pack")."""
        return sum(copy.nbytes for copy in self._copies.values())

    def release_copies(self) -> None:
        """Drop the repacked copies (int4pack): a later call makes the one it needs again."""
        self._copies.clear()

    def close(self) -> None:
        self.release_copies()
        for executor in (self._driver, self._pool):
            if executor is not None:
                executor.shutdown(wait=True)
        self._pool = self._driver = None

    def __enter__(self) -> "CpuExperts":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __call__(self, hidden: torch.Tensor, weights: torch.Tensor, gate_up: Matrix,
                 down: Matrix, slots: Sequence[int], counts: Sequence[int], act_fn: ActFn = F.silu,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        """[n_pairs, H] float32: row p = weights[p] * expert(hidden[p]) for the expert that owns pair p.

        hidden [n_pairs, H] and weights [n_pairs]: the (token, k) pairs grouped by expert, the first counts[0]
        rows for the expert at slots[0] of the pools, the next counts[1] for slots[1], and so on.
        gate_up [n, 2I, H] (gate rows, then up rows) and down [n, H, I]: pools on the CPU, such as a HostTier's
        gate_up and down (tensors, or QuantMatrix stacks of a quantized format).
        out: optional [n_pairs, H] float32 destination (a pinned buffer, say).
        """
        n_pairs = _check(hidden, weights, gate_up, down, slots, counts, out)
        if out is None:
            out = torch.empty((n_pairs, hidden.shape[1]), dtype=torch.float32)
        if self.compute == "numba" and self._numba(hidden, weights, gate_up, down, slots, counts, act_fn, out):
            return out
        if self.compute == "int4pack":
            copy = self._copy(gate_up, down)
            if copy is not None and hidden.dtype == copy.dtype:
                return self._torch(hidden, weights, gate_up, down, slots, counts, act_fn, out, copy)
        return self._torch(hidden, weights, gate_up, down, slots, counts, act_fn, out,
                           self.compute if self.compute == "native" else "float32")

    def _torch(self, hidden, weights, gate_up, down, slots, counts, act_fn, out,
               compute: str | Int4PackCopy) -> torch.Tensor:
        """The torch modes ("native", "float32", or an Int4PackCopy of the pools): experts spread over the
        workers, one expert per call."""
        groups, start = [], 0
        for slot, count in zip(slots, counts):
            if count:
                groups.append((int(slot), start, int(count)))
            start += count
        if not groups:
            return out

        def run(share: list[tuple[int, int, int]]) -> None:
            for slot, first, count in share:
                rows = slice(first, first + count)
                if isinstance(compute, Int4PackCopy):
                    compute.expert(hidden[rows], weights[rows], slot, act_fn, out[rows])
                elif compute == "native":
                    _expert_native(hidden[rows], weights[rows], gate_up[slot], down[slot], act_fn, out[rows])
                else:
                    _expert_float32(hidden[rows], weights[rows], gate_up[slot], down[slot], act_fn, out[rows],
                                    self.block_bytes)

        shares = _balance(groups, min(self.workers, len(groups)))
        threads = [self.threads // len(shares) + (i < self.threads % len(shares)) for i in range(len(shares))]
        caller = torch.get_num_threads()
        futures = [self._pool.submit(_with_threads, n, run, share) for share, n in zip(shares[1:], threads[1:])]
        try:
            _with_threads(threads[0], run, shares[0])
        finally:
            for future in futures:
                future.result()
            if torch.get_num_threads() != caller or futures:
                # Restores this thread's count and torch's process-wide default (which set_num_threads in a
                # worker also wrote, and which threads created later start from).
                torch.set_num_threads(caller)
        return out

    def _numba(self, hidden, weights, gate_up, down, slots, counts, act_fn, out) -> bool:
        """Run the numba kernel; False where it leaves the call to the float32 path: quantized experts in a
        dtype it does not round to (float16 scales or hidden states). Dense pools it cannot take are an error."""
        from .kernels import cpu_numba

        quantized = isinstance(gate_up, (QuantMatrix, FP8Matrix))
        if not is_silu(act_fn) or (not quantized and cpu_numba.why_not(hidden.dtype, gate_up, down)):
            raise MoeOffloadError("compute='numba' runs SiLU experts on bf16 weights and hidden states only"
                                  + (" (or int4/int8/FP8 quantized ones)" if quantized else ""))
        if quantized and cpu_numba.why_not(hidden.dtype, gate_up, down):
            return False
        pair_rows = [int(slot) for slot, count in zip(slots, counts) for _ in range(int(count))]
        if pair_rows:
            cpu_numba.swiglu_experts(hidden, weights, gate_up, down, pair_rows, out, self.threads)
        return True


def is_silu(act_fn) -> bool:
    """F.silu, torch.nn.SiLU or transformers' SiLU activation (its ACT2FN["silu"])."""
    return act_fn is F.silu or isinstance(act_fn, torch.nn.SiLU) or type(act_fn).__name__ in ("SiLUActivation",)


def _with_threads(threads: int, fn, *args) -> None:
    """Run fn(*args) with `threads` intra-op threads on this thread (set, not restored: see __call__)."""
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    fn(*args)


def _balance(groups: list[tuple[int, int, int]], parts: int) -> list[list[tuple[int, int, int]]]:
    """Split expert groups into `parts` shares of about equal work (longest first onto the lightest share).

    An expert's cost is its weight bytes (the same for all) plus a little per pair, so this evens out the expert
    count first and the pair count second.
    """
    shares: list[list[tuple[int, int, int]]] = [[] for _ in range(parts)]
    load = [(0, 0)] * parts
    for group in sorted(groups, key=lambda g: -g[2]):
        lightest = min(range(parts), key=lambda i: load[i])
        shares[lightest].append(group)
        load[lightest] = (load[lightest][0] + 1, load[lightest][1] + group[2])
    return shares


def _check(hidden, weights, gate_up, down, slots, counts, out) -> int:
    if len(slots) != len(counts):
        raise MoeOffloadError(f"{len(slots)} slots but {len(counts)} counts")
    if any(count < 0 for count in counts):
        raise MoeOffloadError("pair counts must be >= 0")
    n_pairs = int(sum(counts))
    for name, tensor in (("hidden", hidden), ("weights", weights), ("gate_up", gate_up), ("down", down)):
        device = (tensor.packed if isinstance(tensor, QuantMatrix) else
                  tensor.weight if isinstance(tensor, FP8Matrix) else tensor).device
        if device.type != "cpu":
            raise MoeOffloadError(f"CPU experts need CPU tensors; {name} is on {device}")
    if hidden.dim() != 2 or hidden.shape[0] != n_pairs or weights.shape != (n_pairs,):
        raise MoeOffloadError(f"hidden must be [{n_pairs}, H] and weights [{n_pairs}]; got "
                              f"{tuple(hidden.shape)} and {tuple(weights.shape)}")
    h = hidden.shape[1]
    if type(gate_up) is not type(down) and (isinstance(gate_up, (QuantMatrix, FP8Matrix))
                                            or isinstance(down, (QuantMatrix, FP8Matrix))):
        raise MoeOffloadError("gate_up and down must be both dense or both quantized")
    if len(gate_up.shape) != 3 or len(down.shape) != 3 or gate_up.shape[2] != h or down.shape[1] != h \
            or gate_up.shape[1] != 2 * down.shape[2] or gate_up.shape[0] != down.shape[0]:
        raise MoeOffloadError(f"pools must be gate_up [n, 2I, {h}] and down [n, {h}, I]; got "
                              f"{tuple(gate_up.shape)} and {tuple(down.shape)}")
    n = gate_up.shape[0]
    if any(not 0 <= slot < n for slot, count in zip(slots, counts) if count):
        raise MoeOffloadError(f"slot out of range for pools of {n} experts")
    if out is not None and (out.shape != (n_pairs, h) or out.dtype != torch.float32 or out.device.type != "cpu"):
        raise MoeOffloadError(f"out must be a CPU float32 tensor of shape [{n_pairs}, {h}]")
    return n_pairs


def _stacked(matrix: Matrix) -> Matrix:
    """One expert's matrix [N, K] as a stack of one [1, N, K] (a QuantMatrix: each plane gets the leading dim)."""
    if isinstance(matrix, QuantMatrix):
        return QuantMatrix(matrix.packed.unsqueeze(0), matrix.scale.unsqueeze(0),
                           None if matrix.zero is None else matrix.zero.unsqueeze(0), matrix.bits,
                           matrix.group_size, matrix.in_features, matrix.parts)
    if isinstance(matrix, FP8Matrix):
        return FP8Matrix(matrix.weight.unsqueeze(0), matrix.scale.unsqueeze(0), matrix.spec, matrix.parts)
    return matrix.unsqueeze(0)


def cpu_expert_outputs(hidden: torch.Tensor, weights: torch.Tensor, gate_up: Matrix,
                       down: Matrix, slots: Sequence[int], counts: Sequence[int],
                       act_fn: ActFn = F.silu, *, out: torch.Tensor | None = None,
                       runner: CpuExperts | None = None) -> torch.Tensor:
    """[n_pairs, H] float32 weighted expert outputs, pairs grouped by expert: see CpuExperts.__call__.

    gate_up [2I, H] and down [H, I] of a single expert are accepted too (slots/counts then name it once:
    slots=[0], counts=[n_pairs]). Without a runner: one expert at a time on this thread's intra-op threads.
    """
    if len(gate_up.shape) == 2:
        gate_up, down = _stacked(gate_up), _stacked(down)
    if runner is None:
        runner = CpuExperts()
    return runner(hidden, weights, gate_up, down, slots, counts, act_fn, out)


def host_tier_outputs(tier, experts: Sequence[int], counts: Sequence[int], hidden: torch.Tensor,
                      weights: torch.Tensor, act_fn: ActFn = F.silu, *, out: torch.Tensor | None = None,
                      runner: CpuExperts | None = None) -> torch.Tensor:
    """cpu_expert_outputs for experts (ids) held by a tiers.HostTier, read in place from its pools."""
    missing = [e for e, count in zip(experts, counts) if count and e not in tier]
    if missing:
        raise MoeOffloadError(f"experts {missing} are not in this host tier")
    slots = [tier.row_of.get(e, 0) for e in experts]
    return cpu_expert_outputs(hidden, weights, tier.gate_up, tier.down, slots, counts, act_fn, out=out,
                              runner=runner)
