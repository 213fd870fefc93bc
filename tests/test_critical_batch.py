"""vrgd_ds.CriticalBatch: the pure schedule, its LR glue, and (2 CPU ranks) under DeepSpeed.

The DeepSpeed cases compare against runs that never change the batch: after a change, the update,
k and the noise statistics equal those of an engine configured at the new batch from the start
and loaded from the same checkpoint; a resumed run restores the schedule, the batch and the LR.
"""

from __future__ import annotations

import math

import pytest
import torch

from vrgd_ds import VRLamb
from vrgd_ds.critical_batch import LR_RULES, CriticalBatch, ScaledLRScheduler, lr_rule_factor

from .critical_batch_bodies import CHANGE_AT, SIGNAL_MICRO_BATCH, STEPS, run_critical_matrix
from .multiproc import run_ranks


def stats(b_simple):
    return {"b_simple_ema": b_simple, "k": 8}


def make(**kw):
    opts = dict(micro_batch_size=4, min_batch=16, max_batch=1024, data_parallel_size=2, interval=1, warmup_steps=0)
    opts.update(kw)
    return CriticalBatch(opts.pop("micro_batch_size"), opts.pop("min_batch"), opts.pop("max_batch"), **opts)


# ---- the pure schedule -----------------------------------------------------------------------------
def test_initial_state():
    s = make(initial_batch=32)
    assert (s.batch_size, s.accumulation_steps, s.lr_factor, s.granule) == (32, 4, 1.0, 8)
    assert s.history == [{"step": 0, "batch": 32, "lr_factor": 1.0, "b_simple": None}] and s.b_simple is None


def test_warmup_counts_valid_estimates_only():
    s = make(warmup_steps=3, max_factor=100.0)
    for value in (None, math.nan, -5.0, 0.0, 200.0, 200.0):  # 4 invalid, then 2 valid: still warming up
        assert not s.update(stats(value))
    assert s.batch_size == 16 and s.steps == 6 and s.valid_steps == 2
    assert not s.update({})  # no statistics yet (noise_stats() before the first step)
    assert s.update(stats(200.0))
    assert s.batch_size == 200


def test_rounds_to_micro_batch_times_ranks_and_clamps():
    s = make(max_factor=1000.0)
    assert s.target(203.0) == 200 and s.target(205.0) == 208  # granule 4 x 2 = 8, nearest
    assert s.target(3.0) == 16  # min_batch
    assert s.target(1e6) == 1024  # max_batch
    s.update(stats(1e6))
    assert s.batch_size == 1024


def test_max_factor_per_change_and_at_least_one_granule():
    s = make(max_factor=2.0)
    seen = []
    for _ in range(6):
        s.update(stats(1000.0))
        seen.append(s.batch_size)
    assert seen == [32, 64, 128, 256, 512, 1000]
    down = make(initial_batch=1000, max_factor=2.0)
    down.update(stats(16.0))
    assert down.batch_size == 504  # ceil(1000 / 2) rounded up to the granule
    tiny = make(max_factor=1.01)  # 1.01 x 16 floors to 16: still moves one granule towards the target
    tiny.update(stats(1000.0))
    assert tiny.batch_size == 24


def test_min_interval_and_min_change():
    s = make(interval=10, max_factor=100.0, min_change=0.0)
    changed = [s.update(stats(100.0 + 8 * step)) for step in range(1, 31)]
    assert [i + 1 for i, c in enumerate(changed) if c] == [10, 20, 30]
    steady = make(min_change=0.1, initial_batch=200)
    assert not steady.update(stats(215.0))  # 7.5 % away: kept
    assert steady.update(stats(230.0)) and steady.batch_size == 232


def test_allow_decrease():
    s = make(initial_batch=512, allow_decrease=False)
    assert not s.update(stats(20.0)) and s.batch_size == 512
    assert s.update(stats(2000.0)) and s.batch_size == 1024


def test_scale():
    s = make(scale=0.5, max_factor=100.0)
    s.update(stats(400.0))
    assert s.batch_size == 200


