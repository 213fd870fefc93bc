"""Gradient-noise statistics to DeepSpeed's monitor and to one long-format CSV.

One line after ``engine.step()`` in a user's own DeepSpeed loop::

    from vrgd_ds.monitor import LongCSVWriter, log_noise_stats
    per_layer = LongCSVWriter("outputs/noise_per_tensor.csv")         # optional
    for batch in loader:
        engine.backward(engine(batch)); engine.step()
        log_noise_stats(engine, csv_writer=per_layer)                  # TensorBoard / W&B / CSV monitor

The statistics are :meth:`VROptimizer.noise_stats` (VRGD.md §5): the same numbers on every rank,
so calling this on every rank is fine; DeepSpeed's monitor and :class:`LongCSVWriter` write on
rank 0 only.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable
from typing import Any

__all__ = ["GLOBAL_KEYS", "PER_TENSOR_KEYS", "LongCSVWriter", "find_noise_source", "log_noise_stats", "noise_events"]

#: The global statistics written as scalars (keys of ``noise_stats()``).
GLOBAL_KEYS = ("k", "grad_norm_sq", "noise_trace", "b_simple", "b_simple_ema", "gsnr_unbiased_mean")
#: The per-tensor statistics (keys of ``noise_stats()["per_tensor"][name]``), in CSV order.
PER_TENSOR_KEYS = (
    "grad_norm_sq",
    "noise_trace",
    "b_simple",
    "gsnr_unbiased_mean",
    "gsnr_unbiased_q10",
    "gsnr_unbiased_q50",
    "gsnr_unbiased_q90",
)
#: DeepSpeed's own monitor events are "Train/Samples/<name>" at step = engine.global_samples.
DEFAULT_PREFIX = "Train/Samples/noise/"


def find_noise_source(obj) -> Any:
    """The object whose ``noise_stats()`` to call inside ``obj``: a DeepSpeed engine, a ZeRO or
    accelerate optimizer wrapper, a VR optimizer itself — or None.

    :func:`vrgd_ds.find_vr_optimizer` first; otherwise the same walk through
    ``.basic_optimizer`` / ``.optimizer`` for any object with a callable ``noise_stats``.
    """
    from . import find_vr_optimizer

    found = find_vr_optimizer(obj)
    if found is not None:
        return found
    seen = set()
    while obj is not None and id(obj) not in seen:
        if callable(getattr(obj, "noise_stats", None)):
            return obj
        seen.add(id(obj))
        obj = next(
            (
                c
                for c in (getattr(obj, a, None) for a in ("basic_optimizer", "optimizer"))
                if c is not None and id(c) not in seen
            ),
            None,
        )
    return None


def _scalar(value) -> float | None:
    """A loggable float, or None for values that are not numbers (None, a missing b)."""
    if value is None or isinstance(value, (str, bytes, dict, list, tuple)):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def noise_events(stats: dict | None, step: int, prefix: str = DEFAULT_PREFIX, per_tensor: bool = False) -> list:
    """DeepSpeed monitor events ``(name, value, step)`` for a ``noise_stats()`` dict: the
    :data:`GLOBAL_KEYS` present (values that are None are left out; NaN is kept), then, with
    ``per_tensor``, ``f"{prefix}{tensor}/{key}"`` for :data:`PER_TENSOR_KEYS`. Empty for an empty
    or None ``stats`` (before the first step)."""
    if not stats:
        return []
    events = []
    for key in GLOBAL_KEYS:
        value = _scalar(stats.get(key))
        if value is not None:
            events.append((prefix + key, value, step))
    if per_tensor:
        for name, entry in (stats.get("per_tensor") or {}).items():
            for key in PER_TENSOR_KEYS:
                value = _scalar(entry.get(key))
                if value is not None:
                    events.append((f"{prefix}{name}/{key}", value, step))
    return events


def log_noise_stats(
    engine_or_optimizer,
    monitor=None,
    step: int | None = None,
    per_tensor: bool = False,
    prefix: str = DEFAULT_PREFIX,
    csv_writer: LongCSVWriter | None = None,
) -> list:
    """Write this step's gradient-noise statistics to DeepSpeed's monitor (and optionally a CSV).

    Call after ``engine.step()``. Finds the VR optimizer in ``engine_or_optimizer``
    (:func:`find_noise_source`), reads ``noise_stats()`` and writes :func:`noise_events` with
    ``monitor.write_events`` — TensorBoard, W&B, CSV or Comet, as configured in the DeepSpeed
    config's monitor sections (which write on rank 0 only). Before the first step, or while the
    statistics are off, ``noise_stats()`` is empty and nothing is written.

    Args:
        engine_or_optimizer: a DeepSpeed engine, or the optimizer (then pass ``monitor`` and
            ``step``).
        monitor: default ``engine.monitor``; anything with ``write_events([(name, value, step)])``.
            A monitor whose ``enabled`` is False is skipped (no monitor configured).
        step: default ``engine.global_samples``: DeepSpeed's monitors are indexed by samples
            (W&B drops scalars logged at a step smaller than an earlier one, so mixing steps and
            samples loses data).
        per_tensor: also write every tensor's statistics (many scalars: prefer ``csv_writer``).
        prefix: event-name prefix (default ``"Train/Samples/noise/"``, next to DeepSpeed's own
            ``Train/Samples/lr``).
        csv_writer: a :class:`LongCSVWriter` that also receives the per-tensor statistics.
    Returns:
        The events written to the monitor ([] when none).
    Raises:
        ValueError: no VR optimizer inside ``engine_or_optimizer``, or no monitor / step given
            where they cannot be found.
    """
    source = find_noise_source(engine_or_optimizer)
    if source is None:
        raise ValueError(
            f"log_noise_stats: no VR optimizer in {type(engine_or_optimizer).__name__}; pass a DeepSpeed "
            'engine built with a vrgd_ds optimizer type (e.g. "type": "VRLamb") or the VR optimizer.'
        )
    if monitor is None:
        monitor = getattr(engine_or_optimizer, "monitor", None)
        if monitor is None:
            raise ValueError(
                "log_noise_stats: no monitor: pass monitor= (anything with write_events) or a DeepSpeed "
                "engine (engine.monitor)."
            )
    if step is None:
        step = getattr(engine_or_optimizer, "global_samples", None)
        if step is None:
            raise ValueError(
                "log_noise_stats: no step: pass step= (DeepSpeed's monitors use samples: "
                "engine.global_samples) or a DeepSpeed engine."
            )
    stats = source.noise_stats()
    if not stats:
        return []
    if csv_writer is not None:
        csv_writer.write_noise_stats(stats, step)
    if not getattr(monitor, "enabled", True):
        return []
    events = noise_events(stats, step, prefix, per_tensor)
    if events:
        monitor.write_events(events)
    return events


def _default_rank() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:  # pragma: no cover - torch always has torch.distributed
        pass
    return int(os.environ.get("RANK", "0"))


class LongCSVWriter:
    """Per-tensor statistics in ONE long-format CSV: columns ``step, tensor, name, value``.

    One row per (step, tensor, statistic) — the shape pandas/plotting tools pivot as they need
    (``df.pivot_table(index="step", columns=["tensor", "name"], values="value")``), instead of one
    file per metric. Global statistics use the tensor name ``"*"``.

    Appends: the header is written once, when the file is new or empty (a resumed run continues
    the same file; an existing file with another header is refused). Every write is flushed.
    Only rank 0 writes (``rank`` defaults to ``torch.distributed``'s rank, else ``$RANK``, else 0);
    on other ranks every method is a no-op and no file is opened.

    Args:
        path: the CSV file (parent folders are created).
        rank: this process's rank (default: as above).
        global_tensor: the ``tensor`` value for model-wide statistics (default ``"*"``).
    """

    COLUMNS = ("step", "tensor", "name", "value")

    def __init__(self, path: str | os.PathLike, rank: int | None = None, global_tensor: str = "*"):
        self.path = os.fspath(path)
        self.rank = _default_rank() if rank is None else int(rank)
        self.enabled = self.rank == 0
        self.global_tensor = global_tensor
        self._file = None
        self._writer = None

    def _open(self):
        if self._file is None:
            parent = os.path.dirname(self.path)
            if parent:
                os.makedirs(parent, exist_ok=True)
            new = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
            if not new:
                with open(self.path, newline="") as f:
                    header = next(csv.reader(f), None)
                if tuple(header or ()) != self.COLUMNS:
                    raise ValueError(
                        f"{self.path} exists with header {header}, not {list(self.COLUMNS)}: "
                        "choose another path for the long-format statistics CSV."
                    )
            self._file = open(self.path, "a", newline="")  # noqa: SIM115 - kept open across writes; close()
            self._writer = csv.writer(self._file)
            if new:
                self._writer.writerow(self.COLUMNS)
        return self._writer

    def write(self, step: int, rows: Iterable[tuple[str, str, float]]) -> None:
        """Append ``(tensor, name, value)`` rows at ``step``; None values are skipped; flushed."""
        if not self.enabled:
            return
        out = [(step, tensor, name, v) for tensor, name, value in rows if (v := _scalar(value)) is not None]
        if not out:
            return
        writer = self._open()
        writer.writerows(out)
        self._file.flush()

    def write_noise_stats(self, stats: dict | None, step: int, include_global: bool = True) -> None:
        """Append a ``noise_stats()`` dict: the global :data:`GLOBAL_KEYS` (tensor ``"*"``) and
        every tensor's :data:`PER_TENSOR_KEYS`. Nothing for an empty dict."""
        if not self.enabled or not stats:
            return
        rows = []
        if include_global:
            rows += [(self.global_tensor, key, stats.get(key)) for key in GLOBAL_KEYS]
        for tensor, entry in (stats.get("per_tensor") or {}).items():
            rows += [(tensor, key, entry.get(key)) for key in PER_TENSOR_KEYS]
        self.write(step, rows)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self._writer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
