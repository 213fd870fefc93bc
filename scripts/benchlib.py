"""What every benchmark reports about itself: the machine, the library versions, the code it
measured, mean ± std of repeated measurements, and its results as one JSON file.

The benchmark scripts (``bench_overhead.py``, ``bench_quality.py``, ``bench_bert_mlm.py``) import
it as ``benchlib`` (their own folder is on ``sys.path`` when run as ``python scripts/<name>.py``).
Tests read the JSON a benchmark writes, never its markdown.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ---- the machine and the software ---------------------------------------------------------------
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def version_of(package: str) -> str:
    """``package``'s version ("Python": the interpreter's); the imported module's ``__version__``
    when it is loaded (what ran), else the installed distribution's; "?" when neither exists."""
    if package == "Python":
        return platform.python_version()
    module = sys.modules.get(package)
    if module is not None and getattr(module, "__version__", None):
        return str(module.__version__)
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def versions(*packages: str) -> str:
    """``versions("torch", "Python", "deepspeed")``: "torch 2.13.0+cpu, Python 3.11.7, deepspeed 0.19.8"."""
    return ", ".join(f"{name} {version_of(name)}" for name in packages)


def code_version(root: Path = ROOT, package: str = "vrgd_ds") -> str:
    """git HEAD of the checkout at ``root``, whether ``package``/ differs from it, and a hash of
    its files (which tells two uncommitted states apart)."""
    digest = hashlib.sha256()
    for path in sorted((root / package).glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()

    try:
        if os.path.realpath(git("rev-parse", "--show-toplevel")) != os.path.realpath(root):
            raise OSError(f"{root} is not a git checkout of its own")  # a copy inside another repository
        head, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "--", package)
    except (OSError, subprocess.CalledProcessError):
        head, dirty = "unknown", ""
    changes = f" + uncommitted {package} changes" if dirty else ""
    return f"git {head}{changes} ({package} sha256 {digest.hexdigest()[:12]})"


def command_line(argv: list[str] | None = None) -> str:
    """How the benchmark was started: ``python scripts/x.py --flag`` (``argv``: the arguments
    passed to ``main`` instead of the process's)."""
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", sys.argv[0], *args])


# ---- statistics of repeated measurements --------------------------------------------------------
def present(values) -> list[float]:
    """The values that were measured (None dropped; NaN and inf kept, so that they show)."""
    return [float(v) for v in values if v is not None]


def _stdev(values: list[float]) -> float:
    """Sample standard deviation (n − 1); NaN when a value is not finite (statistics.stdev raises)."""
    if not all(map(math.isfinite, values)):
        return math.nan
    return statistics.stdev(values)


def mean_std(values, digits: int = 2, empty: str = "–") -> str:
    """Mean ± sample std (n − 1) of the non-None values, "m ± s"; one value alone; ``empty`` for none."""
    values = present(values)
    if not values:
        return empty
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {_stdev(values):.{digits}f}"


def summary(values) -> dict:
    """The JSON form of ``mean_std``: ``{"n", "mean", "std", "values"}`` (std None below 2 values)."""
    values = present(values)
    return {
        "n": len(values),
        "mean": statistics.fmean(values) if values else None,
        "std": _stdev(values) if len(values) > 1 else None,
        "values": values,
    }


def median(values) -> float:
    return statistics.median(values) if values else math.nan


def run_meta(
    machine: str, wall_s: float, argv: list[str] | None = None, packages=("torch", "Python"), code: str | None = None
) -> dict:
    """What a benchmark's JSON says about the run: command, machine, versions, code, wall time
    (``code``: ``code_version()`` taken when the run started; now if not given)."""
    return {
        "command": command_line(argv),
        "machine": machine,
        "versions": {name: version_of(name) for name in packages},
        "code": code_version() if code is None else code,
        "wall_s": wall_s,
    }


# ---- writing the results ------------------------------------------------------------------------
def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: Path | str, payload: dict) -> None:
    """``payload`` as indented JSON at ``path`` (folders created; objects JSON cannot hold, such
    as paths, written as their ``str``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")


def write_text(path: Path | str, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text.endswith("\n") else text + "\n")
