"""Tiny FP8 block-quantized checkpoints in the exact layout of Qwen3-...-FP8 and DeepSeek-V3 (quant/fp8.py).

A tiny random checkpoint (tiny_models.py) is quantized here, tensor by tensor: every 2-D projection weight of
the decoder layers (attention, routed experts) becomes `weight` F8_E4M3 [out, in] plus `weight_scale_inv` F32
[ceil(out / bn), ceil(in / bk)] (quant/fp8.py quantize: scale = max |W| of the block / 448, as the released
checkpoints were made); the router (`mlp.gate`), norms, embeddings and lm_head stay as they were. The comparison
checkpoint holds the same model with every FP8 weight replaced by float(fp8) * its block's scale (in float32,
what transformers' dequantize computes), so transformers' own model class can run it.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch
from safetensors.torch import load_file, save_file
from tiny_models import save_tokenizer, tiny_config

from moe_offload.quant.fp8 import BlockFP8Spec, quantize

# the decoder layers' projection weights that FP8 checkpoints quantize (not the router `mlp.gate`)
_QUANTIZED = re.compile(r"\.layers\.\d+\..*_proj(_with_mqa)?\.weight$")


def dequantize_block(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """float(q) * scale of its block, in float32: the test's own dequantization, written apart from the engine's."""
    rows, cols = q.shape
    expanded = scale.float().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:rows, :cols]
    return q.float() * expanded


def make_source(path: str, moe_intermediate_size: int, seed: int = 0) -> str:
    """A tiny random float32 Qwen3-MoE (tiny_models' shape, with the given expert width) at `path`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config("qwen3_moe")
    config.moe_intermediate_size = moe_intermediate_size
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    save_tokenizer(path)
    return path


def quantize_fp8(src: str, dst: str, block: tuple[int, int], dequantized: str,
                 scale_dtype: torch.dtype = torch.float32) -> tuple[str, str]:
    """Write `src` as an FP8 block-quantized checkpoint to `dst` (scales in scale_dtype), and the same weights
    dequantized to `dequantized` (an unquantized float32 checkpoint). Returns (dst, dequantized)."""
    state = load_file(os.path.join(src, "model.safetensors"))
    quantized, plain = {}, {}
    for name, tensor in state.items():
        if not _QUANTIZED.search(name):
            quantized[name] = plain[name] = tensor
            continue
        q, scale = quantize(tensor, BlockFP8Spec(*block), scale_dtype)
        quantized[name], quantized[f"{name}_scale_inv"] = q, scale
        plain[name] = dequantize_block(q, scale, block)
    with open(os.path.join(src, "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    for folder, tensors in ((dst, quantized), (dequantized, plain)):
        os.makedirs(folder, exist_ok=True)
        save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        quant = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",  # as Qwen3-30B-A3B-FP8's
                 "weight_block_size": list(block), "modules_to_not_convert": ["lm_head"]}
        with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as handle:
            json.dump(dict(config, quantization_config=quant) if folder == dst else config, handle)
        for name in os.listdir(src):  # the tokenizer's files
            if name.startswith("tokenizer") or name == "special_tokens_map.json":
                shutil.copy(os.path.join(src, name), folder)
    return dst, dequantized
