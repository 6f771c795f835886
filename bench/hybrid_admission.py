"""Which decode misses should the CPU compute when the device cache admits what the GPU reads (hybrid + LRU)?

With MOE_ZERO_COPY=auto/lru and MOE_CPU_EXPERTS on, the CPU computes split[m] of a step's m misses where they
lie and the GPU reads the rest in place, admitting them into LRU victim slots (cache.py _forward_hybrid). An
expert the CPU serves is never admitted, so the pick decides what the cache can learn. The pack (hybrid/share.py) picked
the first split[m] misses in top-k order (the highest routing weights); since this comparison it picks "stale".
This replays the shipped trained model's decode routing (tools/routing_report.py's held-out stdlib prompts,
greedy; the learned routing, not the random benchmark model's) under three picks, through the engine's cache
bookkeeping as moe_offload.tools.simulate replays it (policy.SlotTable with policy.LRUPolicy, experts 0..C-1
cached at the start, C = OffloadConfig.resident_count), with the device LRU's rules (hits refreshed in ascending
id, then admitted misses in ascending id take the oldest slots the step does not need; prefill steps neither
admit nor refresh):
- top: the first n misses in top-k order (what ran before);
- bottom: the last n (the lowest routing weights);
- stale: the n misses whose last decode use is oldest (never used first), so the GPU admits the recent ones
  (what runs now).
Also: no CPU share (LRU alone) and the static resident set. Per ratio and split table: decode hits, misses on
the CPU and misses the GPU reads, per (token, layer) step.

Usage, from the repository root (CPU, about a minute):
  python -m bench.hybrid_admission --out bench/results/<date>-hybrid-admission-small-moe.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from bench.common import machine, utc_now, versions, write_report
from moe_offload import LLMPipeline
from moe_offload.config import OffloadConfig
from moe_offload.policy import LRUPolicy, SlotTable
from moe_offload.tools.simulate import _replay_layer, replay_steps
from moe_offload.tools.trace import trace_generation
from tools.routing_report import read_train_log, stdlib_prompts

PICKS = ("top", "bottom", "stale")


def decode_steps(records: list[dict]) -> dict[int, list[list[int]]]:
    """Per MoE layer, each decode step's experts in router order (one token per step); the steps and phases are
    simulate.replay_steps' (a forward holding a request's token 0 is a prefill), checked against it."""
    prefill = {r["step"] for r in records if r["token"] == 0}
    steps: dict[int, list[list[int]]] = {}
    for r in records:
        if r["step"] not in prefill:
            steps.setdefault(int(r["layer"]), []).append([int(e) for e in r["experts"]])
    _, replayed = replay_steps(records, "forward")
    for layer, seq in steps.items():
        assert [sorted(set(ids)) for ids in seq] == [need for need, phase in replayed[layer] if phase == "decode"]
    return steps


def cpu_pick(misses: list[int], n: int, pick: str, last_use: dict[int, int]) -> list[int]:
    """The n of a step's misses (router order) the CPU computes."""
    if n == 0:
        return []
    if pick == "top":
        return misses[:n]
    if pick == "bottom":
        return misses[-n:]
    return sorted(misses, key=lambda e: last_use.get(e, -1))[:n]  # stable: ties keep router order


def replay(steps: list[list[int]], capacity: int, split: list[int] | None, pick: str, admit: bool = True
           ) -> dict[str, int]:
    """Counts over one layer's decode steps; split None = no CPU share; admit False = the static set. The cache
    is simulate._replay_layer's (SlotTable + LRUPolicy, experts 0..C-1 first), except that the misses the CPU
    computes are not admitted."""
    table = SlotTable(capacity, LRUPolicy())
    for expert in range(capacity):  # OffloadedExperts.preload(range(C))
        table.admit(expert, ())
    last_use: dict[int, int] = {}
    counts = {"hits": 0, "cpu": 0, "gpu_reads": 0}
    for t, ids in enumerate(steps):
        misses = [e for e in ids if table.lookup(e) is None]
        on_cpu = set(cpu_pick(misses, split[len(misses)], pick, last_use)) if split else set()
        counts["hits"] += len(ids) - len(misses)
        counts["cpu"] += len(on_cpu)
        counts["gpu_reads"] += len(misses) - len(on_cpu)
        if admit and capacity:
            for e in sorted(set(ids) - set(misses)):
                table.hit(e)
            for e in sorted(set(misses) - on_cpu):
                table.admit(e, set(ids))  # None: no slot the step does not need, read without caching
        for e in ids:
            last_use[e] = t
    return counts


def per_step(total: dict[str, int], steps: int) -> dict[str, float]:
    return {key: round(value / steps, 4) for key, value in total.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--chars", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--ratios", default="25,50")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    pipe = LLMPipeline(None, "cpu", MOE_OFFLOAD_RATIO=100)
    prompts, files, source = stdlib_prompts(args.prompts, args.chars, 0, read_train_log(pipe.models_path))
    eos = pipe.tokenizer.eos_token or ""
    trace = trace_generation(pipe, [eos + p for p in prompts], args.max_new_tokens)
    steps = decode_steps(trace.records)
    num_experts, top_k = pipe.layers[0].num_experts, pipe.layers[0].top_k
    splits = {"cpu_1_of_any": [0] + [1] * top_k, "cpu_half": [m // 2 for m in range(top_k + 1)]}
    total_steps = sum(len(s) for s in steps.values())
    rows = []
    for ratio in (int(r) for r in args.ratios.split(",")):
        capacity = OffloadConfig(moe_offload_ratio=ratio).resident_count(num_experts)
        for layer, seq in steps.items():  # with no CPU share this is simulate's own LRU replay of the decode steps
            alone = _replay_layer([(sorted(set(ids)), "decode") for ids in seq], num_experts, capacity, "lru", layer)
            assert alone["decode"][0] == replay(seq, capacity, None, "top")["hits"]

        def summed(**kwargs) -> dict[str, float]:
            totals = [replay(s, capacity, **kwargs) for s in steps.values()]
            return per_step({k: sum(t[k] for t in totals) for k in totals[0]}, total_steps)

        row = {"ratio": ratio, "capacity": capacity, "static": summed(split=None, pick="top", admit=False),
               "lru_no_cpu": summed(split=None, pick="top")}
        for name, split in splits.items():
            row[name] = {"split": split, **{pick: summed(split=split, pick=pick) for pick in PICKS}}
        rows.append(row)
        print(json.dumps(row))
    report = {"date": utc_now(), "machine": machine(), "versions": versions(),
              "model": os.path.relpath(pipe.models_path), "prompts": source, "files": files,
              "max_new_tokens": args.max_new_tokens, "layers": len(steps), "decode_layer_steps": total_steps,
              "top_k": top_k, "num_experts": num_experts,
              "units": "per (token, layer) decode step: experts hit, computed on the CPU, read in place by the GPU",
              "rows": rows}
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
