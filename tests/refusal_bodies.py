"""Rank bodies for layouts vrgd_ds refuses at deepspeed.initialize (tests/test_refusals.py)."""

from __future__ import annotations

from .ds_bodies import allow_cpu_fp16
from .tp_bodies import TPMPU, TPNet, tp_config

# Tensor parallelism is exact at ZeRO 0-3 in fp32, bf16 and fp16 (tests/test_tensor_parallel.py),
# with pipelines too (tests/test_pipeline.py); the rest is refused.
TP_REFUSALS = {
    "sequence_parallel": dict(stage=1, sequence_parallel=True),
}


def tensor_parallel_refusals(rank: int, world: int, opt_type: str) -> dict:
    """deepspeed.initialize with an mpu of tensor-parallel size = world (data-parallel size 1), once
    per configuration of TP_REFUSALS: {configuration: the error text, or None}."""
    import deepspeed

    import vrgd_ds  # noqa: F401  (registers the config types)

    allow_cpu_fp16()
    mpu = TPMPU(world)
    out = {}
    for what, spec in TP_REFUSALS.items():
        model = TPNet(mpu.tp, mpu.tp_rank, mpu.tp_group)
        if spec.get("sequence_parallel"):
            # What Megatron sets on LayerNorm (and row-parallel bias) weights under sequence parallelism.
            model.norm.weight.sequence_parallel = True
            model.norm.bias.sequence_parallel = True
        case = dict(type=opt_type, params={"lr": 1e-3}, stage=spec["stage"], extra=spec.get("extra", {}))
        try:
            deepspeed.initialize(
                model=model, model_parameters=list(model.parameters()), config=tp_config(case, mpu.dp), mpu=mpu
            )
        except Exception as exc:  # noqa: BLE001 - the message is what the test checks
            out[what] = f"{type(exc).__name__}: {exc}"
        else:
            out[what] = None
    return out


def sparse_embedding_refusals(rank: int, world: int) -> dict:
    """deepspeed.initialize (ZeRO 0 and 2, gas 2) of a model with nn.Embedding(sparse=True):
    {case: the error text, or None}."""
    import deepspeed
    import torch

    import vrgd_ds  # noqa: F401  (registers the config types)

    out = {}
    for what, stage, params in (
        ("vr-stage0", 0, {"lr": 0.1}),
        ("vr-stage2", 2, {"lr": 0.1}),
        ("stats-only", 0, {"lr": 0.1, "vr": False, "gradient_stats": True}),
        ("plain", 0, {"lr": 0.1, "vr": False}),
    ):
        model = torch.nn.Sequential(torch.nn.Embedding(10, 4, sparse=True), torch.nn.Linear(4, 1))
        config = {
            "train_batch_size": 2 * world,
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 2,
            "optimizer": {"type": "VRSGD", "params": params},
            "zero_optimization": {"stage": stage},
            "gradient_clipping": 0.0,
        }
        try:
            deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=config)
        except Exception as exc:  # noqa: BLE001 - the message is what the test checks
            out[what] = f"{type(exc).__name__}: {exc}"
        else:
            out[what] = None
    return out
