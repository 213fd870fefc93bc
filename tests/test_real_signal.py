"""Real gradient signal (per-element GSNR 0.3…1,600, tensor means 24–570, k = 8; see
tests/signal_bodies.py), in fp32, bf16 and fp16, through every DeepSpeed wrapper kind — and models
built inside ``deepspeed.zero.Init``.

Per step and per tensor, against a float64 reference built from the same samples DeepSpeed's
hooks see (a 16-bit copy of the model at the run's weights for bf16/fp16, as in the update
matrix):

* the raw-GSNR statistics (``gsnr_stats()``, stats_interval 1): ``gsnr_mean`` within
  GSNR_MEAN_RTOL relative, ``clip_frac`` within CLIP_FRAC_ATOL;
* the update, teacher-forced as in tests/test_update_matrix.py, within its tolerances;
* the noise statistics |G|², tr Σ per tensor and in total.

Where DeepSpeed's G is rounded to 16 bits, vrgd_ds forms r from its own fp32 Σg
(vrgd_ds/deepspeed_glue/source.py): the mutant case that forms it from G instead must fail the
GSNR check (it lands r on the 1/eps cap: gsnr_mean off by orders of magnitude).

``zero_init`` cases build the model inside ``zero.Init`` (every tensor a (0,) placeholder when the
optimizer forms its groups): ``weight_decay_exclude_1d`` and LAMB's trust ratio with
``use_nvlamb: false`` must still see matrices and vectors (vrgd_ds/shapes.py).
"""

from __future__ import annotations

import pytest
import torch

from .multiproc import run_ranks
from .reference import ReferenceVR, update_error
from .signal_bodies import SIGNAL_MICRO_BATCH, SignalNet, run_signal_matrix, signal_loss, step_batches

# The bounds asked for were 10 % and 0.05; measured at most 1.6e-3 and 0 (README's tolerance table).
GSNR_MEAN_RTOL = 1e-2
CLIP_FRAC_ATOL = 0.05
UPDATE_RTOL = {"fp32": 1e-5, "bf16": 3e-2, "fp16": 5e-3}
NOISE_RTOL = {"fp32": 1e-4, "bf16": 1e-2, "fp16": 1e-2}

LAMB = {"lr": 1e-2, "weight_decay": 0.01}
LAMB_APEX = dict(LAMB, weight_decay_exclude_1d=True, use_nvlamb=False)
BF16_OPTIMIZER = {"data_types": {"grad_accum_dtype": "fp32"}}
KINDS = {
    "VRLamb": ("lamb", {"gsnr_beta": 0.9}),
    "VRSGD": ("sgd", {"gsnr_beta": None}),
    "VRAdamW": ("adam", {"gsnr_beta": 0.9}),
}


def _case(name, stage, precision="fp32", type="VRLamb", params=LAMB, **kw):
    return dict(name=name, type=type, params=params, stage=stage, precision=precision, **kw)


CASES = [
    _case("VRLamb-z0-fp32", 0),
    _case("VRLamb-z2-fp32", 2),
    _case("VRLamb-z0-bf16", 0, "bf16"),
    _case("VRLamb-z1-bf16", 1, "bf16"),
    _case("VRLamb-z2-bf16", 2, "bf16"),
    _case("VRLamb-z2-bf16-per_micro_step", 2, "bf16", params=dict(LAMB, moment_reduction="per_micro_step")),
    _case("VRLamb-z1-fp16", 1, "fp16"),
    _case("VRLamb-z2-fp16-per_micro_step", 2, "fp16", params=dict(LAMB, moment_reduction="per_micro_step")),
    _case("VRLamb-bf16_optimizer", 1, "bf16", extra=BF16_OPTIMIZER),
    _case(
        "VRLamb-bf16_optimizer-per_micro_step",
        1,
        "bf16",
        params=dict(LAMB, moment_reduction="per_micro_step"),
        extra=BF16_OPTIMIZER,
    ),
    _case("VRSGD-z2-bf16-clip", 2, "bf16", type="VRSGD", params={"lr": 0.05, "momentum": 0.9}, clip=0.5),
    _case(
        "VRAdamW-z1-bf16-offload",
        1,
        "bf16",
        type="VRAdamW",
        params={"lr": 1e-2, "weight_decay": 0.1},
        zero={"offload_optimizer": {"device": "cpu"}},
    ),
    _case("VRLamb-z3-fp32", 3),
    _case("VRLamb-z3-bf16", 3, "bf16"),
    _case("VRLamb-z3-fp16-per_step", 3, "fp16", params=dict(LAMB, moment_reduction="per_step")),
    # zero.Init: (0,) placeholders when the groups are formed.
    _case("VRLamb-z3-zero_init-exclude_1d", 3, params=LAMB_APEX, zero_init=True),
    _case("VRLamb-z3-zero_init-exclude_1d-bf16", 3, "bf16", params=LAMB_APEX, zero_init=True),
    _case(
        "VRLamb-z3-zero_init-decay_groups", 3, params=dict(LAMB, use_nvlamb=False), zero_init=True, decay_groups=True
    ),
]
# engine.set_train_batch_size between steps (gradient accumulation 4 → 2 → 6: k = 8, 4, 12): the
# update and the noise statistics follow the new k and 1/gas.
# DeepSpeed decides a step's end from its micro-step counter since initialize, which
# set_train_batch_size does not re-align: 4 → 2 → 6 keeps it aligned (every step ends where it
# should); vrgd_ds.critical_batch.set_train_batch_size re-aligns it for any change
# (tests/test_critical_batch.py).
GAS_CHANGE = [4, 2, 6]
CASES += [_case(f"VRLamb-z{stage}-gas_change", stage, gas_schedule=GAS_CHANGE) for stage in (0, 1, 2, 3)] + [
    _case("VRLamb-z2-bf16-gas_change", 2, "bf16", gas_schedule=GAS_CHANGE),
    _case("VRLamb-bf16_optimizer-gas_change", 1, "bf16", extra=BF16_OPTIMIZER, gas_schedule=GAS_CHANGE),
]
MUTANTS = [
    _case("mutant-VRLamb-z2-bf16-first_from_G", 2, "bf16", mutant_first_from_G=True),
    _case("mutant-VRLamb-bf16_optimizer-first_from_G", 1, "bf16", extra=BF16_OPTIMIZER, mutant_first_from_G=True),
]


