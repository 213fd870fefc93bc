"""A model whose gradients arrive in pieces: a module shared by two checkpointed segments."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class SharedBlockNet(nn.Module):
    """x → [shared block] → [shared block again] → head; each use of the block may be checkpointed.

    With ``checkpointing="reentrant"`` the shared block's parameters get their gradient in two
    pieces (one per nested backward pass) in every micro-batch; with ``"non_reentrant"`` or
    ``None`` in one. ``frozen=True`` adds a frozen input projection (``requires_grad=False``).
    """

    def __init__(self, seed: int = 0, width: int = 6, checkpointing: str | None = "reentrant", frozen: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.proj = nn.Linear(7, width)
        self.block = nn.Linear(width, width)
        self.head = nn.Linear(width, 5)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        if frozen:
            self.proj.requires_grad_(False)
        self.checkpointing = checkpointing

    def _block(self, h):
        return torch.tanh(self.block(h))

    def forward(self, x):
        h = self.proj(x)
        if self.checkpointing is None:
            h = self._block(self._block(h))
        else:
            reentrant = self.checkpointing == "reentrant"
            if reentrant and not h.requires_grad:
                h = h.detach().requires_grad_(True)  # reentrant checkpointing needs an input that requires grad
            h = checkpoint(self._block, h, use_reentrant=reentrant)
            h = checkpoint(self._block, h, use_reentrant=reentrant)
        return self.head(h)
