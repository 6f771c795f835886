"""Kernel-level timing of one MoE layer's experts on the GPU (Qwen3-30B-A3B expert shape, E=128, K=8): dense bf16
and int4/int8 g128 (compressed-tensors pack-quantized), decode (one token: the GEMV kernels) resident and read in
place from pinned host rows, and prefill (512 tokens: the grouped GEMM) resident. The int4/int8 decode tiles
(triton_quant.GEMV_GATE_UP / GEMV_DOWN) are swept over --tiles; the report names the fastest per case.

Why kernel-level: end-to-end decode mixes the experts' bytes with attention, routing and the cache; this isolates
whether a quantized expert costs its bytes (what offloading needs) or the kernel's instructions. Two trials, one
after the other (a kernel's first run may pay for clocks ramping up: compare the best of the two).

To compare two versions of the kernels side by side, run this script from a copy of the other tree (its
moe_offload is imported from the working directory): `cd OLD && python ../bench/quant_kernels.py OUT.json`.

Usage (CUDA): python bench/quant_kernels.py OUT.json [--tiles 8x256+16x256,16x512,...] [--label NAME]"""
import argparse
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.getcwd())  # the tree under test: this one, or a copy run from its own folder
from bench.common import machine, utc_now, versions, write_report  # noqa: E402
from moe_offload.expert_format import ExpertFormat  # noqa: E402
from moe_offload.kernels import triton_quant  # noqa: E402
from moe_offload.kernels.triton_moe import fused_moe  # noqa: E402
from moe_offload.quant.format import QuantSpec  # noqa: E402

H, I, E, K, PREFILL_TOKENS = 2048, 768, 128, 8, 512
FORMATS = (("bf16", None), ("int8-g128", QuantSpec(8, 128, True)), ("int4-g128", QuantSpec(4, 128, True)),
           ("int4-g128-zero", QuantSpec(4, 128, False)))


def rows_for(fmt: ExpertFormat, n: int, host: bool, dev: torch.device) -> torch.Tensor:
    """uint8 [n, row_bytes]: random experts (random words, scales ~0.01), pinned on the host or on the device."""
    rows = torch.empty((n, fmt.row_bytes), dtype=torch.uint8)
    if host:
        rows = rows.pin_memory()
    for v in fmt.plane_views(rows).values():
        if v.dtype == torch.int32:
            v.copy_(torch.randint(-2**31, 2**31 - 1, v.shape, dtype=torch.int64).to(torch.int32))
        else:
            v.copy_((torch.rand(v.shape) * 0.01).to(v.dtype))
    return rows if host else rows.to(dev)


def timeit(fn) -> float:
    return triton.testing.do_bench(fn, warmup=50, rep=300) * 1000  # us


def set_tiles(tile: str) -> None:
    """The decode kernels of triton_quant take tile "NxK" (both) or "NxK+NxK" (gate/up, then down) as BLOCK_N x
    BLOCK_K; a tree without the knobs keeps its own."""
    gate_up, _, down = tile.partition("+")
    for name, item in (("GEMV_GATE_UP", gate_up), ("GEMV_DOWN", down or gate_up)):
        n, k = item.split("x")
        if hasattr(triton_quant, name):
            getattr(triton_quant, name).update(BLOCK_N=int(n), BLOCK_K=int(k))


def one_trial(dev: torch.device, tiles: list[str]) -> dict:
    results = {}
    x = torch.randn(1, H, device=dev, dtype=torch.bfloat16)  # [1, H]
    w = torch.full((1, K), 1 / K, device=dev, dtype=torch.bfloat16)  # [1, K]
    xp = torch.randn(PREFILL_TOKENS, H, device=dev, dtype=torch.bfloat16)  # [T, H]
    wp = torch.full((PREFILL_TOKENS, K), 1 / K, device=dev, dtype=torch.bfloat16)  # [T, K]
    idsp = torch.rand(PREFILL_TOKENS, E, device=dev).topk(K, dim=-1).indices  # [T, K]: every expert in use
    for name, spec in FORMATS:
        fmt = ExpertFormat(I, H, torch.bfloat16, spec)
        resident = fmt.weights(rows_for(fmt, E, False, dev))
        one_slot = fmt.weights(rows_for(fmt, 1, False, dev))
        host = fmt.weights(rows_for(fmt, E, True, dev))
        slots = torch.arange(E, device=dev, dtype=torch.int32)
        ids = torch.randperm(E, device=dev)[:K][None]  # [1, K]
        calls = {
            "device": lambda: fused_moe(x, ids, w, resident.gate_up, resident.down, slots),
            "host": lambda: fused_moe(x, ids, w, one_slot.gate_up, one_slot.down, slots + 1,
                                      host_w13=host.gate_up, host_w2=host.down)}
        for where, fn in calls.items():
            for tile in (tiles if spec is not None else [None]):
                if tile is not None:
                    set_tiles(tile)
                us = timeit(fn)
                key = f"{name} decode {where}" + ("" if tile is None else f" tile {tile}")
                results[key] = {"us": us, "bytes_per_expert": fmt.nbytes, "GB_s": K * fmt.nbytes / us / 1e3}
        us = timeit(lambda: fused_moe(xp, idsp, wp, resident.gate_up, resident.down, slots))
        results[f"{name} prefill device"] = {"us": us, "tok_s": PREFILL_TOKENS / us * 1e6}
        del resident, one_slot, host
    return results


def best_tiles(trials: list[dict]) -> dict:
    """For each format and place, the tile of the lowest best-of-trials time."""
    best = {}
    for key in trials[0]:
        if " tile " not in key:
            continue
        case, tile = key.split(" tile ")
        us = min(t[key]["us"] for t in trials)
        if case not in best or us < best[case]["us"]:
            best[case] = {"tile": tile, "us": us}
    return best


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    default = "+".join(f"{t['BLOCK_N']}x{t['BLOCK_K']}" for t in (triton_quant.GEMV_GATE_UP, triton_quant.GEMV_DOWN))
    parser.add_argument("--tiles", default=default, help="decode tiles for int4/int8, comma-separated: NxK "
                        "(BLOCK_N x BLOCK_K of both kernels) or NxK+NxK (gate/up, then down); default the tree's "
                        f"own ({default})")
    parser.add_argument("--label", default="", help="which kernels these are (recorded)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs CUDA")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    tiles = args.tiles.split(",")
    trials = []
    for trial in range(2):
        results = one_trial(dev, tiles)
        print(json.dumps({"trial": trial, **{k: round(v["us"], 1) for k, v in results.items()}}, indent=1),
              flush=True)
        trials.append(results)
    best = best_tiles(trials)
    print(json.dumps(best, indent=1))
    write_report(args.out, {"date": utc_now(), "machine": machine(), "versions": versions(), "label": args.label,
                            "tree": os.getcwd(), "what": f"one MoE layer, K={K} pairs, H={H}, I={I}, E={E}: decode "
                            f"(1 token) and prefill ({PREFILL_TOKENS} tokens), triton do_bench us",
                            "trials": trials, "best_tiles": best})
    return 0


if __name__ == "__main__":
    sys.exit(main())
