"""A quantized tiny Qwen3-MoE on CUDA (Triton kernels, CUDA graphs): the same logits and tokens at every ratio and
tier as fully resident, bf16 compute; and the torch path on CUDA."""
import sys, tempfile, torch
sys.path.insert(0, "tests"); sys.path.insert(0, ".")
from tiny_models import make_checkpoint, quantize_experts
from bench.common import load_pipeline
from moe_offload.quant.format import QuantSpec

root = tempfile.mkdtemp()
src = make_checkpoint("qwen3_moe", root + "/src", with_tokenizer=False)
ids = torch.randint(2, 300, (1, 13), generator=torch.Generator().manual_seed(0)).cuda()
for spec in (QuantSpec(4, 16, True), QuantSpec(8, 8, False)):
    path = quantize_experts(src, f"{root}/q{spec.bits}", spec)
    out = {}
    for props in ({"MOE_OFFLOAD_RATIO": 100}, {"MOE_OFFLOAD_RATIO": 37}, {"MOE_OFFLOAD_RATIO": 0},
                  {"MOE_OFFLOAD_RATIO": 37, "MOE_HOST_CACHE": 0}, {"MOE_OFFLOAD_RATIO": 0, "MOE_HOST_CACHE": 0},
                  {"MOE_OFFLOAD_RATIO": 25, "MOE_ZERO_COPY": "static"}, {"MOE_OFFLOAD_RATIO": 0, "MOE_KERNEL": "torch"},
                  {"MOE_OFFLOAD_RATIO": 100, "MOE_KERNEL": "torch"}):
        pipe = load_pipeline(path, "cuda", MOE_DTYPE="bfloat16", **props)
        with torch.no_grad():
            logits = pipe.model(ids).logits
        tokens = pipe.generate_tokens(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
        stats = pipe.get_offload_stats()
        out[str(props)] = (logits, tokens)
        print(spec, props, "zero_copy_layers", stats["zero_copy_layers"], "in place", stats["experts_read_in_place"],
              "streamed", stats["bytes_streamed"], "graph steps", stats["cuda_graph_steps"],
              [c.line() for c in pipe.choices if c.name == "MOE_CPU_EXPERTS"])
        pipe.close()
    ref_logits, ref_tokens = out[str({"MOE_OFFLOAD_RATIO": 100})]
    for key, (logits, tokens) in out.items():
        print("  ", key, "logits equal", torch.equal(logits, ref_logits), "max diff",
              (logits.float() - ref_logits.float()).abs().max().item(), "tokens equal", torch.equal(tokens, ref_tokens))