WORLD = 2


@pytest.fixture(scope="module")
def results():
    return run_ranks(run_signal_matrix, WORLD, CASES + MUTANTS + [ZERO_INIT_MUTANT], timeout=900, init="deepspeed")


def _two_groups(case) -> bool:
    return bool(case["params"].get("weight_decay_exclude_1d") or case.get("decay_groups"))


def reference(case: dict, steps: list[dict]):
    """Per step: ({name: reference update}, {name: (gsnr_mean, clip_frac)}, {name: (ΣS², ΣQ)}) from
    the float64 reference fed with the same (16-bit where the run is) samples, teacher-forced."""
    kind, defaults = KINDS[case["type"]]
    hp = {k: v for k, v in case["params"].items() if k not in ("moment_reduction", "weight_decay_exclude_1d")}
    gamma, eps = hp.get("gamma", 0.1), hp.get("gsnr_eps", 1e-6)
    model = SignalNet().double()
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(case["precision"])
    sample_model = SignalNet().to(low) if low is not None else model
    sample_params = dict(sample_model.named_parameters())
    if _two_groups(case):
        groups = [[n for n in names if params[n].dim() > 1], [n for n in names if params[n].dim() <= 1]]
        overrides = [{}, {"weight_decay": 0.0}]
    else:
        groups, overrides = [names], [{}]
    refs = [ReferenceVR([params[n] for n in g], kind, **defaults, **dict(hp, **o)) for g, o in zip(groups, overrides)]
    out = []
    for rec, batches in zip(steps, step_batches(case, WORLD)):
        k = len(batches)
        with torch.no_grad():
            for n, value in zip(names, rec["before"]):
                params[n].copy_(value)
                sample_params[n].copy_(value)
        samples = {n: [] for n in names}
        for x, y in batches:
            dtype = next(sample_model.parameters()).dtype
            loss = signal_loss(sample_model, x.to(dtype), y.to(dtype)) / k
            for n, g in zip(names, torch.autograd.grad(loss, [sample_params[n] for n in names])):
                samples[n].append(g.double())
        gsnr, moments = {}, {}
        for n in names:
            stack = torch.stack(samples[n])
            s, q = stack.sum(0), (stack * stack).sum(0)
            mean, sq = s / k, q / k
            r = torch.where(q > 0, mean * mean / torch.maximum(sq - mean * mean, eps * sq), torch.zeros_like(q))
            gsnr[n] = (r.mean().item(), (r / r.mean() < gamma).double().mean().item())
            moments[n] = ((s * k).pow(2).sum().item(), (q * k * k).sum().item())  # one micro-batch's units
        G = {n: sum(samples[n]) for n in names}
        if case.get("clip"):
            norm = torch.sqrt(sum((g * g).sum() for g in G.values())).item()
            coef = case["clip"] / (norm + 1e-6)
            if coef < 1:
                G = {n: g * coef for n, g in G.items()}
        for ref, group, lr in zip(refs, groups, rec["lr"] * len(refs) if len(rec["lr"]) == 1 else rec["lr"]):
            ref.hp["lr"] = lr
            ref.step([samples[n] for n in group], [G[n] for n in group])
        updates = {n: params[n].detach() - rec["before"][i] for i, n in enumerate(names)}
        out.append((updates, gsnr, moments))
    return out, names


def _ok(results, name):
    for rank, res in enumerate(results):
        assert res[name]["error"] is None, f"rank {rank}: {res[name]['error']}"
    return results[0][name]


