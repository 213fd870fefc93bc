"""The update of every optimizer step, under every DeepSpeed path we support, against the
brute-force float64 reference of VRGD.md (tests/reference.py) — or a refusal at
``deepspeed.initialize`` that says what to change.

All cases run in one 2-rank process group (start-up is shared); each is reported under its own
pytest id. The comparison is teacher-forced: at every step the reference starts from the
DeepSpeed run's fp32 master weights, forms the per-micro-batch gradients itself (float64, no
checkpointing, no DeepSpeed), and its own optimizer state evolves from those; the update
Δθ = θ_after − θ_before of each step and each tensor is compared in relative L2 norm.

Tolerances on the update: fp32 1e-5 relative, plus the rounding of the fp32 weights the
update is read from (4·2⁻²⁴·‖θ‖, which matters only for tiny updates such as LARS's).
bf16/fp16: DeepSpeed runs forward and backward in 16 bits, so the reference takes its gradient
samples from a 16-bit copy of the model at the run's weights (the samples DeepSpeed's hooks see,
up to kernel order), then does all of VRGD.md in float64. What remains is DeepSpeed's 16-bit
gradient reduction (G is reduced in bf16/fp16, ~2⁻⁸ relative per element) against our fp32
moments: UPDATE_RTOL_BF16, UPDATE_RTOL_FP16. (Taking the samples from the float64 model instead mixes in the
16-bit forward's own noise: at step 1 an Adam/LAMB element whose gradient is ≈ 0 then flips
sign, for vr=False as much as for VR.)
"""

from __future__ import annotations

import pytest
import torch

from .matrix_bodies import STEPS, build_model, case_loss, run_matrix
from .ds_bodies import SAMPLES_PER_STEP
from .models import micro_batches
from .multiproc import run_ranks
from .reference import ReferenceVR

UPDATE_RTOL_FP32 = 1e-5
# Measured maxima (2 CPU ranks): bf16 1.9e-2 (VRSGD/VRLars at ZeRO 0/1 and BF16_Optimizer, where
# DeepSpeed accumulates G over micro-batches and all-reduces it in bf16; 1e-6 with
# communication_data_type fp32), fp16 1.5e-3.
UPDATE_RTOL_BF16 = 3e-2
UPDATE_RTOL_FP16 = 5e-3

OPTIMIZERS = {  # type: (reference kind, constructor params, reference defaults)
    "VRLamb": ("lamb", {"lr": 1e-2, "weight_decay": 0.01}, {"gsnr_beta": 0.9}),
    "VRAdamW": ("adam", {"lr": 1e-2, "weight_decay": 0.1}, {"gsnr_beta": 0.9}),
    "VRSGD": ("sgd", {"lr": 0.1, "momentum": 0.9}, {"gsnr_beta": None}),
    "VRLars": ("lars", {"lr": 0.5, "weight_decay": 1e-3, "momentum": 0.9}, {"gsnr_beta": None}),
}
FP16_STAGE0_REFUSAL = r"refuses fp16 at ZeRO stage 0.*stage\\?\": 1"


