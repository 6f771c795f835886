"""Every derived figure of the harness's report, recomputed from the raw measurements each time the report is
written (so a report merged from several calls stays consistent): the side-by-side rows, the offload rows, the
baselines' rows and the targets. Pure functions of the report dict; bench/table.py renders what they store.

Statistic: median, min and max over the repeats of a configuration, on both sides (llama-bench's per-repetition
samples, not its mean).

Efficiency is a roofline, so it cannot exceed 1 unless a bound was measured too low: the bytes a decoded token
moved over the link that bounds it, per second, over that link's measured rate (bench/bandwidth.py):
- host tier: (bytes that crossed PCIe: copied + read in place by the GPU, plus bytes the CPU read for the experts
  it computed where they lie) / time per token, against the pinned host-to-device rate, plus the CPU's DRAM read
  rate when the hybrid path computed experts on the CPU (the two read different experts at once);
- disk tier: bytes read from the checkpoint / time per token, against cold O_DIRECT reads.
Each generation gives one value; the row has their median, min and max, and says which bound it used.
The bytes are those the engine counted (get_offload_stats: bytes streamed and read in place, experts computed on
the CPU times the run's expert_bytes), which for an int4/int8 checkpoint are its quantized bytes (packed values and
scales), so a quantized run's bound is that of the quantized bytes it moved.

Quantized experts (issue 17): every run and row has its weights (bf16, int4, int8, fp8; reports from before say none
and measured bf16). quant_rows sets each weights' figures beside bf16's at the same ratio and tier (bytes per
decoded token: PCIe + CPU + disk, and decode speed) and beside llama.cpp's GGUF of the same width (Q4_0, Q8_0) at
the same -ncmoe, and marks issue 17's targets (QUANT_TARGETS, and the side-by-side ones at every ratio).
"""

from __future__ import annotations

from bench.sides import summary

GB = 1e9
WEIGHTS = ("bf16", "int4", "int8", "fp8")
# llama.cpp's peer of each of our weights (it has no FP8 type: FP8's is its 8-bit format)
GGUF_TYPES = {"bf16": "BF16", "int4": "Q4_0", "int8": "Q8_0", "fp8": "Q8_0"}
SIDE_BY_SIDE_TARGETS = {"decode_vs_llamacpp": 1.2, "prefill_vs_llamacpp": 3.0}  # and memory <= llama.cpp's
TARGET_RATIOS = (0, 25, 50, 75)
OFFLOAD_TARGETS = {"ratio100_decode_tok_s": 550, "ratio100_prefill_first_tok_s": 10000, "efficiency": 0.8,
                   "ratio25_prefill_first_tok_s": 380, "ratio25_decode_vs_accelerate": 50}
# issue 17, host tier: (weights, ratio, figure, "max" (value <= threshold) or "min" (value >= threshold), threshold)
QUANT_TARGETS = (("int4", 0, "bytes_vs_bf16", "max", 0.30), ("int8", 0, "bytes_vs_bf16", "max", 0.55),
                 ("int4", 0, "decode_vs_bf16", "min", 2.5), ("int4", 100, "decode_vs_bf16", "min", 1.0))


def ncmoe_for(ratio: int, layers: int) -> int:
    """llama.cpp's -ncmoe (experts of N whole layers on the CPU) that keeps the share `ratio` on the GPU."""
    return round(layers * (100 - ratio) / 100)


def with_weights(report: dict) -> dict:
    """`report` with every run and llama.cpp entry saying its weights: those of reports written before issue 17
    say none and measured bf16 (BF16 GGUF). The baselines run bf16 alone, in every report. In place; returns it."""
    report.setdefault("weights", ["bf16"])
    report["baselines_weights"] = "bf16"  # transformers' and accelerate's own loaders, as issue 4 set them
    for entry in report.get("runs", []) + report.get("llamacpp", []):
        entry.setdefault("weights", "bf16")
    return report


def spread(name: str, stats: dict | None) -> dict:
    """{name: median, name_min: min, name_max: max} of a summary (Nones where there is none)."""
    stats = stats or {}
    return {name: stats.get("median"), f"{name}_min": stats.get("min"), f"{name}_max": stats.get("max")}


def quotient(value, other):
    return value / other if value is not None and other else None


