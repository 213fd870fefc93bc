"""Plain PyTorch with DDP: k = ranks × micro-batches, so the same 8 micro-batches give the same
update as (1 process, 8 accumulations), (2 ranks, 4) and (4 ranks, 2)."""

from __future__ import annotations

import pytest

from .ddp_bodies import k_too_small_ddp, train_ddp_all, train_single
from .multiproc import run_ranks
from .reference import max_rel_err

CASES = {
    "lamb": ("vrlamb", {"lr": 1e-2}),
    "adamw": ("vradam", {"lr": 1e-2, "weight_decay": 0.1}),
    "sgd": ("vrsgd", {"lr": 0.1, "momentum": 0.9}),
    "lars": ("vrlars", {"lr": 0.5, "gsnr_beta": 0.9}),
}


@pytest.mark.parametrize("world", [2, 4])
def test_ddp_matches_single_process_accumulation(world):
    results = run_ranks(train_ddp_all, world, CASES, timeout=180)
    for key, (name, kwargs) in CASES.items():
        expected = train_single(name, kwargs)
        for rank, res in enumerate(results):
            err = max_rel_err(res[key], expected)
            assert err <= 1e-6, f"{key} world={world} rank={rank}: {err:.2e}"


def test_two_ranks_one_micro_batch_is_enough():
    """k counts ranks too: 2 ranks × 1 micro-batch is k = 2, no error."""
    assert run_ranks(k_too_small_ddp, 2, timeout=60) == [None, None]
