"""Hybrid decode (MOE_CPU_EXPERTS): a zero-copy layer's missed experts split between the CPU and the GPU, both
working at once. The engine's one door to it: enable at load (unsupported: why it cannot take a model's
experts), check_decodes once the decoder exists (check_again where the routing changed since), raise_errors
after each generation, summary for the stats; cache.OffloadedExperts holds each layer's CpuShare.

Why: the GPU reads experts left in pinned host memory over PCIe, and the CPU can compute one-token experts from
that same memory with the numba kernel at a comparable rate (tens of GB/s each on a GPU server). Together they
can move more bytes per second than either alone, up to what the host DRAM gives.
In a one-token decode step a layer's misses are split by count: n_cpu of them, those whose experts were used
least recently, are computed on the CPU where their weights lie (share.py), the rest are read in place by the
GPU kernels; hits stay on the GPU. n_cpu per miss count, and the CPU kernel, are measured at load, and kept only
if whole decodes then run faster (tuning.py). With every routed expert offloaded (ratio 0), where the GPU alone
is PCIe-bound, the decode check has found the path clearly faster than none.

Layout: driver.py (the CUDA driver calls torch does not bind), share.py (one layer's CPU share and the GPU's
packing of it), cpu_experts.py (the CPU kernel runner), int4pack.py (torch's int4 kernel and its repacked copy),
tuning.py (all load-time measurement), kernels/ (numba CPU kernels, their spinning threads and doorbell server,
the Triton pack).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import MoeOffloadError
from ..profile import Profile, code_version, machine_key
from ..quant.fp8 import BlockFP8Spec
from . import driver, int4pack
from .cpu_experts import CpuExperts
from .share import CpuShare
from .tuning import all_on_cpu, check_on_decode, cpu_expert_kernels, tune_cpu_path

__all__ = ["CpuExperts", "CpuShare", "Tuned", "check_again", "check_decodes", "check_prompt", "enable", "raise_errors",
           "summary", "unsupported"]


@dataclass
class Tuned:
    """How MOE_CPU_EXPERTS=auto got its CPU kernel and split table at this load: measured now, or read from the
    machine's profile (profile.py), which check_decodes fills once a measured table has been judged on decodes."""

    profile: Profile
    kernel: str
    table: list[int]
    tuning: dict = field(default_factory=dict)
    from_profile: bool = False
    runner: CpuExperts | None = None  # the chosen kernel's runner, every layer's (enable sets it)

    @property
    def copy_bytes(self) -> int:
        """Host RAM the kernel holds beside the host tier (int4pack's copy, while the path is on)."""
        return self.runner.copy_bytes if self.runner is not None else 0


