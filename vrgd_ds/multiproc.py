"""Run one function on N ranks, each a separate CPU process talking over gloo (the tests'
multi-rank harness; benchmarks use it too), or one process per GPU talking over NCCL.

Modelled on PyTorch's ``MultiProcessTestCase`` (torch/testing/_internal/common_distributed.py)
and DeepSpeed's ``DistributedTest``, cut down to a single function::

    from vrgd_ds.multiproc import run_ranks

    def _sum_ranks(rank, world_size, scale):          # module level: spawn pickles it
        t = torch.tensor([float(rank)])
        dist.all_reduce(t)
        return t.item() * scale

    def test_sum():
        assert run_ranks(_sum_ranks, 2, 10.0, timeout=30) == [10.0, 10.0]

What each rank gets
    Ranks are started with the ``"spawn"`` context, so each one is a fresh interpreter (no
    forked torch or gloo state). Before a rank starts, its environment gets ``RANK``,
    ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_SIZE``, ``MASTER_ADDR=127.0.0.1``, ``MASTER_PORT``
    (one free port per call), ``OMP_NUM_THREADS=1`` and the caller's ``env`` extras; they are in
    place before the child imports anything, so import-time readers (torch's thread pool,
    DeepSpeed's accelerator choice) see them. ``MULTIPROC_STORE_FILE`` names this call's
    rendezvous file, for bodies that set up the process group themselves (``init="none"``).

Rendezvous (``init=``) and backend (``backend=``)
    ``"torch"`` (default): ``dist.init_process_group(backend, store=FileStore(file, world_size))``.
    A file store has no port to race for; ``MASTER_PORT`` is only there for code that reads the
    environment.
    ``"deepspeed"``: ``deepspeed.init_distributed(dist_backend=backend,
    init_method="file://<file>", rank=, world_size=)``: DeepSpeed's own path (its ``cdb``
    backend object is set up, as ``deepspeed.initialize`` would do it), same file rendezvous.
    ``"none"``: the body does it all (and may use ``env://`` or ``MULTIPROC_STORE_FILE``).
    ``backend="gloo"`` (default): CPU processes. ``backend="nccl"``: one GPU per rank, the GPU
    numbered ``LOCAL_RANK`` (= rank: one node), made the rank's current device
    (``torch.cuda.set_device``) before the process group is set up, whatever ``init``; with
    ``init="torch"`` the group is bound to it (``device_id``), as DeepSpeed binds it with
    ``init="deepspeed"``. ``run_ranks`` refuses more ranks than visible GPUs.
    The process group's own timeout is the harness timeout plus a margin, so a stuck collective
    shows up as the harness's timeout (with stacks), not as a gloo error on the waiting rank.
    Whatever the mode, a rank that returns normally ends with ``dist.barrier()`` and
    ``dist.destroy_process_group()`` when a process group is up: without it gloo may abort at
    interpreter exit after a successful run.

DeepSpeed's shared-memory op is never compiled
    In deepspeed 0.19.8, *every* creation of DeepSpeed's comm backend (``TorchBackend.__init__``,
    reached from ``deepspeed.init_distributed`` and from ``deepspeed.initialize``, even when
    torch.distributed is already initialized) calls ``deepspeed.comm.torch.build_shm_op()``,
    which JIT-compiles ``deepspeed_shm_comm`` on a CPU machine the first time (~30 s, cached in
    ``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``). No environment variable
    or config key turns it off (``DS_BUILD_SHM_COMM`` only concerns pre-built installs). The op
    serves only ``inference_all_reduce``, which falls back to ``torch.distributed.all_reduce``
    without it. So before the body runs, each rank (when deepspeed is installed) marks the op
    incompatible in ``deepspeed.ops.__compatible_ops__``, the table ``build_shm_op`` consults,
    which makes it return ``None`` as it does on non-Linux platforms. Pass
    ``build_shm_op=True`` to keep DeepSpeed's behaviour.

Results and failures
    The body is called as ``fn(rank, world_size, *args, **kwargs)``; its return value must be
    picklable (it is pickled by value, tensors included) and comes back in a list in rank order.
    If a rank raises, the others are killed at once and ``run_ranks`` raises ``AssertionError``
    with the rank number and its full formatted traceback. A rank that dies without reporting
    (segfault, ``os._exit``) fails the same way with its exit code. If not every rank has
    finished within ``timeout`` seconds (counted from the start, interpreter start-up included),
    each unfinished rank dumps the stacks of all its threads (faulthandler on ``SIGUSR1``, to a
    file), all ranks are killed, and ``AssertionError`` names the ranks still in the body, those
    that returned but wait in the final barrier, and shows their stacks.
    Ranks also exit by themselves if the parent process disappears. ``run_ranks`` never waits
    longer than ``timeout`` plus a few seconds.

Constraints
    * ``fn`` (and everything in ``args``/``kwargs``) must be picklable: a module-level function
      of an importable module, not a lambda, closure or nested function. The child imports
      ``fn``'s module, so keep heavy work out of module import.
    * ``timeout``, ``env``, ``init``, ``backend`` and ``build_shm_op`` are run_ranks's own keywords
      and are never passed on to ``fn``.
    * Start-up costs about 2 s per call (interpreter + ``import torch`` per rank, in parallel),
      ~0.5 s more when the body imports deepspeed. Budget ~5 s for a trivial 2-rank call on a
      2-core machine.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import pickle
import queue as queue_mod
import shutil
import signal
import socket
import tempfile
import threading
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, Iterator, Mapping

import torch.multiprocessing as mp

INIT_MODES = ("torch", "deepspeed", "none")
BACKENDS = ("gloo", "nccl")

# Extra process-group timeout beyond the harness timeout: the harness must fire first.
_PG_TIMEOUT_MARGIN_S = 60
# How long an unfinished rank gets to write its stack dump after SIGUSR1.
_STACK_DUMP_WAIT_S = 1.5
# How long a rank that has exited may take before its last message counts as lost.
_EXIT_GRACE_S = 2.0
# After an error, how long to look for a peer that died silently (the likelier cause).
_DEATH_POLL_S = 0.25


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago.

    Nothing holds it afterwards, so another process may take it before it is used; the harness
    therefore rendezvouses through a file store and only exports the port as ``MASTER_PORT``.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120,
    env: Mapping[str, str] | None = None,
    init: str = "torch",
    backend: str = "gloo",
    build_shm_op: bool = False,
    **kwargs: Any,
) -> list:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` spawned processes.

    Returns the ranks' return values in rank order. Raises ``AssertionError`` if a rank raises
    or dies (its traceback included), or if the ranks have not all finished within ``timeout``
    seconds (unfinished ranks and their stacks included). See the module docstring.
    """
    if init not in INIT_MODES:
        raise ValueError(f"init must be one of {INIT_MODES}, got {init!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if backend == "nccl":
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if world_size > gpus:
            raise ValueError(f'backend="nccl" runs one GPU per rank: {world_size} ranks, {gpus} GPU(s) visible')
    qualname = getattr(fn, "__qualname__", "")
    if "<" in qualname or "." in qualname:  # a lambda, a nested function or a method
        raise ValueError(f"fn must be a module-level function (spawn pickles it by name), got {fn!r}")

    ctx = mp.get_context("spawn")
    workdir = tempfile.mkdtemp(prefix="multiproc_")
    store_file = os.path.join(workdir, "store")
    results_queue = ctx.Queue()
    port = free_port()
    procs = []
    try:
        for rank in range(world_size):
            rank_env = {
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(world_size),
                "LOCAL_SIZE": str(world_size),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "OMP_NUM_THREADS": "1",
                "MULTIPROC_STORE_FILE": store_file,
                **(env or {}),
            }
            proc = ctx.Process(
                target=_rank_main,
                name=f"rank{rank}",
                args=(
                    fn,
                    rank,
                    world_size,
                    args,
                    kwargs,
                    init,
                    backend,
                    build_shm_op,
                    store_file,
                    workdir,
                    timeout,
                    os.getpid(),
                    results_queue,
                ),
            )
            # spawn execs a new interpreter with the parent's environment as it is at start()
            with _environ(rank_env):
                proc.start()
            procs.append(proc)
        return _collect(procs, results_queue, workdir, timeout)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
        for proc in procs:
            proc.join(timeout=5)
        results_queue.close()
        results_queue.cancel_join_thread()
        shutil.rmtree(workdir, ignore_errors=True)


def _collect(procs: list, results_queue, workdir: str, timeout: float) -> list:
    """Wait until every rank is done; fail fast on the first error, death or the deadline.

    A rank sends ``ok`` (with its pickled result) when the body returns, then ``done`` after the
    final barrier and teardown, or one ``error`` message at any point.
    """
    world_size = len(procs)
    deadline = time.monotonic() + timeout
    results: dict[int, Any] = {}
    done: set[int] = set()
    exited_at: dict[int, float] = {}
    while len(done) < world_size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            _fail_on_timeout(procs, results, done, workdir, timeout)
        try:
            rank, status, payload = results_queue.get(timeout=min(remaining, 0.2))
        except queue_mod.Empty:
            now = time.monotonic()
            for rank, proc in enumerate(procs):
                if rank in done or proc.exitcode is None:
                    continue
                # Its last message may still be in the pipe: wait a moment before calling it lost.
                if now - exited_at.setdefault(rank, now) > _EXIT_GRACE_S:
                    _kill_all(procs)
                    raise AssertionError(
                        f"rank {rank} of {world_size} exited with code {proc.exitcode}"
                        f"{_signal_name(proc.exitcode)} without reporting "
                        f"{'the end of its teardown' if rank in results else 'a result or an error'}"
                        " (see its stderr above)"
                    ) from None
            continue
        if status == "error":
            # A peer that died silently makes the others fail with gloo "Connection reset by
            # peer": name the dead one first, it is the cause.
            dead = _wait_for_silent_deaths(procs, done, exclude=rank)
            _kill_all(procs)
            causes = "".join(
                f"rank {r} of {world_size} exited with code {procs[r].exitcode}"
                f"{_signal_name(procs[r].exitcode)} without reporting; then "
                for r in dead
            )
            raise AssertionError(f"{causes}rank {rank} of {world_size} failed:\n{payload}")
        if status == "ok":
            results[rank] = pickle.loads(payload)
        else:
            done.add(rank)
    for proc in procs:
        proc.join(timeout=max(deadline - time.monotonic(), 1.0))
    return [results[rank] for rank in range(world_size)]


def _fail_on_timeout(procs: list, results: dict, done: set, workdir: str, timeout: float):
    alive = [rank for rank, proc in enumerate(procs) if rank not in done and proc.is_alive()]
    for rank in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(procs[rank].pid, signal.SIGUSR1)
    time.sleep(_STACK_DUMP_WAIT_S)
    _kill_all(procs)
    in_body = [rank for rank in range(len(procs)) if rank not in results]
    in_teardown = [rank for rank in range(len(procs)) if rank in results and rank not in done]
    message = f"timed out after {timeout} s: ranks {in_body} of {len(procs)} had not finished"
    if in_teardown:
        message += f"; ranks {in_teardown} had returned and were stuck in the final barrier"
    dumps = []
    for rank in alive:
        try:
            with open(_stack_file(workdir, rank), encoding="utf-8", errors="replace") as f:
                stacks = f.read().strip()
        except OSError:
            stacks = ""
        dumps.append(f"--- rank {rank}: stacks at timeout ---\n{stacks or '(none written)'}")
    raise AssertionError(message + "\n" + "\n".join(dumps))


def _wait_for_silent_deaths(procs: list, done: set, exclude: int) -> list:
    """Ranks that exited with an error code without a message, polled for a short moment."""
    end = time.monotonic() + _DEATH_POLL_S
    while True:
        dead = [
            rank
            for rank, proc in enumerate(procs)
            if rank != exclude and rank not in done and proc.exitcode not in (None, 0)
        ]
        if dead or time.monotonic() > end:
            return dead
        time.sleep(0.02)


def _kill_all(procs: list) -> None:
    for proc in procs:
        if proc.is_alive():
            proc.kill()


def _signal_name(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        with contextlib.suppress(ValueError):
            return f" (killed by {signal.Signals(-exitcode).name})"
    return ""


def _stack_file(workdir: str, rank: int) -> str:
    return os.path.join(workdir, f"stacks.rank{rank}.txt")


@contextlib.contextmanager
def _environ(values: Mapping[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update({key: str(value) for key, value in values.items()})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ----------------------------------------------------------------------------- child side


def _rank_main(
    fn,
    rank,
    world_size,
    args,
    kwargs,
    init,
    backend,
    build_shm_op,
    store_file,
    workdir,
    timeout,
    parent_pid,
    results_queue,
) -> None:
    faulthandler.enable()  # segfaults and aborts print a Python stack to stderr
    stack_file = open(_stack_file(workdir, rank), "w")  # noqa: SIM115 - lives as long as we do
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)
    _exit_when_orphaned(parent_pid)

    import torch.distributed as dist

    try:
        if not build_shm_op:
            _disable_deepspeed_shm_build()
        pg_timeout = timedelta(seconds=timeout + _PG_TIMEOUT_MARGIN_S)
        device = {}
        if backend == "nccl":
            import torch

            local_rank = int(os.environ["LOCAL_RANK"])
            torch.cuda.set_device(local_rank)
            device = {"device_id": torch.device("cuda", local_rank)}
        if init == "torch":
            dist.init_process_group(
                backend,
                store=dist.FileStore(store_file, world_size),
                rank=rank,
                world_size=world_size,
                timeout=pg_timeout,
                **device,
            )
        elif init == "deepspeed":
            import deepspeed

            deepspeed.init_distributed(
                dist_backend=backend,
                init_method=f"file://{store_file}",
                rank=rank,
                world_size=world_size,
                timeout=pg_timeout,
                verbose=False,
            )
        payload = pickle.dumps(fn(rank, world_size, *args, **kwargs))
    except BaseException:  # noqa: BLE001 - SystemExit and KeyboardInterrupt too: report them all
        results_queue.put((rank, "error", traceback.format_exc()))
    else:
        results_queue.put((rank, "ok", payload))
        try:
            if dist.is_available() and dist.is_initialized():
                dist.barrier()
                dist.destroy_process_group()
        except BaseException:  # noqa: BLE001
            results_queue.put((rank, "error", "in the final barrier/teardown:\n" + traceback.format_exc()))
        else:
            results_queue.put((rank, "done", None))
    # Flush the queue's feeder thread before the interpreter exits.
    results_queue.close()
    results_queue.join_thread()


def _disable_deepspeed_shm_build() -> None:
    """Report DeepSpeed's shm comm op as not buildable here, as DeepSpeed does off Linux.

    ``deepspeed.comm.torch.build_shm_op`` returns ``None`` for an op marked False in
    ``deepspeed.ops.__compatible_ops__``; that dict is probed once per process (~0.1 s) and
    DeepSpeed keeps edits to it.
    """
    try:
        import deepspeed.ops
    except ImportError:
        return
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _exit_when_orphaned(parent_pid: int) -> None:
    """Exit if the parent dies (e.g. pytest killed), instead of blocking in gloo forever."""

    def watch():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os._exit(3)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()
