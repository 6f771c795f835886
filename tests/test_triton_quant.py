"""fused_moe on int4/int8 group-quantized pools (kernels/triton_quant.py) against fused_moe_reference, which
dequantizes with reference.dequantize: decode (GEMV) and prefill (grouped GEMM), symmetric and with zero points,
resident slots and host rows read in place, read-through admission.

Odd shapes throughout: H = 75 and I = 21 are multiples of neither the tiles nor a word's values (the last word of
a row is part padding), the group size 32 divides neither (the last group of a row is short), N = 21 rows of
zero points do not fill their words, and 2I = 42 / H = 75 are not multiples of the row blocks. Without CUDA the
kernels run in Triton's interpreter, bf16 made to round as on a GPU (triton_interp.py).
"""

import pytest
import torch
from triton_interp import (BF16_PATCHES, CUDA, check_read_through_admission, force_path,  # first: sets
                           gpu_like_bf16)  # TRITON_INTERPRET before triton loads

from moe_offload.expert_format import ExpertFormat, QuantMatrix
from moe_offload.kernels import triton_moe
from moe_offload.quant.format import QuantSpec, pack

pytestmark = pytest.mark.usefixtures("ieee_fp32")
DEVICE = "cuda" if CUDA else "cpu"
HIDDEN, INTER, GROUP = 75, 21, 32
SCHEMES = [QuantSpec(4, GROUP, True), QuantSpec(4, GROUP, False), QuantSpec(8, GROUP, True),
           QuantSpec(8, GROUP, False)]
# max |error| relative to max |reference|: both dequantize to the same weights and round the same
# intermediates, so only float32 accumulation order differs (measured on the CPU: bf16 0, float32 <= 3.5e-7)
TOLERANCE = {torch.bfloat16: 2.5e-2, torch.float32: 1e-5}


@pytest.fixture(autouse=True)
def _gpu_like_bf16(monkeypatch):
    if not CUDA and BF16_PATCHES is None:
        pytest.skip("the scales are bf16: the interpreter must round to bf16 as a GPU does (triton_interp.py)")
    gpu_like_bf16(monkeypatch)




