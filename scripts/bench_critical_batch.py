#!/usr/bin/env python
"""Does a batch that follows the critical batch pay? Fixed small, fixed large and CriticalBatch.

Issue 22: :class:`vrgd_ds.CriticalBatch` grows the global batch with the measured simple noise
scale B_simple (McCandlish et al. 2018). This script compares, with LAMB and VR-LAMB, on the
Fashion-MNIST MLP of bench_quality.py (hidden 128, 60k train images, held-out = the 10k test set):

  * small: a fixed batch ≈ B_simple at the start (128 = 8 micro-batches of 16);
  * large: a fixed batch ≈ B_simple at the end of the small-batch run (measured by stage 1, then
    rounded to a power of two; ``--large`` fixes it);
  * critical: ``CriticalBatch(16, 128, --max-batch, interval, warmup_steps, max_factor=2,
    lr_rule="mccandlish")``, starting at 128; critical-linear: the same with ``lr_rule="linear"``.

Protocol: the micro-batch is 16 examples in every arm (as DeepSpeed keeps it; a step of batch B is
B/16 micro-batches, each ``(loss / k).backward()``); the optimizers record the noise statistics
every step (LAMB: ``vr=False, gradient_stats=True``, the update is plain LAMB); every arm sees the
same number of examples (--epochs); LR = lr × warm-up(examples) × the schedule's LR factor, linear
warm-up over the first --warmup-share of the examples, then constant (McCandlish's model is for a
fixed LR; no decay, so that "examples to reach a loss" measures the batch, not the schedule's end);
each arm's lr is tuned on a 3-point grid (×1/3, 1, 3 around 1e-2·√(B/256), the bench_quality
LAMB LR; extended by up to 2 points where the best sits at an edge) with seed 0, by the lowest
held-out loss reached within the budget; seeds 1 and 2 at the best.
Held-out loss (cross-entropy on the 10k test images) every --eval-every examples.

Reported: optimizer steps and examples to reach target held-out losses (the first evaluation at
or below), the loss at equal examples, and McCandlish's prediction for each arm from the B_simple
measured along the small-batch run: each step of that run at batch b with B_simple = B_s makes
dS_min = 1/(1 + B_s/b) of progress, so an arm at batch B(B_s) needs Σ dS_min·(1 + B_s/B) steps and
Σ dS_min·(1 + B_s/B)·B examples to the same loss.

    # the study of docs/results_critical_batch.md (~1 h on one shared core; restart continues)
    OMP_NUM_THREADS=1 nohup nice -n 15 python scripts/bench_critical_batch.py --out runs/critical \\
        --json docs/results_critical_batch_schedule.json --report docs/results_critical_batch_report.md \\
        --plot docs/results_critical_batch.png > runs/critical.log 2>&1 &
    # smoke run (< 1 min; synthetic idx files): not evidence
    python scripts/bench_critical_batch.py --quick --data DIR --out /tmp/crit_quick
    # the tiny-BERT arm (docs/results_critical_batch.md, its own section; ~85 min of one core;
    # scripts/critical_batch_bert.py says what differs; corpus: scripts/prepare_corpus.py)
    OMP_NUM_THREADS=1 nohup nice -n 15 python scripts/bench_critical_batch.py --task bert --grid-extensions 2 \\
        --large 256 --out runs/critical_bert --json docs/results_critical_batch_bert.json \\
        --report runs/critical_bert/report.md --plot docs/results_critical_batch_bert.png \\
        > runs/critical_bert.log 2>&1 &
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality  # noqa: E402
import benchlib  # noqa: E402

from vrgd_ds import CriticalBatch  # noqa: E402

OPTIMIZERS = {"LAMB": False, "VR-LAMB": True}  # name -> vr
ARMS = ("small", "large", "critical", "critical-linear")  # critical-linear: lr_rule "linear" instead of s.lr_rule
LR_256 = 1e-2  # bench_quality's tuned LAMB LR at batch 256


@dataclass(frozen=True)
class Settings:
    micro: int = 16
    small: int = 128
    large: int | None = None  # None: B_simple at the end of the small-batch LAMB run, to a power of 2
    max_batch: int = 8192
    epochs: float = 4.0
    eval_every: int = 4096
    warmup_share: float = 0.03
    hidden: int = 128
    lr_mults: tuple[float, ...] = (1 / 3, 1.0, 3.0)
    grid_extensions: int = 2  # points added beyond an edge of the grid where the best LR sits
    seeds: tuple[int, ...] = (0, 1, 2)
    interval: int = 50
    warmup_steps: int = 100
    max_factor: float = 2.0
    scale: float = 1.0
    lr_rule: str = "mccandlish"
    train_subset: int | None = None
    test_subset: int | None = None
    lr_256: float = LR_256  # the LR grid's centre at batch 256, scaled by √(B/256)
    arms: tuple[str, ...] = ARMS
    examples: int | None = None  # the budget in examples (None: epochs × the training set)


QUICK = Settings(
    micro=4, small=16, large=64, max_batch=128, epochs=2.0, eval_every=128, lr_mults=(1.0,), seeds=(0,),
    interval=5, warmup_steps=5, train_subset=1024, test_subset=256,
)  # fmt: skip


# The tiny-BERT arm (``--task bert``, scripts/critical_batch_bert.py), scaled to ≈ 1 h of one core
# (calibrated: ≈ 400 sequences/s in plain PyTorch, 1 thread):
# one seed, 2 LRs per arm (×½, 1 around 0.01 at batch 128, √B-scaled), no critical-linear arm;
# the schedule's warm-up and interval in steps shrunk with the run's length (768 steps at 128).
BERT = Settings(
    micro=16, small=128, max_batch=4096, examples=98304, eval_every=4096, lr_256=0.01 * math.sqrt(2),
    lr_mults=(0.5, 1.0), grid_extensions=0, seeds=(0,), interval=25, warmup_steps=50,
    arms=("small", "large", "critical"),
)  # fmt: skip
BERT_QUICK = dataclasses.replace(
    BERT, micro=2, small=16, large=64, max_batch=128, examples=512, eval_every=128, interval=4, warmup_steps=4
)
BERT_WARM_STEPS = 150  # batch 64: past the unigram plateau (the warm start's trace says where)


@dataclass(frozen=True)
class RunConfig:
    optimizer: str
    arm: str
    batch: int  # the fixed batch, or the critical arm's initial batch
    lr: float
    seed: int

    def key(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def base_lr(batch: int, lr_256: float = LR_256) -> float:
    return lr_256 * math.sqrt(batch / 256)


class FashionTask:
    """bench_quality's MLP on Fashion-MNIST: what :func:`train_run` needs of a task."""

    name = "fashion-mnist"
    clip = None  # no gradient clipping
    optimizer_kwargs: dict = {}

    def __init__(self, data, hidden: int):
        self.x_train, self.y_train, self.x_eval, self.y_eval = data
        self.n_train, self.hidden = len(self.x_train), hidden

    def new_model(self):
        """(model, optimizer state to start from or None)."""
        return bench_quality.make_mlp(self.x_train.shape[1], self.hidden), None

    def loss(self, model, idx, gen):
        return F.cross_entropy(model(self.x_train[idx]), self.y_train[idx])

    def held_out(self, model) -> tuple[float, float]:
        return held_out(model, self.x_eval, self.y_eval)


