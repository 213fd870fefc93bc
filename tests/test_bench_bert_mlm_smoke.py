"""Smoke test of scripts/bench_bert_mlm.py: the --quick grid on its generated corpus, and bad input.

The quick mode trains tiny BERT for a handful of steps on a few hundred generated lines: it checks
that the pipeline runs end to end and that the report is well formed, not what the numbers say.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .script_loader import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_bert_mlm.py"


def tables(markdown: str) -> list[list[list[str]]]:
    """Data rows of each markdown table in the text (header and separator rows dropped)."""
    out, current, lines = [], None, markdown.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("|"):
            current = None
            continue
        if re.fullmatch(r"\|(---\|)+", line):
            continue
        if i + 1 < len(lines) and re.fullmatch(r"\|(---\|)+", lines[i + 1]):  # a header row
            current = []
            out.append(current)
            continue
        current.append([c.strip() for c in line.strip("|").split("|")])
    return out


NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def assert_finite(cell: str, row: list[str]) -> None:
    values = NUMBER.findall(cell)
    assert values, f"non-numeric cell {cell!r} in row {row}"
    assert all(math.isfinite(float(v)) for v in values), f"non-finite cell {cell!r} in row {row}"
    assert "nan" not in cell.lower() and "inf" not in cell.lower(), f"cell {cell!r} in row {row}"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--small", "60"], "multiple of --gas"),
        (["--large", "100"], "multiple > 1 of --small"),
        (["--samples", "20000"], "multiple of --large"),
        (["--gas", "4"], "k >= 8"),
    ],
)
def test_bad_grid_is_a_clear_error(tmp_path, extra, message):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path), "--data", str(tmp_path), *extra],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr


def test_missing_corpus_says_how_to_prepare_it(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path), "--data", str(tmp_path / "nope")],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "scripts/prepare_corpus.py" in proc.stderr


@pytest.mark.timeout(300)  # ~65 s alone on 2 cores; slack for a loaded machine
def test_quick_run_has_finite_numbers_in_every_cell(tmp_path):
    bench = load_script("bench_bert_mlm")
    report = tmp_path / "report.md"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path / "runs"), "--report", str(report)],
        check=False,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = report.read_text()
    q = bench.QUICK
    loss, diffs, scale = tables(text)

    # one row per optimizer x batch, in the grid's order, with the plan's steps and LRs
    expected = [(opt, b) for opt in bench.OPTIMIZERS for b in (q.small, q.large)]
    assert [(r[0], int(r[1])) for r in loss] == expected
    for row in loss:
        run = bench.make_run(q, row[0], int(row[1]), q.seeds[0], q.lr_small)
        assert int(row[2]) == run.steps == q.samples // run.batch
        assert float(row[3]) == pytest.approx(run.lr, rel=1e-3)
    assert len(loss[0]) == 4 + (q.evals + 1) + 1  # optimizer, batch, steps, LR, losses, accuracy
    assert len(diffs) == 4 and len(scale) == 2
    for row in loss + diffs + scale:
        for cell in row[1:]:
            assert_finite(cell, row)
    # same init and the same fixed held-out set for every run: identical loss before training
    assert len({row[4] for row in loss}) == 1
    # the runs were kept, and a second invocation reuses them instead of training again
    again = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path / "runs")],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("reusing finished run") == len(expected)
