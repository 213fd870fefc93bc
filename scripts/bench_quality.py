"""Large-batch quality benchmark: base vs VR optimizers (arXiv 2309.13681, VRGD.md §4).

The paper's sharpest claim is that at large batch the plain optimizers degrade or collapse while
their VR versions keep accuracy and shrink the generalization gap. This script measures that on
Fashion-MNIST with a small MLP on CPU, and runs the paper's γ ablation on linear regression.

    # everything that goes into docs/results_quality.md (~40 min on one core, + ~25 for critical)
    nice -n 10 python scripts/bench_quality.py --runs runs/quality.jsonl \\
        --report runs/quality_report.md --json runs/quality.json --plot docs/quality_accuracy_vs_batch.png
    # the critical batch: B_simple along training, B / B_simple per batch, VR − base against it
    nice -n 10 python scripts/bench_quality.py --experiment critical --json runs/critical.json
    # the LR tuning at batch 256 whose result is LR_256 below
    python scripts/bench_quality.py --experiment tune
    # the γ ablation alone (seconds)
    python scripts/bench_quality.py --experiment gamma
    # smoke run (< 2 min on 2 cores; CI runs it on a synthetic idx data set)
    python scripts/bench_quality.py --quick --data DIR

Protocol (every step of every cell, base and VR alike):
  * a step of batch B is k = 8 micro-batches of B/8, each ``(loss / k).backward()``, then one
    ``step()``; VR computes the GSNR over those k micro-batch gradients;
  * equal epochs at every batch size; the data stream is a fresh permutation per epoch, and
    ``round(epochs * N / B)`` steps are taken, so every cell sees the same number of samples;
  * LR(B) = LR_256 * sqrt(B / 256), linear warm-up over the first 10% of steps, cosine decay
    to 0; weight decay on 2-D weights only; biases keep the optimizer's update rule (LARS: the
    trust ratio too, see ``OptimizerSpec.build``);
  * the seed fixes initialization and data order, so base and VR runs with the same seed see
    identical data;
  * a run diverges when a micro-batch loss is not finite: it stops there and is evaluated as
    it stands (non-finite logits count as 0, so the prediction is class 0: 10% on the balanced
    Fashion-MNIST sets);
  * train accuracy is measured on the whole training set, after training, in one pass.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import vrgd_ds

if str(Path(__file__).resolve().parent) not in sys.path:  # benchlib, also when a test imports this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
from benchlib import markdown_table, mean_std  # noqa: E402

DEFAULT_DATA = "/usr/share/datasets/fashion-mnist"
MICRO_BATCHES = 8  # k: gradient samples per step, the paper's minimum
WARMUP_FRAC = 0.1
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
MISSING_DATA_HELP = """\
Fashion-MNIST idx files not found in {dir}: missing {missing}.
Get them one of two ways:
  * Debian/Ubuntu: `sudo apt-get install dataset-fashion-mnist` puts the four *-ubyte.gz files in
    /usr/share/datasets/fashion-mnist (this script's default --data);
  * anywhere: download train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,
    t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz from
    https://github.com/zalandoresearch/fashion-mnist/tree/master/data/fashion into a folder and pass
    --data FOLDER (gzipped or not)."""


# ---- optimizers ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class OptimizerSpec:
    """One row of the benchmark: a VR optimizer class run with vr=False (base) and vr=True."""

    name: str
    cls: type
    lr_256: float  # tuned at batch 256 with vr=False: `--experiment tune`, results in the module docstring
    weight_decay: float
    tune_grid: tuple[float, ...]
    kwargs: dict = field(default_factory=dict)

    def build(
        self,
        model: torch.nn.Module,
        lr: float,
        vr: bool,
        gamma: float = 0.1,
        stats_interval: int = 1,
        estimator: str = "paper",
        **extra,
    ) -> torch.optim.Optimizer:
        # No weight decay on biases, but (unlike ``weight_decay_exclude_1d`` for LARS) the same
        # update rule: LARS's global LR (10-80 here) is sized for the trust ratio, and as plain
        # momentum SGD it blows the biases up (|b| 8 -> 180 in 60 steps at batch 2048).
        groups = [
            {"params": [p for p in model.parameters() if p.dim() > 1]},
            {"params": [p for p in model.parameters() if p.dim() <= 1], "weight_decay": 0.0},
        ]
        return self.cls(
            groups,
            lr=lr,
            weight_decay=self.weight_decay,
            gamma=gamma,
            vr=vr,
            stats_interval=stats_interval if vr else 0,
            gsnr_estimator=estimator,
            **self.kwargs,
            **extra,
        )


# LR_256: `python scripts/bench_quality.py --experiment tune` (batch 256, k = 8, 8 epochs, seed 0,
# vr=False, trained on 55k images, best accuracy on the other 5k; the full table is in
# docs/results_quality.md). VR uses the same LR as its base optimizer: it was not tuned separately.
OPTIMIZERS = (
    OptimizerSpec(
        "SGD-momentum",
        vrgd_ds.VRSGD,
        lr_256=0.1,
        weight_decay=5e-4,
        tune_grid=(0.01, 0.03, 0.1, 0.3),
        kwargs={"momentum": 0.9},
    ),
    OptimizerSpec(
        "AdamW",
        vrgd_ds.VRAdam,
        lr_256=1e-2,
        weight_decay=0.01,
        tune_grid=(1e-3, 3e-3, 1e-2, 3e-2),
        kwargs={"decoupled_weight_decay": True},
    ),
    OptimizerSpec("LAMB", vrgd_ds.VRLamb, lr_256=1e-2, weight_decay=0.01, tune_grid=(3e-3, 1e-2, 3e-2, 1e-1)),
    OptimizerSpec(
        "LARS",
        vrgd_ds.VRLars,
        lr_256=10.0,
        weight_decay=5e-4,
        tune_grid=(1.0, 3.0, 10.0, 30.0),
        kwargs={"momentum": 0.9, "trust_coefficient": 0.001},
    ),
)
OPTIMIZER_NAMES = {spec.name: spec for spec in OPTIMIZERS}


def scaled_lr(spec: OptimizerSpec, batch: int) -> float:
    """Square-root scaling from the tuned batch-256 LR."""
    return spec.lr_256 * math.sqrt(batch / 256)


# ---- data ---------------------------------------------------------------------------------------
def read_idx(path: Path) -> np.ndarray:
    """An idx file (gzipped or not) as an array: magic 0 0 dtype ndim, big-endian dims, data."""
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    if raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file (magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as a gzipped idx file (used by the smoke test's synthetic data)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def find_idx(data_dir: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (data_dir / name).is_file():
            return data_dir / name
    return None


def load_fashion_mnist(data_dir: Path):
    """(x_train, y_train, x_test, y_test): flattened float images standardized with the training
    set's mean and std, int64 labels."""
    paths = {key: find_idx(data_dir, stem) for key, stem in IDX_FILES.items()}
    missing = [IDX_FILES[key] + ".gz" for key, p in paths.items() if p is None]
    if missing:
        sys.exit(MISSING_DATA_HELP.format(dir=data_dir, missing=", ".join(missing)))
    arrays = {key: read_idx(p) for key, p in paths.items()}
    x_train = torch.tensor(arrays["train_images"].reshape(len(arrays["train_images"]), -1), dtype=torch.float32)
    x_test = torch.tensor(arrays["test_images"].reshape(len(arrays["test_images"]), -1), dtype=torch.float32)
    mean, std = x_train.mean(), x_train.std()
    return (
        (x_train - mean) / std,
        torch.tensor(arrays["train_labels"], dtype=torch.int64),
        (x_test - mean) / std,
        torch.tensor(arrays["test_labels"], dtype=torch.int64),
    )


# ---- one training run ---------------------------------------------------------------------------
def make_mlp(in_features: int, hidden: int, classes: int = 10) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(in_features, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, classes),
    )


