"""The request bodies of /v1/chat/completions and /v1/completions, as pydantic models.

Strict on purpose: `"max_tokens": "5"` or `2.5` is a 400, not a silent coercion, and a field we do not
implement is a 400 that names it (OpenAI itself rejects unrecognized arguments), so nothing a client asks for is
quietly ignored. The few OpenAI fields that only change output when set away from their default (penalties,
logprobs, echo, best_of) are accepted at the default and refused otherwise. Range checks that need the model
(context length, the model's name) are prepare.py's.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP_STRINGS = 4  # as OpenAI
MAX_SEED = 2**64 - 1  # torch.manual_seed takes an unsigned 64-bit seed


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The content as one string (text parts joined, as OpenAI reads them)."""
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


Unit = Annotated[float, Field(allow_inf_nan=False)]


class _Sampling(_Strict):
    """What both endpoints share: the model, the token budget, sampling, stop strings, streaming."""

    model: str | None = None  # the one served model; None means it
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: Unit | None = Field(default=None, ge=0, le=2)
    top_p: Unit | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # OpenAI's end-user id for abuse monitoring: nothing to do with the output
    frequency_penalty: Unit = 0.0
    presence_penalty: Unit = 0.0

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError("only n=1 is supported (the engine decodes one sequence at a time)")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> str | list[str] | None:
        strings = [value] if isinstance(value, str) else value or []
        if len(strings) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s for s in strings):
            raise ValueError("stop strings must not be empty")
        return value

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalty(cls, value: float) -> float:
        if value != 0:
            raise ValueError("penalties are not supported (only 0)")
        return value

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def wants_usage_chunk(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: Literal[False] | None = None

    def token_budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    # text, a list holding one text, or token ids (batches of prompts are not supported: batch 1)
    prompt: str | list[str] | list[int]
    echo: Literal[False] = False
    best_of: Literal[1] | None = None
    logprobs: None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str] | list[int]) -> str | list[str] | list[int]:
        if isinstance(value, list) and value and isinstance(value[0], str) and len(value) != 1:
            raise ValueError("one prompt per request (the engine decodes one sequence at a time)")
        if isinstance(value, list) and not value:
            raise ValueError("empty prompt")
        return value

    def token_budget(self) -> int | None:
        return self.max_tokens
