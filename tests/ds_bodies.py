"""Rank bodies for the DeepSpeed tests (module level: the harness pickles them by name)."""

from __future__ import annotations


import torch

from .models import TinyNet, mb_loss, micro_batches

MICRO_BATCH = 4
SAMPLES_PER_STEP = 8  # micro-batches per optimizer step, all ranks together
DS_MODEL = dict(hidden=11, with_unused=False)  # 178 elements: uneven partitions, tensors straddle them


def allow_cpu_fp16() -> None:
    """DeepSpeed's CPU accelerator reports fp16 unsupported unless the CPU has native fp16
    (mkldnn, AVX512-FP16/AMX); torch still computes fp16 correctly (emulated), which is all these
    correctness tests need. On GPUs this is a no-op."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() == "cpu" and not acc.is_fp16_supported():
        acc.is_fp16_supported = lambda: True


def ds_config(
    opt_type: str,
    opt_params: dict,
    stage: int,
    gas: int,
    world: int,
    precision: str = "fp32",
    clip: float = 0.0,
    **extra,
) -> dict:
    cfg = {
        "train_batch_size": MICRO_BATCH * gas * world,
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": gas,
        "optimizer": {"type": opt_type, "params": dict(opt_params)},
        "zero_optimization": {"stage": stage},
        "gradient_clipping": clip,
        "steps_per_print": 10**9,
    }
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif precision == "fp16":
        allow_cpu_fp16()
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 8, "loss_scale_window": 1000, "hysteresis": 1}
    cfg.update(extra)
    return cfg


def train_ds(case: dict, rank: int, world: int, steps: int = 3, engine=None, start_step: int = 0, batches=None):
    """Train TinyNet through deepspeed.initialize; returns (engine, fp32 copies of the parameters)."""
    import deepspeed

    import vrgd_ds  # registers the config types

    gas = SAMPLES_PER_STEP // world
    if engine is None:
        model = TinyNet(**case.get("model", DS_MODEL))
        cfg = ds_config(
            case["type"],
            case["params"],
            case["stage"],
            gas,
            world,
            case.get("precision", "fp32"),
            case.get("clip", 0.0),
            **case.get("extra", {}),
        )
        client = case.get("client")
        if client is None:
            engine, *_ = deepspeed.initialize(model=model, model_parameters=_param_groups(model, case), config=cfg)
        else:
            # The optimizer handed to deepspeed.initialize instead of named in the config.
            del cfg["optimizer"]
            cls = vrgd_ds.OPTIMIZERS[case["type"].lower()]
            kwargs = dict(case["params"])
            optimizer = (
                cls(_param_groups(model, case), **kwargs)
                if client == "instance"
                else (lambda params: cls(params, **kwargs))
            )
            engine, *_ = deepspeed.initialize(
                model=model, optimizer=optimizer, model_parameters=_param_groups(model, case), config=cfg
            )
    if case.get("collectives"):
        # The NCCL code path (reduce_scatter_tensor / reduce) instead of gloo's point-to-point one.
        vrgd_ds.find_vr_optimizer(engine).moment_source.pairwise_exchange = False
    batches = batches or micro_batches(SAMPLES_PER_STEP * (start_step + steps), skip_extra=False)
    dtype = next(engine.module.parameters()).dtype
    for step in range(start_step, start_step + steps):
        for a in range(gas):
            x, y, use_extra = batches[step * SAMPLES_PER_STEP + a * world + rank]
            use_extra = use_extra and step != case.get("extra_off_step")
            loss = mb_loss(engine, (x.to(dtype), y.to(dtype), use_extra))
            engine.backward(loss)
            engine.step()
    return engine, [p.detach().float().clone() for p in engine.module.parameters()]


def _param_groups(model, case):
    if case.get("groups"):
        decay = [p for n, p in model.named_parameters() if p.dim() > 1]
        no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1]
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    return model.parameters()


def train_plain(case: dict, steps: int = 3):
    """The single-process reference: same optimizer, all 8 micro-batches accumulated per step."""
    import vrgd_ds

    model = TinyNet(**case.get("model", DS_MODEL))
    cls = vrgd_ds.OPTIMIZERS[case["type"].lower()]
    params = {k: v for k, v in case["params"].items() if k != "moment_reduction"}
    if "betas" in params:
        params["betas"] = tuple(params["betas"])
    opt = cls(_param_groups(model, case), **params)
    batches = micro_batches(SAMPLES_PER_STEP * steps, skip_extra=False)
    for step in range(steps):
        for x, y, use_extra in batches[step * SAMPLES_PER_STEP : (step + 1) * SAMPLES_PER_STEP]:
            use_extra = use_extra and step != case.get("extra_off_step")
            (mb_loss(model, (x, y, use_extra)) / SAMPLES_PER_STEP).backward()
        if case.get("clip"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), case["clip"])
        opt.step()
        opt.zero_grad()
    return [p.detach().float().clone() for p in model.parameters()]


def run_cases(rank: int, world: int, cases: list[dict], steps: int = 3):
    """Several DeepSpeed cases in one process group; returns {case name: parameters}."""
    out = {}
    for case in cases:
        _, params = train_ds(case, rank, world, steps)
        out[case["name"]] = params
    return out


def overflow_case(rank: int, world: int):
    """fp16: one clean step, then a step whose gradients overflow on rank 1. DeepSpeed skips it:
    parameters, optimizer state (GSNR momentum included) must be untouched, and the next step
    must be a normal one (accumulators were reset)."""
    import deepspeed

    import vrgd_ds

    gas = SAMPLES_PER_STEP // world
    model = TinyNet(**DS_MODEL)
    cfg = ds_config("VRLamb", {"lr": 1e-2}, 2, gas, world, precision="fp16")
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    engine, _ = train_ds({}, rank, world, steps=1, engine=engine)
    opt = vrgd_ds.find_vr_optimizer(engine)
    before_params = [p.detach().clone() for p in engine.module.parameters()]
    before_state = {k: v.clone() for s in opt.state.values() for k, v in s.items() if torch.is_tensor(v)}
    before_steps = [s["step"] for s in opt.state.values()]
    before_noise = opt.state_dict()["vrgd"]["noise_ema"]
    batches = micro_batches(SAMPLES_PER_STEP * 3, skip_extra=False)
    for a in range(gas):
        x, y, use_extra = batches[SAMPLES_PER_STEP + a * world + rank]
        loss = mb_loss(engine, (x.half(), y.half(), use_extra))
        if rank == world - 1 and a == 0:
            loss = loss * float("inf")
        engine.backward(loss)
        engine.step()
    unchanged = all(torch.equal(a, b) for a, b in zip(before_params, engine.module.parameters()))
    after_state = {k: v.clone() for s in opt.state.values() for k, v in s.items() if torch.is_tensor(v)}
    state_unchanged = all(torch.equal(before_state[k], after_state[k]) for k in before_state)
    steps_unchanged = (
        before_steps == [s["step"] for s in opt.state.values()]
        and before_noise == opt.state_dict()["vrgd"]["noise_ema"]
    )  # noise averages too
    # Nothing of the skipped step's samples may reach the next step: no counts (per_step hooks
    # then overwrite, not add to, the full-size buffer) and zeroed accumulation buffers; is_clear()
    # checks both (local_samples == 0 included).
    buffers_clear = opt.moment_source.is_clear()
    engine, params = train_ds({}, rank, world, steps=1, engine=engine, start_step=2, batches=batches)
    moved = any(not torch.equal(a.float(), b) for a, b in zip(before_params, params))
    finite = all(torch.isfinite(p).all() for p in params)
    return dict(
        skipped=engine.skipped_steps,
        unchanged=unchanged,
        state_unchanged=state_unchanged,
        steps_unchanged=steps_unchanged,
        buffers_clear=buffers_clear,
        moved=moved,
        finite=finite,
    )


def checkpoint_case(rank: int, world: int, case: dict, ckpt_dir: str, phase: str):
    """phase "full": 2 steps, save, 2 more steps. phase "resume": load, the same 2 more steps."""
    import deepspeed

    import vrgd_ds  # noqa: F401

    gas = SAMPLES_PER_STEP // world
    model = TinyNet(**DS_MODEL)
    cfg = ds_config(case["type"], case["params"], case["stage"], gas, world, case.get("precision", "fp32"))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    batches = micro_batches(SAMPLES_PER_STEP * 4, skip_extra=False)
    if phase == "full":
        train_ds(case, rank, world, steps=2, engine=engine, batches=batches)
        engine.save_checkpoint(ckpt_dir, tag="step2")
    else:
        engine.load_checkpoint(ckpt_dir, tag="step2")
    _, params = train_ds(case, rank, world, steps=2, engine=engine, start_step=2, batches=batches)
    return params


def config_error_case(rank: int, world: int, case: dict):
    """deepspeed.initialize with a bad VR config: returns the error text (or None)."""
    import deepspeed

    import vrgd_ds  # noqa: F401

    model = TinyNet(**DS_MODEL)
    gas = case.get("gas", SAMPLES_PER_STEP // world)
    cfg = ds_config(case["type"], case["params"], case["stage"], gas, world)
    try:
        deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    except Exception as exc:  # noqa: BLE001 - the message is what the test checks
        return f"{type(exc).__name__}: {exc}"
    return None


def csv_monitor_case(rank: int, world: int, out_dir: str):
    """Two VRLamb steps with DeepSpeed's CSV monitor on; vrgd_ds.monitor.log_noise_stats after each."""
    import deepspeed

    import vrgd_ds.monitor

    gas = SAMPLES_PER_STEP // world
    model = TinyNet(**DS_MODEL)
    cfg = ds_config(
        "VRLamb",
        {"lr": 1e-2},
        2,
        gas,
        world,
        csv_monitor={"enabled": True, "output_path": out_dir, "job_name": "noise"},
    )
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    batches = micro_batches(SAMPLES_PER_STEP * 2, skip_extra=False)
    written = []
    for step in range(2):
        for a in range(gas):
            x, y, use_extra = batches[step * SAMPLES_PER_STEP + a * world + rank]
            engine.backward(mb_loss(engine, (x, y, use_extra)))
            engine.step()
        written.append(vrgd_ds.monitor.log_noise_stats(engine))
    return {"global_samples": engine.global_samples, "written": written}
