"""moe-offload against transformers on the same checkpoint: every architecture, ratio and tier, fp32 on CPU.

Tolerance: max |logits difference| <= 1e-4 in float32 (only the summation order of expert outputs differs),
and 20 greedy tokens identical.
"""

import pytest
import torch
from tiny_models import ARCHITECTURES, TIERS, VOCAB

from moe_offload import LLMPipeline
from moe_offload import policy as policy_module

ATOL = 1e-4
RATIOS = [0, 37, 100]
NEW_TOKENS = 20


def _prompt(seed: int = 0, length: int = 13) -> torch.Tensor:
    return torch.randint(2, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))  # [1, T]


@pytest.fixture(scope="module")
def reference_outputs(checkpoint_factory):
    """Logits and greedy tokens from transformers itself, per (arch, layout)."""
    from transformers import AutoModelForCausalLM

    cache = {}

    def get(arch: str, layout: str = "per_expert", max_shard_size=None):
        key = (arch, layout, max_shard_size)
        if key not in cache:
            path = checkpoint_factory(arch, layout, max_shard_size)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            ids = _prompt()
            with torch.no_grad():
                logits = model(ids).logits
                tokens = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)
            cache[key] = (path, ids, logits, tokens)
        return cache[key]

    return get


def _compare(path, ids, ref_logits, ref_tokens, **props):
    pipe = LLMPipeline(path, "cpu", **props)
    with torch.no_grad():
        logits = pipe.model(ids).logits
        tokens = pipe.model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)
    diff = (logits - ref_logits).abs().max().item()
    assert diff <= ATOL, f"max |logits diff| {diff:.3e} > {ATOL}"
    assert tokens.shape[1] == ids.shape[1] + NEW_TOKENS
    assert torch.equal(tokens, ref_tokens), "greedy tokens differ from transformers"
    new = pipe.generate_tokens(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(new, ref_tokens[0, ids.shape[1]:]), "the pipeline's static-cache decoding differs"
    return pipe


@pytest.mark.parametrize("tier", list(TIERS))
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_matches_transformers(reference_outputs, arch, ratio, tier):
    path, ids, logits, tokens = reference_outputs(arch)
    pipe = _compare(path, ids, logits, tokens, MOE_OFFLOAD_RATIO=ratio, MOE_HOST_CACHE=TIERS[tier])
    stats = pipe.get_offload_stats()
    assert stats["hits"] + stats["misses"] > 0
    per_layer = stats["per_layer"]
    assert sum(l["hits"] for l in per_layer) == stats["hits"] and sum(l["misses"] for l in per_layer) == stats["misses"]
    assert sum(l["experts_from_host"] + l["experts_from_disk"] for l in per_layer) == stats["misses"]
    if ratio == 100:
        assert stats["misses"] == 0 and stats["bytes_streamed"] == {"host": 0, "disk": 0}
    else:
        streamed = stats["bytes_streamed"]
        assert stats["misses"] > 0
        # Every miss is served by exactly one tier, the one configured.
        assert (streamed["host"] > 0) == (tier == "host") and (streamed["disk"] > 0) == (tier == "disk")
    if ratio == 0:
        assert stats["hits"] == 0 and stats["resident_experts"] == 0


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_fused_expert_layout(reference_outputs, arch):
    path, ids, logits, tokens = reference_outputs(arch, "fused")
    _compare(path, ids, logits, tokens, MOE_OFFLOAD_RATIO=37, MOE_HOST_CACHE=0)


def test_sharded_checkpoint_with_index(reference_outputs):
    path, ids, logits, tokens = reference_outputs("qwen2_moe", "per_expert", "40KB")
    import os

    assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    _compare(path, ids, logits, tokens, MOE_OFFLOAD_RATIO=37, MOE_HOST_CACHE="20KiB")


def test_partial_host_tier_falls_through_to_disk(reference_outputs):
    """A host tier smaller than the non-resident experts serves some misses; the rest come from the file."""
    path, ids, logits, tokens = reference_outputs("olmoe")
    pipe = _compare(path, ids, logits, tokens, MOE_OFFLOAD_RATIO=0, MOE_HOST_CACHE=2 * 3 * 16 * 32 * 4 * 3)
    stats = pipe.get_offload_stats()
    assert stats["host_tier_experts"] == 2 * 3  # 3 experts fit per layer, 2 MoE layers
    assert stats["bytes_streamed"]["host"] > 0 and stats["bytes_streamed"]["disk"] > 0


def test_fused_triton_path_matches_transformers(reference_outputs):
    """The engine with the Triton kernel (CPU: Triton's interpreter) on cache hits, admitted misses and scratch."""
    pytest.importorskip("triton")
    from moe_offload.kernels.triton_moe import fused_moe

    path, ids, logits, _ = reference_outputs("qwen3_moe")
    pipe = LLMPipeline(path, "cpu", MOE_OFFLOAD_RATIO=37, MOE_HOST_CACHE=0)
    for layer in pipe.layers:
        layer.fused_moe = fused_moe
    with torch.no_grad():
        got = pipe.model(ids).logits
    assert (got - logits).abs().max().item() <= ATOL
    assert pipe.get_offload_stats()["kernel"] == "triton"


def test_triton_kernel_refused_on_cpu(checkpoint_factory, monkeypatch):
    from moe_offload import MoeOffloadError

    monkeypatch.setenv("MOE_KERNEL", "triton")
    with pytest.raises(MoeOffloadError, match="MOE_KERNEL=triton is not available"):
        LLMPipeline(checkpoint_factory("qwen3_moe"), "cpu")


@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_every_ratio_gives_the_same_bits(tmp_path, kernel):
    """With top-4 routing the order in which experts are summed matters in floating point; both expert paths
    fill one row per (token, k) from whichever pool holds the expert and sum a token's K rows in one fixed order,
    so hits, admitted misses and streamed waves give identical bits at every ratio."""
    from tiny_models import tiny_config
    from transformers import AutoModelForCausalLM

    fused_moe = None
    if kernel == "triton":  # on the CPU it runs in Triton's interpreter: few tokens keep it fast
        pytest.importorskip("triton")
        from moe_offload.kernels.triton_moe import fused_moe
    config = tiny_config("qwen3_moe")
    config.num_experts_per_tok = 4
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp_path)
    ids = _prompt(seed=2, length=5 if fused_moe else 24)
    new_tokens = 4 if fused_moe else NEW_TOKENS
    outputs = {}
    for ratio in (0, 37, 100):
        pipe = LLMPipeline(str(tmp_path), "cpu", MOE_OFFLOAD_RATIO=ratio, MOE_HOST_CACHE=0)
        for layer in pipe.layers:
            layer.fused_moe = fused_moe
        with torch.no_grad():  # decode steps mix hits, admitted misses and streamed experts in changing orders
            run = pipe.model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                      output_logits=True, return_dict_in_generate=True)
        outputs[ratio] = torch.stack(run.logits)  # [steps, 1, V]
    assert torch.equal(outputs[0], outputs[100]) and torch.equal(outputs[37], outputs[100])


