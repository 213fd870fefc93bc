"""vrgd_ds.comm on gloo directly (no DeepSpeed): the point-to-point reduce-scatter equals the sum
of every rank's slice, for world sizes 2, 3, 4, uneven partition sizes and a subgroup."""

from __future__ import annotations

import pytest
import torch

from .comm_bodies import reduce_scatter_case
from .multiproc import run_ranks


@pytest.mark.parametrize("world", [2, 3, 4])
def test_pairwise_reduce_scatter(world):
    results = run_ranks(reduce_scatter_case, world, [1, 5, 17], timeout=120)
    for rank, cases in enumerate(results):
        *cases, error = cases
        assert "partition size 2" in error, error
        assert len(cases) >= 3
        for got, expected, in_place in cases:
            assert in_place
            assert torch.allclose(got, expected, rtol=1e-6, atol=1e-6), (rank, got, expected)
