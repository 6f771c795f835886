"""Cache policy: which expert holds which device slot, and which one gives up its slot when a new one comes in.

The one home of cache policy. This module sees expert ids and slot numbers, never tensors, streams or devices (it
imports no torch), so it can be unit-tested on the CPU and replayed over a routing trace
(moe_offload/tools/simulate.py) with exactly the engine's bookkeeping. Its neighbours device_lru.py and
device_lfru.py are LRUPolicy's and LFRUPolicy's tensor forms, for decode steps that decide on the device without a
host sync (the same decisions: tests/test_device_lru.py, tests/test_device_lfru.py). allocation.py splits slots
among layers and prefetch.py picks experts to fetch ahead; both are replayed by simulate.py only. The mechanism
(cache.py) keeps one SlotTable per MoE layer and moves the weights; the table asks its eviction policy for a
victim and tells it what was used, inserted and evicted.

LRUPolicy and LFRUPolicy (lfru.py) are the online policies; DEFAULT_POLICY names the engine's. MinPolicy is the
offline optimum, Belady's MIN generalised to cache.py's mechanism: it knows the layer's whole future, so only a
replay can run it, as the bound every online policy is measured against. A step is one forward call of the
layer. Per step i, with K the experts cached at its start and S the experts it needs, the experts needed AND
cached (K & S) must stay (cache.py never evicts an expert the step in flight needs); the other C - |K & S| slots
go to the experts of (K | S) - (K & S), i.e. the cached experts the step does not need plus the step's misses,
whose future-use sequences are lexicographically earliest. The
future-use sequence of an expert is the ascending list of later steps of this layer that need it (never again =
+inf, latest of all). Misses not chosen are streamed (bypass), cached experts not chosen are the victims. For
steps that need one expert this is exactly Belady's rule with bypass: among the cached experts and the incoming
one, drop the one whose next use is furthest (dropping the incoming one = streaming it).

Why MIN is optimal (so its hits >= the hits of ANY policy cache.py could run on the trace, LRU included):
on one layer, a run of cache.py is a sequence of cache states K_1, K_2, ... such that for every step i
(a) K_{i+1} <= K_i | S_i (demand paging: an expert enters only on a miss of the step), (b) K_{i+1} >= K_i & S_i
(the protected rule), (c) |K_{i+1}| <= C; its hits are sum_i |S_i & K_i|. Every choice of victims and
bypasses gives such a sequence and every such sequence comes from some choice, so the best policy maximises
hits over these sequences. (An empty slot counts as an expert that is never needed.)
Lemma: a run A in state X + {a} can follow a run B in state X + {b} so that their states stay equal or differ
in one expert (A holds a', B holds b'). While they differ, at a step that needs neither, A makes B's move with
a' for b' (if B drops b', A drops a' and the states are equal); that needs both, both hit them and must keep
them, A again makes B's move with a' for b' (or exactly B's move if B admits a'); that needs a' only, A hits
where B misses (+1 for A) and makes B's move keeping a' in place of the one expert B admits or keeps instead,
a one-expert difference again; that needs b' only, A misses where B hits (-1) but b' is then one of A's
misses, so A can move to exactly B's next state and they are equal from then on. So A never ends more than one
hit behind B, and not behind at all when the first step that needs exactly one of a, b needs a (or no step
does).
Induction: take an optimal run that agrees with MIN before step i's move but keeps y where MIN keeps x (both in
(K | S) - (K & S)). MIN ranked x first, fut(x) <= fut(y) lexicographically: the steps before the two sequences
first differ need both, and the first step that needs exactly one of them needs x. By the lemma, keeping x
instead of y and then following the optimal run loses nothing, so that run is optimal too and agrees with MIN
on one more expert. Repeating makes an optimal run that moves like MIN at step i, then i+1, and so on.
tests/test_trace_simulate.py also checks MIN against an exhaustive search on small random traces.

The lexicographic tie-break matters: with only the NEXT use compared, two experts both needed by the next
step tie, and a wrong pick makes the loser a permanently streamed expert while both are needed together
(protected rule); such a "MIN" is beaten by LRU on some traces. The optimum is for cache.py's mechanism
(protected rule, demand paging): a mechanism that could evict an expert the step just used, after computing
it, or prefetch ahead of a miss, could do better.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from functools import cmp_to_key
from typing import Collection, Iterable, Protocol


class EvictionPolicy(Protocol):
    def on_insert(self, expert: int) -> None: ...
    def on_hit(self, expert: int) -> None: ...
    def on_evict(self, expert: int) -> None: ...
    def victim(self, protected: Collection[int]) -> int | None:
        """A cached expert to evict, never one in `protected` (needed by the step in flight); None if none."""
    # Optional: admits(expert, victim) -> bool, asked before `victim` is evicted for `expert`; False streams the
    # expert without caching it (an admission filter: a rarely used expert must not push out a busy one).


class SlotTable:
    """Which expert occupies which of `capacity` slots. Bookkeeping only; the policy chooses victims."""

    def __init__(self, capacity: int, policy: EvictionPolicy):
        self.capacity = capacity
        self.policy = policy
        self.slot_of: dict[int, int] = {}
        self._free = list(range(capacity - 1, -1, -1))

    def lookup(self, expert: int) -> int | None:
        return self.slot_of.get(expert)

    def begin_step(self) -> None:
        """A step of the layer begins, before its hits (LFRU rebases its keys here)."""
        on_step = getattr(self.policy, "on_step", None)
        if on_step is not None:
            on_step()

    def hit(self, expert: int) -> None:
        self.policy.on_hit(expert)

    def admit(self, expert: int, protected: Collection[int], force: bool = False) -> int | None:
        """A slot for `expert`, evicting the policy's victim if full; None if nothing may be evicted or the policy's
        admission filter streams it. force=True skips the filter (a prefetch: the prediction is the evidence)."""
        if self._free:
            slot = self._free.pop()
        else:
            victim = self.policy.victim(protected)
            if victim is None:
                return None
            admits = getattr(self.policy, "admits", None)
            if admits is not None and not force and not admits(expert, victim):
                return None
            self.policy.on_evict(victim)
            slot = self.slot_of.pop(victim)
        self.slot_of[expert] = slot
        self.policy.on_insert(expert)
        return slot

    def mirror(self, slot_expert_oldest_first: list[tuple[int, int]], state: dict | None = None) -> None:
        """Hold exactly these (slot, expert) pairs, most evictable first (where another party, the device form of
        the policy, decided the placement); state: that form's policy state, for a policy that restores one
        (LFRU), else the pairs are inserted in order (LRU)."""
        restore = getattr(self.policy, "restore", None)
        if restore is None:
            for expert in list(self.slot_of):
                self.policy.on_evict(expert)
        self.slot_of = {expert: slot for slot, expert in slot_expert_oldest_first}
        taken = set(self.slot_of.values())
        self._free = [slot for slot in range(self.capacity - 1, -1, -1) if slot not in taken]
        if restore is not None:
            restore(state, [expert for _slot, expert in slot_expert_oldest_first])
            return
        for _slot, expert in slot_expert_oldest_first:
            self.policy.on_insert(expert)


class LRUPolicy:
    """Least recently used: evict the cached expert whose last use is oldest."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[int, None] = OrderedDict()  # oldest use first

    def on_insert(self, expert: int) -> None:
        self._order[expert] = None
        self._order.move_to_end(expert)

    def on_hit(self, expert: int) -> None:
        self._order.move_to_end(expert)

    def on_evict(self, expert: int) -> None:
        del self._order[expert]

    def victim(self, protected: Collection[int]) -> int | None:
        for expert in self._order:
            if expert not in protected:
                return expert
        return None

    def cached(self) -> Iterable[int]:
        return iter(self._order)


