"""Swap transformers' RMSNorms and rotary embedding for the Triton kernels of kernels/triton_dense.py.

Why: in a decode step replayed as a CUDA graph, transformers' dense ops are hundreds of tiny kernels (~8 per
RMSNorm, ~10 per rotary embedding); one kernel each removes ~450 launches per step of a 12-layer Qwen3-MoE.

Nothing is swapped on trust: each replacement is first run against the code it replaces on a random input on the
model's device and kept only if the results agree to about an ulp (`_close`). What is swapped:
- RMSNorm-like modules (class name ending in "RMSNorm", a 1-D `weight`, `variance_epsilon` or `eps`, a forward of
  one tensor): an instance-level forward that calls the kernel, or the class's forward for inputs the kernel does
  not take (autograd, float64, ...). Norms with another formula (Gemma's `1 + weight`) fail the check and stay.
- `apply_rotary_pos_emb` of each modeling module the model's classes come from: transformers' attention calls it
  by its module-level name, so the global is replaced by a wrapper that runs the kernel for the calls it covers
  (triton_dense.rotary_supported) and the original otherwise. Since transformers 5.25 (with the `kernels` package
  it depends on) that global is an nn.Module made from the function by the hub-kernel decorator; the function's
  signature is read from the plain function it falls back to, and the Module stays what uncovered calls reach. This is process-wide: every model whose attention
  lives in that module (a reference transformers model loaded next to the pipeline, too) then uses the kernel, and
  unfuse_dense_ops restores it for all of them.
Both are idempotent: fusing twice wraps nothing twice.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
import types
from types import ModuleType
from typing import Any

import torch

ROTARY_NAME = "apply_rotary_pos_emb"
_log = logging.getLogger(__name__)
# max |fused - original| allowed, relative to max |original|: an ulp or so of the dtype (bf16's is 2^-8)
_TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}
_NORM_ROW_SCALES = (1e-3, 1.0, 30.0)  # the first row has mean(x^2) ~ eps: a misplaced eps shows there


def fuse_dense_ops(model: torch.nn.Module, force: bool = False) -> list[str]:
    """Fuse what passes the checks; returns what of the model is fused, e.g. ["rms_norm x49", "rotary"].

    Only on CUDA with triton installed, unless `force` (the CPU tests: Triton's interpreter); else [].
    """
    device, dtype = _device_and_dtype(model)
    if device.type != "cuda" and not force:
        return []
    try:
        from .kernels import triton_dense
    except ImportError:
        return []
    generator = torch.Generator(device=device).manual_seed(0)  # leaves the global RNG alone
    with torch.no_grad():
        for module in model.modules():
            if _is_norm_candidate(module) and _norm_matches(module, dtype, generator, triton_dense):
                module.forward = types.MethodType(_fused_norm_forward, module)
        for modeling in _modeling_modules(model):
            left = _fuse_rotary(modeling, _rotary_shape(model), device, dtype, generator, triton_dense)
            if left:  # a silent speed loss otherwise: the unfused rotary is ~10 launches per layer and step
                _log.warning("moe-offload: rotary embedding of %s not fused: %s", modeling.__name__, left)
    return fused_dense_ops(model)


def unfuse_dense_ops(model: torch.nn.Module) -> None:
    """Restore the original norms and apply_rotary_pos_emb (the latter for every model of those modules)."""
    for module in model.modules():
        if _is_fused_norm(module):
            del module.forward
    for modeling in _modeling_modules(model):
        original = _original_rotary(getattr(modeling, ROTARY_NAME))
        if original is not None:
            setattr(modeling, ROTARY_NAME, original)


def fused_dense_ops(model: torch.nn.Module) -> list[str]:
    """What of the model runs fused now: "rms_norm xN" and/or "rotary"."""
    fused = []
    norms = sum(_is_fused_norm(module) for module in model.modules())
    if norms:
        fused.append(f"rms_norm x{norms}")
    if any(_original_rotary(getattr(m, ROTARY_NAME)) is not None for m in _modeling_modules(model)):
        fused.append("rotary")
    return fused


def _device_and_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """The model's device and compute dtype (that of its first floating-point parameter)."""
    param = next(p for p in model.parameters() if p.is_floating_point())
    return param.device, param.dtype


def _close(actual: Any, expected: Any) -> bool:
    """Same dtype and shape, and within _TOLERANCE of the dtype relative to the largest expected value."""
    if not (isinstance(actual, torch.Tensor) and isinstance(expected, torch.Tensor)):
        return False
    if actual.dtype != expected.dtype or actual.shape != expected.shape or expected.dtype not in _TOLERANCE:
        return False
    limit = _TOLERANCE[expected.dtype] * expected.abs().max().float()
    return bool((actual.float() - expected.float()).abs().max() <= limit)


# -- RMSNorm -----------------------------------------------------------------------------------------------------

def _eps(module: torch.nn.Module) -> Any:
    return getattr(module, "variance_epsilon", getattr(module, "eps", None))


def _is_fused_norm(module: torch.nn.Module) -> bool:
    forward = module.__dict__.get("forward")
    return isinstance(forward, types.MethodType) and forward.__func__ is _fused_norm_forward


def _is_norm_candidate(module: torch.nn.Module) -> bool:
    """An RMSNorm by name and attributes, not fused yet, with no instance-level forward of someone else's (hooks),
    whose forward takes one argument (not a gated norm's `forward(x, gate)`)."""
    weight, eps = getattr(module, "weight", None), _eps(module)
    if not (type(module).__name__.endswith("RMSNorm") and isinstance(weight, torch.Tensor) and weight.dim() == 1
            and isinstance(eps, (int, float)) and not isinstance(eps, bool) and "forward" not in module.__dict__):
        return False
    params = list(inspect.signature(type(module).forward).parameters.values())
    return len(params) == 2 and all(p.kind == p.POSITIONAL_OR_KEYWORD for p in params)


def _norm_matches(module: torch.nn.Module, dtype: torch.dtype, generator: torch.Generator, triton_dense) -> bool:
    """The kernel gives the module's own forward on rows of very different scales, in the model's dtype."""
    weight = module.weight
    scales = torch.tensor(_NORM_ROW_SCALES, device=weight.device)[:, None]  # [3, 1]
    x = (torch.randn(len(_NORM_ROW_SCALES), weight.shape[0], device=weight.device, generator=generator)
         * scales).to(dtype)  # [3, W]
    if not triton_dense.rms_norm_supported(x, weight):
        return False
    try:
        return _close(triton_dense.rms_norm(x, weight, float(_eps(module))), type(module).forward(module, x))
    except Exception:  # a kernel that cannot run here (compile error, odd module) means: leave the module alone
        return False


def _fused_norm_forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """The instance forward of a fused norm: the kernel where it applies, else the class's forward."""
    from .kernels import triton_dense

    if triton_dense.rms_norm_supported(hidden_states, self.weight):
        return triton_dense.rms_norm(hidden_states, self.weight, float(_eps(self)))
    return type(self).forward(self, hidden_states)


# -- rotary embedding --------------------------------------------------------------------------------------------

def _modeling_modules(model: torch.nn.Module) -> list[ModuleType]:
    """The Python modules of the model's classes that define a module-level apply_rotary_pos_emb."""
    names = sorted({type(module).__module__ for module in model.modules()})
    return [sys.modules[name] for name in names
            if name in sys.modules and callable(getattr(sys.modules[name], ROTARY_NAME, None))]


def _original_rotary(function: Any) -> Any:
    """The function a fused wrapper replaced, or None if `function` is not one."""
    return getattr(function, "_dense_fusion_original", None)


def _plain_function(rotary: Any) -> Any:
    """The Python function behind a module's apply_rotary_pos_emb: itself, or, for the nn.Module that the
    `kernels` package's `use_kernel_forward_from_hub` makes of a function, the function its forward falls back to
    when no hub kernel is active. None if neither (the rotary then stays unfused)."""
    if inspect.isfunction(rotary):
        return rotary
    if isinstance(rotary, torch.nn.Module):
        try:
            inner = inspect.getclosurevars(type(rotary).forward).nonlocals.get("func")
        except TypeError:
            return None
        return inner if inspect.isfunction(inner) else None
    return None


def _extra_parameters(function: Any) -> dict[str, Any] | None:
    """{name: default} of the parameters after (q, k, cos, sin): `unsqueeze_dim=1` in transformers 5.x, also
    `position_ids=None` in older 4.x. None if the signature is not (q, k, cos, sin, <defaulted>...)."""
    try:
        params = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if len(params) < 4 or any(p.kind not in positional or p.default is not p.empty for p in params[:4]):
        return None
    if any(p.kind not in positional or p.default is p.empty for p in params[4:]):
        return None
    return {p.name: p.default for p in params[4:]}


def _plain_unsqueeze_dim(extras: dict[str, Any], args: tuple, kwargs: dict[str, Any]) -> Any:
    """unsqueeze_dim of a call passing q, k, cos, sin positionally and nothing else but unsqueeze_dim (the rest at
    their defaults); None for any other call, which then goes to the original function."""
    if len(args) < 4 or len(args) - 4 > len(extras):
        return None
    given = dict(zip(extras, args[4:]))
    if set(kwargs) - set(extras) or set(kwargs) & set(given):
        return None
    given.update(kwargs)
    if any(name != "unsqueeze_dim" and value is not extras[name] for name, value in given.items()):
        return None
    return given.get("unsqueeze_dim", extras.get("unsqueeze_dim", 1))


def _rotary_wrapper(original: Any, plain: Any, extras: dict[str, Any], triton_dense) -> Any:
    """apply_rotary_pos_emb through the kernel for the calls it covers, through `original` for the others."""

    @functools.wraps(plain)  # name, doc and (through __wrapped__) signature of the plain function
    def apply_rotary_pos_emb(*args: Any, **kwargs: Any):
        unsqueeze_dim = _plain_unsqueeze_dim(extras, args, kwargs)
        if unsqueeze_dim is not None and triton_dense.rotary_supported(*args[:4], unsqueeze_dim):
            return triton_dense.apply_rotary(*args[:4], unsqueeze_dim)
        return original(*args, **kwargs)

    apply_rotary_pos_emb._dense_fusion_original = original
    return apply_rotary_pos_emb


def _rotary_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    """(q heads, kv heads, rotary dim) of the model's attention, for a check input shaped like the real ones."""
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(config, "num_attention_heads", None) or 4
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None) or heads * 64
    dim = getattr(config, "qk_rope_head_dim", None) or getattr(config, "head_dim", None) or hidden // heads
    return heads, kv_heads, dim


