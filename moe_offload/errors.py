"""One exception type for every user-facing failure.

The CLI turns a MoeOffloadError into one line on stderr and a non-zero exit; anything else is a bug and
keeps its traceback. Raise this for bad input (paths, checkpoints, properties, budgets), never for bugs.
"""


class MoeOffloadError(Exception):
    """A problem with what the user gave us, stated in one line."""
