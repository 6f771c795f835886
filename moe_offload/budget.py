"""Fit by memory: the device bytes a load takes at each MOE_OFFLOAD_RATIO, and the largest ratio a budget holds.

Why: people size a model to their GPU in bytes (llama.cpp's --fit, accelerate's max_memory, OpenVINO's
MOE_OFFLOAD_RATIO=AUTO), not in percent of experts. MOE_DEVICE_MEMORY="8GiB", or MOE_OFFLOAD_RATIO=AUTO (the free
device memory less a margin), picks the largest ratio whose plan fits; a budget that cannot hold even ratio 0 fails
before a byte is loaded, with the numbers. Pure arithmetic over ModelFacts (counted on the model built on the meta
device, integration.model_facts), so `moe-offload info --device-memory` answers without a GPU.

The terms of a plan (bytes), and how each is known:
  weights      non-expert parameters and buffers on the device in the compute dtype: exact (counted on the meta
               model), less the input embedding table where MOE_HOST_EMBEDDINGS puts it in host RAM
  experts      resident experts x B, the slot pools' allocations (expert_format.py): exact
  kv_cache     transformers' StaticCache for MOE_CONTEXT positions, rounded up to the decoder's bucket: exact
  scratch      the streaming scratch, 2 x top_k rows, once any expert is offloaded (cache.ScratchPool): exact
  activations  one prefill of MOE_CONTEXT tokens at its peak: a layer's temporaries per token, the keys and values
               SDPA expands over the cache's positions, the decoder's [T, L] mask: estimated
  graphs       CUDA graphs' private memory pools, which keep what their capture allocated: the decode step and up to
               decoding.PREFILL_GRAPHS prefills of the longest prompt a graph may take: estimated, as activations
  runtime      CUDA context, cuBLAS workspaces, kernel modules: an estimated constant (CUDA only)
The estimated terms are checked on a GPU by bench/memory_plan.py (planned against torch's and NVML's peaks). The
plan is a bound for prompts up to MOE_CONTEXT tokens, not a typical use.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from . import defaults
from .config import OffloadConfig
from .defaults import Choice
from .errors import MoeOffloadError

MiB = 2**20
# MOE_CONTEXT left unset: the model's max_position_embeddings, at most this (llama.cpp's and Ollama's default
# context is 4096 too): a 40,960-position Qwen3-30B-A3B cache would take 3.8 GiB for prompts few users send.
DEFAULT_CONTEXT_CAP = 4096
# Estimated: torch's CUDA context with lazily loaded modules (about 500 MiB with CUDA 12-13 on H100/H200), cuBLAS's
# workspaces and the Triton kernels' modules. bench/memory_plan.py measures it.
RUNTIME_BYTES = 600 * MiB
# MOE_OFFLOAD_RATIO=AUTO leaves this much of the free device memory unplanned: allocator rounding, what the
# runtime loads lazily after the free memory is read, and what other processes on the GPU grow by.
AUTO_MARGIN_BYTES = 512 * MiB
AUTO_MARGIN_FRACTION = 0.05
FLOAT32 = 4


@dataclass(frozen=True)
class ModelFacts:
    """What a model's device bytes depend on (integration.model_facts counts them; tests write them by hand)."""

    weight_bytes: int  # non-expert parameters and buffers, on the device in the compute dtype
    embedding_bytes: int  # the input embedding table, part of weight_bytes
    embedding_reason: str | None  # why the table cannot live in host RAM (host_embeddings.why_not_hostable)
    experts: tuple[int, ...]  # routed experts per MoE layer
    row_bytes: int  # B: one expert's row in the engine's format (expert_format.py), quantized or not
    top_k: int
    kv_bytes_per_position: int  # the KV cache's bytes per position, all layers
    token_bytes: int  # activation temporaries per prompt token at a layer's peak (estimated)
    position_bytes: int  # per cache position: the keys and values SDPA expands over the heads (estimated)
    itemsize: int  # the compute dtype's bytes (the decoder's additive mask)
    max_positions: int | None  # max_position_embeddings


@dataclass(frozen=True)
class Plan:
    """The device bytes of one load: `terms` in the order the module docstring lists them."""

    ratio: int
    context: int
    resident: int  # experts resident on the device, all layers
    terms: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.terms.values())

    def summary(self) -> str:
        parts = " + ".join(f"{name.replace('_', ' ')} {size_text(value)}" for name, value in self.terms.items()
                           if value)
        return f"{size_text(self.total)} = {parts} ({self.context} tokens of context)"


def size_text(count: int) -> str:
    """Bytes as a person reads them in a plan: 7.91GiB, 98MiB, 2.5MiB."""
    if count >= 2**30:
        return f"{count / 2**30:.2f}GiB"
    return f"{count / MiB:.1f}MiB" if count < 10 * MiB else f"{count / MiB:.0f}MiB"


# -- facts from a config ------------------------------------------------------------------------------------------


