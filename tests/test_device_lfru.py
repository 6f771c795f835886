"""policy/device_lfru.py's DeviceLFRU against the host policy it is the tensor form of (SlotTable + LFRUPolicy, as
cache.py and simulate.py step them): the same slot map, the same keys (bit for bit) and the same uses after every
step of a random routing, with the keys rebased many times (REBASE made small), and the state handed back to
the host (SlotTable.mirror) equal to the host's own."""

import os
import random

import pytest
import torch

from moe_offload.policy import LFRUPolicy, SlotTable, lfru, device_lfru
from moe_offload.policy.device_lfru import DeviceLFRU, power_of_two
from slot_checks import admit_on_the_device, misplaced, resident

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the GPU where there is one


def host_step(table, needed):
    """cache.py's order: begin_step, hits in ascending id, then misses in ascending id (protected: the step)."""
    needed = sorted(needed)
    table.begin_step()
    misses = [e for e in needed if table.lookup(e) is None]
    for e in needed:
        if table.lookup(e) is not None:
            table.hit(e)
    for e in misses:
        table.admit(e, set(needed))


def make_pair(num_experts, capacity, half_life, warm_steps, rng, fused=False):
    """A host table preloaded like OffloadedExperts.preload and warmed on a few steps, and its device twin."""
    table = SlotTable(capacity, LFRUPolicy(half_life))
    for e in range(capacity):
        table.admit(e, ())
    for needed in warm_steps:
        host_step(table, needed)
    slot_of = torch.zeros(num_experts + 1, dtype=torch.int32, device=DEVICE)
    host_row = list(range(num_experts))
    for e in range(num_experts):
        slot = table.lookup(e)
        slot_of[e] = slot if slot is not None else capacity + host_row[e]
    from_host = (slot_of >= capacity).long()
    pairs = [(table.lookup(e), e) for e in table.policy.cached()]
    device = DeviceLFRU(slot_of, from_host, host_row, pairs, table.policy.state(), half_life, fused=fused)
    return table, device


def assert_same(table, device, num_experts, capacity):
    for e in range(num_experts):
        slot = table.lookup(e)
        want = slot if slot is not None else capacity + e
        assert int(device.slot_of[e]) == want, e
        assert int(device.from_host[e]) == int(slot is None)
    state = table.policy.state()
    assert device.state() == state  # keys bit for bit (float equality), last uses, clock, base


def _fused_available() -> bool:
    try:
        from moe_offload.kernels import triton_lfru
    except ImportError:
        return False
    return triton_lfru.runs_on(torch.empty(0, device=DEVICE))


FUSED = pytest.mark.skipif(not _fused_available(), reason="Triton does not run on this device here (TRITON_INTERPRET "
                                                           "unset)")


@pytest.mark.parametrize("seed,rebase,fused", [(seed, rebase, False) for seed in range(3) for rebase in (2, 256)] + [
    pytest.param(seed, 2, True, marks=FUSED) for seed in range(2)])
