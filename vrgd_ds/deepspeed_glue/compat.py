"""Attributes of DeepSpeed's optimizer wrappers that the glue reads and that older DeepSpeed
releases lack, filled in on the instance from what those releases have (the layout they use):

* ``DeepSpeedZeroOptimizer.round_robin_bit16_offsets`` (added in 0.19.7): each tensor's offset in
  its group's flat buffer. Before 0.19.7 the buffer packs the tensors back to back (padding only at
  the end), so the offsets are the running sums of their sizes.
* ``DeepSpeedZeroOptimizer_Stage3.sub_group_process_groups`` (added in 0.19.3): before it, every
  sub-group is partitioned over the data-parallel group.

Which versions these fallbacks were measured exact with: :mod:`.versions` (``TESTED``).
"""

from __future__ import annotations

__all__ = ["fill_missing_attributes"]


def fill_missing_attributes(wrapper) -> None:
    """Give ``wrapper`` (the engine's optimizer wrapper) the attributes above where it lacks them."""
    groups = getattr(wrapper, "round_robin_bit16_groups", None)
    if groups is not None and not hasattr(wrapper, "round_robin_bit16_offsets"):
        offsets = []
        for tensors in groups:
            running, group_offsets = 0, []
            for p in tensors:
                group_offsets.append(running)
                running += p.numel()
            offsets.append(group_offsets)
        wrapper.round_robin_bit16_offsets = offsets
    if (
        hasattr(wrapper, "fp16_groups")
        and hasattr(wrapper, "fp32_partitioned_groups_flat")
        and not hasattr(wrapper, "sub_group_process_groups")
    ):
        wrapper.sub_group_process_groups = [wrapper.dp_process_group] * len(wrapper.fp16_groups)
