"""Token ids in, text deltas out: what may be sent to a client after each new token.

Two things keep text back. A byte-level BPE token can end in the middle of a UTF-8 character: the decoded text
then ends in U+FFFD until the next token completes it, so new text is taken only once it does not. And with stop
strings, text that might be the start of one is held until the next tokens show whether it is: a stop string
must never reach the client, not even its first half. New text is found as vLLM's incremental detokenizer finds
it: decode a short window of the last tokens with and without the newest ones and take the difference, so each
token costs a decode of a few tokens, not of the whole completion, and tokenizers whose text for a token depends
on the one before it (SentencePiece's leading spaces) still come out as whole-sequence decoding does.
"""

from __future__ import annotations

from typing import Callable, Sequence

_SPLIT_CHAR = "\ufffd"


class TextStream:
    """push(ids) -> new text to send; finish() -> what was held back; `stopped` once a stop string appeared."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
        self.decode, self.stop = decode, tuple(stop)
        self.ids: list[int] = []
        self._text = ""  # the completion's text so far, settled characters only
        self._prefix = self._read = 0  # window: ids[_prefix:_read] is text already settled, ids[_read:] is not
        self.sent = 0  # characters of _text already handed out
        self.stopped = False

    def push(self, ids: Sequence[int]) -> str:
        if self.stopped:
            return ""
        self.ids.extend(ids)
        self._settle(final=False)
        return self._release(final=False)

    def finish(self) -> str:
        """The text still held back (generation ended without completing a stop string or a character)."""
        if self.stopped:
            return ""
        self._settle(final=True)
        return self._release(final=True)

    def text(self) -> str:
        """Everything handed out so far."""
        return self._text[:self.sent]

    def _settle(self, final: bool) -> None:
        """Append the text the unsettled tokens now make, unless it still ends inside a character."""
        before = self.decode(self.ids[self._prefix:self._read])
        after = self.decode(self.ids[self._prefix:])
        if len(after) > len(before) and (final or not after.endswith(_SPLIT_CHAR)):
            self._text += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)

    def _release(self, final: bool) -> str:
        text = self._text
        # the text handed out never holds a stop string's beginning, so an occurrence starts at `sent` or later
        hits = [i for i in (text.find(s, self.sent) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._send(min(hits))
        return self._send(len(text) if final else len(text) - self._held(text))

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
