"""`moe-offload bench`: latency, throughput, memory and expert-cache figures, per MOE_OFFLOAD_RATIO.

Flags, rules and console lines follow OpenVINO GenAI's tools/llm_bench (`-m -d -t -ic -lc -n -p -pf -rj -r`) so
numbers can be set beside the reference system's:
- `-n N` runs N + 1 iterations; iteration 0 is a warm-up (first-call allocations, page cache, the expert cache
  filled by routing) and is excluded from every average. Later iterations start with the expert cache as the
  previous one left it, like a server answering the same prompt again.
- `-ic` is the number of new tokens. Generation is greedy and forced to exactly that many (EOS suppressed with
  min_new_tokens), so every iteration and every ratio does the same work.
- 1st token latency: from the generate() call to the first new token (prefill included). 2nd token latency: the
  mean gap between the later tokens; 2nd tokens throughput = 1000 / that. "Infer" latencies time the model's
  eager forward calls alone, without sampling and generate's own bookkeeping; decode steps replayed as a CUDA
  graph (decoding.py) are no forward calls, so then only the prefill and the first step are timed there.
`--sweep-ratio` repeats the workload at several ratios (a fresh pipeline each) into one report and plot.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from typing import Any, Callable, NamedTuple

import torch

from ..config import load_properties_file, make_config, parse_ratio
from ..errors import MoeOffloadError, read_user_text
from .environment import machine, utc_now, versions
from .report import (SCHEMA, log_info, print_average, print_iteration, print_sweep, require_matplotlib, summarize,
                     write_csv, write_json, write_plot)

TASKS = ("text_gen",)
DEFAULT_INFER_COUNT = 128
DEFAULT_PROMPT = ('import json\n\n\ndef load_config(path):\n'
                  '    """Read a JSON file of settings and return them as a dict, with defaults for missing keys."""\n')


class GenerationTimer:
    """Time stamps around one generate() call.

    As a transformers streamer (put/end; duck-typed so that importing this module for the CLI does not import
    transformers) it stamps each new token when generate() hands it over; the first put() carries the prompt ids
    and marks the start. Hooks on the model time each eager forward call (on CUDA waiting for the device first,
    since kernels run asynchronously). A forward replayed from a CUDA graph (decoding.py) runs no hooks: a
    replayed prefill is timed from the prompt to the first token instead. `after_prefill` is called once,
    when the prefill has finished and before any decode step.
    """

    def __init__(self, model: torch.nn.Module, sync: Callable[[], None],
                 after_prefill: Callable[[], None] | None = None):
        self.sync = sync
        self.after_prefill = after_prefill
        self.token_times: list[float] = []
        self.forward_ms: list[float] = []
        self._prompt_time: float | None = None
        self._forward_start = 0.0
        self._hooks = [model.register_forward_pre_hook(self._before_forward),
                       model.register_forward_hook(self._after_forward)]

    def put(self, value: torch.Tensor) -> None:
        # no sync: a token handed over is already on the host (transformers' generate and the static decoder both
        # read it back first), and waiting here for steps the decoder has queued ahead would idle the device
        now = time.perf_counter()
        if self._prompt_time is None:
            self._prompt_time = now
            return
        if not self.token_times and not self.forward_ms:  # the prefill was replayed: no hook timed it
            self._prefill_done((now - self._prompt_time) * 1000)
        self.token_times.append(now)

    def _prefill_done(self, ms: float) -> None:
        self.forward_ms.append(ms)
        if self.after_prefill is not None:
            self.after_prefill()

    def end(self) -> None:
        """generate() is done; nothing is buffered."""

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()

    def _before_forward(self, module, args) -> None:
        if _capturing():  # a CUDA graph is being recorded (decoding.py): nothing runs, and syncing would break it
            return
        self.sync()
        self._forward_start = time.perf_counter()

    def _after_forward(self, module, args, output) -> None:
        if _capturing():
            return
        self.sync()
        ms = (time.perf_counter() - self._forward_start) * 1000
        if self.forward_ms:
            self.forward_ms.append(ms)
        else:
            self._prefill_done(ms)


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def reset_peak_rss() -> bool:
    """Linux lets a process reset its own peak RSS (VmHWM) by writing 5 to /proc/self/clear_refs."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """VmHWM where /proc has it (the peak since reset_peak_rss), else getrusage's peak since process start."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def run_iteration(pipe, prompt: str, infer_count: int, iteration: int) -> dict[str, Any]:
    """One greedy generation of exactly `infer_count` tokens, measured; a row of report.ITERATION_FIELDS."""
    on_cuda = pipe.device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(pipe.device)) if on_cuda else (lambda: None)
    pipe.reset_offload_stats()
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(pipe.device)
    reset_peak_rss()
    start = time.perf_counter()
    args = pipe._generate_kwargs(prompt, infer_count, do_sample=False, min_new_tokens=infer_count)
    input_size = int(args["input_ids"].shape[1])
    timer = GenerationTimer(pipe.model, sync)
    sync()
    generate_start = time.perf_counter()
    try:
        with torch.inference_mode():
            new_tokens = pipe.generate_tokens(**args, streamer=timer)
    finally:
        timer.detach()
    generate_end = time.perf_counter()
    pipe.tokenizer.decode(new_tokens, skip_special_tokens=True)
    detokenized = time.perf_counter()

    output_size = int(new_tokens.numel())
    gaps = [(b - a) * 1000 for a, b in zip(timer.token_times, timer.token_times[1:])]
    second = _mean(gaps)
    stats = pipe.get_offload_stats()
    streamed = stats["bytes_streamed"]
    host_bytes = streamed["host"] + stats["bytes_read_in_place"]  # copied, or read in place by the kernel
    return {
        "ratio": stats["ratio"],
        "iteration": iteration,
        "warm_up": iteration == 0,
        "input_size": input_size,
        "output_size": output_size,
        "infer_count": infer_count,
        "tokenization_ms": (generate_start - start) * 1000,
        "detokenization_ms": (detokenized - generate_end) * 1000,
        "generation_s": generate_end - generate_start,
        "latency_ms": (generate_end - generate_start) * 1000 / output_size,
        "first_latency_ms": (timer.token_times[0] - generate_start) * 1000,
        "second_avg_latency_ms": second,
        "throughput_tps": 1000 / second if second else None,
        "forwards": len(timer.forward_ms),
        "first_infer_ms": timer.forward_ms[0],
        "other_infer_avg_ms": _mean(timer.forward_ms[1:]),
        "max_rss_mb": peak_rss_mb(),
        "max_device_bytes": torch.cuda.max_memory_allocated(pipe.device) if on_cuda else None,
        "hits": stats["hits"],
        "misses": stats["misses"],
        "hit_rate": stats["hit_rate"],
        "host_bytes": host_bytes,
        "disk_bytes": streamed["disk"],
        "host_bytes_per_token": host_bytes / output_size,
        "disk_bytes_per_token": streamed["disk"] / output_size,
    }


