"""Prefetch on the device (DeviceLRU.plan_prefetch, kernels/triton_rows.py, prefetcher.py) against the host form
that `moe-offload simulate --policy prefetch --prefetch-limit N` replays (policy/prefetch.py + SlotTable), and
inside the engine: the same decisions, every slot holding its expert's bytes, and ratio 100's tokens.
"""

import os
import random

import pytest
import torch

from moe_offload import LLMPipeline
from moe_offload.policy import LRUPolicy, SlotTable
from moe_offload.policy.device_lru import DeviceLRU
from moe_offload.policy.prefetch import prefetch_plan
from slot_checks import admit_on_the_device, misplaced

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
interpreted = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="Triton kernels on CPU tensors need Triton's interpreter")


def _host_prefetch(table: SlotTable, predicted: list[int], limit: int) -> list[int]:
    """simulate's prefetch before a decode step: the experts fetched."""
    return [e for e in prefetch_plan(predicted, table, limit) if table.admit(e, set(predicted), force=True) is not None]


def _host_step(table: SlotTable, needed: list[int]) -> None:
    hits = [e for e in sorted(needed) if table.lookup(e) is not None]
    misses = [e for e in sorted(needed) if table.lookup(e) is None]
    for expert in hits:
        table.hit(expert)
    for expert in misses:
        table.admit(expert, set(needed))


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=interpreted)])
@pytest.mark.parametrize("experts,capacity,top_k,limit", [(16, 4, 2, 1), (32, 8, 8, 2), (20, 16, 6, 4),
                                                          (8, 1, 2, 2), (24, 6, 5, 5)])
