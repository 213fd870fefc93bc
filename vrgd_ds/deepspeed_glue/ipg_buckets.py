"""ZeRO-2's gradient buckets as VR samples: Σg² (and Σg) with one or two operators per bucket.

ZeRO-2 (``partition_gradients``) copies every micro-batch's gradients into its IPG bucket, in the
order backward produces them, and reduces the bucket (``reduce_ipg_grads``, stage_1_and_2.py
~2205) before it accumulates anything: at that moment the bucket holds exactly one sample of each
of its tensors. :class:`BucketSamples` adds the bucket into an fp32 accumulator laid out in the
same *arrival order* (:class:`ArrivalLayout`) —

    acc[0, a:b] += bucket ⊙ bucket,    acc[1, a:b] += bucket     (Σg, 16-bit gradients only)

— one ``addcmul_`` (and one ``add_``) per bucket whatever the number of tensors in it, instead of a
Python hook and two kernels per tensor. In-place ops on an fp32 accumulator compute in fp32, so
the sums are bit-identical to the per-tensor hooks' (tested). Once per step :meth:`gather` maps
the accumulator onto the layout DeepSpeed partitions (flat group order, ``(w, moments, P)``) with
one ``torch.cat`` of precomputed views per param group.

The arrival order is learnt: the first guess is the reverse of the flat order (backward's usual
order); a bucket that is not a contiguous run of the layout (a model whose backward runs in
another order, tensors without a gradient in some micro-batches) is added tensor by tensor with
one ``torch._foreach_*`` call instead — exact either way — and the layout is rebuilt from that
step's arrival sequence when the step ends, so the steady state is one run per bucket.

Cost: ``moments × 4 × N`` bytes for the accumulator (as the per-step accumulator it replaces),
plus a transient ``moments × 4 × N`` when it is gathered into the reduce-scatter's layout at
world > 1; per micro-batch, ≤ 2 operators per bucket and a C-level walk over the bucket's
parameter ids (no Python per tensor).
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import Tensor

__all__ = ["ArrivalLayout", "BucketSamples", "PartitionSamples"]


def _count_samples(counts: Counter, local_samples: int, keys: list[int], tensor_key_of: dict[int, int]) -> int:
    """One sample more for each tensor of a bucket (C-level walks, no Python per tensor); returns
    the step's micro-batches so far (the most samples any tensor got)."""
    ids = list(map(tensor_key_of.__getitem__, keys))
    counts.update(ids)
    return max(local_samples, max(map(counts.__getitem__, ids)))


class ArrivalLayout:
    """Offsets of tensors packed in the order their gradients arrive.

    ``order``: the keys (DeepSpeed param ids), ``start[key]``: where the key's elements begin.
    :meth:`run` says where a sequence of keys lies when it is a contiguous run of the layout.
    """

    def __init__(self, order: list[int], numel: dict[int, int]):
        self.order = list(order)
        self.numel = numel
        self.position = {key: i for i, key in enumerate(self.order)}
        self.start: dict[int, int] = {}
        at = 0
        for key in self.order:
            self.start[key] = at
            at += numel[key]
        self.total = at

    def run(self, keys: list[int]) -> tuple[int, int] | None:
        """(a, b): the elements of ``keys`` when they are the layout's keys at consecutive
        positions in this order; else None."""
        if not keys:
            return None
        first = self.position.get(keys[0])
        if first is None or self.order[first : first + len(keys)] != keys:
            return None
        last = keys[-1]
        return self.start[keys[0]], self.start[last] + self.numel[last]

    def relearnt(self, sequence: list[int]) -> ArrivalLayout:
        """The layout of an observed arrival sequence: keys in order of first arrival, then the
        keys that did not arrive, in their old order."""
        seen = dict.fromkeys(k for k in sequence if k in self.numel)
        rest = [k for k in self.order if k not in seen]
        return ArrivalLayout(list(seen) + rest, self.numel)


