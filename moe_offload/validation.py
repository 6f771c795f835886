"""Checks that keep the loader from lying: what a checkpoint holds must be what its config.json describes.

Why a module of its own: checkpoint.py parses headers and locates bytes; the rules here decide whether what was
parsed may be run at all — a dtype a weight cannot have, a quantization format we do not read, routed experts
that do not match the config, tensors the model never uses, a config.json that is not a JSON object. Each rule
is a small function raising MoeOffloadError (one line: the CLI prints it and exits 2), so `info`, `generate` and
the Python API refuse the same checkpoints with the same words. Nothing here imports the rest of the package
beyond errors.py, so checkpoint.py and integration.py can both call in.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from typing import Iterable, Mapping

import torch

from .errors import MoeOffloadError, read_user_text

log = logging.getLogger("moe_offload")

# -- files ------------------------------------------------------------------------------------------------------


def require_regular_file(path: str, what: str = "") -> None:
    """Refuse a FIFO, socket, device or folder where a file is read: opening a FIFO blocks forever (`info` would
    hang), a device can be endless. Symbolic links to regular files (the Hugging Face cache's layout) pass."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        raise MoeOffloadError(f"cannot read {path}: {err.strerror}") from None
    if not stat.S_ISREG(mode):
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode) else
                "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "not a regular file")
        raise MoeOffloadError(f"{what or os.path.basename(path)} in {os.path.dirname(path) or '.'} is {kind}, "
                              "not a regular file")


def read_config_json(root: str) -> dict:
    """config.json as a dict, or one line saying why not (missing, not a regular file, empty, not JSON, not an
    object). Read once here so `info`, `generate` and `quantize` agree instead of each tripping over it later."""
    path = os.path.join(root, "config.json")
    if not os.path.lexists(path):
        raise MoeOffloadError(f"no config.json in {root}: not a Hugging Face checkpoint")
    require_regular_file(path, "config.json")
    text = read_user_text(path, "config.json")
    if not text.strip():
        raise MoeOffloadError(f"config.json in {root} is empty")
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise MoeOffloadError(f"config.json in {root} is not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(config, dict):
        raise MoeOffloadError(f"config.json in {root} is a JSON {type(config).__name__}, not an object")
    return config


def text_config(config: Mapping) -> Mapping:
    """The language model's part of config.json (multimodal configs nest it under text_config)."""
    nested = config.get("text_config")
    return nested if isinstance(nested, Mapping) else config


EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def config_expert_count(config: Mapping) -> tuple[str, int] | None:
    """(key, routed experts per MoE layer) as config.json names them, None where it names none (a dense model).
    Key names differ per architecture; the first positive integer wins (transformers maps the others onto it)."""
    text = text_config(config)
    for key in EXPERT_COUNT_KEYS:
        value = text.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return key, value
    return None


# -- quantization formats ---------------------------------------------------------------------------------------

# Formats the loader reads. A new reader (GPTQ, FP8, ...) adds its name here and its tensors' dtypes to
# QUANTIZED_TENSOR_DTYPES; quantization_format() below keeps recognising every format either way.
# FP8 is transformers' FineGrainedFP8 (quant_method fp8, block scales: quant/fp8.py); the other FP8 layouts are
# named apart (FBGEMM FP8, compressed-tensors FP8, ModelOpt FP8) so that they are still refused by name. MXFP4:
# GPT-OSS's native experts (checkpoint.py).
SUPPORTED_FORMATS = {"compressed-tensors", "GPTQ", "AWQ", "FP8", "MXFP4"}
_METHODS = {"gptq": "GPTQ", "awq": "AWQ", "bitsandbytes": "bitsandbytes", "fp8": "FP8", "fbgemm_fp8": "FBGEMM FP8",
            "mxfp4": "MXFP4", "gguf": "GGUF", "hqq": "HQQ", "eetq": "EETQ", "quanto": "quanto", "aqlm": "AQLM",
            "torchao": "torchao", "vptq": "VPTQ", "higgs": "HIGGS", "bitnet": "BitNet", "auto-round": "AutoRound",
            "autoround": "AutoRound", "quark": "Quark", "spqr": "SpQR", "fp_quant": "FP-Quant", "nvfp4": "NVFP4",
            "modelopt": "ModelOpt", "compressed-tensors": "compressed-tensors", "compressed_tensors":
            "compressed-tensors"}
# tensor-name endings that only quantized checkpoints have -> their format
_TENSOR_MARKS = ((".qweight", "GPTQ"), (".weight_scale_inv", "FP8"), (".absmax", "bitsandbytes"),
                 (".quant_map", "bitsandbytes"), (".SCB", "bitsandbytes"), (".weight_format", "bitsandbytes"),
                 (".gate_up_proj_blocks", "MXFP4"), (".down_proj_blocks", "MXFP4"), (".weight_scale_2", "NVFP4"),
                 (".weight_global_scale", "NVFP4"))
_FP8_DTYPES = {getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                                  "float8_e5m2fnuz", "float8_e8m0fnu") if hasattr(torch, name)}


