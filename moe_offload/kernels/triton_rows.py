"""Copy the experts a device plan admitted from the pinned host tier into their slots, with no host sync.

Why: a prefetch (prefetcher.py) decides on the device which experts to bring in (DeviceLRU.plan_prefetch writes
admit [E]), so the host never learns which rows to copy; a cudaMemcpy per expert would need it. One launch reads
every admitted expert's row in place over PCIe (the host tier is page-locked and mapped, as the MoE kernels read
it) and writes it into its slot; programs of pairs that were not admitted exit at once. Graph-safe: the ids,
the plan and the pointers stay put between replays.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_dense import runs_on

__all__ = ["copy_admitted", "runs_on"]

_BLOCK = 4096  # words per program: 16 KiB of int32, a few hundred programs per bf16 expert


@triton.jit
def _copy_kernel(ids_ptr, admit_ptr, host_row_ptr, host_ptr, slots_ptr, words, BLOCK: tl.constexpr):
    """Program (k, j): words [j*BLOCK, (j+1)*BLOCK) of pair k's expert, if admitted, host row -> its slot."""
    expert = tl.load(ids_ptr + tl.program_id(0))
    slot = tl.load(admit_ptr + expert).to(tl.int64)
    if slot >= 0:
        row = tl.load(host_row_ptr + expert).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] words
        mask = offs < words
        tl.store(slots_ptr + slot * words + offs, tl.load(host_ptr + row * words + offs, mask=mask), mask=mask)


def copy_admitted(ids: torch.Tensor, admit: torch.Tensor, host_row: torch.Tensor, host_rows: torch.Tensor,
                  slots: torch.Tensor) -> None:
    """slots[admit[e]] = host_rows[host_row[e]] for each expert e of ids [K] with admit[e] >= 0.

    admit [E] int32 (a device plan's output), host_row [E (+1)] int64, host_rows [N, B] uint8 (the host tier's
    rows, pinned and mapped on CUDA), slots [C, B] uint8 on the device; rows of whole 32-bit words where they
    allow it (the engine's rows do), else bytes."""
    flat = ids.reshape(-1)  # [K]
    width = slots.shape[1]
    if host_rows.shape[1] != width:
        raise ValueError(f"host rows of {host_rows.shape[1]} bytes, slots of {width}")
    if width % 4 == 0 and host_rows.data_ptr() % 4 == 0 and slots.data_ptr() % 4 == 0:
        host_rows, slots = host_rows.view(torch.int32), slots.view(torch.int32)  # [N, B/4], [C, B/4]
    words = slots.shape[1]
    block = min(_BLOCK, triton.next_power_of_2(words))
    if flat.numel():
        _copy_kernel[(flat.numel(), triton.cdiv(words, block))](flat, admit, host_row, host_rows, slots, words,
                                                                 BLOCK=block)
