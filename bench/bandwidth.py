"""The links an offloaded decode step moves bytes over, measured on the machine the tables run on: the roofline's
bounds (bench/derive.py).

- pinned host -> device copies (CUDA only), in one-expert pieces and as one 1 GiB copy: what PCIe gives;
- the CPU's DRAM read rate: a multi-threaded torch sum over a large buffer (pinned where CUDA is, as the host
  tier is), what the hybrid path's CPU share can read at most while it computes experts where they lie;
- cold O_DIRECT reads of the checkpoint (page cache dropped first) on one thread and on as many as the disk tier's
  read pool (transfer.py): what the disk tier can get.
Each is the best of a few repeats, so that the bound is the strictest one this machine showed.
"""

from __future__ import annotations

import errno
import mmap
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from bench.common import GB, free_device
from moe_offload.tiers import drop_page_cache as drop_file_cache
from moe_offload.transfer import DISK_THREADS  # the disk tier's read pool: the parallel reads use as many

CHUNK = 16 << 20  # disk reads
EXPERT_PIECE = 3 * 768 * 2048 * 2  # one Qwen3-30B-A3B expert in bf16: 9.4 MB


def _timed_cuda(fn, repeats: int, stream) -> float:
    """Median seconds of fn() on `stream`, by CUDA events."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            start.record(stream)
            fn()
            end.record(stream)
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def host_to_device(device: torch.device) -> dict:
    size = 1 << 30
    src = torch.empty(size, dtype=torch.uint8).pin_memory()  # [1 GiB]
    src.fill_(7)
    dst = torch.empty(size, dtype=torch.uint8, device=device)  # [1 GiB]
    stream = torch.cuda.Stream(device)
    pieces = size // EXPERT_PIECE

    def copy_pieces():
        for i in range(pieces):
            dst[i * EXPERT_PIECE:(i + 1) * EXPERT_PIECE].copy_(src[i * EXPERT_PIECE:(i + 1) * EXPERT_PIECE],
                                                               non_blocking=True)

    copy_pieces()  # warm-up, finished before anything is timed on `stream`
    torch.cuda.synchronize(device)
    piece_s = _timed_cuda(copy_pieces, 5, stream)
    whole_s = _timed_cuda(lambda: dst.copy_(src, non_blocking=True), 5, stream)
    src = dst = None  # released before the device cache is emptied
    free_device()
    return {"h2d_pinned_9mb_gb_s": pieces * EXPERT_PIECE / piece_s / GB, "h2d_piece_bytes": EXPERT_PIECE,
            "h2d_pinned_1gb_gb_s": size / whole_s / GB}


def dram_read(size: int) -> dict:
    """Best of 5 timed float32 sums over a `size`-byte buffer, with torch's intra-op threads (all cores unless
    set otherwise), after one untimed sum."""
    pin = torch.cuda.is_available()
    buffer = torch.ones(size // 4, dtype=torch.float32, pin_memory=pin)  # [size / 4]: every page touched
    buffer.sum()
    times = []
    for _ in range(5):
        started = time.perf_counter()
        buffer.sum()
        times.append(time.perf_counter() - started)
    threads = torch.get_num_threads()
    del buffer
    return {"dram_read_gb_s": size / min(times) / GB, "dram_read_threads": threads, "dram_read_bytes": size,
            "dram_read_rule": f"torch float32 sum over {size} bytes of {'pinned ' if pin else ''}host memory, "
                              f"{threads} threads, best of 5"}


def drop_page_cache(paths: list[str]) -> None:
    for path in paths:
        drop_file_cache(path)


def _chunks(paths: list[str]) -> list[tuple[str, int]]:
    return [(p, off) for p in paths for off in range(0, os.path.getsize(p), CHUNK)]


def _parallel_read(chunks, threads: int, seconds: float, direct: bool) -> tuple[int, float, bool]:
    """Read `chunks` (path, offset) with `threads` threads until done or `seconds` pass; (bytes, seconds, direct)."""
    fds = {}
    for path in {p for p, _ in chunks}:
        try:
            fds[path] = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECT", 0) if direct else 0))
        except OSError as err:
            if not (direct and err.errno == errno.EINVAL):
                raise
            direct = False  # filesystem without O_DIRECT (tmpfs): buffered reads
            fds[path] = os.open(path, os.O_RDONLY)
    deadline = time.perf_counter() + seconds
    done = [0] * threads

    def work(thread: int) -> None:
        buffer = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT needs
        view = memoryview(buffer)
        try:
            for i in range(thread, len(chunks), threads):
                if time.perf_counter() > deadline:
                    break
                path, offset = chunks[i]
                done[thread] += os.preadv(fds[path], [view], offset)
        finally:
            view.release()
            buffer.close()

    start = time.perf_counter()
    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(work, range(threads)))
    finally:
        for fd in fds.values():
            os.close(fd)
    return sum(done), time.perf_counter() - start, direct


def disk(paths: list[str], seconds: float) -> dict:
    """Cold O_DIRECT reads, 16 MiB each: 1 thread from the first shards, DISK_THREADS from the last ones (different
    bytes, so neither reads what the other brought into any cache), each at most half the checkpoint."""
    chunks = _chunks(paths)
    half = len(chunks) // 2 or 1
    drop_page_cache(paths)
    one, one_s, direct = _parallel_read(chunks[:half], 1, seconds, True)
    many, many_s, _ = _parallel_read(chunks[::-1][:half], DISK_THREADS, seconds, True)
    return {"disk_odirect_gb_s": one / one_s / GB, "disk_odirect_parallel_gb_s": many / many_s / GB,
            "disk_parallel_threads": DISK_THREADS, "disk_read_bytes": one + many, "disk_chunk_bytes": CHUNK,
            "disk_o_direct": direct}


def warm_page_cache(paths: list[str]) -> dict:
    """Buffered reads of whole files (8 threads), so loads that go through the page cache (llama.cpp's mmap, the
    baselines) read RAM, not disk, whatever an earlier disk-tier run dropped."""
    total, seconds, _ = _parallel_read(_chunks(paths), 8, 600, False)
    return {"bytes": total, "seconds": seconds, "gb_s": total / seconds / GB}
