"""fused_moe on FP8 block-quantized pools (kernels/triton_fp8.py) against fused_moe_reference, which dequantizes
with reference.dequantize: decode (GEMV) and prefill (grouped GEMM), bf16 and float32 hidden states, resident
slots and host rows read in place, read-through admission; and the byte decoding against torch's float8_e4m3fn
for all 256 codes.

Odd shapes throughout: H = 75 and I = 21 are multiples of neither the tiles nor the 16 x 32 blocks, so the up rows'
scale blocks restart at row ceil(21/16) = 2 of gate_up's scales (not at 21 // 16 = 1), every last block is short,
and 2I = 42 / H = 75 are not multiples of the row blocks. The weights are random bytes over every finite e4m3
code (subnormals and -0 included). Without CUDA the kernels run in Triton's interpreter, bf16 made to round as on
a GPU (triton_interp.py); the interpreter reads float8 tensors, but the kernels load the bytes as uint8 anyway.
"""

import pytest
import torch
from triton_interp import (BF16_PATCHES, CUDA, check_read_through_admission, force_path,  # first: sets
                           gpu_like_bf16)  # TRITON_INTERPRET before triton loads

import triton  # noqa: E402  (after triton_interp)
import triton.language as tl  # noqa: E402

from moe_offload.expert_format import ExpertFormat, FP8Matrix
from moe_offload.kernels import triton_fp8, triton_moe
from moe_offload.kernels.reference import dequantize
from moe_offload.quant.fp8 import BlockFP8Spec

pytestmark = pytest.mark.usefixtures("ieee_fp32")
DEVICE = "cuda" if CUDA else "cpu"
HIDDEN, INTER = 75, 21
SPEC = BlockFP8Spec(16, 32)
# max |error| relative to max |reference|: both dequantize to the same weights and round the same
# intermediates, so only float32 accumulation order differs (measured in the interpreter: bf16 0, float32
# <= 2.9e-7)
TOLERANCE = {torch.bfloat16: 2.5e-2, torch.float32: 1e-5}


@pytest.fixture(autouse=True)
def _gpu_like_bf16(monkeypatch):
    if not CUDA and BF16_PATCHES is None:
        pytest.skip("bf16 compute: the interpreter must round to bf16 as a GPU does (triton_interp.py)")
    gpu_like_bf16(monkeypatch)




def make_rows(fmt: ExpertFormat, count: int, generator: torch.Generator) -> torch.Tensor:
    """uint8 [count, B]: random FP8 experts, every finite e4m3 code possible, scales keeping outputs ~1."""
    rows = torch.zeros((count, fmt.row_bytes), dtype=torch.uint8)
    planes = fmt.plane_views(rows)
    for matrix, cols in (("gate_up", fmt.hidden), ("down", fmt.inter)):
        codes = torch.randint(0, 256, (count, *planes[f"{matrix}.weight"].shape[1:]), generator=generator)
        codes = torch.where((codes & 0x7F) == 0x7F, 0x38, codes)  # no NaN (S.1111.111): 1.0 instead
        planes[f"{matrix}.weight"].view(torch.uint8).copy_(codes.to(torch.uint8))
        scale = torch.rand(planes[f"{matrix}.scale"].shape, generator=generator) + 0.5
        planes[f"{matrix}.scale"].copy_((scale / (60 * cols ** 0.5)).to(fmt.dtype))
    return rows.to(DEVICE)


def make_inputs(tokens: int, dtype: torch.dtype, experts: int = 8, top_k: int = 2, spare: int = 3, seed: int = 0,
                scale_dtype: torch.dtype = torch.float32, hidden: int = HIDDEN, inter: int = INTER):
    """(x, ids, weights, rows, fmt, slot_of_expert): experts in a random permutation of experts + spare slots."""
    generator = torch.Generator().manual_seed(seed)
    fmt = ExpertFormat(inter, hidden, scale_dtype, SPEC)
    rows = make_rows(fmt, experts + spare, generator)
    x = torch.randn(tokens, hidden, generator=generator).to(dtype).to(DEVICE)  # [T, H]
    ids = torch.rand(tokens, experts, generator=generator).topk(top_k, dim=-1).indices.to(DEVICE)  # [T, K]
    weights = torch.softmax(torch.randn(tokens, top_k, generator=generator), dim=-1).to(dtype).to(DEVICE)
    slots = torch.randperm(experts + spare, generator=generator)[:experts].to(torch.int32).to(DEVICE)  # [E]
    return x, ids, weights, rows, fmt, slots


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    tol = TOLERANCE[dtype] * expected.abs().max().item()
    torch.testing.assert_close(actual.float(), expected.float(), rtol=0, atol=tol)


