"""bf16 on CUDA: moe-offload against transformers on the same checkpoint, every architecture, ratio and tier.

In bf16 two correct implementations differ by rounding, so the tolerance is set by transformers itself: its
own two experts backends (eager loop and grouped_mm) are compared on the same input, and ours must stay
within TOLERANCE_FACTOR times that spread (with a floor of 2 bf16 ulps of the logit scale). Greedy tokens are
compared too; where they differ, the report says whether transformers' two backends also differ there.

Where transformers' two backends agree (GPT-OSS's do: spread 0), that spread says nothing about how far a
correct bf16 implementation may drift, so every row also has the arbiter: transformers' eager model in float32
on the same weights, and how far ours and transformers' bf16 logits each are from it (`ours_vs_float32`,
`transformers_vs_float32`): an implementation no further from float32 than transformers' own bf16 is rounding
apart, not wrong.

The models are the CPU tests' tiny architectures (tests/tiny_models.py), widened and with random weights, and
GPT-OSS in bf16 and in native MXFP4 (transformers dequantizes the MXFP4 one at load: Mxfp4Config(dequantize=True)).

Usage, from the repository root (CUDA):
  python -m bench.gpu_correctness --out bench/results/<date>-h200-bf16-correctness.json [--kernel triton]
      [--archs gpt_oss,qwen3_moe]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile

import torch

from bench.common import ROOT, load_pipeline, machine, utc_now, versions, write_report
from moe_offload.attention import prompt_attention


def _tiny_models():
    """tests/tiny_models.py, by path: tests/ is not a package (and an installed `tests` could shadow it)."""
    spec = importlib.util.spec_from_file_location("tiny_models", os.path.join(ROOT, "tests", "tiny_models.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_tiny = _tiny_models()
ARCHITECTURES, VOCAB, save_tokenizer, tiny_config = (_tiny.ARCHITECTURES, _tiny.VOCAB, _tiny.save_tokenizer,
                                                     _tiny.tiny_config)

GPT_OSS = ("gpt_oss", "gpt_oss_mxfp4")  # tiny_models.make_gpt_oss_checkpoint, widened
ARCHS = ARCHITECTURES + GPT_OSS
RATIOS = (0, 37, 100)
TIERS = {"host": "auto", "disk": 0}
TOLERANCE_FACTOR = 2.0
NEW_TOKENS = 20


def widen(config):
    """Larger than the CPU tests' models so bf16 GEMMs run real tiles: hidden 256, 16 experts."""
    config.hidden_size = 256
    for name in ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size"):
        if hasattr(config, name):
            setattr(config, name, 128)
    for name in ("num_local_experts", "num_experts", "n_routed_experts"):
        if getattr(config, name, None):
            setattr(config, name, 16)
    if hasattr(config, "head_dim") and config.model_type == "qwen3_moe":
        config.head_dim = 64
    return config


def build(arch: str, root: str) -> str:
    from transformers import AutoModelForCausalLM

    path = os.path.join(root, arch)
    if arch in GPT_OSS:  # hidden and intermediate multiples of 32 (MXFP4)
        _tiny.make_gpt_oss_checkpoint(path, mxfp4=arch.endswith("mxfp4"), hidden_size=256, intermediate_size=128,
                                      num_local_experts=16, head_dim=64)
        if arch == "gpt_oss":  # the fixture is float32: rewritten in bf16, as the other architectures are
            AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).save_pretrained(path)
        return path
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(widen(tiny_config(arch)), dtype=torch.bfloat16)
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buffer.copy_(torch.randn_like(buffer) * 0.1)
    model.save_pretrained(path)
    save_tokenizer(path)
    return path


def reference(path: str, ids: torch.Tensor, backend: str, dtype: torch.dtype = torch.bfloat16):
    from transformers import AutoModelForCausalLM

    extra = {}
    if os.path.basename(path) == "gpt_oss_mxfp4":  # dequantized by transformers, not its hub kernels
        from transformers import Mxfp4Config

        extra["quantization_config"] = Mxfp4Config(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, experts_implementation=backend, **extra)
    if dtype == torch.float32:  # some transformers releases dequantize MXFP4 to bf16 whatever dtype was asked for
        model = model.float()
    model = model.cuda()
    with torch.no_grad(), prompt_attention("cuda"):  # the attention backends the pipeline's generation uses
        logits = model(ids).logits.float()
        tokens = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    del model
    torch.cuda.empty_cache()
    return logits, tokens