def enable(runtimes: list, sites: list, config, device: torch.device, model_digest: str = "",
           retune: bool = False) -> Tuned | None:
    """Hybrid decode in every zero-copy layer of `runtimes` (cache.OffloadedExperts, with their
    integration.ExpertsSite), one CPU kernel and split table for all, as config.moe_cpu_experts says: "all" =
    every miss on the CPU with the preferred kernel; "auto" (CUDA only: on a CPU device every expert already runs
    on the CPU) = kernel and table from this machine's profile for this model shape and placement
    (`model_digest`: its config.json's), else (or with `retune`) measured on the first such layer. On CUDA the
    CPU is handed its share through the doorbell, or through host functions where the driver refuses stream
    memory operations. Returns the auto mode's Tuned, else None."""
    mode = config.moe_cpu_experts
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if (refused := unsupported(runtimes)) is not None:
        if mode == "all":
            raise MoeOffloadError(f"MOE_CPU_EXPERTS=all is not possible here: {refused}")
        return None
    # By default two cores left: one for the launching thread (it spin-waits on most syncs, and sleeps through
    # graph-replayed decode steps), one for everything else; the thread that drives the pool (the doorbell server,
    # or the driver's callback thread) is one of the `threads`, and a parallel loop runs at its slowest thread's
    # pace: taking those last two cores too made a layer's CPU share slower, not faster.
    threads = config.moe_cpu_threads or max(1, torch.get_num_threads() - 2)
    fmt = runtimes[0].format  # one format for every layer (integration.engine_format)
    kernels = cpu_expert_kernels(fmt.dtype, sites[0].module.act_fn, fmt.quantized,
                                 fp8=isinstance(fmt.quant, BlockFP8Spec), int4pack=_int4pack_fits(runtimes, fmt))
    top_k = runtimes[0].top_k
    profile = stored = None
    if mode == "auto":
        placement = [[r.num_experts, r.table.capacity, len(r.host.row_of) if r.host else 0] for r in runtimes]
        dtype = fmt.describe() if fmt.quantized else str(fmt.dtype)  # e.g. "int4, group 128, ..." or torch.bfloat16
        profile = Profile({"machine": machine_key(device), "model": model_digest, "dtype": dtype,
                           "placement": placement, "threads": threads, "code": code_version()})
        if retune:
            profile.forget()
        stored = _usable(profile, kernels, top_k)
    # "all" runs the preferred kernel, a profile its stored one; measuring tries each (building a numba runner
    # compiles its kernel)
    chosen = [stored["kernel"]] if stored else kernels if mode == "auto" else kernels[:1]
    runners = {kernel: CpuExperts(threads=threads, compute=kernel) for kernel in chosen}
    runner = runners[chosen[0]]
    layers = [(r, s) for r, s in zip(runtimes, sites) if r.enable_cpu_share(all_on_cpu(top_k), runner)]
    if not layers:
        return None
    if device.type == "cuda":
        refused = driver.stream_wait_available(device)
        for runtime, _site in layers:
            if refused is None:
                runtime.cpu_share.use_stream_wait()
            else:
                runtime.cpu_share.stream_wait_refused = refused
    if mode != "auto":
        for runtime, _site in layers:
            runner.prepare(runtime.host.gate_up, runtime.host.down)
        return None
    if stored:
        tuned = Tuned(profile, stored["kernel"], stored["table"], stored.get("tuning", {}), from_profile=True)
        table = tuned.table if stored["kept"] else [0] * (top_k + 1)
    else:
        first, site = layers[0]
        if "int4pack" in runners:  # its copy of the first layer's experts, made before it is timed
            runners["int4pack"].prepare(first.host.gate_up, first.host.down)
        kernel, table, tunings = tune_cpu_path(first, site.module.act_fn, runners)
        tuned = Tuned(profile, kernel, list(table), tunings)
    for name, other in runners.items():
        if name != tuned.kernel:
            other.close()  # frees what it holds (the int4pack copy)
    runner = runners[tuned.kernel]
    for runtime, _site in layers:
        if any(table):  # the path on: every layer's copy (int4pack) now, not in a decode step
            runner.prepare(runtime.host.gate_up, runtime.host.down)
        runtime.cpu_share.runner, runtime.cpu_share.tuning = runner, tuned.tuning
        runtime.cpu_share.tuned_table = list(tuned.table)
        runtime.cpu_share.set_table(table)
    if not any(table):
        runner.release_copies()
    tuned.runner = runner
    return tuned


def _int4pack_fits(runtimes: list, fmt) -> bool:
    """Whether the int4pack kernel may be tried: experts it takes, and host RAM for its copy of every layer's host
    tier (as many bytes again as the int4 tier itself: int4pack.py)."""
    if int4pack.why_not(fmt) is not None:
        return False
    tiers = [r.host for r in runtimes if r.host is not None]
    return int4pack.fits(sum(int4pack.copy_bytes(t.gate_up) + int4pack.copy_bytes(t.down) for t in tiers))


def unsupported(runtimes: list) -> str | None:
    """Why the CPU path cannot take these layers' experts (None: it can). It takes every format the engine holds:
    dense experts, and int4/int8 quantized ones computed from their packed rows (cpu_experts.py); kept as the one
    place a format it cannot compute would be refused (MOE_CPU_EXPERTS=all: an error; auto: off, with why).
    FP8 block-quantized experts too (the numba kernel decodes their codes, cpu_numba.dot_fp8)."""
    fmt = runtimes[0].format if runtimes else None
    if fmt is not None and fmt.glu is not None:  # kernels/cpu_numba.py and cpu_experts.py compute SiLU(gate) * up
        return ("GPT-OSS's experts (biases, interleaved gate/up, clamped SwiGLU) are not in the CPU expert kernels; "
                "the GPU computes every expert")
    return None


