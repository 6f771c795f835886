"""The CPU share's int4 experts on torch's int4 kernel (hybrid/int4pack.py, CpuExperts compute="int4pack"):
against the reference at the kernel level, what it refuses and leaves to the float32 path, the copy made only
where it fits, and end to end (a tiny Qwen3-MoE whose experts it takes: I = 32, group 32).

Tolerances as tests/test_hybrid_quant.py's for the numba kernel, whose arithmetic it shares (the weights not
rounded to bf16, float32 sums, the GEMV outputs rounded to the compute dtype): BF16_TOLERANCE of the largest
output at the kernel level; end to end the greedy tokens of the all-GPU path and logits within BF16_TOLERANCE
of the largest one.
"""

import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from triton_interp import CUDA  # first: sets TRITON_INTERPRET before triton loads

from test_hybrid_quant import BF16_TOLERANCE, ROUTING, pairs, quantized_tier, reference, relative_error

from moe_offload import LLMPipeline, hybrid
from moe_offload.expert_format import ExpertFormat
from moe_offload.hybrid import CpuExperts, int4pack
from moe_offload.hybrid.tuning import all_on_cpu, cpu_expert_kernels
from moe_offload.quant.format import QuantSpec

pytestmark = pytest.mark.skipif(not int4pack.available(), reason="this torch has no int4 CPU kernel")
SPEC = QuantSpec(4, 32, True)


@pytest.mark.parametrize("hidden, inter, spec", [(64, 32, SPEC), (128, 96, SPEC), (2048, 768, QuantSpec(4, 128, True))])
def test_int4pack_matches_the_reference(hidden, inter, spec):
    """Group 32 on small shapes and Qwen3-30B-A3B's expert at group 128, pairs grouped by expert (one slot with
    none): within the numba kernel's tolerance of the reference, from a copy that prepare made and counts."""
    tier = quantized_tier(spec, hidden, inter)
    x, w = pairs(hidden, torch.bfloat16, torch.float32)
    expected = reference(x, w, tier, *ROUTING)
    with CpuExperts(threads=2, compute="int4pack") as runner:
        assert runner.prepare(tier.gate_up, tier.down) == runner.copy_bytes > 0
        result = runner(x, w, tier.gate_up, tier.down, *ROUTING)
    assert relative_error(result, expected) <= BF16_TOLERANCE


@pytest.mark.parametrize("spec, dtype", [(QuantSpec(4, 32, False), torch.bfloat16),
                                         (QuantSpec(8, 32, True), torch.bfloat16),
                                         (QuantSpec(4, 16, True), torch.bfloat16), (SPEC, torch.float32)])
def test_what_it_cannot_take_goes_to_the_float32_path(spec, dtype):
    """Zero points, int8, a group size the kernel has no code for, or hidden states not in the scales' dtype: the
    float32 path's very result, no copy."""
    tier = quantized_tier(spec, 64, 32)
    x, w = pairs(64, dtype, torch.float32)
    with CpuExperts(threads=2, compute="int4pack") as runner, CpuExperts(threads=2, compute="float32") as plain:
        got = runner(x, w, tier.gate_up, tier.down, *ROUTING)
        assert torch.equal(got, plain(x, w, tier.gate_up, tier.down, *ROUTING))
        assert runner.copy_bytes == (runner.prepare(tier.gate_up, tier.down) if spec == SPEC else 0)


@pytest.mark.parametrize("spec, hidden, inter, why", [
    (SPEC, 64, 32, None),
    (QuantSpec(4, 32, False), 64, 32, "symmetric int4"),
    (QuantSpec(8, 32, True), 64, 32, "symmetric int4"),
    (QuantSpec(4, 16, True), 64, 32, "group size"),
    (QuantSpec(4, 32, True), 64, 48, "group size"),
    (QuantSpec(4, 32, True), 96, 40, "group size"),
    (None, 64, 32, "symmetric int4"),
])
def test_why_not(spec, hidden, inter, why):
    reason = int4pack.why_not(ExpertFormat(inter, hidden, torch.bfloat16, spec))
    assert reason is None if why is None else why in reason


def test_kernels_offered():
    """After numba, before the float32 path, and only where the caller says the copy may be made."""
    pytest.importorskip("numba")
    assert cpu_expert_kernels(torch.bfloat16, F.silu, quantized=True, int4pack=True) == ["numba", "int4pack", "float32"]
    assert cpu_expert_kernels(torch.bfloat16, F.silu, quantized=True) == ["numba", "float32"]
    assert cpu_expert_kernels(torch.bfloat16, F.gelu, quantized=True, int4pack=True) == ["float32"]
    assert cpu_expert_kernels(torch.bfloat16, F.silu, quantized=False, int4pack=True) == ["numba", "native"]


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="MemAvailable is read from /proc/meminfo")
def test_the_copy_must_leave_headroom():
    assert int4pack.fits(0) and not int4pack.fits(1 << 60)


# -- end to end --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def int4_model(tmp_path_factory):
    """A tiny Qwen3-MoE (2 MoE layers of 8 experts, top-2, H = 32, I = 32) with int4 group-32 symmetric experts."""
    from tiny_models import quantize_experts, tiny_config
    from transformers import AutoModelForCausalLM

    config = tiny_config("qwen3_moe")
    config.moe_intermediate_size = 32
    torch.manual_seed(3)
    src = str(tmp_path_factory.mktemp("int4pack") / "bf16")
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(src)
    return quantize_experts(src, str(tmp_path_factory.mktemp("int4pack") / "q"), SPEC)


