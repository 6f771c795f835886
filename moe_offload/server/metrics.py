"""Counters of the server, rendered as Prometheus text (format 0.0.4) for GET /metrics.

Kept without a client library: a handful of counters, one histogram and a snapshot of
`pipe.get_offload_stats()` are a few lines of text. The offload counters are a snapshot the generation thread
takes after each request (worker.py), not read here: reading them syncs the device, which must not happen from
another thread while a decode step is being captured into a CUDA graph.
"""

from __future__ import annotations

import threading
from typing import Any

# upper bounds (seconds) of the time-to-first-token histogram's buckets
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
PREFIX = "moe_offload"


class Metrics:
    """Thread-safe tallies: the event loop counts requests, the generation thread counts tokens and times."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = {}  # (endpoint, outcome) -> count
        self.prompt_tokens = self.completion_tokens = 0
        self.decode_seconds = 0.0  # first token to last, summed over requests
        self.last_tokens_per_second = 0.0
        self.ttft_counts = [0] * (len(TTFT_BUCKETS) + 1)  # per bucket, the last one +Inf
        self.ttft_sum = 0.0
        self.running = 0
        self.offload: dict[str, Any] | None = None

    def count_request(self, endpoint: str, outcome: str) -> None:
        """outcome: ok, cancelled (client gone), rejected (4xx, 429 included) or error (5xx)."""
        with self._lock:
            key = (endpoint, outcome)
            self.requests[key] = self.requests.get(key, 0) + 1

    def first_token(self, seconds: float) -> None:
        with self._lock:
            index = next((i for i, bound in enumerate(TTFT_BUCKETS) if seconds <= bound), len(TTFT_BUCKETS))
            self.ttft_counts[index] += 1
            self.ttft_sum += seconds

    def finished(self, prompt_tokens: int, completion_tokens: int, decode_seconds: float) -> None:
        """A generation's totals; decode_seconds runs from its first token to its last."""
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            self.decode_seconds += decode_seconds
            if completion_tokens > 1 and decode_seconds > 0:
                self.last_tokens_per_second = (completion_tokens - 1) / decode_seconds

    def set_running(self, running: int) -> None:
        with self._lock:
            self.running = running

    def set_offload(self, stats: dict[str, Any]) -> None:
        with self._lock:
            self.offload = stats

    def render(self, queued: int, queue_size: int) -> str:
        with self._lock:
            lines: list[str] = []
            metric(lines, "requests_total", "counter", "requests by endpoint and outcome",
                   [({"endpoint": e, "outcome": o}, n) for (e, o), n in sorted(self.requests.items())])
            metric(lines, "requests_running", "gauge", "requests generating now (at most 1: batch-1 decode)",
                   [({}, self.running)])
            metric(lines, "requests_queued", "gauge", "requests waiting for the generation thread", [({}, queued)])
            metric(lines, "queue_size", "gauge", "requests that may wait before a 429", [({}, queue_size)])
            metric(lines, "prompt_tokens_total", "counter", "prompt tokens processed", [({}, self.prompt_tokens)])
            metric(lines, "completion_tokens_total", "counter", "tokens generated", [({}, self.completion_tokens)])
            metric(lines, "decode_seconds_total", "counter", "seconds from each first token to its last",
                   [({}, self.decode_seconds)])
            metric(lines, "decode_tokens_per_second", "gauge", "decode rate of the last request",
                   [({}, self.last_tokens_per_second)])
            histogram(lines, "time_to_first_token_seconds", "from a request's arrival (queue wait included) to "
                      "its first token", self.ttft_counts, self.ttft_sum)
            if self.offload is not None:
                offload_metrics(lines, self.offload)
            return "\n".join(lines) + "\n"


def metric(lines: list[str], name: str, kind: str, help_text: str, samples: list[tuple[dict, float]]) -> None:
    full = f"{PREFIX}_{name}"
    lines += [f"# HELP {full} {help_text}", f"# TYPE {full} {kind}"]
    for labels, value in samples:
        lines.append(f"{full}{_labels(labels)} {_number(value)}")


def histogram(lines: list[str], name: str, help_text: str, counts: list[int], total: float) -> None:
    full = f"{PREFIX}_{name}"
    lines += [f"# HELP {full} {help_text}", f"# TYPE {full} histogram"]
    cumulative = 0
    for bound, count in zip((*map(str, TTFT_BUCKETS), "+Inf"), counts):
        cumulative += count
        lines.append(f'{full}_bucket{{le="{bound}"}} {cumulative}')
    lines += [f"{full}_sum {_number(total)}", f"{full}_count {cumulative}"]


def offload_metrics(lines: list[str], stats: dict[str, Any]) -> None:
    """The engine's counters (pipe.get_offload_stats()) as of the end of the last request, per tier."""
    tiers = ("host", "disk")
    metric(lines, "experts_resident", "gauge", "routed experts resident on the device",
           [({}, stats["resident_experts"])])
    metric(lines, "experts_total", "gauge", "routed experts of the model", [({}, stats["total_experts"])])
    metric(lines, "host_tier_experts", "gauge", "experts held in host RAM", [({}, stats["host_tier_experts"])])
    metric(lines, "expert_hits_total", "counter", "routed experts found on the device", [({}, stats["hits"])])
    metric(lines, "expert_misses_total", "counter", "routed experts not on the device", [({}, stats["misses"])])
    metric(lines, "experts_streamed_total", "counter", "experts copied to the device, by the tier they came from",
           [({"tier": t}, stats["experts_streamed"][t]) for t in tiers])
    metric(lines, "bytes_streamed_total", "counter", "expert bytes copied to the device, by tier",
           [({"tier": t}, stats["bytes_streamed"][t]) for t in tiers])
    metric(lines, "experts_read_in_place_total", "counter", "misses read by the kernel from pinned host RAM",
           [({}, stats["experts_read_in_place"])])
    metric(lines, "experts_computed_on_cpu_total", "counter", "misses computed by the CPU from host RAM",
           [({}, stats["experts_computed_on_cpu"])])


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    escaped = (f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
               for k, v in labels.items())
    return "{" + ",".join(escaped) + "}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
