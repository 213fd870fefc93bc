"""Rank side of the update matrix (tests/test_update_matrix.py): train each case through
deepspeed.initialize and record, per optimizer step, the fp32 master weights before and after
and the learning rates used — or the error ``deepspeed.initialize`` raised."""

from __future__ import annotations

import torch
from torch import nn

from .checkpoint_models import SharedBlockNet
from .ds_bodies import MICRO_BATCH, SAMPLES_PER_STEP, allow_cpu_fp16
from .models import TinyNet, micro_batches

STEPS = 3


class TiedNet(nn.Module):
    """One weight used twice in the forward (an input projection reused, transposed, as the
    output layer: the shape of tied embeddings / LM heads)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.inp = nn.Linear(7, 5)
        self.mid = nn.Linear(5, 7)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x):
        h = torch.tanh(self.mid(torch.tanh(self.inp(x))))
        return nn.functional.linear(h, self.inp.weight)


def build_model(kind: str) -> nn.Module:
    if kind == "tiny":
        return TinyNet(hidden=11, with_unused=False)
    if kind == "tied":
        return TiedNet()
    if kind == "frozen":
        return SharedBlockNet(checkpointing=None, frozen=True)
    if kind in ("reentrant", "non_reentrant"):
        return SharedBlockNet(checkpointing=kind)
    raise ValueError(kind)


def case_loss(model, x, y):
    return ((model(x) - y) ** 2).mean()


def param_groups(model, case):
    trainable = (
        [p for p in model.parameters() if p.requires_grad]
        if case.get("pass_trainable_only")
        else list(model.parameters())
    )
    if case.get("groups"):
        return [
            {"params": [p for p in trainable if p.dim() > 1]},
            {"params": [p for p in trainable if p.dim() <= 1], "weight_decay": 0.0},
        ]
    return trainable


def precision_config(precision: str) -> dict:
    """The DeepSpeed config keys of a case's precision: bf16, fp16 (dynamic loss scale from 2⁸,
    one overflow enough to lower it; CPU fp16 allowed) or fp32 (none)."""
    if precision == "bf16":
        return {"bf16": {"enabled": True}}
    if precision == "fp16":
        allow_cpu_fp16()
        return {"fp16": {"enabled": True, "initial_scale_power": 8, "loss_scale_window": 1000, "hysteresis": 1}}
    return {}


def ds_config(case: dict, world: int) -> dict:
    gas = SAMPLES_PER_STEP // world
    cfg = {
        "train_batch_size": MICRO_BATCH * SAMPLES_PER_STEP,
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": gas,
        "optimizer": {"type": case["type"], "params": dict(case["params"])},
        "zero_optimization": {"stage": case["stage"]},
        "gradient_clipping": case.get("clip", 0.0),
        "steps_per_print": 10**9,
    }
    cfg.update(precision_config(case.get("precision", "fp32")))
    if case.get("scheduler"):
        lr = case["params"]["lr"]
        cfg["scheduler"] = {
            "type": "WarmupDecayLR",
            "params": {
                "total_num_steps": 6,
                "warmup_num_steps": 2,
                "warmup_min_lr": lr / 4,
                "warmup_max_lr": lr,
                "warmup_type": "linear",
            },
        }
    cfg.update(case.get("extra", {}))
    return cfg


def master_params(engine) -> list:
    """The fp32 master copy of every module parameter (None for frozen ones), module order.
    Collective at ZeRO 1/2: every rank calls it."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.utils import safe_get_full_fp32_param

    wrapper = engine.optimizer
    out = []
    if engine.zero_optimization_stage() == 0 and isinstance(wrapper, FP16_UnfusedOptimizer):
        masters = {id(lp): hp for lg, hg in zip(wrapper.fp16_groups, wrapper.fp32_groups) for lp, hp in zip(lg, hg)}
        for p in engine.module.parameters():
            out.append(masters[id(p)].detach().double().clone() if id(p) in masters else p.detach().double().clone())
        return out
    for p in engine.module.parameters():
        if engine.zero_optimization_stage() == 0 or not p.requires_grad:
            out.append(p.detach().double().clone())
        else:
            out.append(safe_get_full_fp32_param(p).detach().double().clone())
    return out


def run_case(case: dict, rank: int, world: int) -> dict:
    import deepspeed

    import vrgd_ds  # noqa: F401  (registers the config types)

    gas = SAMPLES_PER_STEP // world
    model = build_model(case.get("model", "tiny"))
    try:
        engine, *_ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, case), config=ds_config(case, world)
        )
    except Exception as exc:  # noqa: BLE001 - a refusal is a result the test checks
        return {"error": f"{type(exc).__name__}: {exc}"}
    batches = micro_batches(SAMPLES_PER_STEP * STEPS, skip_extra=False)
    dtype = next(engine.module.parameters()).dtype
    steps = []
    for step in range(STEPS):
        before = master_params(engine)
        lrs = list(engine.get_lr())
        for a in range(gas):
            x, y, _ = batches[step * SAMPLES_PER_STEP + a * world + rank]
            engine.backward(case_loss(engine, x.to(dtype), y.to(dtype)))
            engine.step()
        noise = vrgd_ds.find_vr_optimizer(engine).noise_stats()
        steps.append({"before": before, "after": master_params(engine), "lr": lrs, "noise": dict(noise)})
    return {"error": None, "steps": steps}


def run_matrix(rank: int, world: int, cases: list[dict]) -> dict:
    """Every case in one process group (start-up shared); {case name: result}."""
    return {case["name"]: run_case(case, rank, world) for case in cases}
