"""How one routed expert lies in a row of bytes: the one place that knows an expert's storage format.

Why: tiers, transfers, disk reads and the device LRU's read-through admission move whole experts. With every
expert one row of B bytes (the slot pool uint8 [C, B], the host tier uint8 [R, B], the scratch uint8 [2W, B]),
they move rows and never know what is in them; only the kernels do, through the typed views built here
(strided views into the rows: no copy). A row holds the expert's planes back to back, each at an offset
aligned to ALIGN bytes (a dtype view needs its element's alignment, vector loads want more):

  dense (bf16/fp16/fp32):  gate_up [2I, H] (gate rows, then up rows), down [H, I], in the compute dtype
  quantized (compressed-tensors pack-quantized, int4/int8, group-wise), for gate_up (gate then up: N = 2I,
  K = H) and down (N = H, K = I), exactly the checkpoint's tensors:
      <m>.packed  int32 [N, ceil(K*b/32)]        b-bit values + 2^(b-1), packed along K, low bits first
      <m>.scale   scale dtype [N, G]             G = ceil(K/g), one scale per row and group of g values
      <m>.zero    int32 [parts * ceil(N/parts*b/32), G]  zero points packed down the rows, one block per
                                                 projection (gate's, then up's): asymmetric schemes only
  FP8 block-quantized (DeepSeek-V3 / Qwen3-FP8, quant/fp8.py), for gate_up and down as above:
      <m>.weight  float8_e4m3fn [N, K]           the checkpoint's bytes, gate rows then up rows
      <m>.scale   float32 [parts * ceil(N/parts/bn), ceil(K/bk)]  weight_scale_inv, gate's blocks then up's

  GPT-OSS (ExpertFormat.glu set: biases, gate/up interleaved, clamped SwiGLU), exactly the checkpoint's slices of
  its fused [E, ...] tensors, so the disk tier reads an expert as four (or six) byte ranges:
      bf16/fp16/fp32:  gate_up [H, 2I] (transposed; column 2j is gate j, 2j + 1 up j), gate_up_bias [2I],
                       down [I, H], down_bias [H], in the compute dtype
      MXFP4:           gate_up.blocks uint8 [2I, H/32, 16], gate_up.scales uint8 [2I, H/32], gate_up_bias [2I],
                       down.blocks uint8 [H, I/32, 16], down.scales uint8 [H, I/32], down_bias [H] (biases as stored)

so what comes off the disk and crosses PCIe is the quantized bytes, and a quantized expert is dequantized only
where it is computed (kernels/). Channel-wise schemes (one scale per row) are one group spanning the whole row
(G = 1; the kernels get a group size of at least K, `group_span`). A checkpoint stored in another layout of the
same integers (GPTQ: `source`, quant/gptq.py) is described by its own planes and repacked by copy_row into these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .quant import gptq
from .quant.fp8 import BlockFP8Spec
from .quant.format import QuantSpec
from .quant.mxfp4 import BLOCK as MXFP4_BLOCK, Mxfp4Spec

ALIGN = 16  # bytes: every plane's offset in a row, and the row's length, are multiples of it
MATRICES = ("gate_up", "down")


@dataclass(frozen=True)
class Plane:
    """One tensor of an expert: its name, per-expert shape and dtype, and its byte offset in the row."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class QuantMatrix:
    """Group-quantized [N, K] weight matrices of a stack of experts ([n, ...] tensors) or of one (no leading dim),
    as views into byte rows: what the kernels take where a dense matrix would be a [n, N, K] tensor.

    W[r, k] = (u[r, k] - z[r, g]) * scale[r, g] with g = k // group_size, u the unsigned b-bit value in packed
    and z the row's zero point (2^(b-1) when symmetric, i.e. zero is None)."""

    packed: torch.Tensor  # [n, N, ceil(K*b/32)] int32
    scale: torch.Tensor  # [n, N, G]
    zero: torch.Tensor | None  # [n, parts * ceil(N/parts*b/32), G] int32, or None (symmetric)
    bits: int
    group_size: int
    in_features: int  # K
    parts: int  # projections stacked along N whose zero points are packed apart (gate_up: 2, down: 1)

    @property
    def shape(self) -> tuple[int, ...]:
        """(n, N, K) for a stack, (N, K) for one matrix: the shape of the dense matrices it stands for."""
        return (*self.packed.shape[:-1], self.in_features)

    def __getitem__(self, index) -> "QuantMatrix":
        """The matrices of index along the stack (an int: one matrix)."""
        return QuantMatrix(self.packed[index], self.scale[index], None if self.zero is None else self.zero[index],
                           self.bits, self.group_size, self.in_features, self.parts)

    def to(self, device: torch.device) -> "QuantMatrix":
        return QuantMatrix(self.packed.to(device), self.scale.to(device),
                           None if self.zero is None else self.zero.to(device), self.bits, self.group_size,
                           self.in_features, self.parts)


