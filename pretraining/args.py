"""The command line of ``pretrain_bert.py`` and everything that can be wrong with it, checked
before any process group exists: every rank runs the same checks on the same input, so all of
them stop with the same one-line message (an :class:`~pretraining.InputError`)."""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import vrgd_ds
from pretraining import InputError, batch_schedule
from pretraining.data import check_documents, data_files, find_documents, load_sentencepiece
from pretraining.distributed import world_size_from_env
from pretraining.model import MODEL_SIZES


def parse_args(argv=None, description: str | None = None):
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=sorted(MODEL_SIZES), default="tiny", help="BERT size")
    g.add_argument(
        "--max-position-embeddings",
        type=int,
        default=None,
        help="override the size's max_position_embeddings (tiny 128, base/large 512)",
    )
    g.add_argument(
        "--dropout",
        type=float,
        default=None,
        help="hidden and attention dropout (default: tiny 0, base/large 0.1 as BERT)",
    )
    g.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="sentencepiece vocabulary to train (default: tiny 500, base/large 32000)",
    )

    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        type=Path,
        nargs="+",
        default=None,
        help="a directory with train/ and eval/ subdirectories of .txt files; or directories "
        "and files whose .txt documents are split by --eval-fraction (whole documents)",
    )
    g.add_argument(
        "--dataset", default=None, help="instead of --data: a `datasets` name (needs network), e.g. wikimedia/wikipedia"
    )
    g.add_argument("--dataset-config", default=None, help="the --dataset configuration name")
    g.add_argument("--text-column", default="text", help="text column of --dataset")
    g.add_argument(
        "--eval-fraction",
        type=float,
        default=0.05,
        help="share of documents held out for evaluation when the data has no eval split",
    )
    g.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="a sentencepiece .model trained by this script before (default: train one on the corpus)",
    )
    g.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("VRGD_CACHE", "~/.cache/vrgd_ds")),
        help="tokenizers and tokenized data, keyed by corpus, tokenizer and sequence length; "
        "must be visible to global rank 0 and every other rank (shared filesystem)",
    )
    g.add_argument("--preprocess-workers", type=int, default=1, help="processes for tokenization (rank 0 only)")

    g = p.add_argument_group("phases")
    g.add_argument("--phase1-config", type=Path, required=True, help="DeepSpeed JSON config of phase 1")
    g.add_argument(
        "--phase2-config", type=Path, default=None, help="DeepSpeed JSON config of phase 2 (none: phase 1 only)"
    )
    g.add_argument("--phase1-seq-len", type=int, default=None, help="default: tiny 64, base/large 128")
    g.add_argument("--phase2-seq-len", type=int, default=None, help="default: tiny 128, base/large 512")
    g.add_argument(
        "--phase1-steps",
        type=int,
        default=None,
        help="optimizer steps of phase 1 (default: the config's scheduler total_num_steps; "
        "giving it rescales the scheduler's warm-up to the same fraction)",
    )
    g.add_argument("--phase2-steps", type=int, default=None, help="as --phase1-steps, for phase 2")
    g.add_argument(
        "--adapt-accumulation",
        action="store_true",
        help="keep each config's train_batch_size and micro batch and set gradient_accumulation_steps "
        "for this run's world size (the paper configs are written for 64 GPUs)",
    )
    g.add_argument(
        "--lr-scale-from-batch",
        type=int,
        nargs="+",
        default=None,
        metavar="BATCH",
        help="the configs' learning rates are tuned for this train batch size (one value, or one per "
        "phase): scale each phase's LR by sqrt(train_batch_size / BATCH)",
    )
    g.add_argument(
        "--warmup-ratio",
        type=float,
        default=0.1,
        help="without a scheduler section in the config: warm-up share of the phase's steps",
    )
    g.add_argument(
        "--lr-decay",
        choices=("poly", "cosine"),
        default="poly",
        help="without a scheduler section: decay to 0 after warm-up",
    )
    g.add_argument("--lr-decay-power", type=float, default=1.0, help="power of --lr-decay poly (NVIDIA: 0.5)")

    g = p.add_argument_group("run")
    g.add_argument("--output-dir", type=Path, required=True, help="checkpoints, metrics.csv, metrics.png, final_model/")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--log-interval", type=int, default=10, help="steps between train-metric rows")
    g.add_argument(
        "--eval-interval",
        type=int,
        default=100,
        help="steps between held-out evaluations (also at the start and at the end of each phase)",
    )
    g.add_argument("--eval-samples", type=int, default=1024, help="held-out sequences per evaluation (fixed set)")
    g.add_argument(
        "--save-interval", type=int, default=500, help="steps between checkpoints (also at the end of each phase)"
    )
    g.add_argument("--resume", action="store_true", help="continue exactly from the last checkpoint in --output-dir")
    g.add_argument(
        "--stop-at-step",
        type=int,
        default=None,
        help="checkpoint and exit after this global step (a planned preemption; continue with --resume)",
    )
    g.add_argument("--no-plot", action="store_true", help="skip metrics.png")
    g.add_argument("--verbose", action="store_true", help="keep DeepSpeed's INFO logging")
    # The DeepSpeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    g.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    batch_schedule.add_arguments(p)
    return p.parse_args(argv)


