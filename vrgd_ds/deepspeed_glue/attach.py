"""Connect an engine's VR optimizer to the optimizer wrapper DeepSpeed built: :func:`attach`.

Called by the wrapped ``DeepSpeedEngine._configure_optimizer`` (:mod:`.registration`) once the
wrapper exists. In order: refuse what is not exact (:mod:`.refusals`), set the per-tensor
layouts of the flat tensors the wrapper hands the inner optimizer (:mod:`.layouts`), install the
universal-checkpoint hook, then build the wrapper kind's moment source — :mod:`.stage0`,
:mod:`.zero12`, :mod:`.bf16` or :mod:`.zero3` — set it on the optimizer
(``VROptimizer.set_moment_source``) and clear it after each of the wrapper's steps. The source is
then ``vrgd_ds.find_vr_optimizer(engine).moment_source``.
"""

from __future__ import annotations

import logging

from ..collect import k_too_small_message
from ..optimizer import VROptimizer
from ..shapes import full_dim
from .bf16 import BF16OptimizerLayout, bf16_optimizer_source, is_bf16_optimizer
from .config import MOMENT_REDUCTIONS, moment_reduction_of
from .layouts import stage0_tensor_parallel_layouts, zero_layouts
from .refusals import refuse_unsupported, tie_order_refusal
from .source import gradient_is_rounded, tied_weight_groups, wrap_method
from .stage0 import stage0_params, stage0_source
from .tensor_parallel import tensor_parallel_of
from .zero3 import attach_zero3
from .zero12 import zero_source

__all__ = ["attach"]

logger = logging.getLogger("vrgd_ds")


def _warn_flat_weight_decay(opt: VROptimizer) -> None:
    """The HF Trainer (and anyone passing model.parameters()) gives one flat list: biases and
    LayerNorm weights then get weight decay, unlike the Trainer's own optimizer."""
    if opt.weight_decay_exclude_1d or not opt.built_from_flat_list:
        return
    if any(g.get("weight_decay", 0) > 0 and any(full_dim(p) <= 1 for p in g["params"]) for g in opt.param_groups):
        logger.warning(
            "vrgd_ds: %s got one flat parameter list with weight_decay > 0, so 1-D tensors (biases, LayerNorm "
            "weights) get weight decay too. To exclude them as the HF Trainer and NVIDIA's BERT recipe do, set "
            '"weight_decay_exclude_1d": true in optimizer.params (or pass parameter groups).',
            type(opt).__name__,
        )


def _refuse_coalesced_reduction(engine) -> None:
    """ZeRO-2 samples from its buckets (zero12.py): under ``engine.coalesce_grad_reduction()`` a
    bucket would hold the sum of the block's micro-batches, not one sample each."""

    def refuse(*args, **kwargs):
        raise ValueError(
            "vrgd_ds: engine.coalesce_grad_reduction() hands ZeRO-2 the sum of several micro-batches' gradients, "
            "but VRGD needs each micro-batch's own gradient. Call engine.backward per micro-batch without it "
            '(DeepSpeed accumulates over gradient_accumulation_steps), or set "vr": false.'
        )

    if hasattr(engine, "coalesce_grad_reduction"):
        engine.coalesce_grad_reduction = refuse


def attach(engine) -> None:
    """Connect the engine's VR optimizer to DeepSpeed's optimizer wrapper (see the package docstring)."""
    from deepspeed.runtime.base_optimizer import ZeROOptimizer

    from ..universal import install as install_universal  # lazy: keeps `python -m vrgd_ds.universal` warning-free

    opt: VROptimizer = engine.basic_optimizer
    stage = engine.zero_optimization_stage()
    wrapper = engine.optimizer
    refuse_unsupported(engine, wrapper, stage)
    _warn_flat_weight_decay(opt)
    names = {id(p): n for n, p in engine.module.named_parameters()}
    gas = engine.gradient_accumulation_steps()
    dp_world = engine.seq_dp_world_size
    strategy = moment_reduction_of(opt)
    if strategy not in MOMENT_REDUCTIONS:
        raise ValueError(f"Invalid moment_reduction: {strategy!r}; use one of {MOMENT_REDUCTIONS}.")
    if opt.micro_batch_size is None:
        opt.micro_batch_size = engine.train_micro_batch_size_per_gpu()
    if stage == 3:
        attach_zero3(engine, opt, names, strategy)
        return
    if strategy == "auto":
        # per_step buys one reduction per step with a full-size buffer: nothing to buy with one
        # data-parallel rank (e.g. tensor × pipeline parallelism filling the world).
        strategy = "per_step" if gas > 1 and dp_world > 1 else "per_micro_step"

    bf16_optimizer = is_bf16_optimizer(wrapper)
    zero_view = BF16OptimizerLayout(wrapper) if bf16_optimizer else wrapper
    tp = tensor_parallel_of(engine)  # refused above unless ZeRO 0-2
    ties = tied_weight_groups(engine.module)  # pipelines' TiedLayerSpec across stages, in key order
    if bf16_optimizer or stage in (1, 2):
        reason = tie_order_refusal(engine.module, zero_view.round_robin_bit16_groups)
        if reason is not None:
            raise ValueError(f"vrgd_ds does not support {reason}")
        zero_layouts(opt, zero_view, names, tp, ties)
    elif tp is not None:
        stage0_tensor_parallel_layouts(opt, *stage0_params(opt, wrapper), names, tp)
    install_universal(engine)  # universal checkpoints keep the VR state, or are refused
    if not (opt.vr or opt.gradient_stats):
        return
    if gas * dp_world < 2:
        raise ValueError(
            k_too_small_message(gas * dp_world)
            + f" (DeepSpeed config: gradient_accumulation_steps={gas}, data-parallel world size={dp_world})."
        )
    # S = Σg in fp32 by our own hooks where DeepSpeed's G is rounded to 16 bits (source.py).
    track_first = gradient_is_rounded(engine)
    if bf16_optimizer:
        source = bf16_optimizer_source(opt, wrapper, zero_view, strategy, names, track_first)
    elif stage in (1, 2):
        source = zero_source(opt, wrapper, strategy, names, track_first, ties)
        if source.buckets is not None:
            _refuse_coalesced_reduction(engine)
    else:
        source = stage0_source(engine, opt, wrapper, names, track_first)
    # engine.backward scales the loss by the loss scale only for ZeRO wrappers (BF16_Optimizer
    # never scales; see the fp16 stage-0 refusal) and always divides it by gradient_accumulation_steps.
    if isinstance(wrapper, ZeROOptimizer) and not bf16_optimizer:
        source.loss_scale_fn = lambda: getattr(wrapper, "loss_scale", 1.0)
    # engine.backward divides the loss by the current gradient_accumulation_steps, which
    # engine.set_train_batch_size may change between steps.
    source.gas_fn = engine.gradient_accumulation_steps
    source.tied.groups = ties
    opt.set_moment_source(source)
    wrap_method(wrapper, "step", after=source.clear)
