"""VRLamb against apex FusedLAMB, the LAMB that NVIDIA's BERT recipe runs (VRGD.md §3).

``tests/reference.py::ReferenceFusedLAMB`` restates FusedLAMB from apex's source (float64). With
``vr=False`` VRLamb must give the same update Δθ, step by step and tensor by tensor, on a model
with a decay group and a no-decay group, for ``use_nvlamb`` both ways.

Global gradient norm. FusedLAMB divides every gradient by max(1, ‖G‖/max_grad_norm) itself
(‖G‖ over all tensors of all groups). VRLamb does not clip: it takes G as DeepSpeed hands it over
after ``gradient_clipping`` (ZeRO's ``unscale_and_clip_grads``, or ``clip_grad_norm_`` at stage 0)
— or, in plain PyTorch, after ``torch.nn.utils.clip_grad_norm_``. Both of those multiply G by
max_norm/(‖G‖ + 1e-6) when that is < 1: apex's factor up to the 1e-6 in the denominator. So
"FusedLAMB with max_grad_norm = M" is "VRLamb after clipping at M" (DeepSpeed config
``"gradient_clipping": M``; apex's own default M = 1.0 is the paper configs' value). The tests
show both halves: G divided by apex's exact factor gives apex's update to float64 rounding;
G clipped by ``clip_grad_norm_`` gives it within the 1e-6 offset's effect (≤ 1e-6 relative);
and through DeepSpeed ZeRO-1/2 with ``gradient_clipping`` (2 ranks, fp32) within the update
matrix's fp32 tolerance. (With VR on, r comes from the unclipped samples; clipping only
changes G, exactly as for FusedLAMB's own division.)

Tolerances, relative L2 error of each tensor's update. Float64 models: 1e-6 — VRLamb takes
‖θ‖ and ‖u‖ in float32 (``SegmentLayout.tensor_norms``, the same code on whole tensors and ZeRO
shards; apex's norms are float32 too), which puts ~1e-8 into the trust ratio; everything else
is float64 (measured ≤ 2e-7, ``clip_grad_norm_``'s offset included). fp32 under DeepSpeed:
1e-5 plus the rounding of the fp32 weights the update is read from (as
tests/test_update_matrix.py).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from vrgd_ds import VRLamb
from vrgd_ds.deepspeed_glue import build_from_config

from .ds_bodies import SAMPLES_PER_STEP
from .matrix_bodies import STEPS, build_model, case_loss, run_matrix
from .models import TinyNet, mb_loss, micro_batches
from .multiproc import run_ranks
from .reference import ReferenceFusedLAMB, ReferenceVR, rel_err
from .test_update_matrix import reference_updates

LR, WD = 2e-2, 0.01
RTOL_FP64 = 1e-6
RTOL_FP32 = 1e-5
MAX_GRAD_NORM = 0.1  # below every step's ‖G‖ here: clipping is active on every step


def _loss(model, batch):
    x, y, use_extra = batch
    dtype = next(model.parameters()).dtype
    return mb_loss(model, (x.to(dtype), y.to(dtype), use_extra))


def _split(params):
    params = list(params)
    return [p for p in params if p.dim() > 1], [p for p in params if p.dim() <= 1]


def _vrlamb(model, construction, **kwargs):
    if construction == "groups":
        decay, no_decay = _split(model.parameters())
        return VRLamb([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=LR, weight_decay=WD, **kwargs)
    # What the paper configs do: DeepSpeed hands one flat list, weight_decay_exclude_1d splits it.
    return VRLamb(model.parameters(), lr=LR, weight_decay=WD, weight_decay_exclude_1d=True, **kwargs)


def _run_against_apex(use_nvlamb, construction, clip, steps=5, gas=3):
    """Per step and tensor: (VRLamb's Δθ, FusedLAMB's Δθ from the same θ and the same unclipped G)."""
    model = TinyNet().double()  # with a tensor that never gets a gradient (skipped by both)
    ref_model = copy.deepcopy(model)
    opt = _vrlamb(model, construction, vr=False, use_nvlamb=use_nvlamb)
    decay_idx = [i for i, p in enumerate(model.parameters()) if p.dim() > 1]
    no_decay_idx = [i for i, p in enumerate(model.parameters()) if p.dim() <= 1]
    ref_params = list(ref_model.parameters())
    ref = ReferenceFusedLAMB(
        [
            {"params": [ref_params[i] for i in decay_idx]},
            {"params": [ref_params[i] for i in no_decay_idx], "weight_decay": 0.0},
        ],
        lr=LR,
        weight_decay=WD,
        use_nvlamb=use_nvlamb,
        max_grad_norm=math.inf if clip == "none" else MAX_GRAD_NORM,
    )
    batches = micro_batches(steps * gas)
    out = []
    for step in range(steps):
        for b in batches[step * gas : (step + 1) * gas]:
            (_loss(model, b) / gas).backward()
        params = list(model.parameters())
        G = [None if p.grad is None else p.grad.detach().clone() for p in params]
        norm = torch.sqrt(sum((g * g).sum() for g in G if g is not None)).item()
        if clip == "apex_division":  # FusedLAMB's own rule, applied outside the optimizer
            for p in params:
                if p.grad is not None:
                    p.grad.div_(max(1.0, norm / MAX_GRAD_NORM))
        elif clip == "clip_grad_norm_":  # what DeepSpeed's gradient_clipping does
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        if clip != "none":
            assert norm > MAX_GRAD_NORM, "the test means clipping to be active"
        before = [p.detach().clone() for p in params]
        with torch.no_grad():  # teacher-forced: FusedLAMB starts from VRLamb's θ (its own m, v)
            for q, b in zip(ref_params, before):
                q.copy_(b)
        opt.step()
        opt.zero_grad()
        ref.step([[G[i] for i in decay_idx], [G[i] for i in no_decay_idx]])
        out.append([(p.detach() - b, q.detach() - b) for p, q, b in zip(params, ref_params, before)])
    return out


def _assert_updates_close(pairs_per_step, tol):
    compared = 0
    for step, pairs in enumerate(pairs_per_step):
        for t, (got, want) in enumerate(pairs):
            if want.norm() == 0:
                assert got.norm() == 0, f"step {step} tensor {t}: moved, FusedLAMB does not move it"
                continue
            err = rel_err(got, want)
            assert err <= tol, f"step {step} tensor {t}: update relative error {err:.2e} > {tol:.0e}"
            compared += 1
    assert compared > 0


@pytest.mark.parametrize("construction", ["groups", "exclude_1d"])
@pytest.mark.parametrize("use_nvlamb", [False, True], ids=["apex_default", "nvlamb"])
@pytest.mark.parametrize("clip", ["none", "apex_division"])
def test_vr_false_equals_fused_lamb(use_nvlamb, construction, clip):
    _assert_updates_close(_run_against_apex(use_nvlamb, construction, clip), RTOL_FP64)


@pytest.mark.parametrize("use_nvlamb", [False, True], ids=["apex_default", "nvlamb"])
def test_clip_grad_norm_equals_fused_lamb_max_grad_norm(use_nvlamb):
    """torch's / DeepSpeed's max_norm/(‖G‖ + 1e-6) against apex's max_norm/‖G‖."""
    _assert_updates_close(_run_against_apex(use_nvlamb, "groups", "clip_grad_norm_"), RTOL_FP64)


def test_use_nvlamb_changes_only_the_no_decay_group():
    """One step from the same θ and G: the decay group's update is the same both ways; the
    no-decay group's is lr·u without the ratio (use_nvlamb=False) and ratio·lr·u with it."""
    updates = {}
    for use_nvlamb in (False, True):
        model = TinyNet(with_unused=False).double()
        opt = _vrlamb(model, "groups", vr=False, use_nvlamb=use_nvlamb)
        for b in micro_batches(2):
            (_loss(model, b) / 2).backward()
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        updates[use_nvlamb] = [p.detach() - b for p, b in zip(model.parameters(), before)]
        dims = [p.dim() for p in model.parameters()]
    for dim, plain, nv in zip(dims, updates[False], updates[True]):
        if dim > 1:
            assert torch.equal(plain, nv)
        else:
            # Step 1 of LAMB: u = m̂/(√v̂ + eps) ≈ sign(g), so ‖lr·u‖ ≈ lr·√n.
            assert plain.norm().item() == pytest.approx(LR * math.sqrt(plain.numel()), rel=1e-3)
            assert rel_err(plain, nv) > 0.1


def test_no_decay_anywhere_without_nvlamb_is_adam():
    """apex's semantics with weight_decay 0 everywhere: no trust ratio at all, i.e. Adam
    (torch.optim.Adam computes the same m̂/(√v̂ + eps))."""
    a, b = TinyNet().double(), TinyNet().double()
    opt_a = VRLamb(a.parameters(), lr=LR, weight_decay=0.0, vr=False, use_nvlamb=False)
    opt_b = torch.optim.Adam(b.parameters(), lr=LR, eps=1e-6)
    for step in range(4):
        for m, o in ((a, opt_a), (b, opt_b)):
            for batch in micro_batches(3, seed=step):
                (_loss(m, batch) / 3).backward()
            o.step()
            o.zero_grad()
    assert max(rel_err(p, q) for p, q in zip(a.parameters(), b.parameters())) <= RTOL_FP64


