"""`moe-offload` command line: generate | chat | serve | tune | info | trace | simulate | bench | quantize.

Every user mistake ends as one line on stderr and exit status 2 (MoeOffloadError, bad flags); a traceback
means a bug in moe-offload. Flags are checked before a model is loaded. One meaning per short flag: -m the model,
-d the device, -n new tokens, -lc properties, -f a prompt file (`bench` keeps llm_bench's own flags).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Any

from . import __version__
from .errors import MoeOffloadError, read_user_text

EXIT_USAGE = 2
CHAT_MAX_NEW_TOKENS = 512  # a reply's bound where the checkpoint sets none


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        raise MoeOffloadError(message)


def _properties(args: argparse.Namespace) -> dict[str, Any]:
    props: dict[str, Any] = {}
    for flag, name in (("ratio", "MOE_OFFLOAD_RATIO"), ("host_cache", "MOE_HOST_CACHE"), ("dtype", "MOE_DTYPE"),
                       ("device_memory", "MOE_DEVICE_MEMORY"), ("context", "MOE_CONTEXT")):
        value = getattr(args, flag, None)
        if value is not None:
            props[name] = value
    return props


def _load(args: argparse.Namespace, **extra: Any):
    from .pipeline import LLMPipeline

    return LLMPipeline(args.model, args.device, config=args.load_config, progress=sys.stderr.isatty(),
                       **extra, **_properties(args))


def _read_prompt(args: argparse.Namespace) -> str:
    """The prompt: the argument, or the text of -f FILE; `-` (either way) reads stdin."""
    if (args.prompt is None) == (args.prompt_file is None):
        raise MoeOffloadError("give a prompt, or -f FILE (- reads stdin), not both" if args.prompt is not None
                              else "a prompt is required: an argument, or -f FILE (- reads stdin)")
    if args.prompt == "-" or args.prompt_file == "-":
        return sys.stdin.read()
    if args.prompt_file is not None:
        return read_user_text(args.prompt_file, "prompt file")
    return args.prompt


def _generation_config(args: argparse.Namespace):
    """The sampling flags as a GenerationConfig, each checked (and named by its flag) before anything loads.
    Flags not given are left unset, so the checkpoint's generation_config.json supplies them; --temperature 0
    is greedy."""
    from .generation import CHECKS, GenerationConfig

    values: dict[str, Any] = {}
    for flag, field in (("max-new-tokens", "max_new_tokens"), ("temperature", "temperature"), ("top-p", "top_p"),
                        ("top-k", "top_k"), ("seed", "rng_seed")):
        value = getattr(args, flag.replace("-", "_"))
        if value is not None:
            try:
                values[field] = CHECKS[field](value)
            except MoeOffloadError as err:
                raise MoeOffloadError(f"--{flag}: {err}") from None
    if "temperature" in values:
        values["do_sample"] = values["temperature"] > 0
    return GenerationConfig(**values)


def _cmd_generate(args: argparse.Namespace) -> int:
    prompt = _read_prompt(args)
    config = _generation_config(args)
    pipe = _load(args, require_tokenizer=True)
    if sys.stderr.isatty() or args.stats:  # beside the progress bars; a script reads them in --stats' JSON too
        _say_choices(pipe)
    sys.stdout.write(prompt)
    for piece in pipe.stream(prompt, config):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.stats:
        print(json.dumps({**pipe.get_offload_stats(), "perf_metrics": pipe.perf_metrics.as_dict()}, indent=1),
              file=sys.stderr)
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from . import chat

    config = _generation_config(args)
    pipe = _load(args, require_tokenizer=True)
    if not getattr(pipe.tokenizer, "chat_template", None):
        raise MoeOffloadError(f"no chat template in {pipe.models_path}: chat needs one (generate does not)")
    defaults = pipe.get_generation_config()
    if config.max_new_tokens is None and defaults.max_new_tokens is None and defaults.max_length is None:
        config = config.update(max_new_tokens=CHAT_MAX_NEW_TOKENS)  # a reply is longer than generate's default
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"moe-offload chat ({pipe.models_path}): {chat.HELP}", file=sys.stderr)
        read = chat.terminal_reader()
    else:
        read = chat.stream_reader(sys.stdin)
    chat.run(pipe, config, read, sys.stdout, sys.stderr, system=args.system, interactive=interactive)
    return 0


def _say_choices(pipe) -> None:
    for choice in pipe.choices:
        print(f"moe-offload: {choice.line()}", file=sys.stderr)


def _cmd_tune(args: argparse.Namespace) -> int:
    """Measure this machine's choices for the model at each ratio again, replacing the stored profile."""
    from .config import parse_ratio

    ratios = [parse_ratio(r) for r in str(args.ratio).split(",")]
    for ratio in ratios:
        args.ratio = ratio
        pipe = _load(args, retune=True)
        print(f"ratio {ratio}:")
        for choice in pipe.choices:
            print(f"  {choice.line()}")
        pipe.close()
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from .checkpoint import Checkpoint
    from .tools.info import describe, format_info

    checkpoint = Checkpoint(args.path)
    info = describe(checkpoint)
    budget = {name: value for name, value in (("MOE_DEVICE_MEMORY", args.device_memory),
                                              ("MOE_CONTEXT", args.context)) if value is not None}
    if budget:  # the memory plan (budget.py): what a budget gives
        from .tools.info import describe_budget, format_budget

        info["memory_plan"] = describe_budget(checkpoint, budget)
    if args.json:
        info.get("memory_plan", {}).pop("summaries", None)
        print(json.dumps(info, indent=1))
    else:
        print(format_info(info) + ("\n" + format_budget(info["memory_plan"]) if budget else ""))
    return 0


