"""Read a Hugging Face safetensors checkpoint's layout without loading it, and find every expert's bytes.

Why our own header parser: the disk tier reads one expert straight out of the file with a positional read,
so it needs absolute byte offsets, and a corrupt file must fail at open with one clear line (not as a
segfault or a garbage tensor mid-generation). So every header is checked here: length, JSON, dtypes,
offsets inside the file, sizes matching shapes, no two tensors sharing bytes.

Expert layouts understood:
  per-expert (the usual hub files): `...layers.L.<mlp>.experts.E.{w1,w3,w2 | gate_proj,up_proj,down_proj}.weight`
  fused 3-D (transformers' in-memory layout): `...layers.L.<mlp>.experts.{gate_up_proj [E, 2I, H], down_proj [E, H, I]}`
  quantized per-expert (compressed-tensors pack-quantized, int4/int8 group-wise, weight only):
      `...experts.E.<proj>.{weight_packed, weight_scale[, weight_zero_point], weight_shape}`, with config.json's
      `quantization_config` saying so (quantization_scheme); channel-wise schemes are one group per row.
  quantized per-expert (GPTQ int4/int8, AWQ int4): `...experts.E.<proj>.{qweight, qzeros, scales[, g_idx]}`
      with `quant_method: gptq` or `awq`: located in their own layout and repacked into compressed-tensors'
      planes as each expert is read (quant/gptq.py).
  FP8 block-quantized per-expert (DeepSeek-V3, Qwen3-FP8; quant/fp8.py): `...experts.E.<proj>.weight` F8_E4M3 with
      `...experts.E.<proj>.weight_scale_inv` F32 (or BF16/F16) blocks and `quant_method: fp8`; the checkpoint's
      other FP8 projections (attention, dense MLPs, shared experts) are listed in fp8_dense and dequantized at load.
  GPT-OSS (fused, transposed, with biases): `...experts.{gate_up_proj [E, H, 2I], gate_up_proj_bias [E, 2I],
      down_proj [E, I, H], down_proj_bias [E, H]}`, or MXFP4 (quant_method "mxfp4") with `{gate_up,down}_proj_blocks`
      uint8 [E, N, K/32, 16] and `_scales` uint8 [E, N, K/32] in place of the weights: read as stored, each
      expert's slice of every tensor one byte range (expert_format.py).
  Other quantization methods are refused by name.
Either way an expert becomes an ExpertLocation: its format (expert_format.py) and, per plane of that format, the
byte ranges that fill it back to back (gate before up), so a disk read never needs to know the format.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import struct
from dataclasses import dataclass, field

import torch

from .errors import MoeOffloadError
from .expert_format import ClampedSwiGLU, ExpertFormat
from .quant import fp8, gptq
from .quant.fp8 import BlockFP8Spec
from .quant.format import QuantSpec
from .quant.mxfp4 import BLOCK as MXFP4_BLOCK, MXFP4, Mxfp4Spec
from .validation import (check_weight_dtypes, quantization_format, read_config_json, refuse_unsupported_format,
                         require_regular_file)

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
    # parsed so that an FP8 checkpoint is named by its format (validation.py), never as a bad header
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER_BYTES = 100 * 2**20
INDEX_FILE = "model.safetensors.index.json"

_PER_EXPERT_KEY = re.compile(
    r"^(?P<prefix>(?:.*\.)?layers\.(?P<layer>\d+)\.(?:.*\.)?)experts\.(?P<expert>\d+)\."
    r"(?P<proj>w1|w2|w3|gate_proj|up_proj|down_proj)\.(?P<tensor>weight|weight_packed|weight_scale|weight_zero_point|"
    r"weight_shape|weight_g_idx|weight_scale_inv|qweight|qzeros|scales|g_idx)$"
)
_FUSED_EXPERT_KEY = re.compile(
    r"^(?P<prefix>(?:.*\.)?layers\.(?P<layer>\d+)\.(?:.*\.)?)experts\.(?P<proj>gate_up_proj|down_proj)$"
)
_METHOD_NAMES = {"gptq": "GPTQ", "awq": "AWQ", "fp8": "FP8", "mxfp4": "MXFP4"}  # quant_method -> name in errors
# GPT-OSS's tensors beside (or, MXFP4, instead of) the fused weights: biases, MXFP4 blocks and scales
_GPT_OSS_EXPERT_KEY = re.compile(
    r"^(?P<prefix>(?:.*\.)?layers\.(?P<layer>\d+)\.(?:.*\.)?)experts\."
    r"(?P<proj>(?:gate_up|down)_proj_(?:bias|blocks|scales))$"
)
_GPT_OSS_SUFFIXES = ("_bias", "_blocks", "_scales")
_PROJ_ROLE = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}
# compressed-tensors' tensors of one quantized Linear (quant/format.py has their layout)
PACKED, SCALE, ZERO, SHAPE, G_IDX = "weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx"


@dataclass(frozen=True)
class TensorEntry:
    """One tensor in one safetensors file: where its bytes are, absolute in the file."""

    name: str
    path: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    nbytes: int


@dataclass(frozen=True)
class ByteRange:
    path: str
    start: int
    nbytes: int


@dataclass(frozen=True)
class ExpertLocation:
    """Where one routed expert's weights lie on disk: its format as stored (the checkpoint's dtype, its
    quantization) and, per plane of that format, the byte ranges that fill the plane when read back to back."""

    format: ExpertFormat
    planes: tuple[tuple[ByteRange, ...], ...]  # aligned with format.planes

    def __post_init__(self):
        assert [sum(r.nbytes for r in ranges) for ranges in self.planes] == [p.nbytes for p in self.format.planes]

    @property
    def nbytes(self) -> int:
        """Bytes read from the file for this expert."""
        return sum(r.nbytes for ranges in self.planes for r in ranges)


@dataclass
class ExpertTensors:
    """Checkpoint tensors of one MoE layer's routed experts, before they are checked against the model."""

    # expert -> role -> tensor: role "gate"/"up"/"down" for a dense weight, "gate.weight_packed" and the like for
    # a quantized one's tensors
    per_expert: dict[int, dict[str, TensorEntry]] = field(default_factory=dict)
    fused: dict[str, TensorEntry] = field(default_factory=dict)  # "gate_up_proj"/"down_proj" -> [E, ., .]

    @property
    def count(self) -> int:
        """Experts of the layer."""
        if self.fused:
            return next(iter(self.fused.values())).shape[0]
        return len(self.per_expert)

    @property
    def indices(self) -> list[int]:
        """The expert numbers the checkpoint holds for the layer, ascending (a match has 0..E-1)."""
        return list(range(self.count)) if self.fused else sorted(self.per_expert)

    @property
    def any_name(self) -> str:
        """One tensor name of the layer's experts, for messages and name patterns."""
        entries = self.fused or next(iter(self.per_expert.values()))
        return next(iter(entries.values())).name

    @property
    def bytes_per_expert(self) -> int:
        """Bytes of one expert's weights as stored (quantized: packed values, scales and zero points)."""
        entries = list(self.fused.values()) or [entry for roles in self.per_expert.values()
                                                for role, entry in roles.items()
                                                if not role.endswith((SHAPE, f".{gptq.G_IDX}"))]
        return sum(entry.nbytes for entry in entries) // self.count


