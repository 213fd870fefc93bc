"""The pure VRGD functions the optimizer's step calls, on a synthetic flat shard (pieces of three
tensors and padding, as a ZeRO partition holds them) against the same functions on whole tensors."""

from __future__ import annotations

import threading

import pytest
import torch

from vrgd_ds import segments
from vrgd_ds.gsnr import normalize_and_clip, update_gsnr_momentum
from vrgd_ds.segments import SegmentLayout
from vrgd_ds.update_rules import adam_update, lamb_update, lars_update, sgd_update

# A shard: the tail of tensor 0 (5 of its 9 elements), all of tensor 1 (4), the head of tensor 2
# (3 of 6), then 2 padding elements. Whole sizes J = 9, 4, 6.
LAYOUT = SegmentLayout([5, 4, 3, 2], [0, 1, 2, -1], [9, 4, 6], names=["a", "b", "c"])
PIECES = [(0, 0, 5), (1, 5, 9), (2, 9, 12)]


def _shard(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(14, generator=g) * 3


@pytest.fixture(params=["runs", "pieces"])
def small_piece(request, monkeypatch):
    """Both ways a layout handles its pieces: consecutive small pieces as one run per operation
    (the default at these sizes), or every piece on its own (``SMALL_PIECE`` = 1, as large ones)."""
    if request.param == "pieces":
        monkeypatch.setattr(segments, "SMALL_PIECE", 1)
    return request.param


def _layout():
    return SegmentLayout(LAYOUT.piece_lengths, LAYOUT.piece_keys, [9, 4, 6], names=LAYOUT.names)


def test_layout_plans_runs_of_small_pieces_and_single_large_ones(monkeypatch):
    monkeypatch.setattr(segments, "SMALL_PIECE", 4)
    # pieces 5 (large), 2, 3 (a run), padding 1, 1 (alone: a large item), 0 (empty), 6 (large)
    layout = SegmentLayout([5, 2, 3, 1, 1, 0, 6], [0, 1, 2, -1, 3, 4, 5], [5, 2, 3, 1, 1, 6])
    assert layout._large == [(0, 0, 5), (3, 11, 12), (5, 12, 18)]
    assert [(r.start, r.end, r.keys, r.lengths) for r in layout._runs] == [(5, 10, [1, 2], [2, 3])]


@pytest.mark.parametrize("squares", [False, True])
def test_layout_sums_and_scaling_equal_piece_by_piece(small_piece, squares):
    """local_sums, scale_ (in place and from a source) and add_scaled_ against the same
    operation on every piece alone; padding is never touched."""
    layout = SegmentLayout([5, 3, 4, 2, 6, 2], [0, 2, 1, 3, 4, -1], [5, 4, 3, 2, 6])
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(22, generator=g), torch.randn(22, generator=g)
    per_tensor = torch.rand(5, generator=g) + 0.5
    sums = layout.local_sums([x, y], squares=squares)
    for row, v in zip(sums, (x, y)):
        for key, a, b in layout.pieces():
            expect = (v[a:b].double() ** 2 if squares else v[a:b].double()).sum()
            assert float(row[key]) == pytest.approx(float(expect), rel=1e-6)
    for divide in (False, True):
        out = layout.scale_(x.clone(), per_tensor, divide=divide)
        written = layout.scale_(y.clone(), per_tensor, divide=divide, src=x)
        for key, a, b in layout.pieces():
            expect = x[a:b] / per_tensor[key] if divide else x[a:b] * per_tensor[key]
            assert torch.equal(out[a:b], expect) and torch.equal(written[a:b], expect)
        assert torch.equal(out[20:], x[20:]) and torch.equal(written[20:], y[20:])
    acc = layout.add_scaled_(x.clone(), y, per_tensor, alpha=-0.3)
    for key, a, b in layout.pieces():
        torch.testing.assert_close(acc[a:b], x[a:b] - 0.3 * (per_tensor[key] * y[a:b]), rtol=1e-6, atol=1e-7)
    assert torch.equal(acc[20:], x[20:])
    # a whole tensor: the plain ops
    whole = SegmentLayout.whole(22)
    assert torch.equal(whole.scale_(x.clone(), per_tensor[:1], divide=True), x / per_tensor[0])
    expect = x.addcmul(y, per_tensor[0], value=2.0)
    assert torch.equal(whole.add_scaled_(x.clone(), y, per_tensor[:1], alpha=2.0), expect)


def test_normalize_and_clip_on_a_shard_equals_whole_tensors(small_piece):
    LAYOUT = _layout()
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


def test_gsnr_momentum_with_one_step_count_per_tensor(small_piece):
    LAYOUT = _layout()
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


# ---- the base update rules on flat shards of two "ranks" vs on whole tensors ----------------------
# Tensors a (9), b (4), c (6) in one flat group of 20 (1 padding), split over two ranks: rank 0
# holds a and the head of b, rank 1 the tail of b, c and the padding. The ranks are two threads;
# `complete` is an all-reduce between them, as the DeepSpeed glue's is between processes.
SIZES = (9, 4, 6)
SHARDS = (
    SegmentLayout([9, 1], [0, 1], SIZES, names=["a", "b", "c"]),
    SegmentLayout([3, 6, 1], [1, 2, -1], SIZES, names=["a", "b", "c"]),
)
STEPS = torch.tensor([3.0, 1.0, 2.0])  # b takes its first step while the group's state exists


class _ThreadAllReduce:
    def __init__(self, world: int):
        self.barrier = threading.Barrier(world)
        self.slots = [None] * world

    def complete_for(self, rank: int):
        def complete(vec):
            self.slots[rank] = vec.clone()
            self.barrier.wait()
            total = sum(self.slots)  # the same order on every rank: identical results
            self.barrier.wait()
            vec.copy_(total)

        return complete


def _flat_state(seed: int, first_tensor_zero: bool) -> dict:
    g = torch.Generator().manual_seed(seed)
    state = {"exp_avg": torch.randn(20, generator=g) * 0.1, "exp_avg_sq": torch.rand(20, generator=g) * 0.01}
    state["momentum_buffer"] = torch.randn(20, generator=g) * 0.1
    if first_tensor_zero:  # b never stepped: its elements of the state are 0 (HeldElements)
        for t in state.values():
            t[9:13] = 0
    return state


def _run_on_shards(rule, param, grad, state, steps, **hp):
    """The rule on the two shards at once (two threads); returns the updated flat parameter."""
    param, state = param.clone(), {k: v.clone() for k, v in state.items()}
    reduce = _ThreadAllReduce(2)
    bounds = ((0, 10), (10, 20))

    def rank(i):
        a, b = bounds[i]
        layout = SegmentLayout(
            SHARDS[i].piece_lengths, SHARDS[i].piece_keys, SIZES, names=SHARDS[i].names, complete=reduce.complete_for(i)
        )
        rule(param[a:b], grad[a:b], {k: v[a:b] for k, v in state.items()}, steps, layout, **hp)

    threads = [threading.Thread(target=rank, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return param


def _run_on_whole(rule, param, grad, state, steps, **hp):
    out = param.clone()
    start = 0
    for key, n in enumerate(SIZES):
        piece = slice(start, start + n)
        whole_state = {k: v[piece].clone() for k, v in state.items()}
        if int(steps[key]) == 1:
            whole_state.pop("momentum_buffer")  # torch.optim: no buffer before the first step
        rule(out[piece], grad[piece], whole_state, int(steps[key]), SegmentLayout.whole(n), **hp)
        start += n
    return out


def _lars(param, grad, state, steps, layout, **hp):
    lars_update(param, grad, state, layout, **hp)  # LARS does not depend on t


RULES = {
    "sgd": (sgd_update, dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False)),
    "adam": (
        adam_update,
        dict(lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, decoupled_weight_decay=True),
    ),
    "lamb": (
        lamb_update,
        dict(
            lr=0.01,
            beta1=0.9,
            beta2=0.99,
            eps=1e-6,
            weight_decay=0.01,
            bias_correction=True,
            trust_ratio=True,
            min_trust_ratio=None,
            max_trust_ratio=None,
        ),
    ),
    "lars": (
        _lars,
        dict(
            lr=0.1, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.01, eps=1e-8, nesterov=False, trust_ratio=True
        ),
    ),
}


@pytest.mark.parametrize("name", list(RULES))
def test_update_rule_on_shards_with_per_tensor_steps_equals_whole_tensors(name, small_piece):
    rule, hp = RULES[name]
    g = torch.Generator().manual_seed(3)
    param, grad = torch.randn(20, generator=g), torch.randn(20, generator=g) * 0.1
    param[19] = grad[19] = 0.0  # padding
    state = _flat_state(4, first_tensor_zero=True)
    sharded = _run_on_shards(rule, param, grad, state, STEPS, **hp)
    whole = _run_on_whole(rule, param, grad, state, STEPS, **hp)
    torch.testing.assert_close(sharded[:19], whole[:19], rtol=1e-6, atol=1e-7)
    assert not torch.allclose(sharded[:19], param[:19])  # it did update


def test_held_elements_keep_absent_tensors_and_zero_new_state():
    p = torch.arange(20.0)
    state = {"exp_avg": torch.ones(20), "tensor_step": torch.ones(3)}
    absent = torch.tensor([False, True, False])
    layout = SegmentLayout([9, 4, 6, 1], [0, 1, 2, -1], SIZES)
    held = layout.hold(absent, p, state)
    p.add_(100.0)
    state["exp_avg"].mul_(5.0)
    state["momentum_buffer"] = torch.full((20,), 7.0)  # created during the update
    state["tensor_step"] += 1
    held.restore()
    assert torch.equal(p[9:13], torch.arange(9.0, 13.0)) and torch.equal(p[:9], torch.arange(9.0) + 100)
    assert torch.equal(state["exp_avg"][9:13], torch.ones(4)) and bool((state["exp_avg"][:9] == 5).all())
    assert bool((state["momentum_buffer"][9:13] == 0).all()) and bool((state["momentum_buffer"][13:] == 7).all())
    assert torch.equal(state["tensor_step"], torch.full((3,), 2.0))  # per-tensor state: not per element


@pytest.mark.parametrize("steps", ["int", "per_tensor"])
@pytest.mark.parametrize("variant", ["plain", "l2", "nesterov", "no_ratio"])
@pytest.mark.parametrize("name", list(RULES))
def test_update_rule_with_a_workspace_equals_without(name, variant, steps):
    """``workspace``: the gradient itself (what the optimizer passes with VR: its scaled
    gradient, consumed) or a separate buffer (``vr=False`` on the CPU) gives bit for bit the
    update that allocating temporaries gives."""
    rule, hp = RULES[name]
    hp = dict(hp)
    if variant == "l2" and "decoupled_weight_decay" in hp:
        hp["decoupled_weight_decay"] = False
    if variant == "nesterov" and "nesterov" in hp:
        hp.update(nesterov=True, **({"dampening": 0.0} if "dampening" in hp else {}))
    if variant == "no_ratio" and "trust_ratio" in hp:
        hp["trust_ratio"] = False
    layout = SegmentLayout([9, 4, 6, 1], [0, 1, 2, -1], SIZES)
    step = STEPS if steps == "per_tensor" else 3
    g = torch.Generator().manual_seed(5)
    param, grad = torch.randn(20, generator=g), torch.randn(20, generator=g) * 0.1
    state = _flat_state(6, first_tensor_zero=False)
    results = []
    for workspace in ("none", "grad", "buffer"):
        p, gr, st = param.clone(), grad.clone(), {k: v.clone() for k, v in state.items()}
        ws = {"none": None, "grad": gr, "buffer": torch.full_like(gr, float("nan"))}[workspace]
        rule(p, gr, st, step, layout, workspace=ws, **hp)
        results.append((p, st))
    for p, st in results[1:]:
        assert torch.equal(p, results[0][0])
        for k in st:
            assert torch.equal(st[k], results[0][1][k]), k
