"""Rank bodies for tensor parallelism inside a DeepSpeed pipeline (tests/test_tp_pipeline.py): 4
CPU ranks = 2 pipeline stages × 2 tensor-parallel ranks (Megatron's layout inside DeepSpeed's
``PipeModelDataParallelTopology``; its ``PipelineParallelGrid`` is the engine's mpu); 8 with 2
data-parallel ranks (a case's ``dp``).

The model, Megatron-style, with an embedding-like input weight "io" used again, transposed, by
the last stage (``tied``: one weight tied across the stages by ``TiedLayerSpec``, as GPT's
embedding and output layer; untied: a separate "head" weight of the same shape there)::

    stage 0:  h = tanh(x io^T)            io: column-parallel (rows split)
              h = tanh(fc2(h))            fc2: row-parallel (columns split), bias replicated
    stage 1:  h = tanh(fc3(h))            fc3: column-parallel, bias split
              o = h io  (or h head)       row-parallel use of io / head (rows split)
              y = out(o)                  out: replicated
"""

from __future__ import annotations

import torch
from torch import nn

from vrgd_ds.megatron_mpu import copy_to_tensor_parallel_region, reduce_from_tensor_parallel_region

from .models import micro_batches

TP, PP = 2, 2
STEPS = 3
MICRO_BATCHES = 8  # per optimizer step (one data-parallel rank)
HIDDEN = 10
# Whole tensors: name -> shape, and the dimension sharded over the tensor-parallel ranks.
SHAPES = {
    "io.weight": (HIDDEN, 7),
    "fc2.weight": (9, HIDDEN),
    "fc2.bias": (9,),
    "fc3.weight": (HIDDEN, 9),
    "fc3.bias": (HIDDEN,),
    "head.weight": (HIDDEN, 7),
    "out.weight": (5, 7),
    "out.bias": (5,),
}
SHARDED_DIMS = {"io.weight": 0, "fc2.weight": 1, "fc3.weight": 0, "fc3.bias": 0, "head.weight": 0}


