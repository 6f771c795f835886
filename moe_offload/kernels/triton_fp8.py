"""fused_moe's kernels for FP8 block-quantized experts (DeepSeek-V3 / Qwen3-FP8, quant/fp8.py): the dense kernels
of triton_moe.py with each weight tile decoded and scaled in the inner loop.

Why in the inner loop: a decode step streams each expert's weights once, from device memory or (zero-copy) from
pinned host memory over PCIe, so the bytes a kernel reads are the step's cost; reading the FP8 bytes and their
block scales (1 byte a weight + 4 bytes per block, ~half of bf16) and decoding where the tile is used never
materialises a bf16 copy. Same grid, pairs, slot maps, host slots, read-through admission and rounding points as
the dense kernels (triton_moe.py's docstring), so everything around them is shared.

A weight is W[r, k] = e4m3(byte[r, k]) * scale[scale_row(r), k // BK] (quant/fp8.py): the float32 product,
rounded to the hidden dtype (reference.dense). scale_row restarts at each projection stacked along the rows
(gate's blocks, then up's), so an I that no block divides is read right. The bytes are loaded as uint8 and
decoded with integer operations into the exact float32 value: this runs on GPUs without FP8 conversion
instructions (before sm_89) and in Triton's interpreter alike, and costs a few integer ops per weight of a
memory-bound loop. The decode GEMVs read the bytes a 32-bit word (4 codes) at a time and one scale per row and
block where rows are 4-byte aligned (reads_words), as the int4/int8 and MXFP4 kernels do: a load per byte, and a
scale load per weight, cost more than the decoding. Weight-only: activations stay in the hidden dtype (no W8A8 FP8
GEMM).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..expert_format import FP8Matrix
from .triton_moe import _GEMV_DOWN, _GEMV_GATE_UP, _admit_tile, _expert_base, _silu_mul, _weighted


@triton.jit
def _e4m3_to_float32(byte):
    """The exact float32 value of float8_e4m3fn bit patterns (int32 holding 0..255): 1 sign bit, 4 exponent bits
    (bias 7), 3 mantissa bits; exponent 0 is subnormal (m * 2^-9); S.1111.111 is NaN, there is no infinity."""
    exponent = (byte >> 3) & 15
    mantissa = byte & 7
    normal = (((exponent + 120) << 23) | (mantissa << 20)).to(tl.float32, bitcast=True)  # rebias 7 -> 127
    magnitude = tl.where(exponent == 0, mantissa.to(tl.float32) * 0.001953125, normal)  # 2^-9
    magnitude = tl.where((exponent == 15) & (mantissa == 7), float("nan"), magnitude)
    # the sign as a bit, not a negation: a GPU compiles -x as 0 - x, which turns code 0x80 (-0.0) into +0.0
    return (magnitude.to(tl.int32, bitcast=True) | ((byte & 128) << 24)).to(tl.float32, bitcast=True)


@triton.jit
def _dequant_tile(weight, scale, rows, cols, mask, stride_wn, stride_sn, rows_per_part, blocks_per_part,
                  dtype: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, pool_weight, pool_scale, admit,
                  stride_ws, stride_ss, ADMIT: tl.constexpr):
    """W[rows, cols] of one expert (weight / scale: its planes' bases) as float32 holding `dtype` values, 0 where
    ~mask; rows and cols broadcast to the tile's shape. ADMIT: the bytes and scales read are also written to
    device slot `admit` of the pools (read-through caching; elements sharing a scale write the same value)."""
    weight_at = rows * stride_wn + cols
    byte = tl.load(weight + weight_at, mask=mask, other=0)  # uint8
    _admit_tile(pool_weight, admit, stride_ws, weight_at, byte, mask, ADMIT)
    part = rows // rows_per_part
    scale_at = (part * blocks_per_part + (rows - part * rows_per_part) // BN) * stride_sn + cols // BK
    s = tl.load(scale + scale_at, mask=mask, other=0.0)  # float32, bf16 or fp16
    _admit_tile(pool_scale, admit, stride_ss, scale_at, s, mask, ADMIT)
    w = _e4m3_to_float32(byte.to(tl.int32)) * s.to(tl.float32)  # one float32 rounding, as float(fp8) * scale
    w = w.to(dtype).to(tl.float32)
    return tl.where(mask, w, 0.0)


@triton.jit
def _dequant_word_tile(weight, scale, rows, mask_rows, k0, K, stride_wn, stride_sn, rows_per_part, blocks_per_part,
                       dtype: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, pool_weight, pool_scale, admit, stride_ws, stride_ss,
                       ADMIT: tl.constexpr):
    """_dequant_tile's W[rows, k0 : k0 + BLOCK_K] as a [BN, BK] tile, read a 32-bit word (4 codes) at a time and one
    scale per row and block of BK columns, instead of a byte and a scale per element: the same bits. Needs rows
    and slots on 4-byte boundaries (stride_wn, stride_ws multiples of 4, K too) and BLOCK_K a multiple of BK, k0 of
    BLOCK_K (decode() checks)."""
    WORDS: tl.constexpr = BLOCK_K // 4
    GROUPS: tl.constexpr = BLOCK_K // BK
    word_cols = k0 // 4 + tl.arange(0, WORDS)  # [W]
    word_mask = mask_rows[:, None] & (word_cols * 4 < K)[None, :]  # [BN, W]
    word_at = rows[:, None] * (stride_wn // 4) + word_cols[None, :]  # [BN, W]
    words = tl.load(weight.to(tl.pointer_type(tl.int32)) + word_at, mask=word_mask, other=0)  # [BN, W]
    _admit_tile(pool_weight.to(tl.pointer_type(tl.int32)), admit, stride_ws // 4, word_at, words, word_mask, ADMIT)
    shifts = tl.arange(0, 4) * 8  # [4] little-endian: code j of a word is its byte j
    byte = tl.reshape((words[:, :, None] >> shifts[None, None, :]) & 0xFF, (BLOCK_N, BLOCK_K))  # [BN, BK] int32
    part = rows // rows_per_part  # [BN]
    scale_row = part * blocks_per_part + (rows - part * rows_per_part) // BN  # [BN]
    group_cols = k0 // BK + tl.arange(0, GROUPS)  # [G]
    group_mask = mask_rows[:, None] & (group_cols * BK < K)[None, :]  # [BN, G]
    scale_at = scale_row[:, None] * stride_sn + group_cols[None, :]  # [BN, G]
    s = tl.load(scale + scale_at, mask=group_mask, other=0.0)  # [BN, G] float32, bf16 or fp16
    _admit_tile(pool_scale, admit, stride_ss, scale_at, s, group_mask, ADMIT)
    w = tl.reshape(_e4m3_to_float32(byte), (BLOCK_N, GROUPS, BK)) * s.to(tl.float32)[:, :, None]  # [BN, G, BK]
    w = tl.reshape(w, (BLOCK_N, BLOCK_K)).to(dtype).to(tl.float32)
    cols = k0 + tl.arange(0, BLOCK_K)  # [BK]
    return tl.where(mask_rows[:, None] & (cols < K)[None, :], w, 0.0)


@triton.jit
def _gate_up_gemv_kernel(x_ptr, ids_ptr, slot_ptr, w_ptr, s_ptr, host_w_ptr, host_s_ptr, num_device_slots,
                         admit_ptr, act_ptr, H, I, top_k, blocks_per_part, stride_xt, stride_xh, stride_ws,
                         stride_wn, stride_ss, stride_sn, stride_ap, stride_ai, BN: tl.constexpr, BK: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROUND: tl.constexpr, ADMIT: tl.constexpr,
                         WORDS: tl.constexpr):
    """act[p, n] = silu(gate(x_t)) * up(x_t) for pair p = (t, k) over one BLOCK_N slice of I (the dense
    _gate_up_gemv_kernel's contract, ADMIT included). WORDS: weights read a word at a time (_dequant_word_tile)."""
    pair = tl.program_id(0).to(tl.int64)
    expert = tl.load(ids_ptr + pair)
    slot = tl.load(slot_ptr + expert).to(tl.int64)
    if slot < 0:  # not in this pool; down writes the zero contribution
        return
    admit = tl.load(admit_ptr + expert).to(tl.int64) if ADMIT else -1
    token = pair // top_k
    dtype = act_ptr.dtype.element_ty
    weight = _expert_base(w_ptr, host_w_ptr, slot, num_device_slots, stride_ws)
    scale = _expert_base(s_ptr, host_s_ptr, slot, num_device_slots, stride_ss)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    mask_n = offs_n < I
    acc_gate = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # [BK]
        mask_k = offs_k < H
        x = tl.load(x_ptr + token * stride_xt + offs_k * stride_xh, mask=mask_k, other=0.0).to(tl.float32)  # [BK]
        if WORDS:
            gate = _dequant_word_tile(weight, scale, offs_n, mask_n, k0, H, stride_wn, stride_sn, I, blocks_per_part,
                                      dtype, BN, BK, BLOCK_N, BLOCK_K, w_ptr, s_ptr, admit, stride_ws, stride_ss,
                                      ADMIT)  # [BN, BK]
            up = _dequant_word_tile(weight, scale, I + offs_n, mask_n, k0, H, stride_wn, stride_sn, I,
                                    blocks_per_part, dtype, BN, BK, BLOCK_N, BLOCK_K, w_ptr, s_ptr, admit, stride_ws,
                                    stride_ss, ADMIT)  # [BN, BK]
        else:
            mask = mask_n[:, None] & mask_k[None, :]
            gate = _dequant_tile(weight, scale, offs_n[:, None], offs_k[None, :], mask, stride_wn, stride_sn, I,
                                 blocks_per_part, dtype, BN, BK, w_ptr, s_ptr, admit, stride_ws, stride_ss,
                                 ADMIT)  # [BN, BK]
            up = _dequant_tile(weight, scale, I + offs_n[:, None], offs_k[None, :], mask, stride_wn, stride_sn, I,
                               blocks_per_part, dtype, BN, BK, w_ptr, s_ptr, admit, stride_ws, stride_ss,
                               ADMIT)  # [BN, BK]
        acc_gate += tl.sum(gate * x[None, :], axis=1)
        acc_up += tl.sum(up * x[None, :], axis=1)
    act = _silu_mul(acc_gate, acc_up, dtype, ROUND)  # [BN]
    tl.store(act_ptr + pair * stride_ap + offs_n * stride_ai, act.to(dtype), mask=mask_n)


@triton.jit
def _down_gemv_kernel(act_ptr, ids_ptr, slot_ptr, w_ptr, s_ptr, host_w_ptr, host_s_ptr, num_device_slots,
                      admit_ptr, weight_ptr, out_ptr, H, I, blocks_per_part, stride_ap, stride_ai, stride_ws,
                      stride_wn, stride_ss, stride_sn, stride_op, stride_oh, BN: tl.constexpr, BK: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROUND: tl.constexpr,
                      ROUND_PRODUCT: tl.constexpr, ZERO_ABSENT: tl.constexpr, ADMIT: tl.constexpr,
                      WORDS: tl.constexpr):
    """out[p, n] = weight[p] * down(act[p]) for pair p over one BLOCK_N slice of H, in float32. WORDS: as
    _gate_up_gemv_kernel's."""
    pair = tl.program_id(0).to(tl.int64)
    expert = tl.load(ids_ptr + pair)
    slot = tl.load(slot_ptr + expert).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    mask_n = offs_n < H
    out_ptrs = out_ptr + pair * stride_op + offs_n * stride_oh  # [BN]
    if slot < 0:  # not in this pool: a zero row, or left for another pool's call to write
        if ZERO_ABSENT:
            tl.store(out_ptrs, tl.zeros((BLOCK_N,), dtype=tl.float32), mask=mask_n)
        return
    admit = tl.load(admit_ptr + expert).to(tl.int64) if ADMIT else -1
    dtype = act_ptr.dtype.element_ty
    weight = _expert_base(w_ptr, host_w_ptr, slot, num_device_slots, stride_ws)
    scale = _expert_base(s_ptr, host_s_ptr, slot, num_device_slots, stride_ss)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # [BK]
        mask_k = offs_k < I
        a = tl.load(act_ptr + pair * stride_ap + offs_k * stride_ai, mask=mask_k, other=0.0).to(tl.float32)  # [BK]
        if WORDS:
            w = _dequant_word_tile(weight, scale, offs_n, mask_n, k0, I, stride_wn, stride_sn, H, blocks_per_part,
                                   dtype, BN, BK, BLOCK_N, BLOCK_K, w_ptr, s_ptr, admit, stride_ws, stride_ss,
                                   ADMIT)  # [BN, BK]
        else:
            w = _dequant_tile(weight, scale, offs_n[:, None], offs_k[None, :], mask_n[:, None] & mask_k[None, :],
                              stride_wn, stride_sn, H, blocks_per_part, dtype, BN, BK, w_ptr, s_ptr, admit,
                              stride_ws, stride_ss, ADMIT)  # [BN, BK]
        acc += tl.sum(w * a[None, :], axis=1)
    acc = _weighted(acc, tl.load(weight_ptr + pair).to(tl.float32), dtype, ROUND, ROUND_PRODUCT)
    tl.store(out_ptrs, acc, mask=mask_n)


@triton.jit
def _gate_up_grouped_kernel(x_ptr, pairs_ptr, block_slot_ptr, w_ptr, s_ptr, host_w_ptr, host_s_ptr,
                            num_device_slots, act_ptr, num_pairs, H, I, top_k, blocks_per_part, stride_xt, stride_xh,
                            stride_ws, stride_wn, stride_ss, stride_sn, stride_ap, stride_ai, BN: tl.constexpr,
                            BK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            INPUT_PRECISION: tl.constexpr, ROUND: tl.constexpr):
    """act[pairs of one M-block, n-slice] = silu(x @ gate.T) * (x @ up.T); every pair of the block uses one slot."""
    block = tl.program_id(0)
    slot = tl.load(block_slot_ptr + block).to(tl.int64)
    if slot < 0:  # pairs not in this pool, or past the last padded block
        return
    pairs = tl.load(pairs_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # [BM], padding = num_pairs
    mask_m = pairs < num_pairs
    tokens = pairs // top_k  # [BM]
    dtype = act_ptr.dtype.element_ty
    weight = _expert_base(w_ptr, host_w_ptr, slot, num_device_slots, stride_ws)
    scale = _expert_base(s_ptr, host_s_ptr, slot, num_device_slots, stride_ss)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    mask_n = offs_n < I
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # [BK]
        mask_k = offs_k < H
        x = tl.load(x_ptr + tokens[:, None] * stride_xt + offs_k[None, :] * stride_xh,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BM, BK]
        mask_w = mask_k[:, None] & mask_n[None, :]
        gate = _dequant_tile(weight, scale, offs_n[None, :], offs_k[:, None], mask_w, stride_wn, stride_sn, I,
                             blocks_per_part, dtype, BN, BK, w_ptr, s_ptr, -1, stride_ws, stride_ss,
                             False)  # [BK, BN]
        up = _dequant_tile(weight, scale, I + offs_n[None, :], offs_k[:, None], mask_w, stride_wn, stride_sn, I,
                           blocks_per_part, dtype, BN, BK, w_ptr, s_ptr, -1, stride_ws, stride_ss, False)  # [BK, BN]
        acc_gate = tl.dot(x, gate.to(dtype), acc_gate, input_precision=INPUT_PRECISION)
        acc_up = tl.dot(x, up.to(dtype), acc_up, input_precision=INPUT_PRECISION)
    act = _silu_mul(acc_gate, acc_up, dtype, ROUND)  # [BM, BN]
    tl.store(act_ptr + pairs[:, None] * stride_ap + offs_n[None, :] * stride_ai, act.to(dtype),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _down_grouped_kernel(act_ptr, pairs_ptr, block_slot_ptr, w_ptr, s_ptr, host_w_ptr, host_s_ptr,
                         num_device_slots, weight_ptr, out_ptr, num_pairs, H, I, blocks_per_part, stride_ap, stride_ai,
                         stride_ws, stride_wn, stride_ss, stride_sn, stride_op, stride_oh, BN: tl.constexpr,
                         BK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         INPUT_PRECISION: tl.constexpr, ROUND: tl.constexpr, ROUND_PRODUCT: tl.constexpr,
                         ZERO_ABSENT: tl.constexpr):
    """out[pairs of one M-block, n-slice] = weight * (act @ down.T), in float32."""
    block = tl.program_id(0)
    slot = tl.load(block_slot_ptr + block).to(tl.int64)
    pairs = tl.load(pairs_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # [BM]
    mask_m = pairs < num_pairs
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    mask_n = offs_n < H
    out_ptrs = out_ptr + pairs[:, None] * stride_op + offs_n[None, :] * stride_oh  # [BM, BN]
    mask_out = mask_m[:, None] & mask_n[None, :]
    if slot < 0:
        if ZERO_ABSENT:
            tl.store(out_ptrs, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), mask=mask_out)
        return
    dtype = act_ptr.dtype.element_ty
    weight = _expert_base(w_ptr, host_w_ptr, slot, num_device_slots, stride_ws)
    scale = _expert_base(s_ptr, host_s_ptr, slot, num_device_slots, stride_ss)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # [BK]
        mask_k = offs_k < I
        a = tl.load(act_ptr + pairs[:, None] * stride_ap + offs_k[None, :] * stride_ai,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BM, BK]
        w = _dequant_tile(weight, scale, offs_n[None, :], offs_k[:, None], mask_k[:, None] & mask_n[None, :],
                          stride_wn, stride_sn, H, blocks_per_part, dtype, BN, BK, w_ptr, s_ptr, -1, stride_ws,
                          stride_ss, False)  # [BK, BN]
        acc = tl.dot(a, w.to(dtype), acc, input_precision=INPUT_PRECISION)
    weight_k = tl.load(weight_ptr + pairs, mask=mask_m, other=0.0).to(tl.float32)[:, None]  # [BM, 1]
    acc = _weighted(acc, weight_k, dtype, ROUND, ROUND_PRODUCT)
    tl.store(out_ptrs, acc, mask=mask_out)


def _planes(device: FP8Matrix, host: FP8Matrix) -> tuple:
    """The kernels' pointer and stride arguments of a matrix's pools (device, then host: one set of strides). The
    FP8 planes go in as uint8 (decoded by _e4m3_to_float32, on any GPU)."""
    weight, host_weight = device.weight.view(torch.uint8), host.weight.view(torch.uint8)
    return ((weight, device.scale, host_weight, host.scale),
            (*weight.stride()[:2], *device.scale.stride()[:2]))


def _constants(matrix: FP8Matrix) -> dict:
    return dict(BN=matrix.spec.block_n, BK=matrix.spec.block_k)


def reads_words(device: FP8Matrix, host: FP8Matrix, block_k: int) -> bool:
    """Whether a GEMV of tile width block_k may read these pools a word at a time (_dequant_word_tile): rows,
    slots and both pools' bases on 4-byte boundaries, K a whole number of words, and tiles made of whole scale
    blocks."""
    weight, host_weight = device.weight.view(torch.uint8), host.weight.view(torch.uint8)  # [S, N, K]
    return (weight.stride(2) == 1 and block_k % device.spec.block_k == 0
            and all(v % 4 == 0 for v in (*weight.stride()[:2], weight.shape[2], weight.data_ptr(),
                                          host_weight.data_ptr())))


def _blocks_per_part(matrix: FP8Matrix) -> int:
    """Scale rows of each projection stacked in the matrix (gate_up: ceil(I / BN); down: ceil(H / BN))."""
    return matrix.scale.shape[1] // matrix.parts


def decode(hidden, ids, weights, slot_of_expert, admit_slots, w13: FP8Matrix, w2: FP8Matrix, host_w13: FP8Matrix,
           host_w2: FP8Matrix, act, contrib, rounding: dict, own_rows: bool, admit: bool, top_k: int) -> None:
    """triton_moe.fused_moe's GEMV path on FP8 pools: act [P, I] then the pairs' rows of contrib [P, H]."""
    num_device_slots, two_inter, hidden_size = w13.shape
    inter = two_inter // 2
    num_pairs = ids.numel()
    pointers, strides = _planes(w13, host_w13)
    _gate_up_gemv_kernel[(num_pairs, triton.cdiv(inter, _GEMV_GATE_UP["BLOCK_N"]))](
        hidden, ids, slot_of_expert, *pointers, num_device_slots, admit_slots, act, hidden_size, inter, top_k,
        _blocks_per_part(w13), *hidden.stride(), *strides, *act.stride(), ROUND=rounding["ROUND"], ADMIT=admit,
        WORDS=reads_words(w13, host_w13, _GEMV_GATE_UP["BLOCK_K"]), **_constants(w13), **_GEMV_GATE_UP)
    pointers, strides = _planes(w2, host_w2)
    _down_gemv_kernel[(num_pairs, triton.cdiv(hidden_size, _GEMV_DOWN["BLOCK_N"]))](
        act, ids, slot_of_expert, *pointers, num_device_slots, admit_slots, weights, contrib, hidden_size, inter,
        _blocks_per_part(w2), *act.stride(), *strides, *contrib.stride(), **rounding, ZERO_ABSENT=own_rows,
        ADMIT=admit, WORDS=reads_words(w2, host_w2, _GEMV_DOWN["BLOCK_K"]), **_constants(w2), **_GEMV_DOWN)


def prefill(hidden, sorted_pairs, block_slot, weights, w13: FP8Matrix, w2: FP8Matrix, host_w13: FP8Matrix,
            host_w2: FP8Matrix, act, contrib, rounding: dict, own_rows: bool, meta: dict, top_k: int) -> None:
    """triton_moe.fused_moe's grouped-GEMM path on FP8 pools, over pairs grouped by slot (align_by_slot)."""
    num_device_slots, two_inter, hidden_size = w13.shape
    inter = two_inter // 2
    num_pairs, num_blocks = act.shape[0], block_slot.numel()
    pointers, strides = _planes(w13, host_w13)
    _gate_up_grouped_kernel[(num_blocks, triton.cdiv(inter, meta["BLOCK_N"]))](
        hidden, sorted_pairs, block_slot, *pointers, num_device_slots, act, num_pairs, hidden_size, inter, top_k,
        _blocks_per_part(w13), *hidden.stride(), *strides, *act.stride(), ROUND=rounding["ROUND"],
        **_constants(w13), **meta)
    pointers, strides = _planes(w2, host_w2)
    _down_grouped_kernel[(num_blocks, triton.cdiv(hidden_size, meta["BLOCK_N"]))](
        act, sorted_pairs, block_slot, *pointers, num_device_slots, weights, contrib, num_pairs, hidden_size, inter,
        _blocks_per_part(w2), *act.stride(), *strides, *contrib.stride(), **rounding, ZERO_ABSENT=own_rows,
        **_constants(w2), **meta)
