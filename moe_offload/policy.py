"""Eviction policies: which cached expert gives up its device slot when a new one must come in.

Policy only: a policy sees expert ids and accesses, never tensors, streams or slots, so it can be unit-tested
on the CPU and replayed over a routing trace. The mechanism (cache.py) asks it for a victim and tells it what
was used, inserted and evicted.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Collection, Iterable, Protocol


class EvictionPolicy(Protocol):
    def on_insert(self, expert: int) -> None: ...
    def on_hit(self, expert: int) -> None: ...
    def on_evict(self, expert: int) -> None: ...
    def victim(self, protected: Collection[int]) -> int | None:
        """A cached expert to evict, never one in `protected` (needed by the step in flight); None if none."""


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


POLICIES = {"lru": LRUPolicy}


def make_policy(name: str) -> EvictionPolicy:
    return POLICIES[name]()
