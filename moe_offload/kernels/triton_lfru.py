"""policy/device_lfru.py's DeviceLFRU plan as one Triton kernel over its tensors.

Why: the torch form is a loop of K small steps (about ten tiny kernels each) per layer and decode step, on the path
every MoE layer waits on, where LRU's plan is one launch (triton_lru.py). Here the whole plan is one program: ranks
in ascending expert id from K x K comparisons, the victims' order from K rounds of (key, last use) minima over the C
slots, then the misses in ascending id as K scalar steps. The arithmetic is the host policy's (lfru.py): a use's
weight is one of h fractions times a power of two made from its exponent bits, added to the key once, in float64,
so the keys hold the same bits (a fused multiply-add changes nothing: the product is exact). The commit is
triton_lru's commit kernel without LRU's stamps.

Same state as the torch form after every step (tests/test_device_lfru.py holds both to the host policy).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_dense import runs_on
from . import triton_lru
from .triton_lru import step_pairs

__all__ = ["commit", "fused_supported", "plan", "runs_on"]

_LAST_MAX = tl.constexpr(2**62)  # above any clock value


@triton.jit
def _weights(tick, base, fractions_ptr, mask, H: tl.constexpr):
    """2^((tick - base) / H) in float64 (tick >= base where mask): fractions[r] * 2^q for tick - base = q*H + r."""
    since = tick - base
    q = since // H
    r = since - q * H
    power = ((q + 1023) << 52).to(tl.float64, bitcast=True)
    return tl.load(fractions_ptr + r, mask=mask, other=0.0) * power


@triton.jit
def _plan_kernel(ids_ptr, admissible_ptr, slot_of_ptr, key_ptr, last_ptr, clock_ptr, base_ptr, fractions_ptr,
                 slot_expert_ptr, admit_ptr, plan_victim_ptr, plan_admitted_ptr, capacity, num_experts,
                 H: tl.constexpr, REBASE: tl.constexpr, K: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr, HAS_ADMISSIBLE: tl.constexpr):
    """One program: rebase if due, the hits' uses, the victims' order, the misses' uses and admissions, admit [E]."""
    clock = tl.load(clock_ptr)
    base = tl.load(base_ptr)
    # on_step: every key times 2^-REBASE (exact), the base moved on, where due
    due = (clock - base) >= REBASE * H
    for start in tl.static_range(0, BLOCK_E, 1024):
        e = start + tl.arange(0, 1024)  # [1024]
        inside = e < num_experts
        shrink = tl.full([1024], (1023 - REBASE) << 52, tl.int64).to(tl.float64, bitcast=True)
        scale = tl.where(due, shrink, tl.full([1024], 1.0, tl.float64))
        keys = tl.load(key_ptr + e, mask=inside, other=0.0)
        tl.store(key_ptr + e, keys * scale, mask=inside)
    base = base + due.to(tl.int64) * (REBASE * H)
    tl.store(base_ptr, base)
    tl.debug_barrier()  # the rebased keys, before any thread reads or rewrites one
    k, live, ids, slots, resident, missing, hit_rank, miss_rank, hits = step_pairs(
        ids_ptr, admissible_ptr, slot_of_ptr, capacity, K, BLOCK_K, HAS_ADMISSIBLE)
    # hits: one use each, in ascending id
    own_key = tl.load(key_ptr + ids, mask=live, other=0.0)  # [BK] float64
    hit_tick = clock + hit_rank + 1  # [BK]
    tl.store(key_ptr + ids, own_key + _weights(hit_tick, base, fractions_ptr, resident, H), mask=resident)
    tl.store(last_ptr + ids, hit_tick, mask=resident)
    # victims: the slots the step does not need, by (key, last use) ascending; victims[r] = the r-th
    c = tl.arange(0, BLOCK_C)  # [BC] slot
    in_pool = c < capacity
    in_slot = tl.load(slot_expert_ptr + c, mask=in_pool, other=0)  # [BC]
    needed = tl.max(((slots[None, :] == c[:, None]) & resident[None, :]).to(tl.int32), axis=1) > 0  # [BC]
    slot_key = tl.load(key_ptr + in_slot, mask=in_pool, other=0.0)  # [BC] (a needed slot's is masked below)
    slot_key = tl.where(needed | ~in_pool, float("inf"), slot_key)
    slot_last = tl.load(last_ptr + in_slot, mask=in_pool, other=0)  # [BC]
    victims = tl.zeros([BLOCK_K], dtype=tl.int64)  # [BK]
    victim_keys = tl.zeros([BLOCK_K], dtype=tl.float64)  # [BK]
    for r in tl.static_range(K):
        lowest = tl.min(slot_key, axis=0)
        tied = slot_key == lowest
        oldest = tl.min(tl.where(tied, slot_last, _LAST_MAX), axis=0)
        pick = tl.min(tl.where(tied & (slot_last == oldest), c, BLOCK_C), axis=0)
        victims = tl.where(k == r, pick, victims)
        victim_keys = tl.where(k == r, lowest, victim_keys)
        slot_key = tl.where(c == pick, float("inf"), slot_key)
    # misses in ascending id: a use while a victim is left; admitted if the key is then at least the victim's
    tick = clock + hits
    taken = hits * 0  # admissions so far
    victim_of = tl.full([BLOCK_K], 0, tl.int64) + capacity  # [BK] the slot each pair takes (C: none)
    for r in tl.static_range(K):
        this = missing & (miss_rank == r)  # [BK] at most one pair
        offered = (tl.sum(this.to(tl.int32), axis=0) > 0) & (taken < capacity - hits)
        tick = tick + offered.to(tl.int64)
        expert = tl.sum(tl.where(this, ids, 0), axis=0)
        key = tl.sum(tl.where(this, own_key, 0.0), axis=0) + tl.sum(
            _weights(tl.where(this, tick, base), base, fractions_ptr, this, H), axis=0)
        tl.store(key_ptr + expert, key, mask=offered)
        tl.store(last_ptr + expert, tick, mask=offered)
        victim = tl.sum(tl.where(k == taken, victims, 0), axis=0)
        take = offered & (key >= tl.sum(tl.where(k == taken, victim_keys, 0.0), axis=0))
        victim_of = tl.where(this & take, victim, victim_of)
        taken = taken + take.to(tl.int64)
    tl.store(clock_ptr, tick)
    admitted = victim_of < capacity  # [BK]
    tl.store(plan_victim_ptr + k, victim_of, mask=live)
    tl.store(plan_admitted_ptr + k, admitted.to(tl.int64), mask=live)
    for start in tl.static_range(0, BLOCK_E, 1024):  # admit [E]: the slot of each admitted miss, -1 elsewhere
        e = start + tl.arange(0, 1024)  # [1024]
        match = (ids[None, :] == e[:, None]) & admitted[None, :]  # [1024, BK]
        slot = tl.max(tl.where(match, victim_of[None, :], -1), axis=1)  # [1024]
        tl.store(admit_ptr + e, slot.to(tl.int32), mask=e < num_experts)


