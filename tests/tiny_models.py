"""Tiny random checkpoints of every supported architecture, written with transformers' own save_pretrained.

Tests compare moe-offload against transformers loading the very same folder, so any layout transformers
writes (per-expert hub names, sharded with an index) or reads (fused 3-D experts) is covered here.
"""

from __future__ import annotations

import json
import os
import re

import torch
from safetensors.torch import save_file

VOCAB = 320


def tiny_config(arch: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    if arch == "mixtral":
        return tf.MixtralConfig(intermediate_size=24, num_hidden_layers=2, num_local_experts=8,
                                num_experts_per_tok=2, **common)
    if arch == "qwen2_moe":
        return tf.Qwen2MoeConfig(intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                                 num_hidden_layers=2, num_experts=8, num_experts_per_tok=2, **common)
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2, num_experts=8,
                                 num_experts_per_tok=2, head_dim=8, **common)
    if arch == "olmoe":
        return tf.OlmoeConfig(intermediate_size=16, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2,
                              **common)
    if arch == "deepseek_v3":
        common.update(num_key_value_heads=4)
        return tf.DeepseekV3Config(intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
                                   first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1,
                                   num_experts_per_tok=2, n_group=2, topk_group=1, q_lora_rank=16, kv_lora_rank=16,
                                   qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, **common)
    if arch == "deepseek_v2":
        common.update(num_key_value_heads=4)
        return tf.DeepseekV2Config(intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
                                   first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1,
                                   num_experts_per_tok=2, n_group=2, topk_group=1, topk_method="group_limited_greedy",
                                   q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                   v_head_dim=8, **common)
    raise ValueError(arch)


ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "deepseek_v2")


def _randomise_router_bias(model) -> None:
    """DeepSeek's correction bias starts at zero; make it non-zero so grouped routing is really exercised."""
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buffer.copy_(torch.randn_like(buffer) * 0.1)


def save_tokenizer(path: str) -> None:
    """A byte-level BPE tokenizer over the tiny vocabulary, trained on a few lines of code."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 8, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n"] * 4
    tokenizer.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)


def make_checkpoint(arch: str, path: str, layout: str = "per_expert", max_shard_size: str | None = None,
                    seed: int = 0, with_tokenizer: bool = True) -> str:
    """Write a tiny random `arch` checkpoint to `path` in the given expert layout; returns path."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32)
    with torch.no_grad():
        _randomise_router_bias(model)
    if layout == "per_expert":
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(path, **kwargs)
    elif layout == "fused":  # transformers' in-memory names: experts.gate_up_proj [E, 2I, H], experts.down_proj
        os.makedirs(path, exist_ok=True)
        model.config.save_pretrained(path)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    else:
        raise ValueError(layout)
    if with_tokenizer:
        save_tokenizer(path)
    return path


_EXPERT_WEIGHT = re.compile(r"\.experts\.\d+\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")


def quantize_experts(src: str, dst: str, spec, scale_dtype: torch.dtype = torch.bfloat16,
                     dequantized: str | None = None) -> str:
    """Copy the per-expert checkpoint `src` to `dst` with every routed expert projection written as
    compressed-tensors pack-quantized tensors (`weight_packed`, `weight_scale`, [`weight_zero_point`,]
    `weight_shape`: round to nearest, from the weight in `scale_dtype`, so the scales are in it) and config.json's
    quantization_config saying so; everything else as it was. With `dequantized`, also write there the same
    model with those experts replaced by what compressed-tensors decompresses them to (in scale_dtype, stored as
    the source's float32): the checkpoint transformers loads to compare against."""
    from safetensors.torch import load_file

    from moe_offload.quant.format import dequantize, quantization_config
    from moe_offload.quant.methods import quantize_weight

    state = load_file(os.path.join(src, "model.safetensors"))
    quantized, plain = {}, {}
    for name, tensor in state.items():
        if not _EXPERT_WEIGHT.search(name):
            quantized[name] = plain[name] = tensor
            continue
        module = name.removesuffix(".weight")
        tensors = quantize_weight(tensor.to(scale_dtype), spec, "rtn")
        quantized.update({f"{module}.{key}": value for key, value in tensors.items()})
        plain[name] = dequantize(tensors, spec).to(scale_dtype).to(tensor.dtype)
    for folder, tensors in ((dst, quantized), (dequantized, plain)):
        if folder is None:
            continue
        os.makedirs(folder, exist_ok=True)
        save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(src, "config.json"), encoding="utf-8") as handle:
            config = json.load(handle)
        if folder == dst:
            config["quantization_config"] = quantization_config(spec, ["lm_head"])
        with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as handle:
            json.dump(config, handle)
    return dst


