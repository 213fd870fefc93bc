"""Every moment source implements the protocol the optimizer relies on (vrgd_ds/moments.py), and
the DeepSpeed sources the small public surface tools and tests use (vrgd_ds/deepspeed_glue/source.py)."""

from __future__ import annotations

import inspect

import pytest

from vrgd_ds import deepspeed_glue
from vrgd_ds.collect import GradientMomentCollector
from vrgd_ds.deepspeed_glue import source as ds_source
from vrgd_ds.moments import MomentSource

MEMBERS = [name for name in vars(MomentSource) if not name.startswith("_")] + list(MomentSource.__annotations__)
# Every concrete DeepSpeed source, wherever in the package it lives (a new wrapper kind's too).
DS_SOURCES = sorted(
    {
        cls
        for module in vars(deepspeed_glue).values()
        if inspect.ismodule(module) and module.__name__.startswith(deepspeed_glue.__name__ + ".")
        for cls in vars(module).values()
        if isinstance(cls, type)
        and issubclass(cls, ds_source.DeepSpeedMomentSource)
        and cls is not ds_source.DeepSpeedMomentSource
    },
    key=lambda c: c.__name__,
)
SOURCES = [GradientMomentCollector] + DS_SOURCES


def test_every_wrapper_kind_is_found():
    names = {c.__name__ for c in DS_SOURCES}
    assert {"Stage0MomentSource", "ZeroMomentSource", "Zero3MomentSource"} <= names


@pytest.mark.parametrize("cls", SOURCES, ids=[c.__name__ for c in SOURCES])
def test_source_implements_the_protocol(cls):
    assert {"finalize", "raw_gsnr", "moment_sums", "after_inner_step", "checks_finite_locally"} <= set(MEMBERS)
    missing = [m for m in MEMBERS if not hasattr(cls, m)]
    assert not missing, f"{cls.__name__} lacks {missing}"


@pytest.mark.parametrize("cls", DS_SOURCES, ids=[c.__name__ for c in DS_SOURCES])
def test_deepspeed_source_public_surface(cls):
    for name in ("is_clear", "extra_buffer_bytes", "num_samples", "ensure_reduced", "clear", "prepare"):
        assert callable(getattr(cls, name, None)), f"{cls.__name__}.{name}"
    # What only the wrapper kind knows is implemented there, not left to the base class.
    for name in ("ensure_reduced", "extra_buffer_bytes", "tensor_sample_counts"):
        assert getattr(cls, name) is not getattr(ds_source.DeepSpeedMomentSource, name, None), f"{cls.__name__}.{name}"
