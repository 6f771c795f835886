"""Token ids in, text deltas out: what may be sent to a client after each new token.

Two things keep text back. A byte-level BPE token can end in the middle of a UTF-8 character: the decoded text
then ends in U+FFFD until the next token completes it, so that tail is not sent yet (transformers' TextStreamer
does the same). And with stop strings, text that might be the start of one is held until the next tokens show
whether it is: a stop string must never reach the client, not even its first half. The whole completion is
decoded again at each token (prefix-stable for the tokenizers we serve), which for a few thousand tokens costs
less than the model step that made the token.
"""

from __future__ import annotations

from typing import Callable, Sequence

_SPLIT_CHAR = "\ufffd"


class TextStream:
    """push(ids) -> new text to send; finish() -> what was held back; `stopped` once a stop string appeared."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
        self.decode, self.stop = decode, tuple(stop)
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already handed out
        self.stopped = False
        self._text = ""

    def push(self, ids: Sequence[int]) -> str:
        if self.stopped:
            return ""
        self.ids.extend(ids)
        self._text = text = self.decode(self.ids)
        # the emitted text never holds a stop string's beginning, so an occurrence starts at `sent` or later
        hits = [i for i in (text.find(s, self.sent) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._send(min(hits))
        settled = len(text.rstrip(_SPLIT_CHAR))
        return self._send(settled - self._held(text[:settled]))

    def finish(self) -> str:
        """The text still held back (generation ended without completing a stop string or a character)."""
        return "" if self.stopped else self._send(len(self._text))

    def text(self) -> str:
        """Everything handed out so far."""
        return self._text[:self.sent]

    def _held(self, text: str) -> int:
        """Length of the longest end of `text` that is a proper beginning of some stop string."""
        longest = 0
        for stop in self.stop:
            for k in range(min(len(stop) - 1, len(text) - self.sent), longest, -1):
                if text.endswith(stop[:k]):
                    longest = k
                    break
        return longest

    def _send(self, end: int) -> str:
        piece = self._text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece
