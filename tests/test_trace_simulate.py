"""Routing traces (tools/trace.py) and the replay simulator (tools/simulate.py).

(a) hand-checked traces with exact LRU / MIN numbers, (b) properties on seeded random traces, including MIN
against an exhaustive search, (c) a trace recorded on a tiny checkpoint replays to exactly the engine's own
counters, (d) the `trace` subcommand end to end.
"""

import argparse
import functools
import itertools
import json
import random

import pytest

from moe_offload import LLMPipeline, MoeOffloadError
from moe_offload.cli import main
from moe_offload.config import OffloadConfig
from moe_offload.tools.simulate import simulate
from moe_offload.tools.trace import add_trace_command, load_trace, read_prompts, record_trace


def records_of(steps, layer=0, request=0, first_step=0, first_token=0):
    """One record per step (a single token whose experts are the step's list), in one request."""
    return [{"request": request, "token": first_token + i, "layer": layer, "step": first_step + i,
             "experts": list(needed)} for i, needed in enumerate(steps)]


def counts(result, layer=0):
    row = result["layers"][layer]
    return row["hits"], row["misses"]


# ------------------------------------------------------------------------------------------- (a) by hand


def test_single_expert_steps_lru_below_min():
    # E=4, ratio 50 -> C = floor(4 * 0.5 + 0.5) = 2; cached at start: 0, 1 (LRU order oldest first: 0, 1).
    # step  needs | LRU: result, cache after (oldest first)   | MIN: result, cache after
    #  s0   [0]   | hit           (1, 0)                      | hit                 {0, 1}
    #  s1   [1]   | hit           (0, 1)                      | hit                 {0, 1}
    #  s2   [2]   | miss, evict 0 (1, 2)                      | miss: next use 0->s3, 1->s4, 2->never: stream 2
    #  s3   [0]   | miss, evict 1 (2, 0)                      | hit
    #  s4   [1]   | miss, evict 2 (0, 1)                      | hit
    #  s5   [3]   | miss, evict 0 (1, 3)                      | miss: 0->s6, 1 and 3 never: keep 0 and the
    #             |                                           |   cached 1 (tie at +inf), stream 3
    #  s6   [0]   | miss, evict 1 (3, 0)                      | hit
    # LRU: 2 hits, 5 misses.  MIN: 5 hits, 2 misses.
    trace = records_of([[0], [1], [2], [0], [1], [3], [0]])
    assert counts(simulate(trace, 4, 50, "lru")) == (2, 5)
    assert counts(simulate(trace, 4, 50, "min")) == (5, 2)
    result = simulate(trace, 4, 50, "min")
    assert result["layers"][0]["capacity"] == 2 and result["total"]["hit_rate"] == pytest.approx(5 / 7)


def test_protected_rule_streams_a_miss_the_step_itself_needs():
    # E=4, ratio 25 -> C = floor(1 + 0.5) = 1; cached at start: 0.
    # LRU:
    #  s0 [2, 3]: both miss. 2 (ascending order first) evicts 0; 3 may not evict 2 (needed by s0): streamed.
    #             cache {2}
    #  s1 [3]:    miss, evicts 2 -> {3}
    #  s2 [2]:    miss, evicts 3 -> {2}                          LRU: 0 hits, 4 misses
    # MIN:
    #  s0 [2, 3]: nothing cached is needed (K & S = {}), the one slot goes to the earliest future among
    #             0 (never), 2 (s2), 3 (s1): 3. So 2 is streamed although it is the first miss processed,
    #             3 evicts 0. cache {3}
    #  s1 [3]:    hit
    #  s2 [2]:    miss; 3 and 2 are never used again: keep the cached 3, stream 2   MIN: 1 hit, 3 misses
    trace = records_of([[2, 3], [3], [2]])
    assert counts(simulate(trace, 4, 25, "lru")) == (0, 4)
    assert counts(simulate(trace, 4, 25, "min")) == (1, 3)


