"""The CPU expert path on int4/int8 quantized experts (hybrid/cpu_experts.py, hybrid/kernels/cpu_numba.py):
experts computed straight from their packed rows in the host tier, against the torch reference
(kernels/reference.py: dequantize, round to the scale's dtype, then to the compute dtype, then transformers'
expert math).

Tolerances (max |difference| relative to the largest reference output):
- compute="native": the reference's own ops, so the same bits.
- float32 compute ("float32", "numba"): the same rounded weights, only the float32 accumulation order (and
  numba's exp in SiLU) differ: FP32_TOLERANCE = 1e-5 (measured: under 6e-7).
- bf16 compute: the same intermediates rounded at the same points; an accumulation order that moves one rounding
  by an ulp carries it on: BF16_TOLERANCE = 4 bf16 ulps, and at least 90% of outputs bit-identical (measured:
  all of them at these shapes).
- End to end (tiny Qwen3-MoE, Triton's interpreter as the GPU, ratio 25): the greedy tokens of
  MOE_CPU_EXPERTS off; logits within E2E_ATOL = 1e-5 of its in float32 compute (measured: under 1e-7, on
  logits up to 0.5), within BF16_TOLERANCE of the largest logit in bf16 compute (measured: the same bits).
"""

import pytest
import torch
import torch.nn.functional as F

from triton_interp import CUDA  # first: sets TRITON_INTERPRET before triton loads

from moe_offload import LLMPipeline, hybrid
from moe_offload.errors import MoeOffloadError
from moe_offload.expert_format import ExpertFormat
from moe_offload.hybrid import CpuExperts, CpuShare
from moe_offload.hybrid.cpu_experts import dequantize_rows
from moe_offload.hybrid.tuning import all_on_cpu, cpu_expert_kernels
from moe_offload.kernels.reference import dense, weighted_expert_output
from moe_offload.quant.format import QuantSpec
from moe_offload.tiers import HostTier

FP32_TOLERANCE = 1e-5
BF16_TOLERANCE = 2.0 ** -6
E2E_ATOL = 1e-5
# group sizes that do not divide K (5, 7; one larger than K), asymmetric (zero points) and symmetric, int4 and int8
SCHEMES = {"int4-g16-sym": QuantSpec(4, 16, True), "int4-g8-asym": QuantSpec(4, 8, False),
           "int4-g7-asym": QuantSpec(4, 7, False), "int8-g16-asym": QuantSpec(8, 16, False),
           "int8-g5-sym": QuantSpec(8, 5, True), "int4-g256-sym": QuantSpec(4, 256, True)}
# (H, I): K = H and I multiples of no word, group or work-item chunk; a 16-aligned one
SHAPES = [(37, 21), (130, 40), (64, 48)]
ROUTING = ([2, 0, 1, 3], [1, 2, 0, 1])  # slots, pairs per slot (grouped by expert; a zero count skipped)


def quantized_tier(spec: QuantSpec, hidden: int, inter: int, n: int = 4, scale_dtype=torch.bfloat16,
                   seed: int = 0) -> HostTier:
    """A host tier of n experts with random packed values and zero points (padding bits too: the kernels must
    ignore them) and small positive scales, straight in the engine's row format."""
    tier = HostTier(list(range(n)), ExpertFormat(inter, hidden, scale_dtype, spec), pin=False)
    gen = torch.Generator().manual_seed(seed)
    tier.rows.copy_(torch.randint(0, 256, tier.rows.shape, dtype=torch.uint8, generator=gen))
    for name, plane in tier.format.plane_views(tier.rows).items():
        if name.endswith(".scale"):  # [n, N, G]
            plane.copy_((torch.rand(plane.shape, generator=gen) * 0.02 + 1e-3).to(scale_dtype))
    return tier


def reference(x, w, tier, slots, counts, act_fn=F.silu):
    """[P, H] float32: the reference's weighted outputs, pairs grouped by expert."""
    out, start = torch.zeros(x.shape, dtype=torch.float32), 0
    for slot, count in zip(slots, counts):
        rows = slice(start, start + count)
        if count:
            out[rows] = weighted_expert_output(x[rows], w[rows], tier.gate_up[slot], tier.down[slot], act_fn)
        start += count
    return out


