"""One-token SwiGLU experts on the CPU, from bf16 or int4/int8 weights, as a numba kernel (cpu_experts.CpuExperts
compute="numba").

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

Quantized experts (expert_format.QuantMatrix: compressed-tensors pack-quantized int4/int8, group-wise scales,
optional zero points) are computed straight from their planes in the host tier's rows, never from a dequantized
copy: per row, group by group, (u - z) * x is summed in float32 and the group's sum scaled once (dot_quant), so
the bytes read are the packed words, scales and zero points only, and no weight is written anywhere. Unlike the
GPU kernels and reference.dense, the weights are not rounded to bf16 on the way (that pass cost 1.5x to 2x):
like the summation order, this keeps the CPU share within rounding of the GPU path, not bit-identical to it. The
compute dtype is bf16 (every intermediate output rounded where torch rounds, as for bf16 weights) or float32
(nothing rounded). The packed words are read as bytes (little-endian: int8 value j is byte j,
int4 values 2i and 2i + 1 the nibbles of byte i, against x's even and odd elements), so every loop is a plain
stream the compiler vectorizes.
"""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import torch

from ...expert_format import FP8Matrix, Matrix, QuantMatrix


def available() -> bool:
    return importlib.util.find_spec("numba") is not None


# A job's int64 descriptor (addresses and sizes), the unit a SpinPool runs: pair p computes
# out[out_rows[p]] = weights[p] * expert_{pair_rows[p]}(x[p if x_per_pair else 0]).
# gate_up / down: the pools' first expert; *_stride: bytes from one expert to the next (a host tier's rows hold
# both matrices, expert_format.py), each expert's matrix itself contiguous.
# Quantized pools (bits 4 or 8; 0: bf16 weights): gate_up / down are then the packed planes, *_scale / *_zero the
# scale and zero-point planes of the first expert (each with its own stride between experts: a host tier's rows
# have one for all, separate tensors do not); group: values per scale; has_zero: zero points present (else
# 2^(bits-1)); scale_bytes: 2 (bf16 scales) or 4 (float32); round: the compute dtype is bf16 (intermediates
# rounded to it) rather than float32. FP8 block-quantized pools (fp8 1: float8_e4m3fn weights, float32 scales,
# bits 8, no zero points): group is the block's columns, block_n its rows.
JOB_FIELDS = ("x", "x_per_pair", "gate_up", "down", "gate_up_stride", "down_stride", "pair_rows", "weights", "act",
              "out", "out_rows", "hidden", "inter", "round_product",
              "bits", "group", "has_zero", "scale_bytes", "round",
              "gate_up_scale", "gate_up_scale_stride", "gate_up_zero", "gate_up_zero_stride",
              "down_scale", "down_scale_stride", "down_zero", "down_zero_stride", "fp8", "block_n")
(_X, _X_PER_PAIR, _GATE_UP, _DOWN, _GATE_UP_STRIDE, _DOWN_STRIDE, _PAIR_ROWS, _WEIGHTS, _ACT, _OUT, _OUT_ROWS,
 _HIDDEN, _INTER, _ROUND_PRODUCT, _BITS, _GROUP, _HAS_ZERO, _SCALE_BYTES, _ROUND,
 _GATE_UP_SCALE, _GATE_UP_SCALE_STRIDE, _GATE_UP_ZERO, _GATE_UP_ZERO_STRIDE,
 _DOWN_SCALE, _DOWN_SCALE_STRIDE, _DOWN_ZERO, _DOWN_ZERO_STRIDE, _FP8, _BLOCK_N) = range(len(JOB_FIELDS))
