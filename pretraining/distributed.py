"""The process group and the few collective patterns the script needs."""

from __future__ import annotations

import os
import socket
import traceback

import deepspeed
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from pretraining import InputError
from vrgd_ds.cpu_comm import avoid_shm_allreduce


def init_distributed():
    """Start the process group (nccl on GPUs, gloo on CPU); a plain ``python`` run is one rank."""
    if "RANK" not in os.environ:  # not started by torchrun or the deepspeed launcher
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # On CPU, DeepSpeed would JIT-compile a shared-memory all-reduce op (30-70 s, used only by
    # inference_all_reduce) and leave a file in /dev/shm per rank; keep it out (no-op on GPUs).
    avoid_shm_allreduce()
    deepspeed.init_distributed()
    get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))


def world_size_from_env() -> int:
    """The world size the launcher announces, before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def log(*msg):
    """print() on global rank 0 only."""
    if rank() == 0:
        print(*msg, flush=True)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def on_rank0_then_all(fn):
    """Run ``fn`` on global rank 0 while the others wait; an exception there is re-raised on every rank.

    A plain barrier would leave the other ranks waiting forever when rank 0 fails.
    """
    error = [None]
    if rank() == 0:
        try:
            fn()
        except InputError as err:
            error[0] = str(err)
        except Exception as err:  # keep the traceback on rank 0, give the others its gist
            traceback.print_exc()
            error[0] = f"data preparation failed on rank 0: {type(err).__name__}: {err}"
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise InputError(error[0])
