"""FP8 block-quantized experts on the GPU (kernels/triton_fp8.py), Qwen3-30B-A3B-FP8's expert shape (H=2048,
I=768, 128x128 blocks, E=128, top-8): first a check against fused_moe_reference (the torch dequantizing oracle)
for decode (1 token, GEMV) and prefill (128 tokens, grouped GEMMs) in bf16, then the decode step's time for
bf16 and FP8 experts, resident and read in place from pinned host rows (zero-copy). Two trials, one after the
other (the first run of a kernel may pay for clocks ramping up: compare the best of the two).

Usage (CUDA): python bench/fp8_kernels.py OUT.json"""
import json, sys, torch, triton
sys.path.insert(0, ".")
from bench.common import machine, utc_now, versions, write_report
from moe_offload.expert_format import ExpertFormat
from moe_offload.kernels.triton_moe import fused_moe, fused_moe_reference
from moe_offload.quant.fp8 import BlockFP8Spec

H, I, E, K = 2048, 768, 128, 8
dev = torch.device("cuda")
torch.manual_seed(0)
FORMATS = {"bf16": ExpertFormat(I, H, torch.bfloat16), "fp8-128x128": ExpertFormat(I, H, torch.float32,
                                                                                    BlockFP8Spec(128, 128))}


def rows_for(fmt, n, host):
    """n random experts of fmt: FP8 weights of every finite code (no NaN), scales keeping outputs ~1."""
    rows = torch.empty((n, fmt.row_bytes), dtype=torch.uint8)
    if host:
        rows = rows.pin_memory()
    for name, v in fmt.plane_views(rows).items():
        if v.dtype == torch.float8_e4m3fn:
            codes = torch.randint(0, 256, v.shape, dtype=torch.int64)
            v.view(torch.uint8).copy_(torch.where((codes & 0x7F) == 0x7F, 0x38, codes).to(torch.uint8))
        elif name.endswith(".scale"):
            v.copy_((torch.rand(v.shape) + 0.5) / (60 * H ** 0.5))
        else:
            v.copy_((torch.randn(v.shape) * 0.02).to(v.dtype))
    return rows if host else rows.to(dev)


def timeit(fn):
    return triton.testing.do_bench(fn, warmup=50, rep=300) * 1000  # us


checks = {}
fmt = FORMATS["fp8-128x128"]
pool = fmt.weights(rows_for(fmt, E, False))
slots = torch.arange(E, device=dev, dtype=torch.int32)
for path, tokens in (("decode", 1), ("prefill", 128)):
    x = torch.randn(tokens, H, device=dev, dtype=torch.bfloat16)
    ids = torch.rand(tokens, E, device=dev).topk(K, dim=-1).indices
    w = torch.softmax(torch.randn(tokens, K, device=dev), dim=-1).to(torch.bfloat16)
    want = fused_moe_reference(x, ids, w, pool.gate_up, pool.down, slots).float()
    got = fused_moe(x, ids, w, pool.gate_up, pool.down, slots).float()
    checks[path] = {"max_abs_error": (got - want).abs().max().item(), "max_abs": want.abs().max().item(),
                    "mismatched_fraction": (got != want).float().mean().item()}
print(json.dumps({"check": checks}, indent=1))

results, trials = {}, []
x = torch.randn(1, H, device=dev, dtype=torch.bfloat16)
w = torch.full((1, K), 1 / K, device=dev, dtype=torch.bfloat16)
for trial in range(2):
    for name, fmt in FORMATS.items():
        for where in ("device", "host"):
            ids = torch.randperm(E, device=dev)[:K][None]
            if where == "device":
                pool = fmt.weights(rows_for(fmt, E, False))
                slots = torch.arange(E, device=dev, dtype=torch.int32)
                fn = lambda: fused_moe(x, ids, w, pool.gate_up, pool.down, slots)
            else:
                pool = fmt.weights(rows_for(fmt, 1, False))
                host = fmt.weights(rows_for(fmt, E, True))
                slots = torch.arange(1, E + 1, device=dev, dtype=torch.int32)
                fn = lambda: fused_moe(x, ids, w, pool.gate_up, pool.down, slots, host_w13=host.gate_up,
                                       host_w2=host.down)
            us = timeit(fn)
            results[f"{name} {where}"] = {"us": us, "bytes_per_expert": fmt.nbytes, "GB_s": K * fmt.nbytes / us / 1e3}
    print(json.dumps({"trial": trial, **results}, indent=1))
    trials.append(dict(results))
write_report(sys.argv[1], {"date": utc_now(), "machine": machine(), "versions": versions(),
                           "what": "FP8 experts: check against the reference, then one MoE layer's decode step, "
                                   "K=8 pairs, H=2048, I=768, E=128, triton do_bench us",
                           "check": checks, "trials": trials})
