"""The pure VRGD functions the optimizer's step calls, on a synthetic flat shard (pieces of three
tensors and padding, as a ZeRO partition holds them) against the same functions on whole tensors."""

from __future__ import annotations

import torch

from vrgd_ds.gsnr import normalize_and_clip, update_gsnr_momentum
from vrgd_ds.segments import SegmentLayout

# A shard: the tail of tensor 0 (5 of its 9 elements), all of tensor 1 (4), the head of tensor 2
# (3 of 6), then 2 padding elements. Whole sizes J = 9, 4, 6.
LAYOUT = SegmentLayout([5, 4, 3, 2], [0, 1, 2, -1], [9, 4, 6], names=["a", "b", "c"])
PIECES = [(0, 0, 5), (1, 5, 9), (2, 9, 12)]


def _shard(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(14, generator=g) * 3


def test_normalize_and_clip_on_a_shard_equals_whole_tensors():
    r = _shard()
    means = torch.tensor([1.3, 0.0, 2.0])  # tensor 1 without signal: γ everywhere
    out = normalize_and_clip(r.clone(), means, 0.1, layout=LAYOUT)
    for key, a, b in PIECES:
        expect = normalize_and_clip(r[a:b], means[key], 0.1)
        assert torch.equal(out[a:b], expect)
    assert torch.equal(out[12:], r[12:].clamp(0.1, 1.0))  # padding: untouched by the scaling
    inplace = r.clone()
    assert normalize_and_clip(inplace, means, 0.1, layout=LAYOUT, out=inplace).data_ptr() == inplace.data_ptr()
    assert torch.equal(inplace, out)


def test_gsnr_momentum_with_one_step_count_per_tensor():
    r, start = _shard(1), _shard(2)
    steps = torch.tensor([3.0, 1.0, 7.0])
    momentum = start.clone()
    out = update_gsnr_momentum(momentum, r, 0.9, steps, layout=LAYOUT)
    for key, a, b in PIECES:
        m = start[a:b].clone()
        expect = update_gsnr_momentum(m, r[a:b], 0.9, int(steps[key]))
        assert torch.allclose(out[a:b], expect, rtol=1e-6, atol=0)
        assert torch.equal(momentum[a:b], m)
    # the same step everywhere is the scalar path
    m1, m2 = start.clone(), start.clone()
    a = update_gsnr_momentum(m1, r, 0.9, 4)
    b = update_gsnr_momentum(m2, r, 0.9, torch.full((3,), 4.0), layout=LAYOUT)
    assert torch.allclose(a[:12], b[:12], rtol=1e-6, atol=0)
