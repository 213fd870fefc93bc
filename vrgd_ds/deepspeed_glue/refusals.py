"""What cannot give the exact VRGD update yet: refused at ``deepspeed.initialize``, on every rank,
with a ValueError that says what to change.

:func:`unsupported_parallelism` (every ZeRO stage): tensor parallelism with sequence parallelism or
without Megatron's group getters (:func:`~.tensor_parallel.tensor_parallel_refusal`), sequence parallelism,
MoE, MiCS/hpZ, weights tied across pipeline stages with fp16 or several tensors per tie;
:func:`tie_order_refusal` (flat partitions in a pipeline): several tie keys whose weights the
stages' param groups hold in orders that contradict each other;
sparse gradients (:func:`sparse_gradient_refusal`).
:func:`refuse_unsupported` (ZeRO 0-2, after DeepSpeed built its wrapper; at ZeRO-3 the
parallelism only): that, plus wrappers we do not read (fp16 at stage 0, ZeRO-Offload to anything
but the CPU, other wrappers). ZeRO-3's own checks are
:func:`vrgd_ds.deepspeed_glue.zero3.check_supported`.
"""

from __future__ import annotations

import graphlib

import torch.distributed as dist

from .bf16 import is_bf16_optimizer
from .tensor_parallel import tensor_parallel_refusal

__all__ = ["unsupported_parallelism", "refuse_unsupported", "sparse_gradient_refusal", "tie_order_refusal"]


def sparse_gradient_refusal(engine) -> str | None:
    """Why the engine's model cannot give VR its samples: layers that produce sparse gradients
    (``nn.Embedding``/``nn.EmbeddingBag`` with ``sparse=True``), whose samples DeepSpeed's paths
    here do not densify; None when there are none, or nothing is collected (``vr`` and
    ``gradient_stats`` off). Plain PyTorch densifies them (exact)."""
    import torch

    opt = getattr(engine, "basic_optimizer", None)
    if opt is None or not (getattr(opt, "vr", False) or getattr(opt, "gradient_stats", False)):
        return None
    sparse = [
        name
        for name, module in engine.module.named_modules()
        if isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and module.sparse
    ]
    if not sparse:
        return None
    return (
        f"sparse gradients under DeepSpeed (embedding layers with sparse=True: {', '.join(sparse[:5])}): the "
        "gradient samples VRGD squares are formed from dense tensors here. Build those layers with sparse=False "
        '(DeepSpeed all-reduces a dense gradient anyway unless "sparse_gradients" is set), or pass vr=False and '
        "gradient_stats=False for the plain base optimizer."
    )


def unsupported_parallelism(engine) -> str | None:
    """Why this engine's parallel layout cannot give the exact VRGD update yet, or None.

    Data parallelism (ZeRO 0-3, BF16_Optimizer), pipeline parallelism, and tensor parallelism
    (:mod:`.tensor_parallel`, with any of those) are exact: every collective of ours runs over the
    data-parallel group (sharded tensors' per-tensor sums over the tensor-parallel group too) and
    k counts data-parallel ranks only; a weight tied across pipeline stages has each sample summed
    over its tie group first (:class:`~.source.TiedWeightSamples`; one tensor per tie, fp32 or
    bf16). Everything else is refused at ``deepspeed.initialize``.
    """
    reason = tensor_parallel_refusal(engine)
    if reason is not None:
        return reason + " (data and pipeline parallelism, with ZeRO 0-3, are supported)."
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
        if len(comm.get("ranks", ())) < 2:
            continue
        if len(comm["weight_attr"]) > 1:
            return (
                f"weights tied across pipeline stages with several tensors per TiedLayerSpec (key {key!r}, "
                f"tied_weight_attr={comm['weight_attr']}): their per-micro-batch samples share one tie group, and "
                "each stage's backward may produce them in another order. Tie one tensor per key."
            )
        if engine.fp16_enabled():
            return (
                f"weights tied across pipeline stages (TiedLayerSpec key {key!r}) with fp16: exact in fp32 and "
                "bf16 only. Use bf16 or fp32, or put the tied layers on one stage."
            )
    return None


