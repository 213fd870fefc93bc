"""VR-Adam(W): VRGD in front of torch.optim.Adam / AdamW."""

from __future__ import annotations


from .optimizer import VROptimizer, check_adam_like, init_adam_state, step_counts
from .update_rules import adam_update

__all__ = ["VRAdam", "VRAdamW"]


class VRAdam(VROptimizer):
    r"""Adam/AdamW with GSNR-scaled gradients (VRGD, arXiv 2309.13681, sec. 4.2).

    .. math::
        \begin{aligned}
        g' &= \hat p \odot G,\quad p_t = \beta_3 p_{t-1} + (1-\beta_3) r_t,\ \hat p_t = p_t/(1-\beta_3^t) \\
        \text{AdamW: } \theta &\leftarrow \theta(1-\mathrm{lr}\,\lambda);\quad
        \text{Adam: } g' \leftarrow g' + \lambda\theta \\
        m &= \beta_1 m + (1-\beta_1) g',\quad v = \beta_2 v + (1-\beta_2) g'^2 \\
        \theta &\leftarrow \theta - \mathrm{lr}\, \hat m / (\sqrt{\hat v} + \epsilon)
        \end{aligned}

    Args:
        params: parameters, parameter groups, or named parameters.
        lr (float): learning rate (default: 1e-3).
        betas (tuple): β1, β2 in [0, 1) (default: (0.9, 0.999)).
        eps (float): ε added to √v̂ (default: 1e-8).
        weight_decay (float): λ (default: 0).
        decoupled_weight_decay (bool): AdamW when True, Adam's L2 when False (default: True).
        amsgrad (bool): AMSGrad, v̂ from the running maximum of v, as torch.optim.Adam (default: False).
        gamma, gsnr_beta (default: 0.9), gsnr_eps, vr, ...: see :class:`VROptimizer`.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = True,
        amsgrad: bool = False,
        *,
        gamma: float = 0.1,
        gsnr_beta: float | None = 0.9,
        gsnr_eps: float = 1e-6,
        vr: bool = True,
        **kwargs,
    ):
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            amsgrad=amsgrad,
            gamma=gamma,
            gsnr_beta=gsnr_beta,
            gsnr_eps=gsnr_eps,
        )
        super().__init__(params, defaults, vr=vr, **kwargs)

    _legacy_group_defaults = {**VROptimizer._legacy_group_defaults, "amsgrad": False}

    def _validate_group(self, group):
        check_adam_like(group)
        if not isinstance(group["amsgrad"], bool):
            raise ValueError(f"Invalid amsgrad: {group['amsgrad']!r}; it must be True or False.")

    def _init_state(self, p, state, group):
        init_adam_state(p, state, amsgrad=group["amsgrad"])

    def _base_update(self, p, grad, state, group, layout, workspace=None):
        beta1, beta2 = group["betas"]
        hp = dict(
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            decoupled_weight_decay=group["decoupled_weight_decay"],
            amsgrad=group["amsgrad"],
        )
        adam_update(p, grad, state, step_counts(state), layout, workspace=workspace, **hp)


class VRAdamW(VRAdam):
    """:class:`VRAdam` with ``decoupled_weight_decay=True`` and AdamW's default weight decay 1e-2."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        **kwargs,
    ):
        kwargs.pop("decoupled_weight_decay", None)
        super().__init__(params, lr, betas, eps, weight_decay, decoupled_weight_decay=True, amsgrad=amsgrad, **kwargs)
