"""vrgd_ds.comm on gloo directly (no DeepSpeed): the point-to-point reduce-scatter equals the sum
of every rank's slice, and the reduction of g² to the owning partitions (both transports) equals
Σ over ranks of g², for world sizes 2, 3, 4, uneven sizes and a subgroup."""

from __future__ import annotations

import pytest
import torch

from vrgd_ds.comm import owners_of

from .comm_bodies import owners_case, reduce_scatter_case
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


def test_owners_of_splits_a_tensor_over_the_partitions():
    # partitions of 4: a tensor at 2 of 9 elements spans ranks 0 (2 elements), 1 (4), 2 (3)
    assert owners_of(2, 9, 4) == [(0, 0, 2, 2), (1, 2, 6, 0), (2, 6, 9, 0)]
    assert owners_of(4, 4, 4) == [(1, 0, 4, 0)]  # exactly one partition
    assert owners_of(3, 1, 4) == [(0, 0, 1, 3)]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_reduce_squares_to_owners(world):
    """ZeRO 1/2 per_micro_step's two transports: uneven tensors straddling uneven partitions."""
    for rank, (got, expected) in enumerate(run_ranks(owners_case, world, [5, 1, 12, 3, 7], timeout=120)):
        for transport, partition in got.items():
            assert torch.allclose(partition, expected, rtol=1e-6, atol=1e-6), (rank, transport, partition, expected)