@torch.no_grad()
def held_out(model, x, y, chunk: int = 8192) -> tuple[float, float]:
    loss, correct = 0.0, 0
    for i in range(0, len(x), chunk):
        logits = model(x[i : i + chunk])
        loss += float(F.cross_entropy(logits, y[i : i + chunk], reduction="sum"))
        correct += int((logits.argmax(1) == y[i : i + chunk]).sum())
    return loss / len(x), 100.0 * correct / len(x)


def budget_examples(s: Settings, task) -> int:
    return s.examples if s.examples is not None else int(s.epochs * task.n_train)


def build_optimizer(model, lr: float, vr: bool, micro: int, task):
    """LAMB (``vr=False``: plain LAMB, noise statistics recorded) or VR-LAMB (γ = 0.1)."""
    spec = bench_quality.OPTIMIZER_NAMES["LAMB"]
    return spec.build(
        model, lr, vr, gamma=0.1, stats_interval=0, gradient_stats=True, micro_batch_size=micro, **task.optimizer_kwargs
    )


def train_run(cfg: RunConfig, s: Settings, task) -> dict:
    """One run; the per-step batch and b_simple_ema, and the held-out loss every s.eval_every examples."""
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model, state = task.new_model()
    opt = build_optimizer(model, cfg.lr, OPTIMIZERS[cfg.optimizer], s.micro, task)
    if state is not None:  # a warm start's moments and noise statistics (its LR is overwritten every step)
        opt.load_state_dict(state)
    critical = cfg.arm.startswith("critical")
    schedule = CriticalBatch(
        s.micro,
        cfg.batch if not critical else s.small,
        cfg.batch if not critical else s.max_batch,
        initial_batch=cfg.batch,
        interval=s.interval,
        warmup_steps=s.warmup_steps,
        max_factor=s.max_factor,
        scale=s.scale,
        lr_rule=("linear" if cfg.arm == "critical-linear" else s.lr_rule) if critical else "none",
    )
    n = task.n_train
    budget = budget_examples(s, task)
    warmup = max(1, int(s.warmup_share * budget))
    order = torch.empty(0, dtype=torch.int64)
    examples, steps, next_eval, diverged = 0, 0, 0, False
    evals = {"examples": [], "steps": [], "loss": [], "acc": []}
    trace = {"batch": [], "b_simple_ema": [], "lr": []}
    t0 = time.perf_counter()
    while examples < budget and not diverged:
        if examples >= next_eval:
            loss, acc = task.held_out(model)
            for key, v in zip(evals, (examples, steps, loss, acc)):
                evals[key].append(v)
            next_eval += s.eval_every
        batch = schedule.batch_size
        while len(order) < batch:
            order = torch.cat([order, torch.randperm(n, generator=gen)])
        idx, order = order[:batch], order[batch:]
        lr = cfg.lr * min(1.0, (examples + batch) / warmup) * schedule.lr_factor
        for group in opt.param_groups:
            group["lr"] = lr
        k = batch // s.micro
        for m in range(k):
            mb = idx[m * s.micro : (m + 1) * s.micro]
            loss = task.loss(model, mb, gen)
            if not torch.isfinite(loss):
                diverged = True
                break
            (loss / k).backward()
        if diverged:
            break
        if task.clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), task.clip)
        opt.step()
        opt.zero_grad()
        steps += 1
        examples += batch
        stats = opt.noise_stats()
        trace["batch"].append(batch)
        trace["b_simple_ema"].append(float(stats["b_simple_ema"]))
        trace["lr"].append(lr)
        schedule.update(stats)
    if not diverged:
        loss, acc = task.held_out(model)
        for key, v in zip(evals, (examples, steps, loss, acc)):
            evals[key].append(v)
    return {
        "config": dataclasses.asdict(cfg),
        "diverged": diverged,
        "steps": steps,
        "examples": examples,
        "final_loss": evals["loss"][-1] if evals["loss"] else math.nan,
        "final_acc": evals["acc"][-1] if evals["acc"] else math.nan,
        "evals": evals,
        "trace": trace,
        "changes": schedule.history,
        "seconds": time.perf_counter() - t0,
    }


