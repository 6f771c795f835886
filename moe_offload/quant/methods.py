"""Choosing each group's scale (and zero point): the one decision a weight-only quantizer makes.

- `rtn`: round to nearest over the group's full range, as compressed-tensors' min-max observer sets it:
  symmetric scale = max|w| / ((qmax - qmin) / 2) (7.5 at 4 bits, 127.5 at 8), asymmetric scale =
  (max - min) / (qmax - qmin) with the range widened to hold 0, zero = round(qmin - min / scale).
- `mse`: the same with the range shrunk by a ratio, per group the ratio of CLIP_RATIOS whose reconstruction
  error sum((dequantized - w)^2) is smallest: clipping a few outliers buys a finer step for the rest of the
  group (the grid search of AWQ's clipping and HQQ-style methods, here on the weights alone, no calibration).

Scales are rounded to the weight's dtype before q is computed (the checkpoint stores them so), and a zero
scale (an all-zero group) becomes that dtype's eps, as compressed-tensors does.
"""

from __future__ import annotations

import torch

from .format import QuantSpec, encode

METHODS = ("rtn", "mse")
CLIP_RATIOS = tuple(1.0 - i / 40 for i in range(21))  # 1.0, 0.975, ..., 0.5
SEARCH_ROWS = 256  # rows of a weight whose scales mse searches at a time (choose_qparams)


def _qparams(low: torch.Tensor, high: torch.Tensor, spec: QuantSpec, dtype: torch.dtype):
    """Scale [N, G] (in `dtype`) and zero [N, G] (int8, or None) for group ranges low <= 0 <= high (float32)."""
    if spec.symmetric:
        scale = (torch.maximum(-low, high) / ((spec.qmax - spec.qmin) / 2)).to(dtype)
    else:
        scale = ((high - low) / (spec.qmax - spec.qmin)).to(dtype)
    scale = torch.where(scale == 0, torch.tensor(torch.finfo(dtype).eps, dtype=dtype), scale)
    if spec.symmetric:
        return scale, None
    zero = torch.round(spec.qmin - low / scale.float()).clamp(spec.qmin, spec.qmax).to(torch.int8)
    return scale, zero


def _group_ranges(weight: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out_features, in_features = weight.shape
    grouped = weight.float().view(out_features, spec.groups(in_features), spec.group_of(in_features))  # [N, G, g]
    low = grouped.amin(dim=-1).clamp(max=0)  # [N, G]: 0 must stay representable
    high = grouped.amax(dim=-1).clamp(min=0)
    return grouped, low, high


def group_error(grouped, scale, zero, spec: QuantSpec) -> torch.Tensor:
    """sum over each group of (dequantized - w)^2 [N, G], accumulated in float64 so that near-ties do not
    depend on the order of a float32 sum."""
    step = scale.float().unsqueeze(-1)  # [N, G, 1]
    q = torch.round(grouped / step)  # [N, G, g]
    if zero is None:
        q.clamp_(spec.qmin, spec.qmax)
    else:
        offset = zero.float().unsqueeze(-1)
        q.add_(offset).clamp_(spec.qmin, spec.qmax).sub_(offset)
    return q.mul_(step).sub_(grouped).square_().sum(dim=-1, dtype=torch.float64)


def choose_qparams(weight: torch.Tensor, spec: QuantSpec, method: str):
    """Scale [N, G] in the weight's dtype and zero [N, G] int8 (None when symmetric) for `weight` [N, K]."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}")
    if method == "rtn" or weight.shape[0] <= SEARCH_ROWS:
        return _choose(weight, spec, method)
    # Each row's groups are chosen on their own, so blocks of rows give the same scales; a block's float32
    # temporaries, made 21 times over, stay in the CPU's caches (a whole 768 x 2048 matrix at once ran ~7x slower)
    blocks = [_choose(weight[start:start + SEARCH_ROWS], spec, method)
              for start in range(0, weight.shape[0], SEARCH_ROWS)]
    zero = None if blocks[0][1] is None else torch.cat([zero for _, zero in blocks])
    return torch.cat([scale for scale, _ in blocks]), zero


def _choose(weight: torch.Tensor, spec: QuantSpec, method: str):
    dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    grouped, low, high = _group_ranges(weight, spec)
    scale, zero = _qparams(low, high, spec, dtype)
    if method == "rtn":
        return scale, zero
    best = group_error(grouped, scale, zero, spec)  # [N, G]; ratio 1.0 first, so ties keep the full range
    for ratio in CLIP_RATIOS[1:]:
        cand_scale, cand_zero = _qparams(low * ratio, high * ratio, spec, dtype)
        err = group_error(grouped, cand_scale, cand_zero, spec)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, cand_scale, scale)
        if zero is not None:
            zero = torch.where(better, cand_zero, zero)
    return scale, zero


def quantize_weight(weight: torch.Tensor, spec: QuantSpec, method: str = "rtn") -> dict:
    """`weight` [N, K] -> its compressed-tensors tensors (weight_packed, weight_scale, [weight_zero_point,]
    weight_shape), the scales chosen by `method`."""
    scale, zero = choose_qparams(weight, spec, method)
    return encode(weight, scale, zero, spec)
