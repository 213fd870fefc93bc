"""Per-tensor :class:`~vrgd_ds.segments.SegmentLayout` of the flat tensors ZeRO hands the inner optimizer.

* ZeRO 1/2 (and BF16_Optimizer through :class:`~vrgd_ds.deepspeed_glue.bf16.BF16OptimizerLayout`),
  :func:`zero_layouts`: per param group i the trainable tensors are flattened in (round-robin)
  order at ``round_robin_bit16_offsets[i]``, padded at the end to a multiple of the w
  data-parallel ranks and cut into w equal partitions of ``partition_size[i]`` elements
  (runtime/zero/stage_1_and_2.py); rank q's partition [q·P, (q+1)·P) becomes pieces of the
  tensors it intersects (a tensor may straddle two ranks) and its padding.
* ZeRO-3, :func:`zero3_layouts`: one flat tensor per sub-group (``fp32_partitioned_groups_flat``),
  each parameter partitioned on its own — with J elements, ps = ceil(J/w) per rank, rank q the
  elements [q·ps, (q+1)·ps) ∩ [0, J), the rest of its slice padding (runtime/zero/stage3.py).

Every layout's ``complete`` is an all-reduce over the group the partitions are spread over
(:func:`vrgd_ds.comm.all_reduce_sum`): per-tensor sums are over whole tensors, padding skipped.
Under tensor parallelism (:mod:`.tensor_parallel`) a sharded tensor's J is its whole size and its
sums are completed over the tensor-parallel group too (:func:`vrgd_ds.comm.all_reduce_sum_sharded`);
at stage 0, where every tensor is otherwise whole locally, the sharded ones get a one-piece layout
(:func:`stage0_tensor_parallel_layouts`).

Weights tied across pipeline stages (``ties``, :func:`~.source.tied_weight_groups`): in a pipeline
(ZeRO-1, or BF16_Optimizer) each stage flattens its own tensors, so a tied weight's copy is cut
over the data-parallel partitions at other elements on each stage, and each stage's completed sums
of it are other partial sums added up — a rounding apart. Its columns are then made bit-identical
over the tie group after the usual completion (:func:`vrgd_ds.comm.agree_over_ties`), so every
copy takes the same update. (Whole tensors — stage 0 — have the same sums on every copy already:
the same values, the same operations.)
"""

from __future__ import annotations

import torch.distributed as dist

from ..comm import agree_over_ties, all_reduce_sum, all_reduce_sum_sharded
from ..optimizer import VROptimizer
from ..segments import SegmentLayout
from .tensor_parallel import TensorParallel

__all__ = ["zero_layouts", "zero3_layouts", "stage0_tensor_parallel_layouts"]


def zero_layouts(
    opt: VROptimizer,
    zero_opt,
    names: dict[int, str],
    tp: TensorParallel | None = None,
    ties: dict[int, object] | None = None,
) -> None:
    """Set the layout of every rank-local flat partition of a ZeRO 1/2 wrapper (or a view with
    its attributes) on ``opt``; ``tp``: the tensor-parallel group, if any; ``ties``: ``{id(weight):
    tie group}`` of the weights tied across pipeline stages, in the tie keys' order (see the module
    docstring)."""
    for i, tensors in enumerate(zero_opt.round_robin_bit16_groups):
        group = zero_opt.real_dp_process_group[i]
        world = dist.get_world_size(group=group)
        rank = dist.get_rank(group=group)
        part_size = int(zero_opt.partition_size[i])
        lo, hi = rank * part_size, (rank + 1) * part_size
        lengths, keys, pos = [], [], lo
        for key, (p, offset) in enumerate(zip(tensors, zero_opt.round_robin_bit16_offsets[i])):
            a, b = max(offset, lo), min(offset + p.numel(), hi)
            if a >= b:
                continue
            if a > pos:
                lengths.append(a - pos)
                keys.append(-1)
            lengths.append(b - a)
            keys.append(key)
            pos = b
        if pos < hi:
            lengths.append(hi - pos)
            keys.append(-1)

        if tp is None:
            complete, numels = all_reduce_sum(group, world), [p.numel() for p in tensors]
        else:
            sharded = [tp.is_sharded(p) for p in tensors]
            complete = all_reduce_sum_sharded(group, world, tp.group, tp.world, sharded)
            numels = [tp.whole_numel(p) for p in tensors]
        index = {id(p): k for k, p in enumerate(tensors)}
        tied = [(tie_group, [index[wid]]) for wid, tie_group in (ties or {}).items() if wid in index]
        if tied:
            complete = agree_over_ties(complete, len(tensors), tied)
        layout = SegmentLayout(
            lengths,
            keys,
            numels,
            names=[names.get(id(p), f"group{i}.param{k}") for k, p in enumerate(tensors)],
            complete=complete,
        )
        opt.set_layout(zero_opt.single_partition_of_fp32_groups[i], layout)


