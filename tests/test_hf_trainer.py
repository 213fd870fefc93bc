"""The Hugging Face Trainer path: a DeepSpeed config with "type": "VRLamb" and "auto" values, 2 CPU ranks."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data" / "shakespeare_small"
TIMEOUT = 240


def test_trainer_two_ranks_vrlamb_auto_config(tmp_path):
    # transformers' Trainer needs accelerate, which the project's dependencies do not list yet.
    pytest.importorskip("accelerate", reason="the HF Trainer needs `pip install accelerate`")
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(REPO / "scripts" / "hf_trainer_example.py"),
        "--data",
        str(DATA),
        "--vocab-size",
        "1000",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--output-dir",
        str(out),
        "--max-steps",
        "6",
        "--warmup-steps",
        "1",
        "--logging-steps",
        "1",
        "--learning-rate",
        "0.02",
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        pytest.fail(f"timed out after {TIMEOUT}s (a hang?)\n{proc.communicate()[0][-4000:]}")
    assert proc.returncode == 0, output[-6000:]

    history = json.loads((out / "log_history.json").read_text())
    steps = [e for e in history if "loss" in e]
    assert [e["step"] for e in steps] == list(range(1, 7))
    losses = [e["loss"] for e in steps]
    assert all(math.isfinite(v) for v in losses)
    # The mean MLM loss of a 1000-piece vocabulary starts near ln(1000): not scaled by ranks or
    # accumulation steps (see model.accepts_loss_kwargs in the example).
    assert abs(losses[0] - math.log(1000)) < 0.3
    assert losses[-1] < losses[0]
    # "auto" filled in from TrainingArguments; VR-LAMB ran and reported GSNR statistics.
    assert steps[-1]["learning_rate"] < 0.02 and steps[1]["learning_rate"] > 0
    assert all(0 <= e["gsnr/gsnr_clip_frac"] <= 1 and e["gsnr/gsnr_mean"] > 0 for e in steps)
    # The noise-statistics callback (vrgd_ds.hf): k = 2 ranks x accumulation, B_simple in examples.
    assert all(e["noise/k"] >= 2 and math.isfinite(e["noise/grad_norm_sq"]) for e in steps)
    assert all(math.isfinite(e["noise/b_simple_ema"]) for e in steps)
    evals = [e for e in history if "eval_loss" in e]
    assert evals and math.isfinite(evals[-1]["eval_loss"])
    assert (out / "final_model" / "config.json").is_file()