def fused_supported(tensor: torch.Tensor, top_k: int) -> bool:
    """Whether the plan runs here: a device Triton runs on, at most 16 pairs a step."""
    return runs_on(tensor) and top_k <= 16


def plan(ids: torch.Tensor, admissible: torch.Tensor | None, slot_of: torch.Tensor, key: torch.Tensor,
         last: torch.Tensor, clock: torch.Tensor, base: torch.Tensor, fractions: torch.Tensor,
         slot_expert: torch.Tensor, admit: torch.Tensor, plan_state: tuple, rebase: int) -> None:
    """DeviceLFRU.plan's effects in one launch: the rebase if due, keys and last uses [E + 1] of the step's uses,
    clock and base [1], admit [E] int32 (the slot each admitted miss goes to, else -1), and plan_state =
    (victim [K], admitted [K]) int64, pair by pair in the order of ids [K] (distinct), for device_lru.move_admitted.
    admissible [K] uint8 or None; slot_of [E + 1] int32; slot_expert [C + 1] int64; fractions [h] float64."""
    top_k, capacity, num_experts = ids.numel(), slot_expert.numel() - 1, admit.numel()
    victim, admitted = plan_state
    _plan_kernel[(1,)](ids, admissible if admissible is not None else ids, slot_of, key, last, clock, base, fractions,
                       slot_expert, admit, victim, admitted, capacity, num_experts,
                       H=fractions.numel(), REBASE=rebase, K=top_k, BLOCK_K=triton.next_power_of_2(top_k),
                       BLOCK_C=triton.next_power_of_2(max(capacity, 1)),
                       BLOCK_E=1024 * triton.cdiv(num_experts, 1024), HAS_ADMISSIBLE=admissible is not None)


def commit(ids: torch.Tensor, plan_state: tuple, slot_of: torch.Tensor, from_host: torch.Tensor,
           host_row: torch.Tensor, slot_expert: torch.Tensor) -> None:
    """DeviceLFRU.commit's effects in one launch, from plan()'s plan_state: the maps of the admitted and evicted
    experts (device_lru.move_admitted's), by triton_lru's commit kernel without stamps."""
    victim, admitted = plan_state
    triton_lru.commit(ids, (victim, admitted, victim), slot_of, from_host, host_row, slot_expert, None, None)
