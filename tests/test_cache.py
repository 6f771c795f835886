"""The expert cache: LRU policy and slot table in isolation, then exact counters of the real engine.

The engine's counters are pinned two ways: per forward call, hits + misses is the number of distinct experts the
router picked in each layer (one load per expert per call, never one per token), and the hit count equals an
independent LRU simulation over the recorded routing.
"""

from __future__ import annotations

import inspect
import math
from collections import OrderedDict

import pytest
import torch
from tiny_models import TIERS, VOCAB

from moe_offload import LLMPipeline
from moe_offload.checkpoint import Checkpoint
from moe_offload import policy as policy_module
from moe_offload.policy import LRUPolicy, SlotTable, make_policy
from moe_offload.tools.info import describe

ARCH = "qwen3_moe"  # 2 MoE layers, 8 routed experts each, top-2, I=16, H=32, float32
PREFILL = 16
DECODE_STEPS = 10
RATIOS = [0, 25, 50, 100]


# -- LRUPolicy ---------------------------------------------------------------------------------------------------

def _lru(*inserted: int) -> LRUPolicy:
    policy = LRUPolicy()
    for expert in inserted:
        policy.on_insert(expert)
    return policy


def test_lru_victim_is_least_recently_used():
    policy = _lru(5, 3, 9)
    assert list(policy.cached()) == [5, 3, 9]
    assert policy.victim(()) == 5
    policy.on_hit(5)
    assert list(policy.cached()) == [3, 9, 5]
    assert policy.victim(()) == 3
    policy.on_evict(3)
    assert policy.victim(()) == 9
    policy.on_insert(1)
    policy.on_hit(9)
    assert list(policy.cached()) == [5, 1, 9]
    assert policy.victim(set()) == 5


def test_lru_reinsert_moves_to_most_recent():
    policy = _lru(1, 2, 3)
    policy.on_insert(1)
    assert list(policy.cached()) == [2, 3, 1]


def test_lru_never_evicts_protected():
    policy = _lru(0, 1, 2, 3)
    assert policy.victim({0}) == 1
    assert policy.victim({0, 1, 2}) == 3
    assert policy.victim([1, 0]) == 2
    assert list(policy.cached()) == [0, 1, 2, 3]  # asking for a victim changes nothing


def test_lru_none_when_everything_protected_or_empty():
    assert _lru(0, 1).victim({0, 1}) is None
    assert _lru(0, 1).victim({0, 1, 7}) is None
    assert LRUPolicy().victim(()) is None


def test_make_policy():
    assert isinstance(make_policy("lru"), LRUPolicy)


# -- SlotTable ---------------------------------------------------------------------------------------------------

def test_slot_table_uses_free_slots_first():
    table = SlotTable(3, LRUPolicy())
    assert [table.admit(e, ()) for e in (10, 11, 12)] == [0, 1, 2]
    assert table.slot_of == {10: 0, 11: 1, 12: 2}
    assert all(table.lookup(e) == s for e, s in table.slot_of.items())
    assert table.lookup(13) is None


def test_slot_table_eviction_reuses_victims_slot():
    table = SlotTable(3, LRUPolicy())
    for expert in (10, 11, 12):
        table.admit(expert, ())
    table.hit(10)  # LRU order now 11, 12, 10
    assert table.admit(13, ()) == 1  # evicts 11, takes its slot
    assert table.lookup(11) is None and table.lookup(13) == 1
    assert table.admit(14, {12}) == 0  # 12 protected: evicts 10 (slot 0)
    assert table.slot_of == {12: 2, 13: 1, 14: 0}
    assert list(table.policy.cached()) == [12, 13, 14]
    assert sorted(table.slot_of.values()) == [0, 1, 2]  # no slot lost or shared


def test_slot_table_full_and_all_protected_returns_none():
    table = SlotTable(2, LRUPolicy())
    table.admit(1, ())
    table.admit(2, ())
    assert table.admit(3, {1, 2, 3}) is None
    assert table.slot_of == {1: 0, 2: 1}
    assert list(table.policy.cached()) == [1, 2]


def test_slot_table_capacity_zero():
    table = SlotTable(0, LRUPolicy())
    assert table.admit(4, ()) is None
    assert table.admit(4, {4}) is None
    assert table.slot_of == {} and list(table.policy.cached()) == []


