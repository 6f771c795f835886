"""Where the CPU share of a hybrid decode layer (moe_offload/hybrid/) spends its time, on one CUDA machine.

Why: on the H200, tune_split timed a Qwen3-30B-A3B-shaped layer with 1 of 8 misses on the CPU at ~2.4 ms against
~0.26 ms with none (bench/results/archive/2026-11-29-h200-vs-llamacpp-session3.json, cpu_expert_tuning), while one
expert's bytes take ~0.3 ms at the CPU's ~30 GB/s. This splits that latency into its parts, each replayed from a
CUDA graph and timed with CUDA events (median of --repeats):
  host_node_c      side-stream D2H, a host node running a C no-op (libc free(NULL): no Python), H2D
  host_node_python the same with a Python no-op (hybrid/driver.py HostFunction: the GIL and ctypes' trampoline)
  python_busy      host_node_python while the launching thread runs Python (polls the event) instead of blocking
  share            CpuShare.forward with n of 8 misses on the CPU (n = 1, 2, 4, 8), per CPU kernel (with numba:
                   the compiled host step, no GIL), the launching thread blocking and (_busy) running Python,
                   handed over by a host function (the fallback); share_numba_stream_wait: by a doorbell word
                   (stream memory operations, the engine's handoff)
  share_0          the same with no miss: what the path costs a layer that gives the CPU nothing
  share_*_{0,1}_torch_pack  the same with the GPU's bookkeeping as torch ops (share.pack_share_torch) instead of
                   the Triton kernel (hybrid/kernels/triton_hybrid.py)
  direct           the same kernel's call on the main thread (perf_counter), other experts each time
  split_{pages}_{n}  a whole ratio-0 layer step: n of 8 misses on the CPU (numba, stream_wait) while the GPU reads
                   the other 8 - n in place with the fused kernel, from a host tier on 2 MiB pages (huge) or 4 KiB
                   pages (small): the two share host DRAM, as tune_split's table at load shows
Usage, from the repository root: python -m bench.hybrid_latency --out bench/results/<date>-h200-hybrid-latency.json
    [--switch-interval S] (the GIL switch interval: how long a Python host function waits while the launching
    thread runs Python)
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from bench.common import machine, utc_now, versions, write_report
from moe_offload.hybrid.cpu_experts import CpuExperts
from moe_offload.hybrid.driver import HostFunction, NativeHostFunction, stream_wait_available
from moe_offload.hybrid.share import CpuShare, pack_share_torch
from moe_offload.hybrid.tuning import cpu_expert_kernels
from moe_offload.expert_format import ExpertFormat
from moe_offload.tiers import HostTier


def graph_time(body, repeats: int, before=None, busy: bool = False) -> float:
    """Median seconds of replaying a graph of body(); before() runs ahead of each replay (outside the timing)."""
    body()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        graph.replay()
        end.record()
        if busy:
            while not end.query():
                pass
        else:
            end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def anon_huge_bytes() -> int:
    """The system's AnonHugePages (/proc/meminfo): anonymous memory mapped with huge pages."""
    for line in read_text("/proc/meminfo").splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1]) * 1024
    return 0


def host_tier(args, huge_pages: bool) -> HostTier:
    """A pinned host tier of args.experts random bf16 experts."""
    tier = HostTier(list(range(args.experts)), ExpertFormat(args.inter, args.hidden, torch.bfloat16), pin=True,
                    huge_pages=huge_pages)
    generator = torch.Generator().manual_seed(0)
    for pool in (tier.gate_up, tier.down):
        for row in pool:  # [2I, H] or [H, I], one expert at a time (bounded scratch)
            row.copy_(torch.randn(row.shape, generator=generator) * 0.02)
    return tier