def device_weight_bytes(pipe) -> int:
    """Non-expert weights and buffers (tied ones once) + resident experts + the streaming scratch once allocated."""
    tensors = (*pipe.model.parameters(), *pipe.model.buffers())
    dense = {t.data_ptr(): t.nbytes for t in tensors if t.device.type == pipe.device.type}
    stats = pipe.get_offload_stats()
    return sum(dense.values()) + stats["device_expert_bytes"] + stats["device_staging_bytes"]


# ----------------------------------------------------------------------------------------------- inputs


def read_prompt_file(path: str) -> str:
    """One prompt: llm_bench's JSONL (`{"prompt": ...}` per line; one line here) for *.jsonl, else the whole text."""
    text = read_user_text(path, "prompt file")
    if not path.lower().endswith(".jsonl"):
        prompt = text.rstrip("\n")
    else:
        prompts = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise MoeOffloadError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
                raise MoeOffloadError(f'{path}:{number}: expected {{"prompt": "..."}}')
            prompts.append(item["prompt"])
        if len(prompts) != 1:
            raise MoeOffloadError(f"{path} holds {len(prompts)} prompts; bench runs exactly one (one JSONL line)")
        prompt = prompts[0]
    if not prompt.strip():
        raise MoeOffloadError(f"prompt file {path} holds an empty prompt")
    return prompt


def parse_sweep(text: str) -> list[int]:
    """`100,50,25,10,0` -> [100, 50, 25, 10, 0], in the order given."""
    ratios: list[int] = []
    for item in text.split(","):
        try:
            ratio = parse_ratio(item.strip()) if item.strip() else None
        except MoeOffloadError:
            ratio = None
        if ratio is None:
            raise MoeOffloadError(f"--sweep-ratio {text!r}: {item.strip()!r} is not an integer 0-100 "
                                  "(write e.g. 100,50,25,10,0)")
        if ratio in ratios:
            raise MoeOffloadError(f"--sweep-ratio {text!r}: ratio {ratio} is listed twice")
        ratios.append(ratio)
    return ratios


def _check_output(path: str | None, flag: str) -> None:
    if path is not None and os.path.isdir(path):
        raise MoeOffloadError(f"{flag} {path} is a folder; give a file name")


class Workload(NamedTuple):
    """What check_args found valid: everything a run needs besides the flags themselves."""

    model: str
    device: str
    properties: dict[str, Any]  # -lc, as given
    ratios: list[int | None]  # None: the ratio of -lc (or the default)
    prompt: str


def check_args(args: argparse.Namespace) -> Workload:
    """Every user mistake, found before a model is loaded."""
    from ..pipeline import DEFAULT_MODEL, resolve_device

    if args.task not in TASKS:
        raise MoeOffloadError(f"-t {args.task}: only text_gen is supported")
    if args.infer_count < 1:
        raise MoeOffloadError("-ic must be at least 1")
    if args.num_iters < 1:
        raise MoeOffloadError("-n must be at least 1 (iteration 0, the warm-up, comes on top)")
    device = str(resolve_device(args.device))
    model = args.model or DEFAULT_MODEL
    if not args.model and not os.path.isdir(DEFAULT_MODEL):
        raise MoeOffloadError(f"the shipped small model is not installed ({DEFAULT_MODEL}); pass -m MODEL")
    properties = load_properties_file(args.load_config) if args.load_config else {}
    make_config(properties)
    ratios: list[int | None] = parse_sweep(args.sweep_ratio) if args.sweep_ratio is not None else [None]
    prompt = read_prompt_file(args.prompt_file) if args.prompt_file else args.prompt
    if prompt is not None and not prompt.strip():
        raise MoeOffloadError("-p: empty prompt")
    for path, flag in ((args.report_json, "-rj"), (args.report, "-r"), (args.plot, "--plot")):
        _check_output(path, flag)
    if args.plot:
        require_matplotlib()
    return Workload(model, device, properties, ratios, DEFAULT_PROMPT if prompt is None else prompt)


# ----------------------------------------------------------------------------------------------- run


def _metadata(args: argparse.Namespace, pipe, properties: dict[str, Any], rss_scope: str) -> dict[str, Any]:
    return {
        "model": os.path.abspath(pipe.models_path),
        "device": str(pipe.device),
        "dtype": str(pipe.model.dtype).replace("torch.", ""),
        "task": args.task,
        "infer_count": args.infer_count,
        "num_iters": args.num_iters,
        "prompt_source": args.prompt_file or ("-p" if args.prompt is not None else "built-in"),
        "properties": properties,
        "rss_scope": rss_scope,
        "versions": versions(),
        "machine": machine(),
        "date_utc": utc_now(),
    }


