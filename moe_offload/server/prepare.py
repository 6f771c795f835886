"""A validated request body + the served model -> a Job for the generation thread, or a 4xx.

Everything that needs the model to be checked is checked here, before a request takes a place in the queue: the
model's name, the chat template, the prompt's token count against the context, the token budget, token ids
inside the vocabulary. Sampling defaults come from the checkpoint's generation_config.json, as vLLM does: a
request that leaves `temperature` out is greedy when the checkpoint says do_sample false (the shipped model),
and samples with the checkpoint's temperature / top_p when it says true. OpenAI's API has no top-k: a sampling
request gets the checkpoint's top_k where its generation config samples, and none where it is greedy.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from .command import DEFAULT_MAX_TOKENS
from .errors import ApiError
from .schemas import ChatRequest, CompletionRequest
from .worker import Job



@dataclass
class Served:
    """What requests are checked against: the one model, its tokenizer (behind a lock: the fast tokenizer is one
    Rust object that the event loop encodes with while the generation thread decodes) and its limits."""

    name: str
    tokenizer: Any
    context: int  # MOE_CONTEXT in tokens: prompt + max_tokens must fit
    vocab_size: int
    sampling_defaults: dict[str, float]  # temperature (0 = greedy), top_p, top_k
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def from_pipeline(cls, pipe, name: str | None = None, default_max_tokens: int = DEFAULT_MAX_TOKENS) -> "Served":
        text = pipe.model.config.get_text_config()
        context = pipe.memory_plan.context  # MOE_CONTEXT: what the device memory was planned for, not the model's max
        return cls(name=name or os.path.basename(os.path.normpath(pipe.models_path)), tokenizer=pipe.tokenizer,
                   context=int(context), vocab_size=int(text.vocab_size),
                   sampling_defaults=checkpoint_sampling(pipe.model.generation_config),
                   default_max_tokens=default_max_tokens)


def checkpoint_sampling(config) -> dict[str, float]:
    """The sampling a request gets for what it leaves out, from the checkpoint's generation config."""
    if not getattr(config, "do_sample", False):
        return {"temperature": 0.0, "top_p": 1.0, "top_k": 0}
    return {"temperature": float(config.temperature if config.temperature is not None else 1.0),
            "top_p": float(config.top_p if config.top_p is not None else 1.0),
            "top_k": int(config.top_k or 0)}


def check_model(served: Served, name: str | None) -> None:
    if name is not None and name != served.name:
        raise ApiError(404, f"model {name!r} not found: this server serves {served.name!r}", "model",
                       "model_not_found")


def prepare_chat(served: Served, body: ChatRequest) -> Job:
    check_model(served, body.model)
    tokenizer = served.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, f"model {served.name!r} has no chat template: use /v1/completions", "messages")
    messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in body.messages]
    with served.lock:
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # noqa: BLE001  (jinja's TemplateError, raise_exception(): the template said no)
            raise ApiError(400, f"the chat template refused the messages: {err}", "messages") from None
        # the template writes any special tokens itself: adding them again would double a BOS
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return _job(served, body, ids, body.token_budget())


def prepare_completion(served: Served, body: CompletionRequest) -> Job:
    check_model(served, body.model)
    prompt = body.prompt[0] if isinstance(body.prompt, list) and isinstance(body.prompt[0], str) else body.prompt
    if isinstance(prompt, str):
        with served.lock:
            ids = served.tokenizer(prompt)["input_ids"]
    else:
        bad = next((i for i in prompt if not 0 <= i < served.vocab_size), None)
        if bad is not None:
            raise ApiError(400, f"prompt: token id {bad} is outside the vocabulary (0-{served.vocab_size - 1})",
                           "prompt")
        ids = list(prompt)
    return _job(served, body, ids, body.token_budget())


def _job(served: Served, body: ChatRequest | CompletionRequest, ids: list[int], budget: int | None) -> Job:
    param = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) is not None else "max_tokens"
    if not ids:
        raise ApiError(400, "empty prompt: give at least one token of text", "prompt")
    room = served.context - len(ids)
    if room < 1:
        raise ApiError(400, f"the prompt has {len(ids)} tokens: no room left in the served context (MOE_CONTEXT) of "
                            f"{served.context} tokens", "messages" if isinstance(body, ChatRequest) else "prompt",
                       "context_length_exceeded")
    if budget is None:
        budget = min(served.default_max_tokens, room)
    elif budget > room:
        raise ApiError(400, f"the prompt ({len(ids)} tokens) + {param} ({budget}) is more than the served "
                            f"context (MOE_CONTEXT) of {served.context} tokens", param, "context_length_exceeded")
    return Job(input_ids=torch.tensor([ids], dtype=torch.long), max_new_tokens=budget,
               sampling=sampling(served, body), seed=body.seed, stop=body.stop_strings())


def sampling(served: Served, body: ChatRequest | CompletionRequest) -> dict[str, Any]:
    """transformers generate's sampling arguments for this request (see the module's docstring)."""
    defaults = served.sampling_defaults
    temperature = body.temperature if body.temperature is not None else defaults["temperature"]
    if temperature == 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": temperature,
            "top_p": body.top_p if body.top_p is not None else defaults["top_p"], "top_k": defaults["top_k"]}
