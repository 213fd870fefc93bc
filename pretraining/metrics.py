"""What a run writes besides checkpoints: ``metrics.csv`` (one scalar per row), DeepSpeed's monitor
(TensorBoard, W&B, ...) if the config enables one, ``noise_per_tensor.csv`` (each tensor's
gradient-noise statistics) and the progress bar -- per training step in one call
(:meth:`StepLog.step`)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import vrgd_ds
import vrgd_ds.monitor
from pretraining.distributed import log, rank


def vr_optimizer(engine):
    """The VR optimizer inside the engine when it computes GSNR statistics, else None."""
    vr = vrgd_ds.find_vr_optimizer(engine)
    return vr if vr is not None and getattr(vr, "stats_interval", 0) > 0 else None


def layer_of(tensor_name: str) -> str:
    """Group parameter tensors by layer for the plots: embeddings, encoder.layer.N, mlm_head."""
    parts = tensor_name.removeprefix("module.").removeprefix("bert.").split(".")
    if parts[0] == "encoder" and len(parts) > 2:
        return ".".join(parts[:3])
    return {"embeddings": "embeddings", "cls": "mlm_head"}.get(parts[0], parts[0])


LAYER_STATS = ("gsnr_mean", "clip_frac", "scale_mean")  # per-tensor statistics averaged per layer


def gsnr_metrics(vr, after_step: float) -> tuple[float, dict[str, float]]:
    """(optimizer step, metrics) of the optimizer's latest GSNR statistics if newer than ``after_step``.

    ``gsnr/<key>``: the optimizer's summary (element-weighted over all tensors);
    ``gsnr_layer/<layer>/<key>``: element-weighted means over each layer's tensors.
    The optimizer keeps its last statistics between statistics steps (``stats_interval``).
    """
    summary = vr.gsnr_summary() if vr is not None else None
    if not summary or summary["step"] <= after_step:
        return after_step, {}
    out = {f"gsnr/{k}": float(v) for k, v in summary.items() if k != "step"}
    layers: dict[str, dict[str, list[float]]] = {}
    for name, stats in vr.gsnr_stats().items():
        sums = layers.setdefault(layer_of(name), {})
        weight = stats.get("numel", 1.0)
        for key in LAYER_STATS:
            if key in stats:
                total, count = sums.get(key, (0.0, 0.0))
                sums[key] = (total + weight * stats[key], count + weight)
    for layer, sums in layers.items():
        for key, (total, count) in sums.items():
            out[f"gsnr_layer/{layer}/{key}"] = total / count
    return summary["step"], out


# Global gradient-noise statistics (VR optimizer's noise_stats(), README "Gradient-noise statistics")
# logged to metrics.csv as noise/<key>.
NOISE_KEYS = ("b_simple", "b_simple_ema", "grad_norm_sq", "noise_trace", "k", "gsnr_unbiased_mean")


def noise_metrics(stats: dict) -> dict[str, float]:
    """``noise/<key>`` for the global statistics of a ``noise_stats()`` dict; non-finite values
    (an estimate that is not a number yet) and absent keys are left out."""
    out = {}
    for key in NOISE_KEYS:
        value = stats.get(key)
        if isinstance(value, torch.Tensor):
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[f"noise/{key}"] = float(value)
    return out


def critical_batch_metrics(batch_size: int, b_simple: float | None) -> dict[str, float]:
    """The relations behind ``vrgd_ds.critical_batch_summary`` as metrics (VRGD.md §5): the examples
    (``noise/examples_vs_critical`` = (1 + B/B_simple)/2) and steps (``noise/steps_vs_critical`` =
    (1 + B_simple/B)/2) this batch needs relative to one at the critical size; {} without an estimate."""
    if b_simple is None or not math.isfinite(b_simple) or b_simple <= 0:
        return {}
    return {
        "noise/critical_batch": b_simple,
        "noise/examples_vs_critical": (1 + batch_size / b_simple) / 2,
        "noise/steps_vs_critical": (1 + b_simple / batch_size) / 2,
    }


def open_noise_csv(path: Path, resume_step: int | None) -> vrgd_ds.monitor.LongCSVWriter:
    """The per-tensor noise-statistics CSV (rank 0 writes). A fresh run starts it over; a resumed run
    keeps the rows up to its checkpoint's step (later ones would be written again)."""
    if rank() == 0 and path.exists():
        if resume_step is None:
            path.unlink()
        else:
            with open(path, newline="") as f:
                rows = list(csv.reader(f))
            if rows and tuple(rows[0]) == vrgd_ds.monitor.LongCSVWriter.COLUMNS:
                kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= resume_step]
                with open(path, "w", newline="") as f:
                    csv.writer(f).writerows(kept)
    return vrgd_ds.monitor.LongCSVWriter(path, rank=rank())


