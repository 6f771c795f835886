"""The GPU side of a hybrid decode step's bookkeeping (share.CpuShare.forward) as one Triton kernel.

Why: before the CPU can take its share of a layer's misses, the GPU decides which pairs are the CPU's (the n_cpu
misses whose experts were used least recently, ties in top-k order; n_cpu from the split table), packs the hidden
state, those pairs' host-tier rows and the routing weights into the mailbox buffer, masks the CPU's pairs out of the
ids the GPU kernels read, counts them, stamps the step's experts as used and steps the doorbell's ring counter. In
torch that is ~20 tiny kernels (sum, index_select, comparisons, gathers, casts, cat, masked_fill, adds, scatters),
each ~2-3 us even replayed from a graph, on the path every layer of a decode step waits on, and on the CPU's
critical path too. Here it is one launch.

Same values as the torch code (share.pack_share_torch): the hidden state and the weights widened to float32
(exact), rows as float32 (exact below 2^24), ids as given.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...kernels.triton_dense import runs_on  # noqa: F401  (kernels.triton_kernels asks each module)

_BLOCK_H = 1024


@triton.jit
def _pack_kernel(hidden_ptr, ids_ptr, weights_ptr, from_host_ptr, split_ptr, host_rows_ptr, packed_ptr,
                 gpu_ids_ptr, cpu_pair_ptr, tally_ptr, last_use_ptr, step_ptr, H, num_experts,
                 K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr):
    """Every program widens a BLOCK_H chunk of the hidden state into packed[:H]; program 0 also does the pairs."""
    pid = tl.program_id(0)
    offs = pid * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    mask = offs < H
    x = tl.load(hidden_ptr + offs, mask=mask, other=0.0)
    tl.store(packed_ptr + offs, x.to(tl.float32), mask=mask)
    if pid == 0:
        k = tl.arange(0, BLOCK_K)  # [BLOCK_K] pair index
        live = k < K
        ids = tl.load(ids_ptr + k, mask=live, other=0)  # [BLOCK_K] expert of each pair
        remote = tl.load(from_host_ptr + k, mask=live, other=0).to(tl.int32)  # 1: read from the host tier
        n_cpu = tl.load(split_ptr + tl.sum(remote, axis=0))  # misses the CPU computes
        stamp = tl.load(last_use_ptr + ids, mask=live, other=0)  # [BLOCK_K] step each expert was last used
        # rank of each pair among the misses, least recently used first, ties in top-k order: [BLOCK_K, BLOCK_K]
        earlier = (stamp[None, :] < stamp[:, None]) | ((stamp[None, :] == stamp[:, None]) & (k[None, :] < k[:, None]))
        earlier = earlier & (remote[None, :] > 0) & live[None, :]
        rank = tl.sum(earlier.to(tl.int32), axis=1)  # [BLOCK_K]
        cpu = (remote > 0) & (rank < n_cpu) & live  # the n_cpu misses used least recently
        step = tl.load(step_ptr) + 1
        tl.store(step_ptr, step)
        tl.store(last_use_ptr + ids, tl.zeros((BLOCK_K,), dtype=tl.int32) + step, mask=live)
        rows = tl.load(host_rows_ptr + ids, mask=live, other=-1)  # [BLOCK_K] host-tier row or -1
        rows = tl.where(cpu, rows, -1)
        tl.store(packed_ptr + H + k, rows.to(tl.float32), mask=live)
        weights = tl.load(weights_ptr + k, mask=live, other=0.0)
        tl.store(packed_ptr + H + K + k, weights.to(tl.float32), mask=live)
        tl.store(gpu_ids_ptr + k, tl.where(cpu, num_experts, ids), mask=live)
        tl.store(cpu_pair_ptr + k, cpu.to(tl.uint8), mask=live)
        tl.store(tally_ptr, tl.load(tally_ptr) + tl.sum(cpu.to(tl.int64), axis=0))


def pack_share(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
               from_host: torch.Tensor, split: torch.Tensor, host_rows: torch.Tensor, num_experts: int,
               packed: torch.Tensor, gpu_ids: torch.Tensor, cpu_pair: torch.Tensor, tally: torch.Tensor,
               last_use: torch.Tensor, step: torch.Tensor) -> None:
    """share.pack_share_torch's outputs, in place, in one launch.

    hidden [1, H]; top_k_index, top_k_weights, from_host [1, K]; split [K + 1]; host_rows [E];
    packed [H + 2K] float32; gpu_ids [1, K] int64; cpu_pair [K] uint8; tally [] int64; last_use [E] int32;
    step [1] int32 (also the doorbell's ring value).
    """
    width, top_k = hidden.shape[-1], top_k_index.shape[-1]
    grid = (triton.cdiv(width, _BLOCK_H),)
    _pack_kernel[grid](hidden.reshape(-1), top_k_index.reshape(-1), top_k_weights.reshape(-1),
                       from_host.reshape(-1), split, host_rows, packed, gpu_ids.reshape(-1), cpu_pair, tally,
                       last_use, step, width, num_experts, K=top_k, BLOCK_K=triton.next_power_of_2(top_k),
                       BLOCK_H=_BLOCK_H)