def _cases():
    cases = []
    for stage in (0, 1, 2):
        for precision in ("fp32", "bf16", "fp16"):
            for clip in (0.0, 0.05):
                for opt, (_, params, _) in OPTIMIZERS.items():
                    name = f"{opt}-z{stage}-{precision}" + ("-clip" if clip else "")
                    case = dict(name=name, type=opt, params=params, stage=stage, precision=precision, clip=clip)
                    if precision == "fp16" and stage == 0:
                        case["refused"] = FP16_STAGE0_REFUSAL
                    cases.append(case)
    lamb = OPTIMIZERS["VRLamb"][1]
    sgd = OPTIMIZERS["VRSGD"][1]
    for stage in (0, 1, 2):
        cases += [
            dict(
                name=f"VRLamb-z{stage}-non_reentrant_ckpt",
                type="VRLamb",
                params=lamb,
                stage=stage,
                model="non_reentrant",
            ),
            dict(name=f"VRSGD-z{stage}-frozen", type="VRSGD", params=sgd, stage=stage, model="frozen"),
            dict(
                name=f"VRLamb-z{stage}-frozen-clip", type="VRLamb", params=lamb, stage=stage, model="frozen", clip=0.05
            ),
            dict(name=f"VRLamb-z{stage}-tied", type="VRLamb", params=lamb, stage=stage, model="tied"),
            dict(name=f"VRSGD-z{stage}-tied-clip", type="VRSGD", params=sgd, stage=stage, model="tied", clip=0.05),
            dict(name=f"VRLamb-z{stage}-warmup_decay_lr", type="VRLamb", params=lamb, stage=stage, scheduler=True),
            dict(
                name=f"VRLars-z{stage}-two_groups",
                type="VRLars",
                params=OPTIMIZERS["VRLars"][1],
                stage=stage,
                groups=True,
            ),
        ]
    # ZeRO-3 (the rest of its cases: tests/test_zero3.py); reentrant checkpointing of a shared module
    # is refused by ZeRO-3 itself ("params_in_bucket" assertion), frozen tensors are skipped there too.
    cases += [
        dict(name="VRLamb-z3-non_reentrant_ckpt", type="VRLamb", params=lamb, stage=3, model="non_reentrant"),
        dict(name="VRLamb-z3-tied", type="VRLamb", params=lamb, stage=3, model="tied"),
        dict(name="VRSGD-z3-tied-clip", type="VRSGD", params=sgd, stage=3, model="tied", clip=0.05),
        dict(name="VRLamb-z3-warmup_decay_lr", type="VRLamb", params=lamb, stage=3, scheduler=True),
    ]
    # Reentrant activation checkpointing with a module shared by two segments: one micro-batch's
    # gradient arrives in two pieces. ZeRO-2 itself refuses a parameter reduced twice per micro-batch.
    cases += [
        dict(name=f"{opt}-z{stage}-reentrant_ckpt", type=opt, params=OPTIMIZERS[opt][1], stage=stage, model="reentrant")
        for opt in ("VRLamb", "VRSGD")
        for stage in (0, 1)
    ]
    cases += [
        dict(
            name=f"VRLamb-z{stage}-{red}",
            type="VRLamb",
            params=dict(lamb, moment_reduction=red),
            stage=stage,
            clip=0.05,
        )
        for stage in (1, 2)
        for red in ("per_step", "per_micro_step")
    ]
    # BF16_Optimizer (bf16 + ZeRO-1 + fp32 gradient accumulation: the Megatron-DeepSpeed path).
    bf16_optimizer = {"data_types": {"grad_accum_dtype": "fp32"}}
    cases += [
        dict(
            name=f"{opt}-bf16_optimizer" + ("-clip" if clip else ""),
            type=opt,
            params=params,
            stage=1,
            precision="bf16",
            clip=clip,
            extra=bf16_optimizer,
        )
        for opt, (_, params, _) in OPTIMIZERS.items()
        for clip in (0.0, 0.05)
    ]
    cases += [
        dict(
            name="VRLamb-bf16_optimizer-per_micro_step-two_groups",
            type="VRLamb",
            params=dict(lamb, moment_reduction="per_micro_step"),
            stage=1,
            precision="bf16",
            groups=True,
            extra=bf16_optimizer,
        )
    ]
    # Any optimizer gets the noise statistics: vr=False with gradient_stats is exactly the base.
    cases += [
        dict(
            name=f"{opt}-z{stage}-{prec}-vr_false-stats",
            type=opt,
            params=dict(OPTIMIZERS[opt][1], vr=False, gradient_stats=True),
            stage=stage,
            precision=prec,
        )
        for opt in ("VRLamb", "VRAdamW")
        for stage, prec in ((0, "fp32"), (1, "fp32"), (2, "fp32"), (2, "fp16"))
    ]
    # ZeRO-Offload at stages 1/2: the fp32 partition and the inner step on the host.
    for stage in (1, 2):
        offload = {"zero_optimization": {"stage": stage, "offload_optimizer": {"device": "cpu"}}}
        cases += [
            dict(
                name=f"VRLamb-z{stage}-offload-{red}-clip",
                type="VRLamb",
                params=dict(lamb, moment_reduction=red),
                stage=stage,
                clip=0.05,
                extra=offload,
            )
            for red in ("per_step", "per_micro_step")
        ]
        cases += [
            dict(name=f"VRSGD-z{stage}-offload-clip", type="VRSGD", params=sgd, stage=stage, clip=0.05, extra=offload),
            dict(
                name=f"VRAdamW-z{stage}-offload-bf16",
                type="VRAdamW",
                params=OPTIMIZERS["VRAdamW"][1],
                stage=stage,
                precision="bf16",
                extra=offload,
            ),
            dict(
                name=f"VRLars-z{stage}-offload-two_groups",
                type="VRLars",
                params=OPTIMIZERS["VRLars"][1],
                stage=stage,
                groups=True,
                extra=offload,
            ),
        ]
    cases += [
        dict(
            name="VRLamb-z1-per_micro_step-reentrant_ckpt",
            type="VRLamb",
            params=dict(lamb, moment_reduction="per_micro_step"),
            stage=1,
            model="reentrant",
        )
    ]
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def matrix():
    return run_ranks(run_matrix, 2, CASES, timeout=1200, init="deepspeed")


