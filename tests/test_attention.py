"""The SDPA backends generation runs under: cuDNN's is off on CUDA (a plan per new shape), the rest untouched,
and the process's settings come back afterwards."""

import torch

from moe_offload.attention import prompt_attention


def backends() -> tuple[bool, bool, bool, bool]:
    cuda = torch.backends.cuda
    return (cuda.cudnn_sdp_enabled(), cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(),
            cuda.math_sdp_enabled())


def test_cuda_generation_leaves_out_cudnn_and_restores_settings():
    before = backends()
    with prompt_attention("cuda"):
        assert backends() == (False, True, True, True)
    assert backends() == before


def test_cpu_generation_changes_nothing():
    before = backends()
    with prompt_attention(torch.device("cpu")):
        assert backends() == before
