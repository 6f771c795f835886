"""Fused MoE over cached experts in Triton: gate/up GEMM with SiLU(gate) * up, then down GEMM * routing weight.

Experts are addressed through a pool pair (w13 [S, 2I, H] gate rows first, w2 [S, H, I]) and a per-expert slot
index `slot_of_expert [E] int32`, -1 meaning "not in this pool": those (token, expert) pairs contribute nothing.
So a layer whose experts are spread over its cache pool and the scratch waves calls fused_moe once per pool
with that pool's slot map and the same float32 `out`, and gets the full sum without copying experts around.

An optional second pair (host_w13 [N, 2I, H], host_w2 [N, H, I]) extends the slot space: slot S + r is row r of
it. On CUDA those are pinned, mapped host tensors that the kernels read in place over PCIe (zero-copy: as fast as
copying them, both bound by the PCIe link), so one launch set covers hits and misses with no copy, no host sync,
and a step that can be captured in a CUDA graph.

Two kernels per path (gate_up + act, down + weight) and a torch sum over K, not one fused kernel: the down GEMM
needs the whole I-wide activation of a row, which one gate/up program does not have, and the [T*K, I]
activation round trip is small next to the expert weights. Each (token, k) contribution is written to its own
float32 row [T*K, H] and summed over K in a fixed order, so results are deterministic (no atomics).

- decode (T*K <= DECODE_MAX_PAIRS): one program per (pair, N-block), a GEMV on the CUDA cores; no sorting or
  padding, so the step is a handful of launches, and each expert's rows are streamed once per pair.
- prefill: pairs grouped by slot and padded per slot to BLOCK_M (vLLM's moe_align_block_size, done in torch with
  no host sync), then grouped GEMMs on the tensor cores; each expert's weights are read once per M-block.
Only SiLU is supported: the caller checks `config.hidden_act == "silu"`. The pools are dense tensors here;
int4/int8 experts (expert_format.QuantMatrix views of the same byte rows) take triton_quant.py's kernels, which
dequantize in their inner loop, through the same fused_moe; FP8 block-quantized experts (FP8Matrix) take
triton_fp8.py's.

Rounding: GEMMs accumulate in float32, but in half precision the kernels round the same intermediates that
transformers' experts (and reference.accumulate_expert) materialise in the hidden dtype: the gate and up GEMM
outputs, silu(gate), the activation, the down GEMM output, and the weighted output when the routing weights are in
the hidden dtype (Mixtral's are float32, so `down_out * weight` promotes and is not rounded). float32 intermediates
are ~2.5x closer to an fp64 truth, but ~2/3 of the outputs then differ from transformers' by an ulp, which reach
the next layer's router: where its top-k gap is one bf16 ulp, another expert is picked, and one flipped
(token, expert) moves the logits by ~0.1 (seen on CPU, and the likely cause of differences that size in bf16
GPU correctness checks). Rounding like torch leaves only accumulation-order differences (<= 0.3% of outputs on CPU).
MATCH_TORCH_ROUNDING = False restores the float32 intermediates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..expert_format import BiasedMatrix, FP8Matrix, Matrix, Mxfp4Matrix, QuantMatrix
from .reference import accumulate_expert

# T*K at or below which the GEMV path runs: up to here pairs rarely share an expert (so per-pair streaming reads
# each expert once) and tensor-core tiles of 16+ rows would be mostly padding. Tests override it.
DECODE_MAX_PAIRS = 16

# Round gate, up, silu(gate), down's output and (for half-precision routing weights) the weighted output to the
# hidden dtype where transformers' experts do, instead of keeping them in float32. See the module docstring.
MATCH_TORCH_ROUNDING = True

# GEMV tiles, fixed (a per-process choice could change reduction order, hence bits, between ratios). gate_up with
# 8 rows per program: 768 programs for 8 pairs at I=768, enough to fill an H100/H200 (faster than 16 rows there).
# down with 16 rows already runs near HBM speed. Reading pinned host memory in place, every tile choice is
# PCIe-bound.
_GEMV_GATE_UP = dict(BLOCK_N=8, BLOCK_K=256, num_warps=4)
_GEMV_DOWN = dict(BLOCK_N=16, BLOCK_K=256, num_warps=4)
_GEMM = dict(BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)


@triton.jit
def _round(x, dtype: tl.constexpr, ROUND: tl.constexpr):
    """x rounded to `dtype` and back to float32 when ROUND, else x: where torch materialises a tensor."""
    if ROUND:
        x = x.to(dtype).to(tl.float32)
    return x


@triton.jit
def _silu_mul(acc_gate, acc_up, dtype: tl.constexpr, ROUND: tl.constexpr):
    """silu(gate) * up from float32 accumulators, rounded where torch's `act_fn(gate) * up` rounds: gate, up
    (the GEMM outputs) and silu(gate); the product is rounded by the caller's store."""
    gate = _round(acc_gate, dtype, ROUND)
    return _round(gate * tl.sigmoid(gate), dtype, ROUND) * _round(acc_up, dtype, ROUND)