def reference_updates(case: dict, ds_steps: list[dict]):
    """Per step, per module tensor: the reference update from the run's own θ_before (None for
    frozen tensors); and per step {tensor name: (Σ_j S_j², Σ_j Q_j)} of the samples in the units
    of one micro-batch's loss gradient (VRGD.md §5)."""
    kind, _, defaults = OPTIMIZERS[case["type"]]
    hp = {k: v for k, v in case["params"].items() if k not in ("moment_reduction", "gradient_stats")}
    if hp.get("vr") is False:
        defaults = dict(defaults, vr=hp.pop("vr"))
    model = build_model(case.get("model", "tiny")).double()
    if hasattr(model, "checkpointing"):
        model.checkpointing = None  # the reference takes whole per-micro-batch gradients
    params = list(model.parameters())
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(case.get("precision", "fp32"))
    sample_model = model if low is None else build_model(case.get("model", "tiny")).to(low)
    if hasattr(sample_model, "checkpointing"):
        sample_model.checkpointing = None
    sample_params = list(sample_model.parameters())
    trainable = [i for i, p in enumerate(params) if p.requires_grad]
    if case.get("groups"):
        groups = [[i for i in trainable if params[i].dim() > 1], [i for i in trainable if params[i].dim() <= 1]]
        overrides = [{}, {"weight_decay": 0.0}]
    else:
        groups, overrides = [trainable], [{}]
    refs = [
        ReferenceVR([params[i] for i in idx], kind, **defaults, **dict(hp, **ov)) for idx, ov in zip(groups, overrides)
    ]
    batches = micro_batches(SAMPLES_PER_STEP * STEPS, skip_extra=False)
    names = [n for n, _ in model.named_parameters()]
    out, moments = [], []
    for step, rec in enumerate(ds_steps):
        with torch.no_grad():
            for p, q, value in zip(params, sample_params, rec["before"]):
                p.copy_(value)
                q.copy_(value)
        samples = {i: [] for i in trainable}
        for x, y, _ in batches[step * SAMPLES_PER_STEP : (step + 1) * SAMPLES_PER_STEP]:
            dtype = sample_params[0].dtype
            loss = case_loss(sample_model, x.to(dtype), y.to(dtype)) / SAMPLES_PER_STEP
            grads = torch.autograd.grad(loss, [sample_params[i] for i in trainable], allow_unused=True)
            for i, g in zip(trainable, grads):
                samples[i].append(torch.zeros_like(params[i]) if g is None else g.double())
        G = {i: sum(samples[i]) for i in trainable}
        # Samples are gradients of loss / SAMPLES_PER_STEP: the user's units are SAMPLES_PER_STEP × that.
        moments.append(
            {
                names[i]: (
                    (G[i] * SAMPLES_PER_STEP).pow(2).sum().item(),
                    sum((s * SAMPLES_PER_STEP).pow(2) for s in samples[i]).sum().item(),
                )
                for i in trainable
            }
        )
        if case.get("clip"):  # DeepSpeed's gradient_clipping: max_norm / (‖G‖ + 1e-6) when < 1
            norm = torch.sqrt(sum((g * g).sum() for g in G.values())).item()
            coef = case["clip"] / (norm + 1e-6)
            if coef < 1:
                G = {i: g * coef for i, g in G.items()}
        for ref, idx, lr in zip(refs, groups, rec["lr"]):
            ref.hp["lr"] = lr
            ref.step([samples[i] for i in idx], [G[i] for i in idx])
        out.append([(p.detach() - b) if p.requires_grad else None for p, b in zip(params, rec["before"])])
    return out, moments


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_update_matches_reference(case, matrix):
    results = [rank_results[case["name"]] for rank_results in matrix]
    if case.get("refused"):
        for rank, res in enumerate(results):
            assert res["error"] is not None and __import__("re").search(case["refused"], res["error"]), (
                f"rank {rank}: expected a refusal at initialize, got {res['error']!r}"
            )
        return
    for rank, res in enumerate(results):
        assert res["error"] is None, f"rank {rank}: {res['error']}"
    # Every rank holds the same master weights.
    for rec0, rec1 in zip(results[0]["steps"], results[1]["steps"]):
        assert all(torch.equal(a, b) for a, b in zip(rec0["after"], rec1["after"]))
    steps = results[0]["steps"]
    expected, _ = reference_updates(case, steps)
    tol = {"fp32": UPDATE_RTOL_FP32, "bf16": UPDATE_RTOL_BF16, "fp16": UPDATE_RTOL_FP16}[case.get("precision", "fp32")]
    errors = []
    for step, (rec, ref) in enumerate(zip(steps, expected)):
        for t, (before, after, ref_update) in enumerate(zip(rec["before"], rec["after"], ref)):
            update = after - before
            if ref_update is None:  # frozen: must not move
                assert torch.equal(update, torch.zeros_like(update)), f"step {step} tensor {t}: a frozen tensor moved"
                continue
            # Rounding of θ_after to fp32 bounds how well an update can be read back.
            floor = 4 * 2.0**-24 * after.norm().item()

            err = max((update - ref_update).norm().item() - floor, 0.0) / max(ref_update.norm().item(), 1e-30)
            errors.append(err)
            assert err <= tol, f"step {step} tensor {t}: update relative error {err:.2e} > {tol:.0e}"
    assert errors, "nothing was compared"


