"""The one benchmark harness behind every GPU table (issue 22): the offload table and the side by side with llama.cpp,
from the same measurements of the same code, into one JSON report; `python -m bench.table REPORT` renders it.

Why one: the two tables used to come from two scripts that measured different code in different ways (same prompt
and tokens every repeat, a mean on one side and a median on the other, prefill replayed from graphs, allocator
peaks beside NVML peaks, unwarmed baselines) and recorded no commit.

What it runs, in this order (--tables and --phases pick; results written after every configuration):
  gen        the random benchmark model (bench/common.py; 16.2 GB, written on the device), unless already there;
  quant      for each --weights int4/int8: that model quantized by the project's own `moe-offload quantize` (rtn,
             group 128; tiny: group 32, which divides its widths) into MODEL-int4 / MODEL-int8, and for fp8 written
             as Qwen3-30B-A3B-FP8 is (bench/fp8_checkpoint.py: 128 x 128 blocks) into MODEL-fp8, each in a process of
             its own, timed with its peak RSS (they stream: far below the model's size), unless already there;
  bw         pinned host->device and the CPU's DRAM read rate (bench/bandwidth.py), each call: the roofline's bounds;
  side_by_side  per --ratios, our configurations (the variant "default": MOE_OFFLOAD_RATIO and nothing else, what a
             user gets; then each --variants entry) and llama-bench -ngl 99 -ncmoe N back to back, alternating which
             side goes first from one ratio to the next;
  offload    the default configuration at each --offload-ratios not measured above; the baselines (transformers
             all on the device, accelerate device_map="auto"); then cold O_DIRECT disk reads and the disk tier at
             --disk-ratios (variant "disk": MOE_HOST_CACHE=0, the disk tier by definition).
Every configuration of ours runs once per --weights (bf16, int4, int8, fp8: one report holds them side by side,
each run and row says its weights); the baselines run the bf16 checkpoint only. llama.cpp's side pairs each weights
with the GGUF of the same width: --gguf is the BF16 one, and int4 / int8 take Q4_0 / Q8_0 GGUFs beside it (gguf_for's
names, made from it by llama-quantize: bench/h200_run.sh does), fp8 the Q8_0 one (llama.cpp has no FP8 type), at
the same -ncmoe.
Every configuration is a process of its own (bench/worker.py, bench/sides.py), its device memory polled from outside
by NVML as llama.cpp's are. Ours measures first-seen and replayed prefill and decodes fresh random tokens every
repeat (bench/worker.py says how); every figure is a median with min and max over --repeats (>= 3).

Resuming: with --merge REPORT, what that report measured without error is kept and not run again (a side-by-side
ratio only with both of its sides), so a call cut short by --budget-s or the device's 10 minutes is finished by
the same command with --merge. Each call's commit, machine and bandwidths are kept in `calls`.

Usage, from the repository root:
  python -m bench.harness --gguf G --llama-bench B --out R.json            # both tables (H200: bench/h200_run.sh)
  python -m bench.harness --tables offload --offload-ratios 100 --out R.json --budget-s 200
  python -m bench.harness --merge R.json --out R.json ...                  # finish what a cut-short call left
  python -m bench.harness --phases gen --model-dir DIR --out /tmp/gen.json # the model only
  python -m bench.harness --weights bf16,int4,int8 --gguf G --llama-bench B --out R.json   # issue 17's comparison
  python -m bench.harness --tiny --out /tmp/tiny.json                      # the whole flow on the CPU, < 1 min
  python -m bench.harness --tiny --weights bf16,int4,int8 --out /tmp/x.json   # int4/int8 too, ~2 min
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import traceback

import torch

from bench import bandwidth, provenance, sides
from bench.common import (MODEL_ROOT, RESULTS, SPECS, fp8_model, generate_model, log, model_facts, quantize_model,
                          quantized_dir, shard_files, utc_now)
from bench.derive import GGUF_TYPES, WEIGHTS, derive, find, ncmoe_for, with_weights
from bench.worker import WORKLOADS
from moe_offload.tools.environment import write_report

SCHEMA = "moe-offload/harness/1"
TABLES = ("side_by_side", "offload")
PHASES = ("gen", "quant", "bw", "runs", "baselines")
BITS = {"int4": 4, "int8": 8}
QUANTIZE = {"full": {"method": "rtn", "group_size": 128},
            "tiny": {"method": "rtn", "group_size": 32}}  # the tiny model's widths (64, 32) hold no group of 128
RESERVED = {"default": {}, "disk": {"MOE_HOST_CACHE": 0}}  # variants the harness defines
MIN_S = {"ours": 45, "disk": 60, "llamacpp": 30, "transformers": 45, "accelerate": 90, "disk_bw": 10}
CAP_S = {"ours": 200, "disk": 200, "llamacpp": 200, "transformers": 150, "accelerate": 240, "disk_bw": 20}
DEFAULTS = {  # per mode, for the options left unset
    "full": dict(prompt_len=128, decode_tokens=32, disk_decode_tokens=64, ratios="0,25,50,75",
                 offload_ratios="100,50,25,0", disk_ratios="25"),
    "tiny": dict(prompt_len=32, decode_tokens=8, disk_decode_tokens=8, ratios="0,50", offload_ratios="100,50,0",
                 disk_ratios="50"),
}
ROUTING = {
    "full": "random-weight routing of the random benchmark model: its layers 2-11 send nearly every decode step to "
            "the same 10-15 experts whatever the token, so LRU hits far more than on a trained model's routing "
            "(bench/RESULTS.md, 'Cache policy on the benchmark workload'); fresh random tokens each repeat",
    "tiny": "random-weight routing of the tiny random model; fresh random tokens each repeat",
}
TRACE_ROUTING = ("learned routing: every MoE layer's experts replaced by those the trained 128-expert top-8 model "
                 "chose on held-out text, replayed from its report traces (bench/routing_replay.py; layer l takes "
                 "trained layer l mod 8, ids mod the layer's experts), fresh stream positions each generation; the "
                 "baselines and llama.cpp route with the model's own random routers")


def _ints(text: str, name: str, parser) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        parser.error(f"{name} takes comma-separated integers, got {text!r}")
    if any(not 0 <= v <= 100 for v in values):
        parser.error(f"{name} are MOE_OFFLOAD_RATIO values 0-100, got {text!r}")
    return values


def _names(text: str, allowed: tuple[str, ...], name: str, parser) -> list[str]:
    chosen = [x for x in text.split(",") if x]
    unknown = sorted(set(chosen) - set(allowed))
    if unknown:
        parser.error(f"unknown {name} {unknown}; choose from {','.join(allowed)}")
    return chosen


def _variants(text: str, parser) -> dict[str, dict]:
    try:
        extra = json.loads(text)
    except json.JSONDecodeError as err:
        parser.error(f"--variants is not JSON: {err.msg}")
    if not isinstance(extra, dict) or not all(isinstance(v, dict) for v in extra.values()):
        parser.error('--variants takes a JSON object {name: {PROPERTY: value}}, e.g. {"gpu_only": '
                     '{"MOE_CPU_EXPERTS": "off"}}')
    for name in set(extra) & set(RESERVED):
        if extra[name] != RESERVED[name]:
            parser.error(f"variant {name!r} is the harness's own ({RESERVED[name]}): name yours otherwise")
    return {"default": {}, **{k: v for k, v in extra.items() if k not in RESERVED}}


def gguf_for(gguf: str, weights: str) -> str:
    """llama.cpp's model for `weights`, from the BF16 GGUF given: itself for bf16, else its Q4_0 / Q8_0 sibling
    (MODEL.gguf -> MODEL-Q4_0.gguf), the names bench/h200_run.sh gives llama-quantize's outputs."""
    return gguf if weights == "bf16" else f"{gguf.removesuffix('.gguf')}-{GGUF_TYPES[weights]}.gguf"


