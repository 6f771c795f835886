"""Decode-step expert-cache hits on the GPU bench workload as the side by side ran it until issue 22 (one fixed draw of
prompt and decode tokens, repeated every generation; bench/harness.py now draws fresh ones): static, LRU, MIN.

Why: the side-by-side's numbers depend on how the random benchmark model routes. The engine keeps experts 0..C-1
of each layer resident (static, MOE_ZERO_COPY=static) or admits decode misses into the same C slots (LRU, the
default). This records the bench workload's routing with forward hooks on the routers of a transformers model on
the CPU: the random Qwen3-30B-A3B-shaped 12-layer bf16 model of bench/common.py (same init rule and seed as the
H200's, but a CPU generator: not the same draws), prompt_ids(vocab, 128), 32 tokens with EOS suppressed as
pipe.generate_tokens(min_new_tokens=32) does (1 prefill + 31 decode forwards): by default the random tokens the
side by side fed then (common.fed_tokens, as llama-bench's tg test feeds random ones), with --decode-tokens
greedy each step's pick; warm-up + --repeats generations.
Replays: static (hit iff id < C), and moe_offload.tools.simulate's "lru" and "min" on the engine's SlotTable, with
C = OffloadConfig.resident_count (the product's rule); decode steps only, for one generation from a fresh load and
for all generations back to back counting all but the warm-up.

Usage, from the repository root (CPU, ~17 GB of disk for the model, --cleanup deletes it):
  python -m bench.cache_policy_on_bench_workload --model-dir /tmp/cpb-full --cleanup \
      --out bench/results/<date>-cache-policy-bench-workload-random.json
"""

from __future__ import annotations

import argparse
import inspect
import resource
import shutil
import sys
import time

import torch

from bench import common
from moe_offload.config import OffloadConfig
from moe_offload.tools.simulate import _replay_layer, replay_steps, simulate


@torch.no_grad()
def generate(model, ids: torch.Tensor, new: int, eos: list[int],
             feed: torch.Tensor | None = None) -> tuple[list[int], list[dict[int, list]]]:
    """Greedy tokens (or with `feed`, the fed ones in place of the picks) and, per forward, {layer: [T][K] router
    top-k ids}, as decoding.StaticDecoder runs it."""
    moe = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")]
    forwards: list[dict[int, list]] = []

    def hook(i):
        return lambda module, args, output: forwards[-1].__setitem__(i, output[2].tolist())
    handles = [model.model.layers[i].mlp.gate.register_forward_hook(hook(i)) for i in moe]
    bias = torch.zeros(model.config.vocab_size)
    bias[eos] = float("-inf")  # min_new_tokens == max_new_tokens: EOS never picked
    tokens, past, step_ids = [], None, ids
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # 5.2x rename
    try:
        while True:
            forwards.append({})
            out = model(input_ids=step_ids, use_cache=True, logits_to_keep=1, **{name: past})
            past = getattr(out, name)
            pick = int((out.logits[0, -1].float() + bias).argmax())
            tokens.append(pick if feed is None else int(feed[len(tokens)]))
            if len(tokens) == new:
                return tokens, forwards
            step_ids = torch.tensor([[tokens[-1]]])
    finally:
        for handle in handles:
            handle.remove()


def trace_records(gens: list[list[dict[int, list]]], prompt: int) -> list[dict]:
    """trace.py records: request = generation, step = global forward index."""
    records, step = [], 0
    for g, forwards in enumerate(gens):
        for s, by_layer in enumerate(forwards):
            base = 0 if s == 0 else prompt + s - 1
            for layer, rows in by_layer.items():
                records += [{"request": g, "token": base + t, "layer": layer, "step": step, "experts": row}
                            for t, row in enumerate(rows)]
            step += 1
    return records


