"""Every moment source implements the protocol the optimizer relies on (vrgd_ds/moments.py)."""

from __future__ import annotations

import pytest

from vrgd_ds import deepspeed_glue, zero3
from vrgd_ds.collect import GradientMomentCollector
from vrgd_ds.moments import MomentSource

MEMBERS = [name for name in vars(MomentSource) if not name.startswith("_")] + list(MomentSource.__annotations__)
SOURCES = [GradientMomentCollector, deepspeed_glue.Stage0MomentSource, deepspeed_glue.ZeroMomentSource]
SOURCES += [
    cls
    for cls in vars(zero3).values()
    if isinstance(cls, type)
    and issubclass(cls, deepspeed_glue.DeepSpeedMomentSource)
    and cls.__module__ == zero3.__name__
]


@pytest.mark.parametrize("cls", SOURCES, ids=[c.__name__ for c in SOURCES])
def test_source_implements_the_protocol(cls):
    assert {"finalize", "raw_gsnr", "moment_sums", "after_inner_step", "checks_finite_locally"} <= set(MEMBERS)
    missing = [m for m in MEMBERS if not hasattr(cls, m)]
    assert not missing, f"{cls.__name__} lacks {missing}"
