"""Cache policies judged on learned routing: decode hit rate and bytes per token of every policy of
moe_offload/policy at ratios 10/25/50, next to LRU and Belady's MIN, on held-out traces of the trained models.

Why: the engine's default policy is chosen here. The traces (bench/policy_traces.py) come in a tuning set and a
report set of different held-out files; LFRU's half-life is tuned on the tuning set (best mean decode hit rate
over the ratios and the models, one value for the engine) and every number of the table is measured on the report
set. Prefetch is scored against its own eviction policy without prefetch: decode hits gained, and experts fetched
that the step did not need (bytes wasted); also with a budget of 1, 2 or 4 experts per layer and step (the most
probable first): an engine can hide a prefetch only in the link's idle time, a decode step's attention, which holds
a few quantized experts' bytes or a fraction of a bf16 expert's, so what a small budget gains is what could pay.
Bytes = expert loads (misses, streamed or admitted, plus prefetches) x the bytes of one bf16 expert (3 x hidden x
moe_intermediate x 2, from the trace index).

Usage (from the repository root, after bench/policy_traces.py for each model):
  python -m bench.cache_policy_learned --models small-moe,small-moe-128 \
      --out bench/results/<date>-cache-policy-learned.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from bench.common import ROOT, log
from bench.policy_traces import KINDS
from bench.provenance import record
from moe_offload.policy import DEFAULT_POLICY
from moe_offload.policy.lfru import DEFAULT_HALF_LIFE
from moe_offload.tools.simulate import simulate
from moe_offload.tools.trace import load_trace

RATIOS = (10, 25, 50)
HALF_LIVES = (8, 16, 32, 64, 128, 256, 512, 1024)
REPORTED = ("lru", "lfru", "per-layer", "shared", "prefetch", "min")
PREFETCH_LIMITS = (1, 2, 4)  # experts per layer and decode step


def decode_totals(traces, ratio: int, policy: str, options=None, prefetch_limit: int | None = None,
                  eviction: str | None = None) -> dict:
    """Decode hits, misses, loads and prefetch counts summed over traces; hit rate and loads per decode token."""
    hits = misses = loads = fetched = used = tokens = layer_steps = 0
    for trace in traces:
        result = simulate(trace, None, ratio, policy, "forward", options, prefetch_limit, eviction)
        total = result["total"]
        decode = total["decode"]
        hits, misses, loads = hits + decode["hits"], misses + decode["misses"], loads + decode["loads"]
        fetched, used = fetched + decode["prefetched"], used + decode["prefetch_used"]
        decoded = round(decode["loads"] / total["decode_loads_per_token"]) if total["decode_loads_per_token"] else 0
        tokens, layer_steps = tokens + decoded, layer_steps + decoded * len(result["layers"])
    return {"hits": hits, "misses": misses, "hit_rate": hits / (hits + misses), "loads_per_token": loads / tokens,
            "prefetched": fetched, "prefetch_used": used, "decode_tokens": tokens,
            "decode_layer_steps": layer_steps}


TRACES = os.path.join(ROOT, "bench", "results", "traces")


def load_set(tag: str, name: str, traces_dir: str) -> tuple[dict, list]:
    with open(os.path.join(traces_dir, f"{tag}-index.json"), encoding="utf-8") as handle:
        index = json.load(handle)
    stems = [stem for stem, item in index["traces"].items() if item["set"] == name]
    return index, [(stem, load_trace(os.path.join(ROOT, index["traces"][stem]["trace"]))) for stem in stems]


def tune(models: list[str], traces_dir: str) -> dict:
    """Per half-life: LFRU's decode hit rate on each model's tuning traces per ratio, and the mean of them all."""
    scores = {}
    for half_life in HALF_LIVES:
        row = {}
        for tag in models:
            traces = [trace for _, trace in load_set(tag, "tune", traces_dir)[1]]
            row[tag] = [decode_totals(traces, ratio, "lfru", {"half_life": half_life})["hit_rate"] for ratio in RATIOS]
        row["mean"] = sum(sum(rates) for rates in row.values()) / (len(models) * len(RATIOS))
        scores[half_life] = row
        log(f"tune half_life {half_life}: " + ", ".join(f"{k} {v if k == 'mean' else [round(x, 3) for x in v]}"
                                                        for k, v in row.items()))
    return scores


def report(tag: str, traces_dir: str) -> dict:
    index, named = load_set(tag, "report", traces_dir)
    traces = [trace for _, trace in named]
    size = index["expert_bytes"]
    rows = {}
    for ratio in RATIOS:
        for policy in REPORTED + ("default",):
            totals = decode_totals(traces, ratio, policy)
            totals["bytes_per_token"] = totals["loads_per_token"] * size
            per_kind = {}
            for kind in KINDS:
                kind_traces = [t for stem, t in named if index["traces"][stem]["kind"] == kind]
                per_kind[kind] = decode_totals(kind_traces, ratio, policy)["hit_rate"]
            totals["hit_rate_by_kind"] = per_kind
            rows[f"{policy}@{ratio}"] = totals
            log(f"{tag} ratio {ratio} {policy}: decode hit rate {totals['hit_rate']:.3f}, "
                f"{totals['bytes_per_token'] / 1e3:.1f} kB/token")
        for limit in PREFETCH_LIMITS:
            totals = decode_totals(traces, ratio, "prefetch", prefetch_limit=limit)
            totals["bytes_per_token"] = totals["loads_per_token"] * size
            rows[f"prefetch-{limit}@{ratio}"] = totals
            log(f"{tag} ratio {ratio} prefetch at most {limit}: decode hit rate {totals['hit_rate']:.3f}")
        totals = decode_totals(traces, ratio, "prefetch", prefetch_limit=2, eviction="lfru")  # LFRU under it
        totals["bytes_per_token"] = totals["loads_per_token"] * size
        rows[f"prefetch-2-lfru@{ratio}"] = totals
        base = rows[f"{DEFAULT_POLICY}@{ratio}"]
        for ahead in [rows[f"prefetch@{ratio}"], rows[f"prefetch-2-lfru@{ratio}"]] + [
                rows[f"prefetch-{limit}@{ratio}"] for limit in PREFETCH_LIMITS]:
            ahead["hits_gained"] = ahead["hits"] - base["hits"]
            ahead["wasted_bytes_per_token"] = ((ahead["prefetched"] - ahead["prefetch_used"]) * size
                                               / ahead["decode_tokens"])
    return {"model": index["model"], "expert_bytes": size,
            "report_traces": [index["traces"][stem]["trace"] for stem, _ in named], "rows": rows}


def markdown(results: dict) -> str:
    """Decode hit rate (bytes per token, kB, below it) per policy, ratio and model; prefetch's hits gained."""
    lines = ["| model | ratio | " + " | ".join(REPORTED) + " | lfru/MIN | prefetch: hits gained, wasted kB/token |",
             "|---|---|" + "---|" * (len(REPORTED) + 2)]
    for tag, result in results.items():
        for ratio in RATIOS:
            rows = result["rows"]
            cells = [f"{rows[f'{p}@{ratio}']['hit_rate']:.3f} ({rows[f'{p}@{ratio}']['bytes_per_token'] / 1e3:.0f})"
                     for p in REPORTED]
            ratio_to_min = rows[f"lfru@{ratio}"]["hit_rate"] / rows[f"min@{ratio}"]["hit_rate"]
            ahead = rows[f"prefetch@{ratio}"]
            lines.append(f"| {tag} | {ratio} | " + " | ".join(cells) + f" | {ratio_to_min:.2f} | "
                         f"{ahead['hits_gained']:+d}, {ahead['wasted_bytes_per_token'] / 1e3:.0f} |")
    return "\n".join(lines)


