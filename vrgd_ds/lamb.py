"""VR-LAMB: VRGD in front of LAMB, with the trust ratio per parameter tensor (also under ZeRO)."""

from __future__ import annotations

import torch

from .optimizer import VROptimizer, _check_range, check_adam_like, flat_workspace, init_adam_state, step_counts
from .update_rules import lamb_update

__all__ = ["VRLamb"]


class VRLamb(VROptimizer):
    r"""LAMB (You et al. 2019, arXiv 1904.00962) with GSNR-scaled gradients (VRGD, sec. 4.2).

    .. math::
        \begin{aligned}
        g' &= \hat p \odot G \\
        m &= \beta_1 m + (1-\beta_1) g',\quad v = \beta_2 v + (1-\beta_2) g'^2 \\
        u &= \hat m / (\sqrt{\hat v} + \epsilon) + \lambda \theta \\
        \theta &\leftarrow \theta - \mathrm{lr} \cdot \frac{\lVert\theta\rVert}{\lVert u\rVert} \cdot u
        \quad(\text{ratio } 1 \text{ where a norm is } 0)
        \end{aligned}

    Norms are over each whole parameter tensor — under ZeRO 1/2 too, where DeepSpeed's own LAMB
    computes them over flat partitions (DeepSpeed issues #88, #490, #1217).

    Which tensors get the trust ratio: with ``use_nvlamb=True`` (the default, and this class's
    behaviour before the option existed) every tensor, as in the LAMB paper's algorithm (NVLAMB).
    With ``use_nvlamb=False`` only the tensors of groups with ``weight_decay != 0``: a no-decay
    group (biases and LayerNorm weights, e.g. from ``weight_decay_exclude_1d``) steps by
    ``lr · u`` — apex ``FusedLAMB``'s default, which NVIDIA's BERT recipe runs, and timm's
    ``Lamb(always_adapt=False)``. FusedLAMB also divides the gradients by
    ``max(1, ‖G‖/max_grad_norm)`` (global norm) itself; here that is DeepSpeed's
    ``gradient_clipping`` (or ``torch.nn.utils.clip_grad_norm_`` in plain PyTorch), which scales by
    ``max_norm/(‖G‖ + 1e-6)``: the same up to that 1e-6. The default keeps existing runs and
    checkpoints unchanged and never silently turns LAMB into Adam when ``weight_decay=0``
    everywhere (apex's default does); the paper-recipe configs set ``false``.

    Args:
        params: parameters, parameter groups, or named parameters.
        lr (float): learning rate (default: 1e-3).
        betas (tuple): β1, β2 in [0, 1) (default: (0.9, 0.999)).
        eps (float): ε (default: 1e-6).
        weight_decay (float): λ, decoupled into u (default: 0.01).
        bias_correction (bool): use m̂, v̂ (default: True).
        min_trust_ratio, max_trust_ratio (float or None): clamp of the ratio (default: None;
            DeepSpeed's FusedLamb uses 0.01 and 10).
        trust_ratio (bool): per-group switch for the layer-wise ratio (default: True).
        use_nvlamb (bool): trust ratio on every tensor (True), or only on groups with
            weight_decay != 0 (False, as apex FusedLAMB's default); per group too (default: True).
        gamma, gsnr_beta (default: 0.9), gsnr_eps, vr, ...: see :class:`VROptimizer`.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        *,
        gamma: float = 0.1,
        gsnr_beta: float | None = 0.9,
        bias_correction: bool = True,
        min_trust_ratio: float | None = None,
        max_trust_ratio: float | None = None,
        trust_ratio: bool = True,
        use_nvlamb: bool = True,
        gsnr_eps: float = 1e-6,
        vr: bool = True,
        **kwargs,
    ):
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            bias_correction=bias_correction,
            min_trust_ratio=min_trust_ratio,
            max_trust_ratio=max_trust_ratio,
            trust_ratio=trust_ratio,
            use_nvlamb=use_nvlamb,
            gamma=gamma,
            gsnr_beta=gsnr_beta,
            gsnr_eps=gsnr_eps,
        )
        super().__init__(params, defaults, vr=vr, **kwargs)

    # Checkpoints from before use_nvlamb were trained with the ratio on every tensor.
    _legacy_group_defaults = {**VROptimizer._legacy_group_defaults, "use_nvlamb": True}

    def _validate_group(self, group):
        check_adam_like(group)
        for key in ("trust_ratio", "use_nvlamb"):
            if not isinstance(group[key], bool):
                raise ValueError(f"Invalid {key}: {group[key]!r}; it must be True or False.")
        lo, hi = group["min_trust_ratio"], group["max_trust_ratio"]
        if lo is not None:
            _check_range("min_trust_ratio", lo, 0.0, float("inf"))
        if hi is not None:
            _check_range("max_trust_ratio", hi, 0.0, float("inf"), low_open=True)
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"Invalid trust ratio clamp: min_trust_ratio={lo} > max_trust_ratio={hi}.")

    def _init_state(self, p, state, group):
        init_adam_state(p, state)

    def _base_update(self, p, grad, state, group, layout, workspace=None):
        beta1, beta2 = group["betas"]
        flat_grad = grad.reshape(-1)
        lamb_update(
            p.view(-1),
            flat_grad,
            {k: (v.view(-1) if torch.is_tensor(v) else v) for k, v in state.items()},
            step_counts(state),
            layout,
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            bias_correction=group["bias_correction"],
            trust_ratio=group["trust_ratio"],
            min_trust_ratio=group["min_trust_ratio"],
            max_trust_ratio=group["max_trust_ratio"],
            use_nvlamb=group["use_nvlamb"],
            workspace=flat_workspace(workspace, grad, flat_grad),
        )
