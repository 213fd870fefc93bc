"""The four VR optimizers in one process: brute-force reference, exact fallbacks, invariances,
bad input, state_dict round trip."""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch

from vrgd_ds import VRSGD, VRAdamW, VRLamb, VRLars
from vrgd_ds.gsnr import gsnr_from_moments, normalize_and_clip

from .models import TinyNet, mb_loss, micro_batches
from .optim_db import OPTIMIZER_DB, bad_inputs, reference_configs, torch_pairs
from .reference import ReferenceVR, max_rel_err, reference_gsnr

ROWS = pytest.mark.parametrize("info", OPTIMIZER_DB, ids=lambda info: info.cls.__name__)
CONFIGS = pytest.mark.parametrize(
    "info,kwargs", [(info, kw) for _, info, kw in reference_configs()], ids=[n for n, _, _ in reference_configs()]
)


def _split_vr_kwargs(kind_kwargs):
    vr_keys = {"gamma", "gsnr_beta", "gsnr_eps", "vr"}
    return {k: v for k, v in kind_kwargs.items() if k in vr_keys}, {
        k: v for k, v in kind_kwargs.items() if k not in vr_keys
    }


def _default_beta(cls):
    return inspect.signature(cls).parameters["gsnr_beta"].default


def run_brute_force(cls, kind, kwargs, steps=3, gas=4):
    model = TinyNet()
    ref_model = copy.deepcopy(model)
    opt = cls(model.parameters(), **kwargs)
    vr_kw, hp = _split_vr_kwargs(kwargs)
    ref = ReferenceVR(
        ref_model.parameters(),
        kind,
        gamma=vr_kw.get("gamma", 0.1),
        gsnr_beta=vr_kw.get("gsnr_beta", _default_beta(cls)),
        **hp,
    )
    batches = micro_batches(steps * gas)
    ref_params = list(ref_model.parameters())
    for step in range(steps):
        chunk = batches[step * gas : (step + 1) * gas]
        samples = [[] for _ in ref_params]
        for b in chunk:
            (mb_loss(model, b) / gas).backward()
            grads = torch.autograd.grad(mb_loss(ref_model, b) / gas, ref_params, allow_unused=True)
            for i, g in enumerate(grads):
                samples[i].append(torch.zeros_like(ref_params[i]) if g is None else g)
        opt.step()
        opt.zero_grad()
        # The never-used parameter gets no gradient at all: skipped, as torch.optim skips it.
        used = [i for i, s in enumerate(samples) if any(x.abs().sum() > 0 for x in s)]
        ref_sub = ReferenceVR.__new__(ReferenceVR)
        ref_sub.__dict__.update(ref.__dict__)
        ref_sub.params = [ref_params[i] for i in used]
        ref_sub.state = [ref.state[i] for i in used]
        ref_sub.step([samples[i] for i in used], [sum(samples[i]) for i in used])
    return model, ref_model


@CONFIGS
def test_matches_brute_force_reference(info, kwargs):
    model, ref_model = run_brute_force(info.cls, info.kind, kwargs)
    assert max_rel_err(model.parameters(), ref_model.parameters()) <= 1e-6
    # and the run really moved the parameters
    assert max_rel_err(model.parameters(), TinyNet().parameters()) > 1e-3


@CONFIGS
def test_base_rules_match_reference_without_vr(info, kwargs):
    cls, kind = info.cls, info.kind
    kwargs = {k: v for k, v in kwargs.items() if k not in ("gamma", "gsnr_beta")}
    model = TinyNet()
    ref_model = copy.deepcopy(model)
    opt = cls(model.parameters(), vr=False, **kwargs)
    ref = ReferenceVR(ref_model.parameters(), kind, vr=False, **kwargs)
    for step in range(3):
        for b in micro_batches(2, seed=step):
            (mb_loss(model, b) / 2).backward()
        params = [p for p in model.parameters() if p.grad is not None]
        ref.params = [q for p, q in zip(model.parameters(), ref_model.parameters()) if p.grad is not None]
        ref.state = ref.state[: len(ref.params)]
        grads = [p.grad.clone() for p in params]
        opt.step()
        opt.zero_grad()
        ref.step([None] * len(grads), grads)
    assert max_rel_err(model.parameters(), ref_model.parameters()) <= 1e-6