def _read_header(path: str) -> tuple[dict, int, int]:
    """Parse one safetensors header; return (entries, data_start, data_size). Raises on any corruption."""
    name = os.path.basename(path)
    require_regular_file(path)  # a FIFO would block the read below forever
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise MoeOffloadError(f"truncated safetensors file {name}: {size} bytes, no header")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
                raise MoeOffloadError(
                    f"corrupt safetensors header in {name}: header length {header_len} runs past the end of "
                    f"the file ({size} bytes)"
                )
            raw = handle.read(header_len)
    except OSError as err:
        raise MoeOffloadError(f"cannot read {path}: {err.strerror}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise MoeOffloadError(f"corrupt safetensors header in {name}: not valid JSON") from None
    if not isinstance(header, dict):
        raise MoeOffloadError(f"corrupt safetensors header in {name}: not a JSON object")
    header.pop("__metadata__", None)
    return header, 8 + header_len, size - 8 - header_len


def _entries_of(path: str) -> list[TensorEntry]:
    """Every tensor of one file, validated: known dtype, size matching shape, inside the data, no overlap."""
    header, data_start, data_size = _read_header(path)
    name = os.path.basename(path)
    entries: list[TensorEntry] = []
    spans: list[tuple[int, int, str]] = []
    for key, info in header.items():
        try:
            dtype_name, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            shape = tuple(int(d) for d in shape)
            begin, end = int(begin), int(end)
        except (TypeError, KeyError, ValueError):
            raise MoeOffloadError(f"corrupt safetensors header in {name}: bad entry for {key!r}") from None
        if not isinstance(dtype_name, str):  # ["F32"] is unhashable: the lookup below would raise TypeError
            raise MoeOffloadError(f"corrupt safetensors header in {name}: dtype of {key!r} is {dtype_name!r}, not "
                                  "a string")
        if dtype_name not in SAFETENSORS_DTYPES:
            raise MoeOffloadError(f"unsupported dtype {dtype_name} for {key!r} in {name}")
        dtype = SAFETENSORS_DTYPES[dtype_name]
        if any(d < 0 for d in shape):
            raise MoeOffloadError(f"corrupt safetensors header in {name}: negative dimension in {key!r}")
        expected = math.prod(shape) * dtype.itemsize
        if begin < 0 or end < begin or end - begin != expected:
            raise MoeOffloadError(
                f"corrupt safetensors header in {name}: offsets [{begin}, {end}) of {key!r} do not match its "
                f"shape {list(shape)} and dtype {dtype_name} ({expected} bytes)"
            )
        if end > data_size:
            raise MoeOffloadError(
                f"truncated or corrupt safetensors file {name}: {key!r} ends at byte {end} but the data holds "
                f"only {data_size} bytes (offsets out of range)"
            )
        spans.append((begin, end, key))
        entries.append(TensorEntry(key, path, dtype, shape, data_start + begin, end - begin))
    # Like the safetensors library itself, require the tensors to tile the data section exactly.
    spans.sort()
    covered, last_key = 0, None
    for begin, end, key in spans:
        if begin == end and begin <= covered:  # an empty tensor takes no bytes
            continue
        if begin < covered:
            raise MoeOffloadError(f"corrupt safetensors header in {name}: {last_key!r} and {key!r} overlap")
        if begin > covered:
            raise MoeOffloadError(f"corrupt safetensors header in {name}: bytes [{covered}, {begin}) of the data "
                                  "belong to no tensor")
        covered, last_key = end, key
    if covered != data_size:
        raise MoeOffloadError(f"corrupt safetensors file {name}: {data_size - covered} bytes after the last tensor")
    return entries


def _safetensors_files(root: str) -> list[str]:
    index_path = os.path.join(root, INDEX_FILE)
    if os.path.lexists(index_path):
        require_regular_file(index_path)
        try:
            with open(index_path, encoding="utf-8") as handle:
                weight_map = json.load(handle)["weight_map"]
            files = sorted(set(weight_map.values()))
            if not all(isinstance(f, str) for f in files):
                raise TypeError
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise MoeOffloadError(f"corrupt {INDEX_FILE} in {root}") from None
        missing = [f for f in files if not os.path.lexists(os.path.join(root, f))]
        if missing:
            raise MoeOffloadError(f"{INDEX_FILE} names missing shard {missing[0]} in {root}")
        return [os.path.join(root, f) for f in files]
    files = sorted(f for f in os.listdir(root) if f.endswith(".safetensors"))
    if not files:
        raise MoeOffloadError(f"no .safetensors files in {root}")
    return [os.path.join(root, f) for f in files]


def _unindexed_shards(root: str, files: list[str]) -> list[str]:
    """Safetensors files in the folder that the index does not name (so their tensors are never read)."""
    named = {os.path.basename(f) for f in files}
    return sorted(f for f in os.listdir(root) if f.endswith(".safetensors") and f not in named)


class Checkpoint:
    """A checkpoint folder: its config.json, and the location of every tensor in its safetensors files."""

    def __init__(self, root: str):
        if not os.path.exists(root):
            raise MoeOffloadError(f"model path not found: {root}")
        if not os.path.isdir(root):
            if root.lower().endswith(".gguf"):
                refuse_unsupported_format(("GGUF", f"file {os.path.basename(root)}"))
            raise MoeOffloadError(f"model path is not a directory: {root}")
        folder = os.listdir(root)
        if "config.json" not in folder:  # a folder of GGUF files alone is named by its format
            refuse_unsupported_format(quantization_format({}, folder))
        self.root = root
        self.config: dict = read_config_json(root)
        if "quantization_config" not in self.config and os.path.isfile(os.path.join(root, "quantize_config.json")):
            self.config["quantization_config"] = gptq.legacy_config(os.path.join(root, "quantize_config.json"))
        refuse_unsupported_format(quantization_format(self.config, folder))  # before a shard's header is read
        self.files = _safetensors_files(root)
        self.tensors: dict[str, TensorEntry] = {}
        for path in self.files:
            for entry in _entries_of(path):
                if entry.name in self.tensors:
                    raise MoeOffloadError(f"tensor {entry.name!r} appears in two shards of {root}")
                self.tensors[entry.name] = entry
        refuse_unsupported_format(quantization_format(self.config, folder, self.tensors))  # by tensor names
        self.fp8_scales = _fp8_scales(self.config, self.tensors)
        check_weight_dtypes(self.tensors.values(), self.fp8_scales)
        self.experts_by_layer, self.dense_names = self._split_experts()

    def index_note(self) -> str:
        """Where an index decides which shards are read: what it leaves out, for a message about missing
        tensors ("" without an index)."""
        if not os.path.isfile(os.path.join(self.root, INDEX_FILE)):
            return ""
        left_out = _unindexed_shards(self.root, self.files)
        return (f" ({INDEX_FILE} does not list them" +
                (f"; shards in the folder it leaves out: {', '.join(left_out)})" if left_out else ")"))

    def _split_experts(self) -> tuple[dict[int, ExpertTensors], list[str]]:
        by_layer: dict[int, ExpertTensors] = {}
        dense: list[str] = []
        for name, entry in self.tensors.items():
            if match := _PER_EXPERT_KEY.match(name):
                layer = by_layer.setdefault(int(match["layer"]), ExpertTensors())
                role, tensor = _PROJ_ROLE[match["proj"]], match["tensor"]
                key = role if tensor == "weight" else f"{role}.{tensor}"
                layer.per_expert.setdefault(int(match["expert"]), {})[key] = entry
            elif match := _FUSED_EXPERT_KEY.match(name) or _GPT_OSS_EXPERT_KEY.match(name):
                by_layer.setdefault(int(match["layer"]), ExpertTensors()).fused[match["proj"]] = entry
            else:
                dense.append(name)
        return by_layer, dense

    @functools.cached_property
    def quantization(self) -> QuantSpec | BlockFP8Spec | Mxfp4Spec | None:
        """The routed experts' weight quantization (config.json's quantization_config), None where there is none.
        Quantized weights outside the routed experts are refused: the dense parts are loaded as plain tensors
        (FP8 ones excepted: fp8_dense, dequantized at load)."""
        is_gptq = isinstance(self.config.get("quantization_config"), dict) and \
            self.config["quantization_config"].get("quant_method") in ("gptq", "awq")  # dequantized at load
        marks = (f".{PACKED}",) if is_gptq else (f".{PACKED}", f".{gptq.QWEIGHT}")
        outside = next((name for name in sorted(self.dense_names) if name.endswith(marks)), None)
        if outside is not None:
            raise MoeOffloadError(f"{outside}: quantized weights outside the routed experts are not supported "
                                  "(attention, routers and shared experts must stay unquantized)")
        spec = quantization_scheme(self.config)
        quantized = next((entry.name for tensors in self.experts_by_layer.values()
                          for roles in tensors.per_expert.values() for role, entry in roles.items() if "." in role),
                         None)
        if spec is None:
            if quantized is not None:
                raise MoeOffloadError(f"{quantized} is a quantized tensor, but config.json has no quantization_config")
            return None
        if isinstance(spec, Mxfp4Spec):  # GPT-OSS's fused experts, checked in _gpt_oss_locations
            if not any(key.endswith("_blocks") for tensors in self.experts_by_layer.values() for key in tensors.fused):
                raise MoeOffloadError("MXFP4 quantization (config.json: quant_method 'mxfp4') is not supported for "
                                      "these experts: moe-offload reads MXFP4 in GPT-OSS's layout only "
                                      "(experts.gate_up_proj_blocks and _scales)")
            return spec
        said = _METHOD_NAMES.get(self.config["quantization_config"].get("quant_method"), "compressed-tensors")
        if quantized is None:
            if said != "compressed-tensors" and self.experts_by_layer:  # compressed-tensors may `ignore` experts
                raise MoeOffloadError(f"config.json's quantization_config is {said}, but the routed experts are not "
                                      f"quantized ({self.experts_by_layer[min(self.experts_by_layer)].any_name})")
        else:
            tail = quantized.rpartition(".")[2]
            found = ("GPTQ/AWQ" if tail in gptq.TENSORS + (gptq.G_IDX,) else "FP8" if tail == fp8.SCALE_INV
                     else "compressed-tensors")
            if found != {"GPTQ": "GPTQ/AWQ", "AWQ": "GPTQ/AWQ"}.get(said, said):
                raise MoeOffloadError(f"{quantized} is a {found} tensor, but config.json's quantization_config is "
                                      f"{said}")
        if isinstance(spec, BlockFP8Spec):
            for weight, scale in self.fp8_dense.items():
                fp8.check_dense(weight, self.tensors[weight], self.tensors[scale], spec)
        return spec

    @property
    def fp8_dense(self) -> dict[str, str]:
        """FP8 weights outside the routed experts (attention, dense MLPs, shared experts) -> their
        weight_scale_inv: dequantized to the compute dtype as they are loaded (integration.py)."""
        dense = set(self.dense_names)
        return {weight: scale for weight, scale in self.fp8_scales.items() if weight in dense}

    def expert_locations(self, layer: int, num_experts: int, hidden: int, inter: int,
                         glu: ClampedSwiGLU | None = None) -> list[ExpertLocation]:
        """Locations of experts 0..num_experts-1 of `layer`, checked against the model's shapes (and, quantized,
        against the quantization scheme). glu: the model's experts are GPT-OSS's (biases, transposed)."""
        spec = self.quantization  # refuses unsupported schemes by name before any tensor is looked at
        tensors = self.experts_by_layer.get(layer)
        if tensors is None:
            raise MoeOffloadError(f"checkpoint has no routed expert weights for MoE layer {layer}{self.index_note()}")
        gpt_oss = any(key.endswith(_GPT_OSS_SUFFIXES) for key in tensors.fused)  # biases, MXFP4 blocks, scales
        if glu is not None or gpt_oss or isinstance(spec, Mxfp4Spec):
            return _gpt_oss_locations(tensors, layer, num_experts, hidden, inter, glu, spec)
        if tensors.fused:
            return [self._fused_location(tensors.fused, layer, e, num_experts, hidden, inter)
                    for e in range(num_experts)]
        quantized = next((entry.name for roles in tensors.per_expert.values() for role, entry in roles.items()
                          if "." in role), None)
        if quantized is None:
            return [self._per_expert_location(tensors.per_expert, layer, e, hidden, inter)
                    for e in range(num_experts)]
        if isinstance(spec, BlockFP8Spec):
            locations = [_fp8_location(tensors.per_expert, layer, e, hidden, inter, spec)
                         for e in range(num_experts)]
        elif self.gptq is not None:  # self.quantization checked that the tensors are GPTQ's
            locations = [_gptq_location(tensors.per_expert, layer, e, hidden, inter, self.gptq)
                         for e in range(num_experts)]
        else:
            locations = [_quantized_location(tensors.per_expert, layer, e, hidden, inter, spec)
                         for e in range(num_experts)]
        scales = sorted({str(loc.format.dtype) for loc in locations})
        if len(scales) > 1:
            raise MoeOffloadError(f"experts of layer {layer} mix scale dtypes {scales}")
        return locations

    @functools.cached_property
    def gptq(self) -> gptq.GptqScheme | None:
        """The GPTQ (or AWQ) scheme where config.json's quant_method is gptq or awq (quantization_scheme has
        checked it)."""
        quant = self.config.get("quantization_config")
        method = quant.get("quant_method") if self.quantization else None
        return gptq.gptq_scheme(quant) if method == "gptq" else gptq.awq_scheme(quant) if method == "awq" else None

    @functools.cached_property
    def gptq_linears(self) -> dict[str, dict[str, str]]:
        """"X.weight" -> {kind: tensor name} of the GPTQ Linears outside the routed experts (attention, shared
        experts), which the loader dequantizes (gptq_linear_weight); {} unless the checkpoint is GPTQ."""
        return gptq.dense_linears(self.dense_names) if self.gptq is not None else {}

    def gptq_linear_weight(self, weight: str, shape: tuple[int, int]) -> torch.Tensor:
        """The dequantized [N, K] weight `weight` (a key of gptq_linears), checked against the model's shape."""
        entries = {kind: self.tensors[name] for kind, name in self.gptq_linears[weight].items()}
        return gptq.dense_weight(entries, _read_tensor, shape, self.gptq, weight)

    @staticmethod
    def _per_expert_location(per_expert, layer: int, expert: int, hidden: int, inter: int) -> ExpertLocation:
        roles = per_expert.get(expert, {})
        want = {"gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}
        for role, shape in want.items():
            entry = roles.get(role)
            if entry is None:
                raise MoeOffloadError(f"checkpoint lacks the {role} projection of expert {expert} in layer {layer}")
            if entry.shape != shape:
                raise MoeOffloadError(
                    f"{entry.name} has shape {list(entry.shape)}, the model expects {list(shape)}")
        dtypes = {roles[r].dtype for r in want}
        if len(dtypes) != 1:
            raise MoeOffloadError(f"expert {expert} of layer {layer} mixes dtypes {sorted(map(str, dtypes))}")
        return ExpertLocation(ExpertFormat(inter, hidden, roles["gate"].dtype),
                              ((_whole(roles["gate"]), _whole(roles["up"])), (_whole(roles["down"]),)))

    @staticmethod
    def _fused_location(fused, layer: int, expert: int, num_experts: int, hidden: int, inter: int) -> ExpertLocation:
        want = {"gate_up_proj": (num_experts, 2 * inter, hidden), "down_proj": (num_experts, hidden, inter)}
        for proj, shape in want.items():
            entry = fused.get(proj)
            if entry is None:
                raise MoeOffloadError(f"checkpoint lacks experts.{proj} in layer {layer}")
            if entry.shape != shape:
                raise MoeOffloadError(f"{entry.name} has shape {list(entry.shape)}, the model expects {list(shape)}")

        def row(entry: TensorEntry) -> ByteRange:
            stride = entry.nbytes // num_experts  # one expert's [., .] matrix is contiguous in [E, ., .]
            return ByteRange(entry.path, entry.start + expert * stride, stride)

        gate_up, down = fused["gate_up_proj"], fused["down_proj"]
        if gate_up.dtype != down.dtype:
            raise MoeOffloadError(f"experts of layer {layer} mix dtypes {gate_up.dtype} and {down.dtype}")
        return ExpertLocation(ExpertFormat(inter, hidden, gate_up.dtype), ((row(gate_up),), (row(down),)))

    @property
    def dtype(self) -> torch.dtype:
        """The dtype most of the checkpoint's floating-point bytes are stored in."""
        totals: dict[torch.dtype, int] = {}
        for entry in self.tensors.values():
            fp8_part = entry.dtype.itemsize == 1 or entry.name.endswith(fp8.SCALE_INV)  # dequantized: not a dtype
            if entry.dtype.is_floating_point and not fp8_part:  # to compute in
                totals[entry.dtype] = totals.get(entry.dtype, 0) + entry.nbytes
        return max(totals, key=totals.get) if totals else torch.float32


def _whole(entry: TensorEntry) -> ByteRange:
    return ByteRange(entry.path, entry.start, entry.nbytes)


def _quantized_location(per_expert, layer: int, expert: int, hidden: int, inter: int,
                        spec: QuantSpec) -> ExpertLocation:
    """An expert's compressed-tensors tensors, each checked (dtype, shape) against the model's shapes and the
    scheme, as the planes of its quantized ExpertFormat. weight_shape is checked by its header only: reading its
    values would be three small reads per expert at load, and the packed and scale shapes already pin N and K."""
    roles = per_expert.get(expert, {})
    scale_dtypes = set()
    for role, (rows, cols) in {"gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}.items():
        if role in roles:
            raise MoeOffloadError(f"{roles[role].name}: expert {expert} of layer {layer} mixes quantized and "
                                  "unquantized projections")
        if f"{role}.{G_IDX}" in roles:
            raise MoeOffloadError(f"{roles[f'{role}.{G_IDX}'].name}: act-order quantization (g_idx) is not supported")
        groups = 1 if spec.group_size is None else -(-cols // spec.group_size)
        words = -(-cols * spec.bits // 32)
        expected = {PACKED: ("int32", (rows, words)), SCALE: ("floating point", (rows, groups)),
                    SHAPE: ("int64", (2,))}
        if not spec.symmetric:
            expected[ZERO] = ("int32", (-(-rows * spec.bits // 32), groups))
        elif f"{role}.{ZERO}" in roles:
            raise MoeOffloadError(f"{roles[f'{role}.{ZERO}'].name}: zero points, but the scheme is symmetric")
        for key, (dtype, shape) in expected.items():
            entry = roles.get(f"{role}.{key}")
            if entry is None:
                raise MoeOffloadError(f"checkpoint lacks {key} of the {role} projection of expert {expert} in layer "
                                      f"{layer}")
            dtype_ok = {"int32": entry.dtype == torch.int32, "floating point": entry.dtype.is_floating_point,
                        "int64": entry.dtype in (torch.int64, torch.int32)}[dtype]
            if not dtype_ok or entry.shape != shape:
                raise MoeOffloadError(
                    f"{entry.name} is {str(entry.dtype).replace('torch.', '')} {list(entry.shape)}, expected "
                    f"{dtype} {list(shape)} for a [{rows}, {cols}] weight at {spec.bits} bits, {spec.grouping}")
        scale_dtypes.add(roles[f"{role}.{SCALE}"].dtype)
    fmt = ExpertFormat(inter, hidden, _one_scale_dtype(scale_dtypes, layer, expert), spec)
    tensor = {"packed": PACKED, "scale": SCALE, "zero": ZERO}
    return _planes_location(fmt, roles, lambda kind: f".{tensor[kind]}")


def _one_scale_dtype(scale_dtypes: set, layer: int, expert: int) -> torch.dtype:
    """The scale dtype of an expert's projections, which must agree: one format holds the expert."""
    if len(scale_dtypes) != 1:
        raise MoeOffloadError(f"expert {expert} of layer {layer} mixes scale dtypes "
                              f"{sorted(str(d) for d in scale_dtypes)}")
    return next(iter(scale_dtypes))


def _planes_location(fmt: ExpertFormat, roles: dict, suffix_of) -> ExpertLocation:
    """The expert's byte ranges in `fmt`'s plane order: a plane "gate_up.KIND" is the gate then the up projection's
    tensor, the role `<projection><suffix_of(KIND)>` ("gate.weight_packed"; FP8's weight is the role "gate" itself),
    "down.KIND" the down projection's."""
    planes = []
    for plane in fmt.planes:
        matrix, kind = plane.name.split(".")
        projections = ("gate", "up") if matrix == "gate_up" else ("down",)
        planes.append(tuple(_whole(roles[f"{role}{suffix_of(kind)}"]) for role in projections))
    return ExpertLocation(fmt, tuple(planes))


def _gptq_location(per_expert, layer: int, expert: int, hidden: int, inter: int,
                   scheme: gptq.GptqScheme) -> ExpertLocation:
    """An expert's GPTQ tensors, each checked (dtype, shape) against the model's shapes and the scheme, as the
    planes of its GPTQ storage format (quant/gptq.py), which copy_row repacks. g_idx is checked by its header, and
    with desc_act by its values (k // group_size: act-order that permuted it is refused)."""
    roles = per_expert.get(expert, {})
    spec, scale_dtypes = scheme.spec, set()
    for role, (rows, cols) in {"gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}.items():
        if role in roles:
            raise MoeOffloadError(f"{roles[role].name}: expert {expert} of layer {layer} mixes quantized and "
                                  "unquantized projections")
        shapes = gptq.tensor_shapes(rows, cols, spec, scheme.awq)
        if shapes is None:
            raise MoeOffloadError(f"{scheme.name} at {spec.bits} bits needs the experts' dimensions ({rows} x {cols}) "
                                  f"to be multiples of {32 // spec.bits}")
        for key, shape in shapes.items():
            entry = roles.get(f"{role}.{key}")
            if entry is None:
                raise MoeOffloadError(f"checkpoint lacks {key} of the {role} projection of expert {expert} in layer "
                                      f"{layer}")
            integer = key != gptq.SCALES
            if (entry.dtype == torch.int32) != integer or entry.shape != shape:
                raise MoeOffloadError(
                    f"{entry.name} is {str(entry.dtype).replace('torch.', '')} {list(entry.shape)}, expected "
                    f"{'int32' if integer else 'floating point'} {list(shape)} for a [{rows}, {cols}] weight at "
                    f"{spec.bits} bits, {spec.grouping}")
        if scheme.desc_act:
            entry = roles[f"{role}.{gptq.G_IDX}"]
            gptq.check_g_idx(_read_tensor(entry), spec, entry.name)
        scale_dtypes.add(roles[f"{role}.{gptq.SCALES}"].dtype)
    fmt = ExpertFormat(inter, hidden, _one_scale_dtype(scale_dtypes, layer, expert), spec, scheme.source)
    return _planes_location(fmt, roles, lambda kind: f".{kind}")


def _read_tensor(entry: TensorEntry) -> torch.Tensor:
    """One tensor's values, read from its file (a g_idx [K] int32, a GPTQ Linear's tensors)."""
    try:
        with open(entry.path, "rb") as handle:
            handle.seek(entry.start)
            data = handle.read(entry.nbytes)
    except OSError as err:
        raise MoeOffloadError(f"cannot read {entry.path}: {err.strerror}") from None
    if len(data) != entry.nbytes:
        raise MoeOffloadError(f"short read of {entry.name} in {os.path.basename(entry.path)}")
    return torch.frombuffer(bytearray(data), dtype=entry.dtype).view(entry.shape)


def _fp8_scales(config: dict, tensors: dict[str, TensorEntry]) -> dict[str, str]:
    """Every `X.weight` -> `X.weight_scale_inv` of an FP8 block-quantized checkpoint (quant_method fp8 in
    config.json), {} for any other: the weights that may be F8_E4M3 (validation.check_weight_dtypes)."""
    quant = config.get("quantization_config")
    if not isinstance(quant, dict) or quant.get("quant_method") != "fp8":
        return {}
    suffix = f".{fp8.SCALE_INV}"
    return {f"{name.removesuffix(suffix)}.weight": name for name in tensors
            if name.endswith(suffix) and f"{name.removesuffix(suffix)}.weight" in tensors}


def _fp8_location(per_expert, layer: int, expert: int, hidden: int, inter: int,
                  spec: BlockFP8Spec) -> ExpertLocation:
    """An expert's FP8 weights and scale blocks, each checked (dtype, shape) against the model's shapes and the
    block size, as the planes of its FP8 ExpertFormat: gate's and up's weights (and their scale blocks) back to
    back, so the up scales start at row ceil(I / block_n) of gate_up.scale."""
    roles = per_expert.get(expert, {})
    scale_dtypes = set()
    for role, (rows, cols) in {"gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}.items():
        for key, dtypes, shape in (("", (fp8.WEIGHT_DTYPE,), (rows, cols)),
                                   (f".{fp8.SCALE_INV}", fp8.SCALE_DTYPES, spec.scale_shape(rows, cols))):
            entry = roles.get(f"{role}{key}")
            if entry is None:
                raise MoeOffloadError(f"checkpoint lacks {key.lstrip('.') or 'weight'} of the {role} projection of "
                                      f"expert {expert} in layer {layer}")
            if entry.dtype not in dtypes or entry.shape != shape:
                raise MoeOffloadError(
                    f"{entry.name} is {str(entry.dtype).replace('torch.', '')} {list(entry.shape)}, expected "
                    f"{'float8_e4m3fn' if key == '' else 'floating point'} {list(shape)} for a [{rows}, {cols}] "
                    f"weight in FP8 blocks of {spec.block_n}x{spec.block_k}")
        scale_dtypes.add(roles[f"{role}.{fp8.SCALE_INV}"].dtype)
    fmt = ExpertFormat(inter, hidden, _one_scale_dtype(scale_dtypes, layer, expert), spec)
    return _planes_location(fmt, roles, {"weight": "", "scale": f".{fp8.SCALE_INV}"}.get)


def _gpt_oss_locations(tensors: "ExpertTensors", layer: int, num_experts: int, hidden: int, inter: int,
                       glu: ClampedSwiGLU | None, spec) -> list[ExpertLocation]:
    """GPT-OSS's fused experts, bf16 or MXFP4, checked (names, dtypes, shapes) against the model and config.json;
    each expert's planes are its rows of the [E, ...] tensors, read as stored."""
    if glu is None:
        name = next((e.name for key, e in tensors.fused.items() if not key.endswith("proj")), tensors.any_name)
        raise MoeOffloadError(f"{name}: GPT-OSS expert tensors (biases, MXFP4 blocks), but the model's experts "
                              "are not GPT-OSS's; the config and the weights do not match")
    if spec is not None and not isinstance(spec, Mxfp4Spec):
        raise MoeOffloadError("GPT-OSS experts are read unquantized or in MXFP4 (quant_method 'mxfp4') only")
    quantized = isinstance(spec, Mxfp4Spec)
    if quantized and (hidden % MXFP4_BLOCK or inter % MXFP4_BLOCK):
        raise MoeOffloadError(f"MXFP4 experts need hidden and intermediate sizes divisible by {MXFP4_BLOCK}, not "
                              f"{hidden} and {inter}")
    want: dict[str, tuple[tuple[int, ...], str]] = {}
    for proj, rows, cols in (("gate_up_proj", 2 * inter, hidden), ("down_proj", hidden, inter)):
        if quantized:
            want[f"{proj}_blocks"] = ((num_experts, rows, cols // MXFP4_BLOCK, MXFP4_BLOCK // 2), "uint8")
            want[f"{proj}_scales"] = ((num_experts, rows, cols // MXFP4_BLOCK), "uint8")
        else:
            want[proj] = ((num_experts, cols, rows), "float")  # transposed: [E, K, N]
        want[f"{proj}_bias"] = ((num_experts, rows), "float")
    for key, entry in tensors.fused.items():
        if key not in want:
            reason = ("config.json's quantization_config says mxfp4" if quantized else
                      "config.json has no quantization_config mxfp4")
            raise MoeOffloadError(f"{entry.name}: unexpected in layer {layer}'s experts ({reason})")
    for key, (shape, kind) in want.items():
        entry = tensors.fused.get(key)
        if entry is None:
            raise MoeOffloadError(f"checkpoint lacks experts.{key} in layer {layer}")
        dtype_ok = entry.dtype == torch.uint8 if kind == "uint8" else entry.dtype.is_floating_point
        if not dtype_ok or entry.shape != shape:
            raise MoeOffloadError(f"{entry.name} is {str(entry.dtype).replace('torch.', '')} {list(entry.shape)}, "
                                  f"expected {kind} {list(shape)}")
    dtypes = {tensors.fused[key].dtype for key, (_, kind) in want.items() if kind == "float"}
    if len(dtypes) != 1:
        raise MoeOffloadError(f"experts of layer {layer} mix dtypes {sorted(str(d) for d in dtypes)}")
    fmt = ExpertFormat(inter, hidden, dtypes.pop(), MXFP4 if quantized else None, glu=glu)
    plane_keys = {"gate_up": "gate_up_proj", "down": "down_proj", "gate_up.blocks": "gate_up_proj_blocks",
                  "gate_up.scales": "gate_up_proj_scales", "down.blocks": "down_proj_blocks",
                  "down.scales": "down_proj_scales", "gate_up_bias": "gate_up_proj_bias", "down_bias": "down_proj_bias"}

    def row(entry: TensorEntry, expert: int) -> ByteRange:
        stride = entry.nbytes // num_experts  # one expert's slice is contiguous in [E, ...]
        return ByteRange(entry.path, entry.start + expert * stride, stride)

    return [ExpertLocation(fmt, tuple((row(tensors.fused[plane_keys[plane.name]], e),) for plane in fmt.planes))
            for e in range(num_experts)]


def quantization_scheme(config: dict) -> QuantSpec | BlockFP8Spec | Mxfp4Spec | None:
    """The weight-only scheme of config.json's quantization_config (None where there is none): compressed-tensors
    `pack-quantized`, integer weights of 4 or 8 bits, group-wise, symmetric or with zero points, one scheme for
    every config group; or FP8 block-quantized (`quant_method: fp8`, quant/fp8.py's BlockFP8Spec). Everything else
    is refused by name, in one line."""
    config = config.get("quantization_config")
    if config is None:
        return None
    if not isinstance(config, dict):
        raise MoeOffloadError("config.json's quantization_config is not a JSON object")
    method = config.get("quant_method")
    if method == "gptq":
        return gptq.gptq_scheme(config).spec
    if method == "awq":
        return gptq.awq_scheme(config).spec
    if method == "fp8":
        return fp8.scheme(config)
    if method == "mxfp4":  # GPT-OSS's native experts; the rest of the model is unquantized
        return MXFP4
    if method != "compressed-tensors":
        raise MoeOffloadError(f"quantization method {method!r} is not supported: moe-offload reads compressed-tensors "
                              "pack-quantized checkpoints (int4/int8 weight-only)")
    for key in ("sparsity_config", "kv_cache_scheme", "transform_config"):
        if config.get(key):
            raise MoeOffloadError(f"compressed-tensors {key} is not supported")
    groups = config.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise MoeOffloadError("config.json's compressed-tensors quantization_config has no config_groups")
    schemes = set()
    for name, group in groups.items():
        if not isinstance(group, dict) or not isinstance(group.get("weights"), dict):
            raise MoeOffloadError(f"compressed-tensors config group {name!r} has no weights scheme")
        layout = group.get("format") or config.get("format")
        if layout != "pack-quantized":
            raise MoeOffloadError(f"compressed-tensors format {layout!r} is not supported (pack-quantized only)")
        if group.get("input_activations") or group.get("output_activations"):
            raise MoeOffloadError(f"compressed-tensors config group {name!r} quantizes activations: only weight-only "
                                  "schemes (W4A16, W8A16) are supported")
        weights = group["weights"]
        if weights.get("type", "int") != "int":
            raise MoeOffloadError(f"{weights.get('type')!r} weights are not supported (integer weights only)")
        strategy = weights.get("strategy")
        if strategy not in ("group", "channel"):
            raise MoeOffloadError(f"{strategy!r}-wise weight quantization is not supported (group-wise or "
                                  "channel-wise only)")
        if weights.get("actorder"):
            raise MoeOffloadError(f"act-order quantization ({weights['actorder']!r}) is not supported")
        if weights.get("dynamic"):
            raise MoeOffloadError("dynamic weight quantization is not supported")
        bits, group_size = weights.get("num_bits"), weights.get("group_size") if strategy == "group" else None
        if bits not in (4, 8) or strategy == "group" and (not isinstance(group_size, int) or group_size < 1):
            raise MoeOffloadError(f"{bits}-bit weights in groups of {group_size!r} are not supported (4 or 8 bits, "
                                  "a positive group size)")
        schemes.add((bits, group_size, bool(weights.get("symmetric", True))))
    if len(schemes) > 1:
        raise MoeOffloadError(f"several weight quantization schemes {sorted(schemes, key=str)} are not supported "
                              "(one only)")
    bits, group_size, symmetric = schemes.pop()
    return QuantSpec(bits, group_size, symmetric)
