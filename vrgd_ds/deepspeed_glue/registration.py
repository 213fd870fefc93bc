"""Teach DeepSpeed our optimizer types: :func:`register`, run at ``import vrgd_ds``.

DeepSpeed (0.19.x) has no optimizer plug-in registry. :func:`register` checks the installed
version, appends our classes to ZeRO's supported-optimizer list (runtime/zero/utils.py:45
``ZERO_SUPPORTED_OPTIMIZERS``) and wraps three methods of ``DeepSpeedEngine``
(runtime/engine.py, deepspeed 0.19.8):

* ``_is_supported_optimizer`` (:1985) / ``_configure_basic_optimizer`` (:2476): a config
  ``"optimizer": {"type": "VRLamb", "params": {...}}`` (case-insensitive; VRSGD, VRAdam, VRAdamW,
  VRLamb, VRLars) builds our optimizer with the user's parameter groups (:mod:`.config`);
* ``_configure_optimizer`` (:2328): ZeRO-3 configurations are checked before DeepSpeed builds its
  stage-3 optimizer; once DeepSpeed has wrapped the optimizer (ZeRO, fp16/bf16),
  :func:`~vrgd_ds.deepspeed_glue.attach` connects the VR optimizer to the wrapper — whether it
  came from the config, an optimizer instance or a callable.
"""

from __future__ import annotations

import functools
import os

from ..optimizer import VROptimizer
from .attach import attach
from .config import build_from_config
from .zero3 import check_supported as check_zero3_supported

__all__ = ["register", "TESTED_DEEPSPEED", "TESTED_RANGE_TEXT"]

TESTED_DEEPSPEED = ((0, 19, 8), (0, 20, 0))  # [low, high)
TESTED_RANGE_TEXT = ">=0.19.8,<0.20"

_registered = False


def _version_tuple(text: str):
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts + [0] * (3 - len(parts)))


def _optimizer_classes():
    from .. import OPTIMIZERS

    return OPTIMIZERS


def register() -> bool:
    """Teach DeepSpeed our optimizer types. Idempotent. Returns False if DeepSpeed is absent."""
    global _registered
    if _registered:
        return True
    try:
        import deepspeed
    except ImportError:
        return False
    version = _version_tuple(deepspeed.__version__)
    if not (TESTED_DEEPSPEED[0] <= version < TESTED_DEEPSPEED[1]) and not os.environ.get(
        "VRGD_DS_ALLOW_UNTESTED_DEEPSPEED"
    ):
        raise ImportError(
            f"vrgd_ds hooks into DeepSpeed internals and is tested with deepspeed {TESTED_RANGE_TEXT}; "
            f"found {deepspeed.__version__}. Install a tested version (pip install 'deepspeed{TESTED_RANGE_TEXT}') "
            f"or set VRGD_DS_ALLOW_UNTESTED_DEEPSPEED=1 at your own risk."
        )
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero import utils as zero_utils

    for cls in _optimizer_classes().values():
        if cls not in zero_utils.ZERO_SUPPORTED_OPTIMIZERS:
            zero_utils.ZERO_SUPPORTED_OPTIMIZERS.append(cls)

    original_is_supported = DeepSpeedEngine._is_supported_optimizer
    original_basic = DeepSpeedEngine._configure_basic_optimizer
    original_configure = DeepSpeedEngine._configure_optimizer

    @functools.wraps(original_is_supported)
    def _is_supported_optimizer(self, optimizer_name):
        return str(optimizer_name).lower() in _optimizer_classes() or original_is_supported(self, optimizer_name)

    @functools.wraps(original_basic)
    def _configure_basic_optimizer(self, model_parameters):
        cls = _optimizer_classes().get(str(self.optimizer_name()).lower())
        if cls is None:
            return original_basic(self, model_parameters)
        opt = build_from_config(cls, self.optimizer_params() or {}, model_parameters)
        opt.ignore_steps(True)  # released by _configure_optimizer once the wrappers are built
        return opt

    @functools.wraps(original_configure)
    def _configure_optimizer(self, client_optimizer, model_parameters):
        name = str(self.optimizer_name()).lower() if client_optimizer is None else None
        if (
            name in _optimizer_classes() or isinstance(client_optimizer, VROptimizer)
        ) and self.zero_optimization_stage() > 2:
            check_zero3_supported(self)  # before DeepSpeed builds its stage-3 optimizer
        # DeepSpeed's fp16/bf16 wrappers "initialize optimizer states" by one step() on zero
        # gradients; for a VR optimizer that step is a no-op (state is created lazily at the
        # first real step, so the first real step is t = 1, as without DeepSpeed).
        if isinstance(client_optimizer, VROptimizer):
            client_optimizer.ignore_steps(True)
        try:
            original_configure(self, client_optimizer, model_parameters)
        finally:
            for opt in (client_optimizer, getattr(self, "basic_optimizer", None)):
                if isinstance(opt, VROptimizer):
                    opt.ignore_steps(False)
        if isinstance(self.basic_optimizer, VROptimizer):
            attach(self)

    DeepSpeedEngine._is_supported_optimizer = _is_supported_optimizer
    DeepSpeedEngine._configure_basic_optimizer = _configure_basic_optimizer
    DeepSpeedEngine._configure_optimizer = _configure_optimizer
    _registered = True
    return True
