"""How the fused MoE kernel's grouped (prefill) path tiles (token, k) pairs into M-blocks.

Why a module of its own: the kernel (triton_moe.py) picks the block size, and the prefill cost model
(prefill_tuning.py) must know it without importing Triton: each M-block reads its expert's whole weights, so an
expert read in place from host memory crosses PCIe once per block of its pairs.
"""

from __future__ import annotations


def grouped_block_rows(num_pairs: int, num_slots: int) -> int:
    """Rows per M-block for a forward of `num_pairs` pairs over `num_slots` expert slots: about the pairs per
    expert, as a power of two in [16, 64], so that experts with few tokens waste little padding."""
    per_slot = -(-num_pairs // max(1, num_slots))
    return min(64, max(16, 1 << max(0, per_slot - 1).bit_length()))


def block_reads(pair_counts: list[int], block_rows: int) -> int:
    """M-blocks, so whole-expert reads, for experts with these pair counts."""
    return sum(-(-count // block_rows) for count in pair_counts)