def test_same_decisions_as_the_host_prefetch(experts, capacity, top_k, limit, fused):
    """Predictions right about half the time, then the step: after each, the device's slot map is the host's."""
    rng = random.Random(experts * 1000 + capacity * 10 + limit)
    table = SlotTable(capacity, LRUPolicy())
    for expert in range(capacity):
        table.admit(expert, ())
    slot_map = torch.tensor([e if e < capacity else capacity + e for e in range(experts)] + [0], dtype=torch.int32,
                            device=DEVICE)  # host row = id
    from_host = (slot_map >= capacity).long()
    lru = DeviceLRU(slot_map, from_host, list(range(experts)), [(table.lookup(e), e) for e in table.policy.cached()],
                    fused=fused)
    assert (lru._kernels is not None) == fused
    hot = list(range(experts // 2))
    fetched_total = 0
    for _ in range(40 if fused else 150):  # the interpreter is slow
        needed = rng.sample(hot if rng.random() < 0.7 else range(experts), top_k)
        predicted = [e if rng.random() < 0.5 else rng.randrange(experts) for e in needed]
        predicted = list(dict.fromkeys(predicted))  # distinct, best first
        fetched = _host_prefetch(table, predicted, limit)
        admit = lru.plan_prefetch(torch.tensor(predicted, device=DEVICE), limit)
        assert sorted(e for e in range(experts) if int(admit[e]) >= 0) == sorted(fetched)
        lru.commit()
        fetched_total += len(fetched)
        _host_step(table, needed)
        lru.plan(torch.tensor(needed, device=DEVICE))
        lru.commit()
        expected = [table.lookup(e) if table.lookup(e) is not None else capacity + e for e in range(experts)]
        assert slot_map[:-1].tolist() == expected
        assert from_host[:-1].tolist() == [int(s >= capacity) for s in expected]
    assert fetched_total > 0


def test_plan_prefetch_rejects_a_zero_limit():
    lru = DeviceLRU(torch.tensor([0, 2, 0], dtype=torch.int32), torch.tensor([0, 1, 0]), [0, 1], [(0, 0)],
                    fused=False)
    with pytest.raises(ValueError, match="limit must be >= 1"):
        lru.plan_prefetch(torch.tensor([1]), 0)


@interpreted
@pytest.mark.parametrize("width", [64, 6, 40964])  # words; bytes not a multiple of 4; more than one program a row
def test_copy_admitted_moves_exactly_the_admitted_rows(width):
    from moe_offload.kernels.triton_rows import copy_admitted

    gen = torch.Generator().manual_seed(width)
    host_rows = torch.randint(0, 256, (5, width), dtype=torch.uint8, generator=gen)  # [N, B] (pinned on CUDA)
    slots = torch.randint(0, 256, (3, width), dtype=torch.uint8, generator=gen).to(DEVICE)  # [C, B]
    before = slots.clone()
    host_row = torch.tensor([4, 0, 3, 1, 2, 0], device=DEVICE)  # [E + 1] expert -> host row
    admit = torch.tensor([-1, 2, 0, -1, -1], dtype=torch.int32, device=DEVICE)  # experts 1 -> slot 2, 2 -> slot 0
    ids = torch.tensor([3, 1, 2], device=DEVICE)  # expert 3 predicted but not admitted
    if DEVICE.type == "cuda":
        host_rows = host_rows.pin_memory()
    copy_admitted(ids, admit, host_row, host_rows, slots)
    assert torch.equal(slots[2].cpu(), host_rows[0]) and torch.equal(slots[0].cpu(), host_rows[3])
    assert torch.equal(slots[1], before[1])


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="Triton kernels on CPU tensors need Triton's interpreter")
def test_engine_prefetches_and_keeps_the_tokens(checkpoint_factory):
    """MOE_PREFETCH's hooks in the engine (zero-copy with device LRU, Triton's interpreter on the CPU): decode steps
    take guessed experts in, every slot holds its expert's bytes, and the tokens are ratio 100's."""
    pytest.importorskip("triton")
    from tiny_models import VOCAB

    from moe_offload.kernels.triton_moe import fused_moe
    from moe_offload.prefetcher import Prefetcher

    path = checkpoint_factory("qwen3_moe")
    prompt = torch.randint(2, VOCAB, (1, 5), generator=torch.Generator().manual_seed(21))  # [1, T]
    want = LLMPipeline(path, "cpu", MOE_OFFLOAD_RATIO=100).generate_tokens(prompt, max_new_tokens=8,
                                                                           min_new_tokens=8, do_sample=False)
    pipe = LLMPipeline(path, "cpu", MOE_OFFLOAD_RATIO=25)
    admit_on_the_device(pipe, fused_moe)
    pipe.prefetcher = Prefetcher(pipe.model.model.layers, pipe.layers, 2, pipe.device)
    assert pipe.prefetcher.layers == [layer.layer for layer in pipe.layers]
    assert torch.equal(pipe.generate_tokens(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False), want)
    stats = pipe.get_offload_stats()
    assert stats["prefetch_layers"] == len(pipe.layers) and stats["experts_prefetched"] > 0
    assert stats["bytes_prefetched"] == stats["experts_prefetched"] * stats["expert_bytes"]
    assert all(misplaced(layer) == [] for layer in pipe.layers)


def test_prefetch_switch_is_validated(monkeypatch, checkpoint_factory):
    from moe_offload.errors import MoeOffloadError

    monkeypatch.setenv("MOE_PREFETCH", "two")
    with pytest.raises(MoeOffloadError, match="MOE_PREFETCH must be a whole number"):
        LLMPipeline(checkpoint_factory("qwen3_moe"), "cpu", MOE_OFFLOAD_RATIO=25)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prefetch_on_cuda(monkeypatch):
    """MOE_PREFETCH=2 on the GPU (the shipped model at ratio 25, decode steps replayed from CUDA graphs, the
    prefetch on its side stream): ratio 100's tokens, experts prefetched, every slot holding its expert's bytes."""
    prompt = torch.randint(2, 1000, (1, 16), generator=torch.Generator().manual_seed(5)).cuda()
    reference = LLMPipeline(None, "cuda", MOE_OFFLOAD_RATIO=100)
    want = reference.generate_tokens(prompt, max_new_tokens=48, min_new_tokens=48)
    reference.close()
    monkeypatch.setenv("MOE_PREFETCH", "2")
    pipe = LLMPipeline(None, "cuda", MOE_OFFLOAD_RATIO=25, MOE_CPU_EXPERTS="off")
    assert torch.equal(pipe.generate_tokens(prompt, max_new_tokens=48, min_new_tokens=48), want)
    stats = pipe.get_offload_stats()
    assert stats["prefetch_layers"] == len(pipe.layers) and stats["experts_prefetched"] > 0
    assert stats["cuda_graph_steps"] > 0 and stats["cuda_graph_failure"] is None
    assert all(misplaced(layer) == [] for layer in pipe.layers)
    pipe.close()
