"""RMSNorm and rotary embedding as one Triton kernel each, rounding like transformers' eager torch code.

Why: even replayed as a CUDA graph, a greedy decode step of a small Qwen3-MoE model spent far more time in
transformers' dense ops than in the MoE kernels, because they run as tiny separate kernels (a few us each): an
RMSNorm is ~8 kernels (to float32, pow, mean, add eps, rsqrt, mul, cast, weight mul) and a layer's rotary
embedding ~10 (q*cos, neg, cat, *sin, add, for q and k). One launch each removes ~450 launches per step of a
12-layer model (49 RMSNorms, 12 rotary embeddings).

Rounding: the kernels compute in float32 but round every intermediate that torch materialises in the input
dtype, so half-precision results equal transformers' bit for bit up to the float32 reduction order of the
RMSNorm mean (an ulp, rarely). fp fusion (FMA contraction) is off for the same reason: torch runs the
multiplies and adds as separate kernels.

dense_fusion.py decides where these replace transformers' code, after checking equivalence on the model.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _round(x, dtype: tl.constexpr):
    """float32 x rounded to `dtype` and back: where torch materialises a tensor in the input dtype."""
    return x.to(dtype).to(tl.float32)


@triton.jit
def _rms_norm_kernel(x_ptr, weight_ptr, out_ptr, x_row_stride, eps,
                     WIDTH: tl.constexpr, BLOCK: tl.constexpr):
    """One row: out = weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype), as transformers' Llama-style RMSNorm."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)  # [BLOCK]
    mask = offs < WIDTH
    x = tl.load(x_ptr + row * x_row_stride + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK]
    # torch's CUDA mean multiplies the sum by 1/WIDTH
    inv_rms = tl.math.rsqrt(tl.sum(x * x, axis=0) * (1.0 / WIDTH) + eps)
    normed = _round(x * inv_rms, x_ptr.dtype.element_ty)  # hidden_states.to(input_dtype)
    weight = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK]
    tl.store(out_ptr + row * WIDTH + offs, (weight * normed).to(out_ptr.dtype.element_ty), mask=mask)


COMPILED = isinstance(_rms_norm_kernel, JITFunction)  # False in Triton's interpreter


def runs_on(tensor: torch.Tensor) -> bool:
    """Whether the kernels can take this tensor: CUDA ones, or CPU ones in Triton's interpreter
    (TRITON_INTERPRET=1 when triton was first imported, as in the CPU tests)."""
    return tensor.device.type == ("cuda" if COMPILED else "cpu")


