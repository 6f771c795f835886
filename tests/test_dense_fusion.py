"""Fused RMSNorm and rotary kernels (kernels/triton_dense.py) against transformers, and their swapping into models
(dense_fusion.py): same logits and greedy tokens, other norm formulas left alone, unfuse restores, MOE_FUSE_DENSE.

Without CUDA the kernels run in Triton's interpreter with GPU-like bf16 casts (triton_interp.py): small shapes.
"""

import functools

import pytest
import torch
from triton_interp import BF16_PATCHES, CUDA, gpu_like_bf16  # first: sets TRITON_INTERPRET before triton loads
from transformers import AutoModelForCausalLM
from transformers.models.gemma import modeling_gemma as gemma
from transformers.models.qwen3_moe import modeling_qwen3_moe as qwen3

from moe_offload import LLMPipeline, MoeOffloadError
from moe_offload import pipeline as pipeline_module
from moe_offload.config import make_config
from moe_offload.dense_fusion import ROTARY_NAME, fuse_dense_ops, fused_dense_ops, unfuse_dense_ops
from moe_offload.kernels import triton_dense

DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# max |kernel - torch| relative to max |torch|: an ulp of the dtype at most (the RMSNorm mean's summation order)
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}
ORIGINAL_ROTARY = qwen3.apply_rotary_pos_emb


@pytest.fixture(autouse=True)
def _gpu_like_bf16(monkeypatch):
    gpu_like_bf16(monkeypatch)


@pytest.fixture(autouse=True)
def _restore_rotary_globals(monkeypatch):
    """Fusing patches module globals process-wide: put them back after each test, whatever it did."""
    for modeling in (qwen3, gemma):
        monkeypatch.setattr(modeling, ROTARY_NAME, getattr(modeling, ROTARY_NAME))


def _skip_bf16_without_patches(dtype: torch.dtype) -> None:
    if not CUDA and BF16_PATCHES is None and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter rounds bfloat16 unlike a GPU and could not be patched")


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    tol = TOLERANCE[expected.dtype] * expected.abs().max().item()
    torch.testing.assert_close(actual.float(), expected.float(), rtol=0, atol=tol)


def _norm(width: int, dtype: torch.dtype, eps: float = 1e-6) -> qwen3.Qwen3MoeRMSNorm:
    norm = qwen3.Qwen3MoeRMSNorm(width, eps).to(DEVICE, dtype)
    norm.weight.requires_grad_(False)
    norm.weight.normal_(1.0, 0.5)
    return norm


# -- kernels -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(96,), (3, 130), (2, 1, 4, 128), (1, 2, 2048)], ids=str)
def test_rms_norm_matches_transformers(dtype, shape):
    _skip_bf16_without_patches(dtype)
    torch.manual_seed(shape[-1])
    norm = _norm(shape[-1], dtype)
    x = (torch.randn(shape, device=DEVICE) * 3).to(dtype)
    expected = norm(x)
    actual = triton_dense.rms_norm(x, norm.weight, norm.variance_epsilon)
    assert_close(actual, expected)
    if dtype != torch.float32:  # the same roundings: identical but for rare ulps from the mean's summation order
        assert (actual == expected).float().mean().item() >= 0.95  # (in float32 that order moves whole rows)


