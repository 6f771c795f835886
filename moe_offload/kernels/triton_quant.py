"""fused_moe's kernels for int4/int8 group-quantized experts (compressed-tensors pack-quantized): the dense
kernels of triton_moe.py with the weight tile dequantized in the inner loop.

Why in the inner loop: a decode step streams each expert's weights once, from device memory or (zero-copy) from
pinned host memory over PCIe, so the bytes a kernel reads are the step's cost; dequantizing where the tile is
used reads the packed words, scales and zero points only (~3.6x fewer bytes than bf16 at int4, group 128), and
never materialises a dense copy. Same grid, pairs, slot maps, host slots, read-through admission and rounding
points as the dense kernels (triton_moe.py's docstring), so everything around them is shared.

A weight is W[r, k] = (u - z) * scale[r, k // g]: u the unsigned b-bit value at bits (k % (32/b)) * b of word
k // (32/b) of row r, z the row's zero point for that group (2^(b-1) when symmetric, i.e. subtract 8 at int4),
computed exactly in float32, rounded to the scale's dtype (what compressed-tensors decompresses to) and then to
the hidden dtype (what the compute sees, as in reference.dense). Groups may end short of K, and K need not fill
the last word or the last tile: every load is masked.

Why whole words: a kernel that loads one word per element issues 32/b loads (and 64-bit address sums) per word
and one scale load per element, so it is bound by instructions, not bytes, and int4 ran no faster than bf16. Here
a tile loads its [BN, BK/(32/b)] words once and expands them with shifts, and, where groups tile BLOCK_K (the
usual 32/64/128 and channel-wise), one scale and zero point per row and group.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..expert_format import QuantMatrix
from .triton_moe import _GEMV_DOWN, _GEMV_GATE_UP, _admit_tile, _expert_base, _silu_mul, _weighted

# decode (GEMV) tiles: BLOCK_K values of a row are BLOCK_K / (32 / b) words. bench/quant_kernels.py sweeps them:
# 512 wide is the fastest or within 4% of it for int4, int4 with zero points and int8, resident and read in place
GEMV_GATE_UP = dict(_GEMV_GATE_UP, BLOCK_K=512)
GEMV_DOWN = dict(_GEMV_DOWN, BLOCK_K=512)


@triton.jit
def _dequant_rows(packed, scale, zero, rows, mask_rows, k0, K, stride_pn, stride_sn, stride_zn, rows_per_part,
                  zero_rows_per_part, dtype: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
                  HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, pool_packed, pool_scale,
                  pool_zero, admit, stride_ps, stride_ss, stride_zs, ADMIT: tl.constexpr):
    """W[rows, k0 : k0 + BLOCK_K] of one expert (packed / scale / zero: its planes' bases) as a float32 [BN, BK]
    tile holding `dtype` values, 0 outside mask_rows and K. rows: [BN]; k0 a multiple of BLOCK_K (itself a
    multiple of a word's values). ADMIT: the words, scales and zero points read are also written to device slot
    `admit` of the pools (read-through caching; rows sharing a zero-point word write the same value)."""
    PER_WORD: tl.constexpr = 32 // BITS
    LOW: tl.constexpr = (1 << BITS) - 1
    WORDS: tl.constexpr = BLOCK_K // PER_WORD
    word_cols = k0 // PER_WORD + tl.arange(0, WORDS)  # [W]
    word_mask = mask_rows[:, None] & (word_cols * PER_WORD < K)[None, :]  # [BN, W]
    word_at = rows[:, None] * stride_pn + word_cols[None, :]  # [BN, W]
    words = tl.load(packed + word_at, mask=word_mask, other=0)  # [BN, W] int32, one load per word
    _admit_tile(pool_packed, admit, stride_ps, word_at, words, word_mask, ADMIT)
    shifts = tl.arange(0, PER_WORD) * BITS  # [PW]
    # value i of word j is column j * PER_WORD + i; the mask drops an arithmetic shift's sign bits
    u = tl.reshape((words[:, :, None] >> shifts[None, None, :]) & LOW, (BLOCK_N, BLOCK_K))  # [BN, BK]
    cols = k0 + tl.arange(0, BLOCK_K)  # [BK]
    mask = mask_rows[:, None] & (cols < K)[None, :]  # [BN, BK]
    part = rows // rows_per_part  # [BN] zero points are packed down the rows, each projection (part) apart
    local = rows - part * rows_per_part
    if BLOCK_K % GROUP == 0 or GROUP % BLOCK_K == 0:  # the tile holds whole groups, or lies inside one
        GROUPS: tl.constexpr = (BLOCK_K + GROUP - 1) // GROUP
        group_cols = k0 // GROUP + tl.arange(0, GROUPS)  # [G]
        group_mask = mask_rows[:, None] & (group_cols * GROUP < K)[None, :]  # [BN, G]
        scale_at = rows[:, None] * stride_sn + group_cols[None, :]  # [BN, G]
        s = tl.load(scale + scale_at, mask=group_mask, other=0.0)  # one scale per row and group
        _admit_tile(pool_scale, admit, stride_ss, scale_at, s, group_mask, ADMIT)
        if HAS_ZERO:
            zero_at = (part * zero_rows_per_part + (local * BITS) // 32)[:, None] * stride_zn + group_cols[None, :]
            zero_words = tl.load(zero + zero_at, mask=group_mask, other=0)  # [BN, G]
            _admit_tile(pool_zero, admit, stride_zs, zero_at, zero_words, group_mask, ADMIT)
            z = (zero_words >> ((local * BITS) % 32)[:, None]) & LOW
        else:
            z = tl.full((BLOCK_N, GROUPS), 1 << (BITS - 1), tl.int32)
        u = tl.reshape(u, (BLOCK_N, GROUPS, BLOCK_K // GROUPS))  # [BN, G, BK / G]
        w = (u - z[:, :, None]).to(tl.float32) * s[:, :, None].to(tl.float32)  # exact: 9 bits times a scale
        w = tl.reshape(w, (BLOCK_N, BLOCK_K))  # [BN, BK]
    else:  # a group size that does not tile: each element finds its group's scale
        scale_at = rows[:, None] * stride_sn + cols[None, :] // GROUP  # [BN, BK]
        s = tl.load(scale + scale_at, mask=mask, other=0.0)
        _admit_tile(pool_scale, admit, stride_ss, scale_at, s, mask, ADMIT)
        if HAS_ZERO:
            zero_at = (part * zero_rows_per_part + (local * BITS) // 32)[:, None] * stride_zn + cols[None, :] // GROUP
            zero_words = tl.load(zero + zero_at, mask=mask, other=0)
            _admit_tile(pool_zero, admit, stride_zs, zero_at, zero_words, mask, ADMIT)
            z = (zero_words >> ((local * BITS) % 32)[:, None]) & LOW
        else:
            z = 1 << (BITS - 1)
        w = (u - z).to(tl.float32) * s.to(tl.float32)
    # rounded to the scale's dtype (what compressed-tensors decompresses to), then to the compute dtype
    w = w.to(s.dtype).to(tl.float32)
    if s.dtype != dtype:
        w = w.to(dtype).to(tl.float32)
    return tl.where(mask, w, 0.0)


@triton.jit
def _gate_up_gemv_kernel(x_ptr, ids_ptr, slot_ptr, p_ptr, s_ptr, z_ptr, host_p_ptr, host_s_ptr, host_z_ptr,
                         num_device_slots, admit_ptr, act_ptr, H, I, top_k, zero_rows_per_part,
                         stride_xt, stride_xh, stride_ps, stride_pn, stride_ss, stride_sn, stride_zs, stride_zn,
                         stride_ap, stride_ai, BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROUND: tl.constexpr, ADMIT: tl.constexpr):
    """act[p, n] = silu(gate(x_t)) * up(x_t) for pair p = (t, k) over one BLOCK_N slice of I (the dense
    _gate_up_gemv_kernel's contract, ADMIT included)."""
    pair = tl.program_id(0).to(tl.int64)
    expert = tl.load(ids_ptr + pair)
    slot = tl.load(slot_ptr + expert).to(tl.int64)
    if slot < 0:  # not in this pool; down writes the zero contribution
        return
    admit = tl.load(admit_ptr + expert).to(tl.int64) if ADMIT else -1
    token = pair // top_k
    dtype = act_ptr.dtype.element_ty
    packed = _expert_base(p_ptr, host_p_ptr, slot, num_device_slots, stride_ps)
    scale = _expert_base(s_ptr, host_s_ptr, slot, num_device_slots, stride_ss)
    zero = _expert_base(z_ptr, host_z_ptr, slot, num_device_slots, stride_zs)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    mask_n = offs_n < I
    acc_gate = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # [BK]
        mask_k = offs_k < H
        x = tl.load(x_ptr + token * stride_xt + offs_k * stride_xh, mask=mask_k, other=0.0).to(tl.float32)  # [BK]
        gate = _dequant_rows(packed, scale, zero, offs_n, mask_n, k0, H, stride_pn, stride_sn, stride_zn, I,
                             zero_rows_per_part, dtype, BITS, GROUP, HAS_ZERO, BLOCK_N, BLOCK_K, p_ptr, s_ptr,
                             z_ptr, admit, stride_ps, stride_ss, stride_zs, ADMIT)  # [BN, BK]
        up = _dequant_rows(packed, scale, zero, I + offs_n, mask_n, k0, H, stride_pn, stride_sn, stride_zn, I,
                           zero_rows_per_part, dtype, BITS, GROUP, HAS_ZERO, BLOCK_N, BLOCK_K, p_ptr, s_ptr,
                           z_ptr, admit, stride_ps, stride_ss, stride_zs, ADMIT)  # [BN, BK]
        acc_gate += tl.sum(gate * x[None, :], axis=1)
        acc_up += tl.sum(up * x[None, :], axis=1)
    act = _silu_mul(acc_gate, acc_up, dtype, ROUND)  # [BN]
    tl.store(act_ptr + pair * stride_ap + offs_n * stride_ai, act.to(dtype), mask=mask_n)


@triton.jit
def _down_gemv_kernel(act_ptr, ids_ptr, slot_ptr, p_ptr, s_ptr, z_ptr, host_p_ptr, host_s_ptr, host_z_ptr,
                      num_device_slots, admit_ptr, weight_ptr, out_ptr, H, I, zero_rows_per_part,
                      stride_ap, stride_ai, stride_ps, stride_pn, stride_ss, stride_sn, stride_zs, stride_zn,
                      stride_op, stride_oh, BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROUND: tl.constexpr,
                      ROUND_PRODUCT: tl.constexpr, ZERO_ABSENT: tl.constexpr, ADMIT: tl.constexpr):
    """out[p, n] = weight[p] * down(act[p]) for pair p over one BLOCK_N slice of H, in float32."""
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
    packed = _expert_base(p_ptr, host_p_ptr, slot, num_device_slots, stride_ps)
    scale = _expert_base(s_ptr, host_s_ptr, slot, num_device_slots, stride_ss)
    zero = _expert_base(z_ptr, host_z_ptr, slot, num_device_slots, stride_zs)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # [BK]
        mask_k = offs_k < I
        a = tl.load(act_ptr + pair * stride_ap + offs_k * stride_ai, mask=mask_k, other=0.0).to(tl.float32)  # [BK]
        w = _dequant_rows(packed, scale, zero, offs_n, mask_n, k0, I, stride_pn, stride_sn, stride_zn, H,
                          zero_rows_per_part, dtype, BITS, GROUP, HAS_ZERO, BLOCK_N, BLOCK_K, p_ptr, s_ptr, z_ptr,
                          admit, stride_ps, stride_ss, stride_zs, ADMIT)  # [BN, BK]
        acc += tl.sum(w * a[None, :], axis=1)
    acc = _weighted(acc, tl.load(weight_ptr + pair).to(tl.float32), dtype, ROUND, ROUND_PRODUCT)
    tl.store(out_ptrs, acc, mask=mask_n)


@triton.jit
def _gate_up_grouped_kernel(x_ptr, pairs_ptr, block_slot_ptr, p_ptr, s_ptr, z_ptr, host_p_ptr, host_s_ptr,
                            host_z_ptr, num_device_slots, act_ptr, num_pairs, H, I, top_k, zero_rows_per_part,
                            stride_xt, stride_xh, stride_ps, stride_pn, stride_ss, stride_sn, stride_zs, stride_zn,
                            stride_ap, stride_ai, BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
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
    packed = _expert_base(p_ptr, host_p_ptr, slot, num_device_slots, stride_ps)
    scale = _expert_base(s_ptr, host_s_ptr, slot, num_device_slots, stride_ss)
    zero = _expert_base(z_ptr, host_z_ptr, slot, num_device_slots, stride_zs)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    mask_n = offs_n < I
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # [BK]
        mask_k = offs_k < H
        x = tl.load(x_ptr + tokens[:, None] * stride_xt + offs_k[None, :] * stride_xh,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BM, BK]
        gate = tl.trans(_dequant_rows(packed, scale, zero, offs_n, mask_n, k0, H, stride_pn, stride_sn, stride_zn,
                                      I, zero_rows_per_part, dtype, BITS, GROUP, HAS_ZERO, BLOCK_N, BLOCK_K, p_ptr,
                                      s_ptr, z_ptr, -1, stride_ps, stride_ss, stride_zs, False))  # [BK, BN]
        up = tl.trans(_dequant_rows(packed, scale, zero, I + offs_n, mask_n, k0, H, stride_pn, stride_sn, stride_zn,
                                    I, zero_rows_per_part, dtype, BITS, GROUP, HAS_ZERO, BLOCK_N, BLOCK_K, p_ptr,
                                    s_ptr, z_ptr, -1, stride_ps, stride_ss, stride_zs, False))  # [BK, BN]
        acc_gate = tl.dot(x, gate.to(dtype), acc_gate, input_precision=INPUT_PRECISION)
        acc_up = tl.dot(x, up.to(dtype), acc_up, input_precision=INPUT_PRECISION)
    act = _silu_mul(acc_gate, acc_up, dtype, ROUND)  # [BM, BN]
    tl.store(act_ptr + pairs[:, None] * stride_ap + offs_n[None, :] * stride_ai, act.to(dtype),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _down_grouped_kernel(act_ptr, pairs_ptr, block_slot_ptr, p_ptr, s_ptr, z_ptr, host_p_ptr, host_s_ptr,
                         host_z_ptr, num_device_slots, weight_ptr, out_ptr, num_pairs, H, I, zero_rows_per_part,
                         stride_ap, stride_ai, stride_ps, stride_pn, stride_ss, stride_sn, stride_zs, stride_zn,
                         stride_op, stride_oh, BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
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
    packed = _expert_base(p_ptr, host_p_ptr, slot, num_device_slots, stride_ps)
    scale = _expert_base(s_ptr, host_s_ptr, slot, num_device_slots, stride_ss)
    zero = _expert_base(z_ptr, host_z_ptr, slot, num_device_slots, stride_zs)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # [BK]
        mask_k = offs_k < I
        a = tl.load(act_ptr + pairs[:, None] * stride_ap + offs_k[None, :] * stride_ai,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BM, BK]
        w = tl.trans(_dequant_rows(packed, scale, zero, offs_n, mask_n, k0, I, stride_pn, stride_sn, stride_zn, H,
                                   zero_rows_per_part, dtype, BITS, GROUP, HAS_ZERO, BLOCK_N, BLOCK_K, p_ptr, s_ptr,
                                   z_ptr, -1, stride_ps, stride_ss, stride_zs, False))  # [BK, BN]
        acc = tl.dot(a, w.to(dtype), acc, input_precision=INPUT_PRECISION)
    weight = tl.load(weight_ptr + pairs, mask=mask_m, other=0.0).to(tl.float32)[:, None]  # [BM, 1]
    acc = _weighted(acc, weight, dtype, ROUND, ROUND_PRODUCT)
    tl.store(out_ptrs, acc, mask=mask_out)


def _planes(device: QuantMatrix, host: QuantMatrix) -> tuple:
    """The kernels' pointer and stride arguments of a matrix's pools (device, then host: one set of strides;
    without zero points the packed plane stands in, never read)."""
    device_zero = device.zero if device.zero is not None else device.packed
    host_zero = host.zero if host.zero is not None else host.packed
    return ((device.packed, device.scale, device_zero, host.packed, host.scale, host_zero),
            (*device.packed.stride()[:2], *device.scale.stride()[:2], *device_zero.stride()[:2]))


def _zero_rows_per_part(matrix: QuantMatrix) -> int:
    return -(-(matrix.packed.shape[1] // matrix.parts) * matrix.bits // 32)


def _constants(matrix: QuantMatrix) -> dict:
    return dict(BITS=matrix.bits, GROUP=matrix.group_size, HAS_ZERO=matrix.zero is not None)


def decode(hidden, ids, weights, slot_of_expert, admit_slots, w13: QuantMatrix, w2: QuantMatrix,
           host_w13: QuantMatrix, host_w2: QuantMatrix, act, contrib, rounding: dict, own_rows: bool, admit: bool,
           top_k: int) -> None:
    """triton_moe.fused_moe's GEMV path on quantized pools: act [P, I] then the pairs' rows of contrib [P, H]."""
    num_device_slots, two_inter, hidden_size = w13.shape
    inter = two_inter // 2
    num_pairs = ids.numel()
    pointers, strides = _planes(w13, host_w13)
    _gate_up_gemv_kernel[(num_pairs, triton.cdiv(inter, GEMV_GATE_UP["BLOCK_N"]))](
        hidden, ids, slot_of_expert, *pointers, num_device_slots, admit_slots, act, hidden_size, inter, top_k,
        _zero_rows_per_part(w13), *hidden.stride(), *strides, *act.stride(),
        ROUND=rounding["ROUND"], ADMIT=admit, **_constants(w13), **GEMV_GATE_UP)
    pointers, strides = _planes(w2, host_w2)
    _down_gemv_kernel[(num_pairs, triton.cdiv(hidden_size, GEMV_DOWN["BLOCK_N"]))](
        act, ids, slot_of_expert, *pointers, num_device_slots, admit_slots, weights, contrib, hidden_size, inter,
        _zero_rows_per_part(w2), *act.stride(), *strides, *contrib.stride(), **rounding, ZERO_ABSENT=own_rows,
        ADMIT=admit, **_constants(w2), **GEMV_DOWN)


def prefill(hidden, sorted_pairs, block_slot, weights, w13: QuantMatrix, w2: QuantMatrix, host_w13: QuantMatrix,
            host_w2: QuantMatrix, act, contrib, rounding: dict, own_rows: bool, meta: dict, top_k: int) -> None:
    """triton_moe.fused_moe's grouped-GEMM path on quantized pools, over pairs grouped by slot (align_by_slot)."""
    num_device_slots, two_inter, hidden_size = w13.shape
    inter = two_inter // 2
    num_pairs, num_blocks = act.shape[0], block_slot.numel()
    pointers, strides = _planes(w13, host_w13)
    _gate_up_grouped_kernel[(num_blocks, triton.cdiv(inter, meta["BLOCK_N"]))](
        hidden, sorted_pairs, block_slot, *pointers, num_device_slots, act, num_pairs, hidden_size, inter, top_k,
        _zero_rows_per_part(w13), *hidden.stride(), *strides, *act.stride(), ROUND=rounding["ROUND"],
        **_constants(w13), **meta)
    pointers, strides = _planes(w2, host_w2)
    _down_grouped_kernel[(num_blocks, triton.cdiv(hidden_size, meta["BLOCK_N"]))](
        act, sorted_pairs, block_slot, *pointers, num_device_slots, weights, contrib, num_pairs, hidden_size, inter,
        _zero_rows_per_part(w2), *act.stride(), *strides, *contrib.stride(), **rounding, ZERO_ABSENT=own_rows,
        **_constants(w2), **meta)
