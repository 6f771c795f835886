"""fused_moe's kernels for GPT-OSS's experts (expert_format.BiasedMatrix pools), bf16/fp16/fp32 or MXFP4.

Why kernels of their own: GPT-OSS's experts differ from the SwiGLU experts of triton_moe.py in four ways at once
(a bias after each GEMM, gate and up interleaved along 2I, the clamped SwiGLU, and weights stored transposed or as
MXFP4), and folding them into the dense and int4 kernels would put a branch in every line of both. Everything
around the kernels is shared: fused_moe's contract, grid, pairs, slot maps (host slots read in place), read-through
admission (the biases admitted with the weights), align_by_slot and the rounding points (triton_moe.py's docstring).

- Weights: a dense pool is the checkpoint's [H, 2I] / [I, H] read through transposed views (strides, no copy);
  an MXFP4 pool is its blocks and scales, W[r, k] = e2m1(nibble k % 2 of byte (k % 32) / 2 of block k / 32 of row
  r) * 2^(scale[r, k / 32] - 127), exact in float32 and in the hidden dtype (quant/mxfp4.py), decoded in the
  inner loop: what a step reads is the 4.25 bits per weight. The decode GEMVs load a 32-bit word (8 values) at a
  time and expand it with shifts where rows and slots are 4-byte aligned (the engine's byte rows are), as
  triton_quant.py does for int4: one load per element, and one scale load per element, left them bound by
  instructions, not by the host link; the grouped (prefill) kernels still decode element by element.
- gate j is row 2j of gate_up, up j row 2j + 1.
- Rounding where transformers' GptOssExperts rounds in half precision: the GEMM output, + bias, gate * alpha,
  sigmoid, gate * sigmoid, up + 1, the activation; down's output, + bias, * routing weight.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..expert_format import BiasedMatrix, Mxfp4Matrix
from .triton_moe import _GEMV_DOWN, _GEMV_GATE_UP, _admit_tile, _expert_base, _round, _weighted

# E8M0 code 0 is 2^-127, below float32's normal range: not built from the exponent bits like the others
_TINY_SCALE = tl.constexpr(2.0 ** -127)


@triton.jit
def _e2m1(code):
    """e2m1 codes (int32, 4 bits: sign, 2 exponent bits, 1 mantissa bit) as float32: 0, 0.5 (subnormal) or
    (1 + m/2) * 2^(e-1) = (2 + m) * 2^e / 4, negated where the sign bit is set."""
    exponent = (code >> 1) & 3
    mantissa = (code & 1).to(tl.float32)
    magnitude = tl.where(exponent == 0, mantissa * 0.5, (2.0 + mantissa) * (1 << exponent).to(tl.float32) * 0.25)
    return tl.where(code >= 8, -magnitude, magnitude)


@triton.jit
def _e8m0(scale):
    """E8M0 scale bytes as float32 powers 2^(scale - 127): exact from the exponent bits for 1..254, 2^-127 for 0."""
    power = (scale.to(tl.int32) << 23).to(tl.float32, bitcast=True)
    return tl.where(scale == 0, _TINY_SCALE, power)


@triton.jit
def _mxfp4_word_tile(w, s, rows, mask_rows, k0, K, stride_wn, stride_sn, dtype: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, pool_w, pool_s, admit, stride_ws, stride_ss,
                     ADMIT: tl.constexpr):
    """W[rows, k0 : k0 + BLOCK_K] of one MXFP4 expert as a float32 [BN, BK] tile holding `dtype` values (0 outside
    mask_rows and K), read a 32-bit word (8 values) at a time: a row's blocks are contiguous, so value k is nibble
    k % 8 of word k / 8 of the row (low nibble first, as int4's packing). One scale byte per row and block of 32.
    w / pool_w: byte pointers whose rows and slots start on 4-byte boundaries (stride_wn, stride_ws in bytes,
    multiples of 4: decode() checks); k0 and BLOCK_K multiples of 32. ADMIT: the words and scales read are also
    written to device slot `admit` (read-through caching)."""
    WORDS: tl.constexpr = BLOCK_K // 8
    GROUPS: tl.constexpr = BLOCK_K // 32
    word_cols = k0 // 8 + tl.arange(0, WORDS)  # [W]
    word_mask = mask_rows[:, None] & (word_cols * 8 < K)[None, :]  # [BN, W] (K is a multiple of 32)
    word_at = rows[:, None] * (stride_wn // 4) + word_cols[None, :]  # [BN, W]
    words = tl.load(w.to(tl.pointer_type(tl.int32)) + word_at, mask=word_mask, other=0)  # [BN, W] one load a word
    _admit_tile(pool_w.to(tl.pointer_type(tl.int32)), admit, stride_ws // 4, word_at, words, word_mask, ADMIT)
    shifts = tl.arange(0, 8) * 4  # [8]
    code = tl.reshape((words[:, :, None] >> shifts[None, None, :]) & 0xF, (BLOCK_N, BLOCK_K))  # [BN, BK]
    group_cols = k0 // 32 + tl.arange(0, GROUPS)  # [G]
    group_mask = mask_rows[:, None] & (group_cols * 32 < K)[None, :]  # [BN, G]
    scale_at = rows[:, None] * stride_sn + group_cols[None, :]  # [BN, G]
    scale = tl.load(s + scale_at, mask=group_mask, other=127)  # [BN, G] uint8 E8M0
    _admit_tile(pool_s, admit, stride_ss, scale_at, scale, group_mask, ADMIT)
    value = tl.reshape(_e2m1(code), (BLOCK_N, GROUPS, 32)) * _e8m0(scale)[:, :, None]  # [BN, G, 32] exact
    weight = tl.reshape(value, (BLOCK_N, BLOCK_K)).to(dtype).to(tl.float32)  # [BN, BK]
    cols = k0 + tl.arange(0, BLOCK_K)  # [BK]
    return tl.where(mask_rows[:, None] & (cols < K)[None, :], weight, 0.0)


@triton.jit
def _weight_tile(w, s, rows, cols, mask, stride_wn, stride_wk, stride_sn, dtype: tl.constexpr, MXFP4: tl.constexpr,
                 pool_w, pool_s, admit, stride_ws, stride_ss, ADMIT: tl.constexpr):
    """W[rows, cols] of one expert (w, s: its weight (or blocks) and scales planes' bases) as float32 holding
    `dtype` values, 0 where ~mask. Dense: w[rows * stride_wn + cols * stride_wk]. MXFP4: stride_wn / stride_wk are
    the blocks' row and block strides (a block's 16 bytes contiguous), stride_sn the scales' row stride. ADMIT: the
    bytes read are also written to device slot `admit` (read-through caching)."""
    if MXFP4:
        byte_at = rows * stride_wn + (cols // 32) * stride_wk + (cols % 32) // 2
        byte = tl.load(w + byte_at, mask=mask, other=0)  # uint8
        _admit_tile(pool_w, admit, stride_ws, byte_at, byte, mask, ADMIT)
        scale_at = rows * stride_sn + cols // 32
        scale = tl.load(s + scale_at, mask=mask, other=127)  # uint8 E8M0
        _admit_tile(pool_s, admit, stride_ss, scale_at, scale, mask, ADMIT)
        code = (byte.to(tl.int32) >> ((cols % 2) * 4)) & 0xF  # low nibble first
        weight = (_e2m1(code) * _e8m0(scale)).to(dtype).to(tl.float32)
    else:
        at = rows * stride_wn + cols * stride_wk
        tile = tl.load(w + at, mask=mask, other=0.0)
        _admit_tile(pool_w, admit, stride_ws, at, tile, mask, ADMIT)
        weight = tile.to(tl.float32)
    return tl.where(mask, weight, 0.0)


@triton.jit
def _bias(b, rows, mask, stride_bn, pool_b, admit, stride_bs, ADMIT: tl.constexpr):
    """bias[rows] of one expert in float32 (admitted with the weights, read-through)."""
    at = rows * stride_bn
    value = tl.load(b + at, mask=mask, other=0.0)
    _admit_tile(pool_b, admit, stride_bs, at, value, mask, ADMIT)
    return value.to(tl.float32)


@triton.jit
def _clamped_swiglu(acc_gate, acc_up, bias_gate, bias_up, alpha, limit, dtype: tl.constexpr, ROUND: tl.constexpr):
    """GptOssExperts._apply_gate of (gate GEMM + bias, up GEMM + bias), rounded where torch rounds; the product is
    rounded by the caller's store."""
    gate = _round(_round(acc_gate, dtype, ROUND) + bias_gate, dtype, ROUND)
    up = _round(_round(acc_up, dtype, ROUND) + bias_up, dtype, ROUND)
    gate = tl.minimum(gate, limit)
    up = tl.minimum(tl.maximum(up, -limit), limit)
    sig = _round(tl.sigmoid(_round(gate * alpha, dtype, ROUND)), dtype, ROUND)
    glu = _round(gate * sig, dtype, ROUND)
    return _round(up + 1.0, dtype, ROUND) * glu


@triton.jit
def _gate_up_gemv_kernel(x_ptr, ids_ptr, slot_ptr, w_ptr, s_ptr, b_ptr, host_w_ptr, host_s_ptr, host_b_ptr,
                         num_device_slots, admit_ptr, act_ptr, H, I, top_k, alpha, limit,
                         stride_xt, stride_xh, stride_ws, stride_wn, stride_wk, stride_ss, stride_sn, stride_bs,
                         stride_bn, stride_ap, stride_ai, MXFP4: tl.constexpr, WORDS: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROUND: tl.constexpr, ADMIT: tl.constexpr):
    """act[p, n] = clamped_swiglu(gate(x_t) + b, up(x_t) + b) for pair p = (t, k) over one BLOCK_N slice of I.
    WORDS: MXFP4 read a word at a time (_mxfp4_word_tile), else element by element."""
    pair = tl.program_id(0).to(tl.int64)
    expert = tl.load(ids_ptr + pair)
    slot = tl.load(slot_ptr + expert).to(tl.int64)
    if slot < 0:  # not in this pool; down writes the zero contribution
        return
    admit = tl.load(admit_ptr + expert).to(tl.int64) if ADMIT else -1
    token = pair // top_k
    dtype = act_ptr.dtype.element_ty
    w = _expert_base(w_ptr, host_w_ptr, slot, num_device_slots, stride_ws)
    s = _expert_base(s_ptr, host_s_ptr, slot, num_device_slots, stride_ss)
    b = _expert_base(b_ptr, host_b_ptr, slot, num_device_slots, stride_bs)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    mask_n = offs_n < I
    gate_rows = 2 * offs_n  # [BN] interleaved: gate j is row 2j, up j row 2j + 1
    acc_gate = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # [BK]
        mask_k = offs_k < H
        x = tl.load(x_ptr + token * stride_xt + offs_k * stride_xh, mask=mask_k, other=0.0).to(tl.float32)  # [BK]
        mask = mask_n[:, None] & mask_k[None, :]
        if WORDS:
            gate = _mxfp4_word_tile(w, s, gate_rows, mask_n, k0, H, stride_wn, stride_sn, dtype, BLOCK_N, BLOCK_K,
                                    w_ptr, s_ptr, admit, stride_ws, stride_ss, ADMIT)  # [BN, BK]
            up = _mxfp4_word_tile(w, s, gate_rows + 1, mask_n, k0, H, stride_wn, stride_sn, dtype, BLOCK_N, BLOCK_K,
                                  w_ptr, s_ptr, admit, stride_ws, stride_ss, ADMIT)  # [BN, BK]
        else:
            gate = _weight_tile(w, s, gate_rows[:, None], offs_k[None, :], mask, stride_wn, stride_wk, stride_sn,
                                dtype, MXFP4, w_ptr, s_ptr, admit, stride_ws, stride_ss, ADMIT)  # [BN, BK]
            up = _weight_tile(w, s, gate_rows[:, None] + 1, offs_k[None, :], mask, stride_wn, stride_wk, stride_sn,
                              dtype, MXFP4, w_ptr, s_ptr, admit, stride_ws, stride_ss, ADMIT)  # [BN, BK]
        acc_gate += tl.sum(gate * x[None, :], axis=1)
        acc_up += tl.sum(up * x[None, :], axis=1)
    bias_gate = _bias(b, gate_rows, mask_n, stride_bn, b_ptr, admit, stride_bs, ADMIT)  # [BN]
    bias_up = _bias(b, gate_rows + 1, mask_n, stride_bn, b_ptr, admit, stride_bs, ADMIT)  # [BN]
    act = _clamped_swiglu(acc_gate, acc_up, bias_gate, bias_up, alpha, limit, dtype, ROUND)  # [BN]
    tl.store(act_ptr + pair * stride_ap + offs_n * stride_ai, act.to(dtype), mask=mask_n)


@triton.jit
def _down_gemv_kernel(act_ptr, ids_ptr, slot_ptr, w_ptr, s_ptr, b_ptr, host_w_ptr, host_s_ptr, host_b_ptr,
                      num_device_slots, admit_ptr, weight_ptr, out_ptr, H, I,
                      stride_ap, stride_ai, stride_ws, stride_wn, stride_wk, stride_ss, stride_sn, stride_bs,
                      stride_bn, stride_op, stride_oh, MXFP4: tl.constexpr, WORDS: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROUND: tl.constexpr,
                      ROUND_PRODUCT: tl.constexpr, ZERO_ABSENT: tl.constexpr, ADMIT: tl.constexpr):
    """out[p, n] = weight[p] * (down(act[p]) + b) for pair p over one BLOCK_N slice of H, in float32."""
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
    w = _expert_base(w_ptr, host_w_ptr, slot, num_device_slots, stride_ws)
    s = _expert_base(s_ptr, host_s_ptr, slot, num_device_slots, stride_ss)
    b = _expert_base(b_ptr, host_b_ptr, slot, num_device_slots, stride_bs)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # [BK]
        mask_k = offs_k < I
        a = tl.load(act_ptr + pair * stride_ap + offs_k * stride_ai, mask=mask_k, other=0.0).to(tl.float32)  # [BK]
        if WORDS:
            tile = _mxfp4_word_tile(w, s, offs_n, mask_n, k0, I, stride_wn, stride_sn, dtype, BLOCK_N, BLOCK_K,
                                    w_ptr, s_ptr, admit, stride_ws, stride_ss, ADMIT)  # [BN, BK]
        else:
            tile = _weight_tile(w, s, offs_n[:, None], offs_k[None, :], mask_n[:, None] & mask_k[None, :], stride_wn,
                                stride_wk, stride_sn, dtype, MXFP4, w_ptr, s_ptr, admit, stride_ws, stride_ss,
                                ADMIT)  # [BN, BK]
        acc += tl.sum(tile * a[None, :], axis=1)
    bias = _bias(b, offs_n, mask_n, stride_bn, b_ptr, admit, stride_bs, ADMIT)  # [BN]
    acc = _round(_round(acc, dtype, ROUND) + bias, dtype, ROUND)
    acc = _weighted(acc, tl.load(weight_ptr + pair).to(tl.float32), dtype, ROUND, ROUND_PRODUCT)
    tl.store(out_ptrs, acc, mask=mask_n)


@triton.jit
def _gate_up_grouped_kernel(x_ptr, pairs_ptr, block_slot_ptr, w_ptr, s_ptr, b_ptr, host_w_ptr, host_s_ptr,
                            host_b_ptr, num_device_slots, act_ptr, num_pairs, H, I, top_k, alpha, limit,
                            stride_xt, stride_xh, stride_ws, stride_wn, stride_wk, stride_ss, stride_sn, stride_bs,
                            stride_bn, stride_ap, stride_ai, MXFP4: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                            ROUND: tl.constexpr):
    """act[pairs of one M-block, n-slice] = clamped_swiglu(x @ gate.T + b, x @ up.T + b); one slot per block."""
    block = tl.program_id(0)
    slot = tl.load(block_slot_ptr + block).to(tl.int64)
    if slot < 0:  # pairs not in this pool, or past the last padded block
        return
    pairs = tl.load(pairs_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # [BM], padding = num_pairs
    mask_m = pairs < num_pairs
    tokens = pairs // top_k  # [BM]
    dtype = act_ptr.dtype.element_ty
    w = _expert_base(w_ptr, host_w_ptr, slot, num_device_slots, stride_ws)
    s = _expert_base(s_ptr, host_s_ptr, slot, num_device_slots, stride_ss)
    b = _expert_base(b_ptr, host_b_ptr, slot, num_device_slots, stride_bs)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    mask_n = offs_n < I
    gate_rows = 2 * offs_n  # [BN]
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # [BK]
        mask_k = offs_k < H
        x = tl.load(x_ptr + tokens[:, None] * stride_xt + offs_k[None, :] * stride_xh,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BM, BK]
        mask_w = mask_k[:, None] & mask_n[None, :]
        gate = _weight_tile(w, s, gate_rows[None, :], offs_k[:, None], mask_w, stride_wn, stride_wk, stride_sn, dtype,
                            MXFP4, w_ptr, s_ptr, -1, stride_ws, stride_ss, False)  # [BK, BN]
        up = _weight_tile(w, s, gate_rows[None, :] + 1, offs_k[:, None], mask_w, stride_wn, stride_wk, stride_sn,
                          dtype, MXFP4, w_ptr, s_ptr, -1, stride_ws, stride_ss, False)  # [BK, BN]
        acc_gate = tl.dot(x, gate.to(dtype), acc_gate, input_precision=INPUT_PRECISION)
        acc_up = tl.dot(x, up.to(dtype), acc_up, input_precision=INPUT_PRECISION)
    bias_gate = _bias(b, gate_rows, mask_n, stride_bn, b_ptr, -1, stride_bs, False)[None, :]  # [1, BN]
    bias_up = _bias(b, gate_rows + 1, mask_n, stride_bn, b_ptr, -1, stride_bs, False)[None, :]  # [1, BN]
    act = _clamped_swiglu(acc_gate, acc_up, bias_gate, bias_up, alpha, limit, dtype, ROUND)  # [BM, BN]
    tl.store(act_ptr + pairs[:, None] * stride_ap + offs_n[None, :] * stride_ai, act.to(dtype),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _down_grouped_kernel(act_ptr, pairs_ptr, block_slot_ptr, w_ptr, s_ptr, b_ptr, host_w_ptr, host_s_ptr,
                         host_b_ptr, num_device_slots, weight_ptr, out_ptr, num_pairs, H, I,
                         stride_ap, stride_ai, stride_ws, stride_wn, stride_wk, stride_ss, stride_sn, stride_bs,
                         stride_bn, stride_op, stride_oh, MXFP4: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                         ROUND: tl.constexpr, ROUND_PRODUCT: tl.constexpr, ZERO_ABSENT: tl.constexpr):
    """out[pairs of one M-block, n-slice] = weight * (act @ down.T + b), in float32."""
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
    w = _expert_base(w_ptr, host_w_ptr, slot, num_device_slots, stride_ws)
    s = _expert_base(s_ptr, host_s_ptr, slot, num_device_slots, stride_ss)
    b = _expert_base(b_ptr, host_b_ptr, slot, num_device_slots, stride_bs)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # [BK]
        mask_k = offs_k < I
        a = tl.load(act_ptr + pairs[:, None] * stride_ap + offs_k[None, :] * stride_ai,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BM, BK]
        tile = _weight_tile(w, s, offs_n[None, :], offs_k[:, None], mask_k[:, None] & mask_n[None, :], stride_wn,
                            stride_wk, stride_sn, dtype, MXFP4, w_ptr, s_ptr, -1, stride_ws, stride_ss,
                            False)  # [BK, BN]
        acc = tl.dot(a, tile.to(dtype), acc, input_precision=INPUT_PRECISION)
    bias = _bias(b, offs_n, mask_n, stride_bn, b_ptr, -1, stride_bs, False)[None, :]  # [1, BN]
    acc = _round(_round(acc, dtype, ROUND) + bias, dtype, ROUND)
    weight = tl.load(weight_ptr + pairs, mask=mask_m, other=0.0).to(tl.float32)[:, None]  # [BM, 1]
    acc = _weighted(acc, weight, dtype, ROUND, ROUND_PRODUCT)
    tl.store(out_ptrs, acc, mask=mask_out)


def _planes(device: BiasedMatrix, host: BiasedMatrix, gemv_block_k: int | None = None) -> tuple[tuple, tuple, dict]:
    """(pointers, strides, constants) of a matrix's pools for the kernels: weight (or MXFP4 blocks), scales (the
    weight stands in for a dense pool, never read) and bias, device then host, which share one set of strides.
    gemv_block_k: a GEMV's BLOCK_K, for WORDS (MXFP4 read a word at a time where the rows' blocks are contiguous
    and rows and slots start on 4-byte boundaries); None: a grouped kernel, which takes no WORDS."""
    mxfp4 = isinstance(device.weight, Mxfp4Matrix)
    if mxfp4:
        weight, host_weight = device.weight.blocks, host.weight.blocks  # [S, N, K/32, 16]
        scales, host_scales = device.weight.scales, host.weight.scales  # [S, N, K/32]
        weight_strides = weight.stride()[:3]  # slot, row, block (a block's 16 bytes are contiguous)
        scale_strides = scales.stride()[:2]
    else:
        weight, host_weight = device.weight, host.weight  # [S, N, K] (transposed views of [S, K, N])
        scales, host_scales = weight, host_weight
        weight_strides = weight.stride()
        scale_strides = weight.stride()[:2]
    pointers = (weight, scales, device.bias, host_weight, host_scales, host.bias)
    constants = dict(MXFP4=mxfp4)
    if gemv_block_k is not None:
        contiguous_rows = mxfp4 and weight.stride(3) == 1 and weight.stride(2) == weight.shape[3]  # [.., K/32, 16]
        constants["WORDS"] = contiguous_rows and gemv_block_k % 32 == 0 and all(
            value % 4 == 0 for value in (*weight_strides[:2], weight.data_ptr(), host_weight.data_ptr()))
    return pointers, (*weight_strides, *scale_strides, *device.bias.stride()), constants


def _glu(w13: BiasedMatrix) -> tuple[float, float]:
    return float(w13.glu.alpha), float(w13.glu.limit)


def decode(hidden, ids, weights, slot_of_expert, admit_slots, w13: BiasedMatrix, w2: BiasedMatrix,
           host_w13: BiasedMatrix, host_w2: BiasedMatrix, act, contrib, rounding: dict, own_rows: bool, admit: bool,
           top_k: int) -> None:
    """triton_moe.fused_moe's GEMV path on GPT-OSS pools: act [P, I] then the pairs' rows of contrib [P, H]."""
    num_device_slots, two_inter, hidden_size = w13.shape
    inter, num_pairs = two_inter // 2, ids.numel()
    pointers, strides, constants = _planes(w13, host_w13, _GEMV_GATE_UP["BLOCK_K"])
    _gate_up_gemv_kernel[(num_pairs, triton.cdiv(inter, _GEMV_GATE_UP["BLOCK_N"]))](
        hidden, ids, slot_of_expert, *pointers, num_device_slots, admit_slots, act, hidden_size, inter, top_k,
        *_glu(w13), *hidden.stride(), *strides, *act.stride(), ROUND=rounding["ROUND"], ADMIT=admit, **constants,
        **_GEMV_GATE_UP)
    pointers, strides, constants = _planes(w2, host_w2, _GEMV_DOWN["BLOCK_K"])
    _down_gemv_kernel[(num_pairs, triton.cdiv(hidden_size, _GEMV_DOWN["BLOCK_N"]))](
        act, ids, slot_of_expert, *pointers, num_device_slots, admit_slots, weights, contrib, hidden_size, inter,
        *act.stride(), *strides, *contrib.stride(), **rounding, ZERO_ABSENT=own_rows, ADMIT=admit, **constants,
        **_GEMV_DOWN)


def prefill(hidden, sorted_pairs, block_slot, weights, w13: BiasedMatrix, w2: BiasedMatrix, host_w13: BiasedMatrix,
            host_w2: BiasedMatrix, act, contrib, rounding: dict, own_rows: bool, meta: dict, top_k: int) -> None:
    """triton_moe.fused_moe's grouped-GEMM path on GPT-OSS pools, over pairs grouped by slot (align_by_slot)."""
    num_device_slots, two_inter, hidden_size = w13.shape
    inter = two_inter // 2
    num_pairs, num_blocks = act.shape[0], block_slot.numel()
    pointers, strides, constants = _planes(w13, host_w13)
    _gate_up_grouped_kernel[(num_blocks, triton.cdiv(inter, meta["BLOCK_N"]))](
        hidden, sorted_pairs, block_slot, *pointers, num_device_slots, act, num_pairs, hidden_size, inter, top_k,
        *_glu(w13), *hidden.stride(), *strides, *act.stride(), ROUND=rounding["ROUND"], **constants, **meta)
    pointers, strides, constants = _planes(w2, host_w2)
    _down_grouped_kernel[(num_blocks, triton.cdiv(hidden_size, meta["BLOCK_N"]))](
        act, sorted_pairs, block_slot, *pointers, num_device_slots, weights, contrib, num_pairs, hidden_size, inter,
        *act.stride(), *strides, *contrib.stride(), **rounding, ZERO_ABSENT=own_rows, **constants, **meta)