@pytest.mark.parametrize("ratio", [100, 37, 0])
def test_direct_triton_path_matches_general_path(tmp_path, ratio, monkeypatch):
    """With the Triton kernel, a layer whose experts are all resident or in the host tier runs as one launch set
    with no host sync, reading misses in place (zero-copy): the same bits, hits and misses as the general path,
    with no expert copied. Both run LRU: the direct path's admission is the device LRU (policy/device_lru.py),
    which has no form of the host's default LFRU yet."""
    pytest.importorskip("triton")
    from tiny_models import tiny_config
    from transformers import AutoModelForCausalLM

    from moe_offload.kernels.triton_moe import fused_moe

    config = tiny_config("qwen3_moe")
    config.num_experts_per_tok = 4
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp_path)
    ids = _prompt(seed=2, length=5)
    results = {}
    monkeypatch.setattr(policy_module, "DEFAULT_POLICY", "lru")
    for direct in (True, False):
        pipe = LLMPipeline(str(tmp_path), "cpu", MOE_OFFLOAD_RATIO=ratio)  # host tier: every non-resident expert
        for layer in pipe.layers:
            layer.fused_moe = fused_moe
            assert layer.enable_direct(pipe.device) if direct else not layer.direct
        with torch.no_grad():
            run = pipe.model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                                      output_logits=True, return_dict_in_generate=True)
        stats = pipe.get_offload_stats()
        results[direct] = (torch.stack(run.logits), stats["hits"], stats["misses"])
        copied = stats["bytes_streamed"]["host"]
        if direct:
            assert copied == 0 and stats["zero_copy_layers"] == (len(pipe.layers) if ratio < 100 else 0)
            assert stats["experts_read_in_place"] == stats["misses"]
            assert stats["bytes_read_in_place"] == stats["misses"] * pipe.layers[0].expert_bytes
        else:
            assert (copied > 0) == (ratio < 100) and stats["experts_read_in_place"] == 0
    (fast, fast_hits, fast_misses), (general, hits, misses) = results[True], results[False]
    assert torch.equal(fast, general) and (fast_hits, fast_misses) == (hits, misses)
    assert (hits > 0) == (ratio > 0) and (misses > 0) == (ratio < 100)


def test_zero_copy_needs_every_miss_in_the_host_tier(tmp_path):
    """A layer with experts only on disk cannot read them in place: it keeps the copy path."""
    pytest.importorskip("triton")
    from tiny_models import tiny_config
    from transformers import AutoModelForCausalLM

    from moe_offload.kernels.triton_moe import fused_moe

    AutoModelForCausalLM.from_config(tiny_config("qwen3_moe"), dtype=torch.float32).save_pretrained(tmp_path)
    pipe = LLMPipeline(str(tmp_path), "cpu", MOE_OFFLOAD_RATIO=25, MOE_HOST_CACHE=0)
    for layer in pipe.layers:
        layer.fused_moe = fused_moe
        assert not layer.enable_direct(pipe.device) and not layer.direct
