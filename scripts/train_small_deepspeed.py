"""Train a small MLP classifier with a VR optimizer through the DeepSpeed launcher.

The smallest complete example of vrgd_ds under DeepSpeed: ``import vrgd_ds`` registers the
optimizer types, the JSON config does the rest. Launch (2 CPU ranks, or 2 GPUs on a GPU node):

    deepspeed --num_gpus 2 scripts/train_small_deepspeed.py --deepspeed_config configs/small_vrlamb_zero2.json

On one GPU node with 8 GPUs change only ``--num_gpus 8`` (and train_batch_size in the config,
which must equal micro-batch × gradient_accumulation_steps × GPUs).
"""

from __future__ import annotations

import argparse

import deepspeed
import torch
from torch import nn

import vrgd_ds
from vrgd_ds.cpu_comm import avoid_shm_allreduce


def synthetic_classification(num: int, dim: int = 32, classes: int = 10, seed: int = 0):
    """A fixed random teacher network labels Gaussian inputs: learnable, noisy, no download."""
    teacher = torch.randn(dim, classes, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num, dim, generator=g)
    logits = torch.tanh(x @ teacher) * 3 + 0.5 * torch.randn(num, classes, generator=g)
    return x, logits.argmax(1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps (default: 60)")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the launcher")
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args()

    # On CPU: keep DeepSpeed from building its shm all-reduce op, whose ~69 MB file per rank in
    # /dev/shm is never removed (training does not use the op). A no-op on GPUs.
    avoid_shm_allreduce()
    deepspeed.init_distributed()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.LayerNorm(128), nn.Linear(128, 10))
    engine, *_ = deepspeed.initialize(args=args, model=model, model_parameters=model.parameters())
    rank, world = engine.global_rank, engine.world_size
    micro, gas = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    x, y = synthetic_classification(args.steps * engine.train_batch_size())
    x_test, y_test = synthetic_classification(2048, seed=1)
    opt = vrgd_ds.find_vr_optimizer(engine)
    loss_fn = nn.CrossEntropyLoss()

    cursor = 0
    for step in range(1, args.steps + 1):
        for _ in range(gas):
            start = cursor + rank * micro
            loss = loss_fn(engine(x[start : start + micro]), y[start : start + micro])
            engine.backward(loss)
            engine.step()
            cursor += micro * world
        summary = opt.gsnr_summary() if opt is not None else {}
        if rank == 0 and summary and summary["step"] == step:
            with torch.no_grad():
                acc = (engine(x_test).argmax(1) == y_test).float().mean().item()
            print(
                f"step {step:4d}  loss {loss.item():.4f}  test acc {acc:.3f}  "
                f"GSNR mean r {summary['gsnr_mean']:.3g}  clipped at gamma {summary['gsnr_clip_frac']:.1%}  "
                f"mean scale {summary['gsnr_scale_mean']:.3f}",
                flush=True,
            )
    if rank == 0 and opt is not None:
        print("per-tensor GSNR statistics at the last statistics step:")
        for name, s in opt.gsnr_stats().items():
            print(
                f"  {name:12s} mean r {s['gsnr_mean']:9.3g}  clip frac {s['clip_frac']:6.1%}  "
                f"scale {s['scale_mean']:.3f}"
            )


if __name__ == "__main__":
    main()
