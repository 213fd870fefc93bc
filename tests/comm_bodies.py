"""Rank bodies for tests/test_comm.py."""

from __future__ import annotations

import torch
import torch.distributed as dist

from vrgd_ds.comm import pairwise_reduce_scatter


def reduce_scatter_case(rank: int, world: int, sizes: list[int]):
    """For each partition size: every rank's full buffer is its own deterministic random vector;
    returns this rank's reduced partition and the expected one (from every rank's vector)."""
    out = []
    for tag, size in enumerate(sizes):
        fulls = [
            torch.randn(size * world, generator=torch.Generator().manual_seed(100 * q + size)) for q in range(world)
        ]
        partition = torch.full((size,), float("nan"))
        got = pairwise_reduce_scatter(fulls[rank].clone(), partition, None, tag=tag)
        expected = sum(f[rank * size : (rank + 1) * size] for f in fulls)
        out.append((got.clone(), expected, got.data_ptr() == partition.data_ptr()))
    # A subgroup: the odd-indexed ranks (global ranks ≠ group ranks), when there are 2+ of them.
    members = list(range(1, world, 2))
    group = dist.new_group(members) if len(members) > 1 else None
    if group is not None and rank in members:
        r = members.index(rank)
        fulls = [torch.arange(3 * len(members), dtype=torch.float32) * (q + 1) for q in range(len(members))]
        part = pairwise_reduce_scatter(fulls[r].clone(), torch.empty(3), group, tag=99)
        out.append((part.clone(), sum(f[3 * r : 3 * r + 3] for f in fulls), True))
    try:  # a full buffer that is not world × partition: a clear error, before any transfer
        pairwise_reduce_scatter(torch.zeros(world * 2 + 1), torch.zeros(2))
    except ValueError as exc:
        out.append(str(exc))
    return out
