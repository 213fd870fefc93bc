"""Gradient-noise statistics in the Hugging Face Trainer's logs.

::

    from vrgd_ds.hf import add_noise_stats_callback
    trainer = Trainer(model=model, args=args, ...)      # a vrgd_ds optimizer, directly or via DeepSpeed
    add_noise_stats_callback(trainer)                    # before trainer.train()

Every logging step then carries ``noise/k``, ``noise/grad_norm_sq``, ``noise/noise_trace``,
``noise/b_simple`` and ``noise/b_simple_ema`` (VRGD.md §5) — in ``trainer.state.log_history``,
the console / progress bar and the ``report_to`` integrations (TensorBoard, W&B, ...).

This module imports ``transformers``; ``import vrgd_ds`` does not import this module, so the
package works without transformers installed.
"""

from __future__ import annotations

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - transformers is a dependency of the package
    raise ImportError("vrgd_ds.hf needs transformers: `pip install transformers`.") from exc

from .monitor import find_noise_source

__all__ = ["HF_KEYS", "NoiseStatsCallback", "add_noise_stats_callback"]

#: The global statistics put into the logs (keys of ``noise_stats()``).
HF_KEYS = ("k", "grad_norm_sq", "noise_trace", "b_simple", "b_simple_ema")
_MISSING = object()


class NoiseStatsCallback(TrainerCallback):
    """Adds the global gradient-noise statistics to every ``Trainer`` log (``on_log``).

    The optimizer is ``optimizer=`` when given, else the one the Trainer passes to callbacks
    (``trainer.optimizer``: the VR optimizer itself, or under DeepSpeed/accelerate a wrapper
    around it, searched with :func:`vrgd_ds.monitor.find_noise_source`). Nothing is added
    before the first optimizer step, or when the optimizer has no ``noise_stats()``.

    Values go into the ``logs`` dict in place and into the entry the Trainer has just appended
    to ``state.log_history`` for it. Callbacks run in order, and ``Trainer(callbacks=[...])``
    puts user callbacks *after* the ``report_to`` integrations: register with
    :func:`add_noise_stats_callback` so that TensorBoard / W&B see the values too.

    Args:
        optimizer: the optimizer (or an engine / wrapper holding it); default: the Trainer's.
        prefix: key prefix in the logs (default ``"noise/"``; W&B shows ``train/noise/...``).
        keys: which keys of ``noise_stats()`` to log (default :data:`HF_KEYS`).
    """

    def __init__(self, optimizer=None, prefix: str = "noise/", keys=HF_KEYS):
        self.optimizer = optimizer
        self.prefix = prefix
        self.keys = tuple(keys)

    def _source(self, optimizer):
        return find_noise_source(self.optimizer if self.optimizer is not None else optimizer)

    def noise_logs(self, optimizer=None) -> dict:
        """The log entries for the current statistics ({} when there are none)."""
        source = self._source(optimizer)
        stats = source.noise_stats() if source is not None else None
        if not stats:
            return {}
        out = {}
        for key in self.keys:
            value = stats.get(key)
            if value is None:
                continue
            out[self.prefix + key] = int(value) if key == "k" else float(value)
        return out

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not any(k in logs for k in ("loss", "learning_rate", "grad_norm")):
            return  # an evaluation / final-metrics log: no optimizer step behind it
        extra = self.noise_logs(kwargs.get("optimizer"))
        if not extra:
            return
        # Trainer.log appended {**logs, "step": global_step} to log_history just before on_log.
        history = getattr(state, "log_history", None)
        last = history[-1] if history else None
        if (
            last is not None
            and last.get("step") == state.global_step
            and all(last.get(key, _MISSING) is value for key, value in logs.items())
        ):
            last.update(extra)
        logs.update(extra)


def add_noise_stats_callback(trainer, **kwargs) -> NoiseStatsCallback:
    """Create a :class:`NoiseStatsCallback` (``kwargs`` to its constructor) and register it with
    ``trainer`` *first*, ahead of the ``report_to`` integrations, so that they log its values.
    Returns the callback."""
    callback = NoiseStatsCallback(**kwargs)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
