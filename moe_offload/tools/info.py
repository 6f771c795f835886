"""`moe-offload info`: what a checkpoint holds and what each ratio would cost on the device, from headers alone.

Nothing is loaded: the numbers come from the safetensors headers (checkpoint.py), so this answers "will it
fit?" before spending minutes on a load.
"""

from __future__ import annotations

import math
from typing import Any

from ..checkpoint import Checkpoint
from ..config import OffloadConfig, make_config
from ..quant.fp8 import BlockFP8Spec
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
    dense_bytes = _dense_device_bytes(checkpoint)
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
        # the routed experts' weight quantization (compressed-tensors pack-quantized, GPTQ, AWQ: group_size None is
        # channel-wise; FP8 blocks; GPT-OSS's MXFP4), None where they are dense
        "quantization": None if spec is None else _quantization(spec, checkpoint),
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


def describe_budget(checkpoint: Checkpoint, properties: dict[str, Any]) -> dict[str, Any]:
    """The memory plan (budget.py) on a CUDA device at each of RATIOS, and, with MOE_DEVICE_MEMORY among
    `properties` (also MOE_CONTEXT, MOE_DTYPE, MOE_HOST_EMBEDDINGS), the ratio that budget gives. Builds the model
    on the meta device (transformers), so unlike `describe` it reads config.json through transformers; nothing is
    allocated and no GPU is needed."""
    import torch

    from .. import budget
    from ..integration import check_supported, model_facts

    device = torch.device("cuda")
    config = make_config(properties, environ={})
    _, _, _, facts = model_facts(checkpoint, check_supported(checkpoint), device, config)
    resolved, chosen, choice = budget.resolve(config, facts, device)
    options = dict(host_embeddings=config.moe_host_embeddings)
    by_ratio = {ratio: budget.plan(facts, ratio, chosen.context, device, **options) for ratio in RATIOS}
    return {
        "device": "cuda",
        "context": chosen.context,
        "by_ratio": {ratio: {"total": p.total, **p.terms} for ratio, p in by_ratio.items()},
        "device_memory": config.moe_device_memory,
        "ratio": resolved.moe_offload_ratio if config.moe_device_memory is not None else None,
        "why": choice.why if choice is not None else None,
        "summaries": {ratio: p.summary() for ratio, p in by_ratio.items()},
    }


def format_budget(plan: dict[str, Any]) -> str:
    lines = [f"device memory plan on a CUDA device (budget.py), {plan['context']} tokens of context (MOE_CONTEXT):"]
    lines += [f"  ratio {ratio:>3}  {summary}" for ratio, summary in plan["summaries"].items()]
    if plan["ratio"] is not None:
        lines.append(f"MOE_DEVICE_MEMORY gives MOE_OFFLOAD_RATIO={plan['ratio']}: {plan['why']}")
    return "\n".join(lines)


def _quantization(spec, checkpoint: Checkpoint) -> dict[str, Any]:
    if isinstance(spec, Mxfp4Spec):  # GPT-OSS's native experts
        return {"format": "mxfp4", "block_size": spec.block, "bits_per_weight": spec.bits_per_weight}
    if isinstance(spec, BlockFP8Spec):
        return _fp8_info(spec, checkpoint)
    return {"bits": spec.bits, "group_size": spec.group_size, "symmetric": spec.symmetric,
            "format": _format(checkpoint)}


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


def _fp8_info(spec: BlockFP8Spec, checkpoint: Checkpoint) -> dict[str, Any]:
    scales = {str(roles[role].dtype).replace("torch.", "") for tensors in checkpoint.experts_by_layer.values()
              for roles in tensors.per_expert.values() for role in roles if role.endswith(".weight_scale_inv")}
    return {"format": "fp8", "weight_dtype": "float8_e4m3fn", "block": [spec.block_n, spec.block_k],
            "scale_dtype": ", ".join(sorted(scales))}


def _dense_device_bytes(checkpoint: Checkpoint) -> int:
    """Bytes of the non-expert weights on the device: FP8 and GPTQ ones are dequantized at load to the checkpoint's
    other weights' dtype (GPTQ's to its scales' dtype), and their scales and zero points are not kept."""
    fp8 = checkpoint.fp8_dense
    total = 0
    for name in checkpoint.dense_names:
        entry = checkpoint.tensors[name]
        if name in fp8:
            total += math.prod(entry.shape) * checkpoint.dtype.itemsize
        elif name not in fp8.values():
            total += entry.nbytes
    for kinds in checkpoint.gptq_linears.values():
        packed, scales = checkpoint.tensors[kinds["qweight"]], checkpoint.tensors.get(kinds.get("scales"))
        total -= sum(checkpoint.tensors[name].nbytes for name in kinds.values())
        total += packed.shape[0] * (32 // checkpoint.quantization.bits) * packed.shape[1] * \
            (scales.dtype.itemsize if scales else 2)
    return total


def _weights(quantization: dict | None) -> str:
    if quantization is None:
        return "unquantized"
    if quantization.get("format") == "fp8":
        block = "x".join(map(str, quantization["block"]))
        return (f"fp8 e4m3, blocks {block}, {quantization['scale_dtype']} scales (FP8 block-quantized; other FP8 "
                "weights dequantized at load)")
    if quantization.get("format") == "mxfp4":
        return (f"mxfp4 (e2m1, E8M0 scale per {quantization['block_size']}: {quantization['bits_per_weight']} "
                "bits/weight)")
    kind = "symmetric" if quantization["symmetric"] else "asymmetric"
    size = quantization["group_size"]
    grouping = "channel-wise" if size is None else f"group size {size}"
    if quantization["format"] != "compressed-tensors":  # GPTQ, AWQ: zero points stored either way
        return f"int{quantization['bits']}, {grouping}, with zero points ({quantization['format']})"
    return f"int{quantization['bits']}, {grouping}, {kind} ({quantization['format']})"


def _format(checkpoint: Checkpoint) -> str:
    """The experts' quantized format as stored: 'compressed-tensors', or 'GPTQ v1' / 'GPTQ v2' (the zero-point
    convention, quant/gptq.py)."""
    scheme = checkpoint.gptq
    return "compressed-tensors" if scheme is None else scheme.name