def attention_facts(text_config, itemsize: int) -> tuple[int, int, int]:
    """(KV cache bytes per position over all layers, attention temporaries per token, bytes per cache position SDPA
    expands) of a transformers text config. DeepSeek's MLA caches its compressed latent (kv_lora_rank + the rotary
    part, one head) and expands keys and values for every head over the cache; other models cache K and V of
    num_key_value_heads and, with the decoder's explicit mask (transformers' use_gqa_in_sdpa), SDPA gets keys and
    values repeated to num_attention_heads."""
    hidden, heads = text_config.hidden_size, text_config.num_attention_heads
    layers = text_config.num_hidden_layers
    lora = getattr(text_config, "kv_lora_rank", None)
    if lora:
        rope, nope, v_dim = (text_config.qk_rope_head_dim, text_config.qk_nope_head_dim, text_config.v_head_dim)
        q = heads * (nope + rope)
        cached = lora + rope
        per_token = itemsize * (2 * q + 2 * cached + (getattr(text_config, "q_lora_rank", None) or 0)
                                + heads * v_dim + hidden)  # q, its rotary copy, latent, q's LoRA, output, o_proj
        per_position = itemsize * heads * (nope + v_dim + nope + rope + v_dim)  # kv_b_proj's output, expanded K, V
        return layers * itemsize * cached, per_token, per_position
    head_dim = getattr(text_config, "head_dim", None) or hidden // heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    q, kv = heads * head_dim, kv_heads * head_dim
    per_token = itemsize * (3 * q + 3 * kv + hidden)  # q, k, v, their rotary copies, SDPA's output, o_proj
    per_position = 2 * itemsize * q if kv_heads < heads else 0  # repeat_kv copies K and V to every head
    return layers * 2 * itemsize * kv, per_token, per_position


def token_bytes(text_config, itemsize: int, attention_per_token: int, inter: int, top_k: int,
                num_experts: int, dense_layers: bool) -> int:
    """Activation temporaries per prompt token at a layer's peak (estimated): the residual stream and the layer's
    output, plus the larger of the attention block and the MLP block (routed experts: float32 router scores, each
    (token, k) pair's float32 output and its [2I + I] intermediates; shared experts; where some layers have no
    routed experts (dense_layers), a dense MLP's [3 I_dense]), each after an RMSNorm's float32 temporaries."""
    hidden = text_config.hidden_size
    norm = 3 * FLOAT32 * hidden
    shared = (getattr(text_config, "shared_expert_intermediate_size", None)
              or (getattr(text_config, "n_shared_experts", None) or 0) * inter)
    routed = (FLOAT32 * (top_k * hidden + hidden + 2 * num_experts) + itemsize * num_experts
              + itemsize * top_k * 3 * inter + itemsize * 3 * shared)
    dense = itemsize * 3 * (getattr(text_config, "intermediate_size", None) or 0) if dense_layers else 0
    return 2 * itemsize * hidden + norm + max(attention_per_token, routed, dense)


def activation_bytes(facts: ModelFacts, tokens: int, positions: int) -> int:
    """Estimated peak of a forward of `tokens` prompt tokens over a cache of `positions`."""
    return (tokens * facts.token_bytes + positions * facts.position_bytes
            + tokens * positions * (facts.itemsize + 1))  # the decoder's bool [T, L] and its additive mask


# -- plans ----------------------------------------------------------------------------------------------------------


def context_tokens(facts: ModelFacts, requested: int | None) -> int:
    """MOE_CONTEXT: as set (at most the model's max_position_embeddings), else that capped at DEFAULT_CONTEXT_CAP."""
    if requested is None:
        return min(facts.max_positions or DEFAULT_CONTEXT_CAP, DEFAULT_CONTEXT_CAP)
    if facts.max_positions and requested > facts.max_positions:
        raise MoeOffloadError(f"MOE_CONTEXT={requested} is more than the model's {facts.max_positions} positions "
                              "(max_position_embeddings)")
    return requested