def split_time(tier: HostTier, runner: CpuExperts, on_cpu: int, hidden, weights, from_host, ids, rotate,
               args) -> float:
    """Median seconds of a decode layer step with `on_cpu` of the K misses on the CPU (stream_wait) and the rest
    read in place by the fused kernel from the same tier, as OffloadedExperts._forward_hybrid runs a ratio-0
    layer."""
    from moe_offload.kernels.triton_moe import fused_moe

    device, top_k = hidden.device, ids.shape[1]
    share = CpuShare(tier, args.experts, top_k, args.hidden, [min(on_cpu, m) for m in range(top_k + 1)], runner,
                     device)
    share.use_stream_wait()
    # an empty device pool: one row of the host tier's format, so both pools have the strides the kernel shares
    empty = tier.format.weights(torch.zeros((1, tier.format.row_bytes), dtype=torch.uint8, device=device))
    empty_gate_up, empty_down = empty.gate_up, empty.down  # [1, 2I, H], [1, H, I]
    slots = torch.arange(1, args.experts + 2, dtype=torch.int32, device=device)  # [E + 1]: expert e at host row e
    slots[-1] = -1  # id E: a pair the CPU computes
    contrib = torch.zeros((top_k, args.hidden), device=device)  # [K, H] float32

    def gpu_share(gpu_ids):  # [1, K]
        return fused_moe(hidden, gpu_ids, weights, empty_gate_up, empty_down, slots, contrib=contrib,
                         host_w13=tier.gate_up, host_w2=tier.down)

    def forward():
        share.forward(hidden, ids, weights, from_host, gpu_share, F.silu)

    seconds = graph_time(forward, args.repeats, before=rotate)
    share.check()
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--experts", type=int, default=96, help="host-tier experts (rotated, so caches stay cold)")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--inter", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default torch's count)")
    parser.add_argument("--kernels", default="", help="comma-separated CPU kernels to time (default: all)")
    parser.add_argument("--pages", default="huge,small", help="host-tier page sizes for the split section")
    parser.add_argument("--splits", default="0,2,3,4,5,6,8", help="CPU shares of 8 misses for the split section")
    parser.add_argument("--switch-interval", type=float, default=None,
                        help="sys.setswitchinterval(S) first: how long a Python host function may wait for the GIL "
                             "while the launching thread runs Python (Python's default 0.005 s)")
    args = parser.parse_args()
    if args.switch_interval is not None:
        if not args.switch_interval > 0:
            parser.error(f"--switch-interval must be a positive number of seconds, got {args.switch_interval}")
        sys.setswitchinterval(args.switch_interval)
    device = torch.device("cuda")
    top_k, hidden_size = 8, args.hidden
    report = {"date": utc_now(), "machine": machine(), "versions": versions(), "shape": vars(args),
              "switch_interval_s": sys.getswitchinterval(), "seconds": {}}
    seconds = report["seconds"]

    # the copies and host node of a CPU share, around a no-op
    packed = torch.zeros(hidden_size + 2 * top_k, device=device)
    mailbox = torch.zeros(hidden_size + 2 * top_k).pin_memory()
    out_host = torch.zeros(top_k * hidden_size).pin_memory()
    out = torch.zeros(top_k * hidden_size, device=device)
    side = torch.cuda.Stream()
    libc = ctypes.CDLL(None)
    c_noop = ctypes.cast(libc.free, ctypes.c_void_p).value  # free(NULL) does nothing

    def round_trip(launch):
        def body():
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                mailbox.copy_(packed, non_blocking=True)
                launch()
                out.copy_(out_host, non_blocking=True)
            torch.cuda.current_stream().wait_stream(side)
        return body

    c_host_function = NativeHostFunction(c_noop, 0)  # a C function: free(NULL)

    python_noop = HostFunction(lambda: None)
    seconds["host_node_c"] = graph_time(round_trip(lambda: c_host_function.launch(side)), args.repeats)
    seconds["host_node_python"] = graph_time(round_trip(lambda: python_noop.launch(side)), args.repeats)
    seconds["python_busy"] = graph_time(round_trip(lambda: python_noop.launch(side)), args.repeats, busy=True)
    print({k: f"{v * 1e3:.3f} ms" for k, v in seconds.items()}, flush=True)

    tiers, report["anon_huge_pages_bytes_added"] = {}, {}
    for pages in args.pages.split(","):
        before = anon_huge_bytes()
        tiers[pages] = host_tier(args, pages == "huge")
        report["anon_huge_pages_bytes_added"][pages] = anon_huge_bytes() - before
    report["huge_pages_advised"] = {pages: tier.huge_pages for pages, tier in tiers.items()}
    report["transparent_hugepage"] = read_text("/sys/kernel/mm/transparent_hugepage/enabled")
    tier = next(iter(tiers.values()))
    generator = torch.Generator().manual_seed(0)
    hidden = (torch.randn(1, hidden_size, generator=generator) * 0.1).to(torch.bfloat16).to(device)  # [1, H]
    weights = torch.full((1, top_k), 1.0 / top_k, device=device)  # [1, K]
    from_host = torch.ones((1, top_k), dtype=torch.long, device=device)  # [1, K]: every pair a miss
    ids = torch.zeros((1, top_k), dtype=torch.long, device=device)  # [1, K]
    cursor = [0]

    def rotate():  # other experts each replay
        ids.copy_(torch.tensor([[(cursor[0] + k) % args.experts for k in range(top_k)]]))
        cursor[0] += top_k

    zeros = torch.zeros((top_k, hidden_size), device=device)
    threads = args.threads or torch.get_num_threads()
    kernels = [k for k in cpu_expert_kernels(torch.bfloat16, F.silu) if not args.kernels or k in args.kernels]
    runners = {kernel: CpuExperts(threads=threads, compute=kernel) for kernel in kernels}
    handoffs = {kernel: [""] for kernel in runners}
    if "numba" in runners:
        refused = stream_wait_available(device)
        report["stream_wait_refused"] = refused
        if refused is None:
            handoffs["numba"].append("_stream_wait")
    none_missing = torch.zeros((1, top_k), dtype=torch.long, device=device)  # [1, K]
    for kernel, runner in runners.items():
        for handoff in handoffs[kernel]:
            for n in (0, 1, 2, 4, 8):
                share = CpuShare(tier, args.experts, top_k, hidden_size, [min(n, m) for m in range(top_k + 1)],
                                 runner, device)
                if handoff:
                    share.use_stream_wait()
                misses = from_host if n else none_missing

                def forward():
                    share.forward(hidden, ids, weights, misses, lambda gpu_ids: zeros, F.silu)

                name = f"share_{kernel}{handoff}_{n}"
                seconds[name] = graph_time(forward, args.repeats, before=rotate)
                seconds[f"{name}_busy"] = graph_time(forward, args.repeats, before=rotate, busy=True)
                if n in (0, 1) and share._pack is not pack_share_torch:  # the bookkeeping as ~16 torch launches
                    share._pack = pack_share_torch
                    seconds[f"{name}_torch_pack"] = graph_time(forward, args.repeats, before=rotate)
                share.check()
                print(name, f"{seconds[name] * 1e3:.3f} ms ({seconds[f'{name}_busy'] * 1e3:.3f} ms busy)",
                      f"torch pack {seconds.get(f'{name}_torch_pack', float('nan')) * 1e3:.3f} ms", flush=True)
    if "numba" in runners and handoffs["numba"][-1] == "_stream_wait":
        for pages, split_tier in tiers.items():
            for n in (int(x) for x in args.splits.split(",")):
                name = f"split_{pages}_{n}"
                try:
                    seconds[name] = split_time(split_tier, runners["numba"], n, hidden, weights, from_host, ids,
                                               rotate, args)
                except Exception as err:  # keep the other sections' numbers
                    report.setdefault("errors", {})[name] = f"{type(err).__name__}: {err}"
                    print(name, report["errors"][name], flush=True)
                    continue
                print(name, f"{seconds[name] * 1e3:.3f} ms", flush=True)
    for kernel, runner in runners.items():
        for n in (1, 2, 4, 8):
            host_hidden = hidden.cpu().expand(n, hidden_size)
            scratch = torch.empty((n, hidden_size))
            times = []
            torch.set_num_threads(threads)
            for _ in range(args.repeats):
                rows = [(cursor[0] + k) % args.experts for k in range(n)]
                cursor[0] += n
                start = time.perf_counter()
                runner(host_hidden, torch.full((n,), 0.125), tier.gate_up, tier.down, rows, [1] * n, F.silu,
                       scratch)
                times.append(time.perf_counter() - start)
            seconds[f"direct_{kernel}_{n}"] = statistics.median(times)
            print(kernel, n, f"direct {seconds[f'direct_{kernel}_{n}'] * 1e3:.3f} ms", flush=True)
        runner.close()
    try:
        import numba
        report["versions"]["numba"] = numba.__version__
    except ImportError:
        pass
    write_report(args.out, report)
    print(json.dumps(report["seconds"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
