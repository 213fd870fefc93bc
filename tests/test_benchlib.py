"""scripts/benchlib.py: what every benchmark reports about itself."""

from __future__ import annotations

import json
import math
import subprocess

import pytest

from .script_loader import load_script


@pytest.fixture(scope="module")
def benchlib():
    return load_script("benchlib")


def test_mean_std_and_its_json_form(benchlib):
    assert benchlib.mean_std([1.0, 2.0, 3.0]) == "2.00 ± 1.00"
    assert benchlib.mean_std([0.5], digits=3) == "0.500"
    assert benchlib.mean_std([None, None]) == "–"
    assert benchlib.summary([1.0, None, 3.0]) == {"n": 2, "mean": 2.0, "std": math.sqrt(2.0), "values": [1.0, 3.0]}
    assert benchlib.summary([]) == {"n": 0, "mean": None, "std": None, "values": []}
    nan = benchlib.summary([1.0, math.inf])  # statistics.stdev raises on inf
    assert math.isnan(nan["std"]) and nan["mean"] == math.inf
    assert benchlib.median([3, 1, 2]) == 2 and math.isnan(benchlib.median([]))


def test_versions_and_code(benchlib, tmp_path):
    import torch

    assert benchlib.versions("torch", "Python") == f"torch {torch.__version__}, Python {benchlib.version_of('Python')}"
    assert benchlib.version_of("no-such-package-here") == "?"
    code = benchlib.code_version()
    assert code.startswith("git ") and "(vrgd_ds sha256 " in code
    # a copy outside any checkout: no commit, still the hash of the package's files
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    other = benchlib.code_version(tmp_path, "pkg")
    assert other.startswith("git unknown (pkg sha256 ")
    (tmp_path / "pkg" / "a.py").write_text("x = 2\n")
    assert benchlib.code_version(tmp_path, "pkg") != other
    # a checkout of its own, with the package changed after the commit
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*git, "add", "pkg"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "c"], cwd=tmp_path, check=True)
    assert "uncommitted" not in benchlib.code_version(tmp_path, "pkg")
    (tmp_path / "pkg" / "a.py").write_text("x = 3\n")
    assert " + uncommitted pkg changes (pkg sha256 " in benchlib.code_version(tmp_path, "pkg")


def test_json_and_markdown(benchlib, tmp_path):
    path = tmp_path / "deep" / "r.json"
    benchlib.write_json(path, {"a": tmp_path, "b": [1.5]})
    assert json.loads(path.read_text()) == {"a": str(tmp_path), "b": [1.5]}
    meta = benchlib.run_meta("machine", 1.5, ["--x"], code="git abc")
    assert (
        meta["command"].endswith(" --x") and meta["code"] == "git abc" and set(meta["versions"]) == {"torch", "Python"}
    )
    assert benchlib.markdown_table(["a", "b"], [[1, "x"]]) == "| a | b |\n|---|---|\n| 1 | x |"
