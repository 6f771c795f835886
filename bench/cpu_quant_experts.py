"""The CPU expert path's numba kernel on int4/int8 and FP8 (128 x 128 blocks) experts beside bf16: one token per
expert, Qwen3-30B-A3B-shaped experts (H=2048, I=768), group 128, as a hybrid decode step computes its misses
(CpuExperts compute="numba", moe_offload/hybrid/kernels/cpu_numba.py), and the torch fallback that dequantizes
block by block (compute="float32").

Why: a quantized expert is 3.6x (int4) / 1.9x (int8) / 2x (FP8) fewer bytes than bf16, but the CPU must
unpack and decode every weight, so its cost per expert is not its bytes' share of a bf16 one's. This measures
experts/s per format (what tune_split weighs against the GPU), and the outputs against the reference.

Each call computes K distinct experts from a pool too big for the caches, in rotation; reported per format and
kernel: median ms per call over --repeats calls after two warm-ups, experts/s, GB/s of the format's bytes, and
max |diff| / max |reference| against reference.weighted_expert_output (the same math as the engine's).

Usage, from the repository root: python -m bench.cpu_quant_experts [--threads N] [--experts K] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from bench.common import machine, utc_now, versions, write_report
from moe_offload.expert_format import ExpertFormat
from moe_offload.hybrid.cpu_experts import CpuExperts
from moe_offload.kernels.reference import weighted_expert_output
from moe_offload.quant.format import QuantSpec, unpack
from moe_offload.quant.fp8 import BlockFP8Spec
from moe_offload.tiers import HostTier

HIDDEN, INTER, GROUP = 2048, 768, 128
FORMATS = {"bf16": None, "int4-g128-sym": QuantSpec(4, GROUP, True), "int8-g128-sym": QuantSpec(8, GROUP, True),
           "int4-g128-asym": QuantSpec(4, GROUP, False), "fp8-128x128": BlockFP8Spec(GROUP, GROUP)}


def pool(spec: QuantSpec | BlockFP8Spec | None, experts: int, seed: int = 0) -> HostTier:
    """A host tier of `experts` random experts in the format: bf16 weights ~ N(0, 1/K), or random packed values
    and zero points with scales of that size, or FP8 codes (no NaN) with float32 block scales of that size."""
    fp8 = isinstance(spec, BlockFP8Spec)
    dtype = torch.float32 if fp8 else torch.bfloat16  # FP8's block scales are float32
    tier = HostTier(list(range(experts)), ExpertFormat(INTER, HIDDEN, dtype, spec), pin=False)
    gen = torch.Generator().manual_seed(seed)
    if fp8:
        planes = tier.format.plane_views(tier.rows)
        for matrix, width in (("gate_up", HIDDEN), ("down", INTER)):
            codes = torch.randint(0, 256, planes[f"{matrix}.weight"].shape, generator=gen)
            codes = torch.where((codes & 0x7F) == 0x7F, 0x38, codes)  # NaN codes: 1.0 instead
            planes[f"{matrix}.weight"].view(torch.uint8).copy_(codes.to(torch.uint8))
            scale = planes[f"{matrix}.scale"]
            scale.copy_(torch.rand(scale.shape, generator=gen) * 2 / (width ** 0.5 * 100))  # codes reach 448
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


def time_calls(runner, tier: HostTier, x: torch.Tensor, weights: torch.Tensor, repeats: int,
               cursor: list[int]) -> float:
    """Median seconds of a call over `repeats`, after two warm-ups, each call on the next K experts. runner: a
    CpuExperts, or anything called as one."""
    k, n = x.shape[0], len(tier.row_of)
    times = []
    for _ in range(repeats + 2):
        slots = [(cursor[0] + i) % n for i in range(k)]
        cursor[0] += k
        start = time.perf_counter()
        runner(x, weights, tier.gate_up, tier.down, slots, [1] * k, F.silu)
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


class TorchInt4Pack:
    """A yardstick, not an engine path: torch's compiled CPU kernel for int4 weight-only GEMVs
    (aten._weight_int4pack_mm_for_cpu, torchao's CPU path), on the same symmetric int4 experts repacked into its
    own layout (64-row blocks, rows n and n + 32 sharing a byte: it vectorizes along N, ours along K), a loop of
    torch ops per expert with `threads` intra-op threads. Why: how far a compiled kernel gets on the same bytes
    on this CPU says how much the numba kernel leaves (the engine cannot use it without a second copy of every
    host-tier expert in that layout)."""

    def __init__(self, tier: HostTier, threads: int):
        self.threads, self.experts = threads, []
        for slot in range(len(tier.row_of)):
            self.experts.append([self._repack(matrix[slot]) for matrix in (tier.gate_up, tier.down)])

    @staticmethod
    def _repack(matrix) -> tuple[torch.Tensor, torch.Tensor]:
        """One symmetric QuantMatrix [N, K] -> (packed uint8 [N, K / 2], scales_and_zeros [G, N, 2] bf16): torch's
        kernel computes ((q - 8) * scale + zero) . x, ours (u - 8) * scale . x, so q = u and zero = 0."""
        assert matrix.zero is None and matrix.bits == 4
        rows = matrix.packed.shape[0]
        values = unpack(matrix.packed, 4, matrix.in_features).to(torch.int32) + 8  # [N, K] in [0, 16)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 1)
        scales = torch.stack([matrix.scale.t(), torch.zeros_like(matrix.scale.t())], dim=-1)  # [G, N, 2]
        return packed, scales.to(torch.bfloat16).contiguous()

    def __call__(self, x, weights, gate_up, down, slots, counts, act_fn=F.silu) -> torch.Tensor:
        """The CpuExperts contract for one token per slot: [K, H] float32 weighted outputs."""
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            out = []
            for row, slot in enumerate(slots):
                (w13, s13), (w2, s2) = self.experts[slot]
                gate, up = torch.ops.aten._weight_int4pack_mm_for_cpu(x[row:row + 1], w13, GROUP, s13).chunk(2, -1)
                down_out = torch.ops.aten._weight_int4pack_mm_for_cpu(act_fn(gate) * up, w2, GROUP, s2)  # [1, H]
                out.append(down_out * weights[row:row + 1, None])
            return torch.cat(out).float()
        finally:
            torch.set_num_threads(previous)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--experts", type=int, default=8, help="experts per call (a step's misses)")
    parser.add_argument("--pool", type=int, default=48, help="experts per format in rotation (bf16: 9.4 MB each)")
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn((args.experts, HIDDEN), generator=gen).to(torch.bfloat16)  # [K, H]
    weights = torch.rand(args.experts, generator=gen)  # [K] float32, as routers give
    results = {}
    for name, spec in FORMATS.items():
        tier = pool(spec, args.pool)
        kernels = ["numba"] + ([] if spec is None else ["float32"])
        if name == "int4-g128-sym" and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            kernels.append("torch-int4pack")
        for kernel in kernels:
            with nullcontext(TorchInt4Pack(tier, args.threads)) if kernel == "torch-int4pack" else \
                    CpuExperts(threads=args.threads, compute=kernel) as runner:
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
              "shape": {"hidden": HIDDEN, "inter": INTER, "group": GROUP}, "results": results}
    print(json.dumps({k: {"experts_per_s": round(v["experts_per_s"]), "max_rel_diff": v["max_rel_diff"]}
                      for k, v in results.items()}))
    if args.out:
        write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
