"""Rank bodies for layouts vrgd_ds refuses at deepspeed.initialize (tests/test_refusals.py)."""

from __future__ import annotations

import torch.distributed as dist

from .ds_bodies import MICRO_BATCH
from .models import TinyNet


class ToyMPU:
    """Megatron's mpu interface with all ranks in one tensor-parallel group (data-parallel size 1),
    Megatron's rank layout for TP = world size."""

    def __init__(self):
        world, rank = dist.get_world_size(), dist.get_rank()
        self.tp_group = dist.new_group(list(range(world)))
        self.dp_groups = [dist.new_group([r]) for r in range(world)]
        self.rank, self.world = rank, world

    def get_tensor_model_parallel_world_size(self):
        return self.world

    def get_tensor_model_parallel_rank(self):
        return self.rank

    def get_tensor_model_parallel_group(self):
        return self.tp_group

    get_model_parallel_world_size = get_tensor_model_parallel_world_size
    get_model_parallel_rank = get_tensor_model_parallel_rank
    get_model_parallel_group = get_tensor_model_parallel_group

    def get_data_parallel_world_size(self):
        return 1

    def get_data_parallel_rank(self):
        return 0

    def get_data_parallel_group(self):
        return self.dp_groups[self.rank]


def tensor_parallel_case(rank: int, world: int, opt_type: str):
    """deepspeed.initialize with an mpu of tensor-parallel size = world: the error text, or None."""
    import deepspeed

    import vrgd_ds  # noqa: F401

    model = TinyNet(hidden=11, with_unused=False)
    cfg = {
        "train_batch_size": MICRO_BATCH * 8,
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": 8,
        "optimizer": {"type": opt_type, "params": {"lr": 1e-3}},
        "zero_optimization": {"stage": 1},
        "gradient_clipping": 0.0,
    }
    try:
        deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg, mpu=ToyMPU())
    except Exception as exc:  # noqa: BLE001 - the message is what the test checks
        return f"{type(exc).__name__}: {exc}"
    return None