@dataclass(frozen=True)
class FP8Matrix:
    """FP8 block-quantized [N, K] weight matrices of a stack of experts ([n, ...] tensors) or of one, as views
    into byte rows: W[r, k] = float(weight[r, k]) * scale[fp8.scale_row(r), k // block_k] (quant/fp8.py)."""

    weight: torch.Tensor  # [n, N, K] float8_e4m3fn
    scale: torch.Tensor  # [n, parts * ceil(N/parts/block_n), ceil(K/block_k)] float32
    spec: BlockFP8Spec
    parts: int  # projections stacked along N, each with its own scale blocks (gate_up: 2, down: 1)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    def __getitem__(self, index) -> "FP8Matrix":
        return FP8Matrix(self.weight[index], self.scale[index], self.spec, self.parts)

    def to(self, device: torch.device) -> "FP8Matrix":
        return FP8Matrix(self.weight.to(device), self.scale.to(device), self.spec, self.parts)


@dataclass(frozen=True)
class Mxfp4Matrix:
    """MXFP4 [N, K] weight matrices of a stack of experts ([n, ...]) or of one, as views into byte rows (GPT-OSS's
    native layout): W[r, k] = e2m1(nibble k of blocks[r, k // 32]) * 2^(scales[r, k // 32] - 127), the low nibble
    of a byte first (quant/mxfp4.py)."""

    blocks: torch.Tensor  # [n, N, K/32, 16] uint8: two e2m1 values per byte
    scales: torch.Tensor  # [n, N, K/32] uint8: E8M0 exponents, bias 127

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.blocks.shape[:-2], self.blocks.shape[-2] * MXFP4_BLOCK)

    def __getitem__(self, index) -> "Mxfp4Matrix":
        return Mxfp4Matrix(self.blocks[index], self.scales[index])

    def to(self, device: torch.device) -> "Mxfp4Matrix":
        return Mxfp4Matrix(self.blocks.to(device), self.scales.to(device))


@dataclass(frozen=True)
class ClampedSwiGLU:
    """GPT-OSS's experts: a bias per output row of both matrices, gate and up interleaved along 2I (gate j is row
    2j of gate_up, up j row 2j + 1), and act = (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g) with
    g = clamp(gate, max=limit) (transformers' GptOssExperts._apply_gate)."""

    alpha: float
    limit: float


@dataclass(frozen=True)
class BiasedMatrix:
    """A matrix stack with a bias per output row: what the kernels take for GPT-OSS's experts.

    weight: [n, N, K] as a dense (possibly transposed, strided) view or an Mxfp4Matrix; bias [n, N]. glu: set on
    gate_up only (its rows are interleaved and ClampedSwiGLU is its activation), None on down."""

    weight: "Matrix"
    bias: torch.Tensor
    glu: ClampedSwiGLU | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    def __getitem__(self, index) -> "BiasedMatrix":
        return BiasedMatrix(self.weight[index], self.bias[index], self.glu)

    def to(self, device: torch.device) -> "BiasedMatrix":
        return BiasedMatrix(self.weight.to(device), self.bias.to(device), self.glu)


Matrix = torch.Tensor | QuantMatrix | FP8Matrix | Mxfp4Matrix | BiasedMatrix


class ExpertWeights(NamedTuple):
    """An expert's (or a stack of experts') two matrices, dense tensors or QuantMatrix views."""

    gate_up: Matrix  # [n, 2I, H]: gate rows, then up rows
    down: Matrix  # [n, H, I]


