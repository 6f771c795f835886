"""The random benchmark model as an FP8 block-quantized checkpoint, in the layout of Qwen3-30B-A3B-FP8: every
projection weight of the decoder layers (attention and routed experts; not the router, norms, embeddings or
head) becomes `weight` F8_E4M3 [out, in] plus `weight_scale_inv` F32 [ceil(out / 128), ceil(in / 128)], the scale
of each 128 x 128 block max |W| / 448, and config.json gets Qwen3-30B-A3B-FP8's `quantization_config`.

Why: `moe-offload quantize` writes int4/int8 only, and FP8 is what Qwen publishes for Qwen3-30B-A3B; the
harness's `--weights fp8` measures the engine on the same random weights in that format (quant/fp8.py reads
it). Shard by shard (one shard in memory at a time), into OUT; bench_quant.json is written last, so a folder
without it is made again.

Usage, from the repository root: python -m bench.fp8_checkpoint SOURCE OUT
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys

from safetensors.torch import load_file, save_file

from moe_offload.quant.fp8 import BlockFP8Spec, quantize

BLOCK = (128, 128)  # Qwen3-30B-A3B-FP8's weight_block_size
QUANTIZED = re.compile(r"\.layers\.\d+\..*_proj\.weight$")  # not mlp.gate (the router)
CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(BLOCK),
          "modules_to_not_convert": ["lm_head"]}


def convert(source: str, out: str) -> dict:
    """Write the FP8 checkpoint of `source` (a folder of sharded safetensors with its index) into `out`, which
    must not exist. Returns {"tensors_quantized": n, "bytes": the shards' bytes}."""
    os.makedirs(out)
    with open(os.path.join(source, "model.safetensors.index.json"), encoding="utf-8") as handle:
        index = json.load(handle)
    weight_map, quantized, total = {}, 0, 0
    for file in sorted(set(index["weight_map"].values())):
        tensors = {}
        for name, tensor in load_file(os.path.join(source, file)).items():
            if QUANTIZED.search(name) and tensor.dim() == 2:
                tensors[name], tensors[f"{name}_scale_inv"] = quantize(tensor, BlockFP8Spec(*BLOCK))
                quantized += 1
            else:
                tensors[name] = tensor
        save_file(tensors, os.path.join(out, file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(out, "model.safetensors.index.json"), "w", encoding="utf-8") as handle:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, handle, indent=1)
    for name in os.listdir(source):  # tokenizer, generation config, bench_model.json; config.json rewritten below
        path = os.path.join(source, name)
        if os.path.isfile(path) and not name.endswith(".safetensors") and name not in (
                "model.safetensors.index.json", "bench_quant.json"):
            shutil.copy2(path, os.path.join(out, name))
    with open(os.path.join(source, "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    config["quantization_config"] = CONFIG
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2)
    return {"tensors_quantized": quantized, "bytes": total}


def main() -> int:
    if len(sys.argv) != 3:
        print("usage: python -m bench.fp8_checkpoint SOURCE OUT", file=sys.stderr)
        return 2
    source, out = sys.argv[1:]
    if os.path.exists(out):
        print(f"error: {out} exists", file=sys.stderr)
        return 1
    if not os.path.isfile(os.path.join(source, "model.safetensors.index.json")):
        print(f"error: {source} holds no sharded safetensors checkpoint (model.safetensors.index.json)",
              file=sys.stderr)
        return 1
    done = convert(source, out)
    print(f"{done['tensors_quantized']} projection weights to FP8 e4m3 ({BLOCK[0]} x {BLOCK[1]} blocks, float32 "
          f"scales), checkpoint {done['bytes']:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