@pytest.mark.parametrize("vr_kwargs", [dict(vr=False), dict(gamma=1.0)], ids=["vr_false", "gamma_1"])
@pytest.mark.parametrize("ours,theirs,kwargs", torch_pairs())
def test_fallback_matches_torch_optim(ours, theirs, kwargs, vr_kwargs):
    model = TinyNet()
    base = copy.deepcopy(model)
    opt = ours(model.parameters(), **kwargs, **vr_kwargs)
    torch_kwargs = {k: v for k, v in kwargs.items() if k != "decoupled_weight_decay"}
    ref = theirs(base.parameters(), **torch_kwargs, foreach=False)
    for step in range(4):
        for m, o in ((model, opt), (base, ref)):
            for b in micro_batches(2, seed=10 + step):
                (mb_loss(m, b) / 2).backward()
            o.step()
            o.zero_grad()
    tol = 0.0 if vr_kwargs.get("vr") is False else 1e-6
    assert max_rel_err(model.parameters(), base.parameters()) <= tol
    if vr_kwargs.get("vr") is False:
        assert opt.moment_source is None
        assert all(len(p._backward_hooks or {}) == 0 for p in model.parameters())


@CONFIGS
def test_gamma_one_equals_vr_false(info, kwargs):
    """γ = 1 clips r to 1 everywhere: the base optimizer (GSNR momentum of ones is ones)."""
    cls = info.cls
    kwargs = {k: v for k, v in kwargs.items() if k != "gamma"}
    a, b = TinyNet(), TinyNet()
    opt_a = cls(a.parameters(), gamma=1.0, **kwargs)
    opt_b = cls(b.parameters(), vr=False, **kwargs)
    for step in range(3):
        for m, o in ((a, opt_a), (b, opt_b)):
            for batch in micro_batches(3, seed=step):
                (mb_loss(m, batch) / 3).backward()
            o.step()
            o.zero_grad()
    assert max_rel_err(a.parameters(), b.parameters()) <= 1e-6


@ROWS
def test_loss_scale_invariance(info):
    """r is invariant to any common scale of the samples; Adam/LAMB/LARS updates too (their own
    eps made negligible). SGD's update scales with G, so there .grad is unscaled as
    GradScaler.unscale_ would."""
    cls, unscale = info.cls, info.scale_invariant is None
    kwargs = info.basic if unscale else info.scale_invariant
    results = []
    for scale in (1.0, 1024.0):
        m = TinyNet()
        opt = cls(m.parameters(), **kwargs)
        for step in range(3):
            for b in micro_batches(4, seed=step):
                (mb_loss(m, b) * scale / 4).backward()
            if unscale:
                for p in m.parameters():
                    if p.grad is not None:
                        p.grad.div_(scale)  # what GradScaler.unscale_ does: r must not notice
            opt.step()
            opt.zero_grad()
        results.append(list(m.parameters()))
    assert max_rel_err(results[1], results[0]) <= 1e-6


def test_clipping_changes_update_not_gsnr():
    """r comes from the samples as backward produced them; clipping .grad scales only G."""
    kwargs = dict(lr=1.0, momentum=0.0)
    a, b = TinyNet(), TinyNet()
    opt_a, opt_b = VRSGD(a.parameters(), **kwargs), VRSGD(b.parameters(), **kwargs)
    for batch in micro_batches(4):
        (mb_loss(a, batch) / 4).backward()
        (mb_loss(b, batch) / 4).backward()
    before = [p.detach().clone() for p in a.parameters()]
    total = torch.nn.utils.clip_grad_norm_(a.parameters(), float("inf"))
    torch.nn.utils.clip_grad_norm_(a.parameters(), 0.5 * float(total))
    factor = a.fc1.weight.grad.norm() / b.fc1.weight.grad.norm()
    opt_a.step()
    opt_b.step()
    for p0, pa, pb in zip(before, a.parameters(), b.parameters()):
        if pa.grad is None:
            continue
        torch.testing.assert_close(pa - p0, (pb - p0) * factor, rtol=1e-4, atol=1e-7)
    assert 0.45 < factor < 0.55


