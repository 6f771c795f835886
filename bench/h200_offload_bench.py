"""Issue 4 item 4 in one run: offloaded decode/prefill on a Qwen3-30B-A3B-shaped model vs its bounds and baselines.

Phases (in this order; `--phases` picks a subset, the order stays):
  gen        the random benchmark model (bench/common.py: 12 layers of Qwen3-30B-A3B's shape, bf16, 16.2 GB),
             written on the device; skipped when the folder already holds the same model (bench_model.json).
  bw         pinned host->device (9.4 MB expert-sized pieces and one 1 GiB piece), device->device copy (bytes
             read + written), both before the runs; and, just before the disk-tier runs, O_DIRECT reads of the
             checkpoint after posix_fadvise(DONTNEED) (1 thread and 4 threads, 16 MiB reads).
  ours       LLMPipeline at each --ratios with the host tier (MOE_HOST_CACHE sized to hold every expert,
             MOE_IO=pread so loading reads the warm page cache), then at --disk-ratios with the disk tier
             (MOE_HOST_CACHE=0, MOE_IO=odirect, page cache of the checkpoint dropped before the load and before
             every measured generation), for each --kernels (MOE_KERNEL).
  baselines  transformers all on the device (grouped_mm) and accelerate device_map="auto" with the GPU memory of
             the ratio-25 host run; each in a subprocess with a hard timeout. They run after the host-tier runs
             (page cache still warm) and before the disk phase, whose time is reserved.

Measurement (the `moe-offload bench` rules, common.timed_generate): a prompt of --prompt-len random token ids
(fixed seed), greedy, exactly --decode-tokens new tokens (min_new_tokens), one warm-up generation, then --repeats
measured ones; medians. The disk tier uses --disk-decode-tokens: its misses come in bursts on few steps (98%
hits), so 15 steps gave 47.6, 46.6 and 39.2 tok/s in three runs (bench/results/archive/) and it now takes 64
tokens. Offload counters are reset when the prefill forward ends, so hit rate and bytes per token are decode-only.
Peak device memory is the caching allocator's peak (torch.cuda.max_memory_allocated), without the CUDA context.
Every generation also has a deadline (a stopping criterion), so no phase can overrun its share of --budget-s;
results are rewritten after every run, so a killed run keeps what it measured.

Derived: efficiency = (host bytes/token / pinned H2D GB/s + disk bytes/token / raw disk GB/s + ratio-100 step) /
step, with the best measured bandwidth of each link (the strictest bound); HBM floor = (non-expert bytes without
the input embedding table, of which one row is read + top-k x layers x expert bytes) / device copy bandwidth.
Routing over random weights: with the resident set static, hit rates sit near the resident share; with LRU
admission (the default) this checkpoint's greedy decode, whose routing repeats from step to step, hits far more
(bench/RESULTS.md). Neither is a trained model's routing.

Usage, from the repository root (H200, one device call; expected ~5-6 min of the 9 min --budget-s: startup 10 s,
gen 30-45 s, bw 5 s + 9 s, ours host 5 x ~20 s, baselines 40-70 s + 50-90 s, ours disk ~60 s):
  python -m bench.h200_offload_bench --out $OUT/h200.json
  python -m bench.h200_offload_bench --phases ours --ratios 10,0 --merge bench/results/<date>-h200.json --out ...
  python -m bench.h200_offload_bench --tiny --out /tmp/tiny.json      # the whole flow on the CPU, < 60 s
"""

from __future__ import annotations

import argparse
import errno
import json
import mmap
import os
import statistics
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from subprocess import TimeoutExpired

import torch

from bench.common import (GB, MODEL_ROOT, RESULTS, SPECS, STARTED, free_device, generate_model, host_tier_bytes,
                          load_pipeline, log, machine, median, model_facts, prompt_ids, run_module, shard_files,
                          timed_generate, utc_now, versions, write_report)
from moe_offload.config import OffloadConfig
from moe_offload.tiers import drop_page_cache as drop_file_cache

