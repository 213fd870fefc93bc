"""Universal checkpoints (vrgd_ds.universal): saved on 2 ranks at ZeRO 1/2, converted, resumed on
1, 2 and 4 ranks, the run continues as the uninterrupted one — parameters and the last update
equal the single-process reference (8 micro-batches per step on every world size). DeepSpeed's
own converter drops the VR state: such a checkpoint is refused at load_checkpoint, on every rank."""

from __future__ import annotations

import argparse
import os

import pytest

from .ds_bodies import train_plain
from .multiproc import run_ranks
from .reference import max_rel_err
from .universal_bodies import TAG, resume, save_and_continue

LAMB = {"lr": 1e-2, "weight_decay": 0.01, "gsnr_beta": 0.9}
# extra_off_step=1: the "extra" layer gets no gradient at step 2, so its tensors carry their own
# step count (tensor_step) through the checkpoint.
CASES = {
    "lamb-z1": dict(type="VRLamb", params=LAMB, stage=1, extra_off_step=1),
    # two param groups (1-D tensors apart): the per-tensor step counts of each group by name
    "lamb-z2-groups": dict(type="VRLamb", params=dict(LAMB, weight_decay_exclude_1d=True), stage=2, extra_off_step=1),
    # momentum_buffer, on which DeepSpeed's converter stops (KeyError: 'exp_avg')
    "sgd-z2": dict(type="VRSGD", params={"lr": 0.1, "momentum": 0.9}, stage=2, extra_off_step=1),
    # ZeRO-Offload: the fp32 partitions and the VR state on the host
    "lamb-z2-offload": dict(
        type="VRLamb",
        params=LAMB,
        stage=2,
        extra_off_step=1,
        extra={"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
    ),
    # stage 0: no universal format; the ordinary checkpoint loads on any world size
    "lamb-z0": dict(type="VRLamb", params=LAMB, stage=0, extra_off_step=1),
}
for _name, _case in CASES.items():
    _case["name"] = _name
ZERO = [c for c in CASES.values() if c["stage"] > 0]
TOL = 1e-5


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Checkpoints at step 2 of a 2-rank run; ours and DeepSpeed's conversions."""
    from deepspeed.checkpoint import ds_to_universal

    from vrgd_ds.universal import main as convert_cli

    root = str(tmp_path_factory.mktemp("universal"))
    full = run_ranks(save_and_continue, 2, list(CASES.values()), root, timeout=300, init="deepspeed")
    for case in ZERO:
        src = os.path.join(root, case["name"], TAG)
        convert_cli(
            [
                "--input_folder",
                src,
                "--output_folder",
                os.path.join(root, case["name"] + "-universal", TAG),
                "--num_extract_workers",
                "1",
                "--num_merge_workers",
                "1",
                "--inject_missing_state",
            ]
        )
        if case["type"] == "VRLamb":
            ds_to_universal.main(
                argparse.Namespace(
                    input_folder=src,
                    output_folder=os.path.join(root, case["name"] + "-deepspeed", TAG),
                    num_extract_workers=1,
                    num_merge_workers=1,
                    keep_temp_folder=False,
                    strict=True,
                    inject_missing_state=True,
                )
            )
    return root, full


@pytest.fixture(scope="module")
def references():
    return {name: (train_plain(case, 3), train_plain(case, 4)) for name, case in CASES.items()}


def _check(name, got, references, what):
    ref3, ref4 = references[name]
    assert not isinstance(got, str), f"{what}: {got}"
    after3, after4 = got
    err = max_rel_err(after4, ref4)
    assert err <= TOL, f"{what}: parameters off by {err:.2e}"
    update_err = max_rel_err([a - b for a, b in zip(after4, after3)], [a - b for a, b in zip(ref4, ref3)])
    assert update_err <= TOL, f"{what}: last update off by {update_err:.2e}"


@pytest.fixture(scope="module")
def resumed(saved):
    """``resumed(world)``: every job of that world size, run once (one process group per world size:
    start-up dominates). World 1 also resumes stage 0; world 2 also tries DeepSpeed's conversions."""
    root, _ = saved
    cache = {}

    def jobs(world):
        zero = ZERO if world < 4 else [c for c in ZERO if c["type"] == "VRLamb"]  # 4 ranks on 2 cores: keep it short
        out = [(case, os.path.join(root, case["name"] + "-universal"), True) for case in zero]
        if world == 1:
            z0 = CASES["lamb-z0"]
            out += [(z0, os.path.join(root, z0["name"]), False), (z0, os.path.join(root, z0["name"]), True)]
        if world == 2:
            out += [
                (case, os.path.join(root, case["name"] + "-deepspeed"), True)
                for case in ZERO
                if case["type"] == "VRLamb"
            ]
        return out

    def get(world):
        if world not in cache:
            todo = jobs(world)
            results = run_ranks(resume, world, todo, timeout=300, init="deepspeed")
            cache[world] = [list(zip(todo, res)) for res in results]  # per rank: ((case, folder, universal), result)
        return cache[world]

    return get


def test_uninterrupted_run_matches_reference(saved, references):
    _, full = saved
    for rank, res in enumerate(full):
        for name in CASES:
            _check(name, res[name], references, f"{name} uninterrupted, rank {rank}")


@pytest.mark.parametrize("world", [1, 2, 4])
def test_universal_resume_continues_exactly(world, resumed, references):
    for rank, res in enumerate(resumed(world)):
        done = [case["name"] for (case, folder, universal), _ in res if folder.endswith("-universal")]
        assert len(done) >= 2, done
        for (case, folder, _universal), got in res:
            if folder.endswith("-universal"):
                _check(case["name"], got, references, f"{case['name']} resumed on {world} rank(s), rank {rank}")


def test_deepspeed_converted_checkpoint_is_refused_on_every_rank(resumed):
    for rank, res in enumerate(resumed(2)):
        refused = [(case, got) for (case, folder, _), got in res if folder.endswith("-deepspeed")]
        assert len(refused) == len([c for c in ZERO if c["type"] == "VRLamb"])
        for case, got in refused:
            assert isinstance(got, str), f"{case['name']} rank {rank}: loaded a checkpoint without the VR state"
            assert (
                got.startswith("RuntimeError: vrgd_ds:")
                and "converted by DeepSpeed's ds_to_universal" in got
                and "python -m vrgd_ds.universal" in got
            ), f"{case['name']} rank {rank}: {got}"


def test_stage0_ordinary_checkpoint_loads_on_another_world_size_and_universal_is_refused(saved, resumed, references):
    from vrgd_ds.universal import convert

    root, _ = saved
    folder = os.path.join(root, "lamb-z0")
    with pytest.raises(ValueError, match="ZeRO stage 0 checkpoint.*loads it \\(VR state included\\) on any world size"):
        convert(os.path.join(folder, TAG), os.path.join(root, "z0-universal", TAG))
    (plain,) = [got for (case, _, universal), got in resumed(1)[0] if case["stage"] == 0 and not universal]
    (universal,) = [got for (case, _, universal), got in resumed(1)[0] if case["stage"] == 0 and universal]
    _check("lamb-z0", plain, references, "stage 0 resumed on 1 rank")
    assert (
        isinstance(universal, str)
        and universal.startswith("ValueError: vrgd_ds:")
        and "remove load_universal" in universal
    ), universal
