"""The compressed-tensors pack-quantized variants llm-compressor writes beyond `moe-offload quantize`'s output:
channel-wise scales (`strategy: "channel"`, weight_scale [N, 1]: the W8A16 preset), and zero points with the
group sizes 32/64/128 of its W4A16_ASYM-style presets. Fixtures are written with compressed-tensors' own
compressor (PackedQuantizationCompressor.compress) and compared against its own decompress.

A channel-wise scheme is one group spanning the whole row (ExpertFormat.group_span >= K), so the kernels are
the group kernels; here they are run on such pools at odd shapes (Triton under TRITON_INTERPRET=1, numba).
"""

import json
import os

import pytest
import torch
from compressed_tensors.compressors import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from safetensors.torch import load_file, save_file
from tiny_models import VOCAB, save_quantized_pair

from moe_offload import LLMPipeline
from moe_offload.checkpoint import Checkpoint
from moe_offload.expert_format import ExpertFormat
from moe_offload.kernels.reference import dequantize
from moe_offload.quant.format import QuantSpec, quantization_config
from moe_offload.quant.methods import choose_qparams
from moe_offload.tiers import DiskTier

ARCH = "qwen3_moe"
ATOL = 1e-4  # float32 compute, the same dequantized weights: only the order of summing expert outputs differs


def _scheme(spec: QuantSpec) -> QuantizationScheme:
    strategy = "channel" if spec.group_size is None else "group"
    return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=spec.bits, symmetric=spec.symmetric, group_size=spec.group_size, strategy=strategy))


def compress(weight: torch.Tensor, spec: QuantSpec) -> tuple[dict, torch.Tensor]:
    """compressed-tensors' tensors of W [N, K] (bf16 scales from round-to-nearest ranges) and its decompress."""
    weight = weight.to(torch.bfloat16)
    scale, zero = choose_qparams(weight, spec, "rtn")  # [N, G] (G = 1 channel-wise)
    state = {"weight": weight, "weight_scale": scale}
    if zero is not None:
        state["weight_zero_point"] = zero
    tensors = PackedQuantizationCompressor.compress(state, _scheme(spec))
    return tensors, PackedQuantizationCompressor.decompress(dict(tensors), _scheme(spec))["weight"]


def write_compressed(src: str, dst: str, dequantized: str | None, spec: QuantSpec) -> str:
    state = load_file(os.path.join(src, "model.safetensors"))
    quantized, plain = {}, {}
    for name, tensor in state.items():
        if ".experts." not in name:
            quantized[name] = plain[name] = tensor
            continue
        tensors, weight = compress(tensor, spec)
        quantized.update({f"{name.removesuffix('.weight')}.{key}": value for key, value in tensors.items()})
        plain[name] = weight.float()
    return save_quantized_pair(src, dst, dequantized, quantized, plain, quantization_config(spec, ["lm_head"]))


