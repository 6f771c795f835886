"""LLMPipeline: the user-facing object. Load once, generate text, read the offload counters.

Shaped after OpenVINO GenAI's `LLMPipeline(models_path, device, **properties)` so that users of the
reference system can switch with the same property names (MOE_OFFLOAD_RATIO, ...).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import replace
from typing import Any, Iterator, Mapping

import torch

from . import defaults, hybrid
from .attention import prompt_attention
from .checkpoint import Checkpoint
from .config import OffloadConfig, load_properties_file, make_config
from .decoding import StaticDecoder, unsupported_reason
from .dense_fusion import fuse_dense_ops
from .errors import MoeOffloadError
from .generation import GenerationConfig, Resolved, as_config, check_names, checkpoint_defaults, resolve
from .host_embeddings import host_table_bytes
from .integration import build_offloaded_model, check_supported
from .perf_metrics import PerfMetrics, PromptTimes
from .profile import file_digest
from .streaming import Tee, TextCallback, TextIterator, TextSink, TokenStamps

DEFAULT_MODEL = os.path.join(os.path.dirname(__file__), "assets", "small-moe")
log = logging.getLogger("moe_offload")
# files that carry a vocabulary: without one, AutoTokenizer still builds the config's tokenizer class, empty, and
# every prompt encodes to no tokens ("empty prompt"), so a folder without them has no tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model")


def has_tokenizer(path: str) -> bool:
    """Whether the checkpoint folder holds a tokenizer's vocabulary (see TOKENIZER_FILES)."""
    return any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES)


def resolve_device(device: str | None) -> torch.device:
    """"cpu", "cuda[:N]" or "gpu"; None or "auto" = cuda when torch sees a GPU, else cpu."""
    if device is None or str(device).strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text = str(device).strip().lower()
    if text == "gpu":
        text = "cuda"
    try:
        resolved = torch.device(text)
    except RuntimeError:
        raise MoeOffloadError(f"unknown device {device!r} (use cpu or cuda)") from None
    if resolved.type not in ("cpu", "cuda"):
        raise MoeOffloadError(f"unsupported device {device!r} (use cpu or cuda)")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise MoeOffloadError("device cuda requested but torch sees no CUDA GPU")
    return resolved