def _check_length(pipe, prompt: str, infer_count: int) -> None:
    limit = getattr(pipe.model.config, "max_position_embeddings", None)
    prompt_tokens = len(pipe.tokenizer(prompt)["input_ids"])
    if limit and prompt_tokens + infer_count > limit:
        raise MoeOffloadError(f"prompt ({prompt_tokens} tokens) + -ic {infer_count} exceeds the model's "
                              f"{limit} positions")


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Load, warm up, measure, for each ratio; report files are rewritten after every ratio so that a sweep that
    dies part-way keeps what it measured."""
    from ..pipeline import LLMPipeline

    work = check_args(args)
    rss_scope = "iteration" if reset_peak_rss() else "process"
    report: dict[str, Any] = {"schema": SCHEMA, "metadata": {}, "runs": []}
    for ratio in work.ratios:
        run_properties = {k.upper(): v for k, v in work.properties.items()}
        if ratio is not None:
            run_properties["MOE_OFFLOAD_RATIO"] = ratio
        started = time.perf_counter()
        pipe = LLMPipeline(work.model, work.device, config=run_properties, progress=sys.stderr.isatty(),
                           require_tokenizer=True)
        try:
            load_s = time.perf_counter() - started
            log_info(f"Model path={os.path.abspath(pipe.models_path)}, device={pipe.device}, "
                     f"MOE_OFFLOAD_RATIO={pipe.config.moe_offload_ratio}")
            log_info(f"Pipeline initialization time: {load_s:.2f}s")
            _check_length(pipe, work.prompt, args.infer_count)
            if not report["metadata"]:
                report["metadata"] = _metadata(args, pipe, work.properties, rss_scope)
            run = {"ratio": pipe.config.moe_offload_ratio, "properties": run_properties, "load_s": load_s,
                   "device_weight_bytes": device_weight_bytes(pipe), "offload": pipe.get_offload_stats(),
                   "iterations": []}
            for iteration in range(args.num_iters + 1):
                row = run_iteration(pipe, work.prompt, args.infer_count, iteration)
                print_iteration(row)
                run["iterations"].append(row)
        finally:
            pipe.close()
            del pipe
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        run["average"] = summarize(run["iterations"])
        print_average(run)
        report["runs"].append(run)
        _write_reports(args, report)
    if len(report["runs"]) > 1:
        print_sweep(report["runs"])
    return report


def _write_reports(args: argparse.Namespace, report: dict[str, Any]) -> None:
    if args.report_json:
        write_json(report, args.report_json)
    if args.report:
        write_csv(report, args.report)
    if args.plot:
        write_plot(report, args.plot)


def _cmd_bench(args: argparse.Namespace) -> int:
    run_bench(args)
    for path, what in ((args.report_json, "JSON report"), (args.report, "CSV report"), (args.plot, "plot")):
        if path:
            log_info(f"{what} -> {path}")
    return 0


def add_bench_command(subparsers) -> argparse.ArgumentParser:
    """Register `bench` on an argparse subparsers object; returns the subparser."""
    bench = subparsers.add_parser("bench", help="llm_bench-style latency / throughput / memory benchmark")
    bench.add_argument("-m", "--model", default=None, help="checkpoint folder (default: the shipped small model)")
    bench.add_argument("-d", "--device", default=None,
                       help="cpu, cuda or gpu (= cuda); default cuda when available")
    bench.add_argument("-t", "--task", default="text_gen", help="text_gen (the only task)")
    bench.add_argument("-ic", "--infer_count", type=int, default=DEFAULT_INFER_COUNT,
                       help=f"new tokens per generation, forced (greedy, EOS ignored); default {DEFAULT_INFER_COUNT}")
    bench.add_argument("-lc", "--load_config", default=None, help="JSON file (or inline JSON) of properties")
    bench.add_argument("-n", "--num_iters", type=int, default=1,
                       help="measured iterations; one warm-up iteration runs first and is excluded (default 1)")
    prompt = bench.add_mutually_exclusive_group()
    prompt.add_argument("-p", "--prompt", default=None, help="prompt text (default: a built-in code prompt)")
    prompt.add_argument("-pf", "--prompt_file", default=None,
                        help='prompt file: llm_bench JSONL ({"prompt": ...}, one line) if *.jsonl, else plain text')
    bench.add_argument("-rj", "--report_json", default=None, help="write the JSON report here")
    bench.add_argument("-r", "--report", default=None, help="write the CSV report here")
    bench.add_argument("--sweep-ratio", default=None,
                       help="comma-separated MOE_OFFLOAD_RATIO values, e.g. 100,50,25,10,0 (overrides -lc's)")
    bench.add_argument("--plot", default=None, help="PNG of tokens/s, hit rate and device memory vs ratio")
    bench.set_defaults(run=_cmd_bench)
    return bench