def test_gsnr_functions_against_reference():
    g = torch.Generator().manual_seed(0)
    samples = [torch.randn(50, generator=g) + 0.3 for _ in range(6)]
    samples[0][:5] = 0
    for s in samples:
        s[5:8] = 0  # no signal at all
    s1 = sum(samples)
    s2 = sum(x * x for x in samples)
    r = gsnr_from_moments(s1, s2, 6, 1e-6)
    assert torch.all(r[5:8] == 0)
    out = normalize_and_clip(r, r.mean(), 0.1)
    torch.testing.assert_close(out.double(), reference_gsnr(samples, 0.1), rtol=1e-6, atol=1e-7)
    # identical samples: variance 0, r capped at 1/eps, still finite
    r_same = gsnr_from_moments(torch.full((3,), 4.0), torch.full((3,), 4.0), 4, 1e-6)
    torch.testing.assert_close(r_same, torch.full((3,), 1e6), rtol=2e-6, atol=0)
    # samples 0, 0, 2, 2: mean 1, second moment 2, variance 1, r = 1
    torch.testing.assert_close(
        gsnr_from_moments(torch.tensor([4.0]), torch.tensor([8.0]), 4, 1e-6), torch.tensor([1.0])
    )
    # in place of the second moment (what the optimizers do), same values; inputs scaled by any
    # common factor (loss scale) or passed as an average (sum_scale) give the same r
    s2_copy = s2.clone()
    assert gsnr_from_moments(s1, s2_copy, 6, 1e-6, out=s2_copy) is s2_copy
    torch.testing.assert_close(s2_copy, r, rtol=0, atol=0)
    torch.testing.assert_close(gsnr_from_moments(s1 * 512 / 3, s2 * 512**2, 6, 1e-6, sum_scale=3), r, rtol=1e-6, atol=0)
    # a non-finite sample makes r non-finite (the optimizer then skips the step)
    bad = s2.clone()
    bad[10] = float("inf")
    s1_bad = s1.clone()
    s1_bad[10] = float("inf")
    assert not torch.isfinite(gsnr_from_moments(s1_bad, bad, 6, 1e-6)[10])
    # no signal anywhere: r = gamma everywhere
    zero = normalize_and_clip(torch.zeros(4), torch.tensor(0.0), 0.2)
    assert torch.all(zero == 0.2)


def test_k_less_than_two_is_a_clear_error():
    m = TinyNet()
    opt = VRLamb(m.parameters())
    mb_loss(m, micro_batches(1)[0]).backward()
    with pytest.raises(RuntimeError, match=r"k=1.*gradient accumulation >= 2.*>= 2 data-parallel ranks"):
        opt.step()


@pytest.mark.parametrize(
    "info,kwargs,match", bad_inputs(), ids=[f"{i.cls.__name__}-{'-'.join(kw)}" for i, kw, _ in bad_inputs()]
)
def test_bad_hyperparameters(info, kwargs, match):
    with pytest.raises(ValueError, match=match):
        info.cls(TinyNet().parameters(), **kwargs)


def test_bad_hyperparameter_in_a_param_group():
    p = list(TinyNet().parameters())
    with pytest.raises(ValueError, match=r"Invalid gamma: 0.0"):
        VRLamb([{"params": p[:1]}, {"params": p[1:], "gamma": 0.0}])