@pytest.mark.parametrize("use_nvlamb", [False, True], ids=["apex_default", "nvlamb"])
def test_vr_matches_reference_per_group(use_nvlamb):
    """VR on, two groups, use_nvlamb per group as well as from the constructor: the brute-force
    VRGD.md reference with the same trust-ratio decision."""
    model = TinyNet(with_unused=False)
    ref_model = copy.deepcopy(model)
    decay, no_decay = _split(model.parameters())
    # The no-decay group overrides the constructor's use_nvlamb (the other way round).
    opt = VRLamb(
        [{"params": decay}, {"params": no_decay, "weight_decay": 0.0, "use_nvlamb": use_nvlamb}],
        lr=LR,
        weight_decay=WD,
        use_nvlamb=not use_nvlamb,
    )
    assert [g["use_nvlamb"] for g in opt.param_groups] == [not use_nvlamb, use_nvlamb]
    ref_decay, ref_no_decay = _split(ref_model.parameters())
    refs = [
        ReferenceVR(ref_decay, "lamb", gsnr_beta=0.9, lr=LR, weight_decay=WD, use_nvlamb=not use_nvlamb),
        ReferenceVR(ref_no_decay, "lamb", gsnr_beta=0.9, lr=LR, weight_decay=0.0, use_nvlamb=use_nvlamb),
    ]
    gas = 4
    batches = micro_batches(3 * gas, skip_extra=False)
    for step in range(3):
        samples = {id(p): [] for p in ref_model.parameters()}
        for b in batches[step * gas : (step + 1) * gas]:
            (mb_loss(model, b) / gas).backward()
            grads = torch.autograd.grad(mb_loss(ref_model, b) / gas, list(ref_model.parameters()))
            for p, g in zip(ref_model.parameters(), grads):
                samples[id(p)].append(g)
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        opt.zero_grad()
        for ref in refs:
            ref.step([samples[id(p)] for p in ref.params], [sum(samples[id(p)]) for p in ref.params])
        for t, (p, q, b) in enumerate(zip(model.parameters(), ref_model.parameters(), before)):
            err = rel_err(p.detach() - b, q.detach() - b)
            assert err <= RTOL_FP32, f"step {step} tensor {t}: {err:.2e}"
        with torch.no_grad():  # teacher-forced, as the float32 run and float64 reference drift
            for p, q in zip(model.parameters(), ref_model.parameters()):
                q.copy_(p)


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_use_nvlamb_validated(bad):
    model = TinyNet()
    with pytest.raises(ValueError, match=r"Invalid use_nvlamb: .*; it must be True or False"):
        VRLamb(model.parameters(), use_nvlamb=bad)
    with pytest.raises(ValueError, match=r"Invalid use_nvlamb"):
        VRLamb([{"params": [model.fc1.weight]}, {"params": [model.fc1.bias], "use_nvlamb": bad}])


def test_use_nvlamb_is_a_deepspeed_config_key():
    opt = build_from_config(
        VRLamb, {"lr": 1e-3, "use_nvlamb": False, "weight_decay_exclude_1d": True}, TinyNet().parameters()
    )
    assert {g["use_nvlamb"] for g in opt.param_groups} == {False}
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    with pytest.raises(ValueError, match="Invalid use_nvlamb"):
        build_from_config(VRLamb, {"use_nvlamb": "false"}, TinyNet().parameters())


def test_checkpoint_without_use_nvlamb_loads_as_before():
    """A state_dict from before the option resumes with the ratio on every tensor, as it was trained."""
    model = TinyNet()
    opt = VRLamb(model.parameters(), vr=False, use_nvlamb=False)
    for b in micro_batches(1):
        mb_loss(model, b).backward()
    opt.step()
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        del g["use_nvlamb"]
    fresh = VRLamb(model.parameters(), vr=False, use_nvlamb=False)
    fresh.load_state_dict(sd)
    assert [g["use_nvlamb"] for g in fresh.param_groups] == [True]
    for b in micro_batches(1, seed=3):
        mb_loss(model, b).backward()
    fresh.step()


