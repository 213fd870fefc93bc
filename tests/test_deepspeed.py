"""VR optimizers through deepspeed.initialize on several CPU ranks (gloo): equal to the
single-process plain-PyTorch result whatever the ZeRO stage, world size and accumulation."""
from __future__ import annotations

import pytest

from .ds_bodies import run_cases, train_plain
from .multiproc import run_ranks
from .reference import max_rel_err

OPTIMIZER_CASES = {
    "VRLamb": {"lr": 1e-2, "weight_decay": 0.01},
    "VRAdam": {"lr": 1e-2, "weight_decay": 0.1},
    "VRLars": {"lr": 0.5, "weight_decay": 1e-3, "momentum": 0.9},
    "VRSGD": {"lr": 0.1, "momentum": 0.9},
}


def _cases():
    return [dict(name=f"{t}-z{s}", type=t, params=p, stage=s) for t, p in OPTIMIZER_CASES.items() for s in (0, 1, 2)]


@pytest.fixture(scope="module")
def references():
    return {c["name"]: train_plain(c) for c in _cases()}


@pytest.mark.parametrize("world", [1, 2, 4])
def test_equivalence_across_world_sizes_and_stages(world, references):
    results = run_ranks(run_cases, world, _cases(), timeout=300, init="deepspeed")
    for name, expected in references.items():
        for rank, res in enumerate(results):
            err = max_rel_err(res[name], expected)
            assert err <= 1e-5, f"{name} world={world} rank={rank}: relative error {err:.2e}"
