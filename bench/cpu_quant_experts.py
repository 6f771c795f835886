"""The CPU expert path's numba kernel on int4/int8 and FP8 (128 x 128 blocks) experts beside bf16: one token per
expert, Qwen3-30B-A3B-shaped experts (H=2048, I=768), group 128, as a hybrid decode step computes its misses
(CpuExperts compute="numba", moe_offload/hybrid/kernels/cpu_numba.py), the torch fallback that dequantizes
block by block (compute="float32"), and for symmetric int4 torch's int4 kernel on a repacked copy
(compute="int4pack", moe_offload/hybrid/int4pack.py; the copy made before the timing, as the engine does).

Why: a quantized expert is 3.6x (int4) / 1.9x (int8) / 2x (FP8) fewer bytes than bf16, but the CPU must
unpack and decode every weight, so its cost per expert is not its bytes' share of a bf16 one's. This measures
experts/s per format (what tune_split weighs against the GPU), and the outputs against the reference.

Each call computes K distinct experts from a pool too big for the caches, in rotation; reported per format and
kernel: median ms per call over --repeats calls after two warm-ups, experts/s, GB/s of the format's bytes, and
max |diff| / max |reference| against reference.weighted_expert_output (the same math as the engine's).

Usage, from the repository root: python -m bench.cpu_quant_experts [--threads N] [--experts K] [--formats A,B]
    [--out FILE.json]
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
from moe_offload.expert_format import ExpertFormat
from moe_offload.hybrid import int4pack
from moe_offload.hybrid.cpu_experts import CpuExperts
from moe_offload.kernels.reference import weighted_expert_output
from moe_offload.quant import fp8
from moe_offload.quant.format import QuantSpec
from moe_offload.quant.fp8 import BlockFP8Spec
from moe_offload.tiers import HostTier

HIDDEN, INTER, GROUP = 2048, 768, 128
FORMATS = {"bf16": None, "int4-g128-sym": QuantSpec(4, GROUP, True), "int8-g128-sym": QuantSpec(8, GROUP, True),
           "int4-g128-asym": QuantSpec(4, GROUP, False), "fp8-128x128": BlockFP8Spec(GROUP, GROUP),
           "fp8-128x128-uniform": BlockFP8Spec(GROUP, GROUP)}
# FP8 codes drawn uniformly rather than quantized from weights: 1/16 have a zero exponent (a checkpoint's blocks,
# scaled to their largest weight, have about 1 in 10,000), which the numba kernel decodes to float32 subnormals,
# slow on Intel cores (microcode assists): the worst case, beside the realistic pool
UNIFORM_CODES = {"fp8-128x128-uniform"}


def pool(spec: QuantSpec | BlockFP8Spec | None, experts: int, seed: int = 0, uniform_codes: bool = False
         ) -> HostTier:
    """A host tier of `experts` random experts in the format: bf16 weights ~ N(0, 1/K), or random packed values
    and zero points with scales of that size, or FP8: such weights quantized as released checkpoints are
    (quant.fp8.quantize), or (uniform_codes) codes drawn uniformly (no NaN) with float32 block scales of that
    size."""
    is_fp8 = isinstance(spec, BlockFP8Spec)
    dtype = torch.float32 if is_fp8 else torch.bfloat16  # FP8's block scales are float32
    tier = HostTier(list(range(experts)), ExpertFormat(INTER, HIDDEN, dtype, spec), pin=False)
    gen = torch.Generator().manual_seed(seed)
    if is_fp8:
        planes = tier.format.plane_views(tier.rows)
        for matrix, width in (("gate_up", HIDDEN), ("down", INTER)):
            weight, scale = planes[f"{matrix}.weight"], planes[f"{matrix}.scale"]  # [n, N, K], [n, N/128, K/128]
            if uniform_codes:
                codes = torch.randint(0, 256, weight.shape, generator=gen)
                codes = torch.where((codes & 0x7F) == 0x7F, 0x38, codes)  # NaN codes: 1.0 instead
                weight.view(torch.uint8).copy_(codes.to(torch.uint8))
                scale.copy_(torch.rand(scale.shape, generator=gen) * 2 / (width ** 0.5 * 100))  # codes reach 448
                continue
            for e in range(experts):  # blocks of 128 rows never straddle gate and up (I = 768)
                codes, scale_inv = fp8.quantize(torch.randn(weight.shape[1:], generator=gen) / width ** 0.5, spec)
                weight[e].copy_(codes)
                scale[e].copy_(scale_inv)
        return tier
    if spec is None:
        tier.gate_up.copy_(torch.randn(tier.gate_up.shape, generator=gen) / HIDDEN ** 0.5)
        tier.down.copy_(torch.randn(tier.down.shape, generator=gen) / INTER ** 0.5)
        return tier
    tier.rows.copy_(torch.randint(0, 256, tier.rows.shape, dtype=torch.uint8, generator=gen))
    for name, plane in tier.format.plane_views(tier.rows).items():
        if name.endswith(".scale"):  # [n, N, G]
            width = HIDDEN if name.startswith("gate_up") else INTER
            plane.copy_(torch.rand(plane.shape, generator=gen) * 2 / (width ** 0.5 * (1 << (spec.bits - 1))))
    return tier


def time_calls(runner: CpuExperts, tier: HostTier, x: torch.Tensor, weights: torch.Tensor, repeats: int,
               cursor: list[int]) -> float:
    """Median seconds of a call over `repeats`, after two warm-ups, each call on the next K experts."""
    k, n = x.shape[0], len(tier.row_of)
    times = []
    for _ in range(repeats + 2):
        slots = [(cursor[0] + i) % n for i in range(k)]
        cursor[0] += k
        start = time.perf_counter()
        runner(x, weights, tier.gate_up, tier.down, slots, [1] * k, F.silu)
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--experts", type=int, default=8, help="experts per call (a step's misses)")
    parser.add_argument("--pool", type=int, default=48, help="experts per format in rotation (bf16: 9.4 MB each)")
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated, of: " + ", ".join(FORMATS))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    unknown = set(args.formats.split(",")) - set(FORMATS)
    if unknown:
        parser.error(f"unknown formats {', '.join(sorted(unknown))}: of {', '.join(FORMATS)}")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn((args.experts, HIDDEN), generator=gen).to(torch.bfloat16)  # [K, H]
    weights = torch.rand(args.experts, generator=gen)  # [K] float32, as routers give
    results, zero_exponent = {}, {}  # zero_exponent: FP8 pool -> its share of zero-exponent codes
    for name, spec in ((n, FORMATS[n]) for n in args.formats.split(",")):
        tier = pool(spec, args.pool, uniform_codes=name in UNIFORM_CODES)
        if isinstance(spec, BlockFP8Spec):  # codes a numba decode makes float32 subnormals
            planes = [tier.format.plane_views(tier.rows)[f"{m}.weight"].view(torch.uint8) for m in ("gate_up", "down")]
            zero_exponent[name] = sum(((codes & 0x78) == 0).sum().item() for codes in planes) / \
                sum(codes.numel() for codes in planes)
            print(f"{name}: {zero_exponent[name]:.2e} of the codes have a zero exponent", flush=True)
        kernels = ["numba"] + ([] if spec is None else ["float32"])
        if spec is not None and int4pack.why_not(tier.format) is None:
            kernels.append("int4pack")
        for kernel in kernels:
            with CpuExperts(threads=args.threads, compute=kernel) as runner:
                runner.prepare(tier.gate_up, tier.down)  # int4pack: its repacked copy, made before the timing
                seconds = time_calls(runner, tier, x, weights, args.repeats, [0])
                got = runner(x, weights, tier.gate_up, tier.down, list(range(args.experts)), [1] * args.experts)
            want = torch.cat([weighted_expert_output(x[i:i + 1], weights[i:i + 1], tier.gate_up[i], tier.down[i],
                                                     F.silu) for i in range(args.experts)])
            results[f"{name}/{kernel}"] = {
                "ms_per_call": seconds * 1e3, "experts_per_s": args.experts / seconds,
                "expert_bytes": tier.format.nbytes, "gb_s": args.experts * tier.format.nbytes / seconds / 1e9,
                "max_rel_diff": ((got - want).abs().max() / want.abs().max()).item(),
                "bit_identical_fraction": (got == want).float().mean().item()}
            print(f"{name:15s} {kernel:8s} {seconds * 1e3:7.2f} ms/call {args.experts / seconds:7.0f} experts/s "
                  f"{results[f'{name}/{kernel}']['gb_s']:6.2f} GB/s", flush=True)
        del tier
    from importlib.metadata import version

    report = {"date": utc_now(), "machine": machine(), "versions": {**versions(), "numba": version("numba")},
              "threads": args.threads, "experts_per_call": args.experts, "pool": args.pool,
              "shape": {"hidden": HIDDEN, "inter": INTER, "group": GROUP}, "results": results,
              "fp8_zero_exponent_fraction": zero_exponent}
    print(json.dumps({k: {"experts_per_s": round(v["experts_per_s"]), "max_rel_diff": v["max_rel_diff"]}
                      for k, v in results.items()}))
    if args.out:
        write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
