"""LRU admission decided on the device, for zero-copy decode steps that must not sync with the host: the tensor
form of the policy package's LRUPolicy.

LRUPolicy decides on the host, which needs the step's expert ids there: a sync per layer, and no CUDA
graph. Here the same decisions are made by tensor ops on the device. Every slot carries the stamp of its last
use. A decode step takes its needed experts in ascending id, hits first, and gives them the newest stamps; its
misses, in ascending id, take the oldest slots that the step does not need, while there are any. That is what
SlotTable + LRUPolicy do for a step (tests/test_device_lru.py replays both over the same routing). The kernels
write each admitted miss into its slot while they read it from host memory (triton_moe's read-through ADMIT),
then commit() updates the maps; everything is ordered on the stream after the step's kernels, so a graph replay
of the step does it all.

Where Triton runs, plan and commit are one Triton kernel each (kernels/triton_lru.py) instead of ~25 torch ops.

Needs every expert of the layer in the host tier (an evicted expert is read in place from there afterwards) and
one token per step (a decode step: its K experts are distinct).
"""

from __future__ import annotations

import torch

from ..kernels import triton_kernels

_STRIDE = 1 << 16  # stamp = (step + 1) * _STRIDE + rank within the step (rank < K)


class DeviceLRU:
    """Slot stamps and maps of one layer; plan() before the step's kernels, commit() after them.

    slot_of [E + 1] int32 (the layer's slot map, device slot or C + host row; entry E is a scratch target for
    masked scatters), from_host [E + 1] int64 (1 where read in place), host_row [E] (every expert's host row),
    slot_expert: the expert in each of the C slots, oldest use first (the host policy's order at load).
    """

    def __init__(self, slot_of: torch.Tensor, from_host: torch.Tensor, host_row: list[int],
                 slot_expert_oldest_first: list[tuple[int, int]], fused: bool | None = None):
        device = slot_of.device
        self.num_experts = slot_of.numel() - 1
        self.capacity = len(slot_expert_oldest_first)
        self.slot_of, self.from_host = slot_of, from_host
        self.host_row = torch.tensor(host_row + [0], dtype=torch.long, device=device)  # [E + 1]
        expert_in = [0] * (self.capacity + 1)
        stamp = [0] * (self.capacity + 1)
        for age, (slot, expert) in enumerate(slot_expert_oldest_first):  # older uses get smaller stamps
            expert_in[slot], stamp[slot] = expert, age - self.capacity
        self.slot_expert = torch.tensor(expert_in, dtype=torch.long, device=device)  # [C + 1]
        self.stamp = torch.tensor(stamp, dtype=torch.long, device=device)  # [C + 1]
        self.step = torch.zeros(1, dtype=torch.long, device=device)
        self.admit = torch.full((self.num_experts,), -1, dtype=torch.int32, device=device)  # [E] for the kernels
        self._plan: tuple | None = None
        # plan/commit as two Triton kernels (kernels/triton_lru.py) where Triton runs; fused=False: torch ops
        self._kernels = triton_kernels("moe_offload.kernels.triton_lru", device) if fused is None or fused else None
        if fused and self._kernels is None:
            raise ValueError("the fused device LRU needs a device Triton runs on")
        self._plan_buffers: tuple | None = None  # (victim, admitted, stamp) [K] int64 for the fused kernels

    def occupants(self) -> list[tuple[int, int]]:
        """(slot, expert) of every slot, least recently used first: the device's state for the host (one sync)."""
        stamps = self.stamp[:self.capacity].tolist()
        experts = self.slot_expert[:self.capacity].tolist()
        return sorted(((slot, expert) for slot, expert in enumerate(experts)), key=lambda pair: stamps[pair[0]])

    def state(self) -> None:
        """LRUPolicy keeps nothing beyond the order occupants() gives (SlotTable.mirror's state)."""
        return None

    def plan(self, ids: torch.Tensor, admissible: torch.Tensor | None = None) -> torch.Tensor:
        """admit [E] int32 for a step needing `ids` [K] (distinct): the slot each admitted miss is written into.

        admissible [K] bool (aligned with ids): misses that may be admitted, i.e. that the GPU reads (the CPU
        computes the others where they lie: hybrid/); None = all. The others take no slot and no rank."""
        # K = experts of the step, C = slots, E = experts
        if self._kernels is not None and self._kernels.fused_supported(ids, ids.numel()):
            flat, allowed, self._plan_buffers = fused_plan_inputs(ids, admissible, self._plan_buffers, 3)
            self._kernels.plan(flat, allowed, self.slot_of, self.stamp, self.step, self.admit, self._plan_buffers,
                               _STRIDE)
            self._plan = ("fused", flat)
            return self.admit
        capacity = self.capacity
        needed, order = torch.sort(ids.reshape(-1))  # [K] ascending, like the host loop over expert ids
        slots = self.slot_of[needed].long()  # [K]
        resident = slots < capacity  # [K]
        missing = ~resident if admissible is None else (~resident) & admissible.reshape(-1)[order]  # [K]
        hit_rank = resident.long().cumsum(0) - 1  # [K]
        miss_rank = missing.long().cumsum(0) - 1  # [K]
        hits = resident.long().sum()  # device scalar
        stamps = (self.step + 1) * _STRIDE + torch.where(resident, hit_rank, hits + miss_rank)  # [K] hits first
        self.stamp.scatter_(0, torch.where(resident, slots, capacity), stamps)  # hits become the newest
        oldest = torch.topk(self.stamp[:capacity], min(needed.numel(), capacity), largest=False).indices  # [K']
        admitted = missing & (miss_rank < capacity - hits)  # [K]: while unneeded slots are left
        victim = oldest[miss_rank.clamp(0, oldest.numel() - 1)]  # [K]
        self.admit.fill_(-1).scatter_(0, needed, torch.where(admitted, victim, -1).int())
        self._plan = ("torch", (needed, admitted, victim, stamps))
        return self.admit

    def commit(self) -> None:
        """The admitted misses now live in their slots, the experts they replaced in the host tier."""
        kind, planned = self._plan
        if kind == "fused":
            self._kernels.commit(planned, self._plan_buffers, self.slot_of, self.from_host, self.host_row,
                                 self.slot_expert, self.stamp, self.step)
            self._plan = None
            return
        needed, admitted, victim, stamps = planned
        into = move_admitted(needed, admitted, victim, self.slot_of, self.from_host, self.host_row, self.slot_expert)
        self.stamp.scatter_(0, into, stamps)
        self.step.add_(1)
        self._plan = None


def move_admitted(needed: torch.Tensor, admitted: torch.Tensor, victim: torch.Tensor, slot_of: torch.Tensor,
                  from_host: torch.Tensor, host_row: torch.Tensor, slot_expert: torch.Tensor) -> torch.Tensor:
    """A step's admissions in the maps (shared by the device policies): each admitted miss (needed [K] where
    admitted [K]) takes its victim slot (victim [K]), the expert there goes back to its host row. slot_of and
    from_host [E + 1], host_row [E + 1], slot_expert [C + 1]: entries E and C are scratch targets. Returns into [K]:
    the slot each pair took, or C."""
    capacity, experts = slot_expert.numel() - 1, slot_of.numel() - 1
    into = torch.where(admitted, victim, capacity)  # [K] slot, or the scratch entry C
    evicted = torch.where(admitted, slot_expert[into], experts)  # [K] expert, or the scratch entry E
    slot_of.scatter_(0, evicted, (capacity + host_row[evicted]).int())
    from_host.scatter_(0, evicted, torch.ones_like(evicted))
    came_in = torch.where(admitted, needed, experts)  # [K]
    slot_of.scatter_(0, came_in, into.int())
    from_host.scatter_(0, came_in, torch.zeros_like(came_in))
    slot_expert.scatter_(0, into, needed)
    return into


def fused_plan_inputs(ids: torch.Tensor, admissible: torch.Tensor | None, buffers: tuple | None,
                      count: int) -> tuple[torch.Tensor, torch.Tensor | None, tuple]:
    """What a device policy's Triton plan takes (shared by both policies): ids [K] flat, admissible [K] as uint8
    (or None), and `count` int64 [K] plan buffers, kept across steps while K stays the same."""
    flat = ids.reshape(-1)  # [K]
    if buffers is None or buffers[0].numel() != flat.numel():
        buffers = tuple(torch.zeros(flat.numel(), dtype=torch.long, device=flat.device) for _ in range(count))
    allowed = None if admissible is None else admissible.reshape(-1).contiguous().view(torch.uint8)
    return flat, allowed, buffers