# -- the engine's exact counters -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint_path(checkpoint_factory):
    return checkpoint_factory(ARCH)


@pytest.fixture(scope="module")
def layout(checkpoint_path):
    """Facts from the checkpoint headers alone (moe_offload.tools.info), cross-checked with config.json."""
    info = describe(Checkpoint(checkpoint_path))
    sizes = {layer["expert_bytes"] for layer in info["layers"]}
    assert len(sizes) == 1
    expert_bytes = sizes.pop()
    assert expert_bytes == 3 * 16 * 32 * 4  # gate + up [I, H] and down [H, I], float32
    return {"info": info, "expert_bytes": expert_bytes, "experts": [l["experts"] for l in info["layers"]]}


def _run_recording(pipe: LLMPipeline) -> list[dict]:
    """A prefill of PREFILL tokens then DECODE_STEPS single-token steps through the KV cache.

    For each model call: the routing of every MoE layer, and the change of the offload counters.
    """
    from transformers import DynamicCache

    routes: dict[int, torch.Tensor] = {}

    def observe(layer: int, top_k_index: torch.Tensor) -> None:
        assert layer not in routes, "a layer was called twice in one forward"
        routes[layer] = top_k_index.detach().clone()

    for layer in pipe.layers:
        layer.route_observer = observe
    ids = torch.randint(2, VOCAB, (1, PREFILL), generator=torch.Generator().manual_seed(1))  # [1, T]
    cache = DynamicCache(config=pipe.model.config)  # updated in place by each call
    # transformers renamed the forward's `past_key_values` to `cache` (the old name warns from 5.2x on)
    cache_arg = "cache" if "cache" in inspect.signature(pipe.model.forward).parameters else "past_key_values"
    calls = []
    with torch.no_grad():
        for step in range(1 + DECODE_STEPS):
            before = pipe.get_offload_stats()
            routes.clear()
            out = pipe.model(ids, use_cache=True, **{cache_arg: cache})
            after = pipe.get_offload_stats()
            calls.append({
                "tokens": ids.shape[1],
                "routes": dict(routes),
                "logits": out.logits[:, -1].clone(),
                "hits": after["hits"] - before["hits"],
                "misses": after["misses"] - before["misses"],
                "experts_streamed": {k: after["experts_streamed"][k] - before["experts_streamed"][k]
                                     for k in ("host", "disk")},
                "bytes_streamed": {k: after["bytes_streamed"][k] - before["bytes_streamed"][k]
                                   for k in ("host", "disk")},
            })
            ids = out.logits[:, -1:].argmax(-1)  # [1, 1] greedy next token
    for layer in pipe.layers:
        layer.route_observer = None
    return calls


def _simulate_lru_hits(calls: list[dict], capacity: int, num_experts: int, fifo: bool = False) -> list[int]:
    """Hits per call of a per-layer LRU cache, written from the policy's definition, not from cache.py.

    Start: experts 0..C-1 cached, inserted in that order. Each call, per layer: needed = distinct routed ids
    (ascending); cached ones are hits and become most recent; each other one is a miss that evicts the least
    recently used expert this call does not need, or, when there is none (or C = 0), streams without caching.
    """
    lru: dict[int, OrderedDict] = {}
    hits_per_call = []
    for call in calls:
        hits = 0
        for layer, top_k_index in sorted(call["routes"].items()):
            cached = lru.setdefault(layer, OrderedDict((e, None) for e in range(capacity)))
            needed = sorted(set(top_k_index.reshape(-1).tolist()))
            assert all(0 <= e < num_experts for e in needed)
            for expert in needed:
                if expert in cached:
                    hits += 1
                    if not fifo:  # fifo: the control that shows the routing can tell the policies apart
                        cached.move_to_end(expert)
            for expert in needed:
                if expert in cached:
                    continue
                if len(cached) < capacity:
                    cached[expert] = None
                    continue
                victim = next((e for e in cached if e not in needed), None)
                if victim is not None:
                    del cached[victim]
                    cached[expert] = None
        hits_per_call.append(hits)
    return hits_per_call


