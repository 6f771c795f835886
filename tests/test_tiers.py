"""DiskTier: an expert's bytes read whole or in chunks side by side, with every read strategy, are the file's."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from moe_offload.checkpoint import ByteRange, ExpertLocation
from moe_offload.tiers import DiskTier


@pytest.fixture
def expert_file(tmp_path):
    """A file of 3 pieces at unaligned offsets (gate, up, down, as per-expert checkpoints lay them out)."""
    data = torch.randint(0, 256, (40_000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "experts.bin"
    path.write_bytes(data.numpy().tobytes())
    pieces = [(1_001, 9_000), (12_345, 9_000), (25_000, 14_997)]  # (start, nbytes); the last ends at EOF - 3
    location = ExpertLocation(torch.uint8, tuple(ByteRange(str(path), s, n) for s, n in pieces[:2]),
                              (ByteRange(str(path), *pieces[2]),))
    want = torch.cat([data[s:s + n] for s, n in pieces])
    return location, want


@pytest.mark.parametrize("strategy", ["odirect", "pread", "mmap"])
@pytest.mark.parametrize("chunk", [1_000, 4_096, 1 << 20])
def test_chunked_reads_give_the_expert_bytes(expert_file, strategy, chunk):
    location, want = expert_file
    disk = DiskTier(strategy)
    whole = torch.zeros(location.nbytes, dtype=torch.uint8)
    assert disk.read_expert(location, whole) == location.nbytes
    assert torch.equal(whole, want)
    chunked = torch.zeros(location.nbytes, dtype=torch.uint8)
    reads = disk.chunk_reads(location, chunked, chunk=chunk)
    assert all(src.nbytes <= chunk for src, _ in reads)
    assert sum(src.nbytes for src, _ in reads) == location.nbytes
    with ThreadPoolExecutor(4) as pool:  # side by side, as ExpertFetcher runs them
        list(pool.map(lambda job: disk.read_range(*job), reads))
    assert torch.equal(chunked, want)
    disk.close()