def _usable(profile: Profile, kernels: list[str], top_k: int) -> dict | None:
    """The profile's stored result, where it is one this load can apply (else None: measure)."""
    result = (profile.stored or {}).get("result")
    if not isinstance(result, dict):
        return None
    table = result.get("table")
    if (result.get("kernel") not in kernels or not isinstance(table, list) or len(table) != top_k + 1
            or not all(isinstance(n, int) and 0 <= n <= m for m, n in enumerate(table))
            or not isinstance(result.get("kept"), bool)):
        return None
    return result


def check_decodes(decoder, runtimes: list, tuned: Tuned | None, device: torch.device, vocab_size: int) -> dict | None:
    """MOE_CPU_EXPERTS=auto on CUDA: keep the measured split tables only if whole greedy decodes on `decoder`
    (decoding.StaticDecoder) run faster with them than without the path (tuning.check_on_decode), from a fixed
    random 16-token prompt; then store the outcome in the profile. A table read from the profile was judged when
    it was measured: its check is the stored one. Returns that check's result (None: nothing was checked)."""
    if tuned is None:
        return None
    if tuned.from_profile:
        stored = tuned.profile.stored["result"]
        return {"decode_tok_s": stored.get("decode_tok_s"), "kept": stored["kept"], "source": tuned.profile.path}
    shares = [r.cpu_share for r in runtimes if r.cpu_share is not None and r.cpu_share.active]
    check = None
    if shares and decoder is not None and device.type == "cuda":
        with torch.inference_mode():
            check = check_on_decode(decoder, shares, check_prompt(vocab_size).to(device))
    kept = check["kept"] if check else any(tuned.table)
    if not kept:  # the path off: its kernel's copy is RAM for nothing (check_again makes it again)
        for runtime in runtimes:
            if runtime.cpu_share is not None:
                runtime.cpu_share.runner.release_copies()
    tuned.profile.save({"kernel": tuned.kernel, "table": tuned.table, "kept": kept,
                        "decode_tok_s": check["decode_tok_s"] if check else None, "tuning": tuned.tuning})
    return check


def check_prompt(vocab_size: int) -> torch.Tensor:
    """[1, 16] the fixed random prompt whose greedy decodes judge the CPU path (check_decodes)."""
    return torch.randint(0, min(vocab_size, 1000), (1, 16), generator=torch.Generator().manual_seed(0))


def check_again(decoder, runtimes: list, prompt: torch.Tensor) -> dict | None:
    """check_decodes' whole-decode judgment made again from the measured split tables, on whatever routes the
    layers now, and applied (nothing stored in the profile). For a caller that changed the routing after the
    load: bench/routing_replay.py replaces the routers by a trained model's decisions, while the load judged the
    path on the model's own routing (a random model's repeats far more: the GPU alone then looks faster). prompt:
    [1, T] on the decoder's device. Returns check_on_decode's result, None where no layer has a measured CPU share
    (MOE_CPU_EXPERTS was not auto, or the CPU path never applied)."""
    shares = [r.cpu_share for r in runtimes
              if r.cpu_share is not None and r.cpu_share.tuned_table is not None and any(r.cpu_share.tuned_table)]
    if not shares or decoder is None:
        return None
    for share in shares:
        share.runner.prepare(share.host.gate_up, share.host.down)
        share.set_table(share.tuned_table)
    with torch.inference_mode():
        check = check_on_decode(decoder, shares, prompt)
    if not check["kept"]:
        for share in shares:
            share.runner.release_copies()
    return check


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
        # host bytes the kernel keeps beside the host tier (int4pack's repacked copy; 0 for the others)
        "cpu_expert_copy_bytes": share.runner.copy_bytes if share else None,
        "cpu_expert_split": share.split_table if share else None,
        "cpu_expert_handoff": share.handoff if share else None,
        # MOE_CPU_EXPERTS=auto: per CPU kernel, one layer's forward timed per split (tuning.tune_split)
        "cpu_expert_tuning": share.tuning if share else None,
        # and whole decodes with the tuned tables and without the path: {"decode_tok_s": {on, off}, "kept"}
        "cpu_expert_decode_check": decode_check,
    }
