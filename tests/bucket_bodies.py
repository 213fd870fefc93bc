"""Rank bodies of tests/test_bucket_samples.py: ZeRO-2's per-bucket Σg² against the per-tensor hooks."""

from __future__ import annotations

import torch
from torch import nn

MICRO_BATCH = 4
WIDTHS = (7, 13, 11, 9, 12, 5)  # odd sizes: tensors straddle partitions and buckets


class DeepNet(nn.Module):
    """Linear layers in a chain. ``reversed_registration``: registered output-first, so backward's
    order is the reverse of what the bucket layout guesses (it must learn it)."""

    def __init__(self, reversed_registration: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        layers = [nn.Linear(a, b) for a, b in zip(WIDTHS, WIDTHS[1:])]
        self.order = list(range(len(layers)))
        if reversed_registration:
            layers, self.order = layers[::-1], self.order[::-1]
        self.layers = nn.ModuleList(layers)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)

    def forward(self, x):
        by_depth = sorted(zip(self.order, self.layers), key=lambda t: t[0])
        for k, (_, layer) in enumerate(by_depth):
            x = layer(x)
            if k < len(by_depth) - 1:
                x = torch.tanh(x)
        return x


def batches(num: int):
    """A fixed teacher plus a little noise: per-element GSNR well above 1 (realistic signal)."""
    g = torch.Generator().manual_seed(3)
    teacher = torch.randn(WIDTHS[0], WIDTHS[-1], generator=g)
    out = []
    for _ in range(num):
        x = torch.randn(MICRO_BATCH, WIDTHS[0], generator=g) + 1.0
        out.append((x, x @ teacher + 0.05 * torch.randn(MICRO_BATCH, WIDTHS[-1], generator=g)))
    return out


def run(rank: int, world: int, case: dict, use_buckets: bool, steps: int = 3) -> dict:
    import deepspeed

    import vrgd_ds
    from vrgd_ds.deepspeed_glue.source import DeepSpeedMomentSource

    DeepSpeedMomentSource.use_bucket_samples = use_buckets
    DeepSpeedMomentSource.held_bucket_elements = case.get("held_bucket_elements", 1 << 24)
    gas = case.get("gas", 4)
    zero = {"stage": case.get("stage", 2), **case.get("zero", {})}
    cfg = {
        "train_batch_size": MICRO_BATCH * gas * world,
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": gas,
        "optimizer": {"type": "VRLamb", "params": {"lr": 1e-2, "weight_decay": 0.01, **case.get("params", {})}},
        "zero_optimization": zero,
        "steps_per_print": 10**9,
    }
    if case.get("precision") == "bf16":
        cfg["bf16"] = {"enabled": True}
    cfg.update(case.get("extra", {}))
    model = DeepNet(case.get("reversed_registration", False))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    source = vrgd_ds.find_vr_optimizer(engine).moment_source
    moments = []
    original = source.ensure_reduced

    def ensure_reduced():
        done = source._reduced
        original()
        if not done:  # the step's reduced Σg² (and Σg) on this rank's partition, before r
            moments.append([m.detach().clone() for m in (*source.sq.values(), *source.first.values())])

    source.ensure_reduced = ensure_reduced
    dtype = next(engine.module.parameters()).dtype
    data = batches(steps * gas * world)
    for step in range(steps):
        for a in range(gas):
            x, y = data[(step * gas + a) * world + rank]
            loss = ((engine(x.to(dtype)).float() - y) ** 2).mean()
            engine.backward(loss)
            engine.step()
        if step == 0:
            b = source.buckets
            first_step_buckets = 0 if b is None else b.runs_total + b.foreach_total
    buckets = source.buckets
    return {
        "moments": moments,
        "params": [p.detach().float().clone() for p in engine.module.parameters()],
        "bucketed": buckets is not None,
        "sample_path": "zero3" if hasattr(source, "packed_chunks") else getattr(source, "sample_path", "held"),
        "packed": getattr(source, "packed_chunks", 0),
        "unpacked": getattr(source, "unpacked_chunks", 0),
        "runs": buckets.runs_total if buckets is not None else 0,
        "fallbacks": buckets.fallbacks_total if buckets is not None else 0,
        "foreach": buckets.foreach_total if buckets is not None else 0,
        "buckets_first_step": first_step_buckets,
    }


def compare(rank: int, world: int, case: dict) -> dict:
    """Both paths in one process, one after the other (the same data and initial weights)."""
    return {"buckets": run(rank, world, case, True), "hooks": run(rank, world, case, False)}


def coalesce_refused(rank: int, world: int) -> str:
    """ZeRO-2 with VR takes its samples from DeepSpeed's buckets: coalesce_grad_reduction (a bucket
    holding the sum of several micro-batches) is refused, with the fix named."""
    import deepspeed

    import vrgd_ds  # noqa: F401  (registers the optimizer types)

    model = DeepNet()
    cfg = {
        "train_batch_size": MICRO_BATCH * 4 * world,
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": 4,
        "optimizer": {"type": "VRLamb", "params": {"lr": 1e-2}},
        "zero_optimization": {"stage": 2},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    try:
        with engine.coalesce_grad_reduction():
            pass
    except ValueError as err:
        return str(err)
    return ""
