"""Checkpoints saved by the released code (vrgd_ds 0.1.0, commit 26ded7f) load into today's code
and the run continues as it did then: tests/fixtures/release_0_1_0 holds DeepSpeed checkpoints
(2 ranks; ZeRO-2 SGD/Adam/LARS and ZeRO-1 LAMB with per-tensor step counts in their flat shards,
stage-0 LAMB) and plain-PyTorch state dicts of every optimizer, with the parameters that code
computed after loading them (tests/fixtures/make_release_checkpoints.py wrote them)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .fixtures.make_release_checkpoints import DS_CASES, PLAIN_CASES, plain_run
from .models import TinyNet
from .multiproc import run_ranks
from .reference import max_rel_err
from .universal_bodies import resume

FIXTURE = Path(__file__).parent / "fixtures" / "release_0_1_0"
# The old code stepped the pieces of a flat shard whose tensors had different t one by one; the
# new code scales per tensor in one pass: the same math, rounded differently in the last bits.
TOL = 1e-6


@pytest.fixture(scope="module")
def expected():
    return torch.load(FIXTURE / "expected.pt", weights_only=False)


@pytest.fixture(scope="module")
def resumed_deepspeed():
    jobs = [(case, str(FIXTURE / "deepspeed" / name), False) for name, case in DS_CASES.items()]
    return dict(zip(DS_CASES, run_ranks(resume, 2, jobs, timeout=300, init="deepspeed")[0]))


@pytest.mark.parametrize("name", list(DS_CASES))
def test_deepspeed_checkpoint_continues(name, resumed_deepspeed, expected):
    got = resumed_deepspeed[name]
    assert not isinstance(got, str), got
    for step, (new, old) in enumerate(zip(got, expected["deepspeed_after"][name]), start=3):
        err = max_rel_err(new, old)
        assert err <= TOL, f"{name}: step {step} after loading differs from the released code by {err:.2e}"


@pytest.mark.parametrize("name", list(PLAIN_CASES))
def test_plain_state_dict_continues(name, expected):
    saved = expected["plain"][name]
    model = TinyNet(hidden=11)
    model.load_state_dict(saved["model"])
    import vrgd_ds

    opt = vrgd_ds.OPTIMIZERS[name.lower()](model.parameters(), **PLAIN_CASES[name])
    opt.load_state_dict(saved["optimizer"])
    _, _, after = plain_run(name, PLAIN_CASES[name], range(2, 4), model, opt)
    for step, (new, old) in enumerate(zip(after, saved["after"]), start=3):
        err = max_rel_err(new, old)
        assert err <= TOL, f"{name}: step {step} after loading differs from the released code by {err:.2e}"
