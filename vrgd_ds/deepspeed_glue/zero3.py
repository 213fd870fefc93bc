"""ZeRO stage 3 (DeepSpeedZeroOptimizer_Stage3, runtime/zero/stage3.py): VRGD moments on stage 3's partitions.

What stage 3 hands the inner optimizer (../shared/LARGE_MODEL_NOTES.md §1):

* one flat fp32 tensor per *sub-group* (``fp32_partitioned_groups_flat[i]``; a param group is cut
  into sub-groups of about ``sub_group_size`` local elements, a parameter never split), and
  ``step()`` runs once per sub-group, with ``param_groups[g]["params"] = [that tensor]``;
* each parameter is partitioned *on its own*: with J elements and w ranks, every rank holds a
  slice of ps = ceil(J/w) elements, rank r the elements [r·ps, (r+1)·ps) ∩ [0, J), the rest of its
  slice is padding (possibly on several ranks; the fp32 master's padding is uninitialised, its
  gradient 0). A sub-group's flat tensor is its parameters' slices in order.

What this module installs (:func:`attach_zero3`, after DeepSpeed built its stage-3 optimizer):

* A tensor hook per trainable parameter squares each micro-batch's gradient (this rank's own,
  full shape, before ZeRO reduces it) in fp32 into a bucket laid out rank-major — row q holds,
  for each parameter in the bucket, the ps elements rank q owns — so that one reduce-scatter of
  the bucket leaves each rank exactly the Σg² of its own slices, padding included (as zeros).
  They are added into one partition-sized fp32 buffer per sub-group. A parameter met again
  before the bucket is reduced adds into its slot. With 16-bit gradients the slot holds the
  rows of Σg beside those of Σg² ([Σg² | Σg], twice the bucket) and the partition is (2, n):
  DeepSpeed's 16-bit G is too rounded to be r's first moment (:mod:`.source`).
  ``moment_reduction="per_micro_step"`` (the default at stage 3): the bucket holds at most
  ``reduce_bucket_size`` elements (DeepSpeed's own bucket size) and is reduced whenever it is
  full and before the step — memory 4·N/w for the partitions plus one bucket;
  ``"per_step"``: the bucket holds every parameter (4·N bytes per rank, which undoes much of what
  ZeRO-3 saves) and is reduced once per step. On gloo (CPU) the reduce-scatter is point-to-point
  (each rank sends each other rank exactly the rows that rank owns); elsewhere
  ``dist.reduce_scatter`` over a clone of the data-parallel group, so our collectives never
  interleave with ZeRO's own on its communicator.
  (:func:`vrgd_ds.comm.reduce_scatter_rows`).
* r is formed per sub-group from the reduced gradient DeepSpeed has just flattened into the
  sub-group's ``.grad`` (wrapping ``unscale_and_clip_grads``, stage3.py:2979, called per
  sub-group from ``step`` at :2918, so before the loss scale and ``gradient_clipping`` are
  applied), in place of Σg².
* Per sub-group :class:`~vrgd_ds.segments.SegmentLayout`
  (:func:`~vrgd_ds.deepspeed_glue.layouts.zero3_layouts`): one piece per parameter (its real
  elements on this rank, possibly none) and its padding, so layer means of r and the LAMB/LARS
  norms are per whole tensor, completed by one small all-reduce over the partition group (and,
  for a tensor sharded by tensor parallelism, over the tensor-parallel group:
  :mod:`~vrgd_ds.deepspeed_glue.tensor_parallel`); the padding is skipped by every sum.
* After the wrapper's whole step (applied or skipped on fp16 overflow) the buffers are cleared
  and the step's noise statistics finished.

CPU offload of the optimizer (``offload_optimizer``: the fp32 partition, its gradient and our
partitions on the host, r formed there) and of the parameters (``offload_param``) work unchanged.
Refused at ``deepspeed.initialize`` (:func:`check_supported`, before DeepSpeed builds stage 3):
NVMe offload of either (not examined: the sub-group tensors are swapped in and out around
``step()``), ZeRO++ quantized gradients (not examined), ZenFlow, MiCS/hpZ and every other layout
:func:`~vrgd_ds.deepspeed_glue.refusals.unsupported_parallelism` refuses.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ..collect import k_too_small_message
from ..comm import reduce_scatter_rows
from ..segments import SegmentLayout
from .layouts import zero3_layouts
from .tensor_parallel import tensor_parallel_of
from .refusals import unsupported_parallelism
from .source import DeepSpeedMomentSource, gradient_is_rounded, wrap_method

__all__ = ["check_supported", "attach_zero3", "Zero3MomentSource"]

_TAG = 0x5A3  # point-to-point tag of our reduce-scatter (blocking, so one tag suffices)


def _offload_device(cfg) -> str:
    device = getattr(cfg, "device", None) if cfg is not None else None
    return str(getattr(device, "value", device) or "none").lower()


def check_supported(engine) -> None:
    """Raise a ValueError saying what to change when this stage-3 configuration is not supported."""
    reason = unsupported_parallelism(engine)
    if reason is not None:
        raise ValueError(f"vrgd_ds does not support {reason}")
    zero = engine._config.zero_config
    problems = []
    for key in ("offload_param", "offload_optimizer"):
        if _offload_device(getattr(zero, key, None)) == "nvme":
            problems.append(
                f'NVMe offload (zero_optimization.{key}.device "nvme"): tensors swapped to NVMe around '
                'step() are not examined; use "device": "cpu" or no offload'
            )
    if getattr(zero, "zero_quantized_gradients", False):
        problems.append("ZeRO++ quantized gradients (zero_quantized_gradients): not examined; set it to false")
    if getattr(zero, "zenflow", None) is not None:
        problems.append("ZenFlow (zero_optimization.zenflow): it needs DeepSpeedCPUAdam; remove it")
    if problems:
        raise ValueError("vrgd_ds supports ZeRO stage 3 without " + "; ".join(problems) + ".")


class Zero3MomentSource(DeepSpeedMomentSource):
    """Σg² of the step's micro-batches on this rank's ZeRO-3 partition of every sub-group."""

    checks_finite_locally = False

    def __init__(self, optimizer, wrapper, strategy: str, names=None, subgroups=None, track_first: bool = False):
        group = wrapper.dp_process_group
        super().__init__(optimizer, dist.get_world_size(group=group), group, names, track_first)
        self.wrapper = wrapper
        self.strategy = strategy
        self.rank = dist.get_rank(group=group)
        # Point-to-point on gloo (its reduce-scatter is an all-reduce of a full copy); an attribute
        # read at every use so tests can run the collective path on gloo too.
        self.pairwise_exchange = dist.get_backend(group) == "gloo"
        self.comm_group = group
        if not self.pairwise_exchange and self.world_size > 1:
            # Our reduce-scatters run inside backward hooks: on a communicator of their own they
            # cannot interleave with ZeRO's (possibly on another stream). new_group is collective
            # over the world; every rank runs attach in the same order.
            if self.world_size == dist.get_world_size():
                self.comm_group = dist.new_group(list(range(self.world_size)))
        self._global = [dist.get_global_rank(group, q) for q in range(self.world_size)]
        subgroups = subgroups if subgroups is not None else zero3_layouts(wrapper, names or {})
        self.partitions: list[Tensor] = []
        # Moments per element: Σg², and Σg with 16-bit gradients. A partition is (moments, n);
        # a bucket slot holds a parameter's rows of both, [Σg² | Σg], so one reduce-scatter
        # carries them.
        self.moments = m = 2 if self.tracks_first else 1
        self.group_tensors: dict[int, list[Tensor]] = {}
        self._eps_group: dict[int, int] = {}
        self._where: dict[int, tuple[int, int, int, int]] = {}  # id(p) -> (sub-group, offset, J, ps)
        total_slices = 0
        for i, (flat, tensors, offsets, _) in enumerate(subgroups):
            partition = torch.zeros(m, flat.numel(), dtype=torch.float32, device=flat.device)
            self.partitions.append(partition)
            self.sq[id(flat)] = partition[0]
            if self.tracks_first:
                self.first[id(flat)] = partition[1]
            self.group_tensors[id(flat)] = tensors
            self._eps_group[id(flat)] = wrapper.sub_group_to_group_id[i]
            for p, offset in zip(tensors, offsets):
                self._where[id(p)] = (i, offset, int(p.ds_numel), int(p.partition_numel()))
                total_slices += int(p.partition_numel())
                if p.requires_grad:
                    self.handles.append(p.register_hook(self.samples.hook(p, self._make_sink(p))))
        # The bucket lives where the gradients are (the accelerator, also with offload_param), the
        # partitions where the fp32 master is (there too, or the CPU with offload_optimizer).
        from deepspeed.accelerator import get_accelerator

        device = torch.device(get_accelerator().current_device_name())
        if strategy == "per_step":
            capacity = m * total_slices
        else:
            # Twice the slots with Σg: as many reductions as with Σg² alone.
            capacity = m * min(total_slices, max(1, -(-int(wrapper.reduce_bucket_size) // self.world_size)))
        self.capacity = capacity
        self.bucket = torch.zeros(self.world_size, capacity, dtype=torch.float32, device=device)
        self._used = 0
        self._slots: dict[int, int] = {}
        self._entries: list[tuple[Tensor, int]] = []
        #: Reductions of a non-empty bucket since attach (per_micro_step: whenever the bucket is
        #: full and once before each step; per_step: once per step).
        self.flushes = 0

    # -- hooks ------------------------------------------------------------------------------
    def _make_sink(self, p):
        i, offset, numel, ps = self._where[id(p)]
        full_rows, rest = divmod(numel, ps)

        m = self.moments
        width = m * ps  # a slot: (w, [Σg² of ps | Σg of ps])

        def add_into(rows: Tensor, g: Tensor) -> None:
            # rows: (w, m·ps); row q gets the squares (and values) of the elements rank q owns,
            # padding stays 0.
            if full_rows:
                head = g[: full_rows * ps].view(full_rows, ps)
                rows[:full_rows, :ps].addcmul_(head, head)
                if m == 2:
                    rows[:full_rows, ps:].add_(head)
            if rest:
                tail = g[full_rows * ps :]
                rows[full_rows, :rest].addcmul_(tail, tail)
                if m == 2:
                    rows[full_rows, ps : ps + rest].add_(tail)

        def add_sample(grad):
            # 16-bit samples into fp32 rows: the in-place ops compute in fp32 (no cast pass).
            g = grad.detach().reshape(-1).to(device=self.bucket.device)
            if width > self.capacity:  # larger than a whole bucket: reduced on its own, at once
                self._flush()
                rows = torch.zeros(self.world_size, width, dtype=torch.float32, device=g.device)
                add_into(rows, g)
                self._add_to_partition(i, offset, ps, self._reduce_scatter(rows))
                self._count(p)
                return
            slot = self._slots.get(id(p))
            if slot is None:
                if self._used + width > self.capacity:
                    self._flush()
                slot = self._used
                self._used += width
                self._slots[id(p)] = slot
                self._entries.append((p, slot))
                self.bucket[:, slot : slot + width].zero_()
            add_into(self.bucket[:, slot : slot + width], g)
            self._count(p)

        return add_sample

    def _add_to_partition(self, i: int, offset: int, ps: int, values: Tensor) -> None:
        """Add a parameter's reduced slot (``values``: [Σg² | Σg] of its ps elements) into the
        sub-group's partitions at ``offset``."""
        target = self.partitions[i][:, offset : offset + ps]
        target.add_(values.view(self.moments, ps).to(target.device, non_blocking=False))

    def _flush(self) -> None:
        """Reduce-scatter the bucket's rows and add each rank's share into its partitions: one
        transfer to the partitions' device (offload) and one foreach add, whatever the number
        of parameters in the bucket."""
        n = self._used
        if n == 0:
            return
        self.flushes += 1
        mine = self._reduce_scatter(self.bucket[:, :n])
        device = self.partitions[0].device
        if mine.device != device:
            mine = mine.to(device)
        m, targets, values = self.moments, [], []
        for p, slot in self._entries:
            i, offset, _, ps = self._where[id(p)]
            targets.append(self.partitions[i][:, offset : offset + ps])
            values.append(mine[slot : slot + m * ps].view(m, ps))
        torch._foreach_add_(targets, values)
        self._used = 0
        self._slots.clear()
        self._entries.clear()

    def _reduce_scatter(self, rows: Tensor) -> Tensor:
        """Σ over ranks of row ``rank`` of every rank's (w, n) ``rows``; a new (n,) tensor."""
        return reduce_scatter_rows(
            rows, self.group, self.rank, self._global, self.pairwise_exchange, self.comm_group, tag=_TAG
        )

    # -- the step protocol ------------------------------------------------------------------
    def ensure_reduced(self) -> None:
        if self._reduced:
            return
        self.samples.end_micro_batch()
        self._flush()
        self._reduced = True

    def _eps_of(self, p: Tensor) -> float:
        # prepare() runs before ZeRO puts the sub-group's tensor into its param group.
        gid = self._eps_group.get(id(p))
        if gid is not None:
            return self.optimizer.param_groups[gid]["gsnr_eps"]
        return super()._eps_of(p)

    def tensor_sample_counts(self, inner: Tensor, layout: SegmentLayout) -> Tensor:
        """This rank's gradient-sample count of every tensor of ``inner``'s sub-group (completed
        by the optimizer in its layer-mean all-reduce)."""
        tensors = self.group_tensors[id(inner)]
        return torch.tensor([float(self._hook_counts.get(id(t), 0)) for t in tensors], device=inner.device)

    def clear(self) -> None:
        # A step skipped on overflow never reduced its bucket: forget it.
        self._used = 0
        self._slots.clear()
        self._entries.clear()
        super().clear()

    def _buffers_to_zero(self):
        return self.partitions  # the bucket's slots are zeroed when taken

    def is_clear(self) -> bool:
        """As :meth:`DeepSpeedMomentSource.is_clear`, and the bucket holds no entry."""
        return self._used == 0 and not self._slots and not self._entries and super().is_clear()

    def extra_buffer_bytes(self):
        what = "grad_sq_sum + grad_sum" if self.tracks_first else "grad_sq_sum"
        return {
            f"{what} partition (fp32, per sub-group)": sum(p.numel() for p in self.partitions) * 4,
            f"{what} bucket (fp32, {self.strategy})": self.bucket.numel() * 4,
        }


