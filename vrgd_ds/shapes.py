"""A parameter's real shape, also under ``deepspeed.zero.Init``.

Under ZeRO-3's ``zero.Init`` (what HF ``from_pretrained`` uses at ZeRO-3 and Megatron-DeepSpeed's
model provider at stage 3) every parameter is a placeholder of shape ``(0,)`` from construction
on; its real shape is ``ds_shape`` and its size ``ds_numel`` (DEEPSPEED_NOTES.md). A decision made
from ``p.dim()`` — "is this a bias or a norm weight?" for weight decay and trust ratios — would
then see every tensor as 1-D. Every such decision in vrgd_ds goes through these functions; use
them (or :func:`decay_groups`) when you form parameter groups yourself at ZeRO-3.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["decay_groups", "full_dim", "full_numel", "full_shape"]


def full_shape(p: Tensor) -> torch.Size:
    """The parameter's whole shape: ``ds_shape`` when ZeRO-3 partitioned it, else ``p.shape``."""
    shape = getattr(p, "ds_shape", None)
    return torch.Size(shape) if shape is not None else p.shape


def full_dim(p: Tensor) -> int:
    """Number of dimensions of the whole parameter (``len(full_shape(p))``)."""
    return len(full_shape(p))


def full_numel(p: Tensor) -> int:
    """Elements of the whole parameter: ``ds_numel`` when ZeRO-3 partitioned it, else ``p.numel()``."""
    numel = getattr(p, "ds_numel", None)
    return int(numel) if numel is not None else p.numel()


def decay_groups(named_parameters, weight_decay: float, no_decay_1d: bool = True) -> list[dict]:
    """Two parameter groups — matrices with ``weight_decay``, 1-D tensors (biases, norm weights)
    with 0 — decided on the whole shape, so also right under ``zero.Init``. Empty groups are
    left out; frozen parameters too. ``named_parameters``: ``model.named_parameters()`` or
    tensors."""
    if (
        isinstance(weight_decay, bool)
        or not isinstance(weight_decay, (int, float))
        or not weight_decay >= 0  # also rejects NaN
        or weight_decay == float("inf")
    ):
        raise ValueError(f"Invalid weight_decay: {weight_decay!r}; it must be a finite number >= 0.")
    if not isinstance(no_decay_1d, bool):
        raise ValueError(f"Invalid no_decay_1d: {no_decay_1d!r}; it must be True or False.")
    decay, no_decay = [], []
    for item in named_parameters:
        p = item[1] if isinstance(item, tuple) else item
        if not isinstance(p, torch.Tensor):
            raise ValueError(
                f"decay_groups takes model.named_parameters() or tensors, got {type(p).__name__}; pass "
                "model.named_parameters()."
            )
        if not p.requires_grad:
            continue
        (no_decay if no_decay_1d and full_dim(p) <= 1 else decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups
