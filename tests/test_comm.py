"""vrgd_ds.comm on gloo directly (no DeepSpeed): the point-to-point reduce-scatter equals the sum
of every rank's slice, and the reduction of g² to the owning partitions (both transports) equals
Σ over ranks of g², for world sizes 2, 3, 4, uneven sizes and a subgroup; in rank order, the same
bits on any owner; per-tensor sums agreed on over tie groups (agree_over_ties)."""

from __future__ import annotations

import pytest
import torch

from vrgd_ds.comm import owners_of

from .comm_bodies import owners_case, owners_in_rank_order_case, reduce_scatter_case, ties_case
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


@pytest.mark.parametrize("world", [2, 3])
def test_reduce_squares_to_owners_in_rank_order_same_bits_on_any_owner(world):
    """in_rank_order: the owner's Σg² and Σg are the ranks' values summed in rank order, bit for
    bit, whichever rank owns an element (a weight tied across pipeline stages is owned by other
    ranks on each stage)."""
    sizes = [5, 1, 12, 3, 7, 300]
    for rank, ((squares, sums), (expected_squares, expected_sums)) in enumerate(
        run_ranks(owners_in_rank_order_case, world, sizes, timeout=120)
    ):
        assert torch.equal(squares, expected_squares), (rank, squares - expected_squares)
        assert torch.equal(sums, expected_sums), (rank, sums - expected_sums)
    # By default the owner adds its own values first: other bits (what drifted tied copies apart).
    results = run_ranks(owners_in_rank_order_case, world, sizes, False, timeout=120)
    assert any(not torch.equal(got[0], expected[0]) for got, expected in results)


def test_agree_over_ties_same_bits_on_every_copy():
    """The tied columns are one member's value (the MAX) on every member of each tie group, after
    the inner completion; the other columns keep this rank's; a non-finite sum on one member makes
    the tied columns NaN on every member of its tie group (every copy skips the step)."""
    results = run_ranks(ties_case, 4, timeout=120)
    for rank, (vec, inf) in enumerate(results):
        peer_vec, peer_inf = results[(rank + 2) % 4]
        assert torch.equal(vec[:, [1, 3]], peer_vec[:, [1, 3]])
        assert torch.equal(vec[:, [1, 3]], torch.maximum(vec, peer_vec)[:, [1, 3]])
        mine = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]) * (1 + 1e-7 * rank) + 1
        assert torch.equal(vec[:, [0, 2]], mine[:, [0, 2]])
        if rank % 2 == 1:  # tied with rank 3, whose sums hold an inf
            assert torch.isnan(inf[[1, 3]]).all(), inf
        else:
            assert torch.equal(inf, torch.tensor([11.0, 21.0, 31.0, 41.0])), inf