@pytest.mark.parametrize("rule", LR_RULES)
def test_lr_rules(rule):
    s = make(lr_rule=rule, max_factor=100.0)
    assert s.lr_factor == 1.0
    s.update(stats(400.0))
    assert s.batch_size == 400
    expected = {
        "none": 1.0,
        "linear": 400 / 16,
        "sqrt": math.sqrt(400 / 16),
        # ε(B) = ε_max / (1 + B_simple / B): ε(400) / ε(16) with B_simple = 400
        "mccandlish": (1 + 400 / 16) / (1 + 400 / 400),
    }[rule]
    assert s.lr_factor == pytest.approx(expected, rel=1e-12)
    assert s.history[-1] == {"step": 1, "batch": 400, "lr_factor": s.lr_factor, "b_simple": 400.0}


def test_lr_reference_batch():
    s = make(lr_rule="linear", lr_reference_batch=64, max_factor=100.0)
    assert s.lr_factor == pytest.approx(16 / 64)
    s.update(stats(128.0))
    assert s.lr_factor == pytest.approx(2.0)
    assert lr_rule_factor("mccandlish", 1e9, 16, 400.0) == pytest.approx(1 + 400 / 16)  # saturates


def test_state_dict_round_trip():
    s = make(interval=3)
    for v in (100.0, 150.0, 300.0, 310.0, 600.0, 620.0, 900.0):
        s.update(stats(v))
    s.base_lrs = [0.1, 0.2]
    state = s.state_dict()
    fresh = make(interval=3)
    fresh.load_state_dict(torch.load(_saved(state), weights_only=True))
    assert fresh.state_dict() == state
    # the continuation is the same
    for v in (1000.0, 1000.0, 1000.0):
        assert s.update(stats(v)) == fresh.update(stats(v))
    assert fresh.state_dict() == s.state_dict()


def _saved(state):
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return buf


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"micro_batch_size": 0}, "micro_batch_size: 0; it must be an int >= 1"),
        ({"min_batch": 20}, r"min_batch: 20 is not a multiple of .* = 8; use 16 or 24"),
        ({"max_batch": 1000 + 4}, r"max_batch: 1004 .* use 1000 or 1008"),
        ({"min_batch": 64, "max_batch": 32}, "min_batch 64 > max_batch 32: swap them"),
        ({"data_parallel_size": 1, "min_batch": 4}, r"k = 1 .* use min_batch >= 8"),
        ({"initial_batch": 2048}, r"initial_batch 2048 is outside \[min_batch, max_batch\] = \[16, 1024\]"),
        ({"scale": 0}, "scale: 0; it must be a finite number > 0"),
        ({"interval": 0}, "interval: 0; it must be an int >= 1"),
        ({"max_factor": 1.0}, "max_factor: 1.0; it must be a finite number > 1"),
        ({"warmup_steps": -1}, "warmup_steps: -1; it must be an int >= 0"),
        ({"min_change": 1.5}, r"min_change: 1.5; it must be in \[0, 1\)"),
        ({"lr_rule": "cubic"}, "lr_rule: 'cubic'; choose one of 'mccandlish', 'sqrt', 'linear', 'none'"),
        ({"lr_reference_batch": 64}, "lr_rule 'mccandlish' needs lr_reference_batch == initial_batch"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(**kwargs)


def test_load_state_dict_refuses_what_does_not_fit():
    state = make(initial_batch=40).state_dict()
    with pytest.raises(ValueError, match="saved batch 40 does not fit"):
        make(data_parallel_size=4).load_state_dict(state)
    with pytest.raises(ValueError, match="Not a CriticalBatch state dict"):
        make().load_state_dict({"batch_size": 16})


# ---- the LR glue in plain PyTorch ---------------------------------------------------------------------
def _optimizer(lr=0.1):
    model = torch.nn.Linear(3, 2)
    return VRLamb([{"params": [model.weight]}, {"params": [model.bias], "lr": lr / 2}], lr=lr, vr=False)


@pytest.mark.parametrize("chainable", [False, True])
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_factor_survives_lr_scheduler_steps(chainable):
    """LambdaLR overwrites the group LR every step, ExponentialLR multiplies it: both end at the
    user's LR × the factor, and the factor never compounds."""
    opt = _optimizer()
    if chainable:
        inner = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
        user = [lambda t, lr=lr: lr * 0.9**t for lr in (0.1, 0.05)]
    else:
        inner = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
        user = [lambda t, lr=lr: lr / (1 + t) for lr in (0.1, 0.05)]
    s = make(lr_rule="linear", max_factor=100.0)
    scheduler = s.wrap_lr_scheduler(inner)
    assert isinstance(scheduler, ScaledLRScheduler)
    s.attach(opt)
    for t in range(1, 6):
        scheduler.step()
        if t == 2:
            assert s.step(opt, stats(64.0)) and s.lr_factor == pytest.approx(4.0)
        factor = 4.0 if t >= 2 else 1.0
        for group, lr in zip(opt.param_groups, user):
            assert group["lr"] == pytest.approx(lr(t) * factor, rel=1e-12)
    assert scheduler.get_last_lr() == [g["lr"] for g in opt.param_groups]
    assert scheduler.state_dict() == inner.state_dict()


def test_step_without_scheduler_rescales_once():
    opt = _optimizer()
    s = make(lr_rule="sqrt", max_factor=100.0)
    s.attach(opt)
    s.step(opt, stats(64.0))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.2, 0.1])
    s.step(opt, stats(256.0))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.4, 0.2])


