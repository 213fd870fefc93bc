"""The VR optimizers on CUDA (skipped without a GPU; scripts/gpu_check.sh runs them).

* plain PyTorch: each VR optimizer on a GPU gives the update it gives on the CPU;
* DeepSpeed: the update matrix of tests/test_update_matrix.py (every ZeRO stage × precision ×
  clipping × optimizer, and the special cases, each update against the float64 reference, or the
  refusal) run through ``deepspeed.initialize`` on the CUDA accelerator with NCCL: on 2 GPUs when
  there are 2 or more (NCCL's reduce-scatter and reduce, the paths gloo tests only by emulation),
  else on 1 GPU with all 8 micro-batches of a step accumulated on it (k = 8).

The rest of the suite is CPU/gloo by design; with a GPU present it runs with the GPU hidden
(``CUDA_VISIBLE_DEVICES=`` and ``DS_ACCELERATOR=cpu``, as scripts/gpu_check.sh does).
"""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") == "cuda"
pytestmark = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (and DS_ACCELERATOR unset or 'cuda')")

import tests.test_update_matrix as matrix_tests  # noqa: E402  (a module object: pytest collects nothing from it here)
from tests import matrix_bodies  # noqa: E402
from tests.ds_bodies import SAMPLES_PER_STEP  # noqa: E402
from tests.models import TinyNet, mb_loss, micro_batches  # noqa: E402
from tests.multiproc import run_ranks  # noqa: E402

PLAIN = {
    "VRSGD": dict(lr=0.1, momentum=0.9),
    "VRAdamW": dict(lr=1e-2, weight_decay=0.1),
    "VRLamb": dict(lr=1e-2, weight_decay=0.01),
    "VRLars": dict(lr=0.5, weight_decay=1e-3, momentum=0.9),
}


def _plain_run(name: str, device: str, steps: int = 3, k: int = 4) -> list[list[torch.Tensor]]:
    import vrgd_ds

    torch.backends.cuda.matmul.allow_tf32 = False
    model = TinyNet(with_unused=False).to(device)
    opt = getattr(vrgd_ds, name)(model.named_parameters(), **PLAIN[name])
    batches = micro_batches(steps * k, skip_extra=False)
    out = []
    for step in range(steps):
        before = [p.detach().double().cpu().clone() for p in model.parameters()]
        for x, y, use_extra in batches[step * k : (step + 1) * k]:
            (mb_loss(model, (x.to(device), y.to(device), use_extra)) / k).backward()
        opt.step()
        opt.zero_grad()
        out.append([p.detach().double().cpu() - b for p, b in zip(model.parameters(), before)])
    return out


@pytest.mark.parametrize("name", sorted(PLAIN))
def test_plain_pytorch_update_on_gpu_equals_cpu(name):
    cpu, gpu = _plain_run(name, "cpu"), _plain_run(name, "cuda")
    for step, (a_step, b_step) in enumerate(zip(cpu, gpu)):
        for t, (a, b) in enumerate(zip(a_step, b_step)):
            err = (a - b).norm().item() / max(a.norm().item(), 1e-30)
            assert err <= 1e-4, f"{name} step {step} tensor {t}: GPU update differs from CPU by {err:.2e}"


# ---- the update matrix on GPUs ------------------------------------------------------------------
def _run_case_on_gpu(case: dict, rank: int, world: int) -> dict:
    """matrix_bodies.run_case with the micro-batches on the engine's device and the recorded
    weights brought back to the CPU."""
    import deepspeed

    import vrgd_ds

    gas = SAMPLES_PER_STEP // world
    model = matrix_bodies.build_model(case.get("model", "tiny"))
    try:
        engine, *_ = deepspeed.initialize(
            model=model,
            model_parameters=matrix_bodies.param_groups(model, case),
            config=matrix_bodies.ds_config(case, world),
        )
    except Exception as exc:  # noqa: BLE001 - a refusal is a result the test checks
        return {"error": f"{type(exc).__name__}: {exc}"}
    batches = micro_batches(SAMPLES_PER_STEP * matrix_bodies.STEPS, skip_extra=False)
    dtype = next(engine.module.parameters()).dtype
    steps = []
    for step in range(matrix_bodies.STEPS):
        before = [t.cpu() for t in matrix_bodies.master_params(engine)]
        lrs = list(engine.get_lr())
        for a in range(gas):
            x, y, _ = batches[step * SAMPLES_PER_STEP + a * world + rank]
            engine.backward(matrix_bodies.case_loss(engine, x.to(engine.device, dtype), y.to(engine.device, dtype)))
            engine.step()
        noise = vrgd_ds.find_vr_optimizer(engine).noise_stats()
        steps.append(
            {
                "before": before,
                "after": [t.cpu() for t in matrix_bodies.master_params(engine)],
                "lr": lrs,
                "noise": dict(noise),
            }
        )
    engine.destroy()
    return {"error": None, "steps": steps}


def _gpu_matrix(rank: int, world: int, cases: list[dict]) -> dict:
    """One rank on GPU ``rank`` (run_ranks(backend="nccl") set it and DeepSpeed's NCCL backend up)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    return {case["name"]: _run_case_on_gpu(case, rank, world) for case in cases}


GPU_WORLD = min(2, torch.cuda.device_count()) if CUDA else 1


@pytest.fixture(scope="module")
def gpu_matrix():
    results = run_ranks(_gpu_matrix, GPU_WORLD, matrix_tests.CASES, timeout=1200, init="deepspeed", backend="nccl")
    return results if GPU_WORLD > 1 else results * 2  # the CPU test compares rank 0 with rank 1


@pytest.mark.timeout(1500)
@pytest.mark.parametrize("case", matrix_tests.CASES, ids=[c["name"] for c in matrix_tests.CASES])
def test_update_matches_reference_on_gpu(case, gpu_matrix):
    matrix_tests.test_update_matches_reference(case, gpu_matrix)


@pytest.mark.parametrize(
    "case",
    [c for c in matrix_tests.CASES if not c.get("refused")],
    ids=[c["name"] for c in matrix_tests.CASES if not c.get("refused")],
)
def test_noise_stats_match_reference_on_gpu(case, gpu_matrix):
    matrix_tests.test_noise_stats_match_reference(case, gpu_matrix)
