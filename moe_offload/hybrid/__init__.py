"""Hybrid decode (MOE_CPU_EXPERTS): a zero-copy layer's missed experts split between the CPU and the GPU, both
working at once. The engine's one door to it: enable at load, check_decodes once the decoder exists,
raise_errors after each generation, summary for the stats; cache.OffloadedExperts holds each layer's CpuShare.

Why: the GPU reads experts left in pinned host memory over PCIe, and the CPU can compute one-token experts from
that same memory with the numba kernel at a comparable rate (tens of GB/s each on a GPU server). Together they
can move more bytes per second than either alone, up to what the host DRAM gives.
In a one-token decode step a layer's misses are split by count: n_cpu of them, those whose experts were used
least recently, are computed on the CPU where their weights lie (share.py), the rest are read in place by the
GPU kernels; hits stay on the GPU. n_cpu per miss count, and the CPU kernel, are measured at load, and kept only
if whole decodes then run faster (tuning.py). With every routed expert offloaded (ratio 0), where the GPU alone
is PCIe-bound, the decode check has found the path clearly faster than none.

Layout: driver.py (the CUDA driver calls torch does not bind), share.py (one layer's CPU share and the GPU's
packing of it), cpu_experts.py (the CPU kernel runner), tuning.py (all load-time measurement), kernels/ (numba
CPU kernels, their spinning threads and doorbell server, the Triton pack).
"""

from __future__ import annotations

from typing import Any

import torch

from . import driver
from .cpu_experts import CpuExperts
from .share import CpuShare
from .tuning import all_on_cpu, check_on_decode, cpu_expert_kernels, tune_cpu_path

__all__ = ["CpuExperts", "CpuShare", "check_decodes", "enable", "raise_errors", "summary"]


def enable(runtimes: list, sites: list, config, device: torch.device) -> dict[str, Any] | None:
    """Hybrid decode in every zero-copy layer of `runtimes` (cache.OffloadedExperts, with their
    integration.ExpertsSite), one CPU kernel and split table for all, as config.moe_cpu_experts says: "all" =
    every miss on the CPU with the preferred kernel; "auto" (CUDA only: on a CPU device every expert already runs
    on the CPU) = kernel and table measured on the first such layer. On CUDA the CPU is handed its share through
    the doorbell, or through host functions where the driver refuses stream memory operations. Returns
    summary(runtimes), or None where nothing was enabled."""
    mode = config.moe_cpu_experts
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    # By default two cores left: one for the launching thread (it spin-waits on most syncs, and sleeps through
    # graph-replayed decode steps), one for everything else; the thread that drives the pool (the doorbell server,
    # or the driver's callback thread) is one of the `threads`, and a parallel loop runs at its slowest thread's
    # pace: taking those last two cores too made a layer's CPU share slower, not faster.
    threads = config.moe_cpu_threads or max(1, torch.get_num_threads() - 2)
    kernels = cpu_expert_kernels(runtimes[0].gate_up.dtype, sites[0].module.act_fn)
    # "all" runs the preferred kernel; "auto" measures each (building a numba runner compiles its kernel)
    runners = {kernel: CpuExperts(threads=threads, compute=kernel) for kernel in
               (kernels if mode == "auto" else kernels[:1])}
    runner = runners[kernels[0]]
    layers = [(r, s) for r, s in zip(runtimes, sites) if r.enable_cpu_share(all_on_cpu(r.top_k), runner)]
    if not layers:
        return None
    if device.type == "cuda":
        refused = driver.stream_wait_available(device)
        for runtime, _site in layers:
            if refused is None:
                runtime.cpu_share.use_stream_wait()
            else:
                runtime.cpu_share.stream_wait_refused = refused
    if mode == "auto":
        first, site = layers[0]
        kernel, table, tunings = tune_cpu_path(first, site.module.act_fn, runners)
        for runtime, _site in layers:
            runtime.cpu_share.runner, runtime.cpu_share.tuning = runners[kernel], tunings
            runtime.cpu_share.set_table(table)
    return summary(runtimes)


def check_decodes(decoder, runtimes: list, config, device: torch.device, vocab_size: int) -> dict | None:
    """MOE_CPU_EXPERTS=auto on CUDA: keep the tuned split tables only if whole greedy decodes on `decoder`
    (decoding.StaticDecoder) run faster with them than without the path (tuning.check_on_decode), from a fixed
    random 16-token prompt. Returns that check's result, or None where there was nothing to check."""
    shares = [r.cpu_share for r in runtimes if r.cpu_share is not None and r.cpu_share.active]
    if config.moe_cpu_experts != "auto" or not shares or decoder is None or device.type != "cuda":
        return None
    prompt = torch.randint(0, min(vocab_size, 1000), (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return check_on_decode(decoder, shares, prompt.to(device))


def raise_errors(runtimes: list) -> None:
    """Raise what the CPU share's host functions caught since the last call (they cannot raise where they run)."""
    for runtime in runtimes:
        if runtime.cpu_share is not None:
            runtime.cpu_share.check()


def summary(runtimes: list, decode_check: dict | None = None) -> dict[str, Any]:
    """The hybrid path's entries of LLMPipeline.get_offload_stats: layers with a CPU share, their kernel, threads,
    split table and handoff, what tuning measured and what the decode check found."""
    share = next((r.cpu_share for r in runtimes if r.cpu_share is not None), None)
    return {
        "cpu_expert_layers": sum(r.cpu_share is not None for r in runtimes),
        "cpu_expert_kernel": share.runner.compute if share else None,
        "cpu_expert_threads": share.runner.threads if share else None,
        "cpu_expert_split": share.split_table if share else None,
        "cpu_expert_handoff": share.handoff if share else None,
        # MOE_CPU_EXPERTS=auto: per CPU kernel, one layer's forward timed per split (tuning.tune_split)
        "cpu_expert_tuning": share.tuning if share else None,
        # and whole decodes with the tuned tables and without the path: {"decode_tok_s": {on, off}, "kept"}
        "cpu_expert_decode_check": decode_check,
    }
