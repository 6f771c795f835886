"""Greedy decoding over a static KV cache, with the decode step replayed as one CUDA graph where it can be.

Why: once the MoE layers stop syncing with the host (all experts resident, or misses read in place: cache.py),
what is left of a decode step is Python launching ~650 small kernels, and the GPU waits on the host for most of
the step (replaying the step as a graph has decoded several times faster than transformers' eager loop).
Captured once and replayed, a step costs one launch.

Prefill is captured too, per prompt length, the second time a length is seen (the first run compiles and warms
the kernels; a capture costs about one eager forward of host time): a server answering prompts of recurring
lengths then prefills at kernel speed. Up to PREFILL_GRAPHS lengths are kept (least recently used dropped).

How: transformers' own StaticCache (fixed addresses, updated in place, length kept on the device), explicit
position ids and a 4-D additive attention mask built on the device from the position, so neither the model's
mask code nor anything else reads a device value on the host. The graph's inputs are static buffers (token,
position, EOS bias) updated in place; its outputs are the next token and its logits. Argmax after adding an
EOS bias of -inf until min_new_tokens is what transformers' greedy search with MinNewTokensLogitsProcessor does,
so the tokens are the same as `model.generate`'s.

Used for greedy generation of one sequence when the model's attention is causal over a mask (plain causal, or
with sliding-window layers, GPT-OSS's: see `attention_supported`) and its generation config asks for no other
logits processing; the graph additionally needs CUDA and every MoE layer on the no-sync path. Otherwise
(`unsupported_reason`) the pipeline uses `model.generate`; without a graph the same loop runs eagerly.

Sliding-window layers get a full-length static layer like the others (transformers' StaticSlidingWindowLayer
rolls its buffer, so where a key lies would depend on the position) and their own mask, causal and within the
window (`kv > q - window`, transformers' sliding_window_overlay), passed with the full layers' one as the dict
by layer type that the model's forward takes. Masked keys get weight exactly 0, so the attention is the
window's; the cost is those layers' KV cache at full length instead of the window's.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch

from .attention import prompt_attention

from .piecewise import PiecewiseStep

# Generation-config fields that greedy decoding here honours or that do not change greedy tokens.
_NEUTRAL_GENERATION_FIELDS = {"bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id",
                              "max_length", "max_new_tokens", "min_new_tokens", "do_sample", "temperature",
                              "top_p", "top_k", "transformers_version", "_from_model_config", "use_cache",
                              "cache_implementation", "output_attentions", "output_hidden_states",
                              "output_scores", "output_logits", "return_dict_in_generate"}
_CACHE_BUCKET = 256  # cache lengths are rounded up to this, so one graph serves many request sizes
PREFILL_GRAPHS = 4  # prompt lengths whose prefill graph is kept


def unsupported_reason(model, generate_kwargs: dict[str, Any]) -> str | None:
    """Why StaticDecoder cannot reproduce `model.generate(**generate_kwargs)`, or None if it can."""
    extra = set(generate_kwargs) - {"max_new_tokens", "min_new_tokens", "do_sample", "pad_token_id", "streamer"}
    if extra:
        return f"generation arguments {sorted(extra)}"
    if generate_kwargs.get("do_sample"):
        return "sampling"
    config = getattr(model, "generation_config", None)
    if config is None:
        return None
    from transformers import GenerationConfig

    defaults = GenerationConfig().to_dict()
    changed = {name for name, value in config.to_dict().items() if defaults.get(name, value) != value}
    if changed - _NEUTRAL_GENERATION_FIELDS:
        return f"generation config sets {sorted(changed - _NEUTRAL_GENERATION_FIELDS)}"
    if config.do_sample and "do_sample" not in generate_kwargs:  # an explicit do_sample=False is greedy
        return "the generation config samples"
    return None


def _eos_ids(model) -> list[int]:
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            return [eos] if isinstance(eos, int) else list(eos)
    return []


class StaticDecoder:
    """Greedy decoding of one sequence; `generate(ids, ...)` returns the new token ids.

    `piecewise_ready()` says whether a decode step whose MoE layers sync with the host may be recorded as graph
    segments around those layers (piecewise.py).
    `graph_ready(num_tokens)` says whether a forward of that many tokens may be captured now (MoE layers without
    host syncs); it is asked at each generation, as layers can change path.
    """

    def __init__(self, model, device: torch.device, use_graph: bool, graph_ready: Callable[[int], bool],
                 piecewise_ready: Callable[[], bool] = lambda: False):
        self.model, self.device = model, device
        self.use_graph = use_graph and device.type == "cuda"
        self.graph_ready = graph_ready
        self.piecewise_ready = piecewise_ready
        self.eos_ids = _eos_ids(model)
        self.dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        # transformers renamed forward's `past_key_values` to `cache` (5.2x); pass it by the name this one takes
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.cache = None
        self.max_len = 0
        self.graph: torch.cuda.CUDAGraph | PiecewiseStep | None = None  # the decode step, whole or in pieces
        self._graph_mode: str | None = None  # "full" or "piecewise": what self.graph is
        # prompt length -> (graph, ids [1, T], positions [T], logits [1, V]), least recently used first; the graph
        # reads ids and positions where they were at capture, so the entry keeps them alive
        self.prefill_graphs: dict[int, tuple] = {}
        self._prefill_lengths_seen: set[int] = set()
        self.graph_failure: str | None = None  # why capture failed once (then steps stay eager)
        self.steps_replayed = 0
        self.prefills_replayed = 0
        self._feed: torch.Tensor | None = None  # [N] generate's feed, if any

    def _ensure_cache(self, length: int) -> None:
        """A StaticCache of at least `length` positions, and the step buffers bound to it."""
        if self.cache is not None and length <= self.max_len:
            self.cache.reset()
            return
        from transformers import StaticCache

        self.max_len = -(-length // _CACHE_BUCKET) * _CACHE_BUCKET
        self.cache = StaticCache(config=self.model.config, max_cache_len=self.max_len)
        self._full_length_layers()
        self.graph = None  # graphs are bound to the old cache's tensors
        self.prefill_graphs.clear()
        device = self.device
        self._kv_positions = torch.arange(self.max_len, device=device)  # [L]
        self._token = torch.zeros((1, 1), dtype=torch.long, device=device)  # [1, 1] input of the next step
        self._position = torch.zeros((1, 1), dtype=torch.long, device=device)  # [1, 1] its position
        self._eos_bias = torch.zeros(self.model.config.get_text_config().vocab_size, dtype=torch.float32,
                                     device=device)  # [V] -inf at EOS ids while min_new_tokens is not reached
        self._logits = None

    def attention_supported(self) -> bool:
        """Every cache layer is a full-length static layer, or a sliding-window one (then replaced by a full-length
        layer and given a windowed mask, see the module docstring) in a model whose attention reads the mask
        (eager or SDPA; flash attention would take the window from its own argument) and whose forward takes
        masks by layer type (config.layer_types)."""
        from transformers import StaticCache
        from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer

        probe = StaticCache(config=self.model.config, max_cache_len=1)
        kinds = {type(layer) for layer in probe.layers}
        if kinds == {StaticLayer}:
            return True
        config = self.model.config.get_text_config()
        return (kinds <= {StaticLayer, StaticSlidingWindowLayer} and self._window is not None
                and getattr(config, "_attn_implementation", None) in ("eager", "sdpa")
                and set(getattr(config, "layer_types", None) or ()) <= {"full_attention", "sliding_attention"})

    @property
    def _window(self) -> int | None:
        """The sliding-window layers' window, None for a model without them."""
        config = self.model.config.get_text_config()
        window = getattr(config, "sliding_window", None)
        sliding = "sliding_attention" in (getattr(config, "layer_types", None) or ())
        return window if sliding and isinstance(window, int) and window > 0 else None

    def _mask(self, positions: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        """[1, 1, Q, L] additive causal mask for query positions [Q] over the whole cache; with sliding-window
        layers, {layer type: mask}, theirs also hiding keys `window` or more positions back."""
        visible = self._kv_positions[None, :] <= positions[:, None]  # [Q, L]
        zero = torch.zeros((), dtype=self.dtype, device=self.device)
        causal = torch.where(visible, zero, torch.finfo(self.dtype).min)[None, None]  # [1, 1, Q, L]
        window = self._window
        if window is None:
            return causal
        recent = self._kv_positions[None, :] > positions[:, None] - window  # [Q, L]
        sliding = torch.where(visible & recent, zero, torch.finfo(self.dtype).min)[None, None]  # [1, 1, Q, L]
        return {"full_attention": causal, "sliding_attention": sliding}

    def _full_length_layers(self) -> None:
        """Sliding-window cache layers replaced by full-length ones (their mask keeps the window: _mask)."""
        from transformers.cache_utils import StaticLayer

        for index, layer in enumerate(self.cache.layers):
            if type(layer) is not StaticLayer:
                self.cache.layers[index] = StaticLayer(max_cache_len=self.max_len)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits [1, V] of the last of `ids` [1, Q] at `positions` [Q], appending to the cache."""
        out = self.model(input_ids=ids, position_ids=positions[None], attention_mask=self._mask(positions),
                         use_cache=True, logits_to_keep=1, **{self._cache_arg: self.cache})
        return out.logits[:, -1]  # [1, V]

    def _pick(self, logits: torch.Tensor) -> torch.Tensor:
        return (logits.float() + self._eos_bias).argmax(dim=-1, keepdim=True)  # [1, 1]

    def _step(self) -> None:
        """One decode step on the static buffers: everything here may be captured."""
        logits = self._forward(self._token, self._position[0])  # [1, V]
        self._logits = logits
        self._token.copy_(self._pick(logits))
        self._position.add_(1)

    def _capture(self, step: Callable[[], Any]) -> tuple[torch.cuda.CUDAGraph | None, Any]:
        """(graph, what `step` returned while recorded), or (None, None) if the model would not be captured."""
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                result = step()
            return graph, result
        except RuntimeError as err:  # something in the model synced with the host: stay eager
            self.graph_failure = str(err).splitlines()[0]
            self.use_graph = False
            return None, None

    def _record_piecewise(self) -> PiecewiseStep | None:
        """The decode step recorded as graph segments around the syncing MoE layers, or None (then eager).

        Recording runs the step; the token, the position and the cache's own counters (transformers 5.2x's
        StaticLayer.cumulative_length, which says where the next keys go) are restored, and the cache row it wrote
        is rewritten by the replay that follows, which computes the same step again from the same inputs. (Its
        MoE layers' hits and misses count once more.)"""
        counters = [value for layer in self.cache.layers for name, value in vars(layer).items()
                    if isinstance(value, torch.Tensor) and name not in ("keys", "values")]
        saved = [value.clone() for value in counters]
        token, position = self._token.clone(), self._position.clone()
        step = PiecewiseStep(self.device)
        try:
            step.record(self._step)
        except RuntimeError as err:
            self.graph_failure = str(err).splitlines()[0]
            self.use_graph = False
            step = None
        self._token.copy_(token)
        self._position.copy_(position)
        for value, before in zip(counters, saved):
            value.copy_(before)
        return step

    def _mode(self) -> str | None:
        """How decode steps are replayed now: "full" (one graph), "piecewise", or None (eager)."""
        if not self.use_graph:
            return None
        if self.graph_ready(1):
            return "full"
        return "piecewise" if self.piecewise_ready() else None

    def _prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [1, V] after the prompt [1, T]; replayed from a graph for a length seen before."""
        length = input_ids.shape[1]
        positions = torch.arange(length, device=self.device)  # [T]
        capturable = self.use_graph and self.graph_ready(length)  # e.g. not while routes are being traced
        entry = self.prefill_graphs.pop(length, None) if capturable else None
        if entry is None and capturable and length in self._prefill_lengths_seen:
            static_ids = input_ids.to(self.device).clone()  # [1, T]
            graph, logits = self._capture(lambda: self._forward(static_ids, positions))
            entry = (graph, static_ids, positions, logits) if graph is not None else None
        self._prefill_lengths_seen.add(length)
        if entry is None:
            return self._forward(input_ids.to(self.device), positions)
        graph, static_ids, _, logits = entry
        self.prefill_graphs[length] = entry  # most recently used last
        while len(self.prefill_graphs) > PREFILL_GRAPHS:
            self.prefill_graphs.pop(next(iter(self.prefill_graphs)))
        static_ids.copy_(input_ids)
        graph.replay()
        self.prefills_replayed += 1
        return logits

    def _override(self, index: int) -> None:
        """With a feed, new token `index` is the fed one: written over the pick, in stream order (no host sync)."""
        if self._feed is not None:
            self._token.view(1).copy_(self._feed[index:index + 1])

    def _emit(self, token: int, new: list[int], max_new_tokens: int, min_new_tokens: int, streamer) -> bool:
        """Record a new token; True when generation stops after it (also when the streamer's put returns True:
        a caller that has seen enough, a server client gone)."""
        new.append(token)
        if streamer is not None and streamer.put(torch.tensor([token])) is True:
            return True
        return len(new) >= max_new_tokens or (token in self.eos_ids and len(new) >= min_new_tokens)

    def _replay_rest(self, new: list[int], max_new_tokens: int, min_new_tokens: int, streamer) -> None:
        """The remaining tokens by graph replays, queued one step ahead: the step making token i + 1 is queued
        before token i is read back, so the device does not wait for the host between steps. A step queued
        after a token that turns out to be EOS is wasted (its experts still count in the offload tally).
        The host sleeps on each token's event (blocking sync) instead of spinning: being a step ahead, it wakes in
        time, and the core it leaves is one the CPU expert path's spinning workers (hybrid/) need."""
        ring = torch.empty(2, dtype=torch.long, pin_memory=True)  # host copies of the last two tokens
        ready = [torch.cuda.Event(blocking=True), torch.cuda.Event(blocking=True)]

        def queue(index: int) -> None:  # the step that makes token `index`, and its copy to the host
            if index == min_new_tokens:
                self._eos_bias.zero_()
            self.graph.replay()
            self.steps_replayed += 1
            self._override(index)
            ring[index % 2].copy_(self._token[0, 0], non_blocking=True)
            ready[index % 2].record()

        index = len(new)
        queue(index)
        while True:
            if index + 1 < max_new_tokens:
                queue(index + 1)
            ready[index % 2].synchronize()
            if self._emit(int(ring[index % 2]), new, max_new_tokens, min_new_tokens, streamer):
                return
            index += 1

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, min_new_tokens: int = 0,
                 streamer=None, on_logits: Callable[[torch.Tensor], None] | None = None,
                 feed: torch.Tensor | None = None) -> list[int]:
        """`_generate` with SDPA kept off cuDNN's per-shape plans (attention.py), graphs captured alike."""
        with prompt_attention(self.device):
            return self._generate(input_ids, max_new_tokens, min_new_tokens, streamer, on_logits, feed)

    def _generate(self, input_ids: torch.Tensor, max_new_tokens: int, min_new_tokens: int = 0,
                  streamer=None, on_logits: Callable[[torch.Tensor], None] | None = None,
                  feed: torch.Tensor | None = None) -> list[int]:
        """New token ids for the prompt `input_ids` [1, T] (greedy; stops at EOS once min_new_tokens are out).

        `streamer` gets transformers' streamer calls (put(prompt), put(each token), end()); a put of a new token
        that returns True stops generation after that token. `on_logits` gets each
        step's logits [1, V] (float32 copy), for tests. `feed` [>= max_new_tokens]: tokens that become the new
        tokens in place of the greedy picks, so each step decodes a given token (benchmarks: llama-bench's
        text-generation test feeds random ones, where greedy decode of a random-weight model repeats one token).
        A fed token is written over the step's pick on the device, after the step.
        """
        if feed is not None:
            if feed.dim() != 1 or feed.numel() < max_new_tokens:
                raise ValueError(f"feed must be a 1-D tensor of at least {max_new_tokens} tokens")
            feed = feed.to(self.device, torch.long)  # [N]
        self._feed = feed
        prompt_len = input_ids.shape[1]
        if streamer is not None:
            streamer.put(input_ids.cpu())
        if max_new_tokens <= 0:
            if streamer is not None:
                streamer.end()
            return []
        self._ensure_cache(prompt_len + max_new_tokens)
        self._eos_bias.zero_()
        if min_new_tokens > 0 and self.eos_ids:
            self._eos_bias[self.eos_ids] = float("-inf")
        logits = self._prefill(input_ids)
        self._token.copy_(self._pick(logits))
        self._override(0)
        self._position.fill_(prompt_len)
        new: list[int] = []
        mode = self._mode()
        while True:
            if on_logits is not None:
                on_logits(logits.float().clone())
            if self._emit(int(self._token.item()), new, max_new_tokens, min_new_tokens, streamer):
                break
            if len(new) == min_new_tokens:
                self._eos_bias.zero_()
            if mode and (self.graph is None or self._graph_mode != mode) and len(new) > 1:
                # after an eager step has compiled the kernels and warmed the libraries
                self.graph = self._capture(self._step)[0] if mode == "full" else self._record_piecewise()
                self._graph_mode = mode if self.graph is not None else None
                mode = self._graph_mode
            if mode and self.graph is not None and on_logits is None:
                self._replay_rest(new, max_new_tokens, min_new_tokens, streamer)
                break
            if mode and self.graph is not None:
                self.graph.replay()
                self.steps_replayed += 1
            else:
                self._step()
            self._override(len(new))
            logits = self._logits
        if streamer is not None:
            streamer.end()
        return new
