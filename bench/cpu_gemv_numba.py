"""Can a hand-written CPU GEMV read bf16 expert weights faster than torch's? (issue 6: the CPU expert path)

On the H200 machine torch's CPU path (oneDNN, AMX) computes one-token experts at 25-35 GB/s of weights while a
plain read runs at 84.6 GB/s and llama.cpp's CPU backend at ~66 GB/s (bench/results/2026-11-29-h200-cpu-
experts.log): for batch-1 decode a GEMV is a memory stream, and oneDNN re-packs the weight on every call. This
times the simplest alternative, a numba kernel (numba is on the H200 image) that widens each bf16 row to float32
in a per-thread buffer and accumulates in float32, against torch's F.linear on the same matrices: expert-shaped
[1536, 2048] bf16 (gate and up of one Qwen3-30B-A3B expert), 96 of them (0.6 GB, beyond any cache).

Usage: python bench/cpu_gemv_numba.py [--threads N] [--out FILE.json]       (needs numba; torch for the baseline)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from moe_offload.environment import machine, utc_now, versions, write_report  # noqa: E402

ROWS, COLS, MATRICES = 1536, 2048, 96


def numba_gemv():
    from numba import njit, prange

    @njit(parallel=True, fastmath=True)
    def gemv(weight_bits, x, out):  # weight_bits [N, K] uint16 (bf16), x [K] float32 -> out [N] float32
        rows, cols = weight_bits.shape
        for i in prange(rows):
            widened = np.empty(cols, np.uint32)  # bf16 -> float32 is a 16-bit shift of the bits
            for j in range(cols):
                widened[j] = np.uint32(weight_bits[i, j]) << np.uint32(16)
            values = widened.view(np.float32)
            acc = np.float32(0.0)
            for j in range(cols):
                acc += values[j] * x[j]
            out[i] = acc

    return gemv


def best_seconds(run, repeats: int = 5) -> float:
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=None, help="threads for both (default: all cores)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    try:
        import numba
    except ImportError:
        print("numba is not installed: pip install numba", file=sys.stderr)
        return 2
    threads = args.threads or os.cpu_count()
    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    generator = torch.Generator().manual_seed(0)
    weights = (torch.randn(MATRICES, ROWS, COLS, generator=generator) * 0.02).to(torch.bfloat16)  # [M, N, K]
    x = torch.randn(1, COLS, generator=generator).to(torch.bfloat16)  # [1, K]
    bits = weights.view(torch.int16).numpy().view(np.uint16)  # [M, N, K] bf16 bit patterns, no copy
    x32 = x.float().numpy()[0]  # [K]
    out = np.empty(ROWS, np.float32)
    gemv = numba_gemv()

    def run_numba():
        for m in range(MATRICES):
            gemv(bits[m], x32, out)

    def run_torch():
        for m in range(MATRICES):
            torch.nn.functional.linear(x, weights[m])

    gemv(bits[0], x32, out)
    expected = torch.nn.functional.linear(x.float(), weights[0].float())[0].numpy()  # [N], float32 truth
    error = float(np.abs(out - expected).max() / np.abs(expected).max())
    nbytes = weights[0].numel() * 2 * MATRICES
    results = {}
    for name, run in (("torch_linear_bf16", run_torch), ("numba_widen_float32", run_numba)):
        seconds = best_seconds(run)
        results[name] = {"us_per_matrix": seconds / MATRICES * 1e6, "gb_s": nbytes / seconds / 1e9}
        print(f"{name:22s} {results[name]['us_per_matrix']:7.0f} us per [{ROWS}, {COLS}] bf16 matrix, "
              f"{results[name]['gb_s']:5.1f} GB/s")
    print(f"numba vs torch: {results['numba_widen_float32']['gb_s'] / results['torch_linear_bf16']['gb_s']:.2f}x; "
          f"numba max |error| / max |y| vs float32 = {error:.1e}")
    report = {"date": utc_now(), "machine": machine(), "versions": dict(versions(), numba=numba.__version__),
              "threads": threads, "shape": [MATRICES, ROWS, COLS], "results": results,
              "numba_relative_error_vs_float32": error}
    if args.out:
        write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
