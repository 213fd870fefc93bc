"""Tests of tests/multiproc.py itself: results, failures, deaths and hangs on 2 CPU ranks.

Rank bodies are module-level functions: the spawned ranks import this module to find them.
"""

import os
import time

import pytest
import torch
import torch.distributed as dist

from tests.multiproc import free_port, run_ranks

WORLD_SIZE = 2


def _all_reduce_body(rank, world_size, offset, *, scale):
    tensor = torch.tensor([float(rank + offset)])
    dist.all_reduce(tensor)
    env = {
        key: os.environ[key]
        for key in (
            "RANK",
            "LOCAL_RANK",
            "WORLD_SIZE",
            "LOCAL_SIZE",
            "MASTER_ADDR",
            "MASTER_PORT",
            "OMP_NUM_THREADS",
            "EXTRA_VAR",
        )
    }
    return {
        "rank": rank,
        "dist_rank": dist.get_rank(),
        "world_size": world_size,
        "sum": tensor.item() * scale,
        "env": env,
        "threads": torch.get_num_threads(),
    }


def test_results_come_back_in_rank_order():
    results = run_ranks(_all_reduce_body, WORLD_SIZE, 10, scale=2.0, timeout=60, env={"EXTRA_VAR": "extra"})

    assert [r["rank"] for r in results] == [0, 1]
    assert [r["dist_rank"] for r in results] == [0, 1]
    assert [r["sum"] for r in results] == [2.0 * (10 + 11)] * 2
    for rank, r in enumerate(results):
        assert r["world_size"] == WORLD_SIZE
        assert r["threads"] == 1
        assert r["env"]["RANK"] == r["env"]["LOCAL_RANK"] == str(rank)
        assert r["env"]["WORLD_SIZE"] == r["env"]["LOCAL_SIZE"] == str(WORLD_SIZE)
        assert r["env"]["MASTER_ADDR"] == "127.0.0.1"
        assert r["env"]["OMP_NUM_THREADS"] == "1"
        assert r["env"]["EXTRA_VAR"] == "extra"
    assert results[0]["env"]["MASTER_PORT"] == results[1]["env"]["MASTER_PORT"]
    # The parent's environment is left as it was.
    assert "EXTRA_VAR" not in os.environ


def _raise_on_rank1(rank, world_size):
    if rank == 1:
        raise ValueError("boom from the second rank")
    dist.barrier()  # rank 0 would wait here forever if rank 1's failure were not acted on


def test_failing_rank_traceback_is_reported_and_others_are_killed():
    start = time.monotonic()
    with pytest.raises(AssertionError) as excinfo:
        run_ranks(_raise_on_rank1, WORLD_SIZE, timeout=60)

    message = str(excinfo.value)
    assert "rank 1 of 2 failed" in message
    assert "Traceback (most recent call last)" in message
    assert "in _raise_on_rank1" in message
    assert "ValueError: boom from the second rank" in message
    assert time.monotonic() - start < 30, "the parent waited for the timeout instead of failing"


def _sleep_on_rank1(rank, world_size):
    if rank == 1:
        time.sleep(3600)
    return rank


def test_hanging_rank_times_out_with_stacks():
    timeout = 10
    start = time.monotonic()
    with pytest.raises(AssertionError) as excinfo:
        run_ranks(_sleep_on_rank1, WORLD_SIZE, timeout=timeout)
    elapsed = time.monotonic() - start

    message = str(excinfo.value)
    assert f"timed out after {timeout} s: ranks [1] of 2 had not finished" in message
    # Rank 0 returned (a few seconds after start) and waits for rank 1 in the final barrier.
    assert "ranks [0] had returned and were stuck in the final barrier" in message
    # faulthandler's dump of rank 1 shows where it hung.
    assert "--- rank 1: stacks at timeout ---" in message
    assert "_sleep_on_rank1" in message
    assert elapsed < timeout + 10


def _exit_on_rank1(rank, world_size):
    if rank == 1:
        os._exit(7)
    dist.barrier()


def test_rank_that_dies_without_reporting_fails_the_run():
    with pytest.raises(AssertionError, match=r"rank 1 of 2 exited with code 7 without reporting"):
        run_ranks(_exit_on_rank1, WORLD_SIZE, timeout=60)


def _deepspeed_all_reduce_body(rank, world_size):
    import deepspeed.comm as ds_dist
    import deepspeed.comm.comm as ds_comm

    tensor = torch.tensor([float(rank + 1)])
    ds_dist.all_reduce(tensor)
    return tensor.item(), type(ds_comm.cdb).__name__, ds_comm.cdb.shm_comm_op is None


def test_deepspeed_init_without_shm_build(tmp_path):
    extensions_dir = tmp_path / "torch_extensions"
    results = run_ranks(
        _deepspeed_all_reduce_body,
        WORLD_SIZE,
        init="deepspeed",
        timeout=90,
        env={"TORCH_EXTENSIONS_DIR": str(extensions_dir)},
    )

    assert results == [(3.0, "TorchBackend", True)] * WORLD_SIZE
    assert not extensions_dir.exists() or not any(extensions_dir.iterdir())


def test_rejects_functions_spawn_cannot_pickle():
    def nested(rank, world_size):
        return rank

    with pytest.raises(ValueError, match="module-level function"):
        run_ranks(nested, WORLD_SIZE)
    with pytest.raises(ValueError, match="init must be one of"):
        run_ranks(_sleep_on_rank1, WORLD_SIZE, init="mpi")


def test_backend_is_checked_before_any_rank_starts():
    with pytest.raises(ValueError, match="backend must be one of"):
        run_ranks(_sleep_on_rank1, WORLD_SIZE, backend="mpi")
    # NCCL: one GPU per rank (GPU number = LOCAL_RANK); more ranks than GPUs is refused at once.
    too_many = torch.cuda.device_count() + 1
    with pytest.raises(ValueError, match=rf"one GPU per rank: {too_many} ranks"):
        run_ranks(_sleep_on_rank1, too_many, backend="nccl", timeout=5)


def test_free_port_is_bindable():
    import socket

    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))
