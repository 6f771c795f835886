"""OffloadConfig: the user's properties, parsed and validated once.

Properties arrive as keyword arguments (`LLMPipeline(path, "cuda", MOE_OFFLOAD_RATIO=37)`), as a JSON file
or as inline JSON (the benchmark's `-lc`). Everything downstream reads this frozen dataclass, never the raw
dict, so a typo or an out-of-range value fails at load with one clear line instead of deep in a layer.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import MoeOffloadError, read_user_text

IO_STRATEGIES = ("pread", "mmap", "odirect")
DTYPES = ("auto", "float32", "bfloat16", "float16")
KERNELS = ("auto", "triton", "torch")
SWITCHES = ("auto", "off")
ZERO_COPY_MODES = ("auto", "lru", "static", "off")
GRAPH_MODES = ("auto", "whole", "off")
CPU_EXPERT_MODES = ("off", "auto", "all")
CPU_HANDOFFS = ("host_function", "stream_wait")
_DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16", "f16": "float16"}
_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


@dataclass(frozen=True)
class OffloadConfig:
    # Percent of each MoE layer's routed experts kept resident on the device (0-100).
    # Per layer: resident = floor(E * ratio / 100 + 0.5), i.e. round half up (E=60, ratio=37 -> 22).
    moe_offload_ratio: int = 100
    # Bytes of host RAM for non-resident experts (pinned on CUDA). None = "auto": as many as fit in half
    # of the RAM available at load. Experts that do not fit are read from the checkpoint file on a miss.
    moe_host_cache_bytes: int | None = None
    # How the disk tier reads an expert's bytes from the safetensors file: O_DIRECT was fastest from a cold
    # page cache on the H200 machine (bench/results/2026-11-28-h200-io.json); see tiers.py.
    moe_io: str = "odirect"
    # Compute dtype. "auto": the checkpoint's dtype on CUDA, float32 on CPU (CPU half-precision GEMMs are slow
    # and float32 keeps CPU results comparable to a float32 reference).
    moe_dtype: str = "auto"
    # Expert compute: "triton" = the fused kernel (kernels/triton_moe.py; CUDA, SiLU experts), "torch" = the
    # per-expert loop (kernels/reference.py), "auto" = triton where it applies, else torch. Both gave logits
    # bit-identical to transformers' grouped_mm in bf16 on the H200 (bench/results/2026-11-28-h200-bf16-*.json).
    moe_kernel: str = "auto"
    # Misses read in place from the pinned host tier by the Triton kernel (no copy, no host sync; cache.py), with
    # the Triton kernel on CUDA in every layer whose non-resident experts all sit in the host tier. "lru": decode
    # misses are also admitted into the slots as they are read, LRU decided on the device (device_lru.py), where
    # the host tier holds every expert of the layer; "static": the resident set stays as loaded; "auto": lru where
    # it can, else static (LRU hit more than the static set on the shipped model's routing at ratios 25/50,
    # bench/results/2026-11-29-cpu-zero-copy-lru-hits.txt, and in tests/test_device_lru.py on CUDA); "off": misses
    # are copied in.
    moe_zero_copy: str = "auto"
    # Greedy decode steps replayed from CUDA graphs (decoding.py), on CUDA where the model's attention is plain
    # causal. "auto": one graph per step when every MoE layer runs without host syncs (ratio 100 or zero-copy),
    # else graph segments around the layers that sync (disk tier, copied misses; piecewise.py: on the H200 the
    # ratio-25 disk tier decoded at 47.6 tok/s against 22.3 eager). "whole": only whole-step graphs.
    moe_cuda_graph: str = "auto"
    # transformers' RMSNorms and rotary embedding as one Triton kernel each (dense_fusion.py): ~450 fewer launches
    # per decode step of a 12-layer model. "auto": on CUDA with triton, where each passes an equivalence check.
    moe_fuse_dense: str = "auto"
    # Decode misses partly computed on the CPU where they lie in the host tier, while the GPU reads the rest in
    # place (hybrid.py; zero-copy layers; with LRU admission only what the GPU reads is admitted). "auto": how
    # many per count of misses, and with which CPU kernel, timed on a layer at load, then kept only if whole
    # decodes run faster with them (else none); "all": every miss on the CPU; "off": every miss on the GPU.
    moe_cpu_experts: str = "off"
    # How a decode step hands the CPU its experts (hybrid.py, with the numba kernel): "stream_wait" = the GPU rings a
    # page-locked doorbell word and waits on another (stream memory operations) while a spinning thread of ours
    # serves it (kernels/doorbell.py), falling back to host_function where the driver refuses; "host_function" = a
    # CUDA host node runs the compiled step on the driver's callback thread. On the H200, stream_wait decoded
    # 11-17% faster at ratios 0, 25 and 75 and 1% slower at 50
    # (bench/results/2026-11-29-h200-vs-llamacpp-handoffs.json).
    moe_cpu_handoff: str = "stream_wait"
    # Threads of the CPU expert path, the one driving the pool included (kernels/spin_pool.py; they spin between
    # jobs). None = "auto": the cores torch uses less two (the launching thread's, and one spare).
    moe_cpu_threads: int | None = None
    # The input embedding table in page-locked host RAM, its rows read in place by the GPU (host_embeddings.py):
    # 622 MB less device memory for Qwen3-30B-A3B, as llama.cpp does. "on" needs CUDA, triton and an untied table.
    moe_host_embeddings: str = "off"
    # The host tier on 2 MiB transparent huge pages (tiers.anonymous_pages), where the kernel enables them
    # ("always" or "madvise"): every decode step streams whole experts from it. "off": 4 KiB pages.
    moe_host_huge_pages: str = "auto"

    def resident_count(self, num_experts: int) -> int:
        """Experts of a layer with `num_experts` routed experts that stay resident on the device."""
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
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?(?:[eE]\+?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise MoeOffloadError(f"{name} must be a byte count like 8GiB, 512MB, 0 or auto, got {value!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def _parse_choice(value: Any, name: str, choices: tuple[str, ...], aliases: Mapping[str, str] = {}) -> str:
    text = str(value).strip().lower()
    text = aliases.get(text, text)
    if text not in choices:
        raise MoeOffloadError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return text


_PARSERS = {
    "MOE_OFFLOAD_RATIO": ("moe_offload_ratio", parse_ratio),
    "MOE_HOST_CACHE": ("moe_host_cache_bytes", lambda v: parse_size(v, "MOE_HOST_CACHE")),
    "MOE_IO": ("moe_io", lambda v: _parse_choice(v, "MOE_IO", IO_STRATEGIES)),
    "MOE_DTYPE": ("moe_dtype", lambda v: _parse_choice(v, "MOE_DTYPE", DTYPES, _DTYPE_ALIASES)),
    "MOE_KERNEL": ("moe_kernel", lambda v: _parse_choice(v, "MOE_KERNEL", KERNELS)),
    "MOE_ZERO_COPY": ("moe_zero_copy", lambda v: _parse_choice(v, "MOE_ZERO_COPY", ZERO_COPY_MODES)),
    "MOE_CUDA_GRAPH": ("moe_cuda_graph", lambda v: _parse_choice(v, "MOE_CUDA_GRAPH", GRAPH_MODES)),
    "MOE_FUSE_DENSE": ("moe_fuse_dense", lambda v: _parse_choice(v, "MOE_FUSE_DENSE", SWITCHES)),
    "MOE_CPU_EXPERTS": ("moe_cpu_experts", lambda v: _parse_choice(v, "MOE_CPU_EXPERTS", CPU_EXPERT_MODES)),
    "MOE_CPU_HANDOFF": ("moe_cpu_handoff", lambda v: _parse_choice(v, "MOE_CPU_HANDOFF", CPU_HANDOFFS)),
    "MOE_CPU_THREADS": ("moe_cpu_threads", parse_threads),
    "MOE_HOST_EMBEDDINGS": ("moe_host_embeddings", lambda v: _parse_choice(v, "MOE_HOST_EMBEDDINGS", ("off", "on"))),
    "MOE_HOST_HUGE_PAGES": ("moe_host_huge_pages", lambda v: _parse_choice(v, "MOE_HOST_HUGE_PAGES", SWITCHES)),
}
PROPERTY_NAMES = tuple(_PARSERS)


def load_properties_file(source: str) -> dict[str, Any]:
    """Properties from a JSON file path or from inline JSON text (`-lc '{"MOE_OFFLOAD_RATIO": 37}'`)."""
    text = source
    if not source.lstrip().startswith("{"):
        text = read_user_text(source, "config file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise MoeOffloadError(f"config {source!r} is not valid JSON: {err.msg} at line {err.lineno}") from None
    if not isinstance(data, dict):
        raise MoeOffloadError(f"config {source!r} must be a JSON object of properties")
    return data


def make_config(properties: Mapping[str, Any]) -> OffloadConfig:
    """Validate property names and values; unknown names are an error, not silently ignored."""
    fields: dict[str, Any] = {}
    for name, value in properties.items():
        key = name.upper()
        if key not in _PARSERS:
            raise MoeOffloadError(f"unknown property {name!r} (known: {', '.join(PROPERTY_NAMES)})")
        field, parse = _PARSERS[key]
        fields[field] = parse(value)
    return OffloadConfig(**fields)
