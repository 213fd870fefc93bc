"""Rank bodies for the pipeline tests: a 2-stage PipelineModule × 2 data-parallel ranks."""

from __future__ import annotations

import torch
from torch import nn

from .models import micro_batches

STEPS = 3
MICRO_BATCHES = 8  # per optimizer step, all data-parallel ranks together


def pipeline_layers(seed: int = 0) -> list[nn.Module]:
    """The same layers as a plain nn.Sequential (the reference) and as pipeline stages."""
    g = torch.Generator().manual_seed(seed)
    layers = [nn.Linear(7, 11), nn.Tanh(), nn.Linear(11, 9), nn.Tanh(), nn.Linear(9, 5)]
    with torch.no_grad():
        for layer in layers:
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return layers


def mse(out, y):
    return ((out - y) ** 2).mean()


def pipeline_case(rank: int, world: int, case: dict):
    """Train through deepspeed.PipelineEngine; returns {param name: fp32 tensor} of this stage,
    or the error initialize raised."""
    import deepspeed
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec  # noqa: F401

    import vrgd_ds  # noqa: F401

    dp = world // 2
    gas = MICRO_BATCHES // dp
    layers = pipeline_layers()
    if case.get("tied"):
        module = PipelineModule(
            layers=[TiedLayerSpec("io", nn.Linear, 5, 5), nn.Tanh(), TiedLayerSpec("io", nn.Linear, 5, 5)],
            num_stages=2,
            loss_fn=mse,
            partition_method="uniform",
        )
    else:
        module = PipelineModule(layers=layers, num_stages=2, loss_fn=mse, partition_method="uniform")
    cfg = {
        "train_batch_size": 4 * MICRO_BATCHES,
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": gas,
        "optimizer": {"type": case["type"], "params": dict(case["params"])},
        "zero_optimization": {"stage": case["stage"]},
        "gradient_clipping": case.get("clip", 0.0),
        "steps_per_print": 10**9,
    }
    if case.get("precision") == "bf16":
        cfg["bf16"] = {"enabled": True}  # a bf16 pipeline at stage 0: DeepSpeed's BF16_Optimizer
    try:
        engine, *_ = deepspeed.initialize(model=module, model_parameters=[p for p in module.parameters()], config=cfg)
    except Exception as exc:  # noqa: BLE001 - a refusal is the result checked
        return {"error": f"{type(exc).__name__}: {exc}"}
    dp_rank = engine.grid.get_data_parallel_rank()
    batches = micro_batches(MICRO_BATCHES * STEPS, skip_extra=False)
    for step in range(STEPS):
        dtype = torch.bfloat16 if case.get("precision") == "bf16" else torch.float32
        mine = [tuple(t.to(dtype) for t in batches[step * MICRO_BATCHES + a * dp + dp_rank][:2]) for a in range(gas)]
        engine.train_batch(iter(mine))
    # PipelineModule names a stage's parameters by their global layer index ("4.weight").
    params = {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}
    if case.get("precision") == "bf16":  # the fp32 master weights (BF16_Optimizer's flat partitions)
        from deepspeed.utils import safe_get_full_fp32_param

        params = {n: safe_get_full_fp32_param(p).detach().float().clone() for n, p in engine.module.named_parameters()}
    return {"error": None, "wrapper": type(engine.optimizer).__name__, "params": params}


def train_reference(case: dict) -> dict:
    """The single-process run: the same layers, all 8 micro-batches accumulated per step."""
    import vrgd_ds

    layers = pipeline_layers()
    model = nn.Sequential(*layers)
    cls = vrgd_ds.OPTIMIZERS[case["type"].lower()]
    opt = cls(model.parameters(), **case["params"])
    batches = micro_batches(MICRO_BATCHES * STEPS, skip_extra=False)
    for step in range(STEPS):
        for x, y, _ in batches[step * MICRO_BATCHES : (step + 1) * MICRO_BATCHES]:
            (mse(model(x), y) / MICRO_BATCHES).backward()
        if case.get("clip"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), case["clip"])
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def pipeline_cases(rank: int, world: int, cases: list[dict]):
    """Several pipeline cases in one process group: {case name: pipeline_case result}."""
    return {case["name"]: pipeline_case(rank, world, case) for case in cases}
