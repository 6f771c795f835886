"""The CPU share's int4 experts on torch's compiled int4 kernel (aten._weight_int4pack_mm_for_cpu, the kernel
behind torchao's int4 weight-only CPU path), from a repacked copy of the host tier's experts.

Why: a one-token int4 expert on the CPU is bound by unpacking the nibbles, not by DRAM. The numba kernel
(kernels/cpu_numba.py) vectorizes along K, as the compressed-tensors layout lays a row out, and pays a
horizontal sum per group of 128; torch's kernel vectorizes along N over 64-row blocks and ran the same experts
about 3x faster per core (bench/RESULTS.md, "CPU expert kernels on quantized experts"). Its layout is not the
checkpoint's (rows n and n + 32 of a 64-row block share a byte, K-major inside the block), which the GPU kernels,
the disk tier and the checkpoint keep, so the CPU gets a copy of its own: as many bytes again as the int4 host
tier holds. That is why it is built only where the RAM is free (fits) and kept only where MOE_CPU_EXPERTS=auto
measured it the fastest kernel (hybrid.enable).

What it computes: symmetric int4 experts, ((u - 8) * scale) . x per output with float32 accumulation, the
weights not rounded to bf16 first (as the numba kernel); the GEMV outputs rounded to the compute dtype, as
torch's linear rounds them. Within rounding of the GPU path, not the same bits (cpu_experts.py's rule for the
CPU share).
"""

from __future__ import annotations

import torch

from ..expert_format import QuantMatrix
from ..quant.format import QuantSpec

GROUP_SIZES = (32, 64, 128, 256)  # what the kernel takes
ROW_MULTIPLE = 16  # N per matrix, a multiple of this
# RAM left to everything else once the copy is made (the process's own buffers, the OS's page cache)
HEADROOM_BYTES = 2 << 30


def available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and \
        hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def why_not(fmt) -> str | None:
    """Why these experts (an ExpertFormat) cannot take this kernel; None where they can."""
    quant = fmt.quant
    if not isinstance(quant, QuantSpec) or fmt.glu:
        return "not symmetric int4 experts"
    return _why_not(quant.bits, quant.symmetric, quant.group_size,
                    [(2 * fmt.inter, fmt.hidden), (fmt.hidden, fmt.inter)])


def takes(matrix) -> bool:
    """Whether one stack of matrices [n, N, K] can be repacked for the kernel (why_not's rules, per matrix)."""
    return isinstance(matrix, QuantMatrix) and \
        _why_not(matrix.bits, matrix.zero is None, matrix.group_size, [tuple(matrix.shape[-2:])]) is None


def _why_not(bits: int, symmetric: bool, group_size: int | None, shapes: list[tuple[int, int]]) -> str | None:
    """The kernel's limits on matrices [N, K] of these: int4 without zero points, a group size it has code for
    dividing every K, every N a multiple of ROW_MULTIPLE."""
    if not available():
        return "this torch has no int4 CPU kernel"
    if bits != 4 or not symmetric:
        return "not symmetric int4 experts"
    if group_size not in GROUP_SIZES or any(cols % group_size for _rows, cols in shapes):
        return f"group size {group_size} does not tile the widths in one of {GROUP_SIZES}"
    if any(rows % ROW_MULTIPLE for rows, _cols in shapes):
        return f"matrix heights not multiples of {ROW_MULTIPLE}"
    return None


def copy_bytes(matrix: QuantMatrix) -> int:
    """Bytes of the copy of a stack of matrices [n, N, K]: packed N * K / 2, scales and zeros G * N * 2 each."""
    n, rows, cols = matrix.shape
    return n * (rows * cols // 2 + (cols // matrix.group_size) * rows * 2 * matrix.scale.element_size())


def fits(nbytes: int) -> bool:
    """Whether `nbytes` more of host RAM leaves HEADROOM_BYTES available (Linux MemAvailable; elsewhere: no)."""
    try:
        with open("/proc/meminfo") as meminfo:
            available_kb = next(int(line.split()[1]) for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return False
    return nbytes + HEADROOM_BYTES <= available_kb * 1024


def repack(matrix: QuantMatrix) -> tuple[torch.Tensor, torch.Tensor]:
    """One symmetric int4 matrix [N, K] -> (packed uint8 [N, K / 2] in the kernel's layout, scales_and_zeros
    [G, N, 2] in the scales' dtype). The kernel computes ((q - 8) * scale + zero) . x: q = u, zero = 0."""
    rows = matrix.packed.shape[0]
    data = matrix.packed.view(torch.uint8)  # [N, K / 2]: value 2i the low nibble of byte i, 2i + 1 the high one
    values = torch.stack((data & 15, data >> 4), dim=-1).reshape(rows, -1)[:, :matrix.in_features]  # [N, K]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values.to(torch.int32), 1)
    scale = matrix.scale.t()  # [G, N]
    return packed, torch.stack((scale, torch.zeros_like(scale)), dim=-1).contiguous()


class Int4PackCopy:
    """A stack of experts' gate_up [n, 2I, H] and down [n, H, I] repacked (repack), expert by expert."""

    def __init__(self, gate_up: QuantMatrix, down: QuantMatrix):
        self.group_size, self.dtype = gate_up.group_size, gate_up.scale.dtype  # x must come in the scales' dtype
        self.experts = [(repack(gate_up[slot]), repack(down[slot])) for slot in range(gate_up.shape[0])]
        self.nbytes = copy_bytes(gate_up) + copy_bytes(down)

    def expert(self, x: torch.Tensor, weights: torch.Tensor, slot: int, act_fn, out: torch.Tensor) -> None:
        """out [n, H] float32 = weights[:, None] * expert_slot(x [n, H]), rounding where _expert_native does."""
        (w13, s13), (w2, s2) = self.experts[slot]
        gate, up = torch.ops.aten._weight_int4pack_mm_for_cpu(x, w13, self.group_size, s13).chunk(2, -1)  # [n, I]
        hidden = act_fn(gate) * up  # [n, I]
        out.copy_(torch.ops.aten._weight_int4pack_mm_for_cpu(hidden, w2, self.group_size, s2) * weights[:, None])

