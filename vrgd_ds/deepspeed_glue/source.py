"""What every DeepSpeed moment source shares: :class:`DeepSpeedMomentSource`.

It implements the :class:`~vrgd_ds.moments.MomentSource` protocol the optimizer relies on (see
vrgd_ds/moments.py for the order of calls) for sources whose first moment is the gradient
DeepSpeed already reduced and whose second moment is Σg² on the tensors the inner optimizer
updates (``sq[id(inner)]``, flat fp32, the same size as the inner tensor). A wrapper kind's
subclass (stage0, zero12, bf16, zero3 modules) supplies the hooks that fill ``sq`` and
:meth:`~DeepSpeedMomentSource.ensure_reduced`. Its hooks are ``self.samples.hook(p,
self.tied.wrap(p, sink))``: ``sink`` gets one sample per micro-batch (:mod:`vrgd_ds.samples`),
and for a weight tied across pipeline stages the sum of the stages' shares
(:class:`TiedWeightSamples`, completed at the latest in ``_deliver_samples``, the first thing
``ensure_reduced`` does). Its wiring calls, per optimizer step:

1. :meth:`~DeepSpeedMomentSource.prepare` on the inner tensors just before DeepSpeed unscales
   and clips their gradients (a wrapped ``unscale_and_clip_grads``, ``clip_fp32_gradients`` or
   ``step``): raw r = gsnr_from_moments(S, Σg², k) overwrites Σg² in place (VRGD.md eq. 7), and
   the statistics' [Σ S², Σ Q] per tensor are taken first. The first moment S = Σ_samples g is
   w·G, DeepSpeed's reduced gradient (it averages over the w data-parallel ranks; same loss
   scale, same 1/gas as the samples) when G is exact fp32; when it is not — a 16-bit model
   (ZeRO 1/2 accumulate in the model dtype) or 16-bit gradient communication (BF16_Optimizer's
   all-reduce rounds to bf16) — S is the source's own fp32 Σg (``first``), accumulated by the
   same hooks and reduced by the same collective as Σg² (see :attr:`tracks_first`): G's
   relative error ~2⁻⁸ would cancel in 1 − μ²/q wherever r ≳ 30 and land r on the 1/eps cap;
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
from collections import deque

import torch
import torch.distributed as dist
from torch import Tensor

from ..gsnr import gsnr_from_moments
from .ipg_buckets import BucketSamples
from ..optimizer import VROptimizer
from ..samples import MicroBatchSamples
from ..segments import SegmentLayout

__all__ = [
    "DeepSpeedMomentSource",
    "TiedWeightSamples",
    "gradient_is_rounded",
    "tied_weight_groups",
    "wrap_method",
]


def tied_weight_groups(module) -> dict[int, object]:
    """``{id(weight): tie group}`` of the weights a PipelineModule ties across stages
    (``TiedLayerSpec`` keys whose layers sit on more than one stage; pipe/module.py
    ``_index_tied_modules``), in the keys' sorted order (``tied_comms``'), the same on every
    stage; empty for any other module."""
    groups = {}
    for comm in (getattr(module, "tied_comms", None) or {}).values():
        if len(comm.get("ranks", ())) > 1:
            for attr in comm["weight_attr"]:
                groups[id(module._recursive_getattr(comm["module"], attr))] = comm["group"]
    return groups


class TiedWeightSamples:
    """Samples of weights tied across pipeline stages, completed over their tie groups.

    A weight tied across stages (DeepSpeed's ``TiedLayerSpec``, e.g. an embedding reused as the
    output layer) gets one share of each micro-batch's gradient on every stage holding a copy;
    the micro-batch's sample is the SUM of the shares (DeepSpeed sums the accumulated gradients
    the same way once per step, pipe/engine.py:269). :meth:`wrap` sits between a tied weight's
    hook and its sink: each share is copied to fp32 and all-reduced over the tie group *without
    waiting* — a blocking collective inside a hook can deadlock 1F1B (the last stage's hook fires
    before it sends the input gradient the first stage waits for). The sink then gets the
    completed samples in micro-batch order, the same on every copy (so every stage applies the
    same r and the copies stay identical — with the per-tensor sums of the copies agreed on over
    the tie group by their layouts, :mod:`.layouts`, and a per_micro_step owner adding a tied
    weight's Σg² in rank order, :func:`vrgd_ds.comm.reduce_squares_to_owners`):

    * ``eager`` (sinks that only add locally): those already complete whenever the tied weight's
      next share arrives — at most about one per pipeline stage stays in flight;
    * the rest in :meth:`complete`, which the source calls in ``ensure_reduced`` before its
      data-parallel reduction. By then the pipeline has run every backward pass, so every copy
      has issued its all-reduces and waiting cannot deadlock. Sinks that issue collectives of
      their own (ZeRO's ``per_micro_step``) are not eager: when an all-reduce completes differs
      between data-parallel ranks, and their collectives must run in the same order on each.

    Cost: one all-reduce of each tied weight per micro-batch over its tie group, and an fp32
    buffer of its size per sample in flight.
    """

    def __init__(self):
        #: ``{id(weight): tie group}`` (:func:`tied_weight_groups`); read when a share arrives.
        self.groups: dict[int, object] = {}
        self.eager = True
        self._in_flight: deque = deque()  # (work, sample buffer, sink), in micro-batch order

    def wrap(self, p: Tensor, sink):
        """The sink to hook on ``p``: ``sink`` itself, by way of the tie group when ``p`` is tied."""

        def tied_sink(grad: Tensor) -> None:
            group = self.groups.get(id(p))
            if group is None:
                sink(grad)
                return
            sample = grad.detach().to(torch.float32, copy=True)
            self._in_flight.append((dist.all_reduce(sample, group=group, async_op=True), sample, sink))
            if self.eager:
                self._deliver(wait=False)

        return tied_sink

    def _deliver(self, wait: bool) -> None:
        while self._in_flight:
            work, sample, sink = self._in_flight[0]
            if not wait and not work.is_completed():
                return
            work.wait()
            self._in_flight.popleft()
            sink(sample)

    def complete(self) -> None:
        """Every sample still in flight to its sink (waits for the all-reduces)."""
        self._deliver(wait=True)

    def discard(self) -> None:
        """Forget the samples in flight (the step's samples are being thrown away)."""
        for work, _, _ in self._in_flight:
            work.wait()  # the buffers stay alive until the collective is done with them
        self._in_flight.clear()

    def in_flight(self) -> int:
        return len(self._in_flight)


class DeepSpeedMomentSource:
    """Σg² of this step's micro-batches on the tensors the inner optimizer updates.

    ``sq[id(inner)]`` is a flat fp32 view, the same size as the inner tensor (a ZeRO partition
    or, at stage 0, a parameter's master copy); :meth:`prepare` turns it into raw r in place.
    With ``track_first`` (16-bit gradients) ``first[id(inner)]`` is Σg beside it, the first
    moment r and the noise statistics use instead of w·G (module docstring, step 1).
    """

    checks_finite_locally = False
    # ZeRO calls the inner step() once per param group: statistics are finished in clear().
    ends_step_in_step = False
    #: Take samples a bucket at a time where that is exact (zero12's IPG buckets, held hook
    #: samples); False: tensor by tensor everywhere (tests compare the two).
    use_bucket_samples = True
    #: Elements of held hook samples added at once (and of the fp32 staging that packs 16-bit
    #: ones: 2 × 4 bytes each) where DeepSpeed has no bucket of its own to read.
    held_bucket_elements = 1 << 24

    def __init__(
        self,
        optimizer: VROptimizer,
        world_size: int,
        group,
        names: dict[int, str] | None = None,
        track_first: bool = False,
    ):
        self.optimizer = optimizer
        #: Σg is accumulated in fp32 beside Σg² (``first``) because DeepSpeed's G is not exact
        #: fp32 (:func:`gradient_is_rounded`); else S = w·G.
        self.tracks_first = bool(track_first)
        # c of sample = c · (gradient of one micro-batch's loss): loss scale / gas, both read when
        # a step's first sample arrives (DeepSpeed may change the loss scale in step(), and
        # engine.set_train_batch_size the accumulation steps between steps); set by attach.
        self.loss_scale_fn = lambda: 1.0
        self.gas_fn = lambda: 1
        self._sample_loss_scale = 1.0
        self._sample_gas = 1
        self._moment_sums: dict[int, Tensor] = {}
        self.world_size = world_size
        self.group = group
        # Gradient pieces → one sample per micro-batch (reentrant activation checkpointing);
        # hooks are ``self.samples.hook(p, self.tied.wrap(p, sink))``.
        self.samples = MicroBatchSamples(names)
        # Weights tied across pipeline stages: each sample summed over the tie group first.
        self.tied = TiedWeightSamples()
        #: Micro-batches of this step seen on this rank so far (the most samples any tensor got).
        self.local_samples = 0
        self._hook_counts: dict[int, int] = {}
        self._prepared: set[int] = set()
        self._reduced = False
        self.handles = []
        self.sq: dict[int, Tensor] = {}
        self.first: dict[int, Tensor] = {}
        # The "held" path (a subclass sets ``buckets``): hook samples kept and added to
        # ``buckets`` a bucket at a time (:meth:`_holder`), at the latest when the pass ends.
        self.buckets: BucketSamples | None = None
        self._held: list[tuple[int, Tensor]] = []
        self._held_elements = 0
        self.samples.after_end.append(self._add_held)

    # -- hooks -------------------------------------------------------------------------------
    def _holder(self, p: Tensor):
        """The sink of ``p``'s samples on the "held" path: kept until a bucket's worth of elements
        (:attr:`held_bucket_elements`) or the end of the backward pass, then added at once."""
        key, numel = id(p), p.numel()

        def hold(grad: Tensor) -> None:
            # The held tensor may become the parameter's .grad (autograd steals it when .grad is
            # None): nothing may change it in place before it is added — the next pass's
            # accumulation (MicroBatchSamples' end of the pass adds them), or a wrapper's reduction
            # during backward (the subclass adds them before it: zero12, zero3).
            if self._held and self._held_elements + numel > self.held_bucket_elements:
                self._add_held()  # chunks stay within the bucket (and the staging) unless one tensor exceeds it
            self._held.append((key, grad.detach()))
            self._held_elements += numel
            if self._held_elements >= self.held_bucket_elements:
                self._add_held()

        return hold

    def _add_held(self) -> None:
        if not self._held:
            return
        self._note_sample_scale()
        keys, grads = zip(*self._held)
        self._held, self._held_elements = [], 0
        self.buckets.add(list(keys), grads=list(grads))
        self.local_samples = self.buckets.local_samples

    def _note_sample_scale(self) -> None:
        """At a step's first sample: the loss scale and 1/gas its samples carry (DeepSpeed may
        change the loss scale in step(), and engine.set_train_batch_size the accumulation steps)."""
        if self.local_samples == 0:
            self._sample_loss_scale = float(self.loss_scale_fn())
            self._sample_gas = int(self.gas_fn())

    def _count(self, p: Tensor) -> None:
        self._note_sample_scale()
        c = self._hook_counts.get(id(p), 0) + 1
        self._hook_counts[id(p)] = c
        if c > self.local_samples:
            self.local_samples = c

    def _deliver_samples(self) -> None:
        """Every sample of this step to its sink, before the moments are reduced: the pieces of a
        backward pass that raised, then the tied weights' samples still in flight."""
        self.samples.end_micro_batch()
        self.tied.complete()

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
        return self._sample_loss_scale / self._sample_gas

    def moment_sums(self, p: Tensor, layout: SegmentLayout) -> Tensor:
        """[Σ_j S_j², Σ_j Q_j] of this rank's elements of ``p``, formed in :meth:`prepare`."""
        if id(p) not in self._prepared:
            self.prepare([p])
        return self._moment_sums[id(p)]

    def first_moment(self, p: Tensor) -> tuple[Tensor, float]:
        """(S', c) with S = Σ_samples g = c·S' on ``p``'s elements, flat: the source's own fp32 Σg
        (c = 1) when it tracks it, else DeepSpeed's reduced gradient G (c = w: DeepSpeed averages
        over the data-parallel ranks; same loss scale and 1/gas as the samples)."""
        first = self.first.get(id(p))
        if first is not None:
            return first, 1.0
        return p.grad.reshape(-1), float(self.world_size)

    def prepare(self, inner_params) -> None:
        """Raw r from the step's moments, before DeepSpeed unscales or clips G; in place of Σg²."""
        self.ensure_reduced()
        k = self.num_samples()
        for p in inner_params:
            if p.grad is None or id(p) in self._prepared or id(p) not in self.sq:
                continue
            sq = self.sq[id(p)]
            grad_sum, sum_scale = self.first_moment(p)
            if self.optimizer.gradient_stats:
                layout = self.optimizer.layout_of(p)
                self._moment_sums[id(p)] = torch.cat(
                    [
                        layout.local_sums([grad_sum.float()], squares=True).view(-1) * sum_scale**2,
                        layout.local_sums([sq]).view(-1),
                    ]
                )
            if not self.optimizer.vr:
                self._prepared.add(id(p))
                continue
            # Same loss scale and 1/gas in S and Σg²: r needs no unscaling.
            gsnr_from_moments(grad_sum, sq, k, self._eps_of(p), sum_scale=sum_scale, out=sq)
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
        self.tied.discard()
        self._held, self._held_elements = [], 0
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
            and not self.tied.in_flight()
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


def gradient_is_rounded(engine) -> bool:
    """Whether DeepSpeed's reduced gradient G misses fp32 exactness: a 16-bit model (ZeRO 1/2
    accumulate micro-batches in the model dtype, stage_1_and_2.py ~1239; stage 0 and ZeRO-3 hold
    16-bit gradients) or 16-bit gradient communication (``communication_data_type``;
    BF16_Optimizer's all-reduce casts to bf16 even on one rank, engine.py ~3800). Then the
    sources accumulate Σg in fp32 themselves (``track_first``)."""
    if engine.bfloat16_enabled() or engine.fp16_enabled():
        return True
    comm = getattr(engine, "communication_data_type", None)
    return comm is not None and comm != torch.float32


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
