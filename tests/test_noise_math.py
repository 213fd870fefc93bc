"""Gradient-noise statistics (VRGD.md §5; McCandlish et al. 2018, App. A.1): vrgd_ds.noise.

Exactness against brute-force per-micro-batch gradients, unit (scale) invariance, unbiasedness
on a finite linear-regression data set whose true G and Σ are known exactly, the unbiased GSNR
r̃ and its identity with the paper's r, the moving average, the stats dict and the summary line.
"""

from __future__ import annotations

import io
import json
import math

import pytest
import torch

from vrgd_ds.gsnr import gsnr_from_moments
from vrgd_ds.noise import (
    QUANTILES,
    NoiseScaleEMA,
    build_noise_stats,
    critical_batch_summary,
    noise_from_sums,
    sampled_quantiles,
    unbiased_from_paper_r,
    unbiased_gsnr,
)


# ---- helpers ---------------------------------------------------------------------------------
def _micro_batch_gradients(k: int, b: int, seed: int = 0):
    """k per-micro-batch gradients (float64) of a tiny MLP, by autograd: {name: (k, numel)}."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    samples = {n: [] for n in names}
    for _ in range(k):
        x = torch.randn(b, 3, generator=gen, dtype=torch.float64)
        y = torch.randn(b, 2, generator=gen, dtype=torch.float64)
        loss = torch.nn.functional.mse_loss(model(x), y)  # mean over the micro-batch
        for n, g in zip(names, torch.autograd.grad(loss, params), strict=True):
            samples[n].append(g.reshape(-1))
    return {n: torch.stack(v) for n, v in samples.items()}


def _moment_sums(samples: dict):
    """Per-tensor Σ_j S_j² and Σ_j Q_j from {name: (k, numel)} samples."""
    s2 = torch.stack([(g.sum(0) ** 2).sum() for g in samples.values()])
    q = torch.stack([(g**2).sum() for g in samples.values()])
    return s2, q


def _brute_force(g: torch.Tensor, b: int):
    """|mean|² − tr(C)/k and b·tr(C), C the unbiased sample covariance of the k rows of g."""
    k = g.shape[0]
    trace_c = torch.cov(g.T).diagonal().sum() if g.shape[1] > 1 else g[:, 0].var()
    mean = g.mean(0)
    return float(mean @ mean - trace_c / k), float(b * trace_c)


# ---- exactness -------------------------------------------------------------------------------
@pytest.mark.parametrize("k,b", [(2, 1), (4, 3), (8, 5)])
def test_noise_from_sums_equals_brute_force_per_tensor_and_global(k, b):
    samples = _micro_batch_gradients(k, b, seed=k)
    s2, q = _moment_sums(samples)
    est = noise_from_sums(s2, q, k, micro_batch_size=b)
    for t, g in enumerate(samples.values()):
        g_sq, tr = _brute_force(g, b)
        assert est["grad_norm_sq"][t].item() == pytest.approx(g_sq, rel=1e-9, abs=1e-15)
        assert est["noise_trace"][t].item() == pytest.approx(tr, rel=1e-9, abs=1e-15)
        assert est["b_simple"][t].item() == pytest.approx(tr / g_sq, rel=1e-8)
    whole = torch.cat(list(samples.values()), dim=1)
    g_sq, tr = _brute_force(whole, b)
    assert est["total_grad_norm_sq"].item() == pytest.approx(g_sq, rel=1e-9)
    assert est["total_noise_trace"].item() == pytest.approx(tr, rel=1e-9)
    assert est["total_b_simple"].item() == pytest.approx(tr / g_sq, rel=1e-8)
    assert est["grad_norm_sq"].dtype == torch.float64 and est["grad_norm_sq"].shape == (len(samples),)


def test_micro_batch_size_none_is_per_micro_batch():
    samples = _micro_batch_gradients(4, 6)
    s2, q = _moment_sums(samples)
    per_example = noise_from_sums(s2, q, 4, micro_batch_size=6)
    per_micro = noise_from_sums(s2, q, 4)
    torch.testing.assert_close(per_example["noise_trace"], 6 * per_micro["noise_trace"])
    torch.testing.assert_close(per_example["grad_norm_sq"], per_micro["grad_norm_sq"])
    assert per_example["total_b_simple"].item() == pytest.approx(6 * per_micro["total_b_simple"].item())


@pytest.mark.parametrize("c", [1024.0, 0.25, 1.0 / 3.0])
def test_scaled_samples_give_the_same_statistics(c):
    """Samples c·g (a loss scale, 1/gas, 1/world): ΣS² and ΣQ scale as c²; sample_scale=c undoes it."""
    samples = _micro_batch_gradients(4, 2)
    s2, q = _moment_sums(samples)
    scaled = {n: c * g for n, g in samples.items()}
    s2c, qc = _moment_sums(scaled)
    torch.testing.assert_close(s2c, c * c * s2)
    torch.testing.assert_close(qc, c * c * q)
    ref = noise_from_sums(s2, q, 4, 2)
    out = noise_from_sums(s2c, qc, 4, 2, sample_scale=c)
    divided = noise_from_sums(s2c / c**2, qc / c**2, 4, 2)
    for key in ("grad_norm_sq", "noise_trace", "b_simple", "total_grad_norm_sq", "total_noise_trace"):
        torch.testing.assert_close(out[key], ref[key], rtol=1e-12, atol=0)
        torch.testing.assert_close(divided[key], ref[key], rtol=1e-12, atol=0)
    # B_simple needs no unscaling at all.
    unscaled = noise_from_sums(s2c, qc, 4, 2)
    torch.testing.assert_close(unscaled["b_simple"], ref["b_simple"], rtol=1e-12, atol=0)


def test_noise_from_sums_validation_names_the_fix():
    with pytest.raises(ValueError, match="k >= 2.*gradient accumulation >= 2 or >= 2 data-parallel ranks"):
        noise_from_sums([1.0], [1.0], 1)
    with pytest.raises(ValueError, match="k >= 2"):
        noise_from_sums([1.0], [1.0], 2.0)
    with pytest.raises(ValueError, match="micro_batch_size"):
        noise_from_sums([1.0], [1.0], 2, micro_batch_size=0)
    with pytest.raises(ValueError, match="sample_scale"):
        noise_from_sums([1.0], [1.0], 2, sample_scale=0.0)
    with pytest.raises(ValueError, match="one entry per tensor"):
        noise_from_sums([1.0, 2.0], [1.0], 2)


def test_zero_gradient_tensor_gives_nan_ratio_not_inf():
    est = noise_from_sums(torch.tensor([0.0, 9.0]), torch.tensor([0.0, 5.0]), 2)
    assert est["grad_norm_sq"].tolist() == [0.0, 2.0]
    assert est["noise_trace"].tolist() == [0.0, 0.5]
    assert math.isnan(est["b_simple"][0].item()) and est["b_simple"][1].item() == 0.25
    assert est["total_b_simple"].item() == 0.25


# ---- unbiasedness ----------------------------------------------------------------------------
SEED = 1234


def _regression_problem():
    """Linear regression y ≈ X·w + c on N = 40 fixed examples, evaluated at fixed (w, c) (lr = 0):
    exact per-example gradients of ½(x·w + c − y)², their mean G and covariance Σ (population, 1/N:
    what i.i.d. draws with replacement from the data set have) per tensor."""
    gen = torch.Generator().manual_seed(SEED)
    n = 40
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    w_true = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    y = x @ w_true + 0.3 + torch.randn(n, generator=gen, dtype=torch.float64)
    w, c = 0.8 * w_true, 0.0  # near, not at, the optimum: the noise dominates (B_simple ≫ 1)
    err = x @ w + c - y
    per_example = torch.cat([err[:, None] * x, err[:, None]], dim=1)  # (n, 4): weight (3), bias (1)
    mean = per_example.mean(0)
    centred = per_example - mean
    split = {"weight": slice(0, 3), "bias": slice(3, 4)}
    truth = {
        name: ((mean[s] ** 2).sum().item(), (centred[:, s] ** 2).sum(1).mean().item()) for name, s in split.items()
    }
    return per_example, split, truth


@pytest.mark.parametrize("k,b", [(2, 1), (8, 4), (4, 16)])
def test_estimates_are_unbiased_on_a_finite_data_set(k, b):
    per_example, split, truth = _regression_problem()
    steps = 20000
    gen = torch.Generator().manual_seed(SEED + k * 100 + b)
    idx = torch.randint(per_example.shape[0], (steps, k, b), generator=gen)
    samples = per_example[idx].mean(2)  # (steps, k, 4): k i.i.d. micro-batch gradients per step
    s, q = samples.sum(1), (samples**2).sum(1)
    est_g, est_tr = {}, {}
    for name, sl in split.items():
        # one entry per step: noise_from_sums works entry by entry, so a vector of steps is fine
        est = noise_from_sums((s[:, sl] ** 2).sum(1), q[:, sl].sum(1), k, micro_batch_size=b)
        est_g[name], est_tr[name] = est["grad_norm_sq"], est["noise_trace"]
    est_g["global"] = est_g["weight"] + est_g["bias"]
    est_tr["global"] = est_tr["weight"] + est_tr["bias"]
    truth["global"] = (truth["weight"][0] + truth["bias"][0], truth["weight"][1] + truth["bias"][1])
    for name, (g_true, tr_true) in truth.items():
        for values, true in ((est_g[name], g_true), (est_tr[name], tr_true)):
            se = values.std().item() / math.sqrt(steps)
            assert abs(values.mean().item() - true) < 4 * se, (name, k, b, values.mean().item(), true, se)
            if name == "global":
                assert 4 * se < 0.2 * abs(true), "the test must be able to see a bias of 20 %"
    # The ratio of the averages estimates B_simple (consistent, not unbiased): close to the truth.
    b_true = truth["global"][1] / truth["global"][0]
    assert b_true > 5
    assert est_tr["global"].mean().item() / est_g["global"].mean().item() == pytest.approx(b_true, rel=0.1)


# ---- unbiased GSNR r̃ -------------------------------------------------------------------------
def _element_samples(k: int, n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    signal = torch.randn(n, generator=gen, dtype=torch.float64) * torch.logspace(-2, 0.5, n, dtype=torch.float64)
    return signal + torch.randn(k, n, generator=gen, dtype=torch.float64)


def test_unbiased_gsnr_matches_formula_and_identity_away_from_floor():
    k = 8
    g = _element_samples(k, 4096)
    s, q = g.sum(0), (g**2).sum(0)
    direct = (s**2 - q) / (k * q - s**2)  # float64
    away = (k * q - s**2) > 1e-3 * k * q  # away from the variance floor: there fp32 r̃ is accurate
    assert away.float().mean() > 0.99
    r_tilde = unbiased_gsnr(s.float(), q.float(), k)
    assert r_tilde.dtype == torch.float32
    torch.testing.assert_close(r_tilde.double()[away], direct[away], rtol=1e-4, atol=1e-6)
    r = gsnr_from_moments(s.float(), q.float(), k, 1e-6)
    torch.testing.assert_close(unbiased_from_paper_r(r, k), r_tilde, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(unbiased_from_paper_r(s**2 / (k * q - s**2), k), direct, rtol=1e-12, atol=1e-12)
    assert unbiased_from_paper_r(1.0, 3) == pytest.approx(1.0 / 3.0)


def test_unbiased_gsnr_conventions_at_zero_and_at_the_floor():
    k, eps = 4, 1e-6
    s = torch.tensor([0.0, 0.0, 4.0, 2.0])
    q = torch.tensor([0.0, 3.0, 4.0, 2.0])  # Q = 0 | S = 0 | all samples equal (1, 1, 1, 1) | S²=4, Q=2
    r_tilde = unbiased_gsnr(s, q, k, eps=eps)
    assert r_tilde[0].item() == 0.0  # no gradient: no signal
    assert r_tilde[1].item() == pytest.approx(-1.0 / k)  # (0 − Q)/(kQ − 0)
    cap = ((k - 1) * (1 - eps) / eps - 1) / k
    assert r_tilde[2].item() == pytest.approx(cap, rel=1e-5)  # kQ − S² = 0: r capped by the floor
    assert r_tilde[3].item() == pytest.approx((4 - 2) / (8 - 4))
    # in place in grad_sq_sum, as the optimizer would call it
    buf = q.clone()
    out = unbiased_gsnr(s, buf, k, eps=eps, out=buf)
    assert out is buf
    torch.testing.assert_close(buf, r_tilde)
    # sum_scale: grad_sum holds Σg / sum_scale (an averaged gradient)
    torch.testing.assert_close(unbiased_gsnr(s / 2, q, k, eps=eps, sum_scale=2.0), r_tilde)
    with pytest.raises(ValueError, match="gradient accumulation >= 2"):
        unbiased_gsnr(s, q, 1)
    with pytest.raises(ValueError, match="eps"):
        unbiased_gsnr(s, q, 2, eps=0.0)


def test_unbiased_gsnr_removes_the_k_dependent_floor_of_pure_noise():
    """G_j = 0, Gaussian noise: r = χ²₁/χ²_{k−1}, E r = 1/(k−3); E r̃ = 2/(k(k−3)) (VRGD.md §5)."""
    for k in (8, 16):
        gen = torch.Generator().manual_seed(SEED + k)
        g = torch.randn(k, 200_000, generator=gen)
        s, q = g.sum(0), (g**2).sum(0)
        r = gsnr_from_moments(s, q, k, 1e-6).double()
        r_tilde = unbiased_gsnr(s, q, k).double()
        for values, expected in ((r, 1.0 / (k - 3)), (r_tilde, 2.0 / (k * (k - 3)))):
            se = values.std().item() / math.sqrt(values.numel())
            assert abs(values.mean().item() - expected) < 5 * se, (k, values.mean().item(), expected)
        assert r_tilde.mean().item() < 0.4 * r.mean().item()


# ---- moving average --------------------------------------------------------------------------
def test_ema_recursion_bias_correction_and_ratio():
    ema = NoiseScaleEMA(decay=0.9)
    assert math.isnan(ema.b_simple) and math.isnan(ema.grad_norm_sq)
    assert ema.update(2.0, 10.0) == pytest.approx(5.0)
    assert ema.grad_norm_sq == pytest.approx(2.0) and ema.noise_trace == pytest.approx(10.0)  # bias-corrected
    g_values, tr_values = [2.0, 4.0, -1.0, 3.0], [10.0, 12.0, 8.0, 9.0]
    ema = NoiseScaleEMA(decay=0.9)
    m = n = 0.0
    for t, (g, tr) in enumerate(zip(g_values, tr_values, strict=True), start=1):
        m, n = 0.9 * m + 0.1 * g, 0.9 * n + 0.1 * tr
        out = ema.update(g, tr)
        assert out == pytest.approx(n / m)
        assert ema.grad_norm_sq == pytest.approx(m / (1 - 0.9**t))
        assert ema.noise_trace == pytest.approx(n / (1 - 0.9**t))
    assert ema.count == 4


def test_ema_decay_zero_is_the_last_step_and_constant_inputs_give_their_ratio():
    ema = NoiseScaleEMA(decay=0.0)
    ema.update(1.0, 100.0)
    assert ema.update(4.0, 8.0) == pytest.approx(2.0)
    ema = NoiseScaleEMA()
    assert ema.decay == 0.99
    for _ in range(50):
        out = ema.update(0.5, 3.0)
    assert out == pytest.approx(6.0) and ema.grad_norm_sq == pytest.approx(0.5)


def test_ema_ignores_non_finite_steps():
    ema = NoiseScaleEMA(decay=0.5)
    ema.update(1.0, 4.0)
    before = ema.state_dict()
    assert ema.update(float("nan"), 1.0) == pytest.approx(4.0)
    assert ema.update(1.0, float("inf")) == pytest.approx(4.0)
    assert ema.state_dict() == before


def test_ema_state_dict_round_trip_through_torch_save_and_json():
    ema = NoiseScaleEMA(decay=0.95)
    for g, tr in ((1.0, 3.0), (2.0, 5.0), (1.5, 7.0)):
        ema.update(g, tr)
    buf = io.BytesIO()
    torch.save({"ema": ema.state_dict()}, buf)
    buf.seek(0)
    loaded = NoiseScaleEMA(decay=0.95)
    loaded.load_state_dict(torch.load(buf, weights_only=True)["ema"])
    assert loaded.state_dict() == ema.state_dict()
    again = NoiseScaleEMA(decay=0.95)
    again.load_state_dict(json.loads(json.dumps(ema.state_dict())))
    assert again.update(2.0, 4.0) == pytest.approx(ema.update(2.0, 4.0))
    assert again.count == ema.count == 4
    with pytest.raises(ValueError, match="missing"):
        again.load_state_dict({"decay": 0.9})


@pytest.mark.parametrize("decay", [1.0, -0.1, float("nan"), True, "0.9"])
def test_ema_invalid_decay(decay):
    with pytest.raises(ValueError, match=r"decay.*\[0, 1\)"):
        NoiseScaleEMA(decay)


# ---- the stats dict --------------------------------------------------------------------------
def test_build_noise_stats_structure_and_values():
    samples = _micro_batch_gradients(4, 2)
    names = list(samples)
    s2, q = _moment_sums(samples)
    ema = NoiseScaleEMA()
    stats = build_noise_stats(names, s2.float(), q.float(), 4, 2, ema)
    assert set(stats) == {
        "k",
        "micro_batch_size",
        "grad_norm_sq",
        "noise_trace",
        "b_simple",
        "b_simple_ema",
        "per_tensor",
    }
    assert stats["k"] == 4 and stats["micro_batch_size"] == 2
    assert list(stats["per_tensor"]) == names
    est = noise_from_sums(s2, q, 4, 2)
    assert stats["grad_norm_sq"] == pytest.approx(est["total_grad_norm_sq"].item(), rel=1e-5)
    assert stats["noise_trace"] == pytest.approx(est["total_noise_trace"].item(), rel=1e-5)
    assert stats["b_simple"] == pytest.approx(stats["noise_trace"] / stats["grad_norm_sq"])
    assert stats["b_simple_ema"] == pytest.approx(stats["b_simple"]) and ema.count == 1
    for t, name in enumerate(names):
        entry = stats["per_tensor"][name]
        assert set(entry) == {"grad_norm_sq", "noise_trace", "b_simple"}
        assert all(type(v) is float for v in entry.values())
        assert entry["grad_norm_sq"] == pytest.approx(est["grad_norm_sq"][t].item(), rel=1e-5)
    assert sum(e["grad_norm_sq"] for e in stats["per_tensor"].values()) == pytest.approx(stats["grad_norm_sq"])
    assert all(type(stats[key]) is float for key in ("grad_norm_sq", "noise_trace", "b_simple", "b_simple_ema"))
    json.dumps(stats)  # plain python values only
    assert build_noise_stats(names, s2, q, 4, None, None)["b_simple_ema"] is None


def test_build_noise_stats_unbiased_gsnr_entries_and_errors():
    names = ["a", "b"]
    values = torch.linspace(-0.1, 2.0, 1001)
    stats = build_noise_stats(
        names,
        [9.0, 4.0],
        [5.0, 3.0],
        2,
        None,
        None,
        gsnr_unbiased_mean=[0.5, 1.5],
        gsnr_unbiased_quantiles={"a": sampled_quantiles(values)},
        numels=[3, 1],
    )
    assert stats["gsnr_unbiased_mean"] == pytest.approx((3 * 0.5 + 1.5) / 4)
    a, b = stats["per_tensor"]["a"], stats["per_tensor"]["b"]
    assert a["gsnr_unbiased_mean"] == 0.5 and b["gsnr_unbiased_mean"] == 1.5
    assert [a["gsnr_unbiased_q10"], a["gsnr_unbiased_q50"], a["gsnr_unbiased_q90"]] == pytest.approx([0.11, 0.95, 1.79])
    assert "gsnr_unbiased_q50" not in b
    with pytest.raises(ValueError, match="one name per"):
        build_noise_stats(["a"], [9.0, 4.0], [5.0, 3.0], 2, None, None)
    with pytest.raises(ValueError, match="gsnr_unbiased_mean has 1 entries"):
        build_noise_stats(names, [9.0, 4.0], [5.0, 3.0], 2, None, None, gsnr_unbiased_mean=[0.5])
    with pytest.raises(ValueError, match="one per quantile"):
        build_noise_stats(names, [9.0, 4.0], [5.0, 3.0], 2, None, None, gsnr_unbiased_quantiles={"a": [0.0]})


def test_sampled_quantiles():
    values = torch.arange(11, dtype=torch.float32)
    assert sampled_quantiles(values) == pytest.approx([1.0, 5.0, 9.0])
    big = torch.rand(300_000, generator=torch.Generator().manual_seed(0))
    assert sampled_quantiles(big) == pytest.approx(list(QUANTILES), abs=0.01)
    assert all(math.isnan(v) for v in sampled_quantiles(torch.empty(0)))


# ---- summary line ----------------------------------------------------------------------------
def test_critical_batch_summary_numbers():
    line = critical_batch_summary(65536, 8192.0)
    # x = (1 + B/Bs)/2 = 4.5 examples, y = (1 + Bs/B)/2 = 0.5625 steps, relative to B = Bs
    assert line.startswith("batch B = 65,536, critical batch ≈ 8,192: this run uses ≈ 4.5× the examples")
    assert "a batch at the critical size would need" in line and "0.562× its steps" in line
    assert "≈ 1× the examples" in critical_batch_summary(1000, 1000.0)
    assert "≈ 0.55× the examples" in critical_batch_summary(100, 1000.0)
    assert "5.5× its steps" in critical_batch_summary(100, 1000.0)


@pytest.mark.parametrize("b_simple", [float("nan"), -50.0, 0.0, float("inf"), None])
def test_critical_batch_summary_unusable_estimate(b_simple):
    line = critical_batch_summary(32768, b_simple)
    assert line.startswith("batch B = 32,768, critical batch not estimated")
    assert "b_simple_ema" in line and "×" not in line


def test_critical_batch_summary_invalid_batch():
    with pytest.raises(ValueError, match="batch_size"):
        critical_batch_summary(0, 100.0)
