"""The `bench` report: its one schema, the warm-up-excluding averages, the console lines and the JSON / CSV / PNG
writers.

Why one module: the console, the JSON file, the CSV file, the plot and the tests all read the same field lists
below, so a field added in one place cannot silently go missing from another. `validate` runs before every
write; a failure there is a bug in moe-offload (ValueError), not a user error.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
from typing import Any

from ..errors import MoeOffloadError
from .info import human_bytes

SCHEMA = "moe-offload-bench/1"

_INT = (int,)
_NUM = (int, float)
_OPT_INT = (int, type(None))
_OPT_NUM = (int, float, type(None))

# One row per iteration, in CSV column order. Iteration 0 is the warm-up (llm_bench's rule).
ITERATION_FIELDS: dict[str, tuple[type, ...]] = {
    "ratio": _INT,                    # MOE_OFFLOAD_RATIO of this run
    "iteration": _INT,
    "warm_up": (bool,),
    "input_size": _INT,               # prompt tokens
    "output_size": _INT,              # generated tokens (= infer_count: generation is forced to that length)
    "infer_count": _INT,              # -ic
    "tokenization_ms": _NUM,
    "detokenization_ms": _NUM,
    "generation_s": _NUM,             # the generate() call
    "latency_ms": _NUM,               # generation time / output tokens (llm_bench "Latency", ms/token)
    "first_latency_ms": _NUM,         # generate() call -> first new token
    "second_avg_latency_ms": _OPT_NUM,  # mean gap between later tokens; None when only one token was generated
    "throughput_tps": _OPT_NUM,       # 1000 / second_avg_latency_ms
    "forwards": _INT,                 # timed forwards: the prefill + eager decode steps (graph replays run no hooks)
    "first_infer_ms": _NUM,           # the prefill forward alone (replayed from a graph: prompt to first token)
    "other_infer_avg_ms": _OPT_NUM,   # mean of the later eager forwards alone
    "max_rss_mb": _NUM,               # peak resident set, MiB (scope: metadata.rss_scope)
    "max_device_bytes": _OPT_INT,     # torch.cuda.max_memory_allocated; None on CPU
    "hits": _INT,                     # expert-cache hits / misses over all MoE layers
    "misses": _INT,
    "hit_rate": _OPT_NUM,             # None when the model routed nothing (no MoE work)
    "host_bytes": _INT,               # expert bytes from the host tier (copied, or read in place) / from disk
    "disk_bytes": _INT,
    "host_bytes_per_token": _NUM,     # ... per generated token (prefill's streaming included)
    "disk_bytes_per_token": _NUM,
}

AVERAGED_FIELDS = ("input_size", "output_size", "tokenization_ms", "generation_s", "latency_ms", "first_latency_ms",
                   "second_avg_latency_ms", "throughput_tps", "first_infer_ms", "other_infer_avg_ms", "max_rss_mb",
                   "max_device_bytes", "hits", "misses", "hit_rate", "host_bytes_per_token", "disk_bytes_per_token")

_STAT = {"mean": _OPT_NUM, "std": _OPT_NUM}

# The whole report. A dict is an object with exactly these keys, [spec] a list of spec, a tuple the allowed types.
REPORT_SCHEMA: dict[str, Any] = {
    "schema": (str,),
    "metadata": {
        "model": (str,),
        "device": (str,),
        "dtype": (str,),
        "task": (str,),
        "infer_count": _INT,
        "num_iters": _INT,            # measured iterations (-n); the warm-up comes on top
        "prompt_source": (str,),      # "built-in", "-p" or the -pf path
        "properties": (dict,),        # -lc as given; each run's effective ones are in runs[].properties
        "rss_scope": (str,),          # "iteration" (peak reset per iteration) or "process" (peak since start)
        "versions": {"moe_offload": (str,), "torch": (str,), "transformers": (str,), "python": (str,)},
        "machine": {"platform": (str,), "cpu_count": _OPT_INT, "gpu": (str, type(None))},
        "date_utc": (str,),
    },
    "runs": [{
        "ratio": _INT,
        "properties": (dict,),
        "load_s": _NUM,
        "device_weight_bytes": _INT,  # non-expert weights + resident experts + streaming scratch, as loaded
        "offload": (dict,),           # pipe.get_offload_stats() right after load
        "iterations": [ITERATION_FIELDS],
        "average": {"iterations": _INT, **{name: _STAT for name in AVERAGED_FIELDS}},
    }],
}


def validate(value: Any, spec: Any = None, where: str = "report") -> None:
    """Raise ValueError naming the first place where `value` departs from `spec` (default REPORT_SCHEMA)."""
    spec = REPORT_SCHEMA if spec is None else spec
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected an object, got {type(value).__name__}")
        if set(value) != set(spec):
            raise ValueError(f"{where}: keys missing {sorted(set(spec) - set(value))}, "
                             f"unexpected {sorted(set(value) - set(spec))}")
        for key, sub in spec.items():
            validate(value[key], sub, f"{where}.{key}")
    elif isinstance(spec, list):
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list, got {type(value).__name__}")
        for index, item in enumerate(value):
            validate(item, spec[0], f"{where}[{index}]")
    elif type(value) not in spec:  # exact types: a bool is not an int here
        raise ValueError(f"{where}: expected {'/'.join(t.__name__ for t in spec)}, got {type(value).__name__}")


def summarize(iterations: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and population std of AVERAGED_FIELDS over the non-warm-up iterations (None where no value).

    Population std, so that one measured iteration gives 0 rather than nothing.
    """
    measured = [row for row in iterations if not row["warm_up"]]
    average: dict[str, Any] = {"iterations": len(measured)}
    for name in AVERAGED_FIELDS:
        values = [row[name] for row in measured if row[name] is not None]
        average[name] = {"mean": statistics.fmean(values) if values else None,
                         "std": statistics.pstdev(values) if values else None}
    return average