def _swept_model(sweep: dict) -> str:
    """The GGUF a run_llama_bench sweep ran on (its rows' -m), by file name: the flags it found serve every GGUF."""
    words = shlex.split(((sweep.get("sweep") or [{}])[0]).get("command") or "")
    return os.path.basename(words[words.index("-m") + 1]) if "-m" in words[:-1] else "a GGUF it does not name"


def _read_json(path: str, flag: str):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError) as err:
        sys.exit(f"{flag} {path}: {err}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="JSON report (default bench/results/<date>-<h200|cpu-tiny>-"
                                                    "harness.json)")
    parser.add_argument("--merge", default=None, help="an earlier report to finish: what it measured is kept")
    parser.add_argument("--model-dir", default=None, help="the random model (default /tmp/moe-offload-bench/<full|"
                                                          "tiny>)")
    parser.add_argument("--weights", default="bf16", help=f"our checkpoints, a subset of {','.join(WEIGHTS)}: "
                        "int4/int8 are the model quantized by `moe-offload quantize`, fp8 written by "
                        "bench/fp8_checkpoint.py (the quant phase)")
    parser.add_argument("--tables", default=",".join(TABLES), help=f"subset of {','.join(TABLES)}")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"subset of {','.join(PHASES)}")
    parser.add_argument("--ratios", help="side-by-side ratios (llama.cpp: the -ncmoe that keeps the same share on "
                                         "the GPU); default 0,25,50,75 (tiny 0,50)")
    parser.add_argument("--offload-ratios", help="offload table, host tier; default 100,50,25,0 (tiny 100,50,0)")
    parser.add_argument("--disk-ratios", help="offload table, disk tier ('' for none); default 25 (tiny 50)")
    parser.add_argument("--variants", default="{}", help="JSON {name: properties}: more of our configurations for "
                                                         "the side by side, beside 'default' (diagnostic switches "
                                                         "such as MOE_CACHE_POLICY too: set in the worker's "
                                                         "environment)")
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="random",
                        help="what drives prompts and decode steps (bench/worker.py): random tokens and the model's "
                             "own routing, or (trace) the trained 128-expert model's recorded routing replayed")
    parser.add_argument("--prompt-len", type=int, help="as llama-bench -p; default 128 (tiny 32)")
    parser.add_argument("--decode-tokens", type=int, help="as llama-bench -n; default 32 (tiny 8)")
    parser.add_argument("--disk-decode-tokens", type=int, help="default 64 (tiny 8): the disk tier's misses come in "
                                                               "bursts on few steps, so more steps average them")
    parser.add_argument("--accelerate-tokens", type=int, default=4, help="accelerate decodes at ~0.5 tok/s")
    parser.add_argument("--repeats", type=int, default=3, help="measured generations per configuration, and "
                                                               "llama-bench -r (at least 3)")
    parser.add_argument("--seed", type=int, default=0, help="of the random tokens (the same for every config)")
    parser.add_argument("--gguf", default=None, help="the model as a bf16 GGUF (llama.cpp's side)")
    parser.add_argument("--llama-bench", default=None, help="llama-bench; without it the side by side is ours only")
    parser.add_argument("--llamacpp-flags", default="", help="more llama-bench arguments, e.g. '-t 16 -fa 1'")
    parser.add_argument("--llamacpp-sweep", default=None, help="a report of `python -m bench.llamacpp.run_llama_bench "
                        "--sweep-ncmoe N`: its best flags are used (instead of --llamacpp-flags) and its rows kept")
    parser.add_argument("--baseline-experts", default="grouped_mm", help="transformers' experts_implementation")
    parser.add_argument("--budget-s", type=float, default=540, help="wall-clock budget of this call")
    parser.add_argument("--tiny", action="store_true", help="the whole flow on the CPU with the tiny model")
    parser.add_argument("--layers", type=int, default=None, help="gen: the model's layer count (default 12; tiny 2)")
    args = parser.parse_args(argv)
    mode = "tiny" if args.tiny else "full"
    for name, value in DEFAULTS[mode].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.tables = _names(args.tables, TABLES, "tables", parser)
    args.phases = _names(args.phases, PHASES, "phases", parser)
    args.weights = list(dict.fromkeys(_names(args.weights, WEIGHTS, "weights", parser)))
    if not args.weights:
        parser.error(f"--weights names none of {','.join(WEIGHTS)}")
    args.ratios = _ints(args.ratios, "--ratios", parser)
    args.offload_ratios = _ints(args.offload_ratios, "--offload-ratios", parser)
    args.disk_ratios = _ints(args.disk_ratios, "--disk-ratios", parser)
    args.variants = _variants(args.variants, parser)
    args.llamacpp_flags = shlex.split(args.llamacpp_flags)
    if args.repeats < 3:
        parser.error("--repeats must be at least 3: every figure is a median with min and max")
    if min(args.prompt_len, args.decode_tokens, args.disk_decode_tokens, args.accelerate_tokens) < 2:
        parser.error("--prompt-len and the token counts must be at least 2")
    if bool(args.gguf) != bool(args.llama_bench):
        parser.error("--gguf and --llama-bench go together (llama.cpp's side needs both)")
    for path in (args.gguf, args.llama_bench, args.merge):
        if path and not os.path.exists(path):
            parser.error(f"no such file: {path}")
    for weights in args.weights if args.gguf else ():
        if not os.path.exists(gguf_for(args.gguf, weights)):
            parser.error(f"no such file: {gguf_for(args.gguf, weights)} (llama.cpp's {GGUF_TYPES[weights]} peer of "
                         f"--weights {weights}: llama-quantize makes it from --gguf, as bench/h200_run.sh does)")
    args.mode, args.device = mode, "cpu" if args.tiny else "cuda"
    args.model_dir = args.model_dir or os.path.join(MODEL_ROOT, mode)
    args.out = args.out or os.path.join(RESULTS, f"{utc_now()[:10]}-{'cpu-tiny' if args.tiny else 'h200'}-harness.json")
    return args


