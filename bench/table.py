"""The canonical GPU tables, rendered from the harness's raw report: `python -m bench.table REPORT [--write FILE]`.

Why: a table typed by hand drifts from its file. Every figure here is a field of the report (bench/derive.py
stored it there), printed through one of FORMATS, so tests can check that no number is invented; --write
replaces what lies between the two markers in FILE (bench/RESULTS.md) and nothing else. The report is derived
again before it is rendered (derive is a pure function of its raw entries), so one written before a field existed
renders too.

A report with int4/int8 weights (issue 17) gets one more table, "Quantized experts": per weights and ratio our
speeds, bytes per token and their ratio to bf16's at the same ratio, efficiency against the PCIe bound of the bytes
moved, peak memory, and the side by side with llama.cpp's GGUF of the same width, each row's issue-17 targets marked.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

from bench.derive import derive

BEGIN, END = "<!-- harness-table:begin -->", "<!-- harness-table:end -->"
FORMATS = {  # every number printed goes through one of these
    "tok_s": lambda v: f"{v:,.0f}" if v >= 1000 else f"{v:.1f}",
    "x": lambda v: f"{v:.2f}x",
    "frac": lambda v: f"{v:.2f}",
    "gb": lambda v: f"{v / 1e9:.2f}",
    "mb": lambda v: f"{v / 1e6:.1f}",
    "ms": lambda v: f"{v * 1000:.1f}",
    "gb_s": lambda v: f"{v:.2f}",
    "s": lambda v: f"{v:.1f}",
    "int": lambda v: f"{v}",
    "bytes": lambda v: f"{v:,}",
}


def fig(value, kind: str) -> str:
    return "-" if value is None else FORMATS[kind](value)


def ranged(row: dict, name: str, kind: str) -> str:
    """median (min-max) of the row's `name`, `name_min`, `name_max`."""
    if row.get(name) is None:
        return "-"
    return f"{fig(row[name], kind)} ({fig(row.get(name + '_min'), kind)}-{fig(row.get(name + '_max'), kind)})"


def met(flag) -> str:
    return {True: "yes", False: "**no**", None: "-"}[flag]


def at_most(target: dict) -> str:
    """How a target reads its threshold: '<=' for a ceiling, '>=' for a floor."""
    return "<=" if target.get("direction") == "max" else ">="


def calls(report: dict) -> list[str]:
    lines = []
    for call in report["calls"]:
        state = {True: "dirty", False: "clean", None: "dirty state unknown"}[call.get("dirty")]
        commit = f"`{call['commit'][:12]}` ({state}, from {call['commit_source']})" if call.get("commit") \
            else "no commit recorded"
        versions, gpu = call["versions"], call["machine"].get("gpu") or "no GPU"
        lines.append(f"- {call['date_utc']}: commit {commit}, source digest "
                     f"`{call['source_digest']}`; {gpu}, {fig(call['machine']['cpu_count'], 'int')} CPUs; torch "
                     f"{versions['torch']}, transformers {versions['transformers']}")
    return lines


def _short(command: str) -> str:
    """A recorded command line with every path cut to its last part."""
    return " ".join(os.path.basename(word) if "/" in word else word for word in shlex.split(command))


