"""Speculative prefetch: which experts to fetch for a layer before its router has run.

Why: a miss stalls the layer until the expert's bytes arrive. The residual stream entering a decoder layer already
tells much of what its router will pick: the layer's router applied to that stream (through the layer's
post-attention norm, skipping the attention that has not run yet) finds 0.79 of the true top-k on the shipped
16-expert model (bench/RESULTS.md, "Routing prediction"). Fetching those predictions while the layer's attention
runs turns correct ones into hits; wrong ones are bytes moved for nothing and may evict an expert the step needs.
moe-offload trace --predict records the predictions; moe-offload simulate --policy prefetch scores them (hits
gained against the same eviction policy without prefetch, bytes wasted).

Decode steps only: a prefill step needs most experts anyway and reads them all at once.
"""

from __future__ import annotations

from typing import Sequence


def prefetch_plan(predicted: Sequence[int], table, limit: int | None = None) -> list[int]:
    """The predicted experts that are not cached, ascending id: all of them, or (limit) the `limit` most probable.

    predicted: best first (trace --predict's order). A limit models the engine's budget: a prefetch pays only
    while the link would otherwise idle (a decode step's attention), which holds a few experts' bytes, not K."""
    missing = [e for e in dict.fromkeys(predicted) if table.lookup(e) is None]  # best first
    return sorted(missing if limit is None else missing[:limit])
