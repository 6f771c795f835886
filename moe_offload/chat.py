"""`moe-offload chat`: a conversation in the terminal, or from a pipe, through the tokenizer's chat template.

Why its own module: the loop (read a turn, stream the reply, keep the conversation) is the same whether a person
types at a terminal or a script pipes turns in, and it should not know about argparse; cli.py wires it. Each turn
goes through LLMPipeline.stream as a conversation (a list of {"role", "content"} dicts), so the chat template,
the generation settings and the cancellation of a reply (Ctrl-C) are the pipeline's, not re-done here.

At a terminal: a "> " prompt with line editing; /exit or Ctrl-D leaves, /reset clears the conversation, Ctrl-C
during a reply stops that reply (what was shown is kept). From a pipe: one user turn per line, each reply on
stdout followed by a newline, nothing else on stdout; the same commands work as lines.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, TextIO

from .errors import MoeOffloadError

EXIT_COMMANDS = ("/exit", "/quit")
RESET_COMMAND = "/reset"
HELP = "/exit or Ctrl-D leaves, /reset clears the conversation, Ctrl-C stops a reply"


class Conversation:
    """The messages so far, an optional system message first; a reply is stored stripped of surrounding blanks
    (the template lays out its own separators)."""

    def __init__(self, system: str | None = None):
        self.system = system
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def add(self, role: str, content: str) -> None:
        self.messages.append({"role": role, "content": content.strip()})


def terminal_reader(prompt: str = "> ") -> Callable[[], str | None]:
    """Lines typed at a terminal (readline's editing where it exists); None at Ctrl-D."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (input() edits lines once it is imported)

    def read() -> str | None:
        try:
            return input(prompt)
        except EOFError:
            print(file=sys.stdout)  # Ctrl-D leaves the cursor after the prompt
            return None

    return read


def stream_reader(source: TextIO) -> Callable[[], str | None]:
    """Lines of a non-terminal stdin; None at its end."""
    def read() -> str | None:
        line = source.readline()
        return line if line else None

    return read


def run(pipe, generation_config: Any, read_line: Callable[[], str | None], out: TextIO, note: TextIO,
        system: str | None = None, interactive: bool = False) -> int:
    """The chat loop until /exit or the end of input; `note` gets what is not a reply (cleared, unknown command).
    A turn the pipeline refuses (a conversation grown past MOE_CONTEXT) ends a piped chat with that error; at a
    terminal it is reported, the turn dropped, and the chat goes on. Returns the number of replies made."""
    conversation = Conversation(system)
    replies = 0
    while True:
        line = read_line()
        if line is None:
            return replies
        text = line.strip()
        if not text:
            continue
        if text in EXIT_COMMANDS:
            return replies
        if text == RESET_COMMAND:
            conversation.reset()
            print("(conversation cleared)", file=note, flush=True)
            continue
        if text.startswith("/") and " " not in text:
            print(f"unknown command {text}: {HELP}", file=note, flush=True)
            continue
        conversation.add("user", text)
        try:
            reply = _reply(pipe, conversation.messages, generation_config, out, note)
        except MoeOffloadError as error:
            if not interactive:
                raise
            conversation.messages.pop()  # the refused turn is not part of the conversation
            print(f"error: {error} (/reset starts over)", file=note, flush=True)
            continue
        conversation.add("assistant", reply)
        replies += 1


def _reply(pipe, messages: list[dict[str, str]], generation_config: Any, out: TextIO, note: TextIO) -> str:
    """Stream one reply to `out`; Ctrl-C stops it (closing the stream cancels the generation) and keeps the part
    already shown."""
    shown: list[str] = []
    try:
        with contextlib.closing(pipe.stream(messages, generation_config)) as pieces:
            for piece in pieces:
                out.write(piece)
                out.flush()
                shown.append(piece)
    except KeyboardInterrupt:
        print("\n(reply stopped)", file=note, flush=True)
    out.write("\n")
    out.flush()
    return "".join(shown)
