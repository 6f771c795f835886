"""How much the CPU expert path's speed changes from process to process, and whether pinning its threads to cores
steadies it: the numba kernel alone (no GPU), in a fresh process per trial, trials back to back.

Why: on the H200 machine, processes of one configuration ran a ratio-0 layer's CPU share at two speeds. tune_split
timed 8 of 8 misses on the CPU at 1.17-1.27 ms in some processes and 1.60-1.71 ms in others, and the whole decode
followed (83.0 vs 79.7 tok/s in bench/results/archive/2026-11-29-h200-vs-llamacpp.json, 77.5 vs 60.5 in
bench/results/archive/2026-11-29-h200-vs-llamacpp-session8-run1.json; 87.5 in
bench/results/archive/2026-11-29-h200-ours-only-session8-run3.json). Each trial here allocates a host tier of a
ratio-0 run's size (12 layers x 128 experts of the Qwen3-30B-A3B shape by default, 14.5 GB), times the kernel on 8
experts at a time (other experts each call, so caches stay cold), and records the CPU each spin-pool thread last
ran on. Variants: "free" (the scheduler places the threads), "pinned" (the calling thread and each worker on a core
of its own, in affinity order).
Usage, from the repository root:
  python -m bench.cpu_expert_spread --threads 14 --out bench/results/<date>-h200-cpu-expert-spread.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

VARIANTS = ("free", "pinned")


def last_cpu(thread_id: int) -> int | None:
    """The CPU a thread of this process last ran on (field 39 of /proc/self/task/<id>/stat)."""
    try:
        with open(f"/proc/self/task/{thread_id}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[36])
    except (OSError, IndexError, ValueError):
        return None


def trial(args, variant: str) -> dict:
    """One process's measurement (runs in the child)."""
    import threading

    import torch
    import torch.nn.functional as F

    from moe_offload.hybrid.cpu_experts import CpuExperts
    from moe_offload.hybrid.kernels import cpu_numba
    from moe_offload.expert_format import ExpertFormat
    from moe_offload.tiers import HostTier

    started = time.perf_counter()
    tier = HostTier(list(range(args.experts)), ExpertFormat(args.inter, args.hidden, torch.bfloat16), pin=False,
                    huge_pages=not args.small_pages)
    tier.gate_up.fill_(0.01)  # the kernel's speed does not depend on the values; first touch maps the pages
    tier.down.fill_(0.01)
    fill_seconds = time.perf_counter() - started
    runner = CpuExperts(threads=args.threads, compute="numba")
    workers = cpu_numba.pool(args.threads)._threads  # the spin pool's threads (the caller drives the rest)
    if variant == "pinned":
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[0]})  # this (driving) thread
        for index, worker in enumerate(workers):
            os.sched_setaffinity(worker.native_id, {cpus[(index + 1) % len(cpus)]})
    top_k = 8
    hidden = torch.full((top_k, args.hidden), 0.1, dtype=torch.bfloat16)  # [K, H]
    weights = torch.full((top_k,), 1.0 / top_k)  # [K]
    out = torch.empty((top_k, args.hidden))  # [K, H] float32
    times, cursor = [], 0
    for attempt in range(args.repeats + 1):  # the first compiles and wakes the pool
        rows = [(cursor + k) % args.experts for k in range(top_k)]
        cursor += top_k
        start = time.perf_counter()
        runner(hidden, weights, tier.gate_up, tier.down, rows, [1] * top_k, F.silu, out)
        if attempt:
            times.append(time.perf_counter() - start)
    runner.close()
    times.sort()
    return {"variant": variant, "median_ms": statistics.median(times) * 1e3, "min_ms": times[0] * 1e3,
            "p90_ms": times[int(0.9 * (len(times) - 1))] * 1e3, "fill_s": round(fill_seconds, 2),
            "huge_pages": tier.huge_pages, "caller_cpu": last_cpu(threading.get_native_id()),
            "worker_cpus": [last_cpu(worker.native_id) for worker in workers],
            "worker_affinity": [sorted(os.sched_getaffinity(worker.native_id)) for worker in workers]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=6, help="processes per variant, variants taking turns")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--experts", type=int, default=12 * 128, help="host-tier experts (all of a ratio-0 run)")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--inter", type=int, default=768)
    parser.add_argument("--threads", type=int, default=14, help="the CPU path's threads (MOE_CPU_THREADS)")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--small-pages", action="store_true", help="the host tier on 4 KiB pages")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per process")
    parser.add_argument("--out")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(trial(args, args.child)))
        return 0
    from bench.common import machine, run_module, utc_now, versions, write_report

    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)} (known: {', '.join(VARIANTS)})")
    forwarded = ["--experts", str(args.experts), "--hidden", str(args.hidden), "--inter", str(args.inter),
                 "--threads", str(args.threads), "--repeats", str(args.repeats)] + \
        (["--small-pages"] if args.small_pages else [])
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for number in range(args.trials):
        for variant in variants:
            done = run_module(__spec__.name, [*forwarded, "--child", variant], capture_output=True, text=True,
                              timeout=args.timeout)
            if done.returncode != 0:
                print(f"trial {number} {variant} failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                return 1
            run = json.loads(done.stdout.strip().splitlines()[-1])
            runs[variant].append(run)
            print(f"trial {number} {variant}: median {run['median_ms']:.3f} ms, p90 {run['p90_ms']:.3f} ms, "
                  f"workers on {run['worker_cpus']}", flush=True)
    summary = {v: {"medians_ms": [r["median_ms"] for r in rs], "spread": max(r["median_ms"] for r in rs)
                   / min(r["median_ms"] for r in rs)} for v, rs in runs.items()}
    report = {"date": utc_now(), "machine": machine(), "versions": versions(), "args": vars(args),
              "summary": summary, "runs": runs}
    if args.out:
        write_report(args.out, report)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
