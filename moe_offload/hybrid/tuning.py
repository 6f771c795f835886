"""Load-time tuning of the hybrid path: which CPU kernel, how many of a step's misses go to the CPU, and whether
whole decodes are faster with the path at all (MOE_CPU_EXPERTS=auto).

Why measure rather than model: the split's best point depends on the CPU and GPU reading the same DRAM at once,
the handoff's latency, the kernel and the thread count on the machine that serves. A model of per-expert costs
measured apart (blind to the two sides contending for DRAM) sent too many misses to the CPU and made decode much
slower than none; and a split table whose layer timings promised a gain still made whole decodes slower where
the launching thread's Python competed with the CPU share. So the split is timed on a layer as it runs
(tune_split, per candidate kernel: tune_cpu_path), and then kept only if whole decodes beat the path left out
(check_on_decode).
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import torch

from .cpu_experts import CpuExperts, is_silu
from .kernels import cpu_numba
from .share import CpuShare


def all_on_cpu(top_k: int) -> list[int]:
    """Split table that sends every miss to the CPU (MOE_CPU_EXPERTS=all)."""
    return list(range(top_k + 1))


def cpu_expert_kernels(dtype: torch.dtype, act_fn, quantized: bool = False, fp8: bool = False,
                       int4pack: bool = False) -> list[str]:
    """CpuExperts compute modes that can run these experts, preferred first. Dense experts of `dtype`: the numba
    GEMVs (kernels/cpu_numba.py) for bf16 SiLU experts when numba is installed, and torch's own kernels.
    Quantized (int4/int8, `dtype` the scales'; FP8, float32 block scales): numba for bf16 or float32 scales,
    torch's int4 kernel on a repacked copy where `int4pack` says it may be made (hybrid/int4pack.py: symmetric
    int4, RAM for the copy), and the torch path that dequantizes block by block ("float32"; "native" would
    dequantize each whole expert per call)."""
    if quantized or fp8:
        numba = dtype in cpu_numba.ROUNDED and is_silu(act_fn) and cpu_numba.available()
        packed = ["int4pack"] if int4pack and quantized and is_silu(act_fn) else []
        return (["numba"] if numba else []) + packed + ["float32"]
    numba = dtype == torch.bfloat16 and is_silu(act_fn) and cpu_numba.available()
    return ["numba", "native"] if numba else ["native"]


def tune_split(layer, act_fn: Callable, repeats: int = 7, tie: float = 0.02) -> tuple[list[int], dict]:
    """Split table measured on `layer` (an OffloadedExperts with a cpu_share), as it will run: for every count of
    misses m a decode step can have, one-token forwards of the layer with each n_cpu = 0..m, timed end to end
    (the CPU and the GPU reading the same DRAM at once, the host function's own latency, the merge; on CUDA
    replayed from a graph of the layer, as in a decode step: OffloadedExperts.decode_timer); the
    fastest n_cpu wins; with LRU admission the smallest within `tie` of it (what the GPU reads gets cached, what
    the CPU computes does not). Without it, nothing is cached either way, so a preference for fewer would only
    give up speed.

    The path costs every step its copies and host node, even when a step sends nothing to the CPU, so the layer
    is also timed without it, and the table is kept only if its expected time beats that by `tie`, the miss
    count weighted as under uniform routing (binomial over top-k with the layer's non-resident share); else a
    table of zeros (the path off). A table chosen only against the path's own n_cpu = 0 made decode slower than
    no path at all, while its layer timings promised a clear gain at the miss counts it split.

    Returns (table, {"split": {m: [median seconds for n_cpu = 0..m]}, "off": {m: seconds without the path},
    "expected": {"on": seconds, "off": seconds}}).

    Each forward takes other host-tier experts, so neither side times weights still in its caches (a server
    CPU's L3 can hold dozens of experts, a GPU's L2 several). A model of per-expert costs measured apart (each
    side timed alone, the split chosen so both finish together) mispredicted badly: it sent too many misses to
    the CPU, which made decode much slower than none.
    """
    share: CpuShare = layer.cpu_share
    top_k, device = layer.top_k, share.device
    prefer_fewer = tie if layer.lru_admission else 0.0
    from_host = layer._direct_from_host.tolist()
    in_host = [e for e, remote in enumerate(from_host) if remote]
    resident = [e for e, remote in enumerate(from_host) if not remote]
    # [1, H] in the experts' dtype: the compute dtype for dense experts; for quantized ones their scales' (the
    # checkpoint's dtype, hence the compute dtype unless MOE_DTYPE says otherwise)
    hidden = torch.randn((1, layer.hidden), dtype=layer.format.dtype, device=device) * 0.1
    weights = torch.full((1, top_k), 1.0 / top_k, dtype=torch.float32, device=device)  # [1, K]
    cursor = [0]

    def routing(misses: int) -> torch.Tensor:  # [1, K]: `misses` host-tier experts, the rest resident
        picked = [in_host[(cursor[0] + i) % len(in_host)] for i in range(misses)]
        cursor[0] += misses
        return torch.tensor([picked + resident[:top_k - misses]], device=device)

    def median_time(timer, misses: int) -> float:
        timer(routing(misses))  # warm-up: compiles, first-touch, thread pools
        return statistics.median(timer(routing(misses)) for _ in range(repeats))

    table, split_times, off_times = [0] * (top_k + 1), {}, {}
    possible = [m for m in range(top_k + 1) if top_k - m <= len(resident) and m <= len(in_host)]
    reachable = [m for m in possible if m > 0]
    if not reachable:
        share.set_table(table)
        return table, {"split": split_times, "off": off_times, "expected": {}}
    share.set_table(all_on_cpu(top_k))
    timer = layer.decode_timer(hidden, routing(reachable[-1]), weights, act_fn)  # captured with the CPU path on
    for misses in possible:
        times = []
        for n_cpu in range(misses + 1):
            share.set_split(misses, n_cpu)
            times.append(median_time(timer, misses))
        best = min(times)
        table[misses] = next(n for n, t in enumerate(times) if t <= best * (1 + prefer_fewer))
        share.set_split(misses, table[misses])
        split_times[misses] = times
    share.set_table([0] * (top_k + 1))  # inactive: the next capture leaves the path out
    timer_off = layer.decode_timer(hidden, routing(reachable[-1]), weights, act_fn)
    for misses in possible:
        off_times[misses] = median_time(timer_off, misses)
    share.check()
    miss_share = len(in_host) / len(from_host)
    weight = {m: math.comb(top_k, m) * miss_share ** m * (1 - miss_share) ** (top_k - m) for m in possible}
    total = sum(weight.values())
    expected = {"on": sum(weight[m] * split_times[m][table[m]] for m in possible) / total,
                "off": sum(weight[m] * off_times[m] for m in possible) / total}
    if not any(table) or expected["on"] > expected["off"] * (1 - tie):
        table = [0] * (top_k + 1)
    share.set_table(table)
    return table, {"split": split_times, "off": off_times, "expected": expected}


def tune_cpu_path(layer, act_fn: Callable, runners: dict[str, CpuExperts]) -> tuple[str, list[int], dict]:
    """The CPU kernel and split table for `layer`'s CPU share, both measured: tune_split with each runner, and
    the runner whose table's expected step time is least wins (the first on a tie). Returns (name, table,
    {name: tune_split's timings}); the table is all zeros (the path off) when no runner's split pays.

    Why measure the kernel too: the numba kernel has run about twice torch's speed or better on the machines
    tried, from a 2-core VM to a GPU server, but the machine that serves decides."""
    share: CpuShare = layer.cpu_share
    best, tunings = None, {}
    for name, runner in runners.items():
        share.runner = runner
        table, timings = tune_split(layer, act_fn)
        tunings[name] = timings
        score = timings["expected"].get("on", math.inf)
        if best is None or score < best[0]:
            best = (score, name, table)
    _, name, table = best
    share.runner = runners[name]
    share.set_table(table)
    share.tuning = tunings
    return name, table, tunings


class _TokenStamps:
    """A streamer (put/end) that stamps each token's arrival; the first put is the prompt."""

    def __init__(self):
        self.stamps: list[float] = []

    def put(self, _value) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass

    def decode_tok_s(self, warm: int = 3) -> float:
        """Tokens per second after the first `warm` tokens: the prefill's, the eager first step's and the step
        that captures the graph (its capture differs with the path on and off; the replays are what decode runs)."""
        if len(self.stamps) < warm + 2:  # no step after the warm ones timed
            return 0.0
        tokens, first, last = len(self.stamps) - 1 - warm, self.stamps[warm], self.stamps[-1]
        return tokens / (last - first) if last > first else 0.0


def check_on_decode(decoder, shares: list[CpuShare], prompt: torch.Tensor, new_tokens: int = 32,
                    rounds: int = 2, tie: float = 0.02) -> dict:
    """Keep the tuned split tables of `shares` only if whole greedy decodes run faster with them than with the
    CPU path left out: `rounds` generations of `new_tokens` from `prompt` [1, T] each way, alternating, best
    steady rate of each (the first "on" one also warms up).
    Returns {"decode_tok_s": {"on": .., "off": ..}, "kept": bool}.

    Why: tune_split times one layer alone, replayed from its own graph while the launching thread blocks. In a
    real decode the launching thread runs Python between steps, and a Python host function then waits for the
    GIL, up to a switch interval (5 ms by default) instead of microseconds (numba's parallel regions took it too:
    hence kernels/spin_pool.py). So tables whose layer timings promised a gain have made whole decodes slower;
    even with the spin pool, a table that promised a clear gain per layer lost on whole decodes, and this check
    left the path off.
    """
    tables = [list(share.split_table) for share in shares]

    def use(on: bool) -> None:
        for share, table in zip(shares, tables):
            share.set_table(table if on else [0] * len(table))
        decoder.graph = None  # the path is captured into the step's graph, or left out of it: capture anew

    rates: dict[str, list[float]] = {"on": [], "off": []}
    for _ in range(rounds):
        for state in ("on", "off"):
            use(state == "on")
            stamps = _TokenStamps()
            decoder.generate(prompt, new_tokens, new_tokens, streamer=stamps)
            rates[state].append(stamps.decode_tok_s())
    best = {state: max(values) for state, values in rates.items()}
    kept = best["on"] > best["off"] * (1 + tie)
    use(kept)
    for share in shares:
        share.check()
    return {"decode_tok_s": best, "kept": kept}