class Metrics:
    """Scalars to ``metrics.csv`` (always) and to DeepSpeed's monitor (TensorBoard, W&B, ...) if enabled."""

    FIELDS = ("step", "phase", "name", "value")

    def __init__(self, path: Path, resume_step: int | None):
        self.path, self.monitor = path, None
        if rank() != 0:
            return
        rows = []
        if resume_step is not None and path.exists():
            # Rows written after the checkpoint we resume from would be written again: drop them.
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, self.FIELDS)
            writer.writeheader()
            writer.writerows(rows)

    def write(self, step: int, phase: int, values: dict[str, float], to_monitor: bool = True):
        """Append rows to metrics.csv; also to the monitor unless ``to_monitor`` is False (the noise
        statistics reach it through vrgd_ds.monitor.log_noise_stats, indexed by samples)."""
        if rank() != 0 or not values:
            return
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerows((step, phase, name, f"{value:.6g}") for name, value in values.items())
        if to_monitor and self.monitor is not None and self.monitor.enabled:
            self.monitor.write_events([(name, value, step) for name, value in values.items()])


class StepLog:
    """Everything one phase's loop logs per optimizer step, in one call: :meth:`step`.

    Every step: the optimizer's GSNR statistics when they are new (``gsnr/*``, ``gsnr_layer/*``)
    and its gradient-noise statistics to DeepSpeed's monitor. Every ``log_interval`` steps and at
    the phase's end: the loss averaged over the steps since the last row and over the ranks, the
    LR, the batch size and the throughput (``train/*``), the global noise statistics
    (``noise/*``) and each tensor's (``noise_csv``). The progress bar (rank 0) shows the same.

    ``loss_sum`` and ``steps_since_log`` (:meth:`state`) ride along in checkpoints, so that a
    resumed run logs the numbers the uninterrupted one does.
    """

    def __init__(
        self,
        engine,
        phase,
        metrics: Metrics,
        noise_csv: vrgd_ds.monitor.LongCSVWriter | None,
        log_interval: int,
        step_offset: int,
        start: int,
        loss_sum: float = 0.0,
        steps_since_log: int = 0,
        samples_since_log: int | None = None,
    ):
        self.engine, self.phase, self.metrics, self.noise_csv = engine, phase, metrics, noise_csv
        self.log_interval, self.step_offset = log_interval, step_offset
        self.loss_sum, self.steps_since_log, self.train_time = loss_sum, steps_since_log, 0.0
        if samples_since_log is None:  # checkpoints before --batch-schedule: a fixed batch
            samples_since_log = steps_since_log * phase.train_batch_size
        self.samples_since_log = samples_since_log
        self.vr = vr_optimizer(engine)
        self.noise_source = vrgd_ds.find_vr_optimizer(engine)  # its noise_stats(): B_simple etc., every step
        self.stats_step, self.gsnr_postfix, self.noise = -1.0, {}, {}
        self.bar = tqdm(
            total=phase.steps,
            initial=start,
            desc=f"phase {phase.number} seq {phase.seq_len}",
            disable=rank() != 0,
            dynamic_ncols=True,
            mininterval=0.5,
        )

    def state(self) -> dict:
        return {
            "loss_sum": self.loss_sum,
            "steps_since_log": self.steps_since_log,
            "samples_since_log": self.samples_since_log,
        }

    def step(self, done: int, lr: float, losses: list[float], seconds: float):
        """Optimizer step ``done`` (1-based, within the phase) ran at ``lr`` in ``seconds`` of
        training (eval and checkpoints aside); ``losses``: this rank's micro-batch losses."""
        phase = self.phase
        for loss in losses:
            self.loss_sum += loss / len(losses)
        self.train_time += seconds
        self.steps_since_log += 1
        batch = self.engine.train_batch_size()  # this step's (--batch-schedule critical changes it after)
        self.samples_since_log += batch
        self.last_batch = batch
        global_step = self.step_offset + done
        self.stats_step, gsnr = gsnr_metrics(self.vr, self.stats_step)
        self.metrics.write(global_step, phase.number, gsnr)

        postfix = {"loss": f"{self.loss_sum / self.steps_since_log:.3f}", "lr": f"{lr:.2e}"}
        if batch != phase.train_batch_size:
            postfix["batch"] = batch
        if gsnr:  # new statistics this step; the bar keeps showing the last ones in between
            self.gsnr_postfix = {
                short: f"{gsnr[name]:.3g}"
                for short, name in (("gsnr", "gsnr/gsnr_mean"), ("clip", "gsnr/gsnr_clip_frac"))
                if name in gsnr
            }
        postfix.update(self.gsnr_postfix)
        if self.noise_source is not None:
            self.noise = self.noise_source.noise_stats()  # {} before the first step and while statistics are off
            if self.noise and self.engine.monitor is not None:
                vrgd_ds.monitor.log_noise_stats(self.engine)  # TensorBoard/W&B/CSV monitor, if configured
            noise_row = noise_metrics(self.noise)
            if "noise/b_simple_ema" in noise_row:
                postfix["B_simple"] = f"{noise_row['noise/b_simple_ema']:.3g}"
        if done % self.log_interval == 0 or done == phase.steps:
            mean_loss = torch.tensor([self.loss_sum / self.steps_since_log])
            dist.all_reduce(mean_loss)
            samples = self.samples_since_log
            row = {
                "train/loss": mean_loss.item() / dist.get_world_size(),
                "train/lr": lr,
                "train/batch_size": batch,
                "train/samples_per_s": samples / self.train_time,
                "train/tokens_per_s": samples * phase.seq_len / self.train_time,
            }
            self.metrics.write(global_step, phase.number, row)
            if self.noise_source is not None and self.noise:
                self.metrics.write(global_step, phase.number, noise_metrics(self.noise), to_monitor=False)
                if self.noise_csv is not None:
                    self.noise_csv.write_noise_stats(self.noise, global_step)
            postfix.update(
                loss=f"{row['train/loss']:.3f}",
                samples_s=f"{row['train/samples_per_s']:.0f}",
                tokens_s=f"{row['train/tokens_per_s']:.0f}",
            )
            self.loss_sum, self.steps_since_log, self.train_time, self.samples_since_log = 0.0, 0, 0.0, 0
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def close(self):
        self.bar.close()

    def finish(self):
        """The phase's end: close the bar; the critical batch size from the final averaged noise scale."""
        self.close()
        if self.noise:
            batch = getattr(self, "last_batch", self.phase.train_batch_size)  # the last step's
            b_ema = noise_metrics(self.noise).get("noise/b_simple_ema")
            log(f"phase {self.phase.number}: {vrgd_ds.critical_batch_summary(batch, b_ema)}")
            self.metrics.write(
                self.step_offset + self.phase.steps,
                self.phase.number,
                critical_batch_metrics(batch, b_ema),
                to_monitor=False,
            )
