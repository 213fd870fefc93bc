"""ZeRO 1/2 (DeepSpeedZeroOptimizer, runtime/zero/stage_1_and_2.py): VRGD moments on this rank's flat partitions.

What the inner optimizer gets: per param group one flat fp32 tensor, this rank's partition
(``single_partition_of_fp32_groups[i]``), whose ``.grad`` is the reduced gradient partition
(layout: :func:`~vrgd_ds.deepspeed_glue.layouts.zero_layouts`).

:class:`ZeroMomentSource` reduces the hooks' g² onto exactly that partition, by one of two
strategies (README "The two ZeRO moment-reduction strategies"):

* ``per_step``: one full-size fp32 accumulator per rank, in the order gradients arrive
  (:class:`~vrgd_ds.deepspeed_glue.ipg_buckets.BucketSamples`), gathered once per step into the
  partitions' layout and reduce-scattered (``reduce_scatter_tensor``; on gloo,
  :func:`vrgd_ds.comm.pairwise_reduce_scatter`: each rank sends every other rank exactly the
  elements that rank owns, the reduce-scatter minimum 4·N·(w−1)/w bytes);
* ``per_micro_step``: partition-sized buffers only; the g² of each tensor is reduced to its owning
  rank(s) as backward produces it (:func:`vrgd_ds.comm.reduce_squares_to_owners`: ``dist.reduce``
  per owner; on gloo, whose reduce sends ~2.2× a reduce's share, non-blocking sends to the owner,
  which receives from every other rank).
  Needs every rank to produce gradients for the same tensors in the same order, as ZeRO-2's own
  bucketing does. With one data-parallel rank the samples are added into the partition in place
  (:class:`~vrgd_ds.deepspeed_glue.ipg_buckets.PartitionSamples`).

Where the samples come from (``sample_path``): ``"ipg"`` — ZeRO-2's own gradient bucket, read
just before DeepSpeed reduces it (no hooks: 2 operators per bucket); ``"held"`` — hooks that
hold each micro-batch's gradient, added a bucket at a time (ZeRO-1, BF16_Optimizer, and ZeRO-2
where its bucket does not hold the gradient's own values); ``"hooks"`` — tensor by tensor
(``per_micro_step`` at w > 1, which sends each tensor's squares to its owners as it arrives).

:func:`zero_source` wires it: r is formed from the reduced partition just before DeepSpeed
unscales and clips it (a wrapped ``unscale_and_clip_grads``, stage_1_and_2.py:3193, called from
``step`` at :3080/:3133), so r is independent of the loss scale and of ``gradient_clipping``.
BF16_Optimizer reuses the source through a view of its layout (:mod:`.bf16`).
"""

from __future__ import annotations

from operator import itemgetter

import torch
import torch.distributed as dist
from torch import Tensor

from ..comm import owners_of, pairwise_reduce_scatter, reduce_squares_to_owners
from ..optimizer import VROptimizer
from ..segments import SegmentLayout
from .ipg_buckets import BucketSamples, PartitionSamples
from .source import DeepSpeedMomentSource, wrap_method

__all__ = ["ZeroMomentSource", "zero_source"]

_param_id = itemgetter(2)  # DeepSpeed's bucket entries: (group index, index in group, param id)


