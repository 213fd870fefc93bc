#!/usr/bin/env python
"""ZeRO-Offload (stage 2, offload_optimizer to the CPU): the host optimizer step of VR-LAMB and
VR-AdamW against DeepSpeedCPUAdam, the fused CPU Adam DeepSpeed uses there by default.

One process (one data-parallel rank), one engine per optimizer over the same model, gradient
accumulation 2 (k = 2 samples for VR). Every round runs the micro-batches of one step on every
engine in turn and times ``engine.step()`` at the boundary, which under offload is DeepSpeed's
CPU step (unscale/clip, the optimizer's step on the host partition, copy back to the 16/32-bit
parameters) — so the ratios compare what a user waits for, measured in the same run.

Inside the same steps it also times the *host step* alone (``host_step_ms``): the basic optimizer's
``step()`` plus, for the VR optimizers, the moment source's ``prepare`` (r and the noise
statistics' sums, formed just before DeepSpeed unscales the partition) — the part vrgd_ds owns.

    OMP_NUM_THREADS=2 python scripts/bench_offload_step.py --params 8e6 --rounds 10 --json runs/offload_step.json
    python scripts/bench_offload_step.py --quick --json /tmp/offload.json     # smoke run, not evidence
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

VARIANTS = {
    # name: DeepSpeed optimizer section; "AdamW" with offload is DeepSpeedCPUAdam (engine.py).
    "DeepSpeedCPUAdam": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}},
    "VRLamb vr=false": {"type": "VRLamb", "params": {"lr": 1e-3, "weight_decay": 0.01, "vr": False}},
    "VRLamb": {"type": "VRLamb", "params": {"lr": 1e-3, "weight_decay": 0.01}},
    "VRAdamW": {"type": "VRAdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}},
}
BASELINE = "DeepSpeedCPUAdam"
GAS = 2
MICRO = 4


def _model(params: int, width: int) -> torch.nn.Module:
    layers = max(1, round(params / (width * width + width)))
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])


def _engine(optimizer: dict, params: int, width: int):
    import deepspeed

    import vrgd_ds  # noqa: F401  registers the VR types

    torch.manual_seed(0)
    model = _model(params, width)
    config = {
        "train_batch_size": MICRO * GAS,
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": GAS,
        "optimizer": optimizer,
        "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    return engine


def _micro_steps(engine, width: int, gen: torch.Generator) -> None:
    """Forward and backward of one step's micro-batches; ``engine.step()`` after each but the
    last (DeepSpeed counts micro-steps by those calls), so the next ``step()`` is the boundary."""
    for i in range(GAS):
        x = torch.randn(MICRO, width, generator=gen)
        loss = engine(x).pow(2).mean()
        engine.backward(loss)
        if i < GAS - 1:
            engine.step()
    assert engine.is_gradient_accumulation_boundary()


def _timed(obj, method: str, sink: list[float]) -> None:
    """Replace ``obj.method`` by a wrapper that adds each call's seconds to ``sink[-1]``."""
    inner = getattr(obj, method)

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            sink[-1] += time.perf_counter() - t0

    setattr(obj, method, timed)


def _time_host_step(engine, sink: list[float]) -> None:
    """Time the host step of ``engine`` into ``sink``: its basic optimizer's ``step`` and, for a
    VR optimizer, its moment source's ``prepare`` (both instance attributes, looked up per call)."""
    import vrgd_ds

    _timed(engine.basic_optimizer, "step", sink)
    vr = vrgd_ds.find_vr_optimizer(engine)
    if vr is not None and vr.moment_source is not None and hasattr(vr.moment_source, "prepare"):
        _timed(vr.moment_source, "prepare", sink)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=8e6, help="model size (elements)")
    parser.add_argument("--width", type=int, default=1024, help="Linear layer width")
    parser.add_argument("--rounds", type=int, default=10, help="timed steps per optimizer")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 rounds: a smoke run")
    parser.add_argument(
        "--no-cpu-adam",
        action="store_true",
        help="leave DeepSpeedCPUAdam out (its first use JIT-compiles a C++ op); ratios then to VRLamb vr=false",
    )
    parser.add_argument("--json", type=Path, required=True, help="write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.params, args.width, args.rounds, args.warmup = 2e4, 64, 2, 1
    if args.params < args.width * args.width or args.rounds < 1:
        parser.error("--params must be >= --width² and --rounds >= 1")

    import deepspeed

    from vrgd_ds.cpu_comm import avoid_shm_allreduce

    avoid_shm_allreduce()
    variants = {k: v for k, v in VARIANTS.items() if not (args.no_cpu_adam and k == BASELINE)}
    baseline = "VRLamb vr=false" if args.no_cpu_adam else BASELINE
    store = tempfile.NamedTemporaryFile(delete=False)
    # One rank; without these DeepSpeed goes looking for MPI.
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", "29533")
    deepspeed.init_distributed(dist_backend="gloo", init_method=f"file://{store.name}", rank=0, world_size=1)
    start, code = time.time(), benchlib.code_version()
    engines = {name: _engine(opt, int(args.params), args.width) for name, opt in variants.items()}
    basic = {name: type(e.basic_optimizer).__name__ for name, e in engines.items()}
    gen = torch.Generator().manual_seed(1)
    times: dict[str, list[float]] = {name: [] for name in engines}
    host: dict[str, list[float]] = {name: [] for name in engines}
    for name, engine in engines.items():
        _time_host_step(engine, host[name])
    for rnd in range(args.warmup + args.rounds):
        for name, engine in engines.items():  # interleaved: the machine's noise hits all alike
            host[name].append(0.0)
            _micro_steps(engine, args.width, gen)
            host[name][-1] = 0.0  # only the boundary step's host work counts
            t0 = time.perf_counter()
            engine.step()
            if rnd >= args.warmup:
                times[name].append(time.perf_counter() - t0)
            else:
                host[name].pop()
    numel = sum(p.numel() for p in next(iter(engines.values())).module.parameters())
    base = benchlib.median(times[baseline])
    host_base = benchlib.median(host[baseline])
    results = {
        name: {
            "inner_optimizer": basic[name],
            "step_ms": benchlib.summary([t * 1e3 for t in ts]),
            "median_ms": benchlib.median(ts) * 1e3,
            "ratio_to_baseline": benchlib.median(ts) / base,
            "host_step_ms": benchlib.summary([t * 1e3 for t in host[name]]),
            "host_median_ms": benchlib.median(host[name]) * 1e3,
            "host_ratio_to_baseline": benchlib.median(host[name]) / host_base,
        }
        for name, ts in times.items()
    }
    machine = f"{benchlib.cpu_model()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"
    payload = {
        "meta": benchlib.run_meta(
            machine, time.time() - start, argv, packages=("torch", "deepspeed", "Python"), code=code
        ),
        "baseline": baseline,
        "setting": {"params": numel, "width": args.width, "gas": GAS, "micro_batch": MICRO, "rounds": args.rounds},
        "results": results,
    }
    benchlib.write_json(args.json, payload)
    for name, r in results.items():
        ratio = r["ratio_to_baseline"]
        print(
            f"{name:18s} {r['inner_optimizer']:18s} step {r['median_ms']:9.1f} ms   x{ratio:.2f} {baseline}   "
            f"host step {r['host_median_ms']:9.1f} ms   x{r['host_ratio_to_baseline']:.2f}"
        )
    os.unlink(store.name)
    return payload


if __name__ == "__main__":
    main()