def meets(value, direction: str, threshold) -> bool | None:
    """Whether `value` meets a target: at least ("min") or at most ("max") `threshold`; None without a value."""
    if value is None:
        return None
    return value >= threshold if direction == "min" else value <= threshold


def _bounds(bandwidth: dict) -> dict:
    def best(*keys):
        values = [bandwidth[k] for k in keys if bandwidth.get(k)]
        return max(values) if values else None

    return {"h2d": best("h2d_pinned_9mb_gb_s", "h2d_pinned_1gb_gb_s"), "dram": best("dram_read_gb_s"),
            "disk": best("disk_odirect_gb_s", "disk_odirect_parallel_gb_s")}


def roofline(per_token: dict, tok_s: float | None, bandwidth: dict) -> dict:
    """{"achieved_gb_s", "bound_gb_s", "bound", "efficiency"} of one generation; per_token: bytes {pcie, cpu, disk}."""
    bounds, pcie, cpu, disk = _bounds(bandwidth), per_token["pcie"], per_token["cpu"], per_token["disk"]
    if disk and pcie:
        return {"achieved_gb_s": None, "bound_gb_s": None, "efficiency": None,
                "bound": "host and disk tiers both used: no one-link bound"}
    if disk:
        moved, bound, label = disk, bounds["disk"], "disk: cold O_DIRECT reads"
    elif cpu:
        moved = pcie + cpu
        bound = bounds["h2d"] + bounds["dram"] if bounds["h2d"] and bounds["dram"] else None
        label = "PCIe (pinned H2D) + CPU DRAM read"
    elif pcie:
        moved, bound, label = pcie, bounds["h2d"], "PCIe (pinned H2D)"
    else:
        return {"achieved_gb_s": None, "bound_gb_s": None, "efficiency": None, "bound": "nothing offloaded"}
    achieved = moved * tok_s / GB if tok_s else None
    if bound is None:
        label += ": not measured on this call's machine"
    return {"achieved_gb_s": achieved, "bound_gb_s": bound, "bound": label, "efficiency": quotient(achieved, bound)}


def _per_token(generation: dict, expert_bytes: int) -> dict:
    counters, steps = generation["decode"], max(generation["decode_steps"], 1)
    # prefetched_bytes: the removed MOE_PREFETCH's, counted apart in the reports that measured it (2026-12-07)
    crossed = counters["host_bytes"] + counters["in_place_bytes"] + counters.get("prefetched_bytes", 0)
    return {"pcie": crossed / steps,
            "cpu": counters["cpu_experts"] * expert_bytes / steps, "disk": counters["disk_bytes"] / steps}


def run_figures(run: dict, bandwidth: dict) -> dict:
    """The figures of one of our configurations, from its generations (bench/worker.py)."""
    replayed, first, second = run.get("replayed") or [], run.get("first_seen") or [], run.get("second_seen") or []
    per_token = [_per_token(g, run["expert_bytes"]) for g in replayed]
    lines = [roofline(t, g["decode_tok_s"], bandwidth) for t, g in zip(per_token, replayed)]
    medians = {k: summary(t[k] for t in per_token) for k in ("pcie", "cpu", "disk")}
    return {
        **spread("decode_tok_s", summary(g["decode_tok_s"] for g in replayed)),
        **spread("prefill_first_tok_s", summary(g["prefill_tok_s"] for g in first)),
        **spread("prefill_tok_s", summary(g["prefill_tok_s"] for g in replayed)),
        "prefill_replayed_from_graph": all(g["prefill"]["graph"] for g in replayed) if replayed else None,
        "ttft_s": (summary(g["ttft_s"] for g in replayed) or {}).get("median"),
        **spread("hit_rate", summary(g["decode"]["hit_rate"] for g in replayed)),
        "prefill_experts_touched": (summary(g["prefill"]["hits"] + g["prefill"]["misses"] for g in second)
                                    or {}).get("median"),
        "prefill_hit_rate": (summary(g["prefill"]["hit_rate"] for g in second) or {}).get("median"),
        **{f"{k}_bytes_per_token": (medians[k] or {}).get("median") for k in medians},
        "achieved_gb_s": (summary(x["achieved_gb_s"] for x in lines) or {}).get("median"),
        "bound_gb_s": lines[0]["bound_gb_s"] if lines else None, "bound": lines[0]["bound"] if lines else None,
        **spread("efficiency", summary(x["efficiency"] for x in lines)),
        "peak_device_bytes": run.get("peak_device_bytes"),
        "allocator_peak_device_bytes": run.get("allocator_peak_device_bytes"),
        "load_s": run.get("load_s"), "choices": run.get("choices"), "error": run.get("error") or run.get("cut_short"),
    }


