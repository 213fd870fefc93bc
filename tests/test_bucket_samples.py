"""ZeRO-2's Σg² (and Σg) taken per gradient bucket (vrgd_ds/deepspeed_glue/ipg_buckets.py) equal the
per-tensor hooks' bit for bit, on 1 and 2 CPU ranks, over bucket configurations; plus the layout's
pure logic."""

from __future__ import annotations

import pytest
import torch

from vrgd_ds.deepspeed_glue.ipg_buckets import ArrivalLayout, BucketSamples

from .bucket_bodies import compare
from .multiproc import run_ranks

CASES = [
    dict(name="fp32-one-bucket"),
    dict(name="fp32-small-buckets", zero={"reduce_bucket_size": 40}),  # several buckets, tensors larger than one
    dict(name="fp32-non-contiguous", zero={"contiguous_gradients": False, "reduce_bucket_size": 40}),
    dict(name="fp32-overlap-comm", zero={"overlap_comm": True, "reduce_bucket_size": 64}),
    # One bucket, in an order to learn (per_step: the arrival-order accumulator at one rank too).
    dict(name="fp32-learnt-order", reversed_registration=True, params={"moment_reduction": "per_step"}),
    dict(name="fp32-round-robin", zero={"round_robin_gradients": True, "reduce_bucket_size": 64}),
    dict(name="bf16-one-bucket", precision="bf16"),
    dict(name="bf16-small-buckets", precision="bf16", zero={"reduce_bucket_size": 40}),
    dict(name="fp32-gas1", gas=1, params={"moment_reduction": "per_step"}),
    # No bucket of ZeRO's to read: hook samples held and added a bucket at a time.
    dict(name="zero1-fp32", stage=1, path="held"),
    dict(name="zero1-bf16", stage=1, precision="bf16", path="held"),  # one chunk: the whole model
    dict(name="zero1-bf16-small-buckets", stage=1, precision="bf16", held_bucket_elements=40, path="held"),
    dict(
        name="bf16_optimizer",
        stage=1,
        precision="bf16",
        extra={"data_types": {"grad_accum_dtype": "fp32"}},
        held_bucket_elements=300,  # several chunks of several tensors each
        path="held",
    ),
    dict(name="zero2-fp16-comm-held", extra={"communication_data_type": "fp16"}, path="held"),
    # Held samples that ZeRO could change in place mid-backward (its non-contiguous fallback
    # copies the reduced values back into .grad, which may be the very tensor held).
    dict(
        name="zero2-fp16-comm-non-contiguous-held",
        extra={"communication_data_type": "fp16"},
        zero={"contiguous_gradients": False, "reduce_bucket_size": 64},
        path="held",
    ),
    dict(
        name="zero1-overlap-non-contiguous-gas1",
        stage=1,
        gas=1,
        params={"moment_reduction": "per_step"},
        zero={"overlap_comm": True, "contiguous_gradients": False, "reduce_bucket_size": 64},
        path="held",
    ),
    dict(name="stage0-fp32", stage=0, path="held"),
    dict(name="stage0-bf16-small-buckets", stage=0, precision="bf16", held_bucket_elements=40, path="held"),
    dict(name="stage0-learnt-order", stage=0, reversed_registration=True, path="held"),
    # ZeRO-3: chunks of held samples against adding each sample as it arrives.
    dict(name="zero3-fp32", stage=3, path="zero3"),
    dict(name="zero3-bf16-small-buckets", stage=3, precision="bf16", zero={"reduce_bucket_size": 60}, path="zero3"),
]


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_bucket_sums_equal_hook_sums(case, world):
    if world * case.get("gas", 4) < 2:
        pytest.skip("k < 2")
    results = run_ranks(compare, world, case, timeout=300, init="deepspeed")
    for rank, res in enumerate(results):
        b, h = res["buckets"], res["hooks"]
        assert b["sample_path"] == case.get("path", "ipg"), b["sample_path"]
        assert len(b["moments"]) == len(h["moments"]) == 3
        for step, (mb, mh) in enumerate(zip(b["moments"], h["moments"])):
            for g, (x, y) in enumerate(zip(mb, mh)):
                assert x.shape == y.shape
                diff = (x - y).abs().max().item()
                assert torch.equal(x, y), f"rank {rank} step {step} group {g}: max |Δ| {diff:.3e}"
        for x, y in zip(b["params"], h["params"]):
            assert torch.equal(x, y)
        # Steady state: after the first step every bucket is one run of the learnt layout.
        if case.get("path") == "zero3":  # consecutive slots: packed, whatever the bucket size
            assert b["packed"] > 0 and b["unpacked"] == 0, (b["packed"], b["unpacked"])
            # One sample at a time: a chunk each (with a bucket of about one tensor, as many).
            assert h["packed"] > b["packed"] if "zero" not in case else h["packed"] >= b["packed"]
            continue
        assert b["runs"] + b["foreach"] > 0
        if not case.get("reversed_registration"):  # the first guess of the order was right
            assert b["fallbacks"] == 0
        else:  # learnt in the first step: none after it
            assert 0 < b["fallbacks"] <= b["buckets_first_step"]


