"""`moe-offload info`: what a checkpoint holds and what each ratio would cost on the device, from headers alone.

Nothing is loaded: the numbers come from the safetensors headers (checkpoint.py), so this answers "will it
fit?" before spending minutes on a load.
"""

from __future__ import annotations

import math
from typing import Any

from ..checkpoint import Checkpoint
from ..config import OffloadConfig
from ..quant.mxfp4 import Mxfp4Spec
from ..validation import check_config_experts, check_top_k, require_routed_experts, text_config

RATIOS = (0, 10, 25, 37, 50, 75, 100)


def describe(checkpoint: Checkpoint) -> dict[str, Any]:
    config = checkpoint.config  # a JSON object: Checkpoint refuses anything else in one line
    require_routed_experts(checkpoint.experts_by_layer, config, checkpoint.index_note())
    check_config_experts(config, checkpoint.experts_by_layer)
    layers = [{"layer": layer, "experts": tensors.count, "expert_bytes": tensors.bytes_per_expert}
              for layer, tensors in sorted(checkpoint.experts_by_layer.items())]
    spec = checkpoint.quantization
    dense_bytes = sum(checkpoint.tensors[name].nbytes for name in checkpoint.dense_names)
    top_k = check_top_k(text_config(config).get("num_experts_per_tok"), min(l["experts"] for l in layers))
    per_ratio = {}
    for ratio in RATIOS:
        rule = OffloadConfig(moe_offload_ratio=ratio)
        experts = sum(rule.resident_count(l["experts"]) * l["expert_bytes"] for l in layers)
        staging = 2 * top_k * max(l["expert_bytes"] for l in layers)
        per_ratio[ratio] = {"expert_bytes": experts, "device_bytes": dense_bytes + experts + staging}
    return {
        "path": checkpoint.root,
        "model_type": config.get("model_type"),
        "dtype": str(checkpoint.dtype).replace("torch.", ""),
        # the routed experts' weight quantization (compressed-tensors pack-quantized), None where they are dense
        "quantization": None if spec is None else _quantization(spec),
        # GPT-OSS's experts (biases, transposed and interleaved gate/up, clamped SwiGLU), by their tensors
        "expert_layout": "gpt_oss" if any(name.endswith("_proj_bias") for tensors in
                                          checkpoint.experts_by_layer.values() for name in tensors.fused) else "swiglu",
        "moe_layers": len(layers),
        "layers": layers,
        "experts_per_token": top_k,
        "non_expert_bytes": dense_bytes,
        "expert_bytes_total": sum(l["experts"] * l["expert_bytes"] for l in layers),
        "staging_bytes": 2 * top_k * max(l["expert_bytes"] for l in layers),
        "device_bytes_by_ratio": per_ratio,
    }


def _quantization(spec) -> dict[str, Any]:
    if isinstance(spec, Mxfp4Spec):  # GPT-OSS's native experts
        return {"format": "mxfp4", "block_size": spec.block, "bits_per_weight": spec.bits_per_weight}
    return {"bits": spec.bits, "group_size": spec.group_size, "symmetric": spec.symmetric}


def human_bytes(count: float) -> str:
    if count < 1024:
        return f"{int(count)} B"
    exponent = min(int(math.log(count, 1024)), 4)
    return f"{count / 1024 ** exponent:.2f} {['B', 'KiB', 'MiB', 'GiB', 'TiB'][exponent]}"


def format_info(info: dict[str, Any]) -> str:
    experts = sorted({l["experts"] for l in info["layers"]})
    sizes = sorted({l["expert_bytes"] for l in info["layers"]})
    lines = [
        f"model            {info['path']}",
        f"architecture     {info['model_type']} ({info['dtype']})",
        f"MoE layers       {info['moe_layers']} (layers {', '.join(str(l['layer']) for l in info['layers'])})",
        f"experts/layer    {', '.join(map(str, experts))} routed, top-{info['experts_per_token']}",
        f"expert weights   {_weights(info['quantization'])}" + (
            ", GPT-OSS experts (biases, clamped SwiGLU)" if info.get("expert_layout") == "gpt_oss" else ""),
        f"bytes/expert     {', '.join(f'{s} ({human_bytes(s)})' for s in sizes)}",
        f"non-expert bytes {info['non_expert_bytes']} ({human_bytes(info['non_expert_bytes'])})",
        f"expert bytes     {info['expert_bytes_total']} ({human_bytes(info['expert_bytes_total'])})",
        "device bytes by MOE_OFFLOAD_RATIO (non-expert + resident experts + streaming scratch; KV cache extra):",
    ]
    for ratio, row in info["device_bytes_by_ratio"].items():
        lines.append(f"  ratio {ratio:>3}  {row['device_bytes']:>16}  ({human_bytes(row['device_bytes'])})")
    return "\n".join(lines)


def _weights(quantization: dict | None) -> str:
    if quantization is None:
        return "unquantized"
    if quantization.get("format") == "mxfp4":
        return (f"mxfp4 (e2m1, E8M0 scale per {quantization['block_size']}: {quantization['bits_per_weight']} "
                "bits/weight)")
    kind = "symmetric" if quantization["symmetric"] else "asymmetric"
    return f"int{quantization['bits']}, group size {quantization['group_size']}, {kind} (compressed-tensors)"
