"""vrgd_ds: VRGD optimizers (arXiv 2309.13681) for plain PyTorch and DeepSpeed.

``from vrgd_ds import VRSGD, VRAdam, VRLamb, VRLars``. Importing the package also registers
the optimizer types with DeepSpeed (``"optimizer": {"type": "VRLamb", ...}``) when DeepSpeed
is installed — any version, or none; the tested versions are checked at ``deepspeed.initialize``
(:mod:`vrgd_ds.deepspeed_glue.versions`). ``vrgd_ds.monitor`` and ``vrgd_ds.hf`` load on first use.
"""

from .adam import VRAdam, VRAdamW
from .critical_batch import CriticalBatch
from .gsnr import gsnr_from_moments, normalize_and_clip, update_gsnr_momentum
from .lamb import VRLamb
from .lars import VRLars
from .noise import (
    NoiseScaleEMA,
    build_noise_stats,
    critical_batch_summary,
    noise_from_sums,
    unbiased_from_paper_r,
    unbiased_gsnr,
)
from .optimizer import VROptimizer
from .segments import SegmentLayout
from .sgd import VRSGD
from .shapes import decay_groups, full_dim, full_numel, full_shape

__version__ = "0.1.0"

OPTIMIZERS = {"vrsgd": VRSGD, "vradam": VRAdam, "vradamw": VRAdamW, "vrlamb": VRLamb, "vrlars": VRLars}


def find_vr_optimizer(obj):
    """The :class:`VROptimizer` inside ``obj`` (a DeepSpeed engine, a wrapper, or itself), or None."""
    seen = set()
    while obj is not None and id(obj) not in seen:
        if isinstance(obj, VROptimizer):
            return obj
        seen.add(id(obj))
        nxt = None
        for attr in ("basic_optimizer", "optimizer"):
            cand = getattr(obj, attr, None)
            if cand is not None and id(cand) not in seen:
                nxt = cand
                break
        obj = nxt
    return None


__all__ = [
    "VRSGD",
    "VRAdam",
    "VRAdamW",
    "VRLamb",
    "VRLars",
    "VROptimizer",
    "CriticalBatch",
    "SegmentLayout",
    "OPTIMIZERS",
    "find_vr_optimizer",
    "gsnr_from_moments",
    "normalize_and_clip",
    "update_gsnr_momentum",
    "NoiseScaleEMA",
    "build_noise_stats",
    "critical_batch_summary",
    "noise_from_sums",
    "unbiased_from_paper_r",
    "unbiased_gsnr",
    "decay_groups",
    "full_dim",
    "full_numel",
    "full_shape",
]

from . import deepspeed_glue as _deepspeed_glue  # noqa: E402

_deepspeed_glue.register()  # with any DeepSpeed, or none: versions are checked at deepspeed.initialize

_LAZY_SUBMODULES = ("monitor", "hf")


def __getattr__(name: str):
    """``vrgd_ds.monitor`` and ``vrgd_ds.hf`` without importing them explicitly (loaded on first use)."""
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