def make_rows(fmt: ExpertFormat, count: int, generator: torch.Generator) -> torch.Tensor:
    """uint8 [count, B]: random experts of `fmt`, each plane filled as a checkpoint would (values, scales around
    1/sqrt(K), zero points anywhere in range)."""
    spec = fmt.quant
    rows = torch.zeros((count, fmt.row_bytes), dtype=torch.uint8)
    planes = fmt.plane_views(rows)
    for matrix, parts, per_part, cols in (("gate_up", 2, fmt.inter, fmt.hidden), ("down", 1, fmt.hidden, fmt.inter)):
        groups = -(-cols // fmt.group_span)  # channel-wise: 1
        for expert in range(count):
            q = torch.randint(spec.qmin, spec.qmax + 1, (parts * per_part, cols), generator=generator)  # [N, K]
            planes[f"{matrix}.packed"][expert] = pack(q.to(torch.int8), spec.bits)
            scale = (torch.rand(parts * per_part, groups, generator=generator) + 0.5) / (spec.qmax * cols ** 0.5)
            planes[f"{matrix}.scale"][expert] = scale.to(fmt.dtype)
            if not spec.symmetric:  # zero points packed down the rows, each projection apart
                words = []
                for _ in range(parts):
                    zero = torch.randint(spec.qmin, spec.qmax + 1, (per_part, groups), generator=generator)
                    words.append(pack(zero.t().to(torch.int8), spec.bits).t())  # [ceil(N/parts * b/32), G]
                planes[f"{matrix}.zero"][expert] = torch.cat(words)
    return rows.to(DEVICE)


def make_inputs(spec: QuantSpec, tokens: int, dtype: torch.dtype, experts: int = 8, top_k: int = 2,
                spare: int = 3, seed: int = 0):
    """(x, ids, weights, rows, fmt, slot_of_expert): experts in a random permutation of experts + spare slots."""
    generator = torch.Generator().manual_seed(seed)
    fmt = ExpertFormat(INTER, HIDDEN, torch.bfloat16, spec)
    rows = make_rows(fmt, experts + spare, generator)
    x = torch.randn(tokens, HIDDEN, generator=generator).to(dtype).to(DEVICE)  # [T, H]
    ids = torch.rand(tokens, experts, generator=generator).topk(top_k, dim=-1).indices.to(DEVICE)  # [T, K]
    weights = torch.softmax(torch.randn(tokens, top_k, generator=generator), dim=-1).to(dtype).to(DEVICE)
    slots = torch.randperm(experts + spare, generator=generator)[:experts].to(torch.int32).to(DEVICE)  # [E]
    return x, ids, weights, rows, fmt, slots


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    tol = TOLERANCE[dtype] * expected.abs().max().item()
    torch.testing.assert_close(actual.float(), expected.float(), rtol=0, atol=tol)


@pytest.mark.parametrize("spec", SCHEMES, ids=lambda s: f"int{s.bits}-{'sym' if s.symmetric else 'zero'}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_matches_the_dequantizing_reference(monkeypatch, spec, dtype, path):
    force_path(monkeypatch, path)
    x, ids, weights, rows, fmt, slots = make_inputs(spec, 1 if path == "decode" else 9, dtype)
    pools = fmt.weights(rows)
    assert isinstance(pools.gate_up, QuantMatrix)
    expected = triton_moe.fused_moe_reference(x, ids, weights, pools.gate_up, pools.down, slots)
    actual = triton_moe.fused_moe(x, ids, weights, pools.gate_up, pools.down, slots)
    assert actual.dtype == dtype and actual.shape == x.shape
    assert_close(actual, expected, dtype)


@pytest.mark.parametrize("group", [48, None], ids=["group48", "channel"])
@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_groups_that_do_not_tile_or_span_the_tile(monkeypatch, group, path):
    """A group of 48 divides neither tile width (each element finds its scale); channel-wise scales are one group
    wider than the prefill tile (one scale per row for the tile)."""
    force_path(monkeypatch, path)
    x, ids, weights, rows, fmt, slots = make_inputs(QuantSpec(4, group, False), 1 if path == "decode" else 9,
                                                    torch.bfloat16, seed=3)
    pools = fmt.weights(rows)
    expected = triton_moe.fused_moe_reference(x, ids, weights, pools.gate_up, pools.down, slots)
    actual = triton_moe.fused_moe(x, ids, weights, pools.gate_up, pools.down, slots)
    assert_close(actual, expected, torch.bfloat16)


@pytest.mark.parametrize("spec", [SCHEMES[1], SCHEMES[2]], ids=["int4-zero", "int8-sym"])
@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_host_rows_are_read_in_place_with_the_same_bits(monkeypatch, spec, path):
    """Slots past the device pool address host rows (pinned, on CUDA): the bits of one device pool."""
    force_path(monkeypatch, path)
    x, ids, weights, rows, fmt, slots = make_inputs(spec, 1 if path == "decode" else 9, torch.bfloat16, seed=1)
    split = 5  # rows 0..4 on the device, 5..10 in host memory: at least 3 of the 8 experts are on the host
    host_rows = rows[split:].cpu()
    if CUDA:
        host_rows = host_rows.pin_memory()
    device, host, whole = fmt.weights(rows[:split].clone()), fmt.weights(host_rows), fmt.weights(rows)
    expected = triton_moe.fused_moe(x, ids, weights, whole.gate_up, whole.down, slots)
    actual = triton_moe.fused_moe(x, ids, weights, device.gate_up, device.down, slots, host_w13=host.gate_up,
                                  host_w2=host.down)
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("spec", [SCHEMES[1], SCHEMES[2]], ids=["int4-zero", "int8-sym"])
def test_admitted_misses_are_written_into_their_slots_as_read(spec):
    """Read-through caching: every plane of an expert read in place with an admit slot (packed words, scales,
    zero points) lands in that device slot bit for bit; the outputs are those of the call without admission."""
    x, ids, weights, rows, fmt, slots = make_inputs(spec, 1, torch.bfloat16, top_k=4, spare=0, seed=2)
    check_read_through_admission(x, ids, weights, rows, fmt, slots)


def test_rejects_mixed_pools():
    x, ids, weights, rows, fmt, slots = make_inputs(SCHEMES[0], 1, torch.float32)
    pools = fmt.weights(rows)
    dense = torch.zeros((11, 2 * INTER, HIDDEN), device=DEVICE), torch.zeros((11, HIDDEN, INTER), device=DEVICE)
    with pytest.raises(ValueError, match="all dense tensors or all quantized"):
        triton_moe.fused_moe(x, ids, weights, pools.gate_up, dense[1], slots)
    with pytest.raises(ValueError, match="all dense tensors or all quantized"):
        triton_moe.fused_moe(x, ids, weights, *dense, slots, host_w13=pools.gate_up, host_w2=pools.down)
