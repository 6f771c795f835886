"""GenerationConfig: how text is generated, checked at the door and resolved in one place.

Why a class of our own: `LLMPipeline.generate` promises OpenVINO GenAI's contract (`generate(inputs,
generation_config=None, streamer=None, **kwargs)`, with `ov_genai.GenerationConfig`'s field names), and what it
hands to the engine must be exactly what was asked for. Before, a GenerationConfig passed in was ignored, the
checkpoint's generation_config.json was overridden by hard-coded greedy defaults, and a bad value (max_new_tokens
2.5, temperature nan, top_k -1) either raised deep in transformers or was silently accepted. Here every value is
checked when it arrives (one rule: a wrong type or a value out of range is a MoeOffloadError naming the argument,
what it accepts and what it got) and the layers are merged once, in a fixed order, lowest first:

    BASE (transformers' defaults; greedy, 64 new tokens)
      < the checkpoint's generation_config.json   (LLMPipeline.get_generation_config / set_generation_config)
      < the `generation_config` argument           (ours or transformers' GenerationConfig)
      < keyword arguments

A field left at None is "not set here": the layer below supplies it. max_new_tokens and max_length are one
choice (the total length or the new tokens): the highest layer that sets either decides, max_new_tokens first.

This module decides values only; the pipeline turns a `Resolved` into a generate call (mechanism apart from
policy). The benchmark and `trace` call the pipeline with do_sample=False, so a checkpoint that samples by default
does not change what they measure.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
from dataclasses import dataclass, fields, replace
from typing import Any

from .errors import MoeOffloadError

log = logging.getLogger("moe_offload")

DEFAULT_MAX_NEW_TOKENS = 64  # where no layer bounds the length: a forgotten limit still ends
SEED_LIMIT = 2**64  # torch's generator takes a 64-bit seed (OpenVINO's rng_seed is a size_t)


def _integer(name: str, value: Any, minimum: int, limit: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum or (
            limit is not None and value >= limit):
        bound = f"an integer >= {minimum}" if limit is None else f"an integer from {minimum} to {limit - 1}"
        raise MoeOffloadError(f"{name} must be {bound}, got {value!r}")
    return int(value)


def _number(name: str, value: Any, low: float, high: float, low_open: bool, high_open: bool) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        span = ("(" if low_open else "[") + f"{low:g}, " + ("inf" if math.isinf(high) else f"{high:g}") + (
            ")" if high_open else "]")
        raise MoeOffloadError(f"{name} must be a finite number in {span}, got {value!r}")
    return float(value)


def _strings(name: str, value: Any) -> tuple[str, ...]:
    """A stop string, or a list / tuple / set of them: non-empty strings (a bare str is one, not its letters)."""
    items = (value,) if isinstance(value, str) else value
    if not isinstance(items, (list, tuple, set, frozenset)) or not all(
            isinstance(item, str) and item for item in items):
        raise MoeOffloadError(f"{name} must be a non-empty string or a list of them, got {value!r}")
    return tuple(dict.fromkeys(sorted(items) if isinstance(items, (set, frozenset)) else items))


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise MoeOffloadError(f"{name} must be True or False, got {value!r}")
    return value


# field -> check(value) returning the value normalized; the one table of what each field accepts
CHECKS = {
    "max_new_tokens": lambda v: _integer("max_new_tokens", v, 1),
    "max_length": lambda v: _integer("max_length", v, 1),
    "min_new_tokens": lambda v: _integer("min_new_tokens", v, 0),
    "ignore_eos": lambda v: _flag("ignore_eos", v),
    "do_sample": lambda v: _flag("do_sample", v),
    "temperature": lambda v: _number("temperature", v, 0.0, math.inf, False, True),
    "top_p": lambda v: _number("top_p", v, 0.0, 1.0, True, False),
    "top_k": lambda v: _integer("top_k", v, 0),  # 0: no top-k limit
    "repetition_penalty": lambda v: _number("repetition_penalty", v, 0.0, math.inf, True, True),
    "rng_seed": lambda v: _integer("rng_seed", v, 0, SEED_LIMIT),
    "stop_strings": lambda v: _strings("stop_strings", v),
    "include_stop_str_in_output": lambda v: _flag("include_stop_str_in_output", v),
}
# transformers GenerationConfig fields that do not change which tokens come out, or that the model's own config
# already carries (special token ids): accepted from a transformers config and left to the model
NEUTRAL_FIELDS = {"bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "transformers_version",
                  "_from_model_config", "use_cache", "cache_implementation", "output_attentions",
                  "output_hidden_states", "output_scores", "output_logits", "return_dict_in_generate"}


@dataclass(slots=True)
class GenerationConfig:
    """Generation settings, named as in OpenVINO GenAI's `GenerationConfig` (a subset; transformers' names agree).

    Every field defaults to None, "not set": the checkpoint's generation_config.json, then transformers' defaults,
    supply it (module docstring). `pipe.get_generation_config()` shows the checkpoint's values. Slots: a misspelt
    field (`config.max_new_token = 8`) is an AttributeError, not a value silently never read.
    """

    max_new_tokens: int | None = None  # new tokens at most (>= 1); wins over max_length
    max_length: int | None = None  # prompt + new tokens at most
    min_new_tokens: int | None = None  # EOS cannot end generation before this many new tokens
    ignore_eos: bool | None = None  # True: generate max_new_tokens whatever comes (min_new_tokens = max)
    do_sample: bool | None = None  # False: greedy
    temperature: float | None = None  # sampling only; > 0 when sampling
    top_p: float | None = None  # sampling only; (0, 1]
    top_k: int | None = None  # sampling only; 0 = no limit
    repetition_penalty: float | None = None  # > 0; 1.0 = none
    rng_seed: int | None = None  # sampling: seeds this call's random draws (the global generator is left as it was)
    stop_strings: tuple[str, ...] | None = None  # the text ends before the first of these that it makes
    include_stop_str_in_output: bool | None = None  # True: ... and includes that stop string

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise MoeOffloadError for the first set field whose value is out of range (fields may be reassigned)."""
        for name, value in self.to_dict().items():
            setattr(self, name, CHECKS[name](value))

    def update(self, **values: Any) -> GenerationConfig:
        """A copy with `values` set (keyword names checked: a typo is an error, not ignored)."""
        return replace(self, **check_names(values))

    def to_dict(self) -> dict[str, Any]:
        """The fields that are set."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_transformers(cls, config: Any) -> GenerationConfig:
        """Ours from transformers' GenerationConfig: the fields its user set (those differing from transformers'
        defaults). A set field we would not apply (num_beams, ...) is an error rather than silently ignored."""
        values = {k: v for k, v in config.to_diff_dict().items() if k not in NEUTRAL_FIELDS}
        unknown = sorted(set(values) - set(CHECKS))
        if unknown:
            raise MoeOffloadError(f"transformers GenerationConfig sets {', '.join(unknown)}, which moe-offload does "
                                  f"not apply (it applies: {', '.join(CHECKS)})")
        return cls(**values)


BASE = GenerationConfig(do_sample=False, temperature=1.0, top_p=1.0, top_k=50, repetition_penalty=1.0,
                        min_new_tokens=0, ignore_eos=False, stop_strings=(), include_stop_str_in_output=False)


def check_names(values: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(values) - set(CHECKS))
    if unknown:
        raise MoeOffloadError(f"unknown generation argument {unknown[0]!r} (known: {', '.join(CHECKS)})")
    return values


def as_config(value: Any) -> GenerationConfig | None:
    """The `generation_config` argument: ours, transformers', a dict of fields, or None."""
    if value is None or isinstance(value, GenerationConfig):
        return value
    if isinstance(value, dict):
        return GenerationConfig(**check_names(dict(value)))
    if callable(getattr(value, "to_diff_dict", None)):  # transformers.GenerationConfig, without importing it here
        return GenerationConfig.from_transformers(value)
    raise MoeOffloadError(f"generation_config must be a moe_offload GenerationConfig, a transformers "
                          f"GenerationConfig or a dict, got {type(value).__name__}")


