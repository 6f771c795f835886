"""Where a prefill and a decode step spend their time: torch.profiler over one generation per ratio.

For the closing notes of the GPU fast-path issue ("where a target is missed, the profile that shows it"). Runs
on the random Qwen3-30B-A3B-shaped model that bench/h200_offload_bench.py generates (`--phases gen`). Per ratio:
a warm-up generation, then a profiled one with CUDA graphs off (so each kernel of a decode step is visible) and
the same prompt; prints the top kernels by device time for the prefill forward and for the decode steps, and
writes them as JSON.

`--tier disk --graph auto` profiles the disk tier's piecewise decode instead (MOE_HOST_CACHE=0; with the default
pread reads from a warm page cache, so what is left of a step beyond the dense part is the eager layers' own
cost): the top host-side ops by self CPU time show where the eager layers spend it.

Usage: python bench/profile_step.py --model-dir /tmp/moe-offload-bench/full --ratios 100,25 --out $OUT/profile.json
       python bench/profile_step.py --ratios 25 --tier disk --graph auto --out $OUT/profile-disk.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from moe_offload import LLMPipeline  # noqa: E402
from moe_offload.environment import machine, utc_now, versions, write_report  # noqa: E402

TOP = 20


def top_kernels(prof, top: int = TOP) -> list[dict]:
    rows = []
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", None)
        if device_us is None:
            device_us = getattr(event, "cuda_time_total", 0)
        if device_us > 0 and event.device_type == torch.autograd.DeviceType.CUDA:
            rows.append({"name": event.key[:90], "calls": event.count, "device_ms": device_us / 1000})
    rows.sort(key=lambda r: -r["device_ms"])
    return rows[:top]


def top_cpu_ops(prof, top: int = TOP) -> list[dict]:
    rows = [{"name": event.key[:90], "calls": event.count, "self_cpu_ms": event.self_cpu_time_total / 1000}
            for event in prof.key_averages() if event.self_cpu_time_total > 0]
    rows.sort(key=lambda r: -r["self_cpu_ms"])
    return rows[:top]


def profile(pipe, ids: torch.Tensor, new_tokens: int) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    result = {}
    for phase, tokens in (("prefill", 1), ("decode", new_tokens)):
        pipe.generate_tokens(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)  # warm
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            pipe.generate_tokens(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            torch.cuda.synchronize()
            wall = time.perf_counter() - start
        result[phase] = {"wall_ms": wall * 1000, "new_tokens": tokens, "top_kernels": top_kernels(prof),
                         "top_cpu_ops": top_cpu_ops(prof)}
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", default="/tmp/moe-offload-bench/full")
    parser.add_argument("--ratios", default="100,25")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=9)
    parser.add_argument("--tier", choices=["host", "disk"], default="host",
                        help="disk: no host tier, misses read from the checkpoint (MOE_HOST_CACHE=0)")
    parser.add_argument("--graph", choices=["off", "auto"], default="off",
                        help="MOE_CUDA_GRAPH: off shows every decode kernel; auto profiles the step as it runs")
    parser.add_argument("--io", default="pread", help="MOE_IO (pread reads a warm page cache)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    report = {"date": utc_now(), "machine": machine(), "versions": versions(), "prompt_len": args.prompt_len,
              "tier": args.tier, "graph": args.graph, "io": args.io,
              "note": "'decode' = prefill + the decode steps; with graph off each decode kernel is visible",
              "ratios": {}}
    tier = {"MOE_HOST_CACHE": 0} if args.tier == "disk" else {}
    for ratio in [int(r) for r in args.ratios.split(",")]:
        pipe = LLMPipeline(args.model_dir, "cuda", MOE_OFFLOAD_RATIO=ratio, MOE_CUDA_GRAPH=args.graph,
                           MOE_IO=args.io, **tier)
        vocab = pipe.model.config.vocab_size
        ids = torch.randint(2, vocab, (1, args.prompt_len), generator=torch.Generator().manual_seed(1)).cuda()
        result = profile(pipe, ids, args.decode_tokens)
        report["ratios"][ratio] = result
        for phase, data in result.items():
            print(f"ratio {ratio} {phase}: {data['wall_ms']:.1f} ms wall for {data['new_tokens']} new tokens")
            for row in data["top_kernels"][:12]:
                print(f"  {row['device_ms']:9.3f} ms {row['calls']:6d}x  {row['name']}")
            for row in data["top_cpu_ops"][:12]:
                print(f"  {row['self_cpu_ms']:9.3f} ms {row['calls']:6d}x  (host) {row['name']}")
        pipe.close()
        del pipe
        torch.cuda.empty_cache()
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
