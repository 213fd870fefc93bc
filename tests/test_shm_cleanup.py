"""Entry points that start ranks leave /dev/shm as they found it (vrgd_ds.cpu_comm).

On CPU, DeepSpeed's shm all-reduce op creates /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_
<port>_<rank> (~69 MB) per rank whenever LOCAL_SIZE equals the world size (the deepspeed launcher
sets it) and never removes it. The shipped example is started here exactly as README says, by the
deepspeed launcher on 2 ranks, and /dev/shm is compared before and after.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.multiproc import free_port

ROOT = Path(__file__).resolve().parents[1]
SHM = Path("/dev/shm")
BUFFER = re.compile(r"deepspeed_allreduce_buffer_\d+_(?P<addr>[^_]*)_(?P<port>\d*)_(?P<rank>\d+)")

pytestmark = pytest.mark.skipif(
    not SHM.is_dir() or not sys.platform.startswith("linux"), reason="POSIX shared memory in /dev/shm (Linux)"
)


def _deepspeed_files() -> set[str]:
    return {p.name for p in SHM.iterdir() if p.name.startswith("deepspeed")}


def _left_behind(before: set[str], port: int) -> list[str]:
    """New deepspeed* files in /dev/shm that could be ours: every one except another run's
    allreduce buffer (another port: sessions beside this one may run DeepSpeed meanwhile)."""
    out = []
    for name in sorted(_deepspeed_files() - before):
        match = BUFFER.fullmatch(name)
        if match is None or match["port"] == str(port):
            out.append(name)
    return out


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    # A build of the op (if it ever happens again) goes here, not into a shared cache, and
    # every run starts without a cached op: what a fresh machine sees.
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "torch_extensions")
    env["OMP_NUM_THREADS"] = "1"
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def test_avoid_shm_allreduce_keeps_the_op_out(tmp_path):
    """After the call, DeepSpeed's comm backend has no shm op on CPU (in a fresh interpreter)."""
    code = (
        "import os, deepspeed.ops\n"
        "from deepspeed.comm.torch import build_shm_op\n"
        "from vrgd_ds.cpu_comm import avoid_shm_allreduce, shm_buffer_path\n"
        "assert avoid_shm_allreduce() is True\n"
        "assert avoid_shm_allreduce() is True\n"
        "assert deepspeed.ops.__compatible_ops__['deepspeed_shm_comm'] is False\n"
        "assert build_shm_op() is None\n"
        "os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT='1234')\n"
        "assert shm_buffer_path(1) == f'/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_1234_1'\n"
        "print('ok')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.mark.timeout(400)
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_deepspeed_launcher_example_leaves_no_shm_files(tmp_path):
    """scripts/launch_small_zero2.sh (deepspeed launcher, 2 CPU ranks, LOCAL_SIZE=2), 2 steps."""
    port = free_port()
    before = _deepspeed_files()
    env = _env(tmp_path)
    if shutil.which("deepspeed", path=env["PATH"]) is None:
        pytest.skip("the deepspeed launcher is not on PATH (deepspeed installed without its scripts)")
    env.update(NUM_GPUS="2", MASTER_PORT=str(port))
    cmd = ["bash", str(ROOT / "scripts" / "launch_small_zero2.sh"), "--steps", "2"]
    # Own process group: on a timeout the launcher and both ranks are killed together.
    with subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as popen:
        try:
            stdout, stderr = popen.communicate(timeout=380)
        except subprocess.TimeoutExpired:  # e.g. DeepSpeed JIT-building the shm op again (minutes)
            os.killpg(popen.pid, signal.SIGKILL)
            stdout, stderr = popen.communicate()
            stderr += "\n(timed out after 380 s)"
    proc = subprocess.CompletedProcess(cmd, popen.returncode, stdout, stderr)
    left = _left_behind(before, port)
    for name in left:  # do not let a failure here fill /dev/shm either
        (SHM / name).unlink(missing_ok=True)
    output = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, output
    assert "per-tensor GSNR statistics" in proc.stdout, output
    assert "world_size=2" in output or "WORLD_SIZE=2" in output or "dist_world_size=2" in output, output
    assert not left, f"left in /dev/shm: {left}\n{output}"
