"""Device-side LRU admission (policy/device_lru.py) against the host LRU it mirrors, and inside the engine.

The device version must make exactly the decisions SlotTable + LRUPolicy make for the same decode steps (hits in
ascending id first, then misses in ascending id, each taking the oldest slot the step does not need); inside
the engine, misses admitted while read in place (the kernels' read-through) must leave every slot holding its
expert's bytes and change no output bit.
"""

import os
import random

import pytest
import torch

from moe_offload import LLMPipeline
from moe_offload.policy.device_lru import DeviceLRU
from moe_offload.policy import LRUPolicy, SlotTable
from slot_checks import admit_on_the_device, misplaced, resident


def _host_step(table: SlotTable, needed: list[int], on_cpu: frozenset = frozenset()) -> tuple[int, int]:
    """What OffloadedExperts' general path does for one step: (hits, admitted). Misses in `on_cpu` are computed
    by the CPU (hybrid/): never admitted."""
    hits = [e for e in sorted(needed) if table.lookup(e) is not None]
    misses = [e for e in sorted(needed) if table.lookup(e) is None and e not in on_cpu]
    for expert in hits:
        table.hit(expert)
    admitted = sum(table.admit(expert, set(needed)) is not None for expert in misses)
    return len(hits), admitted


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The engine tests run the Triton kernels on CPU tensors: only in Triton's interpreter (conftest sets it without CUDA)
on_cpu_tensors = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                    reason="Triton kernels on CPU tensors need Triton's interpreter")


def _fused_available() -> bool:
    try:
        from moe_offload.kernels import triton_lru
    except ImportError:
        return False
    return triton_lru.runs_on(torch.empty(0, device=DEVICE))


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=pytest.mark.skipif(
    not _fused_available(), reason="Triton does not run on this device here (TRITON_INTERPRET unset)"))])
@pytest.mark.parametrize("cpu_share", [False, True])
@pytest.mark.parametrize("experts,capacity,top_k", [(16, 4, 2), (16, 3, 4), (32, 8, 8), (8, 1, 2), (8, 7, 4),
                                                    (20, 16, 6)])
