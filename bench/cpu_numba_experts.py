"""The CPU expert path's two kernels side by side: CpuExperts compute="native" (torch/oneDNN) vs "numba"
(moe_offload/hybrid/kernels/cpu_numba.py), one token per expert, Qwen3-30B-A3B-shaped bf16 experts (H=2048, I=768).

Each call computes K distinct experts taken from a pool too big for the caches, in rotation (as a decode step's
misses); reported: median ms per call over --repeats calls after two warm-ups (numba compiles in the first),
GB/s of expert weights, per round (the kernels take turns --rounds times), and how the outputs compare
(fraction bit-identical, max |diff| / max |native|).

Usage, from the repository root: python -m bench.cpu_numba_experts [--threads N] [--experts K] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from bench.common import machine, utc_now, versions, write_report
from moe_offload.hybrid.cpu_experts import CpuExperts

HIDDEN, INTER, POOL = 2048, 768, 96  # a 96-expert pool is 0.9 GB of bf16


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--experts", type=int, default=8, help="experts per call (a step's misses)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per kernel and round (median)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    gate_up = (torch.randn((POOL, 2 * INTER, HIDDEN), generator=gen) / HIDDEN ** 0.5).to(torch.bfloat16)
    down = (torch.randn((POOL, HIDDEN, INTER), generator=gen) / INTER ** 0.5).to(torch.bfloat16)
    x = torch.randn((args.experts, HIDDEN), generator=gen).to(torch.bfloat16)  # [K, H]
    weights = torch.rand(args.experts, generator=gen)  # [K] float32, as routers give
    expert_bytes = 3 * HIDDEN * INTER * 2
    runners = {mode: CpuExperts(threads=args.threads, compute=mode) for mode in ("native", "numba")}
    rounds, call = [], 0
    for _ in range(args.rounds):  # the kernels take turns, so a noisy machine's moods hit both
        result = {}
        for mode, runner in runners.items():
            times = []
            for _ in range(args.repeats + 2):
                slots = [(call * args.experts + k) % POOL for k in range(args.experts)]
                call += 1
                start = time.perf_counter()
                runner(x, weights, gate_up, down, slots, [1] * args.experts, F.silu)
                times.append(time.perf_counter() - start)
            seconds = statistics.median(times[2:])
            result[mode] = {"ms_per_call": seconds * 1e3, "gb_s": args.experts * expert_bytes / seconds / 1e9}
        result["numba_vs_native"] = result["native"]["ms_per_call"] / result["numba"]["ms_per_call"]
        print(f"native {result['native']['gb_s']:5.1f} GB/s, numba {result['numba']['gb_s']:5.1f} GB/s: "
              f"{result['numba_vs_native']:.2f}x", flush=True)
        rounds.append(result)
    outputs = {mode: runner(x, weights, gate_up, down, list(range(args.experts)), [1] * args.experts, F.silu)
               for mode, runner in runners.items()}
    native, compiled = outputs["native"], outputs["numba"]
    from importlib.metadata import version

    ratios = [r["numba_vs_native"] for r in rounds]
    report = {"date": utc_now(), "machine": machine(), "versions": {**versions(), "numba": version("numba")},
              "threads": args.threads, "experts_per_call": args.experts,
              "shape": {"hidden": HIDDEN, "inter": INTER, "pool": POOL}, "rounds": rounds,
              "numba_vs_native": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
              "bit_identical_fraction": (native == compiled).float().mean().item(),
              "max_rel_diff": ((native - compiled).abs().max() / native.abs().max()).item()}
    print(json.dumps({k: report[k] for k in ("numba_vs_native", "bit_identical_fraction", "max_rel_diff")}))
    if args.out:
        write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
