"""Read a Hugging Face safetensors checkpoint's layout without loading it, and find every expert's bytes.

Why our own header parser: the disk tier reads one expert straight out of the file with a positional read,
so it needs absolute byte offsets, and a corrupt file must fail at open with one clear line (not as a
segfault or a garbage tensor mid-generation). So every header is checked here: length, JSON, dtypes,
offsets inside the file, sizes matching shapes, no two tensors sharing bytes.

Two expert layouts are understood:
  per-expert (the usual hub files): `...layers.L.<mlp>.experts.E.{w1,w3,w2 | gate_proj,up_proj,down_proj}.weight`
  fused 3-D (transformers' in-memory layout): `...layers.L.<mlp>.experts.{gate_up_proj [E, 2I, H], down_proj [E, H, I]}`
Either way an expert becomes an ExpertLocation: the byte ranges that fill its gate_up [2I, H] (gate rows then
up rows) and its down [H, I] matrices.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass, field

import torch

from .errors import MoeOffloadError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER_BYTES = 100 * 2**20
INDEX_FILE = "model.safetensors.index.json"

_PER_EXPERT_KEY = re.compile(
    r"^(?P<prefix>(?:.*\.)?layers\.(?P<layer>\d+)\.(?:.*\.)?)experts\.(?P<expert>\d+)\."
    r"(?P<proj>w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$"
)
_FUSED_EXPERT_KEY = re.compile(
    r"^(?P<prefix>(?:.*\.)?layers\.(?P<layer>\d+)\.(?:.*\.)?)experts\.(?P<proj>gate_up_proj|down_proj)$"
)
_PROJ_ROLE = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}


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
    """Where one routed expert's weights lie on disk, in checkpoint dtype.

    gate_up ranges, read back to back, fill a [2I, H] matrix (gate rows first); down ranges fill [H, I].
    """

    dtype: torch.dtype
    gate_up: tuple[ByteRange, ...]
    down: tuple[ByteRange, ...]

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.gate_up + self.down)


@dataclass
class ExpertTensors:
    """Checkpoint tensors of one MoE layer's routed experts, before they are checked against the model."""

    per_expert: dict[int, dict[str, TensorEntry]] = field(default_factory=dict)  # expert -> role -> tensor
    fused: dict[str, TensorEntry] = field(default_factory=dict)  # "gate_up_proj"/"down_proj" -> [E, ., .]


def _read_header(path: str) -> tuple[dict, int, int]:
    """Parse one safetensors header; return (entries, data_start, data_size). Raises on any corruption."""
    name = os.path.basename(path)
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
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as handle:
                weight_map = json.load(handle)["weight_map"]
            files = sorted(set(weight_map.values()))
            if not all(isinstance(f, str) for f in files):
                raise TypeError
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise MoeOffloadError(f"corrupt {INDEX_FILE} in {root}") from None
        missing = [f for f in files if not os.path.isfile(os.path.join(root, f))]
        if missing:
            raise MoeOffloadError(f"{INDEX_FILE} names missing shard {missing[0]} in {root}")
        return [os.path.join(root, f) for f in files]
    files = sorted(f for f in os.listdir(root) if f.endswith(".safetensors"))
    if not files:
        raise MoeOffloadError(f"no .safetensors files in {root}")
    return [os.path.join(root, f) for f in files]


class Checkpoint:
    """A checkpoint folder: its config.json, and the location of every tensor in its safetensors files."""

    def __init__(self, root: str):
        if not os.path.exists(root):
            raise MoeOffloadError(f"model path not found: {root}")
        if not os.path.isdir(root):
            raise MoeOffloadError(f"model path is not a directory: {root}")
        if not os.path.isfile(os.path.join(root, "config.json")):
            raise MoeOffloadError(f"no config.json in {root}: not a Hugging Face checkpoint")
        self.root = root
        self.tensors: dict[str, TensorEntry] = {}
        for path in _safetensors_files(root):
            for entry in _entries_of(path):
                if entry.name in self.tensors:
                    raise MoeOffloadError(f"tensor {entry.name!r} appears in two shards of {root}")
                self.tensors[entry.name] = entry
        self.experts_by_layer, self.dense_names = self._split_experts()

    def _split_experts(self) -> tuple[dict[int, ExpertTensors], list[str]]:
        by_layer: dict[int, ExpertTensors] = {}
        dense: list[str] = []
        for name, entry in self.tensors.items():
            if match := _PER_EXPERT_KEY.match(name):
                layer = by_layer.setdefault(int(match["layer"]), ExpertTensors())
                layer.per_expert.setdefault(int(match["expert"]), {})[_PROJ_ROLE[match["proj"]]] = entry
            elif match := _FUSED_EXPERT_KEY.match(name):
                by_layer.setdefault(int(match["layer"]), ExpertTensors()).fused[match["proj"]] = entry
            else:
                dense.append(name)
        return by_layer, dense

    def expert_locations(self, layer: int, num_experts: int, hidden: int, inter: int) -> list[ExpertLocation]:
        """Locations of experts 0..num_experts-1 of `layer`, checked against the model's shapes."""
        tensors = self.experts_by_layer.get(layer)
        if tensors is None:
            raise MoeOffloadError(f"checkpoint has no routed expert weights for MoE layer {layer}")
        if tensors.fused:
            return [self._fused_location(tensors.fused, layer, e, num_experts, hidden, inter)
                    for e in range(num_experts)]
        return [self._per_expert_location(tensors.per_expert, layer, e, hidden, inter) for e in range(num_experts)]

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

        def whole(entry: TensorEntry) -> ByteRange:
            return ByteRange(entry.path, entry.start, entry.nbytes)

        return ExpertLocation(roles["gate"].dtype, (whole(roles["gate"]), whole(roles["up"])), (whole(roles["down"]),))

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
        return ExpertLocation(gate_up.dtype, (row(gate_up),), (row(down),))

    @property
    def dtype(self) -> torch.dtype:
        """The dtype most of the checkpoint's floating-point bytes are stored in."""
        totals: dict[torch.dtype, int] = {}
        for entry in self.tensors.values():
            if entry.dtype.is_floating_point:
                totals[entry.dtype] = totals.get(entry.dtype, 0) + entry.nbytes
        return max(totals, key=totals.get) if totals else torch.float32