def test_same_decisions_as_the_host_lru(experts, capacity, top_k, cpu_share, fused):
    """cpu_share: a random part of each step's misses is computed on the CPU and must not be admitted. fused: plan
    and commit as kernels/triton_lru.py's two Triton kernels (the interpreter without CUDA), else torch ops. On the
    GPU where there is one."""
    rng = random.Random(experts * 100 + capacity * 10 + top_k)
    table = SlotTable(capacity, LRUPolicy())
    for expert in range(capacity):
        table.admit(expert, ())
    slot_map = torch.tensor([table.lookup(e) if table.lookup(e) is not None else capacity + e
                             for e in range(experts)] + [0], dtype=torch.int32, device=DEVICE)  # host row = id
    from_host = (slot_map >= capacity).long()
    lru = DeviceLRU(slot_map, from_host, list(range(experts)),
                    [(table.lookup(e), e) for e in table.policy.cached()], fused=fused)
    assert (lru._kernels is not None) == fused
    hot = list(range(experts // 2))  # skewed routing, so that hits and evictions both happen
    for _ in range(200):
        needed = rng.sample(hot if rng.random() < 0.7 else range(experts), top_k)
        on_cpu = frozenset(e for e in needed if cpu_share and table.lookup(e) is None and rng.random() < 0.5)
        hits, admitted = _host_step(table, needed, on_cpu)
        ids = torch.tensor(needed, device=DEVICE)
        allowed = torch.tensor([e not in on_cpu for e in needed], device=DEVICE) if cpu_share else None
        admit = lru.plan(ids, admissible=allowed)
        assert all(int(admit[e]) < 0 for e in on_cpu)
        assert int((slot_map[ids] < capacity).sum()) == hits
        assert int((admit >= 0).sum()) == admitted
        lru.commit()
        expected = [table.lookup(e) if table.lookup(e) is not None else capacity + e for e in range(experts)]
        assert slot_map[:-1].tolist() == expected
        assert from_host[:-1].tolist() == [int(s >= capacity) for s in expected]


@on_cpu_tensors
def test_engine_admits_misses_as_it_reads_them(checkpoint_factory):
    """In the engine (zero-copy, Triton's interpreter on the CPU): the tokens of ratio 100, every slot holding its
    expert's bytes, and the hits of the host LRU replayed over the same routing (decode steps admit; a prefill
    neither admits nor touches recency)."""
    pytest.importorskip("triton")
    from tiny_models import VOCAB

    from moe_offload.kernels.triton_moe import fused_moe

    path = checkpoint_factory("qwen3_moe")
    ids = torch.randint(2, VOCAB, (1, 6), generator=torch.Generator().manual_seed(3))  # [1, T]

    def run(ratio: int, lru: bool):
        pipe = LLMPipeline(path, "cpu", MOE_OFFLOAD_RATIO=ratio)
        routes = {layer.layer: [] for layer in pipe.layers}
        for layer in pipe.layers:
            layer.fused_moe = fused_moe
            assert layer.enable_direct(pipe.device, lru=lru) and (layer._device_policy is not None) == lru
            layer.route_observer = lambda index, top_k: routes[index].append(top_k.reshape(-1).tolist())
        tokens = pipe.generate_tokens(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False)
        return pipe, tokens, routes

    _, reference, _ = run(100, False)
    pipe, tokens, routes = run(25, True)
    assert torch.equal(tokens, reference)
    replayed_hits = 0
    for layer in pipe.layers:
        table = SlotTable(layer.table.capacity, LRUPolicy())
        for expert in range(layer.table.capacity):  # as loaded: experts 0..C-1
            table.admit(expert, ())
        for step, needed in enumerate(routes[layer.layer]):
            if step == 0:  # the prefill
                replayed_hits += sum(table.lookup(e) is not None for e in set(needed))
            else:
                replayed_hits += _host_step(table, needed)[0]
        assert misplaced(layer) == []
    stats = pipe.get_offload_stats()
    assert stats["hits"] == replayed_hits and stats["experts_read_in_place"] == stats["misses"] > 0


@on_cpu_tensors
def test_long_forwards_copy_from_the_slots_the_device_chose(checkpoint_factory):
    """With device LRU, a forward of more pairs than zero_copy_max_pairs (a long prefill) takes the copy path:
    the host table is first brought in line with the device's slots (after decode steps moved them), and the
    tokens stay ratio 100's."""
    pytest.importorskip("triton")
    from tiny_models import VOCAB

    from moe_offload.kernels.triton_moe import fused_moe

    path = checkpoint_factory("qwen3_moe")
    prompts = [torch.randint(2, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))
               for length, seed in ((5, 8), (9, 9))]  # [1, T] each
    reference = LLMPipeline(path, "cpu", MOE_OFFLOAD_RATIO=100)
    want = [reference.generate_tokens(p, max_new_tokens=6, min_new_tokens=6, do_sample=False) for p in prompts]
    pipe = LLMPipeline(path, "cpu", MOE_OFFLOAD_RATIO=25)
    copied = []
    admit_on_the_device(pipe, fused_moe)
    for layer in pipe.layers:
        layer.zero_copy_max_pairs = layer.top_k  # decode steps direct, any prompt of 2+ tokens copied

        def checked(*args, layer=layer, forward_routed=layer.forward_routed):
            copied.append(layer.table.slot_of == resident(layer))
            return forward_routed(*args)

        layer.forward_routed = checked
    for prompt, tokens in zip(prompts, want):
        assert torch.equal(pipe.generate_tokens(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False), tokens)
    assert len(copied) == 2 * len(pipe.layers) and all(copied)
    moved = [layer for layer in pipe.layers if sorted(layer.table.slot_of) != list(range(layer.table.capacity))]
    assert moved  # the decode steps between the two prompts did admit


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_lru_on_cuda(monkeypatch):
    """MOE_ZERO_COPY=auto (LRU admission) on the GPU (the shipped model at ratio 25, decode steps replayed from
    whole-step graphs): ratio 100's tokens, misses admitted (more hits than MOE_ZERO_COPY=static gets on the same
    routing), every slot holding its expert's bytes afterwards; then a longer prompt through the copy path."""
    prompt, longer = (torch.randint(2, 1000, (1, length), generator=torch.Generator().manual_seed(4)).cuda()
                      for length in (16, 40))
    reference = LLMPipeline(None, "cuda", MOE_OFFLOAD_RATIO=100)
    want = reference.generate_tokens(prompt, max_new_tokens=48, min_new_tokens=48)
    want_longer = reference.generate_tokens(longer, max_new_tokens=8, min_new_tokens=8)
    reference.close()
    runs = {}
    for mode in ("static", "auto"):
        monkeypatch.setenv("MOE_ZERO_COPY", mode)
        pipe = LLMPipeline(None, "cuda", MOE_OFFLOAD_RATIO=25, MOE_CPU_EXPERTS="off")  # the GPU admits every miss
        assert torch.equal(pipe.generate_tokens(prompt, max_new_tokens=48, min_new_tokens=48), want)
        runs[mode] = pipe.get_offload_stats()
        assert runs[mode]["cuda_graph_steps"] > 0 and runs[mode]["cuda_graph_failure"] is None
        if mode == "auto":
            for layer in pipe.layers:
                assert misplaced(layer) == []
                layer.zero_copy_max_pairs = layer.top_k  # any prompt of 2+ tokens copies its misses
            assert torch.equal(pipe.generate_tokens(longer, max_new_tokens=8, min_new_tokens=8), want_longer)
        pipe.close()
    assert runs["auto"]["hits"] > runs["static"]["hits"]
    assert runs["auto"]["hits"] + runs["auto"]["misses"] == runs["static"]["hits"] + runs["static"]["misses"]