@triton.jit
def _decode_kernel(byte_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, triton_fp8._e4m3_to_float32(tl.load(byte_ptr + offs).to(tl.int32)))


def test_every_e4m3_code_decodes_to_torchs_value():
    codes = torch.arange(256, dtype=torch.uint8, device=DEVICE)
    out = torch.empty(256, dtype=torch.float32, device=DEVICE)
    _decode_kernel[(1,)](codes, out, N=256)
    want = codes.view(torch.float8_e4m3fn).float()
    # bit for bit: -0.0 and the subnormals included; the two NaN codes give NaN
    assert torch.equal(out.view(torch.int32)[~want.isnan()], want.view(torch.int32)[~want.isnan()])
    assert out[want.isnan()].isnan().all() and int(want.isnan().sum()) == 2


def test_the_scale_blocks_restart_at_up():
    """The pool's gate_up scale plane has ceil(I/16) rows per projection, and the oracle reads up's from there."""
    _, _, _, rows, fmt, _ = make_inputs(1, torch.float32)
    pools = fmt.weights(rows)
    assert isinstance(pools.gate_up, FP8Matrix) and pools.gate_up.scale.shape[1:] == (4, 3)  # 2 + 2, not 3
    weight, scale = pools.gate_up.weight[0].float(), pools.gate_up.scale[0]
    up_row = INTER + 16  # up's row 16: its second block, scale row 2 + 1
    assert torch.equal(dequantize(pools.gate_up[0])[up_row], weight[up_row] * scale[3].repeat_interleave(32)[:HIDDEN])


@pytest.mark.parametrize("dtype,scale_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float32),
                                               (torch.float32, torch.bfloat16)], ids=str)
@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_matches_the_dequantizing_reference(monkeypatch, dtype, scale_dtype, path):
    """float32 scales (DeepSeek-V3) and bf16 ones (some Qwen3 exports: widened, the product rounded once)."""
    force_path(monkeypatch, path)
    x, ids, weights, rows, fmt, slots = make_inputs(1 if path == "decode" else 9, dtype, scale_dtype=scale_dtype)
    pools = fmt.weights(rows)
    expected = triton_moe.fused_moe_reference(x, ids, weights, pools.gate_up, pools.down, slots)
    actual = triton_moe.fused_moe(x, ids, weights, pools.gate_up, pools.down, slots)
    assert actual.dtype == dtype and actual.shape == x.shape
    assert_close(actual, expected, dtype)


@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_host_rows_are_read_in_place_with_the_same_bits(monkeypatch, path):
    """Slots past the device pool address host rows (pinned, on CUDA): the bits of one device pool."""
    force_path(monkeypatch, path)
    x, ids, weights, rows, fmt, slots = make_inputs(1 if path == "decode" else 9, torch.bfloat16, seed=1)
    split = 5  # rows 0..4 on the device, 5..10 in host memory: at least 3 of the 8 experts are on the host
    host_rows = rows[split:].cpu()
    if CUDA:
        host_rows = host_rows.pin_memory()
    device, host, whole = fmt.weights(rows[:split].clone()), fmt.weights(host_rows), fmt.weights(rows)
    expected = triton_moe.fused_moe(x, ids, weights, whole.gate_up, whole.down, slots)
    actual = triton_moe.fused_moe(x, ids, weights, device.gate_up, device.down, slots, host_w13=host.gate_up,
                                  host_w2=host.down)
    assert torch.equal(actual, expected)


def test_admitted_misses_are_written_into_their_slots_as_read():
    """Read-through caching: the FP8 bytes and block scales of an expert read in place with an admit slot land in
    that device slot bit for bit; the outputs are those of the call without admission."""
    x, ids, weights, rows, fmt, slots = make_inputs(1, torch.bfloat16, top_k=4, spare=0, seed=2)
    check_read_through_admission(x, ids, weights, rows, fmt, slots)


