"""CPU cost of repacking one GPTQ / AWQ expert into the engine's compressed-tensors planes (quant/gptq.py), paid
once per expert when the host tier is filled and on every disk-tier read of such a checkpoint. A Qwen3-30B-A3B
expert (H 2048, I 768, int4, group 128, float16 scales), one thread. Run: python bench/repack_cost.py
"""
import time, torch
from moe_offload.expert_format import ExpertFormat
from moe_offload.quant.format import QuantSpec
torch.set_num_threads(1)
for source in ("gptq_v2", "gptq_v1", "awq"):
    stored = ExpertFormat(768, 2048, torch.float16, QuantSpec(4, 128, False), source)
    held = stored.held()
    src = torch.randint(0, 256, (stored.row_bytes,), dtype=torch.uint8)
    for name, v in stored.plane_views(src).items():
        if "zeros" in name: v.copy_(torch.full_like(v, 0x33333333))
        if "scales" in name: v.copy_(torch.rand(v.shape).half())
    dst = torch.empty(held.row_bytes, dtype=torch.uint8)
    held.copy_row(dst, src, stored)
    t = time.perf_counter(); n = 20
    for _ in range(n): held.copy_row(dst, src, stored)
    dt = (time.perf_counter() - t) / n
    print(source, f"{stored.nbytes/1e6:.2f} MB/expert, {dt*1e3:.2f} ms per expert, {stored.nbytes/dt/1e9:.2f} GB/s")
