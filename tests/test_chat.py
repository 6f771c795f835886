"""`moe-offload chat` on the shipped model: from a pipe (in-process) and at a terminal (a pty, the real process).

The replies are checked against LLMPipeline.generate on the same conversation, so the test shows that the chat
keeps the conversation (the second turn sees the first), that /reset clears it and that /exit ends it.
"""

from __future__ import annotations

import fcntl
import io
import os
import pty
import select
import signal
import subprocess
import sys
import termios
import time

import pytest

from moe_offload import LLMPipeline, chat
from moe_offload.errors import MoeOffloadError
from moe_offload.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEW_TOKENS = 4
PROMPT = b"\r\n> "  # the chat's prompt at the start of a line (the code the model writes has ">>> " in it)


@pytest.fixture(scope="module")
def shipped():
    return LLMPipeline(None, "cpu")


@pytest.fixture(scope="module")
def replies(shipped):
    """What the chat should answer, from LLMPipeline.generate on the same conversations: "hello" first; "what now"
    after it (the reply kept stripped, as the chat keeps it); "what now" alone (after /reset)."""
    def reply(messages):
        return shipped.generate(messages, max_new_tokens=NEW_TOKENS)

    hello = reply([{"role": "user", "content": "hello"}])
    then = reply([{"role": "user", "content": "hello"}, {"role": "assistant", "content": hello.strip()},
                  {"role": "user", "content": "what now"}])
    return {"hello": hello, "then": then, "alone": reply([{"role": "user", "content": "what now"}])}


def test_chat_from_a_pipe_keeps_resets_and_exits(replies, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nwhat now\n\n/reset\nwhat now\n/exit\nnever read\n"))
    assert main(["chat", "-d", "cpu", "-n", str(NEW_TOKENS)]) == 0
    captured = capsys.readouterr()
    assert replies["then"] != replies["alone"]  # the kept conversation changes the answer, else this proves nothing
    assert captured.out == f"{replies['hello']}\n{replies['then']}\n{replies['alone']}\n"
    assert "(conversation cleared)" in captured.err


class _RefusingPipe:
    """A pipeline whose every turn is refused, as one grown past MOE_CONTEXT is."""

    def stream(self, messages, generation_config):
        raise MoeOffloadError(f"{len(messages)} messages exceed MOE_CONTEXT")


def test_a_refused_turn_is_reported_at_a_terminal_and_ends_a_piped_chat():
    lines = iter(["hello", "/exit"])
    out, note = io.StringIO(), io.StringIO()
    assert chat.run(_RefusingPipe(), None, lambda: next(lines), out, note, interactive=True) == 0
    assert note.getvalue() == "error: 1 messages exceed MOE_CONTEXT (/reset starts over)\n" and out.getvalue() == ""
    with pytest.raises(MoeOffloadError, match="exceed MOE_CONTEXT"):
        chat.run(_RefusingPipe(), None, iter(["hello"]).__next__, out, note)


def _read_until(fd: int, marker: bytes, seen: bytearray, count: int = 1, timeout: float = 120) -> None:
    """Read the terminal into `seen` until `marker` has appeared `count` times."""
    deadline = time.monotonic() + timeout
    while seen.count(marker) < count:
        left = deadline - time.monotonic()
        assert left > 0, f"{marker!r} never came: {bytes(seen)!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                chunk = b""
            assert chunk, f"the terminal closed before {marker!r}: {bytes(seen)!r}"
            seen += chunk


def _controlling_terminal() -> None:
    """In the child: a session of its own with the pty as its terminal, so Ctrl-C there sends it SIGINT, and
    SIGINT's default action as a person's shell gives it: a suite started in the background (`pytest &`) runs
    with SIGINT ignored, which every child inherits, and Python then leaves Ctrl-C ignored."""
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_chat_in_a_terminal(replies):
    """A person at a terminal: the prompt, a streamed reply stopped by Ctrl-C, /reset, and Ctrl-D to leave."""
    shown = replies["hello"].replace("\n", "\r\n").encode()  # the first tokens of the long reply below
    master, slave = pty.openpty()
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), TERM="dumb")
    process = subprocess.Popen([sys.executable, "-m", "moe_offload.cli", "chat", "-d", "cpu", "-n", "1500"],
                               stdin=slave, stdout=slave, stderr=slave, cwd=REPO, env=env, close_fds=True,
                               preexec_fn=_controlling_terminal)
    os.close(slave)
    seen = bytearray()
    try:
        _read_until(master, PROMPT, seen)
        assert b"/exit or Ctrl-D" in seen
        os.write(master, b"hello\r")
        _read_until(master, shown, seen)  # streaming: these tokens show long before the 1500th is made
        os.write(master, b"\x03")  # Ctrl-C: stops this reply, not the chat
        _read_until(master, b"(reply stopped)", seen)
        _read_until(master, PROMPT, seen, count=2)
        os.write(master, b"/reset\r")
        _read_until(master, b"(conversation cleared)", seen)
        _read_until(master, PROMPT, seen, count=3)  # typed before input() reads again, Ctrl-D could be lost
        os.write(master, b"\x04")  # Ctrl-D
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
        os.close(master)
    assert b"Traceback" not in seen


def test_chat_without_a_chat_template_is_one_line(checkpoint_factory, monkeypatch, capsys):
    path = checkpoint_factory("qwen3_moe")
    capsys.readouterr()  # the checkpoint's making
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    assert main(["chat", "-m", path, "-d", "cpu"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "no chat template" in captured.err
