"""Smoke test of scripts/bench_quality.py --quick on a tiny synthetic idx-format data set.

CI installs from PyPI only, so the real Fashion-MNIST (a Debian package) is not there: the test
writes class-dependent random 28×28 images in the idx format the script reads, runs the quick
mode on them, and checks that every cell of every table it prints is a finite number.
"""

from __future__ import annotations

import math
import re
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


def table_rows(markdown: str) -> list[list[str]]:
    """Data rows of every markdown table in the text (header and separator rows dropped)."""
    rows, lines = [], markdown.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("|") or re.fullmatch(r"\|(---\|)+", line):
            continue
        is_header = i + 1 < len(lines) and re.fullmatch(r"\|(---\|)+", lines[i + 1])
        if not is_header:
            rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


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
    report, plot = tmp_path / "report.md", tmp_path / "plot.png"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--data", str(tmp_path), "--report", str(report), "--plot", str(plot)],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = report.read_text()
    assert plot.stat().st_size > 0
    assert text.count("### ") == 4  # batch, lr robustness, unbiased r~, gamma
    rows = table_rows(text)
    unbiased_rows = len(bench.UNBIASED_OPTIMIZERS) * min(2, len(bench.QUICK.batches))
    assert (
        len(rows) == len(bench.OPTIMIZERS) * (len(bench.QUICK.batches) + len(bench.QUICK.lr_mults)) + 12 + unbiased_rows
    )
    number = re.compile(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?")
    for row in rows:
        for cell in row[1:]:
            values = number.findall(cell)
            assert values, f"non-numeric cell {cell!r} in row {row}"
            assert all(math.isfinite(float(v)) for v in values), f"non-finite cell {cell!r} in row {row}"
            assert "nan" not in cell.lower() and "inf" not in cell.lower(), f"cell {cell!r} in row {row}"
