"""Where the time of a first-seen prefill goes: the harness measured a 128-token prefill the first time a prompt
length is seen at a fraction of its replayed speed (bench/RESULTS.md), and a server sees mostly new lengths.

One process per mode (MOE_CUDA_GRAPH auto or off; SDPA's cuDNN backend allowed or not: it builds a plan per
new shape), the random benchmark model at one ratio: prefills
(one new token each) at a sequence of prompt lengths, each new length followed by repeats of it, so the first
run of a length, its capture and its replays are timed apart; then one more new length under torch.profiler,
whose top operators by self time (CPU and CUDA) say whether the first run pays compiling, capturing or launching.

    python -m bench.first_seen_prefill [--ratio 100] [--layers 12] [--out bench/results/DATE-first-seen-prefill.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from bench.common import MODEL_ROOT, SPECS, generate_model, load_pipeline, machine, utc_now, versions

LENGTHS = [128, 128, 128, 131, 131, 131, 200, 200, 256, 256, 64, 64]  # new lengths, each followed by repeats
PROFILED_LENGTH = 300


def prefill_seconds(pipe, length: int, device: torch.device) -> float:
    """Seconds of one prefill of `length` random tokens (and its first new token), synchronised."""
    ids = torch.randint(0, pipe.model.config.vocab_size, (1, length), device=device)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        pipe.generate_tokens(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
    torch.cuda.synchronize(device)
    return time.perf_counter() - start


def top_operators(pipe, device: torch.device, count: int = 15) -> dict:
    """The operators of one first-seen prefill, by CPU and by CUDA self time (ms)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        prefill_seconds(pipe, PROFILED_LENGTH, device)
    events = prof.key_averages()
    rows = lambda key: [{"name": e.key[:90], "calls": e.count, "ms": getattr(e, key) / 1e3}  # noqa: E731
                        for e in sorted(events, key=lambda e: getattr(e, key), reverse=True)[:count]]
    return {"by_cpu_self": rows("self_cpu_time_total"), "by_device_self": rows("self_device_time_total")}


MODES = [("auto", True), ("auto", False), ("off", False)]  # (MOE_CUDA_GRAPH, cuDNN SDPA allowed)


def measure(path: str, ratio: int, graph: str, cudnn_sdp: bool) -> dict:
    """The timings of one mode, in this process."""
    device = torch.device("cuda")
    torch.backends.cuda.enable_cudnn_sdp(cudnn_sdp)
    pipe = load_pipeline(path, "cuda", MOE_OFFLOAD_RATIO=ratio, MOE_CUDA_GRAPH=graph)
    prefill_seconds(pipe, 96, device)  # the first forward ever: kernels compile here, not in the timings below
    runs, seen = [], set()
    for length in LENGTHS:
        seconds = prefill_seconds(pipe, length, device)
        runs.append({"length": length, "first_seen": length not in seen, "ms": seconds * 1e3,
                     "tok_s": length / seconds})
        seen.add(length)
    result = {"graph": graph, "cudnn_sdp": cudnn_sdp, "ratio": ratio, "runs": runs, "profile_first_seen": top_operators(pipe, device)}
    pipe.close()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=int, default=100)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--out", default=None)
    parser.add_argument("--graph", default=None, help=argparse.SUPPRESS)  # one mode, in a child process
    parser.add_argument("--cudnn-sdp", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=os.path.join(MODEL_ROOT, "full"))
    a = parser.parse_args(argv)
    if a.graph:
        print(json.dumps(measure(a.model_dir, a.ratio, a.graph, bool(a.cudnn_sdp))))
        return 0
    spec = dict(SPECS["full"], num_hidden_layers=a.layers)
    generation = generate_model(a.model_dir, spec, torch.device("cuda"))
    modes = []
    for graph, cudnn_sdp in MODES:
        child = subprocess.run([sys.executable, "-m", "bench.first_seen_prefill", "--graph", graph,
                                "--cudnn-sdp", str(int(cudnn_sdp)), "--ratio", str(a.ratio), "--model-dir", a.model_dir],
                               capture_output=True, text=True)
        if child.returncode:
            modes.append({"graph": graph, "cudnn_sdp": cudnn_sdp, "error": child.stderr[-3000:]})
        else:
            modes.append(json.loads(child.stdout.strip().splitlines()[-1]))
        for run in modes[-1].get("runs", []):
            print(f"graph {graph} cudnn {int(cudnn_sdp)}: {run['length']:4d} tokens {'first ' if run['first_seen'] else 'again '}"
                  f"{run['ms']:8.1f} ms {run['tok_s']:9.0f} tok/s", flush=True)
    report = {"benchmark": "first_seen_prefill", "date": utc_now(), "machine": machine(), "versions": versions(),
              "spec": spec, "model_generation": generation, "modes": modes}
    out = a.out or os.path.join(os.environ.get("OUT", "."), "first-seen-prefill.json")
    with open(out, "w") as handle:
        json.dump(report, handle, indent=1)
    print(f"report -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
