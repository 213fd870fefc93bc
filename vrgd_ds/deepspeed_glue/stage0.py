"""ZeRO stage 0: VRGD moments on whole tensors (:class:`Stage0MomentSource`, :func:`stage0_source`).

What the inner optimizer gets (DEEPSPEED_NOTES.md "What a custom optimizer sees"): with fp32 the
model's own tensors, after the engine's all-reduce (averaged over the data-parallel group) and
clipping (runtime/engine.py:3502 ``clip_fp32_gradients``); with bf16 the fp32 master copies of
``FP16_UnfusedOptimizer`` (runtime/fp16/unfused_optimizer.py:243 ``unscale_and_clip_grads``,
called from its ``step`` at :228). fp16 at stage 0 is refused (:mod:`.refusals`).

Installed: a tensor hook per trainable parameter adds g² of each micro-batch into one flat fp32
buffer [Σg² of every parameter | Σg of every parameter, with 16-bit gradients | sample count of
every parameter], all-reduced once per step over the data-parallel group (never the world: with
a pipeline the world holds other stages' tensors). r is formed just before the wrapped method
above unscales/clips, in place of Σg².
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ..collect import finite_flag
from ..host import read
from ..optimizer import VROptimizer
from ..segments import SegmentLayout
from .ipg_buckets import BucketSamples
from .source import DeepSpeedMomentSource, wrap_method

__all__ = ["Stage0MomentSource", "stage0_params", "stage0_source"]


class Stage0MomentSource(DeepSpeedMomentSource):
    """ZeRO stage 0: one flat fp32 Σg² buffer over all parameters, all-reduced once per step."""

    # Moments and gradients are all-reduced: a local check gives the same answer on every rank.
    checks_finite_locally = True
    # all_finite() checks the inner tensors' gradients with the moments, in the step's one read.
    all_finite_covers_grads = True

    def __init__(
        self,
        optimizer,
        world_size,
        group,
        model_params,
        inner_params,
        names=None,
        model_group=None,
        track_first: bool = False,
    ):
        super().__init__(optimizer, world_size, group, names, track_first)
        # Under tensor or pipeline parallelism the ranks of one model replica hold different
        # tensors: the local non-finite check is agreed on over them (every rank skips, or none).
        self.model_group = model_group
        self.inner_params = [ip for mp, ip in zip(model_params, inner_params) if mp.requires_grad]
        # Frozen tensors (requires_grad=False) never get a gradient: nothing to collect or hook.
        pairs = [(mp, ip) for mp, ip in zip(model_params, inner_params) if mp.requires_grad]
        model_params, inner_params = [mp for mp, _ in pairs], [ip for _, ip in pairs]
        numel = sum(p.numel() for p in model_params)
        moments = 2 * numel if self.tracks_first else numel
        # [Σg² of every parameter | Σg of every parameter | gradient-sample count of every
        # parameter], one all-reduce.
        self.buffer = torch.zeros(moments + len(model_params), dtype=torch.float32, device=model_params[0].device)
        self.counts = self.buffer[moments:]
        self.model_params = list(model_params)
        self._host_counts: list[float] | None = None  # this step's counts, read once when reduced
        self._host_finite = True
        self.inner_of = {id(mp): ip for mp, ip in zip(model_params, inner_params)}
        self.count_index = {id(ip): index for index, ip in enumerate(inner_params)}
        if self.use_bucket_samples:
            # Hook samples held and added a bucket at a time (.ipg_buckets) straight into the
            # buffer, laid out in the order they arrive (a sum all-reduce does not care); the
            # tensors' views into it follow the layout (_bind_views). Counts kept by it.
            entries, at = [], 0
            for mp in model_params:
                entries.append((id(mp), mp.numel(), at))
                at += mp.numel()
            m = 2 if self.tracks_first else 1
            staging = self.held_bucket_elements if self.tracks_first else 0
            key_of = {id(mp): id(mp) for mp in model_params}
            acc = self.buffer[:moments].view(m, numel)
            self.buckets = BucketSamples([(entries, numel)], 1, m, self.buffer.device, key_of, staging, acc)
            self._hook_counts = self.buckets.counts
            self._bound_layout = None
            self._bind_views()
        offset = 0
        for mp, ip in zip(model_params, inner_params):
            if self.buckets is not None:
                sink = self._holder(mp)
            else:
                view = self.buffer[offset : offset + mp.numel()]
                first = self.buffer[numel + offset : numel + offset + mp.numel()] if self.tracks_first else None
                offset += mp.numel()
                self.sq[id(ip)] = view
                if first is not None:
                    self.first[id(ip)] = first
                sink = self._make_sink(mp, view, first)
            self.handles.append(mp.register_hook(self.samples.hook(mp, self.tied.wrap(mp, sink))))

    def _bind_views(self) -> None:
        """Each inner tensor's Σg² (and Σg) view: where the buckets' layout puts its parameter."""
        layout = self.buckets.layout
        if layout is self._bound_layout:
            return
        acc = self.buckets.acc
        for key, ip in self.inner_of.items():
            a = layout.start[key]
            self.sq[id(ip)] = acc[0, a : a + ip.numel()]
            if self.tracks_first:
                self.first[id(ip)] = acc[1, a : a + ip.numel()]
        self._bound_layout = layout

    def _make_sink(self, p, view, first):
        def add_sample(grad):
            # fp32 accumulators, 16-bit samples: the in-place ops compute in fp32 (bit-identical
            # to casting first), without a cast's allocation and pass.
            g = grad.detach().reshape(-1)
            view.addcmul_(g, g)
            if first is not None:
                first.add_(g)
            self._count(p)

        return add_sample

    def all_finite(self) -> bool:
        """Σg² and the reduced gradients finite on every rank of this model replica: read with the
        sample counts (:meth:`ensure_reduced`, which runs after DeepSpeed reduced the gradients
        and before it unscales or clips them — neither makes a non-finite value finite or a
        finite one non-finite); the agreement over the model replica, if any, one all-reduce."""
        self.ensure_reduced()
        finite = self._host_finite
        if self.model_group is None:
            return finite
        flag = torch.tensor([0.0 if finite else 1.0], device=self.buffer.device)
        dist.all_reduce(flag, op=dist.ReduceOp.SUM, group=self.model_group)
        return float(read(flag)) == 0.0

    def _finite_flag(self) -> Tensor:
        """On the device: every moment and every reduced gradient finite (one foreach pass)."""
        flag = torch.isfinite(self.buffer).all()
        grads_ok = finite_flag(p.grad for p in self.inner_params)
        return flag if grads_ok is None else flag & grads_ok.to(flag.device)

    def tensor_sample_counts(self, inner: Tensor, layout: SegmentLayout) -> Tensor | None:
        """Gradient samples of ``inner``'s parameter over all ranks (the buffer is reduced), or
        None when it had some: the counts are read back once per step (:meth:`ensure_reduced`),
        so the optimizer needs no host read per tensor to know."""
        index = self.count_index[id(inner)]
        if self._host_counts is not None and self._host_counts[index] > 0:
            return None
        return self.counts[index].view(1).clone()

    def ensure_reduced(self):
        if not self._reduced:
            self._deliver_samples()
            if self.buckets is not None:
                self._add_held()  # tied weights' samples completed by _deliver_samples
            counts = [float(self._hook_counts.get(id(p), 0)) for p in self.model_params]
            self.counts.copy_(torch.tensor(counts))  # one copy to the device
            if self.world_size > 1:
                dist.all_reduce(self.buffer, op=dist.ReduceOp.SUM, group=self.group)
            # The step's one read: the sample counts and the finite check (all_finite).
            # (The finite check is a pass over every gradient: only VR's step skips on it.)
            flag = self._finite_flag() if self.optimizer.vr else torch.ones((), device=self.counts.device)
            host = read(torch.cat([self.counts, flag.view(1).to(self.counts.dtype)]))
            self._host_counts = host[:-1].tolist()
            self._host_finite = bool(host[-1])
            self._reduced = True

    def clear(self) -> None:
        self._host_counts = None
        super().clear()
        if self.buckets is not None:
            self.buckets.end_step()  # may relearn the arrival order: the views follow
            self._bind_views()

    def _buffers_to_zero(self):
        return [self.buffer]

    def extra_buffer_bytes(self):
        what = "grad_sq_sum + grad_sum" if self.tracks_first else "grad_sq_sum"
        out = {f"{what} (fp32, all parameters) + sample counts": self.buffer.numel() * 4}
        if self.buckets is not None:
            out["fp32 staging of 16-bit samples"] = self.buckets.extra_bytes(own_acc=False)
        return out


def stage0_params(opt: VROptimizer, wrapper) -> tuple[list, list]:
    """(the model's trainable tensors, the inner optimizer's tensors for them), in one order:
    the same tensors with fp32, the fp32 master copies of ``FP16_UnfusedOptimizer`` with bf16."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if isinstance(wrapper, FP16_UnfusedOptimizer):
        return [p for g in wrapper.fp16_groups for p in g], [p for g in wrapper.fp32_groups for p in g]
    if wrapper is opt:
        params = [p for g in opt.param_groups for p in g["params"]]
        return params, params
    raise ValueError(
        f"vrgd_ds does not support DeepSpeed's {type(wrapper).__name__} wrapper at ZeRO stage 0; "
        "use ZeRO stage 1 or 2 for fp16/bf16."
    )


