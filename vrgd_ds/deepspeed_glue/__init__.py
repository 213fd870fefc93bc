"""DeepSpeed glue: VRGD's moments on the tensors DeepSpeed's optimizer wrappers hand the inner optimizer.

This package is the only place that touches DeepSpeed internals (0.19.x; line numbers below are
deepspeed 0.19.8's). One module per job:

* :mod:`.registration` — DeepSpeed has no optimizer plug-in registry: :func:`register` (run at
  ``import vrgd_ds``) wraps three ``DeepSpeedEngine`` methods (runtime/engine.py:1985
  ``_is_supported_optimizer``, :2476 ``_configure_basic_optimizer``, :2328
  ``_configure_optimizer``) and appends our classes to ZeRO's supported list (zero/utils.py:45).
* :mod:`.versions` — which DeepSpeed versions are exact for what (the table
  ``scripts/version_matrix.sh`` measured), checked at ``deepspeed.initialize``, never at import;
  :mod:`.compat` fills in wrapper attributes older releases lack.
* :mod:`.config` — ``"optimizer": {"type": "VRLamb", "params": {...}}`` → a VR optimizer
  (:func:`build_from_config`), and the ``moment_reduction`` option.
* :mod:`.refusals` — every parallel layout that cannot give the exact update yet, refused at
  ``deepspeed.initialize`` with what to change (:func:`unsupported_parallelism`).
* :mod:`.attach` — :func:`attach`: once DeepSpeed has wrapped the optimizer, connect the VR
  optimizer to that wrapper: pick the wrapper kind's module below.
* :mod:`.source` — :class:`DeepSpeedMomentSource`, what every DeepSpeed moment source shares
  (sample counting, r from DeepSpeed's reduced gradient, the end of a step); it implements the
  :class:`~vrgd_ds.moments.MomentSource` protocol the optimizer relies on.
* one module per wrapper kind, each a moment source plus its wiring (which wrapper method is
  wrapped to form r before DeepSpeed unscales and clips): :mod:`.stage0` (ZeRO 0, fp32 or
  FP16_UnfusedOptimizer), :mod:`.zero12` (DeepSpeedZeroOptimizer, ZeRO 1/2), :mod:`.bf16`
  (BF16_Optimizer), :mod:`.zero3` (DeepSpeedZeroOptimizer_Stage3). A new kind is a new module
  beside them: a source, and a :class:`~vrgd_ds.segments.SegmentLayout` per tensor it hands over.
* :mod:`.layouts` — the per-tensor :class:`~vrgd_ds.segments.SegmentLayout` of ZeRO's flat
  partitions (ZeRO 1/2 and BF16_Optimizer; ZeRO-3's sub-groups; tensor-parallel shards at stage 0).
* :mod:`.tensor_parallel` — tensor parallelism through a Megatron-style ``mpu``: which tensors are
  sharded, their whole size J, and what is refused; sharded tensors' per-tensor sums are
  completed over the tensor-parallel group too.
* communication without DeepSpeed (reduce-scatters over point-to-point sends on gloo, the
  per-tensor all-reduce): :mod:`vrgd_ds.comm`.

What :func:`attach` installs (VRGD.md §1, DEEPSPEED_NOTES.md): a tensor hook per trainable
parameter adds g² of every micro-batch (this rank's own gradient, before DeepSpeed accumulates or
reduces it; a weight tied across pipeline stages: the sum of the stages' shares, see
:class:`~.source.TiedWeightSamples`) into fp32 accumulators, reduced onto exactly the elements
the inner optimizer updates on this rank; the first moment is the gradient DeepSpeed already
reduced, so r is formed from it just before DeepSpeed unscales and clips it (r independent of the loss scale and of
``gradient_clipping``), in place of Σg². Per-tensor sums (layer mean of r, LAMB/LARS norms, the
noise statistics) go through each flat tensor's SegmentLayout. After every wrapper step (applied,
or skipped on fp16 overflow) the accumulators are cleared; a skipped step never reaches our
``step()``, so GSNR momentum is untouched.

The public way to the source of an engine: ``vrgd_ds.find_vr_optimizer(engine).moment_source``.
"""

from __future__ import annotations

from .attach import attach
from .bf16 import BF16OptimizerLayout
from .config import MOMENT_REDUCTIONS, build_from_config
from .refusals import unsupported_parallelism
from .registration import TESTED_DEEPSPEED, TESTED_RANGE_TEXT, register
from .source import DeepSpeedMomentSource
from .stage0 import Stage0MomentSource
from .zero3 import Zero3MomentSource, attach_zero3, check_supported
from .zero12 import ZeroMomentSource

__all__ = [
    "register",
    "attach",
    "attach_zero3",
    "build_from_config",
    "check_supported",
    "unsupported_parallelism",
    "DeepSpeedMomentSource",
    "Stage0MomentSource",
    "ZeroMomentSource",
    "Zero3MomentSource",
    "BF16OptimizerLayout",
    "MOMENT_REDUCTIONS",
    "TESTED_DEEPSPEED",
    "TESTED_RANGE_TEXT",
]