class RunCache:
    """Finished runs in a JSONL file, reused on restart (the key is the config and the settings
    that shape a run: the grid's and the seeds' settings only choose which runs are made)."""

    PLAN_ONLY = ("lr_mults", "grid_extensions", "seeds")

    def __init__(self, path: Path, settings: Settings):
        self.path, self.settings = path, json.dumps(dataclasses.asdict(settings), sort_keys=True)
        own = self._shaping(self.settings)
        self.runs = {}
        if path.exists():
            for line in path.read_text().splitlines():
                row = json.loads(line)
                if self._shaping(row.get("settings", "{}")) == own:
                    self.runs[row["key"]] = row["result"]

    @classmethod
    def _shaping(cls, settings: str) -> dict:
        return {k: v for k, v in json.loads(settings).items() if k not in cls.PLAN_ONLY}

    def run(self, cfg: RunConfig, s: Settings, task, log) -> dict:
        key = cfg.key()
        if key not in self.runs:
            result = train_run(cfg, s, task)
            self.runs[key] = result
            with self.path.open("a") as f:
                f.write(json.dumps({"key": key, "settings": self.settings, "result": result}) + "\n")
            log(
                f"{cfg.optimizer} {cfg.arm} B={cfg.batch} lr={cfg.lr:.4g} seed {cfg.seed}: loss "
                f"{result['final_loss']:.4f} acc {result['final_acc']:.2f} in {result['steps']} steps "
                f"({result['seconds']:.0f} s){' DIVERGED' if result['diverged'] else ''}"
            )
        return self.runs[key]


