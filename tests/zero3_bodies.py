"""Rank bodies for the ZeRO-3 tests (tests/test_zero3.py): the update matrix's cases
(tests/matrix_bodies.py) at stage 3, with the stage-3 knobs (sub_group_size, bucket size,
offload) merged into ``zero_optimization``; a checkpoint round trip; refusals."""

from __future__ import annotations

import torch

from .ds_bodies import SAMPLES_PER_STEP
from .matrix_bodies import STEPS, build_model, case_loss, ds_config, master_params, param_groups
from .models import micro_batches


def z3_config(case: dict, world: int) -> dict:
    cfg = ds_config(case, world)
    cfg.update(case.get("extra", {}))
    zero = dict(cfg.get("zero_optimization", {}), stage=case["stage"])
    zero.update(case.get("zero", {}))
    cfg["zero_optimization"] = zero
    return cfg


def _engine(case: dict, world: int):
    import deepspeed

    import vrgd_ds  # registers the config types

    model = build_model(case.get("model", "tiny"))
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, case), config=z3_config(case, world)
    )
    if case.get("collectives"):
        # The NCCL code path (dist.reduce_scatter) instead of gloo's point-to-point one.
        vrgd_ds.find_vr_optimizer(engine).moment_source.pairwise_exchange = False
    return engine


def _train(engine, case, rank, world, first_step, steps, record=True):
    import vrgd_ds

    gas = SAMPLES_PER_STEP // world
    batches = micro_batches(SAMPLES_PER_STEP * (first_step + steps), skip_extra=False)
    dtype = next(engine.module.parameters()).dtype
    device = engine.device
    out = []
    for step in range(first_step, first_step + steps):
        before = master_params(engine) if record else None
        lrs = list(engine.get_lr())
        for a in range(gas):
            x, y, _ = batches[step * SAMPLES_PER_STEP + a * world + rank]
            engine.backward(case_loss(engine, x.to(device, dtype), y.to(device, dtype)))
            engine.step()
        if record:
            noise = vrgd_ds.find_vr_optimizer(engine).noise_stats()
            out.append(
                {
                    "before": [t.cpu() for t in before],
                    "after": [t.cpu() for t in master_params(engine)],
                    "lr": lrs,
                    "noise": dict(noise),
                }
            )
    return out


def run_z3_case(case: dict, rank: int, world: int) -> dict:
    """As matrix_bodies.run_case, plus the source's layout facts: {"error", "steps", "info"}."""
    try:
        engine = _engine(case, world)
    except Exception as exc:  # noqa: BLE001 - a refusal is a result the test checks
        return {"error": f"{type(exc).__name__}: {exc}"}
    opt = engine.basic_optimizer
    source = opt.moment_source
    info = {
        "sub_groups": len(engine.optimizer.fp16_groups),
        "sub_group_numels": [int(f.numel()) for f in engine.optimizer.fp32_partitioned_groups_flat],
        "capacity": getattr(source, "capacity", None),
        "layout_pieces": [opt.layout_of(f).piece_lengths for f in engine.optimizer.fp32_partitioned_groups_flat],
    }
    calls = {"inner_steps": 0}
    original_step = opt.step

    def counted_step(*a, **k):
        calls["inner_steps"] += 1
        return original_step(*a, **k)

    opt.step = counted_step
    steps = _train(engine, case, rank, world, 0, STEPS)
    info.update(calls)
    info["flushes"] = source.flushes if source is not None else 0  # bucket reductions that carried data
    return {"error": None, "steps": steps, "info": info}


def run_z3_matrix(rank: int, world: int, cases: list[dict]) -> dict:
    """Every case in one process group (start-up shared); {case name: result}."""
    return {case["name"]: run_z3_case(case, rank, world) for case in cases}


def z3_checkpoint_case(rank: int, world: int, case: dict, ckpt_dir: str, phase: str):
    """phase "full": 2 steps, save, 2 more. phase "resume" (new processes): load, the same 2 more.
    Returns the fp32 master weights after each of the last 2 steps, and the VR state's keys."""
    engine = _engine(case, world)
    if phase == "full":
        _train(engine, case, rank, world, 0, 2, record=False)
        engine.save_checkpoint(ckpt_dir, tag="step2")
    else:
        engine.load_checkpoint(ckpt_dir, tag="step2")
    steps = _train(engine, case, rank, world, 2, 2)
    opt = engine.basic_optimizer
    keys = sorted({k for s in opt.state.values() for k in s})
    return {"after": [s["after"] for s in steps], "state_keys": keys}


def z3_error_case(rank: int, world: int, case: dict):
    """deepspeed.initialize with a stage-3 config: the error text, or None."""
    try:
        _engine(case, world)
    except Exception as exc:  # noqa: BLE001 - the message is what the test checks
        return f"{type(exc).__name__}: {exc}"
    return None


