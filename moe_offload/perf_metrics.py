"""PerfMetrics: the timings of the last generate/stream call, shaped like OpenVINO GenAI's `perf_metrics`.

Why: a user comparing with OpenVINO (or tuning a ratio) wants time to first token and tokens/s from an ordinary
call, without the benchmark. The getters and their meaning follow OpenVINO's: durations in milliseconds as
(mean, std) over the prompts of the call; TPOT is the mean time between consecutive new tokens (decode only),
throughput is 1000 / TPOT tokens per second, so both are nan for a prompt that made fewer than two tokens. TTFT
runs from the start of the prompt's processing (tokenization included) to the first new token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MeanStdPair:
    mean: float
    std: float


@dataclass(frozen=True)
class PromptTimes:
    """One prompt of a call; times are time.perf_counter() seconds."""

    input_tokens: int
    start: float  # before tokenization
    tokenized: float
    token_times: tuple[float, ...]  # one per new token, as it was handed over
    generated: float  # generation returned
    done: float  # text decoded

    @property
    def tpot_ms(self) -> float:
        times = self.token_times
        return (times[-1] - times[0]) * 1000 / (len(times) - 1) if len(times) > 1 else math.nan


def _pair(values: list[float]) -> MeanStdPair:
    mean = sum(values) / len(values)
    return MeanStdPair(mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)))


class PerfMetrics:
    """`pipe.perf_metrics` after a call: get_ttft(), get_tpot(), get_throughput(), ... as in OpenVINO GenAI."""

    def __init__(self, load_time_ms: float, prompts: list[PromptTimes]):
        self.load_time_ms, self.prompts = load_time_ms, prompts

    def get_load_time(self) -> float:
        """Milliseconds the pipeline took to load."""
        return self.load_time_ms

    def get_num_input_tokens(self) -> int:
        return sum(p.input_tokens for p in self.prompts)

    def get_num_generated_tokens(self) -> int:
        return sum(len(p.token_times) for p in self.prompts)

    def get_ttft(self) -> MeanStdPair:
        """Time to first token, ms (nan for a prompt that made none)."""
        return _pair([(p.token_times[0] - p.start) * 1000 if p.token_times else math.nan for p in self.prompts])

    def get_tpot(self) -> MeanStdPair:
        """Time per output token after the first, ms."""
        return _pair([p.tpot_ms for p in self.prompts])

    def get_throughput(self) -> MeanStdPair:
        """Decode tokens per second (1000 / TPOT)."""
        return _pair([1000 / p.tpot_ms if p.tpot_ms > 0 else math.nan for p in self.prompts])

    def get_generate_duration(self) -> MeanStdPair:
        """The whole prompt, tokenization to decoded text, ms."""
        return _pair([(p.done - p.start) * 1000 for p in self.prompts])

    def get_tokenization_duration(self) -> MeanStdPair:
        return _pair([(p.tokenized - p.start) * 1000 for p in self.prompts])

    def get_detokenization_duration(self) -> MeanStdPair:
        return _pair([(p.done - p.generated) * 1000 for p in self.prompts])

    def as_dict(self) -> dict[str, Any]:
        """The means, for logs and JSON (the CLI's --stats); nan becomes None (JSON has no nan)."""
        means = {"load_time_ms": self.get_load_time(), "input_tokens": self.get_num_input_tokens(),
                 "generated_tokens": self.get_num_generated_tokens(), "ttft_ms": self.get_ttft().mean,
                 "tpot_ms": self.get_tpot().mean, "throughput_tokens_per_s": self.get_throughput().mean,
                 "generate_duration_ms": self.get_generate_duration().mean}
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in means.items()}
