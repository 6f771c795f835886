"""Streamers the text API puts between the engine and its caller, all on transformers' streamer protocol.

The protocol (put(ids) for the prompt, then for each new token; end() once) is what both generation paths drive
(decoding.StaticDecoder and transformers' generate, through pipeline._StopOnTrue), and a put that returns True
stops generation after that token on both. Each class here keeps one promise on top of it:

- TokenStamps: the time each new token was handed over (LLMPipeline.perf_metrics), forwarding to another streamer.
- TextSink: the text, in pieces (transformers' TextStreamer decides where a piece ends), with OpenVINO's stop
  strings applied to it; alone it only collects the text.
- TextCallback: OpenVINO's streamer, a callback str -> bool | None called with each piece; True stops.
- TextIterator: the iterator `LLMPipeline.stream` returns; a caller that stops reading (breaks, a server whose
  client went away) cancels the generation instead of waiting for it to run to its end.
- Tee: a caller's own token streamer beside a TextSink.
"""

from __future__ import annotations

import queue
import time
from typing import Any, Callable, Iterable

import torch
from transformers import TextStreamer

from .errors import MoeOffloadError


class TokenStamps:
    """Stamps the time of each new token, then hands the put on to `inner` (if any) and returns its answer."""

    def __init__(self, inner: Any = None):
        self.inner, self.prompt_seen, self.times = inner, False, []  # times: perf_counter per new token

    def put(self, value: torch.Tensor) -> Any:
        if self.prompt_seen:
            self.times.extend([time.perf_counter()] * value.numel())
        self.prompt_seen = True
        return self.inner.put(value) if self.inner is not None else None

    def end(self) -> None:
        if self.inner is not None:
            self.inner.end()


class Tee:
    """Two streamers fed alike; a put stops when either asks to."""

    def __init__(self, first: Any, second: Any):
        self.first, self.second = first, second

    def put(self, value: torch.Tensor) -> bool:
        return (self.first.put(value) is True) | (self.second.put(value) is True)

    def end(self) -> None:
        self.first.end()
        self.second.end()


class TextSink(TextStreamer):
    """The new text in pieces, cut at the first stop string (OpenVINO's stop_strings; the stop string itself kept
    only with `include_stop`). Text that may be the start of a stop string is held back until the next piece
    settles it, so no piece ever shows text past a stop. Once a stop string is seen, put answers True (stop) and
    later tokens add no text. `text` is everything emitted; subclasses also send each piece somewhere (_emit)."""

    def __init__(self, tokenizer, stop_strings: Iterable[str] = (), include_stop: bool = False):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.stop_strings, self.include_stop = tuple(stop_strings), include_stop
        self.held = ""  # text that may begin a stop string
        self.parts: list[str] = []
        self.stopped = False  # put answers True from now on
        self.cut = False  # a stop string was seen: no more text

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def put(self, value: torch.Tensor) -> bool:
        if not self.cut:
            super().put(value)
        return self.stopped

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if not self.cut:
            text, self.held = self.held + text, ""
            end = self._stop_end(text)
            if end is not None:
                text, self.cut, self.stopped = text[:end], True, True
            elif not stream_end:
                keep = self._partial_stop(text)
                text, self.held = text[:len(text) - keep], text[len(text) - keep:]
            if text:
                self.parts.append(text)
                self._emit(text)
        if stream_end:
            self._close()

    def _stop_end(self, text: str) -> int | None:
        """Where the text ends if it holds a stop string (the earliest), else None."""
        found = [(at, len(stop)) for stop in self.stop_strings if (at := text.find(stop)) >= 0]
        if not found:
            return None
        at, length = min(found)
        return at + length if self.include_stop else at

    def _partial_stop(self, text: str) -> int:
        """Characters at the end of `text` that begin some stop string (to hold back)."""
        return max((k for stop in self.stop_strings for k in range(1, len(stop)) if text.endswith(stop[:k])),
                   default=0)

    def _emit(self, text: str) -> None:
        pass

    def _close(self) -> None:
        pass


class TextCallback(TextSink):
    """Calls `callback(text)` with each piece in the generating thread. A callback returning True stops generation
    after the current token; None and False go on; anything else is an error (a mistyped stop signal must not be
    taken for "go on"). After a stop, the text still buffered for tokens already made is flushed too, so the pieces
    always add up to the returned text."""

    def __init__(self, tokenizer, callback: Callable[[str], Any], **stops: Any):
        super().__init__(tokenizer, **stops)
        self.callback = callback

    def _emit(self, text: str) -> None:
        answer = self.callback(text)
        if answer is not None and not isinstance(answer, bool):
            raise MoeOffloadError(f"a streamer callback must return None, False (go on) or True (stop), got "
                                  f"{answer!r}")
        self.stopped = self.stopped or answer is True


class TextIterator(TextSink):
    """The pieces as an iterator for another thread; put answers True (stop) once `cancel()` was called."""

    _END = object()

    def __init__(self, tokenizer, **stops: Any):
        super().__init__(tokenizer, **stops)
        self.queue: queue.Queue = queue.Queue()

    def cancel(self) -> None:
        self.stopped = True

    def _emit(self, text: str) -> None:
        self.queue.put(text)

    def _close(self) -> None:
        self.queue.put(self._END)

    def __iter__(self) -> TextIterator:
        return self

    def __next__(self) -> str:
        piece = self.queue.get()
        if piece is self._END:
            raise StopIteration
        return piece