def gpt_oss_config(**overrides):
    """A tiny GptOssConfig: two layers (one sliding-window, one full attention), 8 experts top-2, hidden 64 and
    intermediate 32 (MXFP4 needs both divisible by 32), a window shorter than the tests' prompts; `overrides`
    replace any of these (bench/gpu_correctness.py widens it)."""
    import transformers as tf

    rope = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 2.0, "original_max_position_embeddings": 128,
            "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False}
    fields = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_local_experts=8,
                  num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                  max_position_embeddings=256, rope_parameters=rope, tie_word_embeddings=False, bos_token_id=0,
                  eos_token_id=1)
    return tf.GptOssConfig(**{**fields, **overrides})


def make_gpt_oss_checkpoint(path: str, mxfp4: bool = False, seed: int = 0, **overrides) -> str:
    """A tiny random GPT-OSS checkpoint written by transformers' save_pretrained (experts.gate_up_proj [E, H, 2I]
    with biases, float32). Experts, biases, sinks and the router bias are drawn large enough (std 0.5) that the
    clamped SwiGLU's limits are reached. mxfp4: the experts' weights replaced by their MXFP4 quantization in
    GPT-OSS's native layout (`*_blocks` uint8 [E, N, K/32, 16], `*_scales` uint8 [E, N, K/32]), biases and the
    rest in bfloat16 as the released checkpoints have them, and quantization_config quant_method "mxfp4". The
    router's weights are drawn so that most experts get tokens (its default init would route by the bias alone)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from moe_offload.quant import mxfp4 as fp4

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(gpt_oss_config(**overrides), dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".experts." in name or name.endswith("sinks"):
                param.normal_(0, 0.5)
            elif ".router." in name:
                param.normal_(0, 0.3 if name.endswith("weight") else 0.1)
    model.save_pretrained(path)
    save_tokenizer(path)
    if not mxfp4:
        return path
    file = os.path.join(path, "model.safetensors")
    state = load_file(file)
    out = {}
    for name, tensor in state.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = fp4.quantize(tensor.transpose(1, 2))  # [E, K, N] -> [E, N, K] -> MXFP4
            out[f"{name}_blocks"], out[f"{name}_scales"] = blocks, scales
        else:
            out[name] = tensor.to(torch.bfloat16)
    save_file(out, file, metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as handle:
        json.dump(config, handle)
    return path


TIERS = {"host": "auto", "disk": 0}  # MOE_HOST_CACHE that puts the offloaded experts in each tier


def prompt_ids() -> torch.Tensor:
    """The correctness tests' prompt: 13 random token ids [1, T], the same every call."""
    return torch.randint(2, VOCAB, (1, 13), generator=torch.Generator().manual_seed(0))


def save_quantized_pair(src: str, dst: str, dequantized: str | None, quantized: dict, plain: dict,
                        quantization_config: dict) -> str:
    """Write `quantized` (tensors in a quantized layout) to `dst` with src's config.json plus quantization_config,
    and, where `dequantized` is given, `plain` (the same weights as the format dequantizes them) there with src's
    config unchanged: the checkpoint under test and its reference. Returns dst."""
    with open(os.path.join(src, "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    for folder, tensors in ((dst, quantized), (dequantized, plain)):
        if folder is None:
            continue
        os.makedirs(folder, exist_ok=True)
        save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        written = dict(config, quantization_config=quantization_config) if folder == dst else config
        with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as handle:
            json.dump(written, handle)
    return dst
