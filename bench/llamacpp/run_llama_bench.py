"""llama.cpp's llama-bench at several -ncmoe values (experts of the first N layers kept on the CPU), with peak GPU
memory.

Why: issue 6 compares moe-offload with llama.cpp's own expert offload on the same random Qwen3-30B-A3B-shaped
checkpoint. llama-bench times prefill (-p) and decode (-n) but does not report device memory, so each -ncmoe value
runs as its own llama-bench process while a thread reads the GPU's memory in use every 50 ms (NVML, what
`nvidia-smi --query-gpu=memory.used` reads, or nvidia-smi itself where NVML does not load); the peak minus the idle
reading taken just before is that run's device memory (CUDA context included, as for any process).
With neither (a CPU machine) the memory part is skipped and peak_device_bytes is null.
`-ncmoe` is llama-bench's short form of `--n-cpu-moe` in this llama.cpp (0c1e570, tools/llama-bench/llama-bench.cpp).

Usage: python -m bench.llamacpp.run_llama_bench --llama-bench BUILD/bin/llama-bench -m MODEL.gguf \
           --ncmoe 0,6,12 [-p 128] [-n 32] [-r 3] [--ngl 99] [--extra "-fa on"] [--out rows.json]
Module: run(llama_bench, gguf, [0, 6, 12], ...) -> [{ncmoe, prefill_tok_s, decode_tok_s, peak_device_bytes, raw}, ...]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import shlex
import shutil
import subprocess
import sys
import threading
import time

MIB = 1 << 20


class _NvmlMemory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


_nvml_lib: ctypes.CDLL | None | bool = None  # None: not tried yet; False: unavailable


def _nvml() -> ctypes.CDLL | None:
    """libnvidia-ml (what nvidia-smi reads), initialised once; None where it is absent."""
    global _nvml_lib
    if _nvml_lib is None:
        try:
            lib = ctypes.CDLL("libnvidia-ml.so.1")
            _nvml_lib = lib if lib.nvmlInit_v2() == 0 else False
        except (OSError, AttributeError):
            _nvml_lib = False
    return _nvml_lib or None


def _nvml_used_bytes(lib: ctypes.CDLL, gpu: str | None) -> int | None:
    """Bytes in use on GPU `gpu` (an index) or summed over all, through NVML; None on any NVML error."""
    count = ctypes.c_uint()
    if lib.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
        return None
    total = 0
    for index in ([int(gpu)] if gpu is not None else range(count.value)):
        handle, memory = ctypes.c_void_p(), _NvmlMemory()
        if lib.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(handle)) != 0 or \
                lib.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(memory)) != 0:
            return None
        total += memory.used
    return total


def memory_source(gpu: str | None = None) -> str | None:
    """Where gpu_memory_used_bytes reads: "nvml", "nvidia-smi", or None (neither works here)."""
    if _nvml() is not None and (gpu is None or gpu.isdigit()):
        return "nvml"
    return "nvidia-smi" if shutil.which("nvidia-smi") is not None else None


def gpu_memory_used_bytes(gpu: str | None = None) -> int | None:
    """Memory in use on the GPU(s) (summed over those listed), or None where it cannot be read.

    NVML in this process where it loads: a reading is a library call. nvidia-smi otherwise: each reading is a
    process of its own, started every 50 ms on the machine whose every core the benchmarked process may be using
    (our CPU expert path spins 16 threads on the H200 machine's 16 cores; llama-bench runs 16 threads too)."""
    if memory_source(gpu) == "nvml":
        return _nvml_used_bytes(_nvml(), gpu)
    if shutil.which("nvidia-smi") is None:
        return None
    command = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
    if gpu is not None:
        command.append(f"--id={gpu}")
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=10, check=True).stdout
        return sum(int(float(line)) for line in out.split() if line.strip()) * MIB
    except (subprocess.SubprocessError, ValueError, OSError):
        return None


class PeakMemory:
    """Polls gpu_memory_used_bytes() every `interval` s in a thread between start() and stop(); keeps the maximum."""

    def __init__(self, gpu: str | None = None, interval: float = 0.05):
        self.gpu, self.interval, self.peak, self.samples = gpu, interval, None, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            used = gpu_memory_used_bytes(self.gpu)
            if used is not None:
                self.peak = used if self.peak is None else max(self.peak, used)
                self.samples += 1
            self._stop.wait(self.interval)

    def start(self) -> "PeakMemory":
        self._thread.start()
        return self

    def stop(self) -> int | None:
        self._stop.set()
        self._thread.join()
        return self.peak


