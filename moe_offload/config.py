"""OffloadConfig: the user's properties, parsed and validated once.

Properties arrive as keyword arguments (`LLMPipeline(path, "cuda", MOE_OFFLOAD_RATIO=37)`), as a JSON file
or as inline JSON (the benchmark's `-lc`); the few diagnostic switches that pin one of the engine's own paths
come from environment variables, so that a user's configuration never depends on them. Everything downstream
reads this frozen dataclass, never the raw dict, so a typo or an out-of-range value fails at load with one clear
line instead of deep in a layer.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import MoeOffloadError, read_user_text

IO_STRATEGIES = ("odirect", "pread")
DTYPES = ("auto", "float32", "bfloat16", "float16")
KERNELS = ("auto", "triton", "torch")
SWITCHES = ("auto", "off")
ZERO_COPY_MODES = ("auto", "lru", "static", "off")
CACHE_POLICIES = ("default", "lru", "lfru")
CPU_EXPERT_MODES = ("auto", "off", "all")
HOST_EMBEDDING_MODES = ("auto", "on", "off")
_DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16", "f16": "float16"}
MAX_BYTES = 2**64  # no machine has more; a larger count is a typo (1e400 overflows)
_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


@dataclass(frozen=True)
class OffloadConfig:
    # -- properties: what a user chooses (PROPERTIES below) ----------------------------------------------------
    # Percent of each MoE layer's routed experts kept resident on the device (0-100).
    # Per layer: resident = floor(E * ratio / 100 + 0.5), i.e. round half up (E=60, ratio=37 -> 22).
    # "auto" (MOE_OFFLOAD_RATIO=AUTO): the largest ratio whose plan fits the free device memory less a margin
    # (budget.py); decided at load, before anything is allocated, so a loaded pipeline's config holds the number.
    moe_offload_ratio: int | str = 100
    # Bytes of device memory the load may take (MOE_DEVICE_MEMORY, instead of a ratio): the largest ratio whose
    # plan (budget.py: weights, resident experts, KV cache for moe_context tokens, workspace) fits. None: unset.
    moe_device_memory: int | None = None
    # Tokens of context (prompt and generated) the KV cache of the memory plan is sized for (budget.py). None =
    # "auto": the model's max_position_embeddings, at most budget.DEFAULT_CONTEXT_CAP (LLMPipeline.memory_plan.context).
    moe_context: int | None = None
    # Bytes of host RAM for the host tier (pinned on CUDA). None = "auto": every expert of the offloaded layers
    # where the RAM available at load holds them with some left over, else what it holds (defaults.host_cache).
    # Experts that do not fit are read from the checkpoint file on a miss.
    moe_host_cache_bytes: int | None = None
    # Compute dtype. "auto": the checkpoint's dtype on CUDA, float32 on CPU (CPU half-precision GEMMs are slow
    # and float32 keeps CPU results comparable to a float32 reference).
    moe_dtype: str = "auto"
    # Decode misses partly computed on the CPU where they lie in the host tier, while the GPU reads the rest in
    # place (moe_offload/hybrid). "auto" (CUDA): how many per count of misses, and with which CPU kernel, timed on
    # a layer at the first load, kept only if whole decodes run faster with them (else none), and stored in this
    # machine's profile for the next loads (profile.py); "all": every miss on the CPU; "off": every miss on the GPU.
    moe_cpu_experts: str = "auto"
    # Threads of the CPU expert path, the one driving the pool included (they spin between jobs). None = "auto":
    # the cores torch uses less two (the launching thread's, and one spare).
    moe_cpu_threads: int | None = None
    # The input embedding table in page-locked host RAM, its rows read in place by the GPU (host_embeddings.py):
    # vocab x hidden x 2 bytes less device memory, as llama.cpp does. "on" needs CUDA, triton and an untied table;
    # "auto": on where it can be and experts are offloaded (defaults.host_embeddings).
    moe_host_embeddings: str = "auto"

    # -- diagnostic switches: environment variables (DIAGNOSTICS below), for comparing the engine's own paths ---
    # Expert compute: "triton" = the fused kernel (kernels/triton_moe.py; CUDA, SiLU experts), "torch" = the
    # per-expert loop (kernels/reference.py), "auto" = triton where it applies, else torch.
    moe_kernel: str = "auto"
    # Misses read in place from the pinned host tier by the Triton kernel (no copy, no host sync; cache.py), in
    # every layer whose non-resident experts all sit in the host tier. "lru": decode misses are also admitted into
    # the slots as they are read, LRU decided on the device (policy/device_lru.py), where the host tier holds every
    # expert of the layer; "static": the resident set stays as loaded; "auto": lru where it can, else static;
    # "off": misses are copied in.
    moe_zero_copy: str = "auto"
    # The cache's eviction policy (policy/): "default" = policy.DEFAULT_POLICY; "lru", "lfru" pin one. The device
    # form of the decode admissions follows it (device_lru.py, device_lfru.py).
    moe_cache_policy: str = "default"
    # Greedy decode steps replayed from CUDA graphs (decoding.py; graph segments around layers that sync,
    # piecewise.py). "off": eager decoding.
    moe_cuda_graph: str = "auto"
    # transformers' RMSNorms and rotary embedding as one Triton kernel each (dense_fusion.py), where each passes an
    # equivalence check at load. "off": transformers' own ops.
    moe_fuse_dense: str = "auto"
    # How the disk tier reads an expert's bytes: "odirect" (O_DIRECT into aligned buffers, pread where the file
    # system refuses it) or "pread" (through the page cache). See tiers.py.
    moe_io: str = "odirect"

    def resident_count(self, num_experts: int) -> int:
        """Experts of a layer with `num_experts` routed experts that stay resident on the device."""
        if not isinstance(self.moe_offload_ratio, int):
            raise RuntimeError("MOE_OFFLOAD_RATIO=AUTO is decided at load (budget.resolve), not read before")
        return min(num_experts, math.floor(num_experts * self.moe_offload_ratio / 100 + 0.5))


def parse_ratio(value: Any) -> int:
    """MOE_OFFLOAD_RATIO: an integer 0-100 (an int-valued float or numeric string is accepted)."""
    if isinstance(value, bool):
        raise MoeOffloadError(f"MOE_OFFLOAD_RATIO must be an integer 0-100, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise MoeOffloadError(f"MOE_OFFLOAD_RATIO must be an integer 0-100, got {value!r}") from None
    if not math.isfinite(number) or number != int(number) or not 0 <= number <= 100:
        raise MoeOffloadError(f"MOE_OFFLOAD_RATIO must be an integer 0-100, got {value!r}")
    return int(number)


def parse_ratio_property(value: Any) -> int | str:
    """MOE_OFFLOAD_RATIO as a property: an integer 0-100, or AUTO (any case) for the largest that fits the device."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        return parse_ratio(value)
    except MoeOffloadError:
        raise MoeOffloadError(f"MOE_OFFLOAD_RATIO must be an integer 0-100 or AUTO, got {value!r}") from None


