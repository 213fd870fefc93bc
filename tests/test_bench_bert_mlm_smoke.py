"""Smoke test of scripts/bench_bert_mlm.py: the --quick study on its generated corpus, and bad input.

The quick mode trains tiny BERT for a handful of steps on a few hundred generated lines: it checks
that the pipeline (warm start, LR tuning, seeds, JSON, report, plot) runs end to end and that the
JSON it writes is complete and finite, not what the numbers say.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from .script_loader import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_bert_mlm.py"


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--small", "128", "--small-micro", "16", "--large", "1000", "--large-micro", "125"],
            "multiple > 1 of --small",
        ),
        (["--samples", "20000"], "multiple of --large"),
        (["--small", "128", "--small-micro", "32"], "k >= 8"),
        (["--warmup-share", "1.5"], "--warmup-share"),
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


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.mark.timeout(300)  # ~70 s alone on 2 cores; slack for a loaded machine
def test_quick_run_writes_complete_finite_json(tmp_path):
    bench = load_script("bench_bert_mlm")
    out, results = tmp_path / "runs", tmp_path / "results.json"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--json", str(results)]
    proc = subprocess.run(
        [*cmd, "--report", str(tmp_path / "report.md"), "--plot", str(tmp_path / "plot.png")],
        check=False,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(results.read_text())
    q, summ = bench.QUICK, data["summary"]
    assert data["quick"] is True
    assert (tmp_path / "plot.png").stat().st_size > 0 and "QUICK" in (tmp_path / "report.md").read_text()

    # the warm start: the critical batch along it, and where the comparison starts
    warm = data["warm"]
    assert warm["steps"] == q.warm_steps and finite(summ["b_simple_at_start"])
    assert warm["b_simple_ema"] and all(finite(v) for v in warm["b_simple_ema"].values())
    assert finite(summ["start"]["eval_loss"])

    # tuning: every LR of each batch's grid for both optimizers at the first seed; the best is one of them
    expected_tuning = {
        (opt, b, lr) for b in (q.small, q.large) for opt in bench.OPTIMIZERS for lr in bench.lr_grid(q, b)
    }
    assert {(t["optimizer"], t["batch"], t["lr"]) for t in summ["tuning"]} == expected_tuning
    assert all(t["seed"] == q.seeds[0] and finite(t["eval_loss_end"]) for t in summ["tuning"])
    for key, lr in summ["best_lr"].items():
        opt, batch = key.split("@")
        assert lr in bench.lr_grid(q, int(batch))

    # the table: one row per optimizer x batch, at the best LR, every seed, finite numbers
    rows = summ["table"]
    assert [(r["optimizer"], r["batch"]) for r in rows] == [
        (opt, b) for opt in bench.OPTIMIZERS for b in (q.small, q.large)
    ]
    for r in rows:
        assert r["steps"] == q.samples // r["batch"] and r["k"] >= 8
        assert r["lr"] == summ["best_lr"][f"{r['optimizer']}@{r['batch']}"]
        for key in (
            "eval_loss_equal_samples",
            "eval_accuracy_equal_samples",
            "eval_loss_equal_steps",
            "eval_accuracy_equal_steps",
            "train_loss_end",
            "gap_end",
        ):
            assert r[key]["n"] == len(q.seeds) and all(finite(v) for v in r[key]["values"]), (key, r)
        # at the large batch, equal steps and equal samples are the same point (its end)
        if r["batch"] == q.large:
            assert r["eval_loss_equal_steps"] == r["eval_loss_equal_samples"]
        assert (r["scale_mean"] is not None) == (r["optimizer"] == "VR-LAMB")
    assert len(summ["differences"]) == 4
    assert all(finite(d["eval_loss"]["mean"]) for d in summ["differences"].values())

    # the runs were kept, and a second invocation reuses them instead of training again
    again = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=90, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("reusing finished run") == 1 + len(data["runs"])