def prefetch_markdown(results: dict) -> str:
    """Per layer and decode step: demand misses (loads on the step's critical path) and prefetches, without
    prefetch, with each budget, and unbounded (LRU evicting), then a budget of 2 with LFRU evicting; hit rate in
    brackets."""
    limits = [None, *PREFETCH_LIMITS, "all", "2-lfru"]
    names = {None: "no prefetch", "all": "all predicted", "2-lfru": "at most 2, LFRU"}
    lines = ["| model | ratio | " + " | ".join(names.get(n, f"at most {n}") for n in limits) + " |",
             "|---|---|" + "---|" * len(limits)]
    for tag, result in results.items():
        for ratio in RATIOS:
            cells = []
            for limit in limits:
                row = result["rows"][f"{DEFAULT_POLICY}@{ratio}" if limit is None else
                                     f"prefetch@{ratio}" if limit == "all" else f"prefetch-{limit}@{ratio}"]
                steps = row["decode_layer_steps"]
                cells.append(f"{row['misses'] / steps:.2f} + {row['prefetched'] / steps:.2f} ({row['hit_rate']:.3f})")
            lines.append(f"| {tag} | {ratio} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="small-moe,small-moe-128", help="trace tags (bench/policy_traces.py)")
    parser.add_argument("--out", default=None, help="JSON file to write")
    parser.add_argument("--skip-tuning", action="store_true", help="report only (the engine's half-life)")
    parser.add_argument("--traces-dir", default=TRACES, help="where bench/policy_traces.py wrote the traces")
    args = parser.parse_args(argv)
    models = args.models.split(",")
    scores = {} if args.skip_tuning else tune(models, args.traces_dir)
    results = {tag: report(tag, args.traces_dir) for tag in models}
    table = markdown(results)
    prefetch_table = prefetch_markdown(results)
    print(table + "\n\n" + prefetch_table)
    if args.out:
        payload = {"schema": "moe-offload/cache-policy-learned/1", "provenance": record(),
                   "command": "python -m bench.cache_policy_learned " + " ".join(argv or sys.argv[1:]),
                   "routing": "learned (trained models, tools/train_small_moe.py)",
                   "default_policy": DEFAULT_POLICY, "lfru_half_life": DEFAULT_HALF_LIFE,
                   "tuned_on": "the 'tune' traces of each model (bench/results/traces/*-tune-*.jsonl.gz)",
                   "reported_on": "the 'report' traces (bench/results/traces/*-report-*.jsonl.gz)",
                   "tuning_mean_decode_hit_rate_by_half_life": scores, "ratios": RATIOS, "results": results,
                   "table": table, "prefetch_table": prefetch_table}
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
