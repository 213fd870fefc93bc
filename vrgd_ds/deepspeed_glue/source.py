"""What every DeepSpeed moment source shares: :class:`DeepSpeedMomentSource`.

It implements the :class:`~vrgd_ds.moments.MomentSource` protocol the optimizer relies on (see
vrgd_ds/moments.py for the order of calls) for sources whose first moment is the gradient
DeepSpeed already reduced and whose second moment is Σg² on the tensors the inner optimizer
updates (``sq[id(inner)]``, flat fp32, the same size as the inner tensor). A wrapper kind's
subclass (stage0, zero12, bf16, zero3 modules) supplies the hooks that fill ``sq`` and
:meth:`~DeepSpeedMomentSource.ensure_reduced`; its wiring calls, per optimizer step:

1. :meth:`~DeepSpeedMomentSource.prepare` on the inner tensors just before DeepSpeed unscales
   and clips their gradients (a wrapped ``unscale_and_clip_grads``, ``clip_fp32_gradients`` or
   ``step``): raw r = gsnr_from_moments(w·G, Σg², k) overwrites Σg² in place (VRGD.md eq. 7;
   DeepSpeed averages over the w data-parallel ranks, so Σ_samples g = w·G in the samples'
   units: same loss scale, same 1/gas), and the statistics' [Σ S², Σ Q] per tensor are taken
   first (S = w·G);
2. :meth:`~DeepSpeedMomentSource.clear` after the wrapper's whole step (every param group, or a
   step skipped on fp16 overflow): the step's noise statistics are finished once, every
   accumulator is zeroed and the sample counts forgotten.

Public surface beyond the protocol, for tools and tests: ``local_samples`` (this step's
micro-batches on this rank), :meth:`~DeepSpeedMomentSource.num_samples` (k),
:meth:`~DeepSpeedMomentSource.is_clear`, :meth:`~DeepSpeedMomentSource.extra_buffer_bytes`.
Reach an engine's source by ``vrgd_ds.find_vr_optimizer(engine).moment_source``.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..gsnr import gsnr_from_moments
from ..optimizer import VROptimizer
from ..samples import MicroBatchSamples
from ..segments import SegmentLayout

__all__ = ["DeepSpeedMomentSource", "wrap_method"]


class DeepSpeedMomentSource:
    """Σg² of this step's micro-batches on the tensors the inner optimizer updates.

    ``sq[id(inner)]`` is a flat fp32 view, the same size as the inner tensor (a ZeRO partition
    or, at stage 0, a parameter's master copy); :meth:`prepare` turns it into raw r in place.
    """

    checks_finite_locally = False
    # ZeRO calls the inner step() once per param group: statistics are finished in clear().
    ends_step_in_step = False

    def __init__(self, optimizer: VROptimizer, world_size: int, group, names: dict[int, str] | None = None):
        self.optimizer = optimizer
        # c of sample = c · (gradient of one micro-batch's loss): loss scale / gas, set by attach.
        self.loss_scale_fn = lambda: 1.0
        self.gas = 1
        self._sample_loss_scale = 1.0
        self._moment_sums: dict[int, Tensor] = {}
        self.world_size = world_size
        self.group = group
        # Gradient pieces → one sample per micro-batch (reentrant activation checkpointing).
        self.samples = MicroBatchSamples(names)
        #: Micro-batches of this step seen on this rank so far (the most samples any tensor got).
        self.local_samples = 0
        self._hook_counts: dict[int, int] = {}
        self._prepared: set[int] = set()
        self._reduced = False
        self.handles = []
        self.sq: dict[int, Tensor] = {}

    # -- hooks -------------------------------------------------------------------------------
    def _count(self, p: Tensor) -> None:
        if self.local_samples == 0:  # the scale the samples carry (DeepSpeed may change it in step())
            self._sample_loss_scale = float(self.loss_scale_fn())
        c = self._hook_counts.get(id(p), 0) + 1
        self._hook_counts[id(p)] = c
        if c > self.local_samples:
            self.local_samples = c

    def num_samples(self) -> int:
        # Every rank runs the same number of micro-batches per step (DeepSpeed's
        # gradient_accumulation_steps), so k = world size × local micro-batches.
        return self.local_samples * self.world_size

    # -- the step protocol used by VROptimizer.step -------------------------------------------
    def finalize(self) -> int:
        self.ensure_reduced()
        return self.num_samples()

    def all_finite(self) -> bool:
        return True

    def _eps_of(self, p: Tensor) -> float:
        for group in self.optimizer.param_groups:
            if any(q is p for q in group["params"]):
                return group["gsnr_eps"]
        return self.optimizer.defaults["gsnr_eps"]

    def sample_scale(self) -> float:
        return self._sample_loss_scale / self.gas

    def moment_sums(self, p: Tensor, layout: SegmentLayout) -> Tensor:
        """[Σ_j S_j², Σ_j Q_j] of this rank's elements of ``p``, formed in :meth:`prepare`."""
        if id(p) not in self._prepared:
            self.prepare([p])
        return self._moment_sums[id(p)]

    def prepare(self, inner_params) -> None:
        """Raw r from the reduced, not yet unscaled or clipped gradient; in place of Σg²."""
        self.ensure_reduced()
        k = self.num_samples()
        for p in inner_params:
            if p.grad is None or id(p) in self._prepared or id(p) not in self.sq:
                continue
            sq = self.sq[id(p)]
            if self.optimizer.gradient_stats:
                layout = self.optimizer.layout_of(p)
                grad = p.grad.reshape(-1)
                # S = world size · G (DeepSpeed averages over ranks), same units as the samples.
                self._moment_sums[id(p)] = torch.cat(
                    [
                        layout.local_sums([grad.float()], squares=True).view(-1) * float(self.world_size) ** 2,
                        layout.local_sums([sq]).view(-1),
                    ]
                )
            if not self.optimizer.vr:
                self._prepared.add(id(p))
                continue
            # DeepSpeed averages over ranks: Σ_samples g = world_size · G (same loss scale, same
            # 1/gas as the samples, so r needs no unscaling).
            gsnr_from_moments(p.grad.reshape(-1), sq, k, self._eps_of(p), sum_scale=self.world_size, out=sq)
            self._prepared.add(id(p))

    def raw_gsnr(self, p: Tensor, eps: float) -> Tensor:
        if id(p) not in self._prepared:
            self.prepare([p])
        return self.sq[id(p)]

    def after_inner_step(self) -> None:
        """Nothing per ``step()`` call: ZeRO calls step() once per param group; :meth:`clear`
        runs after the wrapper's whole step."""

    def on_zero_grad(self) -> None:
        """Nothing: DeepSpeed zeroes gradients itself around its steps; :meth:`clear` empties
        the accumulators after every wrapper step, applied or skipped."""

    def clear(self) -> None:
        """After the wrapper's whole step (every param group): one set of noise statistics, and
        nothing of this step left (:meth:`is_clear`)."""
        self.optimizer.finish_noise_stats()
        self._moment_sums.clear()
        self.samples.discard()
        for buf in self._buffers_to_zero():
            buf.zero_()
        self._hook_counts.clear()
        self.local_samples = 0
        self._prepared.clear()
        self._reduced = False

    def is_clear(self) -> bool:
        """True when nothing of a step is pending: no gradient sample counted (in total or for
        any tensor) and every accumulation buffer zero — the state :meth:`clear` leaves, which a
        step skipped on fp16 overflow must leave too (its samples may not reach the next step)."""
        return (
            self.local_samples == 0
            and not self._hook_counts
            and all(float(b.abs().sum()) == 0 for b in self._buffers_to_zero())
        )

    def watch(self, params) -> None:
        raise RuntimeError(
            "vrgd_ds: a param group was added to the optimizer after deepspeed.initialize; DeepSpeed has "
            "already partitioned the groups it was given. Pass every param group to deepspeed.initialize."
        )

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def ensure_reduced(self) -> None:  # pragma: no cover - overridden
        """Complete Σg² on the inner tensors (once per step; the wrapper kind's collectives)."""
        raise NotImplementedError

    def _buffers_to_zero(self):  # pragma: no cover - overridden
        raise NotImplementedError

    def extra_buffer_bytes(self) -> dict[str, int]:  # pragma: no cover - overridden
        """{description: bytes} of the buffers this source allocated on this rank."""
        raise NotImplementedError


def wrap_method(obj, name: str, before=None, after=None) -> None:
    """Replace ``obj.name`` (an instance attribute) by a wrapper that calls ``before(*args)``
    first and ``after()`` last (also when the method raises)."""
    original = getattr(obj, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        if before is not None:
            before(*args, **kwargs)
        try:
            return original(*args, **kwargs)
        finally:
            if after is not None:
                after()

    setattr(obj, name, wrapper)
