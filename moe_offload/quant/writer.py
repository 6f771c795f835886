"""Write a copy of a MoE checkpoint whose routed experts are weight-only quantized (compressed-tensors
`pack-quantized`), everything else byte for byte as it was.

Why this shape:
- Streaming: the input is read through `Checkpoint`'s validated byte offsets, one expert matrix at a time, and
  dense tensors are copied in bounded chunks, so memory stays at one expert however large the model.
- The routed experts come out as per-expert Linear-style tensors (`experts.E.gate_proj.weight_packed`, ...),
  as llm-compressor writes them and as transformers' and vLLM's loaders look for them; a fused 3-D input
  (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]) is split so (gate rows, then up rows).
- All or nothing: the output is built in a hidden folder beside OUT_DIR and renamed into place at the end,
  so an interrupted run never leaves a folder that looks like a checkpoint.
- Deterministic: tensors are planned in name order and computed on the CPU with fixed methods, so the same
  input and options give the same bytes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..checkpoint import INDEX_FILE, Checkpoint, TensorEntry
from ..errors import MoeOffloadError
from .format import QuantSpec, quantization_config
from .methods import METHODS, quantize_weight
from .shards import Planned, ShardWriter

# Per-expert projection names (gate, up, down) a fused input is split into: the names transformers' own
# checkpoint conversion for the architecture merges back (Mixtral's hub files say w1/w3/w2).
SPLIT_NAMES = {"mixtral": ("w1", "w3", "w2")}
DEFAULT_SPLIT_NAMES = ("gate_proj", "up_proj", "down_proj")
# Weights in other formats would be stale copies of the unquantized model: never copied.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
MAX_SHARD_BYTES = 5 * 10**9


@dataclass(frozen=True)
class _Matrix:
    """One routed expert's projection: `module` is its output name without `.weight_*`; `rows` selects gate or
    up rows of a fused gate_up matrix."""

    module: str
    rows: slice | None = None


@dataclass(frozen=True)
class _Job:
    """One input tensor, or one expert of a fused one, and what it becomes. `matrices` empty = copied as is."""

    entry: TensorEntry
    expert: int | None
    matrices: tuple[_Matrix, ...]
    outputs: tuple[Planned, ...]


def quantize_checkpoint(model_dir: str, out_dir: str, spec: QuantSpec, method: str = "rtn", progress: bool = False,
                        max_shard_bytes: int = MAX_SHARD_BYTES) -> dict:
    """Write the quantized copy of `model_dir` to `out_dir` (absent or empty); returns a summary (output folder,
    matrices quantized, expert bytes in and out). Every user mistake raises MoeOffloadError before anything is
    written."""
    if method not in METHODS:
        raise MoeOffloadError(f"unknown method {method!r}: one of {', '.join(METHODS)}")
    out_dir = os.path.abspath(out_dir)
    _check_output(out_dir)
    checkpoint = Checkpoint(model_dir)
    config = _read_config(model_dir)
    if "quantization_config" in config:
        existing = config["quantization_config"]
        kind = existing.get("quant_method", "unknown") if isinstance(existing, dict) else "unknown"
        raise MoeOffloadError(f"{model_dir} is already quantized (config.json has a quantization_config, "
                              f"{kind}); quantize the unquantized checkpoint")
    jobs = _plan(checkpoint, config, spec)
    ignore = _ignored_modules(checkpoint)

    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.partial-", dir=os.path.dirname(out_dir))
    try:
        _write_tensors(staging, jobs, spec, method, progress, max_shard_bytes)
        config["quantization_config"] = quantization_config(spec, ignore)
        with open(os.path.join(staging, "config.json"), "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=2)
            handle.write("\n")
        _copy_other_files(model_dir, staging)
        _make_public(staging)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty, checked above; rename() needs the name free
        os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    quantized = [job for job in jobs if job.matrices]
    return {"output": out_dir, "quantized_matrices": sum(len(job.matrices) for job in quantized),
            "expert_bytes_in": sum(_input_bytes(job) for job in quantized),
            "expert_bytes_out": sum(p.nbytes for job in quantized for p in job.outputs)}


def _check_output(out_dir: str) -> None:
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise MoeOffloadError(f"output path exists and is not a folder: {out_dir}")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise MoeOffloadError(f"output folder exists and is not empty: {out_dir}")


def _read_config(model_dir: str) -> dict:
    try:
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MoeOffloadError(f"cannot read config.json of {model_dir}: {err}") from None
    if not isinstance(config, dict):
        raise MoeOffloadError(f"config.json of {model_dir} is not a JSON object")
    return config


def _plan(checkpoint: Checkpoint, config: dict, spec: QuantSpec) -> list[_Job]:
    """Every output tensor, in input-name order, after checking that the experts can be quantized as asked."""
    if not checkpoint.experts_by_layer:
        raise MoeOffloadError(f"no routed expert weights in {checkpoint.root}: not a MoE checkpoint (quantize "
                              "quantizes the routed experts of Mixtral, Qwen-MoE, OLMoE and DeepSeek layouts)")
    biased = next((entry.name for layer in checkpoint.experts_by_layer.values() for key, entry in layer.fused.items()
                   if not key.endswith("proj")), None)  # GPT-OSS's biases (or MXFP4 blocks) beside the weights
    if biased is not None or config.get("model_type") == "gpt_oss":
        raise MoeOffloadError(f"{biased or 'model_type gpt_oss'}: GPT-OSS experts (biases, gate/up interleaved, "
                              "clamped SwiGLU) are not quantized by `quantize`; moe-offload runs GPT-OSS's released "
                              "MXFP4 checkpoints as they are")
    experts = _expert_entries(checkpoint)
    _check_experts(experts.values(), spec)
    gate, up, down = SPLIT_NAMES.get(config.get("model_type"), DEFAULT_SPLIT_NAMES)
    jobs: list[_Job] = []
    for name in sorted(checkpoint.tensors):
        entry = checkpoint.tensors[name]
        if name not in experts:
            jobs.append(_Job(entry, None, (), (Planned(name, entry.dtype, entry.shape),)))
        elif len(entry.shape) == 2:  # per-expert `...experts.E.<proj>.weight`
            jobs.append(_job(entry, None, (_Matrix(name.removesuffix(".weight")),), spec))
        else:  # fused `...experts.gate_up_proj` [E, 2I, H] or `...experts.down_proj` [E, H, I]
            prefix, proj = name.rsplit(".", 1)
            for e in range(entry.shape[0]):
                if proj == "gate_up_proj":
                    inter = entry.shape[1] // 2
                    matrices = (_Matrix(f"{prefix}.{e}.{gate}", slice(0, inter)),
                                _Matrix(f"{prefix}.{e}.{up}", slice(inter, 2 * inter)))
                else:
                    matrices = (_Matrix(f"{prefix}.{e}.{down}"),)
                jobs.append(_job(entry, e, matrices, spec))
    return jobs


def _job(entry: TensorEntry, expert: int | None, matrices: tuple[_Matrix, ...], spec: QuantSpec) -> _Job:
    rows, cols = entry.shape[-2:]
    outputs = []
    for matrix in matrices:
        height = rows if matrix.rows is None else matrix.rows.stop - matrix.rows.start
        outputs += [Planned(f"{matrix.module}.{key}", dtype, shape)
                    for key, (dtype, shape) in spec.shapes(height, cols, entry.dtype).items()]
    return _Job(entry, expert, matrices, tuple(outputs))


def _expert_entries(checkpoint: Checkpoint) -> dict[str, TensorEntry]:
    """The routed experts' weight tensors by name (fused stacks and per-expert matrices)."""
    experts = {}
    for layer in checkpoint.experts_by_layer.values():
        for entry in [*layer.fused.values(), *(e for roles in layer.per_expert.values() for e in roles.values())]:
            experts[entry.name] = entry
    return experts