def test_w8a16_channel_wise_matches_transformers(checkpoint_factory, tmp_path):
    """llm-compressor's W8A16 preset (int8, symmetric, one scale per output row) through the engine from disk at
    ratio 37: transformers' logits within ATOL on the library's decompressed weights, and its greedy tokens; from
    host RAM at ratio 0 the same bits."""
    from transformers import AutoModelForCausalLM

    spec = QuantSpec(8, None, True)
    path = write_compressed(checkpoint_factory(ARCH), str(tmp_path / "q"), str(tmp_path / "dq"), spec)
    with open(os.path.join(path, "config.json"), encoding="utf-8") as handle:
        weights = json.load(handle)["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert (weights["strategy"], weights["group_size"]) == ("channel", None)
    ids = torch.randint(2, VOCAB, (1, 11), generator=torch.Generator().manual_seed(5))  # [1, T]
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "dq"), dtype=torch.float32).eval()
    pipe = LLMPipeline(path, "cpu", MOE_OFFLOAD_RATIO=37, MOE_HOST_CACHE=0)
    try:
        with torch.no_grad():
            assert (pipe.model(ids).logits - model(ids).logits).abs().max().item() <= ATOL
            ref_tokens = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
            logits = pipe.model(ids).logits
        tokens = pipe.generate_tokens(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        assert torch.equal(tokens, ref_tokens[0, ids.shape[1]:])
        stats = pipe.get_offload_stats()
        assert stats["expert_format"] == "int8, channel-wise, symmetric, bfloat16 scales"
        # per projection: packed [N, K/4] int32 and one bf16 scale per row
        assert stats["expert_bytes"] == 2 * (16 * 32 + 16 * 2) + (32 * 16 + 32 * 2)
    finally:
        pipe.close()
    pipe = LLMPipeline(path, "cpu", MOE_OFFLOAD_RATIO=0)
    try:
        with torch.no_grad():
            assert torch.equal(pipe.model(ids).logits, logits)
        assert torch.equal(pipe.generate_tokens(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False), tokens)
    finally:
        pipe.close()


@pytest.mark.parametrize("spec", [QuantSpec(4, 32, False), QuantSpec(4, 64, False), QuantSpec(4, 128, False),
                                  QuantSpec(8, 128, False), QuantSpec(4, None, False)], ids=str)
def test_experts_read_from_disk_are_the_librarys_decompress(tmp_path, spec):
    """Zero points with llm-compressor's group sizes (and channel-wise): each expert as the loader locates and
    reads it dequantizes (reference.dequantize, rounded to the scale's dtype) to compressed-tensors' own
    decompress of the same tensors, gate and up with their zero points packed apart. Channel-wise with I = 44:
    gate's and up's 44 zero points each end mid-word, and down's rows of 44 values are not whole words."""
    hidden, inter, experts = 256, 44 if spec.group_size is None else 128, 2
    torch.manual_seed(spec.bits)
    tensors, want = {}, {}
    for e in range(experts):
        for proj, shape in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)),
                            ("down_proj", (hidden, inter))):
            made, weight = compress(torch.randn(shape) * 0.05, spec)
            module = f"model.layers.0.mlp.experts.{e}.{proj}"
            tensors.update({f"{module}.{key}": value for key, value in made.items()})
            want[(e, proj)] = weight
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with open(tmp_path / "config.json", "w", encoding="utf-8") as handle:
        json.dump({"model_type": "qwen3_moe", "num_experts": experts, "num_hidden_layers": 1,
                   "quantization_config": quantization_config(spec, ["lm_head"])}, handle)
    locations = Checkpoint(str(tmp_path)).expert_locations(0, experts, hidden, inter)
    fmt = locations[0].format
    assert fmt == ExpertFormat(inter, hidden, torch.bfloat16, spec)
    disk = DiskTier("pread")
    for e, location in enumerate(locations):
        row = torch.zeros(fmt.row_bytes, dtype=torch.uint8)
        assert disk.read_expert(location, row) == fmt.nbytes
        gate_up, down = fmt.weights(row)
        assert torch.equal(dequantize(gate_up).to(torch.bfloat16),
                           torch.cat([want[(e, "gate_proj")], want[(e, "up_proj")]]))
        assert torch.equal(dequantize(down).to(torch.bfloat16), want[(e, "down_proj")])
    disk.close()


# -- the kernels on channel-wise pools -------------------------------------------------------------------------

CHANNEL = [QuantSpec(4, None, False), QuantSpec(8, None, True)]


@pytest.mark.parametrize("spec, path", [(CHANNEL[0], "decode"), (CHANNEL[1], "prefill")], ids=str)
def test_triton_kernels_on_channel_wise_pools(monkeypatch, spec, path):
    """H = 75, I = 21 (odd: the one group per row is not whole words) under the interpreter: fused_moe against
    the dequantizing reference, test_triton_quant's tolerances."""
    pytest.importorskip("triton")
    import test_triton_quant as tq
    from triton_interp import BF16_PATCHES, CUDA, force_path, gpu_like_bf16

    if not CUDA and BF16_PATCHES is None:
        pytest.skip("the interpreter cannot round to bf16 as a GPU does (triton_interp.py)")
    gpu_like_bf16(monkeypatch)
    force_path(monkeypatch, path)
    x, ids, weights, rows, fmt, slots = tq.make_inputs(spec, 1 if path == "decode" else 5, torch.bfloat16)
    assert fmt.group_span >= max(tq.HIDDEN, tq.INTER) and fmt.plane("down.scale").shape == (tq.HIDDEN, 1)
    pools = fmt.weights(rows)
    expected = tq.triton_moe.fused_moe_reference(x, ids, weights, pools.gate_up, pools.down, slots)
    actual = tq.triton_moe.fused_moe(x, ids, weights, pools.gate_up, pools.down, slots)
    tq.assert_close(actual, expected, torch.bfloat16)


@pytest.mark.parametrize("spec", CHANNEL, ids=str)
@pytest.mark.parametrize("shape", [(37, 21), (130, 40)])
def test_numba_cpu_kernel_on_channel_wise_experts(spec, shape):
    """The CPU expert path's numba kernel (one group per row: odd K at int4 too) against the reference, within
    bf16 rounding (its weights are not rounded to bf16 as the reference's are)."""
    pytest.importorskip("numba")
    import test_hybrid_quant as hq

    hidden, inter = shape
    tier = hq.quantized_tier(spec, hidden, inter)
    slots, counts = hq.ROUTING
    x, w = hq.pairs(hidden, torch.bfloat16, torch.float32)
    expected = hq.reference(x, w, tier, slots, counts)
    with hq.CpuExperts(threads=2, compute="numba") as runner:
        result = runner(x, w, tier.gate_up, tier.down, slots, counts)
    assert hq.relative_error(result, expected) <= hq.BF16_TOLERANCE