@pytest.fixture(scope="module")
def runs(checkpoint_path):
    """(ratio, tier) -> (pipe, recorded calls); one load and one recording each. The engine runs LRU here (the
    mechanism against a policy written out by hand); its default policy is checked against the replay in
    test_trace_simulate.py."""
    made = {}

    def get(ratio: int, tier: str):
        if (ratio, tier) not in made:
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(policy_module, "DEFAULT_POLICY", "lru")
                pipe = LLMPipeline(checkpoint_path, "cpu", MOE_OFFLOAD_RATIO=ratio, MOE_HOST_CACHE=TIERS[tier])
            made[(ratio, tier)] = (pipe, _run_recording(pipe))
        return made[(ratio, tier)]

    yield get
    for pipe, _ in made.values():
        pipe.close()


@pytest.mark.parametrize("tier", list(TIERS))
@pytest.mark.parametrize("ratio", RATIOS)
def test_counters_are_exact_per_call(runs, layout, ratio, tier):
    pipe, calls = runs(ratio, tier)
    expert_bytes = layout["expert_bytes"]
    assert [c["tokens"] for c in calls] == [PREFILL] + [1] * DECODE_STEPS
    for index, call in enumerate(calls):
        assert sorted(call["routes"]) == sorted(layer.layer for layer in pipe.layers)
        for top_k_index in call["routes"].values():
            assert tuple(top_k_index.shape) == (call["tokens"], 2)
        distinct = sum(len(set(t.reshape(-1).tolist())) for t in call["routes"].values())
        where = f"call {index} ({call['tokens']} tokens): {call}"
        # Each needed expert is counted (and loaded) once per call, not once per token that uses it.
        assert call["hits"] + call["misses"] == distinct, where
        streamed = call["experts_streamed"]
        assert streamed["host"] + streamed["disk"] == call["misses"], where
        other = "disk" if tier == "host" else "host"
        assert streamed[other] == 0 and call["bytes_streamed"][other] == 0, where
        assert call["bytes_streamed"][tier] == call["misses"] * expert_bytes, where
        if ratio == 100:
            assert call["misses"] == 0, where
        if ratio == 0:
            assert call["hits"] == 0, where
    prefill = calls[0]
    assert prefill["hits"] + prefill["misses"] < PREFILL * 2 * len(pipe.layers)  # not per token: 64 pairs
    if ratio not in (0, 100):
        assert sum(c["hits"] for c in calls) > 0 and sum(c["misses"] for c in calls) > 0


@pytest.mark.parametrize("tier", list(TIERS))
@pytest.mark.parametrize("ratio", RATIOS + [75])
def test_hits_match_lru_simulation(runs, layout, ratio, tier):
    pipe, calls = runs(ratio, tier)
    capacities = {layer.table.capacity for layer in pipe.layers}
    assert len(capacities) == 1
    expected = _simulate_lru_hits(calls, capacities.pop(), layout["experts"][0])
    assert [c["hits"] for c in calls] == expected


def test_routing_tells_lru_from_fifo(runs, layout):
    """The simulation test has teeth: on this routing, LRU and FIFO eviction give different hit counts."""
    _, calls = runs(50, "disk")
    lru = _simulate_lru_hits(calls, 4, layout["experts"][0])
    fifo = _simulate_lru_hits(calls, 4, layout["experts"][0], fifo=True)
    assert lru != fifo


@pytest.mark.parametrize("ratio", RATIOS)
def test_routing_and_logits_do_not_depend_on_ratio(runs, ratio):
    """Guard for the counter tests: every ratio computes the same thing, so its routing is comparable."""
    _, calls = runs(ratio, "disk")
    _, reference = runs(100, "host")
    for call, ref in zip(calls, reference):
        assert all(torch.equal(call["routes"][l], ref["routes"][l]) for l in ref["routes"])
        torch.testing.assert_close(call["logits"], ref["logits"], atol=1e-5, rtol=1e-5)


STATS_KEYS = {"total_experts", "resident_experts", "device_expert_bytes", "hits", "misses", "bytes_streamed",
              "experts_streamed"}