def test_device_lfru_makes_the_host_policys_decisions(seed, rebase, fused, monkeypatch):
    """rebase 2: every 32 or 64 uses, a rebase every few steps. fused: the plan as kernels/triton_lfru.py's Triton
    kernel (the interpreter without CUDA, where fewer steps take as long), else torch ops."""
    monkeypatch.setattr(lfru, "REBASE", rebase)
    monkeypatch.setattr(device_lfru, "REBASE", rebase)
    rng = random.Random(seed)
    num_experts, top_k, half_life = (16, 4, 16) if seed % 2 else (32, 8, 32)
    hot = rng.sample(range(num_experts), top_k)  # skewed, as learned routing is

    def routing():
        return sorted(set(rng.sample(hot, top_k // 2) + rng.sample(range(num_experts), top_k)))[:top_k]

    streamed = admitted_total = 0
    for capacity in (top_k, num_experts // 2, num_experts - 1):
        table, device = make_pair(num_experts, capacity, half_life, [routing() for _ in range(5)], rng, fused)
        assert (device._kernels is not None) == fused
        for step in range(24 if fused else 60):  # the interpreter is slow
            needed = routing()
            misses = [e for e in needed if table.lookup(e) is None]
            ids = torch.tensor(rng.sample(needed, len(needed)), device=DEVICE)  # the router's order, not sorted
            admit = device.plan(ids)
            host_step(table, needed)
            device.commit()
            admitted = {e: int(admit[e]) for e in range(num_experts) if admit[e] >= 0}
            assert all(table.lookup(e) == slot for e, slot in admitted.items()), step
            assert_same(table, device, num_experts, capacity)
            admitted_total += len(admitted)
            streamed += len(misses) - len(admitted)
        assert device.state()["base"] > 0 or rebase == 256  # the rebase path ran
    assert admitted_total > 0 and streamed > 0  # both sides of the admission test


def test_mirror_hands_the_device_state_to_the_host():
    rng = random.Random(7)
    table, device = make_pair(12, 4, 3, [[0, 5], [5, 6]], rng)
    twin, _ = make_pair(12, 4, 3, [[0, 5], [5, 6]], random.Random(7))
    for needed in ([1, 7], [7, 8], [1, 2], [7, 9]):
        device.plan(torch.tensor(needed, device=DEVICE))
        device.commit()
        host_step(twin, needed)
    table.mirror(device.occupants(), device.state())
    assert table.slot_of == twin.slot_of and table.policy.state() == twin.policy.state()
    assert list(table.policy.cached()) == list(twin.policy.cached())


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=FUSED)])
def test_admissible_misses_only(fused):
    # E = 6, C = 2, slots hold 0, 1. A step needing 2 and 3 where only 3 may be cached: 2 is no use of the cache.
    table, device = make_pair(6, 2, 8, [], random.Random(0), fused)
    clock = device.state()["clock"]
    admit = device.plan(torch.tensor([2, 3], device=DEVICE), torch.tensor([False, True], device=DEVICE))
    device.commit()
    assert int(admit[2]) == -1 and int(admit[3]) in (0, 1)
    assert device.state()["clock"] == clock + 1 and 2 not in device.state()["last"]


def test_power_of_two_is_exact():
    q = torch.arange(-1022, 1024)
    assert torch.equal(power_of_two(q), torch.tensor([2.0 ** int(v) for v in q], dtype=torch.float64))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="Triton kernels on CPU tensors need Triton's interpreter")
def test_engine_runs_lfru_on_the_device(checkpoint_factory, monkeypatch):
    """MOE_CACHE_POLICY=lfru in the engine (zero-copy, Triton's interpreter on the CPU): decode steps admit with
    DeviceLFRU and keep ratio 100's tokens and every slot's bytes; a longer prompt then takes the copy path, where
    the host policy takes over the device's state exactly (SlotTable.mirror), and the tokens stay ratio 100's."""
    pytest.importorskip("triton")
    from tiny_models import VOCAB

    from moe_offload import LLMPipeline
    from moe_offload.kernels.triton_moe import fused_moe

    path = checkpoint_factory("qwen3_moe")
    prompts = [torch.randint(2, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))
               for length, seed in ((3, 11), (9, 12))]  # [1, T] each
    reference = LLMPipeline(path, "cpu", MOE_OFFLOAD_RATIO=100)
    want = [reference.generate_tokens(p, max_new_tokens=6, min_new_tokens=6, do_sample=False) for p in prompts]
    monkeypatch.setenv("MOE_CACHE_POLICY", "lfru")
    pipe = LLMPipeline(path, "cpu", MOE_OFFLOAD_RATIO=25)
    mirrored = []
    admit_on_the_device(pipe, fused_moe)
    for layer in pipe.layers:
        assert isinstance(layer.table.policy, LFRUPolicy) and isinstance(layer._device_policy, DeviceLFRU)
        layer.zero_copy_max_pairs = layer.top_k  # decode steps direct, any prompt of 2+ tokens copied

        def checked(pairs, state, layer=layer, mirror=layer.table.mirror):
            mirror(pairs, state)
            mirrored.append(layer.table.policy.state() == layer._device_policy.state()
                            and layer.table.slot_of == resident(layer))

        layer.table.mirror = checked
    for prompt, tokens in zip(prompts, want):
        assert torch.equal(pipe.generate_tokens(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False), tokens)
    assert len(mirrored) == 2 * len(pipe.layers) and all(mirrored)
    stats = pipe.get_offload_stats()
    assert stats["cache_policy"] == "lfru" and stats["device_admission_layers"] == len(pipe.layers)
    assert all(misplaced(layer) == [] for layer in pipe.layers)
    moved = sum(expert >= layer.table.capacity for layer in pipe.layers for expert in resident(layer))
    assert moved  # the decode steps did admit (loaded with experts 0..C-1)