def default_group_size(model_dir: str, preferred: int) -> int:
    """`preferred` where it divides every routed expert's in_features (or there are no experts to ask: the
    quantizer then says why), else the largest power of two under it that does, else the largest divisor of
    their common width under it. Powers of two are what the kernels tile best (and all torch's int4 CPU kernel
    takes); a model with, say, a 192-wide expert would otherwise fail the default."""
    widths = {entry.shape[-1] for entry in _expert_entries(Checkpoint(model_dir)).values()}
    return group_dividing(math.gcd(*widths) if widths else preferred, preferred)


def group_dividing(width: int, preferred: int) -> int:
    """default_group_size's rule for experts whose in_features have `width` as greatest common divisor."""
    if width % preferred == 0:
        return preferred
    power = next((1 << b for b in range(preferred.bit_length() - 1, 0, -1) if width % (1 << b) == 0), 1)
    return power if power > 1 else max(d for d in range(1, min(width, preferred) + 1) if width % d == 0)


def _check_experts(entries, spec: QuantSpec) -> None:
    widths: dict[int, str] = {}
    for entry in entries:
        if not entry.dtype.is_floating_point:
            raise MoeOffloadError(f"{entry.name} is {entry.dtype}, not floating point: the checkpoint looks "
                                  "quantized already")
        widths.setdefault(entry.shape[-1], entry.name)
    for width, name in sorted(widths.items()):
        if width % spec.group_size:
            common = math.gcd(*widths)
            fits = max(d for d in range(1, min(common, spec.group_size) + 1) if common % d == 0)
            raise MoeOffloadError(
                f"group size {spec.group_size} does not divide the in_features {width} of {name}: compressed-tensors "
                f"readers (transformers, vLLM) need whole groups; the largest group size up to {spec.group_size} "
                f"that divides every expert's in_features is {fits}")