@triton.jit
def _weighted(acc, weight, dtype: tl.constexpr, ROUND: tl.constexpr, ROUND_PRODUCT: tl.constexpr):
    """down(act) * routing weight in float32, rounded like torch's `down_out * weight`: down_out is rounded to
    the hidden dtype first; the product too when the weights are in that dtype (float32 weights promote it)."""
    return _round(_round(acc, dtype, ROUND) * weight, dtype, ROUND_PRODUCT)


@triton.jit
def _expert_base(device_ptr, host_ptr, slot, num_device_slots, stride_slot):
    """Address of slot `slot`'s matrix: in the device pool below num_device_slots, else in the host pool."""
    if slot < num_device_slots:
        base = device_ptr + slot * stride_slot
    else:
        base = host_ptr + (slot - num_device_slots) * stride_slot
    return base


@triton.jit
def _admit_tile(pool_ptr, admit, stride_slot, offsets, tile, mask, ADMIT: tl.constexpr):
    """Read-through caching: write a weight tile just read into device slot `admit` (>= 0), when ADMIT."""
    if ADMIT:
        if admit >= 0:
            tl.store(pool_ptr + admit * stride_slot + offsets, tile, mask=mask)


@triton.jit
def _gate_up_gemv_kernel(x_ptr, ids_ptr, slot_ptr, w13_ptr, host_w13_ptr, num_device_slots, admit_ptr, act_ptr,
                         H, I, top_k, stride_xt, stride_xh, stride_ws, stride_wn, stride_wh, stride_ap, stride_ai,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROUND: tl.constexpr, ADMIT: tl.constexpr):
    """act[p, n] = silu(gate(x_t)) * up(x_t) for pair p = (t, k) over one BLOCK_N slice of I.

    ADMIT: the rows read are also written to device slot admit[expert] where that is >= 0 (read-through caching
    of a miss read in place: the cache fills with no second read over PCIe)."""
    pair = tl.program_id(0).to(tl.int64)
    expert = tl.load(ids_ptr + pair)
    slot = tl.load(slot_ptr + expert).to(tl.int64)
    if slot < 0:  # not in this pool; down writes the zero contribution
        return
    admit = tl.load(admit_ptr + expert).to(tl.int64) if ADMIT else -1
    token = pair // top_k
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    mask_n = offs_n < I
    gate_ptrs = (_expert_base(w13_ptr, host_w13_ptr, slot, num_device_slots, stride_ws)
                 + offs_n[:, None] * stride_wn)  # [BN, 1]
    up_ptrs = gate_ptrs + I * stride_wn  # [BN, 1]
    acc_gate = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # [BK]
        mask_k = offs_k < H
        x = tl.load(x_ptr + token * stride_xt + offs_k * stride_xh, mask=mask_k, other=0.0).to(tl.float32)  # [BK]
        mask = mask_n[:, None] & mask_k[None, :]
        gate = tl.load(gate_ptrs + offs_k[None, :] * stride_wh, mask=mask, other=0.0)  # [BN, BK]
        up = tl.load(up_ptrs + offs_k[None, :] * stride_wh, mask=mask, other=0.0)  # [BN, BK]
        tile = offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wh  # [BN, BK] offsets in an expert
        _admit_tile(w13_ptr, admit, stride_ws, tile, gate, mask, ADMIT)
        _admit_tile(w13_ptr, admit, stride_ws, tile + I * stride_wn, up, mask, ADMIT)
        gate = gate.to(tl.float32)
        up = up.to(tl.float32)
        acc_gate += tl.sum(gate * x[None, :], axis=1)
        acc_up += tl.sum(up * x[None, :], axis=1)
    act = _silu_mul(acc_gate, acc_up, act_ptr.dtype.element_ty, ROUND)  # [BN]
    tl.store(act_ptr + pair * stride_ap + offs_n * stride_ai, act.to(act_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _down_gemv_kernel(act_ptr, ids_ptr, slot_ptr, w2_ptr, host_w2_ptr, num_device_slots, admit_ptr, weight_ptr,
                      out_ptr, H, I, stride_ap, stride_ai, stride_ws, stride_wn, stride_wi, stride_op, stride_oh,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROUND: tl.constexpr,
                      ROUND_PRODUCT: tl.constexpr, ZERO_ABSENT: tl.constexpr, ADMIT: tl.constexpr):
    """out[p, n] = weight[p] * down(act[p]) for pair p over one BLOCK_N slice of H, in float32 (ADMIT: as in
    _gate_up_gemv_kernel)."""
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
    w_ptrs = (_expert_base(w2_ptr, host_w2_ptr, slot, num_device_slots, stride_ws)
              + offs_n[:, None] * stride_wn)  # [BN, 1]
    admit = tl.load(admit_ptr + expert).to(tl.int64) if ADMIT else -1
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # [BK]
        mask_k = offs_k < I
        a = tl.load(act_ptr + pair * stride_ap + offs_k * stride_ai, mask=mask_k, other=0.0).to(tl.float32)  # [BK]
        mask = mask_n[:, None] & mask_k[None, :]
        w = tl.load(w_ptrs + offs_k[None, :] * stride_wi, mask=mask, other=0.0)  # [BN, BK]
        _admit_tile(w2_ptr, admit, stride_ws, offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wi, w, mask,
                    ADMIT)
        acc += tl.sum(w.to(tl.float32) * a[None, :], axis=1)
    acc = _weighted(acc, tl.load(weight_ptr + pair).to(tl.float32), w2_ptr.dtype.element_ty, ROUND, ROUND_PRODUCT)
    tl.store(out_ptrs, acc, mask=mask_n)


@triton.jit
def _gate_up_grouped_kernel(x_ptr, pairs_ptr, block_slot_ptr, w13_ptr, host_w13_ptr, num_device_slots, act_ptr,
                            num_pairs, H, I, top_k,
                            stride_xt, stride_xh, stride_ws, stride_wn, stride_wh, stride_ap, stride_ai,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            INPUT_PRECISION: tl.constexpr, ROUND: tl.constexpr):
    """act[pairs of one M-block, n-slice] = silu(x @ gate.T) * (x @ up.T); every pair of the block uses one slot."""
    block = tl.program_id(0)  # M-blocks vary fastest: programs sharing a weight tile run together (L2 reuse)
    slot = tl.load(block_slot_ptr + block).to(tl.int64)
    if slot < 0:  # pairs not in this pool, or past the last padded block
        return
    pairs = tl.load(pairs_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # [BM], padding = num_pairs
    mask_m = pairs < num_pairs
    tokens = pairs // top_k  # [BM]
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    mask_n = offs_n < I
    offs_k = tl.arange(0, BLOCK_K)  # [BK]
    x_ptrs = x_ptr + tokens[:, None] * stride_xt + offs_k[None, :] * stride_xh  # [BM, BK]
    gate_ptrs = (_expert_base(w13_ptr, host_w13_ptr, slot, num_device_slots, stride_ws)
                 + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wh)  # [BK, BN]
    up_ptrs = gate_ptrs + I * stride_wn  # [BK, BN]
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        mask_k = offs_k < H - k0
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BM, BK]
        mask_w = mask_k[:, None] & mask_n[None, :]
        gate = tl.load(gate_ptrs, mask=mask_w, other=0.0)  # [BK, BN]
        up = tl.load(up_ptrs, mask=mask_w, other=0.0)  # [BK, BN]
        acc_gate = tl.dot(x, gate, acc_gate, input_precision=INPUT_PRECISION)
        acc_up = tl.dot(x, up, acc_up, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xh
        gate_ptrs += BLOCK_K * stride_wh
        up_ptrs += BLOCK_K * stride_wh
    act = _silu_mul(acc_gate, acc_up, act_ptr.dtype.element_ty, ROUND)  # [BM, BN]
    tl.store(act_ptr + pairs[:, None] * stride_ap + offs_n[None, :] * stride_ai, act.to(act_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _down_grouped_kernel(act_ptr, pairs_ptr, block_slot_ptr, w2_ptr, host_w2_ptr, num_device_slots, weight_ptr,
                         out_ptr, num_pairs, H, I,
                         stride_ap, stride_ai, stride_ws, stride_wn, stride_wi, stride_op, stride_oh,
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
    offs_k = tl.arange(0, BLOCK_K)  # [BK]
    a_ptrs = act_ptr + pairs[:, None] * stride_ap + offs_k[None, :] * stride_ai  # [BM, BK]
    w_ptrs = (_expert_base(w2_ptr, host_w2_ptr, slot, num_device_slots, stride_ws)
              + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wi)  # [BK, BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        mask_k = offs_k < I - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BM, BK]
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)  # [BK, BN]
        acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ai
        w_ptrs += BLOCK_K * stride_wi
    weight = tl.load(weight_ptr + pairs, mask=mask_m, other=0.0).to(tl.float32)[:, None]  # [BM, 1]
    acc = _weighted(acc, weight, w2_ptr.dtype.element_ty, ROUND, ROUND_PRODUCT)
    tl.store(out_ptrs, acc, mask=mask_out)


def align_by_slot(pair_slots: torch.Tensor, num_slots: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group (token, k) pairs by slot, each group padded to a multiple of block_m (vLLM's moe_align_block_size).

    Pure torch with no host sync, so the grid size is a host-side upper bound and the step stays capturable in a
    CUDA graph. Pairs not in the pool (slot -1) form one more group whose blocks get slot -1, like the unused tail.
    Returns sorted_pairs [B * block_m] (pair ids; padding = P) and block_slot [B] int32.
    """
    # P = (token, k) pairs, G = S + 1 groups (the last: not in this pool), B = blocks
    num_pairs = pair_slots.numel()
    device = pair_slots.device
    groups = torch.where(pair_slots < 0, num_slots, pair_slots.long())  # [P]
    order = torch.argsort(groups, stable=True)  # [P]
    counts = torch.zeros(num_slots + 1, dtype=torch.long, device=device).scatter_add_(
        0, groups, torch.ones_like(groups))  # [G]; not bincount, which syncs to size its output
    padded = (counts + block_m - 1) // block_m * block_m  # [G]
    padded_end = torch.cumsum(padded, 0)  # [G]
    sorted_groups = groups[order]  # [P]
    rank = torch.arange(num_pairs, device=device) - (torch.cumsum(counts, 0) - counts)[sorted_groups]  # [P]
    dest = (padded_end - padded)[sorted_groups] + rank  # [P]
    num_blocks = triton.cdiv(num_pairs, block_m) + min(num_pairs, num_slots + 1)  # >= sum of ceil(count / BM)
    sorted_pairs = torch.full((num_blocks * block_m,), num_pairs, dtype=torch.int32, device=device)  # [B*BM]
    sorted_pairs[dest] = order.to(torch.int32)
    block_start = torch.arange(num_blocks, device=device) * block_m  # [B]
    block_group = torch.searchsorted(padded_end, block_start, right=True)  # [B], G past the end
    block_slot = torch.where(block_group < num_slots, block_group, -1).to(torch.int32)  # [B]
    return sorted_pairs, block_slot


def _layout(matrix: Matrix) -> tuple:
    """What the kernels assume alike of a device pool and its host pool: they take one set of strides."""
    if isinstance(matrix, FP8Matrix):
        return (matrix.spec, matrix.parts) + tuple((t.dtype, t.stride()) for t in (matrix.weight, matrix.scale))
    if isinstance(matrix, QuantMatrix):
        planes = (matrix.packed, matrix.scale) + (() if matrix.zero is None else (matrix.zero,))
        return (matrix.bits, matrix.group_size, matrix.parts) + tuple((t.dtype, t.stride()) for t in planes)
    if isinstance(matrix, BiasedMatrix):  # GPT-OSS (triton_gpt_oss.py)
        return matrix.glu, _layout(matrix.weight), matrix.bias.dtype, matrix.bias.stride()
    if isinstance(matrix, Mxfp4Matrix):
        return matrix.blocks.stride(), matrix.scales.stride()
    return matrix.dtype, matrix.stride()


def _check(hidden, top_k_ids, top_k_weights, w13, w2, slot_of_expert, out, host_w13=None, host_w2=None) -> None:
    """Shape/dtype checks that need no host sync; slot values (< S + N) are the caller's contract."""
    num_slots, two_inter, hidden_size = w13.shape
    if (host_w13 is None) != (host_w2 is None):
        raise ValueError("host_w13 and host_w2 go together")
    pools = [w13, w2] + ([host_w13, host_w2] if host_w13 is not None else [])
    if len({type(pool) for pool in pools}) > 1:
        raise ValueError("pools must be all dense tensors or all quantized")
    if host_w13 is not None and (host_w13.shape[1:] != w13.shape[1:] or host_w2.shape[1:] != w2.shape[1:]
                                 or host_w13.shape[0] != host_w2.shape[0] or _layout(host_w13) != _layout(w13)
                                 or _layout(host_w2) != _layout(w2)):  # the kernels use one set of strides
        raise ValueError(f"host pools {tuple(host_w13.shape)} / {tuple(host_w2.shape)} do not match the device "
                         f"pools {tuple(w13.shape)} / {tuple(w2.shape)} (same dtype and strides)")
    if hidden.dim() != 2 or hidden.shape[1] != hidden_size or two_inter % 2:
        raise ValueError(f"hidden {tuple(hidden.shape)} does not match w13 {tuple(w13.shape)}")
    if tuple(w2.shape) != (num_slots, hidden_size, two_inter // 2):
        raise ValueError(f"w2 {tuple(w2.shape)} does not match w13 {tuple(w13.shape)}")
    if top_k_ids.dim() != 2 or top_k_ids.shape[0] != hidden.shape[0] or top_k_weights.shape != top_k_ids.shape:
        raise ValueError(f"top_k_ids {tuple(top_k_ids.shape)} / weights {tuple(top_k_weights.shape)} "
                         f"do not match hidden {tuple(hidden.shape)}")
    if isinstance(w13, torch.Tensor) and not hidden.dtype == w13.dtype == w2.dtype:
        raise ValueError(f"dtypes differ: hidden {hidden.dtype}, w13 {w13.dtype}, w2 {w2.dtype}")
    if slot_of_expert.dtype != torch.int32 or slot_of_expert.dim() != 1:
        raise ValueError(f"slot_of_expert must be 1-D int32, got {slot_of_expert.dtype} {tuple(slot_of_expert.shape)}")
    if out is not None and (out.dtype != torch.float32 or out.shape != hidden.shape):
        raise ValueError(f"out must be float32 {tuple(hidden.shape)}, got {out.dtype} {tuple(out.shape)}")


def _rounding(dtype: torch.dtype, weight_dtype: torch.dtype) -> dict[str, bool]:
    """Where the kernels round intermediates to the hidden dtype, as torch does (see MATCH_TORCH_ROUNDING)."""
    half = MATCH_TORCH_ROUNDING and dtype != torch.float32
    return dict(ROUND=half, ROUND_PRODUCT=half and torch.promote_types(dtype, weight_dtype) == dtype)


def fused_moe(hidden: torch.Tensor, top_k_ids: torch.Tensor, top_k_weights: torch.Tensor, w13: Matrix,
              w2: Matrix, slot_of_expert: torch.Tensor, out: torch.Tensor | None = None,
              contrib: torch.Tensor | None = None, host_w13: Matrix | None = None,
              host_w2: Matrix | None = None, admit_slot_of_expert: torch.Tensor | None = None) -> torch.Tensor:
    """sum_k top_k_weights[t, k] * expert_{top_k_ids[t, k]}(hidden[t]) over the experts that are in this pool.

    hidden [T, H]; top_k_ids [T, K] expert ids; top_k_weights [T, K]; w13 [S, 2I, H] (gate rows, then up rows);
    w2 [S, H, I]; slot_of_expert [E] int32, the slot of each expert in w13/w2 or -1 (skipped).
    Without `out`: returns [T, H] in hidden's dtype. With `out` ([T, H] float32): adds into it and returns it,
    so contributions from several pools are summed in float32 and rounded once by the caller.
    With `contrib` ([T*K, H] float32): writes the weighted output of each (token, k) pair of this pool into its
    row, leaves the other rows alone and returns contrib: the caller runs every pool, then sums over K once, so
    the result does not depend on how experts were split over pools.
    With host_w13 [N, 2I, H] / host_w2 [N, H, I]: slots S..S+N-1 are their rows, read in place (zero-copy).
    With admit_slot_of_expert [E] int32 (decode path only): an expert with a value d >= 0 is also written into
    device slot d as it is read (read-through caching); d must not hold an expert this call reads.
    Quantized pools (expert_format.QuantMatrix views standing for w13 / w2 and their host pools) run the same
    contract with triton_quant.py's kernels, FP8 ones (FP8Matrix) with triton_fp8.py's.
    """
    # T = tokens, K = top-k, E = experts, S = slots, H = hidden, I = intermediate, P = T*K (token, k) pairs
    _check(hidden, top_k_ids, top_k_weights, w13, w2, slot_of_expert, out, host_w13, host_w2)
    num_tokens, top_k = top_k_ids.shape  # [T, K]
    num_device_slots, two_inter, hidden_size = w13.shape  # [S, 2I, H]
    if host_w13 is None:  # never dereferenced: every slot is below num_device_slots
        host_w13, host_w2 = w13, w2
        num_slots = num_device_slots
    else:
        num_slots = num_device_slots + host_w13.shape[0]
    inter = two_inter // 2
    num_pairs = num_tokens * top_k
    if num_pairs == 0:
        return out if out is not None else hidden.new_zeros(hidden.shape)
    ids = top_k_ids.reshape(-1)  # [P]
    weights = top_k_weights.reshape(-1)  # [P]
    act = torch.empty((num_pairs, inter), dtype=hidden.dtype, device=hidden.device)  # [P, I]
    own_rows = contrib is None
    if own_rows:
        contrib = torch.empty((num_pairs, hidden_size), dtype=torch.float32, device=hidden.device)  # [P, H]
    elif contrib.shape != (num_pairs, hidden_size) or contrib.dtype != torch.float32 or not contrib.is_contiguous():
        raise ValueError(f"contrib must be a contiguous float32 [{num_pairs}, {hidden_size}] tensor")
    rounding = _rounding(hidden.dtype, top_k_weights.dtype)

    admit = admit_slot_of_expert is not None
    if admit and (num_pairs > DECODE_MAX_PAIRS or admit_slot_of_expert.shape != slot_of_expert.shape
                  or admit_slot_of_expert.dtype != torch.int32):
        raise ValueError("admit_slot_of_expert must be [E] int32, and only on the decode path")
    if isinstance(w13, QuantMatrix):
        from . import triton_quant  # the int4/int8 kernels; imported here since they import this module's helpers
        decode, prefill = triton_quant.decode, triton_quant.prefill
    elif isinstance(w13, FP8Matrix):
        from . import triton_fp8  # the FP8 block-quantized kernels, likewise
        decode, prefill = triton_fp8.decode, triton_fp8.prefill
    elif isinstance(w13, BiasedMatrix):
        from . import triton_gpt_oss  # GPT-OSS's biased, interleaved, clamped-SwiGLU experts, dense or MXFP4
        decode, prefill = triton_gpt_oss.decode, triton_gpt_oss.prefill
    else:
        decode, prefill = _decode, _prefill
    if num_pairs <= DECODE_MAX_PAIRS:
        admit_slots = admit_slot_of_expert if admit else slot_of_expert  # never read when not admitting
        decode(hidden, ids, weights, slot_of_expert, admit_slots, w13, w2, host_w13, host_w2, act, contrib, rounding,
               own_rows, admit, top_k)
    else:
        # Rows per tile ~ pairs per expert: small tiles waste less padding when each expert gets few tokens.
        block_m = min(64, max(16, triton.next_power_of_2(triton.cdiv(num_pairs, slot_of_expert.numel()))))
        sorted_pairs, block_slot = align_by_slot(slot_of_expert[ids], num_slots, block_m)  # [B*BM], [B]
        precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"  # fp32 matches torch's matmul
        meta = dict(BLOCK_M=block_m, INPUT_PRECISION=precision, **_GEMM)
        prefill(hidden, sorted_pairs, block_slot, weights, w13, w2, host_w13, host_w2, act, contrib, rounding,
                own_rows, meta, top_k)

    if not own_rows:
        return contrib
    summed = contrib.view(num_tokens, top_k, hidden_size).sum(dim=1)  # [T, H], fixed order over K
    if out is None:
        return summed.to(hidden.dtype)
    return out.add_(summed)


def _decode(hidden, ids, weights, slot_of_expert, admit_slots, w13, w2, host_w13, host_w2, act, contrib,
            rounding: dict, own_rows: bool, admit: bool, top_k: int) -> None:
    """fused_moe's GEMV path: act [P, I] then the pairs' rows of contrib [P, H]."""
    num_device_slots, two_inter, hidden_size = w13.shape
    inter, num_pairs = two_inter // 2, ids.numel()
    x_strides, w13_strides, w2_strides = hidden.stride(), w13.stride(), w2.stride()
    act_strides, out_strides = act.stride(), contrib.stride()
    _gate_up_gemv_kernel[(num_pairs, triton.cdiv(inter, _GEMV_GATE_UP["BLOCK_N"]))](
        hidden, ids, slot_of_expert, w13, host_w13, num_device_slots, admit_slots, act, hidden_size, inter,
        top_k, *x_strides, *w13_strides, *act_strides, ROUND=rounding["ROUND"], ADMIT=admit, **_GEMV_GATE_UP)
    _down_gemv_kernel[(num_pairs, triton.cdiv(hidden_size, _GEMV_DOWN["BLOCK_N"]))](
        act, ids, slot_of_expert, w2, host_w2, num_device_slots, admit_slots, weights, contrib, hidden_size,
        inter, *act_strides, *w2_strides, *out_strides, **rounding, ZERO_ABSENT=own_rows, ADMIT=admit,
        **_GEMV_DOWN)


def _prefill(hidden, sorted_pairs, block_slot, weights, w13, w2, host_w13, host_w2, act, contrib, rounding: dict,
             own_rows: bool, meta: dict, top_k: int) -> None:
    """fused_moe's grouped-GEMM path, over pairs grouped by slot (align_by_slot)."""
    num_device_slots, two_inter, hidden_size = w13.shape
    inter, num_pairs, num_blocks = two_inter // 2, act.shape[0], block_slot.numel()
    x_strides, w13_strides, w2_strides = hidden.stride(), w13.stride(), w2.stride()
    act_strides, out_strides = act.stride(), contrib.stride()
    _gate_up_grouped_kernel[(num_blocks, triton.cdiv(inter, meta["BLOCK_N"]))](
        hidden, sorted_pairs, block_slot, w13, host_w13, num_device_slots, act, num_pairs, hidden_size, inter,
        top_k, *x_strides, *w13_strides, *act_strides, ROUND=rounding["ROUND"], **meta)
    _down_grouped_kernel[(num_blocks, triton.cdiv(hidden_size, meta["BLOCK_N"]))](
        act, sorted_pairs, block_slot, w2, host_w2, num_device_slots, weights, contrib, num_pairs, hidden_size,
        inter,
        *act_strides, *w2_strides, *out_strides, **rounding, ZERO_ABSENT=own_rows, **meta)


def fused_moe_reference(hidden: torch.Tensor, top_k_ids: torch.Tensor, top_k_weights: torch.Tensor,
                        w13: Matrix, w2: Matrix, slot_of_expert: torch.Tensor,
                        out: torch.Tensor | None = None, host_w13: Matrix | None = None,
                        host_w2: Matrix | None = None) -> torch.Tensor:
    """fused_moe's contract computed eagerly with reference.accumulate_expert: the oracle for its tests."""
    _check(hidden, top_k_ids, top_k_weights, w13, w2, slot_of_expert, out, host_w13, host_w2)
    acc = out if out is not None else torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)  # [T, H]
    num_device_slots = w13.shape[0]
    for expert in top_k_ids.unique().tolist():
        slot = int(slot_of_expert[expert])
        if slot < 0:
            continue
        if slot < num_device_slots:
            gate_up, down = w13[slot], w2[slot]
        else:
            row = slot - num_device_slots
            gate_up, down = host_w13[row].to(hidden.device), host_w2[row].to(hidden.device)
        tokens, ks = (top_k_ids == expert).nonzero(as_tuple=True)  # [n], [n]
        accumulate_expert(acc, hidden, tokens, top_k_weights[tokens, ks], gate_up, down, F.silu)
    return acc if out is not None else acc.to(hidden.dtype)
