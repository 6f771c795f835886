"""Streamers the text API puts between the engine and its caller, all on transformers' streamer protocol.

The protocol (put(ids) for the prompt, then for each new token; end() once) is what both generation paths drive
(decoding.StaticDecoder and transformers' generate, through pipeline._StopOnTrue), and a put that returns True
stops generation after that token on both. Each class here keeps one promise on top of it:

- TokenStamps: the time each new token was handed over (LLMPipeline.perf_metrics), forwarding to another streamer.
- TextCallback: OpenVINO's streamer, a callback str -> bool | None called with each piece of text; True stops.
- CancellableTextIterator: the iterator `LLMPipeline.stream` returns; a caller that stops reading (breaks, a
  server whose client went away) cancels the generation instead of waiting for it to run to its end.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from transformers import TextIteratorStreamer, TextStreamer

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


class TextCallback(TextStreamer):
    """Calls `callback(text)` with each decoded piece (transformers' TextStreamer decides where pieces end) in the
    generating thread. A callback returning True stops generation after the current token; None and False go on;
    anything else is an error (a mistyped stop signal must not be taken for "go on"). After a stop, the text still
    buffered for tokens already made is flushed too, so the pieces always add up to the returned text."""

    def __init__(self, tokenizer, callback: Callable[[str], Any]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.callback, self.stopped = callback, False

    def put(self, value: torch.Tensor) -> bool:
        super().put(value)
        return self.stopped

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if not text:
            return
        answer = self.callback(text)
        if answer is not None and not isinstance(answer, bool):
            raise MoeOffloadError(f"a streamer callback must return None, False (go on) or True (stop), got "
                                  f"{answer!r}")
        self.stopped = self.stopped or answer is True


class CancellableTextIterator(TextIteratorStreamer):
    """transformers' TextIteratorStreamer whose put answers True (stop) once `cancel()` was called."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def put(self, value: torch.Tensor) -> bool:
        super().put(value)
        return self.cancelled
