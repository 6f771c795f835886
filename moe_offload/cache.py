"""The device-side expert cache of one MoE layer, and the layer's offloaded forward.

Each MoE layer owns a slot pool of `capacity` experts on the device (capacity = the resident share set by
MOE_OFFLOAD_RATIO): uint8 [C, B], one expert per row in the layer's expert format (expert_format.py), which the
kernels read through typed views ([C, 2I, H] and [C, H, I] for dense weights). A SlotTable maps expert ids to
slots; the eviction policy (policy/) picks victims by id. Misses that cannot be admitted (capacity 0, or every
cached expert is needed by this very step) stream through a small scratch pool shared by all layers, in
double-buffered waves: while one wave computes, the next one is copied.

Per forward call (a decode step, or a whole prefill chunk) each needed expert is loaded at most once, and the
counters count each needed expert once: a hit if it was on the device, a miss otherwise.

Zero-copy (the Triton kernel on CUDA, every non-resident expert of the layer in the pinned host tier): the kernel
reads misses in place from host memory over PCIe, as fast as copying them, so the layer runs as one launch set
with no host sync and no slot traffic, and the decode step can be captured in a CUDA graph. The resident set
then stays as loaded (MOE_ZERO_COPY=static), or (lru, auto) decode misses are written into victim slots as the
kernels read them, the cache policy decided on the device (its tensor form: policy/device_lru.py,
device_lfru.py). Prefill chunks with many tokens per expert (whose weights the grouped GEMM would read over PCIe
once per M-block) take the copy path, streaming through the scratch pool without admitting (after the host table
is brought in line with the device's).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .checkpoint import ExpertLocation
from .expert_format import ExpertFormat, ExpertWeights, Matrix
from .policy.device_lfru import DeviceLFRU
from .policy.device_lru import DeviceLRU
from .policy.lfru import LFRUPolicy
from .hybrid import CpuExperts, CpuShare
from .kernels.reference import weighted_expert_output
from .policy import EvictionPolicy, SlotTable
from .tiers import HostTier
from .transfer import ExpertFetcher, Transfer


class ScratchPool:
    """Device rows for experts streamed through without being cached, shared by all MoE layers.

    2 * wave rows, uint8 [2W, B] (expert_format.py): wave i uses half i % 2, so the next wave's copies overlap
    this wave's compute. Allocated on first use: layers that read their misses in place (zero-copy) never stream
    through it, and at ratio 0 on the Qwen3-30B-A3B-shaped model it would hold 151 MB of device memory for nothing.
    """

    def __init__(self, wave: int, fmt: ExpertFormat, device: torch.device):
        self.wave, self.format, self._device = wave, fmt, device
        self._rows: torch.Tensor | None = None  # [2W, B]
        self._weights: ExpertWeights | None = None

    def _allocated(self) -> ExpertWeights:
        if self._rows is None:
            with torch.inference_mode(False):  # first use may be under inference mode; later ones may not
                self._rows = torch.empty((2 * self.wave, self.format.row_bytes), dtype=torch.uint8,
                                         device=self._device)
            self._weights = self.format.weights(self._rows)
        return self._weights

    @property
    def rows(self) -> torch.Tensor:
        self._allocated()
        return self._rows  # [2W, B]

    @property
    def gate_up(self) -> Matrix:
        return self._allocated().gate_up  # [2W, 2I, H]

    @property
    def down(self) -> Matrix:
        return self._allocated().down  # [2W, H, I]

    @property
    def nbytes(self) -> int:
        """Device bytes it holds now (0 until a miss first streams through it)."""
        return self._rows.numel() if self._rows is not None else 0


# Above this many (token, k) pairs per expert, a zero-copy layer copies its misses instead: the grouped GEMM
# reads an expert's weights once per 64-row M-block, which is once per copy only up to here. The default of
# OffloadedExperts.zero_copy_max_pairs, in every zero-copy layer.
ZERO_COPY_MAX_PAIRS_PER_EXPERT = 64
_DECODE_MAX_PAIRS = 16  # kernels.triton_moe.DECODE_MAX_PAIRS (not imported: that module needs triton)


@dataclass
class Routing:
    """A step's routing as the copy path needs it (OffloadedExperts.route)."""

    counts: list[int]  # [E] (token, k) pairs per expert
    hits: list[int]  # needed experts in the cache
    misses: list[int]  # needed experts not in it