def count(records: list[dict], E: int, C: int, policy: str, skip: int) -> dict:
    """Decode hits/misses of generations >= skip, the cache state running through all of `records`."""
    _, steps = replay_steps(records, "forward")
    hits = misses = decode_steps = 0
    for layer, seq in steps.items():
        per_gen = len(seq) // (max(r["request"] for r in records) + 1)
        keep = [(need, phase if i // per_gen >= skip else "prefill") for i, (need, phase) in enumerate(seq)]
        if policy == "static":
            h = sum(e < C for need, phase in keep if phase == "decode" for e in need)
            m = sum(len(need) for need, phase in keep if phase == "decode") - h
        else:
            h, m = _replay_layer(keep, E, C, policy, layer)["decode"]
        hits, misses, decode_steps = hits + h, misses + m, decode_steps + sum(p == "decode" for _, p in keep)
    return {"hits": hits, "misses": misses, "hit_rate": hits / (hits + misses), "decode_layer_steps": decode_steps,
            "misses_per_layer_step": misses / decode_steps, "accesses_per_layer_step": (hits + misses) / decode_steps}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", default="/tmp/cpb-full")
    p.add_argument("--spec", default="full", choices=sorted(common.SPECS), help="tiny: a quick smoke test")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--gen", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="timed generations after the one warm-up")
    p.add_argument("--ratios", default="0,25,50,75")
    p.add_argument("--decode-tokens", choices=("random", "greedy"), default="random",
                   help="what decode steps take in: common.fed_tokens' random ones or greedy picks")
    p.add_argument("--cleanup", action="store_true", help="delete --model-dir at the end")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    started = time.perf_counter()
    from transformers import AutoModelForCausalLM

    spec = common.SPECS[args.spec]
    made = common.generate_model(args.model_dir, spec, torch.device("cpu"))
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16).eval()
    load_s = time.perf_counter() - t0
    eos = model.generation_config.eos_token_id or model.config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos)
    ids = common.prompt_ids(spec["vocab_size"], args.prompt)
    feed = common.fed_tokens(spec["vocab_size"], args.gen, eos) if args.decode_tokens == "random" else None
    runs, gen_s = [], []
    for _ in range(1 + args.repeats):
        t0 = time.perf_counter()
        runs.append(generate(model, ids, args.gen, eos, feed))
        gen_s.append(time.perf_counter() - t0)
        print(f"generation {len(runs)}: {gen_s[-1]:.1f} s, tokens {runs[-1][0]}", flush=True)
    del model
    E = spec["num_experts"]
    everything = trace_records([f for _, f in runs], args.prompt)
    first = [r for r in everything if r["request"] == 0]
    results = []
    for ratio in [int(r) for r in args.ratios.split(",")]:
        C = OffloadConfig(moe_offload_ratio=ratio).resident_count(E)
        for policy in ("static", "lru", "min"):
            row = {"ratio": ratio, "capacity": C, "policy": policy,
                   "fresh_load_one_generation": count(first, E, C, policy, 0),
                   "back_to_back_last_repeats": count(everything, E, C, policy, 1)}
            if policy != "static":  # cross-check the relabelled replay against simulate()'s own totals
                assert simulate(first, E, ratio, policy)["total"]["decode"]["hits"] == \
                    row["fresh_load_one_generation"]["hits"]
            results.append(row)
            print(f"ratio {ratio:2d} C {C:3d} {policy:6s} fresh {row['fresh_load_one_generation']['hit_rate']:.3f} "
                  f"b2b {row['back_to_back_last_repeats']['hit_rate']:.3f}", flush=True)
    tokens = [t for t, _ in runs]
    decode = {L: [sorted({e for row in fw[L] for e in row}) for fw in runs[0][1][1:]] for L in runs[0][1][0]}
    stability = {L: {"union_of_decode_steps": len({e for need in seq for e in need}),
                     "overlap_with_previous_step": sum(len(set(a) & set(b)) / len(b) for a, b in zip(seq, seq[1:]))
                     / (len(seq) - 1)} for L, seq in decode.items()}  # generation 1's decode routing per layer
    report = {"date": common.utc_now(), "machine": common.machine(), "versions": common.versions(),
              "torch_threads": torch.get_num_threads(), "command": " ".join(sys.argv), "settings": vars(args),
              "spec": spec, "model_generation": made,
              "weights": "bench.common.generate_model on the CPU: same init rule and seed as the H200 bench (CUDA "
                         "generator there), not the same draws",
              "load_s": load_s, "generate_s": gen_s, "eos_suppressed": eos,
              "routing_identical_across_generations": all(f == runs[0][1] for _, f in runs),
              "generated_tokens": tokens, "distinct_generated_tokens": len(set(tokens[0])),
              "decode_routing_stability": stability,
              "step_rule": "prefill = 1 forward of the prompt, then one forward per decode token; per layer and step "
                           "the unique experts count once (simulate.py step='forward')",
              "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, "results": results}
    if args.cleanup:
        shutil.rmtree(args.model_dir)
    report["seconds"] = time.perf_counter() - started
    common.write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
