"""Rank bodies for the pipeline tests: a 2-stage PipelineModule × 2 data-parallel ranks, with or
without a weight tied across the two stages."""

from __future__ import annotations

import torch
from torch import nn

from .models import micro_batches

STEPS = 3
MICRO_BATCHES = 8  # per optimizer step, all data-parallel ranks together


def pipeline_layers(seed: int = 0) -> list[nn.Module]:
    """The same layers as a plain nn.Sequential (the reference) and as pipeline stages."""
    g = torch.Generator().manual_seed(seed)
    layers = [nn.Linear(7, 11), nn.Tanh(), nn.Linear(11, 9), nn.Tanh(), nn.Linear(9, 5)]
    with torch.no_grad():
        for layer in layers:
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return layers


def tied_layers(seed: int = 0, width: int = 9) -> dict[str, nn.Module]:
    """A model whose input layer "io" (7 → 11, no bias) is reused transposed as a later layer
    (11 → 7), the shape of an embedding tied to the output layer; keys are the pipeline's layer
    indices ("io" is its TiedLayerSpec key). Forward: :func:`tied_forward`.

    ``width``: the features between layers "2" and "4". At 9 the tied weight (first in each
    stage's flat ZeRO-1 buffer) lies whole in data-parallel rank 0's partition on both stages; at 1
    the stages' other tensors are small, so it straddles the two ranks' partitions — at another
    element on each stage (45 + 32 elements on the first, 70 + 7 on the last), as a large
    embedding does."""
    g = torch.Generator().manual_seed(seed)
    layers = {
        "io": nn.Linear(7, 11, bias=False),
        "2": nn.Linear(11, width),
        "4": nn.Linear(width, 11),
        "7": nn.Linear(7, 5),
    }
    with torch.no_grad():
        for layer in layers.values():
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return layers


def tied_output(io: nn.Module, h):
    return h @ io.weight


def tied_forward(layers: dict[str, nn.Module], x):
    h = torch.tanh(layers["io"](x))
    h = torch.tanh(layers["4"](torch.tanh(layers["2"](h))))
    return layers["7"](tied_output(layers["io"], h))


def tied_pipeline_module(loss_fn, tie_bias: bool = False, width: int = 9):
    """:func:`tied_layers` as 2 stages: "io" on both (TiedLayerSpec), initialized as the reference
    (``tie_bias``: "io" gets a bias, tied too — two tensors under one key, refused)."""
    from deepspeed.pipe import PipelineModule, TiedLayerSpec

    layers = tied_layers(width=width)
    attrs = ["weight", "bias"] if tie_bias else "weight"
    spec = [
        TiedLayerSpec("io", nn.Linear, 7, 11, bias=tie_bias, tied_weight_attr=attrs),
        nn.Tanh(),
        layers["2"],
        nn.Tanh(),
        layers["4"],
        nn.Tanh(),
        TiedLayerSpec("io", nn.Linear, 7, 11, bias=tie_bias, tied_weight_attr=attrs, forward_fn=tied_output),
        layers["7"],
    ]
    module = PipelineModule(layers=spec, num_stages=2, loss_fn=loss_fn, partition_method="uniform")
    with torch.no_grad():
        module.tied_modules["io"].weight.copy_(layers["io"].weight)
    return module


def two_keys_pipeline_module(loss_fn):
    """Two weights tied across the 2 stages under two TiedLayerSpec keys: "io" (as in
    :func:`tied_pipeline_module`) and "mid" (11 → 11, no bias), each used on the first stage and
    again, transposed, on the last; the last stage's only other layer is "7"."""
    from deepspeed.pipe import PipelineModule, TiedLayerSpec

    layers = tied_layers()
    spec = [
        TiedLayerSpec("io", nn.Linear, 7, 11, bias=False),
        nn.Tanh(),
        TiedLayerSpec("mid", nn.Linear, 11, 11, bias=False),
        nn.Tanh(),
        TiedLayerSpec("mid", nn.Linear, 11, 11, bias=False, forward_fn=lambda m, h: h @ m.weight),
        nn.Tanh(),
        TiedLayerSpec("io", nn.Linear, 7, 11, bias=False, forward_fn=tied_output),
        layers["7"],
    ]
    return PipelineModule(layers=spec, num_stages=2, loss_fn=loss_fn, partition_method="uniform")


