"""Device → host reads: the one door through which vrgd_ds reads values back during training.

On an accelerator each read is a device sync (the host waits for every kernel queued before it),
so the step is built to need few: the decisions of one flat tensor and its noise-statistics
vectors share one read (``VROptimizer._layer_gsnr``), the sample counts of stage 0 one per step.
:func:`read` counts them, so ``bench_overhead.py --host-proxy`` can report device syncs per step
without a device (on the CPU a "read" copies nothing, but the call sites are the same).
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["read", "reads"]

_reads = 0


def read(t: Tensor) -> Tensor:
    """``t`` on the host (one transfer; a device sync on an accelerator), counted by :func:`reads`."""
    global _reads
    _reads += 1
    return t.detach().to("cpu")


def reads() -> int:
    """Reads through :func:`read` in this process so far."""
    return _reads
