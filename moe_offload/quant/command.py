"""`moe-offload quantize`: the command line of the quantizer (registered by cli.py's build_parser)."""

from __future__ import annotations

import argparse
import sys

from ..errors import positive_int
from .format import BITS
from .methods import METHODS

DEFAULT_METHOD = "mse"
DEFAULT_GROUP_SIZE = 128


def _bits(text: str) -> int:
    if text not in tuple(map(str, BITS)):
        raise argparse.ArgumentTypeError(f"must be {' or '.join(map(str, BITS))}, not {text!r}")
    return int(text)


def _cmd_quantize(args: argparse.Namespace) -> int:
    from .format import QuantSpec
    from .writer import default_group_size, quantize_checkpoint

    group = args.group_size or default_group_size(args.model_dir, DEFAULT_GROUP_SIZE)
    if group != (args.group_size or DEFAULT_GROUP_SIZE):
        print(f"group size {group}: the largest up to {DEFAULT_GROUP_SIZE} that divides every expert's in_features",
              file=sys.stderr)
    spec = QuantSpec(args.bits, group, args.symmetric)
    summary = quantize_checkpoint(args.model_dir, args.output, spec, args.method, progress=sys.stderr.isatty())
    ratio = summary["expert_bytes_out"] / max(summary["expert_bytes_in"], 1)
    print(f"wrote {summary['output']}: {summary['quantized_matrices']} expert matrices at {args.bits} bits "
          f"(group {group}, {'symmetric' if args.symmetric else 'asymmetric'}, {args.method}), expert "
          f"bytes {summary['expert_bytes_in']:,} -> {summary['expert_bytes_out']:,} ({ratio:.3f}x)")
    return 0


def add_quantize_command(subparsers) -> argparse.ArgumentParser:
    """Register `quantize` on an argparse subparsers object; returns the subparser."""
    quant = subparsers.add_parser(
        "quantize", help="write a copy of a MoE checkpoint with int4/int8 routed experts (compressed-tensors)")
    quant.add_argument("model_dir", nargs="?", default=None, help="the unquantized checkpoint folder (or -m PATH)")
    quant.add_argument("--model", "-m", default=None, help="the unquantized checkpoint folder")
    quant.add_argument("--output", "-o", required=True, help="folder to write (must not exist, or be empty)")
    quant.add_argument("--bits", type=_bits, required=True, help="4 or 8 bits per expert weight")
    quant.add_argument("--group-size", type=positive_int, default=None,
                       help=f"weights per scale along the input dimension; must divide every expert's in_features "
                            f"(default {DEFAULT_GROUP_SIZE}, or the largest power of two under it that does)")
    quant.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD,
                       help=f"rtn: round to nearest; mse: per-group clipping that minimises the weight error "
                            f"(default {DEFAULT_METHOD})")
    zero = quant.add_mutually_exclusive_group()
    zero.add_argument("--symmetric", dest="symmetric", action="store_true", default=True,
                      help="no zero points (default): what vLLM's and transformers' MoE loaders accept")
    zero.add_argument("--asymmetric", dest="symmetric", action="store_false",
                      help="a zero point per group")
    quant.set_defaults(run=_cmd_quantize, model_positional="model_dir")  # cli.py: the argument or -m, once
    return quant