def relative_error(result, expected):
    return ((result - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def pairs(hidden, dtype, weight_dtype, count=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn((count, hidden), generator=gen).to(dtype),  # [P, H]
            torch.rand((count,), generator=gen).to(weight_dtype))  # [P]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_dequantize_rows_is_the_references_dense(scheme, shape):
    """The float32 path's block dequantization: any row range (across gate's and up's zero-point blocks too)
    holds what reference.dense holds, in bf16 and float32 compute."""
    hidden, inter = shape
    tier = quantized_tier(SCHEMES[scheme], hidden, inter)
    for matrix in (tier.gate_up[1], tier.down[3]):
        rows = matrix.shape[0]
        for dtype in (torch.bfloat16, torch.float32):
            want = dense(matrix, dtype).float()  # [N, K]
            for start, stop in ((0, rows), (3, rows // 2 + 5), (rows - 1, rows)):
                assert torch.equal(dequantize_rows(matrix, start, stop, dtype), want[start:stop])


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("compute", ["numba", "float32", "native"])
def test_cpu_kernels_match_the_reference(compute, scheme, shape, dtype, weight_dtype):
    if compute == "numba":
        pytest.importorskip("numba")
    hidden, inter = shape
    tier = quantized_tier(SCHEMES[scheme], hidden, inter)
    slots, counts = ROUTING
    x, w = pairs(hidden, dtype, weight_dtype)
    expected = reference(x, w, tier, slots, counts)
    with CpuExperts(threads=2, compute=compute, block_bytes=1024) as runner:  # float32: several short blocks
        result = runner(x, w, tier.gate_up, tier.down, slots, counts)
    if compute == "native":
        assert torch.equal(result, expected)
    elif dtype == torch.float32:  # numba: bf16 scales in float32 compute go to the float32 path (why_not)
        assert relative_error(result, expected) <= FP32_TOLERANCE
    else:
        assert relative_error(result, expected) <= BF16_TOLERANCE
        if compute == "float32":  # the reference's weights, summed in another order
            assert (result == expected).float().mean() > 0.9


@pytest.mark.parametrize("scheme", ["int4-g16-sym", "int8-g16-asym"])
def test_numba_on_a_qwen3_shaped_expert(scheme):
    """H = 2048, I = 768, group 128 (the shipped quantizer's default shape): the work items' real widths."""
    pytest.importorskip("numba")
    spec = QuantSpec(SCHEMES[scheme].bits, 128, SCHEMES[scheme].symmetric)
    tier = quantized_tier(spec, 2048, 768, n=3)
    slots, counts = [2, 0], [1, 1]
    x, w = pairs(2048, torch.bfloat16, torch.float32, count=2)
    expected = reference(x, w, tier, slots, counts)
    with CpuExperts(threads=2, compute="numba") as runner:
        result = runner(x, w, tier.gate_up, tier.down, slots, counts)
    assert relative_error(result, expected) <= BF16_TOLERANCE


def test_numba_sums_each_group_before_scaling_it():
    """dot_quant's weights are (u - z) * scale unrounded, each group's sum scaled once: in bf16 compute the same
    as the reference's within bf16 rounding, and within float32 rounding of the reference computed from the
    scales widened to float32 (whose weights nothing rounds)."""
    pytest.importorskip("numba")
    tier = quantized_tier(SCHEMES["int4-g16-sym"], 130, 40)
    wide = quantized_tier(SCHEMES["int4-g16-sym"], 130, 40, scale_dtype=torch.float32)
    wide.rows.zero_()
    for name, plane in wide.format.plane_views(wide.rows).items():  # the same values, float32 scales
        plane.copy_(tier.format.plane_views(tier.rows)[name].to(plane.dtype))
    x, w = pairs(130, torch.float32, torch.float32)
    with CpuExperts(threads=2, compute="numba") as runner:
        from_bf16_scales = runner(x.bfloat16(), w, tier.gate_up, tier.down, *ROUTING)
        assert relative_error(from_bf16_scales, reference(x.bfloat16(), w, tier, *ROUTING)) <= BF16_TOLERANCE
        exact = reference(x, w, wide, *ROUTING)
        assert relative_error(runner(x, w, wide.gate_up, wide.down, *ROUTING), exact) <= FP32_TOLERANCE


def test_float32_scales():
    """float32 scales (a float32 checkpoint quantized): the product is rounded only where the compute is bf16."""
    pytest.importorskip("numba")
    tier = quantized_tier(SCHEMES["int4-g8-asym"], 37, 21, scale_dtype=torch.float32)
    for dtype, tolerance in ((torch.float32, FP32_TOLERANCE), (torch.bfloat16, BF16_TOLERANCE)):
        x, w = pairs(37, dtype, torch.float32)
        expected = reference(x, w, tier, *ROUTING)
        with CpuExperts(threads=2, compute="numba") as runner:
            assert relative_error(runner(x, w, tier.gate_up, tier.down, *ROUTING), expected) <= tolerance


def test_numba_reads_the_host_tier_in_place():
    """The job points into the tier's own rows: no plane is copied (nor dequantized) to compute an expert."""
    pytest.importorskip("numba")
    from moe_offload.hybrid.kernels import cpu_numba

    tier = quantized_tier(SCHEMES["int4-g8-asym"], 37, 21)
    fields, kept = cpu_numba.weight_fields(tier.gate_up, tier.down, torch.bfloat16, torch.float32)
    base, end = tier.rows.data_ptr(), tier.rows.data_ptr() + tier.rows.numel()
    assert len(kept) == 6 and all(base <= plane.data_ptr() < end for plane in kept)
    assert fields["gate_up_stride"] == fields["down_scale_stride"] == tier.format.row_bytes
    assert (fields["bits"], fields["group"], fields["has_zero"], fields["round"]) == (4, 8, 1, 1)


def test_numba_leaves_what_it_cannot_round_to_the_float32_path():
    """float16 hidden states (or scales): the numba runner computes them on the float32 path, the same bits;
    an activation other than SiLU is an error, as for bf16 experts."""
    pytest.importorskip("numba")
    for scale_dtype, dtype in ((torch.bfloat16, torch.float16), (torch.float16, torch.float32)):
        tier = quantized_tier(SCHEMES["int8-g5-sym"], 37, 21, scale_dtype=scale_dtype)
        x, w = pairs(37, dtype, torch.float32)
        with CpuExperts(threads=1, compute="numba") as numba, CpuExperts(threads=1, compute="float32") as torch32:
            assert torch.equal(numba(x, w, tier.gate_up, tier.down, *ROUTING),
                               torch32(x, w, tier.gate_up, tier.down, *ROUTING))
    with CpuExperts(compute="numba") as runner, pytest.raises(MoeOffloadError, match="SiLU"):
        runner(x, w, tier.gate_up, tier.down, *ROUTING, F.gelu)


def test_kernels_offered_for_quantized_experts():
    """numba first where it can run them, and the torch path that dequantizes block by block."""
    pytest.importorskip("numba")
    assert cpu_expert_kernels(torch.bfloat16, F.silu, quantized=True) == ["numba", "float32"]
    assert cpu_expert_kernels(torch.float32, F.silu, quantized=True) == ["numba", "float32"]
    assert cpu_expert_kernels(torch.float16, F.silu, quantized=True) == ["float32"]
    assert cpu_expert_kernels(torch.bfloat16, F.gelu, quantized=True) == ["float32"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compiled_step_on_quantized_rows_gives_the_python_steps_bits(dtype):
    """The hybrid step with no Python in it (cpu_numba.step_function, what the doorbell runs) on a quantized
    host tier computes the rows the Python host function computes with the same kernel, and those are within
    tolerance of the reference (float32 compute: float32 scales, what the numba kernel takes there)."""
    pytest.importorskip("numba")
    from moe_offload.hybrid.driver import NativeHostFunction

    tier = quantized_tier(SCHEMES["int4-g8-asym"], 64, 40, n=6, scale_dtype=dtype)
    hidden = torch.randn(1, 64, generator=torch.Generator().manual_seed(3)).to(dtype)  # [1, H]
    ids, weights = torch.tensor([[3, 1, 4, 0]]), torch.tensor([[0.4, 0.3, 0.2, 0.1]])  # [1, K]
    from_host = torch.tensor([[1, 0, 1, 1]])  # three misses, two on the CPU
    runs = {}
    for compiled in (True, False):
        share = CpuShare(tier, 6, 4, 64, [0, 1, 2, 2, 2], CpuExperts(threads=2, compute="numba"),
                         torch.device("cpu"))
        if not compiled:
            share._host_function = lambda act_fn, share=share: share._function
        runs[compiled] = share.forward(hidden, ids, weights, from_host, lambda gpu_ids: torch.zeros(4, 64), F.silu)
        assert isinstance(share._host_function(F.silu), NativeHostFunction) == compiled
    assert torch.equal(runs[True], runs[False]) and not runs[True][[1, 3]].any()
    for k in (0, 2):
        expert = int(ids[0, k])
        want = weighted_expert_output(hidden, weights[0, k:k + 1], tier.gate_up[expert], tier.down[expert], F.silu)
        tolerance = BF16_TOLERANCE if dtype == torch.bfloat16 else FP32_TOLERANCE
        assert relative_error(runs[True][k:k + 1], want) <= tolerance


# -- end to end: a tiny quantized Qwen3-MoE -------------------------------------------------------------------

@pytest.fixture(scope="module")
def quantized_model(checkpoint_factory, tmp_path_factory):
    """scheme -> a tiny Qwen3-MoE checkpoint (2 MoE layers of 8 experts, top-2, H = 32, I = 16) whose routed
    experts are quantized (round to nearest, bf16 scales), made once each."""
    from tiny_models import quantize_experts

    made = {}

    def get(scheme: str) -> str:
        if scheme not in made:
            made[scheme] = quantize_experts(checkpoint_factory("qwen3_moe"),
                                            str(tmp_path_factory.mktemp(scheme) / "q"), SCHEMES[scheme])
        return made[scheme]

    return get


def _prompt() -> torch.Tensor:
    return torch.randint(2, 300, (1, 5), generator=torch.Generator().manual_seed(2))  # [1, T]


def _decode(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [steps, 1, V], tokens) of a 6-token greedy decode."""
    with torch.no_grad():
        run = pipe.model.generate(_prompt(), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                  output_logits=True, return_dict_in_generate=True)
    return torch.stack(run.logits), run.sequences


# each scheme and each compute path once end to end (test_cpu_kernels_match_the_reference crosses them all at the
# kernel level): int4 with zero points and int8 on the numba kernel, in float32 and bf16 compute; the float32
# path on int8 and on symmetric int4
E2E_CASES = [("int4-g8-asym", "numba", "float32"), ("int8-g16-asym", "numba", "bfloat16"),
             ("int8-g16-asym", "float32", "float32"), ("int4-g16-sym", "float32", "float32")]


@pytest.mark.skipif(CUDA, reason="CPU-device pipelines (the Triton kernels interpreted)")
@pytest.mark.parametrize("scheme, compute, dtype", E2E_CASES)
def test_hybrid_decode_on_quantized_experts_matches_the_gpu_path(quantized_model, monkeypatch, scheme, compute,
                                                                 dtype):
    """Zero-copy decode at ratio 25 with every miss (or half of them) computed on the CPU from the quantized
    rows: the greedy tokens of the all-GPU path (MOE_CPU_EXPERTS=off), logits within tolerance (the module
    docstring); the CPU's misses are counted in quantized bytes."""
    if compute == "numba":
        pytest.importorskip("numba")
    from triton_interp import gpu_like_bf16

    from moe_offload.kernels.triton_moe import fused_moe

    gpu_like_bf16(monkeypatch)  # bf16 scales: the interpreter must round to them as a GPU does
    path = quantized_model(scheme)
    results = {}
    for split in (None, "all", "half"):
        pipe = LLMPipeline(path, "cpu", MOE_OFFLOAD_RATIO=25, MOE_CPU_EXPERTS="off", MOE_DTYPE=dtype)
        try:
            for layer in pipe.layers:
                layer.fused_moe = fused_moe
                assert layer.enable_direct(pipe.device) and layer.zero_copy
                if split is not None:
                    table = all_on_cpu(layer.top_k) if split == "all" else [m // 2 for m in range(layer.top_k + 1)]
                    assert layer.enable_cpu_share(table, CpuExperts(threads=2, compute=compute))
            results[split] = (*_decode(pipe), pipe.get_offload_stats())
        finally:
            pipe.close()
    base_logits, base_tokens, base_stats = results[None]
    assert base_stats["experts_computed_on_cpu"] == 0 and base_stats["misses"] > 0
    tolerance = E2E_ATOL if dtype == "float32" else BF16_TOLERANCE * base_logits.float().abs().max().item()
    for split in ("all", "half"):
        logits, tokens, stats = results[split]
        assert torch.equal(tokens, base_tokens)
        assert (logits.float() - base_logits.float()).abs().max().item() <= tolerance
        assert (stats["hits"], stats["misses"]) == (base_stats["hits"], base_stats["misses"])
        on_cpu = stats["experts_computed_on_cpu"]
        assert on_cpu > 0 and on_cpu + stats["experts_read_in_place"] == stats["misses"]
        expert_bytes = stats["expert_bytes"]
        assert expert_bytes < 3 * 16 * 32 * 2  # the quantized expert's bytes, not a bf16 one's
        assert stats["bytes_computed_on_cpu"] == on_cpu * expert_bytes
    assert results["half"][2]["experts_computed_on_cpu"] < results["all"][2]["experts_computed_on_cpu"]


@pytest.mark.skipif(CUDA, reason="CPU-device pipelines (the Triton kernels interpreted)")
def test_moe_cpu_experts_all_takes_quantized_experts(quantized_model, monkeypatch):
    """The engine's door (hybrid.enable) no longer refuses quantized experts: MOE_CPU_EXPERTS=all gives every
    zero-copy layer a CPU share with the preferred kernel, and decode gives the resident model's tokens."""
    from triton_interp import gpu_like_bf16

    from moe_offload import integration
    from moe_offload.kernels.triton_moe import fused_moe

    gpu_like_bf16(monkeypatch)
    path = quantized_model("int4-g16-sym")
    resident = LLMPipeline(path, "cpu", MOE_OFFLOAD_RATIO=100)
    want = resident.generate_tokens(_prompt(), max_new_tokens=5, min_new_tokens=5, do_sample=False)
    resident.close()
    monkeypatch.setattr(integration, "select_kernel", lambda config, device, hf_config: fused_moe)
    pipe = LLMPipeline(path, "cpu", MOE_OFFLOAD_RATIO=25, MOE_CPU_EXPERTS="all", MOE_CPU_THREADS=2)
    try:
        assert hybrid.unsupported(pipe.layers) is None
        assert next(c for c in pipe.choices if c.name == "MOE_CPU_EXPERTS").value == "all"
        assert torch.equal(pipe.generate_tokens(_prompt(), max_new_tokens=5, min_new_tokens=5, do_sample=False),
                           want)
        stats = pipe.get_offload_stats()
        assert stats["cpu_expert_layers"] == len(pipe.layers)
        assert stats["cpu_expert_kernel"] == cpu_expert_kernels(torch.bfloat16, F.silu, quantized=True)[0]
        assert stats["experts_computed_on_cpu"] > 0
        assert stats["bytes_computed_on_cpu"] == stats["experts_computed_on_cpu"] * pipe.layers[0].format.nbytes
    finally:
        pipe.close()