def side_by_side(report: dict) -> list[str]:
    flags = report.get("llamacpp_flags") or {}
    peer = next((e for e in report["llamacpp"] if e.get("command")), None)
    lines = ["### Side by side with llama.cpp", "",
             f"llama.cpp as run (its first configuration): `{_short(peer['command'])}`; flags {flags.get('how')}; "
             f"build {peer.get('build_commit')}, {fig(peer.get('n_threads'), 'int')} threads." if peer
             else "llama.cpp: not run in this report.",
             "Prefill vs llama.cpp is our first-seen prefill (a prompt length the pipeline had not run) over "
             "llama.cpp's; peaks are whole processes by NVML. \"first\": the side that ran first at that ratio.", "",
             "| weights / GGUF | ratio / ncmoe | variant | first | decode tok/s: ours / llama.cpp | decode vs "
             "llama.cpp | prefill tok/s: ours first-seen / ours replayed / llama.cpp | prefill vs llama.cpp | peak "
             "GB: ours / llama.cpp | decode hit rate | targets met: decode / prefill / memory |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        error = row.get("ours_error") or row.get("llamacpp_error")
        target = row["targets_met"]
        lines.append(
            f"| {row['weights']} / {row['gguf_type']} | {fig(row['ratio'], 'int')} / {fig(row['ncmoe'], 'int')} | "
            f"{row['variant']} | {row['first'] or '-'} | "
            f"{ranged(row, 'ours_decode_tok_s', 'tok_s')} / {ranged(row, 'llamacpp_decode_tok_s', 'tok_s')} | "
            f"{fig(row['decode_vs_llamacpp'], 'x')} | {ranged(row, 'ours_prefill_first_tok_s', 'tok_s')} / "
            f"{ranged(row, 'ours_prefill_tok_s', 'tok_s')} / {ranged(row, 'llamacpp_prefill_tok_s', 'tok_s')} | "
            f"{fig(row['prefill_vs_llamacpp'], 'x')} | {fig(row['ours_peak_device_bytes'], 'gb')} / "
            f"{fig(row['llamacpp_peak_device_bytes'], 'gb')} | {fig(row['hit_rate'], 'frac')} | "
            f"{met(target['decode'])} / {met(target['prefill'])} / {met(target['memory'])} |"
            + (f" {error}" if error else ""))
    return lines


def _quant_targets(row: dict) -> str:
    marks = [f"{t['name']} {at_most(t)} {fig(t['threshold'], 'frac')}: {met(t['met'])}" for t in row["targets"]]
    return "; ".join(marks) or "-"


def quantizations(report: dict) -> list[str]:
    """How each quantized checkpoint was written, from the call that wrote it."""
    rule = report["quantization"]
    lines = []
    for call in report["calls"]:
        for weights, done in (call.get("quantization") or {}).items():
            if done.get("quantized"):
                how = "FP8" if weights == "fp8" else f"{rule['method']}, group {fig(rule['group_size'], 'int')}"
                lines.append(f"- {weights}: `{_short(done['command'])}` ({how}) on {call['date_utc']}: "
                             f"{fig(done['seconds'], 's')} s, peak RSS {fig(done['peak_rss_bytes'], 'gb')} GB; "
                             f"{done['summary'].split(': ', 1)[-1]}")
    return lines


def quantized(report: dict) -> list[str]:
    models = report.get("models") or {}
    held = {row["weights"]: row["expert_bytes"] for row in report["quant_rows"] if row.get("expert_bytes")}
    sizes = ", ".join(f"{w} {fig(m['expert_bytes'], 'bytes')} / {fig(held.get(w), 'bytes')}"
                      for w, m in models.items())
    lines = ["### Quantized experts", "",
             "Our quantized checkpoints written from the bf16 model (int4/int8 by `moe-offload quantize`, fp8 by "
             "bench/fp8_checkpoint.py); bytes per expert in the checkpoint / as the engine held them (bf16 in its "
             f"compute dtype on that device): {sizes}. MB per token: bytes a decoded token moved (PCIe, CPU, disk), as "
             "the engine counted them (quantized bytes for int4/int8/fp8); efficiency: against the bound of those "
             "bytes (the offload table's rule); llama.cpp ran the GGUF of the same width at the same -ncmoe (Q8_0 for "
             "fp8).", *quantizations(report), "",
             "| weights | ratio, tier | decode tok/s | prefill tok/s first-seen | MB per token | bytes vs bf16 | "
             "decode vs bf16 | efficiency | peak GB: ours / llama.cpp | llama.cpp GGUF / ncmoe | decode / prefill vs "
             "llama.cpp | issue 17 targets |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["quant_rows"]:
        lines.append(
            f"| {row['weights']} | {fig(row['ratio'], 'int')}, {row['tier']} | "
            f"{ranged(row, 'decode_tok_s', 'tok_s')} | {ranged(row, 'prefill_first_tok_s', 'tok_s')} | "
            f"{fig(row['bytes_per_token'], 'mb')} | {fig(row['bytes_vs_bf16'], 'x')} | "
            f"{fig(row['decode_vs_bf16'], 'x')} | {ranged(row, 'efficiency', 'frac')} | "
            f"{fig(row['peak_device_bytes'], 'gb')} / {fig(row['llamacpp_peak_device_bytes'], 'gb')} | "
            f"{row['gguf_type'] or '-'} / {fig(row['ncmoe'], 'int')} | {fig(row['decode_vs_llamacpp'], 'x')} / "
            f"{fig(row['prefill_vs_llamacpp'], 'x')} | {_quant_targets(row)} |"
            + (f" {row['error']}" if row.get("error") else ""))
    return lines


def offload(report: dict) -> list[str]:
    lines = ["### Offload table", "",
             "Efficiency: the bytes a decoded token moved over its bounding link per second, over that link's "
             "measured rate (the bound column); peaks: whole process by NVML / the caching allocator's.", "",
             "| weights | ratio, tier | decode tok/s | prefill tok/s: first-seen / replayed | TTFT ms | decode hit "
             "rate | MB per token: PCIe / CPU / disk | GB/s: achieved / bound | bound | efficiency | peak GB: NVML / "
             "allocator | load s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["offload_rows"]:
        lines.append(
            f"| {row['weights']} | {fig(row['ratio'], 'int')}, {row['tier']} | "
            f"{ranged(row, 'decode_tok_s', 'tok_s')} | "
            f"{ranged(row, 'prefill_first_tok_s', 'tok_s')} / {ranged(row, 'prefill_tok_s', 'tok_s')} | "
            f"{fig(row.get('ttft_s'), 'ms')} | {fig(row.get('hit_rate'), 'frac')} | "
            f"{fig(row.get('pcie_bytes_per_token'), 'mb')} / {fig(row.get('cpu_bytes_per_token'), 'mb')} / "
            f"{fig(row.get('disk_bytes_per_token'), 'mb')} | {fig(row.get('achieved_gb_s'), 'gb_s')} / "
            f"{fig(row.get('bound_gb_s'), 'gb_s')} | {row.get('bound') or '-'} | {ranged(row, 'efficiency', 'frac')} "
            f"| {fig(row.get('peak_device_bytes'), 'gb')} / {fig(row.get('allocator_peak_device_bytes'), 'gb')} | "
            f"{fig(row.get('load_s'), 's')} |" + (f" {row['error']}" if row.get("error") else ""))
    lines += ["", "Tiers: host = the default configuration (MOE_OFFLOAD_RATIO only); disk = the same with "
                  "MOE_HOST_CACHE=0, the checkpoint's page cache dropped before the load and every generation."]
    for call in report["calls"]:
        bw = call.get("bandwidth") or {}
        if bw:
            lines.append(f"Bandwidths measured {call['date_utc']}: pinned host-to-device "
                         f"{fig(bw.get('h2d_pinned_9mb_gb_s'), 'gb_s')} GB/s in one-expert pieces, "
                         f"{fig(bw.get('h2d_pinned_1gb_gb_s'), 'gb_s')} as one copy; DRAM read "
                         f"{fig(bw.get('dram_read_gb_s'), 'gb_s')} GB/s ({bw.get('dram_read_rule', '-')}); cold "
                         f"O_DIRECT disk reads {fig(bw.get('disk_odirect_gb_s'), 'gb_s')} GB/s on one thread, "
                         f"{fig(bw.get('disk_odirect_parallel_gb_s'), 'gb_s')} on "
                         f"{fig(bw.get('disk_parallel_threads'), 'int')}.")
    if report["baseline_rows"] and report["weights"] != [report["baselines_weights"]]:
        lines.append(f"Baselines ran the {report['baselines_weights']} checkpoint only (transformers' and accelerate's "
                     "own loaders, as issue 4 set them).")
    for kind, label in (("transformers", "transformers all on the device"),
                        ("accelerate", "accelerate device_map=\"auto\"")):
        row = report["baseline_rows"].get(kind)
        if row:
            lines.append(f"Baseline, {label}: decode {ranged(row, 'decode_tok_s', 'tok_s')} tok/s, prefill "
                         f"{ranged(row, 'prefill_tok_s', 'tok_s')} tok/s over {fig(row['repeats'], 'int')} warmed "
                         f"runs of {fig(row['new_tokens'], 'int')} tokens, peak {fig(row['peak_device_bytes'], 'gb')}"
                         f" GB (NVML)" + (f", device memory given {fig(row['gpu_bytes_budget'], 'gb')} GB"
                                           if row.get("gpu_bytes_budget") else "")
                         + (f"; {row['error']}" if row.get("error") else "") + ".")
    return lines


def choices(report: dict) -> list[str]:
    lines = ["What the engine chose at load, per configuration:"]
    for run in sorted(report["runs"], key=lambda r: (r["weights"], r["variant"], r["ratio"])):
        if run.get("choices"):
            said = "; ".join(f"{c['name']}={c['value']} ({c['why']})" for c in run["choices"])
            lines.append(f"- {run['weights']} {run['variant']} ratio {fig(run['ratio'], 'int')}: {said}")
    return lines if len(lines) > 1 else []


def targets(report: dict) -> list[str]:
    missed = [t for t in report["targets"] if t["met"] is False]
    lines = [f"Targets ({report['targets_rule']}): "
             + ("missed:" if missed else "none missed among those the file could judge.")]
    lines += [f"- {t['table']} {t['target']} = {fig(t['value'], 'frac')} (threshold {at_most(t)} "
              f"{fig(t['threshold'], 'frac')})" for t in missed]
    return lines


def render(report: dict, source: str) -> str:
    work = report["workload"]
    lines = [f"Rendered by `python -m bench.table {source}` from that file; regenerate, do not edit.", "",
             "Calls:", *calls(report), "",
             f"Workload: {work['rule']}; prompts of {fig(work['prompt_tokens'], 'int')} tokens, "
             f"{fig(work['decode_tokens'], 'int')} decode tokens ({fig(work['disk_decode_tokens'], 'int')} on the disk "
             f"tier), {fig(work['repeats'], 'int')} repeats per configuration, each in its own process; every figure "
             "is median (min-max).",
             f"Routing of every routing-dependent number (hit rates, bytes per token, the disk tier): "
             f"{report['routing']}.", ""]
    if report["rows"]:
        lines += side_by_side(report) + [""]
    if report["quant_rows"]:
        lines += quantized(report) + [""]
    if report["offload_rows"]:
        lines += offload(report) + [""]
    lines += choices(report) + [""] + targets(report)
    return "\n".join(lines) + "\n"


def replace_between_markers(text: str, body: str, path: str) -> str:
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise SystemExit(f"{path}: needs one {BEGIN} line followed by one {END} line")
    head, rest = text.split(BEGIN)
    return f"{head}{BEGIN}\n{body}{END}{rest.split(END, 1)[1]}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("report", help="a bench.harness JSON report")
    parser.add_argument("--write", default=None, help="replace the text between the markers in this file")
    args = parser.parse_args(argv)
    try:
        with open(args.report) as handle:
            report = json.load(handle)
    except (OSError, json.JSONDecodeError) as err:
        parser.error(f"cannot read {args.report}: {err}")
    if not str(report.get("schema", "")).startswith("moe-offload/harness/"):
        parser.error(f"{args.report} is not a bench.harness report (schema {report.get('schema')!r})")
    body = render(derive(report), args.report)
    if args.write is None:
        sys.stdout.write(body)
        return 0
    with open(args.write) as handle:
        text = handle.read()
    with open(args.write, "w") as handle:
        handle.write(replace_between_markers(text, body, args.write))
    return 0


if __name__ == "__main__":
    sys.exit(main())