class LLMPipeline:
    """`LLMPipeline(models_path, device=None, config=None, **properties)`.

    device: "cpu", "cuda[:N]", or None / "auto" (the CLI's choice: cuda when torch sees a GPU, else cpu).
    properties: the names of config.PROPERTIES (MOE_OFFLOAD_RATIO=37 keeps 37% of each MoE layer's routed experts
    on the device). `config` is a path to a JSON file or a dict of the same keys; keyword properties override it.
    Properties left at auto are decided at load for this machine (defaults.py; `choices` says what and why);
    `retune` measures what this machine's stored profile would otherwise give (profile.py).
    """

    def __init__(self, models_path: str | None = None, device: str | None = None,
                 config: str | os.PathLike | Mapping[str, Any] | None = None, progress: bool = False,
                 require_tokenizer: bool = False, retune: bool = False, **properties: Any):
        started = time.perf_counter()
        merged = _merge_properties(config, properties)
        self.config: OffloadConfig = make_config(merged)
        self.device = resolve_device(device)
        self.models_path = models_path or DEFAULT_MODEL
        self.checkpoint = Checkpoint(self.models_path)
        hf_config = check_supported(self.checkpoint)
        if require_tokenizer and not has_tokenizer(self.models_path):
            raise MoeOffloadError(f"no tokenizer in {self.models_path}: generating text needs one")
        loaded = build_offloaded_model(self.checkpoint, hf_config, self.device, self.config, progress)
        self.model, self.layers = loaded.model, loaded.runtimes
        #: the ratio decided at load (a memory budget's, MOE_OFFLOAD_RATIO=AUTO's), and the load's device plan
        self.config, self.memory_plan = loaded.config, loaded.plan
        tuned = hybrid.enable(self.layers, loaded.sites, self.config, self.device,
                              file_digest(os.path.join(self.models_path, "config.json")), retune)
        self.host_embedding_bytes = host_table_bytes(self.model)  # MOE_HOST_EMBEDDINGS: placed at load
        # before the decoder: its CUDA graphs capture whatever kernels the model launches
        self.fused_dense_ops = fuse_dense_ops(self.model) if self.config.moe_fuse_dense == "auto" else []
        self.tokenizer = self._load_tokenizer()
        self._closed = False
        self.decoder = StaticDecoder(self.model, self.device, use_graph=self.config.moe_cuda_graph != "off",
                                     graph_ready=self._graph_ready, piecewise_ready=self._piecewise_ready)
        if not self.decoder.attention_supported():  # masks it cannot build: transformers' generate builds them
            self.decoder = None
        # MOE_CPU_EXPERTS=auto: a measured CPU path kept only if whole decodes are faster with it
        self.cpu_expert_check = hybrid.check_decodes(self.decoder, self.layers, tuned, self.device,
                                                     self.model.config.get_text_config().vocab_size)
        if self.cpu_expert_check is not None:
            self.reset_offload_stats()
        enabled = sum(layer.cpu_share is not None for layer in self.layers)
        #: what the properties left at auto became at this load, and why (defaults.py); also logged
        self.choices: list[defaults.Choice] = loaded.choices + [
            defaults.cpu_experts(self.config.moe_cpu_experts, self.device, tuned, self.cpu_expert_check, enabled,
                                 hybrid.unsupported(self.layers))]
        for choice in self.choices:
            log.info("%s", choice.line())
        # generation_config.json's values under every call's own (generation.py); set_generation_config replaces it
        self._generation_defaults = checkpoint_defaults(self.models_path)
        self.load_time_ms = (time.perf_counter() - started) * 1000
        #: timings of the last generate/stream call (OpenVINO GenAI's perf_metrics); None before the first
        self.perf_metrics: PerfMetrics | None = None

    def _graph_ready(self, num_tokens: int) -> bool:
        """Every MoE layer runs a forward of `num_tokens` tokens without a host sync (and nobody records routes)."""
        return all(layer.sync_free(num_tokens * layer.top_k) and layer.route_observer is None
                   for layer in self.layers)

    def _piecewise_ready(self) -> bool:
        """Decode steps with syncing MoE layers may be recorded as graph segments (MOE_CUDA_GRAPH=auto)."""
        return self.config.moe_cuda_graph == "auto" and all(layer.route_observer is None for layer in self.layers)

    def _load_tokenizer(self):
        from transformers import AutoTokenizer

        if not has_tokenizer(self.models_path):
            return None  # _require_tokenizer says so in one line, where text is asked for
        try:
            return AutoTokenizer.from_pretrained(self.models_path)
        except (OSError, ValueError, TypeError):
            return None  # a checkpoint without a tokenizer still works on token ids through pipe.model

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise MoeOffloadError(f"no tokenizer in {self.models_path}: pass token ids to pipe.model instead")
        return self.tokenizer

    @torch.inference_mode()
    def generate_tokens(self, input_ids: torch.Tensor, streamer=None, feed: torch.Tensor | None = None,
                        **kwargs: Any) -> torch.Tensor:
        """New token ids [N] for `input_ids` [1, T]; kwargs as for transformers' generate (max_new_tokens, ...).

        Greedy generation runs on the static-cache decoder (decoding.py: one CUDA graph per step where every MoE
        layer is sync-free); anything it does not reproduce (sampling, other logits processing, attention it cannot
        mask, an attention mask with padding) goes to transformers' generate. Both give transformers' greedy
        tokens (tests/test_decoding.py checks it on the CPU, bench/gpu_correctness.py on a GPU). `streamer`: transformers'
        streamer protocol (put, end); on both paths a put of new tokens that returns True stops generation after
        them. `feed` [>= N]: decode
        these tokens instead of the greedy picks (StaticDecoder.generate; static decoder only).
        """
        if self._closed:  # the host tier is unpinned: kernels must no longer read it in place
            raise MoeOffloadError("this pipeline is closed")
        self._check_context(input_ids.shape[1], kwargs.get("max_new_tokens"))
        mask = kwargs.pop("attention_mask", None)
        static = (self.decoder is not None and input_ids.shape[0] == 1 and (mask is None or bool(mask.all()))
                  and unsupported_reason(self.model, kwargs) is None)
        if feed is not None and not static:
            raise MoeOffloadError("feeding given tokens needs greedy decoding of one unpadded sequence on the "
                                  "static-cache decoder")
        if static:
            new = self.decoder.generate(input_ids, kwargs["max_new_tokens"], kwargs.get("min_new_tokens") or 0,
                                        streamer=streamer, feed=feed)
            hybrid.raise_errors(self.layers)
            return torch.tensor(new, dtype=torch.long)
        if streamer is not None:
            streamer = _StopOnTrue(streamer)
            kwargs["stopping_criteria"] = [*kwargs.get("stopping_criteria", ()), streamer.criterion]
        with prompt_attention(self.device):  # its key length grows every step: a new shape each time
            output = self.model.generate(input_ids=input_ids, attention_mask=mask, streamer=streamer, **kwargs)
        hybrid.raise_errors(self.layers)
        new = output[0, input_ids.shape[1]:].cpu()
        return new[:streamer.kept] if streamer is not None and streamer.stopped else new

    def _check_context(self, prompt_tokens: int, max_new_tokens: Any) -> None:
        """A generation stays within MOE_CONTEXT tokens: the KV cache and workspace the device memory was planned
        for (budget.py), so a budget that loaded is not overrun by a long prompt."""
        context = self.memory_plan.context
        if isinstance(max_new_tokens, int) and prompt_tokens + max_new_tokens > context:
            raise MoeOffloadError(f"{prompt_tokens} prompt tokens + max_new_tokens {max_new_tokens} exceed "
                                  f"MOE_CONTEXT={context}, the context the device memory was planned for; set "
                                  "MOE_CONTEXT higher (up to the model's max_position_embeddings)")

    # -- the text API: OpenVINO GenAI's generate(inputs, generation_config=None, streamer=None, **kwargs) --------

    def get_generation_config(self) -> GenerationConfig:
        """The defaults every call starts from: the checkpoint's generation_config.json (the fields we apply), or
        what set_generation_config gave since."""
        return replace(self._generation_defaults)

    def set_generation_config(self, config: GenerationConfig | Mapping[str, Any] | Any) -> None:
        """Replace those defaults (ours, transformers' GenerationConfig, or a dict of fields)."""
        self._generation_defaults = as_config(config) or GenerationConfig()

    def generate(self, inputs: Prompt | list[Prompt], generation_config: Any = None, streamer: Any = None,
                 **kwargs: Any) -> str | list[str]:
        """The generated text of `inputs`: a prompt (str), a conversation (a list of {"role", "content"} dicts,
        laid out by the tokenizer's chat template, as transformers' pipelines do), or a list of either, which
        returns a list (prompts run one after another: the engine decodes one sequence at a time).

        generation_config: GenerationConfig (ours, transformers', or a dict); kwargs: its fields (max_new_tokens,
        do_sample, temperature, top_p, top_k, ...). Explicit values win over the checkpoint's generation_config.json
        (get_generation_config), which wins over transformers' defaults; greedy unless something samples.
        streamer: a callback str -> bool | None called with each piece of text (True stops generation), or a
        transformers-protocol streamer (put / end; a put returning True stops). Timings: `self.perf_metrics`.
        """
        prompts, single = _prompts(inputs)
        if streamer is not None and not single:
            raise MoeOffloadError("a streamer follows one prompt: pass one prompt, not a list")
        _check_streamer(streamer)
        layers = self._layers(generation_config, kwargs)
        texts, times = [], []
        for prompt in prompts:
            text, timing = self._generate_one(prompt, layers, streamer)
            texts.append(text)
            times.append(timing)
        self.perf_metrics = PerfMetrics(self.load_time_ms, times)
        return texts[0] if single else texts

    def stream(self, inputs: Prompt, generation_config: Any = None, **kwargs: Any) -> Iterator[str]:
        """Iterate over the generated text piece by piece while generation runs in a worker thread; arguments as
        for generate (one prompt or conversation). Stopping early (break, close()) stops the generation too."""
        prompts, single = _prompts(inputs)
        if not single:
            raise MoeOffloadError("stream takes one prompt or conversation; generate takes a list")
        layers = self._layers(generation_config, kwargs)
        outcome: list = []  # [PromptTimes] or [exception], handed from the worker
        prompt, start = prompts[0], time.perf_counter()
        encoded = self._encode(prompt)  # in the caller's thread: a bad prompt raises here, before any thread starts
        settings = resolve(layers, encoded.shape[1])
        streamer = TextIterator(self.tokenizer, stop_strings=settings.stop_strings,
                                include_stop=settings.include_stop_str_in_output)

        def work() -> None:
            try:
                outcome.append(self._generate_one(prompt, layers, streamer, (start, encoded, settings))[1])
            except BaseException as err:  # re-raised in the caller's thread below
                outcome.append(err)
                streamer.end()

        return self._drain(streamer, threading.Thread(target=work, daemon=True), outcome)

    def _drain(self, streamer: TextIterator, thread: threading.Thread, outcome: list) -> Iterator[str]:
        thread.start()
        try:
            yield from streamer
        finally:  # also when the caller stops early: stop the generation, and never leave it running behind us
            streamer.cancel()
            thread.join()
            if outcome and not isinstance(outcome[0], BaseException):
                self.perf_metrics = PerfMetrics(self.load_time_ms, outcome)
        if outcome and isinstance(outcome[0], BaseException):
            raise outcome[0]

    def _layers(self, generation_config: Any, kwargs: dict[str, Any]) -> list[GenerationConfig | None]:
        """The caller's layers over the checkpoint's, checked before anything runs (generation.resolve)."""
        return [self._generation_defaults, as_config(generation_config), GenerationConfig(**check_names(kwargs))]

    def _encode(self, prompt: Prompt) -> torch.Tensor:
        """Token ids [1, T] of a prompt, or of a conversation through the tokenizer's chat template (whose text
        carries its own special tokens, so none are added, as apply_chat_template(tokenize=True) does)."""
        tokenizer = self._require_tokenizer()
        if isinstance(prompt, str):
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        else:
            if not getattr(tokenizer, "chat_template", None):
                raise MoeOffloadError(f"no chat template in {self.models_path}: a conversation needs one "
                                      "(pass a string prompt instead)")
            try:
                text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            except Exception as err:  # jinja2's TemplateError (raise_exception in a template) and kin
                raise MoeOffloadError(f"the chat template rejected the conversation: {err}") from None
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        if ids.shape[1] == 0:
            raise MoeOffloadError("empty prompt: give at least one token of text")
        return ids.to(self.device)

    def _pad_id(self) -> int | None:
        tokenizer = self.tokenizer
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def _generate_one(self, prompt: Prompt, layers: list, streamer: Any,
                      prepared: tuple[float, torch.Tensor, Resolved] | None = None) -> tuple[str, PromptTimes]:
        """One prompt through the engine: its text and its timings. `streamer`: generate's (or stream's
        TextIterator); `prepared`: (start time, ids, settings) where the caller encoded and resolved already."""
        if prepared is None:
            start = time.perf_counter()
            ids = self._encode(prompt)  # [1, T]
            settings = resolve(layers, ids.shape[1])
        else:
            start, ids, settings = prepared
        tokenized = time.perf_counter()
        sink, text_sink = self._sinks(streamer, settings)
        stamps = TokenStamps(sink)
        with _seeded(settings.rng_seed, self.device):
            new = self.generate_tokens(ids, streamer=stamps, pad_token_id=self._pad_id(),
                                       **settings.generate_kwargs())
        generated = time.perf_counter()
        # with stop strings the text is what the sink let through; else all of it (what any pieces add up to)
        text = text_sink.text if settings.stop_strings else self.tokenizer.decode(new, skip_special_tokens=True)
        return text, PromptTimes(int(ids.shape[1]), start, tokenized, tuple(stamps.times), generated,
                                 time.perf_counter())

    def _sinks(self, streamer: Any, settings: Resolved) -> tuple[Any, TextSink | None]:
        """(what generate_tokens is given, the TextSink that sees the text, if any) for a call's `streamer`: a
        text callback becomes a TextCallback; stop strings need a TextSink, beside a caller's token streamer."""
        stops = dict(stop_strings=settings.stop_strings, include_stop=settings.include_stop_str_in_output)
        if isinstance(streamer, TextSink):
            return streamer, streamer
        if streamer is not None and not _is_token_streamer(streamer):
            sink = TextCallback(self.tokenizer, streamer, **stops)
            return sink, sink
        if not settings.stop_strings:
            return streamer, None
        sink = TextSink(self.tokenizer, **stops)
        return (sink if streamer is None else Tee(streamer, sink)), sink

    def _generate_kwargs(self, prompt: str, max_new_tokens: int, **kwargs: Any) -> dict[str, Any]:
        """generate_tokens' arguments for `prompt`, resolved as generate resolves them (the benchmark's way in)."""
        ids = self._encode(prompt)
        settings = resolve(self._layers(None, dict(kwargs, max_new_tokens=max_new_tokens)), ids.shape[1])
        return dict(input_ids=ids, pad_token_id=self._pad_id(), **settings.generate_kwargs())

    def get_offload_stats(self) -> dict[str, Any]:
        """Counters since load (or the last reset_offload_stats)."""
        fetcher = self.layers[0].fetcher
        stats = fetcher.stats
        scratch = self.layers[0].scratch
        counters = [layer.counters for layer in self.layers]  # one sync per zero-copy layer
        hits = sum(c.hits for c in counters)
        misses = sum(c.misses for c in counters)
        return {
            "ratio": self.config.moe_offload_ratio,
            "moe_layers": len(self.layers),
            "total_experts": sum(layer.num_experts for layer in self.layers),
            "resident_experts": sum(layer.table.capacity for layer in self.layers),
            # how an expert is held and moved (expert_format.py), and its bytes: quantized ones stay quantized
            "expert_format": self.layers[0].format.describe(),
            "expert_bytes": self.layers[0].expert_bytes,
            "device_expert_bytes": sum(layer.device_bytes for layer in self.layers),
            "device_staging_bytes": scratch.nbytes,  # the streaming scratch, once a miss has gone through it
            "host_tier_experts": sum(len(layer.host.row_of) for layer in self.layers if layer.host),
            "host_tier_bytes": sum(layer.host.nbytes for layer in self.layers if layer.host),
            "hits": hits,
            "misses": misses,
            "hit_rate": hits / (hits + misses) if hits + misses else None,
            "bytes_streamed": {"host": stats.bytes_from_host, "disk": stats.bytes_from_disk},
            "experts_streamed": {"host": stats.experts_from_host, "disk": stats.experts_from_disk},
            # misses the kernel read straight from pinned host memory over PCIe (zero-copy): no copy, no slot
            "experts_read_in_place": sum(c.read_in_place for c in counters),
            "bytes_read_in_place": sum(c.read_in_place * layer.expert_bytes
                                       for c, layer in zip(counters, self.layers)),
            # misses computed by the CPU in the host tier (MOE_CPU_EXPERTS): their bytes never cross PCIe
            "experts_computed_on_cpu": sum(c.computed_on_cpu for c in counters),
            "bytes_computed_on_cpu": sum(c.computed_on_cpu * layer.expert_bytes
                                         for c, layer in zip(counters, self.layers)),
            **hybrid.summary(self.layers, self.cpu_expert_check),  # cpu_expert_*: the CPU's share (MOE_CPU_EXPERTS)
            "per_layer": [{"layer": layer.layer, "hits": c.hits, "misses": c.misses,
                           "experts_read_in_place": c.read_in_place,
                           "experts_from_host": stats.per_layer.get(layer.layer, {}).get("host", 0),
                           "experts_from_disk": stats.per_layer.get(layer.layer, {}).get("disk", 0)}
                          for c, layer in zip(counters, self.layers)],
            "disk_io": fetcher.disk.strategy,
            "kernel": "torch" if self.layers[0].fused_moe is None else "triton",
            "zero_copy_layers": sum(layer.zero_copy for layer in self.layers),
            # the cache's eviction policy (MOE_CACHE_POLICY; policy/), and the layers whose decode steps admit
            # misses with its device form (MOE_ZERO_COPY=lru or auto)
            "cache_policy": self.layers[0].table.policy.name,
            "device_admission_layers": sum(layer.lru_admission for layer in self.layers),
            # the longest prompt whose misses zero-copy layers read in place (longer ones copy them)
            "zero_copy_prefill_max_tokens": next((layer.zero_copy_max_pairs // layer.top_k for layer in self.layers
                                                  if layer.zero_copy), None),
            "cuda_graph_steps": self.decoder.steps_replayed if self.decoder else 0,
            "cuda_graph_prefills": self.decoder.prefills_replayed if self.decoder else 0,
            "cuda_graph_failure": self.decoder.graph_failure if self.decoder else None,
            # piecewise steps (disk tier): layers whose all-cached steps replay a graph of their own, or why not
            "piecewise_hits_graphs": self._hits_graphs(),
            "fused_dense_ops": self.fused_dense_ops,
            "host_embedding_bytes": self.host_embedding_bytes,  # MOE_HOST_EMBEDDINGS: the table moved off the device
            "choices": {choice.name: {"value": choice.value, "why": choice.why} for choice in self.choices},
        }

    def _hits_graphs(self) -> dict | None:
        step = self.decoder.graph if self.decoder is not None else None
        calls = getattr(step, "calls", None)
        if calls is None:
            return None
        return {"layers": sum(call.hits_graph is not None for call in calls),
                "failure": next((call.hits_graph_failure for call in calls if call.hits_graph_failure), None)}

    def reset_offload_stats(self) -> None:
        for layer in self.layers:
            layer.reset_counters()
        self.layers[0].fetcher.stats.reset()
        if self.decoder is not None:
            self.decoder.steps_replayed = self.decoder.prefills_replayed = 0

    def close(self) -> None:
        """Release pinned host memory and file handles now (otherwise when the pipeline is collected)."""
        self._closed = True
        self.layers[0].fetcher.close()  # first: it waits for copies in flight
        for layer in self.layers:
            if layer.host is not None:
                layer.host.close()


