"""One gradient sample per micro-batch, however autograd delivers it (vrgd_ds/samples.py), in
plain PyTorch: reentrant activation checkpointing of a module used in two segments delivers each
micro-batch's gradient of that module in two pieces (DeepSpeed paths: tests/test_update_matrix.py)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import vrgd_ds

from .checkpoint_models import SharedBlockNet
from .reference import ReferenceVR, rel_err

K = 4


def _batches(n):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 7, generator=g), torch.randn(4, 5, generator=g)) for _ in range(n)]


@pytest.mark.parametrize("checkpointing", ["reentrant", "non_reentrant", None])
@pytest.mark.parametrize("kind", ["sgd", "lamb"])
def test_pieces_of_one_micro_batch_are_one_sample(checkpointing, kind):
    model = SharedBlockNet(checkpointing=checkpointing)
    ref_model = SharedBlockNet(checkpointing=None).double()
    hp = {"lr": 0.1, "momentum": 0.9} if kind == "sgd" else {"lr": 1e-2, "weight_decay": 0.01}
    opt = (vrgd_ds.VRSGD if kind == "sgd" else vrgd_ds.VRLamb)(model.parameters(), **hp)
    ref = ReferenceVR(list(ref_model.parameters()), kind, gsnr_beta=None if kind == "sgd" else 0.9, **hp)
    data = _batches(3 * K)
    for step in range(3):
        samples = [[] for _ in ref.params]
        for x, y in data[step * K : (step + 1) * K]:
            (((model(x) - y) ** 2).mean() / K).backward()
            grads = torch.autograd.grad(((ref_model(x.double()) - y.double()) ** 2).mean() / K, ref.params)
            for i, g in enumerate(grads):
                samples[i].append(g)
        before = [p.detach().double().clone() for p in model.parameters()]
        ref_before = [p.detach().clone() for p in ref.params]
        opt.step()
        opt.zero_grad()
        ref.step(samples, [sum(s) for s in samples])
        for p, b, q, rb in zip(model.parameters(), before, ref.params, ref_before):
            assert rel_err(p.detach().double() - b, q.detach() - rb) <= 1e-5, f"step {step}"


class _OuterThenNested(torch.nn.Module):
    """The block's gradient arrives first from the outer backward pass (its later, plain use)
    and then from a nested one (its checkpointed use): not repairable, refused."""

    def __init__(self):
        super().__init__()
        self.block = torch.nn.Linear(5, 5)

    def forward(self, x):
        h = checkpoint(self.block, x.requires_grad_(True), use_reentrant=True)
        return self.block(torch.tanh(h))


def test_outer_then_nested_piece_is_refused_with_the_fix():
    model = _OuterThenNested()
    opt = vrgd_ds.VRSGD(model.named_parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match=r"block\.(weight|bias) received part .*use_reentrant=False"):
        model(torch.randn(3, 5)).sum().backward()
    assert opt is not None