def find(entries: list[dict], **key) -> dict | None:
    return next((e for e in entries if all(e.get(k) == v for k, v in key.items())), None)


def _bandwidth(report: dict, entry: dict | None) -> dict:
    calls = report.get("calls") or []
    return calls[entry["call"]].get("bandwidth", {}) if entry and entry.get("call") is not None else {}


def side_by_side_rows(report: dict) -> list[dict]:
    with_weights(report)
    plan, layers = report.get("side_by_side") or {}, report["model"]["moe_layers"]
    return [_side_by_side_row(report, weights, variant, ratio, ncmoe_for(ratio, layers))
            for weights in report["weights"] for variant in plan.get("variants", [])
            for ratio in plan.get("ratios", [])]


def _side_by_side_row(report: dict, weights: str, variant: str, ratio: int, ncmoe: int) -> dict:
    """Ours at `ratio` beside llama.cpp's GGUF of the same width at `ncmoe`."""
    run = find(report["runs"], weights=weights, variant=variant, ratio=ratio)
    theirs = find(report["llamacpp"], weights=weights, ncmoe=ncmoe) or {"error": "not measured"}
    ours = run_figures(run, _bandwidth(report, run)) if run else {"error": "not measured"}
    row = {"weights": weights, "gguf_type": GGUF_TYPES[weights], "ratio": ratio, "ncmoe": ncmoe, "variant": variant,
           **{f"ours_{k}": ours.get(k) for k in ("decode_tok_s", "decode_tok_s_min", "decode_tok_s_max")},
           **spread("llamacpp_decode_tok_s", theirs.get("decode_tok_s")),
           **{f"ours_{k}": ours.get(k) for k in ("prefill_first_tok_s", "prefill_first_tok_s_min",
                                                 "prefill_first_tok_s_max", "prefill_tok_s",
                                                 "prefill_tok_s_min", "prefill_tok_s_max")},
           **spread("llamacpp_prefill_tok_s", theirs.get("prefill_tok_s")),
           "ours_peak_device_bytes": ours.get("peak_device_bytes"),
           "llamacpp_peak_device_bytes": theirs.get("peak_device_bytes"),
           "ours_allocator_peak_device_bytes": ours.get("allocator_peak_device_bytes"),
           "hit_rate": ours.get("hit_rate"), "routing": report.get("routing"),
           "ours_error": ours.get("error"), "llamacpp_error": theirs.get("error")}
    row["decode_vs_llamacpp"] = quotient(row["ours_decode_tok_s"], row["llamacpp_decode_tok_s"])
    # the prefill target is judged on the first-seen figure: what a new prompt length costs a user
    row["prefill_vs_llamacpp"] = quotient(row["ours_prefill_first_tok_s"], row["llamacpp_prefill_tok_s"])
    row["prefill_replayed_vs_llamacpp"] = quotient(row["ours_prefill_tok_s"], row["llamacpp_prefill_tok_s"])
    same_call = run and theirs.get("call") is not None and run.get("call") == theirs["call"]
    row["first"] = (None if not same_call else "ours" if run["sequence"] < theirs["sequence"] else "llamacpp")
    memory = (row["ours_peak_device_bytes"], row["llamacpp_peak_device_bytes"])
    row["targets_met"] = {
        "decode": meets(row["decode_vs_llamacpp"], "min", SIDE_BY_SIDE_TARGETS["decode_vs_llamacpp"]),
        "prefill": meets(row["prefill_vs_llamacpp"], "min", SIDE_BY_SIDE_TARGETS["prefill_vs_llamacpp"]),
        "memory": None if None in memory else memory[0] <= memory[1]}
    return row


def offload_rows(report: dict) -> list[dict]:
    with_weights(report)
    plan = report.get("offload") or {}
    rows = []
    for weights in report["weights"]:
        for variant, tier, ratios in (("default", "host", plan.get("ratios", [])),
                                      ("disk", "disk", plan.get("disk_ratios", []))):
            for ratio in ratios:
                run = find(report["runs"], weights=weights, variant=variant, ratio=ratio)
                figures = run_figures(run, _bandwidth(report, run)) if run else {"error": "not measured"}
                rows.append({"weights": weights, "ratio": ratio, "tier": tier, "variant": variant,
                             "routing": report.get("routing"), **figures})
    return rows