def plan(facts: ModelFacts, ratio: int, context: int, device: torch.device, host_embeddings: str = "auto",
         cuda_graphs: bool = True, runtime: bool = True) -> Plan:
    """The device bytes of a load at `ratio` with a KV cache of `context` positions (terms: module docstring).
    host_embeddings: the MOE_HOST_EMBEDDINGS mode (defaults.host_embeddings decides, as the load does); runtime:
    count the CUDA runtime's constant (not where it is already in use: MOE_OFFLOAD_RATIO=AUTO)."""
    from .cache import ZERO_COPY_MAX_PAIRS_PER_EXPERT
    from .decoding import _CACHE_BUCKET, PREFILL_GRAPHS

    rule = OffloadConfig(moe_offload_ratio=ratio)
    resident = [rule.resident_count(e) for e in facts.experts]
    offloaded = any(r < e for r, e in zip(resident, facts.experts))
    on_host, _ = defaults.host_embeddings(host_embeddings, device, ratio, facts.embedding_reason)
    positions = -(-context // _CACHE_BUCKET) * _CACHE_BUCKET  # decoding.StaticDecoder._ensure_cache
    cuda = device.type == "cuda"
    graphs = 0
    if cuda and cuda_graphs:
        # a zero-copy layer's prompt of more than this many tokens copies its misses, and is not captured
        graph_tokens = min([context] + [ZERO_COPY_MAX_PAIRS_PER_EXPERT * e // facts.top_k
                                        for r, e in zip(resident, facts.experts) if r < e])
        graphs = PREFILL_GRAPHS * activation_bytes(facts, graph_tokens, positions) + activation_bytes(facts, 1,
                                                                                                      positions)
    terms = {
        "weights": facts.weight_bytes - (facts.embedding_bytes if on_host else 0),
        "experts": sum(resident) * facts.row_bytes,
        "kv_cache": positions * facts.kv_bytes_per_position,
        "scratch": 2 * facts.top_k * facts.row_bytes if offloaded else 0,
        "activations": activation_bytes(facts, context, positions),
        "graphs": graphs,
        "runtime": RUNTIME_BYTES if cuda and runtime else 0,
    }
    return Plan(ratio, context, sum(resident), terms)


def fit(facts: ModelFacts, budget: int, context: int, device: torch.device, what: str, **options) -> Plan:
    """The plan of the largest ratio whose total is at most `budget` bytes (`what` names the budget in messages);
    a budget below ratio 0's plan is an error with the numbers. options: as for plan."""
    for ratio in range(100, -1, -1):
        candidate = plan(facts, ratio, context, device, **options)
        if candidate.total <= budget:
            return candidate
    raise MoeOffloadError(f"{what} cannot hold the model even at MOE_OFFLOAD_RATIO=0: that needs {candidate.summary()}"
                          f"; lower MOE_CONTEXT or give the device more memory")


def auto_budget(device: torch.device) -> tuple[int, str]:
    """(bytes, how they were found) for MOE_OFFLOAD_RATIO=AUTO: the free device memory less the margin."""
    free, total = torch.cuda.mem_get_info(device)
    margin = max(AUTO_MARGIN_BYTES, int(total * AUTO_MARGIN_FRACTION))
    budget = max(0, free - margin)
    return budget, (f"{size_text(free)} free on {torch.cuda.get_device_name(device)} less a {size_text(margin)} "
                    f"margin = {size_text(budget)}")


def resolve(config: OffloadConfig, facts: ModelFacts, device: torch.device) -> tuple[OffloadConfig, Plan,
                                                                                     Choice | None]:
    """The config with MOE_OFFLOAD_RATIO decided, the plan of the load (its context: MOE_CONTEXT decided), and the
    ratio's Choice where a budget chose it (None where the user set the ratio). Before anything is allocated."""
    context = context_tokens(facts, config.moe_context)
    options = dict(host_embeddings=config.moe_host_embeddings, cuda_graphs=config.moe_cuda_graph != "off")
    choice = None
    if config.moe_device_memory is not None:
        budget = config.moe_device_memory
        chosen = fit(facts, budget, context, device, f"MOE_DEVICE_MEMORY={size_text(budget)}", **options)
        choice = _ratio_choice(chosen, facts, f"MOE_DEVICE_MEMORY={size_text(budget)}", device, options)
    elif config.moe_offload_ratio == "auto" and device.type != "cuda":
        chosen = plan(facts, 100, context, device, **options)
        choice = Choice("MOE_OFFLOAD_RATIO", "100", "AUTO on a CPU device: the experts would be offloaded to the "
                                                    "same RAM they are computed in, so every one is resident")
    elif config.moe_offload_ratio == "auto":
        budget, found = auto_budget(device)
        options["runtime"] = False  # the CUDA context exists now, and the free memory is what it left
        chosen = fit(facts, budget, context, device, f"MOE_OFFLOAD_RATIO=AUTO ({found})", **options)
        choice = _ratio_choice(chosen, facts, f"AUTO: {found}", device, options)
    else:
        chosen = plan(facts, config.moe_offload_ratio, context, device, **options)
    return dataclasses.replace(config, moe_offload_ratio=chosen.ratio), chosen, choice


def _ratio_choice(chosen: Plan, facts: ModelFacts, source: str, device: torch.device, options: dict) -> Choice:
    why = f"the largest ratio whose plan fits {source}: {chosen.summary()}"
    for ratio in range(chosen.ratio + 1, 101):  # the next ratio that keeps more experts resident
        above = plan(facts, ratio, chosen.context, device, **options)
        if above.resident > chosen.resident:
            why += f"; ratio {ratio} would need {size_text(above.total)}"
            break
    return Choice("MOE_OFFLOAD_RATIO", str(chosen.ratio), why)
