"""Which DeepSpeed versions vrgd_ds is exact on, feature by feature: checked at
``deepspeed.initialize`` (and by the universal-checkpoint converter), never at ``import vrgd_ds``
— the plain-PyTorch optimizers work beside any DeepSpeed, or none.

``TESTED`` is the table ``scripts/version_matrix.sh`` measured (README "DeepSpeed versions"):
per version, the features whose tests passed — every optimizer step against the float64
reference. ``KNOWN_WRONG`` names versions where DeepSpeed itself gives a different result (its own
optimizers too), with the fix. Anything else is refused with the versions that are tested;
``VRGD_DS_ALLOW_UNTESTED_DEEPSPEED=1`` turns the untested-version refusal (not the known-wrong
ones) into a warning.
"""

from __future__ import annotations

import logging
import os

__all__ = [
    "TESTED",
    "KNOWN_WRONG",
    "FEATURES",
    "SUPPORTED_RANGE_TEXT",
    "version_tuple",
    "installed_version",
    "engine_features",
    "version_refusal",
    "check_engine",
    "require",
]

logger = logging.getLogger("vrgd_ds")

FEATURES = {
    "zero0": "ZeRO stage 0",
    "zero0_bf16": "bf16 at ZeRO stage 0",
    "zero1": "ZeRO stage 1",
    "zero2": "ZeRO stage 2",
    "offload": "ZeRO-Offload at stages 1/2 (offload_optimizer to the CPU)",
    "zero3": "ZeRO stage 3",
    "bf16_optimizer": "BF16_Optimizer (bf16 with fp32 gradient accumulation)",
    "pipeline": "pipeline parallelism (PipelineModule)",
    "tensor_parallel": "tensor parallelism (an mpu)",
    "universal_checkpoint": "universal checkpoints (python -m vrgd_ds.universal, load_universal)",
}
_ALL = frozenset(FEATURES)
# What tests/test_update_matrix.py and the ZeRO tests of tests/test_deepspeed.py cover
# (scripts/version_matrix.sh): ZeRO 0/1/2 in fp32/bf16/fp16, CPU offload, BF16_Optimizer.
_ZERO012 = frozenset({"zero0", "zero0_bf16", "zero1", "zero2", "offload", "bf16_optimizer"})

#: version → the features measured exact with it (scripts/version_matrix.sh; the whole suite for 0.19.8).
TESTED: dict[tuple[int, int, int], frozenset] = {
    (0, 19, 8): _ALL,
    (0, 19, 7): _ZERO012,  # 264 passed, 0 failed (torch 2.13, 2 CPU ranks)
    (0, 19, 6): _ZERO012,  # 264 passed, 0 failed
    (0, 19, 5): _ZERO012,  # 264 passed, 0 failed
    (0, 19, 4): _ZERO012,  # 264 passed, 0 failed
    (0, 19, 3): _ZERO012,  # 264 passed, 0 failed
    (0, 19, 2): _ZERO012,  # 264 passed, 0 failed (pipelines: known wrong, below)
    (0, 19, 1): _ZERO012,  # 264 passed, 0 failed (pipelines: known wrong, below)
    (0, 19, 0): _ZERO012,  # 264 passed, 0 failed (pipelines: known wrong, below)
    # 246 passed, 18 failed: bf16 at stage 0 (update 19 % off) and ZeRO-2 with CPU offload.
    (0, 16, 9): _ZERO012 - {"zero0_bf16", "offload"},
}

#: (first, last) version, features (None: all), and why: refused even with the override.
KNOWN_WRONG: list[tuple[tuple[int, int, int], tuple[int, int, int], frozenset | None, str]] = [
    (
        (0, 16, 9),
        (0, 16, 9),
        frozenset({"zero0_bf16", "offload"}),
        "vrgd_ds's update matrix fails with DeepSpeed 0.16.9 there (bf16 at ZeRO stage 0: the update 19 % off "
        "the reference; ZeRO-2 with CPU offload)",
    ),
    (
        (0, 17, 6),
        (0, 17, 6),
        frozenset({"zero2"}),
        "DeepSpeed 0.17.6 gives other results at ZeRO-2 than at ZeRO-0, with its own optimizers too",
    ),
    (
        (0, 18, 9),
        (0, 18, 9),
        frozenset({"zero1", "zero2", "zero3"}),
        'DeepSpeed 0.18.9\'s own ZeRO step fails on torch 2.13 ("Output 0 of Split is a view ... modified inplace")',
    ),
    (
        (0, 18, 9),
        (0, 19, 2),
        frozenset({"pipeline"}),
        "DeepSpeed 0.18.9-0.19.2 scale stage-0 pipeline gradients by 1/gradient_accumulation_steps differently",
    ),
    (
        (0, 0, 0),
        (0, 19, 4),
        frozenset({"universal_checkpoint"}),
        "vrgd_ds's universal-checkpoint converter needs ds_to_universal helpers added in DeepSpeed 0.19.4-0.19.5",
    ),
]