def baseline_rows(report: dict) -> dict:
    rows = {}
    for kind, entry in (report.get("baselines") or {}).items():
        runs = entry.get("runs") or []
        rows[kind] = {**spread("decode_tok_s", summary(r["decode_tok_s"] for r in runs)),
                      **spread("prefill_tok_s", summary(r["prefill_tok_s"] for r in runs)),
                      "repeats": len(runs), "new_tokens": runs[0]["new_tokens"] if runs else None,
                      "peak_device_bytes": entry.get("peak_device_bytes"),
                      "allocator_peak_device_bytes": entry.get("allocator_peak_device_bytes"),
                      "gpu_bytes_budget": entry.get("gpu_bytes_budget"),
                      "error": entry.get("error") or entry.get("cut_short")}
    return rows


def _figures(report: dict, weights: str, tier: str, ratio: int) -> dict:
    """run_figures of one of our default (host) or disk runs, with its bytes per decoded token over every link."""
    run = find(report["runs"], weights=weights, variant="default" if tier == "host" else "disk", ratio=ratio)
    if not run:
        return {"error": "not measured"}
    figures = run_figures(run, _bandwidth(report, run))
    parts = [figures[f"{link}_bytes_per_token"] for link in ("pcie", "cpu", "disk")]
    return {**figures, "expert_bytes": run.get("expert_bytes"),
            "bytes_per_token": None if None in parts else sum(parts)}


def _quant_targets(row: dict, peer: dict | None) -> list[dict]:
    """Issue 17's targets that apply to `row`: QUANT_TARGETS, and for int4/int8 beside their GGUF the side-by-side
    ones (decode, first-seen prefill, peak device memory) at every ratio."""
    found = [{"name": figure, "value": row[figure], "direction": direction, "threshold": threshold,
              "met": meets(row[figure], direction, threshold)}
             for weights, ratio, figure, direction, threshold in QUANT_TARGETS
             if (weights, "host", ratio) == (row["weights"], row["tier"], row["ratio"])]
    if peer and row["weights"] in ("int4", "int8"):  # issue 17 set none for fp8 (written since)
        found += [{"name": key, "value": row[key], "direction": "min", "threshold": threshold,
                   "met": meets(row[key], "min", threshold)} for key, threshold in SIDE_BY_SIDE_TARGETS.items()]
        found.append({"name": "peak_vs_llamacpp", "value": row["peak_vs_llamacpp"], "direction": "max",
                      "threshold": 1.0, "met": peer["targets_met"]["memory"]})
    return found


def _quant_row(weights: str, tier: str, ratio: int, figures: dict, peer: dict | None) -> dict:
    mine, bf16 = figures[weights, tier, ratio], figures.get(("bf16", tier, ratio)) or {}
    keys = ("decode_tok_s", "decode_tok_s_min", "decode_tok_s_max", "prefill_first_tok_s", "prefill_first_tok_s_min",
            "prefill_first_tok_s_max", "bytes_per_token", "expert_bytes", "efficiency", "efficiency_min",
            "efficiency_max", "bound", "bound_gb_s", "peak_device_bytes", "error")
    row = {"weights": weights, "tier": tier, "ratio": ratio, **{k: mine.get(k) for k in keys},
           "bytes_vs_bf16": quotient(mine.get("bytes_per_token"), bf16.get("bytes_per_token")),
           "decode_vs_bf16": quotient(mine.get("decode_tok_s"), bf16.get("decode_tok_s")),
           "gguf_type": peer["gguf_type"] if peer else None, "ncmoe": peer["ncmoe"] if peer else None,
           "llamacpp_peak_device_bytes": peer["llamacpp_peak_device_bytes"] if peer else None,
           **{k: peer[k] if peer else None for k in ("decode_vs_llamacpp", "prefill_vs_llamacpp")}}
    row["peak_vs_llamacpp"] = quotient(row["peak_device_bytes"], row["llamacpp_peak_device_bytes"])
    row["targets"] = _quant_targets(row, peer)
    return row


