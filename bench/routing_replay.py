"""Learned routing on the random benchmark model: each MoE layer's router choice replaced by a trained model's,
replayed from its recorded held-out traces (bench/worker.py's "trace" workload).

Why: the random-weight benchmark model sends most decode steps of layers 2-11 to the same 10-15 experts, so cache
hit rates, bytes per token and every speed that depends on them say nothing about a trained model. The 128-expert
top-8 model trained on the shipped corpus (tools/, bench/results/2026-12-06-cpu-train-small-moe-128.json) routes
like a fine-grained MoE, and its traces on held-out text (bench/policy_traces.py) hold every token's experts per
layer. Here layer l of the benchmark model takes, token after token, the experts that the trained model's layer
l mod L chose for consecutive tokens of those traces, so the cache sees learned routing while the weights, hence
the bytes moved and the compute, stay the benchmark model's. The router's weights of its own choice are kept:
they scale the outputs, not the traffic. A layer of another shape (the tiny CPU model) takes ids modulo its expert
count, the first top-k distinct ones (fit_rows).

The replay is device ops only (a gather by a device counter, then the counter moved on), so CUDA-graph replays of
decode steps take the next tokens' experts too; forwards the engine runs at load (graph captures, tuning) consume
rows like any other. Each generation starts at a fresh position of the stream (reset), so repeats do not repeat.
"""

from __future__ import annotations

import json
import os

import torch

from moe_offload.tools.trace import load_trace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRACE_INDEX = os.path.join(ROOT, "bench", "results", "traces", "small-moe-128-index.json")


def learned_stream(index_path: str = TRACE_INDEX, trace_set: str = "report") -> list[torch.Tensor]:
    """Per layer of the trained model, [N, K] int64: every token's experts over the index's traces of `trace_set`,
    requests in file order, each request's tokens in order (prompt, then generated)."""
    with open(index_path, encoding="utf-8") as handle:
        index = json.load(handle)
    per_layer: dict[int, list[list[int]]] = {}
    for name in sorted(index["traces"]):
        entry = index["traces"][name]
        if entry["set"] != trace_set:
            continue
        trace = load_trace(os.path.join(ROOT, entry["trace"]))
        for record in sorted(trace.records, key=lambda r: (r["request"], r["token"], r["layer"])):
            per_layer.setdefault(record["layer"], []).append(record["experts"])
    if not per_layer:
        raise ValueError(f"{index_path}: no traces of set {trace_set!r}")
    return [torch.tensor(per_layer[layer], dtype=torch.long) for layer in sorted(per_layer)]


def fit_rows(rows: torch.Tensor, num_experts: int, top_k: int) -> torch.Tensor:
    """[N, top_k]: each row's first top_k distinct ids modulo num_experts (the trained router's order, most
    probable first), filled up with the lowest unused ids where fewer remain: a step's experts stay distinct, as
    a router's are. Rows of a layer with the trained model's own shape pass unchanged."""
    if rows.shape[1] == top_k and num_experts >= int(rows.max()) + 1:
        return rows.clone()
    fitted = []
    for row in (rows % num_experts).tolist():
        chosen = list(dict.fromkeys(row))[:top_k]
        chosen += [e for e in range(num_experts) if e not in chosen][:top_k - len(chosen)]
        fitted.append(chosen)
    return torch.tensor(fitted, dtype=torch.long)


class LayerReplay:
    """One MoE layer's replacement routing: rows [N, K] of a trained layer, read from a device counter."""

    def __init__(self, rows: torch.Tensor, num_experts: int, top_k: int, device: torch.device):
        if top_k > num_experts:
            raise ValueError(f"top-{top_k} of {num_experts} experts")
        self.rows = fit_rows(rows, num_experts, top_k).to(device)  # [N, K]
        self.counter = torch.zeros(1, dtype=torch.long, device=device)  # [1] next row

    def take(self, top_k_index: torch.Tensor) -> torch.Tensor:
        """[T, K] the next T rows (wrapping around), for the router's [T, K]; the counter moves on by T."""
        tokens = top_k_index.shape[0]
        position = (self.counter + torch.arange(tokens, device=self.counter.device)) % self.rows.shape[0]  # [T]
        self.counter.add_(tokens)
        return self.rows[position]  # [T, K]


class RoutingReplay:
    """Every MoE layer of a pipeline routed by the learned stream (install), restarted per generation (reset)."""

    def __init__(self, pipe, stream: list[torch.Tensor], seed: int = 0):
        self.layers = []
        for layer in pipe.layers:
            replay = LayerReplay(stream[layer.layer % len(stream)], layer.num_experts, layer.top_k, pipe.device)
            layer.route_source = replay.take
            self.layers.append(replay)
        self.length = min(replay.rows.shape[0] for replay in self.layers)
        self.position = (seed * 7919) % self.length  # where the first generation starts

    def reset(self, tokens: int) -> None:
        """The next generation (about `tokens` forwards' rows) starts at fresh rows of the stream."""
        for replay in self.layers:
            replay.counter.fill_(self.position)
        self.position = (self.position + tokens) % self.length
