"""Decode-step timing of one MoE layer's expert kernels (K=8 pairs, Qwen3-30B-A3B expert shape) on the GPU:
dense bf16 in the old layout (two contiguous pools) vs byte rows (strided views), and int4/int8 g128, resident
and read in place from pinned host rows. Two trials, one after the other (the first run of a kernel may pay for
clocks ramping up: compare the best of the two).

Usage (CUDA): python bench/quant_kernels.py OUT.json"""
import json, sys, torch, triton
sys.path.insert(0, ".")
from bench.common import machine, utc_now, versions, write_report
from moe_offload.expert_format import ExpertFormat
from moe_offload.kernels.triton_moe import fused_moe
from moe_offload.quant.format import QuantSpec, pack

H, I, E, K = 2048, 768, 128, 8
dev = torch.device("cuda")
torch.manual_seed(0)

def rows_for(fmt, n, host):
    rows = torch.empty((n, fmt.row_bytes), dtype=torch.uint8)
    if host:
        rows = rows.pin_memory()
    views = fmt.plane_views(rows)
    for name, v in views.items():
        if v.dtype == torch.int32:
            v.copy_(torch.randint(-2**31, 2**31 - 1, v.shape, dtype=torch.int64).to(torch.int32))
        else:
            v.copy_((torch.rand(v.shape) * 0.01).to(v.dtype))
    return rows if host else rows.to(dev)

def timeit(fn):
    return triton.testing.do_bench(fn, warmup=50, rep=300) * 1000  # us

results, trials = {}, []
x = torch.randn(1, H, device=dev, dtype=torch.bfloat16)
w = torch.full((1, K), 1 / K, device=dev, dtype=torch.bfloat16)
for trial in range(2):
  for name, spec in (("bf16", None), ("int8-g128", QuantSpec(8, 128, True)), ("int4-g128", QuantSpec(4, 128, True)),
                     ("int4-g128-zero", QuantSpec(4, 128, False))):
    fmt = ExpertFormat(I, H, torch.bfloat16, spec)
    for where in ("device", "host"):
        ids = torch.randperm(E, device=dev)[:K][None]
        if where == "device":
            rows = rows_for(fmt, E, False); pool = fmt.weights(rows)
            slots = torch.arange(E, device=dev, dtype=torch.int32)
            fn = lambda: fused_moe(x, ids, w, pool.gate_up, pool.down, slots)
        else:
            dev_rows = rows_for(fmt, 1, False); pool = fmt.weights(dev_rows)
            host = fmt.weights(rows_for(fmt, E, True))
            slots = torch.arange(1, E + 1, device=dev, dtype=torch.int32)
            fn = lambda: fused_moe(x, ids, w, pool.gate_up, pool.down, slots, host_w13=host.gate_up, host_w2=host.down)
        us = timeit(fn)
        results[f"{name} {where}"] = {"us": us, "bytes_per_expert": fmt.nbytes, "GB_s": K * fmt.nbytes / us / 1e3}
    if spec is None:  # the old layout: separate contiguous pools
        w13 = torch.randn(E, 2 * I, H, device=dev, dtype=torch.bfloat16) * 0.01
        w2 = torch.randn(E, H, I, device=dev, dtype=torch.bfloat16) * 0.01
        slots = torch.arange(E, device=dev, dtype=torch.int32)
        ids = torch.randperm(E, device=dev)[:K][None]
        us = timeit(lambda: fused_moe(x, ids, w, w13, w2, slots))
        results["bf16 device, two contiguous pools (old layout)"] = {"us": us, "GB_s": K * 3 * I * H * 2 / us / 1e3}
        hw13 = w13[:E].cpu().pin_memory(); hw2 = w2.cpu().pin_memory()
        d13, d2 = w13[:1].clone(), w2[:1].clone()
        slots = torch.arange(1, E + 1, device=dev, dtype=torch.int32)
        us = timeit(lambda: fused_moe(x, ids, w, d13, d2, slots, host_w13=hw13, host_w2=hw2))
        results["bf16 host, two contiguous pools (old layout)"] = {"us": us, "GB_s": K * 3 * I * H * 2 / us / 1e3}
  print(json.dumps({"trial": trial, **results}, indent=1))
  trials.append(dict(results))
write_report(sys.argv[1], {"date": utc_now(), "machine": machine(), "versions": versions(),
                           "what": "one MoE layer's decode step, K=8 pairs, H=2048, I=768, E=128, triton do_bench us",
                           "trials": trials})
