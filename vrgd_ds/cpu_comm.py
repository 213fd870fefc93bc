"""Keep DeepSpeed's CPU shared-memory all-reduce op from leaving files in /dev/shm.

On a CPU machine, every creation of DeepSpeed's communication backend (``deepspeed.init_distributed``,
and ``deepspeed.initialize`` when it creates the backend) calls ``deepspeed.comm.torch.build_shm_op()``
(deepspeed 0.19.8). That JIT-compiles the ``deepspeed_shm_comm`` op the first time (30-70 s, cached
in ``TORCH_EXTENSIONS_DIR``) and, when all ranks are on one machine (``LOCAL_SIZE`` equals the world
size -- the ``deepspeed`` launcher sets it), creates a ~69 MB POSIX shared-memory file
``/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>`` per rank that is
never removed. /dev/shm is RAM: after a few hundred runs it is full and new runs hang.

The op serves only ``deepspeed.comm.inference_all_reduce``; training (and vrgd_ds) never uses it,
and without it that call falls back to ``torch.distributed.all_reduce``. ``avoid_shm_allreduce()``
marks the op as not buildable here, in ``deepspeed.ops.__compatible_ops__`` -- the table
``build_shm_op`` consults and that DeepSpeed keeps edits to -- so DeepSpeed behaves as it does off
Linux: no build, no file. Call it once per process before the first ``deepspeed.init_distributed``
/ ``deepspeed.initialize``::

    import deepspeed
    import vrgd_ds
    from vrgd_ds.cpu_comm import avoid_shm_allreduce

    avoid_shm_allreduce()          # no-op on GPUs
    deepspeed.init_distributed()

Called after the backend already exists with the op loaded, it cannot undo that, but registers an
exit handler that removes this rank's buffer file (each rank its own), so the run still leaves
/dev/shm as it found it when it exits normally.
"""

from __future__ import annotations

import atexit
import os

__all__ = ["avoid_shm_allreduce", "shm_buffer_path", "SHM_OP_NAME"]

SHM_OP_NAME = "deepspeed_shm_comm"
_SHM_PREFIX = "deepspeed_allreduce_buffer"
_cleanup_registered: set[str] = set()


def _on_cpu() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cpu"


def shm_buffer_path(rank: int | None = None) -> str:
    """The /dev/shm file DeepSpeed's shm op creates for ``rank`` (default: this process's rank in
    torch.distributed, else ``$RANK``) of the run named by ``$MASTER_ADDR`` / ``$MASTER_PORT``
    (deepspeed/ops/csrc/cpu/comm/shm.cpp)."""
    if rank is None:
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", "0"))
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return f"/dev/shm/{_SHM_PREFIX}_{os.getuid()}_{addr}_{port}_{rank}"


def _remove_at_exit(path: str) -> None:
    if path in _cleanup_registered:
        return
    _cleanup_registered.add(path)

    def remove():
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError:
            pass  # best effort at exit

    atexit.register(remove)


def avoid_shm_allreduce() -> bool:
    """Keep DeepSpeed's CPU shm all-reduce op (and its /dev/shm file) out of this process.

    Call before the first ``deepspeed.init_distributed()`` / ``deepspeed.initialize()`` of the
    process, on every rank; idempotent. On an accelerator other than DeepSpeed's CPU accelerator
    (GPUs) it does nothing. Returns True when the op is now kept out (on CPU), False otherwise.

    If DeepSpeed's comm backend already exists with the op loaded (called too late), it logs a
    warning and registers removal of this rank's ``/dev/shm/deepspeed_allreduce_buffer_*`` file at
    interpreter exit instead, and returns False.
    """
    try:
        import deepspeed.ops
    except ImportError:
        return False
    if not _on_cpu():
        return False
    deepspeed.ops.__compatible_ops__[SHM_OP_NAME] = False

    import deepspeed.comm.comm as ds_comm

    backend = getattr(ds_comm, "cdb", None)
    if backend is not None and getattr(backend, "shm_comm_op", None) is not None:
        from deepspeed.utils import logger

        path = shm_buffer_path()
        logger.warning(
            f"vrgd_ds.cpu_comm.avoid_shm_allreduce() was called after DeepSpeed loaded its shm "
            f"op; {path} will be removed at exit. Call it before deepspeed.init_distributed()."
        )
        _remove_at_exit(path)
        return False
    return True