class ZeroMomentSource(DeepSpeedMomentSource):
    """ZeRO 1/2: Σg² reduced onto this rank's flat partition of every param group."""

    checks_finite_locally = False

    def __init__(self, optimizer, zero_opt, strategy: str, names=None, track_first: bool = False, ties=None):
        group0 = zero_opt.real_dp_process_group[0]
        super().__init__(optimizer, dist.get_world_size(group=group0), group0, names, track_first)
        self.zero_opt = zero_opt
        self.strategy = strategy
        self.rank = dist.get_rank(group=group0)
        # gloo implements reduce_scatter_tensor as an all-reduce of a full copy (2x the bytes of a
        # reduce-scatter on the wire, plus a full-size temporary) and its reduce sends ~2.2x a
        # reduce's share: use point-to-point transfers there (sends still pending: _pending).
        # (An attribute read at every use, so tests can run the collective path on gloo too.)
        self.pairwise_exchange = dist.get_backend(group0) == "gloo"
        # per_micro_step sinks issue collectives: tied weights' samples reach them in ensure_reduced.
        self.tied.eager = strategy == "per_step"
        self._pending: list = []
        # Moments per element: Σg², and Σg with 16-bit gradients. Every buffer is laid out
        # (moments, partition) per rank — [Σg² | Σg] of one partition side by side — so one
        # reduce-scatter (or one transfer per owner) carries both.
        self.moments = 2 if self.tracks_first else 1
        self.full: list[Tensor | None] = []
        self.views: list[list[tuple[Tensor, list[tuple[int, int, Tensor, Tensor | None]]]]] = []
        self.partitions: list[Tensor] = []
        # ZeRO-Offload (offload_optimizer): the fp32 partition, its gradient and the inner step
        # live on the host while backward's gradients stay on the accelerator. The moments are
        # accumulated and reduced where the gradients are, then copied once per step into a host
        # buffer of the partition's size, where r is formed next to the gradient (stage_1_and_2.py:3077).
        self.offload = bool(getattr(zero_opt, "cpu_offload", False))
        self.host: list[Tensor | None] = []
        self.group_tensors: dict[int, list[Tensor]] = {}
        m = self.moments
        #: ZeRO-2: Σg² (and Σg) of each gradient bucket DeepSpeed reduces, by one or two operators
        #: per bucket (:mod:`.ipg_buckets`); None where the samples come from per-tensor hooks.
        self.buckets: BucketSamples | None = None
        #: Where the samples come from: "ipg" (ZeRO-2's buckets), "held" (per-tensor hooks whose
        #: gradients are held and added a bucket at a time), "hooks" (added tensor by tensor).
        self.sample_path = "hooks"
        if self.bucket_samples_apply(zero_opt, strategy, ties):
            self.sample_path = "ipg"
        elif self.use_bucket_samples and (strategy == "per_step" or self.world_size == 1):
            self.sample_path = "held"
        for i, tensors in enumerate(zero_opt.round_robin_bit16_groups):
            group = zero_opt.real_dp_process_group[i]
            padded = zero_opt.bit16_groups_flat[i].numel()
            part_size = int(zero_opt.partition_size[i])
            assert part_size * self.world_size == padded, "unexpected ZeRO partitioning"
            inner = zero_opt.single_partition_of_fp32_groups[i]
            device = zero_opt.bit16_groups_flat[i].device  # where the hooks' gradients are
            partition = torch.zeros(m, part_size, dtype=torch.float32, device=device)
            self.partitions.append(partition)
            host = None
            if self.offload:
                pin = inner.device.type == "cpu" and device.type != "cpu"
                host = torch.zeros(m, part_size, dtype=torch.float32, device=inner.device, pin_memory=pin)
            self.host.append(host)
            moments = host if host is not None else partition
            self.sq[id(inner)] = moments[0]
            if self.tracks_first:
                self.first[id(inner)] = moments[1]
            self.group_tensors[id(zero_opt.single_partition_of_fp32_groups[i])] = list(tensors)
            if self.sample_path == "ipg":
                continue  # samples come from ZeRO-2's buckets (:meth:`_add_buckets`), not from hooks
            if self.sample_path == "held":
                for p in tensors:
                    self.handles.append(p.register_hook(self.samples.hook(p, self.tied.wrap(p, self._holder(p)))))
                continue
            full = torch.zeros(self.world_size, m, part_size, dtype=torch.float32, device=device)
            full = full if strategy == "per_step" else None
            self.full.append(full)
            offsets = zero_opt.round_robin_bit16_offsets[i]
            if full is not None:
                self.views.append(
                    [(p, self._views_of(full, offset, p.numel(), part_size)) for p, offset in zip(tensors, offsets)]
                )
            for p, offset in zip(tensors, offsets):
                self.handles.append(
                    p.register_hook(
                        self.samples.hook(p, self.tied.wrap(p, self._make_sink(i, p, offset, part_size, group)))
                    )
                )
        if self.sample_path != "hooks":
            self.buckets = self._bucket_samples(zero_opt, m, by_param_id=self.sample_path == "ipg")
        if self.sample_path == "ipg":
            wrap_method(zero_opt, "reduce_ipg_grads", before=self._add_buckets)
        elif self.sample_path == "held" and hasattr(zero_opt, "reduce_ipg_grads"):
            # A held sample can be the very tensor autograd made the parameter's .grad, and ZeRO's
            # bucket reduction may write the reduced values back into it mid-backward (its
            # non-contiguous fallback): the held samples go in first.
            wrap_method(zero_opt, "reduce_ipg_grads", before=lambda *a, **k: self._add_held())

    def bucket_samples_apply(self, zero_opt, strategy: str, ties) -> bool:
        """Whether ZeRO's IPG buckets hold exactly one sample of each of their tensors, in the
        gradient's own dtype, and one accumulator per step serves: ZeRO-2 (ZeRO-1 reduces the
        accumulated ``.grad`` at the boundary only), buckets in the gradients' dtype (16-bit
        ``communication_data_type`` on an fp32 model rounds them), no ZenFlow (it transposes
        2-D gradients into the bucket), no weights tied across pipeline stages, and the
        ``per_step`` reduction or one data-parallel rank (``per_micro_step`` at w > 1 sends each
        tensor's squares to its owners as it arrives)."""
        if not (self.use_bucket_samples and getattr(zero_opt, "partition_gradients", False)):
            return False
        if ties or getattr(zero_opt, "zenflow", False) or not hasattr(zero_opt, "ipg_buckets"):
            return False
        if strategy != "per_step" and self.world_size > 1:
            return False
        tensors = [p for group in zero_opt.round_robin_bit16_groups for p in group]
        return all(zero_opt.get_param_comm_dtype(p) == p.dtype for p in tensors)

    def _bucket_samples(self, zero_opt, moments: int, by_param_id: bool) -> BucketSamples:
        groups, key_of = [], {}
        for i, tensors in enumerate(zero_opt.round_robin_bit16_groups):
            entries = []
            for p, offset in zip(tensors, zero_opt.round_robin_bit16_offsets[i]):
                key = zero_opt.get_param_id(p) if by_param_id else id(p)
                key_of[key] = id(p)
                entries.append((key, p.numel(), int(offset)))
            groups.append((entries, zero_opt.bit16_groups_flat[i].numel()))
        if self.world_size == 1 and self.strategy != "per_step":
            # The partition is the whole flat group: add into it in place, no second copy of N.
            dst = {}
            for i, (entries, _) in enumerate(groups):
                part = self.partitions[i]
                for key, n, offset in entries:
                    dst[key] = (part[0, offset : offset + n], part[1, offset : offset + n] if moments == 2 else None)
            buckets = PartitionSamples(dst, key_of, self.held_bucket_elements if moments == 2 else 0)
            self._hook_counts = buckets.counts
            return buckets
        device = zero_opt.bit16_groups_flat[0].device
        staging = 0 if by_param_id or moments == 1 else self.held_bucket_elements
        buckets = BucketSamples(groups, self.world_size, moments, device, key_of, staging)
        self._hook_counts = buckets.counts  # per-tensor sample counts, kept by the buckets
        return buckets

    def _add_buckets(self, comm_dtype=None) -> None:
        """Before DeepSpeed reduces its bucket(s) of ``comm_dtype`` (all when None), in place:
        their gradients into the arrival-order accumulator."""
        zo = self.zero_opt
        dtypes = list(zo.ipg_buckets) if comm_dtype is None else [comm_dtype]
        for dtype in dtypes:
            bucket = zo.ipg_buckets.get(dtype)
            if bucket is None or not bucket.params:
                continue
            self._note_sample_scale()
            flat, grads = None, None
            if not zo.contiguous_gradients:
                grads = list(bucket.grads)
            elif dtype in zo.extra_large_param_to_reduce:  # one tensor larger than a bucket
                grads = [zo.get_gradient_for_reduction(zo.extra_large_param_to_reduce[dtype])]
            else:
                flat = bucket.buffer[bucket.index].narrow(0, 0, bucket.elements)
            self.buckets.add(list(map(_param_id, bucket.params)), flat, grads)
            self.local_samples = self.buckets.local_samples

    def _views_of(self, full: Tensor, offset: int, numel: int, part_size: int):
        """(a, b, Σg² view, Σg view or None) of elements [a, b) of the tensor at ``offset`` in the
        (w, moments, P) accumulator: one entry per partition the tensor intersects (one whole
        flat view when only Σg² is kept, where the tensor is contiguous in ``full``)."""
        if self.moments == 1:
            return [(0, numel, full.view(-1)[offset : offset + numel], None)]
        return [
            (a, b, full[owner, 0, at : at + b - a], full[owner, 1, at : at + b - a])
            for owner, a, b, at in owners_of(offset, numel, part_size)
        ]

    def _make_sink(self, i, p, offset, part_size, group):
        numel = p.numel()
        if self.strategy == "per_step":
            views = self._views_of(self.full[i], offset, numel, part_size)

            def add_sample(grad):
                # fp32 accumulators, 16-bit samples: the in-place ops compute in fp32 (bit-identical
                # to casting first), without a cast's allocation and pass.
                g = grad.detach().reshape(-1)
                first_sample = self._hook_counts.get(id(p), 0) == 0
                for a, b, sq, s in views:
                    piece = g[a:b]
                    if first_sample:  # the step's first sample: no zeroing pass needed
                        if piece.dtype == torch.float32:
                            torch.mul(piece, piece, out=sq)
                        else:  # a 16-bit product would be rounded to 16 bits: square in fp32
                            sq.copy_(piece).mul_(piece)
                        if s is not None:
                            s.copy_(piece)
                    else:
                        sq.addcmul_(piece, piece)
                        if s is not None:
                            s.add_(piece)
                self._count(p)

            return add_sample

        # per_micro_step: reduce g² (and g) of this parameter to the rank(s) owning its elements.
        owners = owners_of(offset, numel, part_size)
        partition = self.partitions[i]
        global_ranks = [dist.get_global_rank(group, r) if group is not None else r for r in range(self.world_size)]
        tag = len(self.handles)  # this hook's index: the same on every rank

        def add_sample(grad):
            g = grad.detach().reshape(-1)
            if self.world_size > 1:  # squares sent to other ranks are formed in fp32
                g = g.float()
            self._pending = reduce_squares_to_owners(
                g,
                owners,
                partition[0],
                self.rank,
                global_ranks,
                group,
                pairwise=self.pairwise_exchange or self.world_size == 1,
                tag=tag,
                pending=self._pending,
                sums=partition[1] if self.tracks_first else None,
                # A weight tied across pipeline stages: its copies' Σg² the same bits on every stage.
                in_rank_order=id(p) in self.tied.groups,
            )
            self._count(p)

        return add_sample

    def ensure_reduced(self):
        if self._reduced:
            return
        self._deliver_samples()
        for work, _ in self._pending:
            work.wait()
        self._pending = []
        self._add_held()  # tied weights' samples completed by _deliver_samples
        if self.buckets is not None and not self.buckets.in_place:
            for i, partition in enumerate(self.partitions):
                group = self.zero_opt.real_dp_process_group[i]
                if self.world_size == 1:
                    self.buckets.gather(i, partition)
                    continue
                # The reduce-scatter's layout, only for the step's reduction (freed after it).
                full = torch.empty(self.world_size * partition.numel(), dtype=torch.float32, device=partition.device)
                self.buckets.gather(i, full)
                if self.pairwise_exchange:
                    pairwise_reduce_scatter(full, partition.view(-1), group, tag=i)
                else:
                    dist.reduce_scatter_tensor(partition.view(-1), full, op=dist.ReduceOp.SUM, group=group)
        elif self.strategy == "per_step":
            for i, (full, partition) in enumerate(zip(self.full, self.partitions)):
                # The hooks overwrite a tensor's slice at its first sample of the step; the slices
                # of tensors with no gradient this step still hold an earlier step's g².
                for p, views in self.views[i]:
                    if self._hook_counts.get(id(p), 0) == 0:
                        for _, _, sq, s in views:
                            sq.zero_()
                            if s is not None:
                                s.zero_()
                group = self.zero_opt.real_dp_process_group[i]
                full, partition = full.view(-1), partition.view(-1)
                if self.world_size == 1:
                    partition.copy_(full)
                elif self.pairwise_exchange:
                    pairwise_reduce_scatter(full, partition, group, tag=i)
                else:
                    dist.reduce_scatter_tensor(partition, full, op=dist.ReduceOp.SUM, group=group)
        for partition, host in zip(self.partitions, self.host):
            if host is not None:
                host.copy_(partition)  # 4·N/w bytes per moment to the host, once per step
        self._reduced = True

    def clear(self) -> None:
        for work, _ in self._pending:  # a step skipped on overflow never reduced its moments
            work.wait()
        self._pending = []
        super().clear()
        if self.buckets is not None:
            self.buckets.end_step()

    def _buffers_to_zero(self):
        # Buckets: one accumulator, zeroed per step; the partition is overwritten by the gather.
        # per_step: ``full`` is overwritten by each step's first samples (see the hook) and the
        # partition by the reduction; per_micro_step adds into the partition.
        if self.buckets is not None and not self.buckets.in_place:
            return [self.buckets.acc]
        return [] if self.strategy == "per_step" else self.partitions

    def tensor_sample_counts(self, inner: Tensor, layout: SegmentLayout) -> Tensor:
        """This rank's gradient-sample count of every tensor of ``inner``'s group (completed by
        the optimizer in its layer-mean all-reduce)."""
        tensors = self.group_tensors[id(inner)]
        return torch.tensor([float(self._hook_counts.get(id(t), 0)) for t in tensors], device=inner.device)

    def extra_buffer_bytes(self):
        what = "grad_sq_sum + grad_sum" if self.tracks_first else "grad_sq_sum"
        out = {f"{what} partition (fp32, per group)": sum(p.numel() for p in self.partitions) * 4}
        if self.offload:
            out[f"{what} host copy (fp32, offload_optimizer)"] = sum(h.numel() for h in self.host) * 4
        if self.buckets is not None and not self.buckets.in_place:
            out[f"{what} arrival-order accumulator (fp32, full size)"] = self.buckets.extra_bytes()
        elif self.buckets is not None and self.buckets.extra_bytes():
            out["fp32 staging of 16-bit samples"] = self.buckets.extra_bytes()
        elif self.strategy == "per_step":
            out[f"{what} local accumulator (fp32, full size)"] = sum(f.numel() for f in self.full) * 4
        return out


def zero_source(
    opt: VROptimizer, wrapper, strategy: str, names: dict, track_first: bool = False, ties=None
) -> DeepSpeedMomentSource:
    """ZeRO 1/2: r from the reduced partition just before DeepSpeed unscales and clips it."""
    source = ZeroMomentSource(opt, wrapper, strategy, names, track_first, ties)
    fp32_partitions = wrapper.single_partition_of_fp32_groups

    def before_unscale(grad_groups_flat, total_norm, *a, **k):
        grads = grad_groups_flat if isinstance(grad_groups_flat, (list, tuple)) else [grad_groups_flat]
        source.prepare([p for p in fp32_partitions if p.grad is not None and any(p.grad is g for g in grads)])

    wrap_method(wrapper, "unscale_and_clip_grads", before=before_unscale)
    return source
