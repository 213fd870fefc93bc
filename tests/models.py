"""Tiny deterministic models and data shared by the tests."""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    """Odd-sized tensors (so ZeRO partitions split them), a branch used only by some micro-batches,
    and a parameter that never gets a gradient."""

    def __init__(self, seed: int = 0, hidden: int = 13, with_unused: bool = True):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc1 = nn.Linear(7, hidden)
        self.fc2 = nn.Linear(hidden, 5)
        self.extra = nn.Linear(5, 5)
        if with_unused:
            self.never_used = nn.Parameter(torch.zeros(3))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x, use_extra: bool = True):
        out = self.fc2(torch.tanh(self.fc1(x)))
        if use_extra:
            out = out + self.extra(out)
        return out


def micro_batches(num: int, size: int = 4, seed: int = 1, skip_extra: bool = True):
    """``num`` (x, y, use_extra) micro-batches; the extra branch is skipped on every third one
    (``skip_extra``). DeepSpeed ZeRO-2 itself needs every rank to produce gradients for the same
    parameters in a micro-step (its bucketed reductions mismatch otherwise), so the DeepSpeed
    tests turn that off."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(num):
        x = torch.randn(size, 7, generator=g)
        y = torch.randn(size, 5, generator=g)
        out.append((x, y, not skip_extra or i % 3 != 1))
    return out


def mb_loss(model, batch):
    x, y, use_extra = batch
    return ((model(x, use_extra) - y) ** 2).mean()
