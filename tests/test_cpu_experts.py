"""The CPU expert path (moe_offload/hybrid/cpu_experts.py) against the eager reference (kernels/reference.py).

float32: within 1e-5 of the reference, relative to its largest output.
bfloat16: compute="native" with one worker runs the reference's own ops on this thread's intra-op threads, so
it must be bit-identical. Other configurations (a pool, whose workers use fewer intra-op threads; float32
compute) round the same intermediates at the same points but may accumulate in another order, so an
intermediate can land one bf16 ulp away and carry that on: max |difference| within BF16_TOLERANCE (4 bf16 ulps)
of the largest output. Measured on an AMD EPYC (avx512_bf16): 0 for pools (the same bits),
up to 2e-3 for float32 compute (~0.2% of outputs one ulp off).
"""

import pytest
import torch
import torch.nn.functional as F

from moe_offload.hybrid.cpu_experts import CpuExperts, cpu_expert_outputs, host_tier_outputs
from moe_offload.errors import MoeOffloadError
from moe_offload.expert_format import ExpertFormat
from moe_offload.kernels.reference import weighted_expert_output
from moe_offload.tiers import HostTier

FP32_TOLERANCE = 1e-5
BF16_TOLERANCE = 2.0 ** -6  # 4 ulps of bf16 (8 significant bits) at the largest output
CONFIGS = {
    "serial": dict(),
    "serial-1-thread": dict(threads=1),
    "pool": dict(threads=2, workers=2),
    "pool-more-workers-than-threads": dict(threads=2, workers=4),
    "float32": dict(compute="float32"),
    "float32-small-blocks": dict(compute="float32", block_bytes=4096),  # many blocks and a short last one
    "float32-pool": dict(compute="float32", threads=2, workers=2),
}
# (slots, counts): experts in pools of 8, pairs grouped by expert; zero counts are skipped
ROUTINGS = {
    "no-experts": ([], []),
    "zero-pairs": ([1, 4], [0, 0]),
    "one-pair": ([5], [1]),
    "decode-8": ([0, 1, 2, 3, 4, 5, 6, 7], [1] * 8),
    "uneven": ([6, 0, 3, 2], [3, 0, 1, 5]),
    "repeated-slot": ([2, 2], [2, 1]),
}


def make_pools(n, hidden, inter, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    gate_up = (torch.randn((n, 2 * inter, hidden), generator=gen) / hidden ** 0.5).to(dtype)
    down = (torch.randn((n, hidden, inter), generator=gen) / inter ** 0.5).to(dtype)
    return gate_up, down


def make_pairs(n_pairs, hidden, dtype, weight_dtype=None, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n_pairs, hidden), generator=gen).to(dtype)
    w = torch.rand((n_pairs,), generator=gen).to(weight_dtype or dtype)
    return x, w


def reference(x, w, gate_up, down, slots, counts, act_fn=F.silu):
    out = torch.zeros((x.shape[0], x.shape[1]), dtype=torch.float32)
    start = 0
    for slot, count in zip(slots, counts):
        if count:
            rows = slice(start, start + count)
            out[rows] = weighted_expert_output(x[rows], w[rows], gate_up[slot], down[slot], act_fn)
        start += count
    return out