def best_loss(run: dict) -> float:
    """The lowest held-out loss the run reached within the budget (inf for a diverged run)."""
    losses = [v for v in run["evals"]["loss"] if math.isfinite(v)]
    return math.inf if run["diverged"] or not losses else min(losses)


def power_of_two(x: float, multiple: int) -> int:
    return max(multiple, 2 ** round(math.log2(max(x, 1.0))))


def tail_b_simple(run: dict, share: float = 0.05) -> float:
    """Mean b_simple_ema over the last ``share`` of the run's steps."""
    values = [v for v in run["trace"]["b_simple_ema"] if math.isfinite(v)]
    tail = values[-max(1, int(share * len(values))) :]
    return statistics.fmean(tail) if tail else math.nan


def to_target(run: dict, target: float) -> dict | None:
    """Steps and examples at the first evaluation with held-out loss <= target (None: never)."""
    ev = run["evals"]
    for examples, steps, loss in zip(ev["examples"], ev["steps"], ev["loss"]):
        if loss <= target:
            return {"examples": examples, "steps": steps}
    return None


def loss_at(run: dict, examples: int) -> float:
    """Held-out loss at the last evaluation at or before ``examples``."""
    ev = run["evals"]
    best = math.nan
    for e, loss in zip(ev["examples"], ev["loss"]):
        if e <= examples:
            best = loss
    return best


def predict(small: dict, target: float, arm_batch) -> dict | None:
    """McCandlish's prediction of (steps, examples) to ``target`` for an arm whose batch at noise
    scale B_s is ``arm_batch(B_s)``, from the small-batch run's B_simple trace up to the target."""
    reached = to_target(small, target)
    if reached is None:
        return None
    steps = examples = 0.0
    for batch, bs in zip(small["trace"]["batch"][: reached["steps"]], small["trace"]["b_simple_ema"]):
        if not (math.isfinite(bs) and bs > 0):
            bs = 1e-9  # before the first estimate: the step counts as full progress
        ds_min = 1.0 / (1.0 + bs / batch)
        b = arm_batch(bs)
        steps += ds_min * (1.0 + bs / b)
        examples += ds_min * (1.0 + bs / b) * b
    return {"steps": steps, "examples": examples}


def run_all(s: Settings, data, cache: RunCache, log, large_override: int | None) -> dict:
    """``data``: the task (FashionTask, or critical_batch_bert.BertTask)."""
    tuned: dict[tuple[str, str], dict] = {}

    def tune(opt: str, arm: str, batch: int):
        center = base_lr(batch if not arm.startswith("critical") else s.small, s.lr_256)
        mults = list(s.lr_mults)
        runs = {m: cache.run(RunConfig(opt, arm, batch, center * m, s.seeds[0]), s, data, log) for m in mults}
        for _ in range(s.grid_extensions):  # the best at an edge of the grid: one more point beyond it
            best = min(runs, key=lambda m: best_loss(runs[m]))
            if best not in (min(runs), max(runs)) or len(runs) < 2:
                break
            step = max(runs) / sorted(runs)[-2] if best == max(runs) else min(runs) / sorted(runs)[1]
            m = best * step
            runs[m] = cache.run(RunConfig(opt, arm, batch, center * m, s.seeds[0]), s, data, log)
        best = min(runs, key=lambda m: best_loss(runs[m]))
        grid = [runs[m] for m in sorted(runs)]
        tuned[(opt, arm)] = {"batch": batch, "lr": runs[best]["config"]["lr"], "grid": grid}

    for opt in OPTIMIZERS:
        tune(opt, "small", s.small)
    measured_end = tail_b_simple(
        cache.run(RunConfig("LAMB", "small", s.small, tuned[("LAMB", "small")]["lr"], s.seeds[0]), s, data, log)
    )
    large = large_override or s.large or power_of_two(measured_end, s.micro * 2)
    log(f"B_simple at the end of the small-batch LAMB run: {measured_end:.0f} -> large batch {large}")
    for opt in OPTIMIZERS:
        for arm in s.arms:
            if arm != "small":
                tune(opt, arm, large if arm == "large" else s.small)
    seeds = {}
    for (opt, arm), t in tuned.items():
        seeds[(opt, arm)] = [
            cache.run(RunConfig(opt, arm, t["batch"], t["lr"], seed), s, data, log) for seed in s.seeds
        ]
    return {
        "tuned": tuned,
        "seeds": seeds,
        "large": large,
        "b_simple_end_small": measured_end,
        "budget": budget_examples(s, data),
    }