def test_step_reads_the_optimizers_noise_stats():
    model = torch.nn.Linear(3, 1)
    opt = VRLamb(model.parameters(), lr=0.01, micro_batch_size=4)
    s = CriticalBatch(4, 8, 64, interval=1, warmup_steps=0, lr_rule="none", scale=50.0)
    g = torch.Generator().manual_seed(0)
    ks = []
    for _ in range(3):
        k = s.accumulation_steps
        for _ in range(k):
            x = torch.randn(4, 3, generator=g)
            (model(x).pow(2).mean() / k).backward()
        opt.step()
        opt.zero_grad()
        assert opt.noise_stats()["k"] == k
        ks.append(k)
        s.step(opt)
    assert s.steps == 3 and s.b_simple > 0 and len(set(ks)) > 1  # the batch changed
    with pytest.raises(ValueError, match="needs a vrgd_ds optimizer's noise_stats"):
        s.step(torch.optim.SGD(model.parameters(), lr=0.1))


class FakeEngine:
    """What the glue uses of a DeepSpeed engine (DeepSpeed 0.19.8's set_train_batch_size semantics)."""

    def __init__(self, micro=4, world=2, gas=2):
        self.micro, self.dp_world_size, self.gas, self.micro_steps = micro, world, gas, 0
        self.optimizer = _optimizer()
        self.lr_scheduler = None

    def train_micro_batch_size_per_gpu(self):
        return self.micro

    def gradient_accumulation_steps(self):
        return self.gas

    def train_batch_size(self):
        return self.micro * self.dp_world_size * self.gas

    def set_train_batch_size(self, batch):
        self.gas = batch // (self.micro * self.dp_world_size)


def test_engine_glue_realigns_and_refuses_mid_accumulation():
    from vrgd_ds.critical_batch import set_train_batch_size

    engine = FakeEngine()
    s = CriticalBatch.for_engine(engine, min_batch=16, max_batch=256, interval=1, warmup_steps=0, lr_rule="none")
    assert (s.batch_size, s.granule) == (16, 8)
    engine.micro_steps = 6  # 3 steps at gas 2
    assert s.step(engine, stats(32.0)) and engine.gas == 4 and engine.micro_steps == 8  # realigned
    engine.micro_steps = 9
    with pytest.raises(RuntimeError, match="1 micro-batch\\(es\\) into an accumulation of 4"):
        s.step(engine, stats(64.0))
    with pytest.raises(RuntimeError, match="change the batch only between optimizer steps"):
        set_train_batch_size(engine, 64)
    with pytest.raises(ValueError, match="build it with CriticalBatch.for_engine"):
        CriticalBatch(8, 16, 64).attach(engine)