class MinPolicy:
    """Offline optimal policy for one layer (see the module docstring); knows the layer's whole future.

    `steps`: the needed experts of each step of this layer, in replay order. Beyond the EvictionPolicy
    protocol it needs two calls from the replay loop: begin_step(index, needed) after the hits of step
    `index` are counted, and before_admit(expert) before each SlotTable.admit of a miss; victim() answers
    None for a miss that is to be streamed (bypass).
    """

    name = "min"

    def __init__(self, steps: list[list[int]], capacity: int):
        self.capacity = capacity
        self._uses: dict[int, list[int]] = {}  # expert -> ascending step indices that need it
        for index, needed in enumerate(steps):
            for expert in needed:
                self._uses.setdefault(expert, []).append(index)
        self._cached: set[int] = set()
        self._now = -1
        self._admit: set[int] = set()
        self._evict: list[int] = []
        self._incoming: int | None = None

    # -- EvictionPolicy
    def on_insert(self, expert: int) -> None:
        self._cached.add(expert)

    def on_hit(self, expert: int) -> None:
        pass

    def on_evict(self, expert: int) -> None:
        self._cached.discard(expert)

    def victim(self, protected: Collection[int]) -> int | None:
        if self._incoming not in self._admit:
            return None  # bypass: the incoming expert is not worth a slot
        for index, expert in enumerate(self._evict):
            if expert in self._cached and expert not in protected:
                del self._evict[index]
                return expert
        return None

    # -- offline hooks
    def begin_step(self, index: int, needed: Iterable[int]) -> None:
        self._now = index
        needed = set(needed)
        forced = self._cached & needed
        pool = (self._cached | needed) - forced
        ranked = sorted(pool, key=cmp_to_key(self._compare))
        keep = set(ranked[:max(0, self.capacity - len(forced))])
        self._admit = keep - self._cached
        self._evict = [e for e in reversed(ranked) if e in self._cached and e not in keep]  # furthest first

    def before_admit(self, expert: int) -> None:
        self._incoming = expert

    def _future(self, expert: int) -> tuple[list[int], int]:
        uses = self._uses.get(expert, [])
        return uses, bisect.bisect_right(uses, self._now)

    def _compare(self, a: int, b: int) -> int:
        """<0 if `a` is more worth keeping: its future uses are lexicographically earlier."""
        uses_a, i = self._future(a)
        uses_b, j = self._future(b)
        while i < len(uses_a) and j < len(uses_b):
            if uses_a[i] != uses_b[j]:
                return -1 if uses_a[i] < uses_b[j] else 1
            i, j = i + 1, j + 1
        rest_a, rest_b = len(uses_a) - i, len(uses_b) - j
        if rest_a != rest_b:  # the one with uses left is used sooner than +inf
            return -1 if rest_a > rest_b else 1
        cached_a, cached_b = a in self._cached, b in self._cached
        if cached_a != cached_b:  # identical futures: keep what is there, no needless churn
            return -1 if cached_a else 1
        return (a > b) - (a < b)