# H = 76 and I = 20: rows of whole 32-bit words (the decode GEMVs then read words), still not multiples of the
# tiles or of the 16 x 32 blocks
WORD_HIDDEN, WORD_INTER = 76, 20


@pytest.mark.parametrize("dtype,scale_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)],
                         ids=str)
def test_words_give_the_per_byte_bits(monkeypatch, dtype, scale_dtype):
    """Where rows are 4-byte aligned the decode kernels read a word (4 codes) and a scale per row and block at a
    time: the same bits as a byte and a scale per element, from the device pool and from host rows in place, and
    with read-through admission."""
    force_path(monkeypatch, "decode")
    x, ids, weights, rows, fmt, slots = make_inputs(1, dtype, top_k=4, seed=3, scale_dtype=scale_dtype,
                                                    hidden=WORD_HIDDEN, inter=WORD_INTER)
    split = 5
    host_rows = rows[split:].cpu()
    if CUDA:
        host_rows = host_rows.pin_memory()
    device, host = fmt.weights(rows[:split].clone()), fmt.weights(host_rows)
    chosen = []
    reads_words = triton_fp8.reads_words

    def recording(device_matrix, host_matrix, block_k, words=True):
        chosen.append(reads_words(device_matrix, host_matrix, block_k))
        return chosen[-1] and words

    def run():
        return triton_moe.fused_moe(x, ids, weights, device.gate_up, device.down, slots, host_w13=host.gate_up,
                                    host_w2=host.down)

    monkeypatch.setattr(triton_fp8, "reads_words", recording)
    by_words = run()
    monkeypatch.setattr(triton_fp8, "reads_words", lambda d, h, k: recording(d, h, k, words=False))
    by_bytes = run()
    assert chosen == [True, True, True, True]
    if dtype == torch.float32 and CUDA:
        # float32 activations times float32 weights are inexact products, and the GPU compiler fuses the two
        # paths' differently shaped code into different multiply-adds: on the H100 they differed in the last bits
        # (both paths read every expert of a call the same way, so ratios and tiers still give the same bits)
        torch.testing.assert_close(by_words, by_bytes, rtol=1e-5, atol=1e-5)
    else:  # bf16 products are exact in float32, and the interpreter does not fuse: the same bits
        assert torch.equal(by_words, by_bytes)
    pools = fmt.weights(rows)
    assert_close(by_words, triton_moe.fused_moe_reference(x, ids, weights, pools.gate_up, pools.down, slots), dtype)
    monkeypatch.setattr(triton_fp8, "reads_words", reads_words)
    x, ids, weights, rows, fmt, slots = make_inputs(1, dtype, top_k=4, spare=0, seed=4, scale_dtype=scale_dtype,
                                                    hidden=WORD_HIDDEN, inter=WORD_INTER)
    check_read_through_admission(x, ids, weights, rows, fmt, slots)


def test_odd_rows_are_read_byte_by_byte():
    x, ids, weights, rows, fmt, slots = make_inputs(1, torch.float32)
    pools = fmt.weights(rows)
    assert not triton_fp8.reads_words(pools.gate_up, pools.gate_up, 256)  # H = 75: rows not 4-byte aligned
    x, ids, weights, rows, fmt, slots = make_inputs(1, torch.float32, hidden=WORD_HIDDEN, inter=WORD_INTER)
    pools = fmt.weights(rows)
    assert triton_fp8.reads_words(pools.gate_up, pools.gate_up, 256)
    assert not triton_fp8.reads_words(pools.gate_up, pools.gate_up, 48)  # a tile not made of whole 32-wide blocks


def test_rejects_mixed_pools():
    x, ids, weights, rows, fmt, slots = make_inputs(1, torch.float32)
    pools = fmt.weights(rows)
    dense = torch.zeros((11, 2 * INTER, HIDDEN), device=DEVICE), torch.zeros((11, HIDDEN, INTER), device=DEVICE)
    with pytest.raises(ValueError, match="all dense tensors or all quantized"):
        triton_moe.fused_moe(x, ids, weights, pools.gate_up, dense[1], slots)