def model_parallel_group(engine):
    """The ranks holding the other parts of this rank's model replica (tensor-parallel peers,
    other pipeline stages): the mpu's model-parallel group (a pipeline grid's spans pipe × model,
    pipe/topology.py:452), or None when this rank holds the whole model."""
    mpu = getattr(engine, "mpu", None)
    getter = getattr(mpu, "get_model_parallel_group", None)
    if getter is None:
        return None
    group = getter()
    return group if group is not None and dist.get_world_size(group=group) > 1 else None


def stage0_source(engine, opt: VROptimizer, wrapper, names: dict, track_first: bool = False) -> DeepSpeedMomentSource:
    """Stage 0: whole tensors; fp32 hands the inner optimizer the model's tensors after the
    engine's all-reduce, bf16 the fp32 master copies of FP16_UnfusedOptimizer. A non-finite
    step is skipped on every rank of the model replica (:func:`model_parallel_group`)."""
    # The data-parallel group DeepSpeed reduces gradients over (never the world: with a pipeline
    # the world holds other stages' tensors); sequence parallelism is refused.
    dp_group, dp_world = engine.seq_data_parallel_group, engine.seq_dp_world_size
    model_params, inner_params = stage0_params(opt, wrapper)
    source = Stage0MomentSource(
        opt,
        dp_world,
        dp_group,
        model_params,
        inner_params,
        names,
        model_group=model_parallel_group(engine),
        track_first=track_first,
    )
    for mp, ip in zip(model_params, inner_params):
        if id(mp) in names:
            opt.set_param_name(ip, names[id(mp)])
    if wrapper is opt:
        wrap_method(engine, "clip_fp32_gradients", before=lambda *a, **k: source.prepare(inner_params))
    else:
        wrap_method(wrapper, "unscale_and_clip_grads", before=lambda *a, **k: source.prepare(inner_params))
    return source