def whole_weights(tied: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    weights = {name: torch.randn(shape, generator=g) * 0.5 for name, shape in SHAPES.items()}
    if tied:
        del weights["head.weight"]
    return weights


class TensorParallelHandle:
    """This rank's tensor-parallel coordinate; ``group`` is set once the pipeline grid exists."""

    def __init__(self, rank: int):
        self.rank = rank
        self.group = None


def _shard(whole: torch.Tensor, name: str, tp: TensorParallelHandle) -> nn.Parameter:
    if name not in SHARDED_DIMS:
        return nn.Parameter(whole.clone())
    p = nn.Parameter(whole.chunk(TP, dim=SHARDED_DIMS[name])[tp.rank].clone())
    p.tensor_model_parallel = True  # what Megatron's layers set
    p.partition_dim = SHARDED_DIMS[name]
    p.partition_stride = 1
    return p


class ColumnParallel(nn.Module):
    def __init__(self, label: str, weights: dict, tp: TensorParallelHandle):
        super().__init__()
        self.label, self.tp = label, tp
        self.weight = _shard(weights[f"{label}.weight"], f"{label}.weight", tp)
        bias = weights.get(f"{label}.bias")
        self.bias = None if bias is None else _shard(bias, f"{label}.bias", tp)

    def forward(self, x):
        if x.requires_grad:  # the input's gradient is the sum of the shards' parts
            x = copy_to_tensor_parallel_region(x, self.tp.group)
        return nn.functional.linear(x, self.weight, self.bias)


class RowParallel(nn.Module):
    def __init__(self, label: str, weights: dict, tp: TensorParallelHandle):
        super().__init__()
        self.label, self.tp = label, tp
        self.weight = _shard(weights[f"{label}.weight"], f"{label}.weight", tp)
        self.bias = _shard(weights[f"{label}.bias"], f"{label}.bias", tp)

    def forward(self, h):
        return reduce_from_tensor_parallel_region(nn.functional.linear(h, self.weight), self.tp.group) + self.bias


class Replicated(nn.Linear):
    def __init__(self, label: str, weights: dict):
        w = weights[f"{label}.weight"]
        super().__init__(w.shape[1], w.shape[0])
        self.label = label
        with torch.no_grad():
            self.weight.copy_(w)
            self.bias.copy_(weights[f"{label}.bias"])


class TransposedUse(nn.Module):
    """``h W`` for a column-parallel W (rows split): a row-parallel product, summed over the
    tensor-parallel ranks (the untied "head"; the tied "io" uses :func:`transposed_use`)."""

    def __init__(self, label: str, weights: dict, tp: TensorParallelHandle):
        super().__init__()
        self.label, self.tp = label, tp
        self.weight = _shard(weights[f"{label}.weight"], f"{label}.weight", tp)

    def forward(self, h):
        return transposed_use(self, h)


def transposed_use(module, h):
    return reduce_from_tensor_parallel_region(h @ module.weight, module.tp.group)


class TiedIO(ColumnParallel):
    def __init__(self, weights: dict, tp: TensorParallelHandle):
        super().__init__("io", weights, tp)


def reference_forward(w: dict, x):
    """The whole model (any dtype), for the single-process reference."""
    h = torch.tanh(x @ w["io.weight"].T)
    h = torch.tanh(h @ w["fc2.weight"].T + w["fc2.bias"])
    h = torch.tanh(h @ w["fc3.weight"].T + w["fc3.bias"])
    o = h @ w.get("head.weight", w["io.weight"])
    return o @ w["out.weight"].T + w["out.bias"]


def sharded_samples(whole: dict, x, y, dtype, scale: float) -> dict:
    """The run's per-micro-batch gradient samples in 16 bits, in one process: each
    tensor-parallel rank's shards in ``dtype``, the row-parallel partial outputs summed in
    ``dtype`` (the forward all-reduce), the tied weight's two uses as separate copies whose
    shares are summed in float64 (TiedWeightSamples sums fp32 copies of the shares). Returns
    {whole-tensor name: gradient of scale × loss, float64}."""
    shards = {
        (n, t): (w.chunk(TP, dim=SHARDED_DIMS[n])[t] if n in SHARDED_DIMS else w).to(dtype).requires_grad_()
        for n, w in whole.items()
        for t in range(TP if n in SHARDED_DIMS else 1)
    }
    tied = "head.weight" not in whole
    # The last stage's copy of io (tied) or the head.
    head = {
        t: (shards["io.weight", t].detach().clone().requires_grad_() if tied else shards["head.weight", t])
        for t in range(TP)
    }
    x, y = x.to(dtype), y.to(dtype)
    h1 = [torch.tanh(x @ shards["io.weight", t].T) for t in range(TP)]
    h2 = torch.tanh(sum(h1[t] @ shards["fc2.weight", t].T for t in range(TP)) + shards["fc2.bias", 0])
    h3 = [torch.tanh(h2 @ shards["fc3.weight", t].T + shards["fc3.bias", t]) for t in range(TP)]
    o = sum(h3[t] @ head[t] for t in range(TP))
    loss = mse(o @ shards["out.weight", 0].T + shards["out.bias", 0], y) * scale
    leaves = list(shards.values()) + ([head[t] for t in range(TP)] if tied else [])
    grads = dict(zip(map(id, leaves), torch.autograd.grad(loss, leaves)))
    out = {}
    for n in whole:
        parts = [grads[id(shards[n, t])].double() for t in range(TP if n in SHARDED_DIMS else 1)]
        if tied and n == "io.weight":
            parts = [g + grads[id(head[t])].double() for t, g in enumerate(parts)]
        out[n] = torch.cat(parts, dim=SHARDED_DIMS[n]) if n in SHARDED_DIMS else parts[0]
    return out


def mse(out, y):
    return ((out - y) ** 2).mean()


def tp_pipeline_module(tied: bool, tp: TensorParallelHandle, dp: int = 1):
    from deepspeed.pipe import PipelineModule, TiedLayerSpec
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    weights = whole_weights(tied)
    if tied:
        first = TiedLayerSpec("io", TiedIO, weights, tp)
        last = TiedLayerSpec("io", TiedIO, weights, tp, forward_fn=transposed_use)
    else:
        first, last = ColumnParallel("io", weights, tp), TransposedUse("head", weights, tp)
    layers = [
        first,
        nn.Tanh(),
        RowParallel("fc2", weights, tp),
        nn.Tanh(),
        ColumnParallel("fc3", weights, tp),
        nn.Tanh(),
        last,
        Replicated("out", weights),
    ]
    topology = PipeModelDataParallelTopology(num_pp=PP, num_mp=TP, num_dp=dp)
    module = PipelineModule(layers=layers, topology=topology, loss_fn=mse, partition_method="uniform")
    tp.group = module.mpu().get_slice_parallel_group()
    return module


def _labelled(engine) -> dict[str, torch.Tensor]:
    """{whole-tensor name: this rank's fp32 master of it}."""
    from deepspeed.utils import safe_get_full_fp32_param

    bf16 = engine.bfloat16_enabled()
    out = {}
    for name, p in engine.module.named_parameters():
        if name.startswith("tied_modules."):
            label = name[len("tied_modules.") :]
        else:
            idx, attr = name.split(".", 1)  # PipelineModule names a layer by its index
            label = f"{getattr(engine.module, idx).label}.{attr}"
        t = safe_get_full_fp32_param(p) if bf16 else p
        out[label] = t.detach().float().clone()
    return out


def tp_pipeline_case(rank: int, world: int, case: dict) -> dict:
    import deepspeed
    import torch.distributed as dist

    import vrgd_ds

    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    dp = case.get("dp", 1)
    coord = PipeModelDataParallelTopology(num_pp=PP, num_mp=TP, num_dp=dp).get_coord(rank)
    tp = TensorParallelHandle(coord.model)
    module = tp_pipeline_module(case.get("tied", False), tp, dp)
    model_parameters = list(module.parameters())
    if case.get("io_alone"):
        # The tied weight alone in the first param group on the first stage, with the output layer
        # on the last: the data-parallel ranks cut it at element 18 of 35 on the first stage, not
        # at all on the last.
        io = module.tied_modules["io"].weight
        with_io = [io] + ([p for n, p in module.named_parameters() if n.startswith("7.")] if coord.pipe == 1 else [])
        model_parameters = [
            {"params": with_io},
            {"params": [p for p in model_parameters if all(p is not q for q in with_io)]},
        ]
    cfg = {
        "train_batch_size": 4 * MICRO_BATCHES,
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": MICRO_BATCHES // dp,
        "optimizer": {"type": case["type"], "params": dict(case["params"])},
        "zero_optimization": {"stage": case["stage"]},
        "gradient_clipping": case.get("clip", 0.0),
        "steps_per_print": 10**9,
        **case.get("extra", {}),
    }
    bf16 = case.get("precision") == "bf16"
    if bf16:
        cfg["bf16"] = {"enabled": True}  # a bf16 pipeline at stage 0: DeepSpeed's BF16_Optimizer
    try:
        engine, *_ = deepspeed.initialize(model=module, model_parameters=model_parameters, config=cfg)
    except Exception as exc:  # noqa: BLE001 - a refusal is the result checked
        return {"error": f"{type(exc).__name__}: {exc}"}
    num_steps = case.get("steps", STEPS)
    batches = micro_batches(MICRO_BATCHES * num_steps, skip_extra=False)
    dtype = torch.bfloat16 if bf16 else torch.float32
    steps, tied_diffs = [], []
    for step in range(num_steps):
        before = _labelled(engine)
        mine = [
            tuple(t.to(dtype) for t in b[:2])
            for b in batches[step * MICRO_BATCHES : (step + 1) * MICRO_BATCHES][coord.data :: dp]
        ]
        engine.train_batch(iter(mine))
        after = _labelled(engine)
        steps.append({"before": before, "after": after, "noise": dict(vrgd_ds.find_vr_optimizer(engine).noise_stats())})
        if case.get("tied"):
            comm = engine.module.tied_comms["io"]
            t = after["io.weight"]
            gathered = [torch.empty_like(t) for _ in comm["ranks"]]
            dist.all_gather(gathered, t.contiguous(), group=comm["group"])
            tied_diffs.append(max(float((g - gathered[0]).abs().max()) for g in gathered))
    opt = vrgd_ds.find_vr_optimizer(engine)
    layouts = [opt.layout_of(p) for group in opt.param_groups for p in group["params"]]
    return {
        "error": None,
        "stage": coord.pipe,
        "tp_rank": coord.model,
        "wrapper": type(engine.optimizer).__name__,
        "steps": steps,
        "tied_diffs": tied_diffs,
        # The lengths of the tied weight's pieces in this rank's flat tensors.
        "tied_pieces": [b - a for lay in layouts for k, a, b in lay.pieces() if lay.names[k].endswith("io.weight")],
    }


def tp_pipeline_cases(rank: int, world: int, cases: list[dict]) -> dict:
    """Several cases in one process group: {case name: tp_pipeline_case result}."""
    return {case["name"]: tp_pipeline_case(rank, world, case) for case in cases}