class BucketSamples:
    """Σg² (and Σg) of gradient buckets in an arrival-order fp32 accumulator (module docstring).

    ``groups``: per param group, ``[(key, numel, offset in the flat group), ...]`` in flat
    order, and the group's padded size (keys: DeepSpeed's param ids, or any unique ints);
    ``world``: the data-parallel ranks the flat group is split over; ``tensor_key_of``: key →
    the key of the per-tensor sample counts; ``staging_elements``: the fp32 staging that packs
    buckets of separate 16-bit tensors; ``acc``: the accumulator to use (else allocated).
    :meth:`add` takes a bucket; :meth:`gather` writes the step's sums into a
    ``(world, moments, P)`` tensor per group; :meth:`end_step` relearns.
    """

    in_place = False  # the sums are gathered into the partitions' layout once per step

    def __init__(
        self,
        groups,
        world: int,
        moments: int,
        device,
        tensor_key_of: dict[int, int],
        staging_elements: int = 0,
        acc: Tensor | None = None,
    ):
        self.moments = moments
        #: Elements of the fp32 staging that packs a bucket of separate 16-bit tensors (0: none;
        #: allocated at first use, never more than all the tensors together).
        total = sum(n for entries, _ in groups for _, n, _ in entries)
        self.staging_elements = min(staging_elements, total)
        self._stage: Tensor | None = None
        self.world = world
        self.groups = groups
        numel = {pid: n for entries, _ in groups for pid, n, _ in entries}
        flat_order = [pid for entries, _ in groups for pid, _, _ in entries]
        self.layout = ArrivalLayout(flat_order[::-1], numel)
        if acc is None:
            acc = torch.zeros(moments, self.layout.total, dtype=torch.float32, device=device)
        #: (moments, N) fp32 in arrival order: Σg² (and Σg) of every tensor, at ``layout.start``;
        #: a caller's buffer (``acc``) when the sums are reduced in place, whatever their order.
        self.acc = acc
        # {param id: key of the per-tensor sample counts (id of the parameter)}
        self.tensor_key_of = tensor_key_of
        self.counts: Counter = Counter()
        self.local_samples = 0
        self._sequence: list[int] = []
        self._fallbacks = 0
        #: Buckets added so far as one run of the accumulator / by a foreach call (diagnostics, tests).
        self.runs_total = 0
        self.foreach_total = 0
        #: Buckets that were not one run of the layout (each makes the step relearn it).
        self.fallbacks_total = 0
        pad = max((size - sum(n for _, n, _ in entries) for entries, size in groups), default=0)
        self._zeros = torch.zeros(max(pad, 1), dtype=torch.float32, device=device)
        self._gather_views = self._build_gather_views()

    # -- per bucket ------------------------------------------------------------------------------
    def add(self, keys: list[int], flat: Tensor | None = None, grads: list[Tensor] | None = None) -> None:
        """One bucket: ``keys`` its tensors in arrival order, ``flat`` their gradients packed in
        that order (DeepSpeed's contiguous IPG buffer), or ``grads`` the tensors one by one
        (``contiguous_gradients: false``, a parameter larger than a bucket, held hook samples)."""
        if not keys:
            return
        self._sequence.extend(keys)
        self.local_samples = _count_samples(self.counts, self.local_samples, keys, self.tensor_key_of)
        run = self.layout.run(keys)
        if run is None:  # relearn the layout when the step ends
            self._fallbacks += 1
            self.fallbacks_total += 1
        if flat is None and len(grads) == 1:
            flat = grads[0].reshape(-1)
        if run is not None:
            a, b = run
            if flat is not None:
                self.acc[0, a:b].addcmul_(flat, flat)
                if self.moments == 2:
                    self.acc[1, a:b].add_(flat)
                self.runs_total += 1
                return
            if self.moments == 2 and b - a <= self.staging_elements:
                # Packed into fp32 staging (the cast is exact) beside a row of ones, so one
                # addcmul_ adds g·g to Σg² and 1·g = g to Σg (bit-identical to add_).
                stage = self._staging()[:, : b - a]
                torch.cat([g.reshape(-1) for g in grads], out=stage[0])
                self.acc[:, a:b].addcmul_(stage, stage[0])
                self.runs_total += 1
                return
        # Not one run of the layout, fp32 tensors (one foreach call, fused on a GPU), or a bucket
        # larger than the staging: tensor by tensor, one foreach call per moment.
        self.foreach_total += 1
        grads = [g.reshape(-1) for g in grads] if grads is not None else self._split(flat, keys)
        starts = map(self.layout.start.__getitem__, keys)
        dst = [self.acc[:, s : s + g.numel()] for s, g in zip(starts, grads)]
        torch._foreach_addcmul_([d[0] for d in dst], grads, grads)
        if self.moments == 2:
            torch._foreach_add_([d[1] for d in dst], grads)

    def _split(self, flat: Tensor, keys: list[int]) -> list[Tensor]:
        out, at = [], 0
        for key in keys:
            n = self.layout.numel[key]
            out.append(flat.narrow(0, at, n))
            at += n
        return out

    def _staging(self) -> Tensor:
        if self._stage is None:
            self._stage = torch.empty(2, self.staging_elements, dtype=torch.float32, device=self.acc.device)
            self._stage[1].fill_(1.0)
        return self._stage

    # -- per step --------------------------------------------------------------------------------
    def _build_gather_views(self) -> list[list[Tensor]]:
        """Per group, the views of ``acc`` (and zeros for padding) that, concatenated, are the
        group's ``(world, moments, P)`` layout: rank r's partition of each moment in turn."""
        out = []
        for entries, size in self.groups:
            part = size // self.world
            views = []
            for r in range(self.world):
                lo, hi = r * part, (r + 1) * part
                for j in range(self.moments):
                    at = lo
                    for pid, n, offset in entries:
                        a, b = max(offset, lo), min(offset + n, hi)
                        if a >= b:
                            continue
                        if a > at:  # a gap in the flat group (alignment padding)
                            views.append(self._zeros[: a - at])
                        s = self.layout.start[pid]
                        views.append(self.acc[j, s + a - offset : s + b - offset])
                        at = b
                    if hi > at:
                        views.append(self._zeros[: hi - at])
            out.append(views)
        return out

    def gather(self, i: int, out: Tensor) -> None:
        """Group ``i``'s sums in DeepSpeed's partition layout: ``out`` is ``(world, moments, P)``
        (any shape with that many elements, contiguous)."""
        torch.cat(self._gather_views[i], out=out.view(-1))

    def end_step(self) -> None:
        """Zero the accumulator and forget the counts; rebuild the layout from this step's arrival
        sequence if a bucket missed it."""
        self.acc.zero_()
        if self._fallbacks:
            self.layout = self.layout.relearnt(self._sequence)
            self._gather_views = self._build_gather_views()
        self._fallbacks = 0
        self._sequence = []
        self.counts.clear()
        self.local_samples = 0

    def extra_bytes(self, own_acc: bool = True) -> int:
        return ((self.acc.numel() if own_acc else 0) + 2 * self.staging_elements) * 4