def first_difference(a: torch.Tensor, b: torch.Tensor):
    diff = (a != b).nonzero()
    return None if diff.numel() == 0 else int(diff[0, -1])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--kernel", default="torch", choices=["torch", "triton"], help="MOE_KERNEL under test")
    parser.add_argument("--properties", default="{}", help='more pipeline properties as JSON, e.g. '
                        '\'{"MOE_CPU_EXPERTS": "all"}\' (misses computed on the CPU)')
    parser.add_argument("--archs", default=",".join(ARCHS), help=f"a subset of {','.join(ARCHS)}")
    args = parser.parse_args()
    archs = args.archs.split(",")
    unknown = sorted(set(archs) - set(ARCHS))
    if unknown:
        parser.error(f"unknown --archs {unknown}; choose from {','.join(ARCHS)}")
    # the GPU path unless told otherwise: the CPU share (on by default where it is faster) sums in another order
    properties = {"MOE_CPU_EXPERTS": "off", **json.loads(args.properties)}
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for arch in archs:
            path = build(arch, root)
            ids = torch.randint(2, VOCAB, (1, 33), generator=torch.Generator().manual_seed(1)).cuda()
            ref_logits, ref_tokens = reference(path, ids, "grouped_mm")
            eager_logits, eager_tokens = reference(path, ids, "eager")
            float32_logits, _ = reference(path, ids, "eager", torch.float32)  # the arbiter (docstring)
            spread = (eager_logits - ref_logits).abs().max().item()
            scale = ref_logits.abs().max().item()
            tolerance = max(TOLERANCE_FACTOR * spread, 2 * scale * 2**-8)
            for ratio in RATIOS:
                for tier, host in TIERS.items():
                    pipe = load_pipeline(path, "cuda", MOE_OFFLOAD_RATIO=ratio, MOE_HOST_CACHE=host,
                                         MOE_KERNEL=args.kernel, **properties)
                    with torch.no_grad(), prompt_attention("cuda"):
                        logits = pipe.model(ids).logits.float()
                        tokens = pipe.model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                                     do_sample=False)
                    diff = (logits - ref_logits).abs().max().item()
                    stats = pipe.get_offload_stats()
                    # the pipeline's own decoding: static cache, decode steps replayed as a CUDA graph
                    step_logits = []
                    decoded = pipe.generate_tokens(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                                   do_sample=False) if pipe.decoder is None else \
                        torch.tensor(pipe.decoder.generate(ids, NEW_TOKENS, NEW_TOKENS, on_logits=step_logits.append))
                    decoded_tokens = torch.cat([ids[0].cpu(), decoded])[None]
                    first_step_diff = ((step_logits[0] - ref_logits[:, -1].float()).abs().max().item()
                                       if step_logits else None)
                    row = {
                        "arch": arch, "ratio": ratio, "tier": tier,
                        "max_abs_logit_diff": diff, "logit_scale": scale,
                        "transformers_eager_vs_grouped_mm": spread, "tolerance": tolerance,
                        "ours_vs_float32": (logits - float32_logits).abs().max().item(),
                        "transformers_vs_float32": (ref_logits - float32_logits).abs().max().item(),
                        "within_tolerance": diff <= tolerance,
                        "greedy_identical": bool(torch.equal(tokens, ref_tokens)),
                        "first_token_difference": first_difference(tokens, ref_tokens),
                        "transformers_eager_greedy_identical": bool(torch.equal(eager_tokens, ref_tokens)),
                        "pipeline_greedy_identical": bool(torch.equal(decoded_tokens, ref_tokens.cpu())),
                        "pipeline_first_token_difference": first_difference(decoded_tokens, ref_tokens.cpu()),
                        "pipeline_prefill_max_abs_logit_diff": first_step_diff,
                        "pipeline_cuda_graph_steps": pipe.decoder.steps_replayed if pipe.decoder else 0,
                        "pipeline_cuda_graph_failure": pipe.decoder.graph_failure if pipe.decoder else None,
                        "hits": stats["hits"], "misses": stats["misses"], "bytes_streamed": stats["bytes_streamed"],
                        "experts_computed_on_cpu": stats["experts_computed_on_cpu"],
                        "fused_dense_ops": stats["fused_dense_ops"],
                    }
                    rows.append(row)
                    print(f"{arch:12s} ratio {ratio:3d} {tier:4s} diff {diff:.4f} tol {tolerance:.4f} "
                          f"(eager-vs-grouped {spread:.4f}) greedy {'same' if row['greedy_identical'] else 'DIFF'}"
                          f" hits {stats['hits']} misses {stats['misses']} | pipeline greedy "
                          f"{'same' if row['pipeline_greedy_identical'] else 'DIFF'} graph steps "
                          f"{row['pipeline_cuda_graph_steps']} | vs float32: ours {row['ours_vs_float32']:.4f}, "
                          f"transformers {row['transformers_vs_float32']:.4f}", flush=True)
                    pipe.close()
                    del pipe
                    torch.cuda.empty_cache()
    report = {
        "date": utc_now(),
        "machine": machine(),
        "versions": versions(),
        "dtype": "bfloat16", "kernel": args.kernel, "properties": properties, "new_tokens": NEW_TOKENS,
        "prompt_tokens": 33,
        "tolerance_rule": f"max|dlogits| <= max({TOLERANCE_FACTOR} x transformers eager-vs-grouped_mm spread, "
                          "2 bf16 ulps of the largest logit)",
        "rows": rows,
        "all_within_tolerance": all(r["within_tolerance"] for r in rows),
        "all_greedy_identical": all(r["greedy_identical"] for r in rows),
        "all_pipeline_greedy_identical": all(r["pipeline_greedy_identical"] for r in rows),
    }
    write_report(args.out, report)
    print(f"within tolerance: {report['all_within_tolerance']}  greedy identical: {report['all_greedy_identical']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