def _ignored_modules(checkpoint: Checkpoint) -> list[str]:
    """Modules whose weight stays as it was: every non-expert 2-D `.weight` (attention, routers, shared experts,
    embeddings, lm_head), and lm_head even when tied to the embeddings (so not in the file)."""
    modules = {name.removesuffix(".weight") for name in checkpoint.dense_names
               if name.endswith(".weight") and len(checkpoint.tensors[name].shape) == 2}
    return sorted(modules | {"lm_head"})


def _input_bytes(job: _Job) -> int:
    return job.entry.nbytes if job.expert is None else job.entry.nbytes // job.entry.shape[0]


def _read_matrix(job: _Job) -> torch.Tensor:
    """The input matrix of `job` [rows, cols], read from its byte range (one expert of a fused tensor)."""
    entry = job.entry
    nbytes = _input_bytes(job)
    start = entry.start + (0 if job.expert is None else job.expert * nbytes)
    with open(entry.path, "rb") as handle:
        handle.seek(start)
        data = bytearray(handle.read(nbytes))
    return torch.frombuffer(data, dtype=entry.dtype).view(entry.shape[-2:])


def _write_tensors(folder: str, jobs: list[_Job], spec: QuantSpec, method: str, progress: bool,
                   max_shard_bytes: int) -> None:
    planned = [item for job in jobs for item in job.outputs]
    total = sum(_input_bytes(job) for job in jobs)
    with ShardWriter(folder, planned, max_shard_bytes) as shards, \
            tqdm(total=total, desc="quantize", unit="B", unit_scale=True, disable=not progress) as bar:
        for job in jobs:
            if not job.matrices:
                shards.copy(job.entry.name, job.entry.path, job.entry.start)
            else:
                weight = _read_matrix(job)  # [rows, cols]
                for matrix in job.matrices:
                    part = weight if matrix.rows is None else weight[matrix.rows]
                    for key, tensor in quantize_weight(part, spec, method).items():
                        shards.write(f"{matrix.module}.{key}", tensor)
            bar.update(_input_bytes(job))
        shards.finish()


def _copy_other_files(model_dir: str, folder: str) -> None:
    """Tokenizer, generation config, chat template, licence, ...: every top-level file but weights and the
    files rewritten here."""
    for name in sorted(os.listdir(model_dir)):
        path = os.path.join(model_dir, name)
        if (os.path.isfile(path) and name not in ("config.json", INDEX_FILE)
                and not name.endswith(_WEIGHT_SUFFIXES)):
            shutil.copyfile(path, os.path.join(folder, name))


def _make_public(folder: str) -> None:
    """mkdtemp makes the folder private (0700); give it the mode a plain mkdir would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
