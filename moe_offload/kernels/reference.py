"""Eager torch expert compute: the CPU path, and the oracle every faster kernel is tested against.

It mirrors transformers' own experts math (gate/up projection, act(gate) * up, down projection, times the
routing weight in the routing weight's dtype) so that offloaded results match transformers on the same
checkpoint; contributions are summed in float32, as transformers' grouped_mm path does, and rounded once.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def expert_ffn(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
               act_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """SwiGLU-style expert: x [n, H], gate_up [2I, H] (gate rows first), down [H, I] -> [n, H]."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)  # [n, I] each
    return F.linear(act_fn(gate) * up, down)  # [n, H]


def weighted_expert_output(x: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                           act_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """weights[:, None] * expert(x) in float32: x [n, H], weights [n] -> [n, H]."""
    return (expert_ffn(x, gate_up, down, act_fn) * weights[:, None]).float()


def accumulate_expert(out: torch.Tensor, hidden: torch.Tensor, tokens: torch.Tensor, weights: torch.Tensor,
                      gate_up: torch.Tensor, down: torch.Tensor,
                      act_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """out[tokens] += weights * expert(hidden[tokens]).

    out [T, H] float32; hidden [T, H]; tokens [n] rows routed to this expert; weights [n] their routing weights.
    """
    out.index_add_(0, tokens, weighted_expert_output(hidden[tokens], weights, gate_up, down, act_fn))
