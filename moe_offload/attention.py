"""Which of SDPA's backends a prompt's attention may use: every one but cuDNN's.

Why: torch's cuDNN attention backend builds an execution plan for every new query/key shape, on the host, before
it runs. A prompt of a length not seen before pays that in every layer, and a server's prompts are mostly of new
lengths (so are the growing key lengths of transformers' generate with a dynamic cache). The memory-efficient and
flash backends need no plan: a first-seen prefill then costs what a repeated one does. Once planned, cuDNN's
kernel is faster, but only for lengths that recur, which CUDA graph replay already serves. The pipeline's
generation runs in this context (decode steps too, so a graph replays what an eager step would run); a user's own
`pipe.model(...)` call keeps torch's defaults.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

PROMPT_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def prompt_attention(device: torch.device | str) -> contextlib.AbstractContextManager:
    """Context in which SDPA chooses among PROMPT_BACKENDS on CUDA; nothing changes elsewhere."""
    if torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel(PROMPT_BACKENDS)