def checkpoint_defaults(root: str) -> GenerationConfig:
    """The fields of root/generation_config.json that we apply. The file is the checkpoint author's, not the
    user's input: a value we cannot use is logged and skipped, the model still runs (transformers does the same)."""
    path = os.path.join(root, "generation_config.json")
    if not os.path.isfile(path):
        return GenerationConfig()
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as err:
        log.warning("ignoring %s: %s", path, err)
        return GenerationConfig()
    if not isinstance(data, dict):
        log.warning("ignoring %s: not a JSON object", path)
        return GenerationConfig()
    kept = {}
    for name in CHECKS:
        if data.get(name) is not None:
            try:
                kept[name] = CHECKS[name](data[name])
            except MoeOffloadError as err:
                log.warning("ignoring a value of %s: %s", path, err)
    return GenerationConfig(**kept)


@dataclass(frozen=True)
class Resolved:
    """One call's settings, every layer merged and checked against the prompt."""

    max_new_tokens: int
    min_new_tokens: int
    do_sample: bool
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    rng_seed: int | None
    stop_strings: tuple[str, ...]  # applied to the text (streaming.TextSink), not by the engine
    include_stop_str_in_output: bool

    def generate_kwargs(self) -> dict[str, Any]:
        """Arguments for LLMPipeline.generate_tokens (transformers' generate names). Greedy calls carry only what
        the static-cache decoder reproduces, so they stay on it (decoding.unsupported_reason); sampling passes
        every sampling field explicitly, so the model's own generation config cannot fill in others."""
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample}
        if self.min_new_tokens:
            kwargs["min_new_tokens"] = self.min_new_tokens
        if self.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = self.repetition_penalty
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return kwargs