# ----------------------------------------------------------------------------------------------- the report


def _workload(args) -> dict:
    return {"name": args.workload, "seed": args.seed, "prompt_tokens": args.prompt_len,
            "decode_tokens": args.decode_tokens, "disk_decode_tokens": args.disk_decode_tokens,
            "accelerate_tokens": args.accelerate_tokens,
            "repeats": args.repeats, "rule": "fresh random prompt ids and fed decode tokens every generation "
                                             "(bench/worker.py RandomWorkload; trace: routed by TraceWorkload's "
                                             "replay); llama-bench draws its own"}


def _union(old: list, new: list) -> list:
    return sorted(set(old) | set(new))


def new_report(args, call: dict) -> dict:
    """This call's report: the --merge report with this call added, or a fresh one. Refuses (one line) to merge
    measurements of another workload, mode, variant definition or llama.cpp flags."""
    report = {"schema": SCHEMA, "mode": args.mode, "device": args.device, "workload": _workload(args),
              "routing": TRACE_ROUTING if args.workload == "trace" else ROUTING[args.mode],
              "variants": {"default": {}, "disk": RESERVED["disk"]}, "calls": [],
              "side_by_side": {"ratios": [], "variants": []}, "offload": {"ratios": [], "disk_ratios": []},
              "weights": [], "quantization": QUANTIZE[args.mode], "llamacpp_flags": None, "runs": [],
              "llamacpp": [], "baselines": {}}
    if args.merge:
        with open(args.merge) as handle:
            old = json.load(handle)
        for key in ("schema", "mode", "workload"):
            if old.get(key) != report[key]:
                sys.exit(f"--merge {args.merge}: its {key} {old.get(key)} differs from this call's {report[key]}")
        if old.setdefault("quantization", report["quantization"]) != report["quantization"]:
            sys.exit(f"--merge {args.merge}: quantized with {old['quantization']}, not {report['quantization']}")
        report = old
    with_weights(report)
    report["weights"] = [w for w in WEIGHTS if w in set(report["weights"]) | set(args.weights)]
    for name, properties in args.variants.items():
        if report["variants"].setdefault(name, properties) != properties:
            sys.exit(f"--merge {args.merge}: variant {name!r} was {report['variants'][name]}, not {properties}")
    if "side_by_side" in args.tables:
        plan = report["side_by_side"]
        plan.update(ratios=_union(plan["ratios"], args.ratios), variants=_union(plan["variants"], args.variants))
    if "offload" in args.tables:
        plan = report["offload"]
        plan.update(ratios=_union(plan["ratios"], args.offload_ratios),
                    disk_ratios=_union(plan["disk_ratios"], args.disk_ratios))
    if args.llama_bench:
        flags = {"flags": args.llamacpp_flags, "swept": False,
                 "how": "given by --llamacpp-flags, else llama-bench's defaults; not swept"}
        if args.llamacpp_sweep:
            sweep = _read_json(args.llamacpp_sweep, "--llamacpp-sweep")
            if not isinstance(sweep, dict) or not isinstance(sweep.get("llamacpp_flags"), str):
                sys.exit(f"--llamacpp-sweep {args.llamacpp_sweep}: no llamacpp_flags in it")
            args.llamacpp_flags = shlex.split(sweep["llamacpp_flags"])
            flags = {"flags": args.llamacpp_flags, "swept": True, "sweep": sweep.get("sweep"),
                     "how": "the best median decode of run_llama_bench's sweep (threads x flash attention x load "
                            f"mode at one -ncmoe, on {_swept_model(sweep)}), in its own processes before this call; "
                            "used for every GGUF"}
        if report["llamacpp"] and report["llamacpp_flags"] not in (None, flags):
            sys.exit(f"--merge {args.merge}: llama.cpp ran with {report['llamacpp_flags']['flags']}, not "
                     f"{args.llamacpp_flags}")
        report["llamacpp_flags"] = flags
    report["calls"].append(call)
    report.update({k: call[k] for k in ("commit", "dirty", "commit_source", "source_digest", "date_utc", "machine",
                                        "versions")})
    return report


def ok(entry: dict | None) -> bool:
    return entry is not None and not entry.get("error") and not entry.get("cut_short")


def _replace(entries: list[dict], entry: dict, **key) -> None:
    entries[:] = [e for e in entries if not all(e.get(k) == v for k, v in key.items())] + [entry]


# ----------------------------------------------------------------------------------------------- the calls


class Harness:
    """One call: its schedule, budget and report; every configuration written to --out as soon as it is done."""

    def __init__(self, args):
        self.args = args
        self.end = time.perf_counter() + args.budget_s
        self.call = {**provenance.record(), "args": dict(vars(args)), "bandwidth": {}, "phases": {},
                     "quantization": {}}
        self.report = new_report(args, self.call)
        self.model_dirs = {w: quantized_dir(args.model_dir, w) for w in WEIGHTS}
        self.index = len(self.report["calls"]) - 1
        self.sequence = 0
        self.skipped = self.failed = 0

    def left(self) -> float:
        return self.end - time.perf_counter()

    def write(self) -> None:
        write_report(self.args.out, derive(self.report))

    def budget(self, kind: str) -> float | None:
        """Seconds this configuration may take, or None when less than it needs is left (it is then skipped)."""
        need, cap = (0, 120) if self.args.tiny else (MIN_S[kind], CAP_S[kind])
        left = self.left()
        return min(cap, left) if left > need else None

    def stamp(self, entry: dict) -> dict:
        self.sequence += 1
        entry.update(call=self.index, sequence=self.sequence)
        if not ok(entry):
            self.failed += 1
        return entry

    def kept(self, earlier: dict | None) -> bool:
        """Whether a configuration this call has no time to measure again was measured well by an earlier call: the
        side by side measures a ratio's pairs back to back, so it reruns them all when one is missing; without the
        time, the earlier measurement stays rather than being replaced by a skip."""
        if ok(earlier):
            log(f"kept call {earlier.get('call')}'s measurement: no time to measure it again")
        return ok(earlier)

    def spec(self, kind: str, seconds: float, weights: str = "bf16", **extra) -> dict:
        a = self.args
        return {"kind": kind, "out": f"{a.out}.worker.json", "model_dir": self.model_dirs[weights], "device": a.device,
                "seconds": max(seconds - 10, 5), "workload": a.workload, "seed": a.seed, "prompt_tokens": a.prompt_len,
                "decode_tokens": a.decode_tokens, "repeats": a.repeats, **extra}

    def ours(self, weights: str, variant: str, ratio: int) -> None:
        tier = "disk" if variant == "disk" else "host"
        properties = self.report["variants"][variant]
        key = {"weights": weights, "variant": variant, "ratio": ratio, "tier": tier,
               "properties": {"MOE_OFFLOAD_RATIO": ratio, **properties}}
        seconds = self.budget("disk" if tier == "disk" else "ours")
        if seconds is None and self.kept(find(self.report["runs"], weights=weights, variant=variant, ratio=ratio)):
            return
        if seconds is None:
            self.skipped += 1
            entry = {**key, "error": "skipped: time budget"}
        else:
            tokens = self.args.disk_decode_tokens if tier == "disk" else self.args.decode_tokens
            spec = self.spec("ours", seconds, weights, ratio=ratio, properties=properties, tier=tier,
                             decode_tokens=tokens)
            entry = {**key, **sides.in_own_process(spec, seconds)}
        _replace(self.report["runs"], self.stamp(entry), weights=weights, variant=variant, ratio=ratio)
        self.write()
        log(f"ours {weights} {variant} ratio {ratio}: " + (entry.get("error") or f"{entry['seconds']:.0f} s"))

    def llamacpp(self, weights: str, ncmoe: int) -> None:
        a, seconds = self.args, self.budget("llamacpp")
        key = {"weights": weights, "gguf_type": GGUF_TYPES[weights]}
        if seconds is None and self.kept(find(self.report["llamacpp"], weights=weights, ncmoe=ncmoe)):
            return
        if seconds is None:
            self.skipped += 1
            entry = {**key, "ncmoe": ncmoe, "error": "skipped: time budget"}
        else:
            entry = {**key, **sides.llamacpp(a.llama_bench, gguf_for(a.gguf, weights), ncmoe, a.llamacpp_flags,
                                             a.prompt_len, a.decode_tokens, a.repeats, seconds)}
        _replace(self.report["llamacpp"], self.stamp(entry), weights=weights, ncmoe=ncmoe)
        self.write()
        log(f"llama.cpp {key['gguf_type']} -ncmoe {ncmoe}: " + (entry.get("error") or f"{entry['seconds']:.0f} s"))

    def baseline(self, kind: str) -> None:
        if not self.wanted(self.report["baselines"].get(kind)):
            return
        seconds = self.budget(kind)
        extra = {"decode_tokens": self.args.accelerate_tokens, "gpu_bytes": self.accelerate_bytes()} \
            if kind == "accelerate" else {"experts": self.args.baseline_experts}
        if seconds is None:
            self.skipped += 1
            entry = {"error": "skipped: time budget"}
        else:
            entry = {**sides.in_own_process(self.spec(kind, seconds, **extra), seconds),
                     **({"gpu_bytes_budget": extra["gpu_bytes"]} if kind == "accelerate" else {})}
        self.report["baselines"][kind] = self.stamp(entry)
        self.write()
        log(f"baseline {kind}: " + (entry.get("error") or f"{entry['seconds']:.0f} s"))

    def accelerate_bytes(self) -> int:
        """accelerate's device memory: what our default ratio-25 run's allocator held at its peak, else the bytes
        ratio 25 is expected to need (non-expert + resident experts + staging + KV cache)."""
        run = find(self.report["runs"], weights="bf16", variant="default", ratio=25)
        if run and run.get("allocator_peak_device_bytes"):
            return run["allocator_peak_device_bytes"]
        from moe_offload.config import OffloadConfig

        facts = self.report["model"]
        resident = OffloadConfig(moe_offload_ratio=25).resident_count(facts["experts_per_layer"])
        return (facts["non_expert_bytes"] + facts["moe_layers"] * resident * facts["expert_bytes"]
                + facts["staging_bytes"] + facts["kv_bytes_per_token"] * (self.args.prompt_len + 64))

    def phase(self, name: str, fn) -> None:
        """fn() timed into the call's phases; an exception is recorded there and the next phase runs (what the
        others measure is kept)."""
        started = time.perf_counter()
        status = "done"
        try:
            fn()
        except Exception as err:  # noqa: BLE001  (recorded, printed, and the call's exit status says so)
            traceback.print_exc()
            status, self.failed = f"error: {type(err).__name__}: {err}".splitlines()[0], self.failed + 1
        self.call["phases"][name] = {"status": status, "seconds": round(time.perf_counter() - started, 2)}
        self.write()
        log(f"phase {name}: {status}")

    def side_by_side(self) -> None:
        """Per ratio and weights, ours then llama.cpp (the GGUF of the same width) or the other way round,
        alternating; a pair already measured on both sides (--merge) is kept."""
        runs, variants = self.report["runs"], self.args.variants
        layers = self.report["model"]["moe_layers"]
        pairs = [(ratio, weights) for ratio in self.args.ratios for weights in self.args.weights]
        for index, (ratio, weights) in enumerate(pairs):
            ncmoe = ncmoe_for(ratio, layers)
            done = all(ok(find(runs, weights=weights, variant=v, ratio=ratio)) for v in variants) and (
                not self.args.llama_bench or ok(find(self.report["llamacpp"], weights=weights, ncmoe=ncmoe)))
            if done:
                continue
            steps = [lambda v=v: self.ours(weights, v, ratio) for v in variants]
            if self.args.llama_bench:
                steps.append(lambda: self.llamacpp(weights, ncmoe))
            for step in steps if index % 2 == 0 else steps[::-1]:
                step()

    def wanted(self, entry: dict | None) -> bool:
        """Whether to measure a configuration: not yet done well, nor already tried in this call."""
        return not ok(entry) and (entry is None or entry.get("call") != self.index)

    def offload(self) -> None:
        runs, weights = self.report["runs"], self.args.weights
        if "runs" in self.args.phases:
            for w, ratio in ((w, r) for w in weights for r in self.args.offload_ratios):
                if self.wanted(find(runs, weights=w, variant="default", ratio=ratio)):
                    self.ours(w, "default", ratio)
        if "baselines" in self.args.phases and self.report["baselines_weights"] in weights:
            kinds = ("transformers", "accelerate") if self.args.device == "cuda" else ("transformers",)  # CPU: no
            self.phase("baselines", lambda: [self.baseline(kind) for kind in kinds])  # device memory to fill
        disk = [(w, r) for w in weights for r in self.args.disk_ratios
                if self.wanted(find(runs, weights=w, variant="disk", ratio=r))]
        if disk and "runs" in self.args.phases:
            if "bw" in self.args.phases and self.budget("disk_bw") is not None:
                self.phase("bw_disk", lambda: self.call["bandwidth"].update(
                    bandwidth.disk(shard_files(self.args.model_dir), 4.0)))
            for w, ratio in disk:
                self.ours(w, "disk", ratio)

    def quantize(self) -> None:
        """Each quantized --weights written, timed: int4/int8 by `moe-offload quantize` (bench/common.py
        quantize_model), fp8 by bench/fp8_checkpoint.py (fp8_model)."""
        for weights in (w for w in self.args.weights if w != "bf16"):
            done = (fp8_model(self.args.model_dir, self.model_dirs[weights]) if weights == "fp8" else
                    quantize_model(self.args.model_dir, self.model_dirs[weights], BITS[weights],
                                   **self.report["quantization"]))
            self.call["quantization"][weights] = done
            self.write()
            log(f"quant {weights}: " + (f"{done['seconds']:.1f} s, peak RSS {done['peak_rss_bytes'] / 1e9:.2f} GB"
                                        if done["quantized"] else "already there"))

    def run(self) -> int:
        a = self.args
        if "gen" in a.phases:
            spec = dict(SPECS[a.mode], **({"num_hidden_layers": a.layers} if a.layers else {}))
            self.phase("gen", lambda: self.call.update(model_generation=generate_model(
                a.model_dir, spec, torch.device(a.device))))
        if not os.path.isfile(os.path.join(a.model_dir, "bench_model.json")):
            log(f"no model in {a.model_dir}: run the gen phase first")
            return 1
        self.report["model"] = model_facts(a.model_dir)
        if "quant" in a.phases and set(a.weights) - {"bf16"}:
            self.phase("quant", self.quantize)
        missing = [w for w in a.weights if w != "bf16"
                   and not os.path.isfile(os.path.join(self.model_dirs[w], "bench_quant.json"))]
        if missing:
            log(f"no {','.join(missing)} model beside {a.model_dir}: run the quant phase first")
            return 1
        self.report.setdefault("models", {}).update({w: model_facts(self.model_dirs[w]) for w in a.weights})
        if "bw" in a.phases:
            size = (256 << 20) if a.tiny else (1 << 30)
            self.phase("bw_memory", lambda: self.call["bandwidth"].update(
                bandwidth.dram_read(size), **(bandwidth.host_to_device(torch.device(a.device))
                                              if a.device == "cuda" else {})))
        if {"runs", "baselines"} & set(a.phases):
            files = [f for w in a.weights for f in shard_files(self.model_dirs[w])] + [
                gguf_for(a.gguf, w) for w in a.weights if a.gguf]
            self.phase("warm_page_cache", lambda: self.call.update(page_cache=bandwidth.warm_page_cache(files)))
        if "side_by_side" in a.tables and "runs" in a.phases:
            self.phase("side_by_side", self.side_by_side)
        if "offload" in a.tables:
            self.phase("offload", self.offload)
        self.write()
        log(f"report -> {a.out}; render: python -m bench.table {a.out}")
        if self.skipped:
            log(f"incomplete: {self.skipped} configurations skipped for time; finish with the same command and "
                f"--merge {a.out}")
        return 0 if not self.failed else 1


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.tiny:
        torch.set_num_threads(1)  # tiny GEMMs gain nothing from threads, and spinning ones stall on a busy CPU
    return Harness(args).run()


if __name__ == "__main__":
    sys.exit(main())