def _open_for_write(path: str, newline: str | None = None):
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return open(path, "w", encoding="utf-8", newline=newline)
    except OSError as err:
        raise MoeOffloadError(f"cannot write {path}: {err.strerror or err}") from None


def write_json(report: dict[str, Any], path: str) -> None:
    validate(report)
    with _open_for_write(path) as handle:
        json.dump(report, handle, indent=1)
        handle.write("\n")


def write_csv(report: dict[str, Any], path: str) -> None:
    """ITERATION_FIELDS columns: each run's iterations, then its average row (iteration = "average", means)."""
    validate(report)
    with _open_for_write(path, newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(ITERATION_FIELDS))
        writer.writeheader()
        for run in report["runs"]:
            writer.writerows(run["iterations"])
            means = {name: run["average"][name]["mean"] for name in AVERAGED_FIELDS}
            writer.writerow({"ratio": run["ratio"], "iteration": "average", **means})


def require_matplotlib() -> None:
    """Checked before benchmarking, so a missing matplotlib does not surface after minutes of work."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MoeOffloadError("--plot needs matplotlib: pip install 'matplotlib>=3.5,<4'") from None


def device_memory(run: dict[str, Any]) -> tuple[float, bool]:
    """(bytes, measured): CUDA's peak allocation when there is one, else the weights' device bytes as loaded."""
    peak = run["average"]["max_device_bytes"]["mean"]
    return (peak, True) if peak is not None else (run["device_weight_bytes"], False)


def write_plot(report: dict[str, Any], path: str) -> None:
    """Decode tokens/s, hit rate and device memory against MOE_OFFLOAD_RATIO, one point per run."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted(report["runs"], key=lambda run: run["ratio"])
    ratios = [run["ratio"] for run in runs]
    memory = [device_memory(run) for run in runs]
    measured = all(flag for _, flag in memory)
    panels = (
        ("decode throughput (2nd+ tokens/s)", [run["average"]["throughput_tps"]["mean"] for run in runs]),
        ("expert-cache hit rate", [run["average"]["hit_rate"]["mean"] for run in runs]),
        ("peak device memory (MiB)" if measured else
         "device weights, estimated (MiB):\nnon-expert + resident experts + scratch",
         [value / 2**20 for value, _ in memory]),
    )
    meta = report["metadata"]
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), constrained_layout=True)
    for axis, (label, values) in zip(axes, panels):
        axis.plot(ratios, [float("nan") if v is None else v for v in values], marker="o")
        axis.set_xlabel("MOE_OFFLOAD_RATIO (% of experts resident)")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
    axes[1].set_ylim(0, 1.05)
    figure.suptitle(f"{os.path.basename(meta['model'].rstrip(os.sep))} on {meta['device']} ({meta['dtype']}), "
                    f"{meta['infer_count']} new tokens, {meta['num_iters']} iterations")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        figure.savefig(path, dpi=100)
    except OSError as err:
        raise MoeOffloadError(f"cannot write {path}: {err.strerror or err}") from None
    finally:
        plt.close(figure)


