"""Rank bodies for the universal-checkpoint tests (module level: the harness pickles them by name)."""

from __future__ import annotations

import os

from .ds_bodies import DS_MODEL, SAMPLES_PER_STEP, ds_config, train_ds
from .models import TinyNet, micro_batches

TAG = "step2"


def _engine(case: dict, world: int, load_universal: bool = False):
    import deepspeed

    import vrgd_ds
    import vrgd_ds.universal

    extra = dict(case.get("extra", {}))
    if load_universal:
        extra["checkpoint"] = {"load_universal": True}
    cfg = ds_config(
        case["type"],
        case["params"],
        case["stage"],
        SAMPLES_PER_STEP // world,
        world,
        case.get("precision", "fp32"),
        0.0,
        **extra,
    )
    model = TinyNet(**case.get("model", DS_MODEL))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    assert vrgd_ds.universal.installed(engine), "deepspeed_glue.attach installs the universal-checkpoint hook"
    return engine


def _two_steps(case, rank, world, engine, batches):
    """Steps 3 and 4 (indices 2, 3): the parameters after each."""
    _, after3 = train_ds(case, rank, world, steps=1, engine=engine, start_step=2, batches=batches)
    _, after4 = train_ds(case, rank, world, steps=1, engine=engine, start_step=3, batches=batches)
    return after3, after4


def save_and_continue(rank: int, world: int, cases: list[dict], root: str):
    """Per case: 2 steps, save ``<root>/<name>/step2``, 2 more steps; {name: (params3, params4)}."""
    out = {}
    batches = micro_batches(SAMPLES_PER_STEP * 4, skip_extra=False)
    for case in cases:
        engine = _engine(case, world)
        train_ds(case, rank, world, steps=2, engine=engine, batches=batches)
        engine.save_checkpoint(os.path.join(root, case["name"]), tag=TAG)
        out[case["name"]] = _two_steps(case, rank, world, engine, batches)
    return out


def resume(rank: int, world: int, jobs: list[tuple[dict, str, bool]]):
    """Per job ``(case, checkpoint dir, load_universal)``: load tag step2 and train steps 3 and 4.
    Returns, per job, (params3, params4), or the text of the error load_checkpoint raised."""
    out = []
    batches = micro_batches(SAMPLES_PER_STEP * 4, skip_extra=False)
    for case, folder, universal in jobs:
        engine = _engine(case, world, load_universal=universal)
        try:
            engine.load_checkpoint(folder, tag=TAG)
        except Exception as exc:  # noqa: BLE001 - the message is what the test checks
            out.append(f"{type(exc).__name__}: {exc}")
            continue
        out.append(_two_steps(case, rank, world, engine, batches))
    return out