@ROWS
def test_nonfinite_gradient_skips_step(info):
    cls, kwargs = info.cls, info.basic
    m = TinyNet()
    opt = cls(m.parameters(), **kwargs)
    for b in micro_batches(2):
        (mb_loss(m, b) / 2).backward()
    opt.step()
    opt.zero_grad()
    params = [p.detach().clone() for p in m.parameters()]
    state = copy.deepcopy(opt.state_dict()["state"])
    batches = micro_batches(2, seed=5)
    (mb_loss(m, batches[0]) / 2).backward()
    (mb_loss(m, batches[1]) * float("nan")).backward()
    opt.step()
    assert opt.skipped_steps == 1
    for p0, p in zip(params, m.parameters()):
        assert torch.equal(p0, p)
    after = opt.state_dict()["state"]
    for key in state:
        for name, v in state[key].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(after[key][name])), name
    # accumulators were reset: a clean next step works and updates
    opt.zero_grad()
    for b in micro_batches(2, seed=6):
        (mb_loss(m, b) / 2).backward()
    opt.step()
    assert opt.skipped_steps == 1
    assert any(not torch.equal(p0, p) for p0, p in zip(params, m.parameters()))


@ROWS
def test_state_dict_round_trip(info):
    cls, kwargs = info.cls, info.basic

    def train(model, opt, seeds):
        for s in seeds:
            for b in micro_batches(3, seed=s):
                (mb_loss(model, b) / 3).backward()
            opt.step()
            opt.zero_grad()

    full = TinyNet()
    opt_full = cls(full.parameters(), **kwargs)
    train(full, opt_full, range(6))

    part = TinyNet()
    opt_part = cls(part.parameters(), **kwargs)
    train(part, opt_part, range(3))
    saved = copy.deepcopy((part.state_dict(), opt_part.state_dict()))
    fresh = TinyNet(seed=3)
    fresh.load_state_dict(saved[0])
    opt_fresh = cls(fresh.parameters(), **kwargs)
    opt_fresh.load_state_dict(saved[1])
    train(fresh, opt_fresh, range(3, 6))
    for a, b in zip(full.parameters(), fresh.parameters()):
        assert torch.equal(a, b)


def test_weight_decay_exclude_1d_and_named_stats():
    m = TinyNet()
    opt = VRLars(m.named_parameters(), lr=0.1, weight_decay=0.1, weight_decay_exclude_1d=True, stats_interval=2)
    groups = opt.param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert [g["trust_ratio"] for g in groups] == [True, False]
    assert all(p.dim() == 1 for p in groups[1]["params"])
    for step in range(2):
        for b in micro_batches(4, seed=step):
            (mb_loss(m, b) / 4).backward()
        opt.step()
        opt.zero_grad()
        if step == 0:
            assert opt.gsnr_stats() == {}
    stats = opt.gsnr_stats()
    assert set(stats) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "extra.weight", "extra.bias"}
    for entry in stats.values():
        assert 0.1 - 1e-6 <= entry["scale_mean"] <= 1.0 and 0 <= entry["clip_frac"] <= 1
        assert entry["gsnr_q10"] <= entry["gsnr_q50"] <= entry["gsnr_q90"]
        assert math.isfinite(entry["gsnr_mean"])
    summary = opt.gsnr_summary()
    assert summary["step"] == 2 and 0.1 <= summary["gsnr_scale_mean"] <= 1


def test_param_group_added_later_is_watched():
    m = TinyNet()
    opt = VRLamb([m.fc1.weight, m.fc1.bias], lr=1e-2)
    opt.add_param_group({"params": [m.fc2.weight, m.fc2.bias], "gamma": 0.5})
    before = m.fc2.weight.detach().clone()
    for b in micro_batches(3):
        (mb_loss(m, b) / 3).backward()
    opt.step()
    assert not torch.equal(before, m.fc2.weight)
    with pytest.raises(ValueError, match="Invalid gamma"):
        opt.add_param_group({"params": [m.extra.weight], "gamma": 2.0})
    assert len(opt.param_groups) == 2