UNIVERSAL_MESSAGE = (
    'vrgd_ds: "checkpoint": {"load_universal": true} is not supported at ZeRO stage 3 (the VR state — GSNR '
    "momentum, per-tensor step counts — would not be restored). Load the ordinary ZeRO-3 checkpoint on the same "
    "data-parallel size (VR state included), or convert a ZeRO 1/2 checkpoint."
)


def _refuse_universal_load(engine) -> None:
    original_load = engine.load_checkpoint

    def load_checkpoint(*args, **kwargs):
        if engine.load_universal_checkpoint():
            raise ValueError(UNIVERSAL_MESSAGE)
        return original_load(*args, **kwargs)

    load_checkpoint.__wrapped__ = original_load
    engine.load_checkpoint = load_checkpoint


def attach_zero3(engine, opt, names: dict, strategy: str) -> None:
    """Connect ``opt`` to DeepSpeed's stage-3 optimizer (see the module docstring)."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    wrapper = engine.optimizer
    if type(wrapper) is not DeepSpeedZeroOptimizer_Stage3:
        raise ValueError(
            f"vrgd_ds supports ZeRO stage 3 through DeepSpeedZeroOptimizer_Stage3, got "
            f"{type(wrapper).__name__} (MiCS and hpZ are not supported)."
        )
    if getattr(wrapper, "swap_optimizer", False) or getattr(wrapper, "params_in_nvme_and_cpu", False):
        raise ValueError(
            "vrgd_ds does not support ZeRO-3 NVMe offload (offload_param / offload_optimizer device "
            '"nvme"); use "device": "cpu" or no offload.'
        )
    dp_group = wrapper.dp_process_group
    dp_world = dist.get_world_size(group=dp_group)
    for i, group in enumerate(wrapper.sub_group_process_groups):
        if dist.get_world_size(group=group) != dp_world or dist.get_rank(group=group) != dist.get_rank(group=dp_group):
            raise ValueError(
                f"vrgd_ds: ZeRO-3 sub-group {i} is partitioned over another process group than the "
                "data-parallel one (AutoEP / custom ds_process_group): not supported."
            )
    if strategy == "auto":
        strategy = "per_micro_step"
    subgroups = zero3_layouts(wrapper, names, tensor_parallel_of(engine))
    for flat, _tensors, _, layout in subgroups:
        opt.set_layout(flat, layout)
    _refuse_universal_load(engine)
    if not (opt.vr or opt.gradient_stats):
        return
    gas = engine.gradient_accumulation_steps()
    if gas * dp_world < 2:
        raise ValueError(
            k_too_small_message(gas * dp_world)
            + f" (DeepSpeed config: gradient_accumulation_steps={gas}, data-parallel world size={dp_world})."
        )
    # S = Σg in fp32 by our own hooks where DeepSpeed's G is rounded to 16 bits (source.py).
    source = Zero3MomentSource(opt, wrapper, strategy, names, subgroups, gradient_is_rounded(engine))
    flats = wrapper.fp32_partitioned_groups_flat

    def before_unscale(sub_group_id, *a, **k):
        source.prepare([flats[sub_group_id]])

    wrap_method(wrapper, "unscale_and_clip_grads", before=before_unscale)
    # engine.backward scales the loss by the wrapper's loss scale and divides it by gas.
    source.loss_scale_fn = lambda: getattr(wrapper, "loss_scale", 1.0)
    # engine.backward divides the loss by the current gradient_accumulation_steps, which
    # engine.set_train_batch_size may change between steps.
    source.gas_fn = engine.gradient_accumulation_steps
    opt.set_moment_source(source)
    wrap_method(wrapper, "step", after=source.clear)
