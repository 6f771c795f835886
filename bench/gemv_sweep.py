"""Tile sweep for the decode GEMV kernels (kernels/triton_moe.py) on Qwen3-30B-A3B expert shapes.

The tiles are fixed in the source, not tuned at run time: BLOCK_N, BLOCK_K and num_warps change the float32
reduction order, and a per-process choice could give different bits at different ratios. This script measures
the candidates once on the machine so that the fixed choice is a measured one. Weights in device memory (ratio
100) and in pinned host memory read in place (zero-copy misses); 8 (token, k) pairs of one token, as in decode.

Usage: python bench/gemv_sweep.py --out $OUT/gemv-sweep.json
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from moe_offload.environment import machine, utc_now, versions, write_report  # noqa: E402
from moe_offload.kernels import triton_moe  # noqa: E402

H, I, E, K = 2048, 768, 128, 8
BLOCK_NS, BLOCK_KS, WARPS = (4, 8, 16, 32), (128, 256, 512), (2, 4, 8)


def timed_us(fn, repeats: int = 50) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / repeats


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dtype, device = torch.bfloat16, torch.device("cuda")
    w13 = torch.randn(E, 2 * I, H, device=device, dtype=dtype) * 0.02  # [E, 2I, H]
    w2 = torch.randn(E, H, I, device=device, dtype=dtype) * 0.02  # [E, H, I]
    host_w13, host_w2 = w13[:16].cpu().pin_memory(), w2[:16].cpu().pin_memory()
    x = torch.randn(1, H, device=device, dtype=dtype)  # [1, H]
    ids = torch.randperm(E, device=device)[:K].view(1, K)  # [1, K]
    weights = torch.softmax(torch.randn(1, K, device=device), -1).to(dtype)  # [1, K]
    act = torch.empty(K, I, device=device, dtype=dtype)  # [P, I]
    out = torch.empty(K, H, device=device, dtype=torch.float32)  # [P, H]
    sources = {
        "device": (w13, w2, torch.arange(E, device=device, dtype=torch.int32), 0),
        # every expert of the step in host memory: slots E.. address host rows 0..15
        "host": (w13, w2, (E + torch.arange(E, device=device, dtype=torch.int32) % 16).to(torch.int32), 1),
    }
    rows = []
    for (source, (pool13, pool2, slots, on_host)), block_n, block_k, warps in itertools.product(
            sources.items(), BLOCK_NS, BLOCK_KS, WARPS):
        h13, h2 = (host_w13, host_w2) if on_host else (pool13, pool2)
        meta = dict(BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, ROUND=True)

        def gate_up():
            triton_moe._gate_up_gemv_kernel[(K, triton.cdiv(I, block_n))](
                x, ids.view(-1), slots, pool13, h13, E, slots, act, H, I, K, *x.stride(), *pool13.stride(),
                *act.stride(), ADMIT=False, **meta)

        def down():
            triton_moe._down_gemv_kernel[(K, triton.cdiv(H, block_n))](
                act, ids.view(-1), slots, pool2, h2, E, slots, weights.view(-1), out, H, I, *act.stride(),
                *pool2.stride(), *out.stride(), ROUND_PRODUCT=True, ZERO_ABSENT=False, ADMIT=False, **meta)

        expert_bytes = (2 * I * H, H * I)
        for name, fn, nbytes in (("gate_up", gate_up, expert_bytes[0]), ("down", down, expert_bytes[1])):
            us = timed_us(fn)
            rows.append({"source": source, "kernel": name, "BLOCK_N": block_n, "BLOCK_K": block_k,
                         "num_warps": warps, "us": us, "gb_s": K * nbytes * 2 / us / 1e3})
    best = {}
    for row in rows:
        key = f"{row['source']}/{row['kernel']}"
        if key not in best or row["us"] < best[key]["us"]:
            best[key] = row
    current = {f"{r['source']}/{r['kernel']}": r for r in rows
               if (r["BLOCK_N"], r["BLOCK_K"], r["num_warps"]) == (16, 256, 4)}
    for key in best:
        print(f"{key:16s} best {best[key]['us']:8.1f} us ({best[key]['gb_s']:7.1f} GB/s) "
              f"N{best[key]['BLOCK_N']} K{best[key]['BLOCK_K']} w{best[key]['num_warps']}; "
              f"current {current[key]['us']:8.1f} us")
    for source in sources:
        combos = {}
        for row in rows:
            if row["source"] == source:
                combos.setdefault((row["BLOCK_N"], row["BLOCK_K"], row["num_warps"]), 0.0)
                combos[(row["BLOCK_N"], row["BLOCK_K"], row["num_warps"])] += row["us"]
        top = sorted(combos.items(), key=lambda item: item[1])[:5]
        print(f"{source}: best shared tiles (gate_up + down us): " +
              ", ".join(f"N{n} K{k} w{w} {us:.1f}" for (n, k, w), us in top))
    write_report(args.out, {"date": utc_now(), "machine": machine(), "versions": versions(),
                            "shape": dict(H=H, I=I, E=E, K=K), "rows": rows, "best": best})
    return 0


if __name__ == "__main__":
    sys.exit(main())
