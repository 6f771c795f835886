"""Issue 6 side by side: moe-offload at ratios 0/25/50/75 against llama.cpp -ncmoe 12/9/6/3, in one run.

Both sides run on the same random Qwen3-30B-A3B-shaped checkpoint (bench/common.py; written by
`python -m bench.h200_offload_bench --phases gen`) and its bf16 GGUF (bench/llamacpp/convert_qwen3moe_gguf.py).
Every configuration of either side runs as its own process while the GPU's memory in use is polled (NVML, or
nvidia-smi where NVML does not load: bench/llamacpp/run_llama_bench.py's PeakMemory), so peak device memory is
measured the same way for both: process memory, CUDA context included, over the idle reading before it.
- ours: every variant (--variants: hybrid CPU+GPU misses with the default LRU admission, the same with the
  resident set static, GPU only) at every ratio; the rows report --main.
  A 128-token prompt of random ids, then 32 tokens (llama-bench -p 128 -n 32); one warm-up generation, then the
  median of --repeats: prefill tok/s = 128 / (prompt to first token), decode tok/s = the later tokens / their
  time. The host tier holds every non-resident expert (zero-copy misses, CUDA graphs). What each decode step
  takes in (--decode-tokens): random tokens by default, as llama-bench's tg test feeds (a random token each step,
  tools/llama-bench/llama-bench.cpp test_gen); "greedy" feeds each step's pick, which on random weights repeats
  one token 32 times (bench/results/archive/2026-11-29-cache-policy-bench-workload-greedy.json). Runs before
  2026-11-29's session 6 changes were greedy. Either way this random checkpoint routes layers 2-11 to nearly the
  same 10-15 experts at every decode step, whatever the token (its embeddings are tiny next to what attention
  adds): an LRU cache of the resident size would hit 0.96-0.999 of decode accesses at ratios 25-75 against
  0.26-0.70 for the static set (bench/results/2026-11-29-cache-policy-bench-workload-random.json, a CPU-drawn copy
  of the model; bench/RESULTS.md). Not a worst case for a cache; say so beside any result that caches on it.
- llama.cpp: llama-bench's own pp128 and tg32 averages (-r --repeats), -ngl 99 -ncmoe N.
`ncmoe` = experts of N of the L layers on llama.cpp's CPU, matched to ratio = 100 (L - N) / L.

Writes {rows: [{ratio, ncmoe, ours_decode_tok_s, llamacpp_decode_tok_s, ours_prefill_tok_s,
llamacpp_prefill_tok_s, ours_peak_device_bytes, llamacpp_peak_device_bytes}], targets, machine, versions, ...}.

Usage, from the repository root (H200; bench/llamacpp/h200_side_by_side.sh runs it):
       python -m bench.vs_llamacpp --model-dir /tmp/moe-offload-bench/full \
                  --gguf /tmp/moe-offload-bench/full.gguf --llama-bench /tmp/llamacpp/build-cuda/bin/llama-bench \
                  --out $OUT/<date>-h200-vs-llamacpp.json
       python -m bench.vs_llamacpp --tiny --model-dir /tmp/tiny --out /tmp/vs.json   # our side on a CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from bench import common
from bench.llamacpp import run_llama_bench

RATIOS = (0, 25, 50, 75)
TARGETS = {"decode_vs_llamacpp": 1.2, "prefill_vs_llamacpp": 3.0}
# Our configurations (all with the host tier holding every non-resident expert: zero-copy misses, CUDA graphs):
# misses split between the CPU and the GPU (hybrid.py) with the token embeddings in host RAM as llama.cpp keeps
# them (host_embeddings.py), and every miss read in place by the GPU with everything else as usual.
# hybrid_static: the resident set fixed at load, the cache's floor on the random benchmark model, whose routing
# barely changes from step to step (bench/results/2026-11-29-cache-policy-bench-workload-random.json)
VARIANTS = {"hybrid": {"MOE_CPU_EXPERTS": "auto", "MOE_HOST_EMBEDDINGS": "on"},
            "hybrid_static": {"MOE_CPU_EXPERTS": "auto", "MOE_HOST_EMBEDDINGS": "on", "MOE_ZERO_COPY": "static"},
            "gpu_only": {"MOE_CPU_EXPERTS": "off", "MOE_HOST_EMBEDDINGS": "off"}}


def ncmoe_for(ratio: int, layers: int) -> int:
    return round(layers * (100 - ratio) / 100)


def memory_breakdown(torch, device) -> dict | None:
    """The caching allocator's bytes (allocated, reserved, peak reserved) and the device's used bytes (all
    processes: the poller's idle reading is the rest), to tell a reservation from the CUDA context and libraries."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return {"allocated": torch.cuda.memory_allocated(device), "reserved": torch.cuda.memory_reserved(device),
            "max_reserved": torch.cuda.max_memory_reserved(device), "device_used": total - free}


