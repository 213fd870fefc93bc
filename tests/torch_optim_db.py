"""Our optimizers as rows of torch's optimizer table: ``OptimizerInfo`` entries of
``torch.testing._internal.common_optimizers`` (the table PyTorch's own generic optimizer tests run
over, test/test_optim.py), for ``tests/test_torch_conventions.py``.

Each optimizer has two rows: ``vr=False`` (the base optimizer; one backward per step, gradients
set as torch's tests set them) and ``vr=True`` with k = 2 gradient samples per step (every
gradient the tests make is formed by two backward passes whose gradients sum to it, and differ
element by element, so that r is not trivially 1 — see :class:`Samples`). torch's own SGD, Adam
and AdamW rows run through the same test bodies as the control: the restated tests are the
tests.

Importing torch's testing helpers needs ``expecttest`` (test extra) and, as a side effect of
``torch.testing._internal.common_utils``, freezes ``torch.backends`` flags; this module thaws
them again so that other tests in the same process are unaffected.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.testing._internal.common_optimizers as common_optimizers
from torch.nn import Parameter
from torch.testing._internal.common_optimizers import (
    ErrorOptimizerInput,
    OptimizerErrorEnum,
    OptimizerInfo,
    OptimizerInput,
)

from vrgd_ds import VRSGD, VRAdam, VRAdamW, VRLamb, VRLars

# common_utils calls torch.backends.disable_global_flags() at import; undo it for the other tests.
torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True

__all__ = ["ROWS", "TORCH_ROWS", "Row", "Samples"]


def _real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def _noise(p: torch.Tensor) -> torch.Tensor:
    """A fixed pattern per element (deterministic: two optimizers run side by side see the same)."""
    real = _real(p)
    index = torch.arange(real.numel(), dtype=real.dtype, device=real.device)
    return (0.1 * torch.sin(0.7 * index + 0.3)).view(real.shape)


@dataclass
class Samples:
    """How a test's gradients reach the optimizer: ``k`` backward passes per step.

    k = 1: as in torch's tests (``loss.backward()``, ``p.grad = g``). k = 2: two backward passes
    whose gradients are ¼∇L + n and ¾∇L − n (n a fixed pattern per element), so that they sum to
    ∇L and the GSNR of each element is not trivially the same; ``p.grad = g`` becomes the same two
    passes over a loss linear in the parameters.
    """

    k: int = 1

    def backward(self, loss: torch.Tensor, params) -> None:
        if self.k == 1:
            loss.backward()
            return
        params = [p for p in params if p.requires_grad]
        extra = sum((_real(p) * _noise(p)).sum() for p in params)
        (loss * 0.25 + extra).backward(retain_graph=True)
        (loss * 0.75 - extra).backward()

    def set_grads(self, params, grads) -> None:
        params, grads = list(params), list(grads)
        if self.k == 1:
            for p, g in zip(params, grads):
                p.grad = g
            return
        for p in params:
            p.grad = None
        self.backward(sum((_real(p) * _real(g)).sum() for p, g in zip(params, grads)), params)


@dataclass
class Row:
    """One optimizer × one way of feeding it: the torch ``OptimizerInfo``, its gradient samples
    per step, and the keyword arguments every construction in the tests adds (``vr``)."""

    info: OptimizerInfo
    samples: Samples
    base_kwargs: dict = field(default_factory=dict)
    is_ours: bool = True

    @property
    def id(self) -> str:
        name = self.info.optim_cls.__name__
        if not self.is_ours:
            return f"torch.{name}"
        return f"{name}-vr" if self.base_kwargs.get("vr") else f"{name}-novr"

    def make(self, params, **kwargs):
        return self.info.optim_cls(params, **{**self.base_kwargs, **kwargs})


def _inputs(rows: list[tuple[str, dict]]):
    def optim_inputs_func(device, dtype=None):
        return [OptimizerInput(params=None, kwargs=dict(kw), desc=desc) for desc, kw in rows]

    return optim_inputs_func


def _param():
    return Parameter(torch.randn(2, 3))


def _common_errors(cls, needs_lr: bool = False):
    """Construction errors every one of our optimizers shares (lr given where the class needs it)."""
    lr = {"lr": 0.1} if needs_lr else {}
    p = _param()
    cases = [
        (dict(lr=-1.0), ValueError, "Invalid lr: -1.0"),
        (dict(lr=torch.tensor([1e-3, 1e-3])), ValueError, "Tensor lr must be 1-element"),
        ({**lr, "foreach": True}, ValueError, "foreach=True is not supported by vrgd_ds yet"),
        ({**lr, "fused": True}, ValueError, "fused=True is not supported by vrgd_ds yet"),
        ({**lr, "differentiable": True}, ValueError, "differentiable=True is not supported"),
        ({**lr, "capturable": True}, ValueError, "capturable=True is not supported"),
        ({**lr, "maximize": 1}, ValueError, "Invalid maximize: 1"),
    ]
    out = [
        ErrorOptimizerInput(
            OptimizerInput(params=[_param()], kwargs=kw, desc=regex),
            error_type=etype,
            error_regex=regex,
        )
        for kw, etype, regex in cases
    ]
    out += [
        ErrorOptimizerInput(
            OptimizerInput(params=[{"params": [_param()], "vr": False, **lr}], kwargs={}, desc="per-group vr"),
            error_type=ValueError,
            error_regex="vr in a parameter group: an optimizer-wide option.*gamma=1.0",
        ),
        ErrorOptimizerInput(
            OptimizerInput(params=[{"params": [_param()], "foreach": True, **lr}], kwargs={}, desc="group foreach"),
            error_type=ValueError,
            error_regex="foreach=True is not supported",
        ),
        ErrorOptimizerInput(
            OptimizerInput(params=[("a", _param()), _param()], kwargs=lr, desc="named and unnamed"),
            error_type=ValueError,
            error_regex="all optimizer params should be with/without names",
        ),
        ErrorOptimizerInput(
            OptimizerInput(params=[{"params": [p], **lr}, {"params": [p]}], kwargs=lr, desc="shared"),
            error_type=ValueError,
            error_regex="some parameters appear in more than one parameter group",
        ),
        ErrorOptimizerInput(
            OptimizerInput(params=[], kwargs=lr, desc="empty"),
            error_type=ValueError,
            error_regex="optimizer got an empty parameter list",
        ),
        ErrorOptimizerInput(
            OptimizerInput(params=_param(), kwargs=lr, desc="a tensor"),
            error_type=TypeError,
            error_regex="params must be an iterable of Tensors or dicts",
        ),
    ]
    # vr=True and a gradient that came from no backward pass (k = 0): refused before anything
    # is touched (plain .grad assignment gives the hooks no sample).
    q = _param()
    q.grad = torch.ones_like(q)
    out.append(
        ErrorOptimizerInput(
            OptimizerInput(params=[q], kwargs={**lr, "vr": True}, desc="k=0"),
            error_on=OptimizerErrorEnum.STEP_ERROR,
            error_type=RuntimeError,
            error_regex=r"at least 2 gradient samples per optimizer step.*got k=0",
        )
    )
    return out


def _errors(cls, extra=(), needs_lr=False):
    def optim_error_inputs_func(device, dtype):
        return _common_errors(cls, needs_lr) + [
            ErrorOptimizerInput(
                OptimizerInput(params=[_param()], kwargs=kw, desc=regex), error_type=et, error_regex=regex
            )
            for kw, et, regex in extra
        ]

    return optim_error_inputs_func


# Every optimizer's inputs: its hyper-parameters as torch's rows vary them (maximize, weight
# decay, momentum, a tensor lr), plus the VR ones. LAMB's and AdamW's rows name weight_decay
# always: torch's zero-gradient test skips rows whose weight decay is non-zero by their kwargs.
_INPUTS = {
    VRSGD: [
        ("default", {}),
        ("lr", {"lr": 0.01}),
        ("tensor lr", {"lr": torch.tensor(0.01)}),
        ("tensor lr of shape [1]", {"lr": torch.tensor([0.01])}),
        ("momentum, dampening", {"lr": 0.01, "momentum": 0.9, "dampening": 0.5}),
        ("nesterov, weight_decay", {"lr": 0.01, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1}),
        ("maximize, momentum", {"lr": 0.01, "momentum": 0.9, "maximize": True}),
        ("maximize, weight_decay, gsnr_beta", {"weight_decay": 0.1, "maximize": True, "gsnr_beta": 0.9}),
    ],
    VRAdam: [
        ("default", {}),
        ("tensor lr of shape [1, 1]", {"lr": torch.tensor([[0.01]])}),
        ("L2 weight_decay", {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": False}),
        ("amsgrad", {"lr": 0.01, "amsgrad": True}),
        ("maximize, amsgrad, weight_decay", {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True, "maximize": True}),
        ("no gsnr_beta, gamma", {"gsnr_beta": None, "gamma": 0.3}),
    ],
    VRAdamW: [
        ("default weight_decay", {"weight_decay": 1e-2}),
        ("no weight_decay", {"weight_decay": 0.0}),
        ("tensor lr, amsgrad", {"lr": torch.tensor(0.01), "weight_decay": 0.1, "amsgrad": True}),
        ("maximize", {"lr": 0.01, "weight_decay": 0.1, "maximize": True}),
    ],
    VRLamb: [
        ("default weight_decay", {"weight_decay": 0.01}),
        ("no weight_decay", {"weight_decay": 0.0}),
        ("tensor lr, apex", {"lr": torch.tensor(0.01), "weight_decay": 0.1, "use_nvlamb": False}),
        ("maximize, clamp", {"weight_decay": 0.0, "maximize": True, "min_trust_ratio": 0.5, "max_trust_ratio": 2.0}),
        ("no bias correction", {"weight_decay": 0.0, "bias_correction": False}),
    ],
    VRLars: [
        ("lr", {"lr": 0.1}),
        ("tensor lr, weight_decay", {"lr": torch.tensor(0.1), "weight_decay": 0.01}),
        ("nesterov", {"lr": 0.1, "nesterov": True, "trust_coefficient": 0.01}),
        ("maximize, gsnr_beta", {"lr": 0.1, "maximize": True, "gsnr_beta": 0.5}),
    ],
}

_EXTRA_ERRORS = {
    VRSGD: [(dict(nesterov=True), ValueError, "Nesterov momentum requires")],
    VRAdam: [
        (dict(betas=(1.0, 0.999)), ValueError, "Invalid beta parameter at index 0: 1.0"),
        (dict(amsgrad=1), ValueError, "Invalid amsgrad: 1"),
    ],
    VRAdamW: [(dict(eps=-1.0), ValueError, "Invalid epsilon value: -1.0")],
    VRLamb: [(dict(gamma=0.0), ValueError, r"Invalid gamma: 0.0; it must be in \(0.0, 1.0\]")],
    VRLars: [
        (dict(), ValueError, "required optimization parameter lr"),
        (dict(lr=0.1, trust_coefficient=0.0), ValueError, "Invalid trust_coefficient"),
    ],
}


def _info(cls) -> OptimizerInfo:
    return OptimizerInfo(
        cls,
        optim_inputs_func=_inputs(_INPUTS[cls]),
        optim_error_inputs_func=_errors(cls, _EXTRA_ERRORS[cls], needs_lr=cls is VRLars),
        supported_impls=(),  # foreach/fused/differentiable: refused (tests/test_errors), not variants
        not_og_supported_flags=("maximize", "amsgrad"),  # absent from state dicts of older vrgd_ds
        supports_sparse=True,  # densified (README "torch.optim conventions")
        # Rosenbrock with sparse gradients: as torch SGD's row, lr 4.8e-3 and no momentum (else it diverges).
        metadata_for_sparse=(
            {"lr": 4.8e-3, "maximize": False, "weight_decay": 0.0}
            | ({"momentum": 0.0, "nesterov": False} if cls in (VRSGD, VRLars) else {}),
            [],
        ),
        supports_complex=True,
    )


# LARS has no default learning rate: tests that build it with none (parameter-group tests) give one.
_BASE = {VRLars: {"lr": 0.1}}

ROWS = [
    Row(_info(cls), Samples(k), {"vr": k > 1, **_BASE.get(cls, {})})
    for cls in (VRSGD, VRAdam, VRAdamW, VRLamb, VRLars)
    for k in (1, 2)
]

TORCH_ROWS = [
    Row(info, Samples(1), {}, is_ours=False)
    for info in common_optimizers.optim_db
    if info.optim_cls in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)
]