def _rotary_matches(original: Any, extras: dict[str, Any], shape: tuple[int, int, int], device: torch.device,
                    dtype: torch.dtype, generator: torch.Generator, triton_dense) -> bool:
    """The kernel gives `original(q, k, cos, sin[, unsqueeze_dim])` for every unsqueeze_dim the wrapper would
    take (1 and 2 when the function has the parameter, else only its own layout: 1)."""
    calls = ({u: functools.partial(original, unsqueeze_dim=u) for u in (1, 2)} if "unsqueeze_dim" in extras
             else {1: original})
    return all(_rotary_matches_at(call, u, shape, device, dtype, generator, triton_dense)
               for u, call in calls.items())


def _rotary_matches_at(original: Any, unsqueeze_dim: int, shape: tuple[int, int, int], device: torch.device,
                       dtype: torch.dtype, generator: torch.Generator, triton_dense) -> bool:
    """One layout: random q, k laid out as transformers' attention makes them (for unsqueeze_dim=1, transposed
    views of [B, T, H, D]), cos/sin with unrelated halves so that no RoPE symmetry hides a difference."""
    heads, kv_heads, dim = shape
    tokens = 3

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, device=device, generator=generator).to(dtype)

    q = randn(1, tokens, heads, dim)  # [1, T, Hq, D]
    k = randn(1, tokens, kv_heads, dim)  # [1, T, Hk, D]
    if unsqueeze_dim == 1:
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [1, H, T, D]
    cos, sin = randn(1, tokens, dim), randn(1, tokens, dim)  # [1, T, D]
    if not triton_dense.rotary_supported(q, k, cos, sin, unsqueeze_dim):
        return False
    try:
        expected = original(q, k, cos, sin)
        actual = triton_dense.apply_rotary(q, k, cos, sin, unsqueeze_dim)
    except Exception:  # another signature or a kernel that cannot run here: keep the original
        return False
    return (isinstance(expected, tuple) and len(expected) == 2
            and all(_close(a, e) for a, e in zip(actual, expected)))


def _fuse_rotary(modeling: ModuleType, shape: tuple[int, int, int], device: torch.device, dtype: torch.dtype,
                 generator: torch.Generator, triton_dense) -> str | None:
    """Replace `modeling.apply_rotary_pos_emb` by the kernel's wrapper if it passes the check (once).
    Returns why it was left alone, or None (fused now or before)."""
    original = getattr(modeling, ROTARY_NAME)
    if _original_rotary(original) is not None:
        return None
    plain = _plain_function(original)
    extras = None if plain is None else _extra_parameters(plain)
    if extras is None:
        return f"unrecognised {ROTARY_NAME} ({type(original).__name__}, not a (q, k, cos, sin, ...) function)"
    if not _rotary_matches(original, extras, shape, device, dtype, generator, triton_dense):
        return "the kernel's result differs from the original's on the check input"
    setattr(modeling, ROTARY_NAME, _rotary_wrapper(original, plain, extras, triton_dense))
    return None