# ---- under DeepSpeed (2 CPU ranks) ------------------------------------------------------------------
WORLD = 2
DS_CASES = [
    {"name": "zero0", "stage": 0, "raw_set_train_batch_size": True},
    {"name": "zero1", "stage": 1},
    {"name": "zero2", "stage": 2},
    {"name": "zero3", "stage": 3},
    {"name": "zero2_bf16", "stage": 2, "precision": "bf16"},
]
RTOL = {"fp32": 1e-6, "bf16": 1e-5}


@pytest.fixture(scope="module")
def ds_results(tmp_path_factory):
    pytest.importorskip("deepspeed")
    root = tmp_path_factory.mktemp("critical_ckpt")
    return run_ranks(run_critical_matrix, WORLD, DS_CASES, str(root), timeout=900, init="deepspeed")


def _close(a, b, rtol):
    return all(torch.allclose(x, y, rtol=rtol, atol=rtol * 1e-3) for x, y in zip(a, b))


@pytest.mark.parametrize("case", DS_CASES, ids=[c["name"] for c in DS_CASES])
def test_deepspeed_change_is_exact_and_resumable(ds_results, case):
    """After ``CriticalBatch.step`` grows the batch (gas 2 -> 4): k follows the new accumulation,
    and the update, the noise statistics and the LR equal those of an engine built at gas 4 that
    loads the same checkpoint (it never calls set_train_batch_size), and of a resumed engine
    built at gas 2 (load_checkpoint restores the batch). Both ranks agree."""
    rtol = RTOL[case.get("precision", "fp32")]
    rank0, rank1 = (r[case["name"]] for r in ds_results)
    changed = rank0["changed"]
    assert [s["gas"] for s in changed["steps"]] == [2] * CHANGE_AT + [4] * (STEPS - CHANGE_AT)
    assert [s["noise"]["k"] for s in changed["steps"]] == [4] * CHANGE_AT + [8] * (STEPS - CHANGE_AT)
    assert [s["changed"] for s in changed["steps"]] == [i + 1 == CHANGE_AT for i in range(STEPS)]
    assert changed["batch"] == SIGNAL_MICRO_BATCH * 4 * WORLD == changed["history"][-1]["batch"]
    after_change = changed["steps"][CHANGE_AT:]
    for other in ("native", "resumed"):
        steps = rank0[other]["steps"]
        assert [s["gas"] for s in steps] == [4] * (STEPS - CHANGE_AT), other
        for mine, theirs in zip(after_change, steps):
            assert _close(mine["after"], theirs["after"], rtol), other
            assert mine["lr"] == pytest.approx(theirs["lr"], rel=1e-12), other
            for key in ("k", "grad_norm_sq", "noise_trace", "b_simple", "b_simple_ema"):
                assert mine["noise"][key] == pytest.approx(theirs["noise"][key], rel=max(rtol, 1e-9)), (other, key)
    assert rank0["resumed"]["gas_after_load"] == 4
    assert rank0["resumed"]["history"] == changed["history"]
    for r0, r1 in zip(changed["steps"], rank1["changed"]["steps"]):
        assert r0["lr"] == r1["lr"] and r0["noise"]["k"] == r1["noise"]["k"]
        assert _close(r0["after"], r1["after"], 0.0)


@pytest.mark.parametrize("case", DS_CASES, ids=[c["name"] for c in DS_CASES])
def test_deepspeed_lr_factor_survives_the_scheduler(ds_results, case):
    """WarmupDecayLR rewrites the group LR every step; the LR in use is still DeepSpeed's own
    (an engine without the schedule) x the McCandlish factor (1 + B_s/B_0) / (1 + B_s/B_1),
    B_s the noise scale at the change."""
    result = ds_results[0][case["name"]]
    change = result["changed"]["history"][-1]
    b0, b1 = SIGNAL_MICRO_BATCH * 2 * WORLD, SIGNAL_MICRO_BATCH * 4 * WORLD
    factor = (1 + change["b_simple"] / b0) / (1 + change["b_simple"] / b1)
    assert change["lr_factor"] == pytest.approx(factor, rel=1e-12) and factor > 1.0
    for t, (mine, plain) in enumerate(zip(result["changed"]["steps"], result["plain"]["steps"])):
        expected = [lr * (factor if t >= CHANGE_AT else 1.0) for lr in plain["lr"]]
        assert mine["lr"] == pytest.approx(expected, rel=1e-12), t
        assert mine["group_lr"] == pytest.approx(expected, rel=1e-12), t
    assert any(s["lr"] != result["plain"]["steps"][0]["lr"] for s in result["plain"]["steps"])  # it moves


