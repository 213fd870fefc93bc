"""The optimizer table of the single-process tests: one row per optimizer (as torch's ``optim_db``
in torch/testing/_internal/common_optimizers.py), each with what the tests need to know about it.

A test iterates over ``OPTIMIZER_DB`` (or one of the helpers below) instead of keeping its own
list of optimizers, so a new optimizer is one new row and every test covers it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vrgd_ds import VRSGD, VRAdam, VRLamb, VRLars


@dataclass(frozen=True)
class OptimInfo:
    cls: type
    kind: str  # the update rule of tests/reference.py ReferenceVR
    # Hyper-parameter sets the brute-force reference checks (name → kwargs); VR keys included.
    configs: dict[str, dict]
    # Keyword arguments of a short ordinary run (state_dict round trip, non-finite skip, ...).
    basic: dict = field(default_factory=dict)
    # (torch.optim class, kwargs): the base optimizer vr=False must equal bit for bit; none
    # where torch has none (LAMB, LARS).
    torch_equivalents: tuple[tuple[type, dict], ...] = ()
    # Keyword arguments under which the update is invariant to a common scale of the gradient
    # samples (the base rule's own eps made negligible); None: the update scales with G (SGD).
    scale_invariant: dict | None = None
    # (kwargs, message regex) that must raise ValueError at construction.
    bad: tuple[tuple[dict, str], ...] = ()


OPTIMIZER_DB = [
    OptimInfo(
        VRSGD,
        "sgd",
        configs={
            "sgd": dict(lr=0.05),
            "sgd_momentum_wd": dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2),
            "sgd_nesterov_beta": dict(lr=0.05, momentum=0.9, nesterov=True, gsnr_beta=0.8),
        },
        basic=dict(lr=0.1, momentum=0.9),
        torch_equivalents=(
            (torch.optim.SGD, dict(lr=0.1)),
            (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-2, dampening=0.2)),
            (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)),
            (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-2, maximize=True)),
        ),
        scale_invariant=None,
        bad=(
            (dict(lr=-0.1), r"Invalid lr: -0.1"),
            (dict(lr=0.1, gsnr_eps=1.0), r"Invalid gsnr_eps: 1.0.*Use 0 < gsnr_eps < 1"),
            (dict(lr=0.1, nesterov=True), r"Nesterov momentum requires"),
        ),
    ),
    OptimInfo(
        VRAdam,
        "adam",
        configs={
            "adamw": dict(lr=1e-2, weight_decay=0.1),
            "adam_l2_nobeta": dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=False, gsnr_beta=None),
        },
        basic=dict(),
        torch_equivalents=(
            (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
            (torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=False)),
            (
                torch.optim.Adam,
                dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=False, amsgrad=True, maximize=True),
            ),
            (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
        ),
        scale_invariant=dict(lr=1e-2, eps=1e-14),
        bad=(
            (dict(eps=-1e-8), r"Invalid epsilon value: -1e-08"),
            (dict(betas=(1.0, 0.999)), r"Invalid beta parameter at index 0: 1.0"),
            (dict(gsnr_eps=0.0), r"Invalid gsnr_eps: 0.0; it must be in \(0.0, 1.0\)"),
        ),
    ),
    OptimInfo(
        VRLamb,
        "lamb",
        configs={
            "lamb": dict(lr=1e-2),
            "lamb_clamped_nobc": dict(
                lr=1e-2, bias_correction=False, min_trust_ratio=0.5, max_trust_ratio=2.0, gamma=0.3
            ),
        },
        basic=dict(),
        scale_invariant=dict(lr=1e-2, eps=1e-14),
        bad=(
            (dict(gamma=0.0), r"Invalid gamma: 0.0; it must be in \(0.0, 1.0\]"),
            (dict(gamma=1.5), r"Invalid gamma: 1.5"),
            (dict(betas=(0.9, -0.1)), r"Invalid beta parameter at index 1: -0.1"),
            (dict(gsnr_beta=1.0), r"Invalid gsnr_beta: 1.0.*or None"),
            (dict(min_trust_ratio=2.0, max_trust_ratio=1.0), r"min_trust_ratio=2.0 > max_trust_ratio=1.0"),
        ),
    ),
    OptimInfo(
        VRLars,
        "lars",
        configs={
            "lars": dict(lr=0.5, weight_decay=1e-3),
            "lars_nesterov_beta": dict(lr=0.5, nesterov=True, gsnr_beta=0.9, trust_coefficient=0.01),
        },
        basic=dict(lr=0.5, gsnr_beta=0.5),
        scale_invariant=dict(lr=0.5, eps=1e-14),
        bad=((dict(lr=0.1, trust_coefficient=0.0), r"Invalid trust_coefficient"),),
    ),
]


def reference_configs():
    """(test id, row, kwargs) for every hyper-parameter set of every row."""
    return [(name, info, kwargs) for info in OPTIMIZER_DB for name, kwargs in info.configs.items()]


def torch_pairs():
    """(ours, torch class, kwargs) for every torch.optim equivalent of every row."""
    return [(info.cls, cls, kw) for info in OPTIMIZER_DB for cls, kw in info.torch_equivalents]


def bad_inputs():
    """(row, kwargs, message regex) for every bad construction of every row."""
    return [(info, kw, match) for info in OPTIMIZER_DB for kw, match in info.bad]
