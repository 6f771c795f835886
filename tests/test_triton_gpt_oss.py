"""fused_moe on GPT-OSS pools (triton_gpt_oss.py) against fused_moe_reference (the eager path, reference.py).

Pools are byte rows in the engine's own formats (expert_format.py): the checkpoint's transposed [H, 2I] / [I, H]
planes with biases, or MXFP4 blocks and scales with biases, on odd shapes (dense H 75, I 37: no tile divides
them; MXFP4 needs multiples of 32). Weights large enough that the SwiGLU clamps are reached. Without CUDA, in
Triton's interpreter (bf16 made GPU-like, triton_interp.py). Tolerance: max |error| relative to max |reference|:
float32 1e-5, bfloat16 2.5e-2 (same rounding points; an accumulation-order ulp can move one rounding); the host
pool read in place and read-through admission are checked bit for bit.
"""

import pytest
import torch
from triton_interp import CUDA, force_path, gpu_like_bf16  # first: sets TRITON_INTERPRET before triton loads

from moe_offload.expert_format import ClampedSwiGLU, ExpertFormat
from moe_offload.kernels import triton_moe
from moe_offload.kernels.reference import dense
from moe_offload.quant.mxfp4 import MXFP4

pytestmark = pytest.mark.usefixtures("ieee_fp32")
DEVICE = "cuda" if CUDA else "cpu"
GLU = ClampedSwiGLU(alpha=1.702, limit=7.0)
SHAPES = {"dense": (75, 37), "mxfp4": (96, 32)}  # (H, I)
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2.5e-2}


@pytest.fixture(autouse=True)
def _gpu_like(monkeypatch):
    gpu_like_bf16(monkeypatch)


def _pool(kind: str, dtype: torch.dtype, slots: int, seed: int = 0):
    """(format, rows uint8 [S, B]) of random GPT-OSS experts."""
    hidden, inter = SHAPES[kind]
    fmt = ExpertFormat(inter, hidden, dtype, MXFP4 if kind == "mxfp4" else None, glu=GLU)
    rows = torch.zeros(slots, fmt.row_bytes, dtype=torch.uint8, device=DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    for name, view in fmt.plane_views(rows).items():
        if name.endswith(".blocks"):
            view.copy_(torch.randint(0, 256, view.shape, generator=gen, device=DEVICE))
        elif name.endswith(".scales"):  # 2^-4 .. 2^-1: weights up to 3
            view.copy_(torch.randint(123, 127, view.shape, generator=gen, device=DEVICE))
        else:
            view.copy_(torch.randn(view.shape, generator=gen, device=DEVICE) * (0.5 if "bias" in name else 0.8))
    return fmt, rows


def _routing(tokens: int, experts: int, top_k: int, hidden: int, dtype: torch.dtype):
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    x = torch.randn(tokens, hidden, generator=gen, device=DEVICE).to(dtype)  # [T, H]
    ids = torch.rand(tokens, experts, generator=gen, device=DEVICE).topk(top_k, dim=-1).indices  # [T, K]
    weights = torch.softmax(torch.randn(tokens, top_k, generator=gen, device=DEVICE), dim=-1).to(dtype)  # [T, K]
    return x, ids, weights



# each pool kind on each path, each dtype twice (the interpreter runs every program in Python: kept to four)
@pytest.mark.parametrize("kind, path, dtype", [
    ("dense", "decode", torch.float32), ("dense", "prefill", torch.bfloat16),
    ("mxfp4", "decode", torch.bfloat16), ("mxfp4", "prefill", torch.float32)])
def test_matches_reference(monkeypatch, kind, path, dtype):
    force_path(monkeypatch, path)
    experts, top_k, tokens = 6, 2, 1 if path == "decode" else 9
    fmt, rows = _pool(kind, dtype, experts + 2)
    pool = fmt.weights(rows)
    x, ids, weights = _routing(tokens, experts, top_k, fmt.hidden, dtype)
    slot_of_expert = torch.randperm(experts + 2, device=DEVICE)[:experts].to(torch.int32)  # [E]
    out = triton_moe.fused_moe(x, ids, weights, pool.gate_up, pool.down, slot_of_expert)
    expected = triton_moe.fused_moe_reference(x, ids, weights, pool.gate_up, pool.down, slot_of_expert)
    used = pool.gate_up[slot_of_expert[ids.unique()].long()]  # [n, 2I, H] of the experts picked
    weight = dense(used.weight, torch.float32).float()  # [n, 2I, H]
    pre_activation = torch.einsum("th,nih->tni", x.float(), weight) + used.bias.float()[None]  # [T, n, 2I]
    assert (pre_activation.abs() > GLU.limit).any()  # the clamps are exercised
    tol = TOLERANCE[dtype] * expected.abs().max().item()
    torch.testing.assert_close(out.float(), expected.float(), rtol=0, atol=tol)


@pytest.mark.parametrize("kind", ["dense", "mxfp4"])
def test_host_pool_in_place_and_admission_bit_for_bit(kind):
    """Experts split over a device pool and a host pool read in place give the same bits as all on the device;
    a miss admitted read-through lands in its device slot byte for byte, biases included."""
    dtype, experts, top_k = torch.float32, 4, 2
    fmt, everything = _pool(kind, dtype, experts)
    x, ids, weights = _routing(1, experts, top_k, fmt.hidden, dtype)
    all_device = fmt.weights(everything)
    baseline = triton_moe.fused_moe(x, ids, weights, all_device.gate_up, all_device.down,
                                    torch.arange(experts, dtype=torch.int32, device=DEVICE))
    device_rows = torch.zeros(2, fmt.row_bytes, dtype=torch.uint8, device=DEVICE)  # slots 0, 1: free
    host = fmt.weights(everything)  # every expert in the host pool: slot 2 + e
    device = fmt.weights(device_rows)
    slots = torch.arange(experts, dtype=torch.int32, device=DEVICE) + 2  # [E]
    admit = torch.full((experts,), -1, dtype=torch.int32, device=DEVICE)
    admit[ids[0, 0]] = 1  # the first pick is admitted into device slot 1
    contrib = torch.empty((top_k, fmt.hidden), dtype=torch.float32, device=DEVICE)
    triton_moe.fused_moe(x, ids, weights, device.gate_up, device.down, slots, contrib=contrib,
                         host_w13=host.gate_up, host_w2=host.down, admit_slot_of_expert=admit)
    assert torch.equal(contrib.sum(dim=0, keepdim=True).to(dtype), baseline)
    admitted, source = fmt.plane_views(device_rows[1]), fmt.plane_views(everything[int(ids[0, 0])])
    for name in admitted:
        assert torch.equal(admitted[name], source[name]), name


def test_mxfp4_words_give_the_per_element_bits(monkeypatch):
    """The decode kernels read MXFP4 a 32-bit word (8 values) at a time where rows and slots are 4-byte aligned
    (the engine's byte rows are): the same tiles, so the same bits, as reading element by element."""
    from moe_offload.kernels import triton_gpt_oss

    force_path(monkeypatch, "decode")
    dtype, experts, top_k = torch.bfloat16, 6, 2
    fmt, rows = _pool("mxfp4", dtype, experts + 2)
    pool = fmt.weights(rows)
    x, ids, weights = _routing(1, experts, top_k, fmt.hidden, dtype)
    slot_of_expert = torch.randperm(experts + 2, device=DEVICE)[:experts].to(torch.int32)  # [E]
    chosen = []
    planes = triton_gpt_oss._planes

    def recording(device, host, gemv_block_k=None, words=True):
        pointers, strides, constants = planes(device, host, gemv_block_k)
        chosen.append(constants.get("WORDS"))
        return pointers, strides, {**constants, "WORDS": constants["WORDS"] and words}

    monkeypatch.setattr(triton_gpt_oss, "_planes", recording)
    by_words = triton_moe.fused_moe(x, ids, weights, pool.gate_up, pool.down, slot_of_expert)
    monkeypatch.setattr(triton_gpt_oss, "_planes", lambda d, h, k=None: recording(d, h, k, words=False))
    by_elements = triton_moe.fused_moe(x, ids, weights, pool.gate_up, pool.down, slot_of_expert)
    assert chosen == [True, True, True, True]  # gate/up and down, both calls: the engine's rows are aligned
    assert torch.equal(by_words, by_elements)
