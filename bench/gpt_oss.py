"""GPT-OSS-20B-shaped random MXFP4 model at MOE_OFFLOAD_RATIO 0/25/50/100 (issue 18's benchmark; GPU machine).

The model: transformers' GptOssForCausalLM at GPT-OSS-20B's shape (24 layers alternating sliding-window 128 and
full attention, 32 experts top-4, hidden 2880, expert intermediate 2880, 64 heads, 8 kv heads, head_dim 64, vocab
201088) written as the released checkpoint stores it: routed experts in native MXFP4 (`*_proj_blocks` uint8,
`*_proj_scales` E8M0, bf16 biases; quantization_config quant_method "mxfp4"), everything else bf16, one shard per
layer (~13.8 GB). Weights are random: MXFP4 codes uniform over all 16, scales 2^-9..2^-6 (weights of ~0.02, as
bench/common.py's N(0, 0.02)), other tensors N(0, 0.02), norms ones. Routing is random-weight routing.

Per ratio, in a process of its own (its device memory polled by NVML from outside, as bench/sides.py does): load,
one warm-up generation, then --repeats generations of a fresh random --prompt-len prompt and --decode-tokens
greedy tokens on the pipeline's static-cache decoder (its sliding-window layers masked, decoding.py; decode steps
replayed as CUDA graphs where every MoE layer is sync-free). Reported: prefill and
decode tok/s (median, min, max), expert bytes moved per decoded token (host copies + in-place reads + disk),
allocator and NVML peak device bytes, load seconds, the choices the load made.

llama.cpp beside it (the issue's comparison): with --gguf (the same model converted by llama.cpp's
convert_hf_to_gguf.py, which keeps GPT-OSS's MXFP4 experts; the random model has no tokenizer, so one must be
supplied to the converter as bench/llamacpp/convert_qwen3moe_gguf.py does for the Qwen model) and --llama-bench,
llama-bench -ngl 99 -ncmoe N runs at the N that matches each ratio (bench/derive.py's ncmoe_for).

Usage (repository root, GPU machine; nothing of it runs on a CPU in useful time):
  python -m bench.gpt_oss --out bench/results/<date>-gpt-oss.json [--ratios 0,25,50,100] [--model-dir DIR]
      [--gguf G --llama-bench B]
  (an existing --out is extended: ratios measured again replace their rows, so --ratios 0,25 in one device call
  and --ratios 50,100 in the next build one report; the model is written once into --model-dir)
  python -m bench.gpt_oss --tiny --device cpu --out /tmp/gpt-oss-tiny.json   # the whole flow on a tiny model
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from bench.common import MODEL_ROOT, STARTED, load_pipeline, log, sync, timed_generate, write_report
from bench.derive import ncmoe_for
from bench.sides import in_own_process, llamacpp, summary

SEED = 0
INIT_STD = 0.02
SCALE_CODES = (118, 122)  # E8M0 scales drawn from [118, 122): 2^-9 .. 2^-6
SPECS = {
    "full": dict(vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=24,
                 num_local_experts=32, num_experts_per_tok=4, num_attention_heads=64, num_key_value_heads=8,
                 head_dim=64, sliding_window=128, max_position_embeddings=131072, tie_word_embeddings=False,
                 bos_token_id=199998, eos_token_id=200002, pad_token_id=199999),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_local_experts=8,
                 num_experts_per_tok=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                 max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1),
}
MXFP4_CONFIG = {"quant_method": "mxfp4", "modules_to_not_convert": [
    "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}


def _tensors(config) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) of every tensor of the MXFP4 checkpoint: the meta model's state_dict, each expert weight
    replaced by its blocks ("blocks") and scales ("scales"); kind "ones" for norms, "normal" for the rest."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    out = []
    for name, tensor in model.state_dict().items():
        shape = tuple(tensor.shape)
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            experts, cols, rows = shape  # stored [E, K, N]: MXFP4 is [E, N, K/32, 16] and [E, N, K/32]
            out += [(f"{name}_blocks", (experts, rows, cols // 32, 16), "blocks"),
                    (f"{name}_scales", (experts, rows, cols // 32), "scales")]
        else:
            out.append((name, shape, "ones" if name.endswith("norm.weight") else "normal"))
    return out


def _draw(shape: tuple[int, ...], kind: str, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    if kind == "blocks":
        return torch.randint(0, 256, shape, dtype=torch.uint8, device=device, generator=generator).cpu()
    if kind == "scales":
        return torch.randint(*SCALE_CODES, shape, dtype=torch.uint8, device=device, generator=generator).cpu()
    if kind == "ones":
        return torch.ones(shape, dtype=torch.bfloat16)
    return torch.empty(shape, dtype=torch.bfloat16, device=device).normal_(0, INIT_STD, generator=generator).cpu()


def generate_model(path: str, spec: dict, device: torch.device) -> dict:
    """Write the random MXFP4 model of `spec` into `path`, one shard per layer (shard 0: embeddings, final norm,
    lm_head); skipped when the folder already holds it (bench_model.json, written last)."""
    import re

    from safetensors.torch import save_file
    from transformers import GptOssConfig

    marker = os.path.join(path, "bench_model.json")
    wanted = {"spec": spec, "seed": SEED, "init_std": INIT_STD, "scale_codes": list(SCALE_CODES)}
    if os.path.isfile(marker):
        with open(marker) as handle:
            if json.load(handle).get("identity") == wanted:
                return {"generated": False}
    started = time.perf_counter()
    os.makedirs(path, exist_ok=True)
    config = GptOssConfig(dtype="bfloat16", **spec)
    config.save_pretrained(path)
    with open(os.path.join(path, "config.json")) as handle:
        saved = json.load(handle)
    saved["quantization_config"] = MXFP4_CONFIG
    with open(os.path.join(path, "config.json"), "w") as handle:
        json.dump(saved, handle, indent=1)
    by_shard: dict[int, list] = {}
    for name, shape, kind in _tensors(config):
        match = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
        by_shard.setdefault(int(match.group(1)) + 1 if match else 0, []).append((name, shape, kind))
    generator = torch.Generator(device=device).manual_seed(SEED)
    weight_map, total = {}, 0
    for index, shard in enumerate(sorted(by_shard)):
        file = f"model-{index + 1:05d}-of-{len(by_shard):05d}.safetensors"
        tensors = {name: _draw(shape, kind, device, generator) for name, shape, kind in by_shard[shard]}
        save_file(tensors, os.path.join(path, file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({name: file for name in tensors})
        log(f"gen: {file} ({total / 1e9:.1f} GB so far)")
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as handle:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, handle, indent=1)
    with open(marker, "w") as handle:
        json.dump({"identity": wanted, "bytes": total}, handle)
    return {"generated": True, "bytes": total, "seconds": time.perf_counter() - started}


def measure(spec: dict) -> dict:
    """One ratio, in this process: what the module docstring lists."""
    device = torch.device(spec["device"])
    result: dict = {"ratio": spec["ratio"]}
    started = time.perf_counter()
    pipe = load_pipeline(spec["model_dir"], spec["device"], MOE_OFFLOAD_RATIO=spec["ratio"])
    try:
        result.update(load_s=time.perf_counter() - started, choices=[c.line() for c in pipe.choices],
                      expert_format=pipe.layers[0].format.describe(), expert_bytes=pipe.layers[0].expert_bytes)
        vocab = pipe.model.config.vocab_size
        generator = torch.Generator().manual_seed(SEED + 1)
        deadline = STARTED + spec["seconds"]
        runs = []
        for repeat in range(spec["repeats"] + 1):  # the first: warm-up (kernel compiles), left out
            ids = torch.randint(2, vocab - 16, (1, spec["prompt_len"]), generator=generator).to(device)
            prefill: dict = {}

            def after_prefill():
                stats = pipe.get_offload_stats()
                prefill.update(misses=stats["misses"], hits=stats["hits"])
                pipe.reset_offload_stats()

            pipe.reset_offload_stats()
            run = timed_generate(pipe.model, ids, spec["decode_tokens"], device, deadline, after_prefill, pipe=pipe)
            stats = pipe.get_offload_stats()
            moved = stats["bytes_streamed"]["host"] + stats["bytes_streamed"]["disk"] + stats["bytes_read_in_place"]
            run.update(prefill=prefill, decode_hits=stats["hits"], decode_misses=stats["misses"],
                       expert_bytes_per_token=moved / max(1, run["decode_steps"]))
            if repeat:
                runs.append(run)
            if time.perf_counter() > deadline:
                result["cut_short"] = "deadline"
                break
        sync(device)
        result.update(runs=runs, **{key: summary(r[key] for r in runs) for key in
                                    ("prefill_tok_s", "decode_tok_s", "expert_bytes_per_token")})
        if device.type == "cuda":
            result["allocator_peak_device_bytes"] = torch.cuda.max_memory_allocated(device)
    finally:
        pipe.close()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=False)
    parser.add_argument("--ratios", default="0,25,50,100")
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny model, a short workload (checks the flow)")
    parser.add_argument("--prompt-len", type=int, default=None)
    parser.add_argument("--decode-tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=150.0, help="per ratio's process")
    parser.add_argument("--gguf", help="the same model as an MXFP4 GGUF, for llama-bench beside ours")
    parser.add_argument("--llama-bench", help="llama-bench binary (with --gguf)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        write_report(spec["out"], measure(spec))
        return 0
    if not args.out:
        parser.error("--out is required")
    mode = "tiny" if args.tiny else "full"
    model_dir = args.model_dir or os.path.join(MODEL_ROOT, f"gpt-oss-{mode}")
    ratios = [int(r) for r in args.ratios.split(",")]
    report: dict = {"model_dir": model_dir, "spec": SPECS[mode], "runs": [], "llamacpp": []}
    if os.path.isfile(args.out):  # a device call's 10 minutes hold about two ratios: later calls add the others
        with open(args.out) as handle:
            report = json.load(handle)
        for key in ("runs", "llamacpp"):
            report[key] = [row for row in report.get(key, []) if row.get("ratio") not in ratios]
    report["gen"] = generate_model(model_dir, SPECS[mode], torch.device(args.device))
    prompt = args.prompt_len or (16 if args.tiny else 128)
    decode = args.decode_tokens or (4 if args.tiny else 32)
    for ratio in ratios:
        spec = dict(model_dir=model_dir, device=args.device, ratio=ratio, prompt_len=prompt, decode_tokens=decode,
                    repeats=args.repeats, seconds=args.seconds, out=f"{args.out}.worker.json")
        log(f"ours at ratio {ratio}")
        report["runs"].append(in_own_process(spec, args.seconds + 120, "bench.gpt_oss", "--worker"))
        if args.gguf and args.llama_bench:
            ncmoe = ncmoe_for(ratio, SPECS[mode]["num_hidden_layers"])
            log(f"llama-bench -ncmoe {ncmoe}")
            report["llamacpp"].append({"ratio": ratio, **llamacpp(args.llama_bench, args.gguf, ncmoe, [], prompt,
                                                                  decode, args.repeats, args.seconds)})
        write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