def _decode(pipe):
    prompt = torch.randint(2, 300, (1, 5), generator=torch.Generator().manual_seed(2))  # [1, T]
    with torch.no_grad():
        run = pipe.model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True)
    return torch.stack(run.logits), run.sequences


@pytest.mark.skipif(CUDA, reason="CPU-device pipelines (the Triton kernels interpreted)")
def test_hybrid_decode_with_int4pack_matches_the_gpu_path(int4_model, monkeypatch):
    """Every miss of a zero-copy decode at ratio 25 computed by int4pack: the all-GPU path's greedy tokens."""
    from triton_interp import gpu_like_bf16

    from moe_offload.kernels.triton_moe import fused_moe

    gpu_like_bf16(monkeypatch)
    results = {}
    for compute in (None, "int4pack"):
        pipe = LLMPipeline(int4_model, "cpu", MOE_OFFLOAD_RATIO=25, MOE_CPU_EXPERTS="off")
        try:
            runner = CpuExperts(threads=2, compute=compute) if compute else None
            for layer in pipe.layers:
                layer.fused_moe = fused_moe
                assert layer.enable_direct(pipe.device)
                if runner is not None:
                    assert layer.enable_cpu_share(all_on_cpu(layer.top_k), runner)
            results[compute] = (*_decode(pipe), pipe.get_offload_stats())
            if runner is not None:
                assert runner.copy_bytes == sum(int4pack.copy_bytes(layer.host.gate_up)
                                                + int4pack.copy_bytes(layer.host.down) for layer in pipe.layers)
        finally:
            pipe.close()
    (base_logits, base_tokens, _), (logits, tokens, stats) = results[None], results["int4pack"]
    assert torch.equal(tokens, base_tokens) and stats["experts_computed_on_cpu"] > 0
    tolerance = BF16_TOLERANCE * base_logits.float().abs().max().item()
    assert (logits.float() - base_logits.float()).abs().max().item() <= tolerance


@pytest.mark.skipif(CUDA, reason="CPU-device pipelines stand in for CUDA ones")
@pytest.mark.parametrize("winner", ["int4pack", "numba"])
def test_auto_keeps_the_copy_only_for_the_kernel_it_chose(int4_model, tmp_path, monkeypatch, winner):
    """MOE_CPU_EXPERTS=auto offers int4pack beside the others, with the first layer's copy made before it is
    timed; chosen, every layer's copy is made (the stats and the choice's why count its bytes), else the copy
    is freed; a later judgment that turns the path off frees it too, one that turns it on makes it again."""
    pytest.importorskip("numba")
    from moe_offload import defaults
    from moe_offload.config import make_config

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(hybrid, "machine_key", lambda device: {"gpu": "a test's"})
    monkeypatch.setattr(hybrid.driver, "stream_wait_available", lambda device: "refused by the test")
    offered = {}

    def fake_tune(layer, act_fn, runners):
        offered.update({name: runner.copy_bytes for name, runner in runners.items()})
        table = [min(m, 1) for m in range(layer.top_k + 1)]
        layer.cpu_share.runner = runners[winner]
        layer.cpu_share.set_table(table)
        return winner, table, {name: {"expected": {"on": 1.0, "off": 2.0}} for name in runners}

    monkeypatch.setattr(hybrid, "tune_cpu_path", fake_tune)
    from moe_offload.kernels.triton_moe import fused_moe

    pipe = LLMPipeline(int4_model, "cpu", MOE_OFFLOAD_RATIO=25, MOE_CPU_EXPERTS="off")
    try:
        for layer in pipe.layers:
            layer.fused_moe = fused_moe
            assert layer.enable_direct(pipe.device)
        sites = [SimpleNamespace(module=SimpleNamespace(act_fn=F.silu))] * len(pipe.layers)
        config = make_config({"MOE_OFFLOAD_RATIO": 25, "MOE_CPU_THREADS": 2})
        tuned = hybrid.enable(pipe.layers, sites, config, torch.device("cuda"), "int4pack test")
        first = pipe.layers[0].host
        assert set(offered) == {"numba", "int4pack", "float32"}
        assert offered["int4pack"] == int4pack.copy_bytes(first.gate_up) + int4pack.copy_bytes(first.down)
        runner = pipe.layers[0].cpu_share.runner
        assert tuned.kernel == winner == runner.compute
        assert all(layer.cpu_share.runner is runner for layer in pipe.layers)
        whole = sum(int4pack.copy_bytes(layer.host.gate_up) + int4pack.copy_bytes(layer.host.down)
                    for layer in pipe.layers)
        stats = hybrid.summary(pipe.layers)
        assert stats["cpu_expert_copy_bytes"] == tuned.copy_bytes == (whole if winner == "int4pack" else 0)
        choice = defaults.cpu_experts(config.moe_cpu_experts, torch.device("cuda"), tuned, None, len(pipe.layers))
        assert ("repacked copy" in choice.why) == (winner == "int4pack")
        for kept in (False, True):  # judged again on other routing: the copy follows the verdict
            monkeypatch.setattr(hybrid, "check_on_decode", lambda decoder, shares, prompt, kept=kept: {"kept": kept})
            hybrid.check_again(object(), pipe.layers, torch.zeros(1, 4, dtype=torch.long))
            assert runner.copy_bytes == tuned.copy_bytes == (whole if kept and winner == "int4pack" else 0)
    finally:
        pipe.close()