def zero3_layouts(wrapper, names: dict[int, str], tp: TensorParallel | None = None):
    """Per ZeRO-3 sub-group: (flat fp32 tensor, its trainable tensors, their offsets in it,
    SegmentLayout) — one piece per parameter (its real elements on this rank, possibly none)
    and its padding. Checks the layout against the wrapper's ``grad_position``. ``tp``: the
    tensor-parallel group, if any (a sharded parameter's ``ds_numel`` is its local shard's)."""
    out = []
    for i, tensors in enumerate(wrapper.fp16_groups):
        group = wrapper.sub_group_process_groups[i]
        rank = dist.get_rank(group=group)
        world = dist.get_world_size(group=group)
        flat = wrapper.fp32_partitioned_groups_flat[i]
        lengths, keys, offsets, pos = [], [], [], 0
        for key, p in enumerate(tensors):
            numel, ps = int(p.ds_numel), int(p.partition_numel())
            position = wrapper.grad_position.get(wrapper.get_param_id(p))
            if position is not None and (position[0] != i or position[1] != pos or position[2] != ps):
                raise RuntimeError(f"vrgd_ds: unexpected ZeRO-3 layout of sub-group {i}: {position} vs {[i, pos, ps]}")
            real = min(max(numel - rank * ps, 0), ps)
            if real > 0:
                lengths.append(real)
                keys.append(key)
            if ps > real:
                lengths.append(ps - real)
                keys.append(-1)
            offsets.append(pos)
            pos += ps
        if pos != flat.numel():
            raise RuntimeError(
                f"vrgd_ds: ZeRO-3 sub-group {i} holds {flat.numel()} elements, its parameters' slices {pos}"
            )

        if tp is None:
            complete, numels = all_reduce_sum(group, world), [int(p.ds_numel) for p in tensors]
        else:
            sharded = [tp.is_sharded(p) for p in tensors]
            complete = all_reduce_sum_sharded(group, world, tp.group, tp.world, sharded)
            numels = [int(p.ds_numel) * (tp.world if s else 1) for p, s in zip(tensors, sharded)]
        layout = SegmentLayout(
            lengths,
            keys,
            numels,
            names=[names.get(id(p), f"subgroup{i}.param{k}") for k, p in enumerate(tensors)],
            complete=complete,
        )
        out.append((flat, list(tensors), offsets, layout))
    return out


def stage0_tensor_parallel_layouts(
    opt: VROptimizer, model_params, inner_params, names: dict[int, str], tp: TensorParallel
) -> None:
    """Stage 0 (the inner optimizer holds whole local tensors: the model's, or their fp32 master
    copies): the tensor of a sharded model tensor is one piece of a tensor of J = tp × its size,
    completed over the tensor-parallel group (its moments and gradient are already reduced over
    the data-parallel group); replicated tensors stay whole."""
    complete = all_reduce_sum_sharded(None, 1, tp.group, tp.world, [True])
    for mp, ip in zip(model_params, inner_params):
        if tp.is_sharded(mp):
            name = names.get(id(mp), opt.layout_of(ip).names[0])
            opt.set_layout(ip, SegmentLayout([ip.numel()], [0], [tp.whole_numel(mp)], names=[name], complete=complete))