def ours_worker(spec: dict) -> dict:
    """One ratio, in this (child) process: load, warm up, measure."""
    import torch

    device = torch.device(spec["device"])
    facts = common.model_facts(spec["model_dir"])
    element = 2 if device.type == "cuda" else 4  # MOE_DTYPE auto: the bf16 checkpoint's dtype on CUDA, fp32 on CPU
    pipe = common.load_pipeline(spec["model_dir"], str(device), MOE_OFFLOAD_RATIO=spec["ratio"], MOE_IO="pread",
                                MOE_HOST_CACHE=common.host_tier_bytes(facts, element), **spec["properties"])
    after_load = memory_breakdown(torch, device)
    vocab = facts["config"]["vocab_size"]
    ids = common.prompt_ids(vocab, spec["prompt"]).to(device)
    feed = None
    if spec["decode_tokens"] == "random":
        eos = pipe.model.generation_config.eos_token_id
        feed = common.fed_tokens(vocab, spec["gen"], [] if eos is None else [eos] if isinstance(eos, int) else eos)
    deadline = time.perf_counter() + spec["seconds"]
    common.timed_generate(pipe.model, ids, spec["gen"], device, deadline, pipe=pipe, feed=feed)  # compile, capture
    runs = [common.timed_generate(pipe.model, ids, spec["gen"], device, deadline, pipe=pipe, feed=feed)
            for _ in range(spec["repeats"])]
    stats = pipe.get_offload_stats()
    after_runs = memory_breakdown(torch, device)
    pipe.close()
    return {"memory_after_load": after_load, "memory_after_runs": after_runs,
            "cpu_expert_decode_check": stats["cpu_expert_decode_check"],
            "zero_copy_prefill_max_tokens": stats["zero_copy_prefill_max_tokens"],
            "decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs),
            "prefill_tok_s": statistics.median(spec["prompt"] / r["ttft_s"] for r in runs),
            "allocator_peak_device_bytes": max(r["peak_device_bytes"] or 0 for r in runs) or None,
            "zero_copy_layers": stats["zero_copy_layers"], "cuda_graph_steps": stats["cuda_graph_steps"],
            "experts_computed_on_cpu": stats["experts_computed_on_cpu"],
            "experts_read_in_place": stats["experts_read_in_place"], "cpu_expert_split": stats["cpu_expert_split"],
            "cpu_expert_kernel": stats["cpu_expert_kernel"], "cpu_expert_tuning": stats["cpu_expert_tuning"],
            "cpu_expert_handoff": stats["cpu_expert_handoff"], "cpu_expert_threads": stats["cpu_expert_threads"],
            "fused_dense_ops": stats["fused_dense_ops"], "host_embedding_bytes": stats["host_embedding_bytes"],
            "runs": runs}


def run_ours(args, ratio: int, properties: dict) -> dict:
    """Our side at one ratio, in a child process, with device memory polled from outside like llama.cpp's."""
    spec = {"model_dir": args.model_dir, "device": args.device, "ratio": ratio, "prompt": args.prompt,
            "gen": args.gen, "repeats": args.repeats, "seconds": args.timeout, "properties": properties,
            "decode_tokens": args.decode_tokens}
    baseline = run_llama_bench.gpu_memory_used_bytes()
    poller = run_llama_bench.PeakMemory().start() if baseline is not None else None
    started = time.perf_counter()
    try:
        done = common.run_module(__spec__.name, ["--worker", json.dumps(spec)], capture_output=True, text=True,
                                 timeout=args.timeout + 120)
        out, err, code = done.stdout, done.stderr, done.returncode
    except subprocess.TimeoutExpired:
        out, err, code = "", "timed out", "timeout"
    peak = poller.stop() if poller else None
    row = {"returncode": code, "seconds": round(time.perf_counter() - started, 2),
           "peak_device_bytes": None if peak is None else max(0, peak - baseline)}
    try:
        row.update(json.loads(out.strip().splitlines()[-1]))
    except (IndexError, json.JSONDecodeError):
        row["stderr_tail"] = err[-3000:]
    return row


def ratio_of(value, other):
    return value / other if value and other else None


