"""Where zero-copy layers stop reading misses in place and copy them (moe_offload/prefill_tuning.py).

The choice is tested with fake clocks; the measurement itself runs on the CPU with Triton's interpreter (both
paths give the same rows, counters untouched, the scratch released). On CUDA it runs at load: the pipeline
reports what it chose.
"""

import pytest
import torch

import triton_interp  # noqa: F401  first: sets TRITON_INTERPRET before triton loads

from moe_offload import LLMPipeline
from moe_offload.cache import ZERO_COPY_MAX_PAIRS_PER_EXPERT
from moe_offload.prefill_tuning import tune_prefill_threshold

LENGTHS = (8, 16, 32, 64, 128)


def _zero_copy_layer(checkpoint_factory, ratio=25):
    from moe_offload.kernels.triton_moe import fused_moe

    pipe = LLMPipeline(checkpoint_factory("qwen3_moe"), "cpu", MOE_OFFLOAD_RATIO=ratio)
    layer = pipe.layers[0]
    layer.fused_moe = fused_moe
    assert layer.enable_direct(pipe.device) and layer.zero_copy
    return pipe, layer


@pytest.mark.parametrize("clock, max_tokens", [
    # copying pays a fixed 20 units, then half the in-place cost: no slower (within 5%) from 64 tokens on
    (lambda tokens, copy: 20 + 0.5 * tokens if copy else 1.0 * tokens, 32),
    # no slower at 16 tokens by chance, not at 32, then from 64 on: only a run up to the longest counts
    (lambda tokens, copy: {8: 9, 16: 5, 32: 40, 64: 10, 128: 10}[tokens] if copy else 1.0 * tokens, 32),
    # a tie within the margin counts for copying (uniform routing is in place's best case): from 32 tokens on
    (lambda tokens, copy: {8: 9.0, 16: 17.5, 32: 33.0, 64: 66.0, 128: 130.0}[tokens] if copy else 1.0 * tokens, 16),
    # copying faster from the first length on: every forward of more than one token copies; decode stays
    (lambda tokens, copy: 0.1 * tokens if copy else 1.0 * tokens, 1),
])
def test_threshold_is_where_copying_starts_to_win(checkpoint_factory, clock, max_tokens):
    _, layer = _zero_copy_layer(checkpoint_factory)
    result = tune_prefill_threshold(layer, None, lengths=LENGTHS, timer=clock)
    assert result["max_tokens"] == max_tokens
    assert layer.zero_copy_max_pairs == max_tokens * layer.top_k
    assert layer.sync_free(layer.top_k)  # a decode step never copies: graphs replay it
    assert not layer.sync_free((max_tokens + 1) * layer.top_k)
    assert set(result["seconds"]) == set(LENGTHS)


def test_in_place_winning_everywhere_keeps_the_default(checkpoint_factory):
    _, layer = _zero_copy_layer(checkpoint_factory)
    default = layer.zero_copy_max_pairs
    assert default == ZERO_COPY_MAX_PAIRS_PER_EXPERT * layer.num_experts
    result = tune_prefill_threshold(layer, None, lengths=LENGTHS,
                                    timer=lambda tokens, copy: 2.0 * tokens if copy else 1.0 * tokens)
    assert layer.zero_copy_max_pairs == max(default, LENGTHS[-1] * layer.top_k)
    assert result["max_tokens"] == layer.zero_copy_max_pairs // layer.top_k


@torch.inference_mode()
def test_measuring_runs_both_paths_and_leaves_no_trace(checkpoint_factory, monkeypatch):
    """The real timer: each length through the in-place path and the copy path (forced by the threshold); the
    same rows either way; counters and transfer stats reset after; the scratch it allocated released."""
    pipe, layer = _zero_copy_layer(checkpoint_factory)
    assert layer.scratch.nbytes == 0
    paths, inputs, scratch_bytes = [], [], []
    forward = type(layer).forward

    def watched(self, hidden, ids, weights, act_fn):
        paths.append(self.sync_free(ids.numel()))
        inputs.append((ids.clone(), hidden.clone()))
        out = forward(self, hidden, ids, weights, act_fn)
        scratch_bytes.append(self.scratch.nbytes)
        return out

    monkeypatch.setattr(type(layer), "forward", watched)
    result = tune_prefill_threshold(layer, torch.nn.functional.silu, lengths=(2, 4), repeats=1)
    assert paths.count(True) == paths.count(False) == 4  # per length and path: a warm-up and one timed forward
    assert all(s > 0 for timing in result["seconds"].values() for s in timing.values())
    stats = pipe.get_offload_stats()
    assert (stats["hits"], stats["misses"]) == (0, 0) and stats["bytes_streamed"] == {"host": 0, "disk": 0}
    assert max(scratch_bytes) > 0 and layer.scratch.nbytes == 0  # streamed through while measuring, then released
    monkeypatch.setattr(type(layer), "forward", forward)
    for ids, hidden in inputs:  # either path gives the same rows
        layer.zero_copy_max_pairs = 1 << 62
        in_place = layer.forward(hidden, ids, torch.full(ids.shape, 0.25), torch.nn.functional.silu)
        layer.zero_copy_max_pairs = -1
        copied = layer.forward(hidden, ids, torch.full(ids.shape, 0.25), torch.nn.functional.silu)
        assert torch.equal(in_place, copied)


