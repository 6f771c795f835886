"""LLMPipeline: the user-facing object. Load once, generate text, read the offload counters.

Shaped after OpenVINO GenAI's `LLMPipeline(models_path, device, **properties)` so that users of the
reference system can switch with the same property names (MOE_OFFLOAD_RATIO, ...).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Callable, Iterator

import torch

from . import defaults, hybrid
from .attention import prompt_attention
from .checkpoint import Checkpoint
from .config import OffloadConfig, load_properties_file, make_config
from .decoding import StaticDecoder, unsupported_reason
from .dense_fusion import fuse_dense_ops
from .errors import MoeOffloadError
from .host_embeddings import host_table_bytes
from .integration import build_offloaded_model, check_supported
from .profile import file_digest

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
    """`LLMPipeline(models_path, device="cuda", config=None, **properties)`.

    properties: the names of config.PROPERTIES (MOE_OFFLOAD_RATIO=37 keeps 37% of each MoE layer's routed experts
    on the device). `config` is a path to a JSON file or a dict of the same keys; keyword properties override it.
    Properties left at auto are decided at load for this machine (defaults.py; `choices` says what and why);
    `retune` measures what this machine's stored profile would otherwise give (profile.py).
    """

    def __init__(self, models_path: str | None = None, device: str = "cuda",
                 config: str | dict[str, Any] | None = None, progress: bool = False,
                 require_tokenizer: bool = False, retune: bool = False, **properties: Any):
        merged: dict[str, Any] = {}
        if isinstance(config, str):
            merged.update(load_properties_file(config))
        elif config is not None:
            merged.update(config)
        merged.update(properties)
        self.config: OffloadConfig = make_config(merged)
        self.device = resolve_device(device)
        self.models_path = models_path or DEFAULT_MODEL
        self.checkpoint = Checkpoint(self.models_path)
        hf_config = check_supported(self.checkpoint)
        if require_tokenizer and not has_tokenizer(self.models_path):
            raise MoeOffloadError(f"no tokenizer in {self.models_path}: generating text needs one")
        loaded = build_offloaded_model(self.checkpoint, hf_config, self.device, self.config, progress)
        self.model, self.layers = loaded.model, loaded.runtimes
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

    def _generate_kwargs(self, prompt: str, max_new_tokens: int, **kwargs: Any) -> dict[str, Any]:
        tokenizer = self._require_tokenizer()
        inputs = tokenizer(prompt, return_tensors="pt").to(self.device)
        if inputs["input_ids"].shape[1] == 0:
            raise MoeOffloadError("empty prompt: give at least one token of text")
        kwargs.setdefault("do_sample", False)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return dict(**inputs, max_new_tokens=max_new_tokens, pad_token_id=pad, **kwargs)

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

    @torch.inference_mode()
    def generate(self, prompt: str, max_new_tokens: int = 64,
                 streamer: Callable[[str], Any] | None = None, **kwargs: Any) -> str:
        """Generated text (greedy unless do_sample=True; temperature, top_p, top_k as in transformers).

        `streamer`, if given, is called with each new piece of text as soon as it is decoded.
        """
        if streamer is not None:
            return "".join(_call_each(self.stream(prompt, max_new_tokens, **kwargs), streamer))
        args = self._generate_kwargs(prompt, max_new_tokens, **kwargs)
        return self.tokenizer.decode(self.generate_tokens(**args), skip_special_tokens=True)

    def stream(self, prompt: str, max_new_tokens: int = 64, **kwargs: Any) -> Iterator[str]:
        """Iterate over the generated text piece by piece while generation runs in a worker thread."""
        from transformers import TextIteratorStreamer

        args = self._generate_kwargs(prompt, max_new_tokens, **kwargs)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        failure: list[BaseException] = []

        def work() -> None:
            try:
                self.generate_tokens(**args, streamer=streamer)
            except BaseException as err:  # re-raised in the caller's thread below
                failure.append(err)
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            yield from streamer
        finally:  # also when the caller stops early: the interpreter must not exit under a running generation
            thread.join()
        if failure:
            raise failure[0]

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


def _call_each(pieces: Iterator[str], callback: Callable[[str], Any]) -> Iterator[str]:
    for piece in pieces:
        callback(piece)
        yield piece
