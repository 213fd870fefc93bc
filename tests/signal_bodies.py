"""Rank side of the real-signal tests (tests/test_real_signal.py).

The update matrix's data is pure noise (targets independent of inputs): per-element GSNR r ≈ 1,
where 1 − μ²/q is far from 0 and no rounding of the first moment shows. Real models at
initialization have r of 10–10³ with k = 4. :class:`SignalNet` on :func:`signal_batches` gives
that regime: a 2-layer tanh MLP regressing a fixed teacher with a constant offset, 32 examples
per micro-batch, k = 8 — per tensor mean r ≈ 24 (first weight), 96 (its bias), 40 (second
weight), 570 (its bias); per element from 0.3 to ≈ 1,600.

Each case trains 3 steps through ``deepspeed.initialize`` (2 ranks, gradient accumulation 4)
and records per step the fp32 master weights before and after, the learning rates, the noise
statistics and the per-tensor raw-GSNR statistics (``stats_interval`` 1).
"""

from __future__ import annotations

import torch
from torch import nn

from .matrix_bodies import master_params, precision_config

SIGNAL_MICRO_BATCH = 32
SIGNAL_SAMPLES_PER_STEP = 8  # k: 2 ranks × 4 accumulated micro-batches (unless a case changes gas)
SIGNAL_STEPS = 3
D_IN, HIDDEN, D_OUT = 16, 24, 8


class SignalNet(nn.Module):
    """Linear(16, 24) → tanh → Linear(24, 8), fan-in scaled normal weights from ``seed``."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.l1 = nn.Linear(D_IN, HIDDEN)
        self.l2 = nn.Linear(HIDDEN, D_OUT)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / max(1, p.shape[-1]) ** 0.5)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


def signal_batches(num: int, seed: int = 1, noise: float = 0.05) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``num`` micro-batches (x, y): x ~ N(1, 1), y = 2·tanh(x Wᵀ) + 4 + noise·N(0, 1) for a fixed W."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(D_OUT, D_IN, generator=g) / 4
    out = []
    for _ in range(num):
        x = torch.randn(SIGNAL_MICRO_BATCH, D_IN, generator=g) + 1.0
        y = torch.tanh(x @ w.T) * 2 + 4.0 + noise * torch.randn(SIGNAL_MICRO_BATCH, D_OUT, generator=g)
        out.append((x, y))
    return out


def signal_loss(model, x, y):
    return ((model(x) - y) ** 2).mean()


def gas_schedule(case: dict, world: int) -> list[int]:
    """Gradient accumulation steps of each step: ``case["gas_schedule"]`` (changed between steps
    with ``engine.set_train_batch_size``), else k = 8 samples per step throughout."""
    return list(case.get("gas_schedule") or [SIGNAL_SAMPLES_PER_STEP // world] * SIGNAL_STEPS)


def step_batches(case: dict, world: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """The micro-batches of each step, all ranks: step s's micro-batch a of rank r is entry a·w + r."""
    schedule = gas_schedule(case, world)
    batches = signal_batches(sum(schedule) * world)
    out, pos = [], 0
    for gas in schedule:
        out.append(batches[pos : pos + gas * world])
        pos += gas * world
    return out


def signal_config(case: dict, world: int) -> dict:
    gas = gas_schedule(case, world)[0]
    params = dict(case["params"], stats_interval=1)
    cfg = {
        "train_batch_size": SIGNAL_MICRO_BATCH * gas * world,
        "train_micro_batch_size_per_gpu": SIGNAL_MICRO_BATCH,
        "gradient_accumulation_steps": gas,
        "optimizer": {"type": case["type"], "params": params},
        "zero_optimization": dict({"stage": case["stage"]}, **case.get("zero", {})),
        "gradient_clipping": case.get("clip", 0.0),
        "steps_per_print": 10**9,
    }
    cfg.update(precision_config(case.get("precision", "fp32")))
    for key, value in case.get("extra", {}).items():
        cfg[key] = value
    return cfg


def _build(case: dict, cfg: dict):
    """The model, built inside ``deepspeed.zero.Init`` for ``zero_init`` cases (every parameter
    a (0,) placeholder from construction on, as HF from_pretrained and Megatron-DeepSpeed do at
    ZeRO-3)."""
    import deepspeed

    if case.get("zero_init"):
        with deepspeed.zero.Init(config_dict_or_path=cfg):
            model = SignalNet()
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        # SignalNet's own initialization ran on the (0,) placeholders (a no-op): give the
        # partitioned model the weights every other case starts from, as from_pretrained does.
        reference = dict(SignalNet().named_parameters())
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(reference[n])
        return model, shapes
    return SignalNet(), None


def run_signal_case(case: dict, rank: int, world: int) -> dict:
    import deepspeed

    import vrgd_ds

    cfg = signal_config(case, world)
    if case.get("mutant_shape_from_dim"):
        # The bug this file guards against: 1-D decided from the (0,) placeholder's p.dim().
        import vrgd_ds.optimizer

        vrgd_ds.optimizer.full_dim = lambda p: p.dim()
    try:
        model, init_shapes = _build(case, cfg)
        params = (
            vrgd_ds.decay_groups(model.named_parameters(), 0.01) if case.get("decay_groups") else model.parameters()
        )
        engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=cfg)
    except Exception as exc:  # noqa: BLE001 - a refusal is a result the test checks
        return {"error": f"{type(exc).__name__}: {exc}"}
    opt = vrgd_ds.find_vr_optimizer(engine)
    if case.get("mutant_first_from_G"):
        # The bug this file guards against: r from DeepSpeed's 16-bit G instead of our fp32 Σg.
        opt.moment_source.first.clear()
    dtype = next(engine.module.parameters()).dtype
    steps = []
    for gas, batches in zip(gas_schedule(case, world), step_batches(case, world)):
        if gas != engine.gradient_accumulation_steps():
            engine.set_train_batch_size(SIGNAL_MICRO_BATCH * gas * world)  # micro-batch fixed: gas changes
        before = master_params(engine)
        lrs = list(engine.get_lr())
        for a in range(gas):
            x, y = batches[a * world + rank]
            engine.backward(signal_loss(engine, x.to(dtype), y.to(dtype)))
            engine.step()
        steps.append(
            {
                "before": before,
                "after": master_params(engine),
                "lr": lrs,
                "noise": dict(opt.noise_stats()),
                "gsnr": {name: dict(entry) for name, entry in opt.gsnr_stats().items()},
            }
        )
    return {
        "error": None,
        "steps": steps,
        "init_shapes": init_shapes,
        "tracks_first": getattr(opt.moment_source, "tracks_first", None),
        "extra_bytes": opt.moment_source.extra_buffer_bytes() if opt.moment_source is not None else {},
    }


def run_signal_matrix(rank: int, world: int, cases: list[dict]) -> dict:
    """Every case in one process group (start-up shared); {case name: result}."""
    return {case["name"]: run_signal_case(case, rank, world) for case in cases}
