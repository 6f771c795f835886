"""Expert compute kernels: reference.py is the eager torch path (CPU path and test oracle); the triton_* modules
are the fused paths, each used only where Triton runs (triton_kernels)."""

from __future__ import annotations

import importlib
from types import ModuleType

import torch


def triton_kernels(module: str, device: torch.device) -> ModuleType | None:
    """The Triton kernel module `module` (its full name, e.g. "moe_offload.kernels.triton_lru") where Triton runs
    on `device` (CUDA, or the CPU in Triton's interpreter), else None: triton not installed, or a CPU device
    outside the interpreter. Each such module exports runs_on(tensor)."""
    try:
        kernels = importlib.import_module(module)
    except ImportError:
        return None
    return kernels if kernels.runs_on(torch.empty(0, device=device)) else None
