"""Plain-PyTorch gradient-moment collection: every backward's gradient is one GSNR sample.

A tensor hook per parameter sees the gradient of each backward pass *as autograd produced it*
(before it is accumulated into ``.grad``, before clipping or loss-scale unscaling) and adds
g and g² into one flat fp32 buffer. At ``step()`` the buffer (and the sample count) is summed
across the process group, if there is one, in a single all-reduce: k = Σ over ranks of the
micro-batches each rank ran.

Memory: 2·N fp32 (Σg and Σg² for the N elements of the optimizer's parameters), allocated at
the first backward. Σg is collected here rather than read back from ``.grad`` so that r never
depends on what user code does to ``.grad`` after backward.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from .host import read
from .gsnr import gsnr_from_moments
from .samples import MicroBatchSamples

__all__ = ["GradientMomentCollector", "finite_flag", "k_too_small_message"]


def k_too_small_message(k: int) -> str:
    return (
        f"VRGD needs at least 2 gradient samples per optimizer step to estimate the gradient "
        f"variance, got k={k}. Use gradient accumulation >= 2 (run backward on >= 2 micro-batches "
        f"before step()) or >= 2 data-parallel ranks, or pass vr=False for the plain base optimizer."
    )


def finite_flag(grads) -> Tensor | None:
    """On the device: no NaN/inf in any of ``grads`` (sparse ones by their values) — one foreach
    max-norm pass per (device, dtype), no host read; None for no gradients."""
    grads = [g._values() if g.is_sparse else g for g in grads if g is not None]
    if not grads:
        return None
    by_kind: dict = {}
    for grad in grads:
        by_kind.setdefault((grad.device, grad.dtype), []).append(grad)
    flags = [torch.stack(torch._foreach_norm(ts, float("inf"))).isfinite().all() for ts in by_kind.values()]
    return torch.stack([f.to(flags[0].device) for f in flags]).all()


def _numel(p: Tensor) -> int:
    return 2 * p.numel() if p.is_complex() else p.numel()


def _sample(grad: Tensor) -> Tensor:
    """A gradient as the optimizer's elements: a sparse one densified (duplicate indices summed,
    so Σg² is that of the micro-batch's whole gradient: exact), a complex one as its view_as_real."""
    if grad.is_sparse:
        grad = grad.to_dense()
    return torch.view_as_real(grad) if grad.is_complex() else grad


