"""Streaming under load on CUDA: thousands of decode steps at low ratios give exactly the ratio-100 tokens.

A slot refilled while a kernel still reads it, a staging buffer reused too early or a missed event would show
up as a token that differs from the run where every expert is resident. Skipped without CUDA.
"""

import pytest
import torch

from moe_offload import LLMPipeline

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

STEPS = 1000  # x 6 MoE layers = 6000 layer steps per run


def _greedy(pipe, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return pipe.model.generate(ids, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False)


@pytest.fixture(scope="module")
def prompt_and_reference():
    pipe = LLMPipeline(None, "cuda", MOE_OFFLOAD_RATIO=100)
    ids = pipe.tokenizer("def fibonacci(n):", return_tensors="pt")["input_ids"].cuda()
    reference = _greedy(pipe, ids)
    pipe.close()
    return ids, reference


@pytest.mark.parametrize("ratio,host_cache", [(10, "auto"), (0, "auto"), (25, 0)])
def test_long_decode_matches_all_resident(prompt_and_reference, ratio, host_cache):
    ids, reference = prompt_and_reference
    pipe = LLMPipeline(None, "cuda", MOE_OFFLOAD_RATIO=ratio, MOE_HOST_CACHE=host_cache)
    tokens = _greedy(pipe, ids)
    stats = pipe.get_offload_stats()
    pipe.close()
    assert stats["misses"] > STEPS, "the run must really stream experts"
    mismatch = (tokens != reference).nonzero()
    assert mismatch.numel() == 0, f"first differing position {int(mismatch[0, -1])} of {reference.shape[1]}"