def version_tuple(text: str) -> tuple[int, int, int]:
    parts = []
    for piece in str(text).split("+")[0].split(".")[:3]:
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        parts.append(int(digits) if digits else 0)
    return tuple(parts + [0] * (3 - len(parts)))


def _text(version) -> str:
    return ".".join(map(str, version))


def _tested_text() -> str:
    rows = []
    for version in sorted(TESTED, reverse=True):
        feats = TESTED[version]
        rows.append(f"{_text(version)} ({'all' if feats == _ALL else ', '.join(sorted(feats))})")
    return "; ".join(rows)


SUPPORTED_RANGE_TEXT = ">=0.16.9,<0.20"  # pip's range; within it, TESTED says which version does what


def installed_version() -> tuple[int, int, int] | None:
    try:
        import deepspeed
    except Exception:  # noqa: BLE001 - absent or broken: nothing of ours runs through it
        return None
    return version_tuple(getattr(deepspeed, "__version__", "0"))


def engine_features(engine) -> set[str]:
    """The features of :data:`FEATURES` a built engine uses."""
    from .bf16 import is_bf16_optimizer
    from .tensor_parallel import tensor_parallel_of

    stage = engine.zero_optimization_stage()
    features = {f"zero{stage}"}
    bf16_optimizer = is_bf16_optimizer(getattr(engine, "optimizer", None))
    if stage == 0 and engine.bfloat16_enabled() and not bf16_optimizer:
        features.add("zero0_bf16")
    if stage in (1, 2) and getattr(getattr(engine, "optimizer", None), "cpu_offload", False):
        features.add("offload")
    try:
        from deepspeed.runtime.pipe.engine import PipelineEngine

        if isinstance(engine, PipelineEngine):
            features.add("pipeline")
    except ImportError:
        pass
    if bf16_optimizer:
        features.add("bf16_optimizer")
    if tensor_parallel_of(engine) is not None:
        features.add("tensor_parallel")
    load_universal = getattr(engine, "load_universal_checkpoint", None)
    if callable(load_universal) and load_universal():
        features.add("universal_checkpoint")
    return features


def version_refusal(version: tuple[int, int, int], features) -> str | None:
    """Why ``features`` cannot be used with DeepSpeed ``version``, or None. Known-wrong versions
    first; then versions (or features) not in :data:`TESTED`, unless the override is set."""
    features = set(features)
    good = sorted((v for v, feats in TESTED.items() if features <= feats), reverse=True)
    fix = f"pip install deepspeed=={_text(good[0])}" if good else "pip install deepspeed==0.19.8"
    if len(good) > 1:
        fix += f" (tested for this: {', '.join(_text(v) for v in good)})"
    for low, high, which, why in KNOWN_WRONG:
        hit = features if which is None else features & which
        if low <= version <= high and hit:
            names = ", ".join(FEATURES[f] for f in sorted(hit))
            return f"{names} with deepspeed {_text(version)}: {why}. Fix: {fix}."
    tested = TESTED.get(version)
    missing = sorted(features - tested) if tested is not None else sorted(features)
    if not missing:
        return None
    if os.environ.get("VRGD_DS_ALLOW_UNTESTED_DEEPSPEED"):
        logger.warning(
            "vrgd_ds: %s not tested with deepspeed %s (VRGD_DS_ALLOW_UNTESTED_DEEPSPEED is set).",
            ", ".join(missing),
            _text(version),
        )
        return None
    names = ", ".join(FEATURES[f] for f in missing)
    return (
        f"{names} with deepspeed {_text(version)}: not tested (vrgd_ds reads DeepSpeed internals). Tested: "
        f"{_tested_text()}. Fix: {fix}, or set VRGD_DS_ALLOW_UNTESTED_DEEPSPEED=1 at your own risk."
    )


def check_engine(engine) -> None:
    """At ``deepspeed.initialize`` of a VR optimizer: a ValueError naming the version and the fix
    when the installed DeepSpeed is not known exact for what this engine uses."""
    version = installed_version()
    reason = None if version is None else version_refusal(version, engine_features(engine))
    if reason is not None:
        raise ValueError(f"vrgd_ds does not support {reason}")


def require(feature: str) -> None:
    """The same check for one feature outside an engine (the universal-checkpoint converter)."""
    version = installed_version()
    reason = None if version is None else version_refusal(version, {feature})
    if reason is not None:
        raise RuntimeError(f"vrgd_ds does not support {reason}")
