"""One exception type for every user-facing failure.

The CLI turns a MoeOffloadError into one line on stderr and a non-zero exit; anything else is a bug and
keeps its traceback. Raise this for bad input (paths, checkpoints, properties, budgets, generation arguments),
never for bugs. It is a ValueError, so that code written for transformers' or OpenVINO GenAI's generate, which
catches ValueError for a bad argument, catches ours too.
"""

import argparse
import os


class MoeOffloadError(ValueError):
    """A problem with what the user gave us, stated in one line."""


def read_user_text(path: str, what: str) -> str:
    """The text of a file the user named (`what`: "config file", "prompts file", ...), or a one-line error."""
    if not os.path.isfile(path):
        raise MoeOffloadError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except (OSError, UnicodeDecodeError) as err:
        raise MoeOffloadError(f"cannot read {what} {path}: {getattr(err, 'strerror', None) or err}") from None


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1 (argparse turns the error into its one-line usage error)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return value