def hook_facts(rank: int, world: int):
    """At stage 3 the tensor hooks see each micro-batch's full-shape local gradient, and Σ of the
    squares the source reduced equals the reduce-scatter of the all-reduced Σg² (checked
    directly, with the samples gathered by an all-reduce)."""
    import vrgd_ds

    case = dict(name="facts", type="VRLamb", params={"lr": 1e-2}, stage=3, zero={"sub_group_size": 40})
    engine = _engine(case, world)
    source = vrgd_ds.find_vr_optimizer(engine).moment_source
    wrapper = engine.optimizer
    params = [p for g in wrapper.fp16_groups for p in g]
    full = {id(p): torch.zeros(int(p.ds_numel)) for p in params}
    shapes = []
    for p in params:

        def hook(g, p=p):
            shapes.append(tuple(g.shape) == tuple(p.ds_shape))
            full[id(p)].add_(g.detach().reshape(-1).float() ** 2)

        p.register_hook(hook)
    gas = SAMPLES_PER_STEP // world
    batches = micro_batches(SAMPLES_PER_STEP, skip_extra=False)
    for a in range(gas):
        x, y, _ = batches[a * world + rank]
        engine.backward(case_loss(engine, x, y))
        if a < gas - 1:
            engine.step()
    source.ensure_reduced()
    err = 0.0
    rank_in = torch.distributed.get_rank()
    for i, flat in enumerate(wrapper.fp32_partitioned_groups_flat):
        part, pos = source.sq[id(flat)], 0
        for p in wrapper.fp16_groups[i]:
            total = full[id(p)].clone()
            torch.distributed.all_reduce(total)
            ps = p.partition_numel()
            expect = torch.zeros(ps)
            piece = total[rank_in * ps : (rank_in + 1) * ps]
            expect[: piece.numel()] = piece
            err = max(err, float((part[pos : pos + ps] - expect).abs().max() / total.abs().max()))
            pos += ps
    engine.step()
    return {"shapes_ok": all(shapes), "hooks": len(shapes), "max_err": err, "sub_groups": len(wrapper.fp16_groups)}


def z3_overflow_case(rank: int, world: int):
    """fp16 at stage 3: one clean step, then a step whose gradients overflow on the last rank.
    DeepSpeed skips it: weights and VR state untouched, our buffers cleared, the next step normal."""
    import vrgd_ds

    case = dict(
        name="overflow",
        type="VRLamb",
        params={"lr": 1e-2},
        stage=3,
        precision="fp16",
        zero={"sub_group_size": 40, "reduce_bucket_size": 40},
    )
    engine = _engine(case, world)
    opt = vrgd_ds.find_vr_optimizer(engine)
    _train(engine, case, rank, world, 0, 1, record=False)
    before = master_params(engine)
    state_before = {(id(p), k): v.clone() for p, s in opt.state.items() for k, v in s.items() if torch.is_tensor(v)}
    steps_before = [s["step"] for s in opt.state.values()]
    gas = SAMPLES_PER_STEP // world
    batches = micro_batches(SAMPLES_PER_STEP * 3, skip_extra=False)
    for a in range(gas):
        x, y, _ = batches[SAMPLES_PER_STEP + a * world + rank]
        loss = case_loss(engine, x.to(engine.device, torch.half), y.to(engine.device, torch.half))
        if rank == world - 1 and a == 0:
            loss = loss * float("inf")
        engine.backward(loss)
        engine.step()
    source = opt.moment_source
    unchanged = all(torch.equal(a, b) for a, b in zip(before, master_params(engine)))
    state_unchanged = all(
        torch.equal(state_before[(id(p), k)], v)
        for p, s in opt.state.items()
        for k, v in s.items()
        if torch.is_tensor(v)
    )
    steps_unchanged = steps_before == [s["step"] for s in opt.state.values()]
    buffers_clear = source.is_clear()  # no samples counted, buffers zero, the bucket empty too
    _train(engine, case, rank, world, 2, 1, record=False)
    after = master_params(engine)
    return dict(
        skipped=engine.skipped_steps,
        unchanged=unchanged,
        state_unchanged=state_unchanged,
        steps_unchanged=steps_unchanged,
        buffers_clear=buffers_clear,
        moved=any(not torch.equal(a, b) for a, b in zip(before, after)),
        finite=all(bool(torch.isfinite(t).all()) for t in after),
    )


def z3_universal_load_case(rank: int, world: int, ckpt_dir: str):
    """load_checkpoint with "checkpoint": {"load_universal": true} at stage 3: the error text."""
    case = dict(
        name="universal", type="VRLamb", params={"lr": 1e-2}, stage=3, extra={"checkpoint": {"load_universal": True}}
    )
    engine = _engine(case, world)
    try:
        engine.load_checkpoint(ckpt_dir, tag="step2")
    except Exception as exc:  # noqa: BLE001 - the message is what the test checks
        return f"{type(exc).__name__}: {exc}"
    return None
