"""Plain torch.distributed helpers the moment sources use (no DeepSpeed in here).

gloo implements ``reduce_scatter_tensor`` as an all-reduce of a full copy (twice a
reduce-scatter's bytes on the wire, plus a full-size temporary); :func:`pairwise_reduce_scatter`
(a flat buffer, ZeRO 1/2) and :func:`reduce_scatter_rows` (a (w, n) bucket, ZeRO-3) do the same
reduction with point-to-point transfers of exactly the reduce-scatter minimum;
:func:`reduce_squares_to_owners` reduces one tensor's g² onto the rank(s) owning its elements as
backward produces it (``dist.reduce``, or point-to-point sends on gloo, whose reduce sends ~2.2×
a reduce's share).
:func:`all_reduce_sum` is the ``complete`` callback of a
:class:`~vrgd_ds.segments.SegmentLayout` whose tensors are spread over a group;
:func:`all_reduce_sum_sharded` the one under tensor parallelism (sharded tensors' sums completed
over the tensor-parallel group too); :func:`agree_over_ties` wraps either where the layout holds
weights tied across pipeline stages (every copy's sums made bit-identical over its tie group).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "agree_over_ties",
    "all_reduce_sum",
    "all_reduce_sum_sharded",
    "owners_of",
    "pairwise_reduce_scatter",
    "reduce_scatter_rows",
    "reduce_squares_to_owners",
]


def pairwise_reduce_scatter(full: Tensor, partition: Tensor, group=None, tag: int = 0) -> Tensor:
    """``partition`` ← Σ over the ranks of ``group`` of their ``full[r·P:(r+1)·P]`` (r = this
    rank's index in the group, P = ``partition.numel()``, ``full.numel()`` = P·w).

    In round s = 1..w−1 this rank sends rank (r+s) mod w that rank's slice and receives its own
    slice from rank (r−s) mod w: 4·P·(w−1) bytes sent per rank (fp32), the reduce-scatter minimum.
    Every rank of the group must call it with the same sizes and ``tag``. Returns ``partition``.
    """
    w = dist.get_world_size(group=group)
    r = dist.get_rank(group=group)
    size = partition.numel()
    if full.numel() != size * w:
        raise ValueError(f"full has {full.numel()} elements; expected partition size {size} × world size {w}")

    def peer(q):
        return dist.get_global_rank(group, q) if group is not None else q

    def slice_of(q):
        return full[q * size : (q + 1) * size]

    if w == 1:
        return partition.copy_(full)
    incoming = partition if w == 2 else torch.empty_like(partition)
    if w > 2:
        partition.copy_(slice_of(r))
    for s in range(1, w):
        dst, src = (r + s) % w, (r - s) % w
        sent = dist.isend(slice_of(dst), dst=peer(dst), group=group, tag=tag)
        dist.irecv(incoming, src=peer(src), group=group, tag=tag).wait()
        sent.wait()
        if w > 2:
            partition.add_(incoming)
    if w == 2:
        partition.add_(slice_of(r))
    return partition


def reduce_scatter_rows(
    rows: Tensor, group, rank: int, global_ranks: list[int], pairwise: bool, comm_group=None, tag: int = 0
) -> Tensor:
    """Σ over the w ranks of ``group`` of row ``rank`` of every rank's (w, n) ``rows``; a new (n,) tensor.

    ``pairwise``: in round s = 1..w−1 send rank (r+s) mod w its row and receive ours from rank
    (r−s) mod w — 4·n·(w−1) bytes per rank, the reduce-scatter minimum (``global_ranks[q]``: the
    global rank of group member q). Else one ``dist.reduce_scatter`` over ``comm_group`` (default
    ``group``). Every rank of the group must call it with the same shapes and ``tag``.
    """
    w, r = rows.shape[0], rank
    if w == 1:
        return rows[0].clone()
    rows = rows if rows.stride(1) == 1 else rows.contiguous()
    if not pairwise:
        out = torch.empty(rows.shape[1], dtype=rows.dtype, device=rows.device)
        dist.reduce_scatter(
            out,
            [rows[q].contiguous() for q in range(w)],
            op=dist.ReduceOp.SUM,
            group=comm_group if comm_group is not None else group,
        )
        return out
    out = rows[r].clone()
    incoming = torch.empty_like(out)
    for s in range(1, w):
        dst, src = (r + s) % w, (r - s) % w
        row = rows[dst] if rows[dst].is_contiguous() else rows[dst].contiguous()
        sent = dist.isend(row, dst=global_ranks[dst], group=group, tag=tag)
        dist.irecv(incoming, src=global_ranks[src], group=group, tag=tag).wait()
        sent.wait()
        out.add_(incoming)
    return out


def all_reduce_sum(group, world: int):
    """``complete(vec)`` for a SegmentLayout whose tensors are spread over ``group`` (``world``
    ranks): an in-place all-reduce of the per-tensor partial sums (nothing for a group of one)."""

    def complete(vec: Tensor) -> None:
        if world > 1:
            dist.all_reduce(vec, op=dist.ReduceOp.SUM, group=group)

    return complete


def all_reduce_sum_sharded(group, world: int, tp_group, tp_world: int, sharded: list[bool]):
    """``complete(vec)`` for a SegmentLayout under tensor parallelism: the per-tensor partial sums
    (``vec``: rows of one value per tensor, ``len(sharded)`` per row) all-reduced over ``group``
    (the data-parallel ranks sharing the flat tensor), then the columns of the tensors marked
    ``sharded`` — split over the ``tp_world`` ranks of ``tp_group`` — all-reduced over that group
    too; replicated tensors' columns never are (their sums are whole on every rank)."""
    n = len(sharded)
    columns = [i for i, s in enumerate(sharded) if s]
    cache = {}

    def complete(vec: Tensor) -> None:
        if world > 1:
            dist.all_reduce(vec, op=dist.ReduceOp.SUM, group=group)
        if tp_world == 1 or not columns:
            return
        if vec.numel() % n:
            raise ValueError(f"per-tensor sums of {vec.numel()} values for {n} tensors")
        rows = vec.view(-1, n)
        if len(columns) == n:
            dist.all_reduce(vec, op=dist.ReduceOp.SUM, group=tp_group)
            return
        index = cache.get(vec.device)
        if index is None:
            index = cache[vec.device] = torch.tensor(columns, dtype=torch.long, device=vec.device)
        part = rows.index_select(1, index)
        dist.all_reduce(part, op=dist.ReduceOp.SUM, group=tp_group)
        rows.index_copy_(1, index, part)

    return complete


def agree_over_ties(complete, num_tensors: int, ties: list[tuple[object, list[int]]]):
    """``complete(vec)`` for a SegmentLayout holding weights tied across pipeline stages: first
    ``complete`` (the data- and tensor-parallel completion; None: nothing), then the columns of the
    tied tensors (``ties``: (tie group, their indices in the layout), in one order on every member
    — the tie keys') made bit-identical on every member of their tie group by one all-reduce MAX
    per group (rows of ``num_tensors`` values, as :func:`all_reduce_sum_sharded`).

    Why: every stage holds a copy of a tied weight inside its own flat partitions, cut at other
    elements over its data-parallel ranks (the stages' other tensors differ), so each stage adds
    its per-tensor sums (layer mean of r, LAMB/LARS norms) from other partial sums: mathematically
    equal, a rounding apart (1 ulp of the sum, e.g. 1.9e-6 of Σr = 24.3 — the copies drifted by
    1e-8 to 6e-8 within a few steps). The MAX of the members' values is one of them, the same bits
    on every member; a sum or mean would round again. Every member also gets a flag of non-finite
    sums anywhere in this ``vec`` on any member: then its tied columns become NaN on every member,
    so every copy skips the step or none does (VROptimizer checks the completed sums), and no copy
    waits for a collective another copy skipped. Cost: one all-reduce of (rows × tied columns + 1)
    floats per tie group per completion, where a layout holds a tied tensor only. Blocking: it
    runs in the optimizer step, after the pipeline's backward passes, never in a hook.
    """
    cache: dict = {}

    def complete_tied(vec: Tensor) -> None:
        if complete is not None:
            complete(vec)
        if vec.numel() % num_tensors:
            raise ValueError(f"per-tensor sums of {vec.numel()} values for {num_tensors} tensors")
        rows = vec.view(-1, num_tensors)
        for group, columns in ties:
            index = cache.get((vec.device, id(columns)))
            if index is None:
                index = cache[vec.device, id(columns)] = torch.tensor(columns, dtype=torch.long, device=vec.device)
            nonfinite = (~torch.isfinite(vec)).any().to(vec.dtype).view(1)
            part = torch.cat([rows.index_select(1, index).reshape(-1), nonfinite])
            dist.all_reduce(part, op=dist.ReduceOp.MAX, group=group)
            agreed = part[:-1].view(rows.shape[0], len(columns))
            agreed = torch.where(part[-1:] > 0, torch.full_like(agreed, float("nan")), agreed)
            rows.index_copy_(1, index, agreed)

    return complete_tied


def owners_of(offset: int, numel: int, part_size: int) -> list[tuple[int, int, int, int]]:
    """Which ranks own the elements of a tensor at ``offset`` (``numel`` elements) in a flat group
    split into partitions of ``part_size`` (rank r owns [r·part_size, (r+1)·part_size)):
    ``(owner, a, b, offset in the owner's partition)`` for elements [a, b) of the tensor, in rank
    order — the ``owners`` of :func:`reduce_squares_to_owners`."""
    out = []
    for owner in range(offset // part_size, (offset + numel - 1) // part_size + 1):
        lo, hi = max(offset, owner * part_size), min(offset + numel, (owner + 1) * part_size)
        out.append((owner, lo - offset, hi - offset, lo - owner * part_size))
    return out


def reduce_squares_to_owners(
    g: Tensor,
    owners: list[tuple[int, int, int, int]],
    partition: Tensor,
    rank: int,
    global_ranks: list[int],
    group,
    pairwise: bool,
    tag: int,
    pending: list,
    sums: Tensor | None = None,
    in_rank_order: bool = False,
) -> list:
    """Add Σ over the ranks of ``group`` of g² (``g``: one tensor's flat fp32 gradient on this rank)
    into the partitions that own its elements: ``owners`` holds (owner, a, b, offset) — elements
    [a, b) of the tensor belong to group member ``owner``, at ``offset`` in its partition; this rank
    adds into ``partition``. With ``sums`` (a partition-sized tensor) Σ over the ranks of g itself
    is added there too, in the same transfer (each piece travels as [g² | g]). Every rank calls it
    for the same tensors in the same order, with a ``tag`` of its own per tensor.

    ``pairwise`` (gloo, or a group of one): the owner adds its own squares and receives every other
    rank's; the others send theirs without waiting (backward goes on) — the sends still in flight
    are returned, with their buffers kept alive, in ``pending`` (wait on them before the partition
    is read). Else one ``dist.reduce`` per owner. Returns the new ``pending``.

    ``in_rank_order`` (pairwise): the owner sums the ranks' [g² | g], each rounded as sent, in rank
    order and adds that sum to its partition — the same bits whichever rank owns an element. By
    default it adds its own g² first, fused (``addcmul_``, no temporary), then each received one:
    the rounding then depends on the owner. A weight tied across pipeline stages is owned by other
    ranks on each stage (each stage cuts its own flat buffer), so its copies need the first (measured
    with 2 data-parallel ranks: the copies drifted by 1.5e-8 after 6 steps otherwise). Costs one
    more temporary of the piece and one more pass over it. (``dist.reduce`` of two ranks' values is
    a + b on either owner; with more ranks its order is the backend's, as for DeepSpeed's gradients.)
    """

    def payload(piece: Tensor) -> Tensor:
        if sums is None:
            return piece * piece
        return torch.cat([piece * piece, piece])

    def add_into(dst_offset: int, n: int, values: Tensor) -> None:
        partition[dst_offset : dst_offset + n].add_(values[:n])
        if sums is not None:
            sums[dst_offset : dst_offset + n].add_(values[n:])

    if not pairwise:
        for owner, a, b, dst_offset in owners:
            piece = payload(g[a:b])
            dist.reduce(piece, dst=global_ranks[owner], op=dist.ReduceOp.SUM, group=group)
            if owner == rank:
                add_into(dst_offset, b - a, piece)
        return pending
    for owner, a, b, dst_offset in owners:
        piece = g[a:b]
        if owner == rank and in_rank_order:
            total = None
            for src in range(len(global_ranks)):
                if src == rank:
                    value = payload(piece)
                else:
                    value = torch.empty(piece.numel() * (1 if sums is None else 2), dtype=g.dtype, device=g.device)
                    dist.irecv(value, src=global_ranks[src], group=group, tag=tag).wait()
                total = value if total is None else total.add_(value)
            add_into(dst_offset, b - a, total)
        elif owner == rank:
            n = b - a
            partition[dst_offset : dst_offset + n].addcmul_(piece, piece)
            if sums is not None:
                sums[dst_offset : dst_offset + n].add_(piece)
            incoming = None
            for src in range(len(global_ranks)):
                if src != rank:
                    if incoming is None:
                        incoming = torch.empty(n if sums is None else 2 * n, dtype=g.dtype, device=partition.device)
                    dist.irecv(incoming, src=global_ranks[src], group=group, tag=tag).wait()
                    add_into(dst_offset, n, incoming)
        else:
            sent = payload(piece)
            pending.append((dist.isend(sent, dst=global_ranks[owner], group=group, tag=tag), sent))
    return [(w, t) for w, t in pending if not w.is_completed()]