def quantization_format(config: Mapping, folder: Iterable[str], tensors: Mapping = {}) -> tuple[str, str] | None:
    """(format, where it was seen) of the checkpoint's quantization, None where it is unquantized.

    Looks at config.json's quantization_config (or compression_config) first, then at files that only quantized
    exports carry (a *.gguf with no safetensors beside it, ModelOpt's hf_quant_config.json, AutoGPTQ's
    quantize_config.json), then at tensor names and dtypes (`tensors`: name -> entry with .dtype) — so a
    checkpoint whose config was stripped is still named by its format, never called "a dense model"."""
    quant = text_config(config).get("quantization_config", config.get("quantization_config",
                                                                       config.get("compression_config")))
    if isinstance(quant, Mapping):
        return _format_of_config(quant)
    folder = set(folder)
    gguf = sorted(name for name in folder if name.lower().endswith(".gguf"))
    if gguf and not any(name.endswith(".safetensors") for name in folder):
        return "GGUF", f"file {gguf[0]}"
    if "hf_quant_config.json" in folder:
        return "ModelOpt", "hf_quant_config.json"
    if "quantize_config.json" in folder:
        return "GPTQ", "quantize_config.json"
    names = list(tensors)
    for ending, fmt in _TENSOR_MARKS:
        found = next((name for name in names if name.endswith(ending)), None)
        if found is not None:
            if fmt == "GPTQ" and not any(name.endswith(".g_idx") for name in names):
                fmt = "AWQ" if any(name.endswith(".qzeros") for name in names) else "GPTQ"
            return fmt, f"tensor {found}"
    fp8 = next((name for name, entry in tensors.items() if entry.dtype in _FP8_DTYPES), None)
    if fp8 is not None:
        return "FP8", f"tensor {fp8}"
    return None


def _format_of_config(quant: Mapping) -> tuple[str, str]:
    """(format, what in config.json says so) for a quantization_config. compressed-tensors is one method with
    many formats: its float ones are FP8/NVFP4/MXFP4, told apart so that the refusal names what the user has."""
    method = quant.get("quant_method")
    if method is None and (quant.get("load_in_4bit") or quant.get("load_in_8bit")):
        return "bitsandbytes", "config.json: load_in_4bit/load_in_8bit"
    said = f"config.json: quant_method {method!r}"
    name = _METHODS.get(str(method).lower(), f"quant_method {method!r}")
    if name == "ModelOpt":
        nested = quant.get("quantization")
        algo = str(quant.get("quant_algo") or (nested.get("quant_algo") if isinstance(nested, Mapping) else ""))
        return ("NVFP4" if "NVFP4" in algo.upper() else "ModelOpt FP8" if "FP8" in algo.upper() else name,
                f"{said}, quant_algo {algo!r}")
    if name != "compressed-tensors":
        return name, said
    groups = quant.get("config_groups")
    for group in groups.values() if isinstance(groups, Mapping) else ():
        group = group if isinstance(group, Mapping) else {}
        layout = str(group.get("format") or quant.get("format") or "")
        weights = group.get("weights") if isinstance(group.get("weights"), Mapping) else {}
        where = f"{said}, format {layout!r}"
        if "nvfp4" in layout or "mxfp4" in layout:
            return layout.split("-")[0].upper(), where
        if layout == "float-quantized" or weights.get("type") == "float":
            four_bit_float = weights.get("type") == "float" and weights.get("num_bits") == 4
            return "NVFP4" if four_bit_float else "compressed-tensors FP8", where
    return name, said


def refuse_unsupported_format(found: tuple[str, str] | None) -> None:
    """One line naming a quantization format the loader does not read, and where it was found. A format we read
    is read from its quantization_config (or AutoGPTQ's quantize_config.json): found only by its tensors (a stripped
    config.json), it is refused too."""
    if found is None:
        return
    fmt, where = found
    what = fmt if fmt.startswith("quant_method") else f"{fmt} quantization"
    if fmt in SUPPORTED_FORMATS:
        if where.startswith("config.json") or where == "quantize_config.json":  # AutoGPTQ's: quant/gptq.py
            return
        raise MoeOffloadError(f"{what} ({where}) cannot be read: config.json has no quantization_config saying how")
    raise MoeOffloadError(f"{what} ({where}) is not supported: moe-offload reads unquantized BF16/F16/F32 "
                          "checkpoints, int4/int8 experts in compressed-tensors pack-quantized, GPTQ or AWQ format, "
                          "FP8 block-quantized (quant_method fp8) checkpoints and GPT-OSS's MXFP4 experts")


