"""DeepSpeed glue: config types, and VRGD moments on ZeRO's own partitions.

This is the only module that touches DeepSpeed internals. DeepSpeed (0.19.x) has no optimizer
plug-in registry, so ``register()`` (run at ``import vrgd_ds``) wraps three methods of
``DeepSpeedEngine`` and appends our classes to ZeRO's supported-optimizer list:

* ``_is_supported_optimizer`` / ``_configure_basic_optimizer``: a config
  ``"optimizer": {"type": "VRLamb", "params": {...}}`` (case-insensitive; VRSGD, VRAdam,
  VRAdamW, VRLamb, VRLars) builds our optimizer with the user's parameter groups;
* ``_configure_optimizer``: once DeepSpeed has wrapped the optimizer (ZeRO, fp16/bf16),
  :func:`attach` connects the VR optimizer to the wrapper — whether it came from the config,
  an optimizer instance or a callable.

What :func:`attach` installs (VRGD.md §1, DEEPSPEED_NOTES.md):

* A tensor hook per model parameter adds g² of every micro-batch (this rank's own gradient,
  before DeepSpeed accumulates or reduces it) into fp32 accumulators.
* ZeRO 1/2: the accumulators are reduced onto exactly the flat partition this rank's ZeRO
  optimizer owns. ``moment_reduction="per_step"``: one full-size fp32 buffer per rank and one
  ``reduce_scatter_tensor`` per optimizer step (default when gradient_accumulation_steps > 1);
  ``"per_micro_step"``: only partition-sized buffers, the g² of each parameter reduced to its
  owning rank(s) as backward produces it (one reduction per parameter per micro-batch; needs
  every rank to produce gradients for the same parameters in the same order, as ZeRO-2's own
  bucketing does). Stage 0: one full-size buffer, all-reduced once per step. On gloo (CPU) both
  ZeRO strategies use point-to-point sends instead (gloo's reduce-scatter is an all-reduce of a
  full copy and its reduce sends ~2.2× a reduce's share): each rank sends every other rank
  exactly the g² of the elements that rank owns, the reduce-scatter minimum 4·N·(w−1)/w bytes.
* The first moment is the gradient DeepSpeed already reduced: r is computed from it just
  before DeepSpeed unscales and clips it (wrapping ``unscale_and_clip_grads`` of the ZeRO /
  fp16 wrapper, or ``clip_fp32_gradients`` at stage 0 fp32), so r is independent of the loss
  scale and of ``gradient_clipping``; r overwrites the g² buffer in place (no extra memory).
* Flat shards get a :class:`~vrgd_ds.segments.SegmentLayout`, so layer means of r and the
  LAMB/LARS norms are per original tensor, completed by one small all-reduce.
* After every optimizer step (applied or skipped on fp16 overflow) the accumulators are
  cleared; a skipped step never reaches our ``step()``, so GSNR momentum is untouched.
"""

from __future__ import annotations

import functools
import os

import logging

import torch
import torch.distributed as dist
from torch import Tensor

from .collect import k_too_small_message
from .comm import pairwise_reduce_scatter
from .gsnr import gsnr_from_moments
from .optimizer import VROptimizer
from .samples import MicroBatchSamples
from .segments import SegmentLayout

TESTED_DEEPSPEED = ((0, 19, 8), (0, 20, 0))  # [low, high)
TESTED_RANGE_TEXT = ">=0.19.8,<0.20"
MOMENT_REDUCTIONS = ("auto", "per_step", "per_micro_step")

_registered = False
logger = logging.getLogger("vrgd_ds")


def _version_tuple(text: str):
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts + [0] * (3 - len(parts)))


def _optimizer_classes():
    from . import OPTIMIZERS

    return OPTIMIZERS


