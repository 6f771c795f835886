"""expert_format.py: an expert as one row of bytes, its planes at aligned offsets, and the typed views the
kernels read (which must alias the rows, with one set of strides for pools of any size)."""

import pytest
import torch

from moe_offload import LLMPipeline
from moe_offload.expert_format import ALIGN, ExpertFormat, QuantMatrix
from moe_offload.quant.format import QuantSpec


def test_dense_planes_are_the_matrices_back_to_back():
    fmt = ExpertFormat(24, 40, torch.bfloat16)
    assert [(p.name, p.shape, p.dtype, p.offset) for p in fmt.planes] == [
        ("gate_up", (48, 40), torch.bfloat16, 0), ("down", (40, 24), torch.bfloat16, 48 * 40 * 2)]
    assert fmt.row_bytes == fmt.nbytes == 3 * 24 * 40 * 2 and not fmt.quantized


def test_planes_and_rows_are_aligned():
    fmt = ExpertFormat(7, 9, torch.float16)  # 2*7*9*2 = 252 bytes of gate_up: down starts at 256
    assert fmt.plane("down").offset == 256 and fmt.row_bytes % ALIGN == 0
    assert fmt.nbytes == 3 * 7 * 9 * 2 < fmt.row_bytes


@pytest.mark.parametrize("rows", [0, 1, 5])
def test_views_alias_the_rows_with_the_strides_of_any_pool(rows):
    fmt = ExpertFormat(24, 40, torch.bfloat16)
    pool = torch.zeros((rows, fmt.row_bytes), dtype=torch.uint8)
    weights = fmt.weights(pool)
    assert weights.gate_up.shape == (rows, 48, 40) and weights.down.shape == (rows, 40, 24)
    assert weights.gate_up.stride() == (fmt.row_bytes // 2, 40, 1)  # one slot stride, even for 0 or 1 rows
    assert weights.down.stride() == (fmt.row_bytes // 2, 24, 1)
    if rows:
        weights.down[rows - 1, 3, 5] = 1.5
        at = (rows - 1) * fmt.row_bytes + fmt.plane("down").offset + 2 * (3 * 24 + 5)
        assert torch.equal(pool.view(-1)[at:at + 2].view(torch.bfloat16), torch.tensor([1.5], dtype=torch.bfloat16))
        assert weights.gate_up.data_ptr() == pool.data_ptr()


def test_quantized_planes_follow_the_scheme():
    symmetric = ExpertFormat(16, 32, torch.bfloat16, QuantSpec(4, 16, True))
    assert [(p.name, p.shape) for p in symmetric.planes] == [
        ("gate_up.packed", (32, 4)), ("gate_up.scale", (32, 2)), ("down.packed", (32, 2)), ("down.scale", (32, 1))]
    zero = ExpertFormat(16, 32, torch.float16, QuantSpec(8, 16, False))
    assert [(p.name, p.shape, p.dtype) for p in zero.planes] == [
        ("gate_up.packed", (32, 8), torch.int32), ("gate_up.scale", (32, 2), torch.float16),
        ("gate_up.zero", (8, 2), torch.int32), ("down.packed", (32, 4), torch.int32),
        ("down.scale", (32, 1), torch.float16), ("down.zero", (8, 1), torch.int32)]
    weights = zero.weights(torch.zeros((3, zero.row_bytes), dtype=torch.uint8))
    assert isinstance(weights.gate_up, QuantMatrix) and weights.gate_up.shape == (3, 32, 32)
    assert weights.down.shape == (3, 32, 16) and weights.gate_up[1].shape == (32, 32) and weights.gate_up.parts == 2


def test_copy_row_converts_a_dense_checkpoint_dtype_and_copies_anything_else():
    stored, compute = ExpertFormat(4, 8, torch.bfloat16), ExpertFormat(4, 8, torch.float32)
    src = torch.randint(0, 256, (stored.row_bytes,), dtype=torch.uint8)
    src_weights = stored.weights(src)
    for view in src_weights:
        view.copy_(torch.randn(view.shape))  # finite bf16 values
    dst = torch.empty(compute.row_bytes, dtype=torch.uint8)
    compute.copy_row(dst, src, stored)
    assert all(torch.equal(d, s.float()) for d, s in zip(compute.weights(dst), src_weights))
    quantized = ExpertFormat(4, 8, torch.bfloat16, QuantSpec(4, 8, True))
    raw = torch.randint(0, 256, (quantized.row_bytes,), dtype=torch.uint8)
    copy = torch.empty_like(raw)
    quantized.copy_row(copy, raw, quantized)
    assert torch.equal(copy, raw)
    with pytest.raises(ValueError, match="cannot convert"):
        compute.copy_row(dst, raw, quantized)


def test_a_layers_matrices_are_views_of_its_slot_rows(checkpoint_factory):
    """The kernels read the slots through views, never through a copy: writing a row changes what they see."""
    pipe = LLMPipeline(checkpoint_factory("qwen3_moe"), "cpu", MOE_OFFLOAD_RATIO=50)
    try:
        layer = pipe.layers[0]
        assert layer.slots.shape == (4, layer.format.row_bytes) and layer.slots.dtype == torch.uint8
        assert layer.gate_up.untyped_storage().data_ptr() == layer.slots.untyped_storage().data_ptr()
        assert layer.down.untyped_storage().data_ptr() == layer.slots.untyped_storage().data_ptr()
        layer.slots[2].zero_()
        assert not layer.gate_up[2].any() and not layer.down[2].any() and layer.gate_up[1].any()
    finally:
        pipe.close()
