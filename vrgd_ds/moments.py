"""The moment-source protocol: what :class:`~vrgd_ds.optimizer.VROptimizer` needs from whatever
collects the k gradient samples of a step (VRGD.md §1).

Implementations: :class:`~vrgd_ds.collect.GradientMomentCollector` (plain PyTorch and DDP: Σg and
Σg² of whole tensors, one all-reduce), and the DeepSpeed sources of :mod:`vrgd_ds.deepspeed_glue`
— :class:`~vrgd_ds.deepspeed_glue.source.DeepSpeedMomentSource` and one subclass per wrapper kind
(``stage0``, ``zero12``, ``bf16``, ``zero3`` modules): Σg² on the tensors the wrapper hands the
inner optimizer; the first moment is DeepSpeed's own reduced gradient. A new partition kind is a
new source plus a :class:`~vrgd_ds.segments.SegmentLayout` per tensor it hands over. The
optimizer reaches its source as ``optimizer.moment_source`` (under DeepSpeed:
``vrgd_ds.find_vr_optimizer(engine).moment_source``); its step relies on nothing beyond this protocol.

Order within one optimizer step: ``finalize`` once (k) → per tensor the optimizer updates:
``moment_sums`` (before ``raw_gsnr``, which may overwrite Σg² with r), ``raw_gsnr``,
``tensor_sample_counts`` → ``after_inner_step`` at the end of each ``step()`` call. DeepSpeed's
ZeRO wrappers call ``step()`` once per param group (or sub-group): those sources finish the whole
step themselves, after the wrapper's step (``ends_step_in_step`` False).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

from .segments import SegmentLayout

__all__ = ["MomentSource"]


@runtime_checkable
class MomentSource(Protocol):
    #: All moments are complete on every rank after finalize(), so a local non-finite check gives
    #: every rank the same answer (else the check rides in the per-tensor all-reduce).
    checks_finite_locally: bool
    #: Each ``step()`` call is a whole optimizer step (plain PyTorch); False under ZeRO.
    ends_step_in_step: bool

    def finalize(self) -> int:
        """Complete this step's moments (collectives, once per step); returns k."""

    def all_finite(self) -> bool:
        """No NaN/inf among the moments (meaningful where ``checks_finite_locally``)."""

    def moment_sums(self, p: Tensor, layout: SegmentLayout) -> Tensor:
        """[Σ_j S_j² per tensor, Σ_j Q_j per tensor] of this rank's elements of ``p`` (2·n
        floats, partial sums to be completed by ``layout.complete``), in sample units."""

    def raw_gsnr(self, p: Tensor, eps: float) -> Tensor:
        """Element-wise r of ``p`` (flat fp32, VRGD.md eq. 7); may be the Σg² buffer itself."""

    def tensor_sample_counts(self, p: Tensor, layout: SegmentLayout) -> Tensor | None:
        """Gradient samples of each tensor of ``layout`` on this rank (completed by the
        optimizer), or None when every tensor with a ``.grad`` had samples."""

    def sample_scale(self) -> float:
        """c with sample = c · (gradient of one micro-batch's mean loss), for the statistics."""

    def after_inner_step(self) -> None:
        """End of one ``step()`` call (or of a step skipped by the optimizer)."""

    def on_zero_grad(self) -> None:
        """The user zeroed the gradients: samples of a step not taken are forgotten."""

    def watch(self, params: list[Tensor]) -> None:
        """The optimizer got a param group after construction (``add_param_group``, between
        steps): take gradient samples of ``params`` too, or raise if this source cannot."""

    def remove(self) -> None:
        """Remove the hooks (the source is replaced)."""
