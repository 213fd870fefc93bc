#!/usr/bin/env bash
# The DeepSpeed version matrix: vrgd_ds's DeepSpeed ZeRO 0/1/2 tests against each DeepSpeed
# version, each in its own venv (CPU torch from constraints-cpu.txt), with a results table.
#
#   bash scripts/version_matrix.sh                      # every version of VERSIONS below
#   VERSIONS="0.19.3 0.16.9" bash scripts/version_matrix.sh
#   INSTALL_ONLY=1 bash scripts/version_matrix.sh       # build the venvs, run nothing
#
# Venvs: .venv-ds/<version>/ (ignored by git; kept between runs). Results: OUT (default
# outputs/version_matrix/): <version>.log and <version>.xml (pytest), results.json, table.md.
# results.json keeps the versions of earlier runs; copy it to docs/version_matrix.json (and the
# table into README / vrgd_ds/deepspeed_glue/versions.py's TESTED) to publish a new measurement.
# Exit status: 0 when every version passed every test it ran. What each test checks and the
# table we measured: README "DeepSpeed versions" and vrgd_ds/deepspeed_glue/versions.py.
# About 4-6 minutes per version on 2 cores once the venv exists (the first install of a
# version downloads DeepSpeed and its dependencies; torch comes from pip's cache).
set -u -o pipefail
cd "$(dirname "$0")/.."

VERSIONS=${VERSIONS:-"0.19.8 0.19.7 0.19.6 0.19.5 0.19.4 0.19.3 0.19.2 0.19.1 0.19.0 0.16.9"}
# The ZeRO 0/1/2 subset: every optimizer step of every ZeRO 0/1/2 path against the float64
# reference (fp32/bf16/fp16, clipping, offload, checkpointing, frozen and tied weights, two groups,
# both moment reductions), and the world-size/stage equivalence with checkpoint resume.
TESTS=${TESTS:-"tests/test_update_matrix.py tests/test_deepspeed.py::test_equivalence_across_world_sizes_and_stages tests/test_deepspeed.py::test_variants_two_ranks tests/test_deepspeed.py::test_checkpoint_resume_in_new_processes_is_exact"}
OUT=${OUT:-outputs/version_matrix}
PYTHON=${PYTHON:-python3.11}
mkdir -p "$OUT" .venv-ds
# Measuring is what this script is for: let deepspeed.initialize through for versions not yet in
# vrgd_ds/deepspeed_glue/versions.py's table (known-wrong versions stay refused).
export VRGD_DS_ALLOW_UNTESTED_DEEPSPEED=1

status=0
for v in $VERSIONS; do
    venv=".venv-ds/$v"
    if [ ! -x "$venv/bin/python" ]; then
        "$PYTHON" -m venv "$venv" || { echo "$v: venv failed"; status=1; continue; }
    fi
    # Only what these tests import: torch (CPU, pinned), this DeepSpeed, pytest; vrgd_ds without
    # its dependencies (its pyproject asks for a DeepSpeed in the supported window).
    if ! "$venv/bin/pip" install -q -c constraints-cpu.txt torch "deepspeed==$v" pytest pytest-timeout numpy \
        > "$OUT/$v.install.log" 2>&1 || ! "$venv/bin/pip" install -q --no-deps -e . >> "$OUT/$v.install.log" 2>&1; then
        echo "$v: install failed (see $OUT/$v.install.log)"
        status=1
        continue
    fi
    [ -n "${INSTALL_ONLY:-}" ] && continue
    echo "== deepspeed $v"
    # shellcheck disable=SC2086
    TORCH_EXTENSIONS_DIR="$PWD/$venv/torch_extensions" "$venv/bin/python" -m pytest -q -p no:cacheprovider \
        --junitxml="$OUT/$v.xml" $TESTS > "$OUT/$v.log" 2>&1
    rc=$?
    tail -1 "$OUT/$v.log"
    [ $rc -eq 0 ] || status=1
done

"$PYTHON" - "$OUT" $VERSIONS <<'EOF'
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

out, versions = Path(sys.argv[1]), sys.argv[2:]
# Versions of earlier runs stay in the table; this run's replace theirs.
previous = out / "results.json"
results = json.loads(previous.read_text()) if previous.exists() else {}
for v in versions:
    xml = out / f"{v}.xml"
    if not xml.exists():
        results[v] = None
        continue
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    cases = suite.findall("testcase")
    failed = [
        f"{c.get('classname')}::{c.get('name')}" for c in cases if c.find("failure") is not None or c.find("error") is not None
    ]
    skipped = sum(1 for c in cases if c.find("skipped") is not None)
    results[v] = {"tests": len(cases), "failed": failed, "skipped": skipped, "passed": len(cases) - len(failed) - skipped}
lines = ["| deepspeed | passed | failed | skipped |", "|---|---|---|---|"]
order = sorted(results, key=lambda v: tuple(int(x) for x in v.split(".")), reverse=True)
results = {v: results[v] for v in order}
(out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
for v, r in results.items():
    if r is None:
        lines.append(f"| {v} | – | not run | – |")
    else:
        lines.append(f"| {v} | {r['passed']} | {len(r['failed'])} | {r['skipped']} |")
(out / "table.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
exit $status