@dataclass
class LayerCounters:
    hits: int = 0
    misses: int = 0
    read_in_place: int = 0  # misses the kernel read straight from pinned host memory (zero-copy)
    computed_on_cpu: int = 0  # misses computed by the CPU where they lie in the host tier (hybrid/)


class OffloadedExperts:
    """Runtime of one MoE layer's routed experts: resident slots, host/disk sources, and the forward."""

    def __init__(self, layer: int, num_experts: int, top_k: int, fmt: ExpertFormat, capacity: int,
                 locations: list[ExpertLocation], host: HostTier | None, fetcher: ExpertFetcher,
                 scratch: ScratchPool, policy: EvictionPolicy, device: torch.device):
        self.layer, self.num_experts, self.top_k = layer, num_experts, top_k
        self.format, self.inter, self.hidden = fmt, fmt.inter, fmt.hidden
        self.locations, self.host, self.fetcher, self.scratch = locations, host, fetcher, scratch
        self.table = SlotTable(capacity, policy)
        self._counters = LayerCounters()
        self._direct_slots: torch.Tensor | None = None  # [E] int32: device slot, or C + host row (zero-copy)
        self._direct_from_host: torch.Tensor | None = None  # [E] int64: 1 where that is a host row
        self._step_used: torch.Tensor | None = None  # [E] int64 scratch: 1 = needed by this step
        self._use_counts: torch.Tensor | None = None  # [E] int64: steps that needed each expert (device tally)
        # zero-copy misses also admitted, the cache policy decided on the device by its tensor form
        self._device_policy: DeviceLRU | DeviceLFRU | None = None
        self._tally: torch.Tensor | None = None  # [2] int64 (needed, read in place), per step, with _device_policy
        self.slots = torch.empty((capacity, fmt.row_bytes), dtype=torch.uint8, device=device)  # [C, B]
        self.weights = fmt.weights(self.slots)  # the kernels' views of the slots
        self.route_observer: Callable[[int, torch.Tensor], None] | None = None
        # replaces the router's choice [T, K] by another, with device ops only (graph-safe): a benchmark replaying a
        # trained model's recorded routing on a random one (bench/routing_replay.py); None: the router's
        self.route_source: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.fused_moe: Callable | None = None  # kernels.triton_moe.fused_moe when the Triton path is on
        self.cpu_share: CpuShare | None = None  # decode misses partly computed on the CPU (hybrid/)
        # zero-copy layers: forwards of more (token, k) pairs copy their misses
        self.zero_copy_max_pairs = ZERO_COPY_MAX_PAIRS_PER_EXPERT * num_experts
        self._skip: torch.Tensor | None = None  # [1] int32 -1: the slot the kernels see for a CPU pair's id E

    @property
    def counters(self) -> LayerCounters:
        """Hits and misses so far (folds in the device-side tally, which costs one sync when there is one)."""
        if self._tally is not None:  # with device LRU the slot maps change: tallied step by step
            needed, in_place = self._tally.tolist()
            self._tally.zero_()
            self._counters.hits += needed - in_place
            self._counters.misses += in_place
            self._counters.read_in_place += in_place
        elif self._use_counts is not None:
            in_place = int((self._use_counts * self._direct_from_host).sum())
            self._counters.hits += int(self._use_counts.sum()) - in_place
            self._counters.misses += in_place
            self._counters.read_in_place += in_place
            self._use_counts.zero_()
        if self.cpu_share is not None:
            on_cpu = int(self.cpu_share.tally)
            self.cpu_share.tally.zero_()
            self._counters.read_in_place -= on_cpu
            self._counters.computed_on_cpu += on_cpu
        return self._counters

    def reset_counters(self) -> None:
        self._counters = LayerCounters()
        for tally in self._device_tallies():
            tally.zero_()

    def _device_tallies(self) -> list[torch.Tensor]:
        """The counters kept on the device (folded into `counters` on demand)."""
        return [t for t in (self._use_counts, self._tally, self.cpu_share.tally if self.cpu_share else None)
                if t is not None]

    @property
    def gate_up(self) -> Matrix:
        return self.weights.gate_up  # [C, 2I, H]

    @property
    def down(self) -> Matrix:
        return self.weights.down  # [C, H, I]

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert's weights in the engine's format (quantized: packed values, scales, zeros)."""
        return self.format.nbytes

    @property
    def direct(self) -> bool:
        """Decode steps run without a host sync (capturable): one launch set over the pool and the host tier."""
        return self._direct_slots is not None

    def sync_free(self, num_pairs: int) -> bool:
        """A forward of `num_pairs` (token, k) pairs takes the direct path: no host sync, capturable."""
        # a zero-copy layer's longer forwards take the copy path (with device LRU after forward() brings the host
        # table in line with the device's slots; the copy path admits nothing there)
        return self.direct and (not self.zero_copy or num_pairs <= self.zero_copy_max_pairs)

    @property
    def lru_admission(self) -> bool:
        """Decode misses are admitted into the slots, decided on the device (MOE_ZERO_COPY=lru or auto)."""
        return self._device_policy is not None

    @property
    def zero_copy(self) -> bool:
        return self._direct_slots is not None and self.table.capacity < self.num_experts

    def enable_direct(self, device: torch.device, lru: bool = False) -> bool:
        """Serve every step through one kernel launch set over the slot pool and, for misses, the host tier read
        in place (see the module docstring). Possible with the Triton kernel when every expert is resident or in
        the pinned host tier; returns whether it is on. Call after preload.

        lru: decode steps also admit their misses into the slots, decided on the device by the tensor form of the
        table's policy (device_lru.py, device_lfru.py), when the host tier holds every expert of the layer; the
        resident set then follows the routing."""
        if self.fused_moe is None:
            return False
        readable = self.host is not None and (self.host.pinned or device.type == "cpu")  # CPU: Triton's interpreter
        slots = []
        for expert in range(self.num_experts):
            slot = self.table.lookup(expert)
            if slot is None and not (readable and expert in self.host):
                return False
            slots.append(slot if slot is not None else self.table.capacity + self.host.row_of[expert])
        capacity = self.table.capacity
        slot_map = torch.tensor(slots + [0], dtype=torch.int32, device=device)  # [E + 1]: E = scatter scratch
        from_host = (slot_map >= capacity).long()  # [E + 1]
        self._direct_slots, self._direct_from_host = slot_map[:-1], from_host[:-1]  # [E] views
        self._step_used = torch.zeros(self.num_experts, dtype=torch.long, device=device)  # [E]
        self._use_counts = torch.zeros(self.num_experts, dtype=torch.long, device=device)  # [E]
        if (lru and 0 < capacity < self.num_experts and readable and len(self.host.row_of) == self.num_experts
                and self.top_k <= _DECODE_MAX_PAIRS):  # admission happens on the decode (GEMV) path
            policy = self.table.policy
            evictable_first = [(self.table.lookup(e), e) for e in policy.cached()]
            host_rows = [self.host.row_of[e] for e in range(self.num_experts)]
            if isinstance(policy, LFRUPolicy):
                self._device_policy = DeviceLFRU(slot_map, from_host, host_rows, evictable_first, policy.state(),
                                                 policy.half_life)
            else:
                self._device_policy = DeviceLRU(slot_map, from_host, host_rows, evictable_first)
            self._tally = torch.zeros(2, dtype=torch.long, device=device)
        return True

    def enable_cpu_share(self, split: list[int], runner: CpuExperts) -> bool:
        """Compute some decode misses on the CPU (hybrid/share.py), n_cpu = split[misses] of them per step; returns
        whether it is on. Needs the zero-copy path (the CPU reads the host tier in place, as the GPU would)."""
        if not self.zero_copy or self.top_k > _DECODE_MAX_PAIRS:
            return False
        device = self._direct_slots.device
        self.cpu_share = CpuShare(self.host, self.num_experts, self.top_k, self.hidden, split, runner, device)
        self._skip = self._direct_slots.new_full((1,), -1)  # [1] the slot of E, the CPU pairs' id for the kernels
        return True

    def decode_timer(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                     act_fn: Callable) -> Callable[[torch.Tensor], float]:
        """time(ids [1, K]) -> seconds of one direct-path forward of that routing, as a decode step runs it
        (hybrid.tuning.tune_split's measurement; left out of the layer's counters). On CUDA the forward is replayed
        from a CUDA graph of this layer, captured here with `top_k_index` after one eager run: no Python launch
        costs, and no contention for the GIL between launching the GPU's share and the CPU share's host function."""
        tallies = self._device_tallies()
        saved = [t.clone() for t in tallies]
        ids = top_k_index.clone()  # [1, K] the graph's input

        def forward() -> None:
            policy, self._device_policy = self._device_policy, None  # timed without admitting: the maps stay
            try:
                self._forward_direct(hidden, ids, top_k_weights, act_fn)
            finally:
                self._device_policy = policy

        on_cuda = hidden.device.type == "cuda"
        if on_cuda:
            forward()  # compiles and warms up outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                forward()
            forward = graph.replay

        def time_it(routing: torch.Tensor) -> float:
            ids.copy_(routing)
            if on_cuda:
                events = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
                events[0].record()
                forward()
                events[1].record()
                events[1].synchronize()
                seconds = events[0].elapsed_time(events[1]) / 1000
            else:
                start = time.perf_counter()
                forward()
                seconds = time.perf_counter() - start
            for tally, before in zip(tallies, saved):
                tally.copy_(before)
            return seconds

        return time_it

    @property
    def device_bytes(self) -> int:
        return self.slots.numel()

    def preload(self, experts: list[int]) -> None:
        """Make `experts` resident (at load time; not counted as misses)."""
        self.fetcher.begin_step()
        self._fetch([(expert, self.table.admit(expert, ())) for expert in experts], self.slots)
        self.fetcher.wait_copies(self.fetcher.mark(on_copy_stream=True))

    def _fetch(self, pairs: list[tuple[int, int]], rows: torch.Tensor) -> None:
        """Bring each (expert, slot) of `pairs` into that row of `rows` ([n, B]: the slots or the scratch)."""
        self.fetcher.fetch(self.layer, self.host, [Transfer(expert, self.locations[expert], rows[slot])
                                                   for expert, slot in pairs], self.format)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                act_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        # T = tokens, K = experts per token, H = hidden, I = expert intermediate, E = routed experts
        num_tokens, top_k = top_k_index.shape  # [T, K]
        if self.route_source is not None:
            top_k_index = self.route_source(top_k_index)
        if self.route_observer is not None:
            self.route_observer(self.layer, top_k_index)
        if self.sync_free(num_tokens * top_k):
            return self._forward_direct(hidden_states, top_k_index, top_k_weights, act_fn)
        if self._device_policy is not None:  # the copy path syncs with the host anyway: read where the device put what
            self.table.mirror(self._device_policy.occupants(), self._device_policy.state())
        return self.forward_routed(hidden_states, top_k_index, top_k_weights, act_fn, self.route(top_k_index))

    def route(self, top_k_index: torch.Tensor) -> Routing:
        """The step's needed experts split into hits and misses: the copy path's one host sync. Counts them and
        refreshes the hits in the cache policy; forward_routed then serves that step."""
        counts = torch.bincount(top_k_index.reshape(-1), minlength=self.num_experts).tolist()  # the host sync
        needed = [expert for expert, count in enumerate(counts) if count]
        hits = [e for e in needed if self.table.lookup(e) is not None]
        misses = [e for e in needed if self.table.lookup(e) is None]
        self._counters.hits += len(hits)
        self._counters.misses += len(misses)
        self.table.begin_step()
        for expert in hits:
            self.table.hit(expert)
        return Routing(counts, hits, misses)

    def forward_routed(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                       act_fn: Callable[[torch.Tensor], torch.Tensor], routing: Routing) -> torch.Tensor:
        """The copy path's forward for a step that route() has split (hits computed while misses stream in)."""
        counts, hits, misses, needed = routing.counts, routing.hits, routing.misses, routing.hits + routing.misses
        if self.fused_moe is not None:
            run_pool, result = self._fused_pool_runner(hidden_states, top_k_index, top_k_weights)
        else:
            run_pool, result = self._eager_pool_runner(hidden_states, top_k_index, top_k_weights, counts, act_fn)

        # Copies issued from here on wait only for earlier compute, not for the hits' compute queued next, so
        # the hits run on the device while misses are read and copied (nothing below touches a hit's slot).
        self.fetcher.begin_step()
        run_pool([(e, self.table.lookup(e)) for e in hits], self.gate_up, self.down)

        # Misses first go into the cache (evicting experts this step does not need), else through scratch.
        protected = set(needed)
        admitted, streamed = [], []
        for expert in misses:
            # with the direct path on, the host table must keep matching the fixed maps behind _direct_slots
            slot = self.table.admit(expert, protected) if self.table.capacity and not self.direct else None
            if slot is None:
                streamed.append(expert)
            else:
                admitted.append((expert, slot))
        self._fetch(admitted, self.slots)
        admitted_ready = self.fetcher.mark(on_copy_stream=True)
        waves = [streamed[i:i + self.scratch.wave] for i in range(0, len(streamed), self.scratch.wave)]
        wave_ready = [self._load_wave(waves, 0), self._load_wave(waves, 1)]
        self.fetcher.wait_copies(admitted_ready)
        run_pool(admitted, self.gate_up, self.down)
        for index, wave in enumerate(waves):
            self.fetcher.wait_copies(wave_ready[index])
            base = (index % 2) * self.scratch.wave
            run_pool([(e, base + offset) for offset, e in enumerate(wave)], self.scratch.gate_up, self.scratch.down)
            if index + 2 < len(waves):  # refill this half once its compute is done
                self.fetcher.reuse_after(self.fetcher.mark(on_copy_stream=False))
                wave_ready.append(self._load_wave(waves, index + 2))
            else:
                wave_ready.append(None)
        return result().to(hidden_states.dtype)

    def _forward_direct(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                        top_k_weights: torch.Tensor, act_fn: Callable) -> torch.Tensor:
        """One kernel launch set over the slot pool and the host tier in place; no host sync, so the step can be
        captured in a CUDA graph. Same kernel, rows and K-sum as the general path: the same bits."""
        num_tokens, top_k = top_k_index.shape  # [T, K]
        # every expert has a slot (device or host), so the kernels write every row: no zeroing
        contrib = torch.empty((num_tokens * top_k, self.hidden), dtype=torch.float32,
                              device=hidden_states.device)  # [T*K, H]
        host = self.host if self.zero_copy else None
        # the counters' device tally, in place so it survives graph replays
        self._step_used.zero_().index_fill_(0, top_k_index.reshape(-1), 1)  # [E] 1 = needed by this step
        if self._tally is not None:  # the maps change with LRU: split hits and misses now
            self._tally[0].add_(self._step_used.sum())
            self._tally[1].add_((self._step_used * self._direct_from_host).sum())
        else:  # fixed maps: split on demand (counters)
            self._use_counts.add_(self._step_used)
        if self.cpu_share is not None and num_tokens == 1 and self.cpu_share.active:
            return self._forward_hybrid(hidden_states, top_k_index, top_k_weights, act_fn, contrib)
        admit = self._device_policy.plan(top_k_index) if self._device_policy is not None and num_tokens == 1 else None
        self.fused_moe(hidden_states, top_k_index, top_k_weights, self.gate_up, self.down, self._direct_slots,
                       contrib=contrib, host_w13=host.gate_up if host else None, host_w2=host.down if host else None,
                       admit_slot_of_expert=admit)
        if admit is not None:
            self._device_policy.commit()
        return contrib.view(num_tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)  # [T, H]

    def _forward_hybrid(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                        act_fn: Callable, contrib: torch.Tensor) -> torch.Tensor:
        """A one-token step with some misses computed on the CPU (hybrid/share.py); with device LRU, only the misses the
        GPU reads are admitted (the cache holds what the GPU will read again, not what the CPU serves)."""
        slots = torch.cat([self._direct_slots, self._skip])  # [E + 1]: the maps as of now (LRU changes them)
        policy = self._device_policy
        admitted = False

        def gpu_share(ids: torch.Tensor) -> torch.Tensor:  # ids [1, K], E where the CPU computes
            nonlocal admitted
            admit = None
            if policy is not None:
                admit = torch.cat([policy.plan(top_k_index, admissible=ids < self.num_experts), self._skip])  # [E + 1]
                admitted = True
            return self.fused_moe(hidden_states, ids, top_k_weights, self.gate_up, self.down, slots, contrib=contrib,
                                  host_w13=self.host.gate_up, host_w2=self.host.down, admit_slot_of_expert=admit)

        merged = self.cpu_share.forward(hidden_states, top_k_index, top_k_weights,
                                        self._direct_from_host[top_k_index], gpu_share, act_fn)  # [K, H]
        if admitted:
            policy.commit()
        return merged.sum(dim=0, keepdim=True).to(hidden_states.dtype)  # [1, H]

    @staticmethod
    def _eager_pool_runner(hidden_states, top_k_index, top_k_weights, counts, act_fn):
        """(run(pairs, gate_up_pool, down_pool), result()): the torch loop, one expert at a time.

        Each (token, k) pair's weighted output gets its own float32 row and the K rows of a token are summed in
        one fixed order at the end (as transformers' grouped_mm does), so the result does not depend on which
        experts were hits, which came in first or which wave they streamed in: every ratio gives the same bits.
        """
        num_tokens, top_k = top_k_index.shape
        order = torch.argsort(top_k_index.reshape(-1), stable=True)  # [T*K] pair positions grouped by expert
        weights = top_k_weights.reshape(-1)  # [T*K]
        ends = list(itertools.accumulate(counts))
        contrib = torch.zeros((num_tokens * top_k, hidden_states.shape[1]), dtype=torch.float32,
                              device=hidden_states.device)  # [T*K, H]

        def run(pairs, gate_up_pool, down_pool):
            for expert, slot in pairs:
                rows = order[ends[expert] - counts[expert]:ends[expert]]  # [n] pairs routed to this expert
                contrib[rows] = weighted_expert_output(hidden_states[rows // top_k], weights[rows],
                                                       gate_up_pool[slot], down_pool[slot], act_fn)

        return run, lambda: contrib.view(num_tokens, top_k, -1).sum(dim=1)  # [T, H]

    def _fused_pool_runner(self, hidden_states, top_k_index, top_k_weights):
        """(run(pairs, gate_up_pool, down_pool), result()): one Triton launch set per pool, via a slot map.

        Each pool's call fills the rows of its (token, k) pairs; the K rows of a token are summed once at the
        end, in the same fixed order as the torch path.
        """
        num_tokens, top_k = top_k_index.shape
        contrib = torch.zeros((num_tokens * top_k, hidden_states.shape[1]), dtype=torch.float32,
                              device=hidden_states.device)  # [T*K, H]

        def run(pairs, gate_up_pool, down_pool):
            if not pairs:
                return
            slot_map = torch.full((self.num_experts,), -1, dtype=torch.int32)  # [E], -1 = not in this pool
            for expert, slot in pairs:
                slot_map[expert] = slot
            self.fused_moe(hidden_states, top_k_index, top_k_weights, gate_up_pool, down_pool,
                           slot_map.to(hidden_states.device, non_blocking=True), contrib=contrib)

        return run, lambda: contrib.view(num_tokens, top_k, -1).sum(dim=1)  # [T, H]

    def _load_wave(self, waves: list[list[int]], index: int):
        if index >= len(waves):
            return None
        base = (index % 2) * self.scratch.wave
        self._fetch([(e, base + offset) for offset, e in enumerate(waves[index])], self.scratch.rows)
        return self.fetcher.mark(on_copy_stream=True)