def lr_factor(step: int, total: int) -> float:
    """Linear warm-up over the first WARMUP_FRAC of steps, then cosine decay to 0 (step from 0)."""
    warmup = max(1, math.ceil(WARMUP_FRAC * total))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 8192) -> float:
    correct = 0
    for i in range(0, len(x), chunk):
        logits = torch.nan_to_num(model(x[i : i + chunk]), nan=0.0, posinf=0.0, neginf=0.0)
        correct += int((logits.argmax(1) == y[i : i + chunk]).sum())
    return 100.0 * correct / len(x)


@dataclass(frozen=True)
class RunConfig:
    optimizer: str
    vr: bool
    batch: int
    lr: float
    seed: int
    epochs: float
    hidden: int
    gamma: float = 0.1
    split: str = "test"  # "test": train on train, evaluate on test; "val": hold out 5k of train
    estimator: str = "paper"  # VR's gsnr_estimator: "paper" (r, eq. 7) or "unbiased" (r~, VRGD.md §5)
    # record the gradient-noise statistics (|G|², tr Σ: B_simple, VRGD.md §5) every step; the
    # update is unchanged (base: vr=False, gradient_stats=True)
    noise: bool = False

    def key(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def train_run(cfg: RunConfig, data) -> dict:
    x_train, y_train, x_eval, y_eval = data
    spec = OPTIMIZER_NAMES[cfg.optimizer]
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = make_mlp(x_train.shape[1], cfg.hidden)
    n, micro = len(x_train), cfg.batch // MICRO_BATCHES
    total_steps = max(1, round(cfg.epochs * n / cfg.batch))
    # statistics cost about as much as the rest of a VR step at batch 256: sample ~50 steps per run
    stats_interval = max(1, total_steps // 50)
    noise_args = {"gradient_stats": True, "micro_batch_size": micro} if cfg.noise else {}
    opt = spec.build(model, cfg.lr, cfg.vr, cfg.gamma, stats_interval, cfg.estimator, **noise_args)
    noise = {"grad_norm_sq": [], "noise_trace": [], "b_simple_ema": []}
    order = torch.empty(0, dtype=torch.int64)
    params = [p for p in model.parameters()]
    scales, clip_fracs, rhos, losses, diverged, steps_done = [], [], [], [], False, 0
    t0 = time.perf_counter()
    for step in range(total_steps):
        while len(order) < cfg.batch:  # a fresh permutation per epoch, carried across steps
            order = torch.cat([order, torch.randperm(n, generator=gen)])
        idx, order = order[: cfg.batch], order[cfg.batch :]
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, total_steps)
        step_loss = 0.0
        measure = cfg.vr and (steps_done + 1) % stats_interval == 0  # the steps VR records stats on
        moments = [[torch.zeros_like(p), torch.zeros_like(p)] for p in params] if measure else None
        for m in range(MICRO_BATCHES):
            mb = idx[m * micro : (m + 1) * micro]
            loss = F.cross_entropy(model(x_train[mb]), y_train[mb])
            if not torch.isfinite(loss):
                diverged = True
                break
            before = [p.grad.clone() if p.grad is not None else 0.0 for p in params] if measure else None
            (loss / MICRO_BATCHES).backward()
            step_loss += loss.item() / MICRO_BATCHES
            if measure:
                for (grad_sum, grad_sq_sum), p, prev in zip(moments, params, before):
                    sample = p.grad - prev
                    grad_sum += sample
                    grad_sq_sum += sample * sample
        if diverged:
            break
        if measure:
            rhos.append(scaled_gradient_norm_ratio(params, moments, cfg.gamma))
        opt.step()
        opt.zero_grad()
        steps_done += 1
        losses.append(step_loss)
        if cfg.noise:
            stats = opt.noise_stats()
            for key in noise:
                noise[key].append(float(stats[key]))
        if cfg.vr and steps_done % stats_interval == 0:
            summary = opt.gsnr_summary()
            scales.append(summary["gsnr_scale_mean"])
            clip_fracs.append(summary["gsnr_clip_frac"])
    train_seconds = time.perf_counter() - t0
    test_acc = accuracy(model, x_eval, y_eval)
    train_acc = accuracy(model, x_train, y_train)
    return {
        "config": dataclasses.asdict(cfg),
        "test_acc": test_acc,
        "train_acc": train_acc,
        "gap": train_acc - test_acc,
        "final_loss": losses[-1] if losses else float("nan"),
        "diverged": diverged,
        "steps": steps_done,
        "total_steps": total_steps,
        # mean over (sampled) steps of the element-weighted mean scale VR applied to the gradient
        # (after normalization, clipping and, for AdamW/LAMB, GSNR momentum)
        "r_bar": float(np.mean(scales)) if scales else None,
        "clip_frac": float(np.mean(clip_fracs)) if clip_fracs else None,
        # over the measured steps whose gradients were finite (a diverging run's last ones are not)
        "rho": float(np.mean([v for v in rhos if math.isfinite(v)])) if any(map(math.isfinite, rhos)) else None,
        "seconds": train_seconds,
        # per step: the noise statistics and the mean micro-batch loss (only with cfg.noise)
        **({"noise": {**noise, "loss": losses}} if cfg.noise else {}),
    }


def scaled_gradient_norm_ratio(params, moments, gamma: float) -> float:
    """ρ = ‖r ⊙ G‖ / ‖G‖ over all parameters, with r the normalized, clipped GSNR of this step
    (no GSNR momentum) and G the mean micro-batch gradient: how much the gradient *norm* shrinks,
    as opposed to r̄, the plain mean of r. Elements with high GSNR carry most of ‖G‖ and keep
    r ≈ 1, so ρ > r̄. For SGD ρ is the factor by which VR shrinks the step; LARS divides by
    ‖g'‖, so there VR raises the step of the high-GSNR elements by ~1/ρ."""
    num = den = 0.0
    for _p, (grad_sum, grad_sq_sum) in zip(params, moments):
        r = vrgd_ds.gsnr_from_moments(grad_sum, grad_sq_sum, MICRO_BATCHES, 1e-6)
        r = vrgd_ds.normalize_and_clip(r, r.mean(), gamma)
        grad = grad_sum / MICRO_BATCHES
        num += float((r * grad).pow(2).sum())
        den += float(grad.pow(2).sum())
    return math.sqrt(num / den) if den > 0 else 1.0


class RunCache:
    """Runs already done, keyed by their config, persisted as JSON lines so a long run resumes."""

    def __init__(self, path: str | None):
        self.path = Path(path) if path else None
        self.done: dict[str, dict] = {}
        if self.path and self.path.exists():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    rec = json.loads(line)
                    self.done[RunConfig(**rec["config"]).key()] = rec

    def run(self, cfg: RunConfig, data, log, require: tuple[str, ...] = ()) -> dict:
        """The run's record, trained now unless cached with every field in ``require``."""
        key = cfg.key()
        if key not in self.done or any(self.done[key].get(f) is None for f in require):
            rec = train_run(cfg, data)
            self.done[key] = rec
            if self.path:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
            r_bar = f" r̄={rec['r_bar']:.3f} ρ={rec['rho']:.3f}" if rec["r_bar"] is not None else ""
            log(
                f"  {cfg.optimizer:12s} vr={int(cfg.vr)} B={cfg.batch:5d} lr={cfg.lr:.4g} seed={cfg.seed} "
                f"test={rec['test_acc']:.2f} train={rec['train_acc']:.2f}{r_bar}"
                f"{' DIVERGED' if rec['diverged'] else ''} ({rec['seconds']:.1f}s)"
            )
        return self.done[key]


# ---- formatting ---------------------------------------------------------------------------------
@dataclass
class Section:
    """One experiment's table: the markdown rows, and per row the measured values (for the JSON)."""

    name: str
    title: str
    header: list[str]
    rows: list[list] = field(default_factory=list)
    cells: list[dict] = field(default_factory=list)

    def add(self, row: list, cell: dict) -> None:
        self.rows.append(row)
        self.cells.append(cell)

    def markdown(self) -> str:
        return f"### {self.title}\n\n" + markdown_table(self.header, self.rows)

    def to_json(self) -> dict:
        return {"title": self.title, "header": self.header, "cells": self.cells}


def run_values(runs: list[dict], keys=("test_acc", "train_acc", "gap")) -> dict:
    """A table cell's runs as JSON: mean, std and the values over seeds of each quantity."""
    out = {key: benchlib.summary([r[key] for r in runs]) for key in keys}
    return {**out, "seeds": len(runs), "diverged": sum(r["diverged"] for r in runs)}


def div_note(runs: list[dict]) -> str:
    n_div = sum(r["diverged"] for r in runs)
    return f" ({n_div}/{len(runs)} div)" if n_div else ""


# ---- experiments --------------------------------------------------------------------------------
@dataclass
class Settings:
    batches: tuple[int, ...]
    seeds_small: int  # seeds for batches < LARGE_BATCH_FROM
    seeds_large: int
    large_from: int
    epochs: float
    hidden: int
    lr_mults: tuple[float, ...]
    lr_seeds: int
    train_subset: int | None
    test_subset: int | None
    gamma_seeds: int
    gamma_epochs: tuple[int, ...]  # test MSE is recorded after each of these epochs
    gamma_dim: int
    gamma_n_train: int
    gamma_batch: int
    gamma_sigma: float
    # --experiment critical: B_simple along training, base and VR at every batch of
    # critical_batches, seeds 0 .. critical_seeds - 1
    critical_batches: tuple[int, ...] = ()
    critical_seeds: int = 1


FULL = Settings(
    batches=(256, 1024, 2048, 4096, 8192, 16384),
    seeds_small=3,
    seeds_large=3,
    large_from=4096,
    epochs=8,
    hidden=128,
    lr_mults=(0.25, 1, 4, 16, 64),
    lr_seeds=2,
    train_subset=None,
    test_subset=None,
    gamma_seeds=8,
    gamma_epochs=(5, 25, 100),
    gamma_dim=64,
    gamma_n_train=512,
    gamma_batch=128,
    gamma_sigma=1.0,
    critical_batches=(256, 1024, 2048, 4096, 8192, 16384),  # the batch study's (~20 min on one core)
    critical_seeds=2,  # of its 3
)
QUICK = Settings(
    batches=(64, 256),
    seeds_small=2,
    seeds_large=2,
    large_from=256,
    epochs=2,
    hidden=32,
    lr_mults=(1, 64),
    lr_seeds=2,
    train_subset=1024,
    test_subset=512,
    gamma_seeds=2,
    gamma_epochs=(1, 4),
    gamma_dim=16,
    gamma_n_train=64,
    gamma_batch=64,
    gamma_sigma=1.0,
    critical_batches=(64, 256),
    critical_seeds=2,
)


def experiment_tune(data, settings: Settings, cache: RunCache, log) -> tuple[Section, dict]:
    """Base optimizers at batch 256 over each spec's LR grid, scored on 5k held-out train images."""
    x_train, y_train = data[0], data[1]
    perm = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(1234))
    n_val = min(5000, len(x_train) // 10)
    val, tr = perm[:n_val], perm[n_val:]
    split = (x_train[tr], y_train[tr], x_train[val], y_train[val])
    batch = min(settings.batches)
    header = ["optimizer"] + [f"grid {i + 1}" for i in range(max(len(s.tune_grid) for s in OPTIMIZERS))]
    section = Section(
        "tune",
        f"LR tuning: batch {batch}, k = {MICRO_BATCHES}, {settings.epochs:g} epochs, seed 0, vr=False; "
        f"validation accuracy (%) on {n_val} held-out training images (* = chosen)",
        header,
    )
    best = {}
    for spec in OPTIMIZERS:
        scores = {}
        for lr in spec.tune_grid:
            cfg = RunConfig(spec.name, False, batch, lr, 0, settings.epochs, settings.hidden, split="val")
            rec = cache.run(cfg, split, log)
            scores[lr] = rec["test_acc"]
        best[spec.name] = max(scores, key=scores.get)
        section.add(
            [spec.name]
            + [f"{scores[lr]:.2f}{' *' if lr == best[spec.name] else ''} (lr {lr:g})" for lr in spec.tune_grid],
            {
                "optimizer": spec.name,
                "batch": batch,
                "lr": list(scores),
                "val_acc": list(scores.values()),
                "best_lr": best[spec.name],
            },
        )
    return section, best


def experiment_batch(data, settings: Settings, cache: RunCache, log) -> tuple[Section, dict]:
    """Accuracy and generalization gap vs batch size, base vs VR, at the sqrt-scaled LR."""
    header = [
        "optimizer",
        "batch",
        "lr",
        "seeds",
        "test acc base",
        "test acc VR",
        "train acc base",
        "train acc VR",
        "gap base",
        "gap VR",
        "VR r̄",
    ]
    section = Section(
        "batch",
        f"Accuracy vs batch size (%, mean ± std over seeds; gap = train − test; "
        f"{settings.epochs:g} epochs, k = {MICRO_BATCHES}, γ = 0.1)",
        header,
    )
    results = {}
    for spec in OPTIMIZERS:
        for batch in settings.batches:
            seeds = settings.seeds_large if batch >= settings.large_from else settings.seeds_small
            cell = {}
            for vr in (False, True):
                cell[vr] = [
                    cache.run(
                        RunConfig(spec.name, vr, batch, scaled_lr(spec, batch), s, settings.epochs, settings.hidden),
                        data,
                        log,
                    )
                    for s in range(seeds)
                ]
            results[(spec.name, batch)] = cell
            base, vr_runs = cell[False], cell[True]
            section.add(
                [
                    spec.name,
                    batch,
                    f"{scaled_lr(spec, batch):.4g}",
                    seeds,
                    mean_std([r["test_acc"] for r in base]) + div_note(base),
                    mean_std([r["test_acc"] for r in vr_runs]) + div_note(vr_runs),
                    mean_std([r["train_acc"] for r in base]),
                    mean_std([r["train_acc"] for r in vr_runs]),
                    mean_std([r["gap"] for r in base]),
                    mean_std([r["gap"] for r in vr_runs]),
                    mean_std([r["r_bar"] for r in vr_runs], digits=3),
                ],
                {
                    "optimizer": spec.name,
                    "batch": batch,
                    "lr": scaled_lr(spec, batch),
                    "base": run_values(base),
                    "vr": run_values(vr_runs, ("test_acc", "train_acc", "gap", "r_bar")),
                },
            )
    return section, results


UNBIASED_OPTIMIZERS = ("SGD-momentum", "LAMB")


def experiment_unbiased(data, settings: Settings, cache: RunCache, log) -> tuple[Section, dict]:
    """VR driven by the paper's r vs by the k-independent r~ = ((k−1)r − 1)/k (VRGD.md §5), at the
    largest two batches of the grid and the sqrt-scaled LR, same seeds."""
    header = ["optimizer", "batch", "seeds", "test acc r", "test acc r~", "gap r", "gap r~", "r̄ (r)", "r̄ (r~)"]
    section = Section(
        "unbiased",
        f"VR with the paper's r vs the unbiased r~ (%, mean ± std over seeds; {settings.epochs:g} epochs, "
        f"k = {MICRO_BATCHES}, γ = 0.1)",
        header,
    )
    results = {}
    specs = [s for s in OPTIMIZERS if s.name in UNBIASED_OPTIMIZERS] or list(OPTIMIZERS)
    for spec in specs:
        for batch in settings.batches[-2:]:
            seeds = settings.seeds_large if batch >= settings.large_from else settings.seeds_small
            cell = {
                est: [
                    cache.run(
                        RunConfig(
                            spec.name,
                            True,
                            batch,
                            scaled_lr(spec, batch),
                            s,
                            settings.epochs,
                            settings.hidden,
                            estimator=est,
                        ),
                        data,
                        log,
                    )
                    for s in range(seeds)
                ]
                for est in ("paper", "unbiased")
            }
            results[(spec.name, batch)] = cell
            paper, unbiased = cell["paper"], cell["unbiased"]
            section.add(
                [
                    spec.name,
                    batch,
                    seeds,
                    mean_std([r["test_acc"] for r in paper]) + div_note(paper),
                    mean_std([r["test_acc"] for r in unbiased]) + div_note(unbiased),
                    mean_std([r["gap"] for r in paper]),
                    mean_std([r["gap"] for r in unbiased]),
                    mean_std([r["r_bar"] for r in paper], digits=3),
                    mean_std([r["r_bar"] for r in unbiased], digits=3),
                ],
                {
                    "optimizer": spec.name,
                    "batch": batch,
                    "lr": scaled_lr(spec, batch),
                    **{est: run_values(cell[est], ("test_acc", "train_acc", "gap", "r_bar")) for est in cell},
                },
            )
    return section, results


def experiment_lr(data, settings: Settings, cache: RunCache, log) -> tuple[Section, dict]:
    """LR robustness at the largest batch: scaled LR × mult, base vs VR, plus base at LR × r̄."""
    batch = max(settings.batches)
    header = [
        "optimizer",
        "LR mult",
        "lr",
        "test acc base",
        "test acc VR",
        "VR r̄",
        "VR ρ",
        "test acc base @ lr×r̄",
        "gap base",
        "gap VR",
        "gap base @ lr×r̄",
    ]
    section = Section(
        "lr",
        f"LR robustness at batch {batch} (%, mean ± std over {settings.lr_seeds} seeds; "
        f"'div' = non-finite loss, run stopped)",
        header,
    )
    results = {}
    for spec in OPTIMIZERS:
        for mult in settings.lr_mults:
            lr = scaled_lr(spec, batch) * mult
            base, vr_runs, control = [], [], []
            for s in range(settings.lr_seeds):
                base.append(
                    cache.run(RunConfig(spec.name, False, batch, lr, s, settings.epochs, settings.hidden), data, log)
                )
                vr_rec = cache.run(
                    RunConfig(spec.name, True, batch, lr, s, settings.epochs, settings.hidden),
                    data,
                    log,
                    require=("rho",),
                )
                vr_runs.append(vr_rec)
                # the paired control: the base optimizer with its LR lowered by the VR run's r̄
                if vr_rec["r_bar"] is not None:
                    control.append(
                        cache.run(
                            RunConfig(
                                spec.name, False, batch, lr * vr_rec["r_bar"], s, settings.epochs, settings.hidden
                            ),
                            data,
                            log,
                        )
                    )
            results[(spec.name, mult)] = {"base": base, "vr": vr_runs, "control": control}
            section.add(
                [
                    spec.name,
                    f"×{mult:g}",
                    f"{lr:.4g}",
                    mean_std([r["test_acc"] for r in base]) + div_note(base),
                    mean_std([r["test_acc"] for r in vr_runs]) + div_note(vr_runs),
                    mean_std([r["r_bar"] for r in vr_runs], digits=3),
                    mean_std([r["rho"] for r in vr_runs], digits=3),
                    mean_std([r["test_acc"] for r in control]) + div_note(control),
                    mean_std([r["gap"] for r in base]),
                    mean_std([r["gap"] for r in vr_runs]),
                    mean_std([r["gap"] for r in control]),
                ],
                {
                    "optimizer": spec.name,
                    "batch": batch,
                    "lr_mult": mult,
                    "lr": lr,
                    "base": run_values(base),
                    "vr": run_values(vr_runs, ("test_acc", "train_acc", "gap", "r_bar", "rho")),
                    "control": run_values(control),
                },
            )
    return section, results


# start, middle and end of training: the first, the central and the last eighth of the steps
# (one epoch each at 8 epochs)
PHASES = {"start": (0.0, 0.125), "middle": (0.4375, 0.5625), "end": (0.875, 1.0)}


def noise_window(noise: dict, lo: float, hi: float) -> dict | None:
    """B_simple over the steps in [lo, hi) of a run (fractions of its steps) as a ratio of means,
    Σ tr Σ / Σ |G|² (VRGD.md §5: one step's ratio is biased and noisy); steps whose statistics
    are not finite (a diverging run) are left out. None when no step is left."""
    total = len(noise["grad_norm_sq"])
    first, last = int(lo * total), max(int(lo * total) + 1, int(round(hi * total)))
    steps = [
        i
        for i in range(first, min(last, total))
        if math.isfinite(noise["grad_norm_sq"][i]) and math.isfinite(noise["noise_trace"][i])
    ]
    if not steps:
        return None
    grad_norm_sq = float(np.mean([noise["grad_norm_sq"][i] for i in steps]))
    noise_trace = float(np.mean([noise["noise_trace"][i] for i in steps]))
    return {
        "steps": [first, min(last, total)],
        "grad_norm_sq": grad_norm_sq,
        "noise_trace": noise_trace,
        "b_simple": noise_trace / grad_norm_sq if grad_norm_sq > 0 else math.nan,
        "b_simple_ema": noise["b_simple_ema"][steps[-1]],
        "loss": float(np.mean([noise["loss"][i] for i in steps])),
    }


def noise_phases(runs: list[dict]) -> dict:
    """Per phase (start/middle/end) the windows' B_simple, EMA and loss over the runs' seeds."""
    out = {}
    for phase, (lo, hi) in PHASES.items():
        windows = [w for w in (noise_window(r["noise"], lo, hi) for r in runs) if w is not None]
        out[phase] = {key: benchlib.summary([w[key] for w in windows]) for key in ("b_simple", "b_simple_ema", "loss")}
        out[phase]["steps"] = [w["steps"] for w in windows]
    return out


def paired_differences(vr_runs: list[dict], base_runs: list[dict], key: str) -> list[float]:
    """VR − base of ``key`` per seed (runs of one seed see the same initialization and data)."""
    by_seed = {r["config"]["seed"]: r[key] for r in base_runs}
    return [r[key] - by_seed[r["config"]["seed"]] for r in vr_runs if r["config"]["seed"] in by_seed]


def b_simple_at_loss(runs: list[dict], loss: float, windows: int = 32) -> dict:
    """B_simple of the reference runs where their training loss first falls to ``loss``: over the
    first of ``windows`` equal windows of steps (fewer when they would hold < 16 steps) whose
    mean loss is ≤ ``loss`` (the last window if none is). The critical batch depends on the loss
    reached (McCandlish et al. 2018, §2.3), and a large batch stops at a loss the small one
    passes early."""
    found = []
    for run in runs:
        count = max(1, min(windows, len(run["noise"]["loss"]) // 16))  # windows of ≥ 16 steps
        parts = [noise_window(run["noise"], i / count, (i + 1) / count) for i in range(count)]
        parts = [w for w in parts if w is not None]
        if parts:
            found.append(next((w for w in parts if w["loss"] <= loss), parts[-1]))
    return {"b_simple": benchlib.summary([w["b_simple"] for w in found]), "steps": [w["steps"] for w in found]}


def fmt_loss(values: list[float]) -> str:
    """Mean ± std of losses: 3 decimals, or 3 significant digits where a run blew up."""
    if all(abs(v) < 1e3 for v in values):
        return mean_std(values, 3)
    return f"{np.mean(values):.3g} ± {np.std(values, ddof=1):.3g}" if len(values) > 1 else f"{values[0]:.3g}"


def over_b_simple(batch: int, phase: dict) -> float:
    """B / B_simple for a phase of noise_phases (NaN where no B_simple was measured or it is ≤ 0)."""
    b_simple = phase["b_simple"]["mean"]
    return batch / b_simple if b_simple is not None and b_simple > 0 else math.nan


def experiment_critical(data, settings: Settings, cache: RunCache, log) -> tuple[list[Section], dict]:
    """The measured critical batch: B_simple (McCandlish et al. 2018; VRGD.md §5) along training.

    The batch study's runs (same optimizers, LR, schedule, seeds; base and VR) at every batch of
    ``critical_batches``, with the gradient-noise statistics on (base: ``vr=False,
    gradient_stats=True``, the same update): each step's |G|² and tr Σ from its k = 8
    micro-batch gradients of b = B/8 examples. B_simple of a phase = mean tr Σ / mean |G|² over
    its steps. B / B_simple is taken against the base runs at the smallest batch (they pass
    through the losses the larger batches stop at) and against the run at B itself; VR − base
    is paired by seed."""
    small = min(settings.critical_batches)
    groups = {}  # (optimizer, batch, vr) -> runs
    for spec in OPTIMIZERS:
        for batch in settings.critical_batches:
            for vr in (False, True):
                groups[(spec.name, batch, vr)] = [
                    cache.run(
                        RunConfig(
                            spec.name,
                            vr,
                            batch,
                            scaled_lr(spec, batch),
                            s,
                            settings.epochs,
                            settings.hidden,
                            noise=True,
                        ),
                        data,
                        log,
                    )
                    for s in range(settings.critical_seeds)
                ]
    along = Section(
        "critical",
        f"B_simple along training (examples; mean ± std over {settings.critical_seeds} seeds; phase = first / "
        f"central / last eighth of the steps; B_simple = mean tr Σ / mean |G|² over the phase; EMA = "
        f"b_simple_ema at the last step; {settings.epochs:g} epochs, k = {MICRO_BATCHES}, LR ∝ √batch)",
        ["optimizer", "batch", "steps"]
        + [f"B_simple base {p}" for p in PHASES]
        + ["EMA base end"]
        + [f"B_simple VR {p}" for p in PHASES]
        + [f"train loss base {p}" for p in PHASES],
    )
    versus = Section(
        "critical_batches",
        f"Batch sizes against the critical batch, and VR − base (paired by seed; test/train accuracy in "
        f"points): B / B_simple with B_simple of the base runs at batch {small} in each phase, and of the "
        f"base run at B itself (> 1: above the critical batch)",
        [
            "optimizer",
            "batch B",
            "steps",
            "B / B_simple start",
            "B / B_simple middle",
            "B / B_simple end",
            "B / B_simple own run (start / middle / end)",
            f"B / B_simple at the loss reached (batch {small})",
            "test acc base",
            "VR − base test acc",
            "VR − base train acc",
            "VR − base gap",
        ],
    )
    for spec in OPTIMIZERS:
        reference = noise_phases(groups[(spec.name, small, False)])
        for batch in settings.critical_batches:
            base, vr_runs = groups[(spec.name, batch, False)], groups[(spec.name, batch, True)]
            phases, vr_phases = noise_phases(base), noise_phases(vr_runs)
            steps = base[0]["total_steps"]
            along.add(
                [spec.name, batch, steps]
                + [mean_std(phases[p]["b_simple"]["values"], 0) for p in PHASES]
                + [mean_std(phases["end"]["b_simple_ema"]["values"], 0)]
                + [mean_std(vr_phases[p]["b_simple"]["values"], 0) for p in PHASES]
                + [fmt_loss(phases[p]["loss"]["values"]) + (div_note(base) if p == "end" else "") for p in PHASES],
                {
                    "optimizer": spec.name,
                    "batch": batch,
                    "steps": steps,
                    "base": {"phases": phases, **run_values(base)},
                    "vr": {"phases": vr_phases, **run_values(vr_runs, ("test_acc", "train_acc", "gap", "r_bar"))},
                },
            )
            ratios = {p: over_b_simple(batch, reference[p]) for p in PHASES}
            own = {p: over_b_simple(batch, phases[p]) for p in PHASES}
            final_loss = phases["end"]["loss"]["mean"]
            matched = b_simple_at_loss(groups[(spec.name, small, False)], final_loss) if final_loss else None
            at_loss = over_b_simple(batch, matched) if matched else math.nan
            diffs = {key: paired_differences(vr_runs, base, key) for key in ("test_acc", "train_acc", "gap")}
            versus.add(
                [spec.name, batch, steps]
                + [f"{ratios[p]:.3g}" for p in PHASES]
                + [" / ".join(f"{own[p]:.3g}" for p in PHASES), f"{at_loss:.3g}"]
                + [mean_std([r["test_acc"] for r in base]) + div_note(base)]
                + [
                    mean_std(diffs["test_acc"]) + div_note(vr_runs),
                    mean_std(diffs["train_acc"]),
                    mean_std(diffs["gap"]),
                ],
                {
                    "optimizer": spec.name,
                    "batch": batch,
                    "steps": steps,
                    "reference_batch": small,
                    "b_over_b_simple": ratios,
                    "b_over_b_simple_own_run": own,
                    "final_train_loss": final_loss,
                    "b_simple_at_final_loss": matched,
                    "b_over_b_simple_at_final_loss": at_loss,
                    "test_acc_base": benchlib.summary([r["test_acc"] for r in base]),
                    "diverged": {"base": sum(r["diverged"] for r in base), "vr": sum(r["diverged"] for r in vr_runs)},
                    "vr_minus_base": {key: benchlib.summary(values) for key, values in diffs.items()},
                },
            )
    return [along, versus, critical_trend(versus.cells)], groups


def critical_trend(cells: list[dict]) -> Section:
    """Per optimizer: does VR − base (test accuracy, mean over seeds) change with B / B_simple?
    B_simple: the reference runs' at the loss the run at B ended with. Least-squares slope per
    doubling of B / B_simple over the batches, and the mean VR − base below and above the
    critical batch."""
    section = Section(
        "critical_trend",
        "VR − base test accuracy (points) against B / B_simple (B_simple of the reference runs at the loss "
        "the run at B ended with): slope per doubling of B / B_simple (least squares over the batches, "
        "± its standard error), and the mean over the batches below (≤ 1) and above (> 1) the critical batch",
        [
            "optimizer",
            "batches ≤ critical",
            "batches > critical",
            "VR − base ≤ critical",
            "VR − base > critical",
            "slope per doubling",
        ],
    )
    for name in dict.fromkeys(c["optimizer"] for c in cells):
        mine = [c for c in cells if c["optimizer"] == name and c["vr_minus_base"]["test_acc"]["n"]]
        mine = [c for c in mine if math.isfinite(c["b_over_b_simple_at_final_loss"])]
        x = np.log2([c["b_over_b_simple_at_final_loss"] for c in mine])
        y = np.array([c["vr_minus_base"]["test_acc"]["mean"] for c in mine])
        below = [c for c, v in zip(mine, x) if v <= 0]
        above = [c for c, v in zip(mine, x) if v > 0]
        slope = se = None
        if len(mine) >= 3:
            slope, intercept = np.polyfit(x, y, 1)
            fitted = slope * x + intercept
            se = float(np.sqrt(np.sum((y - fitted) ** 2) / (len(x) - 2) / np.sum((x - x.mean()) ** 2)))
            slope = float(slope)
        mean_of = [
            benchlib.summary([c["vr_minus_base"]["test_acc"]["mean"] for c in part]) if part else None
            for part in (below, above)
        ]
        section.add(
            [name, len(below), len(above)]
            + ["–" if m is None else mean_std(m["values"]) for m in mean_of]
            + ["–" if slope is None else f"{slope:+.2f} ± {se:.2f}"],
            {
                "optimizer": name,
                "batches_below": [c["batch"] for c in below],
                "batches_above": [c["batch"] for c in above],
                "vr_minus_base_below": mean_of[0],
                "vr_minus_base_above": mean_of[1],
                "slope_per_doubling": slope,
                "slope_se": se,
            },
        )
    return section


def experiment_gamma(settings: Settings, log, seed0: int = 0) -> tuple[Section, dict]:
    """γ ablation on synthetic linear regression (VRSGD, no momentum), paper sec. 5 ablation.

    y = x·w* + ε with w* ~ N(0, I_d), ε ~ N(0, σ²), and features of log-spaced scales
    (feature std from 1 to 0.1, curvature ratio 100) so that the per-coordinate GSNR differs; a
    finite training set (n = 8d in the full run); test MSE on 8192 fresh samples, reported as
    excess over the noise floor σ². γ = 1 is plain SGD. The same LR for every γ, a fraction of
    2 / λ_max (the full-batch stability limit); k = 8 micro-batches per step.
    """
    d, n_train, n_test = settings.gamma_dim, settings.gamma_n_train, 8192
    sigma, batch = settings.gamma_sigma, settings.gamma_batch
    gammas = (0.01, 0.04, 0.1, 0.2, 0.5, 1.0)
    lr_fracs = (0.25, 0.9)
    scales = torch.logspace(0, -1, d)  # feature std from 1 down to 0.1: curvature ratio 100
    last = max(settings.gamma_epochs)
    header = (
        ["lr / (2/λmax)", "γ"]
        + [f"excess test MSE @ {e} ep" for e in settings.gamma_epochs]
        + [f"paired Δ vs γ=1 @ {last} ep", "r̄", "clip frac"]
    )
    section = Section(
        "gamma",
        f"γ ablation: linear regression, d = {d}, n_train = {n_train}, σ = {sigma}, batch {batch} "
        f"(k = {MICRO_BATCHES}, {max(1, n_train // batch)} steps/epoch), VRSGD without momentum, mean ± std "
        f"over {settings.gamma_seeds} seeds (γ = 1 is plain SGD; clip frac = share of elements whose "
        f"normalized r fell below γ)",
        header,
    )
    results = {}
    for lr_frac in lr_fracs:
        for gamma in gammas:
            excess = {e: [] for e in settings.gamma_epochs}
            r_bars, clip_fracs = [], []
            for s in range(settings.gamma_seeds):  # seed s: the same w*, data and order for every γ
                gen = torch.Generator().manual_seed(seed0 + s)
                w_star = torch.randn(d, generator=gen)
                x_tr = torch.randn(n_train, d, generator=gen) * scales
                y_tr = x_tr @ w_star + sigma * torch.randn(n_train, generator=gen)
                x_te = torch.randn(n_test, d, generator=gen) * scales
                y_te = x_te @ w_star + sigma * torch.randn(n_test, generator=gen)
                lam_max = float(torch.linalg.eigvalsh(x_tr.T @ x_tr / n_train)[-1])
                w = torch.nn.Parameter(torch.zeros(d))
                opt = vrgd_ds.VRSGD([w], lr=lr_frac * 2 / lam_max, gamma=gamma, vr=True, stats_interval=1)
                micro = batch // MICRO_BATCHES
                scale_log, clip_log = [], []
                for epoch in range(1, last + 1):
                    perm = torch.randperm(n_train, generator=gen)
                    for b in range(max(1, n_train // batch)):
                        idx = perm[b * batch : (b + 1) * batch]
                        for m in range(MICRO_BATCHES):
                            mb = idx[m * micro : (m + 1) * micro]
                            (0.5 * (x_tr[mb] @ w - y_tr[mb]).pow(2).mean() / MICRO_BATCHES).backward()
                        opt.step()
                        opt.zero_grad()
                        summary = opt.gsnr_summary()
                        scale_log.append(summary["gsnr_scale_mean"])
                        clip_log.append(summary["gsnr_clip_frac"])
                    if epoch in excess:
                        with torch.no_grad():
                            mse = float((x_te @ w - y_te).pow(2).mean())
                        excess[epoch].append(mse - sigma**2 if math.isfinite(mse) else float("nan"))
                r_bars.append(float(np.mean(scale_log)))
                clip_fracs.append(float(np.mean(clip_log)))
            results[(lr_frac, gamma)] = {"excess_mse": excess, "r_bar": r_bars, "clip_frac": clip_fracs}
        plain = results[(lr_frac, 1.0)]["excess_mse"][last]
        for gamma in gammas:
            res = results[(lr_frac, gamma)]
            paired = [a - b for a, b in zip(res["excess_mse"][last], plain)]
            section.add(
                [f"{lr_frac:g}", f"{gamma:g}"]
                + [fmt_mse(res["excess_mse"][e]) for e in settings.gamma_epochs]
                + [fmt_mse(paired), f"{np.mean(res['r_bar']):.3f}", f"{np.mean(res['clip_frac']):.3f}"],
                {
                    "lr_frac": lr_frac,
                    "gamma": gamma,
                    "excess_test_mse": {str(e): benchlib.summary(res["excess_mse"][e]) for e in settings.gamma_epochs},
                    "paired_delta_vs_plain": benchlib.summary(paired),
                    "r_bar": benchlib.summary(res["r_bar"]),
                    "clip_frac": benchlib.summary(res["clip_frac"]),
                },
            )
        log(f"  gamma ablation lr_frac={lr_frac:g} done")
    return section, results


def fmt_mse(values) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < len(values):
        return f"div ({len(values) - len(finite)}/{len(values)})"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"


def plot_batch(results: dict, settings: Settings, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5), sharey=True)
    for ax, spec in zip(axes.flat, OPTIMIZERS):
        for vr, color in ((False, "tab:blue"), (True, "tab:red")):
            label = ("VR-" if vr else "") + spec.name
            runs = [results[(spec.name, b)][vr] for b in settings.batches]
            # seeds as dots, not error bars: a cell can be bimodal (some seeds collapse, some do not)
            for b, cell in zip(settings.batches, runs):
                for r in cell:
                    ax.scatter(
                        b * (1.04 if vr else 0.96),
                        r["test_acc"],
                        s=12,
                        color=color,
                        alpha=0.6,
                        marker="x" if r["diverged"] else "o",
                    )
            ax.plot(
                settings.batches,
                [np.mean([r["test_acc"] for r in cell]) for cell in runs],
                color=color,
                marker="o",
                ms=4,
                label=f"{label} test (mean, dots: seeds)",
            )
            ax.plot(
                settings.batches,
                [np.mean([r["train_acc"] for r in cell]) for cell in runs],
                color=color,
                linestyle=":",
                label=f"{label} train (mean)",
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(settings.batches, [f"{b // 1024}k" if b >= 1024 else str(b) for b in settings.batches])
        ax.set_title(spec.name)
        ax.set_xlabel("batch size (k = 8 micro-batches)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy (%)")
    fig.suptitle(
        f"Fashion-MNIST MLP, {settings.epochs:g} epochs, LR ∝ √batch: base vs VR (γ = 0.1); "
        "x = a seed whose run diverged",
        fontsize=10,
    )
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine_description() -> str:
    return (
        f"{benchlib.cpu_model()}, {os.cpu_count()} CPU cores visible, CPU only, torch {torch.__version__} with "
        f"{torch.get_num_threads()} thread(s), Python {benchlib.version_of('Python')}"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data",
        default=DEFAULT_DATA,
        help=f"folder with the Fashion-MNIST idx files "
        f"(default: {DEFAULT_DATA}, where Debian's dataset-fashion-mnist puts them)",
    )
    parser.add_argument(
        "--experiment",
        default="all",
        choices=("all", "batch", "lr", "gamma", "tune", "unbiased", "critical"),
        help="all = batch + lr + unbiased + gamma + critical (default); tune = the LR search at batch 256; "
        "critical = B_simple along training and the batches against it",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny subset, tiny model, few steps")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--runs", help="JSON-lines file of finished runs: appended to, and reused on restart")
    parser.add_argument("--report", help="write the markdown tables, command, machine and runtime here")
    parser.add_argument(
        "--json", help="write the results here: per table row the measured values (mean, std, per seed) and the run"
    )
    parser.add_argument("--plot", help="write the accuracy-vs-batch PNG here (batch experiment)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = QUICK if args.quick else FULL
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", file=sys.stderr, flush=True)

    sections: list[Section] = []
    code = benchlib.code_version()  # before the runs: the code they ran
    cache = RunCache(args.runs)
    if args.experiment in ("all", "batch", "lr", "tune", "unbiased", "critical"):
        data = load_fashion_mnist(Path(args.data))
        if settings.train_subset or settings.test_subset:
            data = (
                data[0][: settings.train_subset],
                data[1][: settings.train_subset],
                data[2][: settings.test_subset],
                data[3][: settings.test_subset],
            )
        log(f"data: {len(data[0])} train, {len(data[2])} test images from {args.data}")
        if args.experiment == "tune":
            section, best = experiment_tune(data, settings, cache, log)
            sections.append(section)
            log("chosen LRs: " + ", ".join(f"{k} {v:g}" for k, v in best.items()))
        if args.experiment in ("all", "batch"):
            section, results = experiment_batch(data, settings, cache, log)
            sections.append(section)
            if args.plot:
                plot_batch(results, settings, args.plot)
                log(f"wrote {args.plot}")
        if args.experiment in ("all", "lr"):
            sections.append(experiment_lr(data, settings, cache, log)[0])
        if args.experiment in ("all", "unbiased"):
            sections.append(experiment_unbiased(data, settings, cache, log)[0])
        if args.experiment in ("all", "critical"):
            sections += experiment_critical(data, settings, cache, log)[0]
    if args.experiment in ("all", "gamma"):
        sections.append(experiment_gamma(settings, log)[0])

    runtime = time.perf_counter() - t_start
    meta = benchlib.run_meta(machine_description(), runtime, argv, code=code)
    header = (
        f"Command: `{meta['command']}`  \nMachine: {meta['machine']}  \nCode: {meta['code']}  \n"
        f"Total runtime: {runtime / 60:.1f} min ({runtime:.0f} s)\n"
    )
    body = header + "\n" + "\n\n".join(section.markdown() for section in sections) + "\n"
    print(body)
    if args.report:
        benchlib.write_text(args.report, body)
    if args.json:
        benchlib.write_json(
            args.json,
            {
                "meta": meta,
                "settings": dataclasses.asdict(settings),
                "micro_batches": MICRO_BATCHES,
                "experiments": {section.name: section.to_json() for section in sections},
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