@pytest.mark.parametrize("x_dtype, w_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                              (torch.float16, torch.bfloat16)], ids=str)
def test_rms_norm_promotes_like_torch(x_dtype, w_dtype):
    """h is rounded to x's dtype, then `weight * h` is computed in the promoted dtype (float32 here)."""
    _skip_bf16_without_patches(torch.bfloat16)
    torch.manual_seed(1)
    norm = _norm(130, w_dtype)
    x = torch.randn(5, 130, device=DEVICE).to(x_dtype)
    expected = norm(x)
    actual = triton_dense.rms_norm(x, norm.weight, norm.variance_epsilon)
    assert actual.dtype == expected.dtype == torch.float32
    assert_close(actual, expected)


def test_rms_norm_takes_strided_rows():
    """Rows of a wider tensor (a view: no copy) and a transposed view (copied) give the norm of what they show."""
    torch.manual_seed(2)
    norm = _norm(64, torch.float32)
    wide = torch.randn(6, 3, 80, device=DEVICE)  # [R, 3, 80]
    rows = wide[:, 1, 8:72]  # [R, 64], row stride 240
    assert_close(triton_dense.rms_norm(rows, norm.weight, 1e-6), norm(rows))
    columns = torch.randn(64, 6, device=DEVICE).T  # [6, 64], last-dim stride 6
    assert_close(triton_dense.rms_norm(columns, norm.weight, 1e-6), norm(columns))


def _rotary_inputs(dtype, batch, q_heads, k_heads, tokens, dim, cos_batch, unsqueeze_dim):
    """q, k as transformers' attention makes them (transposed views of [B, T, H, D] for unsqueeze_dim=1), and
    cos/sin with unrelated halves (real RoPE repeats them, which could hide a swapped half)."""
    q = torch.randn(batch, tokens, q_heads, dim, device=DEVICE).to(dtype)  # [B, T, Hq, D]
    k = torch.randn(batch, tokens, k_heads, dim, device=DEVICE).to(dtype)  # [B, T, Hk, D]
    if unsqueeze_dim == 1:
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, T, D]
    cos = torch.randn(cos_batch, tokens, dim, device=DEVICE).to(dtype)  # [B or 1, T, D]
    sin = torch.randn(cos_batch, tokens, dim, device=DEVICE).to(dtype)
    return q, k, cos, sin


def _layout(t: torch.Tensor) -> list[int]:
    """Strides of the dims longer than 1 (a size-1 dim's stride is arbitrary)."""
    return [stride for stride, size in zip(t.stride(), t.shape) if size > 1]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
@pytest.mark.parametrize("batch, tokens, dim, cos_batch", [(1, 1, 128, 1), (2, 5, 8, 2), (2, 3, 24, 1)])
def test_rotary_matches_transformers(dtype, unsqueeze_dim, batch, tokens, dim, cos_batch):
    _skip_bf16_without_patches(dtype)
    torch.manual_seed(tokens * dim)
    q, k, cos, sin = _rotary_inputs(dtype, batch, 4, 2, tokens, dim, cos_batch, unsqueeze_dim)
    assert triton_dense.rotary_supported(q, k, cos, sin, unsqueeze_dim)
    expected = ORIGINAL_ROTARY(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    actual = triton_dense.apply_rotary(q, k, cos, sin, unsqueeze_dim)
    for a, e in zip(actual, expected):
        assert torch.equal(a, e)  # every product and the sum rounded as torch rounds them
        assert _layout(a) == _layout(e)  # and laid out as torch lays it out


def test_rotary_supported_rejects_what_it_does_not_cover():
    q, k, cos, sin = _rotary_inputs(torch.float32, 1, 4, 2, 3, 8, 1, 1)
    assert triton_dense.rotary_supported(q, k, cos, sin, 1)
    assert not triton_dense.rotary_supported(q, k, cos[..., :4], sin[..., :4], 1)  # partial rotary
    assert not triton_dense.rotary_supported(q, k, cos.double(), sin.double(), 1)  # mixed dtypes
    assert not triton_dense.rotary_supported(q, k, cos[0], sin[0], 1)  # [T, D]
    assert not triton_dense.rotary_supported(q, k, cos, sin, 0)
    assert not triton_dense.rotary_supported(q[..., :7], k[..., :7], cos[..., :7], sin[..., :7], 1)  # odd D
    assert not triton_dense.rotary_supported(q.clone().requires_grad_(), k, cos, sin, 1)  # autograd


# -- models ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def qwen3_path(checkpoint_factory):
    return checkpoint_factory("qwen3_moe")


def _load(path: str, dtype: torch.dtype):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(DEVICE).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_model_gives_the_same_logits_and_greedy_tokens(qwen3_path, dtype):
    _skip_bf16_without_patches(dtype)
    model = _load(qwen3_path, dtype)
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]], device=DEVICE)  # [1, T]
    with torch.no_grad():
        logits = model(ids).logits  # [1, T, V]
        tokens = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        fused = fuse_dense_ops(model, force=True)
        assert fused == ["rms_norm x9", "rotary"]  # 2 layers x (input, post-attention, q, k) + final
        assert qwen3.apply_rotary_pos_emb is not ORIGINAL_ROTARY
        assert_close(model(ids).logits, logits)
        assert torch.equal(model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False), tokens)