SCHEMA = "moe-offload/h200-offload-bench/1"
PHASES = ("gen", "bw", "ours", "baselines")
CHUNK = 16 << 20  # disk reads
EXPERT_PIECE = 3 * 768 * 2048 * 2  # one Qwen3-30B-A3B expert in bf16: 9.4 MB
# Seconds a step needs at least (skipped, and said so, when less is left) and at most (its deadline).
MIN_S = {"host": 15, "disk": 35, "disk_bw": 8, "transformers": 40, "accelerate": 60}
CAP_S = {"host": 75, "disk": 90, "transformers": 150, "accelerate": 170}
TARGETS = {"ratio100_decode_tok_s": 550, "ratio100_prefill_tok_s": 10000, "efficiency": 0.8,
           "ratio25_prefill_tok_s": 380, "ratio25_decode_vs_accelerate": 50, "peak_memory_tolerance": 0.10}


# ----------------------------------------------------------------------------------------------- bandwidths


def _timed_cuda(fn, repeats: int, stream) -> float:
    """Median seconds of fn() on `stream`, by CUDA events."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            start.record(stream)
            fn()
            end.record(stream)
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def memory_bandwidths(device: torch.device) -> dict:
    size = 1 << 30
    src = torch.empty(size, dtype=torch.uint8).pin_memory()
    src.fill_(7)
    dst = torch.empty(size, dtype=torch.uint8, device=device)
    stream = torch.cuda.Stream(device)
    pieces = size // EXPERT_PIECE

    def copy_pieces():
        for i in range(pieces):
            dst[i * EXPERT_PIECE:(i + 1) * EXPERT_PIECE].copy_(src[i * EXPERT_PIECE:(i + 1) * EXPERT_PIECE],
                                                               non_blocking=True)

    copy_pieces()  # warm-up, finished before anything is timed on `stream`
    torch.cuda.synchronize(device)
    piece_s = _timed_cuda(copy_pieces, 5, stream)
    whole_s = _timed_cuda(lambda: dst.copy_(src, non_blocking=True), 5, stream)
    other = torch.empty_like(dst)
    other.copy_(dst)
    torch.cuda.synchronize(device)
    d2d_s = _timed_cuda(lambda: other.copy_(dst), 10, stream)
    src = dst = other = None  # released before the device cache is emptied
    free_device()
    return {"h2d_pinned_9mb_gb_s": pieces * EXPERT_PIECE / piece_s / GB, "h2d_piece_bytes": EXPERT_PIECE,
            "h2d_pinned_1gb_gb_s": size / whole_s / GB,
            "d2d_copy_gb_s": 2 * size / d2d_s / GB, "d2d_rule": "1 GiB copy, bytes read + written"}


def drop_page_cache(paths: list[str]) -> None:
    for path in paths:
        drop_file_cache(path)


def _chunks(paths: list[str]) -> list[tuple[str, int]]:
    return [(p, off) for p in paths for off in range(0, os.path.getsize(p), CHUNK)]


def _parallel_read(chunks, threads: int, seconds: float, direct: bool) -> tuple[int, float, bool]:
    """Read `chunks` (path, offset) with `threads` threads until done or `seconds` pass; (bytes, seconds, direct)."""
    fds = {}
    for path in {p for p, _ in chunks}:
        try:
            fds[path] = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECT", 0) if direct else 0))
        except OSError as err:
            if not (direct and err.errno == errno.EINVAL):
                raise
            direct = False  # filesystem without O_DIRECT (tmpfs): buffered reads
            fds[path] = os.open(path, os.O_RDONLY)
    deadline = time.perf_counter() + seconds
    done = [0] * threads

    def work(thread: int) -> None:
        buffer = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT needs
        view = memoryview(buffer)
        try:
            for i in range(thread, len(chunks), threads):
                if time.perf_counter() > deadline:
                    break
                path, offset = chunks[i]
                done[thread] += os.preadv(fds[path], [view], offset)
        finally:
            view.release()
            buffer.close()

    start = time.perf_counter()
    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(work, range(threads)))
    finally:
        for fd in fds.values():
            os.close(fd)
    return sum(done), time.perf_counter() - start, direct


def disk_bandwidth(paths: list[str], seconds: float) -> dict:
    """Cold O_DIRECT reads, 16 MiB each: 1 thread from the first shards, 4 threads from the last ones (different
    bytes, so neither reads what the other brought into any cache), each at most half the checkpoint."""
    chunks = _chunks(paths)
    half = len(chunks) // 2 or 1
    drop_page_cache(paths)
    one, one_s, direct = _parallel_read(chunks[:half], 1, seconds, True)
    four, four_s, _ = _parallel_read(chunks[::-1][:half], 4, seconds, True)
    return {"disk_odirect_gb_s": one / one_s / GB, "disk_odirect_parallel_gb_s": four / four_s / GB,
            "disk_parallel_threads": 4, "disk_read_bytes": one + four, "disk_chunk_bytes": CHUNK,
            "disk_o_direct": direct}


def warm_page_cache(paths: list[str]) -> dict:
    """Buffered reads of the whole checkpoint (8 threads), so host-tier loads and baselines read RAM, not disk."""
    total, seconds, _ = _parallel_read(_chunks(paths), 8, 600, False)
    return {"bytes": total, "seconds": seconds, "gb_s": total / seconds / GB}


# ----------------------------------------------------------------------------------------------- our runs


def expected_device_bytes(facts: dict, ratio: int, staging: int, tokens: int) -> int:
    resident = OffloadConfig(moe_offload_ratio=ratio).resident_count(facts["experts_per_layer"])
    experts = facts["moe_layers"] * resident * facts["expert_bytes"]
    return facts["non_expert_bytes"] + experts + staging + facts["kv_bytes_per_token"] * tokens


def run_ours(ctx, ratio: int, tier: str, kernel: str, deadline: float) -> dict:
    facts, device, args = ctx["facts"], ctx["device"], ctx["args"]
    files = shard_files(args.model_dir)
    element = 2 if device.type == "cuda" else 4  # MOE_DTYPE auto: bf16 checkpoint dtype on CUDA, float32 on CPU
    if tier == "host":
        properties = {"MOE_HOST_CACHE": host_tier_bytes(facts, element), "MOE_IO": "pread"}
        new_tokens, repeats = args.decode_tokens, args.repeats
        warm_ids = ctx["prompt"]
    else:
        properties = {"MOE_HOST_CACHE": 0, "MOE_IO": "odirect", "MOE_CUDA_GRAPH": args.disk_graph}
        new_tokens, repeats = args.disk_decode_tokens, args.repeats
        warm_ids = ctx["prompt"][:, :2]  # streaming a whole prompt's experts from disk costs ~10 s; warm up short
        drop_page_cache(files)
    properties.update(MOE_OFFLOAD_RATIO=ratio, MOE_KERNEL=kernel)
    row = {"ratio": ratio, "tier": tier, "kernel": kernel, "properties": properties}
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    started = time.perf_counter()
    pipe = load_pipeline(args.model_dir, str(device), **properties)
    try:
        stats = pipe.get_offload_stats()
        row.update(load_s=time.perf_counter() - started, device_bytes_before_load=before,
                   device_bytes_after_load=torch.cuda.memory_allocated(device) if device.type == "cuda" else None,
                   device_staging_bytes=stats["device_staging_bytes"], host_tier_bytes=stats["host_tier_bytes"],
                   disk_io=stats["disk_io"])
        ids = ctx["prompt"].to(device)
        timed_generate(pipe.model, warm_ids.to(device), 4, device, deadline, pipe=pipe)  # 4: the graph is captured
        repeats_rows = []
        for _ in range(repeats):
            if repeats_rows and time.perf_counter() + 1.5 * repeats_rows[0]["seconds"] > deadline:
                break
            if tier == "disk":
                drop_page_cache(files)
            prefill = {}

            def after_prefill():
                prefill.update(pipe.get_offload_stats())
                pipe.reset_offload_stats()

            pipe.reset_offload_stats()
            begun = time.perf_counter()
            one = timed_generate(pipe.model, ids, new_tokens, device, deadline, after_prefill, pipe=pipe)
            decode = pipe.get_offload_stats()
            steps = max(one["decode_steps"], 1)
            # host bytes = copied + read in place by the kernel (zero-copy): both cross PCIe
            one.update(seconds=time.perf_counter() - begun, hit_rate=decode["hit_rate"],
                       prefill_hit_rate=prefill.get("hit_rate"),
                       prefill_bytes=sum(prefill.get("bytes_streamed", {}).values())
                       + prefill.get("bytes_read_in_place", 0),
                       host_bytes_per_token=(decode["bytes_streamed"]["host"] + decode["bytes_read_in_place"]) / steps,
                       in_place_bytes_per_token=decode["bytes_read_in_place"] / steps,
                       disk_bytes_per_token=decode["bytes_streamed"]["disk"] / steps,
                       zero_copy_layers=decode["zero_copy_layers"], cuda_graph_steps=decode["cuda_graph_steps"],
                       cuda_graph_failure=decode["cuda_graph_failure"],
                       piecewise_hits_graphs=decode.get("piecewise_hits_graphs"),
                       zero_copy_prefill_max_tokens=decode.get("zero_copy_prefill_max_tokens"))
            repeats_rows.append(one)
        # the streaming scratch is allocated on first use: by a prefill that copies its misses, not at load
        staging_now = pipe.get_offload_stats()["device_staging_bytes"]
        row["device_staging_bytes"] = max(row["device_staging_bytes"], staging_now)
    finally:
        pipe.close()
        pipe = None
        free_device()
    keys = ("decode_tok_s", "prefill_tok_s", "ttft_s", "hit_rate", "prefill_hit_rate", "prefill_bytes",
            "host_bytes_per_token", "in_place_bytes_per_token", "disk_bytes_per_token", "step_ms_median")
    for key in ("zero_copy_layers", "cuda_graph_steps", "cuda_graph_failure", "piecewise_hits_graphs",
                "zero_copy_prefill_max_tokens"):
        row[key] = repeats_rows[-1][key] if repeats_rows else None
    row.update({k: median([r[k] for r in repeats_rows]) for k in keys})
    row["bytes_per_token"] = row["host_bytes_per_token"] + row["disk_bytes_per_token"]
    peaks = [r["peak_device_bytes"] for r in repeats_rows if r["peak_device_bytes"] is not None]
    row["peak_device_bytes"] = max(peaks) if peaks else None
    row["expected_device_bytes"] = expected_device_bytes(facts, ratio, row["device_staging_bytes"],
                                                         ids.shape[1] + new_tokens)
    row.update(prompt_tokens=int(ids.shape[1]), new_tokens_asked=new_tokens, repeats=repeats_rows,
               efficiency=None)
    return row


# ----------------------------------------------------------------------------------------------- baselines


def baseline_worker(spec: dict) -> int:
    """Runs in a subprocess: load one baseline, warm up, measure; results (and partial ones) to spec['out']."""
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    device = torch.device(spec["device"])
    deadline = time.perf_counter() + spec["seconds"]
    result: dict = {"kind": spec["kind"]}

    def save() -> None:
        with open(spec["out"], "w") as handle:
            json.dump(result, handle)

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if spec["kind"] == "transformers":
        kwargs = dict(device_map=str(device), experts_implementation=spec["experts"])
    else:
        kwargs = dict(device_map="auto", max_memory={0: spec["gpu_bytes"], "cpu": "120GiB"})
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["path"], dtype=dtype, **kwargs).eval()
    result.update(load_s=time.perf_counter() - started,
                  experts_implementation=getattr(model.config, "_experts_implementation", None),
                  device_bytes_after_load=torch.cuda.memory_allocated(device) if device.type == "cuda" else None)
    placement = getattr(model, "hf_device_map", None) or {}
    if spec["kind"] == "accelerate":
        result["device_map_counts"] = {str(d): sum(1 for v in placement.values() if v == d)
                                       for d in set(placement.values())}
        result["gpu_bytes_budget"] = spec["gpu_bytes"]
    save()
    ids = prompt_ids(model.config.vocab_size, spec["prompt_len"]).to(device)
    if spec["warm_up"]:
        timed_generate(model, ids, 2, device, deadline)
    runs = []
    for _ in range(spec["repeats"]):
        if time.perf_counter() > deadline:
            break
        runs.append(timed_generate(model, ids, spec["new_tokens"], device, deadline))
        result.update({k: median([r[k] for r in runs]) for k in ("decode_tok_s", "prefill_tok_s", "ttft_s")},
                      peak_device_bytes=max((r["peak_device_bytes"] or 0) for r in runs) or None, runs=runs)
        save()
    return 0


def run_baseline(ctx, kind: str, seconds: float, gpu_bytes: int | None = None) -> dict:
    args = ctx["args"]
    out = os.path.join(os.path.dirname(os.path.abspath(args.out)), f".{kind}-baseline.json")
    if os.path.exists(out):
        os.remove(out)
    spec = {"kind": kind, "path": args.model_dir, "device": str(ctx["device"]), "experts": args.baseline_experts,
            "gpu_bytes": gpu_bytes, "prompt_len": args.prompt_len, "seconds": max(seconds - 5, 5), "out": out,
            "new_tokens": args.decode_tokens if kind == "transformers" else args.accelerate_tokens,
            "repeats": 2 if kind == "transformers" else 1, "warm_up": kind == "transformers"}
    started = time.perf_counter()
    error = None
    try:
        done = run_module(__spec__.name, ["--worker", json.dumps(spec)], timeout=seconds)
        if done.returncode:
            error = f"worker exited with status {done.returncode}"
    except TimeoutExpired:
        error = f"timed out after {seconds:.0f} s"
    result = {}
    if os.path.exists(out):
        with open(out) as handle:
            result = json.load(handle)
        os.remove(out)
    result.update(seconds=time.perf_counter() - started, error=error)
    return result


# ----------------------------------------------------------------------------------------------- derived


def _find(runs, ratio, tier, kernel):
    return next((r for r in runs if (r["ratio"], r["tier"], r["kernel"]) == (ratio, tier, kernel)
                 and r.get("decode_tok_s")), None)


def _best(*values):
    values = [v for v in values if v]
    return max(values) if values else None


def efficiency(run: dict, step100_s: float | None, h2d_gb_s: float | None, disk_gb_s: float | None):
    """(host bytes/token / H2D + disk bytes/token / disk + ratio-100 step) / measured step."""
    if not run.get("decode_tok_s") or step100_s is None:
        return None
    bound = step100_s
    links = ((run.get("host_bytes_per_token"), h2d_gb_s), (run.get("disk_bytes_per_token"), disk_gb_s))
    for nbytes, bandwidth in links:
        if nbytes:
            if not bandwidth:
                return None
            bound += nbytes / (bandwidth * GB)
    return bound * run["decode_tok_s"]


def derive(report: dict) -> dict:
    """Recompute every derived figure from the raw ones (so merged partial reports stay consistent)."""
    bw, facts, runs = report.get("bandwidth", {}), report.get("model", {}), report.get("runs", [])
    h2d = _best(bw.get("h2d_pinned_9mb_gb_s"), bw.get("h2d_pinned_1gb_gb_s"))
    disk = _best(bw.get("disk_odirect_gb_s"), bw.get("disk_odirect_parallel_gb_s"))
    report["efficiency_bandwidths"] = {"h2d_gb_s": h2d, "disk_gb_s": disk,
                                       "rule": "the best measured bandwidth of each link (the strictest bound)"}
    if facts:
        floor = (facts["non_expert_bytes"] - facts["input_embedding_bytes"] + facts["config"]["hidden_size"] * 2
                 + facts["experts_per_token"] * facts["moe_layers"] * facts["expert_bytes"])
        report["hbm_floor_bytes_per_token"] = floor
        report["hbm_floor_s_per_token"] = floor / (bw["d2d_copy_gb_s"] * GB) if bw.get("d2d_copy_gb_s") else None
    for run in runs:
        step100 = _find(runs, 100, "host", run["kernel"]) or _find(runs, 100, "disk", run["kernel"])
        run["efficiency"] = efficiency(run, 1 / step100["decode_tok_s"] if step100 else None, h2d, disk)
        peak, expected = run.get("peak_device_bytes"), run.get("expected_device_bytes")
        run["peak_vs_expected"] = peak / expected if peak and expected else None
    accel = (report.get("baselines") or {}).get("accelerate_tok_s")
    targets = []

    def add(name, kernel, value, threshold, met=None):
        if met is None and value is not None:
            met = value >= threshold
        targets.append({"target": name, "kernel": kernel, "value": value, "threshold": threshold, "met": met})

    for kernel in sorted({r["kernel"] for r in runs}):
        r100, r25 = _find(runs, 100, "host", kernel), _find(runs, 25, "host", kernel)
        add("ratio100_decode_tok_s", kernel, r100 and r100["decode_tok_s"], TARGETS["ratio100_decode_tok_s"])
        add("ratio100_prefill_tok_s", kernel, r100 and r100["prefill_tok_s"], TARGETS["ratio100_prefill_tok_s"])
        for ratio, tier in ((50, "host"), (25, "host"), (10, "host"), (25, "disk")):
            run = _find(runs, ratio, tier, kernel)
            add(f"efficiency_ratio{ratio}_{tier}", kernel, run and run["efficiency"], TARGETS["efficiency"])
        add("ratio25_prefill_tok_s", kernel, r25 and r25["prefill_tok_s"], TARGETS["ratio25_prefill_tok_s"])
        add("ratio25_decode_vs_accelerate", kernel, r25 and accel and r25["decode_tok_s"] / accel,
            TARGETS["ratio25_decode_vs_accelerate"])
        for run in (r for r in runs if r["kernel"] == kernel):
            value = run.get("peak_vs_expected")
            add(f"peak_memory_ratio{run['ratio']}_{run['tier']}", kernel, value, 1 + TARGETS["peak_memory_tolerance"],
                None if value is None else abs(value - 1) <= TARGETS["peak_memory_tolerance"])
    report["targets"] = targets
    report["targets_rule"] = ("value >= threshold; peak memory: |peak / (non-expert + resident experts + staging + "
                              "KV cache) - 1| <= 0.10")
    return report


def save_report(report: dict, path: str) -> None:
    derive(report)
    write_report(path, report)


def print_table(report: dict) -> None:
    def fmt(value, spec, scale=1.0):
        return "-" if value is None else format(value * scale, spec)

    print("\nratio tier kernel  decode tok/s  prefill tok/s  ttft ms  peak GiB  hit %  MB/token  efficiency")
    for r in report["runs"]:
        print(f"{r['ratio']:>5} {r['tier']:4} {r['kernel']:6} {fmt(r.get('decode_tok_s'), '13.1f')} "
              f"{fmt(r.get('prefill_tok_s'), '14.0f')} {fmt(r.get('ttft_s'), '8.1f', 1000)} "
              f"{fmt(r.get('peak_device_bytes'), '9.2f', 2**-30)} {fmt(r.get('hit_rate'), '6.1f', 100)} "
              f"{fmt(r.get('bytes_per_token'), '9.1f', 1e-6)} "
              f"{fmt(r.get('efficiency'), '11.2f')}" + (f"  ERROR {r['error']}" if r.get("error") else ""))
    bw, base = report.get("bandwidth", {}), report.get("baselines", {})
    print("bandwidth GB/s: " + ", ".join(f"{k[:-5]} {v:.2f}" for k, v in bw.items() if k.endswith("_gb_s") and v))
    print(f"HBM floor: {fmt(report.get('hbm_floor_s_per_token'), '.3f', 1000)} "
          f"ms/token; baselines tok/s: transformers {fmt(base.get('transformers_grouped_mm_tok_s'), '.2f')}, "
          f"accelerate {fmt(base.get('accelerate_tok_s'), '.3f')}")
    for t in report["targets"]:
        mark = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
        print(f"  {mark:6} {t['target']:32} {t['kernel']:6} {fmt(t['value'], '.3f'):>10} (threshold {t['threshold']})")
    print("phases: " + ", ".join(f"{k} {v.get('status')} {v.get('seconds', 0):.0f}s"
                                 for k, v in report["phases"].items()))


# ----------------------------------------------------------------------------------------------- driver


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="JSON report (default bench/results/<UTC date>-h200.json)")
    parser.add_argument("--merge", default=None, help="start from this earlier report; runs measured now replace "
                                                      "runs of the same (ratio, tier, kernel)")
    parser.add_argument("--model-dir", default=None, help="where the random model is (or is written); default "
                                                          "/tmp/moe-offload-bench/<full|tiny>")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    parser.add_argument("--ratios", default="100,50,25,10,0", help="host-tier MOE_OFFLOAD_RATIO values")
    parser.add_argument("--disk-ratios", default="25", help="disk-tier ratios ('' for none)")
    parser.add_argument("--disk-graph", default="auto", choices=["auto", "off"],
                        help="MOE_CUDA_GRAPH for the disk tier (auto: graph segments around its layers; off: eager)")
    parser.add_argument("--kernels", default="auto", help="MOE_KERNEL values, e.g. auto (triton on CUDA),torch")
    parser.add_argument("--decode-tokens", type=int, default=64, help="new tokens per generation (host tier)")
    parser.add_argument("--disk-decode-tokens", type=int, default=64, help="new tokens per disk-tier generation")
    parser.add_argument("--accelerate-tokens", type=int, default=6)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="measured generations per host-tier run (median)")
    parser.add_argument("--baseline-experts", default="grouped_mm", help="transformers experts_implementation")
    parser.add_argument("--budget-s", type=float, default=540, help="wall-clock budget of the whole script")
    parser.add_argument("--tiny", action="store_true", help="the whole flow on the CPU with a tiny model")
    parser.add_argument("--layers", type=int, default=None, help="override the model's layer count (default 12; "
                                                                 "tiny 2)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.phases = [p for p in args.phases.split(",") if p]
    unknown = set(args.phases) - set(PHASES)
    if unknown:
        parser.error(f"unknown phases {sorted(unknown)}; choose from {','.join(PHASES)}")
    args.ratios = [int(r) for r in args.ratios.split(",") if r.strip()]
    args.disk_ratios = [int(r) for r in args.disk_ratios.split(",") if r.strip()]
    args.kernels = [k for k in args.kernels.split(",") if k]
    if args.tiny:
        for name, value in (("decode_tokens", 8), ("disk_decode_tokens", 4), ("prompt_len", 32), ("repeats", 2)):
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    spec = "tiny" if args.tiny else "full"
    args.spec = dict(SPECS[spec], **({"num_hidden_layers": args.layers} if args.layers else {}))
    args.model_dir = args.model_dir or os.path.join(MODEL_ROOT, spec)
    date = utc_now()[:10]
    args.out = args.out or os.path.join(RESULTS, f"{date}-{'cpu-tiny' if args.tiny else 'h200'}.json")
    return args


def new_report(args, device: torch.device) -> dict:
    report = {"schema": SCHEMA, "phases": {}, "bandwidth": {}, "runs": [], "baselines": {}}
    if args.merge:
        with open(args.merge) as handle:
            report.update(json.load(handle))
    from importlib.metadata import PackageNotFoundError, version

    extra: dict = {"cuda": torch.version.cuda}
    for package in ("accelerate", "safetensors", "triton"):
        try:
            extra[package] = version(package)
        except PackageNotFoundError:
            extra[package] = None
    info = machine()
    if device.type == "cuda":
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    try:
        with open("/proc/meminfo") as handle:
            info["ram_bytes"] = int(handle.readline().split()[1]) * 1024
    except OSError:
        pass
    report.update(date_utc=utc_now(), machine=info, versions={**versions(), **extra}, device=str(device),
                  mode="tiny" if args.tiny else "full",
                  args={k: v for k, v in vars(args).items() if k != "worker"},
                  notes=["weights: every tensor its own seeded N(0, 0.02) draw, norms ones; random-weight routing, "
                         "which repeats from decode step to decode step on this checkpoint (bench/RESULTS.md): not "
                         "a trained model's routing, and not a worst case for a cache",
                         "host tier: MOE_HOST_CACHE holds every expert (an evicted load-time resident expert must "
                         "come back from RAM, not disk); MOE_IO=pread for loading from the warm page cache",
                         "disk tier: MOE_HOST_CACHE=0, MOE_IO=odirect, posix_fadvise(DONTNEED) on every shard before "
                         "the load and before each measured generation",
                         "bytes_per_token and hit_rate are decode-only (counters reset after the prefill forward)"])
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.tiny or (args.worker and json.loads(args.worker)["device"] == "cpu"):
        torch.set_num_threads(1)  # tiny GEMMs gain nothing from threads, and spinning ones stall on a busy CPU
    if args.worker:
        return baseline_worker(json.loads(args.worker))
    device = torch.device("cpu" if args.tiny else "cuda")
    end = STARTED + args.budget_s
    report = new_report(args, device)
    ctx = {"args": args, "device": device}

    def left() -> float:
        return end - time.perf_counter()

    def phase(name: str, fn) -> None:
        started = time.perf_counter()
        try:
            result = fn()
            status = "done" if result is None else result
        except Exception as err:  # keep what the other phases measure
            traceback.print_exc()
            status = f"error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        report["phases"][name] = {"status": status, "seconds": time.perf_counter() - started}
        log(f"phase {name}: {status} ({time.perf_counter() - started:.1f} s)")
        save_report(report, args.out)

    if "gen" in args.phases:
        def gen():
            report["model_generation"] = generate_model(args.model_dir, args.spec, device)
            free_device()
        phase("gen", gen)
    if not os.path.isfile(os.path.join(args.model_dir, "bench_model.json")):
        log(f"no model in {args.model_dir}: run the gen phase first")
        return 1
    report["model"] = ctx["facts"] = model_facts(args.model_dir)
    ctx["prompt"] = prompt_ids(ctx["facts"]["config"]["vocab_size"], args.prompt_len)
    files = shard_files(args.model_dir)
    do_disk = "ours" in args.phases and args.disk_ratios
    disk_reserve = (MIN_S["disk_bw"] + MIN_S["disk"] * len(args.disk_ratios) * len(args.kernels)) if do_disk else 0

    if "bw" in args.phases:
        phase("bw_memory", lambda: report["bandwidth"].update(memory_bandwidths(device)) if device.type == "cuda"
              else "skipped: no CUDA device")
    if "ours" in args.phases or "baselines" in args.phases:
        phase("warm_page_cache", lambda: report.update(page_cache_warm=warm_page_cache(files)))

    def measure(ratio, tier, kernel, reserve):
        key = (ratio, tier, kernel)
        report["runs"] = [r for r in report["runs"] if (r["ratio"], r["tier"], r["kernel"]) != key]
        if left() - reserve < MIN_S[tier]:
            row = {"ratio": ratio, "tier": tier, "kernel": kernel, "error": "skipped: time budget"}
        else:
            deadline = time.perf_counter() + min(CAP_S[tier], left() - reserve)
            try:
                row = run_ours(ctx, ratio, tier, kernel, deadline)
            except Exception as err:
                traceback.print_exc()
                free_device()
                row = {"ratio": ratio, "tier": tier, "kernel": kernel, "error": f"{type(err).__name__}: {err}"}
        report["runs"].append(row)
        log(f"ours ratio {ratio} {tier} {kernel}: " + (row.get("error") or (
            f"decode {row['decode_tok_s'] or 0:.1f} tok/s, prefill {row['prefill_tok_s']:.0f} tok/s, "
            f"ttft {row['ttft_s']:.3f} s, hit {row['hit_rate'] or 0:.2f}, {row['bytes_per_token'] / 1e6:.1f} MB/token, "
            f"load {row['load_s']:.1f} s")))
        save_report(report, args.out)

    if "ours" in args.phases:
        def host_runs():
            for kernel in args.kernels:
                for ratio in args.ratios:
                    measure(ratio, "host", kernel, disk_reserve)
        phase("ours_host", host_runs)

    if "baselines" in args.phases:
        def baselines():
            base = report.setdefault("baselines", {})
            budget = left() - disk_reserve
            if budget < MIN_S["transformers"]:
                return "skipped: time budget"
            share = min(CAP_S["transformers"], budget * 0.45 if device.type == "cuda" else budget)
            base["transformers"] = run_baseline(ctx, "transformers", share)
            base["transformers_grouped_mm_tok_s"] = base["transformers"].get("decode_tok_s")
            save_report(report, args.out)
            if device.type != "cuda":
                base["accelerate"], base["accelerate_tok_s"] = {"error": "skipped: needs a CUDA device"}, None
                return None
            r25 = next((r for r in report["runs"] if r["ratio"] == 25 and r["tier"] == "host"
                        and r.get("peak_device_bytes")), None)
            gpu_bytes = r25["peak_device_bytes"] if r25 else expected_device_bytes(
                ctx["facts"], 25, ctx["facts"]["staging_bytes"], args.prompt_len + args.decode_tokens)
            budget = left() - disk_reserve
            if budget < MIN_S["accelerate"]:
                base["accelerate"], base["accelerate_tok_s"] = {"error": "skipped: time budget"}, None
                return None
            base["accelerate"] = run_baseline(ctx, "accelerate", min(CAP_S["accelerate"], budget), gpu_bytes)
            base["accelerate"]["gpu_bytes_source"] = "ratio-25 host run peak" if r25 else "expected ratio-25 bytes"
            base["accelerate_tok_s"] = base["accelerate"].get("decode_tok_s")
            return None
        phase("baselines", baselines)

    if "bw" in args.phases:
        phase("bw_disk", lambda: report["bandwidth"].update(disk_bandwidth(files, 4.0)) if left() > MIN_S["disk_bw"]
              else "skipped: time budget")
    if do_disk:
        def disk_runs():
            for kernel in args.kernels:
                for ratio in args.disk_ratios:
                    measure(ratio, "disk", kernel, 0)
        phase("ours_disk", disk_runs)

    save_report(report, args.out)
    print_table(report)
    log(f"report -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
