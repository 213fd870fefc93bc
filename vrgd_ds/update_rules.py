"""The four base update rules (VRGD.md §3) as functions on one tensor the optimizer updates.

``grad`` is the gradient *after* GSNR scaling (g' in VRGD.md). Each rule updates ``param``
and its state tensors in place. LAMB and LARS need per-parameter-tensor norms: they take a
:class:`~vrgd_ds.segments.SegmentLayout`, so the same code is correct on a whole tensor and on
a flat ZeRO shard. The rules that depend on the step count t take it as an int, or as one t per
parameter tensor of the layout (tensors of a flat shard that missed steps). SGD and Adam mirror
torch.optim's single-tensor kernels operation for operation so that ``vr=False`` reproduces them.

``workspace`` (every rule): a tensor of ``param``'s shape the rule may overwrite, for what
torch.optim would allocate each step (√v, the LAMB direction u, g' + λθ): ``grad`` itself where
the caller no longer needs it (the optimizer's GSNR-scaled gradient, a buffer of this step's
moments), or a buffer kept across steps; ``None`` allocates as torch.optim does. On the host a
fresh full-size allocation costs more than the arithmetic on it (page faults), and ZeRO-Offload
runs these rules there.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .segments import SegmentLayout

__all__ = ["sgd_update", "adam_update", "lamb_update", "lamb_adapts", "lars_update"]


def sgd_update(
    param: Tensor,
    grad: Tensor,
    state: dict,
    step: int | Tensor,
    layout: SegmentLayout,
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    workspace: Tensor | None = None,
) -> None:
    r"""torch.optim.SGD: d = g' + λθ; b = μb + (1−τ)d (b = d at first); d = d + μb or b; θ −= lr·d.

    ``step`` is t (an int), or one t per parameter tensor of ``layout`` (a flat shard whose
    tensors took different numbers of steps): a tensor at its first step gets b = d even when
    the shard's buffer exists (its elements of b are 0 until then, see :class:`HeldElements`).
    """
    if weight_decay != 0:
        grad = torch.add(grad, param, alpha=weight_decay, out=workspace)
    if momentum != 0:
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = torch.clone(grad).detach()
            state["momentum_buffer"] = buf
        elif torch.is_tensor(step) and dampening != 0 and bool((step <= 1).any()):
            first = (step <= 1).to(grad.dtype)
            coefficient = first + (1 - first) * (1 - dampening)  # 1 at a tensor's first step, else 1 − τ
            layout.add_scaled_(buf.mul_(momentum), grad, coefficient)
        else:
            buf.mul_(momentum).add_(grad, alpha=1 - dampening)
        grad = torch.add(grad, buf, alpha=momentum, out=workspace) if nesterov else buf
    param.add_(grad, alpha=-lr)


def adam_update(
    param: Tensor,
    grad: Tensor,
    state: dict,
    step: int | Tensor,
    layout: SegmentLayout,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    workspace: Tensor | None = None,
    amsgrad: bool = False,
) -> None:
    r"""torch.optim.Adam / AdamW (``decoupled_weight_decay``, ``amsgrad``), the same operations in the same order.

    AdamW: θ ← θ(1 − lr·λ); Adam: g' ← g' + λθ. Then m = β1 m + (1−β1) g',
    v = β2 v + (1−β2) g'², θ ← θ − lr · m̂ / (√v̂ + ε); with ``amsgrad`` v̂ uses
    v_max = max(v_max, v) (``state["max_exp_avg_sq"]``, created here if absent).
    ``step`` is t (an int), or one t per parameter tensor of ``layout``: then each tensor's
    bias corrections use its own t.
    """
    if weight_decay != 0:
        if decoupled_weight_decay:
            param.mul_(1 - lr * weight_decay)
        else:
            grad = torch.add(grad, param, alpha=weight_decay, out=workspace)
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    if amsgrad:
        max_exp_avg_sq = state.get("max_exp_avg_sq")
        if max_exp_avg_sq is None:
            max_exp_avg_sq = state["max_exp_avg_sq"] = torch.zeros_like(exp_avg_sq)
        exp_avg_sq = torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
    # √v in the workspace: g' (+ λθ) is not read after the moments.
    denom = torch.sqrt(exp_avg_sq, out=workspace)
    if torch.is_tensor(step):
        step = step.double().to(param.device)
        layout.scale_(denom, (1 - torch.pow(beta2, step)).sqrt_(), divide=True).add_(eps)
        # θ −= (lr/(1 − β1^t)) · m/denom, tensor by tensor, in one pass.
        layout.add_scaled_(param, torch.div(exp_avg, denom, out=denom), lr / (1 - torch.pow(beta1, step)), alpha=-1.0)
        return
    step_size = lr / (1 - beta1**step)
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    # torch.optim's (√v / √(1 − β2^t)) + ε, the same operations, in place.
    param.addcdiv_(exp_avg, denom.div_(bias_correction2_sqrt).add_(eps), value=-step_size)


def _trust_ratio(param_norm: Tensor, update_norm: Tensor, min_ratio, max_ratio) -> Tensor:
    ratio = torch.where(
        (param_norm > 0) & (update_norm > 0),
        param_norm / torch.where(update_norm > 0, update_norm, torch.ones_like(update_norm)),
        torch.ones_like(param_norm),
    )
    if min_ratio is not None or max_ratio is not None:
        ratio = ratio.clamp(min=min_ratio, max=max_ratio)
    return ratio


def lamb_adapts(weight_decay: float, trust_ratio: bool, use_nvlamb: bool) -> bool:
    """Whether LAMB applies its trust ratio to the tensors of a parameter group.

    ``use_nvlamb=False`` is apex ``FusedLAMB``'s default (and timm ``Lamb(always_adapt=False)``):
    only groups with weight_decay ≠ 0 are adapted, so a no-decay group (biases, LayerNorm) takes
    a plain ``lr · u`` step. ``use_nvlamb=True`` (NVLAMB, the LAMB paper's algorithm) adapts
    every group. ``trust_ratio=False`` turns the ratio off regardless. A group-level decision,
    so it is the same for a whole tensor and for a flat ZeRO shard of the group.
    """
    return trust_ratio and (use_nvlamb or weight_decay != 0)


def lamb_update(
    param: Tensor,
    grad: Tensor,
    state: dict,
    step: int,
    layout: SegmentLayout,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    bias_correction: bool,
    trust_ratio: bool,
    min_trust_ratio: float | None,
    max_trust_ratio: float | None,
    use_nvlamb: bool = True,
    workspace: Tensor | None = None,
) -> None:
    r"""LAMB (You et al. 2019), trust ratio per parameter tensor.

    m = β1 m + (1−β1) g';  v = β2 v + (1−β2) g'²;  u = m̂/(√v̂ + ε) + λθ;
    θ ← θ − lr · (‖θ‖/‖u‖) · u, the ratio 1 where either norm is 0, optionally clamped.
    The ratio is 1 (an AdamW-like step) with ``trust_ratio=False``, and with
    ``use_nvlamb=False`` where ``weight_decay == 0`` (apex FusedLAMB; :func:`lamb_adapts`).
    ``step`` is t, or a tensor of one t per parameter tensor of ``layout``.

    With one t, the bias corrections are folded into two scalars (one pass fewer),
    m̂/(√v̂ + ε) = (√(1−β2^t)/(1−β1^t)) · m/(√v + ε√(1−β2^t)); u lives in ``workspace`` (or a
    new tensor). The step θ ← θ − lr·ratio·u is one ``addcmul_`` per tensor.
    """
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    per_tensor_steps = bias_correction and torch.is_tensor(step)  # one t per tensor of a flat shard
    if bias_correction and not per_tensor_steps:
        root_bc2 = (1 - beta2**step) ** 0.5
        eps_scaled, factor = eps * root_bc2, root_bc2 / (1 - beta1**step)
    else:
        eps_scaled, factor = eps, 1.0
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    # ``update`` may be ``grad`` itself: g' is not read after the moments.
    update = torch.sqrt(exp_avg_sq, out=workspace)
    if not per_tensor_steps:
        torch.div(exp_avg, update.add_(eps_scaled), out=update)
        if factor != 1.0:
            update.mul_(factor)
        if weight_decay != 0:
            update.add_(param, alpha=weight_decay)
    else:
        step = step.to(update.device)
        layout.scale_(update, (1 - torch.pow(beta2, step)).sqrt_(), divide=True).add_(eps)
        layout.scale_(torch.div(exp_avg, update, out=update), 1 - torch.pow(beta1, step), divide=True)
        if weight_decay != 0:
            update.add_(param, alpha=weight_decay)
    if lamb_adapts(weight_decay, trust_ratio, use_nvlamb):
        norms = layout.tensor_norms([param, update])
        ratio = _trust_ratio(norms[0], norms[1], min_trust_ratio, max_trust_ratio)
        layout.add_scaled_(param, update, ratio, alpha=-lr)
    else:
        param.add_(update, alpha=-lr)


def lars_update(
    param: Tensor,
    grad: Tensor,
    state: dict,
    layout: SegmentLayout,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    trust_coefficient: float,
    eps: float,
    nesterov: bool,
    trust_ratio: bool,
    workspace: Tensor | None = None,
) -> None:
    r"""LARS (You et al. 2017), local LR per parameter tensor.

    d = g' + λθ;  if ‖θ‖>0 and ‖g'‖>0: d ← d · η‖θ‖ / (‖g'‖ + λ‖θ‖ + ε);
    b = d at first, else μb + d;  θ ← θ − lr·b  (nesterov: θ ← θ − lr(d + μb)).
    ``trust_ratio=False`` (biases, norms excluded via a param group) skips the local LR.
    """
    if trust_ratio:
        norms = layout.tensor_norms([param, grad])
        param_norm, grad_norm = norms[0], norms[1]
        local_lr = torch.where(
            (param_norm > 0) & (grad_norm > 0),
            trust_coefficient * param_norm / (grad_norm + weight_decay * param_norm + eps),
            torch.ones_like(param_norm),
        )
    if weight_decay != 0:
        d = torch.add(grad, param, alpha=weight_decay, out=workspace)
    elif workspace is None:
        d = grad.clone()
    else:
        d = workspace if workspace is grad else workspace.copy_(grad)
    if trust_ratio:
        layout.scale_(d, local_lr)
    if momentum != 0:
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = d.clone()
            state["momentum_buffer"] = buf
        else:
            buf.mul_(momentum).add_(d)
        d = torch.add(d, buf, alpha=momentum, out=workspace) if nesterov else buf
    param.add_(d, alpha=-lr)
