"""scripts/bench_offload_step.py runs end to end (a tiny model, no DeepSpeedCPUAdam, whose first
use compiles a C++ op) and writes its JSON: every optimizer timed, the VR ones through our
optimizer under ZeRO-Offload, ratios consistent with the medians, the host step timed inside it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_offload_step_benchmark_writes_its_json(tmp_path):
    out = tmp_path / "offload.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT="29541")
    proc = subprocess.run(
        [sys.executable, "scripts/bench_offload_step.py", "--quick", "--no-cpu-adam", "--json", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["baseline"] == "VRLamb vr=false"
    results = data["results"]
    assert set(results) == {"VRLamb vr=false", "VRLamb", "VRAdamW"}
    base = results["VRLamb vr=false"]["median_ms"]
    for name, r in results.items():
        assert r["inner_optimizer"] == name.split()[0]
        assert r["step_ms"]["n"] == data["setting"]["rounds"] and r["median_ms"] > 0
        assert abs(r["ratio_to_baseline"] - r["median_ms"] / base) < 1e-9
        # the host step (the optimizer's step, and the VR source's prepare) is part of engine.step()
        assert r["host_step_ms"]["n"] == data["setting"]["rounds"]
        assert 0 < r["host_median_ms"] <= r["median_ms"]
    assert data["meta"]["code"] and data["setting"]["params"] > 0