WEIGHT_FIELDS = JOB_FIELDS[2:6] + JOB_FIELDS[13:]  # what weight_fields() fills: the pools and how to read them
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

    @intrinsic
    def as_float32(typingctx, bits):  # uint32 -> float32, the same bits
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(types.float32))
        return types.float32(types.uint32), codegen

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

    @njit(fastmath=True)
    def dot_quant(row, scales, zeros, zero_shift, x, x_even, x_odd, bits, group, has_zero):
        """One quantized row . x [K] float32. row: the row's packed bytes (uint8 [4 * ceil(K*b/32)]: little-endian
        words, values low bits first, so int8 value j is byte j and int4 values 2i, 2i+1 the low and high nibbles
        of byte i); scales: float32 [G]; zeros: int32 [G] words holding this row's zero points at zero_shift, read
        only if has_zero (else z = 2^(b-1)); x_even / x_odd: x's even and odd elements (int4).

        Group by group, sum (u - z) * x in float32 and scale the group's sum once: per value a conversion and a
        multiply-add in one loop over contiguous memory, with no dequantized weight written anywhere. The weights
        are thus the exact (u - z) * scale, not rounded to bf16 first as reference.dense and the GPU kernels
        round them: the outputs differ from theirs by about bf16 rounding, as the summation order already made
        them differ (the CPU share is not bit-identical to the GPU path). Rounding every weight, in a pass of its
        own, made int4 experts 1.5x and int8 ones 2x slower on one core (bench/RESULTS.md, "CPU expert kernels on
        quantized experts"). In float32 compute the weights of bf16 scales would differ by more than float32
        rounding: why_not sends those to the float32 path. An int4 row of even group size is taken as byte pairs
        (low nibbles against x_even, high ones against x_odd); odd group sizes (allowed, though rare) value by
        value."""
        k = x.size
        mask = (1 << bits) - 1
        groups = (k + group - 1) // group
        acc = np.float32(0.0)
        # Unsigned indices in the hot loops: numba wraps negative signed indices around, and that check on an
        # offset index kept the loops from vectorizing.
        if bits == 4 and group % 2 == 0:  # byte pairs; every group starts at an even value
            pairs = k // 2
            for g in range(groups):
                z = np.float32(((zeros[g] >> zero_shift) & mask) if has_zero else 8)
                part = np.float32(0.0)
                for i in range(np.uint64(g * (group // 2)), np.uint64(min((g + 1) * (group // 2), pairs))):
                    b = np.int32(row[i])
                    part += ((np.float32(b & np.int32(15)) - z) * x_even[i]
                             + (np.float32(b >> np.int32(4)) - z) * x_odd[i])
                acc += part * scales[g]
            if k % 2:  # K odd: the last value, a low nibble of the last group
                g = (k - 1) // group
                z = np.float32(((zeros[g] >> zero_shift) & mask) if has_zero else 8)
                acc += (np.float32(np.int32(row[pairs]) & 15) - z) * x[k - 1] * scales[g]
            return acc
        for g in range(groups):
            z = np.float32(((zeros[g] >> zero_shift) & mask) if has_zero else (1 << (bits - 1)))
            part = np.float32(0.0)
            start, stop = np.uint64(g * group), np.uint64(min((g + 1) * group, k))
            if bits == 8:
                for j in range(start, stop):
                    part += (np.float32(np.int32(row[j])) - z) * x[j]
            else:  # int4, odd group size: value by value
                for j in range(start, stop):
                    nibble = np.int32(row[j >> np.uint64(1)]) >> np.int32((j & np.uint64(1)) * np.uint64(4))
                    part += (np.float32(nibble & 15) - z) * x[j]
            acc += part * scales[g]
        return acc

    @njit(fastmath=True)
    def dot_fp8(row, scales, x_wide, block):
        """One FP8 row . x [K]. row: float8_e4m3fn codes (uint8 [K]); scales: float32 [G], one per block of
        `block` columns; x_wide: x * 2^60 (quant_scratch).

        A code's sign, exponent and mantissa bits moved to float32's places (sign to bit 31, the other 7 bits up
        by 20) are the code's value times 2^-120, subnormal codes included (they land on float32 subnormals of
        the same significand), so decoding is two shifts and an or: no branch, nothing that keeps the loop from
        vectorizing. The 2^-120 is paid back as 2^60 on x (precomputed) and 2^60 on each block's scale, so that
        no product of the loop falls into float32's subnormal range (slow, and short of bits) and none of x's
        overflows. The zero-exponent codes' float32 subnormals cost Intel cores a microcode assist each, several
        times slower per expert on codes drawn uniformly (1/16 of them such); but a checkpoint's blocks, scaled to
        their largest weight, have about 1 in 10,000 such codes, and the decodes that avoid subnormals (a table, a
        float16 conversion, a fix-up of those codes) were slower than this one where none occur. Codes S.1111.111
        (NaN) decode as 480, not NaN as in the reference and the GPU kernels: a quantizer scales each block into
        +-448 and never writes them. As for dot_quant, each block's sum is scaled once and the weights are not
        rounded to bf16."""
        k = x_wide.size
        acc = np.float32(0.0)
        for g in range((k + block - 1) // block):
            part = np.float32(0.0)
            for j in range(np.uint64(g * block), np.uint64(min((g + 1) * block, k))):
                b = np.uint32(row[j])
                part += as_float32(((b & np.uint32(128)) << np.uint32(24)) | ((b & np.uint32(127)) << np.uint32(20))
                                   ) * x_wide[j]
            acc += part * (scales[g] * np.float32(2.0 ** 60))
        return acc

    @njit(fastmath=True)
    def quant_dot(job, planes, expert, row, rows_per_part, x, scratch):
        """Row `row` of an expert's quantized matrix [N, K] (planes: the job field of its packed plane, _GATE_UP
        or _DOWN) . x [K]. rows_per_part: rows per projection (zero points are packed per projection); scratch:
        quant_scratch's for this x."""
        scale_bits, x_even, x_odd, x_wide = scratch
        k, bits, group = x.size, job[_BITS], job[_GROUP]
        groups = (k + group - 1) // group
        stride, scale_field = (job[_GATE_UP_STRIDE], _GATE_UP_SCALE) if planes == _GATE_UP else \
            (job[_DOWN_STRIDE], _DOWN_SCALE)
        if job[_FP8]:  # rows of K codes; scale row of (row's part, row's block of block_n rows)
            block_n = job[_BLOCK_N]
            part = row // rows_per_part
            scale_index = part * ((rows_per_part + block_n - 1) // block_n) + (row - part * rows_per_part) // block_n
            codes = carray(as_pointer(job[planes] + expert * stride + row * k), (k,), np.uint8)
            scales = carray(as_pointer(job[scale_field] + expert * job[scale_field + 1] + 4 * scale_index * groups),
                            (groups,), np.float32)
            return dot_fp8(codes, scales, x_wide, group)
        width = (k * bits + 31) // 32  # int32 words per row
        row_bytes = carray(as_pointer(job[planes] + expert * stride + 4 * row * width), (4 * width,), np.uint8)
        scale_row = job[scale_field] + expert * job[scale_field + 1] + row * groups * job[_SCALE_BYTES]
        if job[_SCALE_BYTES] == 2:  # bf16 -> float32: the bits shifted up
            bf16 = carray(as_pointer(scale_row), (groups,), np.uint16)
            for g in range(groups):
                scale_bits[g] = np.uint32(bf16[g]) << np.uint32(16)
        else:
            scale_bits[:] = carray(as_pointer(scale_row), (groups,), np.uint32)
        zero_row, zero_shift, zero_count = 0, 0, 0
        if job[_HAS_ZERO]:  # z of (row, g): bits (local*b) % 32 of word [part * rows' words + local*b // 32, g]
            part = row // rows_per_part
            local = row - part * rows_per_part
            zero_word_row = part * ((rows_per_part * bits + 31) // 32) + (local * bits) // 32
            zero_row = job[scale_field + 2] + expert * job[scale_field + 3] + 4 * zero_word_row * groups
            zero_shift, zero_count = (local * bits) % 32, groups
        zeros = carray(as_pointer(zero_row), (zero_count,), np.int32)  # [G] (empty when symmetric)
        return dot_quant(row_bytes, scale_bits.view(np.float32), zeros, zero_shift, x, x_even, x_odd, bits, group,
                         job[_HAS_ZERO] != 0)

    @njit(fastmath=True)
    def quant_scratch(job, x):
        """The scratch of quant_dot's rows against x [K], made once per work item: the row's scales [G] as
        float32 bits, (int4) x deinterleaved into its even and odd elements, (FP8) x * 2^60 (dot_fp8)."""
        k, bits, group = x.size, job[_BITS], job[_GROUP]
        half = (k + 1) // 2
        x_even = np.empty(half if bits == 4 else 0, np.float32)
        x_odd = np.empty(half if bits == 4 else 0, np.float32)
        for i in range(k // 2 if bits == 4 else 0):
            x_even[i] = x[2 * i]
            x_odd[i] = x[2 * i + 1]
        x_wide = np.empty(k if job[_FP8] else 0, np.float32)
        for j in range(k if job[_FP8] else 0):
            x_wide[j] = x[j] * np.float32(2.0 ** 60)
        return np.empty((k + group - 1) // group, np.uint32), x_even, x_odd, x_wide

    @njit(fastmath=True)
    def quant_rows(job, planes, expert, first, count, offset, rows_per_part, x, out, scratch):
        """out[r] = row offset + first + r of an expert's quantized matrix . x [K], for r < count."""
        for r in range(count):
            out[r] = quant_dot(job, planes, expert, offset + first + r, rows_per_part, x, scratch)

    @njit(nogil=True, fastmath=True)
    def run_item(job_address, phase, index):
        # H = hidden, I = intermediate; an expert's gate_up [2I, H] and down [H, I]: bf16 bits, or quantized
        job = carray(as_pointer(job_address), (len(JOB_FIELDS),), np.int64)
        hidden, inter, bits = job[_HIDDEN], job[_INTER], job[_BITS]
        rounds = job[_ROUND] != 0
        p_count = index + 1  # enough of the per-pair arrays to read pair p (p <= index)
        if phase == 1:  # gate/up rows [first, first + n) of pair p -> act[p, first:first + n]
            chunks = (inter + UP_CHUNK - 1) // UP_CHUNK
            p, first = index // chunks, (index % chunks) * UP_CHUNK
            n = min(UP_CHUNK, inter - first)
            expert = carray(as_pointer(job[_PAIR_ROWS]), (p_count,), np.int64)[p]
            x = floats(job[_X] + 4 * hidden * p * job[_X_PER_PAIR], hidden)  # [H]
            gate = np.empty(n, np.float32)
            up = np.empty(n, np.float32)
            if bits == 0:
                gate_up = carray(as_pointer(job[_GATE_UP] + expert * job[_GATE_UP_STRIDE]), (2 * inter, hidden),
                                 np.uint16)
                wide = np.empty(hidden, np.uint32)
                for r in range(n):
                    gate[r] = dot_bf16(gate_up[first + r], x, wide)
                    up[r] = dot_bf16(gate_up[inter + first + r], x, wide)
            else:
                scratch = quant_scratch(job, x)
                quant_rows(job, _GATE_UP, expert, first, n, 0, inter, x, gate, scratch)
                quant_rows(job, _GATE_UP, expert, first, n, inter, inter, x, up, scratch)
            if rounds:
                round_bf16(gate)
                round_bf16(up)
            for r in range(n):
                gate[r] = gate[r] / (np.float32(1.0) + np.exp(-gate[r]))  # silu
            if rounds:
                round_bf16(gate)
            for r in range(n):
                gate[r] = gate[r] * up[r]
            if rounds:
                round_bf16(gate)
            floats(job[_ACT] + 4 * (p * inter + first), n)[:] = gate
        else:  # down rows [first, first + n) of pair p -> out[out_rows[p], first:first + n]
            chunks = (hidden + DOWN_CHUNK - 1) // DOWN_CHUNK
            p, first = index // chunks, (index % chunks) * DOWN_CHUNK
            n = min(DOWN_CHUNK, hidden - first)
            expert = carray(as_pointer(job[_PAIR_ROWS]), (p_count,), np.int64)[p]
            weight = floats(job[_WEIGHTS], p_count)[p]
            out_row = carray(as_pointer(job[_OUT_ROWS]), (p_count,), np.int64)[p]
            act = floats(job[_ACT] + 4 * p * inter, inter)  # [I]
            result = np.empty(n, np.float32)
            if bits == 0:
                down = carray(as_pointer(job[_DOWN] + expert * job[_DOWN_STRIDE]), (hidden, inter), np.uint16)
                wide = np.empty(inter, np.uint32)
                for r in range(n):
                    result[r] = dot_bf16(down[first + r], act, wide)
            else:
                quant_rows(job, _DOWN, expert, first, n, 0, hidden, act, result, quant_scratch(job, act))
            if rounds:
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


ROUNDED = (torch.bfloat16, torch.float32)  # the dtypes the kernel computes in (float32: no rounding)


def why_not(dtype: torch.dtype, gate_up: Matrix, down: Matrix) -> str | None:
    """Why this kernel cannot compute experts of these pools on hidden states of `dtype` (None: it can).
    bf16 pools need bf16 hidden states; quantized ones (int4/int8) bf16 or float32 hidden states (the roundings
    it knows: float16 has no rounding here), with float32 scales where the hidden states are float32 (see
    dot_quant), on a little-endian CPU (it reads the packed words as bytes); FP8 ones (float32 block scales) bf16
    or float32 hidden states."""
    if isinstance(gate_up, FP8Matrix):
        if gate_up.scale.dtype != torch.float32 or down.scale.dtype != torch.float32:
            return "FP8 experts with float32 scales only"
        if dtype not in ROUNDED:
            return f"FP8 experts on bf16 or float32 hidden states only, not {dtype}"
        return None
    if not isinstance(gate_up, QuantMatrix):
        same = dtype == gate_up.dtype == down.dtype == torch.bfloat16
        return None if same else "bf16 weights and hidden states only"
    if gate_up.scale.dtype not in ROUNDED or down.scale.dtype not in ROUNDED:
        return f"quantized experts with bf16 or float32 scales only, not {gate_up.scale.dtype}"
    if dtype not in ROUNDED:
        return f"quantized experts on bf16 or float32 hidden states only, not {dtype}"
    if dtype == torch.float32 and torch.bfloat16 in (gate_up.scale.dtype, down.scale.dtype):
        # their weights are (u - z) * scale rounded to bf16, which dot_quant does not round: in float32 compute
        # that would differ from the reference by far more than float32 rounding
        return "quantized experts with bf16 scales on float32 hidden states"
    if sys.byteorder != "little":
        return "quantized experts on little-endian CPUs only"
    return None


def weight_fields(gate_up: Matrix, down: Matrix, dtype: torch.dtype, weight_dtype: torch.dtype
                  ) -> tuple[dict[str, int], list[torch.Tensor]]:
    """The job fields (WEIGHT_FIELDS) that say where the pools lie and how to compute them, for hidden states
    of `dtype` and routing weights of `weight_dtype`; and the tensors they point into (copies where an expert's
    plane was not contiguous), which must outlive the job. gate_up [N, 2I, H] and down [N, H, I]: bf16 tensors,
    QuantMatrix or FP8Matrix stacks (a host tier's views: any stride between experts)."""
    rounds = dtype == torch.bfloat16
    fields = dict.fromkeys(WEIGHT_FIELDS, 0)
    # torch: a bf16 expert output times a bf16 weight is rounded to bf16; any float32 side promotes
    fields.update(round=int(rounds), round_product=int(rounds and weight_dtype == torch.bfloat16))
    planes = {"gate_up": gate_up, "down": down}
    if isinstance(gate_up, QuantMatrix):
        if (gate_up.bits, gate_up.group_size, gate_up.zero is None, gate_up.scale.dtype) != \
                (down.bits, down.group_size, down.zero is None, down.scale.dtype):
            raise ValueError("gate_up and down must share one quantization scheme")
        fields.update(bits=gate_up.bits, group=gate_up.group_size, has_zero=int(gate_up.zero is not None),
                      scale_bytes=gate_up.scale.element_size())
        planes = {f"{name}{suffix}": plane for name, matrix in planes.items()
                  for suffix, plane in (("", matrix.packed), ("_scale", matrix.scale), ("_zero", matrix.zero))
                  if plane is not None}
    elif isinstance(gate_up, FP8Matrix):
        if gate_up.spec != down.spec:
            raise ValueError("gate_up and down must share one FP8 block size")
        fields.update(bits=8, fp8=1, group=gate_up.spec.block_k, block_n=gate_up.spec.block_n, scale_bytes=4)
        planes = {"gate_up": gate_up.weight, "gate_up_scale": gate_up.scale, "down": down.weight,
                  "down_scale": down.scale}
    kept = []
    for name, plane in planes.items():
        plane = _experts_contiguous(plane)
        kept.append(plane)
        fields[name], fields[f"{name}_stride"] = plane.data_ptr(), plane.stride(0) * plane.element_size()
    return fields, kept


def swiglu_experts(hidden: torch.Tensor, weights: torch.Tensor, gate_up: Matrix, down: Matrix,
                   pair_rows: list[int], out: torch.Tensor, threads: int) -> None:
    """out [P, H] float32 = weights[p] * expert_{pair_rows[p]}(hidden[p]) for SiLU-gated experts, on `threads`
    threads (this one and the pool's).

    hidden [P, H] (bf16; or float32 for quantized pools), weights [P] (bf16 or float32: a float32 weight's
    product is not rounded, as in torch), gate_up [N, 2I, H] and down [N, H, I] pools on the CPU, bf16 tensors or
    QuantMatrix stacks (a host tier's views: any stride between experts, each expert's planes contiguous; see
    why_not), pair_rows: a pool row per pair; out contiguous.
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
    fields, _kept = weight_fields(gate_up, down, hidden.dtype, weights.dtype)  # _kept: alive until the job ends
    out_array = out.numpy()
    job = make_job(x=x.ctypes.data, x_per_pair=1, pair_rows=rows.ctypes.data, weights=scale.ctypes.data,
                   act=act.ctypes.data, out=out_array.ctypes.data, out_rows=out_rows.ctypes.data,
                   hidden=hidden_size, inter=inter, **fields)
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
