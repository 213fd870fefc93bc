"""BF16_Optimizer (runtime/bf16_optimizer.py: bf16 + ZeRO-1 + fp32 gradient accumulation, and bf16
pipelines): VRGD moments through ZeRO-1's source.

Its layout is ZeRO-1's without round-robin — per param group the trainable tensors flattened in
order, padded at the end to a multiple of the data-parallel size, cut into equal partitions
(``_setup_for_real_optimizer``, bf16_optimizer.py:152). :class:`BF16OptimizerLayout` presents it
with the attributes of DeepSpeedZeroOptimizer that
:class:`~vrgd_ds.deepspeed_glue.zero12.ZeroMomentSource` and
:func:`~vrgd_ds.deepspeed_glue.layouts.zero_layouts` read, so the ZeRO 1/2 source serves it
unchanged. BF16_Optimizer clips inside ``step()`` (:384) and then calls the inner step once for
all groups (:422): :func:`bf16_optimizer_source` forms r before ``step()``, from the reduced,
unclipped fp32 gradient partitions, which it hands the fp32 partitions as ``.grad`` first.
"""

from __future__ import annotations

import torch.distributed as dist

from ..optimizer import VROptimizer
from .source import wrap_method
from .zero12 import ZeroMomentSource

__all__ = ["BF16OptimizerLayout", "bf16_optimizer_source", "is_bf16_optimizer"]


def is_bf16_optimizer(wrapper) -> bool:
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    return isinstance(wrapper, BF16_Optimizer)


class BF16OptimizerLayout:
    """DeepSpeed's BF16_Optimizer seen through the attributes of DeepSpeedZeroOptimizer that
    :class:`ZeroMomentSource` and :func:`~vrgd_ds.deepspeed_glue.layouts.zero_layouts` read."""

    def __init__(self, bf16_opt):
        self.real_dp_process_group = bf16_opt.real_dp_process_group
        self.round_robin_bit16_groups = bf16_opt.bf16_groups
        self.bit16_groups_flat = bf16_opt.bf16_groups_flat
        self.single_partition_of_fp32_groups = bf16_opt.fp32_groups_flat_partition
        self.partition_size = [
            flat.numel() // dist.get_world_size(group=g)
            for flat, g in zip(bf16_opt.bf16_groups_flat, bf16_opt.real_dp_process_group)
        ]
        self.round_robin_bit16_offsets = []
        for tensors in bf16_opt.bf16_groups:
            offsets, pos = [], 0
            for t in tensors:
                offsets.append(pos)
                pos += t.numel()
            self.round_robin_bit16_offsets.append(offsets)


def bf16_optimizer_source(
    opt: VROptimizer, wrapper, zero_view: BF16OptimizerLayout, strategy: str, names: dict, track_first: bool = True
):
    """BF16_Optimizer clips inside step() and then calls the inner step once for all groups: r is
    formed before step(), from the reduced, unclipped partition views. Its samples are bf16, and
    its gradient all-reduce rounds G to bf16 unless ``communication_data_type`` is fp32: Σg is
    tracked in fp32 (``track_first``) as for every 16-bit model."""
    source = ZeroMomentSource(opt, zero_view, strategy, names, track_first)

    def before_step(*a, **k):
        for part, grad in zip(wrapper.fp32_groups_flat_partition, wrapper.fp32_groups_gradient_flat_partition):
            part.grad = grad if grad.dtype == part.dtype else grad.to(part.dtype)
        source.prepare(list(wrapper.fp32_groups_flat_partition))

    wrap_method(wrapper, "step", before=before_step)
    return source
