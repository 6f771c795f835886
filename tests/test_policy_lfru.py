"""The cache policies beyond LRU (policy/lfru.py, allocation.py, prefetch.py) and their replay (tools/simulate.py).

LFRU (the policy that won the replay, bench/RESULTS.md) is checked against a straightforward reference that
recomputes every score from the whole use history (sum of 2^(-age / half_life)) at every decision; the engine's
own counters against the replay of "default" are checked in test_trace_simulate.py.
"""

import random

import pytest

from moe_offload.cli import main
from moe_offload.policy import DEFAULT_POLICY, LFRUPolicy, SlotTable, make_policy
from moe_offload.policy.allocation import churn, layer_capacities
from moe_offload.tools.simulate import POLICY_NAMES, simulate


def records_of(steps, layer=0, predicted=None):
    """One single-token forward per step, one request; optional "predicted" per step."""
    records = []
    for i, needed in enumerate(steps):
        record = {"request": 0, "token": i, "layer": layer, "step": i, "experts": list(needed)}
        if predicted is not None:
            record["predicted"] = list(predicted[i])
        records.append(record)
    return records


def reference_lfru(steps, capacity, half_life):
    """cache.py's step rule with LFRU written out plainly: per step, hits, then misses in ascending id; a miss takes
    a free slot, else evicts the cached expert (not needed by the step) of lowest score (ties: older last use) if its
    own score, this use counted, is at least that one's, else it is streamed. Returns (hits, misses, cache after
    each step)."""
    uses = {}  # expert -> clock values of its uses
    clock = 0
    cached = set()

    def use(expert):
        nonlocal clock
        clock += 1
        uses.setdefault(expert, []).append(clock)

    def score(expert):
        return sum(2.0 ** (-(clock - t) / half_life) for t in uses.get(expert, []))

    for expert in range(capacity):
        cached.add(expert)
        use(expert)
    hits = misses = 0
    states = []
    for needed in steps:
        needed = sorted(set(needed))
        step_hits = [e for e in needed if e in cached]
        step_misses = [e for e in needed if e not in cached]
        hits, misses = hits + len(step_hits), misses + len(step_misses)
        for expert in step_hits:
            use(expert)
        for expert in step_misses:
            if capacity == 0:
                continue
            if len(cached) < capacity:
                cached.add(expert)
                use(expert)
                continue
            candidates = [e for e in cached if e not in needed]
            if not candidates:
                continue
            victim = min(candidates, key=lambda e: (score(e), uses[e][-1]))
            use(expert)
            if score(expert) >= score(victim):
                cached.remove(victim)
                cached.add(expert)
        states.append(frozenset(cached))
    return hits, misses, states


def replay_states(steps, capacity, half_life):
    """SlotTable + LFRUPolicy stepped as simulate.py steps them; the cached set after each step."""
    table = SlotTable(capacity, LFRUPolicy(half_life))
    for expert in range(capacity):
        table.admit(expert, ())
    states = []
    for needed in steps:
        needed = sorted(set(needed))
        misses = [e for e in needed if table.lookup(e) is None]
        for expert in needed:
            if table.lookup(expert) is not None:
                table.hit(expert)
        for expert in misses:
            if capacity:
                table.admit(expert, set(needed))
        states.append(frozenset(table.slot_of))
    return states


@pytest.mark.parametrize("seed", range(4))
def test_lfru_same_decisions_as_reference(seed):
    rng = random.Random(seed)
    num_experts, top_k = (8, 2) if seed % 2 else (16, 4)
    hot = rng.sample(range(num_experts), 3)  # a skewed routing, as learned routing is
    steps = [sorted(set(rng.sample(hot, 1) + rng.sample(range(num_experts), top_k - 1))) for _ in range(120)]
    for capacity in (top_k, num_experts // 2):
        for half_life in (4.0, 32.0):
            hits, misses, states = reference_lfru(steps, capacity, half_life)
            assert replay_states(steps, capacity, half_life) == states, (capacity, half_life)
            ratio = round(100 * capacity / num_experts)
            result = simulate(records_of(steps), num_experts, ratio, "lfru", options={"half_life": half_life})
            assert result["layers"][0]["capacity"] == capacity
            assert (result["total"]["hits"], result["total"]["misses"]) == (hits, misses)


def test_lfru_by_hand():
    # C = 2, half-life 1 use. Preload 0 (score 0.5 after the next tick), 1 (1.0).
    # s0 [0]: hit -> 0 scores 1.25, 1 scores 0.5.   s1 [2]: victim 1 (0.5 < 1.25); 2's score 1.0 >= 0.5: admitted.
    # s2 [3]: victim = lowest of 0 (0.3125) and 2 (1.0) = 0; 3 scores 1.0 >= 0.156: admitted. Cache {2, 3}.
    policy = LFRUPolicy(half_life=1.0)
    table = SlotTable(2, policy)
    table.admit(0, ())
    table.admit(1, ())
    table.hit(0)
    assert policy.victim(()) == 1
    assert table.admit(2, {2}) is not None and set(table.slot_of) == {0, 2}
    assert table.admit(3, {3}) is not None and set(table.slot_of) == {2, 3}
    assert list(policy.cached()) == [2, 3]  # most evictable first


def test_lfru_admission_streams_a_cold_expert():
    policy = LFRUPolicy(half_life=1000.0)  # ~no decay: a pure use count
    table = SlotTable(1, policy)
    table.admit(0, ())
    for _ in range(3):
        table.hit(0)  # 0 used 4 times
    assert table.admit(5, {5}) is None and set(table.slot_of) == {0}  # 5 (1 use) < 0 (4): streamed
    assert table.admit(5, {5}, force=True) is not None and set(table.slot_of) == {5}  # a prefetch skips the filter
    assert policy.victim({5}) is None


def test_make_policy_default_and_errors():
    assert DEFAULT_POLICY in ("lru", "lfru") and type(make_policy()) is type(make_policy(DEFAULT_POLICY))
    assert make_policy("lfru", half_life=8).half_life == 8.0
    with pytest.raises(ValueError, match="known: lru, lfru"):
        make_policy("fifo")
    with pytest.raises(ValueError, match="half_life"):
        LFRUPolicy(0)


def test_layer_capacities():
    assert churn([[0, 1], [1, 2], [1, 2], [3]]) == 2 + 1 + 0 + 1
    caps = layer_capacities({0: 10, 1: 30, 2: 0}, {0: 4, 1: 4, 2: 4}, {0: 16, 1: 16, 2: 16})
    assert caps == {0: 3, 1: 9, 2: 0} and sum(caps.values()) == 12
    capped = layer_capacities({0: 1, 1: 100}, {0: 4, 1: 4}, {0: 8, 1: 5})  # layer 1 holds at most 5
    assert capped == {0: 3, 1: 5}
    assert layer_capacities({0: 0, 1: 0}, {0: 2, 1: 3}, {0: 8, 1: 8}) == {0: 2, 1: 3}


def test_shared_pool_and_per_layer_keep_the_total():
    # layer 0 changes experts every step, layer 1 never: sharing lets layer 0 use layer 1's spare slots
    steps0 = [[i % 6] for i in range(24)]
    trace = records_of(steps0, layer=0) + records_of([[0]] * 24, layer=1)
    trace.sort(key=lambda r: (r["step"], r["layer"]))
    per_layer = simulate(trace, 8, 50, "lfru")  # C = 4 each
    shared = simulate(trace, 8, 50, "shared")
    split = simulate(trace, 8, 50, "per-layer")
    assert shared["eviction"] == split["eviction"] == DEFAULT_POLICY
    assert sum(r["capacity"] for r in split["layers"].values()) == 8 and split["layers"][0]["capacity"] > 4
    assert shared["total"]["hits"] > per_layer["total"]["hits"] and shared["layers"][1]["misses"] == 0
    # churn 24 against 1: layer 0 takes every slot it can hold, and layer 1, left with none, misses every step
    assert (split["layers"][0]["capacity"], split["layers"][1]["capacity"]) == (8, 0)
    assert split["layers"][1]["hits"] == 0


def test_prefetch_counts_hits_and_waste():
    # E = 4, C = 1 (ratio 25), 0 cached. Prefill s0 [0] (no prefetch), then decode steps:
    #  s1 predicted [1]: fetched (evicts 0), needed [1]: hit
    #  s2 predicted [3]: fetched (evicts 1), needed [2]: miss; 2 (newer use) is admitted over 3
    #  s3 predicted [3]: fetched again (evicts 2), needed [3]: hit
    steps = [[0], [1], [2], [3]]
    predicted = [[0], [1], [3], [3]]
    trace = records_of(steps, predicted=predicted)
    result = simulate(trace, 4, 25, "prefetch")["total"]
    assert result["decode"]["prefetched"] == 3
    assert result["decode"]["prefetch_used"] == 2
    assert (result["decode"]["hits"], result["decode"]["misses"]) == (2, 1)
    assert result["decode"]["loads"] == result["decode"]["misses"] + 3
    assert result["decode_loads_per_token"] == result["decode"]["loads"] / 3
    with pytest.raises(Exception, match="--predict"):
        simulate(records_of(steps), 4, 25, "prefetch")


def test_prefetch_limit_takes_the_most_probable_first():
    # E = 8, C = 4 (ratio 50), 0-3 cached. Decode s1 predicts [7, 5, 1] (best first): 7 and 5 are not cached.
    # At most 1: only 7 (the more probable, though the larger id) is fetched; then s1 needs [5]: a miss.
    steps = [[0], [5]]
    predicted = [[0], [7, 5, 1]]
    trace = records_of(steps, predicted=predicted)
    limited = simulate(trace, 8, 50, "prefetch", prefetch_limit=1)["total"]["decode"]
    assert (limited["prefetched"], limited["prefetch_used"], limited["misses"]) == (1, 0, 1)
    unlimited = simulate(trace, 8, 50, "prefetch")["total"]["decode"]
    assert (unlimited["prefetched"], unlimited["prefetch_used"], unlimited["hits"]) == (2, 1, 1)


def test_prefetch_under_another_eviction_policy():
    """eviction= picks the policy under prefetch (per-layer and shared too); a policy that is its own eviction takes
    none."""
    steps = [[i % 5, (i * 3) % 7] for i in range(40)]
    predicted = [[(i * 3) % 7, i % 5] for i in range(40)]
    trace = records_of(steps, predicted=predicted)
    lfru = simulate(trace, 8, 50, "prefetch", eviction="lfru")
    assert lfru["eviction"] == "lfru" and simulate(trace, 8, 50, "prefetch", eviction="lru")["eviction"] == "lru"
    assert simulate(trace, 8, 50, "shared", eviction="lfru")["eviction"] == "lfru"
    for policy, eviction in (("lru", "lfru"), ("prefetch", "fifo"), ("min", "lru")):
        with pytest.raises(Exception, match="eviction"):
            simulate(trace, 8, 50, policy, eviction=eviction)


def test_simulate_command_policies(tmp_path, capsys):
    import json

    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records_of([[0], [1], [2], [0]], predicted=[[0]] * 4)))
    for name in POLICY_NAMES:
        assert main(["simulate", str(path), "--num-experts", "4", "--ratio", "50", "--policy", name]) == 0
    out = capsys.readouterr().out
    assert f"policy default ({DEFAULT_POLICY})" in out and "policy min" in out and "prefetched" in out
    assert main(["simulate", str(path), "--policy", "fifo"]) != 0
    assert "invalid choice: 'fifo' (choose from 'lru', 'lfru'" in capsys.readouterr().err
    assert main(["simulate", str(path), "--num-experts", "4", "--ratio", "50", "--policy", "prefetch",
                 "--prefetch-limit", "1"]) == 0
    assert "prefetched" in capsys.readouterr().out
    assert main(["simulate", str(path), "--num-experts", "4", "--ratio", "50", "--policy", "prefetch", "--policy",
                 "lru", "--eviction", "lfru"]) == 0
    assert "policy prefetch (lfru)" in capsys.readouterr().out
    assert main(["simulate", str(path), "--policy", "prefetch", "--prefetch-limit", "0"]) != 0
    assert "--prefetch-limit: must be a positive integer, not '0'" in capsys.readouterr().err


def test_trace_predict_records_router_guesses(checkpoint_factory, tmp_path):
    from moe_offload import LLMPipeline
    from moe_offload.tools.trace import load_trace, record_trace

    pipe = LLMPipeline(checkpoint_factory("qwen3_moe"), "cpu", MOE_OFFLOAD_RATIO=50)
    path = str(tmp_path / "t.jsonl.gz")  # gzip by name
    record_trace(pipe, ["def f(x):"], 3, path, predict=True)
    trace = load_trace(path)
    top_k = trace.meta["top_k"]
    assert trace.meta["predicted"] is True
    assert all(len(r["predicted"]) == top_k == len(r["experts"]) for r in trace.records)
    result = simulate(trace, None, 50, "prefetch")["total"]
    assert result["decode"]["prefetched"] >= result["decode"]["prefetch_used"] >= 0