def two_keys_param_groups(module, swapped: bool) -> list[dict]:
    """The stage's parameters in two groups: "io" in the first, "mid" and the rest in the second —
    or (``swapped``) on the last stage "mid" in the first and "io" with the rest in the second."""
    io, mid = module.tied_modules["io"].weight, module.tied_modules["mid"].weight
    first = mid if swapped and module.stage_id == 1 else io
    return [{"params": [first]}, {"params": [p for p in module.parameters() if p is not first]}]


def mse(out, y):
    return ((out - y) ** 2).mean()


def _stage_params(engine) -> dict:
    """{name: this stage's fp32 (master) weights}. PipelineModule names a stage's parameters by
    their global layer index ("4.weight"); the tied weight is "io.weight" here on both stages."""
    from deepspeed.utils import safe_get_full_fp32_param

    params = {n: p for n, p in engine.module.named_parameters()}
    if engine.bfloat16_enabled():  # the fp32 master weights (BF16_Optimizer's flat partitions)
        params = {n: safe_get_full_fp32_param(p) for n, p in params.items()}
    return {n.replace("tied_modules.", ""): p.detach().float().clone() for n, p in params.items()}


def bf16_samples(case: dict, weights: dict, x, y, scale: float) -> dict:
    """One micro-batch's gradient samples as a bf16 pipeline computes them, in one process: the
    model in bf16 at ``weights``; a tied weight's two uses as separate copies whose shares are
    summed in float64 (as TiedWeightSamples sums fp32 copies). {name: float64 gradient of
    scale × loss}."""
    if case.get("tied"):
        layers = {k: m.to(torch.bfloat16) for k, m in tied_layers(width=case.get("width", 9)).items()}
        model = nn.ModuleDict(layers)
    else:
        model = nn.Sequential(*pipeline_layers()).to(torch.bfloat16)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(weights[n])
    x, y = x.to(torch.bfloat16), y.to(torch.bfloat16)
    if case.get("tied"):
        out_copy = layers["io"].weight.detach().clone().requires_grad_()  # the last stage's copy
        h = torch.tanh(layers["io"](x))
        h = torch.tanh(layers["4"](torch.tanh(layers["2"](h))))
        loss = mse(layers["7"](h @ out_copy), y) * scale
        grads = torch.autograd.grad(loss, list(params.values()) + [out_copy])
        out = {n: g.double() for n, g in zip(params, grads)}
        out["io.weight"] = out["io.weight"] + grads[-1].double()
        return out
    loss = mse(model(x), y) * scale
    return {n: g.double() for n, g in zip(params, torch.autograd.grad(loss, list(params.values())))}