def test_other_norm_formulas_are_left_alone():
    """Gemma's `(1 + weight)` norm has RMSNorm's name and attributes but not its formula: the check refuses it."""
    model = torch.nn.ModuleDict({"llama_like": _norm(32, torch.float32),
                                 "gemma": gemma.GemmaRMSNorm(32).to(DEVICE)})
    assert fuse_dense_ops(model, force=True)[0] == "rms_norm x1"
    assert "forward" in model["llama_like"].__dict__ and "forward" not in model["gemma"].__dict__


def test_rotary_that_differs_in_any_layout_is_left_alone(qwen3_path, monkeypatch):
    """A variant that ignores unsqueeze_dim agrees for the default layout only: the wrapper would also take
    unsqueeze_dim=2 calls, so the check refuses it."""
    def fixed_layout(q, k, cos, sin, unsqueeze_dim=1):
        return ORIGINAL_ROTARY(q, k, cos, sin)

    monkeypatch.setattr(qwen3, ROTARY_NAME, fixed_layout)
    assert fuse_dense_ops(_load(qwen3_path, torch.float32), force=True) == ["rms_norm x9"]
    assert qwen3.apply_rotary_pos_emb is fixed_layout


class _HubFunc(torch.nn.Module):
    """What the `kernels` package's use_kernel_forward_from_hub makes of a function (transformers >= 5.25): a
    Module whose forward falls back to the function it closes over."""


def _hub_module(func):
    def forward(self, *args, **kwargs):
        return func(*args, **kwargs)

    return type("Func", (_HubFunc,), {"forward": forward})()


def test_rotary_wrapped_in_a_hub_kernel_module_is_fused_and_restored(qwen3_path, monkeypatch):
    plain = ORIGINAL_ROTARY if not isinstance(ORIGINAL_ROTARY, torch.nn.Module) else None
    hub = _hub_module(plain) if plain is not None else ORIGINAL_ROTARY
    monkeypatch.setattr(qwen3, ROTARY_NAME, hub)
    model = _load(qwen3_path, torch.float32)
    assert fuse_dense_ops(model, force=True) == ["rms_norm x9", "rotary"]
    assert qwen3.apply_rotary_pos_emb is not hub
    unfuse_dense_ops(model)
    assert qwen3.apply_rotary_pos_emb is hub


def test_unrecognised_rotary_is_left_alone_and_said(qwen3_path, monkeypatch, caplog):
    """A rotary whose signature cannot be read stays as it is, and the load says so (a silent speed loss else)."""
    opaque = _hub_module(lambda *args, **kwargs: ORIGINAL_ROTARY(*args, **kwargs))  # no (q, k, cos, sin) to read
    monkeypatch.setattr(qwen3, ROTARY_NAME, opaque)
    with caplog.at_level("WARNING", logger="moe_offload.dense_fusion"):
        assert fuse_dense_ops(_load(qwen3_path, torch.float32), force=True) == ["rms_norm x9"]
    assert qwen3.apply_rotary_pos_emb is opaque
    assert "rotary embedding of transformers.models.qwen3_moe.modeling_qwen3_moe not fused" in caplog.text