# -- dtypes -----------------------------------------------------------------------------------------------------

PLAIN_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# compressed-tensors pack-quantized (checkpoint.py, quant/format.py) and GPTQ (quant/gptq.py): the only tensors
# that may be integers
QUANTIZED_TENSOR_DTYPES = {
    "weight_packed": (torch.int32,), "weight_zero_point": (torch.int32,), "weight_g_idx": (torch.int32,),
    "weight_shape": (torch.int32, torch.int64), "weight_scale": PLAIN_DTYPES,
    # GPTQ (quant/gptq.py)
    "qweight": (torch.int32,), "qzeros": (torch.int32,), "g_idx": (torch.int32,), "scales": PLAIN_DTYPES,
}
_FUSED_EXPERTS = re.compile(r"(?:^|\.)experts\.(?:gate_up_proj|down_proj)$")
# GPT-OSS: expert biases are floats, MXFP4 blocks and E8M0 scales bytes
_GPT_OSS_EXPERTS = re.compile(r"(?:^|\.)experts\.(?:gate_up|down)_proj_(?P<kind>bias|blocks|scales)$")


FP8_WEIGHT_DTYPES, FP8_SCALE_DTYPES = (torch.float8_e4m3fn,), PLAIN_DTYPES  # quant/fp8.py


def allowed_dtypes(name: str, fp8_scales: Mapping[str, str] = {}) -> tuple[torch.dtype, ...] | None:
    """The dtypes tensor `name` may have in a format we read; None for tensors that are not weights (buffers:
    their dtype is checked against the model's, at load). A plain weight is a float the model computes in; an
    integer or FP8 relabelled weight would load as garbage numbers without any error. fp8_scales: an FP8
    checkpoint's weight -> weight_scale_inv (checkpoint._fp8_scales): those weights are F8_E4M3, their scales floats,
    and an FP8 scale anywhere else has no weight to scale."""
    suffix = name.rpartition(".")[2]
    if name in fp8_scales:
        return FP8_WEIGHT_DTYPES
    if suffix == "weight_scale_inv":
        return FP8_SCALE_DTYPES if name in fp8_scales.values() else ()
    if match := _GPT_OSS_EXPERTS.search(name):
        return PLAIN_DTYPES if match["kind"] == "bias" else (torch.uint8,)
    if suffix in QUANTIZED_TENSOR_DTYPES:
        return QUANTIZED_TENSOR_DTYPES[suffix]
    if suffix in ("weight", "bias") or _FUSED_EXPERTS.search(name):
        return PLAIN_DTYPES
    return None


def dtype_name(dtype: torch.dtype) -> str:
    """safetensors' name of a dtype (I32, BF16, ...), as the header spelled it."""
    from .checkpoint import SAFETENSORS_DTYPES

    return next((key for key, value in SAFETENSORS_DTYPES.items() if value == dtype), str(dtype))


def check_weight_dtypes(entries: Iterable, fp8_scales: Mapping[str, str] = {}) -> None:
    """Refuse any weight stored in a dtype it cannot have (entries: TensorEntry; fp8_scales: allowed_dtypes')."""
    for entry in entries:
        allowed = allowed_dtypes(entry.name, fp8_scales)
        if allowed == ():
            raise MoeOffloadError(f"{entry.name} is an FP8 block scale, but there is no FP8 weight beside it in a "
                                  "checkpoint whose config.json says quant_method 'fp8'")
        if allowed is not None and entry.dtype not in allowed:
            raise MoeOffloadError(f"{entry.name} has dtype {dtype_name(entry.dtype)}, which this tensor cannot have "
                                  f"(expected {_alternatives([dtype_name(d) for d in allowed])})")


