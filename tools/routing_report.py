#!/usr/bin/env python
"""Routing report: how skewed and how local a model's expert routing is, and what that means for the cache.

Records a routing trace (moe_offload/tools/trace.py) of greedy generations, then writes a JSON and a markdown report:

- expert popularity per MoE layer: entropy of the share of routed (token, expert) picks, in bits and
  normalised by log2 E (1.0 = uniform, every expert equally popular);
- routing locality per layer: the fraction of token t's top-k experts that token t-1 (same request, same
  layer) also picked, averaged over all consecutive pairs; k/E is what independent uniform routing gives;
- cache hit rates of LRU (the engine's policy) and MIN (the offline optimum of the engine's cache mechanism,
  see moe_offload/policy.py) at MOE_OFFLOAD_RATIO 10, 25 and 50, over decode steps only and over all steps
  (the cache runs through every step either way; prefill steps are one forward for the whole prompt);
- if the model folder has train_log.json (tools/train_small_moe.py), the held-out cross-entropy next to the
  unigram baseline stored there.

Prompts: by default the first 200 characters of 16 Python standard-library files picked with a fixed seed
from the training script's held-out split (the file list in the model's train_log.json, else
tools/train_small_moe.py's own split function; without either, from all stdlib files). `--prompts FILE`
(one per line, or a .json list) replaces them. For a model trained by tools/train_small_moe.py the prompts get
the tokenizer's EOS (<|endoftext|>) in front, as in training (`--prefix`).

    python tools/routing_report.py                       # the shipped model, moe_offload/assets/small-moe
    python tools/routing_report.py --model PATH --out-dir /tmp/report --max-new-tokens 16
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import sys
import sysconfig
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from moe_offload.errors import MoeOffloadError  # noqa: E402
from moe_offload.pipeline import DEFAULT_MODEL  # noqa: E402
from moe_offload.tools.environment import machine, utc_now, versions, write_report  # noqa: E402
from moe_offload.tools.simulate import replay_steps, simulate  # noqa: E402
from moe_offload.tools.trace import read_prompts, save_trace, trace_generation  # noqa: E402

RATIOS = (10, 25, 50)
POLICIES = ("lru", "min")
TRAIN_SCRIPT = REPO_ROOT / "tools" / "train_small_moe.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint folder (default: the shipped small model)")
    p.add_argument("--prompts", default=None, help="prompts file (one per line, or a .json list); "
                   "default: stdlib held-out snippets")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--prompt-chars", type=int, default=200, help="characters taken from the start of each file")
    p.add_argument("--seed", type=int, default=0, help="picks the stdlib files")
    p.add_argument("--prefix", choices=("auto", "eos", "none"), default="auto",
                   help="put the tokenizer's EOS before each prompt (auto: when the model has train_log.json)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--ratios", default=",".join(map(str, RATIOS)), help="comma-separated MOE_OFFLOAD_RATIOs")
    p.add_argument("--out-dir", default=str(REPO_ROOT / "bench" / "results"))
    p.add_argument("--name", default=None, help="report file stem (default: routing_report_<model folder>)")
    p.add_argument("--save-trace", action="store_true", help="also write the trace as <name>.trace.jsonl")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ prompts


def load_train_module():
    """tools/train_small_moe.py as a module, or None (missing, or it does not import here)."""
    if not TRAIN_SCRIPT.is_file():
        return None
    try:
        spec = importlib.util.spec_from_file_location("train_small_moe", TRAIN_SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    except Exception as err:
        sys.modules.pop("train_small_moe", None)  # a broken or half-edited training script must not stop the report
        print(f"note: cannot import {TRAIN_SCRIPT.name} ({type(err).__name__}: {err}); not using its split",
              file=sys.stderr)
        return None


def read_train_log(model: str) -> dict[str, Any] | None:
    path = os.path.join(model, "train_log.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError) as err:
        print(f"note: cannot read {path}: {err}", file=sys.stderr)
        return None


def stdlib_candidates(train_log: dict[str, Any] | None) -> tuple[Path, list[str], str]:
    """(stdlib root, candidate relative paths, how they were chosen)."""
    module = load_train_module()
    if module is not None and all(hasattr(module, n) for n in ("stdlib_root", "list_stdlib_py", "is_heldout")):
        root = Path(module.stdlib_root())
        logged = ((train_log or {}).get("corpus") or {}).get("heldout_paths")
        if logged:
            return root, sorted(logged), "held-out split listed in the model's train_log.json"
        args = (train_log or {}).get("args") or {}
        per_mille = int(args.get("heldout_per_mille", 50))
        rels = module.list_stdlib_py(root, include_tests=not args.get("no_tests", False))
        return root, [r for r in rels if module.is_heldout(r, per_mille)], \
            f"held-out split of tools/train_small_moe.py (is_heldout, {per_mille} per mille)"
    root = Path(sysconfig.get_paths()["stdlib"]).resolve()
    rels = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py")
                  if not {"site-packages", "dist-packages", "__pycache__"} & set(p.parts))
    return root, rels, "all stdlib files (tools/train_small_moe.py's split unavailable)"


def stdlib_prompts(count: int, chars: int, seed: int, train_log: dict[str, Any] | None
                   ) -> tuple[list[str], list[str], str]:
    """The first `chars` characters of `count` stdlib files picked by `seed`; (prompts, files, source)."""
    root, candidates, source = stdlib_candidates(train_log)
    order = list(candidates)
    random.Random(seed).shuffle(order)
    prompts, files = [], []
    for rel in order:
        try:
            text = (root / rel).read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        snippet = text[:chars]
        if len(snippet.strip()) < 20:  # empty __init__.py and the like
            continue
        prompts.append(snippet)
        files.append(rel)
        if len(prompts) == count:
            break
    if not prompts:
        raise MoeOffloadError(f"no readable stdlib files under {root} to build prompts from")
    return prompts, files, f"{source}; seed {seed}; first {chars} characters of each"


# ------------------------------------------------------------------------------------------------ metrics


def entropy_bits(counts: Counter, num_experts: int) -> dict[str, Any]:
    total = sum(counts.values())
    if not total:
        return {"picks": 0, "entropy_bits": None, "normalized": None, "max_share_x_E": None, "min_share_x_E": None}
    shares = [counts.get(e, 0) / total for e in range(num_experts)]
    bits = -sum(p * math.log2(p) for p in shares if p > 0)
    return {"picks": total, "entropy_bits": bits,
            "normalized": bits / math.log2(num_experts) if num_experts > 1 else None,
            "max_share_x_E": max(shares) * num_experts, "min_share_x_E": min(shares) * num_experts}


def routing_stats(records: list[dict[str, Any]], num_experts: dict[int, int]) -> dict[int, dict[str, Any]]:
    """Per layer: popularity entropy and previous-token reuse, over all tokens and over decode tokens."""
    _, steps = replay_steps(records, "forward")
    prefill_forwards = {r["step"] for r in records if r["token"] == 0}
    by_layer: dict[int, dict[tuple[int, int], dict[str, Any]]] = {}
    for r in records:
        by_layer.setdefault(int(r["layer"]), {})[(r["request"], r["token"])] = r
    result = {}
    for layer, tokens in sorted(by_layer.items()):
        count = num_experts[layer]
        popularity = {"all": Counter(), "decode": Counter()}
        reuse = {"all": [], "decode": []}
        top_k = max(len(r["experts"]) for r in tokens.values())
        for (request, token), r in tokens.items():
            decode = r["step"] not in prefill_forwards
            popularity["all"].update(r["experts"])
            if decode:
                popularity["decode"].update(r["experts"])
            previous = tokens.get((request, token - 1))
            if previous is not None:
                fraction = len(set(r["experts"]) & set(previous["experts"])) / len(r["experts"])
                reuse["all"].append(fraction)
                if decode:
                    reuse["decode"].append(fraction)
        result[layer] = {
            "num_experts": count, "top_k": top_k, "tokens": len(tokens), "forwards": len(steps[layer]),
            "popularity": {k: entropy_bits(v, count) for k, v in popularity.items()},
            "reuse_previous_token": {k: (sum(v) / len(v) if v else None) for k, v in reuse.items()},
            "reuse_pairs": {k: len(v) for k, v in reuse.items()},
            "reuse_if_uniform_independent": top_k / count,
        }
    return result


def hit_rates(trace, ratios: list[int]) -> list[dict[str, Any]]:
    rows = []
    for ratio in ratios:
        row: dict[str, Any] = {"ratio": ratio}
        for policy in POLICIES:
            result = simulate(trace, None, ratio, policy, "forward")
            row["capacity"] = {layer: v["capacity"] for layer, v in result["layers"].items()}
            row[policy] = {
                "all": result["total"]["hit_rate"], "decode": result["total"]["decode"]["hit_rate"],
                "prefill": result["total"]["prefill"]["hit_rate"],
                "hits": result["total"]["hits"], "misses": result["total"]["misses"],
                "per_layer": {layer: {"all": v["hit_rate"], "decode": v["decode"]["hit_rate"]}
                              for layer, v in result["layers"].items()},
            }
        rows.append(row)
    return rows


def cross_entropy(train_log: dict[str, Any] | None) -> dict[str, Any] | None:
    if not train_log:
        return None
    final, unigram = train_log.get("final_heldout_ce"), train_log.get("unigram_heldout_ce")
    if final is None or unigram is None:
        return None
    return {"heldout_ce_nats": final, "unigram_ce_nats": unigram, "gain_nats": unigram - final,
            "heldout_ppl": math.exp(final), "unigram_ppl": math.exp(unigram),
            "heldout_tokens": (train_log.get("corpus") or {}).get("heldout_tokens"),
            "steps": train_log.get("steps"), "stop_reason": train_log.get("stop_reason")}


# ------------------------------------------------------------------------------------------------ output


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value, digits=3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    m = report["model"]
    t = report["trace"]
    lines = [f"# Routing report: {m['name']}", "",
             f"- model: `{m['path']}` ({m['moe_layers']} MoE layers, {m['num_experts']} routed experts per layer, "
             f"top-{m['top_k']})",
             f"- prompts: {t['prompts']} ({t['prompt_source']}), {t['max_new_tokens']} new tokens each (greedy), "
             f"prefix: {t['prefix']!r}",
             f"- traced: {t['tokens']} token positions per layer in {t['forwards']} forwards "
             f"({t['prompt_tokens']} prompt tokens), device {t['device']}, {t['seconds']:.1f} s",
             f"- created {report['created']}", ""]
    ce = report.get("cross_entropy")
    if ce:
        lines += ["## Held-out cross-entropy (from train_log.json)", "",
                  "| | nats/token | perplexity |", "|---|---|---|",
                  f"| model | {ce['heldout_ce_nats']:.4f} | {ce['heldout_ppl']:.1f} |",
                  f"| unigram baseline | {ce['unigram_ce_nats']:.4f} | {ce['unigram_ppl']:.1f} |", "",
                  f"The model is {ce['gain_nats']:.3f} nats/token below the unigram baseline.", ""]
    lines += ["## Expert popularity and routing locality", "",
              "Entropy of the share of (token, expert) picks per expert; normalised by log2 E (1 = uniform). "
              "max/min share x E: the most / least popular expert's share relative to uniform. Reuse: fraction "
              "of token t's experts that token t-1 also picked (same request and layer); uniform independent "
              "routing gives k/E.", "",
              "| layer | entropy (bits) | normalised | decode normalised | max share x E | min share x E "
              "| reuse | decode reuse | k/E |",
              "|---|---|---|---|---|---|---|---|---|"]
    for layer, s in report["layers"].items():
        pa, pd = s["popularity"]["all"], s["popularity"]["decode"]
        lines.append(f"| {layer} | {_num(pa['entropy_bits'], 2)} | {_num(pa['normalized'])} | "
                     f"{_num(pd['normalized'])} | {_num(pa['max_share_x_E'], 2)} | {_num(pa['min_share_x_E'], 2)} | "
                     f"{_num(s['reuse_previous_token']['all'])} | {_num(s['reuse_previous_token']['decode'])} | "
                     f"{_num(s['reuse_if_uniform_independent'])} |")
    lines += ["", "## Cache hit rates (replayed trace)", "",
              "Per layer, C = resident experts at the ratio; the cache starts with experts 0..C-1 as after a load. "
              "LRU = the engine's policy; MIN = the offline optimum of the engine's cache mechanism "
              "(moe_offload/policy.py). Decode = decode steps only; all = every step, prefill included.", "",
              "| ratio | C | LRU decode | MIN decode | LRU all | MIN all |", "|---|---|---|---|---|---|"]
    for row in report["hit_rates"]:
        capacities = sorted(set(row["capacity"].values()))
        lines.append(f"| {row['ratio']} | {', '.join(map(str, capacities))} | {_pct(row['lru']['decode'])} | "
                     f"{_pct(row['min']['decode'])} | {_pct(row['lru']['all'])} | {_pct(row['min']['all'])} |")
    lines += ["", "Per-layer hit rates are in the JSON report.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except MoeOffloadError as err:
        print(f"routing_report: error: {err}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    import torch

    from moe_offload import LLMPipeline

    model = os.path.abspath(args.model)
    if not os.path.isfile(os.path.join(model, "config.json")):
        hint = " (train it first: python tools/train_small_moe.py --out moe_offload/assets/small-moe)" \
            if model == os.path.abspath(DEFAULT_MODEL) else ""
        raise MoeOffloadError(f"no model at {model}{hint}; pass --model PATH")
    if args.max_new_tokens < 1 or args.num_prompts < 1 or args.prompt_chars < 1:
        raise MoeOffloadError("--max-new-tokens, --num-prompts and --prompt-chars must be at least 1")
    try:
        ratios = [int(r) for r in args.ratios.split(",") if r.strip()]
    except ValueError:
        raise MoeOffloadError(f"--ratios must be comma-separated integers, got {args.ratios!r}") from None
    train_log = read_train_log(model)
    if args.prompts:
        prompts, files = read_prompts(args.prompts), []
        source = f"file {args.prompts}"
    else:
        prompts, files, source = stdlib_prompts(args.num_prompts, args.prompt_chars, args.seed, train_log)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = LLMPipeline(model, device, require_tokenizer=True, MOE_OFFLOAD_RATIO=100)
    prefix = ""
    if args.prefix == "eos" or (args.prefix == "auto" and train_log is not None):
        prefix = pipe.tokenizer.eos_token or ""
    started = time.time()
    try:
        trace = trace_generation(pipe, [prefix + p for p in prompts], args.max_new_tokens)
    finally:
        pipe.close()
    seconds = time.time() - started

    meta = trace.meta
    experts = {int(layer): count for layer, count in meta["num_experts"].items()}
    layers = routing_stats(trace.records, experts)
    name = args.name or f"routing_report_{os.path.basename(model.rstrip(os.sep))}"
    report = {
        "created": utc_now(),
        "machine": machine(),
        "versions": versions(),
        "model": {"path": model, "name": os.path.basename(model.rstrip(os.sep)), "moe_layers": len(experts),
                  "num_experts": sorted(set(experts.values()))[0] if len(set(experts.values())) == 1 else experts,
                  "top_k": meta.get("top_k")},
        "trace": {"prompts": len(prompts), "prompt_source": source, "files": files, "prefix": prefix,
                  "max_new_tokens": args.max_new_tokens, "device": device, "seconds": seconds,
                  "records": len(trace.records), "tokens": sum(r["traced_tokens"] for r in meta["requests"]),
                  "prompt_tokens": sum(r["prompt_tokens"] for r in meta["requests"]),
                  "forwards": sum(r["forwards"] for r in meta["requests"]), "requests": meta["requests"]},
        "cross_entropy": cross_entropy(train_log),
        "layers": layers,
        "hit_rates": hit_rates(trace, ratios),
    }
    os.makedirs(args.out_dir, exist_ok=True)
    json_path = os.path.join(args.out_dir, name + ".json")
    md_path = os.path.join(args.out_dir, name + ".md")
    write_report(json_path, report)
    with open(md_path, "w", encoding="utf-8") as handle:
        handle.write(markdown(report))
    if args.save_trace:
        save_trace(trace, os.path.join(args.out_dir, name + ".trace.jsonl"))
    print(markdown(report))
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
