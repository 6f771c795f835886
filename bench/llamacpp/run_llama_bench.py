"""llama.cpp at its best for the side-by-side benchmark: a flag sweep at one -ncmoe value, then the best flags at every
-ncmoe value (llama-bench), and the MoE expert cache (--moe-cache-mib, through llama-batched-bench), each run with
peak GPU memory and its stderr kept.

Why: issue 6 compares moe-offload with llama.cpp's own expert offload (-ncmoe N: the routed experts of the first N
layers stay in host memory and run on the CPU) on the same random Qwen3-30B-A3B-shaped checkpoint, and an audit found
llama.cpp run with its defaults. So the peer gets a sweep of what its speed depends on here (CPU threads -t, flash
attention -fa, and -lm mmap vs -lm none: mmap keeps the host experts in pageable file pages, none reads them into
pinned CUDA host memory; README.md here says how that was read in the sources), and the best decode speed's flags are
used for every -ncmoe value. Each configuration is its own process so that its peak device memory can be read: a
thread reads the GPU's memory in use every 50 ms (NVML, what `nvidia-smi --query-gpu=memory.used` reads, or nvidia-smi
itself where NVML does not load); the peak minus the idle reading taken just before is that process's device memory,
CUDA context included. With neither (a CPU machine) peak_device_bytes is null.
Speeds are the median of the repeats, with their min and max: a repeat stalled by the machine's other work moves a
mean, not a median.

The expert cache is not parsed by llama-bench in this llama.cpp (b11549): only tools built on common_params are, so
run_cache drives llama-batched-bench with one prompt length repeated (-npp P,P,...), each entry a prefill of P tokens
and G single-token decode steps, the first one dropped as llama-bench drops its warm-up run (and a spare last one,
run_cache says why).

Usage: python -m bench.llamacpp.run_llama_bench --llama-bench BUILD/bin/llama-bench -m MODEL.gguf --ncmoe 0,6,12 \
           [--sweep-ncmoe 6 --threads 4,8,12,16 --fa 0,1 --load-modes mmap,none | --flags "-t 16 -fa 1 -lm none"] \
           [--batched-bench BUILD/bin/llama-batched-bench --moe-cache-mib 4096,8192] [-p 128] [-n 32] [-r 3] \
           [--log-dir DIR] [--out report.json]
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

MIB = 1 << 20
THREADS = (4, 8, 12, 16)  # the H200 machine has 16 cores
FLASH_ATTN = (0, 1)
LOAD_MODES = ("mmap", "none")  # pageable mmapped host experts vs pinned (CUDA_Host) ones
DEFAULT_LOG_DIR = os.path.join(tempfile.gettempdir(), "llamacpp-logs")

# llama-bench -v prints llama.cpp's log without its levels, so warnings are told by their words; the common_params
# tools print a level letter (W, E) after the timestamp with --log-prefix.
_WARNING = re.compile(r"^(?:[\d.]+ )?[WE] |(?i:warn|error|fail|consider using|not supported|too small|not cached|"
                      r"is disabled)")
_MODEL_BUFFER = re.compile(r"(\S+) model buffer size =\s*([\d.]+) MiB")
_LOAD_MODE = re.compile(r"\(load_mode = ([\w+]+)\)")
_CACHE_SIZE = re.compile(r"(\S+) MoE cache size =\s*([\d.]+) MiB for ([\d.]+) MiB of host experts")
_CACHE_STATS = re.compile(r"llama_moe_cache: (.+?): hits = (\d+), misses = (\d+), hit rate = ([\d.]+)%, "
                          r"uploaded = ([\d.]+) MiB")
_BATCHED_RESULT = re.compile(r"\{[^{}]*\"speed_tg\"[^{}]*\}")


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


def spread(samples) -> dict | None:
    """{median, min, max, n} of per-repeat tokens/s; None for no samples."""
    samples = [float(s) for s in samples]
    if not samples:
        return None
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples)}


def flags_string(threads: int, flash_attn: int, load_mode: str) -> str:
    """One configuration as arguments that llama-bench and the common_params tools (llama-batched-bench) both parse."""
    return f"-t {threads} -fa {flash_attn} -lm {load_mode}"


def parse_bench_json(results: list[dict]) -> dict:
    """llama-bench -o json (one object per test, its repeats in samples_ts) -> {prefill, decode: spread, build}."""
    def samples(is_test) -> list[float]:
        test = next((r for r in results if is_test(r.get("n_prompt", 0), r.get("n_gen", 0))), None)
        return test.get("samples_ts", []) if test else []

    first = results[0] if results else {}
    return {"prefill": spread(samples(lambda p, g: p > 0 and g == 0)),
            "decode": spread(samples(lambda p, g: g > 0 and p == 0)),
            "build": {key: first.get(key) for key in ("build_commit", "build_number", "backends", "gpu_info")}}


def parse_batched_bench(text: str, repeats: int) -> dict:
    """llama-batched-bench --output-format jsonl (one line per -npp/-ntg/-npl entry) -> {prefill, decode: spread,
    results}: entries 2 to repeats + 1, the first (cold) one dropped as llama-bench drops its warm-up run, any after
    them ignored (run_cache asks for one more, see there). Found anywhere in `text`, so log lines around or between
    them do not matter."""
    results = [json.loads(match) for match in _BATCHED_RESULT.findall(text)][1:1 + repeats]
    return {"prefill": spread(r["speed_pp"] for r in results if r.get("pp", 0) > 0),
            "decode": spread(r["speed_tg"] for r in results if r.get("tg", 0) > 0), "results": results}


def log_facts(text: str) -> dict:
    """What a run's stderr (llama.cpp's log with -v) says: its warnings, the model's buffers by type (CUDA_Host =
    pinned host memory, CPU_Mapped = mmapped file pages, CUDA0 = device), the load mode, the MoE cache."""
    lines = text.splitlines()
    warnings = [line for line in lines if _WARNING.search(line)]
    buffers: dict[str, float] = {}
    for name, mib in _MODEL_BUFFER.findall(text):
        buffers[name] = buffers.get(name, 0.0) + float(mib)
    load_mode = _LOAD_MODE.search(text)
    cache = {"buffers": {name: {"mib": float(mib), "host_experts_mib": float(host)}
                         for name, mib, host in _CACHE_SIZE.findall(text)},
             "stats": {name: {"hits": int(hits), "misses": int(misses), "hit_rate": float(rate) / 100,
                              "uploaded_mib": float(mib)}
                       for name, hits, misses, rate, mib in _CACHE_STATS.findall(text)}}
    return {"warnings": len(warnings), "warning_lines": list(dict.fromkeys(warnings))[:20],
            "model_buffers_mib": buffers, "load_mode": load_mode.group(1) if load_mode else None,
            "moe_cache": cache if cache["buffers"] or cache["stats"] else None}


def _log_path(log_dir: str | None, tool: str, ncmoe: int, flags: str, cache_mib: int | None = None) -> str:
    """A new file in log_dir named after the run, e.g. llama-bench-ncmoe6-t16_fa1_lmnone-XXXX.log."""
    log_dir = log_dir or DEFAULT_LOG_DIR
    os.makedirs(log_dir, exist_ok=True)
    name = f"{tool}-ncmoe{ncmoe}" + ("" if cache_mib is None else f"-cache{cache_mib}") + "-" \
        + re.sub(r"[^\w+]+", "", flags.replace(" -", "_"))
    handle, path = tempfile.mkstemp(prefix=name + "-", suffix=".log", dir=log_dir)
    os.close(handle)
    return path


def _run(command: list[str], log_path: str, gpu: str | None, timeout: float) -> tuple[dict, str, str]:
    """Runs `command` with its stderr written to `log_path` (after the command line) while device memory is polled.
    Returns (the row's process fields, stdout, stderr)."""
    baseline = gpu_memory_used_bytes(gpu)
    poller = PeakMemory(gpu).start() if baseline is not None else None
    started = time.perf_counter()
    header = shlex.join(command) + "\n"
    with open(log_path, "w") as log:
        log.write(header)
        log.flush()
        try:
            done = subprocess.run(command, stdout=subprocess.PIPE, stderr=log, text=True, timeout=timeout)
            returncode, stdout = done.returncode, done.stdout
        except subprocess.TimeoutExpired as error:
            returncode = "timeout"
            stdout = error.stdout.decode(errors="replace") if isinstance(error.stdout, bytes) else error.stdout or ""
    seconds = time.perf_counter() - started
    peak = poller.stop() if poller else None
    with open(log_path, errors="replace") as log:
        stderr = log.read()[len(header):]
    row = {"returncode": returncode, "seconds": round(seconds, 2),
           "peak_device_bytes": None if peak is None else max(0, peak - baseline),
           "baseline_device_bytes": baseline, "memory_samples": poller.samples if poller else 0,
           "command": header.strip(), "log": log_path}
    return row, stdout, stderr


def _speeds(parsed: dict) -> dict:
    """The row's speed keys from {prefill, decode: spread}: X_tok_s (median), X_tok_s_min, X_tok_s_max, repeats."""
    row = {}
    for phase in ("prefill", "decode"):
        stats = parsed[phase] or {}
        row.update({f"{phase}_tok_s": stats.get("median"), f"{phase}_tok_s_min": stats.get("min"),
                    f"{phase}_tok_s_max": stats.get("max")})
    row["repeats"] = min((parsed[p] or {}).get("n", 0) for p in ("prefill", "decode"))
    return row


def run_one(llama_bench: str, gguf: str, ncmoe: int, prompt: int = 128, gen: int = 32, repeats: int = 3,
            ngl: int = 99, flags: str = "", extra: list[str] | None = None, gpu: str | None = None,
            timeout: float = 600, log_dir: str | None = None) -> dict:
    """One llama-bench process at one -ncmoe value with `flags` (flags_string's form) and `extra` arguments: a row of
    speeds (median, min, max of the repeats), peak device memory, the stderr log's path and what it says (-v, so
    llama.cpp logs at all). flags and extra must not share an option: llama-bench takes a repeated option as one
    more value to test, so the process would time both."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    command = [llama_bench, "-m", gguf, "-ngl", str(ngl), "-ncmoe", str(ncmoe), "-p", str(prompt), "-n", str(gen),
               "-r", str(repeats), "-o", "json", "-v"] + shlex.split(flags) + list(extra or [])
    process, stdout, stderr = _run(command, _log_path(log_dir, "llama-bench", ncmoe, flags), gpu, timeout)
    row = {"tool": "llama-bench", "ncmoe": ncmoe, "flags": flags}
    try:
        raw = json.loads(stdout)
        parsed = parse_bench_json(raw)
    except (json.JSONDecodeError, TypeError, AttributeError):
        raw, parsed = None, {"prefill": None, "decode": None, "build": None}
        row["stdout_tail"] = (stdout or "")[-2000:]
    row.update(_speeds(parsed))
    row.update(process)
    row.update(log_facts(stderr), build=parsed["build"], raw=raw)
    if row["returncode"] != 0 or row["decode_tok_s"] is None:
        row["stderr_tail"] = stderr[-3000:]
    return row


def _summary(row: dict) -> str:
    peak = row["peak_device_bytes"]
    return (f"{row['tool']} ncmoe {row['ncmoe']:3d} [{row['flags']}]: prefill {row['prefill_tok_s'] or 0:9.1f} tok/s, "
            f"decode {row['decode_tok_s'] or 0:8.2f} tok/s ({row['decode_tok_s_min'] or 0:.2f}-"
            f"{row['decode_tok_s_max'] or 0:.2f}), peak device {'n/a' if peak is None else f'{peak / 2**30:.2f} GiB'}, "
            f"{row['warnings']} warning lines, {row['seconds']:.1f} s"
            + ("" if row["returncode"] == 0 else f", rc {row['returncode']}: {(row['warning_lines'] or [''])[-1]}"))


def run(llama_bench: str, gguf: str, ncmoe_values, log=print, on_row=None, **kwargs) -> list[dict]:
    """run_one at each -ncmoe value (same kwargs, e.g. flags=the sweep's best); on_row(row) after each, so a caller
    can save what a run cut short has measured."""
    rows = []
    for ncmoe in ncmoe_values:
        rows.append(run_one(llama_bench, gguf, int(ncmoe), **kwargs))
        log(_summary(rows[-1]))
        if on_row:
            on_row(rows[-1])
    return rows


def best(rows: list[dict]) -> dict | None:
    """The row with the fastest median decode (prefill breaks ties); None when no row decoded."""
    done = [r for r in rows if r.get("returncode") == 0 and r.get("decode_tok_s") is not None]
    return max(done, key=lambda r: (r["decode_tok_s"], r.get("prefill_tok_s") or 0), default=None)


def sweep(llama_bench: str, gguf: str, ncmoe: int, threads=THREADS, flash_attn=FLASH_ATTN, load_modes=LOAD_MODES,
          log=print, on_row=None, **kwargs) -> dict:
    """Every threads x flash-attention x load-mode configuration at one -ncmoe value, each a llama-bench process.
    Returns {llamacpp_flags: the best decode's flags (None if none decoded), rows}."""
    rows = []
    for t, fa, lm in itertools.product(threads, flash_attn, load_modes):
        rows.append(run_one(llama_bench, gguf, ncmoe, flags=flags_string(t, fa, lm), **kwargs))
        log("sweep " + _summary(rows[-1]))
        if on_row:
            on_row(rows[-1])
    winner = best(rows)
    return {"llamacpp_flags": winner["flags"] if winner else None, "rows": rows}


def tuned(llama_bench: str, gguf: str, ncmoe_values, sweep_ncmoe: int, threads=THREADS, flash_attn=FLASH_ATTN,
          load_modes=LOAD_MODES, log=print, **kwargs) -> dict:
    """The sweep at `sweep_ncmoe`, then its best flags at every value of `ncmoe_values`:
    {llamacpp_flags, sweep: rows, rows: one per -ncmoe value}. Raises RuntimeError when no sweep run decoded."""
    swept = sweep(llama_bench, gguf, sweep_ncmoe, threads, flash_attn, load_modes, log=log, **kwargs)
    if swept["llamacpp_flags"] is None:
        logs = "; ".join(f"[{r['flags']}] rc {r['returncode']}, log {r['log']}" for r in swept["rows"])
        raise RuntimeError(f"no llama-bench sweep run decoded: {logs}")
    rows = run(llama_bench, gguf, ncmoe_values, log=log, flags=swept["llamacpp_flags"], **kwargs)
    return {"llamacpp_flags": swept["llamacpp_flags"], "sweep": swept["rows"], "rows": rows}


def run_cache(batched_bench: str, gguf: str, ncmoe: int, cache_mib: int, prompt: int = 128, gen: int = 32,
              repeats: int = 3, ngl: int = 99, flags: str = "", extra: list[str] | None = None,
              gpu: str | None = None, timeout: float = 600, log_dir: str | None = None) -> dict:
    """llama.cpp's GPU cache for the experts kept on the CPU: one llama-batched-bench process with -ncmoe `ncmoe` and
    --moe-cache-mib `cache_mib` (0: no cache, the same tool's baseline), entries of a `prompt`-token prefill and `gen`
    decode steps: a cold one (dropped), `repeats` counted, and one more that is not. Why the last: the tool prints
    through llama.cpp's common log, whose writer thread it does not flush before exiting (common/log.cpp says so),
    so what it prints last can be lost; the counted lines come a whole entry earlier. A row as run_one's plus
    moe_cache_mib and what the log says of the cache (its size and hit rates: moe_cache; logged when the context is
    freed, so that part can be missing)."""
    if repeats < 1 or cache_mib < 0:
        raise ValueError(f"repeats must be >= 1 and cache_mib >= 0, got {repeats} and {cache_mib}")
    command = [batched_bench, "-m", gguf, "-ngl", str(ngl), "-ncmoe", str(ncmoe), "--moe-cache-mib", str(cache_mib),
               "-c", str(prompt + gen), "-npp", ",".join([str(prompt)] * (repeats + 2)), "-ntg", str(gen),
               "-npl", "1", "--output-format", "jsonl", "--log-prefix", "--log-colors", "off", "-v"] \
        + shlex.split(flags) + list(extra or [])
    process, stdout, stderr = _run(command, _log_path(log_dir, "llama-batched-bench", ncmoe, flags, cache_mib), gpu,
                                   timeout)
    parsed = parse_batched_bench(stdout or "", repeats)
    row = {"tool": "llama-batched-bench", "ncmoe": ncmoe, "moe_cache_mib": cache_mib, "flags": flags}
    row.update(_speeds(parsed))
    row.update(process)
    row.update(log_facts(stderr), raw=parsed["results"])
    if row["returncode"] != 0 or row["decode_tok_s"] is None:
        row["stderr_tail"] = stderr[-3000:]
        row["stdout_tail"] = (stdout or "")[-2000:]
    return row


def _write(path: str, report) -> None:
    with open(path, "w") as handle:
        json.dump(report, handle, indent=1)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llama-bench", required=True)
    parser.add_argument("-m", "--model", required=True, help="GGUF")
    parser.add_argument("--ncmoe", default="0", help="comma-separated -ncmoe values")
    parser.add_argument("--sweep-ncmoe", type=int, default=None,
                        help="sweep --threads x --fa x --load-modes at this -ncmoe value, then use the best flags")
    parser.add_argument("--threads", default=",".join(map(str, THREADS)), help="the sweep's -t values")
    parser.add_argument("--fa", default=",".join(map(str, FLASH_ATTN)), help="the sweep's -fa values")
    parser.add_argument("--load-modes", default=",".join(LOAD_MODES), help="the sweep's -lm values")
    parser.add_argument("--flags", default="", help="fixed flags instead of a sweep, e.g. '-t 16 -fa 1 -lm none'")
    parser.add_argument("--batched-bench", default=None, help="llama-batched-bench binary, for --moe-cache-mib")
    parser.add_argument("--moe-cache-mib", default="", help="comma-separated cache sizes (MiB) run at every -ncmoe "
                        "value with the chosen flags (0: the same tool without a cache)")
    parser.add_argument("-p", "--prompt", type=int, default=128)
    parser.add_argument("-n", "--gen", type=int, default=32)
    parser.add_argument("-r", "--repeats", type=int, default=3)
    parser.add_argument("--ngl", type=int, default=99)
    parser.add_argument("--extra", default="", help="more arguments for every run, one string")
    parser.add_argument("--gpu", default=None, help="GPU index for the memory reading (default: all GPUs)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per process")
    parser.add_argument("--log-dir", default=None, help="one stderr log per process (default: llamacpp-logs beside "
                        f"--out, else {DEFAULT_LOG_DIR})")
    parser.add_argument("--out", default=None, help="JSON report {llamacpp_flags, sweep, rows, cache_rows}")
    args = parser.parse_args(argv)
    if args.sweep_ncmoe is not None and args.flags:
        parser.error("--sweep-ncmoe and --flags exclude each other")
    if args.moe_cache_mib and not args.batched_bench:
        parser.error("--moe-cache-mib needs --batched-bench")
    for path in (args.llama_bench, args.batched_bench, args.model):
        if path and not os.path.isfile(path):
            parser.error(f"no such file: {path}")
    log_dir = args.log_dir or (os.path.join(os.path.dirname(os.path.abspath(args.out)), "llamacpp-logs")
                               if args.out else None)
    common = dict(prompt=args.prompt, gen=args.gen, repeats=args.repeats, ngl=args.ngl, extra=shlex.split(args.extra),
                  gpu=args.gpu, timeout=args.timeout, log_dir=log_dir)
    report: dict = {"llamacpp_flags": args.flags, "sweep": [], "rows": [], "cache_rows": []}

    def keep(key: str):  # the report rewritten after every process, so a run cut short keeps what it measured
        def on_row(row: dict) -> None:
            report[key].append(row)
            if args.out:
                _write(args.out, report)
        return on_row

    if args.sweep_ncmoe is not None:
        swept = sweep(args.llama_bench, args.model, args.sweep_ncmoe, _ints(args.threads), _ints(args.fa),
                      args.load_modes.split(","), on_row=keep("sweep"), **common)
        report["llamacpp_flags"] = swept["llamacpp_flags"]
        if swept["llamacpp_flags"] is None:
            print("no sweep run decoded; the rows name their logs", file=sys.stderr)
            return 1
    for ncmoe in _ints(args.ncmoe):
        run(args.llama_bench, args.model, [ncmoe], on_row=keep("rows"), flags=report["llamacpp_flags"], **common)
        for cache_mib in _ints(args.moe_cache_mib):
            keep("cache_rows")(run_cache(args.batched_bench, args.model, ncmoe, cache_mib,
                                         flags=report["llamacpp_flags"], **common))
            print(_summary(report["cache_rows"][-1]) + f", cache {cache_mib} MiB", flush=True)
    if args.out:
        _write(args.out, report)
    else:
        print(json.dumps(report, indent=1))
    rows = report["rows"] + report["cache_rows"]
    return 0 if all(r["returncode"] == 0 and r["decode_tok_s"] is not None for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
