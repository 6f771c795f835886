"""moe_offload.quant.format and .methods against compressed-tensors itself: the same words, the same
dequantized weights, bit for bit, on shapes that do not divide evenly (K not a multiple of 8, N odd)."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors import PackedQuantizationCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

from moe_offload.errors import MoeOffloadError
from moe_offload.quant.format import (PACKED, SCALE, SHAPE, ZERO, QuantSpec, check, dequantize, encode, pack,
                                      quantization_config, unpack)
from moe_offload.quant.methods import METHODS, choose_qparams, group_error, quantize_weight

ODD_SHAPES = [(1, 1), (7, 13), (5, 33), (3, 8), (9, 100), (2, 7)]


def _scheme(spec: QuantSpec) -> QuantizationScheme:
    return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=spec.bits, symmetric=spec.symmetric, group_size=spec.group_size, strategy="group"))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_pack_and_unpack_are_the_librarys(bits, shape):
    torch.manual_seed(bits * 100 + shape[1])
    q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), shape, dtype=torch.int8)  # [R, C], every value
    words = pack(q, bits)
    assert words.dtype == torch.int32 and torch.equal(words, pack_to_int32(q, bits))
    assert torch.equal(unpack(words, bits, shape[1]), q)
    assert torch.equal(unpack_from_int32(words, bits, shape), q)
    # packed along dim 0 (how zero points are stored): ours is the transpose of the row packing
    assert torch.equal(pack(q.t(), bits).t(), pack_to_int32(q, bits, packed_dim=0))


def test_nibble_order_and_offset():
    """Element j of a word sits at bits [j*b, (j+1)*b), offset by 2^(b-1): -8 -> 0, 7 -> 15."""
    q = torch.tensor([[-8, 7, 0, 1, -1, 2, 3, 4]], dtype=torch.int8)  # unsigned: 0, 15, 8, 9, 7, 10, 11, 12
    assert pack(q, 4).item() == 0xCBA7_98F0 - (1 << 32)  # the same 32 bits read as int32
    assert pack(torch.tensor([[-128, 127, 0, 1]], dtype=torch.int8), 8).item() == (
        0 | 255 << 8 | 128 << 16 | 129 << 24) - (1 << 32)


SPECS = [QuantSpec(4, 8, True), QuantSpec(4, 8, False), QuantSpec(8, 8, True), QuantSpec(8, 8, False),
         QuantSpec(4, 128, True), QuantSpec(4, 64, False)]


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("method", METHODS)
def test_dequantize_is_the_librarys(spec, dtype, method):
    """compressed-tensors' decompress computes (q - zero) * scale in the scale's dtype; ours, exact in float32
    and rounded to that dtype, gives the same bits. N odd, so the zero points' last word is partly padding."""
    torch.manual_seed(spec.bits + spec.group_size)
    weight = (torch.randn(13, 2 * max(spec.group_size, 24)) * 0.05).to(dtype)  # [N, K]
    tensors = quantize_weight(weight, spec, method)
    theirs = PackedQuantizationCompressor.decompress(dict(tensors), _scheme(spec))["weight"]
    ours = dequantize(tensors, spec)
    assert ours.dtype == torch.float32 and theirs.dtype == dtype
    assert torch.equal(ours.to(dtype), theirs)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_encode_is_the_librarys_compress(spec):
    """Given the same scales and zero points, the library's compress writes the same tensors. In float32: in
    bf16 the library divides W / scale in bf16, whose rounding can move a value by one step (ours is float32)."""
    torch.manual_seed(7)
    weight = torch.randn(11, 4 * spec.group_size) * 0.05  # [N, K] float32
    scale, zero = choose_qparams(weight, spec, "rtn")
    ours = encode(weight, scale, zero, spec)
    state = {"weight": weight, "weight_scale": scale}
    if zero is not None:
        state["weight_zero_point"] = zero
    theirs = PackedQuantizationCompressor.compress(state, _scheme(spec))
    assert set(ours) == set(theirs)  # symmetric: no zero point in either
    for key, value in ours.items():
        assert value.dtype == theirs[key].dtype and torch.equal(value, theirs[key]), key


