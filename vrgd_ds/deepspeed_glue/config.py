"""A DeepSpeed config's ``"optimizer": {"type": "VRLamb", "params": {...}}`` → a VR optimizer.

``params`` takes every keyword of the optimizer class (unknown keys: a ValueError listing the
accepted ones) plus ``moment_reduction`` ("auto", "per_step", "per_micro_step"; README "The two
ZeRO moment-reduction strategies"), which belongs to the glue, not to the optimizer: it is kept
here, per optimizer, and read back by :func:`~vrgd_ds.deepspeed_glue.attach`.
"""

from __future__ import annotations

import inspect
import weakref

from ..optimizer import VROptimizer

__all__ = ["MOMENT_REDUCTIONS", "build_from_config", "moment_reduction_of"]

MOMENT_REDUCTIONS = ("auto", "per_step", "per_micro_step")

# optimizer -> the config's moment_reduction (optimizers built from a config only).
_moment_reductions: "weakref.WeakKeyDictionary[VROptimizer, str]" = weakref.WeakKeyDictionary()


def build_from_config(cls, params: dict, model_parameters):
    """Build a VR optimizer from a DeepSpeed config's ``optimizer.params`` (unknown keys: a clear error)."""
    params = dict(params)
    if "betas" in params:
        params["betas"] = tuple(params["betas"])
    accepted = set()
    for klass in cls.__mro__:
        if klass is object or not issubclass(klass, VROptimizer):
            continue
        accepted |= {
            p for p in inspect.signature(klass.__init__).parameters if p not in ("self", "params", "kwargs", "defaults")
        }
    accepted |= {"moment_reduction"}
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ValueError(
            f"Unknown {cls.__name__} option(s) in the DeepSpeed config's optimizer.params: {unknown}. "
            f"Accepted: {sorted(accepted)}."
        )
    moment_reduction = params.pop("moment_reduction", "auto")
    if moment_reduction not in MOMENT_REDUCTIONS:
        raise ValueError(f"Invalid moment_reduction: {moment_reduction!r}; use one of {MOMENT_REDUCTIONS}.")
    if model_parameters is None:
        raise ValueError("deepspeed.initialize needs model_parameters to build a VR optimizer from the config.")
    opt = cls(model_parameters, **params)
    _moment_reductions[opt] = moment_reduction
    return opt


def moment_reduction_of(opt: VROptimizer) -> str:
    """The ``moment_reduction`` the config gave ``opt`` ("auto" for an optimizer built elsewhere)."""
    return _moment_reductions.get(opt, "auto")
