"""Gradient-noise statistics from the moments VRGD already collects (VRGD.md §5).

A VRGD step sees k gradient samples g_1..g_k of every parameter tensor, all taken at the same
parameters — each the gradient of the mean loss over one micro-batch of b examples — and forms,
per element j, S_j = Σ_i g_i,j and Q_j = Σ_i g_i,j². With E g_i = G (the true gradient) and
Cov g_i = Σ/b (Σ: the per-example gradient covariance), the sums over elements give unbiased
estimates of |G|² and tr Σ (McCandlish et al. 2018, "An Empirical Model of Large-Batch
Training", arXiv 1812.06162, App. A.1), hence the *simple noise scale* B_simple = tr Σ / |G|²,
an estimate of the critical batch size.

Everything here is pure: functions of per-tensor sums (or element-wise moments) on plain
tensors, plus :class:`NoiseScaleEMA`, the one piece of state. The optimizer completes the
per-tensor sums across ranks and calls :func:`build_noise_stats` once per step.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .gsnr import gsnr_from_moments

__all__ = [
    "QUANTILES",
    "NoiseScaleEMA",
    "build_noise_stats",
    "critical_batch_summary",
    "noise_from_sums",
    "sampled_quantiles",
    "unbiased_from_paper_r",
    "unbiased_gsnr",
]

#: Quantiles reported for per-tensor distributions (the same as :meth:`VROptimizer.gsnr_stats`).
QUANTILES = (0.1, 0.5, 0.9)
#: At most this many elements of a tensor enter a quantile (a strided sample beyond it).
QUANTILE_SAMPLE = 65536

_K_FIX = (
    "use gradient accumulation >= 2 or >= 2 data-parallel ranks "
    "(k = ranks x accumulation steps is the number of gradient samples per step)"
)


def _check_k(k) -> int:
    given = k
    try:
        k = operator.index(k) if not isinstance(k, bool) else None
    except TypeError:
        k = None
    if k is None or k < 2:
        raise ValueError(
            f"Invalid number of gradient samples k = {given!r}: gradient-noise statistics need an int "
            f"k >= 2 per step; {_K_FIX}."
        )
    return k


def _check_micro_batch_size(micro_batch_size) -> None:
    if micro_batch_size is None:
        return
    if isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int) or micro_batch_size < 1:
        raise ValueError(
            f"Invalid micro_batch_size: {micro_batch_size!r}; it must be an int >= 1 (examples per "
            "gradient sample, e.g. DeepSpeed's train_micro_batch_size_per_gpu) or None (then "
            "noise_trace is per micro-batch, not per example)."
        )


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """num / den, NaN where den == 0 (an undefined ratio, never ±inf)."""
    return torch.where(den != 0, num / torch.where(den != 0, den, torch.ones_like(den)), torch.full_like(num, math.nan))


def noise_from_sums(
    sum_s2, sum_q, k: int, micro_batch_size: int | None = None, sample_scale: float = 1.0
) -> dict[str, Tensor]:
    r"""Unbiased |G|², tr Σ and B_simple per tensor and in total (VRGD.md §5; McCandlish App. A.1).

    For each parameter tensor t, from :math:`A_t = \sum_{j\in t} S_j^2` and
    :math:`B_t = \sum_{j\in t} Q_j` (``sum_s2``, ``sum_q``) with
    :math:`S_j = \sum_{i=1}^k g_{i,j}`, :math:`Q_j = \sum_{i=1}^k g_{i,j}^2`:

    .. math::
        |G_t|^2 \approx \frac{A_t - B_t}{k(k-1)},\qquad
        \operatorname{tr}\Sigma_t \approx b\,\frac{k B_t - A_t}{k(k-1)},\qquad
        B_{\text{simple},t} = \frac{\operatorname{tr}\Sigma_t}{|G_t|^2}.

    Both estimates are unbiased when the k samples are independent draws at the same parameters
    (|mean|² minus the sample covariance's trace over k, and b times that trace); the ratio is
    not, and one step's ratio is noisy and may be negative (average over steps:
    :class:`NoiseScaleEMA`). The totals are the sums over tensors of the per-tensor estimates
    (the same estimators applied to the whole model), then their ratio.

    **Units.** The estimates are in the units of the samples. They must be the units of the
    gradient of the user's loss (the mean loss over one micro-batch): if each sample passed in
    is c × that gradient (a loss scale, 1/gradient_accumulation, 1/world size, ...), S scales
    as c and Q as c², so both sums scale as c²: pass ``sample_scale=c`` (the sums are divided
    by c²) or divide them yourself. B_simple does not depend on c; |G|² and tr Σ do.

    Args:
        sum_s2: Σ_j S_j² per tensor (a 1-D tensor or sequence of floats; one entry per tensor).
        sum_q: Σ_j Q_j per tensor (same length).
        k: number of gradient samples this step (ranks × accumulation steps), ≥ 2.
        micro_batch_size: b, examples per sample; ``None``: b = 1, i.e. ``noise_trace`` is the
            noise of one micro-batch and ``b_simple`` is in micro-batches, not examples.
        sample_scale: c, as above (default 1).
    Returns:
        ``{"grad_norm_sq", "noise_trace", "b_simple"}``: per-tensor 1-D float64 CPU tensors, and
        ``{"total_grad_norm_sq", "total_noise_trace", "total_b_simple"}``: 0-d float64 CPU
        tensors. A ratio whose denominator is exactly 0 is NaN.
    Raises:
        ValueError: k < 2, a bad micro_batch_size or sample_scale, or sums of different shapes.
    """
    k = _check_k(k)
    _check_micro_batch_size(micro_batch_size)
    if not (isinstance(sample_scale, (int, float)) and math.isfinite(sample_scale) and sample_scale > 0):
        raise ValueError(
            f"Invalid sample_scale: {sample_scale!r}; it must be a finite number > 0 (each sample "
            "= sample_scale x the gradient of the user's loss)."
        )
    # Per-tensor vectors are tiny; float64 on the CPU keeps A − B exact enough and works on any device.
    a = torch.as_tensor(sum_s2).detach().to("cpu", torch.float64).reshape(-1)
    q = torch.as_tensor(sum_q).detach().to("cpu", torch.float64).reshape(-1)
    if a.shape != q.shape:
        raise ValueError(
            f"sum_s2 and sum_q must have one entry per tensor each; got {tuple(a.shape)} and {tuple(q.shape)}."
        )
    if sample_scale != 1.0:
        a = a / (sample_scale * sample_scale)
        q = q / (sample_scale * sample_scale)
    b = 1 if micro_batch_size is None else micro_batch_size
    denom = float(k * (k - 1))
    grad_norm_sq = (a - q) / denom
    noise_trace = (k * q - a) * (b / denom)
    total_g = grad_norm_sq.sum()
    total_tr = noise_trace.sum()
    return {
        "grad_norm_sq": grad_norm_sq,
        "noise_trace": noise_trace,
        "b_simple": _ratio(noise_trace, grad_norm_sq),
        "total_grad_norm_sq": total_g,
        "total_noise_trace": total_tr,
        "total_b_simple": _ratio(total_tr, total_g),
    }


def unbiased_from_paper_r(r, k: int):
    r"""The unbiased per-element SNR from the paper's r (VRGD.md §5):
    :math:`\tilde r = ((k-1)\,r - 1)/k`.

    Exact where r = S²/(kQ − S²) (the raw r of :func:`~vrgd_ds.gsnr.gsnr_from_moments` where its
    variance floor is not active): then r̃ = (S² − Q)/(kQ − S²). Works on tensors and floats.
    """
    _check_k(k)
    return ((k - 1) * r - 1) / k


def unbiased_gsnr(
    grad_sum: Tensor, grad_sq_sum: Tensor, k: int, eps: float = 1e-6, sum_scale: float = 1.0, out: Tensor | None = None
) -> Tensor:
    r"""Element-wise unbiased signal-to-noise ratio r̃ from k gradient samples (VRGD.md §5).

    .. math::
        \tilde r_j = \frac{S_j^2 - Q_j}{k Q_j - S_j^2}
                   = \frac{(k-1)\, r_j - 1}{k},\qquad
        r_j = \frac{S_j^2}{k Q_j - S_j^2} = \frac{\mu_j^2}{\sigma_j^2}\ \text{(paper eq. 2, 7)}.

    S² − Q and kQ − S² are k(k−1)·(unbiased μ²) and k(k−1)·(unbiased σ²), so r̃ estimates
    μ²/σ² with the k-dependent floor of r removed to first order: for an element with no signal
    and Gaussian noise, E r = 1/(k−3) while E r̃ = 2/(k(k−3)). r̃ can be negative (down to −1/k,
    where S = 0): it is an estimate, not a clipped quantity — clamp it before using it as a scale.

    Computed as ((k−1)·r − 1)/k from r = :func:`~vrgd_ds.gsnr.gsnr_from_moments` (in place in
    ``out``, no full-size temporary but a bool mask), so it shares r's conventions:

    * **Floor** (kQ − S² ≈ 0, all samples nearly equal): r is capped by the relative variance
      floor ``eps`` at (1 − eps)/eps, so r̃ ≤ ((k−1)(1−eps)/eps − 1)/k ≈ (k−1)/(k·eps); it
      equals the exact formula wherever kQ − S² > eps·kQ (up to fp32 rounding).
    * **Q = 0** (every sample zero: the element got no gradient): r̃ = 0 — no signal and no
      noise counts as no signal. (The identity would give −1/k there.)
    * A non-finite sample gives a non-finite r̃.

    Args:
        grad_sum: Σ_i g_i (any shape), or Σ_i g_i / ``sum_scale``.
        grad_sq_sum: Σ_i g_i² (same shape).
        k: the number of gradient samples summed, ≥ 2.
        eps: relative variance floor, 0 < eps < 1 (the optimizer's ``gsnr_eps``; default 1e-6).
        sum_scale: Σ_i g_i = sum_scale · grad_sum (as in ``gsnr_from_moments``).
        out: fp32 tensor for the result; may be ``grad_sq_sum`` itself (then it is consumed).
    Returns:
        r̃ in fp32, the shape of the inputs (``out`` when given).
    """
    _check_k(k)
    if not 0.0 < eps < 1.0:
        raise ValueError(f"Invalid eps: {eps!r}; the relative variance floor must be in (0, 1), e.g. 1e-6.")
    no_gradient = grad_sq_sum == 0
    r = gsnr_from_moments(grad_sum, grad_sq_sum, k, eps, sum_scale=sum_scale, out=out)
    return r.mul_((k - 1) / k).sub_(1.0 / k).masked_fill_(no_gradient.reshape(r.shape), 0.0)


def sampled_quantiles(
    values: Tensor, quantiles: Sequence[float] = QUANTILES, max_samples: int = QUANTILE_SAMPLE
) -> list[float]:
    """Quantiles of ``values`` (flattened), on a strided sample of at most ``max_samples``
    elements (the sampling :meth:`VROptimizer.gsnr_stats` uses); NaN for an empty tensor."""
    flat = values.detach().reshape(-1).float()
    if flat.numel() == 0:
        return [math.nan] * len(quantiles)
    if flat.numel() > max_samples:
        flat = flat[:: flat.numel() // max_samples + 1]
    qs = torch.quantile(flat, torch.tensor(list(quantiles), dtype=flat.dtype, device=flat.device))
    return [float(v) for v in qs.tolist()]


class NoiseScaleEMA:
    r"""Exponential moving averages of |G|² and tr Σ, and B_simple as their ratio (VRGD.md §5).

    .. math::
        m_t = \beta m_{t-1} + (1-\beta)\,|G|^2_t,\quad
        n_t = \beta n_{t-1} + (1-\beta)\,\operatorname{tr}\Sigma_t,\quad
        w_t = \beta w_{t-1} + (1-\beta),\qquad
        B_{\text{simple}}^{\text{ema}} = \frac{n_t / w_t}{m_t / w_t} = \frac{n_t}{m_t}

    with m_0 = n_0 = w_0 = 0. The averages are bias-corrected (÷ w_t = 1 − β^t for a constant
    β, as Adam's moments): :attr:`grad_norm_sq` and :attr:`noise_trace` are meaningful from the
    first update on. The correction cancels in the ratio, so B_simple_ema is the same either way.
    The ratio of averages is what public implementations report (GPT-NeoX, k-diffusion): the
    per-step ratio is biased and heavy-tailed (its denominator can be near 0 or negative).

    Default β = 0.99, an average over ≈ 1/(1−β) = 100 steps, as GPT-NeoX's noise-scale logger:
    the paper's large-batch runs take only ~4k–30k steps (BERT at 128k–16k batch), so the
    window must be short against a run, while one step's estimate is noisy where
    B_simple ≫ k·b. (k-diffusion's 0.9998 suits 10⁵–10⁶ small-batch steps.)

    Skipped steps (fp16 overflow): do not call :meth:`update`. A non-finite input is ignored
    (the averages are left as they were) so that one bad step cannot poison the average.

    Args:
        decay: β in [0, 1) (default: 0.99). β = 0 reports the last step's ratio.
    """

    def __init__(self, decay: float = 0.99):
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
            raise ValueError(
                f"Invalid noise-scale EMA decay: {decay!r}; it must be in [0, 1) (0.99 averages over about 100 steps)."
            )
        self.decay = float(decay)
        self._grad_norm_sq = 0.0
        self._noise_trace = 0.0
        self._weight = 0.0
        self.count = 0

    def update(self, grad_norm_sq: float, noise_trace: float) -> float:
        """Add one step's global estimates of |G|² and tr Σ; returns :attr:`b_simple`."""
        g, n = float(grad_norm_sq), float(noise_trace)
        if math.isfinite(g) and math.isfinite(n):
            beta = self.decay
            self._grad_norm_sq = beta * self._grad_norm_sq + (1.0 - beta) * g
            self._noise_trace = beta * self._noise_trace + (1.0 - beta) * n
            self._weight = beta * self._weight + (1.0 - beta)
            self.count += 1
        return self.b_simple

    @property
    def grad_norm_sq(self) -> float:
        """Bias-corrected average of |G|² (NaN before the first update)."""
        return self._grad_norm_sq / self._weight if self._weight > 0 else math.nan

    @property
    def noise_trace(self) -> float:
        """Bias-corrected average of tr Σ (NaN before the first update)."""
        return self._noise_trace / self._weight if self._weight > 0 else math.nan

    @property
    def b_simple(self) -> float:
        """avg(tr Σ) / avg(|G|²); NaN before the first update or where avg(|G|²) = 0."""
        return self._noise_trace / self._grad_norm_sq if self._weight > 0 and self._grad_norm_sq != 0 else math.nan

    def state_dict(self) -> dict:
        """Plain floats (``torch.save``/JSON friendly)."""
        return {
            "decay": self.decay,
            "grad_norm_sq_sum": self._grad_norm_sq,
            "noise_trace_sum": self._noise_trace,
            "weight": self._weight,
            "count": self.count,
        }

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Restore the averages. The decay stays the one this object was built with (the current
        configuration wins on resume); the bias correction stays exact, since it tracks the
        accumulated weight itself rather than β^t."""
        missing = {"grad_norm_sq_sum", "noise_trace_sum", "weight", "count"} - set(state_dict)
        if missing:
            raise ValueError(f"Not a NoiseScaleEMA state dict: missing {sorted(missing)}.")
        self._grad_norm_sq = float(state_dict["grad_norm_sq_sum"])
        self._noise_trace = float(state_dict["noise_trace_sum"])
        self._weight = float(state_dict["weight"])
        self.count = int(state_dict["count"])


def build_noise_stats(
    names: Sequence[str],
    per_tensor_s2,
    per_tensor_q,
    k: int,
    micro_batch_size: int | None,
    ema: NoiseScaleEMA | None,
    sample_scale: float = 1.0,
    gsnr_unbiased_mean=None,
    gsnr_unbiased_quantiles: Mapping[str, Sequence[float]] | None = None,
    numels=None,
) -> dict:
    r"""The dict ``opt.noise_stats()`` returns, from one step's per-tensor sums (all python floats).

    Applies :func:`noise_from_sums` (see it for the formulas and the units: ``per_tensor_s2`` =
    Σ_j S_j², ``per_tensor_q`` = Σ_j Q_j per tensor, completed across ranks, in units of the
    gradient of the user's loss or with ``sample_scale``) and, when ``ema`` is given, updates it
    with the global estimates — call this once per *applied* step (not on overflow-skipped ones).

    Returns::

        {"k": k, "micro_batch_size": b or None,
         "grad_norm_sq": |G|², "noise_trace": tr Σ, "b_simple": tr Σ / |G|² (this step),
         "b_simple_ema": ema ratio (None without ema),
         "gsnr_unbiased_mean": element-weighted mean of r̃ over all tensors (only with numels and
                               gsnr_unbiased_mean),
         "per_tensor": {name: {"grad_norm_sq", "noise_trace", "b_simple",
                               "gsnr_unbiased_mean" (with gsnr_unbiased_mean),
                               "gsnr_unbiased_q10", "_q50", "_q90" (where quantiles are given)}}}

    Args:
        names: tensor names, in the order of the per-tensor vectors.
        per_tensor_s2, per_tensor_q: Σ_j S_j² and Σ_j Q_j per tensor (1-D, len(names)).
        k, micro_batch_size, sample_scale: as in :func:`noise_from_sums`.
        ema: the optimizer's :class:`NoiseScaleEMA`, updated here; or None.
        gsnr_unbiased_mean: optional per-tensor mean of r̃ (:func:`unbiased_gsnr`), len(names).
        gsnr_unbiased_quantiles: optional {name: values at :data:`QUANTILES`}
            (:func:`sampled_quantiles`), for the tensors where they are available.
        numels: optional elements per tensor, to weight the global mean of r̃.
    """
    names = list(names)
    est = noise_from_sums(per_tensor_s2, per_tensor_q, k, micro_batch_size, sample_scale)
    if est["grad_norm_sq"].numel() != len(names):
        raise ValueError(
            f"{len(names)} names for {est['grad_norm_sq'].numel()} per-tensor sums: pass one name per "
            "entry of per_tensor_s2 / per_tensor_q."
        )
    means = None
    if gsnr_unbiased_mean is not None:
        means = torch.as_tensor(gsnr_unbiased_mean).detach().to("cpu", torch.float64).reshape(-1)
        if means.numel() != len(names):
            raise ValueError(f"gsnr_unbiased_mean has {means.numel()} entries for {len(names)} tensors.")
    g_total = float(est["total_grad_norm_sq"])
    tr_total = float(est["total_noise_trace"])
    stats = {
        "k": k,
        "micro_batch_size": micro_batch_size,
        "grad_norm_sq": g_total,
        "noise_trace": tr_total,
        "b_simple": float(est["total_b_simple"]),
        "b_simple_ema": ema.update(g_total, tr_total) if ema is not None else None,
    }
    if means is not None and numels is not None:
        weights = torch.as_tensor(numels).detach().to("cpu", torch.float64).reshape(-1)
        if weights.numel() != len(names):
            raise ValueError(f"numels has {weights.numel()} entries for {len(names)} tensors.")
        stats["gsnr_unbiased_mean"] = float((means * weights).sum() / weights.sum())
    per_tensor = {}
    # One conversion per vector, not one scalar read per tensor.
    g, tr, bs = (est[key].tolist() for key in ("grad_norm_sq", "noise_trace", "b_simple"))
    mean_values = means.tolist() if means is not None else None
    for t, name in enumerate(names):
        entry = {"grad_norm_sq": g[t], "noise_trace": tr[t], "b_simple": bs[t]}
        if mean_values is not None:
            entry["gsnr_unbiased_mean"] = mean_values[t]
        if gsnr_unbiased_quantiles is not None and name in gsnr_unbiased_quantiles:
            values = list(gsnr_unbiased_quantiles[name])
            if len(values) != len(QUANTILES):
                raise ValueError(
                    f"gsnr_unbiased_quantiles[{name!r}] has {len(values)} values; expected one per "
                    f"quantile {QUANTILES}."
                )
            for q, v in zip(QUANTILES, values, strict=True):
                entry[f"gsnr_unbiased_q{round(q * 100)}"] = float(v)
        per_tensor[name] = entry
    stats["per_tensor"] = per_tensor
    return stats


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def critical_batch_summary(batch_size: float, b_simple: float) -> str:
    r"""One line comparing the batch size with the critical batch size ≈ B_simple (VRGD.md §5).

    McCandlish et al.'s model: reaching a given loss takes S = S_min(1 + B_simple/B) steps and
    E = E_min(1 + B/B_simple) examples at batch B. The line reports

    .. math::
        x = \frac{E(B)}{E(B_\text{simple})} = \frac{1 + B/B_\text{simple}}{2},\qquad
        y = \frac{S(B)}{S(B_\text{simple})} = \frac{1 + B_\text{simple}/B}{2},

    the examples and steps this run needs relative to a run at the critical batch (which itself
    needs 2·E_min examples and 2·S_min steps). x > 1: the batch is above the critical size, each
    example buys less progress; x < 1 (y > 1): below it, steps are wasted.

    Args:
        batch_size: B, examples per optimizer step (all ranks and accumulation steps).
        b_simple: the (averaged) simple noise scale in examples, e.g. ``b_simple_ema``.
    Returns:
        "batch B = 65,536, critical batch ≈ 8,000: this run uses ≈ 4.6× the examples a batch at
        the critical size would need (≈ 0.56× its steps)", or, where b_simple is NaN, infinite or
        ≤ 0, a line saying the critical batch is not estimated and why.
    """
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, (int, float))
        or not (math.isfinite(batch_size) and batch_size > 0)
    ):
        raise ValueError(f"Invalid batch_size: {batch_size!r}; it must be the examples per optimizer step (> 0).")
    head = f"batch B = {_fmt(batch_size)}"
    try:
        bs = float(b_simple)
    except (TypeError, ValueError):
        bs = math.nan
    if not math.isfinite(bs) or bs <= 0:
        return (
            f"{head}, critical batch not estimated: B_simple = {bs:.3g} is not a positive number — the "
            "gradient-noise estimate is too noisy (too few samples per step k, or too few steps averaged) "
            "or the gradient signal is below the noise; average over more steps (b_simple_ema)."
        )
    x = (1.0 + batch_size / bs) / 2.0
    y = (1.0 + bs / batch_size) / 2.0
    return (
        f"{head}, critical batch ≈ {_fmt(bs)}: this run uses ≈ {x:.3g}× the examples a batch at the "
        f"critical size would need (≈ {y:.3g}× its steps)"
    )
