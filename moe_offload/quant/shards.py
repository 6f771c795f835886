"""Write safetensors shards whose layout is planned before any data exists, so tensors can arrive one at a time.

Why not safetensors' save_file: it takes a whole shard's tensors at once, and a quantizer streaming a model
tensor by tensor would have to hold a shard in RAM. Every output tensor's dtype and shape is known before it
is computed, so the headers (and the index) are written first and each tensor is written at its planned
offset when it comes. Within a shard tensors are laid out by decreasing item size, so each starts at a
multiple of its own item size with no gap (the format has none), as the safetensors library lays them out.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

import torch

from ..checkpoint import INDEX_FILE, SAFETENSORS_DTYPES

_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class Planned:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class ShardWriter:
    """Shards of at most `max_shard_bytes` of data (a larger tensor gets a shard of its own) in `folder`,
    holding `planned` in order; `write` or `copy` each tensor once, in any order, then `finish`. A context
manager, so that a failure closes the open shard."""

    def __init__(self, folder: str, planned: list[Planned], max_shard_bytes: int):
        groups: list[list[Planned]] = [[]]
        size = 0
        for item in planned:
            if groups[-1] and size + item.nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(item)
            size += item.nbytes
        count = len(groups)
        self.files = [SINGLE_FILE] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors"
                                                       for i in range(count)]
        self.folder = folder
        self.where: dict[str, tuple[int, int, int]] = {}  # name -> (shard, absolute offset, bytes)
        self.pending: set[str] = set()
        self._handle, self._open_shard = None, None
        for shard, (file, items) in enumerate(zip(self.files, groups)):
            self._start_shard(shard, file, items)
        if count > 1:
            weight_map = {item.name: file for file, items in zip(self.files, groups) for item in items}
            index = {"metadata": {"total_size": sum(item.nbytes for item in planned)}, "weight_map": weight_map}
            with open(os.path.join(folder, INDEX_FILE), "w", encoding="utf-8") as handle:
                json.dump(index, handle, indent=2)

    def _start_shard(self, shard: int, file: str, items: list[Planned]) -> None:
        """Write the shard's header and size the file to its final length."""
        ordered = sorted(items, key=lambda item: -item.dtype.itemsize)  # stable: plan order within an item size
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        spans = []
        for item in ordered:
            header[item.name] = {"dtype": _DTYPE_NAMES[item.dtype], "shape": list(item.shape),
                                 "data_offsets": [offset, offset + item.nbytes]}
            spans.append((item.name, offset, item.nbytes))
            offset += item.nbytes
        text = json.dumps(header, separators=(",", ":")).encode("utf-8")
        text += b" " * (-len(text) % 8)  # data starts 8-byte aligned
        with open(os.path.join(self.folder, file), "wb") as handle:
            handle.write(struct.pack("<Q", len(text)) + text)
            handle.truncate(8 + len(text) + offset)
        for name, begin, nbytes in spans:
            self.where[name] = (shard, 8 + len(text) + begin, nbytes)
            self.pending.add(name)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """The tensor's raw bytes (native, i.e. little-endian) at its planned place."""
        data = tensor.contiguous().view(torch.uint8).reshape(-1).numpy()
        handle, nbytes = self._claim(name)
        if data.nbytes != nbytes:
            raise RuntimeError(f"{name}: {data.nbytes} bytes, planned {nbytes}")
        handle.write(memoryview(data))

    def copy(self, name: str, source: str, start: int, chunk: int = 64 * 2**20) -> None:
        """The planned bytes of `name` from file `source` at `start`, copied in chunks of bounded size."""
        handle, nbytes = self._claim(name)
        with open(source, "rb") as src:
            src.seek(start)
            while nbytes:
                data = src.read(min(chunk, nbytes))
                if not data:
                    raise RuntimeError(f"{source} ends inside {name}")
                handle.write(data)
                nbytes -= len(data)

    def _claim(self, name: str):
        """The open shard positioned at `name`'s offset, and its byte count; each name once."""
        if name not in self.pending:
            raise RuntimeError(f"{name} was not planned or is written twice")
        self.pending.discard(name)
        shard, offset, nbytes = self.where[name]
        if self._open_shard != shard:
            self._close_handle()
            self._handle = open(os.path.join(self.folder, self.files[shard]), "r+b")
            self._open_shard = shard
        self._handle.seek(offset)
        return self._handle, nbytes

    def _close_handle(self) -> None:
        if self._handle is not None:
            self._handle.close()
        self._handle, self._open_shard = None, None

    def finish(self) -> None:
        """Close, checking that every planned tensor was written."""
        self._close_handle()
        if self.pending:
            raise RuntimeError(f"{len(self.pending)} planned tensors never written, e.g. {min(self.pending)}")

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self._close_handle()
