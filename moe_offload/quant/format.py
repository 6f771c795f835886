"""compressed-tensors `pack-quantized`: the tensors of one weight-only group-quantized Linear, bit for bit.

Why our own pack/unpack rather than the compressed-tensors library's: the engine's kernels unpack these words
themselves, the tests hold this module to the library bit for bit, and writing a checkpoint then needs no
dependency beyond torch. Conventions (read from compressed-tensors 0.20.1; docs/quantization.md cites them):

- A weight W [N, K] (out, in) is cut along K into G = K / group_size groups; each (row, group) has a scale
  (and, asymmetric, a zero point). q = clamp(round(W / scale) + zero, qmin, qmax) with qmin, qmax =
  -2^(b-1), 2^(b-1) - 1 (signed, int8 in memory); W ~ (q - zero) * scale.
- `weight_packed` int32 [N, ceil(K * b / 32)]: q + 2^(b-1) (unsigned) packed little-end first, element j of a
  word at bits [j*b, (j+1)*b); the last word of a row is padded with zero bits.
- `weight_scale` [N, G] in the original weight's dtype.
- `weight_zero_point` (asymmetric only) int32 [ceil(N * b / 32), G]: the zero points, signed like q, packed the
  same way but along dim 0 (down the rows), one column per group.
- `weight_shape` int64 [2] = [N, K].
- Channel-wise (`strategy: "channel"`, group_size None here): one group spanning the whole row, G = 1, so
  `weight_scale` [N, 1] and `weight_zero_point` [ceil(N * b / 32), 1]; K need not be a multiple of anything.
Readers (compressed-tensors, hence transformers and vLLM) require group_size to divide K.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import MoeOffloadError

BITS = (4, 8)
PACKED, SCALE, ZERO, SHAPE = "weight_packed", "weight_scale", "weight_zero_point", "weight_shape"


@dataclass(frozen=True)
class QuantSpec:
    """How one weight is quantized: bits per value, values per scale along K (None: channel-wise, one scale per
    output row, compressed-tensors' `strategy: "channel"`), and whether zero points exist."""

    bits: int
    group_size: int | None
    symmetric: bool

    def __post_init__(self):
        if self.bits not in BITS:
            raise MoeOffloadError(f"bits must be one of {', '.join(map(str, BITS))}, not {self.bits}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise MoeOffloadError(f"group size must be a positive integer, not {self.group_size!r}")

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    @property
    def grouping(self) -> str:
        """'group 128' or 'channel-wise', for messages."""
        return "channel-wise" if self.group_size is None else f"group {self.group_size}"

    def group_of(self, in_features: int) -> int:
        """Values per scale in a row of in_features values: the group size, or the whole row (channel-wise)."""
        return in_features if self.group_size is None else self.group_size

    def groups(self, in_features: int) -> int:
        if self.group_size is None:
            return 1
        if in_features % self.group_size:
            raise MoeOffloadError(f"group size {self.group_size} does not divide in_features {in_features}")
        return in_features // self.group_size

    def shapes(self, out_features: int, in_features: int, dtype: torch.dtype) -> dict[str, tuple[torch.dtype, tuple]]:
        """Name -> (dtype, shape) of the tensors that replace a [out, in] `weight` of `dtype`."""
        groups = self.groups(in_features)
        out = {PACKED: (torch.int32, (out_features, _words(in_features, self.bits))),
               SCALE: (dtype, (out_features, groups)),
               SHAPE: (torch.int64, (2,))}
        if not self.symmetric:
            out[ZERO] = (torch.int32, (_words(out_features, self.bits), groups))
        return out


def _words(values: int, bits: int) -> int:
    return math.ceil(values * bits / 32)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed b-bit values [R, C] (int8) -> int32 words [R, ceil(C * b / 32)], packed along dim 1."""
    per_word = 32 // bits
    rows, cols = q.shape
    words = _words(cols, bits)
    unsigned = q.to(torch.int64) + (1 << (bits - 1))  # [R, C] in [0, 2^b)
    unsigned = torch.nn.functional.pad(unsigned, (0, words * per_word - cols))  # zero bits after the last value
    shifts = torch.arange(per_word, dtype=torch.int64) * bits  # [per_word]
    word = (unsigned.view(rows, words, per_word) << shifts).sum(dim=2)  # [R, words] in [0, 2^32)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)  # the same 32 bits, as int32


def unpack(words: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """int32 words [R, W] -> the first `cols` signed b-bit values of each row, int8 [R, cols]."""
    per_word = 32 // bits
    rows = words.shape[0]
    shifts = torch.arange(per_word, dtype=torch.int32, device=words.device) * bits  # [per_word]
    unsigned = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [R, W, per_word]; the mask drops sign bits
    return (unsigned.reshape(rows, -1)[:, :cols] - (1 << (bits - 1))).to(torch.int8)


def encode(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec) -> dict:
    """The checkpoint tensors of `weight` [N, K] under the given scales [N, G] (stored dtype) and zero points
    [N, G] (int8, None when symmetric). Float32 math; round half to even (torch.round)."""
    out_features, in_features = weight.shape
    groups = spec.groups(in_features)
    grouped = weight.float().view(out_features, groups, spec.group_of(in_features))  # [N, G, g]
    q = torch.round(grouped / scale.float().unsqueeze(-1))  # [N, G, g]
    if zero is not None:
        q = q + zero.float().unsqueeze(-1)
    q = q.clamp(spec.qmin, spec.qmax).to(torch.int8).view(out_features, in_features)  # [N, K]
    out = {PACKED: pack(q, spec.bits), SCALE: scale.contiguous(),
           SHAPE: torch.tensor([out_features, in_features], dtype=torch.int64)}
    if not spec.symmetric:
        out[ZERO] = pack(zero.t(), spec.bits).t().contiguous()  # [ceil(N * b / 32), G]: packed down the rows
    return out


def check(tensors: dict, spec: QuantSpec, name: str = "weight") -> tuple[int, int]:
    """(N, K) of a quantized weight's tensors, after checking every name, dtype and shape against `spec`."""
    for key in (PACKED, SCALE, SHAPE) + (() if spec.symmetric else (ZERO,)):
        if key not in tensors:
            raise MoeOffloadError(f"{name}: no {key}")
    shape = tensors[SHAPE]
    if shape.dtype != torch.int64 or tuple(shape.shape) != (2,) or bool((shape < 1).any()):
        raise MoeOffloadError(f"{name}: {SHAPE} is not two positive int64 values")
    out_features, in_features = (int(v) for v in shape)
    if spec.group_size is not None and in_features % spec.group_size:
        raise MoeOffloadError(f"{name}: group size {spec.group_size} does not divide in_features {in_features}")
    scale_dtype = tensors[SCALE].dtype
    if not scale_dtype.is_floating_point:
        raise MoeOffloadError(f"{name}: {SCALE} has dtype {scale_dtype}, not a floating-point type")
    for key, (dtype, want) in spec.shapes(out_features, in_features, scale_dtype).items():
        got = tensors[key]
        if got.dtype != dtype or tuple(got.shape) != want:
            raise MoeOffloadError(f"{name}: {key} is {got.dtype} {list(got.shape)}, expected {dtype} {list(want)} "
                                  f"for a [{out_features}, {in_features}] weight at {spec.bits} bits, "
                                  f"{spec.grouping}")
    return out_features, in_features


def dequantize(tensors: dict, spec: QuantSpec, name: str = "weight") -> torch.Tensor:
    """W [N, K] float32 = (q - zero) * scale, exact: an integer below 2^9 times a bf16/fp16 scale fits float32's
    24-bit significand, so rounding the result to the scale's dtype gives what compressed-tensors computes."""
    out_features, in_features = check(tensors, spec, name)
    shape = (out_features, spec.groups(in_features), spec.group_of(in_features))  # [N, G, g]
    q = unpack(tensors[PACKED], spec.bits, in_features).float().view(shape)
    if not spec.symmetric:
        zero = unpack(tensors[ZERO].t(), spec.bits, out_features).t()  # [N, G]
        q = q - zero.float().unsqueeze(-1)
    return (q * tensors[SCALE].float().unsqueeze(-1)).view(out_features, in_features)  # [N, K]


def quantization_config(spec: QuantSpec, ignore: list[str]) -> dict:
    """config.json's `quantization_config`: one config group targeting Linear modules (the routed experts'
    per-expert projections, as readers see them), every other module with weights named in `ignore`. The keys
    are those compressed-tensors itself writes for a W4A16/W8A16 group scheme; "Linear" rather than a regular
    expression because some readers look the experts' scheme up under that target."""
    weights = {"num_bits": spec.bits, "type": "int", "symmetric": spec.symmetric, "group_size": spec.group_size,
               "strategy": "group" if spec.group_size else "channel", "dynamic": False}
    group = {"targets": ["Linear"], "weights": weights, "input_activations": None, "output_activations": None,
             "format": "pack-quantized"}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": group}, "ignore": list(ignore), "kv_cache_scheme": None,
            "global_compression_ratio": None, "sparsity_config": {}}
