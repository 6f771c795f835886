"""Where a non-resident expert's bytes come from on a miss: host RAM, or the checkpoint file on disk.

Mechanism only: "put expert (layer, e) into this buffer". Which experts live in which tier is decided once at
load (the host tier takes what its byte budget allows, the rest falls through to disk); which expert to fetch
is the cache's business.

Disk reads go straight to the expert's byte ranges in the safetensors file, with one of two strategies:
  odirect - O_DIRECT reads of the enclosing 4 KiB-aligned range into an aligned bounce buffer, bypassing the
            page cache. Default: the disk tier exists for checkpoints too big for RAM, whose pages are cold, and
            a cold read is faster without the page cache's copy. Falls back to pread where
            the filesystem refuses O_DIRECT (tmpfs).
  pread   - os.preadv into the destination buffer; fastest when the file sits in the page cache.
A memory mapping of the file is deliberately not offered: it was slowest in every measurement, and a checkpoint
that shrinks under a mapping kills the process with SIGBUS and no message.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
import weakref

import torch

from .checkpoint import ByteRange, ExpertLocation
from .expert_format import ExpertFormat, ExpertWeights, Matrix
from .errors import MoeOffloadError

_ALIGN = 4096
READ_CHUNK = 1 << 20  # bytes per disk request when an expert's reads run side by side (DiskTier.chunk_reads)
_HOST_REGISTER_PORTABLE, _HOST_REGISTER_MAPPED = 0x01, 0x02  # cudaHostRegister flags


def _as_bytes(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor (pinned or not)."""
    assert tensor.device.type == "cpu" and tensor.is_contiguous()
    return memoryview(tensor.view(torch.uint8).reshape(-1).numpy())


class DiskTier:
    """Reads an expert's checkpoint bytes (checkpoint dtype) from its safetensors file."""

    def __init__(self, strategy: str = "odirect"):
        if strategy not in ("pread", "odirect"):
            raise MoeOffloadError(f"unknown disk read strategy {strategy!r}")
        self.strategy = strategy
        self._fds: dict[str, int] = {}
        self._lock = threading.RLock()
        self._bounce = threading.local()

    def _fd(self, path: str) -> int:
        with self._lock:
            if path not in self._fds:
                self._fds[path] = self._open(path)
            return self._fds[path]

    def _open(self, path: str) -> int:
        direct = getattr(os, "O_DIRECT", 0) if self.strategy == "odirect" else 0
        try:
            return os.open(path, os.O_RDONLY | direct)
        except OSError as err:
            if direct and err.errno == errno.EINVAL:  # filesystem without O_DIRECT: read through the cache
                self.strategy = "pread"
                return self._open(path)
            raise MoeOffloadError(f"cannot open {path}: {err.strerror}") from None

    def read_range(self, src: ByteRange, dst: memoryview) -> None:
        """Fill `dst` (exactly src.nbytes long) with the file bytes [src.start, src.start + src.nbytes)."""
        fd = self._fd(src.path)  # may switch odirect to pread (filesystem without O_DIRECT)
        if self.strategy == "odirect":
            self._read_direct(fd, src, dst)
        else:
            self._read_positional(fd, src.start, dst)

    @staticmethod
    def _read_positional(fd: int, offset: int, dst: memoryview) -> None:
        done = 0
        while done < len(dst):
            got = os.preadv(fd, [dst[done:]], offset + done)
            if got <= 0:
                raise MoeOffloadError(f"short read at byte {offset + done}: checkpoint file truncated?")
            done += got

    def _read_direct(self, fd: int, src: ByteRange, dst: memoryview) -> None:
        begin = src.start - src.start % _ALIGN
        end = -(-(src.start + src.nbytes) // _ALIGN) * _ALIGN
        bounce = getattr(self._bounce, "buffer", None)
        if bounce is None or len(bounce) < end - begin:
            bounce = mmap.mmap(-1, end - begin)  # anonymous mappings are page-aligned, as O_DIRECT needs
            self._bounce.buffer = bounce
        view = memoryview(bounce)[: end - begin]
        done = 0
        while done < src.start + src.nbytes - begin:  # the last block may be short at end of file
            got = os.preadv(fd, [view[done:]], begin + done)
            if got <= 0:
                raise MoeOffloadError(f"short O_DIRECT read at byte {begin + done}: checkpoint file truncated?")
            done += got
        dst[:] = view[src.start - begin: src.start - begin + src.nbytes]

    def read_expert(self, location: ExpertLocation, dst: torch.Tensor) -> int:
        """Read one expert into `dst` (CPU uint8 [location.format.row_bytes]), each plane at its offset in the row
        of location.format (the checkpoint's format: a dtype conversion, if any, is the caller's)."""
        for src, view in self.chunk_reads(location, dst):
            self.read_range(src, view)
        return location.nbytes

    @staticmethod
    def chunk_reads(location: ExpertLocation, dst: torch.Tensor,
                    chunk: int = READ_CHUNK) -> list[tuple[ByteRange, memoryview]]:
        """The reads that fill `dst` as read_expert does, each at most `chunk` bytes, to run side by side.

        Why: one expert read alone keeps one request in flight, and a miss's layer waits for it; an NVMe disk
        serves several requests in flight much faster than one, and a decode step often misses one expert only."""
        out = _as_bytes(dst)
        reads = []
        for plane, pieces in zip(location.format.planes, location.planes):
            pos = plane.offset
            for piece in pieces:
                for offset in range(0, piece.nbytes, chunk):
                    size = min(chunk, piece.nbytes - offset)
                    reads.append((ByteRange(piece.path, piece.start + offset, size),
                                  out[pos + offset:pos + offset + size]))
                pos += piece.nbytes
        return reads

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def drop_page_cache(path: str) -> None:
    """Write back, then drop a file's pages from the page cache (no root needed), for cold-read measurements.

    A virtual machine's host-side cache is out of reach.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def pin_in_place(tensor: torch.Tensor) -> bool:
    """Page-lock a CPU tensor's memory for fast, asynchronous copies to CUDA.

    cudaHostRegister pins exactly these bytes; torch's pinned allocator would round a large request up to a
    power of two and could waste nearly half of a big host tier. Registered portable and mapped, so GPU kernels
    can also read the bytes in place (zero-copy, cache.py).
    """
    if not torch.cuda.is_available() or tensor.numel() == 0:
        return False
    flags = _HOST_REGISTER_PORTABLE | _HOST_REGISTER_MAPPED
    status = torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), tensor.numel() * tensor.element_size(), flags)
    return int(status) == 0


def unpin(tensors: list[torch.Tensor]) -> None:
    for tensor in tensors:
        torch.cuda.cudart().cudaHostUnregister(tensor.data_ptr())


def pin_for_lifetime(owner: object, tensors: list[torch.Tensor]) -> weakref.finalize | None:
    """Pin `tensors` until `owner` is closed or collected, whichever comes first.

    The finalizer holds the tensors, so their memory cannot be freed (and reused) while CUDA still has it
    registered; calling it unpins them early (close()).
    """
    pinned = [t for t in tensors if pin_in_place(t)]
    if len(pinned) < len(tensors):  # all or none: callers rely on every tensor being pinned
        unpin(pinned)
        return None
    return weakref.finalize(owner, unpin, pinned) if pinned else None


def graph_host_buffer(owner: object, numel: int, dtype: torch.dtype, pin: bool) -> torch.Tensor | None:
    """A zeroed host buffer that CUDA graphs may copy from or into; with `pin`, page-locked by cudaHostRegister
    on anonymous pages of its own until `owner` is closed or collected (None if that is refused).

    Not torch's pinned allocator: its non_blocking copies record events on the block, which graph capture must
    not do."""
    if not pin:
        return torch.zeros(numel, dtype=dtype)
    tensor = anonymous_pages(numel * dtype.itemsize, huge_pages=False)[0].view(dtype)  # zeroed, page-aligned
    if pin_for_lifetime(owner, [tensor]) is None:
        return None
    return tensor


HUGE_PAGE = 2 << 20  # x86-64's transparent huge page


def anonymous_pages(nbytes: int, huge_pages: bool) -> tuple[torch.Tensor, bool]:
    """(uint8 [nbytes] on private anonymous pages of its own, whether they were advised as huge pages).

    With huge_pages the buffer starts on a 2 MiB boundary and is advised MADV_HUGEPAGE before anything touches
    it, so where transparent huge pages are enabled ("always" or "madvise" in /sys/kernel/mm/transparent_hugepage)
    its first touch maps 2 MiB pages: a pass over an expert's 9.4 MB then takes ~5 TLB entries instead of ~2,300.
    A shared mapping (Python's mmap default) would get no huge pages."""
    align = HUGE_PAGE if huge_pages else mmap.PAGESIZE
    length = -(-max(1, nbytes) // align) * align
    pages = mmap.mmap(-1, length + align - mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = torch.frombuffer(pages, dtype=torch.uint8)  # keeps `pages` alive
    offset = -whole.data_ptr() % align  # a multiple of the (small) page size
    advised = False
    if huge_pages and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            pages.madvise(mmap.MADV_HUGEPAGE, offset, length)
            advised = True
        except OSError:  # a kernel without transparent huge pages: small pages, as torch.empty would give
            pass
    return whole[offset:offset + nbytes], advised


class HostTier:
    """A layer's share of non-resident experts, held in (pinned) host RAM in the engine's expert format.

    One allocation per layer, uint8 [n, B] (expert_format.py: one expert per row), so pinning is one call, an
    expert is one row to copy, and a kernel reads its planes in place through `weights`; on huge pages where the
    kernel gives them (anonymous_pages), since every decode step streams whole experts from here, by the CPU's
    cores and by the GPU's reads in place.
    """

    def __init__(self, experts: list[int], fmt: ExpertFormat, pin: bool, huge_pages: bool = True):
        self.row_of = {expert: row for row, expert in enumerate(experts)}
        self.format = fmt
        raw, self.huge_pages = anonymous_pages(len(experts) * fmt.row_bytes, huge_pages)
        self.rows = raw.view(len(experts), fmt.row_bytes)  # [n, B]
        self.weights = fmt.weights(self.rows)  # the kernels' views: [n, 2I, H] and [n, H, I], or quantized
        self._unpin = pin_for_lifetime(self, [raw]) if pin else None

    def __contains__(self, expert: int) -> bool:
        return expert in self.row_of

    @property
    def pinned(self) -> bool:
        """Page-locked and mapped now: copies are asynchronous and kernels may read it in place."""
        return self._unpin is not None and self._unpin.alive

    @property
    def gate_up(self) -> Matrix:
        return self.weights.gate_up  # [n, 2I, H]

    @property
    def down(self) -> Matrix:
        return self.weights.down  # [n, H, I]

    def row(self, expert: int) -> torch.Tensor:
        """The expert's bytes, uint8 [B]."""
        return self.rows[self.row_of[expert]]

    def get(self, expert: int) -> ExpertWeights:
        """The expert's matrices, views into its row."""
        return self.format.weights(self.row(expert))

    @property
    def nbytes(self) -> int:
        return self.rows.numel()

    def close(self) -> None:
        if self._unpin is not None:
            self._unpin()