def test_fusing_is_idempotent_and_unfuse_restores(qwen3_path):
    model = _load(qwen3_path, torch.float32)
    norms = [m for m in model.modules() if isinstance(m, qwen3.Qwen3MoeRMSNorm)]
    first = fuse_dense_ops(model, force=True)
    wrapper = qwen3.apply_rotary_pos_emb
    assert fuse_dense_ops(model, force=True) == first and qwen3.apply_rotary_pos_emb is wrapper
    unfuse_dense_ops(model)
    assert fused_dense_ops(model) == [] and qwen3.apply_rotary_pos_emb is ORIGINAL_ROTARY
    assert all("forward" not in norm.__dict__ for norm in norms)


def test_fused_rotary_falls_back_for_calls_the_kernel_does_not_cover(qwen3_path, monkeypatch):
    fuse_dense_ops(_load(qwen3_path, torch.float32), force=True)
    calls = []

    def counted(q, k, cos, sin, unsqueeze_dim):
        calls.append(unsqueeze_dim)
        return ORIGINAL_ROTARY(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)

    monkeypatch.setattr(triton_dense, "apply_rotary", counted)
    q, k, cos, sin = _rotary_inputs(torch.float32, 1, 4, 2, 3, 8, 1, 2)
    qwen3.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
    qwen3.apply_rotary_pos_emb(q, k, cos, sin, 2)
    assert calls == [2, 2]
    mixed = qwen3.apply_rotary_pos_emb(q.half(), k.half(), cos, sin, 2)  # fp16 q, k with fp32 cos: promoted
    assert calls == [2, 2]
    for a, e in zip(mixed, ORIGINAL_ROTARY(q.half(), k.half(), cos, sin, 2)):
        assert a.dtype == torch.float32 and torch.equal(a, e)


def test_cpu_models_are_fused_only_when_forced(qwen3_path):
    model = _load(qwen3_path, torch.float32).cpu()
    unfuse_dense_ops(model)  # with CUDA, an earlier test's pipeline fused the module-wide rotary
    assert fuse_dense_ops(model) == [] and qwen3.apply_rotary_pos_emb is ORIGINAL_ROTARY


def test_pipeline_fuses_and_reports_it(qwen3_path, monkeypatch):
    """The pipeline calls fuse_dense_ops after loading (forced on the CPU) unless MOE_FUSE_DENSE=off, reports the
    result, and its greedy tokens are those of the unfused pipeline."""
    ids = torch.tensor([[5, 17, 42, 99]])
    monkeypatch.setenv("MOE_FUSE_DENSE", "off")
    plain = LLMPipeline(qwen3_path, DEVICE)
    assert plain.get_offload_stats()["fused_dense_ops"] == [] and plain.config.moe_fuse_dense == "off"
    expected = plain.generate_tokens(ids.to(DEVICE), max_new_tokens=6, min_new_tokens=6)
    plain.close()
    monkeypatch.delenv("MOE_FUSE_DENSE")
    if not CUDA:
        monkeypatch.setattr(pipeline_module, "fuse_dense_ops", functools.partial(fuse_dense_ops, force=True))
    fused = LLMPipeline(qwen3_path, DEVICE)
    assert fused.get_offload_stats()["fused_dense_ops"] == ["rms_norm x9", "rotary"]
    assert torch.equal(fused.generate_tokens(ids.to(DEVICE), max_new_tokens=6, min_new_tokens=6), expected)
    fused.close()


# -- MOE_FUSE_DENSE ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [("auto", "auto"), ("OFF", "off"), (" Auto ", "auto")])
def test_moe_fuse_dense_parses(value, expected):
    assert make_config({}, {"MOE_FUSE_DENSE": value}).moe_fuse_dense == expected
    assert make_config({}, {}).moe_fuse_dense == "auto"


@pytest.mark.parametrize("value", ["on", "1", "triton"])
def test_moe_fuse_dense_rejects(value):
    with pytest.raises(MoeOffloadError, match="MOE_FUSE_DENSE must be one of auto, off"):
        make_config({}, {"MOE_FUSE_DENSE": value})
