"""Routing traces: which experts every token picked in every MoE layer, recorded from a real generation.

A trace is the input of the replay simulator (simulate.py): cache policies can then be compared offline, on
the CPU, on exactly the routing a model produced.

File format (JSONL, gzip-compressed if the name ends in .gz): the first line is `{"meta": {...}}` (model, number
of routed experts per layer, top_k, MoE layer ids, per-request prompt / generated token counts), then one record
per token per MoE layer:

    {"request": 0, "token": 7, "layer": 3, "step": 12, "experts": [5, 1]}

- request: index of the prompt in the list given to record_trace.
- token: absolute position in the request's sequence (prefill = 0..T-1, then one per decode step).
- layer: the model's decoder layer index of this MoE layer (OffloadedExperts.layer; not the MoE ordinal, so
  a DeepSeek-style model with dense first layers starts at 1).
- step: global index of the forward call the token was part of (a prefill is one step for all its tokens,
  each decode token is its own step). Steps are numbered in execution order across requests, which is the
  granularity at which the engine's cache acts (cache.py counts each needed expert once per forward).
- experts: the router's top-k expert ids, in router order.
- predicted (only with `trace --predict`): the layer's router applied, through the layer's post-attention
  norm, to the residual stream ENTERING the decoder layer (before its attention runs, i.e. the previous layer's
  output): top-k ids, best first. What a prefetch could know one attention ahead (policy/prefetch.py).

Records come in execution order: step by step, layer by layer, token by token.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from ..errors import MoeOffloadError, read_user_text

TRACE_FORMAT = 1


@dataclass
class Trace:
    """A loaded trace: `records` (list of dicts as above) and `meta` (the header; {} if the file had none)."""

    records: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.records)


class RoutingRecorder:
    """Records every MoE layer's routing while attached to an LLMPipeline.

        with RoutingRecorder(pipe) as rec:
            rec.begin_request(0)
            pipe.generate("def f(x):", max_new_tokens=8)
        rec.records  # [{"request", "token", "layer", "step", "experts"}, ...]

    Attaching sets `route_observer` on each `pipe.layers[i]`; leaving restores whatever was there before.
    Token positions are derived, per request, from the number of tokens already seen: the call of the first
    MoE layer of a forward starts a new step and tells how many tokens that forward has; the other MoE layers
    of the same forward must see the same number of tokens. One request at a time (no batching): the engine
    hands the observer [T, K] ids of a single sequence.
    """

    def __init__(self, pipe, predict: bool = False):
        if not getattr(pipe, "layers", None):
            raise MoeOffloadError("the pipeline has no MoE layers to record")
        self.predict = predict
        self._predicted: dict[int, list[list[int]]] = {}  # MoE layer -> [T][K] of the forward in flight
        self._hooks: list[Any] = []
        self.pipe = pipe
        self.records: list[dict[str, Any]] = []
        self.request: int = 0
        self.tokens_seen: dict[int, int] = {}
        self.steps_of: dict[int, int] = {}  # request -> forward calls seen
        self.prompt_tokens: dict[int, int] = {}  # request -> tokens of its first forward (the prefill)
        self.step = -1  # global index of the forward in flight
        self._first_layer = pipe.layers[0].layer
        self._step_base = 0
        self._step_tokens = 0
        self._saved: list[Any] = []

    # -- attach / detach

    def __enter__(self) -> "RoutingRecorder":
        self._saved = [layer.route_observer for layer in self.pipe.layers]
        for layer in self.pipe.layers:
            layer.route_observer = self._observe
        if self.predict:
            self._attach_predictors()
        return self

    def _attach_predictors(self) -> None:
        """A pre-hook per MoE decoder layer: its router on its post-attention norm of the incoming residual."""
        decoder = getattr(getattr(self.pipe.model, "model", None), "layers", None)
        for runtime in self.pipe.layers:
            block = decoder[runtime.layer] if decoder is not None and runtime.layer < len(decoder) else None
            gate = getattr(getattr(block, "mlp", None), "gate", None)
            if block is None or not hasattr(block, "post_attention_layernorm") or not hasattr(gate, "weight"):
                raise MoeOffloadError("--predict needs decoder layers with post_attention_layernorm and mlp.gate "
                                      "(Qwen3-MoE style)")
            self._hooks.append(block.register_forward_pre_hook(self._predictor(runtime.layer, block, runtime.top_k),
                                                               with_kwargs=True))

    def _predictor(self, layer: int, block, top_k: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            with torch.no_grad():
                normed = block.post_attention_layernorm(hidden.reshape(-1, hidden.shape[-1]))
                logits = torch.nn.functional.linear(normed, block.mlp.gate.weight)
                ranked = torch.softmax(logits, dim=-1, dtype=torch.float).topk(top_k, dim=-1).indices
            self._predicted[layer] = ranked.to("cpu").tolist()
        return hook

    def __exit__(self, *exc) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        for layer, previous in zip(self.pipe.layers, self._saved):
            layer.route_observer = previous
        self._saved = []

    def begin_request(self, request: int) -> None:
        """Following forwards belong to `request`; a request seen before continues at its next position."""
        self.request = int(request)

    # -- the observer

    def _observe(self, layer: int, top_k_index: torch.Tensor) -> None:
        num_tokens = int(top_k_index.shape[0])
        if layer == self._first_layer:  # a new forward call
            self.step += 1
            self._step_base = self.tokens_seen.get(self.request, 0)
            self._step_tokens = num_tokens
            self.tokens_seen[self.request] = self._step_base + num_tokens
            self.steps_of[self.request] = self.steps_of.get(self.request, 0) + 1
            self.prompt_tokens.setdefault(self.request, num_tokens)
        elif num_tokens != self._step_tokens:
            raise RuntimeError(f"MoE layer {layer} saw {num_tokens} tokens in a forward whose first MoE layer saw "
                               f"{self._step_tokens} (batched or padded generation cannot be traced)")
        rows = top_k_index.detach().to("cpu").tolist()  # [T][K]
        guesses = self._predicted.pop(layer, None) if self.predict else None
        if self.predict and (guesses is None or len(guesses) != len(rows)):
            raise RuntimeError(f"MoE layer {layer}: no prediction for this forward (was the decoder layer bypassed?)")
        for offset, experts in enumerate(rows):
            record = {"request": self.request, "token": self._step_base + offset, "layer": int(layer),
                      "step": self.step, "experts": [int(e) for e in experts]}
            if guesses is not None:
                record["predicted"] = guesses[offset]
            self.records.append(record)


def pipeline_meta(pipe) -> dict[str, Any]:
    """Facts about the pipeline a trace needs for replay: experts per layer, top_k, MoE layer ids."""
    top_k = None
    try:
        top_k = int(getattr(pipe.model.config, "num_experts_per_tok", 0) or 0) or None
    except (AttributeError, TypeError, ValueError):
        pass
    return {
        "format": TRACE_FORMAT,
        "model": os.path.abspath(pipe.models_path),
        "moe_layers": [layer.layer for layer in pipe.layers],
        "num_experts": {str(layer.layer): layer.num_experts for layer in pipe.layers},
        "top_k": top_k,
        "ratio": pipe.config.moe_offload_ratio,
    }


def trace_generation(pipe, prompts: list[str], max_new_tokens: int, stop_at_eos: bool = False,
                     predict: bool = False) -> Trace:
    """Greedy generation of each prompt (request id = index) while recording; returns the trace in memory.

    By default exactly `max_new_tokens` tokens are generated per prompt (EOS does not stop it), so a trace's
    size is predictable: prompt tokens + max_new_tokens - 1 traced positions per request (the last generated
    token is never fed back). `stop_at_eos=True` stops at EOS like an ordinary generation.
    """
    if max_new_tokens < 1:
        raise MoeOffloadError("max_new_tokens must be at least 1")
    if not prompts:
        raise MoeOffloadError("no prompts to trace")
    requests = []
    extra = {} if stop_at_eos else {"min_new_tokens": max_new_tokens}
    with RoutingRecorder(pipe, predict=predict) as recorder:
        for request, prompt in enumerate(prompts):
            recorder.begin_request(request)
            text = pipe.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False, **extra)
            requests.append({"request": request, "prompt_tokens": recorder.prompt_tokens.get(request, 0),
                             "traced_tokens": recorder.tokens_seen.get(request, 0),
                             "forwards": recorder.steps_of.get(request, 0), "generated_chars": len(text)})
    meta = pipeline_meta(pipe)
    meta.update(max_new_tokens=max_new_tokens, stop_at_eos=stop_at_eos, predicted=predict, requests=requests)
    return Trace(recorder.records, meta)


def _open(path: str, mode: str):
    """Text file, gzip-compressed when the name ends in .gz (traces kept in the repository are)."""
    if path.endswith(".gz"):
        return gzip.open(path, mode + "t", encoding="utf-8")
    return open(path, mode, encoding="utf-8")


def save_trace(trace: Trace, path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        with _open(path, "w") as handle:
            handle.write(json.dumps({"meta": trace.meta}) + "\n")
            for record in trace.records:
                handle.write(json.dumps(record, separators=(",", ":")) + "\n")
    except OSError as err:
        raise MoeOffloadError(f"cannot write trace {path}: {err.strerror or err}") from None


def record_trace(pipe, prompts: list[str], max_new_tokens: int, path: str, stop_at_eos: bool = False,
                 predict: bool = False) -> Trace:
    """Greedy-generate each prompt with routing recorded, write the JSONL trace to `path`, return it."""
    trace = trace_generation(pipe, prompts, max_new_tokens, stop_at_eos, predict)
    save_trace(trace, path)
    return trace


def load_trace(path: str) -> Trace:
    """Read a JSONL trace (a `{"meta": ...}` header line is optional)."""
    if not os.path.isfile(path):
        raise MoeOffloadError(f"trace file not found: {path}")
    records, meta = [], {}
    with _open(path, "r") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise MoeOffloadError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(item, dict):
                raise MoeOffloadError(f"{path}:{number}: expected a JSON object")
            if "meta" in item and len(item) == 1:
                meta = item["meta"]
                continue
            missing = {"request", "token", "layer", "experts"} - set(item)
            if missing:
                raise MoeOffloadError(f"{path}:{number}: record lacks {', '.join(sorted(missing))}")
            records.append(item)
    return Trace(records, meta)


# ----------------------------------------------------------------------------------------------- CLI


def read_prompts(path: str) -> list[str]:
    """Prompts from a file: a JSON list of strings (.json), else one prompt per non-blank line."""
    text = read_user_text(path, "prompts file")
    if path.lower().endswith(".json"):
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as err:
            raise MoeOffloadError(f"prompts file {path} is not valid JSON: {err.msg} at line {err.lineno}") from None
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise MoeOffloadError(f"prompts file {path} must hold a JSON list of strings")
        prompts = [p for p in prompts if p.strip()]
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise MoeOffloadError(f"prompts file {path} holds no prompts")
    return prompts


def _cmd_trace(args: argparse.Namespace) -> int:
    from ..pipeline import LLMPipeline

    if args.max_new_tokens < 1:
        raise MoeOffloadError("--max-new-tokens must be at least 1")
    prompts = read_prompts(args.prompts)
    if os.path.isdir(args.output):
        raise MoeOffloadError(f"--output {args.output} is a folder; give a file name like trace.jsonl")
    pipe = LLMPipeline(args.model, args.device, require_tokenizer=True, MOE_OFFLOAD_RATIO=args.ratio)
    try:
        trace = record_trace(pipe, prompts, args.max_new_tokens, args.output, predict=args.predict)
    finally:
        pipe.close()
    steps = len({r["step"] for r in trace.records})
    print(f"moe-offload: traced {len(prompts)} prompts, {steps} forwards, {len(trace.records)} records "
          f"({len(pipe.layers)} MoE layers) -> {args.output}", file=sys.stderr)
    return 0


def add_trace_command(subparsers) -> argparse.ArgumentParser:
    """Register `trace` on an argparse subparsers object; returns the subparser."""
    trace = subparsers.add_parser("trace", help="record which experts each token routes to (JSONL)")
    trace.add_argument("--model", "-m", default=None, help="checkpoint folder (default: the shipped small model)")
    trace.add_argument("--prompts", "-p", required=True,
                       help="file of prompts: one per line, or a .json list of strings")
    trace.add_argument("--output", "-o", required=True, help="trace file to write (JSONL)")
    trace.add_argument("--max-new-tokens", "-n", type=int, default=64,
                       help="tokens generated per prompt (greedy; EOS does not stop it)")
    trace.add_argument("--device", "-d", default=None, help="cpu or cuda (default: cuda when available)")
    trace.add_argument("--ratio", default=100,
                       help="MOE_OFFLOAD_RATIO while recording (default 100; routing does not depend on it, up to "
                            "float rounding)")
    trace.add_argument("--predict", action="store_true",
                       help="also record each layer's router on the residual entering the layer (for simulate "
                            "--policy prefetch)")
    trace.set_defaults(run=_cmd_trace)
    return trace