def test_protected_hit_cannot_make_room():
    # E=4, C=1 (ratio 25); cached at start: 0.
    #  s0 [0, 1]: hit 0, miss 1; the only cached expert (0) is needed by s0 -> 1 is streamed (both policies)
    #  s1 [1]:    miss; 0 is never used again -> 1 evicts 0 (both policies)
    #  s2 [1]:    hit                                        LRU and MIN: 2 hits, 2 misses
    # (A mechanism that could drop 0 right after computing s0 would keep 1 and get 3 hits: MIN is the optimum
    # of cache.py's mechanism, where a step's own experts are protected.)
    trace = records_of([[0, 1], [1], [1]])
    assert counts(simulate(trace, 4, 25, "lru")) == (2, 2)
    assert counts(simulate(trace, 4, 25, "min")) == (2, 2)


def next_use_only_min(steps, capacity):
    """The textbook rule applied miss by miss: evict the furthest next use, bypass if the incoming one is at
    least as far. Kept here only to show why simulate's MIN compares whole future-use sequences."""
    def next_use(expert, now):
        return next((j for j in range(now + 1, len(steps)) if expert in steps[j]), float("inf"))

    cache, hits = list(range(capacity)), 0
    for now, needed in enumerate(steps):
        hits += sum(e in cache for e in needed)
        for expert in sorted(set(needed) - set(cache)):
            candidates = [c for c in cache if c not in needed]
            if not candidates:
                continue
            victim = max(candidates, key=lambda c: next_use(c, now))
            if next_use(expert, now) >= next_use(victim, now):
                continue
            cache[cache.index(victim)] = expert
    return hits


def test_min_tie_break_on_whole_future():
    # E=3, ratio 33 -> C = floor(0.99 + 0.5) = 1; cached at start: 0.   steps s0 [2], s1 [0, 2], s2 [2], s3 [0, 2]
    # LRU: s0 miss 2, evicts 0 -> {2}; s1 hit 2, 0 streamed (2 protected); s2 hit 2; s3 hit 2, 0 streamed
    #      -> 3 hits, 3 misses.
    # MIN: s0: 0 is next used at s1, 2 too: tie on the next use. Whole futures: 0 -> (s1, s3), 2 -> (s1, s2, s3):
    #      2's is earlier -> keep 2, evict 0. Then as LRU -> 3 hits, 3 misses.
    # Next-use-only rule: the tie keeps 0 and streams 2; s1 hit 0, 2 streamed (0 protected); s2 miss 2, next
    #      uses 0 -> s3, 2 -> s3, tie again, 2 streamed; s3 hit 0, 2 streamed -> 2 hits, 4 misses (< LRU).
    steps = [[2], [0, 2], [2], [0, 2]]
    trace = records_of(steps)
    assert counts(simulate(trace, 3, 33, "lru")) == (3, 3)
    assert counts(simulate(trace, 3, 33, "min")) == (3, 3)
    assert next_use_only_min(steps, 1) == 2


def test_forward_steps_and_phases():
    # E=4, C=2 (ratio 50), cached 0, 1. Request 0: a 2-token prefill step (tokens need [0, 2] and [2, 3]:
    # union {0, 2, 3}), then decode tokens [1], [2]. Request 1: a 1-token prefill [3], decode [0].
    # LRU (oldest first), forward steps:
    #  f0 {0,2,3}: hit 0 -> (1, 0); miss 2 evicts 1 -> (0, 2); miss 3: 0 and 2 protected, streamed.
    #  f1 {1}: miss, evicts 0 -> (2, 1)            f2 {2}: hit -> (1, 2)
    #  f3 {3}: miss, evicts 1 -> (2, 3)            f4 {0}: miss, evicts 2 -> (3, 0)
    #  prefill (f0, f3): 1 hit, 3 misses; decode (f1, f2, f4): 1 hit, 2 misses; total 2 hits, 5 misses.
    # Per token instead (token mode): t0 [0, 2]: hit 0, miss 2 evicts 1 -> (0, 2); t1 [2, 3]: hit 2, miss 3
    #  evicts 0 -> (2, 3); t2 [1]: miss, evicts 2 -> (3, 1); t3 [2]: miss, evicts 3 -> (1, 2);
    #  t4 [3]: miss, evicts 1 -> (2, 3); t5 [0]: miss, evicts 2 -> (3, 0): 2 hits, 6 misses.
    records = [
        {"request": 0, "token": 0, "layer": 5, "step": 0, "experts": [0, 2]},
        {"request": 0, "token": 1, "layer": 5, "step": 0, "experts": [2, 3]},
        {"request": 0, "token": 2, "layer": 5, "step": 1, "experts": [1]},
        {"request": 0, "token": 3, "layer": 5, "step": 2, "experts": [2]},
        {"request": 1, "token": 0, "layer": 5, "step": 3, "experts": [3]},
        {"request": 1, "token": 1, "layer": 5, "step": 4, "experts": [0]},
    ]
    result = simulate(records, {5: 4}, 50, "lru")
    assert result["step"] == "forward"
    row = result["layers"][5]
    assert (row["hits"], row["misses"], row["steps"]) == (2, 5, 5)
    assert (row["prefill"]["hits"], row["prefill"]["misses"]) == (1, 3)
    assert (row["decode"]["hits"], row["decode"]["misses"]) == (1, 2)
    assert counts(simulate(records, 4, 50, "lru", step="token"), 5) == (2, 6)
    no_steps = [{k: v for k, v in r.items() if k != "step"} for r in records]
    assert simulate(no_steps, 4, 50, "lru")["step"] == "token"
    with pytest.raises(MoeOffloadError):
        simulate(no_steps, 4, 50, "lru", step="forward")


