"""FP8 block quantization as DeepSeek-V3 and Qwen3-...-FP8 store it (transformers' FineGrainedFP8 format).

Why a module of its own: the checkpoint parser, the expert format, the reference and the kernels all need the
same three facts, kept here once:

- A weight W [N, K] (out, in) is stored as `weight` float8_e4m3fn [N, K] plus `weight_scale_inv` [ceil(N / bn),
  ceil(K / bk)], float32 (DeepSeek-V3) or bf16 / fp16 (some Qwen3 FP8 exports), for config.json's
  `weight_block_size` [bn, bk] (128 x 128 in every released checkpoint):
  W[r, k] = float(weight[r, k]) * weight_scale_inv[r // bn, k // bk]. The last block of a row or column may be
  short (blocks are counted with ceil), as the CUDA kernels of transformers and vLLM index them.
- The product is taken in float32 (the scale widened exactly, whatever its dtype) and rounded once to the
  compute dtype (never to the scale's dtype first), as transformers' Fp8Dequantize does when it loads such a
  checkpoint dequantized (on a machine without FP8 matmuls): our results are those of transformers' model on
  the dequantized weights. Activations stay in the compute dtype (weight-only, W8A16): the
  `activation_scheme: dynamic` W8A8 GEMMs of FP8 GPUs are not emulated.
- gate and up are stored as two matrices, each with its own ceil(I / bn) scale rows; stacked as gate_up [2I, K]
  the up rows' blocks start at scale row ceil(I / bn), not at row I // bn, when I % bn != 0 (`parts`:
  projections stacked along N whose blocks restart at each one; scale_row below).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from ..errors import MoeOffloadError

WEIGHT_DTYPE = torch.float8_e4m3fn
E4M3_MAX = 448.0  # float8_e4m3fn's largest finite value
SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SCALE_INV = "weight_scale_inv"


@dataclass(frozen=True)
class BlockFP8Spec:
    """FP8 e4m3 weights with one float32 scale per block of block_n rows x block_k columns."""

    block_n: int
    block_k: int

    def __post_init__(self):
        for value in (self.block_n, self.block_k):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MoeOffloadError(f"FP8 weight_block_size must be two positive integers, not "
                                      f"[{self.block_n!r}, {self.block_k!r}]")

    def scale_shape(self, rows: int, cols: int, parts: int = 1) -> tuple[int, int]:
        """Scale grid of `parts` [rows / parts, cols] matrices stacked along the rows, each with its own blocks."""
        return parts * -(-(rows // parts) // self.block_n), -(-cols // self.block_k)

    def describe(self) -> str:
        return f"fp8 e4m3, blocks {self.block_n}x{self.block_k}"


def scheme(quant: Mapping) -> BlockFP8Spec:
    """The BlockFP8Spec of a `quant_method: fp8` quantization_config, or one line naming what we do not read:
    per-tensor FP8 (no weight_block_size), static activation scales, e5m2 or ue8m0-byte scales."""
    block = quant.get("weight_block_size")
    if block is None:
        raise MoeOffloadError("per-tensor FP8 quantization (quant_method 'fp8' without weight_block_size) is not "
                              "supported: moe-offload reads block-quantized FP8 (weight_block_size [128, 128])")
    if not isinstance(block, (list, tuple)) or len(block) != 2:
        raise MoeOffloadError(f"FP8 weight_block_size must be two positive integers, not {block!r}")
    if quant.get("activation_scheme", "dynamic") != "dynamic":
        raise MoeOffloadError(f"FP8 activation_scheme {quant.get('activation_scheme')!r} is not supported "
                              "(dynamic only: activation scales are not read)")
    if str(quant.get("fmt", "e4m3")).lower() != "e4m3":
        raise MoeOffloadError(f"FP8 fmt {quant.get('fmt')!r} is not supported (e4m3 only)")
    if quant.get("scale_fmt") not in (None, "ue8m0", "float32"):
        raise MoeOffloadError(f"FP8 scale_fmt {quant.get('scale_fmt')!r} is not supported (float scales)")
    return BlockFP8Spec(block[0], block[1])


def scale_row(rows: torch.Tensor, rows_per_part: int, spec: BlockFP8Spec) -> torch.Tensor:
    """Scale row of each weight row of `parts` stacked matrices of rows_per_part rows each (see the docstring)."""
    part = rows // rows_per_part
    return part * -(-rows_per_part // spec.block_n) + (rows - part * rows_per_part) // spec.block_n


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, spec: BlockFP8Spec, parts: int = 1,
               start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Rows [start, stop) of W float32 = float(weight) * scale_inv of its block: weight [N, K] float8_e4m3fn,
    scale_inv [spec.scale_shape(N, K, parts)] (any of SCALE_DTYPES, widened), `parts` matrices stacked along N.
    The product is rounded to float32 once (IEEE), as transformers and our kernels compute it."""
    rows, cols = weight.shape
    stop = rows if stop is None else stop
    index = torch.arange(start, stop, device=weight.device)  # [r]
    block_rows = scale_row(index, rows // parts, spec)  # [r]
    block_cols = torch.arange(cols, device=weight.device) // spec.block_k  # [K]
    scale = scale_inv.float()[block_rows][:, block_cols]  # [r, K]
    return weight[start:stop].float() * scale


def quantize(weight: torch.Tensor, spec: BlockFP8Spec, scale_dtype: torch.dtype = torch.float32
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight float8_e4m3fn [N, K], scale_inv [spec.scale_shape(N, K)] in scale_dtype) of W [N, K], as the released
    checkpoints were made: each block's scale max |W| / 448 (e4m3's largest value), rounded to scale_dtype before
    the block is divided by it (the last blocks may be short). For writing test and benchmark checkpoints; the
    engine only reads them."""
    rows, cols = weight.shape
    grid = spec.scale_shape(rows, cols)
    padded = torch.zeros(grid[0] * spec.block_n, grid[1] * spec.block_k)  # [gn * bn, gk * bk]
    padded[:rows, :cols] = weight.float()
    amax = padded.view(grid[0], spec.block_n, grid[1], spec.block_k).abs().amax(dim=(1, 3))  # [gn, gk]
    scale = (amax / E4M3_MAX).clamp(min=1e-12).to(scale_dtype)  # [gn, gk]
    expanded = scale.float().repeat_interleave(spec.block_n, 0).repeat_interleave(spec.block_k, 1)[:rows, :cols]
    return (weight.float() / expanded).clamp(-E4M3_MAX, E4M3_MAX).to(WEIGHT_DTYPE), scale


def check_dense(name: str, weight, scale, spec: BlockFP8Spec) -> None:
    """A dense FP8 projection's header entries (TensorEntry-like: .dtype, .shape) against the scheme."""
    if weight.dtype != WEIGHT_DTYPE or len(weight.shape) != 2:
        raise MoeOffloadError(f"{name}: an FP8 weight must be F8_E4M3 [out, in], not "
                              f"{str(weight.dtype).replace('torch.', '')} {list(weight.shape)}")
    want = spec.scale_shape(*weight.shape)
    if scale.dtype not in SCALE_DTYPES or tuple(scale.shape) != want:
        raise MoeOffloadError(f"{name.removesuffix('.weight')}.{SCALE_INV} is "
                              f"{str(scale.dtype).replace('torch.', '')} {list(scale.shape)}, expected floating "
                              f"point {list(want)} for a {list(weight.shape)} weight in FP8 blocks of "
                              f"{spec.block_n}x{spec.block_k}")
