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


def owners_in_rank_order_case(rank: int, world: int, sizes: list[int], in_rank_order: bool = True):
    """As :func:`owners_case` over two micro-batches, point to point with Σg beside g² (``sums``):
    returns this rank's partitions of g² and g and the expected ones — each micro-batch's values
    summed in rank order (g_0 + g_1 + ... in fp32), then added up over the micro-batches — which
    the owner must reproduce bit for bit with ``in_rank_order``, whichever rank it is."""
    part = -(-sum(sizes) // world)
    partition, sums = torch.zeros(part), torch.zeros(part)
    pending = []
    squares, firsts = torch.zeros(part * world), torch.zeros(part * world)
    for micro in range(2):
        offset = 0
        for tag, g in enumerate(_grads(rank + 100 * micro, sizes)):
            owners = owners_of(offset, g.numel(), part)
            pending = reduce_squares_to_owners(
                g, owners, partition, rank, list(range(world)), None, True, tag, pending, sums, in_rank_order
            )
            offset += g.numel()
        grads = [torch.cat(_grads(q + 100 * micro, sizes)) for q in range(world)]
        micro_squares, micro_firsts = grads[0] * grads[0], grads[0].clone()
        for g in grads[1:]:
            micro_squares, micro_firsts = micro_squares + g * g, micro_firsts + g
        squares[: micro_squares.numel()] += micro_squares
        firsts[: micro_firsts.numel()] += micro_firsts
    for work, _ in pending:
        work.wait()
    mine = slice(rank * part, (rank + 1) * part)
    return (partition, sums), (squares[mine], firsts[mine])


def ties_case(rank: int, world: int):
    """4 ranks as 2 "stages" (0, 1 and 2, 3) whose copies of two tied tensors (layout columns 1 and
    3 of 4) are tied over {0, 2} and {1, 3}: per-tensor sums that differ in the last bits between
    the members, completed by ``agree_over_ties`` after an inner ``complete`` (here: +1 on every
    value). Returns the completed sums of a finite case and of one where rank 3 holds an inf in an
    untied column."""
    from vrgd_ds.comm import agree_over_ties

    groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    group = groups[rank % 2]

    def inner(vec):
        vec.add_(1.0)

    complete = agree_over_ties(inner, 4, [(group, [1, 3])])
    vec = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]) * (1 + 1e-7 * rank)
    complete(vec)
    inf = torch.tensor([10.0, 20.0, 30.0, 40.0])
    if rank == 3:
        inf[2] = float("inf")
    complete(inf)
    return vec, inf