def quant_rows(report: dict) -> list[dict]:
    """Per weights, tier and ratio (every ratio either table measured), our figures beside bf16's at the same
    ratio and tier and beside llama.cpp's GGUF of the same width at the same -ncmoe; none for bf16 alone."""
    if all(w == "bf16" for w in report["weights"]):
        return []
    plan, pairs = report.get("offload") or {}, report.get("side_by_side") or {}
    host = sorted(set(plan.get("ratios", [])) | set(pairs.get("ratios", [])), reverse=True)
    places = [("host", r) for r in host] + [("disk", r) for r in sorted(plan.get("disk_ratios", []))]
    figures = {(w, tier, r): _figures(report, w, tier, r) for w in report["weights"] for tier, r in places}
    peers = {(r["weights"], r["ratio"]): r for r in report["rows"] if r["variant"] == "default"}
    return [_quant_row(w, tier, r, figures, peers.get((w, r)) if tier == "host" else None)
            for w in report["weights"] for tier, r in places]


def targets(report: dict) -> list[dict]:
    found = []

    def add(table: str, name: str, value, threshold, met=None, direction="min"):
        if met is None:
            met = meets(value, direction, threshold)
        found.append({"table": table, "target": name, "value": value, "threshold": threshold, "met": met,
                      "direction": direction})

    for row in report["rows"]:
        if row["weights"] == "bf16" and row["variant"] == "default" and row["ratio"] in TARGET_RATIOS:
            for key, threshold in SIDE_BY_SIDE_TARGETS.items():
                add("side_by_side", f"ratio{row['ratio']}_{key}", row[key], threshold)
            add("side_by_side", f"ratio{row['ratio']}_peak_device_bytes_vs_llamacpp",
                quotient(row["ours_peak_device_bytes"], row["llamacpp_peak_device_bytes"]), 1.0,
                row["targets_met"]["memory"], "max")
    bf16 = [r for r in report["offload_rows"] if r["weights"] == "bf16"]  # issue 4's targets are bf16's
    offload = {(r["tier"], r["ratio"]): r for r in bf16}
    r100, r25 = offload.get(("host", 100), {}), offload.get(("host", 25), {})
    accelerate = report["baseline_rows"].get("accelerate", {}).get("decode_tok_s")
    if offload:
        add("offload", "ratio100_decode_tok_s", r100.get("decode_tok_s"), OFFLOAD_TARGETS["ratio100_decode_tok_s"])
        add("offload", "ratio100_prefill_first_tok_s", r100.get("prefill_first_tok_s"),
            OFFLOAD_TARGETS["ratio100_prefill_first_tok_s"])
        add("offload", "ratio25_prefill_first_tok_s", r25.get("prefill_first_tok_s"),
            OFFLOAD_TARGETS["ratio25_prefill_first_tok_s"])
        add("offload", "ratio25_decode_vs_accelerate", quotient(r25.get("decode_tok_s"), accelerate),
            OFFLOAD_TARGETS["ratio25_decode_vs_accelerate"])
    for row in bf16:
        if row.get("bound_gb_s") is not None:
            add("offload", f"efficiency_ratio{row['ratio']}_{row['tier']}", row.get("efficiency"),
                OFFLOAD_TARGETS["efficiency"])
    for row in report["quant_rows"]:
        for target in row["targets"]:
            add("quantized", f"{row['weights']}_ratio{row['ratio']}_{target['name']}", target["value"],
                target["threshold"], target["met"], target["direction"])
    return found


def derive(report: dict) -> dict:
    """Recompute rows, offload_rows, baseline_rows, quant_rows and targets from the raw entries of `report`, in
    place."""
    with_weights(report)
    report["rows"] = side_by_side_rows(report) if report.get("model") else []
    report["offload_rows"] = offload_rows(report)
    report["baseline_rows"] = baseline_rows(report)
    report["quant_rows"] = quant_rows(report)
    report["targets"] = targets(report)
    report["targets_rule"] = ("value >= threshold (<= where marked); side by side: decode and first-seen prefill "
                              "against llama.cpp at its flags, whole-process NVML peaks ours <= llama.cpp's; offload: "
                              "issue 4's thresholds (bf16), prefill judged first-seen, efficiency the roofline; "
                              "quantized: issue 17's, host tier")
    return report
