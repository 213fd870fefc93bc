"""opt.noise_stats() through the optimizers in plain PyTorch (DeepSpeed paths, every stage and
precision: tests/test_update_matrix.py::test_noise_stats_match_reference)."""

from __future__ import annotations

import math

import pytest
import torch

import vrgd_ds

from .ddp_bodies import SAMPLES_PER_STEP, noise_stats_ddp
from .models import TinyNet, mb_loss, micro_batches
from .multiproc import run_ranks


def _single_process_stats():
    model = TinyNet(with_unused=False)
    opt = vrgd_ds.VRLamb(model.named_parameters(), lr=1e-2, micro_batch_size=4)
    for b in micro_batches(SAMPLES_PER_STEP):
        (mb_loss(model, b) / SAMPLES_PER_STEP).backward()
    opt.step()
    return opt.noise_stats()


@pytest.mark.parametrize("world", [2, 4])
def test_ddp_statistics_equal_single_process(world):
    """1 × 8 ≡ 2 × 4 ≡ 4 × 2: the statistics do not depend on how samples are spread."""
    expected = _single_process_stats()
    for rank, stats in enumerate(run_ranks(noise_stats_ddp, world, timeout=120)):
        assert stats["k"] == expected["k"] == SAMPLES_PER_STEP
        for key in ("grad_norm_sq", "noise_trace", "b_simple"):
            assert stats[key] == pytest.approx(expected[key], rel=1e-5), (rank, key)
        for name, entry in expected["per_tensor"].items():
            for key, value in entry.items():
                assert stats["per_tensor"][name][key] == pytest.approx(value, rel=1e-5, abs=1e-9), (rank, name, key)


def test_estimates_through_the_optimizer_are_unbiased():
    """Linear regression with lr = 0 (the parameters never move) over a fixed data set of 32
    examples, micro-batches of b = 2 drawn with replacement, k = 4 per step: the mean of the
    per-step |G|² and tr Σ lies within 4 standard errors of the exact values."""
    gen = torch.Generator().manual_seed(7)
    n, b, k, steps = 32, 2, 4, 1500
    x = torch.randn(n, 3, generator=gen)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3 + torch.randn(n, generator=gen)
    model = torch.nn.Linear(3, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.8, -1.6, 0.4]]))
        model.bias.zero_()
    opt = vrgd_ds.VRSGD(model.named_parameters(), lr=0.0, micro_batch_size=b)
    start = [p.detach().clone() for p in model.parameters()]
    # Exact: per-example gradients of ½(ŷ − y)², their mean G and covariance Σ (population).
    err = (x @ model.weight.detach().view(-1) + model.bias.detach() - y).double()
    per_example = torch.cat([err[:, None] * x.double(), err[:, None]], dim=1)
    mean = per_example.mean(0)
    true_g2 = (mean**2).sum().item()
    true_tr = ((per_example - mean) ** 2).sum(1).mean().item()
    g2, tr = [], []
    for _ in range(steps):
        for _ in range(k):
            idx = torch.randint(n, (b,), generator=gen)
            loss = 0.5 * ((model(x[idx]).view(-1) - y[idx]) ** 2).mean()
            (loss / k).backward()
        opt.step()
        opt.zero_grad()
        stats = opt.noise_stats()
        g2.append(stats["grad_norm_sq"])
        tr.append(stats["noise_trace"])
    for values, true in ((torch.tensor(g2), true_g2), (torch.tensor(tr), true_tr)):
        se = values.std().item() / math.sqrt(steps)
        assert abs(values.mean().item() - true) < 4 * se, (values.mean().item(), true, se)
        assert 4 * se < 0.25 * abs(true), "the test must be able to see a bias of 25 %"
    assert opt.noise_stats()["b_simple_ema"] == pytest.approx(true_tr / true_g2, rel=0.5)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), start)), "lr = 0 must not move anything"


def test_vr_false_with_gradient_stats_is_the_base_optimizer():
    def run(**kw):
        model = TinyNet(with_unused=False)
        opt = vrgd_ds.VRAdamW(model.named_parameters(), lr=1e-2, weight_decay=0.1, **kw)
        for b in micro_batches(SAMPLES_PER_STEP):
            (mb_loss(model, b) / SAMPLES_PER_STEP).backward()
        opt.step()
        return [p.detach().clone() for p in model.parameters()], opt.noise_stats()

    base, none = run(vr=False)
    stats_params, stats = run(vr=False, gradient_stats=True)
    assert none == {} and stats["k"] == SAMPLES_PER_STEP and stats["b_simple"] > 0
    assert all(torch.equal(a, c) for a, c in zip(base, stats_params))


def test_noise_ema_survives_state_dict():
    model = TinyNet(with_unused=False)
    opt = vrgd_ds.VRLamb(model.parameters(), lr=1e-2)
    for step in range(2):
        for b in micro_batches(SAMPLES_PER_STEP, seed=step):
            (mb_loss(model, b) / SAMPLES_PER_STEP).backward()
        opt.step()
        opt.zero_grad()
    other = vrgd_ds.VRLamb(TinyNet(with_unused=False).parameters(), lr=1e-2)
    other.load_state_dict(opt.state_dict())
    assert other.state_dict()["vrgd"]["noise_ema"] == opt.state_dict()["vrgd"]["noise_ema"]
    assert opt.state_dict()["vrgd"]["noise_ema"]["count"] == 2


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"gradient_stats": 1}, "gradient_stats"),
        ({"micro_batch_size": 0}, "micro_batch_size"),
        ({"noise_ema_decay": 1.0}, "decay"),
        ({"gsnr_estimator": "x"}, "gsnr_estimator"),
    ],
)
def test_statistics_options_are_validated(bad, match):
    with pytest.raises(ValueError, match=match):
        vrgd_ds.VRLamb(TinyNet().parameters(), **bad)


def test_deepspeed_csv_monitor_receives_the_statistics(tmp_path):
    """vrgd_ds.monitor.log_noise_stats(engine) into DeepSpeed's own CSV monitor, at global_samples."""
    from .ds_bodies import csv_monitor_case

    results = run_ranks(csv_monitor_case, 2, str(tmp_path), timeout=180, init="deepspeed")
    assert results[0]["global_samples"] == 2 * SAMPLES_PER_STEP * 4
    files = {p.name: p for p in tmp_path.rglob("*.csv")}
    name = next((n for n in files if "b_simple_ema" in n), None)
    assert name is not None, sorted(files)
    rows = [line.split(",") for line in files[name].read_text().splitlines()[1:]]
    assert [int(float(r[0])) for r in rows] == [SAMPLES_PER_STEP * 4, 2 * SAMPLES_PER_STEP * 4]
    assert all(math.isfinite(float(r[1])) and float(r[1]) > 0 for r in rows)
