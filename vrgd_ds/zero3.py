"""ZeRO stage 3 (runtime/zero/stage3.py): not supported yet — refused at deepspeed.initialize.

The glue calls :func:`check_supported` before DeepSpeed builds its stage-3 optimizer and
:func:`attach_zero3` once it has; a stage-3 moment source and layout slot in here
(../shared/LARGE_MODEL_NOTES.md §1 has the design).
"""
from __future__ import annotations

STAGE3_MESSAGE = (
    "vrgd_ds supports ZeRO stages 0, 1 and 2; ZeRO stage 3 is not supported yet (its parameters are "
    "partitioned too, so per-tensor GSNR and trust ratios need their own layout). "
    "Set \"zero_optimization\": {\"stage\": 2} in the DeepSpeed config."
)


def check_supported(engine) -> None:
    """Raise a ValueError saying what to change when this stage-3 configuration is not supported."""
    raise ValueError(STAGE3_MESSAGE)


def attach_zero3(engine, opt, names: dict, strategy: str) -> None:
    """Connect ``opt`` to DeepSpeed's stage-3 optimizer (see the module docstring)."""
    raise ValueError(STAGE3_MESSAGE)
