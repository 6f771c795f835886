"""ExpertFetcher: moves one expert's weights from its tier into a device buffer, asynchronously on CUDA.

Mechanism only, and blind to the expert's format: an expert is a row of bytes (expert_format.py), copied whole
from the host tier, or read from the checkpoint plane by plane into a staging row and copied on (converted only
where a dense checkpoint's dtype is not the compute dtype). On CUDA every copy runs on one dedicated copy
stream; the compute stream waits on an event before it reads a buffer that was filled, and the copy stream
waits for earlier compute before it overwrites a slot that compute may still read (`begin_step`,
`reuse_after`). Disk reads land in a ring of pinned staging buffers first, each guarded by an event so a buffer
is not refilled while its copy is in flight. On the CPU the same calls run synchronously, so the CPU path is the
same code and the test oracle.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from .checkpoint import ExpertLocation
from .expert_format import ExpertFormat
from .tiers import DiskTier, HostTier, pin_for_lifetime

# Disk misses of one step are read by this many threads at once (os.preadv releases the GIL): an NVMe disk serves
# several O_DIRECT requests in flight much faster than one.
DISK_THREADS = 8
STAGING_BUFFERS = DISK_THREADS


@dataclass
class Transfer:
    """One expert to bring to the device: where it lies in the checkpoint, and the row to fill."""

    expert: int
    location: ExpertLocation
    dst: torch.Tensor  # [B] uint8, a row of a slot pool, scratch or host tier


@dataclass
class TransferStats:
    """Exact counters of what moved; one instance is shared by all layers."""

    bytes_from_host: int = 0
    bytes_from_disk: int = 0
    experts_from_host: int = 0
    experts_from_disk: int = 0
    per_layer: dict[int, dict[str, int]] = field(default_factory=dict)

    def reset(self) -> None:
        self.bytes_from_host = self.bytes_from_disk = self.experts_from_host = self.experts_from_disk = 0
        self.per_layer.clear()


class ExpertFetcher:
    """One per model: the copy stream, the pinned staging ring and the transfer counters."""

    def __init__(self, device: torch.device, disk: DiskTier, max_expert_bytes: int):
        self.device = device
        self.disk = disk
        self.stats = TransferStats()
        self.on_cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.on_cuda else None
        # Staging for disk reads, in the checkpoint's format: [max_expert_bytes] uint8 each, pinned on CUDA.
        self._staging = [torch.empty(max_expert_bytes, dtype=torch.uint8) for _ in range(STAGING_BUFFERS)]
        self._unpin = pin_for_lifetime(self, self._staging) if self.on_cuda else None
        self._staging_free = [None] * STAGING_BUFFERS  # CUDA event after which the buffer may be refilled
        self._next_staging = 0
        self._pool: ThreadPoolExecutor | None = None

    # -- ordering between the compute stream and the copy stream -------------------------------------------
    def begin_step(self) -> None:
        """Copies issued from now on wait for all compute issued so far (it may read the slots they refill)."""
        if self.on_cuda:
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))

    def mark(self, on_copy_stream: bool) -> torch.cuda.Event | None:
        """An event at the current end of the copy stream (or of the compute stream)."""
        if not self.on_cuda:
            return None
        event = torch.cuda.Event()
        event.record(self.copy_stream if on_copy_stream else torch.cuda.current_stream(self.device))
        return event

    def wait_copies(self, event: torch.cuda.Event | None) -> None:
        """Make compute wait until the copies before `event` have landed."""
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def reuse_after(self, event: torch.cuda.Event | None) -> None:
        """Make later copies wait until the compute before `event` is done with its buffers."""
        if event is not None:
            self.copy_stream.wait_event(event)

    # -- moving bytes ----------------------------------------------------------------------------------------
    def fetch(self, layer: int, host: HostTier | None, transfers: list[Transfer], fmt: ExpertFormat) -> None:
        """Fill each transfer's row (in format `fmt`) from the nearest tier: host rows are copied at once, disk
        reads run in chunks, DISK_THREADS at a time, into pinned staging rows, each expert copied as soon as it
        is read."""
        counters = self.stats.per_layer.setdefault(layer, {"host": 0, "disk": 0})
        from_disk = []
        for job in transfers:
            if host is not None and job.expert in host:
                self._copy(job.dst, fmt, host.row(job.expert), host.format)
                self.stats.bytes_from_host += fmt.nbytes
                self.stats.experts_from_host += 1
                counters["host"] += 1
            else:
                from_disk.append(job)
        for start in range(0, len(from_disk), STAGING_BUFFERS):
            batch = from_disk[start:start + STAGING_BUFFERS]
            buffers = [self._claim_staging(job.location.format.row_bytes) for job in batch]
            reads = [self.disk.chunk_reads(job.location, raw) for job, (_, raw) in zip(batch, buffers)]
            if sum(map(len, reads)) == 1:
                self.disk.read_range(*reads[0][0])
                pending = [[]]
            else:  # every chunk of every expert in flight at once; each expert copied as soon as it is in
                pending = [[self._readers().submit(self.disk.read_range, src, view) for src, view in expert_reads]
                           for expert_reads in reads]
            for job, (index, raw), futures in zip(batch, buffers, pending):
                for future in futures:
                    future.result()
                self._copy(job.dst, fmt, raw, job.location.format)
                self._staging_free[index] = self.mark(on_copy_stream=True)
                self.stats.bytes_from_disk += job.location.nbytes
                self.stats.experts_from_disk += 1
                counters["disk"] += 1

    def _readers(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(DISK_THREADS, thread_name_prefix="moe-disk")
        return self._pool

    def _claim_staging(self, nbytes: int) -> tuple[int, torch.Tensor]:
        """The next staging buffer of the ring, once its previous copy has left it: (index, [nbytes] uint8)."""
        index = self._next_staging
        self._next_staging = (index + 1) % STAGING_BUFFERS
        if self._staging_free[index] is not None:
            self._staging_free[index].synchronize()
        return index, self._staging[index][:nbytes]

    def _copy(self, dst: torch.Tensor, fmt: ExpertFormat, src: torch.Tensor, src_format: ExpertFormat) -> None:
        """dst row (format fmt) = src row (src_format), on the copy stream on CUDA: one copy of the bytes, or plane
        by plane where a dense checkpoint's dtype is not the compute dtype (ExpertFormat.copy_row)."""
        if self.on_cuda:
            with torch.cuda.stream(self.copy_stream):
                fmt.copy_row(dst, src, src_format, non_blocking=True)
        else:
            fmt.copy_row(dst, src, src_format)

    def close(self) -> None:
        if self.on_cuda:
            torch.cuda.synchronize(self.device)
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        if self._unpin is not None:
            self._unpin()
        self.disk.close()