def resolve(layers: list[GenerationConfig | None], prompt_tokens: int) -> Resolved:
    """Merge `layers` (lowest first, above BASE) for a prompt of `prompt_tokens` tokens."""
    merged: dict[str, Any] = {}
    for layer in [BASE, *layers]:
        if layer is None:
            continue
        layer.validate()  # a field may have been reassigned since the layer was built
        values = layer.to_dict()
        if "max_new_tokens" in values or "max_length" in values:  # one choice: this layer's replaces lower ones'
            merged.pop("max_new_tokens", None)
            merged.pop("max_length", None)
        merged.update(values)
    if "max_new_tokens" in merged:
        max_new = merged["max_new_tokens"]
    elif "max_length" in merged:
        max_new = merged["max_length"] - prompt_tokens
        if max_new < 1:
            raise MoeOffloadError(f"max_length {merged['max_length']} leaves no room after a prompt of "
                                  f"{prompt_tokens} tokens: raise it or set max_new_tokens")
    else:
        max_new = DEFAULT_MAX_NEW_TOKENS
    if merged["do_sample"] and merged["temperature"] == 0:
        raise MoeOffloadError("temperature must be > 0 when sampling (do_sample=True); do_sample=False is greedy")
    return Resolved(max_new_tokens=max_new,
                    min_new_tokens=max_new if merged["ignore_eos"] else min(merged["min_new_tokens"], max_new),
                    do_sample=merged["do_sample"], temperature=merged["temperature"], top_p=merged["top_p"],
                    top_k=merged["top_k"], repetition_penalty=merged["repetition_penalty"],
                    rng_seed=merged.get("rng_seed"), stop_strings=merged["stop_strings"],
                    include_stop_str_in_output=merged["include_stop_str_in_output"])
