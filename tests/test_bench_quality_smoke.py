"""Smoke test of scripts/bench_quality.py --quick on a tiny synthetic idx-format data set.

CI installs from PyPI only, so the real Fashion-MNIST (a Debian package) is not there: the test
writes class-dependent random 28×28 images in the idx format the script reads, runs the quick
mode on them, and checks in the JSON it writes (never its markdown) that every value of every table
is a finite number.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from .script_loader import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_quality.py"


def make_fake_fashion_mnist(folder: Path, bench, n_train: int = 1024, n_test: int = 512) -> None:
    """Ten classes, each a fixed random 28×28 template plus pixel noise, in idx format."""
    rng = np.random.default_rng(0)
    templates = rng.uniform(0, 255, size=(10, 28, 28))
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, size=n)
        images = np.clip(templates[labels] * 0.6 + rng.uniform(0, 100, size=(n, 28, 28)), 0, 255)
        bench.write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images.astype(np.uint8))
        bench.write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels.astype(np.uint8))


def numbers(value, path="") -> list[tuple[str, float]]:
    """Every number inside a JSON value, with where it is."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return []
    if isinstance(value, (int, float)):
        return [(path, float(value))]
    items = value.items() if isinstance(value, dict) else enumerate(value)
    return [pair for key, item in items for pair in numbers(item, f"{path}/{key}")]


def summaries(value) -> list[dict]:
    """Every mean ± std summary (benchlib.summary) inside a JSON value."""
    if isinstance(value, dict):
        found = [value] if {"n", "mean", "std", "values"} <= set(value) else []
        return found + [s for item in value.values() for s in summaries(item)]
    if isinstance(value, list):
        return [s for item in value for s in summaries(item)]
    return []


def test_idx_roundtrip(tmp_path):
    bench = load_script("bench_quality")
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    bench.write_idx(tmp_path / "a-idx3-ubyte.gz", array)
    np.testing.assert_array_equal(bench.read_idx(tmp_path / "a-idx3-ubyte.gz"), array)


def test_missing_data_says_how_to_get_it(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--experiment", "batch", "--data", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "apt-get install dataset-fashion-mnist" in proc.stderr
    assert "zalandoresearch/fashion-mnist" in proc.stderr


@pytest.mark.timeout(300)
def test_quick_run_has_finite_numbers_in_every_cell(tmp_path):
    bench = load_script("bench_quality")
    make_fake_fashion_mnist(tmp_path, bench)
    report, plot, raw = tmp_path / "report.md", tmp_path / "plot.png", tmp_path / "results.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--quick",
            "--data",
            str(tmp_path),
            "--report",
            str(report),
            "--plot",
            str(plot),
            "--json",
            str(raw),
        ],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert plot.stat().st_size > 0 and report.read_text().strip()
    result = json.loads(raw.read_text())
    meta = result["meta"]
    assert meta["code"].startswith("git ") and "vrgd_ds sha256" in meta["code"]
    assert meta["wall_s"] > 0 and "CPU only" in meta["machine"] and "?" not in meta["versions"].values()
    experiments = result["experiments"]
    assert list(experiments) == ["batch", "lr", "unbiased", "critical", "critical_batches", "critical_trend", "gamma"]
    quick = bench.QUICK
    assert len(experiments["batch"]["cells"]) == len(bench.OPTIMIZERS) * len(quick.batches)
    assert len(experiments["lr"]["cells"]) == len(bench.OPTIMIZERS) * len(quick.lr_mults)
    assert len(experiments["unbiased"]["cells"]) == len(bench.UNBIASED_OPTIMIZERS) * min(2, len(quick.batches))
    assert len(experiments["gamma"]["cells"]) == 12
    assert len(experiments["critical"]["cells"]) == len(bench.OPTIMIZERS) * len(quick.critical_batches)
    assert len(experiments["critical_batches"]["cells"]) == len(bench.OPTIMIZERS) * len(quick.critical_batches)
    assert len(experiments["critical_trend"]["cells"]) == len(bench.OPTIMIZERS)
    for name, section in experiments.items():
        assert section["title"] and section["header"], name
        for where, value in numbers(section["cells"], name):
            assert math.isfinite(value), f"{where} = {value}"
        for summary in summaries(section["cells"]):
            assert summary["n"] >= 1 and summary["mean"] is not None, (name, summary)
    for cell in experiments["batch"]["cells"]:
        assert cell["base"]["seeds"] == cell["vr"]["seeds"] == cell["base"]["test_acc"]["n"] >= 1
        assert 0 <= cell["vr"]["r_bar"]["mean"] <= 1
    small = min(quick.critical_batches)
    for cell in experiments["critical"]["cells"]:
        for update in ("base", "vr"):
            for phase in cell[update]["phases"].values():
                assert phase["b_simple"]["n"] == quick.critical_seeds and phase["b_simple"]["mean"] > 0
    for cell in experiments["critical_batches"]["cells"]:
        ratios = cell["b_over_b_simple"]
        assert set(ratios) == {"start", "middle", "end"} and all(v > 0 for v in ratios.values())
        if cell["batch"] == small:  # the reference runs are the runs at the smallest batch
            assert cell["b_over_b_simple_own_run"] == ratios
        assert cell["vr_minus_base"]["test_acc"]["n"] == quick.critical_seeds