def pipeline_case(rank: int, world: int, case: dict):
    """Train through deepspeed.PipelineEngine for ``case["steps"]`` steps (default :data:`STEPS`);
    returns {param name: fp32 tensor} of this stage (a tied weight as "io.weight"), or the error
    initialize raised. Tied cases also return ``tied_diffs``: per step, the largest difference
    between the tied weight's copies on the two stages (fp32 master weights too with bf16), and
    ``tied_pieces``: the lengths of the tied weight's pieces in this rank's flat partitions."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.pipe import PipelineModule
    from deepspeed.utils import safe_get_full_fp32_param

    import vrgd_ds

    dp = world // 2
    gas = MICRO_BATCHES // dp
    model_parameters = None
    if case.get("tied") in ("two keys", "two keys swapped"):
        module = two_keys_pipeline_module(mse)
        model_parameters = two_keys_param_groups(module, swapped=case["tied"] == "two keys swapped")
    elif case.get("tied"):
        module = tied_pipeline_module(mse, tie_bias=case["tied"] == "weight and bias", width=case.get("width", 9))
    else:
        layers = pipeline_layers()
        if "inf_step" in case:
            # The last layer's weight gradient (stage 1) is non-finite at that step, the rest of
            # the model's (stage 0) finite: every stage must skip the step, not stage 1 alone.
            training = {"step": 0}
            inf = float("inf")
            layers[-1].weight.register_hook(lambda g: g * inf if training["step"] == case["inf_step"] else g)
        module = PipelineModule(layers=layers, num_stages=2, loss_fn=mse, partition_method="uniform")
    cfg = {
        "train_batch_size": 4 * MICRO_BATCHES,
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": gas,
        "optimizer": {"type": case["type"], "params": dict(case["params"])},
        "zero_optimization": {"stage": case["stage"]},
        "gradient_clipping": case.get("clip", 0.0),
        "steps_per_print": 10**9,
    }
    if case.get("precision") == "bf16":
        cfg["bf16"] = {"enabled": True}  # a bf16 pipeline at stage 0: DeepSpeed's BF16_Optimizer
    if case.get("precision") == "fp16":
        from .ds_bodies import allow_cpu_fp16

        allow_cpu_fp16()
        cfg["fp16"] = {"enabled": True}
    try:
        engine, *_ = deepspeed.initialize(
            model=module, model_parameters=model_parameters or list(module.parameters()), config=cfg
        )
    except Exception as exc:  # noqa: BLE001 - a refusal is the result checked
        return {"error": f"{type(exc).__name__}: {exc}"}
    dp_rank = engine.grid.get_data_parallel_rank()
    steps = []  # bf16: this stage's fp32 master weights before and after every step
    steps_run = case.get("steps", STEPS)
    batches = micro_batches(MICRO_BATCHES * steps_run, skip_extra=False)
    bf16 = case.get("precision") == "bf16"
    tied_diffs = []
    for step in range(steps_run):
        if "inf_step" in case:
            training["step"] = step
        dtype = torch.bfloat16 if bf16 else torch.float32
        mine = [tuple(t.to(dtype) for t in batches[step * MICRO_BATCHES + a * dp + dp_rank][:2]) for a in range(gas)]
        before = _stage_params(engine) if bf16 else None
        engine.train_batch(iter(mine))
        if bf16:
            steps.append({"before": before, "after": _stage_params(engine)})
        if case.get("tied"):
            diff = 0.0
            for comm in engine.module.tied_comms.values():  # every tie key, in the same order on each stage
                weight = comm["module"].weight
                copies = [weight.detach().float()] + ([safe_get_full_fp32_param(weight).detach()] if bf16 else [])
                for t in copies:
                    gathered = [torch.empty_like(t) for _ in comm["ranks"]]
                    dist.all_gather(gathered, t.contiguous(), group=comm["group"])
                    diff = max(diff, max(float((g - gathered[0]).abs().max()) for g in gathered))
            tied_diffs.append(diff)
    opt = vrgd_ds.find_vr_optimizer(engine)
    layouts = [opt.layout_of(p) for group in opt.param_groups for p in group["params"]]
    tied_pieces = [b - a for lay in layouts for key, a, b in lay.pieces() if lay.names[key].endswith("io.weight")]
    return {
        "error": None,
        "wrapper": type(engine.optimizer).__name__,
        "params": _stage_params(engine),
        "steps": steps,
        "tied_diffs": tied_diffs,
        "tied_pieces": tied_pieces,
        # Steps skipped by the VR optimizer (stage 0) or by DeepSpeed's overflow check (ZeRO 1).
        "skipped_steps": vrgd_ds.find_vr_optimizer(engine).skipped_steps + engine.skipped_steps,
    }


def train_reference(case: dict) -> dict:
    """The single-process run: the same layers (one "io" weight where the pipeline ties two
    copies), all 8 micro-batches accumulated per step."""
    import vrgd_ds

    if case.get("tied"):
        model = nn.ModuleDict(tied_layers(width=case.get("width", 9)))

        def forward(x):
            return tied_forward(model, x)
    else:
        model = forward = nn.Sequential(*pipeline_layers())
    cls = vrgd_ds.OPTIMIZERS[case["type"].lower()]
    params = {k: v for k, v in case["params"].items() if k != "moment_reduction"}  # a DeepSpeed-glue option
    opt = cls(model.parameters(), **params)
    steps = case.get("steps", STEPS)
    batches = micro_batches(MICRO_BATCHES * steps, skip_extra=False)
    for step in range(steps):
        if step == case.get("inf_step"):  # a non-finite step: skipped
            continue
        for x, y, _ in batches[step * MICRO_BATCHES : (step + 1) * MICRO_BATCHES]:
            (mse(forward(x), y) / MICRO_BATCHES).backward()
        if case.get("clip"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), case["clip"])
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def pipeline_cases(rank: int, world: int, cases: list[dict]):
    """Several pipeline cases in one process group: {case name: pipeline_case result}."""
    return {case["name"]: pipeline_case(rank, world, case) for case in cases}