def build_rows(ours: dict[int, dict], llamacpp: dict[int, dict], layers: int,
               variants: dict[str, dict[int, dict]] | None = None) -> list[dict]:
    """The issue's rows from our main variant (`ours`) and llama.cpp; every variant's numbers ride along."""
    rows = []
    for ratio, mine in sorted(ours.items()):
        theirs = llamacpp.get(ncmoe_for(ratio, layers), {})
        row = {"ratio": ratio, "ncmoe": ncmoe_for(ratio, layers),
               "ours_decode_tok_s": mine.get("decode_tok_s"), "llamacpp_decode_tok_s": theirs.get("decode_tok_s"),
               "ours_prefill_tok_s": mine.get("prefill_tok_s"), "llamacpp_prefill_tok_s": theirs.get("prefill_tok_s"),
               "ours_peak_device_bytes": mine.get("peak_device_bytes"),
               "llamacpp_peak_device_bytes": theirs.get("peak_device_bytes")}
        row["decode_vs_llamacpp"] = ratio_of(row["ours_decode_tok_s"], row["llamacpp_decode_tok_s"])
        row["prefill_vs_llamacpp"] = ratio_of(row["ours_prefill_tok_s"], row["llamacpp_prefill_tok_s"])
        memory = (row["ours_peak_device_bytes"], row["llamacpp_peak_device_bytes"])
        row["targets_met"] = {
            "decode": None if row["decode_vs_llamacpp"] is None
            else row["decode_vs_llamacpp"] >= TARGETS["decode_vs_llamacpp"],
            "prefill": None if row["prefill_vs_llamacpp"] is None
            else row["prefill_vs_llamacpp"] >= TARGETS["prefill_vs_llamacpp"],
            "memory": None if None in memory else memory[0] <= memory[1]}
        if variants:
            row["ours_by_variant"] = {name: {key: runs.get(ratio, {}).get(key) for key in
                                             ("decode_tok_s", "prefill_tok_s", "peak_device_bytes")}
                                      for name, runs in variants.items()}
        rows.append(row)
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", default=f"{common.MODEL_ROOT}/full")
    parser.add_argument("--gguf", default=None, help="the checkpoint as a bf16 GGUF (llama.cpp side)")
    parser.add_argument("--llama-bench", default=None, help="llama-bench binary; without it only our side runs")
    parser.add_argument("--ratios", default=",".join(map(str, RATIOS)))
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--gen", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-tokens", choices=("random", "greedy"), default="random",
                        help="what our decode steps take in: random tokens, as llama-bench's tg test feeds (default), "
                             "or each step's greedy pick (on random weights that repeats one token)")
    parser.add_argument("--timeout", type=float, default=240, help="seconds per configuration")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="write and use the tiny model; our side on the CPU")
    parser.add_argument("--variants", default=json.dumps(VARIANTS),
                        help="JSON {name: properties}: our configurations, each run at every ratio")
    parser.add_argument("--main", default=None, help="the variant the rows report (default: the first)")
    parser.add_argument("--out", required=False)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    args.variants = json.loads(args.variants)
    args.main = args.main or next(iter(args.variants))
    if args.main not in args.variants:
        parser.error(f"--main {args.main!r} is not one of the variants {list(args.variants)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(ours_worker(json.loads(args.worker))))
        return 0
    import torch

    if args.tiny:
        common.generate_model(args.model_dir, common.SPECS["tiny"], torch.device("cpu"))
    layers = common.model_facts(args.model_dir)["moe_layers"]
    ratios = [int(r) for r in args.ratios.split(",") if r.strip()]
    variants: dict[str, dict[int, dict]] = {name: {} for name in args.variants}
    llamacpp: dict[int, dict] = {}
    report = {"date": common.utc_now(), "machine": common.machine(), "versions": common.versions(),
              "model_dir": args.model_dir, "gguf": args.gguf, "layers": layers, "prompt_tokens": args.prompt,
              "gen_tokens": args.gen, "repeats": args.repeats, "decode_tokens": args.decode_tokens, "targets": TARGETS,
              "variants": args.variants, "main_variant": args.main,
              "memory_rule": f"{run_llama_bench.memory_source()} memory in use over the idle reading, polled every "
                             "50 ms, both sides"}

    def write() -> None:  # after every configuration, so a run cut short keeps what it measured
        report.update(rows=build_rows(variants[args.main], llamacpp, layers, variants), ours=variants,
                      llamacpp=llamacpp)
        if args.out:
            common.write_report(args.out, report)

    if args.llama_bench and args.gguf:  # first: the peer's numbers are the ones a short run must not lose
        for ncmoe in [ncmoe_for(r, layers) for r in ratios]:
            row = run_llama_bench.run(args.llama_bench, args.gguf, [ncmoe], prompt=args.prompt, gen=args.gen,
                                      repeats=args.repeats)[0]
            llamacpp[row["ncmoe"]] = row
            write()
    for ratio in ratios:
        for name, properties in args.variants.items():
            run = variants[name][ratio] = run_ours(args, ratio, properties)
            print(f"ours {name} ratio {ratio:3d}: decode {run.get('decode_tok_s') or 0:8.2f} tok/s, prefill "
                  f"{run.get('prefill_tok_s') or 0:9.1f} tok/s, rc {run['returncode']}", flush=True)
            write()
    write()
    for row in report["rows"]:
        print(json.dumps({k: row[k] for k in ("ratio", "ncmoe", "decode_vs_llamacpp", "prefill_vs_llamacpp")}))
    return 0 if all(r["returncode"] == 0 for runs in variants.values() for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
