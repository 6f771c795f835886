"""Eager torch expert compute: the CPU path, and the oracle every faster kernel is tested against.

It mirrors transformers' own experts math (gate/up projection, act(gate) * up, down projection, times the
routing weight in the routing weight's dtype) so that offloaded results match transformers on the same
checkpoint; contributions are summed in float32, as transformers' grouped_mm path does, and rounded once.

A quantized expert (expert_format.QuantMatrix) is first dequantized to what compressed-tensors decompresses it to,
(q - zero) * scale computed exactly in float32 and rounded to the scale's dtype, then taken in the compute dtype
(as transformers would hold the decompressed weight): the same expert math then runs on it. An FP8
block-quantized expert (expert_format.FP8Matrix) is float(fp8) * its block's float32 scale, rounded once to the
compute dtype, as transformers dequantizes such a checkpoint (quant/fp8.py).

GPT-OSS's experts (expert_format.BiasedMatrix) mirror GptOssExperts: x @ W (W stored [K, N], read through a
transposed view), then the bias added to the rounded product, as transformers adds it; the interleaved gate/up
through the clamped SwiGLU; MXFP4 weights dequantized exactly first (quant/mxfp4.py), as transformers does on load.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..expert_format import BiasedMatrix, ClampedSwiGLU, FP8Matrix, Matrix, Mxfp4Matrix, QuantMatrix
from ..quant import fp8, mxfp4
from ..quant.format import unpack


def dequantize(matrix: QuantMatrix | FP8Matrix, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Rows [start, stop) of W [N, K] float32 = (u - z) * scale of one quantized matrix, exact (u - z needs 9 bits,
    a bf16/fp16 scale 11, float32 holds 24). quant.format.unpack reads the words; the groups here may end short of
    K (G = ceil(K/g)), which the kernels must handle too, and gate_up's zero points are packed per projection
    (QuantMatrix.parts). A row range serves the CPU path, which dequantizes an L2-sized block at a time."""
    if isinstance(matrix, FP8Matrix):
        return fp8.dequantize(matrix.weight, matrix.scale, matrix.spec, matrix.parts, start, stop)  # [r, K]
    rows, cols, bits = matrix.packed.shape[0], matrix.in_features, matrix.bits
    stop = rows if stop is None else stop
    signed = unpack(matrix.packed[start:stop], bits, cols).float()  # [r, K] u - 2^(b-1)
    group = torch.arange(cols, device=signed.device) // matrix.group_size  # [K] group of each column
    scale = matrix.scale[start:stop].float()[:, group]  # [r, K]
    if matrix.zero is None:
        return signed * scale
    per_part = rows // matrix.parts
    zero = torch.cat([unpack(part.t().contiguous(), bits, per_part).t()  # [N/parts, G] signed zero points
                      for part in matrix.zero.chunk(matrix.parts, dim=0)])[start:stop].float()  # [r, G]
    return (signed - zero[:, group]) * scale


def dense(matrix: Matrix, dtype: torch.dtype) -> torch.Tensor:
    """A dense tensor as it is; a quantized matrix dequantized, rounded to its scale's dtype, in `dtype` (FP8:
    the float32 product rounded once, to `dtype`, as transformers' dequantize does)."""
    if isinstance(matrix, torch.Tensor):
        return matrix
    if isinstance(matrix, FP8Matrix):  # rounded once, whatever the scales' dtype (quant/fp8.py)
        return dequantize(matrix).to(dtype)
    if isinstance(matrix, Mxfp4Matrix):  # exact in any float dtype (quant/mxfp4.py)
        return mxfp4.dequantize(matrix.blocks, matrix.scales).to(dtype)
    return dequantize(matrix).to(matrix.scale.dtype).to(dtype)


def clamped_swiglu(gate_up_out: torch.Tensor, glu: ClampedSwiGLU) -> torch.Tensor:
    """GPT-OSS's activation of the interleaved [n, 2I] projection -> [n, I], op for op as GptOssExperts._apply_gate
    (so in half precision it rounds where transformers rounds)."""
    gate, up = gate_up_out[..., ::2], gate_up_out[..., 1::2]  # [n, I] each
    gate = gate.clamp(min=None, max=glu.limit)
    up = up.clamp(min=-glu.limit, max=glu.limit)
    return (up + 1) * (gate * torch.sigmoid(gate * glu.alpha))


def _biased_linear(x: torch.Tensor, matrix: BiasedMatrix) -> torch.Tensor:
    """x [n, K] @ W + b -> [n, N]: the product rounded, then the bias added (transformers' `@` then `+ bias`)."""
    weight = dense(matrix.weight, x.dtype)  # [N, K]
    return x @ weight.mT + matrix.bias.to(x.dtype)  # weight.mT: [K, N], the checkpoint's own orientation


def expert_ffn(x: torch.Tensor, gate_up: Matrix, down: Matrix,
               act_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """SwiGLU-style expert: x [n, H], gate_up [2I, H] (gate rows first), down [H, I] -> [n, H]. GPT-OSS's
    (BiasedMatrix): biases, gate_up's rows interleaved, its clamped SwiGLU in place of act_fn."""
    if isinstance(gate_up, BiasedMatrix):
        return _biased_linear(clamped_swiglu(_biased_linear(x, gate_up), gate_up.glu), down)  # [n, H]
    gate, up = F.linear(x, dense(gate_up, x.dtype)).chunk(2, dim=-1)  # [n, I] each
    return F.linear(act_fn(gate) * up, dense(down, x.dtype))  # [n, H]


def weighted_expert_output(x: torch.Tensor, weights: torch.Tensor, gate_up: Matrix, down: Matrix,
                           act_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """weights[:, None] * expert(x) in float32: x [n, H], weights [n] -> [n, H]."""
    return (expert_ffn(x, gate_up, down, act_fn) * weights[:, None]).float()


def accumulate_expert(out: torch.Tensor, hidden: torch.Tensor, tokens: torch.Tensor, weights: torch.Tensor,
                      gate_up: Matrix, down: Matrix,
                      act_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """out[tokens] += weights * expert(hidden[tokens]).

    out [T, H] float32; hidden [T, H]; tokens [n] rows routed to this expert; weights [n] their routing weights.
    """
    out.index_add_(0, tokens, weighted_expert_output(hidden[tokens], weights, gate_up, down, act_fn))
