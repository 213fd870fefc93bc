"""Rank bodies for the plain-PyTorch DDP tests (module level: the harness pickles them)."""

from __future__ import annotations

from torch.nn.parallel import DistributedDataParallel as DDP

from .models import TinyNet, mb_loss, micro_batches

SAMPLES_PER_STEP = 8


def make_optimizer(name: str, params, **kwargs):
    import vrgd_ds

    return vrgd_ds.OPTIMIZERS[name](params, **kwargs)


def train_ddp(rank: int, world: int, name: str, kwargs: dict, steps: int = 3):
    """DDP over gloo, gradient accumulation with no_sync: the same 8 micro-batches per step."""
    model = TinyNet(with_unused=False)
    ddp = DDP(model, find_unused_parameters=True)
    opt = make_optimizer(name, model.parameters(), **kwargs)
    batches = micro_batches(SAMPLES_PER_STEP * steps)
    for step in range(steps):
        accumulate_ddp(ddp, batches[step * SAMPLES_PER_STEP : (step + 1) * SAMPLES_PER_STEP], rank, world)
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def accumulate_ddp(ddp, step_batches, rank: int, world: int) -> None:
    """This rank's share of one step's micro-batches, each loss divided by the local count; DDP
    all-reduces at the last one only (no_sync before)."""
    gas = SAMPLES_PER_STEP // world
    for a in range(gas):
        b = step_batches[a * world + rank]
        if a < gas - 1:
            with ddp.no_sync():
                (mb_loss(ddp, b) / gas).backward()
        else:
            (mb_loss(ddp, b) / gas).backward()


def train_single(name: str, kwargs: dict, steps: int = 3):
    model = TinyNet(with_unused=False)
    opt = make_optimizer(name, model.parameters(), **kwargs)
    batches = micro_batches(SAMPLES_PER_STEP * steps)
    for step in range(steps):
        for b in batches[step * SAMPLES_PER_STEP : (step + 1) * SAMPLES_PER_STEP]:
            (mb_loss(model, b) / SAMPLES_PER_STEP).backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def train_ddp_all(rank: int, world: int, cases: dict):
    return {key: train_ddp(rank, world, name, kwargs) for key, (name, kwargs) in cases.items()}


def k_too_small_ddp(rank: int, world: int):
    """world=1, one micro-batch: the k < 2 error is raised on every rank."""
    model = TinyNet(with_unused=False)
    opt = make_optimizer("vrlamb", model.parameters())
    mb_loss(model, micro_batches(1)[0]).backward()
    try:
        opt.step()
    except RuntimeError as exc:
        return str(exc)
    return None


def noise_stats_ddp(rank: int, world: int):
    """One VRLamb step under DDP (each rank's loss divided by its own micro-batch count, as
    noise_stats() assumes): the statistics of that step."""
    model = TinyNet(with_unused=False)
    ddp = DDP(model, find_unused_parameters=True)
    opt = make_optimizer("vrlamb", model.named_parameters(), lr=1e-2, micro_batch_size=4)
    accumulate_ddp(ddp, micro_batches(SAMPLES_PER_STEP), rank, world)
    opt.step()
    return opt.noise_stats()
