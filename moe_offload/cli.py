"""`moe-offload` command line: generate | tune | info | trace | simulate | bench | quantize | serve.

Every user mistake ends as one line on stderr and exit status 2 (MoeOffloadError, bad flags); a traceback
means a bug in moe-offload.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Any

from .errors import MoeOffloadError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        raise MoeOffloadError(message)


def _properties(args: argparse.Namespace) -> dict[str, Any]:
    props: dict[str, Any] = {}
    for flag, name in (("ratio", "MOE_OFFLOAD_RATIO"), ("host_cache", "MOE_HOST_CACHE"), ("dtype", "MOE_DTYPE")):
        value = getattr(args, flag, None)
        if value is not None:
            props[name] = value
    return props


def _cmd_generate(args: argparse.Namespace) -> int:
    from .pipeline import LLMPipeline

    pipe = LLMPipeline(args.model, args.device, config=args.load_config,
                       progress=sys.stderr.isatty(), require_tokenizer=True, **_properties(args))
    if sys.stderr.isatty() or args.stats:  # beside the progress bars; a script reads them in --stats' JSON too
        _say_choices(pipe)
    sampling = {"do_sample": args.temperature > 0}
    if args.temperature > 0:
        sampling.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    if args.seed is not None:
        import torch

        torch.manual_seed(args.seed)
    sys.stdout.write(args.prompt)
    for piece in pipe.stream(args.prompt, max_new_tokens=args.max_new_tokens, **sampling):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.stats:
        print(json.dumps(pipe.get_offload_stats(), indent=1), file=sys.stderr)
    return 0


def _say_choices(pipe) -> None:
    for choice in pipe.choices:
        print(f"moe-offload: {choice.line()}", file=sys.stderr)


def _cmd_tune(args: argparse.Namespace) -> int:
    """Measure this machine's choices for the model at each ratio again, replacing the stored profile."""
    from .config import parse_ratio
    from .pipeline import LLMPipeline

    ratios = [parse_ratio(r) for r in str(args.ratio).split(",")]
    for ratio in ratios:
        pipe = LLMPipeline(args.model, args.device, config=args.load_config, progress=sys.stderr.isatty(),
                           retune=True, **{**_properties(args), "MOE_OFFLOAD_RATIO": ratio})
        print(f"ratio {ratio}:")
        for choice in pipe.choices:
            print(f"  {choice.line()}")
        pipe.close()
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from .checkpoint import Checkpoint
    from .tools.info import describe, format_info

    info = describe(Checkpoint(args.path))
    print(json.dumps(info, indent=1) if args.json else format_info(info))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moe-offload", description="Run MoE checkpoints with part of the experts on the GPU.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = sub.add_parser("generate", help="stream a continuation of a prompt to stdout")
    gen.add_argument("prompt")
    gen.add_argument("--model", "-m", default=None, help="checkpoint folder (default: the shipped small model)")
    gen.add_argument("--ratio", help="MOE_OFFLOAD_RATIO: percent of routed experts resident on the device (0-100)")
    gen.add_argument("--device", "-d", default=None, help="cpu or cuda (default: cuda when available)")
    gen.add_argument("--max-new-tokens", "-n", type=int, default=64)
    gen.add_argument("--host-cache", help="MOE_HOST_CACHE: host RAM for non-resident experts, e.g. 32GiB or 0")
    gen.add_argument("--dtype", help="MOE_DTYPE: auto, float32, bfloat16, float16")
    gen.add_argument("--load-config", "-lc", help="JSON file (or inline JSON) of properties")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=50)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stats", action="store_true", help="print offload counters to stderr at the end")
    gen.set_defaults(run=_cmd_generate)

    tune = sub.add_parser("tune", help="measure the load-time choices for this machine again (MOE_CPU_EXPERTS=auto) "
                                       "and store them in its profile")
    tune.add_argument("--model", "-m", default=None, help="checkpoint folder (default: the shipped small model)")
    tune.add_argument("--ratio", default="0,25,50,75", help="MOE_OFFLOAD_RATIO values, comma-separated (each is "
                                                          "measured and stored apart)")
    tune.add_argument("--device", "-d", default=None, help="cpu or cuda (default: cuda when available)")
    tune.add_argument("--host-cache", help="MOE_HOST_CACHE, as for generate")
    tune.add_argument("--dtype", help="MOE_DTYPE, as for generate")
    tune.add_argument("--load-config", "-lc", help="JSON file (or inline JSON) of properties")
    tune.set_defaults(run=_cmd_tune)

    info = sub.add_parser("info", help="layers, experts, bytes per expert and device bytes per ratio")
    info.add_argument("path")
    info.add_argument("--json", action="store_true")
    info.set_defaults(run=_cmd_info)

    from .quant.command import add_quantize_command
    from .server.command import add_serve_command
    from .tools.benchmark import add_bench_command
    from .tools.simulate import add_simulate_command
    from .tools.trace import add_trace_command

    add_trace_command(sub)
    add_simulate_command(sub)
    add_bench_command(sub)
    add_quantize_command(sub)
    add_serve_command(sub, _properties)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if getattr(args, "max_new_tokens", 1) < 1:
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