def parse_device_memory(value: Any) -> int:
    """MOE_DEVICE_MEMORY: a positive byte count ("8GiB", "24GB", 8589934592)."""
    number = parse_size(value, "MOE_DEVICE_MEMORY")
    if not number:
        raise MoeOffloadError(f"MOE_DEVICE_MEMORY must be a positive byte count like 8GiB or 24GB, got {value!r}")
    return number


def parse_context(value: Any) -> int | None:
    """MOE_CONTEXT: a positive number of tokens, or "auto" (None)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().isdigit() \
            or int(value) < 1:
        raise MoeOffloadError(f"MOE_CONTEXT must be a positive number of tokens or auto, got {value!r}")
    return int(value)


def parse_threads(value: Any) -> int | None:
    """MOE_CPU_THREADS: a positive integer, or "auto" (None)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    try:
        number = int(str(value).strip())
    except ValueError:
        number = 0
    if isinstance(value, bool) or number < 1:
        raise MoeOffloadError(f"MOE_CPU_THREADS must be a positive integer or auto, got {value!r}")
    return number


def parse_size(value: Any, name: str) -> int | None:
    """A byte count: an int, or a string like "64GiB", "512MB", "0". "auto" gives None."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_BYTES:
        return value
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?(?:[eE]\+?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise MoeOffloadError(f"{name} must be a byte count like 8GiB, 512MB, 0 or auto, got {value!r}")
    size = float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    if not size < MAX_BYTES:  # 1e400 is inf: int() of it would raise OverflowError
        raise MoeOffloadError(f"{name} must be below 2**64 bytes, got {value!r}")
    return int(size)


def _parse_choice(value: Any, name: str, choices: tuple[str, ...], aliases: Mapping[str, str] = {}) -> str:
    text = str(value).strip().lower()
    text = aliases.get(text, text)
    if text not in choices:
        raise MoeOffloadError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return text


def _choice(name: str, choices: tuple[str, ...], aliases: Mapping[str, str] = {}):
    return lambda value: _parse_choice(value, name, choices, aliases)


# The properties: LLMPipeline keywords, a -lc JSON file, CLI flags. name -> (field, parser, values as the README's
# table states them); tests/test_docs.py checks the README's table against this one.
PROPERTIES = {
    "MOE_OFFLOAD_RATIO": ("moe_offload_ratio", parse_ratio_property, "integer 0-100 (default 100), `AUTO`"),
    "MOE_DEVICE_MEMORY": ("moe_device_memory", parse_device_memory, "bytes, `8GiB`, `24GB` (instead of a ratio)"),
    "MOE_CONTEXT": ("moe_context", parse_context, "positive integer, `auto` (default)"),
    "MOE_HOST_CACHE": ("moe_host_cache_bytes", lambda v: parse_size(v, "MOE_HOST_CACHE"),
                       "bytes, `64GiB`, `512MB`, `0`, `auto` (default)"),
    "MOE_DTYPE": ("moe_dtype", _choice("MOE_DTYPE", DTYPES, _DTYPE_ALIASES),
                  "`auto` (default), `float32`, `bfloat16`, `float16`"),
    "MOE_CPU_EXPERTS": ("moe_cpu_experts", _choice("MOE_CPU_EXPERTS", CPU_EXPERT_MODES),
                        "`auto` (default), `off`, `all`"),
    "MOE_CPU_THREADS": ("moe_cpu_threads", parse_threads, "positive integer, `auto` (default)"),
    "MOE_HOST_EMBEDDINGS": ("moe_host_embeddings", _choice("MOE_HOST_EMBEDDINGS", HOST_EMBEDDING_MODES),
                            "`auto` (default), `on`, `off`"),
}
PROPERTY_NAMES = tuple(PROPERTIES)

# Diagnostic switches, read from the environment at load (docs/diagnostics.md): each turns off or pins one of the
# engine's own paths, to compare it with the default or to rule it out when something goes wrong.
DIAGNOSTICS = {
    "MOE_KERNEL": ("moe_kernel", _choice("MOE_KERNEL", KERNELS), "`auto` (default), `triton`, `torch`"),
    "MOE_ZERO_COPY": ("moe_zero_copy", _choice("MOE_ZERO_COPY", ZERO_COPY_MODES),
                      "`auto` (default), `lru`, `static`, `off`"),
    "MOE_CACHE_POLICY": ("moe_cache_policy", _choice("MOE_CACHE_POLICY", CACHE_POLICIES),
                         "`default` (default), `lru`, `lfru`"),
    "MOE_CUDA_GRAPH": ("moe_cuda_graph", _choice("MOE_CUDA_GRAPH", SWITCHES), "`auto` (default), `off`"),
    "MOE_FUSE_DENSE": ("moe_fuse_dense", _choice("MOE_FUSE_DENSE", SWITCHES), "`auto` (default), `off`"),
    "MOE_IO": ("moe_io", _choice("MOE_IO", IO_STRATEGIES), "`odirect` (default), `pread`"),
}


def load_properties_file(source: str) -> dict[str, Any]:
    """Properties from a JSON file path or from inline JSON text (`-lc '{"MOE_OFFLOAD_RATIO": 37}'`). Text that
    is not a file and starts like JSON (`{`, `[`) is read as JSON, so `-lc '[37]'` says "not a JSON object" rather
    than "config file not found"."""
    text = source
    if not source.lstrip().startswith(("{", "[")) or os.path.isfile(source):
        text = read_user_text(source, "config file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise MoeOffloadError(f"config {source!r} is not valid JSON: {err.msg} at line {err.lineno}") from None
    if not isinstance(data, dict):
        raise MoeOffloadError(f"config {source!r} must be a JSON object of properties")
    return data


def make_config(properties: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> OffloadConfig:
    """Validate property names and values, then read the diagnostic switches from `environ` (os.environ by
    default). Unknown names are an error, not silently ignored; a diagnostic passed as a property is told where it
    belongs."""
    fields: dict[str, Any] = {}
    given = {str(name).upper() for name in properties}
    if {"MOE_DEVICE_MEMORY", "MOE_OFFLOAD_RATIO"} <= given:
        raise MoeOffloadError("give MOE_DEVICE_MEMORY or MOE_OFFLOAD_RATIO, not both: a memory budget chooses the "
                              "ratio")
    for name, value in properties.items():
        if not isinstance(name, str):
            raise MoeOffloadError(f"property names are strings (known: {', '.join(PROPERTY_NAMES)}), got {name!r}")
        key = name.upper()
        if key in DIAGNOSTICS:
            raise MoeOffloadError(f"{key} is a diagnostic switch, not a property: set it in the environment "
                                  f"({key}={value}; docs/diagnostics.md)")
        if key not in PROPERTIES:
            raise MoeOffloadError(f"unknown property {name!r} (known: {', '.join(PROPERTY_NAMES)})")
        field, parse, _ = PROPERTIES[key]
        fields[field] = parse(value)
    environ = os.environ if environ is None else environ
    for key, (field, parse, _) in DIAGNOSTICS.items():
        if environ.get(key, "").strip():
            try:
                fields[field] = parse(environ[key])
            except MoeOffloadError as err:
                raise MoeOffloadError(f"environment variable {err}") from None
    return OffloadConfig(**fields)
