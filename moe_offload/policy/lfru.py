"""Recency + frequency eviction (LFRU): evict the cached expert whose use count, decayed with a half-life, is lowest.

Why: with fine-grained routing (128 experts, top-8) a decode step touches experts that the next few steps do not
need, and LRU lets each of them push out an expert that the layer uses every other step. An expert's worth is how
often it has been used lately, not only when it was last used: the score of an expert is a sum over its past uses
of 2^(-age / half_life), age counted in uses of the layer (every hit or insert is one tick of the layer's clock),
which is what llama.cpp's MoE expert cache moved to from LRU. Scores survive eviction, so an expert that comes back
brings its history with it (the frequency part would otherwise restart at 1 on every miss and LFRU would be LRU).
A short half-life is LRU (the newest use dominates), a long one is LFU.

Admission: a miss is admitted only if its score, this use counted, is at least the victim's; else it is streamed
(the slot stays with the busier expert). Its use is counted either way, so an expert that keeps coming back earns
its slot. Belady's MIN streams such misses too; without this, at C = k (every slot needed by the step before)
every demand-paging policy makes LRU's decisions.

Device form (not built; policy/device_lru.py is LRU): every score decays by the same factor per tick, so the key
log2(score) + clock_of_last_use / half_life orders experts exactly as their scores do and changes only when the
expert is used, like LRU's stamps. The device LRU's plan could take these float keys in place of its stamps
(smallest key = victim) plus one comparison per miss for admission, and keep the keys of all E experts, not only of
the C cached ones.

Ties (equal scores, e.g. the preloaded experts) go to the least recently used. The policy knows expert ids only;
SlotTable (policy/__init__.py) holds the slots. The default half-life was tuned on the tuning traces of
bench/cache_policy_learned.py (bench/RESULTS.md says which traces tuned it and which report it).
"""

from __future__ import annotations

from typing import Collection, Hashable, Iterable

DEFAULT_HALF_LIFE = 32.0  # uses of the layer, tuned (bench/cache_policy_learned.py); see the module docstring


class LFRUPolicy:
    """Evict the cached expert with the lowest decayed use count (ties: least recently used)."""

    name = "lfru"

    def __init__(self, half_life: float = DEFAULT_HALF_LIFE) -> None:
        if not half_life > 0:
            raise ValueError(f"half_life must be positive, got {half_life!r}")
        self.half_life = float(half_life)
        self._clock = 0
        self._score: dict[Hashable, float] = {}  # every expert ever used: decayed count at its last use
        self._last: dict[Hashable, int] = {}  # clock of its last use
        self._cached: dict[Hashable, None] = {}  # insertion order; order does not matter for decisions
        self._counted: Hashable | None = None  # the expert admits() just counted a use of

    def _use(self, expert: Hashable) -> None:
        self._clock += 1
        self._score[expert] = self.score(expert) + 1.0
        self._last[expert] = self._clock

    def score(self, expert: Hashable) -> float:
        """The expert's decayed use count now (0.0 if never used)."""
        if expert not in self._score:
            return 0.0
        return self._score[expert] * 2.0 ** (-(self._clock - self._last[expert]) / self.half_life)

    def on_insert(self, expert: Hashable) -> None:
        self._cached[expert] = None
        if self._counted == expert:
            self._counted = None  # admits() counted this use already
        else:
            self._use(expert)

    def admits(self, expert: Hashable, victim: Hashable) -> bool:
        """Count this miss as a use of `expert`; admit it over `victim` if its score is at least the victim's."""
        self._use(expert)
        admitted = self.score(expert) >= self.score(victim)
        self._counted = expert if admitted else None
        return admitted

    def on_hit(self, expert: Hashable) -> None:
        self._use(expert)

    def on_evict(self, expert: Hashable) -> None:
        del self._cached[expert]

    def victim(self, protected: Collection[Hashable]) -> Hashable | None:
        best, best_key = None, None
        for expert in self._cached:
            if expert in protected:
                continue
            key = (self.score(expert), self._last[expert])
            if best_key is None or key < best_key:
                best, best_key = expert, key
        return best

    def cached(self) -> Iterable[Hashable]:
        """Cached experts, most evictable first (the order a device mirror's oldest-first list expects)."""
        return iter(sorted(self._cached, key=lambda e: (self.score(e), self._last[e])))