def summarize(s: Settings, res: dict) -> dict:
    seeds, tuned = res["seeds"], res["tuned"]
    budget = res["budget"]
    # targets: the loss every tuned arm reaches (hardest), the small arm's loss at a quarter of
    # the budget (easy), and halfway between
    finals = [statistics.fmean(min(r["evals"]["loss"]) for r in runs) for runs in seeds.values()]
    hardest = max(finals) + 0.002
    easy = statistics.fmean(loss_at(r, budget // 4) for r in seeds[("LAMB", "small")])
    targets = sorted({round(easy, 3), round((easy + hardest) / 2, 3), round(hardest, 3)}, reverse=True)
    cells = []
    for (opt, arm), runs in seeds.items():
        cell = {
            "optimizer": opt,
            "arm": arm,
            "batch": tuned[(opt, arm)]["batch"],
            "lr": tuned[(opt, arm)]["lr"],
            "lr_grid": {f"{r['config']['lr']:.4g}": best_loss(r) for r in tuned[(opt, arm)]["grid"]},
            "final_loss": benchlib.summary([r["final_loss"] for r in runs]),
            "final_acc": benchlib.summary([r["final_acc"] for r in runs]),
            "loss_half_budget": benchlib.summary([loss_at(r, budget // 2) for r in runs]),
            "steps_total": benchlib.summary([r["steps"] for r in runs]),
            "final_batch": benchlib.summary([r["trace"]["batch"][-1] for r in runs if r["trace"]["batch"]]),
            "b_simple_end": benchlib.summary([tail_b_simple(r) for r in runs]),
            "targets": {},
        }
        for target in targets:
            hits = [to_target(r, target) for r in runs]
            small_runs = seeds[(opt, "small")]
            large = tuned[(opt, "large")]["batch"]
            batch_of = {
                "small": lambda bs: s.small,
                "large": lambda bs, b=large: b,
                "critical": lambda bs: min(s.max_batch, max(s.small, s.scale * bs)),
                "critical-linear": lambda bs: min(s.max_batch, max(s.small, s.scale * bs)),
            }[arm]
            preds = [predict(r, target, batch_of) for r in small_runs]
            cell["targets"][f"{target:.3f}"] = {
                "reached": sum(h is not None for h in hits),
                "steps": benchlib.summary([h["steps"] for h in hits if h]),
                "examples": benchlib.summary([h["examples"] for h in hits if h]),
                "predicted_steps": benchlib.summary([p["steps"] for p in preds if p]),
                "predicted_examples": benchlib.summary([p["examples"] for p in preds if p]),
            }
        cells.append(cell)
    curves = {}
    for (opt, arm), runs in seeds.items():
        r = runs[0]
        stride = max(1, len(r["trace"]["batch"]) // 400)
        examples = [0]
        for b in r["trace"]["batch"]:
            examples.append(examples[-1] + b)
        curves[f"{opt}/{arm}"] = {
            "evals": r["evals"],
            "examples": examples[1::stride],
            "batch": r["trace"]["batch"][::stride],
            "b_simple_ema": r["trace"]["b_simple_ema"][::stride],
            "lr": r["trace"]["lr"][::stride],
            "changes": r["changes"],
        }
    every_run = {json.dumps(r["config"], sort_keys=True): r for t in tuned.values() for r in t["grid"]}
    every_run.update({json.dumps(r["config"], sort_keys=True): r for runs in seeds.values() for r in runs})
    return {
        "targets": targets,
        "runs": len(every_run),
        "run_seconds": sum(r["seconds"] for r in every_run.values()),  # reused runs count their own time
        "large": res["large"],
        "b_simple_end_small": res["b_simple_end_small"],
        "budget_examples": budget,
        "cells": cells,
        "curves_seed0": curves,
    }


def fmt(summary: dict, digits: int = 0) -> str:
    return benchlib.mean_std(summary["values"], digits) if summary and summary["values"] else "–"


def report(data: dict) -> str:
    out = []
    for target in data["results"]["targets"]:
        key = f"{target:.3f}"
        rows = []
        for c in data["results"]["cells"]:
            t = c["targets"][key]
            rows.append(
                [
                    c["optimizer"],
                    c["arm"] + (f" {c['batch']}→" if c["arm"].startswith("critical") else f" {c['batch']}"),
                    f"{c['lr']:.3g}",
                    f"{t['reached']}/{c['final_loss']['n']}",
                    fmt(t["steps"]),
                    fmt(t["predicted_steps"]),
                    fmt({"values": [v / 1000 for v in t["examples"]["values"]]}, 1),
                    fmt({"values": [v / 1000 for v in t["predicted_examples"]["values"]]}, 1),
                ]
            )
        out.append(f"### Held-out loss {key}\n")
        out.append(
            benchlib.markdown_table(
                [
                    "optimizer",
                    "arm (batch)",
                    "lr",
                    "reached",
                    "steps",
                    "predicted steps",
                    "k examples",
                    "predicted k examples",
                ],
                rows,
            )  # fmt: skip
        )
        out.append("")
    rows = [
        [
            c["optimizer"],
            c["arm"],
            fmt(c["loss_half_budget"], 4),
            fmt(c["final_loss"], 4),
            fmt(c["final_acc"], 2),
            fmt(c["steps_total"]),
            fmt(c["final_batch"]),
            fmt(c["b_simple_end"]),
            ", ".join(f"{lr}: {v:.4f}" for lr, v in c["lr_grid"].items()),
        ]
        for c in data["results"]["cells"]
    ]
    out.append(f"### Equal examples ({data['results']['budget_examples']} each)\n")
    out.append(
        benchlib.markdown_table(
            [
                "optimizer",
                "arm",
                "loss at ½ budget",
                "loss at budget",
                "held-out acc %",
                "steps",
                "last batch",
                "B_simple (EMA) at end",
                "LR grid (seed 0): lowest held-out loss",
            ],
            rows,
        )  # fmt: skip
    )
    return "\n".join(out) + "\n"


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = data["results"]["curves_seed0"]
    task = data.get("task")
    fig, axes = plt.subplots(1, 4 if task else 3, figsize=(20 if task else 15, 4.2))
    if task:  # the shared warm start, from initialization past the unigram plateau
        warm, ax = task["warm_start"], axes[0]
        ax.plot(warm["step"], warm["loss"], color="tab:blue", label="held-out loss")
        ax.axhline(task["plateau_loss"], color="grey", ls="--", lw=0.8, label="unigram plateau")
        ax.set(xlabel="warm-start step (batch 64)", ylabel="held-out MLM loss", title="shared warm start (LAMB)")
        twin = ax.twinx()
        twin.plot(warm["step"], warm["b_simple_ema"], color="tab:green", label="B_simple EMA")
        twin.set_ylabel("B_simple (sequences)")
        ax.legend(fontsize=7, loc="upper center")
        twin.legend(fontsize=7, loc="upper right")
        axes = axes[1:]
    styles = {"small": "-", "large": "--", "critical": "-.", "critical-linear": ":"}
    colors = {"LAMB": "tab:blue", "VR-LAMB": "tab:orange"}
    for name, c in curves.items():
        opt, arm = name.split("/")
        ev = c["evals"]
        axes[0].plot([e / 1000 for e in ev["examples"]], ev["loss"], styles[arm], color=colors[opt], label=name)
        axes[1].plot(ev["steps"], ev["loss"], styles[arm], color=colors[opt], label=name)
        if opt == "LAMB":
            axes[2].plot([e / 1000 for e in c["examples"]], c["batch"], styles[arm], color="k", label=f"batch ({arm})")
            axes[2].plot([e / 1000 for e in c["examples"]], c["b_simple_ema"], styles[arm], color="tab:green",
                         label=f"B_simple EMA ({arm})")  # fmt: skip
    for t in data["results"]["targets"]:
        axes[0].axhline(t, color="grey", lw=0.5)
        axes[1].axhline(t, color="grey", lw=0.5)
    axes[0].set(xlabel="examples (k)", ylabel="held-out loss", title="loss vs examples (seed 0)")
    axes[1].set(xlabel="optimizer steps", xscale="log", ylabel="held-out loss", title="loss vs steps (seed 0)")
    axes[2].set(xlabel="examples (k)", ylabel="examples", yscale="log", title="batch and B_simple (LAMB)")
    lo = min(min(c["evals"]["loss"]) for c in curves.values())
    hi = task["warm_start"]["loss"][-1] + 0.05 if task else lo + 0.35  # bert: the whole continuation
    for ax in axes[:2]:
        ax.set_ylim(lo - 0.01, hi)
        ax.legend(fontsize=7)
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80 if task else 110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path(bench_quality.DEFAULT_DATA), help="Fashion-MNIST idx files")
    p.add_argument("--out", type=Path, default=Path("runs/critical"), help="runs.jsonl and the log")
    p.add_argument("--json", type=Path, default=None, help="results JSON (default: OUT/results.json)")
    p.add_argument("--report", type=Path, default=None, help="markdown tables (default: OUT/report.md)")
    p.add_argument("--plot", type=Path, default=None, help="PNG (default: OUT/critical.png)")
    p.add_argument("--large", type=int, default=None, help="the fixed large batch (default: measured)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="a smoke run on a subset; not evidence")
    p.add_argument("--task", choices=("fashion-mnist", "bert"), default="fashion-mnist")
    p.add_argument("--corpus", type=Path, default=None, help="bert: train/ and eval/ .txt (scripts/prepare_corpus.py)")
    p.add_argument("--cache-dir", type=Path, default=None, help="bert: tokenizer and sequences (default: OUT/cache)")
    p.add_argument("--warm-steps", type=int, default=BERT_WARM_STEPS, help="bert: the shared warm start's steps")
    p.add_argument("--examples", type=int, default=None, help="bert: examples per run (default: the settings')")
    p.add_argument(
        "--grid-extensions", type=int, default=None, help="LR points added past the grid's edge where the best sits"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.task == "bert":
        s = BERT_QUICK if args.quick else BERT
        if args.examples:
            s = dataclasses.replace(s, examples=args.examples)
    else:
        s = QUICK if args.quick else Settings()
    if args.grid_extensions is not None:
        s = dataclasses.replace(s, grid_extensions=args.grid_extensions)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.json or args.out / "results.json"
    report_path = args.report or args.out / "report.md"
    plot_path = args.plot or args.out / "critical.png"
    t0 = time.perf_counter()
    code = benchlib.code_version()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.0f} s] {msg}", flush=True)

    extra = {}
    if args.task == "bert":
        import critical_batch_bert

        task = critical_batch_bert.BertTask(
            args.corpus or critical_batch_bert.DEFAULT_CORPUS,
            args.cache_dir or args.out / "cache",
            seq_len=64 if not args.quick else 16,
            eval_samples=512 if not args.quick else 32,
            vocab_limit=120 if args.quick else None,
        )
        warm_steps = args.warm_steps if not args.quick else 4
        trace = task.warm_start(warm_steps, args.out / f"warm{warm_steps}.pt", build_optimizer, log)
        log(f"unigram plateau: held-out loss {task.plateau_loss:.4f}, accuracy {100 * task.unigram_accuracy:.2f} %")
        extra = {
            "task": {
                "name": "bert",
                "n_train": task.n_train,
                "seq_len": task.seq_len,
                "eval_samples": len(task.eval_inputs),
                "vocab_size": task.vocab_size,
                "plateau_loss": task.plateau_loss,
                "unigram_accuracy": 100 * task.unigram_accuracy,
                "warm_start": {"steps": warm_steps, "batch": 64, "micro": 8, "lr": 0.01, **trace},
            }
        }
    else:
        data = bench_quality.load_fashion_mnist(args.data)
        if s.train_subset:
            n, m = s.train_subset, s.test_subset
            data = (data[0][:n], data[1][:n], data[2][:m], data[3][:m])
        task = FashionTask(data, s.hidden)
    # a BERT run depends on its warm start too
    runs_file = "runs.jsonl" if args.task != "bert" else f"runs_warm{extra['task']['warm_start']['steps']}.jsonl"
    cache = RunCache(args.out / runs_file, s)
    res = run_all(s, task, cache, log, args.large)
    payload = {
        "meta": benchlib.run_meta(bench_quality.machine_description(), time.perf_counter() - t0, argv, code=code),
        "settings": dataclasses.asdict(s),
        "results": summarize(s, res),
        **extra,
    }
    benchlib.write_json(json_path, payload)
    benchlib.write_text(report_path, report(payload))
    plot(payload, plot_path)
    log(f"wrote {json_path}, {report_path}, {plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