def relative_error(result, expected):
    if expected.numel() == 0:
        return 0.0
    return ((result - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(dtype, config, routing):
    hidden, inter = 128, 96
    gate_up, down = make_pools(8, hidden, inter, dtype)
    slots, counts = ROUTINGS[routing]
    x, w = make_pairs(sum(counts), hidden, dtype)
    expected = reference(x, w, gate_up, down, slots, counts)
    with CpuExperts(**CONFIGS[config]) as runner:
        result = runner(x, w, gate_up, down, slots, counts)
    assert result.dtype == torch.float32 and result.shape == (sum(counts), hidden)
    if dtype == torch.float32:
        assert relative_error(result, expected) <= FP32_TOLERANCE
    elif config in ("serial", "serial-1-thread"):
        assert torch.equal(result, expected)  # the reference's own ops: the same bits
    else:
        assert relative_error(result, expected) <= BF16_TOLERANCE


def test_qwen3_shape_bf16_close_to_reference():
    """A Qwen3-30B-A3B-sized expert (H=2048, I=768): the real GEMV shapes (oneDNN tiles, float32 blocks)."""
    gate_up, down = make_pools(3, 2048, 768, torch.bfloat16)
    slots, counts = [2, 0, 1], [1, 2, 1]
    x, w = make_pairs(4, 2048, torch.bfloat16)
    expected = reference(x, w, gate_up, down, slots, counts)
    assert torch.equal(cpu_expert_outputs(x, w, gate_up, down, slots, counts), expected)
    for config in (dict(workers=2), dict(compute="float32")):
        with CpuExperts(**config) as runner:
            result = runner(x, w, gate_up, down, slots, counts)
        assert relative_error(result, expected) <= BF16_TOLERANCE
        assert (result == expected).float().mean() > 0.9  # almost all outputs bit-identical


def test_float32_routing_weights_promote_as_the_reference_does():
    gate_up, down = make_pools(4, 64, 32, torch.bfloat16)
    x, w = make_pairs(3, 64, torch.bfloat16, weight_dtype=torch.float32)
    slots, counts = [3, 1], [2, 1]
    assert torch.equal(cpu_expert_outputs(x, w, gate_up, down, slots, counts),
                       reference(x, w, gate_up, down, slots, counts))


def test_other_activation():
    gate_up, down = make_pools(4, 64, 32, torch.float32)
    x, w = make_pairs(4, 64, torch.float32)
    slots, counts = [0, 3], [1, 3]
    result = cpu_expert_outputs(x, w, gate_up, down, slots, counts, F.gelu)
    assert relative_error(result, reference(x, w, gate_up, down, slots, counts, F.gelu)) <= FP32_TOLERANCE


def test_single_expert_matrices_and_out_buffer():
    gate_up, down = make_pools(1, 64, 32, torch.bfloat16)
    x, w = make_pairs(5, 64, torch.bfloat16)
    out = torch.full((5, 64), float("nan"))
    result = cpu_expert_outputs(x, w, gate_up[0], down[0], [0], [5], out=out)
    assert result is out
    assert torch.equal(out, reference(x, w, gate_up, down, [0], [5]))


def test_zero_pairs_returns_empty():
    gate_up, down = make_pools(2, 64, 32, torch.bfloat16)
    x, w = make_pairs(0, 64, torch.bfloat16)
    result = cpu_expert_outputs(x, w, gate_up, down, [], [])
    assert result.shape == (0, 64) and result.dtype == torch.float32


def test_host_tier_in_place():
    tier = HostTier([3, 7, 9], ExpertFormat(32, 64, torch.bfloat16), pin=False)
    gate_up, down = make_pools(3, 64, 32, torch.bfloat16)
    tier.gate_up.copy_(gate_up)
    tier.down.copy_(down)
    x, w = make_pairs(4, 64, torch.bfloat16)
    experts, counts = [9, 3, 5], [3, 1, 0]  # expert 5 has no pairs: it need not be in the tier
    result = host_tier_outputs(tier, experts, counts, x, w)
    assert torch.equal(result, reference(x, w, gate_up, down, [2, 0, 0], counts))
    with pytest.raises(MoeOffloadError, match="not in this host tier"):
        host_tier_outputs(tier, [5], [1], x[:1], w[:1])


def test_pool_leaves_thread_counts_alone():
    before = torch.get_num_threads()
    gate_up, down = make_pools(4, 64, 32, torch.bfloat16)
    x, w = make_pairs(4, 64, torch.bfloat16)
    with CpuExperts(threads=2, workers=2) as runner:
        runner(x, w, gate_up, down, [0, 1, 2, 3], [1, 1, 1, 1])
        assert torch.get_num_threads() == before
    assert torch.get_num_threads() == before


def test_work_is_balanced_over_workers():
    from moe_offload.hybrid.cpu_experts import _balance

    shares = _balance([(s, 0, c) for s, c in enumerate([5, 1, 1, 1, 1, 1])], 2)
    assert sorted(len(share) for share in shares) == [3, 3]  # weight bytes per expert dominate, not pairs
    assert sorted(g[0] for share in shares for g in share) == list(range(6))
    assert all(len(share) == 2 for share in _balance([(s, 0, 1) for s in range(8)], 4))


@pytest.mark.parametrize("bad", ["slot", "counts", "hidden", "pools", "out", "mode"])
def test_bad_input(bad):
    gate_up, down = make_pools(2, 64, 32, torch.bfloat16)
    x, w = make_pairs(2, 64, torch.bfloat16)
    slots, counts, out = [0, 1], [1, 1], None
    if bad == "mode":
        with pytest.raises(MoeOffloadError, match="compute mode"):
            CpuExperts(compute="int8")
        return
    if bad == "slot":
        slots = [0, 2]
    elif bad == "counts":
        counts = [1]
    elif bad == "hidden":
        x = x[:1]
    elif bad == "pools":
        down = down[:, :, :16]
    elif bad == "out":
        out = torch.empty((2, 64), dtype=torch.bfloat16)
    with pytest.raises(MoeOffloadError):
        cpu_expert_outputs(x, w, gate_up, down, slots, counts, out=out)


def test_submit_runs_in_the_background():
    gate_up, down = make_pools(4, 64, 32, torch.bfloat16)
    x, w = make_pairs(4, 64, torch.bfloat16)
    slots, counts = [0, 1, 2, 3], [1, 1, 1, 1]
    with CpuExperts() as runner:
        future = runner.submit(x, w, gate_up, down, slots, counts)
        assert torch.equal(future.result(), reference(x, w, gate_up, down, slots, counts))


NUMBA_SHAPES = [(128, 96), (2048, 768), (130, 40)]  # (H, I): Qwen3-30B-A3B's, and widths off the 16-row chunks


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", NUMBA_SHAPES)
@pytest.mark.parametrize("routing", ["one-pair", "decode-8", "uneven", "repeated-slot", "no-experts"])
def test_numba_matches_reference(routing, shape, weight_dtype):
    """compute="numba" (kernels/cpu_numba.py) rounds where torch does: within BF16_TOLERANCE, mostly the same bits."""
    pytest.importorskip("numba")
    hidden, inter = shape
    gate_up, down = make_pools(8, hidden, inter, torch.bfloat16)
    slots, counts = ROUTINGS[routing]
    x, w = make_pairs(sum(counts), hidden, torch.bfloat16, weight_dtype=weight_dtype)
    expected = reference(x, w, gate_up, down, slots, counts)
    with CpuExperts(threads=2, compute="numba") as runner:
        result = runner(x, w, gate_up, down, slots, counts)
    assert relative_error(result, expected) <= BF16_TOLERANCE
    if expected.numel():
        assert (result == expected).float().mean() > 0.9


def test_numba_refuses_what_it_does_not_compute():
    pytest.importorskip("numba")
    gate_up, down = make_pools(2, 64, 32, torch.float32)
    x, w = make_pairs(1, 64, torch.float32)
    with CpuExperts(compute="numba") as runner, pytest.raises(MoeOffloadError, match="bf16"):
        runner(x, w, gate_up, down, [0], [1])
    gate_up, down = make_pools(2, 64, 32, torch.bfloat16)
    x, w = make_pairs(1, 64, torch.bfloat16)
    with CpuExperts(compute="numba") as runner, pytest.raises(MoeOffloadError, match="SiLU"):
        runner(x, w, gate_up, down, [0], [1], F.gelu)
