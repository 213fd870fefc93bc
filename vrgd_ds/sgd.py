"""VR-SGD: VRGD in front of torch.optim.SGD (momentum, dampening, nesterov, weight decay)."""

from __future__ import annotations

from .optimizer import VROptimizer, _check_range, step_counts
from .update_rules import sgd_update

__all__ = ["VRSGD"]


class VRSGD(VROptimizer):
    r"""SGD with GSNR-scaled gradients (VRGD, arXiv 2309.13681, eq. 10).

    .. math::
        \begin{aligned}
        g' &= r \odot G \quad (\hat p \odot G \text{ with } \texttt{gsnr\_beta}) \\
        d &= g' + \lambda\theta;\quad b = \mu b + (1-\tau) d \ (b = d \text{ at first});\quad
        d = d + \mu b \text{ (nesterov) or } b \\
        \theta &\leftarrow \theta - \mathrm{lr}\cdot d
        \end{aligned}

    Args:
        params: parameters, parameter groups, or named parameters.
        lr (float or Tensor): learning rate (default: 1e-3, as torch.optim.SGD).
        momentum (float): μ (default: 0).
        dampening (float): τ (default: 0).
        weight_decay (float): λ, L2 added to the gradient (default: 0).
        nesterov (bool): Nesterov momentum (default: False).
        gamma, gsnr_beta (default: None), gsnr_eps, vr, ...: see :class:`VROptimizer`.
    """

    _exclude_1d_overrides = {"weight_decay": 0.0}

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        gamma: float = 0.1,
        gsnr_beta: float | None = None,
        gsnr_eps: float = 1e-6,
        vr: bool = True,
        **kwargs,
    ):
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            gamma=gamma,
            gsnr_beta=gsnr_beta,
            gsnr_eps=gsnr_eps,
        )
        super().__init__(params, defaults, vr=vr, **kwargs)

    def _validate_group(self, group):
        _check_range("momentum", group["momentum"], 0.0, float("inf"))
        _check_range("dampening", group["dampening"], 0.0, 1.0)
        _check_range("weight_decay", group["weight_decay"], 0.0, float("inf"))
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("Nesterov momentum requires a momentum > 0 and zero dampening.")

    def _init_state(self, p, state, group):
        state["step"] = 0

    def _base_update(self, p, grad, state, group, layout, workspace=None):
        hp = dict(
            lr=group["lr"],
            momentum=group["momentum"],
            dampening=group["dampening"],
            weight_decay=group["weight_decay"],
            nesterov=group["nesterov"],
        )
        sgd_update(p, grad, state, step_counts(state), layout, workspace=workspace, **hp)
