"""Disk tier read strategies, measured: pread vs O_DIRECT (MOE_IO), one thread and several, cold and warm.

Writes a safetensors file of Qwen3-30B-A3B-sized experts (gate/up/down of [768, 2048] bf16 each, 9.4 MB per
expert), then reads random experts through moe_offload's own DiskTier into (pinned, when CUDA is there) buffers.
"Cold" drops the file from the page cache first (posix_fadvise DONTNEED, no root needed); "warm" reads the
same experts again. The default strategy (odirect) is the fastest cold one here. The canonical run
(bench/results/2026-11-28-h200-io.json) also timed mmap, which the disk tier no longer offers.

Usage, from the repository root:
  python -m bench.io_strategies --dir /tmp/iobench --gib 8 --out bench/results/<date>-io.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from bench.common import machine, utc_now, versions, write_report
from moe_offload.checkpoint import Checkpoint
from moe_offload.tiers import DiskTier, drop_page_cache, pin_in_place

INTER, HIDDEN = 768, 2048


def write_file(root: str, gib: float) -> str:
    """model.safetensors with per-expert tensors of layer 0 (enough experts to fill `gib`)."""
    from safetensors.torch import save_file

    os.makedirs(root, exist_ok=True)
    expert_bytes = 3 * INTER * HIDDEN * 2
    experts = int(gib * 2**30 // expert_bytes)
    path = os.path.join(root, "model.safetensors")
    if os.path.exists(path) and os.path.getsize(path) >= experts * expert_bytes:
        return path
    block = torch.randn(INTER, HIDDEN, dtype=torch.bfloat16)
    tensors = {}
    for e in range(experts):  # distinct storage per tensor so save_file writes every byte
        for proj in ("gate_proj", "up_proj"):
            tensors[f"model.layers.0.mlp.experts.{e}.{proj}.weight"] = block.clone()
        tensors[f"model.layers.0.mlp.experts.{e}.down_proj.weight"] = block.t().contiguous().clone()
    save_file(tensors, path)
    with open(os.path.join(root, "config.json"), "w") as handle:
        json.dump({"model_type": "qwen3_moe"}, handle)
    return path


def measure(strategy: str, threads: int, locations, buffers) -> float:
    tier = DiskTier(strategy)
    try:
        def read(index: int) -> int:
            return tier.read_expert(locations[index], buffers[index % len(buffers)])

        start = time.perf_counter()
        if threads == 1:
            total = sum(read(i) for i in range(len(locations)))
        else:
            with ThreadPoolExecutor(threads) as pool:
                total = sum(pool.map(read, range(len(locations))))
        return total / (time.perf_counter() - start) / 1e9
    finally:
        tier.close()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default="/tmp/moe-iobench")
    parser.add_argument("--gib", type=float, default=8.0)
    parser.add_argument("--read-gib", type=float, default=2.0, help="bytes read per measurement")
    parser.add_argument("--threads", default="1,4,8")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    path = write_file(args.dir, args.gib)
    checkpoint = Checkpoint(args.dir)
    experts = len(checkpoint.experts_by_layer[0].per_expert)
    all_locations = checkpoint.expert_locations(0, experts, HIDDEN, INTER)
    count = min(experts, int(args.read_gib * 2**30 // all_locations[0].nbytes))
    rng = random.Random(0)
    thread_counts = [int(t) for t in args.threads.split(",")]
    row_bytes = all_locations[0].format.row_bytes
    buffers = [torch.empty(row_bytes, dtype=torch.uint8) for _ in range(max(thread_counts) * 2)]
    pinned = [pin_in_place(b) for b in buffers] if torch.cuda.is_available() else []

    rows = []
    for strategy in ("pread", "odirect"):
        for threads in thread_counts:
            locations = rng.sample(all_locations, count)
            drop_page_cache(path)
            cold = measure(strategy, threads, locations, buffers)
            warm = measure(strategy, threads, locations, buffers) if strategy != "odirect" else None
            rows.append({"strategy": strategy, "threads": threads, "cold_gb_s": cold, "warm_gb_s": warm,
                         "bytes_per_read": all_locations[0].nbytes, "reads": count})
            print(f"{strategy:8s} threads {threads:2d}  cold {cold:6.2f} GB/s  "
                  f"warm {'-' if warm is None else f'{warm:6.2f}'} GB/s", flush=True)
    best = max(rows, key=lambda r: r["cold_gb_s"])
    report = {
        "date": utc_now(),
        "machine": machine(),
        "versions": versions(),
        "file_bytes": os.path.getsize(path), "pinned_destination": bool(pinned and all(pinned)),
        "rows": rows, "best_cold": best,
    }
    write_report(args.out, report)
    print(f"best cold: {best['strategy']} x{best['threads']} {best['cold_gb_s']:.2f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
