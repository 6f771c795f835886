"""How a fixed number of device slots is split among MoE layers: per-layer capacities from a routing trace.

Why: the engine gives every layer the same capacity, C = resident_count(E). Layers differ: some keep routing to
the same few experts, others change experts at every step, and a slot does more good where experts change. With
the same total number of slots, a layer gets a share proportional to its churn (experts a step needs that the
step before did not), clipped to [0, E]. This is an allocation, not an eviction rule: inside each layer the
eviction policy (LRU, LFRU, ...) is unchanged. Replay-only for now (moe-offload simulate --policy per-layer):
the capacities come from a trace, which a running engine does not have before it runs.
"""

from __future__ import annotations

from typing import Hashable, Mapping, Sequence


def churn(steps: Sequence[Sequence[int]]) -> int:
    """Experts needed by a step that the previous step of the layer did not need, summed over the steps."""
    previous: set[int] = set()
    total = 0
    for needed in steps:
        current = set(needed)
        total += len(current - previous)
        previous = current
    return total


def layer_capacities(churns: Mapping[Hashable, float], capacities: Mapping[Hashable, int],
                     num_experts: Mapping[Hashable, int]) -> dict[Hashable, int]:
    """Split sum(capacities) slots in proportion to churn, each layer within [0, num_experts] (largest remainder;
    ties to the lower layer id). Layers without churn, or a zero total, keep their capacities."""
    total = sum(capacities.values())
    weight = sum(churns.get(layer, 0) for layer in capacities)
    if weight <= 0:
        return dict(capacities)
    result = {layer: 0 for layer in capacities}
    left, open_layers = total, set(capacities)
    while left > 0 and open_layers:
        share = sum(churns.get(layer, 0) for layer in open_layers)
        if share <= 0:
            share, weights = len(open_layers), {layer: 1.0 for layer in open_layers}
        else:
            weights = {layer: float(churns.get(layer, 0)) for layer in open_layers}
        exact = {layer: left * weights[layer] / share for layer in open_layers}
        given = {layer: min(int(exact[layer]), num_experts[layer] - result[layer]) for layer in open_layers}
        rest = left - sum(given.values())
        order = sorted(open_layers, key=lambda layer: (-(exact[layer] - int(exact[layer])), layer))
        for layer in order:
            if rest <= 0:
                break
            if result[layer] + given[layer] < num_experts[layer]:
                given[layer] += 1
                rest -= 1
        for layer, count in given.items():
            result[layer] += count
        left -= sum(given.values())
        open_layers = {layer for layer in open_layers if result[layer] < num_experts[layer]}
        if not any(given.values()):
            break
    return result