@dataclass(frozen=True)
class ExpertFormat:
    """The planes of one routed expert of I x H (intermediate x hidden) in a byte row.

    dtype: the dense weights' dtype, or a quantized format's scale dtype (MXFP4: its biases' dtype). quant: None for
    dense weights. source: "" for the engine's planes; "gptq_v1"/"gptq_v2"/"awq" for a GPTQ or AWQ checkpoint's
    (storage only: copy_row repacks it into `held()`, what tiers, slots and kernels hold). glu: GPT-OSS's experts
    (biases, interleaved gate/up, clamped SwiGLU), None for the usual ones."""

    inter: int
    hidden: int
    dtype: torch.dtype
    quant: QuantSpec | BlockFP8Spec | Mxfp4Spec | None = None
    source: str = ""
    glu: ClampedSwiGLU | None = None
    planes: tuple[Plane, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        offset, planes = 0, []
        for name, shape, dtype in self._plane_specs():
            planes.append(Plane(name, shape, dtype, offset))
            offset = _aligned(offset + planes[-1].nbytes)
        object.__setattr__(self, "planes", tuple(planes))

    def _plane_specs(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        inter, hidden = self.inter, self.hidden
        if self.glu is not None:
            return self._gpt_oss_plane_specs()
        if isinstance(self.quant, Mxfp4Spec):
            raise ValueError("MXFP4 experts are read in GPT-OSS's layout only")
        if self.quant is None:
            return [("gate_up", (2 * inter, hidden), self.dtype), ("down", (hidden, inter), self.dtype)]
        if self.source:
            return gptq.plane_specs(inter, hidden, self.quant, self.dtype, self.source)
        if isinstance(self.quant, BlockFP8Spec):
            specs = []
            for matrix, parts, rows, cols in (("gate_up", 2, 2 * inter, hidden), ("down", 1, hidden, inter)):
                specs += [(f"{matrix}.weight", (rows, cols), torch.float8_e4m3fn),
                          (f"{matrix}.scale", self.quant.scale_shape(rows, cols, parts), self.dtype)]
            return specs
        specs = []
        for matrix, parts, rows, cols in (("gate_up", 2, inter, hidden), ("down", 1, hidden, inter)):
            groups = -(-cols // self.group_span)
            specs += [(f"{matrix}.packed", (parts * rows, _words(cols, self.quant.bits)), torch.int32),
                      (f"{matrix}.scale", (parts * rows, groups), self.dtype)]
            if not self.quant.symmetric:
                specs.append((f"{matrix}.zero", (parts * _words(rows, self.quant.bits), groups), torch.int32))
        return specs

    def _gpt_oss_plane_specs(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """GPT-OSS's per-expert slices, in the checkpoint's order: the bytes of [E, ...] tensors' row e."""
        inter, hidden = self.inter, self.hidden
        if self.quant is None:
            return [("gate_up", (hidden, 2 * inter), self.dtype), ("gate_up_bias", (2 * inter,), self.dtype),
                    ("down", (inter, hidden), self.dtype), ("down_bias", (hidden,), self.dtype)]
        if not isinstance(self.quant, Mxfp4Spec):
            raise ValueError("GPT-OSS experts are read unquantized or in MXFP4 only")
        specs = []
        for matrix, rows, cols in (("gate_up", 2 * inter, hidden), ("down", hidden, inter)):
            blocks = cols // MXFP4_BLOCK
            specs += [(f"{matrix}.blocks", (rows, blocks, MXFP4_BLOCK // 2), torch.uint8),
                      (f"{matrix}.scales", (rows, blocks), torch.uint8), (f"{matrix}_bias", (rows,), self.dtype)]
        return specs

    @property
    def quantized(self) -> bool:
        return self.quant is not None

    @property
    def group_span(self) -> int:
        """Values per scale along K as the kernels take it, one for both matrices: the group size, or for a
        channel-wise scheme a power of two >= max(H, I), so that each row of either matrix is one group (a power
        of two: the Triton kernels divide by it, the CPU kernel takes int4 pairs of an even group)."""
        if self.quant.group_size is not None:
            return self.quant.group_size
        return 1 << (max(self.inter, self.hidden) - 1).bit_length()

    def held(self) -> "ExpertFormat":
        """The format the engine holds experts of this (storage) format in: itself, or a GPTQ layout's
        compressed-tensors planes (same integers, same bytes)."""
        return ExpertFormat(self.inter, self.hidden, self.dtype, self.quant) if self.source else self

    @property
    def row_bytes(self) -> int:
        """B: bytes of one expert's row, planes and alignment padding."""
        return _aligned(self.planes[-1].offset + self.planes[-1].nbytes)

    @property
    def nbytes(self) -> int:
        """Bytes of one expert's weights, padding left out: what a transfer of it moves."""
        return sum(plane.nbytes for plane in self.planes)

    def plane(self, name: str) -> Plane:
        return next(plane for plane in self.planes if plane.name == name)

    def plane_views(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """name -> [n, *shape] view of every plane of rows uint8 [n, B] (a row [B]: [*shape] views)."""
        stack = rows.view(1, -1) if rows.dim() == 1 else rows  # [n, B]
        assert stack.dtype == torch.uint8 and stack.shape[1] == self.row_bytes and stack.stride(1) == 1
        views = {}
        for plane in self.planes:
            typed = stack.view(plane.dtype)  # [n, B / itemsize]
            size = plane.dtype.itemsize
            inner = [math.prod(plane.shape[i + 1:]) for i in range(len(plane.shape))]  # contiguous in the row
            # explicit strides: a pool of 0 or 1 rows keeps the row stride B, so its views' strides are those of
            # any other pool of this format (the kernels pass one set of strides for the slots and the host tier)
            views[plane.name] = typed.as_strided((stack.shape[0], *plane.shape), (self.row_bytes // size, *inner),
                                                 typed.storage_offset() + plane.offset // size)
        return {name: view[0] for name, view in views.items()} if rows.dim() == 1 else views

    def weights(self, rows: torch.Tensor) -> ExpertWeights:
        """The experts of rows uint8 [n, B] (or of one row [B]) as the kernels read them."""
        views = self.plane_views(rows)
        if self.glu is not None:  # GPT-OSS: [n, 2I, H] / [n, H, I] like the others, biased, gate_up interleaved
            if self.quant is None:  # the checkpoint's [H, 2I] / [I, H], transposed as views (no copy)
                gate_up, down = views["gate_up"].transpose(-1, -2), views["down"].transpose(-1, -2)
            else:
                gate_up, down = (Mxfp4Matrix(views[f"{m}.blocks"], views[f"{m}.scales"]) for m in MATRICES)
            return ExpertWeights(BiasedMatrix(gate_up, views["gate_up_bias"], self.glu),
                                 BiasedMatrix(down, views["down_bias"]))
        if self.quant is None:
            return ExpertWeights(views["gate_up"], views["down"])
        assert not self.source, "a GPTQ row is repacked (copy_row) before the kernels see it"
        spec = self.quant
        if isinstance(spec, BlockFP8Spec):
            return ExpertWeights(*(FP8Matrix(views[f"{m}.weight"], views[f"{m}.scale"], spec, parts)
                                   for m, parts in (("gate_up", 2), ("down", 1))))
        return ExpertWeights(*(QuantMatrix(views[f"{m}.packed"], views[f"{m}.scale"], views.get(f"{m}.zero"),
                                           spec.bits, self.group_span, in_features, parts)
                               for m, in_features, parts in (("gate_up", self.hidden, 2), ("down", self.inter, 1))))

    def copy_row(self, dst: torch.Tensor, src: torch.Tensor, src_format: "ExpertFormat",
                 non_blocking: bool = False) -> None:
        """dst row [B] (this format) = src row (src_format's): one copy of the bytes where the formats are the
        same, else plane by plane, converting the dtype (a dense checkpoint in another dtype than the compute's)."""
        if src_format == self:
            dst.copy_(src[:self.row_bytes], non_blocking=non_blocking)
            return
        if src_format.source and src_format.held() == self:  # GPTQ, AWQ: repacked on dst's device
            raw = src[:src_format.row_bytes].to(dst.device, non_blocking=non_blocking)  # a disk read's staging row
            planes = gptq.repack(src_format.plane_views(raw), src_format.source, self.quant.bits)
            for name, view in self.plane_views(dst).items():
                view.copy_(planes[name], non_blocking=non_blocking)
            return
        if [(p.name, p.shape) for p in src_format.planes] != [(p.name, p.shape) for p in self.planes]:
            raise ValueError(f"cannot convert {src_format.describe()} experts to {self.describe()}")
        sources = src_format.plane_views(src[:src_format.row_bytes])
        for name, view in self.plane_views(dst).items():
            view.copy_(sources[name], non_blocking=non_blocking)

    def describe(self) -> str:
        """'bfloat16', or e.g. 'int4, group 128, symmetric, bfloat16 scales'."""
        dtype = str(self.dtype).replace("torch.", "")
        if self.glu is not None:
            if self.quant is None:
                return f"{dtype}, GPT-OSS (biases, clamped SwiGLU)"
            return f"mxfp4 (e2m1, E8M0 scale per 32), {dtype} biases, GPT-OSS (clamped SwiGLU)"
        if self.quant is None:
            return dtype
        if isinstance(self.quant, BlockFP8Spec):
            return f"{self.quant.describe()}, {dtype} scales"
        kind = "symmetric" if self.quant.symmetric else "asymmetric"
        stored = f", {self.source.replace('_', ' ').upper().replace(' V', ' v')} layout" if self.source else ""
        return f"int{self.quant.bits}, {self.quant.grouping}, {kind}, {dtype} scales{stored}"


def _aligned(offset: int) -> int:
    return -(-offset // ALIGN) * ALIGN


def _words(values: int, bits: int) -> int:
    """int32 words that hold `values` b-bit values."""
    return -(-values * bits // 32)