def register() -> bool:
    """Teach DeepSpeed our optimizer types. Idempotent. Returns False if DeepSpeed is absent."""
    global _registered
    if _registered:
        return True
    try:
        import deepspeed
    except ImportError:
        return False
    version = _version_tuple(deepspeed.__version__)
    if not (TESTED_DEEPSPEED[0] <= version < TESTED_DEEPSPEED[1]) and not os.environ.get(
        "VRGD_DS_ALLOW_UNTESTED_DEEPSPEED"
    ):
        raise ImportError(
            f"vrgd_ds hooks into DeepSpeed internals and is tested with deepspeed {TESTED_RANGE_TEXT}; "
            f"found {deepspeed.__version__}. Install a tested version (pip install 'deepspeed{TESTED_RANGE_TEXT}') "
            f"or set VRGD_DS_ALLOW_UNTESTED_DEEPSPEED=1 at your own risk."
        )
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero import utils as zero_utils

    for cls in _optimizer_classes().values():
        if cls not in zero_utils.ZERO_SUPPORTED_OPTIMIZERS:
            zero_utils.ZERO_SUPPORTED_OPTIMIZERS.append(cls)

    original_is_supported = DeepSpeedEngine._is_supported_optimizer
    original_basic = DeepSpeedEngine._configure_basic_optimizer
    original_configure = DeepSpeedEngine._configure_optimizer

    @functools.wraps(original_is_supported)
    def _is_supported_optimizer(self, optimizer_name):
        return str(optimizer_name).lower() in _optimizer_classes() or original_is_supported(self, optimizer_name)

    @functools.wraps(original_basic)
    def _configure_basic_optimizer(self, model_parameters):
        cls = _optimizer_classes().get(str(self.optimizer_name()).lower())
        if cls is None:
            return original_basic(self, model_parameters)
        opt = build_from_config(cls, self.optimizer_params() or {}, model_parameters)
        opt.ignore_steps(True)  # released by _configure_optimizer once the wrappers are built
        return opt

    @functools.wraps(original_configure)
    def _configure_optimizer(self, client_optimizer, model_parameters):
        name = str(self.optimizer_name()).lower() if client_optimizer is None else None
        if (
            name in _optimizer_classes() or isinstance(client_optimizer, VROptimizer)
        ) and self.zero_optimization_stage() > 2:
            from .zero3 import check_supported

            check_supported(self)  # before DeepSpeed builds its stage-3 optimizer
        # DeepSpeed's fp16/bf16 wrappers "initialize optimizer states" by one step() on zero
        # gradients; for a VR optimizer that step is a no-op (state is created lazily at the
        # first real step, so the first real step is t = 1, as without DeepSpeed).
        if isinstance(client_optimizer, VROptimizer):
            client_optimizer.ignore_steps(True)
        try:
            original_configure(self, client_optimizer, model_parameters)
        finally:
            for opt in (client_optimizer, getattr(self, "basic_optimizer", None)):
                if isinstance(opt, VROptimizer):
                    opt.ignore_steps(False)
        if isinstance(self.basic_optimizer, VROptimizer):
            attach(self)

    DeepSpeedEngine._is_supported_optimizer = _is_supported_optimizer
    DeepSpeedEngine._configure_basic_optimizer = _configure_basic_optimizer
    DeepSpeedEngine._configure_optimizer = _configure_optimizer
    _registered = True
    return True


def build_from_config(cls, params: dict, model_parameters):
    """Build a VR optimizer from a DeepSpeed config's ``optimizer.params`` (unknown keys: a clear error)."""
    import inspect

    params = dict(params)
    if "betas" in params:
        params["betas"] = tuple(params["betas"])
    accepted = set()
    for klass in cls.__mro__:
        if klass is object or not issubclass(klass, VROptimizer):
            continue
        accepted |= {
            p for p in inspect.signature(klass.__init__).parameters if p not in ("self", "params", "kwargs", "defaults")
        }
    accepted |= {"moment_reduction"}
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ValueError(
            f"Unknown {cls.__name__} option(s) in the DeepSpeed config's optimizer.params: {unknown}. "
            f"Accepted: {sorted(accepted)}."
        )
    moment_reduction = params.pop("moment_reduction", "auto")
    if moment_reduction not in MOMENT_REDUCTIONS:
        raise ValueError(f"Invalid moment_reduction: {moment_reduction!r}; use one of {MOMENT_REDUCTIONS}.")
    if model_parameters is None:
        raise ValueError("deepspeed.initialize needs model_parameters to build a VR optimizer from the config.")
    opt = cls(model_parameters, **params)
    opt.moment_reduction = moment_reduction
    return opt


