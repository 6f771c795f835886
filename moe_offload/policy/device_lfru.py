"""LFRU admission decided on the device: the tensor form of lfru.LFRUPolicy, as device_lru.py is LRUPolicy's.

Why: a zero-copy decode step must not sync with the host, so the policy's decisions are made by tensor ops on the
device, and they must be the host policy's decisions exactly (the default policy runs in both forms, and the copy
path hands the state back to the host: SlotTable.mirror). lfru.py's exact form makes that possible: keys are
float64 sums of weights 2^q * 2^(r/h), computed here with the same fractions and an exact power of two, added in
the same order, so both forms hold the same bits.

A decode step (ids [K], distinct) runs as SlotTable + LFRUPolicy run it: the keys are rebased if due (on_step);
hits, in ascending id, are each one use (one tick); then misses, in ascending id, each take the cached expert the
step does not need with the lowest (key, last use) as victim while one is left, count their use, and are admitted
into its slot if their key is then at least the victim's (else streamed: read in place, no slot). Keys are kept
for all E experts, cached or not. Victims come in ascending (key, last) order of the slots the step does not need,
since none of those is used during the step; the misses are a loop of K small steps. Where Triton runs, the plan
is one Triton kernel (kernels/triton_lfru.py) and the commit triton_lru's commit kernel without stamps; the torch
ops below are the same decisions elsewhere (tests/test_device_lfru.py holds both to the host policy).

Needs what DeviceLRU needs: every expert of the layer in the host tier, every slot filled, one token per step.
"""

from __future__ import annotations

import torch

from ..kernels import triton_kernels
from .device_lru import fused_plan_inputs, move_admitted
from .lfru import REBASE, use_weights


def power_of_two(q: torch.Tensor) -> torch.Tensor:
    """2.0^q as float64, exactly (q int64 in [-1022, 1023]): the exponent bits set directly."""
    return ((q + 1023) << 52).view(torch.float64)