def test_bad_input():
    trace = records_of([[0], [5]])
    with pytest.raises(MoeOffloadError, match="outside"):
        simulate(trace, 4, 50, "lru")
    with pytest.raises(MoeOffloadError, match="unknown policy"):
        simulate(trace, 8, 50, "fifo")
    with pytest.raises(MoeOffloadError, match="MOE_OFFLOAD_RATIO"):
        simulate(trace, 8, 101, "lru")
    with pytest.raises(MoeOffloadError, match="experts unknown"):
        simulate(trace, None, 50, "lru")


# ------------------------------------------------------------------------------------------- (b) properties


def random_trace(seed, num_experts, top_k=2, layers=2, requests=3, prompt=(1, 6), decode=12):
    """Skewed, somewhat local routing: each token keeps one of the previous token's experts half the time."""
    rng = random.Random(seed)
    weights = [1 / (rank + 1) for rank in range(num_experts)]
    records, step = [], 0
    for request in range(requests):
        lengths = [rng.randint(*prompt)] + [1] * decode
        token = 0
        for length in lengths:
            for layer in range(layers):
                previous = None
                for offset in range(length):
                    chosen = []
                    if previous and rng.random() < 0.5:
                        chosen.append(rng.choice(previous))
                    while len(chosen) < top_k:
                        expert = rng.choices(range(num_experts), weights)[0]
                        if expert not in chosen:
                            chosen.append(expert)
                    records.append({"request": request, "token": token + offset, "layer": layer, "step": step,
                                    "experts": chosen})
                    previous = chosen
            token += length
            step += 1
    return records


@pytest.mark.parametrize("seed", range(6))
def test_random_traces_min_dominates_lru(seed):
    num_experts = (4, 8, 16)[seed % 3]
    trace = random_trace(seed, num_experts)
    for ratio in (0, 10, 25, 37, 50, 75, 100):
        lru = simulate(trace, num_experts, ratio, "lru")
        best = simulate(trace, num_experts, ratio, "min")
        for layer, row in lru["layers"].items():
            other = best["layers"][layer]
            assert other["hits"] >= row["hits"], (ratio, layer)
            assert other["hits"] + other["misses"] == row["hits"] + row["misses"]
            if ratio == 100:
                assert row["misses"] == other["misses"] == 0
            if ratio == 0:
                assert row["hits"] == other["hits"] == 0 and row["capacity"] == 0


def exhaustive_best(steps, capacity):
    """Most hits of any run of cache.py's mechanism: next state between K & S and K | S, at most C experts."""
    @functools.lru_cache(maxsize=None)
    def best(index, cached):
        if index == len(steps):
            return 0
        needed = steps[index]
        forced = cached & needed
        pool = sorted((cached | needed) - forced)
        room = capacity - len(forced)
        options = (best(index + 1, forced | frozenset(kept))
                   for size in range(min(room, len(pool)) + 1) for kept in itertools.combinations(pool, size))
        return len(needed & cached) + max(options)

    return best(0, frozenset(range(capacity)))


def test_min_matches_exhaustive_search():
    rng = random.Random(1234)
    for _ in range(400):
        num_experts = rng.randint(2, 6)
        ratio = rng.randint(0, 100)
        capacity = OffloadConfig(moe_offload_ratio=ratio).resident_count(num_experts)
        steps = [frozenset(rng.sample(range(num_experts), rng.randint(1, min(3, num_experts))))
                 for _ in range(rng.randint(1, 10))]
        result = simulate(records_of([sorted(s) for s in steps]), num_experts, ratio, "min")
        assert counts(result)[0] == exhaustive_best(tuple(steps), capacity), (num_experts, ratio, steps)


# ------------------------------------------------------------------------------------------- (c) recording

PROMPTS = ["def fibonacci(n):", "    return n if n < 2 else"]
NEW_TOKENS = 5


@pytest.fixture(scope="module")
def recorded(checkpoint_factory, tmp_path_factory):
    path = checkpoint_factory("qwen3_moe")
    pipe = LLMPipeline(path, "cpu", MOE_OFFLOAD_RATIO=37)  # fresh: experts 0..C-1 cached, as the simulator starts
    pipe.reset_offload_stats()
    trace_path = str(tmp_path_factory.mktemp("trace") / "trace.jsonl")
    trace = record_trace(pipe, PROMPTS, NEW_TOKENS, trace_path)
    return pipe, trace, trace_path


def test_recorded_trace_shape(recorded):
    pipe, trace, trace_path = recorded
    loaded = load_trace(trace_path)
    assert loaded.records == trace.records and loaded.meta == json.loads(json.dumps(trace.meta))
    num_experts, top_k = 8, 2
    layers = [layer.layer for layer in pipe.layers]
    assert loaded.meta["moe_layers"] == layers and loaded.meta["top_k"] == top_k
    assert loaded.meta["num_experts"] == {str(layer): num_experts for layer in layers}
    prompt_tokens = [len(pipe.tokenizer(p)["input_ids"]) for p in PROMPTS]
    # traced positions per request: the prompt + every generated token but the last (never fed back)
    tokens = [n + NEW_TOKENS - 1 for n in prompt_tokens]
    assert len(loaded.records) == sum(tokens) * len(layers)
    for request, count in enumerate(tokens):
        info = loaded.meta["requests"][request]
        assert (info["prompt_tokens"], info["traced_tokens"], info["forwards"]) == (
            prompt_tokens[request], count, NEW_TOKENS)
        for layer in layers:
            positions = [r["token"] for r in loaded.records if r["request"] == request and r["layer"] == layer]
            assert positions == list(range(count))
    for record in loaded.records:
        assert len(record["experts"]) == top_k and all(0 <= e < num_experts for e in record["experts"])
    steps = sorted({r["step"] for r in loaded.records})
    assert steps == list(range(len(PROMPTS) * NEW_TOKENS))  # one prefill + 4 decode forwards per prompt


def test_replay_matches_engine_counters(recorded):
    pipe, _, trace_path = recorded
    result = simulate(load_trace(trace_path), None, 37, "default")  # the engine's own policy
    for runtime in pipe.layers:
        row = result["layers"][runtime.layer]
        assert row["capacity"] == runtime.table.capacity == 3
        assert (row["hits"], row["misses"]) == (runtime.counters.hits, runtime.counters.misses)
    stats = pipe.get_offload_stats()
    assert (result["total"]["hits"], result["total"]["misses"]) == (stats["hits"], stats["misses"])
    assert stats["hits"] > 0 and stats["misses"] > 0  # both paths exercised
    best = simulate(load_trace(trace_path), None, 37, "min")
    assert best["total"]["hits"] >= result["total"]["hits"]


def test_replay_matches_engine_with_dense_first_layer(checkpoint_factory, tmp_path):
    # DeepSeek-V3 tiny: layer 0 is dense, MoE layers are 1 and 2; ratio 25 -> C = 2 of 8
    pipe = LLMPipeline(checkpoint_factory("deepseek_v3"), "cpu", MOE_OFFLOAD_RATIO=25)
    trace = record_trace(pipe, ["x = 1", "def f():"], 4, str(tmp_path / "t.jsonl"))
    assert trace.meta["moe_layers"] == [1, 2] and {r["layer"] for r in trace.records} == {1, 2}
    result = simulate(load_trace(str(tmp_path / "t.jsonl")), None, 25, "default")
    for runtime in pipe.layers:
        row = result["layers"][runtime.layer]
        assert (row["capacity"], row["hits"], row["misses"]) == (
            2, runtime.counters.hits, runtime.counters.misses)


