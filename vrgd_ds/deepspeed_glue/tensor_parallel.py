"""Tensor parallelism through a Megatron-style ``mpu``: per-tensor sums over whole sharded tensors.

With tensor-parallel size t > 1 a tensor marked ``tensor_model_parallel`` (or ``model_parallel``;
DeepSpeed's runtime/utils.py:134 ``is_model_parallel_parameter``) holds 1/t of a parameter on each
rank of its tensor-parallel group (Megatron shards evenly, so the whole tensor has J = t × its local
size); every other tensor is replicated on the t ranks, with the same gradient on each. The
gradient samples of one micro-batch are then those of the whole model, spread over the t ranks,
and DeepSpeed reduces gradients over the data-parallel group only (utils/groups.py:767
``_get_data_parallel_group`` → ``mpu.get_data_parallel_group()``), so:

* k counts data-parallel ranks × micro-batches only — already so, every source's world is the
  data-parallel group;
* a per-tensor sum (mean of r, LAMB/LARS norms, the noise statistics' ΣS² and ΣQ) of a sharded
  tensor is completed over the data-parallel group, then over the tensor-parallel group
  (``bwc_tensor_model_parallel_group``, utils/bwc.py:63; never ``get_model_parallel_group`` of a
  pipeline grid, which spans pipe × model); a replicated tensor's sum is never summed over it.
  :func:`~vrgd_ds.comm.all_reduce_sum_sharded` is that ``complete``; the layouts carry J.
  Cost: one more all-reduce of the sharded tensors' per-tensor sums over the tensor-parallel group
  per phase (a few floats per tensor).

At stage 0 every rank of a model replica (tensor-parallel peers, pipeline stages) must agree on
skipping a non-finite step: the source's local check is agreed on over the mpu's model-parallel
group (``Stage0MomentSource.all_finite``); at ZeRO 1/2 the check rides in the completed sums, as
without tensor parallelism, and DeepSpeed's own overflow check spans that group too.

Exact and tested (tests/test_tensor_parallel.py, TP2 × DP2 on 4 CPU ranks, against the whole
model in float64): ZeRO 0, 1, 2, 3 in fp32; VRLamb, VRLars, VRSGD, VRAdamW; vr=False LAMB/LARS;
gradient clipping; both moment reductions; CPU offload_optimizer at ZeRO 2; bf16 (stage 0's
FP16_UnfusedOptimizer, DeepSpeedZeroOptimizer at ZeRO 1/2, BF16_Optimizer) and fp16 at ZeRO 1/2
within the documented 16-bit update tolerances; ZeRO-3 (each local shard partitioned over the
data-parallel ranks: J = its ``ds_numel`` × t), bf16 too. With pipelines (DeepSpeed's
``PipelineParallelGrid``, whose tensor-parallel group is its slice group; tests/test_pipeline.py:
TP2 × PP2, weights tied across stages too). Refused (:func:`tensor_parallel_refusal`, tested in
tests/test_refusals.py): Megatron sequence parallelism (parameters marked ``sequence_parallel``)
or an mpu with a sequence-parallel size > 1 (DeepSpeed-Ulysses).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

__all__ = ["TensorParallel", "tensor_parallel_of", "tensor_parallel_refusal"]


@dataclass(frozen=True)
class TensorParallel:
    """The tensor-parallel group of this rank (``world`` > 1)."""

    group: object
    world: int

    @staticmethod
    def is_sharded(p) -> bool:
        """Megatron marks the tensors it splits over the tensor-parallel group."""
        from deepspeed.runtime.utils import is_model_parallel_parameter

        return bool(is_model_parallel_parameter(p))

    def whole_numel(self, p) -> int:
        """J of the parameter whose local tensor is ``p``."""
        return p.numel() * self.world if self.is_sharded(p) else p.numel()


def _first_size(mpu, getters: tuple[str, ...]) -> int:
    """What the first of ``getters`` the mpu has returns, else 1."""
    for getter in getters:
        fn = getattr(mpu, getter, None)
        if fn is not None:
            return int(fn())
    return 1


def tensor_model_parallel_size(mpu) -> int:
    # Megatron's interface; DeepSpeed's PipelineParallelGrid counts pipeline stages in
    # get_model_parallel_world_size, so the tensor-parallel getter comes first.
    return _first_size(mpu, ("get_tensor_model_parallel_world_size", "get_model_parallel_world_size"))


def tensor_parallel_of(engine) -> TensorParallel | None:
    """The engine's tensor-parallel group, or None without tensor parallelism."""
    mpu = getattr(engine, "mpu", None)
    if mpu is None or tensor_model_parallel_size(mpu) <= 1:
        return None
    from deepspeed.utils.bwc import bwc_tensor_model_parallel_group

    group = bwc_tensor_model_parallel_group(mpu)
    return TensorParallel(group, dist.get_world_size(group=group))


def tensor_parallel_refusal(engine) -> str | None:
    """Why this engine's tensor parallelism cannot give the exact update yet, or None (also None
    without tensor parallelism)."""
    mpu = getattr(engine, "mpu", None)
    if mpu is None:
        return None
    size = tensor_model_parallel_size(mpu)
    if size <= 1:
        return None
    what = f"tensor (model) parallelism with {size} shards per tensor"
    if not (hasattr(mpu, "get_tensor_model_parallel_group") or hasattr(mpu, "get_slice_parallel_group")):
        return f"{what} through an mpu without get_tensor_model_parallel_group (Megatron's interface): add it"
    # Megatron-DeepSpeed's mpu always has the sequence-parallel getters (DeepSpeed-Ulysses; size 1
    # unless --ds-sequence-parallel-size); Megatron's own --sequence-parallel marks parameters.
    sequence = getattr(mpu, "get_sequence_parallel_world_size", None)
    try:
        sequence_size = 1 if sequence is None else int(sequence())
    except Exception:  # noqa: BLE001 - an mpu whose sequence-parallel groups were never set up
        sequence_size = 1
    if sequence_size > 1 or any(getattr(p, "sequence_parallel", False) for p in engine.module.parameters()):
        return (
            f"{what} with sequence parallelism (LayerNorm and bias gradients are partial per tensor-parallel "
            "rank): turn sequence parallelism off"
        )
    return None
