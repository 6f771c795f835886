"""policy/device_lru.py's DeviceLRU plan and commit as one Triton kernel each, over its tensors.

Why: the torch version is ~25 tiny kernels per layer and decode step (sort, gathers, cumsums, scatters, topk),
each a few microseconds even replayed from a graph, on the path every MoE layer of a step waits on. Here the
same decisions take two launches: ranks in ascending expert id come from K x K comparisons instead of a sort,
the C slots' oldest stamps from K argmins instead of topk (K <= 16 pairs, C slots in one block).

Same state as the torch version after every step (tests/test_device_lru.py holds both to the host LRU), except
the scratch entries (slot C, expert E), which neither reads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_dense import runs_on

_STAMP_MAX = 2**62  # above any stamp: (step + 1) * 2^16 + rank


@triton.jit
def step_pairs(ids_ptr, admissible_ptr, slot_of_ptr, capacity, K: tl.constexpr, BLOCK_K: tl.constexpr,
               HAS_ADMISSIBLE: tl.constexpr):
    """A decode step's pairs as both device policies' plans take them: (k, live, ids, slots, resident, missing
    [BK]; hit_rank, miss_rank [BK]: ranks in ascending expert id among the hits and the admissible misses, from K x K
    comparisons (the ids of a decode step are distinct); hits: their count)."""
    k = tl.arange(0, BLOCK_K)  # [BK] pair
    live = k < K
    ids = tl.load(ids_ptr + k, mask=live, other=0)  # [BK]
    slots = tl.load(slot_of_ptr + ids, mask=live, other=0).to(tl.int64)  # [BK]
    resident = (slots < capacity) & live
    missing = (slots >= capacity) & live
    if HAS_ADMISSIBLE:
        missing = missing & (tl.load(admissible_ptr + k, mask=live, other=0) != 0)
    before = (ids[None, :] < ids[:, None]) & live[None, :]  # [BK, BK]: pair j comes before pair i
    hit_rank = tl.sum((before & resident[None, :]).to(tl.int64), axis=1)  # [BK]
    miss_rank = tl.sum((before & missing[None, :]).to(tl.int64), axis=1)  # [BK]
    hits = tl.sum(resident.to(tl.int64), axis=0)
    return k, live, ids, slots, resident, missing, hit_rank, miss_rank, hits


@triton.jit
def _plan_kernel(ids_ptr, admissible_ptr, slot_of_ptr, stamp_ptr, step_ptr, admit_ptr,
                 plan_victim_ptr, plan_admitted_ptr, plan_stamp_ptr, capacity, num_experts,
                 STRIDE: tl.constexpr, STAMP_MAX: tl.constexpr, K: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr, HAS_ADMISSIBLE: tl.constexpr):
    """One program: stamps for the step's hits, victims for its admissible misses, admit [E]."""
    k, live, ids, slots, resident, missing, hit_rank, miss_rank, hits = step_pairs(
        ids_ptr, admissible_ptr, slot_of_ptr, capacity, K, BLOCK_K, HAS_ADMISSIBLE)
    step = tl.load(step_ptr)
    stamps = (step + 1) * STRIDE + tl.where(resident, hit_rank, hits + miss_rank)  # [BK] hits the newest
    # the slots' stamps with this step's hits renewed, written back
    c = tl.arange(0, BLOCK_C)  # [BC] slot
    in_pool = c < capacity
    slot_stamp = tl.load(stamp_ptr + c, mask=in_pool, other=STAMP_MAX)  # [BC]
    renew = (slots[None, :] == c[:, None]) & resident[None, :]  # [BC, BK]
    renewed = tl.max(tl.where(renew, stamps[None, :], -1), axis=1)  # [BC] -1: not renewed
    slot_stamp = tl.where(renewed >= 0, renewed, slot_stamp)
    tl.store(stamp_ptr + c, slot_stamp, mask=in_pool)
    # victims: the oldest slots in order, one per miss rank
    victims = tl.zeros([BLOCK_K], dtype=tl.int64)  # [BK] victims[r] = the r-th oldest slot
    for r in tl.static_range(K):
        oldest = tl.argmin(slot_stamp, axis=0)
        victims = tl.where(k == r, oldest, victims)
        slot_stamp = tl.where(c == oldest, STAMP_MAX, slot_stamp)
    admitted = missing & (miss_rank < capacity - hits)  # [BK] while slots the step does not need are left
    pick = miss_rank[:, None] == k[None, :]  # [BK, BK]
    victim = tl.sum(tl.where(pick, victims[None, :], 0), axis=1)  # [BK] victims[miss_rank]
    tl.store(plan_victim_ptr + k, victim, mask=live)
    tl.store(plan_admitted_ptr + k, admitted.to(tl.int64), mask=live)
    tl.store(plan_stamp_ptr + k, stamps, mask=live)
    # admit [E]: the victim slot of each admitted miss, -1 elsewhere (one store per expert: no ordering needed)
    for start in tl.static_range(0, BLOCK_E, 1024):
        e = start + tl.arange(0, 1024)  # [1024]
        match = (ids[None, :] == e[:, None]) & admitted[None, :]  # [1024, BK]
        slot = tl.max(tl.where(match, victim[None, :], -1), axis=1)  # [1024]
        tl.store(admit_ptr + e, slot.to(tl.int32), mask=e < num_experts)


