"""Plug the offloaded experts into transformers' own model classes, and load a checkpoint without
materialising it.

transformers (>= 5.17) routes every `@use_experts_implementation` experts module through
`ALL_EXPERTS_FUNCTIONS[config._experts_implementation]`, called as `fn(module, hidden, top_k_index,
top_k_weights)`. We register one function there, "moe_offload", that hands the call to the module's
OffloadedExperts. Routers, shared experts, attention and norms stay transformers' code, untouched.

Loading: the model is built on the meta device; the routed experts' 3-D parameters are removed before anything
is allocated; every other parameter is allocated on the target device and filled tensor by tensor from the
safetensors files; only the resident share of routed experts is copied to the device (cache.py), the rest go
to the host tier or stay on disk (tiers.py). No step holds the whole model in host RAM.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import re
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from . import budget, defaults, piecewise
from .cache import OffloadedExperts, ScratchPool
from .checkpoint import Checkpoint, ExpertLocation
from .config import OffloadConfig
from .errors import MoeOffloadError
from .expert_format import ClampedSwiGLU, ExpertFormat
from .host_embeddings import hostable_input_embedding, move_input_embeddings_to_host, why_not_hostable
from .policy import make_policy
from .quant import fp8
from .tiers import DiskTier, HostTier
from .transfer import DISK_THREADS, ExpertFetcher, Transfer
from .validation import (check_buffer_dtype, check_routed_experts, check_top_k, ignore_on_load,
                         report_unexpected, require_routed_experts)

IMPLEMENTATION = "moe_offload"
# Hub checkpoints that name a module differently from the transformers class that loads them.
_KEY_RENAMES = ((".block_sparse_moe.", ".mlp."),)
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")
log = logging.getLogger("moe_offload")


def offloaded_experts_forward(module, hidden_states, top_k_index, top_k_weights):
    """transformers experts backend: hidden [T, H], top_k_index [T, K], top_k_weights [T, K] -> [T, H]."""
    runtime: OffloadedExperts | None = getattr(module, "_moe_offload", None)
    if runtime is None:
        raise RuntimeError("experts module was not prepared by moe_offload (load it with LLMPipeline)")
    recording = piecewise.active()
    if recording is not None and not runtime.sync_free(top_k_index.numel()):  # a graph segment ends here
        return recording.moe_call(runtime, hidden_states, top_k_index, top_k_weights, _act_fn(module))
    return runtime.forward(hidden_states, top_k_index, top_k_weights, _act_fn(module))


def _act_fn(module):
    """The experts' activation; None for GPT-OSS's, whose clamped SwiGLU the expert format carries (ClampedSwiGLU)."""
    return getattr(module, "act_fn", None)


def register_backend() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, offloaded_experts_forward)


def resolve_dtype(config: OffloadConfig, checkpoint: Checkpoint, device: torch.device) -> torch.dtype:
    if config.moe_dtype != "auto":
        return getattr(torch, config.moe_dtype)
    return checkpoint.dtype if device.type == "cuda" else torch.float32


def load_hf_config(checkpoint: Checkpoint):
    from transformers import AutoConfig

    root, model_type = checkpoint.root, checkpoint.config.get("model_type")
    try:
        return AutoConfig.from_pretrained(root)
    except (ValueError, KeyError, OSError, TypeError) as err:
        raise MoeOffloadError(
            f"unsupported architecture {model_type!r}: transformers cannot build it ({str(err).splitlines()[0]})"
        ) from None


def check_supported(checkpoint: Checkpoint):
    """The checkpoint's transformers config, once its architecture is known and it has routed experts."""
    hf_config = load_hf_config(checkpoint)
    require_routed_experts(checkpoint.experts_by_layer, checkpoint.config, checkpoint.index_note())
    return hf_config


