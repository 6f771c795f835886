"""DiskTier: an expert's bytes read whole or in chunks side by side, with every read strategy, are the file's."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from moe_offload.checkpoint import ByteRange, ExpertLocation
from moe_offload.errors import MoeOffloadError
from moe_offload.expert_format import ExpertFormat
from moe_offload.quant.format import QuantSpec
from moe_offload.tiers import HUGE_PAGE, DiskTier, HostTier


@pytest.fixture
def expert_file(tmp_path):
    """A file of 3 pieces at unaligned offsets (gate, up, down, as per-expert checkpoints lay them out) of a
    [2I, H] / [H, I] uint8 expert, I = 90, H = 100."""
    data = torch.randint(0, 256, (40_000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "experts.bin"
    path.write_bytes(data.numpy().tobytes())
    pieces = [(1_001, 9_000), (12_345, 9_000), (30_997, 9_000)]  # (start, nbytes); the last ends at EOF - 3
    location = ExpertLocation(ExpertFormat(90, 100, torch.uint8),
                              (tuple(ByteRange(str(path), s, n) for s, n in pieces[:2]),
                               (ByteRange(str(path), *pieces[2]),)))
    want = torch.cat([data[s:s + n] for s, n in pieces])  # the planes lie back to back: 18,000 is aligned
    return location, want


@pytest.mark.parametrize("strategy", ["odirect", "pread"])
@pytest.mark.parametrize("chunk", [1_000, 4_096, 1 << 20])
def test_chunked_reads_give_the_expert_bytes(expert_file, strategy, chunk):
    location, want = expert_file
    disk = DiskTier(strategy)
    whole = torch.zeros(location.format.row_bytes, dtype=torch.uint8)
    assert disk.read_expert(location, whole) == location.nbytes == want.numel()
    assert torch.equal(whole[:want.numel()], want)
    chunked = torch.zeros(location.format.row_bytes, dtype=torch.uint8)
    reads = disk.chunk_reads(location, chunked, chunk=chunk)
    assert all(src.nbytes <= chunk for src, _ in reads)
    assert sum(src.nbytes for src, _ in reads) == location.nbytes
    with ThreadPoolExecutor(4) as pool:  # side by side, as ExpertFetcher runs them
        list(pool.map(lambda job: disk.read_range(*job), reads))
    assert torch.equal(chunked, whole)
    disk.close()


def test_each_plane_is_read_to_its_offset(tmp_path):
    """A quantized expert's planes (sizes that are not multiples of 16: padding between them) land at their
    aligned offsets in the row, each filled from its ranges back to back (gate's, then up's)."""
    fmt = ExpertFormat(10, 40, torch.bfloat16, QuantSpec(4, 16, symmetric=False))
    assert any(p.offset != q.offset + q.nbytes for q, p in zip(fmt.planes, fmt.planes[1:]))  # padding somewhere
    data = torch.randint(0, 256, (8_000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "experts.bin"
    path.write_bytes(data.numpy().tobytes())
    planes, start = [], 3
    for plane in fmt.planes:
        halves = (plane.nbytes // 2, plane.nbytes - plane.nbytes // 2) if plane.name.startswith("gate_up") else \
            (plane.nbytes,)
        ranges = []
        for size in halves:
            ranges.append(ByteRange(str(path), start, size))
            start += size + 5  # a gap between tensors in the file
        planes.append(tuple(ranges))
    location = ExpertLocation(fmt, tuple(planes))
    row = torch.full((fmt.row_bytes,), 0xAB, dtype=torch.uint8)
    DiskTier("pread").read_expert(location, row)
    for plane, ranges in zip(fmt.planes, planes):
        want = torch.cat([data[r.start:r.start + r.nbytes] for r in ranges])
        assert torch.equal(row[plane.offset:plane.offset + plane.nbytes], want), plane.name


def _thp_mode() -> str:
    """The bracketed word of /sys/kernel/mm/transparent_hugepage/enabled ("" where there is none)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return ""


def _huge_bytes_at(address: int) -> int:
    """AnonHugePages of the mapping of this process that holds `address`, from /proc/self/smaps."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= address < end
            elif inside and head == "AnonHugePages:":
                return int(line.split()[1]) * 1024
    return 0


def test_host_tier_holds_each_expert_apart_on_either_page_size():
    for huge in (True, False):
        tier = HostTier([5, 2, 9], ExpertFormat(48, 64, torch.bfloat16), pin=False, huge_pages=huge)
        for row, expert in enumerate((5, 2, 9)):
            gate_up, down = tier.get(expert)
            gate_up.fill_(row + 1)
            down.fill_(-(row + 1))
        for row, expert in enumerate((5, 2, 9)):
            gate_up, down = tier.get(expert)
            assert gate_up.shape == (96, 64) and down.shape == (64, 48)
            assert bool((gate_up == row + 1).all()) and bool((down == -(row + 1)).all())
        assert tier.nbytes == 3 * 3 * 48 * 64 * 2


@pytest.mark.skipif(_thp_mode() not in ("always", "madvise"), reason="transparent huge pages are off here")
def test_host_tier_lies_on_huge_pages_where_the_kernel_gives_them():
    # 4 experts of 2 x 2048 x 768 bf16 (9.4 MB each), as Qwen3-30B-A3B's: 37.7 MB, many whole 2 MiB pages
    tier = HostTier(list(range(4)), ExpertFormat(768, 2048, torch.bfloat16), pin=False)
    assert tier.huge_pages and tier.gate_up.data_ptr() % HUGE_PAGE == 0
    tier.gate_up.fill_(1)  # first touch maps the pages
    tier.down.fill_(1)
    huge = _huge_bytes_at(tier.gate_up.data_ptr())
    # the kernel may fall back to small pages where it finds no free 2 MiB block: most of it, not all
    assert huge >= tier.nbytes // 2, f"{huge} of {tier.nbytes} bytes on huge pages"
    small = HostTier(list(range(4)), ExpertFormat(768, 2048, torch.bfloat16), pin=False, huge_pages=False)
    small.gate_up.fill_(1)
    assert not small.huge_pages
    if _thp_mode() == "madvise":  # small pages unless advised
        assert _huge_bytes_at(small.gate_up.data_ptr()) == 0


def test_mmap_is_not_a_disk_read_strategy():
    """Reading through a mapping was slowest everywhere, and a checkpoint that shrinks under it is a SIGBUS."""
    with pytest.raises(MoeOffloadError, match="unknown disk read strategy 'mmap'"):
        DiskTier("mmap")