def refuse_unsupported(engine, wrapper, stage: int) -> None:
    """Every configuration of a built wrapper that cannot give the exact update: a ValueError saying
    what to change (at stage 3 only the parallelism; the rest is :func:`~.zero3.check_supported`)."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    reason = unsupported_parallelism(engine) or sparse_gradient_refusal(engine)
    if reason is not None:
        raise ValueError(f"vrgd_ds does not support {reason}")
    if isinstance(wrapper, FP16_UnfusedOptimizer) and engine.fp16_enabled():
        raise ValueError(
            "vrgd_ds refuses fp16 at ZeRO stage 0: DeepSpeed 0.19.8's stage-0 fp16 wrapper (FP16_UnfusedOptimizer) "
            "divides the gradients by the loss scale although engine.backward did not scale the loss, so every "
            "update would be off by the loss scale (DeepSpeed's own SGD is wrong the same way). Use "
            '"zero_optimization": {"stage": 1} (or 2) with fp16, or bf16 at stage 0.'
        )
    if stage in (1, 2) and not is_bf16_optimizer(wrapper):
        if not isinstance(wrapper, DeepSpeedZeroOptimizer):
            raise ValueError(
                f"vrgd_ds supports ZeRO {stage} through DeepSpeedZeroOptimizer or BF16_Optimizer, got "
                f"{type(wrapper).__name__}: use ZeRO stage 1 or 2 without other optimizer wrappers."
            )
        device = getattr(getattr(engine._config.zero_config, "offload_optimizer", None), "device", None)
        if getattr(wrapper, "cpu_offload", False) and str(getattr(device, "value", device)) != "cpu":
            raise ValueError(
                f"vrgd_ds supports ZeRO-Offload at stage {stage} to the CPU only, got offload_optimizer device "
                f'{getattr(device, "value", device)!r}: use "device": "cpu".'
            )


def tie_order_refusal(module, groups) -> str | None:
    """Why the tie-group agreement of per-tensor sums (:func:`vrgd_ds.comm.agree_over_ties`) could
    deadlock on this pipeline, or None. ``groups``: this stage's tensors per flat partition (param
    group), in the order the optimizer steps them.

    Each stage agrees on its tied tensors' sums over their tie groups in the optimizer step, param
    group by param group, the tie keys of one group in sorted order: a blocking all-reduce per tie
    key and phase. With several keys, a stage that reaches key B before key A while another stage
    holding both reaches A first would wait forever. Every rank gathers every rank's order (one
    ``all_gather_object`` at initialize, only for modules with several TiedLayerSpec keys) and all
    refuse, with one verdict, when the orders admit no common one (a cycle). One key never does.
    """
    from deepspeed.pipe import TiedLayerSpec

    specs = getattr(module, "_layer_specs", None) or []
    if len({s.key for s in specs if isinstance(s, TiedLayerSpec)}) < 2:  # the same on every stage
        return None
    keys = {}
    for key, comm in (getattr(module, "tied_comms", None) or {}).items():
        if len(comm.get("ranks", ())) > 1:
            for attr in comm["weight_attr"]:
                keys[id(module._recursive_getattr(comm["module"], attr))] = key
    order = [key for tensors in groups for key in sorted(keys[id(p)] for p in tensors if id(p) in keys)]
    orders = [None] * dist.get_world_size()
    dist.all_gather_object(orders, order)
    sorter = graphlib.TopologicalSorter()
    for seen in orders:
        for first, then in zip(seen, seen[1:]):
            sorter.add(then, first)
    try:
        sorter.prepare()
    except graphlib.CycleError:
        found = sorted({tuple(o) for o in orders if len(o) > 1})
        return (
            f"weights tied across pipeline stages under several TiedLayerSpec keys that the stages' param groups "
            f"hold in contradicting orders (tie keys per rank, in param-group order: {found}): each copy's "
            "per-tensor sums are agreed on over its tie group in that order, which would deadlock. Put the tied "
            "weights in the same param groups on every stage (e.g. groups by name or shape)."
        )
    return None
