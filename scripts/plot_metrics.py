#!/usr/bin/env python
"""Plot a pretrain_bert.py metrics CSV: loss, gradient-noise scale, per-layer GSNR and clip fraction.

The CSV is in long form, one scalar per row (the same names TensorBoard gets)::

    step,phase,name,value
    10,1,train/loss,6.91
    10,1,eval/loss,6.95
    10,1,gsnr/gsnr_mean,0.42                      optimizer-wide GSNR summary
    10,1,gsnr_layer/encoder.layer.0/gsnr_mean,0.38  per layer (mean over its tensors)
    10,1,noise/b_simple_ema,850                    gradient-noise scale (critical batch), examples

Top row: train and held-out loss (with held-out masked-token accuracy on a second axis, and the
unigram baseline, ``eval/unigram_accuracy``, as a dotted horizontal line) and, next to it, the
simple noise scale B_simple = tr Σ / |G|² (``noise/b_simple_ema`` bold, each step's
``noise/b_simple`` faint, log axis) with the run's batch size (``train/batch_size``, examples per
optimizer step) as a horizontal line per phase, and |G|²/tr Σ = 1/B_simple (from the EMA) on a
second axis; for a run without noise rows (older metrics.csv) that panel says so.
Below, when the optimizer reported GSNR statistics, the per-layer mean GSNR and the per-layer
fraction of elements whose normalized GSNR was clipped. A dashed line marks the start of phase 2.

    python scripts/plot_metrics.py outputs/demo/metrics.csv               # -> outputs/demo/metrics.png
    python scripts/plot_metrics.py outputs/demo/metrics.csv -o plot.png

From Python: ``plot_metrics(csv_path, png_path)``.
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

# Per-layer statistics to plot, first match wins: the names the VR optimizers report.
GSNR_KEYS = ("gsnr_mean", "gsnr")
CLIP_KEYS = ("gsnr_clip_frac", "clip_frac", "clip_fraction")
BASELINE = "eval/unigram_accuracy"  # accuracy of always predicting the most frequent token
NOISE_EMA, NOISE_STEP, BATCH, LR = "noise/b_simple_ema", "noise/b_simple", "train/batch_size", "train/lr"


def read_metrics(csv_path) -> tuple[dict[str, list[tuple[int, float]]], dict[int, int]]:
    """Name -> [(step, value)] in file order, and phase -> its last step."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    phase_end: dict[int, int] = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            step, phase = int(row["step"]), int(row["phase"])
            series[row["name"]].append((step, float(row["value"])))
            phase_end[phase] = max(step, phase_end.get(phase, step))
    return dict(series), phase_end


def _layer_series(series, keys):
    """Layer name -> points, for the first of ``keys`` that any layer reports."""
    for key in keys:
        found = {
            name.split("/")[1]: pts
            for name, pts in series.items()
            if name.startswith("gsnr_layer/") and name.rsplit("/", 1)[1] == key
        }
        if found:
            return key, found
    return None, {}


def _layer_order(name: str):
    """embeddings, encoder.layer.0, 1, ..., 10, then the rest (the MLM head)."""
    parts = name.split(".")
    if name == "embeddings":
        return (0, 0, name)
    if len(parts) >= 3 and parts[-1].isdigit():
        return (1, int(parts[-1]), name)
    return (2, 0, name)


def _plot_layers(ax, key, layers, title, ylabel, log=False):
    import matplotlib.pyplot as plt

    if not layers:
        ax.text(
            0.5,
            0.5,
            "no per-layer GSNR statistics in this run\n(optimizer without stats_interval)",
            ha="center",
            va="center",
            transform=ax.transAxes,
            color="gray",
        )
        ax.set_title(title)
        return
    names = sorted(layers, key=_layer_order)
    colors = plt.get_cmap("viridis")([i / max(1, len(names) - 1) for i in range(len(names))])
    for name, color in zip(names, colors):
        steps, values = zip(*layers[name])
        ax.plot(steps, values, label=name, color=color, lw=1.2)
    ax.set_title(f"{title} ({key})")
    ax.set_ylabel(ylabel)
    if log and all(v > 0 for pts in layers.values() for _, v in pts):
        ax.set_yscale("log")
    ax.legend(fontsize=7, ncol=2 if len(names) > 8 else 1, loc="best")


def _plot_baseline(ax, points, last_step):
    """The unigram baseline as a horizontal line, each value from its step (a phase's start) to the next."""
    for i, (step, value) in enumerate(points):
        end = points[i + 1][0] if i + 1 < len(points) else last_step
        ax.hlines(
            value,
            step,
            max(end, step + 1),
            colors="tab:red",
            linestyles=":",
            lw=1.5,
            label="unigram baseline (always the most frequent token)" if i == 0 else None,
        )


def _segments(points, last_step):
    """[(start, end, value)] of a per-phase constant logged at many steps: one segment per value run."""
    segments = []
    for step, value in points:
        if segments and segments[-1][2] == value:
            segments[-1][1] = step
        else:
            segments.append([step, step, value])
    for i, seg in enumerate(segments):
        seg[1] = segments[i + 1][0] if i + 1 < len(segments) else max(seg[1], last_step)
    return segments