@dataclass
class Phase:
    """One phase of training, as its DeepSpeed config and the command line define it."""

    number: int
    config_path: Path
    config: dict  # the DeepSpeed config after our adjustments (steps, accumulation, LR scaling)
    seq_len: int
    steps: int
    train_batch_size: int
    micro_batch_size: int
    grad_accum: int


def resolve_batch(config: dict, world_size: int, adapt: bool, name: str) -> tuple[int, int, int]:
    """(train_batch_size, micro batch, accumulation) as DeepSpeed will derive them, or a clear error."""
    tbs = config.get("train_batch_size")
    mbs = config.get("train_micro_batch_size_per_gpu")
    gas = config.get("gradient_accumulation_steps")
    if adapt:
        if tbs is None or mbs is None:
            raise InputError(f"{name}: --adapt-accumulation needs train_batch_size and train_micro_batch_size_per_gpu.")
        gas = None
    if tbs is not None and mbs is not None and gas is None:
        gas = tbs // (mbs * world_size)
    elif tbs is not None and gas is not None and mbs is None:
        mbs = tbs // (gas * world_size)
    elif tbs is None and mbs is not None:
        gas = gas or 1
        tbs = mbs * gas * world_size
    elif tbs is not None and mbs is None:
        gas, mbs = 1, tbs // world_size
    if tbs is None:
        raise InputError(f"{name}: give train_batch_size and/or train_micro_batch_size_per_gpu.")
    if not mbs or not gas or mbs * gas * world_size != tbs:
        raise InputError(
            f"{name}: train_batch_size {tbs} != train_micro_batch_size_per_gpu {mbs} x gradient_accumulation_steps "
            f"{gas} x world size {world_size}. Launch the number of ranks the config is written for, fix the three "
            f"values, or pass --adapt-accumulation to recompute gradient_accumulation_steps for {world_size} rank(s)."
        )
    return tbs, mbs, gas


def load_phase(number: int, args, world_size: int) -> Phase:
    path = getattr(args, f"phase{number}_config")
    if not path.is_file():
        raise InputError(f"--phase{number}-config {path}: no such file (see configs/ for examples).")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"--phase{number}-config {path}: not valid JSON ({err}).") from None
    if not isinstance(config, dict):
        raise InputError(
            f"--phase{number}-config {path}: a DeepSpeed config is a JSON object {{...}}, not a "
            f"{type(config).__name__}."
        )

    tbs, mbs, gas = resolve_batch(config, world_size, args.adapt_accumulation, f"--phase{number}-config {path}")
    config.update(train_batch_size=tbs, train_micro_batch_size_per_gpu=mbs, gradient_accumulation_steps=gas)

    optimizer = config.get("optimizer", {})
    if optimizer.get("type", "").lower() in vrgd_ds.OPTIMIZERS and world_size * gas < 2:
        raise InputError(
            f"{path}: {optimizer['type']} estimates the gradient variance from k = world size x "
            f"gradient_accumulation_steps = {world_size * gas} sample(s) per step; it needs k >= 2: "
            f"set gradient_accumulation_steps >= 2 or launch >= 2 ranks."
        )

    scheduler = config.get("scheduler")
    sched_params = scheduler.get("params", {}) if scheduler else {}
    steps = getattr(args, f"phase{number}_steps")
    steps = sched_params.get("total_num_steps") if steps is None else steps
    if not isinstance(steps, int) or steps < 1:
        raise InputError(
            f"phase {number} has no step count: pass --phase{number}-steps or set "
            f"scheduler.params.total_num_steps in {path}."
        )
    if "total_num_steps" in sched_params and sched_params["total_num_steps"] != steps:
        # Keep the config's warm-up share when the step count is overridden.
        old = sched_params["total_num_steps"]
        if "warmup_num_steps" in sched_params:
            sched_params["warmup_num_steps"] = max(1, round(sched_params["warmup_num_steps"] * steps / old))
        sched_params["total_num_steps"] = steps

    if args.lr_scale_from_batch:
        base = args.lr_scale_from_batch[min(number, len(args.lr_scale_from_batch)) - 1]
        factor = math.sqrt(tbs / base)
        if "lr" in optimizer.get("params", {}):
            optimizer["params"]["lr"] *= factor
        for key in ("warmup_max_lr", "warmup_min_lr"):
            if key in sched_params:
                sched_params[key] *= factor

    seq_len = getattr(args, f"phase{number}_seq_len")
    return Phase(number, path, config, seq_len, steps, tbs, mbs, gas)


