"""Layouts that cannot give the exact VRGD update yet are refused at deepspeed.initialize, on
every rank, with a message that says what to change (the rest: tests/test_update_matrix.py for
fp16 at stage 0, tests/test_pipeline.py for weights tied across pipeline stages,
tests/test_deepspeed.py for ZeRO-3, BF16_Optimizer, offload and bad options)."""

from __future__ import annotations

import pytest

from .multiproc import run_ranks
from .refusal_bodies import tensor_parallel_case


@pytest.mark.parametrize("opt_type", ["VRLamb", "VRSGD"])
def test_tensor_parallelism_refused_on_every_rank(opt_type):
    for rank, msg in enumerate(run_ranks(tensor_parallel_case, 2, opt_type, timeout=120, init="deepspeed")):
        assert msg is not None and "tensor (model) parallelism with 2 shards" in msg and "size 1" in msg, (
            f"rank {rank}: {msg}"
        )
