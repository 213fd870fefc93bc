"""Rank side of tests/test_critical_batch.py: CriticalBatch driving a DeepSpeed engine (2 ranks).

Every case runs four engines on :class:`SignalNet` (real gradient signal) with WarmupDecayLR:

* ``changed``: built at gas 2; ``CriticalBatch.step`` grows the batch after step 3 (to gas 4,
  LR × the McCandlish factor); checkpoint (vrgd_ds.critical_batch.save_checkpoint); steps 4–5.
* ``native``: built at gas 4 (never calls set_train_batch_size), loads that checkpoint, steps 4–5
  on the same micro-batches — the run "started at that batch".
* ``resumed``: built at gas 2 like ``changed``, loads the checkpoint with
  vrgd_ds.critical_batch.load_checkpoint (batch and LR factor restored), steps 4–5.
* ``plain``: no schedule, gas 2, 5 steps: DeepSpeed's own LRs, for the factor check.
"""

from __future__ import annotations

from .matrix_bodies import master_params
from .signal_bodies import SIGNAL_MICRO_BATCH, SignalNet, signal_batches, signal_loss

CHANGE_AT = 3
STEPS = 5
LR = 1e-2


def critical_config(case: dict, world: int, gas: int) -> dict:
    cfg = {
        "train_batch_size": SIGNAL_MICRO_BATCH * gas * world,
        "train_micro_batch_size_per_gpu": SIGNAL_MICRO_BATCH,
        "gradient_accumulation_steps": gas,
        "optimizer": {"type": "VRLamb", "params": {"lr": LR, "weight_decay": 0.01, "weight_decay_exclude_1d": True}},
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {
                "warmup_min_lr": 0.0,
                "warmup_max_lr": LR,
                "warmup_num_steps": 2,
                "warmup_type": "linear",
                "total_num_steps": 20,
            },
        },
        "zero_optimization": {"stage": case["stage"]},
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
    }
    if case.get("precision") == "bf16":
        cfg["bf16"] = {"enabled": True}
    return cfg


def _schedule(engine):
    from vrgd_ds.critical_batch import CriticalBatch

    # scale 1e6: the target is max_batch whatever B_simple is; max_factor 2 makes the first
    # change (after warm-up and interval, step 3) exactly gas 2 -> 4.
    world = engine.dp_world_size
    return CriticalBatch.for_engine(
        engine,
        min_batch=SIGNAL_MICRO_BATCH * 2 * world,
        max_batch=SIGNAL_MICRO_BATCH * 8 * world,
        initial_batch=SIGNAL_MICRO_BATCH * 2 * world,
        scale=1e6,
        interval=CHANGE_AT,
        warmup_steps=CHANGE_AT,
        lr_rule="mccandlish",
    )


def _train(engine, rank, world, batches, pos, steps, schedule=None):
    """``steps`` optimizer steps from stream position ``pos``; per step the master weights after it,
    the LR it used, its noise statistics and the accumulation steps."""
    import vrgd_ds

    dtype = next(engine.module.parameters()).dtype
    opt = vrgd_ds.find_vr_optimizer(engine)
    out = []
    for _ in range(steps):
        gas = engine.gradient_accumulation_steps()
        lrs = list(engine.get_lr())
        group_lrs = [g["lr"] for g in engine.optimizer.param_groups]
        for a in range(gas):
            x, y = batches[pos + a * world + rank]
            engine.backward(signal_loss(engine, x.to(dtype), y.to(dtype)))
            engine.step()
        pos += gas * world
        noise = {k: opt.noise_stats()[k] for k in ("k", "grad_norm_sq", "noise_trace", "b_simple", "b_simple_ema")}
        changed = schedule.step(engine) if schedule is not None else False
        out.append(
            {
                "gas": gas,
                "lr": lrs,
                "group_lr": group_lrs,
                "noise": noise,
                "after": master_params(engine),
                "changed": changed,
                "lr_factor": schedule.lr_factor if schedule is not None else 1.0,
            }
        )
    return out, pos


def run_critical_case(rank: int, world: int, case: dict, ckpt_dir: str) -> dict:
    import deepspeed
    import torch.distributed as dist

    from vrgd_ds.critical_batch import load_checkpoint, save_checkpoint, set_train_batch_size

    batches = signal_batches(8 * world * STEPS)

    def engine_at(gas):
        model = SignalNet()
        engine, *_ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=critical_config(case, world, gas)
        )
        return engine

    result = {}
    # changed: gas 2, grows after step CHANGE_AT, checkpoint, continues
    engine = engine_at(2)
    schedule = _schedule(engine)
    schedule.attach(engine)
    first, pos = _train(engine, rank, world, batches, 0, CHANGE_AT, schedule)
    save_checkpoint(engine, ckpt_dir, schedule, tag="change", client_state={"pos": pos})
    dist.barrier()
    rest, _ = _train(engine, rank, world, batches, pos, STEPS - CHANGE_AT, schedule)
    result["changed"] = {"steps": first + rest, "history": schedule.history, "batch": engine.train_batch_size()}

    # native: configured at the new batch, same checkpoint, plain DeepSpeed load; the schedule
    # state is restored by hand (load_state_dict + attach: no set_train_batch_size needed)
    engine = engine_at(4)
    schedule = _schedule(engine)
    path, client = engine.load_checkpoint(ckpt_dir, tag="change")
    schedule.load_state_dict(client["critical_batch"])
    schedule.attach(engine)
    native, _ = _train(engine, rank, world, batches, client["pos"], STEPS - CHANGE_AT, schedule)
    result["native"] = {"steps": native, "gas_at_build": 4}

    # resumed: configured like the first run (gas 2); load_checkpoint restores the batch
    engine = engine_at(2)
    schedule = _schedule(engine)
    schedule.attach(engine)
    path, client = load_checkpoint(engine, ckpt_dir, schedule, tag="change")
    resumed_gas = engine.gradient_accumulation_steps()
    resumed, _ = _train(engine, rank, world, batches, client["pos"], STEPS - CHANGE_AT, schedule)
    result["resumed"] = {"steps": resumed, "gas_after_load": resumed_gas, "history": schedule.history}

    # plain: DeepSpeed's own schedule, no CriticalBatch
    engine = engine_at(2)
    plain, _ = _train(engine, rank, world, batches, 0, STEPS)
    result["plain"] = {"steps": plain}

    if case.get("raw_set_train_batch_size"):  # DeepSpeed's own call vs the realigning one
        for name, setter in (("raw", None), ("realigned", set_train_batch_size)):
            engine = engine_at(2)
            steps_taken, pos = [], 0
            for gas in (2, 2, 2, 4):
                if gas != engine.gradient_accumulation_steps():
                    if setter is None:
                        engine.set_train_batch_size(SIGNAL_MICRO_BATCH * gas * world)
                    else:
                        setter(engine, SIGNAL_MICRO_BATCH * gas * world)
                for a in range(2):  # 2 micro-batches: a whole step at gas 2, half of one at gas 4
                    x, y = batches[pos + a * world + rank]
                    engine.backward(signal_loss(engine, x, y))
                    engine.step()
                pos += 2 * world
                steps_taken.append(engine.global_steps)
            result[f"{name}_global_steps"] = steps_taken
    dist.barrier()
    return result


def run_critical_matrix(rank: int, world: int, cases: list[dict], ckpt_root: str) -> dict:
    """Every case in one process group; {case name: result}."""
    import os

    return {case["name"]: run_critical_case(rank, world, case, os.path.join(ckpt_root, case["name"])) for case in cases}