class DeviceLFRU:
    """Keys, last uses and maps of one layer; plan() before the step's kernels, commit() after them.

    slot_of [E + 1] int32 (slot, or C + host row; entry E a scratch target), from_host [E + 1] int64 (1 where read
    in place), host_row [E] (every expert's host row), slot_expert_most_evictable_first: (slot, expert) of the C
    slots; state: LFRUPolicy.state() of the host policy that placed them; half_life: its half-life."""

    def __init__(self, slot_of: torch.Tensor, from_host: torch.Tensor, host_row: list[int],
                 slot_expert_most_evictable_first: list[tuple[int, int]], state: dict, half_life: int,
                 fused: bool | None = None):
        device = slot_of.device
        self.num_experts = experts = slot_of.numel() - 1
        self.capacity = len(slot_expert_most_evictable_first)
        self.half_life = half_life
        self.slot_of, self.from_host = slot_of, from_host
        self.host_row = torch.tensor(host_row + [0], dtype=torch.long, device=device)  # [E + 1]
        expert_in = [experts] * (self.capacity + 1)
        for slot, expert in slot_expert_most_evictable_first:
            expert_in[slot] = expert
        self.slot_expert = torch.tensor(expert_in, dtype=torch.long, device=device)  # [C + 1]
        keys = [state["key"].get(e, 0.0) for e in range(experts)] + [float("inf")]  # E: scratch, never a victim
        self.key = torch.tensor(keys, dtype=torch.float64, device=device)  # [E + 1]
        self.last = torch.tensor([state["last"].get(e, 0) for e in range(experts)] + [0], device=device)  # [E + 1]
        self.clock = torch.tensor([state["clock"]], device=device)  # [1] int64
        self.base = torch.tensor([state["base"]], device=device)  # [1] int64
        self.fractions = torch.tensor(use_weights(half_life), dtype=torch.float64, device=device)  # [h]
        self.admit = torch.full((experts,), -1, dtype=torch.int32, device=device)  # [E] for the kernels
        self._plan: tuple | None = None
        # the plan as one Triton kernel (kernels/triton_lfru.py) where Triton runs; fused=False: torch ops
        self._kernels = triton_kernels("moe_offload.kernels.triton_lfru", device) if fused is None or fused else None
        if fused and self._kernels is None:
            raise ValueError("the fused device LFRU needs a device Triton runs on")
        self._plan_buffers: tuple | None = None  # (victim, admitted) [K] int64 for the fused kernel

    def _weight(self, tick: torch.Tensor) -> torch.Tensor:
        """[n] float64 weights of uses at clock values `tick` [n] int64 (lfru.LFRUPolicy._use's)."""
        since = tick - self.base
        return self.fractions[since % self.half_life] * power_of_two(since // self.half_life)

    def state(self) -> dict:
        """LFRUPolicy.state()'s form, for the host policy to take over (one sync)."""
        keys, last = self.key[:-1].tolist(), self.last[:-1].tolist()
        used = [e for e in range(self.num_experts) if last[e] > 0]
        return {"clock": int(self.clock.item()), "base": int(self.base.item()),
                "key": {e: keys[e] for e in used}, "last": {e: last[e] for e in used}}

    def occupants(self) -> list[tuple[int, int]]:
        """(slot, expert) of every slot, most evictable first."""
        experts = self.slot_expert[:self.capacity].tolist()
        keys, last = self.key.tolist(), self.last.tolist()
        return sorted(enumerate(experts), key=lambda pair: (keys[pair[1]], last[pair[1]]))

    def plan(self, ids: torch.Tensor, admissible: torch.Tensor | None = None) -> torch.Tensor:
        """admit [E] int32 for a step needing `ids` [K] (distinct): the slot each admitted miss is written into.
        admissible [K] bool (aligned with ids): misses the cache may take (the GPU reads them; the CPU computes
        the others where they lie, and those are no use of the cache); None = all."""
        # K = experts of the step, C = slots, E = experts
        if self._kernels is not None and self._kernels.fused_supported(ids, ids.numel()):
            flat, allowed, self._plan_buffers = fused_plan_inputs(ids, admissible, self._plan_buffers, 2)
            self._kernels.plan(flat, allowed, self.slot_of, self.key, self.last, self.clock, self.base,
                               self.fractions, self.slot_expert, self.admit, self._plan_buffers, REBASE)
            self._plan = ("fused", flat)
            return self.admit
        capacity, h = self.capacity, self.half_life
        due = (self.clock - self.base) >= REBASE * h  # [1] on_step's rebase
        self.key.mul_(torch.where(due, power_of_two(torch.full_like(self.base, -REBASE)), 1.0))
        self.base.add_(due.long() * (REBASE * h))
        needed, order = torch.sort(ids.reshape(-1))  # [K] ascending
        slots = self.slot_of[needed].long()  # [K]
        resident = slots < capacity  # [K]
        missing = ~resident if admissible is None else (~resident) & admissible.reshape(-1)[order]  # [K]
        hits = resident.long().sum()  # [] device scalar
        hit_tick = self.clock + resident.long().cumsum(0)  # [K] (meaningful where resident)
        hit_key = self.key[needed] + self._weight(hit_tick)  # [K]
        self.key.scatter_(0, needed, torch.where(resident, hit_key, self.key[needed]))
        self.last.scatter_(0, needed, torch.where(resident, hit_tick, self.last[needed]))
        # victims: the slots whose experts the step does not need, by (key, last) ascending
        in_slot = self.slot_expert[:capacity]  # [C]
        taken = torch.zeros(capacity + 1, dtype=torch.bool, device=ids.device)  # [C + 1]
        taken.scatter_(0, torch.where(resident, slots, capacity), torch.ones_like(resident))
        victim_key = torch.where(taken[:capacity], float("inf"), self.key[in_slot])  # [C]
        by_last = torch.argsort(self.last[in_slot], stable=True)  # [C]
        by_key = torch.argsort(victim_key[by_last], stable=True)  # [C]
        victims = by_last[by_key]  # [C] slots, most evictable first (the step's hits last)
        tick = self.clock + hits  # [1]
        admitted_count = torch.zeros_like(hits)  # []
        victim_of = torch.full_like(needed, capacity)  # [K] slot taken (C: none)
        for j in range(needed.numel()):  # ascending id; a miss uses the cache while a victim is left
            offered = missing[j] & (admitted_count < capacity - hits)
            tick = tick + offered.long()
            expert = needed[j]
            victim = victims[admitted_count.clamp(max=capacity - 1)]
            key = torch.where(offered, self.key[expert] + self._weight(tick), self.key[expert])
            self.key[expert] = key.reshape(())
            self.last[expert] = torch.where(offered, tick, self.last[expert]).reshape(())
            take = offered & (key >= self.key[self.slot_expert[victim]])
            victim_of[j] = torch.where(take, victim, capacity).reshape(())
            admitted_count = admitted_count + take.long().reshape(())
        self.clock.copy_(tick)
        admitted = victim_of < capacity  # [K]
        self.admit.fill_(-1).scatter_(0, needed, torch.where(admitted, victim_of, -1).int())
        self._plan = ("torch", (needed, admitted, victim_of))
        return self.admit

    def commit(self) -> None:
        """The admitted misses now live in their slots, the experts they replaced in the host tier."""
        if self._plan[0] == "fused":
            self._kernels.commit(self._plan[1], self._plan_buffers, self.slot_of, self.from_host, self.host_row,
                                 self.slot_expert)
        else:
            needed, admitted, victim = self._plan[1]
            move_admitted(needed, admitted, victim, self.slot_of, self.from_host, self.host_row, self.slot_expert)
        self._plan = None
