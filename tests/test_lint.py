"""The lint gate: ruff, configured in pyproject.toml (pyflakes, pycodestyle, bugbear, a complexity
bound), over the whole repository — run with the test suite, so CI runs it. ruff comes with the
test extra (pip install -e '.[test]')."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--output-format", "concise", str(REPO)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
