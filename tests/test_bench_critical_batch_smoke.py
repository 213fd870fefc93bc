"""Smoke test of scripts/bench_critical_batch.py --quick on a tiny synthetic idx-format data set
(the real Fashion-MNIST is a Debian package CI does not have): every arm runs, the critical arm
changes its batch, and the JSON holds the tables' numbers (never parsed back from markdown)."""

from __future__ import annotations

import json
import math

from .script_loader import load_script
from .test_bench_quality_smoke import make_fake_fashion_mnist


def test_quick_run_writes_every_arm(tmp_path):
    bench = load_script("bench_critical_batch")
    data = tmp_path / "data"
    data.mkdir()
    make_fake_fashion_mnist(data, load_script("bench_quality"))
    out = tmp_path / "out"
    assert bench.main(["--quick", "--data", str(data), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())["results"]
    cells = {(c["optimizer"], c["arm"]) for c in results["cells"]}
    assert cells == {(o, a) for o in ("LAMB", "VR-LAMB") for a in ("small", "large", "critical", "critical-linear")}
    assert len(results["targets"]) >= 1
    for cell in results["cells"]:
        assert math.isfinite(cell["final_loss"]["mean"])
        for target in cell["targets"].values():
            assert target["predicted_steps"]["n"] == 1
    critical = results["curves_seed0"]["LAMB/critical"]
    assert len(critical["changes"]) > 1 and len(set(critical["batch"])) > 1
    assert (out / "report.md").exists() and (out / "critical.png").exists()
    # the prediction for the small arm is the small arm itself (the model is fitted to its trace)
    small = next(c for c in results["cells"] if c["arm"] == "small" and c["optimizer"] == "LAMB")
    for target in small["targets"].values():
        if target["steps"]["n"]:
            assert math.isclose(target["steps"]["mean"], target["predicted_steps"]["mean"], rel_tol=1e-9)