# ------------------------------------------------------------------------------------------- (d) CLI


def _parser():
    parser = argparse.ArgumentParser(prog="moe-offload")
    add_trace_command(parser.add_subparsers(dest="command", required=True))
    return parser


def test_trace_command_writes_file(checkpoint_factory, tmp_path, capsys):
    path = checkpoint_factory("qwen3_moe")
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["def f(x):", "import os"]))
    out = tmp_path / "out" / "trace.jsonl"
    args = _parser().parse_args(["trace", "--model", path, "--prompts", str(prompts), "-o", str(out),
                                 "--max-new-tokens", "3", "--device", "cpu"])
    assert args.run(args) == 0
    assert "traced 2 prompts" in capsys.readouterr().err
    trace = load_trace(str(out))
    assert trace.meta["ratio"] == 100 and trace.meta["max_new_tokens"] == 3
    assert {r["request"] for r in trace.records} == {0, 1}
    assert simulate(trace, None, 100, "lru")["total"]["misses"] == 0
    assert main(["simulate", str(out), "--ratio", "25", "--json"]) == 0
    printed = capsys.readouterr().out
    assert '"policy": "lru"' in printed and '"policy": "min"' in printed and '"policy": "default"' in printed


def test_trace_command_bad_input(checkpoint_factory, tmp_path):
    path = checkpoint_factory("qwen3_moe")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    for prompts, message in ((tmp_path / "missing.txt", "not found"), (empty, "no prompts")):
        args = _parser().parse_args(["trace", "-m", path, "--prompts", str(prompts), "-o", str(tmp_path / "t")])
        with pytest.raises(MoeOffloadError, match=message):
            args.run(args)
    bad = tmp_path / "bad.json"
    bad.write_text('{"prompt": 1}')
    with pytest.raises(MoeOffloadError, match="list of strings"):
        read_prompts(str(bad))
    lines = tmp_path / "lines.txt"
    lines.write_text("a b\n\nc d\n")
    assert read_prompts(str(lines)) == ["a b", "c d"]


# ------------------------------------------------------------------------------------------- (e) report tool


def _routing_report():
    from repo_scripts import load_script

    return load_script("tools", "routing_report.py")


def test_routing_report_on_tiny_checkpoint(checkpoint_factory, tmp_path):
    import shutil

    report_tool = _routing_report()
    model = tmp_path / "model"
    shutil.copytree(checkpoint_factory("qwen3_moe"), model)
    heldout = ["json/decoder.py", "string.py", "abc.py"]
    (model / "train_log.json").write_text(json.dumps({
        "unigram_heldout_ce": 5.5, "final_heldout_ce": 2.25, "corpus": {"heldout_paths": heldout}}))
    out = tmp_path / "results"
    argv = ["--model", str(model), "--out-dir", str(out), "--num-prompts", "3", "--prompt-chars", "60",
            "--max-new-tokens", "4", "--device", "cpu", "--name", "r"]
    assert report_tool.main(argv) == 0
    report = json.loads((out / "r.json").read_text())
    assert "| 25 |" in (out / "r.md").read_text()
    assert report["cross_entropy"]["gain_nats"] == pytest.approx(3.25)
    assert sorted(report["trace"]["files"]) == sorted(heldout)  # the held-out split from train_log.json
    assert report["trace"]["prefix"] == "</s>"  # a model with train_log.json gets EOS-prefixed prompts
    assert [row["ratio"] for row in report["hit_rates"]] == [10, 25, 50]
    for row in report["hit_rates"]:
        assert row["min"]["hits"] >= row["lru"]["hits"]
        assert 0 <= row["lru"]["decode"] <= row["min"]["decode"] <= 1
    for layer in report["layers"].values():
        assert 0 < layer["popularity"]["all"]["normalized"] <= 1
        assert 0 <= layer["reuse_previous_token"]["decode"] <= 1
    assert report_tool.main(["--model", str(tmp_path / "nothing"), "--out-dir", str(out)]) == 2