def _plot_noise(ax, series, last_step):
    """B_simple (EMA bold, per step faint) on a log axis, the batch size, and |G|²/tr Σ on a twin axis."""
    ax.set_title("gradient-noise scale B_simple = tr Σ / |G|²")
    ema = [(s, v) for s, v in series.get(NOISE_EMA, []) if v > 0]
    if not ema:
        ax.text(
            0.5,
            0.5,
            "no gradient-noise statistics in this run\n(no noise/b_simple_ema rows)",
            ha="center",
            va="center",
            transform=ax.transAxes,
            color="gray",
        )
        return
    per_step = [(s, v) for s, v in series.get(NOISE_STEP, []) if v > 0]
    if per_step:
        steps, values = zip(*per_step)
        ax.plot(steps, values, ".", color="tab:purple", alpha=0.25, ms=3, label="B_simple (each step)")
    steps, values = zip(*ema)
    ax.plot(steps, values, "-", color="tab:purple", lw=1.8, label="B_simple (EMA) ≈ critical batch")
    for i, (start, end, batch) in enumerate(_segments(series.get(BATCH, []), last_step)):
        ax.hlines(
            batch,
            start,
            max(end, start + 1),
            colors="black",
            linestyles="--",
            lw=1.2,
            label="batch size B of this run" if i == 0 else None,
        )
    ax.set_yscale("log")
    ax.set_ylabel("examples")
    inv_ax = ax.twinx()
    if len({v for _, v in series.get(BATCH, [])}) > 1 and series.get(LR):  # a batch that follows B_simple
        lr_steps, lrs = zip(*series[LR])
        inv_ax.plot(lr_steps, lrs, ":", color="tab:orange", lw=1.2, label="learning rate (train/lr)")
        inv_ax.set_ylabel("learning rate")
    else:
        inv_ax.plot(steps, [1.0 / v for v in values], ":", color="tab:orange", lw=1.2, label="|G|² / tr Σ (EMA)")
        inv_ax.set_yscale("log")
        inv_ax.set_ylabel("|G|² / tr Σ  (1 / examples)")
    lines, labels = ax.get_legend_handles_labels()
    more_lines, more_labels = inv_ax.get_legend_handles_labels()
    ax.legend(lines + more_lines, labels + more_labels, loc="best", fontsize=7)


def plot_metrics(csv_path, png_path=None) -> Path:
    """Write the figure for ``csv_path`` to ``png_path`` (default: next to the CSV) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    csv_path = Path(csv_path)
    png_path = Path(png_path) if png_path is not None else csv_path.with_suffix(".png")
    series, phase_end = read_metrics(csv_path)

    fig = plt.figure(figsize=(15, 11))
    grid = fig.add_gridspec(3, 2)
    ax = fig.add_subplot(grid[0, 0])
    noise_ax = fig.add_subplot(grid[0, 1], sharex=ax)
    axes = [ax, fig.add_subplot(grid[1, :], sharex=ax), fig.add_subplot(grid[2, :], sharex=ax)]
    for name, label, style in (("train/loss", "train MLM loss", "-"), ("eval/loss", "held-out MLM loss", "o-")):
        if name in series:
            steps, values = zip(*series[name])
            ax.plot(steps, values, style, label=label, ms=3, lw=1.2)
    ax.set_ylabel("loss")
    ax.set_title("masked-LM loss")
    if "eval/accuracy" in series:
        acc_ax = ax.twinx()
        steps, values = zip(*series["eval/accuracy"])
        acc_ax.plot(steps, values, "s--", color="tab:green", ms=3, lw=1, label="held-out masked-token accuracy")
        if "eval/mask_accuracy" in series:
            steps, values = zip(*series["eval/mask_accuracy"])
            acc_ax.plot(steps, values, "^--", color="tab:olive", ms=3, lw=1, label="... at [MASK] inputs only")
        _plot_baseline(acc_ax, series.get(BASELINE, []), max(phase_end.values()))
        acc_ax.set_ylabel("accuracy")
        acc_ax.set_ylim(bottom=0)
        lines, labels = ax.get_legend_handles_labels()
        more_lines, more_labels = acc_ax.get_legend_handles_labels()
        ax.legend(lines + more_lines, labels + more_labels, loc="center right", fontsize=8)
    else:
        ax.legend(loc="upper right", fontsize=8)

    key, layers = _layer_series(series, GSNR_KEYS)
    _plot_layers(axes[1], key, layers, "mean GSNR per layer", "GSNR", log=True)
    key, layers = _layer_series(series, CLIP_KEYS)
    _plot_layers(axes[2], key, layers, "fraction of elements clipped per layer", "fraction")
    axes[2].set_xlabel("optimizer step")
    _plot_noise(noise_ax, series, max(phase_end.values()))
    axes.insert(1, noise_ax)

    for phase, end in sorted(phase_end.items()):
        if phase + 1 in phase_end:  # phase + 1 starts after this phase's last step
            for ax in axes:
                ax.axvline(end, color="gray", ls="--", lw=1)
            for text_ax in axes[:2]:  # above the loss and the noise-scale panels
                text_ax.text(
                    end,
                    1.0,
                    f" phase {phase + 1}",
                    transform=text_ax.get_xaxis_transform(),
                    va="bottom",
                    fontsize=8,
                    color="gray",
                )
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", type=Path, help="metrics CSV written by pretrain_bert.py")
    parser.add_argument("-o", "--output", type=Path, default=None, help="PNG to write (default: the CSV's name, .png)")
    args = parser.parse_args(argv)
    if not args.csv.is_file():
        raise SystemExit(f"{args.csv}: no such file (pretrain_bert.py writes <output-dir>/metrics.csv)")
    print(plot_metrics(args.csv, args.output))


if __name__ == "__main__":
    main()
