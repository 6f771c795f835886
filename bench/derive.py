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
"""

from __future__ import annotations

from bench.sides import summary

GB = 1e9
SIDE_BY_SIDE_TARGETS = {"decode_vs_llamacpp": 1.2, "prefill_vs_llamacpp": 3.0}  # and memory <= llama.cpp's
TARGET_RATIOS = (0, 25, 50, 75)
OFFLOAD_TARGETS = {"ratio100_decode_tok_s": 550, "ratio100_prefill_first_tok_s": 10000, "efficiency": 0.8,
                   "ratio25_prefill_first_tok_s": 380, "ratio25_decode_vs_accelerate": 50}


def ncmoe_for(ratio: int, layers: int) -> int:
    """llama.cpp's -ncmoe (experts of N whole layers on the CPU) that keeps the share `ratio` on the GPU."""
    return round(layers * (100 - ratio) / 100)


def spread(name: str, stats: dict | None) -> dict:
    """{name: median, name_min: min, name_max: max} of a summary (Nones where there is none)."""
    stats = stats or {}
    return {name: stats.get("median"), f"{name}_min": stats.get("min"), f"{name}_max": stats.get("max")}


def quotient(value, other):
    return value / other if value is not None and other else None


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
    return {"pcie": (counters["host_bytes"] + counters["in_place_bytes"]) / steps,
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
    plan, layers = report.get("side_by_side") or {}, report["model"]["moe_layers"]
    rows = []
    for variant in plan.get("variants", []):
        for ratio in plan.get("ratios", []):
            run, ncmoe = find(report["runs"], variant=variant, ratio=ratio), ncmoe_for(ratio, layers)
            theirs = find(report["llamacpp"], ncmoe=ncmoe) or {"error": "not measured"}
            ours = run_figures(run, _bandwidth(report, run)) if run else {"error": "not measured"}
            row = {"ratio": ratio, "ncmoe": ncmoe, "variant": variant,
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
                "decode": None if row["decode_vs_llamacpp"] is None
                else row["decode_vs_llamacpp"] >= SIDE_BY_SIDE_TARGETS["decode_vs_llamacpp"],
                "prefill": None if row["prefill_vs_llamacpp"] is None
                else row["prefill_vs_llamacpp"] >= SIDE_BY_SIDE_TARGETS["prefill_vs_llamacpp"],
                "memory": None if None in memory else memory[0] <= memory[1]}
            rows.append(row)
    return rows


def offload_rows(report: dict) -> list[dict]:
    plan = report.get("offload") or {}
    rows = []
    for variant, tier, ratios in (("default", "host", plan.get("ratios", [])),
                                  ("disk", "disk", plan.get("disk_ratios", []))):
        for ratio in ratios:
            run = find(report["runs"], variant=variant, ratio=ratio)
            figures = run_figures(run, _bandwidth(report, run)) if run else {"error": "not measured"}
            rows.append({"ratio": ratio, "tier": tier, "variant": variant, "routing": report.get("routing"),
                         **figures})
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


def targets(report: dict) -> list[dict]:
    found = []

    def add(table: str, name: str, value, threshold, met=None):
        if met is None and value is not None:
            met = value >= threshold
        found.append({"table": table, "target": name, "value": value, "threshold": threshold, "met": met})

    for row in report["rows"]:
        if row["variant"] == "default" and row["ratio"] in TARGET_RATIOS:
            for key, threshold in SIDE_BY_SIDE_TARGETS.items():
                add("side_by_side", f"ratio{row['ratio']}_{key}", row[key], threshold)
            add("side_by_side", f"ratio{row['ratio']}_peak_device_bytes_vs_llamacpp",
                quotient(row["ours_peak_device_bytes"], row["llamacpp_peak_device_bytes"]), 1.0,
                row["targets_met"]["memory"])
    offload = {(r["tier"], r["ratio"]): r for r in report["offload_rows"]}
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
    for row in report["offload_rows"]:
        if row.get("bound_gb_s") is not None:
            add("offload", f"efficiency_ratio{row['ratio']}_{row['tier']}", row.get("efficiency"),
                OFFLOAD_TARGETS["efficiency"])
    return found


def derive(report: dict) -> dict:
    """Recompute rows, offload_rows, baseline_rows and targets from the raw entries of `report`, in place."""
    report["rows"] = side_by_side_rows(report) if report.get("model") else []
    report["offload_rows"] = offload_rows(report)
    report["baseline_rows"] = baseline_rows(report)
    report["targets"] = targets(report)
    report["targets_rule"] = ("value >= threshold; side by side: decode and first-seen prefill against llama.cpp "
                              "at its flags, whole-process NVML peaks ours <= llama.cpp's; offload: issue 4's "
                              "thresholds, prefill judged first-seen, efficiency the roofline")
    return report