def _build_meta_model(hf_config, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    register_backend()
    try:
        with torch.device("meta"), contextlib.redirect_stderr(io.StringIO()):
            return AutoModelForCausalLM.from_config(hf_config, dtype=dtype, experts_implementation=IMPLEMENTATION)
    except ValueError as err:
        raise MoeOffloadError(
            f"unsupported architecture {hf_config.model_type!r}: {str(err).splitlines()[0]}"
        ) from None


@dataclass
class ExpertsSite:
    """One experts module of the model, with the facts the loader needs about it."""

    name: str
    module: torch.nn.Module
    layer: int
    num_experts: int
    inter: int
    hidden: int
    glu: ClampedSwiGLU | None = None  # GPT-OSS's experts (biases, transposed, interleaved gate/up)


def gpt_oss_glu(module) -> ClampedSwiGLU | None:
    """GPT-OSS's experts module's activation (its _apply_gate's alpha and limit), None for any other module. By
    class name: another transposed, biased experts class may gate differently, and must not pass for this one."""
    if type(module).__name__ != "GptOssExperts" or not (getattr(module, "has_bias", False)
                                                      and getattr(module, "is_transposed", False)
                                                      and not getattr(module, "is_concatenated", True)):
        return None
    return ClampedSwiGLU(float(module.alpha), float(module.limit))


def find_expert_sites(model, model_type: str) -> list[ExpertsSite]:
    sites = []
    for name, module in model.named_modules():
        if not (hasattr(module, "has_gate") and hasattr(module, "gate_up_proj") and hasattr(module, "down_proj")):
            continue
        glu = gpt_oss_glu(module)
        if glu is None and (not module.has_gate or getattr(module, "has_bias", False)
                            or getattr(module, "is_transposed", False) or not getattr(module, "is_concatenated", True)
                            or getattr(module, "has_post_expert_norm", False)):
            raise MoeOffloadError(f"unsupported architecture {model_type!r}: its experts are not gated SwiGLU "
                                  "[E, 2I, H] / [E, H, I] matrices without bias (nor GPT-OSS's)")
        match = _LAYER_INDEX.search(name)
        if match is None:
            raise MoeOffloadError(f"unsupported architecture {model_type!r}: experts module {name} is not in a layer")
        if glu is None:
            num_experts, two_inter, hidden = module.gate_up_proj.shape
        else:  # transposed: [E, H, 2I]
            num_experts, hidden, two_inter = module.gate_up_proj.shape
        sites.append(ExpertsSite(name, module, int(match.group(1)), num_experts, two_inter // 2, hidden, glu))
    if not sites:
        raise MoeOffloadError(f"{model_type!r} is a dense model: it has no routed experts to offload")
    if len({(s.inter, s.hidden) for s in sites}) > 1:
        raise MoeOffloadError("MoE layers with different expert shapes are not supported yet")
    return sites


def select_kernel(config: OffloadConfig, device: torch.device, hf_config):
    """The fused Triton expert kernel, or None for the eager torch loop (see OffloadConfig.moe_kernel). GPT-OSS's
    experts (config hidden_act "silu", their clamped SwiGLU in the format) take kernels/triton_gpt_oss.py."""
    if config.moe_kernel == "torch":
        return None
    why_not = None
    if device.type != "cuda":
        why_not = "it needs a CUDA device"
    elif getattr(hf_config, "hidden_act", None) != "silu":
        why_not = f"it supports SiLU experts only, not {getattr(hf_config, 'hidden_act', None)!r}"
    else:
        try:
            from .kernels.triton_moe import fused_moe
            return fused_moe
        except ImportError:
            why_not = "triton is not installed (pip install 'moe-offload[gpu]')"
    if config.moe_kernel == "triton":
        raise MoeOffloadError(f"MOE_KERNEL=triton is not available: {why_not}")
    return None


def _fp32_patterns(model, dtype: torch.dtype) -> list[str]:
    """Parameters transformers keeps in float32 even in a half-precision model (e.g. DeepSeek's router)."""
    plan = getattr(model, "_get_dtype_plan", None)
    return list(plan(dtype)) if plan is not None else []


def _materialise_dense(model, checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype,
                       progress: bool, host_embeddings: bool = False) -> None:
    """Allocate every non-expert parameter on `device` and fill it from the checkpoint, one tensor at a time.
    host_embeddings (CUDA): the input embedding table, where it can live in host RAM (host_embeddings.py), is
    allocated there instead and moved behind its Triton gather, never touching the device."""
    for pattern in _fp32_patterns(model, dtype):
        for name, param in model.named_parameters():
            if pattern in name and param.dtype != torch.float32:
                param.data = param.data.to(torch.float32)
    on_host = hostable_input_embedding(model) if host_embeddings and device.type == "cuda" else None
    with _set_aside(model, on_host):
        model.to_empty(device=device)
    if on_host is not None:
        on_host.to_empty(device="cpu")
    targets = dict(model.state_dict(keep_vars=True))
    filled: set[str] = set()
    files: dict[str, list[tuple[str, str]]] = {}
    unexpected: list[str] = []
    # GPTQ Linears outside the routed experts: their tensors make one weight, dequantized below; FP8 weights'
    # block scales are read with their weight (fp8_dense: weight -> scales, checked by .quantization)
    fp8_dense = checkpoint.fp8_dense
    skipped = {name for kinds in checkpoint.gptq_linears.values() for name in kinds.values()} | set(fp8_dense.values())
    gptq_targets: dict[str, str] = {}
    for key in [name for name in checkpoint.dense_names if name not in skipped] + list(checkpoint.gptq_linears):
        target = key
        for old, new in _KEY_RENAMES:
            if target not in targets:
                target = target.replace(old, new)
        if target in targets and key in checkpoint.gptq_linears:
            gptq_targets[key] = target
        elif target in targets:
            files.setdefault(checkpoint.tensors[key].path, []).append((key, target))
        else:
            unexpected.append(key)
    report_unexpected(unexpected, ignore_on_load(model))  # as transformers does: warn, but refuse expert extras
    for key, target in ((k, t) for pairs in files.values() for k, t in pairs):
        shape = checkpoint.tensors[key].shape
        if tuple(shape) != tuple(targets[target].shape):  # checked before a byte is read or a bar is drawn
            raise MoeOffloadError(f"{key} has shape {list(shape)}, the model expects {list(targets[target].shape)}")
        if key not in fp8_dense:
            check_buffer_dtype(key, checkpoint.tensors[key].dtype, targets[target])
    with torch.no_grad(), tqdm(total=sum(len(v) for v in files.values()), desc="dense weights", unit="tensor",
                               disable=not progress, leave=False) as bar:
        for path, pairs in files.items():
            try:
                with safe_open(path, framework="pt", device="cpu") as handle:
                    for key, target in pairs:
                        tensor = handle.get_tensor(key)
                        if key in fp8_dense:  # float32 products, rounded once by copy_ as transformers' dequantize
                            tensor = fp8.dequantize(tensor, _read_tensor(checkpoint, fp8_dense[key]),
                                                    checkpoint.quantization)
                        targets[target].copy_(tensor)
                        filled.add(target)
                        bar.update(1)
            except SafetensorError as err:  # whatever our header checks did not anticipate
                raise MoeOffloadError(f"corrupt safetensors file {os.path.basename(path)}: {err}") from None
        for key, target in gptq_targets.items():
            targets[target].copy_(checkpoint.gptq_linear_weight(key, tuple(targets[target].shape)))
            filled.add(target)
    _initialise_buffers(model, filled)
    if "lm_head.weight" in targets and "lm_head.weight" not in filled:
        model.tie_weights()
        if getattr(model.config, "tie_word_embeddings", False) or getattr(
                model.get_output_embeddings(), "weight", None) is model.get_input_embeddings().weight:
            filled.add("lm_head.weight")
    missing = sorted(set(targets) - filled - _non_persistent(model))
    if missing:
        raise MoeOffloadError(f"checkpoint lacks {len(missing)} tensors the model needs, e.g. "
                              f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}")
    if on_host is not None:
        move_input_embeddings_to_host(model, device)


def _read_tensor(checkpoint: Checkpoint, name: str) -> torch.Tensor:
    """One tensor of the checkpoint, from whichever shard holds it."""
    with safe_open(checkpoint.tensors[name].path, framework="pt", device="cpu") as handle:
        return handle.get_tensor(name)


@contextlib.contextmanager
def _set_aside(model: torch.nn.Module, child: torch.nn.Module | None):
    """Detach `child` from its parent for the block (what model-wide calls like to_empty then skip)."""
    if child is None:
        yield
        return
    name = next(name for name, module in model.named_modules() if module is child)
    parent = model.get_submodule(name.rpartition(".")[0])
    attribute = name.rpartition(".")[2]
    setattr(parent, attribute, None)
    try:
        yield
    finally:
        setattr(parent, attribute, child)


def _non_persistent(model) -> set[str]:
    names = set()
    for module_name, module in model.named_modules():
        for buffer in getattr(module, "_non_persistent_buffers_set", ()):
            names.add(f"{module_name}.{buffer}" if module_name else buffer)
    return names


def _initialise_buffers(model, filled: set[str]) -> None:
    """Recompute buffers that are not stored in checkpoints (rotary inv_freq), as transformers' loader does.

    Only for modules without parameters of their own: _init_weights would re-randomise loaded weights.
    """
    for module_name, module in model.named_modules():
        own = [n for n, _ in module.named_buffers(recurse=False)]
        unfilled = [n for n in own if f"{module_name}.{n}" not in filled]
        if not unfilled:
            continue
        if not any(True for _ in module.parameters(recurse=False)):
            model._init_weights(module)
        elif set(unfilled) & set(getattr(module, "_non_persistent_buffers_set", ())):
            raise MoeOffloadError(f"unsupported architecture: cannot initialise buffer {module_name}.{unfilled[0]}")


@dataclass
class LoadedModel:
    """What build_offloaded_model made: the transformers model, its experts' runtimes and sites (in layer order),
    the choices the load made for properties left at auto (defaults.py), the config as decided and its plan."""

    model: torch.nn.Module
    runtimes: list[OffloadedExperts]
    sites: list[ExpertsSite]
    choices: list[defaults.Choice]
    config: OffloadConfig  # the user's, with MOE_OFFLOAD_RATIO decided (budget.resolve)
    plan: budget.Plan  # the device bytes planned for this load


def model_facts(checkpoint: Checkpoint, hf_config, device: torch.device, config: OffloadConfig):
    """(meta model, expert sites, expert locations, budget.ModelFacts): the model built on the meta device and
    checked against the checkpoint, and what its device bytes depend on, counted on it. Nothing is allocated."""
    dtype = resolve_dtype(config, checkpoint, device)
    model = _build_meta_model(hf_config, dtype)
    sites = find_expert_sites(model, hf_config.model_type)
    # Checked before anything is allocated, so a bad checkpoint fails at once with one line.
    check_experts_match(checkpoint, sites, model)
    locations = {s.layer: checkpoint.expert_locations(s.layer, s.num_experts, s.hidden, s.inter, s.glu)
                 for s in sites}
    routed = {id(t) for s in sites for t in (s.module.gate_up_proj, s.module.down_proj)}
    fp32 = _fp32_patterns(model, dtype)
    tensors = {id(t): (name, t) for name, t in [*model.named_parameters(), *model.named_buffers()]
               if id(t) not in routed}
    weights = sum(t.numel() * (4 if t.is_floating_point() and any(p in name for p in fp32) else t.element_size())
                  for name, t in tensors.values())
    table = getattr(model.get_input_embeddings(), "weight", None)
    text = hf_config.get_text_config()
    itemsize = dtype.itemsize
    kv, attention, position = budget.attention_facts(text, itemsize)
    top_k = max(_top_k(s) for s in sites)
    facts = budget.ModelFacts(
        weight_bytes=weights, embedding_bytes=table.numel() * table.element_size() if table is not None else 0,
        embedding_reason=why_not_hostable(model), experts=tuple(s.num_experts for s in sites),
        row_bytes=engine_format(locations, dtype).row_bytes, top_k=top_k, kv_bytes_per_position=kv,
        token_bytes=budget.token_bytes(text, itemsize, attention, sites[0].inter, top_k,
                                       max(s.num_experts for s in sites), len(sites) < text.num_hidden_layers),
        position_bytes=position, itemsize=itemsize, max_positions=getattr(text, "max_position_embeddings", None))
    return model, sites, locations, facts


def build_offloaded_model(checkpoint: Checkpoint, hf_config, device: torch.device, config: OffloadConfig,
                          progress: bool = True) -> LoadedModel:
    """The transformers model (hf_config from check_supported) with its routed experts served by
    OffloadedExperts. A memory budget (MOE_DEVICE_MEMORY, MOE_OFFLOAD_RATIO=AUTO) is turned into a ratio first
    (budget.py), before anything is allocated; the LoadedModel's config holds the ratio decided."""
    dtype = resolve_dtype(config, checkpoint, device)
    model, sites, locations, facts = model_facts(checkpoint, hf_config, device, config)
    config, plan, ratio_choice = budget.resolve(config, facts, device)
    embeddings_on_host, embeddings = defaults.host_embeddings(config.moe_host_embeddings, device,
                                                              config.moe_offload_ratio, facts.embedding_reason)
    for site in sites:  # never allocated anywhere: the experts live in cache slots and tiers instead
        del site.module.gate_up_proj
        del site.module.down_proj
        if site.glu is not None:  # GPT-OSS: the biases are planes of the expert rows too
            del site.module.gate_up_proj_bias
            del site.module.down_proj_bias
    _materialise_dense(model, checkpoint, device, dtype, progress, embeddings_on_host)
    model.eval()
    runtimes, host_cache = _attach_expert_runtimes(sites, locations, device, dtype, config, progress)
    kernel = select_kernel(config, device, hf_config)
    for runtime in runtimes:
        runtime.fused_moe = kernel
        if config.moe_zero_copy != "off" or runtime.table.capacity == runtime.num_experts:
            runtime.enable_direct(device, lru=config.moe_zero_copy in ("auto", "lru"))
    _load_generation_config(model, checkpoint.root)
    choices = ([ratio_choice] if ratio_choice else []) + [host_cache, embeddings]
    return LoadedModel(model, runtimes, sites, choices, config, plan)


def check_experts_match(checkpoint: Checkpoint, sites: list[ExpertsSite], model) -> None:
    """The checkpoint's routed experts are the model's: the same MoE layers, experts 0..E-1 in each, and a
    num_experts_per_tok they can serve (validation.py says why each matters)."""
    ignore = ignore_on_load(model)
    check_routed_experts(checkpoint.experts_by_layer, {site.layer: site.num_experts for site in sites},
                         lambda name: bool(ignore.search(name)))
    for site in sites:
        check_top_k(getattr(site.module.config, "num_experts_per_tok", None), site.num_experts)


def _top_k(site: ExpertsSite) -> int:
    return int(getattr(site.module.config, "num_experts_per_tok", 1) or 1)


def engine_format(locations: dict[int, list[ExpertLocation]], dtype: torch.dtype) -> ExpertFormat:
    """How the engine holds every layer's experts (slots, host tier, scratch): dense checkpoints in the compute
    dtype, quantized ones exactly as stored (a GPTQ layout as its compressed-tensors planes: the same bytes), so
    what moves is the quantized bytes."""
    formats = {loc.format for layer in locations.values() for loc in layer}
    quantized = {fmt for fmt in formats if fmt.quantized}
    if not quantized:
        first = next(iter(formats))
        return ExpertFormat(first.inter, first.hidden, dtype, glu=first.glu)
    if len(formats) > 1:
        raise MoeOffloadError("MoE layers with different expert formats are not supported: "
                              + ", ".join(sorted(fmt.describe() for fmt in formats)))
    return quantized.pop().held()


def _attach_expert_runtimes(sites: list[ExpertsSite], locations: dict[int, list[ExpertLocation]],
                            device: torch.device, dtype: torch.dtype, config: OffloadConfig,
                            progress: bool) -> tuple[list[OffloadedExperts], defaults.Choice]:
    fmt = engine_format(locations, dtype)  # every site has one expert shape (find_expert_sites)
    staging = max(loc.format.row_bytes for layer in locations.values() for loc in layer)
    fetcher = ExpertFetcher(device, DiskTier(config.moe_io), staging)
    top_k = max(_top_k(s) for s in sites)
    scratch = ScratchPool(top_k, fmt, device)
    # a layer with offloaded experts wants all of them in host RAM, the resident ones too: LRU admission evicts
    # those, and reads every miss in place, only where the host tier holds every expert of the layer
    offloaded = [s.num_experts for s in sites if config.resident_count(s.num_experts) < s.num_experts]
    budget, choice = defaults.host_cache(config.moe_host_cache_bytes,
                                         max(offloaded, default=0) * fmt.row_bytes * len(sites))
    with tqdm(total=sum(s.num_experts for s in sites), desc="experts", unit="expert",
              disable=not progress, leave=False) as bar:
        runtimes = [_attach_layer(site, locations[site.layer], fetcher, scratch, budget // len(sites), fmt, device,
                                  config, bar) for site in sites]
    fetcher.stats.reset()
    return runtimes, _say_tiers(runtimes, choice)


def _say_tiers(runtimes: list[OffloadedExperts], choice: defaults.Choice) -> defaults.Choice:
    """MOE_HOST_CACHE's choice with where the offloaded experts went: how many the host tier holds and how many are
    read from the checkpoint file on a miss, with a warning where any are (a miss from disk is far slower)."""
    offloaded = sum(rt.num_experts - rt.table.capacity for rt in runtimes)
    if not offloaded:
        return choice
    on_disk = sum(sum(1 for e in range(rt.num_experts) if rt.table.lookup(e) is None
                      and (rt.host is None or e not in rt.host)) for rt in runtimes)
    where = f"{offloaded - on_disk} of the {offloaded} offloaded experts in the host tier, {on_disk} on disk"
    if on_disk:
        log.warning("%d of the %d offloaded experts do not fit the host tier (MOE_HOST_CACHE=%s) and are read from the "
                    "checkpoint file on every miss, much slower than from RAM", on_disk, offloaded, choice.value)
    return dataclasses.replace(choice, why=f"{choice.why}; {where}")


def _attach_layer(site: ExpertsSite, locations: list[ExpertLocation], fetcher: ExpertFetcher, scratch: ScratchPool,
                  host_bytes: int, fmt: ExpertFormat, device: torch.device, config: OffloadConfig,
                  bar) -> OffloadedExperts:
    """Fill one layer's host tier and resident slots, and hang its runtime on the experts module."""
    capacity = config.resident_count(site.num_experts)
    resident = list(range(capacity))
    host = None
    if capacity < site.num_experts:
        fit = min(site.num_experts, host_bytes // fmt.row_bytes)
        order = list(range(capacity, site.num_experts)) + resident  # non-resident experts first
        host = HostTier(order[:fit], fmt, pin=device.type == "cuda") if fit else None
        in_host = list(host.row_of) if host else []
        for start in range(0, len(in_host), DISK_THREADS):  # read in parallel, like misses
            batch = in_host[start:start + DISK_THREADS]
            fetcher.fetch(site.layer, None, [Transfer(e, locations[e], host.row(e)) for e in batch], fmt)
            bar.update(len(batch))
    policy = make_policy(None if config.moe_cache_policy == "default" else config.moe_cache_policy)
    runtime = OffloadedExperts(site.layer, site.num_experts, _top_k(site), fmt, capacity, locations, host, fetcher,
                               scratch, policy, device)
    runtime.preload(resident)
    bar.update(site.num_experts - (len(host.row_of) if host else 0))
    site.module._moe_offload = runtime
    return runtime


def _load_generation_config(model, root: str) -> None:
    from transformers import GenerationConfig

    if os.path.isfile(os.path.join(root, "generation_config.json")):
        try:
            model.generation_config = GenerationConfig.from_pretrained(root)
        except (OSError, ValueError):
            pass