def _tune_at_load(checkpoint_factory, monkeypatch, lru_layers: tuple[int, ...] = ()):
    """(pipe, layers measured): integration._tune_prefill (run at load on CUDA) over zero-copy layers, those in
    lru_layers with LRU admission, with a tuner that records its layer and picks 5 tokens."""
    from types import SimpleNamespace

    from moe_offload import integration
    from moe_offload.kernels.triton_moe import fused_moe

    pipe = LLMPipeline(checkpoint_factory("qwen3_moe"), "cpu", MOE_OFFLOAD_RATIO=25)
    for index, layer in enumerate(pipe.layers):
        layer.fused_moe = fused_moe
        assert layer.enable_direct(pipe.device, lru=index in lru_layers)
        assert layer.lru_admission == (index in lru_layers)
    measured = []

    def fake_tune(layer, act_fn):
        measured.append(layer)
        layer.zero_copy_max_pairs = 5 * layer.top_k
        return {"max_tokens": 5, "seconds": {}}

    monkeypatch.setattr(integration, "tune_prefill_threshold", fake_tune)
    sites = [SimpleNamespace(module=SimpleNamespace(act_fn=torch.nn.functional.silu)) for _ in pipe.layers]
    integration._tune_prefill(pipe.layers, sites)
    return pipe, measured


def test_load_applies_the_first_layers_threshold_to_every_zero_copy_layer(checkpoint_factory, monkeypatch):
    """Measured on the first zero-copy layer, applied to all, reported in the stats."""
    pipe, measured = _tune_at_load(checkpoint_factory, monkeypatch)
    assert measured == [pipe.layers[0]] and len(pipe.layers) > 1
    assert all(layer.zero_copy_max_pairs == 5 * layer.top_k for layer in pipe.layers)
    stats = pipe.get_offload_stats()
    assert stats["zero_copy_prefill_max_tokens"] == 5 and stats["zero_copy_prefill_tuning"]["max_tokens"] == 5


def test_layers_with_lru_admission_keep_the_default_threshold(checkpoint_factory, monkeypatch):
    """Measured on the first layer whose resident set is fixed; a layer with LRU admission is neither measured
    nor given the result (the measurement's uniform routing over a fixed set is not what it serves)."""
    pipe, measured = _tune_at_load(checkpoint_factory, monkeypatch, lru_layers=(0,))
    lru_layer, static_layer = pipe.layers
    assert measured == [static_layer] and static_layer.zero_copy_max_pairs == 5 * static_layer.top_k
    assert lru_layer.zero_copy_max_pairs == ZERO_COPY_MAX_PAIRS_PER_EXPERT * lru_layer.num_experts


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prefill_threshold_measured_at_load_on_cuda():
    """The shipped model at ratio 0 (zero-copy): the threshold is measured at load, and a prompt just longer than
    it copies its misses and gives ratio 100's tokens."""
    pipe = LLMPipeline(None, "cuda", MOE_OFFLOAD_RATIO=0)
    stats = pipe.get_offload_stats()
    tuning = stats["zero_copy_prefill_tuning"]
    assert tuning is not None and tuning["max_tokens"] == stats["zero_copy_prefill_max_tokens"]
    print("prefill tuning:", tuning)
    length = tuning["max_tokens"] + 8
    prompt = torch.randint(2, 1000, (1, length), generator=torch.Generator().manual_seed(0)).cuda()
    got = pipe.generate_tokens(prompt, max_new_tokens=16, min_new_tokens=16)
    assert pipe.get_offload_stats()["experts_streamed"]["host"] > 0  # the prompt took the copy path
    pipe.close()
    reference = LLMPipeline(None, "cuda", MOE_OFFLOAD_RATIO=100)
    assert torch.equal(got, reference.generate_tokens(prompt, max_new_tokens=16, min_new_tokens=16))
