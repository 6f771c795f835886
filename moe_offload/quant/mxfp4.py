"""MXFP4 as GPT-OSS checkpoints store it (OCP microscaling FP4): the one place that knows its bits.

Why here: the loader checks these tensors' shapes, the reference kernel dequantizes them, the Triton kernels and
the tests (which write tiny MXFP4 checkpoints themselves) must agree on every bit; one module keeps one copy of
the conventions (read from transformers 5.25's integrations/mxfp4.py, `convert_moe_packed_tensors`):

- A weight W [N, K] (out, in) is cut along K into blocks of 32 values; each (row, block) has one scale.
- `<proj>_blocks` uint8 [..., N, K/32, 16]: two e2m1 codes per byte, value 2j of the block in the low nibble and
  2j + 1 in the high one. A code is sign (bit 3) and magnitude (bits 0-2) indexing FP4_VALUES' 0, 0.5, 1, 1.5, 2,
  3, 4, 6.
- `<proj>_scales` uint8 [..., N, K/32]: E8M0, the block's power of two with bias 127.
- W[r, k] = FP4_VALUES[code] * 2^(scale - 127): exact in bfloat16 and float32 (an e2m1 value has two significant
  bits; only exponents past the target's range would round, which real checkpoints do not use).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 32  # values per scale
SCALE_BIAS = 127
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


@dataclass(frozen=True)
class Mxfp4Spec:
    """The one MXFP4 scheme: e2m1 values, an E8M0 scale per 32 along K (config.json quant_method "mxfp4")."""

    block: int = BLOCK

    @property
    def bits_per_weight(self) -> float:
        return 4 + 8 / self.block


MXFP4 = Mxfp4Spec()


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Rows [start, stop) of W [N, K] float32 from blocks uint8 [N, K/32, 16] and scales uint8 [N, K/32], exact
    (a stack [n, N, ...] of them: [n, N, K], rows taken along the first dimension)."""
    blocks, scales = blocks[start:stop], scales[start:stop]
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)  # [16]
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).long()  # [..., r, K/32, 16, 2]: low nibble first
    values = lut[codes].reshape(*scales.shape, BLOCK)  # [..., r, K/32, 32]
    exponent = scales.to(torch.int32) - SCALE_BIAS  # [..., r, K/32]
    return torch.ldexp(values, exponent.unsqueeze(-1).float()).flatten(-2)  # [..., r, K]


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks, scales) of W [..., N, K] (K a multiple of 32): per block the scale 2^e with e the smallest
    exponent that puts the block's largest magnitude at or below 6, each value rounded to the nearest e2m1 value
    (ties to the smaller magnitude). For tests and benchmarks: a round-to-nearest quantizer, not a tuned one."""
    *lead, rows, cols = weight.shape
    grouped = weight.float().reshape(*lead, rows, cols // BLOCK, BLOCK)  # [..., N, K/32, 32]
    peak = grouped.abs().amax(dim=-1).clamp(min=2.0 ** -126)  # [..., N, K/32]
    exponent = torch.ceil(torch.log2(peak / 6.0)).clamp(-SCALE_BIAS, SCALE_BIAS)  # [..., N, K/32]
    scaled = grouped / torch.ldexp(torch.ones_like(exponent), exponent).unsqueeze(-1)  # |x| <= 6
    magnitudes = torch.tensor(FP4_VALUES[:8], device=weight.device)  # [8]
    code = (scaled.abs().unsqueeze(-1) - magnitudes).abs().argmin(dim=-1)  # [..., 32] nearest magnitude, first on ties
    code = code | ((scaled < 0) & (code > 0)).long() << 3  # sign bit (no -0)
    pairs = code.reshape(*grouped.shape[:-1], BLOCK // 2, 2)  # [..., N, K/32, 16, 2]
    blocks = (pairs[..., 0] | pairs[..., 1] << 4).to(torch.uint8)  # [..., N, K/32, 16]
    scales = (exponent + SCALE_BIAS).to(torch.uint8)  # [..., N, K/32]
    return blocks.contiguous(), scales.contiguous()