def gsnr_errors(case, res):
    """Per step and tensor: (relative error of gsnr_mean, absolute error of clip_frac, reference mean)."""
    expected, names = reference(case, res["steps"])
    out = []
    for step, (rec, (_, gsnr, _)) in enumerate(zip(res["steps"], expected)):
        for n in names:
            got = rec["gsnr"][n]
            ref_mean, ref_clip = gsnr[n]
            out.append(
                (step, n, abs(got["gsnr_mean"] - ref_mean) / ref_mean, abs(got["clip_frac"] - ref_clip), ref_mean)
            )
    return out


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_raw_gsnr_statistics_match_reference(case, results):
    res = _ok(results, case["name"])
    errors = gsnr_errors(case, res)
    assert max(e[4] for e in errors) > 100, "the case lost its signal: no tensor with mean r > 100"
    print(
        f"{case['name']}: gsnr_mean max rel err {max(e[2] for e in errors):.2e}, "
        f"clip_frac max abs err {max(e[3] for e in errors):.3f}"
    )
    for step, n, mean_err, clip_err, ref_mean in errors:
        assert mean_err <= GSNR_MEAN_RTOL, f"step {step} {n}: gsnr_mean off by {mean_err:.2%} (ref {ref_mean:.1f})"
        assert clip_err <= CLIP_FRAC_ATOL, f"step {step} {n}: clip_frac off by {clip_err:.3f}"
    tracks = res["tracks_first"]
    assert tracks == (case["precision"] != "fp32"), f"Σg tracked: {tracks}"


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_update_matches_reference(case, results):
    res = _ok(results, case["name"])
    for rank in range(1, len(results)):  # every rank holds the same master weights
        for a, b in zip(res["steps"], results[rank][case["name"]]["steps"]):
            assert all(torch.equal(x, y) for x, y in zip(a["after"], b["after"]))
    expected, names = reference(case, res["steps"])
    tol = UPDATE_RTOL[case["precision"]]
    worst = 0.0
    for step, (rec, (updates, _, _)) in enumerate(zip(res["steps"], expected)):
        for i, n in enumerate(names):
            err = update_error(rec["before"][i], rec["after"][i], updates[n])
            worst = max(worst, err)
            assert err <= tol, f"step {step} {n}: update relative error {err:.2e} > {tol:.0e}"
    print(f"{case['name']}: max relative update error {worst:.2e}")


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_noise_stats_match_reference(case, results):
    res = _ok(results, case["name"])
    expected, names = reference(case, res["steps"])
    tol = NOISE_RTOL[case["precision"]]
    for step, (rec, (_, _, moments)) in enumerate(zip(res["steps"], expected)):
        stats = rec["noise"]
        k = len(step_batches(case, WORLD)[step])
        assert stats["k"] == k, f"step {step}: k = {stats['k']}, expected {k}"
        for n in names:
            s2, q = moments[n]
            b = SIGNAL_MICRO_BATCH
            g2, tr = (s2 - q) / (k * (k - 1)), b * (k * q - s2) / (k * (k - 1))
            scale = max(s2, q * k) / (k * (k - 1))
            got = stats["per_tensor"][n]
            assert abs(got["grad_norm_sq"] - g2) <= tol * scale, f"step {step} {n}: |G|² {got['grad_norm_sq']} vs {g2}"
            assert abs(got["noise_trace"] - tr) <= tol * b * scale, (
                f"step {step} {n}: tr Σ {got['noise_trace']} vs {tr}"
            )


def test_zero_init_models_are_placeholders(results):
    """The zero.Init cases really had (0,) placeholders when the optimizer formed its groups."""
    for case in CASES:
        if case.get("zero_init"):
            shapes = results[0][case["name"]]["init_shapes"]
            assert shapes and all(s == (0,) for s in shapes.values()), shapes


# Last: it patches the group rule of the rank processes it runs in.
ZERO_INIT_MUTANT = _case(
    "mutant-VRLamb-z3-zero_init-exclude_1d-dim", 3, params=LAMB_APEX, zero_init=True, mutant_shape_from_dim=True
)


@pytest.mark.parametrize("case", MUTANTS, ids=[c["name"] for c in MUTANTS])
def test_first_moment_from_16bit_G_is_caught(case, results):
    """r from DeepSpeed's bf16-rounded G (the bug fixed in source.py) fails the GSNR check."""
    res = _ok(results, case["name"])
    worst = max(e[2] for e in gsnr_errors(case, res))
    print(f"{case['name']}: worst gsnr_mean error {worst:.2%}")
    assert worst > GSNR_MEAN_RTOL, f"the mutant passed the GSNR check (worst gsnr_mean error {worst:.2%})"


def test_zero_init_groups_from_placeholder_shape_are_caught(results):
    """Groups decided by p.dim() of zero.Init's (0,) placeholders (the bug fixed by vrgd_ds/shapes.py)
    put every tensor in the no-decay, no-trust-ratio group: the update check fails."""
    case = ZERO_INIT_MUTANT
    res = _ok(results, case["name"])
    expected, names = reference(case, res["steps"])
    worst = max(
        update_error(rec["before"][i], rec["after"][i], updates[n])
        for rec, (updates, _, _) in zip(res["steps"], expected)
        for i, n in enumerate(names)
    )
    print(f"{case['name']}: worst update error {worst:.2e}")
    assert worst > UPDATE_RTOL["fp32"], f"the mutant passed the update check ({worst:.2e})"