def _model_path(args: argparse.Namespace, positional: str) -> str:
    """The model of a command that takes it as an argument or as -m (the same meaning as everywhere else)."""
    given = [value for value in (getattr(args, positional), args.model) if value is not None]
    if not given:
        raise MoeOffloadError(f"the model is required: the {positional} argument or -m PATH")
    if len(given) > 1:
        raise MoeOffloadError(f"give the model once: the {positional} argument or -m PATH, not both")
    return given[0]


def _add_model_flags(parser: argparse.ArgumentParser, ratio_default: str | None = None,
                     ratio_help: str = "MOE_OFFLOAD_RATIO: percent of routed experts resident on the device "
                                       "(0-100)") -> None:
    """The flags of every command that loads a model for generation: which model, where, with which properties."""
    parser.add_argument("--model", "-m", default=None, help="checkpoint folder (default: the shipped small model)")
    parser.add_argument("--device", "-d", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--ratio", default=ratio_default, help=ratio_help)
    parser.add_argument("--host-cache", help="MOE_HOST_CACHE: host RAM for non-resident experts, e.g. 32GiB or 0")
    parser.add_argument("--device-memory", help="MOE_DEVICE_MEMORY: device memory to fit, e.g. 8GiB; the ratio "
                                                "follows from it (instead of --ratio)")
    parser.add_argument("--context", help="MOE_CONTEXT: tokens of context (prompt + reply) planned for")
    parser.add_argument("--dtype", help="MOE_DTYPE: auto, float32, bfloat16, float16")
    parser.add_argument("--load-config", "-lc", help="JSON file (or inline JSON) of properties")


def _add_sampling_flags(parser: argparse.ArgumentParser, max_new_tokens_help: str) -> None:
    """Generation flags; unset ones come from the checkpoint's generation_config.json (greedy if it says nothing)."""
    parser.add_argument("--max-new-tokens", "-n", type=int, default=None, help=max_new_tokens_help)
    parser.add_argument("--temperature", type=float, default=None,
                        help="0 = greedy; > 0 samples (default: the checkpoint's generation config, else greedy)")
    parser.add_argument("--top-p", type=float, default=None, help="sampling: nucleus mass, in (0, 1]")
    parser.add_argument("--top-k", type=int, default=None, help="sampling: keep the k likeliest tokens (0 = all)")
    parser.add_argument("--seed", type=int, default=None, help="sampling: seed of the random draws")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moe-offload", description="Run MoE checkpoints with part of the experts on the GPU.")
    parser.add_argument("--version", action="version", version=f"moe-offload {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = sub.add_parser("generate", help="stream a continuation of a prompt to stdout")
    gen.add_argument("prompt", nargs="?", default=None, help="the prompt; - reads it from stdin")
    gen.add_argument("--prompt-file", "-f", default=None, help="read the prompt from this file (- = stdin)")
    _add_model_flags(gen)
    _add_sampling_flags(gen, "tokens to generate at most (default: the checkpoint's, else 64)")
    gen.add_argument("--stats", action="store_true", help="print offload counters and timings to stderr at the end")
    gen.set_defaults(run=_cmd_generate)

    chat = sub.add_parser("chat", help="talk to the model through its chat template (stdin: one turn per line)")
    _add_model_flags(chat)
    _add_sampling_flags(chat, f"tokens per reply at most (default: the checkpoint's, else {CHAT_MAX_NEW_TOKENS})")
    chat.add_argument("--system", default=None, help="a system message that starts the conversation")
    chat.set_defaults(run=_cmd_chat)

    tune = sub.add_parser("tune", help="measure the load-time choices for this machine again (MOE_CPU_EXPERTS=auto) "
                                       "and store them in its profile")
    _add_model_flags(tune, ratio_default="0,25,50,75",
                     ratio_help="MOE_OFFLOAD_RATIO values, comma-separated (each is measured and stored apart)")
    tune.set_defaults(run=_cmd_tune)

    info = sub.add_parser("info", help="layers, experts, bytes per expert and device bytes per ratio")
    info.add_argument("path", nargs="?", default=None, help="checkpoint folder (or -m PATH)")
    info.add_argument("--model", "-m", default=None, help="checkpoint folder")
    info.add_argument("--json", action="store_true")
    info.add_argument("--device-memory", help="MOE_DEVICE_MEMORY: show the memory plan and the ratio this budget "
                                              "gives, e.g. 8GiB")
    info.add_argument("--context", help="MOE_CONTEXT: tokens of context the memory plan's KV cache holds")
    info.set_defaults(run=_cmd_info, model_positional="path")

    from .quant.command import add_quantize_command
    from .server.command import add_serve_command
    from .tools.benchmark import add_bench_command
    from .tools.simulate import add_simulate_command
    from .tools.trace import add_trace_command

    add_trace_command(sub)
    add_simulate_command(sub)
    add_bench_command(sub)
    add_quantize_command(sub)
    add_serve_command(sub, _add_model_flags, _properties)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        positional = getattr(args, "model_positional", None)
        if positional is not None:  # a command that takes its model as an argument also takes -m
            setattr(args, positional, _model_path(args, positional))
        new_tokens = getattr(args, "max_new_tokens", None)
        if new_tokens is not None and new_tokens < 1:
            raise MoeOffloadError("--max-new-tokens must be at least 1")
        return args.run(args)
    except MoeOffloadError as err:
        print(f"moe-offload: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("moe-offload: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as a tool killed by SIGPIPE would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error flushing stdout at exit
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