class PartitionSamples:
    """Buckets added straight into flat partitions — one data-parallel rank with
    ``per_micro_step``, where the partition is the whole flat group and an arrival-order
    accumulator would double VR's memory. ``dst[key]``: the tensor's Σg² view and Σg view (or
    None). A bucket's tensors go to their places by foreach calls: fp32 gradients directly (one
    fused call per moment on a GPU); 16-bit ones first packed into an fp32 staging of at most
    ``staging_elements`` by one ``cat`` (exact), so that the foreach calls have one dtype and stay
    fused — 3 operators per staging-full. The interface of :class:`BucketSamples`, without a
    layout to learn or a gather."""

    in_place = True

    def __init__(
        self, dst: dict[int, tuple[Tensor, Tensor | None]], tensor_key_of: dict[int, int], staging_elements: int
    ):
        self.dst = dst
        self.moments = 2 if any(s is not None for _, s in dst.values()) else 1
        self.numel = {key: sq.numel() for key, (sq, _) in dst.items()}
        self.tensor_key_of = tensor_key_of
        self.staging_elements = min(staging_elements, sum(self.numel.values()))
        self._stage: Tensor | None = None
        self.counts: Counter = Counter()
        self.local_samples = 0
        self.runs_total = self.fallbacks_total = self.foreach_total = 0

    def add(self, keys: list[int], flat: Tensor | None = None, grads: list[Tensor] | None = None) -> None:
        if not keys:
            return
        self.local_samples = _count_samples(self.counts, self.local_samples, keys, self.tensor_key_of)
        if grads is None:
            grads = list(flat.split([self.numel[k] for k in keys]))
        grads = [g.reshape(-1) for g in grads]
        self.foreach_total += 1
        if all(g.dtype == torch.float32 for g in grads):
            self._into(keys, grads)
            return
        chunk, size = [], 0
        for key, g in zip(keys, grads):
            if chunk and size + g.numel() > self.staging_elements:
                self._staged(chunk, size)
                chunk, size = [], 0
            chunk.append((key, g))
            size += g.numel()
        self._staged(chunk, size)

    def _staged(self, chunk, size: int) -> None:
        keys = [k for k, _ in chunk]
        if size > self.staging_elements:  # one tensor larger than the staging: as it is
            self._into(keys, [g for _, g in chunk])
            return
        if self._stage is None:
            device = next(iter(self.dst.values()))[0].device
            self._stage = torch.empty(self.staging_elements, dtype=torch.float32, device=device)
        stage = self._stage[:size]
        torch.cat([g for _, g in chunk], out=stage)
        self._into(keys, list(stage.split([g.numel() for _, g in chunk])))

    def _into(self, keys: list[int], grads: list[Tensor]) -> None:
        torch._foreach_addcmul_([self.dst[k][0] for k in keys], grads, grads)
        if self.moments == 2:
            torch._foreach_add_([self.dst[k][1] for k in keys], grads)

    def end_step(self) -> None:
        self.counts.clear()
        self.local_samples = 0

    def extra_bytes(self, own_acc: bool = True) -> int:
        return self.staging_elements * 4