# --------------------------------------------------------------------------------------------
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
        # ZeRO calls step() once per param group: clear() runs after the wrapper's whole step.
        pass

    def on_zero_grad(self) -> None:
        # DeepSpeed zeroes gradients itself around its steps; clear() handles the accumulators.
        pass

    def clear(self) -> None:
        # After the wrapper's whole step (every param group): one set of noise statistics.
        self.optimizer.finish_noise_stats()
        self._moment_sums.clear()
        self.samples.discard()
        for buf in self._buffers_to_zero():
            buf.zero_()
        self._hook_counts.clear()
        self.local_samples = 0
        self._prepared.clear()
        self._reduced = False

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def ensure_reduced(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _buffers_to_zero(self):  # pragma: no cover - overridden
        raise NotImplementedError

    def extra_buffer_bytes(self) -> dict[str, int]:  # pragma: no cover - overridden
        raise NotImplementedError


class Stage0MomentSource(DeepSpeedMomentSource):
    """ZeRO stage 0: one flat fp32 Σg² buffer over all parameters, all-reduced once per step."""

    # Moments and gradients are all-reduced: a local check gives the same answer on every rank.
    checks_finite_locally = True

    def __init__(self, optimizer, world_size, group, model_params, inner_params, names=None):
        super().__init__(optimizer, world_size, group, names)
        # Frozen tensors (requires_grad=False) never get a gradient: nothing to collect or hook.
        pairs = [(mp, ip) for mp, ip in zip(model_params, inner_params) if mp.requires_grad]
        model_params, inner_params = [mp for mp, _ in pairs], [ip for _, ip in pairs]
        numel = sum(p.numel() for p in model_params)
        # [Σg² of every parameter | gradient-sample count of every parameter], one all-reduce.
        self.buffer = torch.zeros(numel + len(model_params), dtype=torch.float32, device=model_params[0].device)
        self.counts = self.buffer[numel:]
        self.model_params = list(model_params)
        self.count_index: dict[int, int] = {}
        offset = 0
        for index, (mp, ip) in enumerate(zip(model_params, inner_params)):
            view = self.buffer[offset : offset + mp.numel()]
            offset += mp.numel()
            self.sq[id(ip)] = view
            self.count_index[id(ip)] = index
            self.handles.append(mp.register_hook(self.samples.hook(mp, self._make_sink(mp, view))))

    def _make_sink(self, p, view):
        def add_sample(grad):
            g = grad.detach().reshape(-1).float()
            view.addcmul_(g, g)
            self._count(p)

        return add_sample

    def all_finite(self) -> bool:
        return bool(torch.isfinite(self.buffer).all())

    def tensor_sample_counts(self, inner: Tensor, layout: SegmentLayout) -> Tensor:
        """Gradient samples of ``inner``'s parameter over all ranks (the buffer is reduced)."""
        return self.counts[self.count_index[id(inner)]].view(1).clone()

    def ensure_reduced(self):
        if not self._reduced:
            self.samples.end_micro_batch()
            for i, p in enumerate(self.model_params):
                self.counts[i] = float(self._hook_counts.get(id(p), 0))
            if self.world_size > 1:
                dist.all_reduce(self.buffer, op=dist.ReduceOp.SUM, group=self.group)
            self._reduced = True

    def _buffers_to_zero(self):
        return [self.buffer]

    def extra_buffer_bytes(self):
        return {"grad_sq_sum (fp32, all parameters) + sample counts": self.buffer.numel() * 4}


class ZeroMomentSource(DeepSpeedMomentSource):
    """ZeRO 1/2: Σg² reduced onto this rank's flat partition of every param group."""

    checks_finite_locally = False

    def __init__(self, optimizer, zero_opt, strategy: str, names=None):
        group0 = zero_opt.real_dp_process_group[0]
        super().__init__(optimizer, dist.get_world_size(group=group0), group0, names)
        self.zero_opt = zero_opt
        self.strategy = strategy
        self.rank = dist.get_rank(group=group0)
        # gloo implements reduce_scatter_tensor as an all-reduce of a full copy (2x the bytes of a
        # reduce-scatter on the wire, plus a full-size temporary) and its reduce sends ~2.2x a
        # reduce's share: use point-to-point transfers there (sends still pending: _pending).
        # (An attribute read at every use, so tests can run the collective path on gloo too.)
        self.pairwise_exchange = dist.get_backend(group0) == "gloo"
        self._pending: list = []
        self.full: list[Tensor | None] = []
        self.views: list[list[tuple[Tensor, Tensor]]] = []
        self.partitions: list[Tensor] = []
        self.group_tensors: dict[int, list[Tensor]] = {}
        for i, tensors in enumerate(zero_opt.round_robin_bit16_groups):
            group = zero_opt.real_dp_process_group[i]
            padded = zero_opt.bit16_groups_flat[i].numel()
            part_size = int(zero_opt.partition_size[i])
            assert part_size * self.world_size == padded, "unexpected ZeRO partitioning"
            device = zero_opt.single_partition_of_fp32_groups[i].device
            partition = torch.zeros(part_size, dtype=torch.float32, device=device)
            self.partitions.append(partition)
            self.sq[id(zero_opt.single_partition_of_fp32_groups[i])] = partition
            full = torch.zeros(padded, dtype=torch.float32, device=device) if strategy == "per_step" else None
            self.full.append(full)
            self.group_tensors[id(zero_opt.single_partition_of_fp32_groups[i])] = list(tensors)
            offsets = zero_opt.round_robin_bit16_offsets[i]
            if full is not None:
                self.views.append([(p, full[offset : offset + p.numel()]) for p, offset in zip(tensors, offsets)])
            for p, offset in zip(tensors, offsets):
                self.handles.append(
                    p.register_hook(self.samples.hook(p, self._make_sink(i, p, offset, part_size, group)))
                )

    def _make_sink(self, i, p, offset, part_size, group):
        numel = p.numel()
        if self.strategy == "per_step":
            view = self.full[i][offset : offset + numel]

            def add_sample(grad):
                g = grad.detach().reshape(-1).float()
                if self._hook_counts.get(id(p), 0) == 0:
                    torch.mul(g, g, out=view)  # the step's first sample: no zeroing pass needed
                else:
                    view.addcmul_(g, g)
                self._count(p)

            return add_sample

        # per_micro_step: reduce g² of this parameter to the rank(s) owning its elements.
        owners = []
        for owner in range(offset // part_size, (offset + numel - 1) // part_size + 1):
            lo, hi = max(offset, owner * part_size), min(offset + numel, (owner + 1) * part_size)
            owners.append((owner, lo - offset, hi - offset, lo - owner * part_size))
        partition = self.partitions[i]
        global_ranks = [dist.get_global_rank(group, r) if group is not None else r for r in range(self.world_size)]
        tag = len(self.handles)  # this hook's index: the same on every rank

        def add_sample(grad):
            g = grad.detach().reshape(-1).float()
            if not self.pairwise_exchange and self.world_size > 1:
                sq = g * g
                for owner, a, b, dst_offset in owners:
                    piece = sq[a:b].contiguous()
                    dist.reduce(piece, dst=global_ranks[owner], op=dist.ReduceOp.SUM, group=group)
                    if owner == self.rank:
                        partition[dst_offset : dst_offset + (b - a)].add_(piece)
                self._count(p)
                return
            for owner, a, b, dst_offset in owners:
                piece = g[a:b]
                if owner == self.rank:
                    target = partition[dst_offset : dst_offset + (b - a)]
                    target.addcmul_(piece, piece)
                    for src in range(self.world_size):
                        if src != self.rank:
                            incoming = torch.empty_like(target)
                            dist.irecv(incoming, src=global_ranks[src], group=group, tag=tag).wait()
                            target.add_(incoming)
                else:
                    # Sent without waiting (backward goes on); kept alive until delivered.
                    sq = piece * piece
                    self._pending.append((dist.isend(sq, dst=global_ranks[owner], group=group, tag=tag), sq))
            self._pending = [(w, t) for w, t in self._pending if not w.is_completed()]
            self._count(p)

        return add_sample

    def ensure_reduced(self):
        if self._reduced:
            return
        self.samples.end_micro_batch()
        for work, _ in self._pending:
            work.wait()
        self._pending = []
        if self.strategy == "per_step":
            for i, (full, partition) in enumerate(zip(self.full, self.partitions)):
                # The hooks overwrite a tensor's slice at its first sample of the step; the slices
                # of tensors with no gradient this step still hold an earlier step's g².
                for p, view in self.views[i]:
                    if self._hook_counts.get(id(p), 0) == 0:
                        view.zero_()
                group = self.zero_opt.real_dp_process_group[i]
                if self.world_size == 1:
                    partition.copy_(full)
                elif self.pairwise_exchange:
                    pairwise_reduce_scatter(full, partition, group, tag=i)
                else:
                    dist.reduce_scatter_tensor(partition, full, op=dist.ReduceOp.SUM, group=group)
        self._reduced = True

    def clear(self) -> None:
        for work, _ in self._pending:  # a step skipped on overflow never reduced its moments
            work.wait()
        self._pending = []
        super().clear()

    def _buffers_to_zero(self):
        # per_step: ``full`` is overwritten by each step's first samples (see the hook) and the
        # partition by the reduction; per_micro_step adds into the partition.
        return [] if self.strategy == "per_step" else self.partitions

    def tensor_sample_counts(self, inner: Tensor, layout: SegmentLayout) -> Tensor:
        """This rank's gradient-sample count of every tensor of ``inner``'s group (completed by
        the optimizer in its layer-mean all-reduce)."""
        tensors = self.group_tensors[id(inner)]
        return torch.tensor([float(self._hook_counts.get(id(t), 0)) for t in tensors], device=inner.device)

    def extra_buffer_bytes(self):
        out = {"grad_sq_sum partition (fp32, per group)": sum(p.numel() for p in self.partitions) * 4}
        if self.strategy == "per_step":
            out["grad_sq_sum local accumulator (fp32, full size)"] = sum(f.numel() for f in self.full) * 4
        return out


class BF16OptimizerLayout:
    """DeepSpeed's BF16_Optimizer (bf16 + ZeRO-1 + fp32 gradient accumulation, and bf16 pipelines)
    seen through the attributes of DeepSpeedZeroOptimizer that :class:`ZeroMomentSource` and
    :func:`_zero_layouts` read: its layout is ZeRO-1's without round-robin — per param group the
    trainable tensors flattened in order, padded at the end to a multiple of the data-parallel
    size, cut into equal partitions (runtime/bf16_optimizer.py ``_setup_for_real_optimizer``)."""

    def __init__(self, bf16_opt):
        self.real_dp_process_group = bf16_opt.real_dp_process_group
        self.round_robin_bit16_groups = bf16_opt.bf16_groups
        self.bit16_groups_flat = bf16_opt.bf16_groups_flat
        self.single_partition_of_fp32_groups = bf16_opt.fp32_groups_flat_partition
        self.partition_size = [
            flat.numel() // dist.get_world_size(group=g)
            for flat, g in zip(bf16_opt.bf16_groups_flat, bf16_opt.real_dp_process_group)
        ]
        self.round_robin_bit16_offsets = []
        for tensors in bf16_opt.bf16_groups:
            offsets, pos = [], 0
            for t in tensors:
                offsets.append(pos)
                pos += t.numel()
            self.round_robin_bit16_offsets.append(offsets)


def all_reduce_sum(group, world: int):
    """``complete(vec)`` for a SegmentLayout whose tensors are spread over ``group``: an in-place
    all-reduce of the per-tensor partial sums (nothing for a group of one)."""

    def complete(vec: Tensor) -> None:
        if world > 1:
            dist.all_reduce(vec, op=dist.ReduceOp.SUM, group=group)

    return complete


def _zero_layouts(opt: VROptimizer, zero_opt, names: dict[int, str]) -> None:
    """Per-tensor segment layouts of every rank-local flat partition."""
    for i, tensors in enumerate(zero_opt.round_robin_bit16_groups):
        group = zero_opt.real_dp_process_group[i]
        world = dist.get_world_size(group=group)
        rank = dist.get_rank(group=group)
        part_size = int(zero_opt.partition_size[i])
        lo, hi = rank * part_size, (rank + 1) * part_size
        lengths, keys, pos = [], [], lo
        for key, (p, offset) in enumerate(zip(tensors, zero_opt.round_robin_bit16_offsets[i])):
            a, b = max(offset, lo), min(offset + p.numel(), hi)
            if a >= b:
                continue
            if a > pos:
                lengths.append(a - pos)
                keys.append(-1)
            lengths.append(b - a)
            keys.append(key)
            pos = b
        if pos < hi:
            lengths.append(hi - pos)
            keys.append(-1)

        complete = all_reduce_sum(group, world)
        layout = SegmentLayout(
            lengths,
            keys,
            [p.numel() for p in tensors],
            names=[names.get(id(p), f"group{i}.param{k}") for k, p in enumerate(tensors)],
            complete=complete,
        )
        opt.set_layout(zero_opt.single_partition_of_fp32_groups[i], layout)


def _wrap_method(obj, name: str, before=None, after=None):
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


def _model_parallel_size(mpu) -> int:
    # Megatron's interface; DeepSpeed's PipelineParallelGrid counts pipeline stages in
    # get_model_parallel_world_size, so the tensor-parallel getter comes first.
    for getter in ("get_tensor_model_parallel_world_size", "get_model_parallel_world_size"):
        fn = getattr(mpu, getter, None)
        if fn is not None:
            return int(fn())
    return 1


def unsupported_parallelism(engine) -> str | None:
    """Why this engine's parallel layout cannot give the exact VRGD update yet, or None.

    Data parallelism (ZeRO 0-3, BF16_Optimizer) and pipeline parallelism without weights tied across stages
    are exact: every collective of ours runs over the data-parallel group and k counts
    data-parallel ranks only. Everything else is refused at ``deepspeed.initialize``.
    """
    mpu = getattr(engine, "mpu", None)
    if mpu is not None and _model_parallel_size(mpu) > 1:
        return (
            f"tensor (model) parallelism with {_model_parallel_size(mpu)} shards per tensor: the layer mean of r "
            "and the LAMB/LARS norms of a sharded tensor would be per shard. Use tensor-model-parallel size 1 "
            "(data and pipeline parallelism, with ZeRO 0-3, are supported)."
        )
    if getattr(engine, "sequence_parallel_size", 1) > 1:
        return (
            "sequence parallelism (sequence_parallel_size > 1): the gradient samples of one micro-batch are "
            "split over the sequence-parallel ranks. Set sequence_parallel_size to 1."
        )
    if getattr(engine, "has_moe_layers", False):
        return (
            "mixture-of-experts layers: expert parameters are reduced over expert-data-parallel groups of other "
            "sizes than the dense ones. Use a dense model, or a non-VR optimizer for MoE."
        )
    zero = engine._config.zero_config
    if (getattr(zero, "mics_shard_size", -1) or -1) > 0 or (getattr(zero, "zero_hpz_partition_size", 1) or 1) > 1:
        return "MiCS / hpZ (mics_shard_size, zero_hpz_partition_size): remove them from zero_optimization."
    for key, comm in (getattr(engine.module, "tied_comms", None) or {}).items():
        if len(comm.get("ranks", ())) > 1:
            return (
                f"weights tied across pipeline stages (TiedLayerSpec key {key!r}): each stage would apply its own "
                "r to its copy. Put the tied layers on one stage, or untie them."
            )
    return None


def _warn_flat_weight_decay(opt: VROptimizer) -> None:
    """The HF Trainer (and anyone passing model.parameters()) gives one flat list: biases and
    LayerNorm weights then get weight decay, unlike the Trainer's own optimizer."""
    if opt.weight_decay_exclude_1d or not opt.built_from_flat_list:
        return
    if any(g.get("weight_decay", 0) > 0 and any(p.dim() <= 1 for p in g["params"]) for g in opt.param_groups):
        logger.warning(
            "vrgd_ds: %s got one flat parameter list with weight_decay > 0, so 1-D tensors (biases, LayerNorm "
            "weights) get weight decay too. To exclude them as the HF Trainer and NVIDIA's BERT recipe do, set "
            '"weight_decay_exclude_1d": true in optimizer.params (or pass parameter groups).',
            type(opt).__name__,
        )


def _is_bf16_optimizer(wrapper) -> bool:
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    return isinstance(wrapper, BF16_Optimizer)


def _refuse_unsupported(engine, wrapper, stage: int) -> None:
    """Every configuration that cannot give the exact update: a ValueError saying what to change."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    reason = unsupported_parallelism(engine)
    if reason is not None:
        raise ValueError(f"vrgd_ds does not support {reason}")
    if isinstance(wrapper, FP16_UnfusedOptimizer) and engine.fp16_enabled():
        raise ValueError(
            "vrgd_ds refuses fp16 at ZeRO stage 0: DeepSpeed 0.19.8's stage-0 fp16 wrapper (FP16_UnfusedOptimizer) "
            "divides the gradients by the loss scale although engine.backward did not scale the loss, so every "
            "update would be off by the loss scale (DeepSpeed's own SGD is wrong the same way). Use "
            '"zero_optimization": {"stage": 1} (or 2) with fp16, or bf16 at stage 0.'
        )
    if stage in (1, 2) and not _is_bf16_optimizer(wrapper):
        if not isinstance(wrapper, DeepSpeedZeroOptimizer):
            raise ValueError(
                f"vrgd_ds supports ZeRO {stage} through DeepSpeedZeroOptimizer or BF16_Optimizer, got "
                f"{type(wrapper).__name__}: use ZeRO stage 1 or 2 without other optimizer wrappers."
            )
        if getattr(wrapper, "cpu_offload", False):
            raise ValueError("vrgd_ds does not support ZeRO-Offload (offload_optimizer); remove it from the config.")


def _zero_source(opt: VROptimizer, wrapper, strategy: str, names: dict) -> DeepSpeedMomentSource:
    """ZeRO 1/2: r from the reduced partition just before DeepSpeed unscales and clips it."""
    source = ZeroMomentSource(opt, wrapper, strategy, names)
    fp32_partitions = wrapper.single_partition_of_fp32_groups

    def before_unscale(grad_groups_flat, total_norm, *a, **k):
        grads = grad_groups_flat if isinstance(grad_groups_flat, (list, tuple)) else [grad_groups_flat]
        source.prepare([p for p in fp32_partitions if p.grad is not None and any(p.grad is g for g in grads)])

    _wrap_method(wrapper, "unscale_and_clip_grads", before=before_unscale)
    return source


def _bf16_optimizer_source(opt: VROptimizer, wrapper, zero_view, strategy: str, names: dict):
    """BF16_Optimizer clips inside step() and then calls the inner step once for all groups: r is
    formed before step(), from the reduced, unclipped partition views."""
    source = ZeroMomentSource(opt, zero_view, strategy, names)

    def before_step(*a, **k):
        for part, grad in zip(wrapper.fp32_groups_flat_partition, wrapper.fp32_groups_gradient_flat_partition):
            part.grad = grad if grad.dtype == part.dtype else grad.to(part.dtype)
        source.prepare(list(wrapper.fp32_groups_flat_partition))

    _wrap_method(wrapper, "step", before=before_step)
    return source


def _stage0_source(engine, opt: VROptimizer, wrapper, names: dict) -> DeepSpeedMomentSource:
    """Stage 0: whole tensors; fp32 hands the inner optimizer the model's tensors after the
    engine's all-reduce, bf16 the fp32 master copies of FP16_UnfusedOptimizer."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    # The data-parallel group DeepSpeed reduces gradients over (never the world: with a pipeline
    # the world holds other stages' tensors); sequence parallelism is refused.
    dp_group, dp_world = engine.seq_data_parallel_group, engine.seq_dp_world_size
    if isinstance(wrapper, FP16_UnfusedOptimizer):
        model_params = [p for g in wrapper.fp16_groups for p in g]
        inner_params = [p for g in wrapper.fp32_groups for p in g]
        source = Stage0MomentSource(opt, dp_world, dp_group, model_params, inner_params, names)
        for mp, ip in zip(model_params, inner_params):
            if id(mp) in names:
                opt._names.setdefault(id(ip), names[id(mp)])
        _wrap_method(wrapper, "unscale_and_clip_grads", before=lambda *a, **k: source.prepare(inner_params))
        return source
    if wrapper is opt:
        params = [p for g in opt.param_groups for p in g["params"]]
        source = Stage0MomentSource(opt, dp_world, dp_group, params, params, names)
        for p in params:
            if id(p) in names:
                opt._names.setdefault(id(p), names[id(p)])
        _wrap_method(engine, "clip_fp32_gradients", before=lambda *a, **k: source.prepare(params))
        return source
    raise ValueError(
        f"vrgd_ds does not support DeepSpeed's {type(wrapper).__name__} wrapper at ZeRO stage 0; "
        "use ZeRO stage 1 or 2 for fp16/bf16."
    )


def attach(engine) -> None:
    """Connect the engine's VR optimizer to DeepSpeed's optimizer wrapper (see module docstring)."""
    from deepspeed.runtime.base_optimizer import ZeROOptimizer

    from .universal import install as install_universal  # lazy: keeps `python -m vrgd_ds.universal` warning-free

    opt: VROptimizer = engine.basic_optimizer
    stage = engine.zero_optimization_stage()
    wrapper = engine.optimizer
    _refuse_unsupported(engine, wrapper, stage)
    _warn_flat_weight_decay(opt)
    names = {id(p): n for n, p in engine.module.named_parameters()}
    gas = engine.gradient_accumulation_steps()
    dp_world = engine.seq_dp_world_size
    strategy = getattr(opt, "moment_reduction", "auto")
    if strategy not in MOMENT_REDUCTIONS:
        raise ValueError(f"Invalid moment_reduction: {strategy!r}; use one of {MOMENT_REDUCTIONS}.")
    if opt.micro_batch_size is None:
        opt.micro_batch_size = engine.train_micro_batch_size_per_gpu()
    if stage == 3:
        from .zero3 import attach_zero3

        attach_zero3(engine, opt, names, strategy)
        return
    if strategy == "auto":
        strategy = "per_step" if gas > 1 else "per_micro_step"

    bf16_optimizer = _is_bf16_optimizer(wrapper)
    zero_view = BF16OptimizerLayout(wrapper) if bf16_optimizer else wrapper
    if bf16_optimizer or stage in (1, 2):
        _zero_layouts(opt, zero_view, names)
    install_universal(engine)  # universal checkpoints keep the VR state, or are refused
    if not (opt.vr or opt.gradient_stats):
        return
    if gas * dp_world < 2:
        raise ValueError(
            k_too_small_message(gas * dp_world)
            + f" (DeepSpeed config: gradient_accumulation_steps={gas}, data-parallel world size={dp_world})."
        )
    if bf16_optimizer:
        source = _bf16_optimizer_source(opt, wrapper, zero_view, strategy, names)
    elif stage in (1, 2):
        source = _zero_source(opt, wrapper, strategy, names)
    else:
        source = _stage0_source(engine, opt, wrapper, names)
    # engine.backward scales the loss by the loss scale only for ZeRO wrappers (BF16_Optimizer
    # never scales; see the fp16 stage-0 refusal) and always divides it by gradient_accumulation_steps.
    if isinstance(wrapper, ZeROOptimizer) and not bf16_optimizer:
        source.loss_scale_fn = lambda: getattr(wrapper, "loss_scale", 1.0)
    source.gas = gas
    opt.set_moment_source(source)
    _wrap_method(wrapper, "step", after=source.clear)
    engine.vrgd_moment_source = source