def rms_norm_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether rms_norm(x, weight, eps) runs here: float16/bfloat16/float32, one device Triton runs on, no
    autograd (the kernel has no backward)."""
    return (x.dtype in DTYPES and weight.dtype in DTYPES and weight.dim() == 1 and x.dim() >= 1
            and x.shape[-1] == weight.shape[0] and x.numel() > 0 and x.device == weight.device and runs_on(x)
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`weight * (x.float() * rsqrt(mean(x.float()^2, -1) + eps)).to(x.dtype)` over the last dim of x [..., W].

    The result has torch's promoted dtype of weight and x (bf16 * bf16 -> bf16, fp32 weight * bf16 -> fp32).
    """
    width = x.shape[-1]
    rows = x.reshape(-1, width)  # [R, W]: a view unless x's leading dims cannot be flattened
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)  # [..., W]
    block = triton.next_power_of_2(width)
    _rms_norm_kernel[(rows.shape[0],)](rows, weight.contiguous(), out, rows.stride(0), eps, WIDTH=width,
                                       BLOCK=block, num_warps=max(1, min(16, block // 256)),
                                       enable_fp_fusion=False)
    return out


@triton.jit
def _rotate_row(src, dst, c1, c2, s1, s2, offs, mask, HALF: tl.constexpr):
    """One head of one token: dst = src * cos + rotate_half(src) * sin, each product rounded as in torch.

    rotate_half(x) = cat(-x2, x1) for halves x1, x2, so the first half is x1*c1 - x2*s1, the second x2*c2 + x1*s2.
    """
    dtype: tl.constexpr = dst.dtype.element_ty
    x1 = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK]
    x2 = tl.load(src + HALF + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK]
    out1 = _round(x1 * c1, dtype) - _round(x2 * s1, dtype)
    out2 = _round(x2 * c2, dtype) + _round(x1 * s2, dtype)
    tl.store(dst + offs, out1.to(dtype), mask=mask)
    tl.store(dst + HALF + offs, out2.to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(q, k, cos, sin, q_out, k_out,
                   q_sb, q_sh, q_st, k_sb, k_sh, k_st, qo_sb, qo_sh, qo_st, ko_sb, ko_sh, ko_st,
                   cs_sb, cs_st, tokens, q_heads, HALF: tl.constexpr, BLOCK: tl.constexpr):
    """Program (b * T + t, head): heads [0, Hq) are q's, [Hq, Hq + Hk) k's. Strides are in elements; the
    head dim is contiguous everywhere."""
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    b = row // tokens
    t = row % tokens
    offs = tl.arange(0, BLOCK)  # [BLOCK]
    mask = offs < HALF
    cs = b * cs_sb + t * cs_st + offs  # [BLOCK]
    c1 = tl.load(cos + cs, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos + HALF + cs, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin + cs, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin + HALF + cs, mask=mask, other=0.0).to(tl.float32)
    if head < q_heads:
        _rotate_row(q + b * q_sb + head * q_sh + t * q_st, q_out + b * qo_sb + head * qo_sh + t * qo_st,
                    c1, c2, s1, s2, offs, mask, HALF)
    else:
        kh = head - q_heads
        _rotate_row(k + b * k_sb + kh * k_sh + t * k_st, k_out + b * ko_sb + kh * ko_sh + t * ko_st,
                    c1, c2, s1, s2, offs, mask, HALF)


def rotary_supported(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     unsqueeze_dim: int) -> bool:
    """Whether apply_rotary covers this call of transformers' apply_rotary_pos_emb: q [B, Hq, T, D] and
    k [B, Hk, T, D] (unsqueeze_dim=1) or [B, T, H, D] (2), cos and sin [B or 1, T, D], one dtype, even D, no
    autograd. Anything else (partial rotary, 2-D cos, mixed dtypes) keeps the original function."""
    if unsqueeze_dim not in (1, 2) or q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.shape != cos.shape:
        return False
    token_dim = 3 - unsqueeze_dim
    batch, tokens, dim = q.shape[0], q.shape[token_dim], q.shape[-1]
    return (dim % 2 == 0 and dim > 0 and k.shape[0] == batch and k.shape[token_dim] == tokens
            and k.shape[-1] == dim and cos.shape[0] in (1, batch) and cos.shape[1:] == (tokens, dim)
            and q.numel() > 0 and k.numel() > 0
            and q.dtype in DTYPES and k.dtype == cos.dtype == sin.dtype == q.dtype
            and q.device == k.device == cos.device == sin.device and runs_on(q)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, cos, sin))))


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim) in one launch (see rotary_supported).

    Outputs keep the inputs' memory layout (q is usually a transposed view of the projection's output).
    """
    if unsqueeze_dim == 2:  # [B, T, H, D]: the same kernel on [B, H, T, D] views
        q_out, k_out = apply_rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin, 1)
        return q_out.transpose(1, 2), k_out.transpose(1, 2)
    batch, q_heads, tokens, dim = q.shape
    q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))  # [B, H, T, D]
    cos, sin = cos.expand(batch, tokens, dim), sin.expand(batch, tokens, dim)  # [B, T, D], batch stride 0 if 1
    if cos.stride() != sin.stride() or cos.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)  # same strides where q, k are dense
    grid = (batch * tokens, q_heads + k.shape[1])
    _rotary_kernel[grid](q, k, cos, sin, q_out, k_out,
                         q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                         q_out.stride(0), q_out.stride(1), q_out.stride(2),
                         k_out.stride(0), k_out.stride(1), k_out.stride(2),
                         cos.stride(0), cos.stride(1), tokens, q_heads,
                         HALF=dim // 2, BLOCK=triton.next_power_of_2(dim // 2), num_warps=1,
                         enable_fp_fusion=False)
    return q_out, k_out


@triton.jit
def _embedding_kernel(ids_ptr, weight_ptr, out_ptr, width, BLOCK: tl.constexpr):
    """out[t, block] = weight[ids[t], block]; weight may be pinned host memory, read in place over PCIe."""
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    mask = offs < width
    row = tl.load(ids_ptr + token).to(tl.int64)
    tl.store(out_ptr + token * width + offs, tl.load(weight_ptr + row * width + offs, mask=mask), mask=mask)


def embedding(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """weight[ids] ([..., W], on ids' device) for a contiguous weight [V, W] that may live in page-locked, mapped
    host memory (tiers.pin_in_place): each token reads one row across PCIe."""
    flat = ids.reshape(-1).contiguous()  # [T]
    width = weight.shape[1]
    out = torch.empty((flat.numel(), width), dtype=weight.dtype, device=ids.device)  # [T, W]
    if flat.numel():
        block = min(1024, triton.next_power_of_2(width))
        _embedding_kernel[(flat.numel(), triton.cdiv(width, block))](flat, weight, out, width, BLOCK=block)
    return out.view(*ids.shape, width)