def parse(results: list[dict]) -> tuple[float | None, float | None]:
    """(prefill tok/s, decode tok/s) from llama-bench's JSON: one object per test, avg_ts its mean tokens/s."""
    prefill = next((r["avg_ts"] for r in results if r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0), None)
    decode = next((r["avg_ts"] for r in results if r.get("n_gen", 0) > 0 and r.get("n_prompt", 0) == 0), None)
    return prefill, decode


def run_one(llama_bench: str, gguf: str, ncmoe: int, prompt: int = 128, gen: int = 32, repeats: int = 3,
            ngl: int = 99, extra: list[str] | None = None, gpu: str | None = None, timeout: float = 600) -> dict:
    command = [llama_bench, "-m", gguf, "-ngl", str(ngl), "-ncmoe", str(ncmoe), "-p", str(prompt), "-n", str(gen),
               "-r", str(repeats), "-o", "json"] + list(extra or [])
    baseline = gpu_memory_used_bytes(gpu)
    poller = PeakMemory(gpu).start() if baseline is not None else None
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        returncode, stdout, stderr = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as error:
        returncode, stdout, stderr = "timeout", error.stdout or "", error.stderr or ""
        stdout, stderr = (s.decode() if isinstance(s, bytes) else s for s in (stdout, stderr))
    seconds = time.perf_counter() - started
    peak = poller.stop() if poller else None
    row = {"ncmoe": ncmoe, "prefill_tok_s": None, "decode_tok_s": None,
           "peak_device_bytes": None if peak is None else max(0, peak - baseline),
           "baseline_device_bytes": baseline, "memory_samples": poller.samples if poller else 0,
           "seconds": round(seconds, 2), "returncode": returncode, "command": shlex.join(command), "raw": None}
    try:
        row["raw"] = json.loads(stdout)
        row["prefill_tok_s"], row["decode_tok_s"] = parse(row["raw"])
    except json.JSONDecodeError:
        row["stdout_tail"] = stdout[-2000:]
    if returncode != 0 or row["raw"] is None:
        row["stderr_tail"] = stderr[-3000:]
    return row


def run(llama_bench: str, gguf: str, ncmoe_values, out: str | None = None, log=print, **kwargs) -> list[dict]:
    rows = []
    for ncmoe in ncmoe_values:
        row = run_one(llama_bench, gguf, int(ncmoe), **kwargs)
        rows.append(row)
        peak = row["peak_device_bytes"]
        log(f"ncmoe {ncmoe:3d}: prefill {row['prefill_tok_s'] or 0:9.1f} tok/s, decode {row['decode_tok_s'] or 0:8.2f}"
            f" tok/s, peak device {'n/a' if peak is None else f'{peak / 2**30:.2f} GiB'}, {row['seconds']:.1f} s"
            + ("" if row["returncode"] == 0 else f", rc {row['returncode']}: {row.get('stderr_tail', '')[-300:]}"))
        if out:  # rewritten after every run, so a killed sweep keeps what it measured
            with open(out, "w") as handle:
                json.dump(rows, handle, indent=1)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llama-bench", required=True)
    parser.add_argument("-m", "--model", required=True, help="GGUF")
    parser.add_argument("--ncmoe", default="0", help="comma-separated -ncmoe values")
    parser.add_argument("-p", "--prompt", type=int, default=128)
    parser.add_argument("-n", "--gen", type=int, default=32)
    parser.add_argument("-r", "--repeats", type=int, default=3)
    parser.add_argument("--ngl", type=int, default=99)
    parser.add_argument("--extra", default="", help="more llama-bench arguments, one string (e.g. '-fa on -t 16')")
    parser.add_argument("--gpu", default=None, help="nvidia-smi --id for the memory reading (default: all GPUs)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per llama-bench run")
    parser.add_argument("--out", default=None, help="JSON list of rows")
    args = parser.parse_args(argv)
    rows = run(args.llama_bench, args.model, [int(x) for x in args.ncmoe.split(",") if x.strip()], out=args.out,
               prompt=args.prompt, gen=args.gen, repeats=args.repeats, ngl=args.ngl, extra=shlex.split(args.extra),
               gpu=args.gpu, timeout=args.timeout)
    if not args.out:
        print(json.dumps(rows, indent=1))
    return 0 if all(r["returncode"] == 0 and r["decode_tok_s"] is not None for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