from .lfru import LFRUPolicy  # noqa: E402  (after SlotTable/LRUPolicy: lfru.py imports nothing from here)

# The online eviction policies the engine can run (MinPolicy needs the future: replay only).
POLICIES = {"lru": LRUPolicy, "lfru": LFRUPolicy}
# The engine's policy (integration.py builds every layer's SlotTable with it). LFRU beat LRU at ratios 10/25/50 on
# held-out traces of both trained models (bench/RESULTS.md, "Cache policy on learned routing"), and its tensor form
# (device_lfru.py) makes the same decisions, but as torch ops, a loop of K small steps per layer and decode step,
# where LRU's is one Triton kernel (kernels/triton_lru.py): LRU stays the default until LFRU's device form is as
# cheap and the two are measured on the GPU with learned routing (MOE_CACHE_POLICY pins either meanwhile).
DEFAULT_POLICY = "lru"


def make_policy(name: str | None = None, **options) -> EvictionPolicy:
    """A fresh policy by name (None: DEFAULT_POLICY, read at the call), options to its constructor (LFRU:
    half_life); a one-line error lists the names if unknown."""
    name = DEFAULT_POLICY if name is None else name
    if name not in POLICIES:
        raise ValueError(f"unknown cache policy {name!r} (known: {', '.join(POLICIES)})")
    return POLICIES[name](**options)
