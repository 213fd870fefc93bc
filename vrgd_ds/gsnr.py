"""Gradient signal-to-noise ratio (GSNR): the pure math of VRGD, on tensors.

Everything here runs in one process on plain tensors; the optimizers, the plain-PyTorch
collector and the DeepSpeed glue only decide *which* tensors these functions see.
Equation numbers refer to arXiv 2309.13681; choices the paper leaves open follow
``VRGD.md`` (the project's math reference).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["gsnr_from_moments", "normalize_and_clip", "update_gsnr_momentum"]


def gsnr_from_moments(grad_sum: Tensor, grad_sq_sum: Tensor, num_samples: int | float, eps: float,
                      sum_scale: float = 1.0) -> Tensor:
    r"""Element-wise GSNR from the first two raw moments of k gradient samples (paper eq. 2, 7).

    .. math::
        \mu_j = \tfrac1k \textstyle\sum_s g_{s,j},\quad
        q_j = \tfrac1k \textstyle\sum_s g_{s,j}^2,\quad
        r_j = \frac{\mu_j^2}{\max(q_j - \mu_j^2,\ \epsilon q_j)},\qquad r_j = 0 \text{ where } q_j = 0.

    The variance is the biased 1/k estimator, as in the paper. ``eps`` is a *relative* floor
    (VRGD.md §1): it caps r at 1/eps and keeps r invariant to any common scale of the samples
    (loss scale, 1/gas, 1/world size), so callers may pass moments of scaled samples.
    Computed as r = S² / max(k·Q − S², ε·k·Q) with S = Σg, Q = Σg² (the same quantity
    multiplied through by k², in fewer passes over memory); a non-finite sample gives a
    non-finite r.

    Args:
        grad_sum: Σ_s g_s (any shape; promoted to fp32), or Σ_s g_s / ``sum_scale``.
        grad_sq_sum: Σ_s g_s² (same shape).
        num_samples: k, the number of gradient samples summed.
        eps: relative variance floor (``gsnr_eps``), > 0.
        sum_scale: Σ_s g_s = sum_scale · grad_sum (e.g. the world size, for an averaged gradient).
    Returns:
        r in fp32, same shape as the inputs.
    """
    numerator = grad_sum.float().square()
    denominator = grad_sq_sum.float() * (num_samples / (sum_scale * sum_scale))
    floor = denominator * eps
    # Rounding can make k·Q − S² slightly negative (or zero for identical samples): the
    # relative floor keeps r finite and scale-invariant there; where Q = 0, S = 0 and 0/tiny = 0.
    denominator.sub_(numerator)
    torch.maximum(denominator, floor, out=denominator)
    denominator.clamp_(min=torch.finfo(torch.float32).tiny)
    return numerator.div_(denominator)


def normalize_and_clip(gsnr: Tensor, layer_mean: Tensor, gamma: float) -> Tensor:
    r"""Per-tensor normalization then clipping to [γ, 1] (paper eq. 8, 9).

    .. math:: r_j \leftarrow \min\!\big(\max(r_j / m,\ \gamma),\ 1\big),\qquad m = \tfrac1J \textstyle\sum_{i\in\theta} r_i

    ``layer_mean`` is m, either a scalar tensor or one value per element (a flat ZeRO shard
    holding pieces of several tensors). Where m = 0 no element of the tensor has signal and the
    result is γ everywhere (VRGD.md §2): r/1 = 0 clamps to γ.
    """
    safe_mean = torch.where(layer_mean > 0, layer_mean, torch.ones_like(layer_mean))
    return (gsnr / safe_mean).clamp_(min=gamma, max=1.0)


def update_gsnr_momentum(momentum: Tensor, gsnr: Tensor, beta: float, step: int) -> Tensor:
    r"""GSNR momentum with bias correction (VRGD.md §3), updating ``momentum`` in place.

    .. math:: p_t = \beta_3 p_{t-1} + (1-\beta_3)\, r_t,\qquad \hat p_t = p_t / (1 - \beta_3^t)

    Returns p̂_t (a new tensor). ``step`` is t ≥ 1, the optimizer's step count for the tensor.
    """
    momentum.mul_(beta).add_(gsnr, alpha=1.0 - beta)
    return momentum / (1.0 - beta**step)