def test_shapes_and_dtypes():
    spec = QuantSpec(4, 64, False)
    tensors = quantize_weight(torch.randn(13, 192, dtype=torch.bfloat16), spec)
    assert {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()} == {
        PACKED: (torch.int32, (13, 24)), SCALE: (torch.bfloat16, (13, 3)), ZERO: (torch.int32, (2, 3)),
        SHAPE: (torch.int64, (2,))}
    assert tensors[SHAPE].tolist() == [13, 192]
    assert spec.shapes(13, 192, torch.bfloat16) == {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    eight = quantize_weight(torch.randn(5, 64), QuantSpec(8, 32, True))
    assert eight[PACKED].shape == (5, 16) and ZERO not in eight


def test_symmetric_rtn_scale_convention():
    """max|w| / 7.5 at 4 bits: the largest magnitude lands on 7.5 and is clamped to 7 (positive) or -8."""
    weight = torch.tensor([[1.5, -0.5, 0.0, 0.25] * 2])  # [1, 8]
    spec = QuantSpec(4, 8, True)
    scale, zero = choose_qparams(weight, spec, "rtn")
    assert zero is None and scale.item() == pytest.approx(1.5 / 7.5)
    assert dequantize(quantize_weight(weight, spec), spec)[0, 0].item() == pytest.approx(7 * 0.2)


def test_zero_group_gets_eps_scale_and_zero_values():
    spec = QuantSpec(4, 8, True)
    tensors = quantize_weight(torch.zeros(3, 16, dtype=torch.bfloat16), spec)
    assert torch.all(tensors[SCALE] == torch.finfo(torch.bfloat16).eps)
    assert torch.equal(dequantize(tensors, spec), torch.zeros(3, 16))


@pytest.mark.parametrize("spec", [QuantSpec(4, 32, True), QuantSpec(4, 32, False), QuantSpec(8, 32, True)], ids=str)
def test_mse_never_loses_to_rtn_per_group(spec):
    """The search starts from rtn's range, so each group's weight error is at most rtn's; at 4 bits, with
    outliers, smaller overall (at 8 bits the step is fine enough that clipping by 2.5% steps rarely pays)."""
    torch.manual_seed(3)
    weight = torch.randn(64, 256, dtype=torch.bfloat16) * 0.02
    weight[::7, ::13] *= 8  # outliers, where clipping pays
    grouped = weight.float().view(64, 8, 32)
    errors = {m: group_error(grouped, *choose_qparams(weight, spec, m), spec) for m in METHODS}  # [N, G] each
    assert torch.all(errors["mse"] <= errors["rtn"])
    if spec.bits == 4:
        assert errors["mse"].sum() < 0.98 * errors["rtn"].sum()


@pytest.mark.parametrize("spec", [QuantSpec(4, 32, False), QuantSpec(8, None, True)], ids=str)
def test_mse_searches_blocks_of_rows_with_the_same_result(spec, monkeypatch):
    """choose_qparams searches SEARCH_ROWS rows at a time (for speed); each row's groups are chosen on their own,
    so the scales and zero points are those of one search over the whole matrix, a short last block included."""
    from moe_offload.quant import methods

    torch.manual_seed(4)
    weight = torch.randn(21, 64, dtype=torch.bfloat16) * 0.02
    weight[::5, ::7] *= 8
    whole = choose_qparams(weight, spec, "mse")  # 21 rows: one search at the default SEARCH_ROWS
    monkeypatch.setattr(methods, "SEARCH_ROWS", 8)  # 8 + 8 + 5 rows
    blocks = choose_qparams(weight, spec, "mse")
    assert torch.equal(blocks[0], whole[0])
    assert (blocks[1] is None) == (whole[1] is None) == spec.symmetric
    assert spec.symmetric or torch.equal(blocks[1], whole[1])


def test_check_rejects_tensors_that_do_not_match():
    spec = QuantSpec(4, 8, True)
    good = quantize_weight(torch.randn(6, 16), spec)
    assert check(good, spec) == (6, 16)
    bad_scale = {**good, SCALE: good[SCALE][:, :1]}
    with pytest.raises(MoeOffloadError, match=r"weight_scale is torch.float32 \[6, 1\], expected .* \[6, 2\]"):
        dequantize(bad_scale, spec, "experts.0.up_proj")
    with pytest.raises(MoeOffloadError, match="no weight_zero_point"):
        check(good, QuantSpec(4, 8, False))
    with pytest.raises(MoeOffloadError, match="does not divide"):
        check(good, QuantSpec(4, 12, True))
    with pytest.raises(MoeOffloadError, match="weight_packed"):
        check({**good, PACKED: good[PACKED].to(torch.int64)}, spec)


@pytest.mark.parametrize("bits,group", [(3, 128), (16, 128), (4, 0), (4, -1)])
def test_spec_rejects(bits, group):
    with pytest.raises(MoeOffloadError):
        QuantSpec(bits, group, True)


@pytest.mark.parametrize("symmetric", [True, False])
def test_quantization_config_is_what_readers_parse(symmetric):
    """compressed-tensors' own config model and transformers' CompressedTensorsConfig read it back as a
    pack-quantized int group scheme with our ignore list."""
    from transformers.utils.quantization_config import CompressedTensorsConfig

    config = quantization_config(QuantSpec(4, 64, symmetric), ["lm_head", "model.layers.0.mlp.gate"])
    parsed = QuantizationConfig.model_validate(config)
    weights = parsed.config_groups["group_0"].weights
    assert (weights.num_bits, weights.group_size, weights.symmetric, weights.strategy, weights.type) == (
        4, 64, symmetric, "group", "int")
    assert parsed.format == "pack-quantized" and parsed.ignore == ["lm_head", "model.layers.0.mlp.gate"]
    hf = CompressedTensorsConfig.from_dict(config)
    assert hf.quantization_config.config_groups["group_0"].targets == ["Linear"]
    assert hf.is_quantization_compressed
