"""Rank bodies for tests/test_comm.py."""

from __future__ import annotations

import torch
import torch.distributed as dist

from vrgd_ds.comm import owners_of, pairwise_reduce_scatter, reduce_squares_to_owners


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


def _grads(rank: int, sizes: list[int]) -> list:
    gen = torch.Generator().manual_seed(1000 + rank)
    return [torch.randn(n, generator=gen) for n in sizes]


def owners_case(rank: int, world: int, sizes: list[int]):
    """Tensors of ``sizes`` in one flat group (padded to a multiple of ``world``), each rank with
    its own random gradients: every tensor's g² reduced onto the owning partitions, as ZeRO 1/2's
    per_micro_step hooks do, by each transport. Returns {transport: this rank's partition} and
    the expected partition (Σ over ranks of g²)."""
    part = -(-sum(sizes) // world)
    got = {}
    for pairwise in (True, False):
        partition = torch.zeros(part)
        pending, offset = [], 0
        for tag, g in enumerate(_grads(rank, sizes)):
            owners = owners_of(offset, g.numel(), part)
            pending = reduce_squares_to_owners(
                g, owners, partition, rank, list(range(world)), None, pairwise, tag, pending
            )
            offset += g.numel()
        for work, _ in pending:
            work.wait()
        got["point_to_point" if pairwise else "reduce"] = partition
    total = sum(torch.cat(_grads(q, sizes)) ** 2 for q in range(world))
    total = torch.cat([total, torch.zeros(part * world - total.numel())])
    return got, total[rank * part : (rank + 1) * part]
