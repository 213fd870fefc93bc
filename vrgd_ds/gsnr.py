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


def gsnr_from_moments(
    grad_sum: Tensor,
    grad_sq_sum: Tensor,
    num_samples: int | float,
    eps: float,
    sum_scale: float = 1.0,
    out: Tensor | None = None,
) -> Tensor:
    r"""Element-wise GSNR from the first two raw moments of k gradient samples (paper eq. 2, 7).

    .. math::
        \mu_j = \tfrac1k \textstyle\sum_s g_{s,j},\quad
        q_j = \tfrac1k \textstyle\sum_s g_{s,j}^2,\quad
        r_j = \frac{\mu_j^2}{\max(q_j - \mu_j^2,\ \epsilon q_j)}
            = \frac{u_j}{\max(1 - u_j,\ \epsilon)},\quad u_j = \frac{\mu_j^2}{q_j},
        \qquad r_j = 0 \text{ where } q_j = 0.

    The variance is the biased 1/k estimator, as in the paper. ``eps`` is a *relative* floor
    (VRGD.md §1): it caps r near 1/eps and keeps r invariant to any common scale of the samples
    (loss scale, 1/gas, 1/world size), so callers may pass moments of scaled samples.

    Computed in ``out`` with no full-size temporary (this runs on every element of the model every
    step; six passes over memory): with c = sum_scale²/k and y = Q/S'² (S' = ``grad_sum``, so
    u = c/y), r = c / max(y − c, c·ε/(1−ε)). That is u/max(1−u, ε) exactly where the floor is not
    active; where it is (u ≥ 1−ε: all samples nearly equal), r = (1−ε)/ε instead of u/ε, a
    relative difference ≤ ε. u ≤ 1 by Cauchy–Schwarz; rounding above 1 also lands on the cap.
    S = 0 gives y = ∞, r = 0; Q = 0 (then S = 0) gives r = 0; a non-finite sample gives a
    non-finite r. Near the cap fp32 cancellation in 1 − u limits r's precision (as in any fp32
    form of the variance); the relative error is ~1e-7 where r ≪ 1/ε.

    Args:
        grad_sum: Σ_s g_s (any shape; promoted to fp32), or Σ_s g_s / ``sum_scale``.
        grad_sq_sum: Σ_s g_s² (same shape).
        num_samples: k, the number of gradient samples summed.
        eps: relative variance floor (``gsnr_eps``), 0 < eps < 1.
        sum_scale: Σ_s g_s = sum_scale · grad_sum (e.g. the world size, for an averaged gradient).
        out: fp32 tensor to write r into; may be ``grad_sq_sum`` itself (then it is consumed).
            Default: a new tensor.
    Returns:
        r in fp32, same shape as the inputs (``out`` when given).
    """
    c = (sum_scale * sum_scale) / num_samples
    floor = c * eps / (1.0 - eps)
    tiny = torch.finfo(torch.float32).tiny
    if out is None:
        out = torch.empty(grad_sq_sum.shape, dtype=torch.float32, device=grad_sq_sum.device)
    c_t = torch.full((), c, dtype=torch.float32, device=out.device)  # c / x: one rounding, one pass
    s = grad_sum.float()
    # y = Q / S²; Q is floored at the smallest normal so that Q = S = 0 gives y = tiny/0 = ∞.
    torch.clamp(grad_sq_sum, min=tiny, out=out)
    # y − c = c·(1 − u)/u: the relative variance floor is a clamp of it; then r = c / (y − c).
    return torch.div(c_t, out.div_(s).div_(s).sub_(c).clamp_(min=floor), out=out)


def normalize_and_clip(
    gsnr: Tensor, layer_mean: Tensor, gamma: float, layout=None, out: Tensor | None = None
) -> Tensor:
    r"""Per-tensor normalization then clipping to [γ, 1] (paper eq. 8, 9).

    .. math:: r_j \leftarrow \min\!\big(\max(r_j / m,\ \gamma),\ 1\big),\qquad
              m = \tfrac1J \textstyle\sum_{i\in\theta} r_i

    ``layer_mean`` is m: a scalar tensor, one value per element, or — with ``layout`` (a
    :class:`~vrgd_ds.segments.SegmentLayout` of a flat ZeRO shard holding pieces of several
    tensors) — one value per parameter tensor of the layout. Where m = 0 no element of the tensor
    has signal and the result is γ everywhere (VRGD.md §2): r/1 = 0 clamps to γ.
    ``out`` may be ``gsnr`` itself (in place; what the optimizer does); default: a new tensor.
    With ``layout``, each parameter tensor's elements are divided by its m in one op per piece
    (one per run of small pieces), then all are clamped in one pass.
    """
    safe_mean = torch.where(layer_mean > 0, layer_mean, torch.ones_like(layer_mean))
    if layout is None:
        if out is None:
            return (gsnr / safe_mean).clamp_(min=gamma, max=1.0)
        return torch.div(gsnr, safe_mean, out=out).clamp_(min=gamma, max=1.0)
    if out is None:
        out = gsnr.clone()
    elif out is not gsnr:
        out.copy_(gsnr)
    return layout.scale_(out, safe_mean, divide=True).clamp_(min=gamma, max=1.0)


def update_gsnr_momentum(
    momentum: Tensor, gsnr: Tensor, beta: float, step, out: Tensor | None = None, layout=None
) -> Tensor:
    r"""GSNR momentum with bias correction (VRGD.md §3), updating ``momentum`` in place.

    .. math:: p_t = \beta_3 p_{t-1} + (1-\beta_3)\, r_t,\qquad \hat p_t = p_t / (1 - \beta_3^t)

    Returns p̂_t, written into ``out`` (which may be ``gsnr``: r_t is no longer needed) or, by
    default, a new tensor. ``step`` is t ≥ 1, the optimizer's step count for the tensor — or,
    with ``layout`` (a flat ZeRO shard), a tensor of one t per parameter tensor of the layout
    (tensors of a shard that missed steps have their own t).
    """
    momentum.lerp_(gsnr, 1.0 - beta)
    if not torch.is_tensor(step):
        if out is None:
            return momentum / (1.0 - beta**step)
        return torch.mul(momentum, 1.0 / (1.0 - beta**step), out=out)
    correction = 1.0 - torch.pow(beta, step.to(momentum.device))
    if out is None:
        return layout.scale_(momentum.clone(), correction, divide=True)
    # p / (1 − β^t) written straight into ``out``, tensor by tensor (padding keeps out's values).
    return layout.scale_(out, correction, divide=True, src=momentum)