@pytest.mark.parametrize("cls", [VRLamb, VRAdamW], ids=["VRLamb", "VRAdamW"])
def test_gsnr_momentum_started_on_a_resumed_state_counts_its_own_steps(cls):
    """A state saved without GSNR momentum (here: 3 steps with vr=False) and loaded into a VR
    optimizer with gsnr_beta: the momentum's bias correction starts at its own first step, so that
    step's p̂ is r itself — the same update as gsnr_beta=None from the same state (the bug: the
    correction used the state's step 4, scaling p̂ by 1 − β ≈ 0.1)."""
    torch.manual_seed(0)
    batches = micro_batches(16)

    def train(opt, model, steps, offset):
        for s in range(steps):
            for b in batches[offset + 2 * s : offset + 2 * s + 2]:
                (mb_loss(model, b) / 2).backward()
            opt.step()
            opt.zero_grad()

    base_model = TinyNet()
    base = cls(base_model.parameters(), lr=1e-2, vr=False)
    train(base, base_model, 3, 0)
    results = []
    for beta in (0.9, None):
        model = copy.deepcopy(base_model)
        opt = cls(model.parameters(), lr=1e-2, gsnr_beta=beta)
        opt.load_state_dict(copy.deepcopy(base.state_dict()))
        for group in opt.param_groups:  # load_state_dict restored the saved run's hyperparameters
            group["gsnr_beta"] = beta
        train(opt, model, 1, 6)
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_decay_groups_split_on_the_whole_shape_and_reject_bad_input():
    """vrgd_ds.decay_groups: matrices get weight_decay, 1-D tensors 0 — by ds_shape where ZeRO-3's
    zero.Init left a (0,) placeholder — and nonsense is a ValueError naming what to pass."""
    from vrgd_ds import decay_groups

    model = TinyNet()
    placeholder = torch.nn.Parameter(torch.empty(0))
    placeholder.ds_shape = torch.Size([3, 4])  # what zero.Init leaves
    groups = decay_groups(list(model.named_parameters()) + [("ph", placeholder)], 0.01)
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert any(p is placeholder for p in decay["params"])
    assert all(p.dim() > 1 for p in decay["params"] if p is not placeholder)
    assert all(p.dim() == 1 for p in no_decay["params"])
    for bad in (-0.1, float("nan"), float("inf"), "0.01", True):
        with pytest.raises(ValueError, match="weight_decay"):
            decay_groups(model.named_parameters(), bad)
    with pytest.raises(ValueError, match="named_parameters"):
        decay_groups([("w", 1.0)], 0.01)


def test_tensor_lr_is_read_once_per_change_not_per_tensor():
    """A 1-element tensor lr (torch.optim's capturable idiom, changed in place by a scheduler) is
    read to the host once per change — on a GPU each read is a device sync — and gives the same
    update as the float lr, bit for bit."""
    from vrgd_ds import host

    torch.manual_seed(0)
    params_t = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(5)]
    params_f = [torch.nn.Parameter(p.detach().clone()) for p in params_t]
    lr = torch.tensor(0.01)
    opt_t = VRLamb(params_t, lr=lr, vr=False)
    opt_f = VRLamb(params_f, lr=0.01, vr=False)
    for step in range(3):
        grads = [torch.randn(4, 3) for _ in params_t]
        for p, q, g in zip(params_t, params_f, grads):
            p.grad, q.grad = g.clone(), g.clone()
        before = host.reads()
        opt_t.step()
        assert host.reads() - before == 1, "one read of the lr for 5 tensors"
        opt_f.step()
        for p, q in zip(params_t, params_f):
            assert torch.equal(p, q), f"step {step}"
        lr.mul_(0.5)  # in place, as torch's schedulers change a tensor lr
        opt_f.param_groups[0]["lr"] *= 0.5