class GradientMomentCollector:
    """Σg, Σg² and the sample count k for a list of parameters, via tensor hooks.

    Args:
        params: the parameters to watch (those of the optimizer).
        process_group: sum moments and counts over this group at :meth:`finalize`. ``None``:
            the default group if ``torch.distributed`` is initialized with > 1 rank, else none.
        names: ``{id(param): name}`` for error messages.
        check_finite: check moments and gradients for NaN/inf in :meth:`finalize` (default True;
            the optimizer passes its ``vr``).
    """

    # The moments are complete after finalize(), so a non-finite check is the same on every rank.
    checks_finite_locally = True
    # all_finite() covers the gradients too (read with k: one read per step).
    all_finite_covers_grads = True
    # Each step() is a whole optimizer step: the optimizer finishes its statistics inside it.
    ends_step_in_step = True
    #: Elements of held samples added at once (one foreach call per moment).
    held_bucket_elements = 1 << 24

    def __init__(
        self,
        params: Iterable[Tensor],
        process_group=None,
        names: dict[int, str] | None = None,
        check_finite: bool = True,
    ):
        self.params = [p for p in params if p.requires_grad]
        # Whether finalize() checks moments and gradients for NaN/inf (a pass over every
        # gradient): only VR's step skips on it; gradient statistics alone need no check.
        self.check_finite = check_finite
        self.process_group = process_group
        self._offsets = {}
        offset = 0
        for p in self.params:
            self._offsets[id(p)] = (offset, _numel(p))
            offset += _numel(p)
        self.numel = offset
        self._buffer: Tensor | None = None  # [Σg | Σg² | k]
        self._samples_per_param = [0] * len(self.params)
        self._finalized_k: int | None = None
        # One sample per micro-batch (one outermost backward pass), see samples.py.
        self.samples = MicroBatchSamples(names)
        # Samples held and added a bucket at a time (_add_held), at the latest when a pass ends.
        self._held: list[tuple[int, Tensor]] = []
        self._held_elements = 0
        self.samples.after_end.append(self._add_held)
        self._handles = [p.register_hook(self.samples.hook(p, self._make_sink(i))) for i, p in enumerate(self.params)]

    def watch(self, params) -> None:
        """Watch ``params`` too (a param group added between steps; moments restart empty)."""
        for p in params:
            if not p.requires_grad or id(p) in self._offsets:
                continue
            index = len(self.params)
            self.params.append(p)
            self._offsets[id(p)] = (self.numel, _numel(p))
            self.numel += _numel(p)
            self._handles.append(p.register_hook(self.samples.hook(p, self._make_sink(index))))
        self._buffer = None  # re-sized at the next sample
        self.reset()

    def _make_sink(self, index: int):
        p = self.params[index]

        key = id(p)

        def add_sample(grad: Tensor) -> None:
            if self._finalized_k is not None:
                self.reset()
            numel = self._offsets[key][1]
            if self._held and self._held_elements + numel > self.held_bucket_elements:
                self._add_held()
            # Held as autograd's own tensor (not a detached alias): while it is referenced
            # autograd copies it into an empty .grad instead of making it the .grad, so nothing —
            # DDP writing reduced values back, a user's in-place edit — can change it before it
            # is added (at the latest when this backward pass ends: _add_held).
            self._held.append((key, grad))
            self._held_elements += numel
            self._samples_per_param[index] += 1
            if self._held_elements >= self.held_bucket_elements:
                self._add_held()

        return add_sample

    def _add_held(self) -> None:
        """The held samples into [Σg | Σg²]: one foreach call per moment for all of them (16-bit
        samples computed in fp32 by the in-place ops, as casting first would)."""
        if not self._held:
            return
        held, self._held, self._held_elements = self._held, [], 0
        buf = self._ensure_buffer(held[0][1].device)
        sums, squares, grads = [], [], []
        for key, grad in held:
            offset, numel = self._offsets[key]
            sums.append(buf[offset : offset + numel])
            squares.append(buf[self.numel + offset : self.numel + offset + numel])
            grads.append(_sample(grad.detach()).reshape(-1))
        torch._foreach_add_(sums, grads)
        torch._foreach_addcmul_(squares, grads, grads)

    def _ensure_buffer(self, device) -> Tensor:
        if self._buffer is None:
            self._buffer = torch.zeros(2 * self.numel + 1, dtype=torch.float32, device=device)
        return self._buffer

    def _group(self):
        if not dist.is_available() or not dist.is_initialized():
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def finalize(self) -> int:
        """Complete the moments across ranks (once per step); returns k."""
        if self._finalized_k is not None:
            return self._finalized_k
        self.samples.end_micro_batch()
        self._add_held()
        device = self.params[0].device if self.params else torch.device("cpu")
        buf = self._ensure_buffer(device)
        # A parameter unused in some micro-batches counts zeros for them: k is the number of
        # backward passes, i.e. the most samples any parameter saw.
        buf[-1] = float(max(self._samples_per_param, default=0))
        group = self._group()
        if group is not None:
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
        # The step's one read: k and whether the moments and the gradients are all finite
        # (all_finite; the gradients are final when step() runs, and the same on every rank).
        flag = torch.isfinite(buf).all() if self.check_finite else torch.ones((), dtype=torch.bool, device=buf.device)
        grads_ok = finite_flag(p.grad for p in self.params) if self.check_finite else None
        if grads_ok is not None:
            flag = flag & grads_ok.to(buf.device)
        k, finite = read(torch.stack([buf[-1], flag.to(buf.dtype)])).tolist()
        self._finalized_k, self._finite = int(round(k)), bool(finite)
        return self._finalized_k

    def all_finite(self) -> bool:
        """Moments and gradients finite (read with k in :meth:`finalize`)."""
        return self._buffer is None or (self.finalize() is not None and self._finite)

    def moment_sums(self, p: Tensor, layout) -> Tensor:
        """[Σ_j S_j², Σ_j Q_j] of ``p`` (complete after :meth:`finalize`); call before
        :meth:`raw_gsnr`, which overwrites Q."""
        offset, numel = self._offsets[id(p)]
        buf = self._buffer
        s, q = buf[offset : offset + numel], buf[self.numel + offset : self.numel + offset + numel]
        return torch.cat([layout.local_sums([s], squares=True).view(-1), layout.local_sums([q]).view(-1)])

    def sample_scale(self) -> float:
        """c with sample = c · (gradient of one micro-batch's loss): the loss of each backward is
        taken to be divided by the number of micro-batches this rank runs per step."""
        return 1.0 / max(max(self._samples_per_param, default=1), 1)

    def raw_gsnr(self, p: Tensor, eps: float) -> Tensor:
        """Element-wise r for parameter ``p`` (flat fp32, a view of the buffer that the optimizer
        may overwrite), after :meth:`finalize`; once per parameter per step."""
        offset, numel = self._offsets[id(p)]
        buf = self._buffer
        # In place of Σg², which nothing reads after r (the buffer is reset after the step).
        grad_sq_sum = buf[self.numel + offset : self.numel + offset + numel]
        return gsnr_from_moments(buf[offset : offset + numel], grad_sq_sum, self._finalized_k, eps, out=grad_sq_sum)

    def tensor_sample_counts(self, p: Tensor, layout) -> None:
        """Whole tensors with a ``.grad`` always had samples: nothing to tell."""
        return None

    def after_inner_step(self) -> None:
        self.reset()

    def on_zero_grad(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget this step's samples (after step(), zero_grad(), or a skipped step)."""
        self.samples.discard()
        self._held, self._held_elements = [], 0
        if self._buffer is not None:
            self._buffer.zero_()
        self._samples_per_param = [0] * len(self.params)
        self._finalized_k = None

    def remove(self) -> None:
        """Remove the hooks and free the buffer (the DeepSpeed glue takes over collection)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._buffer = None

    def buffer_bytes(self) -> int:
        return 0 if self._buffer is None else self._buffer.numel() * self._buffer.element_size()
