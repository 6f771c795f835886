"""Where a zero-copy layer's forwards stop reading misses in place and copy them instead, measured at load.

Why: a zero-copy layer reads a missed expert's weights from pinned host memory inside its kernels. For one
token that is as fast as copying (~50 GB/s on the H200). For a prefill the grouped GEMM reads each expert once
per M-block of its tokens, with GEMM access patterns, over PCIe. On the H200 a 128-token prefill at ratio 0
moved 4.3 GB of distinct experts in ~240 ms (~18 GB/s; bench/results/2026-11-29-h200-session3.json), where copies
run at ~55 GB/s. The copy path streams each needed expert once through the device scratch and computes from there.
Which one wins at which prompt length is measured here, on the layer as it runs; the default before any
measurement is cache.ZERO_COPY_MAX_PAIRS_PER_EXPERT.

The measurement routes tokens uniformly at random: in-place's best case. The grouped GEMM re-reads an expert over
PCIe once per M-block of its pairs, the copy path reads each needed expert once; uniform routing spreads pairs
thinnest, so it gives in place the fewest re-reads per byte a copy would move. Real prompts are skewed: on the
H200, at 128 tokens, where this measurement saw the two paths within a few percent of each other, the random
model's real prefill ran 1.5-2.6x faster copying (bench/results/2026-11-29-h200-prefill-threshold.md). So copying
is chosen from where it is no slower than in place within `margin` (a tie here is a win on real routing), not
only where it wins by a margin: the earlier rule flipped between the two run to run on noise.

The copy path costs the streaming scratch its device memory (allocated on first use: cache.ScratchPool; 151 MB
for the Qwen3-30B-A3B shape), which a zero-copy layer otherwise never needs. The measurement itself streams
through the scratch, so it is in the load's device-memory peak even when it is released after; prompts stop at
256 tokens to keep the measurement's activations small.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

LENGTHS = (8, 16, 32, 64, 128, 256)  # prompt tokens tried, ascending


def _timer(layer, act_fn: Callable, repeats: int) -> Callable[[int, bool], float]:
    """time(tokens, copy) -> median seconds of one forward of `tokens` tokens routed uniformly at random, over
    the in-place path or the copy path (forced by the layer's threshold), with other random routing each time."""
    device = layer.gate_up.device
    generator = torch.Generator().manual_seed(0)

    def time_it(tokens: int, copy: bool) -> float:
        saved = layer.zero_copy_max_pairs
        layer.zero_copy_max_pairs = -1 if copy else 1 << 62
        times = []
        try:
            for attempt in range(repeats + 1):  # the first warms up (kernel compiles, scratch allocation)
                scores = torch.rand((tokens, layer.num_experts), generator=generator)  # [T, E]
                ids = scores.topk(layer.top_k, dim=-1).indices.to(device)  # [T, K] distinct experts per token
                weights = torch.full((tokens, layer.top_k), 1.0 / layer.top_k, device=device)  # [T, K]
                hidden = torch.randn((tokens, layer.hidden), generator=generator).to(device, layer.gate_up.dtype)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                layer.forward(hidden * 0.1, ids, weights, act_fn)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if attempt:
                    times.append(time.perf_counter() - start)
        finally:
            layer.zero_copy_max_pairs = saved
        return statistics.median(times)

    return time_it


def tune_prefill_threshold(layer, act_fn: Callable, lengths: tuple[int, ...] = LENGTHS, repeats: int = 3,
                           margin: float = 0.05, timer: Callable[[int, bool], float] | None = None) -> dict:
    """Measure both paths of `layer` (a zero-copy OffloadedExperts) at each prompt length and set its
    zero_copy_max_pairs so that forwards from the first length where copying is no slower than in place within
    `margin`, and at every longer length tried, copy (if none, the default limit stays, or the longest length
    tried if more).
    Decode steps (one token) always read in place: they stay sync-free, so CUDA graphs can replay them.
    Returns {"max_tokens": the longest prompt read in place, "seconds": {tokens: {"in_place": s, "copy": s}}}.
    Counters are reset, and the scratch is released if the measurement was its first use."""
    time_it = timer or _timer(layer, act_fn, repeats)
    scratch_was_allocated = layer.scratch.nbytes > 0
    seconds = {tokens: {"in_place": time_it(tokens, False), "copy": time_it(tokens, True)} for tokens in lengths}
    no_slower = [seconds[t]["copy"] <= seconds[t]["in_place"] * (1 + margin) for t in lengths]
    first_copy = next((i for i in range(len(lengths)) if all(no_slower[i:])), None)
    if first_copy is None:  # reading in place wins up to the longest length tried: the default beyond it
        layer.zero_copy_max_pairs = max(layer.zero_copy_max_pairs, lengths[-1] * layer.top_k)
        max_tokens = layer.zero_copy_max_pairs // layer.top_k
    else:
        max_tokens = lengths[first_copy - 1] if first_copy else 1  # one-token decode steps always read in place
        layer.zero_copy_max_pairs = max_tokens * layer.top_k
    if not scratch_was_allocated:  # allocated again by the first forward that streams
        layer.scratch.release()
        if layer.gate_up.device.type == "cuda":
            torch.cuda.empty_cache()
    layer.reset_counters()
    layer.fetcher.stats.reset()
    return {"max_tokens": max_tokens, "seconds": seconds}