@pytest.mark.parametrize("ratio", RATIOS + [37])
def test_stats_and_device_footprint(checkpoint_path, layout, ratio):
    pipe = LLMPipeline(checkpoint_path, "cpu", MOE_OFFLOAD_RATIO=ratio, MOE_HOST_CACHE=0)
    try:
        stats = pipe.get_offload_stats()
        assert STATS_KEYS <= set(stats)
        assert set(stats["bytes_streamed"]) == {"host", "disk"} == set(stats["experts_streamed"])
        experts = layout["experts"]
        assert stats["total_experts"] == sum(experts) == 16
        resident = sum(math.floor(e * ratio / 100 + 0.5) for e in experts)
        assert stats["resident_experts"] == resident
        assert [layer.table.capacity for layer in pipe.layers] == [math.floor(e * ratio / 100 + 0.5) for e in experts]
        assert stats["device_expert_bytes"] == resident * layout["expert_bytes"]
        assert stats["device_expert_bytes"] == layout["info"]["device_bytes_by_ratio"].get(
            ratio, {"expert_bytes": stats["device_expert_bytes"]})["expert_bytes"]
        # Freshly loaded: preloading the resident experts is not counted.
        assert (stats["hits"], stats["misses"]) == (0, 0)
        assert stats["bytes_streamed"] == {"host": 0, "disk": 0} == stats["experts_streamed"]
        # No routed expert weights live in the model: they are in the cache slots and tiers only.
        assert [name for name, _ in pipe.model.named_parameters() if ".experts." in name] == []
        assert [name for name, _ in pipe.model.named_buffers() if ".experts." in name] == []
        # Resident experts are exactly the first C of each layer, as the LRU simulation assumes.
        for layer in pipe.layers:
            assert list(layer.table.policy.cached()) == list(range(layer.table.capacity))
    finally:
        pipe.close()


def test_reset_offload_stats(runs):
    pipe, _ = runs(25, "disk")
    assert pipe.get_offload_stats()["misses"] > 0
    pipe.reset_offload_stats()
    stats = pipe.get_offload_stats()
    assert (stats["hits"], stats["misses"]) == (0, 0)
    assert stats["bytes_streamed"] == {"host": 0, "disk": 0} == stats["experts_streamed"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_memory_within_budget(checkpoint_path):
    """Device memory taken by a load at ratio 25 <= non-expert + resident experts + staging, plus 10%."""
    info = describe(Checkpoint(checkpoint_path))
    budget = info["device_bytes_by_ratio"][25]["device_bytes"]
    assert budget == info["non_expert_bytes"] + info["device_bytes_by_ratio"][25]["expert_bytes"] + \
        info["staging_bytes"]
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    # the budget counts the embedding table on the device, and no CPU share
    pipe = LLMPipeline(checkpoint_path, "cuda", MOE_OFFLOAD_RATIO=25, MOE_HOST_EMBEDDINGS="off", MOE_CPU_EXPERTS="off")
    try:
        torch.cuda.synchronize()
        used = torch.cuda.memory_allocated() - before
        stats = pipe.get_offload_stats()
        assert stats["device_expert_bytes"] == info["device_bytes_by_ratio"][25]["expert_bytes"]
        assert used <= budget * 1.10, f"{used} bytes on the device, budget {budget} (+10%)"
        assert used >= info["non_expert_bytes"] + stats["device_expert_bytes"]  # the measurement is real
        with torch.no_grad():
            pipe.model(torch.arange(2, 18, device="cuda")[None])
        assert pipe.get_offload_stats()["misses"] > 0
    finally:
        pipe.close()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU pipelines with Triton zero-copy layers run only in "
                                                    "Triton's interpreter, used where there is no GPU")
def test_scratch_pool_is_allocated_only_when_a_miss_streams_through_it(checkpoint_factory):
    """Zero-copy layers read misses in place: the shared streaming scratch stays unallocated; the copy path at
    ratio 0 (no slot to admit into) streams through it."""
    pytest.importorskip("triton")
    from moe_offload.kernels.triton_moe import fused_moe

    path = checkpoint_factory("qwen3_moe")
    ids = torch.tensor([[5, 17, 42]])
    direct = LLMPipeline(path, "cpu", MOE_OFFLOAD_RATIO=0)
    for layer in direct.layers:
        layer.fused_moe = fused_moe
        assert layer.enable_direct(direct.device)
    direct.generate_tokens(ids, max_new_tokens=2, min_new_tokens=2)
    assert direct.get_offload_stats()["device_staging_bytes"] == 0
    copying = LLMPipeline(path, "cpu", MOE_OFFLOAD_RATIO=0)
    assert copying.get_offload_stats()["device_staging_bytes"] == 0
    copying.generate_tokens(ids, max_new_tokens=2, min_new_tokens=2)
    assert copying.get_offload_stats()["device_staging_bytes"] > 0