# ----------------------------------------------------------------------------------------------- console


def log_info(message: str) -> None:
    """llm_bench's console format (`[ INFO ] ...`, on stdout) so its log parsers read ours too."""
    print(f"[ INFO ] {message}", flush=True)


def _fmt(value: float | None, spec: str = ".2f", unit: str = "") -> str:
    return "NA" if value is None else f"{value:{spec}}{unit}"


def _count(value: float) -> str:
    """A counter, or the mean of counters (which may have a fraction)."""
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def _means(run: dict[str, Any]) -> dict[str, Any]:
    return {name: run["average"][name]["mean"] for name in AVERAGED_FIELDS}


def _memory_line(rss_mb: float, device_bytes: float | None) -> str:
    device = "NA (cpu)" if device_bytes is None else f"{device_bytes / 2**20:.2f} MBytes"
    return f"Max rss memory cost: {rss_mb:.2f} MBytes, max device memory: {device}"


def _offload_line(ratio: int, values: dict[str, Any]) -> str:
    rate = _fmt(None if values["hit_rate"] is None else values["hit_rate"] * 100, unit="%")
    return (f"MoE offload: ratio {ratio}, hits {_count(values['hits'])}, misses {_count(values['misses'])}, "
            f"hit rate {rate}, bytes/token host {human_bytes(values['host_bytes_per_token'])} "
            f"disk {human_bytes(values['disk_bytes_per_token'])}")


def print_iteration(row: dict[str, Any]) -> None:
    prefix = "[warm-up]" if row["warm_up"] else f"[{row['iteration']}]"
    lines = (
        f"Input token size: {row['input_size']}, Output size: {row['output_size']}, Infer count: "
        f"{row['infer_count']}, Tokenization Time: {row['tokenization_ms']:.2f}ms, Detokenization Time: "
        f"{row['detokenization_ms']:.2f}ms, Generation Time: {row['generation_s']:.2f}s, Latency: "
        f"{row['latency_ms']:.2f} ms/token",
        f"First token latency: {row['first_latency_ms']:.2f} ms/token, other tokens latency: "
        f"{_fmt(row['second_avg_latency_ms'], unit=' ms/token')}, len of tokens: {row['output_size']}",
        f"First infer latency: {row['first_infer_ms']:.2f} ms/infer, other infers latency: "
        f"{_fmt(row['other_infer_avg_ms'], unit=' ms/infer')}, inference count: {row['forwards']}, "
        f"2nd token throughput: {_fmt(row['throughput_tps'], unit=' tokens/s')}",
        _memory_line(row["max_rss_mb"], row["max_device_bytes"]),
        _offload_line(row["ratio"], row),
    )
    for line in lines:
        log_info(f"{prefix} {line}")


def print_average(run: dict[str, Any]) -> None:
    avg = _means(run)
    log_info("<<< Warm-up iteration is excluded. >>>")
    log_info(f"[Total] Iterations: {run['average']['iterations']}")
    log_info(f"[Average] Latency: {avg['latency_ms']:.2f} ms/token, 1st token latency: "
             f"{avg['first_latency_ms']:.2f} ms/token, 2nd token latency: "
             f"{_fmt(avg['second_avg_latency_ms'], unit=' ms/token')}, 2nd tokens throughput: "
             f"{_fmt(avg['throughput_tps'], unit=' tokens/s')}")
    log_info(f"[Average] {_memory_line(avg['max_rss_mb'], avg['max_device_bytes'])}")
    log_info(f"[Average] {_offload_line(run['ratio'], avg)}")


def print_sweep(runs: list[dict[str, Any]]) -> None:
    log_info("Sweep over MOE_OFFLOAD_RATIO (averages, warm-up excluded; device MiB: CUDA peak, else the weights "
             "as loaded):")
    log_info(f"{'ratio':>5} {'1st token ms':>12} {'2nd token ms':>12} {'tokens/s':>9} {'hit rate':>8} "
             f"{'device MiB':>10}")
    for run in runs:
        avg = _means(run)
        memory, _ = device_memory(run)
        log_info(f"{run['ratio']:>5} {avg['first_latency_ms']:>12.2f} {_fmt(avg['second_avg_latency_ms']):>12} "
                 f"{_fmt(avg['throughput_tps']):>9} {_fmt(avg['hit_rate'], '.3f'):>8} {memory / 2**20:>10.2f}")
