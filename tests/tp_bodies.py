"""Rank side of the tensor-parallel tests (tests/test_tensor_parallel.py): a Megatron-style toy
model sharded over a tensor-parallel group, trained through deepspeed.initialize with an mpu;
per optimizer step the fp32 master weights of this rank's shards before and after."""

from __future__ import annotations

import torch
from torch import nn

from vrgd_ds.megatron_mpu import MegatronStyleMpu as TPMPU
from vrgd_ds.megatron_mpu import reduce_from_tensor_parallel_region

from .ds_bodies import MICRO_BATCH, SAMPLES_PER_STEP, allow_cpu_fp16
from .models import micro_batches

STEPS = 3
HIDDEN = 10  # fc1's output features, split over the tensor-parallel ranks


class TPNet(nn.Module):
    """x → column-parallel fc1 (weight, bias split on dim 0) → tanh → row-parallel fc2 (weight
    split on dim 1; bias replicated) → LayerNorm (replicated). ``tp=1``: the whole model, which
    is also the reference. Every rank draws the whole model from one seed and keeps its shard."""

    def __init__(self, tp: int = 1, tp_rank: int = 0, group=None, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w1, b1 = torch.randn(HIDDEN, 7, generator=g) * 0.5, torch.randn(HIDDEN, generator=g) * 0.5
        w2, b2 = torch.randn(5, HIDDEN, generator=g) * 0.5, torch.randn(5, generator=g) * 0.5
        ln_w, ln_b = 1 + 0.1 * torch.randn(5, generator=g), 0.1 * torch.randn(5, generator=g)
        h = HIDDEN // tp
        rows = slice(tp_rank * h, (tp_rank + 1) * h)
        self.fc1_weight = nn.Parameter(w1[rows].clone())
        self.fc1_bias = nn.Parameter(b1[rows].clone())
        self.fc2_weight = nn.Parameter(w2[:, rows].clone())
        self.fc2_bias = nn.Parameter(b2.clone())
        self.norm = nn.LayerNorm(5)
        with torch.no_grad():
            self.norm.weight.copy_(ln_w)
            self.norm.bias.copy_(ln_b)
        self.tp, self.group = tp, group
        if tp > 1:
            for p, dim in ((self.fc1_weight, 0), (self.fc1_bias, 0), (self.fc2_weight, 1)):
                p.tensor_model_parallel = True  # what Megatron's layers set
                p.partition_dim = dim
                p.partition_stride = 1

    def partial_output(self, x):
        """This shard's share of fc2's output (the whole output is the sum over the shards)."""
        hidden = torch.tanh(nn.functional.linear(x, self.fc1_weight, self.fc1_bias))
        return nn.functional.linear(hidden, self.fc2_weight)

    def finish(self, out):
        return self.norm(out + self.fc2_bias)

    def forward(self, x):
        out = self.partial_output(x)
        if self.tp > 1:
            out = reduce_from_tensor_parallel_region(out, self.group)
        return self.finish(out)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHARDED_DIMS = {"fc1_weight": 0, "fc1_bias": 0, "fc2_weight": 1}


def tp_loss(model, x, y):
    return ((model(x) - y) ** 2).mean()


def tp_config(case: dict, dp: int) -> dict:
    precision = {}
    if case.get("precision") == "bf16":
        precision["bf16"] = {"enabled": True}
    elif case.get("precision") == "fp16":
        allow_cpu_fp16()
        precision["fp16"] = {"enabled": True, "initial_scale_power": 8, "loss_scale_window": 1000, "hysteresis": 1}
    return {
        **precision,
        "train_batch_size": MICRO_BATCH * SAMPLES_PER_STEP,
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": SAMPLES_PER_STEP // dp,
        "optimizer": {"type": case["type"], "params": dict(case["params"])},
        "zero_optimization": {"stage": case["stage"]},
        "gradient_clipping": case.get("clip", 0.0),
        "steps_per_print": 10**9,
        **case.get("extra", {}),
    }


def _masters(engine) -> dict:
    from .matrix_bodies import master_params

    return {n: t for (n, _), t in zip(engine.module.named_parameters(), master_params(engine))}


def run_tp_case(case: dict, rank: int, world: int, mpu: TPMPU) -> dict:
    import deepspeed

    import vrgd_ds

    model = TPNet(mpu.tp, mpu.tp_rank, mpu.tp_group)
    try:
        engine, *_ = deepspeed.initialize(
            model=model, model_parameters=list(model.parameters()), config=tp_config(case, mpu.dp), mpu=mpu
        )
    except Exception as exc:  # noqa: BLE001 - a refusal is a result the test checks
        return {"error": f"{type(exc).__name__}: {exc}"}
    gas = SAMPLES_PER_STEP // mpu.dp
    batches = micro_batches(SAMPLES_PER_STEP * STEPS, skip_extra=False)
    steps = []
    for step in range(STEPS):
        before = _masters(engine)
        for a in range(gas):
            x, y, _ = batches[step * SAMPLES_PER_STEP + a * mpu.dp + mpu.dp_rank]
            dtype = DTYPES[case.get("precision", "fp32")]
            loss = tp_loss(engine, x.to(dtype), y.to(dtype))
            if step == case.get("inf_step") and a == 0 and rank == 0:
                # Non-finite gradients on one rank only: its shards and, after the data-parallel
                # reduction, its data-parallel peers' — its tensor-parallel peers stay finite.
                loss = loss * float("inf")
            engine.backward(loss)
            engine.step()
        noise = vrgd_ds.find_vr_optimizer(engine).noise_stats()
        steps.append({"before": before, "after": _masters(engine), "noise": dict(noise)})
    opt = vrgd_ds.find_vr_optimizer(engine)
    return {
        "error": None,
        "steps": steps,
        "tp_rank": mpu.tp_rank,
        "dp_rank": mpu.dp_rank,
        # Skipped by the VR optimizer (stage 0) or by DeepSpeed's own overflow check (ZeRO 1/2).
        "skipped_steps": opt.skipped_steps + engine.skipped_steps,
    }


class MegatronDeepSpeedMpu(TPMPU):
    """Megatron-DeepSpeed's mpu also has DeepSpeed-Ulysses' sequence-parallel getters, at size 1
    unless ``--ds-sequence-parallel-size`` (the sequence-data-parallel group is then the
    data-parallel one)."""

    def __init__(self, tp: int):
        import torch.distributed as dist

        super().__init__(tp)
        self.sp_group = [dist.new_group([r]) for r in range(dist.get_world_size())][dist.get_rank()]

    def get_sequence_parallel_world_size(self):
        return 1

    def get_sequence_parallel_rank(self):
        return 0

    def get_sequence_parallel_group(self):
        return self.sp_group

    get_sequence_data_parallel_world_size = TPMPU.get_data_parallel_world_size
    get_sequence_data_parallel_rank = TPMPU.get_data_parallel_rank
    get_sequence_data_parallel_group = TPMPU.get_data_parallel_group


def run_tp_matrix(rank: int, world: int, tp: int, cases: list[dict]) -> dict:
    """Every case in one process group (start-up shared); {case name: result}. A case with
    ``"mpu": "megatron_deepspeed"`` gets :class:`MegatronDeepSpeedMpu`."""
    mpus = {"megatron": TPMPU(tp), "megatron_deepspeed": MegatronDeepSpeedMpu(tp)}
    return {case["name"]: run_tp_case(case, rank, world, mpus[case.get("mpu", "megatron")]) for case in cases}
