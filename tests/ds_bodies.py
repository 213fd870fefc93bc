"""Rank bodies for the DeepSpeed tests (module level: the harness pickles them by name)."""
from __future__ import annotations

import copy

import torch

from .models import TinyNet, mb_loss, micro_batches

MICRO_BATCH = 4
SAMPLES_PER_STEP = 8  # micro-batches per optimizer step, all ranks together
DS_MODEL = dict(hidden=11, with_unused=False)  # 178 elements: uneven partitions, tensors straddle them


def ds_config(opt_type: str, opt_params: dict, stage: int, gas: int, world: int, precision: str = "fp32",
              clip: float = 0.0, **extra) -> dict:
    cfg = {
        "train_batch_size": MICRO_BATCH * gas * world,
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": gas,
        "optimizer": {"type": opt_type, "params": dict(opt_params)},
        "zero_optimization": {"stage": stage},
        "gradient_clipping": clip,
        "steps_per_print": 10**9,
    }
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif precision == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 8, "loss_scale_window": 1000, "hysteresis": 1}
    cfg.update(extra)
    return cfg


def train_ds(case: dict, rank: int, world: int, steps: int = 3, engine=None, start_step: int = 0, batches=None):
    """Train TinyNet through deepspeed.initialize; returns (engine, fp32 copies of the parameters)."""
    import deepspeed

    import vrgd_ds  # noqa: F401  (registers the config types)

    gas = SAMPLES_PER_STEP // world
    if engine is None:
        model = TinyNet(**DS_MODEL)
        cfg = ds_config(case["type"], case["params"], case["stage"], gas, world, case.get("precision", "fp32"),
                        case.get("clip", 0.0), **case.get("extra", {}))
        engine, *_ = deepspeed.initialize(model=model, model_parameters=_param_groups(model, case), config=cfg)
    batches = batches or micro_batches(SAMPLES_PER_STEP * (start_step + steps), skip_extra=False)
    dtype = next(engine.module.parameters()).dtype
    for step in range(start_step, start_step + steps):
        for a in range(gas):
            x, y, use_extra = batches[step * SAMPLES_PER_STEP + a * world + rank]
            loss = mb_loss(engine, (x.to(dtype), y.to(dtype), use_extra))
            engine.backward(loss)
            engine.step()
    return engine, [p.detach().float().clone() for p in engine.module.parameters()]


def _param_groups(model, case):
    if case.get("groups"):
        decay = [p for n, p in model.named_parameters() if p.dim() > 1]
        no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1]
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    return model.parameters()


def train_plain(case: dict, steps: int = 3):
    """The single-process reference: same optimizer, all 8 micro-batches accumulated per step."""
    import vrgd_ds

    model = TinyNet(**DS_MODEL)
    cls = vrgd_ds.OPTIMIZERS[case["type"].lower()]
    params = {k: v for k, v in case["params"].items() if k != "moment_reduction"}
    if "betas" in params:
        params["betas"] = tuple(params["betas"])
    opt = cls(_param_groups(model, case), **params)
    batches = micro_batches(SAMPLES_PER_STEP * steps, skip_extra=False)
    for step in range(steps):
        for b in batches[step * SAMPLES_PER_STEP:(step + 1) * SAMPLES_PER_STEP]:
            (mb_loss(model, b) / SAMPLES_PER_STEP).backward()
        if case.get("clip"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), case["clip"])
        opt.step()
        opt.zero_grad()
    return [p.detach().float().clone() for p in model.parameters()]


def run_cases(rank: int, world: int, cases: list[dict], steps: int = 3):
    """Several DeepSpeed cases in one process group; returns {case name: parameters}."""
    out = {}
    for case in cases:
        _, params = train_ds(case, rank, world, steps)
        out[case["name"]] = params
    return out
