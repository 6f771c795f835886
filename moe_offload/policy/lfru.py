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

Exact form (what both the host policy here and its tensor form, device_lfru.py, compute, so that they make the same
decisions bit for bit): the clock counts uses (ticks) from a base, and an expert's key is the sum over its uses of
2^((t - base) / half_life), i.e. its score times 2^((clock - base) / half_life), the same factor for every expert, so
keys order experts as scores do and change only when the expert is used. With an integer half-life h, a use's
weight is 2^q * 2^(r/h) for t - base = q*h + r: a power of two times one of h fixed fractions (use_weights), so both
forms add the same float64 numbers in the same order. Every REBASE half-lives, at a step's start (on_step), the
base moves on and every key is scaled by 2^-REBASE (a power of two: exact, and the same operation in both forms),
which keeps the keys in range.

Ties (equal keys) go to the least recently used. The policy knows expert ids only;
SlotTable (policy/__init__.py) holds the slots. The default half-life was tuned on the tuning traces of
bench/cache_policy_learned.py (bench/RESULTS.md says which traces tuned it and which report it).
"""

from __future__ import annotations

import math
from typing import Collection, Hashable, Iterable

DEFAULT_HALF_LIFE = 32  # uses of the layer, tuned (bench/cache_policy_learned.py); see the module docstring
REBASE = 256  # half-lives between rescalings of the keys (2^256: far inside float64's range)


def use_weights(half_life: int) -> list[float]:
    """2^(r / half_life) for r < half_life: the fractions every use's weight is a power of two times."""
    return [2.0 ** (r / half_life) for r in range(half_life)]


class LFRUPolicy:
    """Evict the cached expert with the lowest decayed use count (ties: least recently used)."""

    name = "lfru"

    def __init__(self, half_life: int = DEFAULT_HALF_LIFE) -> None:
        if not (half_life >= 1 and float(half_life).is_integer()):
            raise ValueError(f"half_life must be a positive whole number of uses, got {half_life!r}")
        self.half_life = int(half_life)
        self._fractions = use_weights(self.half_life)
        self._clock = 0  # uses so far
        self._base = 0  # the clock the keys are relative to (a multiple of the half-life)
        self._key: dict[Hashable, float] = {}  # every expert ever used: sum of 2^((t - base) / half_life)
        self._last: dict[Hashable, int] = {}  # clock of its last use
        self._cached: dict[Hashable, None] = {}  # insertion order; order does not matter for decisions
        self._counted: Hashable | None = None  # the expert admits() just counted a use of

    def _rebase(self) -> None:
        self._base += REBASE * self.half_life
        self._key = {expert: math.ldexp(key, -REBASE) for expert, key in self._key.items()}

    def _use(self, expert: Hashable) -> None:
        self._clock += 1
        if self._clock - self._base >= 3 * REBASE * self.half_life:  # driven without on_step: stay in range
            self._rebase()
        q, r = divmod(self._clock - self._base, self.half_life)
        self._key[expert] = self._key.get(expert, 0.0) + math.ldexp(self._fractions[r], q)
        self._last[expert] = self._clock

    def on_step(self) -> None:
        """A step of the layer begins (before its hits): where the keys are rebased."""
        if self._clock - self._base >= REBASE * self.half_life:
            self._rebase()

    def score(self, expert: Hashable) -> float:
        """The expert's decayed use count now (0.0 if never used)."""
        return self._key.get(expert, 0.0) * 2.0 ** (-(self._clock - self._base) / self.half_life)

    def state(self) -> dict:
        """Everything the decisions depend on, for the tensor form to start from (device_lfru.py)."""
        return {"clock": self._clock, "base": self._base, "key": dict(self._key), "last": dict(self._last)}

    def restore(self, state: dict, cached_most_evictable_first: Iterable[Hashable]) -> None:
        """Take over a state (the tensor form's, after its steps) and these cached experts."""
        self._clock, self._base = state["clock"], state["base"]
        self._key, self._last = dict(state["key"]), dict(state["last"])
        self._cached = dict.fromkeys(cached_most_evictable_first)
        self._counted = None

    def on_insert(self, expert: Hashable) -> None:
        self._cached[expert] = None
        if self._counted == expert:
            self._counted = None  # admits() counted this use already
        else:
            self._use(expert)

    def admits(self, expert: Hashable, victim: Hashable) -> bool:
        """Count this miss as a use of `expert`; admit it over `victim` if its score is at least the victim's."""
        self._use(expert)
        admitted = self._key[expert] >= self._key.get(victim, 0.0)
        self._counted = expert if admitted else None
        return admitted

    def on_hit(self, expert: Hashable) -> None:
        self._use(expert)

    def on_evict(self, expert: Hashable) -> None:
        del self._cached[expert]

    def _order(self, expert: Hashable) -> tuple[float, int]:
        return self._key.get(expert, 0.0), self._last.get(expert, 0)

    def victim(self, protected: Collection[Hashable]) -> Hashable | None:
        candidates = [expert for expert in self._cached if expert not in protected]
        return min(candidates, key=self._order) if candidates else None

    def cached(self) -> Iterable[Hashable]:
        """Cached experts, most evictable first (the order a device mirror's oldest-first list expects)."""
        return iter(sorted(self._cached, key=self._order))
