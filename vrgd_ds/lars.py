"""VR-LARS: VRGD in front of LARS, with the local LR per parameter tensor (also under ZeRO)."""

from __future__ import annotations

from torch.optim.optimizer import required

from .optimizer import VROptimizer, _check_range, flat_workspace
from .update_rules import lars_update

__all__ = ["VRLars"]


class VRLars(VROptimizer):
    r"""LARS (You et al. 2017, arXiv 1708.03888) with GSNR-scaled gradients (VRGD, eq. 10).

    .. math::
        \begin{aligned}
        g' &= r \odot G \quad (\hat p \odot G \text{ with } \texttt{gsnr\_beta}) \\
        d &= g' + \lambda\theta;\quad
        d \leftarrow d\cdot \frac{\eta\lVert\theta\rVert}{\lVert g'\rVert + \lambda\lVert\theta\rVert + \epsilon}
        \ \ (\text{if both norms} > 0) \\
        b &= \mu b + d \ (b = d \text{ at first});\quad \theta \leftarrow \theta - \mathrm{lr}\cdot b
        \ \ (\text{nesterov: } \theta \leftarrow \theta - \mathrm{lr}(d + \mu b))
        \end{aligned}

    Args:
        params: parameters, parameter groups, or named parameters.
        lr (float): learning rate: required, here or in every parameter group (LARS learning rates
            depend on the batch size; there is no default to fall back on).
        momentum (float): μ (default: 0.9).
        weight_decay (float): λ (default: 0).
        trust_coefficient (float): η (default: 0.001).
        eps (float): ε (default: 1e-8).
        nesterov (bool): (default: False).
        trust_ratio (bool): per-group switch for the local LR; ``weight_decay_exclude_1d`` turns
            it off (with weight decay) for 1-D tensors, as in the LARS paper (default: True).
        gamma, gsnr_beta (default: None), gsnr_eps, vr, ...: see :class:`VROptimizer`.
    """

    _exclude_1d_overrides = {"weight_decay": 0.0, "trust_ratio": False}

    def __init__(
        self,
        params,
        lr: float = required,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
        nesterov: bool = False,
        *,
        gamma: float = 0.1,
        gsnr_beta: float | None = None,
        trust_ratio: bool = True,
        gsnr_eps: float = 1e-6,
        vr: bool = True,
        **kwargs,
    ):
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            eps=eps,
            nesterov=nesterov,
            trust_ratio=trust_ratio,
            gamma=gamma,
            gsnr_beta=gsnr_beta,
            gsnr_eps=gsnr_eps,
        )
        super().__init__(params, defaults, vr=vr, **kwargs)

    def _validate_group(self, group):
        _check_range("momentum", group["momentum"], 0.0, 1.0, high_open=True)
        _check_range("weight_decay", group["weight_decay"], 0.0, float("inf"))
        _check_range("trust_coefficient", group["trust_coefficient"], 0.0, float("inf"), low_open=True)
        _check_range("epsilon value", group["eps"], 0.0, float("inf"))
        if group["nesterov"] and group["momentum"] <= 0:
            raise ValueError("Nesterov momentum requires a momentum > 0.")

    def _init_state(self, p, state, group):
        state["step"] = 0

    def _base_update(self, p, grad, state, group, layout, workspace=None):
        flat_state = {k: (v.view(-1) if hasattr(v, "view") else v) for k, v in state.items()}
        flat_grad = grad.reshape(-1)
        lars_update(
            p.view(-1),
            flat_grad,
            flat_state,
            layout,
            lr=group["lr"],
            momentum=group["momentum"],
            weight_decay=group["weight_decay"],
            trust_coefficient=group["trust_coefficient"],
            eps=group["eps"],
            nesterov=group["nesterov"],
            trust_ratio=group["trust_ratio"],
            workspace=flat_workspace(workspace, grad, flat_grad),
        )
        if "momentum_buffer" in flat_state and "momentum_buffer" not in state:
            state["momentum_buffer"] = flat_state["momentum_buffer"].view_as(p)
