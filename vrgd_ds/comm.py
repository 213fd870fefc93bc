"""Plain torch.distributed helpers the moment sources use (no DeepSpeed in here).

gloo implements ``reduce_scatter_tensor`` as an all-reduce of a full copy (twice a
reduce-scatter's bytes on the wire, plus a full-size temporary); :func:`pairwise_reduce_scatter`
does the same reduction with point-to-point transfers of exactly the reduce-scatter minimum.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["pairwise_reduce_scatter"]


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