@triton.jit
def _commit_kernel(ids_ptr, plan_victim_ptr, plan_admitted_ptr, plan_stamp_ptr, slot_of_ptr, from_host_ptr,
                   host_row_ptr, slot_expert_ptr, stamp_ptr, step_ptr, capacity,
                   K: tl.constexpr, BLOCK_K: tl.constexpr, HAS_STAMP: tl.constexpr):
    """One program: each admitted miss takes its victim slot; the expert there goes back to the host tier; with
    HAS_STAMP (LRU), the slot takes the planned stamp and the step count moves on."""
    k = tl.arange(0, BLOCK_K)
    admitted = (tl.load(plan_admitted_ptr + k, mask=k < K, other=0) != 0) & (k < K)  # [BK]
    ids = tl.load(ids_ptr + k, mask=admitted, other=0)
    victim = tl.load(plan_victim_ptr + k, mask=admitted, other=0)
    evicted = tl.load(slot_expert_ptr + victim, mask=admitted, other=0)  # [BK] never one of this step's ids
    host_row = tl.load(host_row_ptr + evicted, mask=admitted, other=0)
    tl.store(slot_of_ptr + evicted, (capacity + host_row).to(tl.int32), mask=admitted)
    tl.store(from_host_ptr + evicted, tl.full([BLOCK_K], 1, tl.int64), mask=admitted)
    tl.store(slot_of_ptr + ids, victim.to(tl.int32), mask=admitted)
    tl.store(from_host_ptr + ids, tl.zeros([BLOCK_K], tl.int64), mask=admitted)
    tl.store(slot_expert_ptr + victim, ids, mask=admitted)
    if HAS_STAMP:
        tl.store(stamp_ptr + victim, tl.load(plan_stamp_ptr + k, mask=admitted, other=0), mask=admitted)
        tl.store(step_ptr, tl.load(step_ptr) + 1)


def fused_supported(tensor: torch.Tensor, top_k: int) -> bool:
    """Whether plan/commit run here: a device Triton runs on, at most 16 pairs a step."""
    return runs_on(tensor) and top_k <= 16


def plan(ids: torch.Tensor, admissible: torch.Tensor | None, slot_of: torch.Tensor, stamp: torch.Tensor,
         step: torch.Tensor, admit: torch.Tensor, plan_state: tuple, stride: int) -> None:
    """DeviceLRU.plan's effects (stamps of the step's hits, admit) and the pair-wise plan for commit, in one launch.

    ids [K] distinct; admissible [K] uint8 or None; slot_of [E + 1] int32 (slot, or C + host row); stamp [C + 1]
    int64; step [1] int64; admit [E] int32 (written: the slot each admitted miss goes to, else -1);
    plan_state = (victim [K], admitted [K], stamp [K]) int64 (written); stride: the stamp stride."""
    top_k, capacity, num_experts = ids.numel(), stamp.numel() - 1, admit.numel()
    victim, admitted, planned_stamp = plan_state
    _plan_kernel[(1,)](ids, admissible if admissible is not None else ids, slot_of, stamp, step, admit, victim,
                       admitted, planned_stamp, capacity, num_experts,
                       STRIDE=stride, STAMP_MAX=_STAMP_MAX, K=top_k, BLOCK_K=triton.next_power_of_2(top_k),
                       BLOCK_C=triton.next_power_of_2(max(capacity, 1)),
                       BLOCK_E=1024 * triton.cdiv(num_experts, 1024), HAS_ADMISSIBLE=admissible is not None)


def commit(ids: torch.Tensor, plan_state: tuple, slot_of: torch.Tensor, from_host: torch.Tensor,
           host_row: torch.Tensor, slot_expert: torch.Tensor, stamp: torch.Tensor | None,
           step: torch.Tensor | None) -> None:
    """DeviceLRU.commit's effects, in one launch, from plan()'s pair-wise plan: slot_of [E + 1] and from_host
    [E + 1] of the admitted and evicted experts, slot_expert [C + 1] and stamp [C + 1] of their slots, step + 1.
    host_row [E + 1] int64: every expert's row in the host tier. stamp and step None: the maps only (the device
    LFRU's commit: triton_lfru.commit)."""
    top_k, capacity = ids.numel(), slot_expert.numel() - 1
    victim, admitted, planned_stamp = plan_state
    has_stamp = stamp is not None
    _commit_kernel[(1,)](ids, victim, admitted, planned_stamp, slot_of, from_host, host_row, slot_expert,
                         stamp if has_stamp else slot_expert, step if has_stamp else slot_expert, capacity,
                         K=top_k, BLOCK_K=triton.next_power_of_2(top_k), HAS_STAMP=has_stamp)
