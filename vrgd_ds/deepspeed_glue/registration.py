"""Teach DeepSpeed our optimizer types: :func:`register`, run at ``import vrgd_ds``.

DeepSpeed (0.19.x) has no optimizer plug-in registry. :func:`register` appends our classes to
ZeRO's supported-optimizer list (runtime/zero/utils.py:45 ``ZERO_SUPPORTED_OPTIMIZERS``) and
wraps three methods of ``DeepSpeedEngine`` (runtime/engine.py, deepspeed 0.19.8):

* ``_is_supported_optimizer`` (:1985) / ``_configure_basic_optimizer`` (:2476): a config
  ``"optimizer": {"type": "VRLamb", "params": {...}}`` (case-insensitive; VRSGD, VRAdam, VRAdamW,
  VRLamb, VRLars) builds our optimizer with the user's parameter groups (:mod:`.config`);
* ``_configure_optimizer`` (:2328): ZeRO-3 configurations are checked before DeepSpeed builds its
  stage-3 optimizer; once DeepSpeed has wrapped the optimizer (ZeRO, fp16/bf16), the DeepSpeed
  version is checked against the tested table for what the engine uses (:mod:`.versions`), and
  :func:`~vrgd_ds.deepspeed_glue.attach` connects the VR optimizer to the wrapper — whether it
  came from the config, an optimizer instance or a callable.

Nothing here refuses a DeepSpeed version at import: ``import vrgd_ds`` and the plain-PyTorch
optimizers work with any DeepSpeed installed, or none; a DeepSpeed without the methods above (or
one that fails to import) simply gets no registration.
"""

from __future__ import annotations

import functools
import logging

from ..optimizer import VROptimizer
from .attach import attach
from .compat import fill_missing_attributes
from .config import build_from_config
from .versions import SUPPORTED_RANGE_TEXT, TESTED, check_engine
from .zero3 import check_supported as check_zero3_supported

__all__ = ["register", "TESTED_DEEPSPEED", "TESTED_RANGE_TEXT"]

logger = logging.getLogger("vrgd_ds")

#: The versions measured exact (vrgd_ds.deepspeed_glue.versions.TESTED has their features).
TESTED_DEEPSPEED = tuple(sorted(TESTED))
TESTED_RANGE_TEXT = SUPPORTED_RANGE_TEXT

_registered = False
_PATCHED = ("_is_supported_optimizer", "_configure_basic_optimizer", "_configure_optimizer")


def _optimizer_classes():
    from .. import OPTIMIZERS

    return OPTIMIZERS


def register() -> bool:
    """Teach DeepSpeed our optimizer types. Idempotent. Returns False if DeepSpeed is absent, fails
    to import, or lacks the engine methods we wrap (then nothing of DeepSpeed's is touched)."""
    global _registered
    if _registered:
        return True
    try:
        import deepspeed  # noqa: F401
        from deepspeed.runtime.engine import DeepSpeedEngine
        from deepspeed.runtime.zero import utils as zero_utils
    except Exception as exc:  # noqa: BLE001 - absent or broken: the plain optimizers still work
        logger.debug("vrgd_ds: DeepSpeed not registered (%s: %s)", type(exc).__name__, exc)
        return False
    missing = [m for m in _PATCHED if not hasattr(DeepSpeedEngine, m)]
    if missing or not isinstance(getattr(zero_utils, "ZERO_SUPPORTED_OPTIMIZERS", None), list):
        logger.warning(
            "vrgd_ds: this DeepSpeed (%s) lacks %s: the VR optimizer types are not registered with it.",
            getattr(deepspeed, "__version__", "?"),
            ", ".join(missing) or "ZERO_SUPPORTED_OPTIMIZERS",
        )
        return False
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
            check_engine(self)  # the installed DeepSpeed against the tested table, for what this engine uses
            fill_missing_attributes(self.optimizer)
            attach(self)

    DeepSpeedEngine._is_supported_optimizer = _is_supported_optimizer
    DeepSpeedEngine._configure_basic_optimizer = _configure_basic_optimizer
    DeepSpeedEngine._configure_optimizer = _configure_optimizer
    _registered = True
    return True
