"""Routing traces on held-out text of three kinds, for judging cache policies (bench/cache_policy_learned.py).

Why: a cache policy is only as good as the routing it is judged on; the benchmark model's random routing repeats
itself (bench/RESULTS.md), so the traces here come from the trained models, on standard-library files their
training never saw (tools/train_small_moe.py's by-file split, is_heldout on the path), and of kinds whose
routing differs:
  code    - source code: a slice of a held-out file starting at its first def/class;
  prose   - docstrings: the held-out file's longest docstring (English about code);
  repeat  - long repeats: a short code slice written three times (routing that comes back).
Held-out files alternate between a TUNING set (even positions in path order) and a REPORT set (odd positions), so
hyper-parameters tuned on one are judged on text they were not tuned on. Each (model, set, kind) is one
`moe-offload trace --predict` run (prefill + greedy decode), saved gzip-compressed.

Usage (from the repository root): python -m bench.policy_traces --model moe_offload/assets/small-moe \
    --out-dir bench/results/traces --tag small-moe
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import sys
from pathlib import Path

from bench.common import ROOT, log

KINDS = ("code", "prose", "repeat")
SETS = ("tune", "report")
TOOLS = os.path.join(ROOT, "tools")


def train_module():
    """tools/train_small_moe.py as a module: its stdlib walk and held-out rule define 'held-out'."""
    if TOOLS not in sys.path:
        sys.path.append(TOOLS)
    return importlib.import_module("train_small_moe")


def heldout_files() -> tuple[Path, list[str]]:
    """(stdlib root, held-out relative paths in path order; test folders left out, as in --no-tests training)."""
    module = train_module()
    root = module.stdlib_root()
    return root, [r for r in module.list_stdlib_py(root, include_tests=False) if module.is_heldout(r, 50)]


def code_slice(text: str, chars: int) -> str | None:
    """`chars` characters from the first line that starts a def or class (None: no such line)."""
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.lstrip().startswith(("def ", "class ")):
            piece = "".join(lines[i:])[:chars]
            return piece if len(piece) >= chars // 2 else None
    return None


def longest_docstring(text: str, chars: int) -> str | None:
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return None
    docs = [ast.get_docstring(node) or "" for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    best = max(docs, key=len, default="")
    return best[:chars] if len(best) >= 200 else None


def prompt_of(kind: str, text: str, chars: int) -> str | None:
    if kind == "code":
        return code_slice(text, chars)
    if kind == "prose":
        return longest_docstring(text, chars)
    piece = code_slice(text, chars // 3)
    return None if piece is None else "\n\n".join([piece] * 3)


def build_prompts(per_kind: int, chars: int) -> dict[str, dict[str, list[dict]]]:
    """{set: {kind: [{"file", "prompt"}]}}: up to per_kind prompts of each kind from each set's files."""
    root, files = heldout_files()
    result = {name: {kind: [] for kind in KINDS} for name in SETS}
    for index, rel in enumerate(files):
        try:
            text = (root / rel).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        bucket = result[SETS[index % 2]]
        for kind in KINDS:
            if len(bucket[kind]) < per_kind:
                prompt = prompt_of(kind, text, chars)
                if prompt:
                    bucket[kind].append({"file": rel, "prompt": prompt})
    return result


def bf16_expert_bytes(model_dir: str) -> int:
    """One routed expert's bytes in bf16 (gate, up, down: 3 x hidden x moe_intermediate x 2), kept in the index so
    the traces can be scored in bytes without the model (the 128-expert one is not in git)."""
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    return 3 * config["hidden_size"] * config["moe_intermediate_size"] * 2


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--tag", required=True, help="file name prefix, e.g. small-moe")
    parser.add_argument("--out-dir", default=os.path.join(ROOT, "bench", "results", "traces"))
    parser.add_argument("--per-kind", type=int, default=4, help="prompts per kind and set")
    parser.add_argument("--chars", type=int, default=600, help="prompt length in characters")
    parser.add_argument("--new-tokens", type=int, default=48)
    args = parser.parse_args(argv)

    from moe_offload.cli import main as cli

    prompts = build_prompts(args.per_kind, args.chars)
    os.makedirs(args.out_dir, exist_ok=True)
    index = {}
    for name in SETS:
        for kind in KINDS:
            stem = f"{args.tag}-{name}-{kind}"
            prompt_file = os.path.join(args.out_dir, stem + ".prompts.json")
            with open(prompt_file, "w", encoding="utf-8") as handle:
                json.dump([p["prompt"] for p in prompts[name][kind]], handle, indent=0)
            trace_file = os.path.join(args.out_dir, stem + ".jsonl.gz")
            log(f"trace {stem}: {len(prompts[name][kind])} prompts")
            if cli(["trace", "--model", args.model, "--prompts", prompt_file, "--output", trace_file,
                    "--max-new-tokens", str(args.new_tokens), "--device", "cpu", "--predict"]):
                raise SystemExit(f"moe-offload trace failed for {stem}")
            index[stem] = {"set": name, "kind": kind, "trace": os.path.relpath(trace_file, ROOT),
                           "prompts": os.path.relpath(prompt_file, ROOT),
                           "files": [p["file"] for p in prompts[name][kind]]}
    with open(os.path.join(args.out_dir, f"{args.tag}-index.json"), "w", encoding="utf-8") as handle:
        json.dump({"model": os.path.relpath(os.path.abspath(args.model), ROOT),
                   "expert_bytes": bf16_expert_bytes(args.model), "new_tokens": args.new_tokens, "chars": args.chars,
                   "traces": index}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