NOISE_RTOL_FP32 = 1e-4  # |G|² and tr Σ are differences of fp32 sums: ~1e-7·(k + B_simple/b)/(k−1) relative
NOISE_RTOL_16BIT = 3e-2


@pytest.mark.parametrize(
    "case", [c for c in CASES if not c.get("refused")], ids=[c["name"] for c in CASES if not c.get("refused")]
)
def test_noise_stats_match_reference(case, matrix):
    """opt.noise_stats() of every step (VRGD.md §5), global and per tensor, against the formulas
    applied to the reference's per-micro-batch gradients: units of one micro-batch's loss
    gradient whatever the loss scale, accumulation and world size."""
    res = matrix[0][case["name"]]
    assert res["error"] is None, res["error"]
    _, moments = reference_updates(case, res["steps"])
    k, b = SAMPLES_PER_STEP, 4
    tol = NOISE_RTOL_FP32 if case.get("precision", "fp32") == "fp32" else NOISE_RTOL_16BIT
    for step, (rec, ref) in enumerate(zip(res["steps"], moments)):
        stats = rec["noise"]
        assert stats["k"] == k and stats["micro_batch_size"] == b, (
            f"step {step}: {stats['k']}, {stats['micro_batch_size']}"
        )
        assert set(stats["per_tensor"]) == set(ref), f"step {step}: tensors {sorted(stats['per_tensor'])}"
        s2, q = sum(v[0] for v in ref.values()), sum(v[1] for v in ref.values())
        expect = {"grad_norm_sq": (s2 - q) / (k * (k - 1)), "noise_trace": b * (k * q - s2) / (k * (k - 1))}
        expect["b_simple"] = expect["noise_trace"] / expect["grad_norm_sq"]
        for key, value in expect.items():
            assert abs(stats[key] - value) <= tol * abs(value), f"step {step} {key}: {stats[key]} vs {value}"
        for name, (ts2, tq) in ref.items():
            got = stats["per_tensor"][name]
            g2 = (ts2 - tq) / (k * (k - 1))
            tr = b * (k * tq - ts2) / (k * (k - 1))
            # A tensor's two estimates can nearly cancel: compare on the scale of their parts.
            scale = max(ts2, tq * k) / (k * (k - 1))
            assert abs(got["grad_norm_sq"] - g2) <= tol * scale, f"step {step} {name} grad_norm_sq"
            assert abs(got["noise_trace"] - tr) <= tol * b * scale, f"step {step} {name} noise_trace"
