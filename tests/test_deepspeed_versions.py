"""``import vrgd_ds`` and the plain-PyTorch optimizers with any DeepSpeed, or none; the tested-version
table checked at ``deepspeed.initialize`` (vrgd_ds/deepspeed_glue/versions.py). The measured
matrix itself: scripts/version_matrix.sh (README "DeepSpeed versions")."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vrgd_ds.deepspeed_glue import versions

from .multiproc import run_ranks

REPO = Path(__file__).resolve().parents[1]

_TRAIN = """
import torch, vrgd_ds
from vrgd_ds import VRLamb
torch.manual_seed(0)
model = torch.nn.Linear(4, 2)
opt = VRLamb(model.parameters(), lr=1e-2)
before = model.weight.detach().clone()
for _ in range(2):
    (model(torch.randn(3, 4)).pow(2).mean() / 2).backward()
opt.step()
assert not torch.equal(before, model.weight)
print("registered", vrgd_ds.deepspeed_glue.register(), "monitor", vrgd_ds.monitor.__name__)
"""


def _run(code: str, env_extra: dict | None = None, path_first: str | None = None) -> str:
    env = dict(os.environ, **(env_extra or {}))
    if path_first:
        env["PYTHONPATH"] = path_first + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_plain_optimizers_without_deepspeed():
    out = _run("import sys\nsys.modules['deepspeed'] = None  # `import deepspeed` raises ImportError\n" + _TRAIN)
    assert "registered False monitor vrgd_ds.monitor" in out


@pytest.mark.parametrize("version", ["0.10.0", "0.18.9", "1.2.3"])
def test_plain_optimizers_beside_an_unsupported_deepspeed(tmp_path, version):
    """A DeepSpeed outside the table (here a stand-in package with only ``__version__``, so that no
    engine can be built) leaves ``import vrgd_ds`` and the plain optimizers working."""
    fake = tmp_path / "deepspeed"
    fake.mkdir()
    (fake / "__init__.py").write_text(f"__version__ = {version!r}\n")
    out = _run(_TRAIN, path_first=str(tmp_path))
    assert "registered False" in out


def test_table_known_wrong_untested_and_override(monkeypatch):
    monkeypatch.delenv("VRGD_DS_ALLOW_UNTESTED_DEEPSPEED", raising=False)
    assert versions.version_refusal((0, 19, 8), set(versions.FEATURES)) is None
    msg = versions.version_refusal((0, 18, 9), {"zero2"})
    assert "deepspeed 0.18.9" in msg and "Output 0 of Split" in msg and "Fix: pip install deepspeed==" in msg
    msg = versions.version_refusal((0, 17, 6), {"zero2"})
    assert "0.17.6" in msg and "ZeRO-0" in msg
    msg = versions.version_refusal((0, 19, 1), {"pipeline"})
    assert "pipeline" in msg and "1/gradient_accumulation_steps" in msg
    msg = versions.version_refusal((0, 19, 3), {"universal_checkpoint"})
    assert "0.19.4-0.19.5" in msg
    msg = versions.version_refusal((0, 15, 4), {"zero1"})
    assert "not tested" in msg and "Tested: 0.19.8 (all)" in msg and "Fix: pip install deepspeed==0.19.8" in msg
    monkeypatch.setenv("VRGD_DS_ALLOW_UNTESTED_DEEPSPEED", "1")
    assert versions.version_refusal((0, 15, 4), {"zero1"}) is None  # untested: the override lets it through
    assert versions.version_refusal((0, 18, 9), {"zero2"}) is not None  # known wrong: never
    # Every version of the table is exact on ZeRO 0/1/2 at least (scripts/version_matrix.sh).
    assert all({"zero0", "zero1", "zero2"} <= feats for feats in versions.TESTED.values())


def _initialize_with_version(rank: int, world: int, version: tuple, stage: int) -> str | None:
    import deepspeed
    import torch

    import vrgd_ds
    from vrgd_ds.deepspeed_glue import versions as v

    v.installed_version = lambda: version  # what check_engine asks
    model = torch.nn.Linear(4, 2)
    config = {
        "train_batch_size": 2 * world,
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 2,
        "optimizer": {"type": "VRLamb", "params": {"lr": 1e-3}},
        "zero_optimization": {"stage": stage},
        "gradient_clipping": 0.0,
    }
    try:
        deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=config)
    except ValueError as exc:
        return str(exc)
    assert vrgd_ds.find_vr_optimizer is not None
    return None


def test_checked_at_initialize():
    (msg,) = run_ranks(_initialize_with_version, 1, (0, 18, 9), 2, timeout=180, init="deepspeed")
    assert msg is not None and msg.startswith("vrgd_ds does not support ZeRO stage 2 with deepspeed 0.18.9"), msg
    (msg,) = run_ranks(_initialize_with_version, 1, (0, 19, 8), 2, timeout=180, init="deepspeed")
    assert msg is None


def test_version_matrix_script_is_documented():
    script = (REPO / "scripts" / "version_matrix.sh").read_text()
    readme = (REPO / "README.md").read_text()
    assert "scripts/version_matrix.sh" in readme
    for version in versions.TESTED:
        text = ".".join(map(str, version))
        assert text in script, f"{text} is in the table but not in scripts/version_matrix.sh's VERSIONS"
        assert f"| {text} |" in readme, f"{text} has no row in README's version table"