def _alternatives(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def check_buffer_dtype(name: str, stored: torch.dtype, target: torch.Tensor) -> None:
    """A tensor that is not a weight (a router bias, an inv_freq) must be of the same kind as what it fills:
    copy_ would turn integers into floats (or the reverse) without a word."""
    if stored.is_floating_point != target.dtype.is_floating_point or stored in _FP8_DTYPES:
        raise MoeOffloadError(f"{name} has dtype {dtype_name(stored)}, the model expects "
                              f"{str(target.dtype).replace('torch.', '')}")


# -- routed experts against the config --------------------------------------------------------------------------


def _layers(numbers: Iterable[int]) -> str:
    """Layer or expert numbers as runs: [0, 1, 2, 3, 9] -> "0-3, 9"."""
    runs: list[list[int]] = []
    for number in sorted(numbers):
        if runs and number == runs[-1][1] + 1:
            runs[-1][1] = number
        else:
            runs.append([number, number])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def check_routed_experts(experts_by_layer: Mapping, expected: Mapping[int, int | None],
                         ignored=lambda name: False) -> None:
    """Every MoE layer of the checkpoint (layer -> ExpertTensors) is a MoE layer of the model with the same
    experts 0..E-1 (expected: layer -> E, None where the config does not say). Without this a config with fewer
    layers or experts than the weights runs a truncated model; `ignored(name)` spares what transformers itself
    skips on load (DeepSeek-V3's multi-token-prediction layer)."""
    for layer, tensors in sorted(experts_by_layer.items()):
        if layer not in expected:
            if ignored(tensors.any_name):
                continue
            raise MoeOffloadError(f"checkpoint has routed experts in layer {layer}, a layer the config does not "
                                  f"have as a MoE layer (its MoE layers: {_layers(expected) or 'none'}); the "
                                  "config and the weights do not match")
        want, have = expected[layer], tensors.indices
        if want is not None and have != list(range(want)):
            numbered = "" if have == list(range(len(have))) else f", numbered {_layers(have)}"
            raise MoeOffloadError(f"layer {layer} of the checkpoint has {len(have)} routed experts{numbered}; the "
                                  f"config says {want} (0-{want - 1})")


def check_config_experts(config: Mapping, experts_by_layer: Mapping) -> None:
    """check_routed_experts from config.json alone, for `info` (which builds no model): experts only in layers
    below num_hidden_layers (plus DeepSeek's multi-token-prediction layers), as many as the config names."""
    text = text_config(config)
    layers = text.get("num_hidden_layers")
    count = config_expert_count(config)
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
        return
    extra = text.get("num_nextn_predict_layers")
    layers += extra if isinstance(extra, int) and not isinstance(extra, bool) and extra > 0 else 0
    check_routed_experts(experts_by_layer, {layer: count[1] if count else None for layer in range(layers)})


def check_top_k(top_k, num_experts: int) -> int:
    """num_experts_per_tok as an int 1..num_experts (None, unset: 1). 0 routes nothing and more than the experts
    cannot be chosen: both crash inside the router mid-generation otherwise."""
    if top_k is None:
        return 1
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise MoeOffloadError(f"num_experts_per_tok is {top_k!r} in config.json: it must be an integer from 1 to "
                              f"the {num_experts} routed experts per layer")
    return top_k


def require_routed_experts(experts_by_layer: Mapping, config: Mapping, index_note: str = "") -> None:
    """A checkpoint without routed expert tensors is a dense model only if its config names no experts; where it
    does, the experts are missing (an index leaving out their shard, tensors we could not recognise)."""
    if experts_by_layer:
        return
    named = config_expert_count(config)
    if named is None:
        raise MoeOffloadError(f"{config.get('model_type')!r} is a dense model: it has no routed experts to offload")
    key, count = named
    hint = index_note or " (expected names like ...layers.L.mlp.experts.E.gate_proj.weight or ...experts.gate_up_proj)"
    raise MoeOffloadError(f"config.json names {count} routed experts per layer ({key}), but the checkpoint holds no "
                          f"routed expert tensors{hint}")


# -- tensors the model does not use -----------------------------------------------------------------------------

_EXPERT_NAME = re.compile(r"(?:^|\.)experts\.")


def _few(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


def ignore_on_load(model) -> re.Pattern | None:
    """What transformers itself drops silently on load for this model class (its _keys_to_ignore_on_load_unexpected,
    plus stale rotary inv_freq and position_ids buffers), as one pattern."""
    patterns = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    patterns |= {r"rotary_emb\.inv_freq", r"(^|\.)position_ids$"}
    return re.compile("|".join(f"({p})" for p in sorted(patterns)))


def report_unexpected(names: list[str], ignore: re.Pattern | None) -> None:
    """Tensors of the checkpoint the model has no place for. Routed-expert ones are refused (an expert bias or
    extra matrix ignored changes every answer); others are one warning with their count and a few names, as
    transformers warns — a config with fewer layers than the weights stops at the experts check before this."""
    names = sorted(name for name in names if ignore is None or not ignore.search(name))
    experts = [name for name in names if _EXPERT_NAME.search(name)]
    if experts:
        raise MoeOffloadError(f"{experts[0]} belongs to the routed experts but the model has no place for it "
                              f"({len(experts)} such tensors, e.g. {_few(experts)}): the checkpoint does not match "
                              "the config")
    if names:
        log.warning("moe-offload: warning: %d tensors of the checkpoint are not used by the model and were ignored: "
                    "%s", len(names), _few(names))