def test_deepspeed_raw_set_train_batch_size_misaligns(ds_results):
    """Why vrgd_ds.critical_batch.set_train_batch_size realigns DeepSpeed's micro-step counter:
    after 3 steps at gas 2 (6 micro-steps), engine.set_train_batch_size alone (gas 4) takes the
    next optimizer step after 2 micro-batches; realigned, 2 micro-batches are half a step."""
    result = ds_results[0]["zero0"]
    assert result["raw_global_steps"] == [1, 2, 3, 4]
    assert result["realigned_global_steps"] == [1, 2, 3, 3]


# ---- pretrain_bert.py --batch-schedule critical (2 ranks, end to end) ------------------------------
CRITICAL_ARGS = (
    "--batch-schedule",
    "critical",
    "--critical-interval",
    "2",
    "--critical-warmup",
    "2",
    "--critical-scale",
    "8",
    "--critical-max-batch",
    "256",
)


@pytest.fixture(scope="module")
def critical_bert(tmp_path_factory):
    from .test_pretrain_bert import run_args, torchrun

    cache = tmp_path_factory.mktemp("critical_cache")
    out = tmp_path_factory.mktemp("critical_bert")
    rc, output = torchrun(run_args(out, cache, *CRITICAL_ARGS))
    return out, cache, output


def test_pretrain_bert_grows_the_batch(critical_bert):
    """The batch grows from the config's 64 with B_simple (≈ 25-30 here, × scale 8), in whole
    micro-batch × rank units, at most ×2 per change; metrics.csv has batch, LR and B_simple."""
    from .test_pretrain_bert import read_metrics

    out, _, output = critical_bert
    assert "phase 1 step 2: batch 128" in output
    series = read_metrics(out / "metrics.csv")
    phase1 = [b for s, b in series["train/batch_size"] if s <= 8]
    assert phase1[0] == 64 and phase1[-1] > 128 and len(set(phase1)) >= 3
    assert all(b % 32 == 0 and b <= 256 for b in phase1)
    assert all(b2 <= 2 * b1 for b1, b2 in zip(phase1, phase1[1:]))
    assert {"train/lr", "noise/b_simple_ema"} <= series.keys()
    assert (out / "metrics.png").exists()


def test_pretrain_bert_critical_resumes_exactly(critical_bert, tmp_path):
    """Stop after step 5 (mid-schedule), resume: the same weights and metrics as the uninterrupted run
    (the batch, the LR factor, the schedule's history and the data position come back)."""
    from .test_pretrain_bert import assert_same_run, run_args, torchrun

    reference, cache, _ = critical_bert
    out = tmp_path / "resumed"
    rc, first = torchrun(run_args(out, cache, *CRITICAL_ARGS, "--stop-at-step", "5", "--no-plot"))
    assert "stopped after global step 5" in first
    rc, second = torchrun(run_args(out, cache, *CRITICAL_ARGS, "--resume", "--no-plot"))
    assert "resumed from checkpoint phase1-step000005" in second
    assert_same_run(reference, out)


def test_pretrain_bert_critical_option_errors(tmp_path, monkeypatch):
    from pretraining import InputError

    from .test_pretrain_bert import check

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(
        InputError,
        match=r"phase 1: Invalid max_batch: 250 is not a multiple .* use 224 or 256 \(--critical-max-batch\)",
    ):
        check(tmp_path, *CRITICAL_ARGS[:-1], "250")
    with pytest.raises(InputError, match="reads the noise scale of a vrgd_ds optimizer"):
        import json

        cfg = json.loads(open("configs/tiny_cpu_phase1.json").read())
        cfg["optimizer"]["type"] = "Adam"
        path = tmp_path / "adam.json"
        path.write_text(json.dumps(cfg))
        check(tmp_path, *CRITICAL_ARGS, phase1_config=path)
