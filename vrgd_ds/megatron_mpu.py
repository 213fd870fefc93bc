"""A Megatron-style ``mpu`` built from torch.distributed groups, for hand-written tensor
parallelism, tests and benchmarks (Megatron's own ``megatron.core.parallel_state`` is the real one).

Megatron's rank layout: tensor-parallel groups of ``tp`` consecutive ranks, data-parallel groups
strided by ``tp``. The methods are the ones DeepSpeed 0.19.8 calls on an mpu
(utils/groups.py, utils/bwc.py) and the ones :mod:`vrgd_ds.deepspeed_glue.tensor_parallel` reads.
A tensor split over the tensor-parallel group is marked as Megatron's layers mark it:
``p.tensor_model_parallel = True`` (with ``partition_dim``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["MegatronStyleMpu", "copy_to_tensor_parallel_region", "reduce_from_tensor_parallel_region"]


class MegatronStyleMpu:
    """Tensor × data parallelism over the whole world: ``tp`` shards per tensor, world // tp
    data-parallel replicas. Collective to build (every rank creates every group, in one order)."""

    def __init__(self, tp: int):
        world, rank = dist.get_world_size(), dist.get_rank()
        if tp < 1 or world % tp:
            raise ValueError(f"tensor-parallel size {tp} must be ≥ 1 and divide the world size {world}.")
        self.tp, self.dp = tp, world // tp
        self.rank = rank
        self.tp_rank, self.dp_rank = rank % tp, rank // tp
        self.tp_ranks = [list(range(d * tp, (d + 1) * tp)) for d in range(self.dp)]
        self.dp_ranks = [list(range(t, world, tp)) for t in range(tp)]
        tp_groups = [dist.new_group(r) for r in self.tp_ranks]
        dp_groups = [dist.new_group(r) for r in self.dp_ranks]
        self.tp_group = tp_groups[self.dp_rank]
        self.dp_group = dp_groups[self.tp_rank]

    def get_tensor_model_parallel_world_size(self):
        return self.tp

    def get_tensor_model_parallel_rank(self):
        return self.tp_rank

    def get_tensor_model_parallel_group(self):
        return self.tp_group

    def get_tensor_model_parallel_src_rank(self):
        return self.tp_ranks[self.dp_rank][0]

    # The pre-pipeline Megatron names, which DeepSpeed still falls back to (utils/bwc.py).
    get_model_parallel_world_size = get_tensor_model_parallel_world_size
    get_model_parallel_rank = get_tensor_model_parallel_rank
    get_model_parallel_group = get_tensor_model_parallel_group

    def get_data_parallel_world_size(self):
        return self.dp

    def get_data_parallel_rank(self):
        return self.dp_rank

    def get_data_parallel_group(self):
        return self.dp_group

    def get_data_parallel_group_ranks(self):
        return list(self.dp_ranks[self.tp_rank])


class _ReduceFromTensorParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def reduce_from_tensor_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """Megatron's ``reduce_from_tensor_model_parallel_region``: the sum of the partial outputs of a
    row-parallel layer over the tensor-parallel group (all-reduce forward, identity backward)."""
    return _ReduceFromTensorParallelRegion.apply(x, group)


class _CopyToTensorParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def copy_to_tensor_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """Megatron's ``copy_to_tensor_model_parallel_region``: the input of a column-parallel layer
    (identity forward; backward all-reduces the partial input gradients of the shards)."""
    return _CopyToTensorParallelRegion.apply(x, group)
