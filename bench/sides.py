"""Each configuration of either side in a process of its own, with the GPU's memory in use polled from outside.

Why: a side-by-side is only fair if both sides are measured the same way. llama-bench is a process, so ours is one
too (bench/worker.py), and the peak of both is what NVML says the GPU had in use while that process ran, less
the idle reading just before it: the whole process, CUDA context included. The pollers are llama.cpp's runner's
(bench/llamacpp/run_llama_bench.py: PeakMemory every 50 ms, through NVML, or nvidia-smi where NVML does not load;
nothing on a machine with neither, as CI).

`llamacpp` is the one call into that runner's measurement; its owner is reworking it (a flag sweep, median/min/max
of its own), so only this function changes when it lands.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time

from bench.common import run_module
from bench.llamacpp import run_llama_bench


def summary(values) -> dict | None:
    """{"median", "min", "max", "n"} of the values that are not None; None when there are none."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def polled(command) -> dict:
    """Run `command()` (which runs one process to its end) while the GPU's memory in use is polled; the peak over
    the idle reading before it."""
    idle = run_llama_bench.gpu_memory_used_bytes()
    poller = run_llama_bench.PeakMemory().start() if idle is not None else None
    started = time.perf_counter()
    try:
        outcome = command()
    finally:
        peak = poller.stop() if poller else None
    return {**outcome, "seconds": round(time.perf_counter() - started, 2),
            "peak_device_bytes": None if peak is None else max(0, peak - idle), "idle_device_bytes": idle,
            "memory_samples": poller.samples if poller else 0}


def in_own_process(spec: dict, timeout: float, module: str = "bench.worker", flag: str | None = None) -> dict:
    """`module` on `spec` (`python -m MODULE [FLAG] SPEC-JSON`) in a child process, polled; the results file it
    writes to spec["out"], plus returncode, the NVML peak and, on failure, `error` and the end of its stderr."""
    if os.path.exists(spec["out"]):
        os.remove(spec["out"])
    argv = ([flag] if flag else []) + [json.dumps(spec)]

    def command() -> dict:
        try:
            done = run_module(module, argv, capture_output=True, text=True, timeout=timeout)
            return {"returncode": done.returncode, "stderr": done.stderr}
        except subprocess.TimeoutExpired as err:
            stderr = err.stderr.decode(errors="replace") if isinstance(err.stderr, bytes) else err.stderr or ""
            return {"returncode": f"timeout after {timeout:.0f} s", "stderr": stderr}

    outcome = polled(command)
    result = {}
    if os.path.exists(spec["out"]):
        with open(spec["out"]) as handle:
            result = json.load(handle)
        os.remove(spec["out"])
    stderr = outcome.pop("stderr")
    result.update(outcome)
    if outcome["returncode"] != 0:
        lines = [line for line in stderr.strip().splitlines() if line.strip()]
        result["error"] = f"worker exit {outcome['returncode']}: {lines[-1] if lines else 'no output'}"
        result["stderr_tail"] = stderr[-3000:]
    return result


def _test(raw: list[dict] | None, test: str) -> dict:
    """llama-bench's JSON entry of its pp ("prefill") or tg ("decode") test; {} where there is none."""
    for entry in raw or []:
        prompt, gen = entry.get("n_prompt", 0), entry.get("n_gen", 0)
        if (test == "prefill" and prompt > 0 and gen == 0) or (test == "decode" and gen > 0 and prompt == 0):
            return entry
    return {}


def _samples(raw: list[dict] | None, test: str) -> list[float]:
    """Per-repetition tokens/s of one test."""
    return list(_test(raw, test).get("samples_ts") or [])


def _mean(raw: list[dict] | None, test: str) -> float | None:
    """llama-bench's own figure of one test: the mean of its repetitions (avg_ts)."""
    return _test(raw, test).get("avg_ts")


def llamacpp(binary: str, gguf: str, ncmoe: int, flags: list[str], prompt: int, gen: int, repeats: int,
             timeout: float) -> dict:
    """llama-bench -ngl 99 -ncmoe N -p prompt -n gen -r repeats + flags, polled by the runner itself: median, min
    and max of its per-repetition samples (llama-bench's own figure, avg_ts, is their mean)."""
    row = run_llama_bench.run_one(binary, gguf, ncmoe, prompt=prompt, gen=gen, repeats=repeats, extra=flags,
                                  timeout=timeout)
    raw = row.get("raw")
    result = {"ncmoe": ncmoe, "flags": flags, "command": row["command"], "returncode": row["returncode"],
              "seconds": row["seconds"], "peak_device_bytes": row["peak_device_bytes"],
              "idle_device_bytes": row["baseline_device_bytes"], "memory_samples": row["memory_samples"],
              "decode_tok_s": summary(_samples(raw, "decode")), "prefill_tok_s": summary(_samples(raw, "prefill")),
              "llama_bench_mean_tok_s": {test: _mean(raw, test) for test in ("decode", "prefill")},
              "build_commit": raw[0].get("build_commit") if raw else None,
              "n_threads": raw[0].get("n_threads") if raw else None, "raw": raw}
    if row["returncode"] != 0 or result["decode_tok_s"] is None:
        result["error"] = f"llama-bench exit {row['returncode']}: " + (row.get("stderr_tail") or "").strip()[-300:]
    return result