class _StopOnTrue:
    """A streamer passed on to transformers' generate, which ignores what put returns: a put returning True is
    turned into a stopping criterion, so both generation paths stop alike. transformers 5.25 evaluates its
    criteria before it streams the step's token, so one more token may be made: it is neither streamed nor
    returned (`kept` counts the steps streamed up to the stop)."""

    def __init__(self, streamer):
        self.streamer, self.stopped, self.prompt_seen, self.kept = streamer, False, False, 0

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first put is the prompt: it cannot stop what never began
            self.prompt_seen = True
            self.streamer.put(value)
        elif not self.stopped:
            self.kept += 1
            self.stopped = self.streamer.put(value) is True

    def end(self) -> None:
        self.streamer.end()

    def criterion(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """transformers' StoppingCriteria call: True per sequence [B] once the streamer asked to stop."""
        return torch.full((input_ids.shape[0],), self.stopped, dtype=torch.bool, device=input_ids.device)


Message = Mapping[str, Any]  # {"role": ..., "content": ...}
Prompt = str | list[Message]  # a prompt, or a conversation


def _merge_properties(config: Any, properties: dict[str, Any]) -> dict[str, Any]:
    """`config` (a JSON file path, inline JSON text or a mapping) under the keyword properties."""
    if isinstance(config, os.PathLike):
        config = os.fspath(config)
    if isinstance(config, str):
        merged = dict(load_properties_file(config))
    elif isinstance(config, Mapping):
        merged = dict(config)
    elif config is None:
        merged = {}
    else:
        raise MoeOffloadError(f"config must be a JSON file, JSON text or a dict of properties, got "
                              f"{type(config).__name__} {config!r}")
    merged.update(properties)
    return merged


def _is_conversation(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(m, Mapping) for m in value)


def _check_conversation(messages: Any) -> list[dict[str, Any]]:
    for message in messages:
        if not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
            raise MoeOffloadError(f"a conversation is a list of {{'role': str, 'content': str}} dicts, got a message "
                                  f"{dict(message)!r}")
    return [dict(message) for message in messages]


def _prompts(inputs: Any) -> tuple[list[Any], bool]:
    """(the prompts, whether `inputs` was one prompt): a str or a conversation is one; a list of them is many."""
    if isinstance(inputs, str):
        return [inputs], True
    if _is_conversation(inputs):
        return [_check_conversation(inputs)], True
    if isinstance(inputs, (list, tuple)) and inputs:
        if all(isinstance(p, str) for p in inputs):
            return list(inputs), False
        if all(_is_conversation(p) for p in inputs):
            return [_check_conversation(p) for p in inputs], False
    what = "an empty list" if isinstance(inputs, (list, tuple)) and not inputs else repr(inputs)[:80]
    raise MoeOffloadError(f"inputs must be a prompt (str), a conversation (a list of {{'role', 'content'}} dicts) "
                          f"or a non-empty list of either, got {what}")


def _is_token_streamer(streamer: Any) -> bool:
    """transformers' streamer protocol: put(token ids) and end()."""
    return callable(getattr(streamer, "put", None)) and callable(getattr(streamer, "end", None))


def _check_streamer(streamer: Any) -> None:
    if streamer is not None and not callable(streamer) and not _is_token_streamer(streamer):
        raise MoeOffloadError(f"streamer must be a callable str -> bool | None, or an object with put and end, got "
                              f"{type(streamer).__name__}")


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Draws seeded by `seed` inside, torch's global generators restored after (OpenVINO's rng_seed)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield
