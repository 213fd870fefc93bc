"""Layouts that cannot give the exact VRGD update yet are refused at deepspeed.initialize, on
every rank, with a message that says what to change (the rest: tests/test_update_matrix.py for
fp16 at stage 0, tests/test_pipeline.py for weights tied across pipeline stages,
tests/test_deepspeed.py for ZeRO-3, BF16_Optimizer, offload and bad options; tensor parallelism
where it is exact: tests/test_tensor_parallel.py)."""

from __future__ import annotations

import re

import pytest

from .multiproc import run_ranks
from .refusal_bodies import TP_REFUSALS, sparse_embedding_refusals, tensor_parallel_refusals

EXPECTED = {
    "sequence_parallel": r"with sequence parallelism .*turn sequence parallelism off",
}


@pytest.mark.parametrize("opt_type", ["VRLamb", "VRSGD"])
def test_tensor_parallelism_refused_where_not_exact(opt_type):
    assert set(EXPECTED) == set(TP_REFUSALS)
    for rank, messages in enumerate(run_ranks(tensor_parallel_refusals, 2, opt_type, timeout=180, init="deepspeed")):
        for what, pattern in EXPECTED.items():
            msg = messages[what]
            assert msg is not None and "tensor (model) parallelism with 2 shards" in msg and re.search(pattern, msg), (
                f"rank {rank}, {what}: {msg}"
            )


def test_sparse_gradients_refused_under_deepspeed():
    """nn.Embedding(sparse=True) under DeepSpeed: refused at deepspeed.initialize when samples are
    collected (VR or gradient statistics), naming the fix; plain PyTorch densifies them
    (tests/test_torch_conventions.py::test_sparse_embedding_vr_equals_dense)."""
    (messages,) = run_ranks(sparse_embedding_refusals, 1, timeout=180, init="deepspeed")
    for what in ("vr-stage0", "vr-stage2", "stats-only"):
        msg = messages[what]
        assert msg is not None and msg.startswith("ValueError: vrgd_ds does not support sparse gradients"), (what, msg)
        assert "sparse=False" in msg and "vr=False" in msg, msg
    assert messages["plain"] is None, messages["plain"]