def test_arrival_layout_runs_and_relearning():
    layout = ArrivalLayout([5, 4, 3], {3: 2, 4: 3, 5: 1})
    assert layout.run([5, 4]) == (0, 4)
    assert layout.run([3]) == (4, 6)
    assert layout.run([4, 5]) is None and layout.run([9]) is None and layout.run([]) is None
    learnt = layout.relearnt([3, 4, 3, 4])
    assert learnt.order == [3, 4, 5] and learnt.run([3, 4]) == (0, 5)


def test_gather_maps_arrival_order_onto_partitions():
    # Two tensors in flat order (ids 0: 3 elements at 0, 1: 4 elements at 3), padded to 8, two ranks.
    groups = [([(0, 3, 0), (1, 4, 3)], 8)]
    bs = BucketSamples(groups, world=2, moments=2, device="cpu", tensor_key_of={0: 100, 1: 101})
    g1, g0 = torch.arange(1.0, 5.0), torch.arange(10.0, 13.0)  # backward: tensor 1 first
    bs.add([1, 0], torch.cat([g1, g0]))
    assert bs.runs_total == 1 and bs.local_samples == 1 and bs.counts == {100: 1, 101: 1}
    out = torch.empty(2, 2, 4)
    bs.gather(0, out)
    flat_sq = torch.cat([g0**2, g1**2, torch.zeros(1)])
    flat_s = torch.cat([g0, g1, torch.zeros(1)])
    assert torch.equal(out[0, 0], flat_sq[:4]) and torch.equal(out[1, 0], flat_sq[4:])
    assert torch.equal(out[0, 1], flat_s[:4]) and torch.equal(out[1, 1], flat_s[4:])
    # A bucket out of the layout's order is added tensor by tensor, then the layout is relearnt.
    bs.end_step()
    bs.acc.zero_()
    bs.add([0, 1], torch.cat([g0, g1]))
    assert bs.fallbacks_total == 1
    bs.gather(0, out)
    assert torch.equal(out[0, 0], flat_sq[:4]) and torch.equal(out[1, 1], flat_s[4:])
    bs.end_step()
    assert bs.layout.order == [0, 1]


def test_coalesce_grad_reduction_is_refused_at_zero2():
    from .bucket_bodies import coalesce_refused

    (message,) = run_ranks(coalesce_refused, 1, timeout=120, init="deepspeed")
    assert "coalesce_grad_reduction" in message and "engine.backward per micro-batch" in message


def test_plain_collector_adds_held_samples_bit_identical_to_per_tensor_sums():
    """Plain PyTorch (and DDP): the hooks hold each micro-batch's gradient and the held ones are
    added by one foreach call per moment; Σg and Σg² equal per-tensor fp32 sums bit for bit, also
    across several held buckets."""
    from vrgd_ds import VRLamb
    from vrgd_ds.collect import GradientMomentCollector

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(9, 9) for _ in range(6)])
    params = list(model.parameters())
    xs = [torch.randn(3, 9) + 1.0 for _ in range(4)]
    expected_s = [torch.zeros(p.numel()) for p in params]
    expected_q = [torch.zeros(p.numel()) for p in params]
    for x in xs:
        for s, q, g in zip(expected_s, expected_q, torch.autograd.grad(model(x).pow(2).mean() / 4, params)):
            s.add_(g.reshape(-1))
            q.addcmul_(g.reshape(-1), g.reshape(-1))
    for bucket in (1 << 24, 100):  # one bucket; several (each flushed before it would overflow)
        opt = VRLamb(model.parameters(), lr=1e-3)
        source = opt.moment_source
        assert isinstance(source, GradientMomentCollector)
        source.held_bucket_elements = bucket
        for x in xs:
            (model(x).pow(2).mean() / 4).backward()
        assert source.finalize() == 4
        n, buf = source.numel, source._buffer
        for p, s, q in zip(params, expected_s, expected_q):
            offset, numel = source._offsets[id(p)]
            assert torch.equal(buf[offset : offset + numel], s)
            assert torch.equal(buf[n + offset : n + offset + numel], q)
        opt.zero_grad()
