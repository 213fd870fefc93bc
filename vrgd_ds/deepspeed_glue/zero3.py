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

* A tensor hook per trainable parameter holds each micro-batch's gradient (this rank's own,
  full shape, before ZeRO reduces it); the held samples are squared in fp32 into a bucket laid
  out rank-major — row q holds, for each parameter in the bucket, the ps elements rank q owns —
  so that one reduce-scatter of the bucket leaves each rank exactly the Σg² of its own slices,
  padding included (as zeros). They are added a chunk at a time (:meth:`Zero3MomentSource._add_chunk`:
  one ``cat`` into the rank-major block and one ``addcmul_`` — with Σg, of [g | 1] by g — whatever the number of
  parameters), at the latest before ZeRO-3 reduces its own bucket (which may change a gradient
  in place) and at the end of the backward pass. The reduced bucket is added into one
  partition-sized fp32 buffer per sub-group by one foreach add. A parameter met again before
  the bucket is reduced adds into its slot. With 16-bit gradients the bucket holds Σg beside
  Σg² (``(w, 2, capacity)``) and the partition is (2, n): DeepSpeed's 16-bit G is too rounded
  to be r's first moment (:mod:`.source`).
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
        self._param_of: dict[int, Tensor] = {}
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
                self._param_of[id(p)] = p
                total_slices += int(p.partition_numel())
                if p.requires_grad:
                    self.handles.append(p.register_hook(self.samples.hook(p, self._holder(p))))
        # The bucket lives where the gradients are (the accelerator, also with offload_param), the
        # partitions where the fp32 master is (there too, or the CPU with offload_optimizer).
        from deepspeed.accelerator import get_accelerator

        device = torch.device(get_accelerator().current_device_name())
        if strategy == "per_step":
            capacity = total_slices
        else:
            capacity = min(total_slices, max(1, -(-int(wrapper.reduce_bucket_size) // self.world_size)))
        #: Slot elements per moment: the bucket is (w, moments, capacity), row q holding the
        #: elements rank q owns of each parameter's slot, Σg² and (16-bit) Σg side by side.
        self.capacity = capacity
        self.bucket = torch.zeros(self.world_size, m, capacity, dtype=torch.float32, device=device)
        # Hook samples are held (DeepSpeedMomentSource._holder) up to about a bucket's worth of
        # gradient elements, then added a chunk at a time (_add_held).
        # (use_bucket_samples False: each sample added as it arrives, a chunk of one.)
        limit = capacity * self.world_size if self.use_bucket_samples else 0
        self.held_bucket_elements = min(self.held_bucket_elements, limit)
        self._zeros: dict[torch.dtype, Tensor] = {}
        self._used = 0
        self._slots: dict[int, int] = {}
        self._entries: list[tuple[Tensor, int]] = []
        #: Reductions of a non-empty bucket since attach (per_micro_step: whenever the bucket is
        #: full and once before each step; per_step: once per step).
        self.flushes = 0
        #: Chunks of held samples added by one packed op per moment / parameter by parameter.
        self.packed_chunks = 0
        self.unpacked_chunks = 0

    # -- hooks ------------------------------------------------------------------------------
    def _add_held(self) -> None:
        """The held samples into the bucket: slots taken in arrival order (the bucket reduced
        whenever it is full), each run of new or consecutive slots added by :meth:`_add_chunk`."""
        if not self._held:
            return
        self._note_sample_scale()
        held, self._held, self._held_elements = self._held, [], 0
        chunk = []
        for key, grad in held:
            p = self._param_of[key]
            _, _, numel, ps = self._where[key]
            g = grad.reshape(-1)
            if g.device != self.bucket.device:
                g = g.to(self.bucket.device)
            if ps > self.capacity:  # larger than a whole bucket: reduced on its own, at once
                self._add_chunk(chunk)
                chunk = []
                self._flush()
                self._reduce_alone(key, g)
                self._count(p)
                continue
            slot = self._slots.get(key)
            if slot is None:
                if self._used + ps > self.capacity:
                    self._add_chunk(chunk)
                    chunk = []
                    self._flush()
                slot = self._used
                self._used += ps
                self._slots[key] = slot
                self._entries.append((p, slot))
            chunk.append((g, slot, numel, ps))
            self._count(p)
        self._add_chunk(chunk)

    def before_zero_reduces(self, *args, **kwargs) -> None:
        """Before ZeRO-3 reduces its own gradient bucket (which may divide a gradient in place,
        LARGE_MODEL_NOTES.md): the held samples into ours first, and ZeRO's reduction stream
        after our reads of them."""
        self._add_held()
        from deepspeed.accelerator import get_accelerator

        stream = getattr(self.wrapper, "reduce_and_partition_stream", None)
        if stream is not None and not get_accelerator().resolves_data_dependency():
            stream.wait_stream(get_accelerator().current_stream())

    def _rank_major(self, chunk, ones: bool = False) -> list[Tensor]:
        """Views whose concatenation is the chunk's rows: for each rank q, each sample's elements
        q owns, zero-padded to its slot width (``ones``: then as many ones, so the block is
        (w, 2, n) = [g | 1] per rank)."""
        dtype = chunk[0][0].dtype
        width = sum(c[3] for c in chunk)
        pieces = []
        for q in range(self.world_size):
            for g, _, numel, ps in chunk:
                lo, hi = q * ps, min((q + 1) * ps, numel)
                if hi > lo:
                    pieces.append(g[lo:hi])
                if ps - max(hi - lo, 0):
                    pieces.append(self._filled(dtype, 0.0, ps)[: ps - max(hi - lo, 0)])
            if ones:
                pieces.append(self._filled(dtype, 1.0, width)[:width])
        return pieces

    def _filled(self, dtype, value: float, n: int) -> Tensor:
        """A kept tensor of at least ``n`` elements, all ``value`` (padding zeros, ones)."""
        t = self._zeros.get((dtype, value))
        if t is None or t.numel() < n:
            t = torch.full((max(n, self.capacity),), value, dtype=dtype, device=self.bucket.device)
            self._zeros[(dtype, value)] = t
        return t

    def _add_chunk(self, chunk) -> None:
        """Add samples into their slots: when the slots are consecutive (the usual case: the
        order backward produced them in, every micro-batch), as one (w, n) block — one cat and
        one addcmul_ (with Σg: of the (w, 2, n) block [g | 1] by g), whatever the number of
        parameters; else parameter by
        parameter in one foreach call per moment. In-place ops on the fp32 bucket compute in
        fp32, so 16-bit samples need no cast."""
        if not chunk:
            return
        a = chunk[0][1]
        consecutive = all(nxt[1] == cur[1] + cur[3] for cur, nxt in zip(chunk, chunk[1:]))
        same_dtype = all(c[0].dtype == chunk[0][0].dtype for c in chunk)
        if consecutive and same_dtype:
            b = chunk[-1][1] + chunk[-1][3]
            if self.moments == 1:
                block = torch.cat(self._rank_major(chunk)).view(self.world_size, b - a)
                self.bucket[:, 0, a:b].addcmul_(block, block)
            else:  # [g | 1] ⊙ g: Σg² += g·g and Σg += 1·g = g (exact) in one op
                block = torch.cat(self._rank_major(chunk, ones=True)).view(self.world_size, 2, b - a)
                self.bucket[:, :, a:b].addcmul_(block, block[:, :1])
            self.packed_chunks += 1
            return
        self.unpacked_chunks += 1
        dst_sq, dst_s, src = [], [], []
        for g, slot, numel, ps in chunk:
            full_rows, rest = divmod(numel, ps)
            if full_rows:
                dst_sq.append(self.bucket[:full_rows, 0, slot : slot + ps])
                dst_s.append(self.bucket[:full_rows, -1, slot : slot + ps])
                src.append(g[: full_rows * ps].view(full_rows, ps))
            if rest:
                dst_sq.append(self.bucket[full_rows, 0, slot : slot + rest])
                dst_s.append(self.bucket[full_rows, -1, slot : slot + rest])
                src.append(g[full_rows * ps :])
        torch._foreach_addcmul_(dst_sq, src, src)
        if self.moments == 2:
            torch._foreach_add_(dst_s, src)

    def _reduce_alone(self, key: int, g: Tensor) -> None:
        """A parameter whose slot exceeds the bucket: its own rows, reduced at once."""
        i, offset, numel, ps = self._where[key]
        rows = torch.zeros(self.world_size, self.moments, ps, dtype=torch.float32, device=g.device)
        block = torch.cat(self._rank_major([(g, 0, numel, ps)])).view(self.world_size, ps)
        rows[:, 0].addcmul_(block, block)
        if self.moments == 2:
            rows[:, 1].add_(block)
        mine = self._reduce_scatter(rows.view(self.world_size, -1))
        target = self.partitions[i][:, offset : offset + ps]
        target.add_(mine.view(self.moments, ps).to(target.device))

    def _flush(self) -> None:
        """Reduce-scatter the bucket's rows and add each rank's share into its partitions: one
        transfer to the partitions' device (offload) and one foreach add, whatever the number
        of parameters in the bucket; then zero what was used."""
        n = self._used
        if n == 0:
            return
        self.flushes += 1
        m = self.moments
        used = self.bucket[:, :, :n]
        mine = self._reduce_scatter(used.reshape(self.world_size, m * n)).view(m, n)
        device = self.partitions[0].device
        if mine.device != device:
            mine = mine.to(device)
        targets, values = [], []
        for p, slot in self._entries:
            i, offset, _, ps = self._where[id(p)]
            targets.append(self.partitions[i][:, offset : offset + ps])
            values.append(mine[:, slot : slot + ps])
        torch._foreach_add_(targets, values)
        used.zero_()
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
        self._add_held()
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
        self.bucket[:, :, : self._used].zero_()
        self._used = 0
        self._slots.clear()
        self._entries.clear()
        super().clear()

    def _buffers_to_zero(self):
        return self.partitions  # the bucket's used slots are zeroed when reduced or forgotten

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
    # Held samples are added before ZeRO-3 touches the gradients in place (its bucket reduction);
    # where that method is not found, every sample is added as it arrives.
    reduce_name = "_DeepSpeedZeroOptimizer_Stage3__reduce_and_partition_ipg_grads"
    if hasattr(wrapper, reduce_name):
        wrap_method(wrapper, reduce_name, before=source.before_zero_reduces)
    else:
        source.held_bucket_elements = 0
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