def check_inputs(args) -> list[Phase]:
    """Everything that can be wrong with the command line, checked before any process group exists.

    Every rank runs the same checks on the same input, so all of them stop with the same message.
    Fills in the model-size defaults of ``args`` and returns the phases to train.
    """
    size = MODEL_SIZES[args.model]
    args.max_position_embeddings = args.max_position_embeddings or size.max_position_embeddings
    args.vocab_size = args.vocab_size or size.vocab_size
    args.dropout = size.dropout if args.dropout is None else args.dropout
    if not 0 <= args.dropout < 1:
        raise InputError(f"--dropout {args.dropout}: must be in [0, 1).")
    args.phase1_seq_len = args.phase1_seq_len or size.seq_lens[0]
    args.phase2_seq_len = args.phase2_seq_len or size.seq_lens[1]
    if (args.data is None) == (args.dataset is None):
        raise InputError("give exactly one of --data (local text files) and --dataset (a `datasets` name).")
    if not 0 < args.eval_fraction < 1:
        raise InputError(f"--eval-fraction {args.eval_fraction}: must be in (0, 1).")
    if args.tokenizer is not None:
        if not args.tokenizer.is_file():
            raise InputError(f"--tokenizer {args.tokenizer}: no such file (leave it out to train one on the corpus).")
        try:
            load_sentencepiece(args.tokenizer)
        except (RuntimeError, OSError):
            raise InputError(
                f"--tokenizer {args.tokenizer}: not a sentencepiece model. Pass a .model file this "
                f"script trained (it is kept in --cache-dir), or leave --tokenizer out."
            ) from None
    if args.vocab_size < 100:
        raise InputError(f"--vocab-size {args.vocab_size}: too small for a useful tokenizer (>= 100).")
    if args.data is not None:
        args.train_files, args.eval_files = find_documents(args.data, args.eval_fraction)
        args.corpus_bytes = sum(f.stat().st_size for f in args.train_files)
        # Read every document once, unless this corpus (same paths, sizes and modification
        # times) was tokenized before: then it passed already and nothing needs reading.
        seq_lens = [args.phase1_seq_len] + ([args.phase2_seq_len] if args.phase2_config is not None else [])
        cached = data_files(args, seq_lens).sequences.values()
        if not all((path / "dataset_dict.json").exists() for path in cached):
            check_documents(args.train_files, args.eval_files)
        args.documents_checked = True
    for name in ("log_interval", "eval_interval", "eval_samples", "save_interval", "preprocess_workers"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1.")
    if args.lr_scale_from_batch and (len(args.lr_scale_from_batch) > 2 or min(args.lr_scale_from_batch) < 1):
        raise InputError(
            f"--lr-scale-from-batch {args.lr_scale_from_batch}: give one or two (phase 1, phase 2) "
            f"positive batch sizes."
        )

    world_size = world_size_from_env()
    phases = [load_phase(1, args, world_size)]
    if args.phase2_config is not None:
        phases.append(load_phase(2, args, world_size))
    for phase in phases:
        batch_schedule.build(args, phase, world_size)  # its option errors, before any process group
    for phase in phases:
        if phase.seq_len > args.max_position_embeddings:
            raise InputError(
                f"phase {phase.number} sequence length {phase.seq_len} exceeds max_position_embeddings "
                f"{args.max_position_embeddings} of the '{args.model}' model: pass a shorter "
                f"--phase{phase.number}-seq-len or --max-position-embeddings {phase.seq_len}."
            )
        if phase.seq_len < 8:
            raise InputError(f"--phase{phase.number}-seq-len {phase.seq_len}: must be >= 8.")
        # A token covers at least one character, so the corpus cannot hold more tokens than bytes:
        # a sure (if loose) bound now; the exact count is checked after tokenization.
        needed = phase.train_batch_size * (phase.seq_len - 2)
        if args.data is not None and args.corpus_bytes < needed:
            raise InputError(
                f"the corpus is too small for one phase-{phase.number} batch: {args.corpus_bytes} bytes of "
                f"training text < train_batch_size {phase.train_batch_size} x {phase.seq_len - 2} tokens. "
                f"Add text, or lower train_batch_size in {phase.config_path}."
            )

    if args.output_dir.exists() and not args.output_dir.is_dir():
        raise InputError(f"--output-dir {args.output_dir}: exists and is not a directory.")
    checkpoints = args.output_dir / "checkpoints"
    if not args.resume and (checkpoints / "latest").exists():
        raise InputError(
            f"{args.output_dir} already holds checkpoints: pass --resume to continue that run, "
            f"or choose a new --output-dir."
        )
    if args.stop_at_step is not None and args.stop_at_step < 1:
        raise InputError(f"--stop-at-step {args.stop_at_step}: must be >= 1.")
    return phases


def check_sequences(phases: list[Phase], data: dict) -> None:
    """After tokenization (``data``: seq_len -> {"train", "eval"} sequences): each phase has one
    batch of training sequences and some held-out ones."""
    for phase in phases:
        train, held_out = data[phase.seq_len]["train"], data[phase.seq_len]["eval"]
        if len(train) < phase.train_batch_size:
            raise InputError(
                f"the corpus is too small for one phase-{phase.number} batch: {len(train)} training "
                f"sequences of {phase.seq_len} tokens < train_batch_size {phase.train_batch_size}. Add "
                f"text, or lower train_batch_size in {phase.config_path}."
            )
        if len(held_out) == 0:
            raise InputError(
                f"the held-out documents give no complete {phase.seq_len}-token sequence: hold out "
                f"more text (--eval-fraction, or more files in eval/)."
            )