# ---- DeepSpeed ZeRO-1/2: flat shards, 2 ranks ----------------------------------------------
# The decision is per parameter group, and ZeRO flattens and partitions each group on its own,
# so a flat shard never mixes decay and no-decay tensors: lamb_adapts() decides per shard the
# same on every rank (the norms' all-reduce is skipped on all ranks alike).
_LAMB = {"lr": LR, "weight_decay": WD}
ZERO_CASES = [
    dict(
        name="z1-vr_false-exclude_1d-apex-clip",
        type="VRLamb",
        stage=1,
        clip=0.05,
        params=dict(_LAMB, vr=False, use_nvlamb=False, weight_decay_exclude_1d=True),
    ),
    dict(
        name="z2-vr_false-exclude_1d-apex-clip",
        type="VRLamb",
        stage=2,
        clip=0.05,
        params=dict(_LAMB, vr=False, use_nvlamb=False, weight_decay_exclude_1d=True),
    ),
    dict(
        name="z2-vr_false-groups-nvlamb",
        type="VRLamb",
        stage=2,
        groups=True,
        params=dict(_LAMB, vr=False, use_nvlamb=True),
    ),
    dict(
        name="z1-vr-groups-apex-clip",
        type="VRLamb",
        stage=1,
        groups=True,
        clip=0.05,
        params=dict(_LAMB, use_nvlamb=False),
    ),
    dict(
        name="z2-vr-exclude_1d-apex",
        type="VRLamb",
        stage=2,
        groups=False,
        params=dict(_LAMB, use_nvlamb=False, weight_decay_exclude_1d=True),
    ),
]


@pytest.fixture(scope="module")
def zero_runs():
    return run_ranks(run_matrix, 2, ZERO_CASES, timeout=900, init="deepspeed")


def _fused_lamb_updates(case, ds_steps):
    """FusedLAMB from the run's θ_before each step, on the full-batch float64 gradient G
    (unclipped: FusedLAMB's max_grad_norm = the run's gradient_clipping)."""
    model = build_model("tiny").double()
    params = list(model.parameters())
    decay_idx = [i for i, p in enumerate(params) if p.dim() > 1]
    no_decay_idx = [i for i, p in enumerate(params) if p.dim() <= 1]
    ref = ReferenceFusedLAMB(
        [
            {"params": [params[i] for i in decay_idx]},
            {"params": [params[i] for i in no_decay_idx], "weight_decay": 0.0},
        ],
        lr=case["params"]["lr"],
        weight_decay=case["params"]["weight_decay"],
        use_nvlamb=case["params"]["use_nvlamb"],
        max_grad_norm=case.get("clip") or math.inf,
    )
    batches = micro_batches(SAMPLES_PER_STEP * STEPS, skip_extra=False)
    out = []
    for step, rec in enumerate(ds_steps):
        with torch.no_grad():
            for p, value in zip(params, rec["before"]):
                p.copy_(value)
        loss = (
            sum(
                case_loss(model, x.double(), y.double())
                for x, y, _ in batches[step * SAMPLES_PER_STEP : (step + 1) * SAMPLES_PER_STEP]
            )
            / SAMPLES_PER_STEP
        )
        G = torch.autograd.grad(loss, params)
        ref.step([[G[i] for i in decay_idx], [G[i] for i in no_decay_idx]])
        out.append([p.detach() - b for p, b in zip(params, rec["before"])])
    return out


def _vr_reference_updates(case, ds_steps):
    """VR on: the brute-force VRGD.md reference of the update matrix, groups split by dimension."""
    if case.get("groups"):
        return reference_updates(case, ds_steps)[0]
    # weight_decay_exclude_1d: the same two groups as "groups" gives.
    hp = {k: v for k, v in case["params"].items() if k != "weight_decay_exclude_1d"}
    return reference_updates(dict(case, groups=True, params=hp), ds_steps)[0]


@pytest.mark.parametrize("case", ZERO_CASES, ids=[c["name"] for c in ZERO_CASES])
def test_zero_flat_shards(case, zero_runs):
    results = [rank_results[case["name"]] for rank_results in zero_runs]
    for rank, res in enumerate(results):
        assert res["error"] is None, f"rank {rank}: {res['error']}"
    steps = results[0]["steps"]
    if case["params"].get("vr") is False:
        expected = _fused_lamb_updates(case, steps)
    else:
        expected = _vr_reference_updates(case, steps)
    for step, (rec, ref) in enumerate(zip(steps, expected)):
        for t, (before, after, want) in enumerate(zip(rec["before"], rec["after"], ref)):
            floor = 4 * 2.0**-24 * after.norm().item()  # θ_after is fp32
            err = max((after - before - want).norm().item() - floor, 0.0) / max(want.norm().item(), 1e-30)
            assert err <= RTOL_FP32, f"step {step} tensor {t}: update relative error {err:.2e} > {RTOL_FP32:.0e}"
