#!/usr/bin/env python
"""Pretrain BERT (masked LM) with VR-LAMB under DeepSpeed, in two phases like NVIDIA's recipe.

Phase 1 trains at a short sequence length for ~90% of the samples; phase 2 starts from phase 1's
final checkpoint (weights and optimizer state) at a long sequence length, with its own DeepSpeed
config (batch size, learning rate, schedule). The model is a ``BertForMaskedLM`` built from a
``BertConfig`` (nothing is downloaded); the corpus is plain text; a sentencepiece tokenizer is
trained on it unless ``--tokenizer`` gives one. See docs/pretraining.md.

Launch, from the repository root:

    # the demo: tiny BERT on 2 CPU ranks, both phases, a few minutes (what scripts/run_demo.sh runs)
    python scripts/prepare_corpus.py
    deepspeed --num_gpus 2 pretrain_bert.py --model tiny --data data/shakespeare --output-dir outputs/demo \\
        --phase1-config configs/tiny_cpu_phase1.json --phase2-config configs/tiny_cpu_phase2.json

    # one node, 8 GPUs (torchrun works too: torchrun --nproc_per_node 8 pretrain_bert.py ...)
    deepspeed --num_gpus 8 pretrain_bert.py --model large --data /data/corpus --output-dir outputs/large \\
        --phase1-config configs/bert_large_vrlamb_64k32k_phase1_seq128_bf16_64gpu.json \\
        --phase2-config configs/bert_large_vrlamb_64k32k_phase2_seq512_bf16_64gpu.json \\
        --adapt-accumulation          # the configs are written for 64 GPUs: keep their batch size

    # several nodes: a hostfile ("worker-1 slots=8" per line), or one torchrun per node
    deepspeed --hostfile hostfile pretrain_bert.py ...same arguments...
    torchrun --nnodes 8 --node_rank $NODE --nproc_per_node 8 --master_addr $HEAD --master_port 29500 \\
        pretrain_bert.py ...same arguments...

    # after a preemption: the same command plus --resume continues exactly from the last checkpoint
    deepspeed --num_gpus 8 pretrain_bert.py ...same arguments... --resume

A single process (``python pretrain_bert.py ...``) runs one rank. Outputs in --output-dir:
``checkpoints/`` (DeepSpeed checkpoints, tags ``phase1-step000100``...), ``metrics.csv`` (one
scalar per row: step, phase, name, value), ``noise_per_tensor.csv`` (each tensor's gradient-noise
statistics: step, tensor, name, value), ``metrics.png``, ``final_model/`` (save_pretrained format
plus ``spm.model``) and ``run_args.json``.
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import socket
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import datasets
import deepspeed
import sentencepiece as spm
import torch
import torch.distributed as dist
from datasets import Features, Sequence, Value
from deepspeed.accelerator import get_accelerator
from torch.optim.lr_scheduler import LambdaLR
from tqdm import tqdm
from transformers import BertConfig, BertForMaskedLM

import vrgd_ds  # registers "VRLamb", "VRAdam", ... as DeepSpeed config optimizer types
import vrgd_ds.monitor
from vrgd_ds.cpu_comm import avoid_shm_allreduce

REPO_DIR = Path(__file__).resolve().parent

# Special tokens: the sentencepiece model trained here puts them at ids 0-4, in this order.
SPECIAL_PIECES = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(len(SPECIAL_PIECES))
MLM_PROBABILITY = 0.15
ERROR_PAUSE_S = 5.0  # see exit_with_error


@dataclass(frozen=True)
class ModelSize:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    seq_lens: tuple[int, int]  # default (phase 1, phase 2) sequence lengths
    vocab_size: int  # default sentencepiece vocabulary when one is trained here
    dropout: float  # hidden and attention dropout


MODEL_SIZES = {
    # tiny: the CPU demo. A 500-piece vocabulary and no dropout: tuned so that a few minutes of
    # training leave the unigram plateau (docs/pretraining.md, "The demo").
    "tiny": ModelSize(128, 2, 2, 512, 128, (64, 128), 500, 0.0),
    "base": ModelSize(768, 12, 12, 3072, 512, (128, 512), 32000, 0.1),
    "large": ModelSize(1024, 24, 16, 4096, 512, (128, 512), 32000, 0.1),
}


# ----------------------------------------------------------------------------------------------
# Arguments and the checks that run before anything distributed starts
# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
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
    return p.parse_args(argv)


class InputError(Exception):
    """Bad input, found before training: reported without a traceback, the same on every rank."""


@dataclass
class Phase:
    number: int
    config_path: Path
    config: dict  # the DeepSpeed config after our adjustments (steps, accumulation, LR scaling)
    seq_len: int
    steps: int
    train_batch_size: int
    micro_batch_size: int
    grad_accum: int


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _txt_files(directory: Path) -> list[Path]:
    """The .txt files under ``directory`` (recursively); directories named *.txt and broken links are not files."""
    return sorted(f for f in directory.rglob("*.txt") if f.is_file())


def _no_txt_files(directory: Path) -> str:
    """Why ``directory`` gave no documents, naming a few of the files it does hold."""
    others = sorted(str(f.relative_to(directory)) for f in directory.rglob("*") if f.is_file())
    if not others:
        return f"{directory} holds no files"
    shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
    return (
        f"{directory} holds no .txt files ({len(others)} other file(s): {shown}); documents must be "
        f"plain-text files whose names end in .txt"
    )


def find_documents(paths: list[Path], eval_fraction: float) -> tuple[list[Path], list[Path]]:
    """(train, eval) .txt documents: train/ and eval/ of a single directory, else a split by whole document."""
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise InputError(
            f"--data {' '.join(missing)}: no such file or directory. Run scripts/prepare_corpus.py "
            f"for the Shakespeare corpus, or pass your own .txt files or a directory of them."
        )
    if len(paths) == 1 and (paths[0] / "train").is_dir():
        train = _txt_files(paths[0] / "train")
        if not train:
            raise InputError(
                f"--data {paths[0]}: {_no_txt_files(paths[0] / 'train')}. Put the training documents there."
            )
        evals = _txt_files(paths[0] / "eval") if (paths[0] / "eval").is_dir() else []
        if not evals:
            raise InputError(
                f"{paths[0] / 'eval'} holds no .txt files: put held-out documents there, or pass the "
                f"documents without a train/ directory to hold out --eval-fraction of them."
            )
    else:
        docs = sorted({f.resolve() for p in paths for f in ([p] if p.is_file() else _txt_files(p))})
        if not docs:
            why = "; ".join(_no_txt_files(p) for p in paths if p.is_dir())
            raise InputError(f"--data {' '.join(map(str, paths))}: no .txt documents ({why}).")
        if len(docs) < 2:
            raise InputError(
                f"--data {' '.join(map(str, paths))}: found {len(docs)} .txt document(s); need at least 2 "
                f"to hold whole documents out for evaluation (or a train/ and eval/ directory)."
            )
        # Hold out documents chosen by a hash of their name: deterministic, not biased to A or Z.
        docs.sort(key=lambda f: hashlib.sha1(f.name.encode()).hexdigest())
        n_eval = min(len(docs) - 1, max(1, round(eval_fraction * len(docs))))
        evals, train = sorted(docs[:n_eval]), sorted(docs[n_eval:])
    if sum(f.stat().st_size for f in train) == 0:
        raise InputError(f"--data {' '.join(map(str, paths))}: the training documents are empty.")
    return train, evals


def check_text(path: Path, chunk_size: int = 1 << 20) -> bool:
    """Whether ``path`` holds a non-blank line; an InputError naming the file and the fix if it is not
    UTF-8 text (what the tokenizer and `datasets` read) or cannot be read. Streams: any file size."""
    offset, line, carry, has_text = 0, 1, b"", False  # offset and line of carry's first byte
    try:
        with open(path, "rb") as f:
            while True:
                chunk = f.read(chunk_size)
                data = carry + chunk
                if not data:
                    return has_text
                try:
                    text = data.decode("utf-8")
                    carry = b""
                except UnicodeDecodeError as err:
                    if chunk and err.reason == "unexpected end of data":  # a character cut by the chunk end
                        text, carry = data[: err.start].decode("utf-8"), data[err.start :]
                    else:
                        at_line = line + data.count(b"\n", 0, err.start)
                        raise InputError(
                            f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x} at line {at_line}, byte offset "
                            f"{offset + err.start}): convert it to UTF-8 (from Latin-1: "
                            f"iconv -f latin1 -t utf-8 IN > OUT) or remove it from --data."
                        ) from None
                has_text = has_text or not text.isspace() and text != ""
                consumed = len(data) - len(carry)
                offset, line = offset + consumed, line + data.count(b"\n", 0, consumed)
                if not chunk:
                    return has_text
    except OSError as err:
        raise InputError(
            f"{path}: cannot read it ({err.strerror or err}). Fix its permissions or remove it from --data."
        ) from None


def check_documents(train: list[Path], evals: list[Path]) -> None:
    """Every document is readable UTF-8 text, and each split holds some non-blank text: found here with
    the file's name, instead of in the tokenizer or `datasets` with a traceback that names no file."""
    for files, split, fix in (
        (train, "training", "nothing to train the tokenizer and the model on"),
        (evals, "held-out", "nothing to evaluate on"),
    ):
        blank = [f for f in files if not check_text(f)]
        if len(blank) == len(files):
            shown = " ".join(map(str, blank[:3])) + (" ..." if len(blank) > 3 else "")
            raise InputError(
                f"the {len(files)} {split} document(s) hold only blank lines ({shown}): {fix}. Put "
                f"text in them, or point --data at the right files."
            )


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


# ----------------------------------------------------------------------------------------------
# Distributed helpers
# ----------------------------------------------------------------------------------------------


def init_distributed():
    """Start the process group (nccl on GPUs, gloo on CPU); a plain ``python`` run is one rank."""
    if "RANK" not in os.environ:  # not started by torchrun or the deepspeed launcher
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # On CPU, DeepSpeed would JIT-compile a shared-memory all-reduce op (30-70 s, used only by
    # inference_all_reduce) and leave a file in /dev/shm per rank; keep it out (no-op on GPUs).
    avoid_shm_allreduce()
    deepspeed.init_distributed()
    get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def log(*msg):
    if rank() == 0:
        print(*msg, flush=True)


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts: the same parts give the same seed on every rank and every run."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def generator(*parts):
    return torch.Generator().manual_seed(derive_seed(*parts))


def on_rank0_then_all(fn):
    """Run ``fn`` on global rank 0 while the others wait; an exception there is re-raised on every rank.

    A plain barrier would leave the other ranks waiting forever when rank 0 fails.
    """
    error = [None]
    if rank() == 0:
        try:
            fn()
        except InputError as err:
            error[0] = str(err)
        except Exception as err:  # keep the traceback on rank 0, give the others its gist
            traceback.print_exc()
            error[0] = f"data preparation failed on rank 0: {type(err).__name__}: {err}"
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise InputError(error[0])


# ----------------------------------------------------------------------------------------------
# Data: documents -> sentencepiece -> fixed-length sequences, cached on disk
# ----------------------------------------------------------------------------------------------


def fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def corpus_fingerprint(args) -> str:
    if args.data is not None:
        # Path, size and modification time, as `datasets` keys local files: cheap on any corpus size.
        def stat(files):
            return [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]

        return fingerprint("files", stat(args.train_files), stat(args.eval_files))
    return fingerprint("dataset", args.dataset, args.dataset_config, args.text_column, args.eval_fraction, args.seed)


def load_text(args):
    """A DatasetDict with "train" and "eval" splits of one text column ("text"), whole documents held out."""
    hf_cache = str(args.cache_dir.expanduser() / "hf")
    if args.data is not None:
        files = {"train": [str(f) for f in args.train_files], "eval": [str(f) for f in args.eval_files]}
        return datasets.load_dataset("text", data_files=files, cache_dir=hf_cache)
    raw = datasets.load_dataset(args.dataset, args.dataset_config, cache_dir=hf_cache)
    held_out = next((s for s in ("validation", "test") if s in raw), None)
    if held_out is None:  # rows are documents (e.g. Wikipedia articles): hold out whole rows
        raw = raw["train"].train_test_split(test_size=args.eval_fraction, seed=args.seed)
        held_out = "test"
    raw = datasets.DatasetDict(train=raw["train"], eval=raw[held_out])
    return raw.select_columns([args.text_column]).rename_column(args.text_column, "text")


def train_sentencepiece(text, vocab_size: int, path: Path) -> None:
    """Train the unigram model on the non-empty lines of ``text`` (a Dataset with a "text" column)."""

    def lines():
        for batch in text.iter(batch_size=10_000):  # streams from disk: any corpus size
            for doc in batch["text"]:
                for line in doc.splitlines():
                    if line.strip():
                        yield line.strip()

    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "wb") as model_file:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines(),
            model_writer=model_file,
            vocab_size=vocab_size,
            model_type="unigram",
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=CLS_ID,
            eos_id=SEP_ID,
            pad_piece="[PAD]",
            unk_piece="[UNK]",
            bos_piece="[CLS]",
            eos_piece="[SEP]",
            control_symbols=["[MASK]"],
            # Small corpora cannot fill a large vocabulary; large ones are sampled.
            hard_vocab_limit=False,
            input_sentence_size=2_000_000,
            shuffle_input_sentence=True,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
    tmp.replace(path)


def load_sentencepiece(path: Path):
    sp = spm.SentencePieceProcessor(model_file=str(path))
    pieces = tuple(sp.id_to_piece(i) for i in range(len(SPECIAL_PIECES)))
    if pieces != SPECIAL_PIECES:
        raise InputError(
            f"--tokenizer {path}: ids 0-4 are {pieces}, expected {SPECIAL_PIECES}. Use a model "
            f"this script trained (it is kept in --cache-dir), or leave --tokenizer out."
        )
    return sp


class _Tokenize:
    """Picklable map function for datasets (num_proc > 1): loads the sentencepiece model lazily."""

    def __init__(self, model_path: str):
        self.model_path, self.sp = model_path, None

    def __call__(self, batch):
        if self.sp is None:
            self.sp = spm.SentencePieceProcessor(model_file=self.model_path)
        return {"ids": self.sp.encode(batch["text"])}


def _group(batch, seq_len):
    """Concatenate token ids and cut into [CLS] + (seq_len - 2) tokens + [SEP]; the remainder is dropped."""
    body = seq_len - 2
    flat = [t for ids in batch["ids"] for t in ids]
    n = len(flat) // body * body
    return {"input_ids": [[CLS_ID] + flat[i : i + body] + [SEP_ID] for i in range(0, n, body)]}


@dataclass
class DataFiles:
    key: str  # corpus and tokenizer fingerprint
    tokenizer: Path
    sequences: dict[int, Path]  # seq_len -> save_to_disk directory with "train" and "eval"


def data_files(args, seq_lens) -> DataFiles:
    """Where the tokenizer and the tokenized sequences live in the cache (no work done here)."""
    cache = args.cache_dir.expanduser()
    corpus = corpus_fingerprint(args)
    if args.tokenizer is not None:
        tokenizer = args.tokenizer
        tok_key = hashlib.sha256(tokenizer.read_bytes()).hexdigest()[:16]
    else:
        tokenizer = cache / "tokenizers" / f"spm-{corpus}-v{args.vocab_size}.model"
        tok_key = fingerprint(corpus, args.vocab_size)  # the model is a function of these
    key = f"{corpus}-{tok_key}"
    return DataFiles(key, tokenizer, {L: cache / "sequences" / f"{key}-seq{L}" for L in seq_lens})


def prepare_data(args, files: DataFiles) -> None:
    """Rank 0: train the tokenizer and build the sequences for every length, whatever is not cached yet."""
    todo = []
    for L, path in files.sequences.items():
        if (path / "dataset_dict.json").exists():
            log(f"data: reusing seq {L} sequences in {path}")
        else:
            todo.append(L)
    if files.tokenizer.exists():
        log(f"tokenizer: reusing {files.tokenizer}")
    if not todo:
        return
    if args.data is not None and not getattr(args, "documents_checked", False):
        check_documents(args.train_files, args.eval_files)  # callers that skipped check_inputs
    text = load_text(args)
    if not files.tokenizer.exists():
        files.tokenizer.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        train_sentencepiece(text["train"], args.vocab_size, files.tokenizer)
        log(
            f"tokenizer: trained a {args.vocab_size}-piece sentencepiece model on the training documents "
            f"in {time.time() - t0:.1f}s -> {files.tokenizer}"
        )
    load_sentencepiece(files.tokenizer)  # checks the special-token layout
    workers = args.preprocess_workers if args.preprocess_workers > 1 else None
    # Explicit fingerprints make `datasets` cache the map results (in --cache-dir/hf) by content
    # key, so a second sequence length reuses the tokenization.
    ids = datasets.DatasetDict(
        {
            split: ds.map(
                _Tokenize(str(files.tokenizer)),
                batched=True,
                remove_columns=ds.column_names,
                features=Features({"ids": Sequence(Value("int32"))}),
                num_proc=workers,
                new_fingerprint=f"tok-{files.key}-{split}",
                desc=f"tokenizing {split}",
            )
            for split, ds in text.items()
        }
    )
    for L in todo:
        t0 = time.time()
        features = Features({"input_ids": Sequence(Value("int32"), length=L)})
        seqs = datasets.DatasetDict(
            {
                split: ds.map(
                    _group,
                    fn_kwargs={"seq_len": L},
                    batched=True,
                    batch_size=1000,
                    remove_columns=["ids"],
                    features=features,
                    num_proc=workers,
                    new_fingerprint=f"grp-{files.key}-{split}-{L}",
                    desc=f"grouping {split} into {L}-token sequences",
                )
                for split, ds in ids.items()
            }
        )
        # Save under a temporary name and rename: a crash never leaves a half-written cache behind.
        path = files.sequences[L]
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        seqs.save_to_disk(str(tmp))
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        log(
            f"data: {len(seqs['train'])} train / {len(seqs['eval'])} held-out sequences of {L} tokens "
            f"in {time.time() - t0:.1f}s -> {path}"
        )


def load_sequences(path: Path):
    return datasets.load_from_disk(str(path)).with_format("torch")


# ----------------------------------------------------------------------------------------------
# Masking and batches: deterministic functions of (seed, phase, step, micro-batch)
# ----------------------------------------------------------------------------------------------


def mask_tokens(input_ids, vocab_size: int, gen, mlm_probability: float = MLM_PROBABILITY):
    """BERT's masking: (inputs, labels) for a (batch, seq) LongTensor of token ids.

    Exactly round(15% of the non-special positions) per sequence are chosen, as in the original
    BERT data pipeline; of those 80% become [MASK], 10% a random non-special token, 10% stay.
    Special tokens ([PAD] [UNK] [CLS] [SEP] [MASK], ids 0-4) are never chosen. Labels are -100
    (ignored by the loss) everywhere else.
    """
    special = input_ids < len(SPECIAL_PIECES)
    n_choose = max(1, round(mlm_probability * (input_ids.shape[1] - 2)))
    scores = torch.rand(input_ids.shape, generator=gen).masked_fill_(special, 2.0)
    chosen = torch.zeros_like(special).scatter_(1, scores.topk(n_choose, dim=1, largest=False).indices, True)
    chosen &= ~special
    labels = input_ids.masked_fill(~chosen, -100)
    action = torch.rand(input_ids.shape, generator=gen)
    random_ids = torch.randint(len(SPECIAL_PIECES), vocab_size, input_ids.shape, generator=gen)
    inputs = input_ids.clone()
    inputs[chosen & (action < 0.8)] = MASK_ID
    replace = chosen & (action >= 0.8) & (action < 0.9)
    inputs[replace] = random_ids[replace]
    return inputs, labels


class TrainBatches:
    """The micro-batches of a phase, a pure function of (step, micro-batch index).

    Step s takes the next train_batch_size samples of a stream of per-epoch permutations;
    micro-batch j (= rank x accumulation steps + accumulation index) is its j-th slice. So the
    data, the masks and (with the dropout seed) the whole step depend only on the step number:
    a resumed run replays exactly, and 2 nodes x 1 rank sees what 1 node x 2 ranks sees.
    """

    def __init__(self, sequences, phase: Phase, seed: int, vocab_size: int):
        self.sequences, self.phase, self.seed, self.vocab_size = sequences, phase, seed, vocab_size
        self.n = len(sequences)

    @functools.lru_cache(maxsize=2)  # noqa: B019 - one TrainBatches per phase, kept for the phase anyway
    def _permutation(self, epoch: int):
        return torch.randperm(self.n, generator=generator("order", self.seed, self.phase.number, epoch))

    def indices(self, step: int, micro: int) -> list[int]:
        """Dataset rows of micro-batch ``micro`` of step ``step``."""
        start = step * self.phase.train_batch_size + micro * self.phase.micro_batch_size
        return [
            int(self._permutation(p // self.n)[p % self.n]) for p in range(start, start + self.phase.micro_batch_size)
        ]

    def __call__(self, step: int, micro: int):
        """(inputs, labels) of micro-batch ``micro`` of step ``step``."""
        ids = self.sequences[self.indices(step, micro)]["input_ids"].long()
        return mask_tokens(ids, self.vocab_size, generator("mask", self.seed, self.phase.number, step, micro))


# ----------------------------------------------------------------------------------------------
# Model, engine, learning-rate schedule
# ----------------------------------------------------------------------------------------------


def build_model(args, vocab_size: int):
    size = MODEL_SIZES[args.model]
    dropout = getattr(args, "dropout", None)  # scripts/hf_trainer_example.py's arguments have none
    dropout = size.dropout if dropout is None else dropout
    config = BertConfig(
        vocab_size=(vocab_size + 7) // 8 * 8,  # a multiple of 8 for tensor cores; the extra ids never occur
        hidden_size=size.hidden_size,
        num_hidden_layers=size.num_hidden_layers,
        num_attention_heads=size.num_attention_heads,
        intermediate_size=size.intermediate_size,
        max_position_embeddings=args.max_position_embeddings,
        pad_token_id=PAD_ID,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return BertForMaskedLM(config)


def warmup_decay(step: int, total: int, warmup: int, decay: str, power: float) -> float:
    """LR multiplier at optimizer step ``step`` (0-based): linear warm-up from 0, then poly or cosine decay to 0."""
    if step < warmup:
        return step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if decay == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return (1.0 - progress) ** power


def build_engine(args, phase: Phase, vocab_size: int):
    model = build_model(args, vocab_size)
    scheduler = None
    if "scheduler" not in phase.config:
        # DeepSpeed's WarmupDecayLR (linear) and WarmupCosineLR cover the configs in configs/;
        # other decay powers (NVIDIA uses 0.5) need this LambdaLR.
        fn = functools.partial(
            warmup_decay,
            total=phase.steps,
            warmup=round(args.warmup_ratio * phase.steps),
            decay=args.lr_decay,
            power=args.lr_decay_power,
        )
        scheduler = functools.partial(LambdaLR, lr_lambda=fn)
    # One flat parameter list, as the HF Trainer passes it: the VR optimizers exclude biases and
    # LayerNorm weights from weight decay with "weight_decay_exclude_1d": true in the config.
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=phase.config, lr_scheduler=scheduler
    )
    return engine


def vr_optimizer(engine):
    """The VR optimizer inside the engine when it computes GSNR statistics, else None."""
    vr = vrgd_ds.find_vr_optimizer(engine)
    return vr if vr is not None and getattr(vr, "stats_interval", 0) > 0 else None


def layer_of(tensor_name: str) -> str:
    """Group parameter tensors by layer for the plots: embeddings, encoder.layer.N, mlm_head."""
    parts = tensor_name.removeprefix("module.").removeprefix("bert.").split(".")
    if parts[0] == "encoder" and len(parts) > 2:
        return ".".join(parts[:3])
    return {"embeddings": "embeddings", "cls": "mlm_head"}.get(parts[0], parts[0])


LAYER_STATS = ("gsnr_mean", "clip_frac", "scale_mean")  # per-tensor statistics averaged per layer


def gsnr_metrics(vr, after_step: float) -> tuple[float, dict[str, float]]:
    """(optimizer step, metrics) of the optimizer's latest GSNR statistics if newer than ``after_step``.

    ``gsnr/<key>``: the optimizer's summary (element-weighted over all tensors);
    ``gsnr_layer/<layer>/<key>``: element-weighted means over each layer's tensors.
    The optimizer keeps its last statistics between statistics steps (``stats_interval``).
    """
    summary = vr.gsnr_summary() if vr is not None else None
    if not summary or summary["step"] <= after_step:
        return after_step, {}
    out = {f"gsnr/{k}": float(v) for k, v in summary.items() if k != "step"}
    layers: dict[str, dict[str, list[float]]] = {}
    for name, stats in vr.gsnr_stats().items():
        sums = layers.setdefault(layer_of(name), {})
        weight = stats.get("numel", 1.0)
        for key in LAYER_STATS:
            if key in stats:
                total, count = sums.get(key, (0.0, 0.0))
                sums[key] = (total + weight * stats[key], count + weight)
    for layer, sums in layers.items():
        for key, (total, count) in sums.items():
            out[f"gsnr_layer/{layer}/{key}"] = total / count
    return summary["step"], out


# Global gradient-noise statistics (VR optimizer's noise_stats(), README "Gradient-noise statistics")
# logged to metrics.csv as noise/<key>.
NOISE_KEYS = ("b_simple", "b_simple_ema", "grad_norm_sq", "noise_trace", "k", "gsnr_unbiased_mean")


def noise_metrics(stats: dict) -> dict[str, float]:
    """``noise/<key>`` for the global statistics of a ``noise_stats()`` dict; non-finite values
    (an estimate that is not a number yet) and absent keys are left out."""
    out = {}
    for key in NOISE_KEYS:
        value = stats.get(key)
        if isinstance(value, torch.Tensor):
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[f"noise/{key}"] = float(value)
    return out


def critical_batch_metrics(batch_size: int, b_simple: float | None) -> dict[str, float]:
    """The relations behind ``vrgd_ds.critical_batch_summary`` as metrics (VRGD.md §5): the examples
    (``noise/examples_vs_critical`` = (1 + B/B_simple)/2) and steps (``noise/steps_vs_critical`` =
    (1 + B_simple/B)/2) this batch needs relative to one at the critical size; {} without an estimate."""
    if b_simple is None or not math.isfinite(b_simple) or b_simple <= 0:
        return {}
    return {
        "noise/critical_batch": b_simple,
        "noise/examples_vs_critical": (1 + batch_size / b_simple) / 2,
        "noise/steps_vs_critical": (1 + b_simple / batch_size) / 2,
    }


def open_noise_csv(path: Path, resume_step: int | None) -> vrgd_ds.monitor.LongCSVWriter:
    """The per-tensor noise-statistics CSV (rank 0 writes). A fresh run starts it over; a resumed run
    keeps the rows up to its checkpoint's step (later ones would be written again)."""
    if rank() == 0 and path.exists():
        if resume_step is None:
            path.unlink()
        else:
            with open(path, newline="") as f:
                rows = list(csv.reader(f))
            if rows and tuple(rows[0]) == vrgd_ds.monitor.LongCSVWriter.COLUMNS:
                kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= resume_step]
                with open(path, "w", newline="") as f:
                    csv.writer(f).writerows(kept)
    return vrgd_ds.monitor.LongCSVWriter(path, rank=rank())


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------


class Metrics:
    """Scalars to ``metrics.csv`` (always) and to DeepSpeed's monitor (TensorBoard, W&B, ...) if enabled."""

    FIELDS = ("step", "phase", "name", "value")

    def __init__(self, path: Path, resume_step: int | None):
        self.path, self.monitor = path, None
        if rank() != 0:
            return
        rows = []
        if resume_step is not None and path.exists():
            # Rows written after the checkpoint we resume from would be written again: drop them.
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, self.FIELDS)
            writer.writeheader()
            writer.writerows(rows)

    def write(self, step: int, phase: int, values: dict[str, float], to_monitor: bool = True):
        """Append rows to metrics.csv; also to the monitor unless ``to_monitor`` is False (the noise
        statistics reach it through vrgd_ds.monitor.log_noise_stats, indexed by samples)."""
        if rank() != 0 or not values:
            return
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerows((step, phase, name, f"{value:.6g}") for name, value in values.items())
        if to_monitor and self.monitor is not None and self.monitor.enabled:
            self.monitor.write_events([(name, value, step) for name, value in values.items()])


def eval_masks(ids, first_index: int, vocab_size: int, seed: int):
    """:func:`mask_tokens` for held-out sequences ``first_index``, ``first_index + 1``, ...: one
    generator per sequence, so a sequence's masks do not depend on the micro-batch size or the
    world size, and runs with different configs are scored on the same task."""
    masked = [
        mask_tokens(ids[i : i + 1], vocab_size, generator("eval", seed, first_index + i)) for i in range(len(ids))
    ]
    return torch.cat([m[0] for m in masked]), torch.cat([m[1] for m in masked])


def evaluate(engine, sequences, phase: Phase, args, vocab_size: int) -> dict[str, float]:
    """MLM loss and masked-token accuracy on the first --eval-samples held-out sequences, with fixed
    masks (a function of the seed and the sequence's index only)."""
    n = min(args.eval_samples, len(sequences))
    mbs = phase.micro_batch_size
    world, me = dist.get_world_size(), rank()
    # loss sum, masked tokens, correct predictions; then the same two counts at [MASK] inputs only
    totals = torch.zeros(5, dtype=torch.float64)
    engine.eval()
    with torch.no_grad():
        for start in range(me * mbs, n, world * mbs):
            ids = sequences[start : min(start + mbs, n)]["input_ids"].long()
            inputs, labels = eval_masks(ids, start, vocab_size, args.seed)
            logits = engine(input_ids=inputs.to(engine.device)).logits.float()
            labels = labels.to(engine.device)
            picked = labels != -100
            totals[0] += torch.nn.functional.cross_entropy(logits[picked], labels[picked], reduction="sum").item()
            totals[1] += picked.sum().item()
            correct = logits[picked].argmax(-1) == labels[picked]
            totals[2] += correct.sum().item()
            # 10% of the picked positions show the answer itself: a model that only copies its input
            # there scores ~0.1 above the unigram baseline without using any context. [MASK] inputs do not.
            at_mask = inputs.to(engine.device)[picked] == MASK_ID
            totals[3] += at_mask.sum().item()
            totals[4] += correct[at_mask].sum().item()
    engine.train()
    dist.all_reduce(totals)
    return {
        "eval/loss": totals[0].item() / totals[1].item(),
        "eval/accuracy": totals[2].item() / totals[1].item(),
        "eval/mask_accuracy": totals[4].item() / max(1.0, totals[3].item()),
    }


def unigram_baseline(
    train, held_out, n_eval: int, vocab_size: int, seed: int, max_train: int = 100_000
) -> tuple[int, float]:
    """(token, accuracy) of always predicting the most frequent label token of the training set,
    scored like :func:`evaluate` on the masked positions of the first ``n_eval`` held-out sequences.

    Masking picks non-special positions uniformly, so the most frequent label is the most
    frequent non-special token; it is counted on at most ``max_train`` evenly spaced training
    sequences (all of them in the demo). A model that has learned only the token frequencies
    (the "unigram plateau" early in training) scores about this.
    """
    counts = torch.zeros(vocab_size, dtype=torch.long)
    rows = range(0, len(train), max(1, len(train) // max_train))
    for start in range(0, len(rows), 8192):
        ids = train[list(rows[start : start + 8192])]["input_ids"].long()
        counts += torch.bincount(ids.flatten(), minlength=vocab_size)[:vocab_size]
    counts[: len(SPECIAL_PIECES)] = 0
    token = int(counts.argmax())
    ids = held_out[: min(n_eval, len(held_out))]["input_ids"].long()
    _, labels = eval_masks(ids, 0, vocab_size, seed)
    return token, (labels == token).sum().item() / (labels != -100).sum().item()


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


def checkpoint_tag(phase: int, step: int) -> str:
    return f"phase{phase}-step{step:06d}"


def parse_tag(tag: str) -> tuple[int, int]:
    phase, step = tag.split("-")
    return int(phase.removeprefix("phase")), int(step.removeprefix("step"))


def latest_checkpoint(checkpoints: Path) -> str | None:
    latest = checkpoints / "latest"  # written by DeepSpeed's save_checkpoint
    return latest.read_text().strip() if latest.exists() else None


def save(engine, checkpoints: Path, phase: int, step: int, **state):
    """A DeepSpeed checkpoint (every rank writes its ZeRO partition); ``state`` rides along as client state."""
    engine.save_checkpoint(
        str(checkpoints), tag=checkpoint_tag(phase, step), client_state=dict(state, phase=phase, step=step)
    )


def load(engine, checkpoints: Path, tag: str, **kwargs) -> dict:
    """Load a checkpoint into the engine and return its client state; a clear error if it is not there."""
    path, state = engine.load_checkpoint(str(checkpoints), tag=tag, **kwargs)
    if path is None:  # DeepSpeed only warns
        raise InputError(
            f"checkpoint {tag} not found in {checkpoints} (it is needed to continue); run without "
            f"--resume into a new --output-dir to start over."
        )
    return state


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


class Stop(Exception):
    """--stop-at-step reached (after a checkpoint)."""


def train_phase(
    args,
    phase: Phase,
    step_offset: int,
    data,
    vocab_size: int,
    metrics: Metrics,
    checkpoints: Path,
    resume_tag: str | None,
    init_tag: str | None,
    baseline: dict[str, float],
    noise_csv: vrgd_ds.monitor.LongCSVWriter | None = None,
):
    """Train one phase from ``resume_tag`` (same phase), else from ``init_tag`` (the previous phase's end).

    ``baseline``: metrics logged once at the phase's start (the unigram baseline). ``noise_csv``:
    receives each tensor's gradient-noise statistics at the log interval."""
    engine = build_engine(args, phase, vocab_size)
    metrics.monitor = engine.monitor
    start, loss_sum, steps_since_log = 0, 0.0, 0
    if resume_tag is not None:
        state = load(engine, checkpoints, resume_tag)
        start, loss_sum, steps_since_log = state["step"], state["loss_sum"], state["steps_since_log"]
        log(f"phase {phase.number}: resumed from checkpoint {resume_tag}")
    elif init_tag is not None:
        # Phase 2 starts from phase 1's end: weights, optimizer moments, GSNR momentum, step
        # counts. Its own config sets the hyperparameters and a fresh LR schedule, so the loaded
        # param-group settings (phase 1's final LR etc.) are replaced by the fresh engine's.
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
        load(engine, checkpoints, init_tag, load_lr_scheduler_states=False)
        for group, settings in zip(engine.optimizer.param_groups, fresh):
            group.update(settings)
        log(f"phase {phase.number}: initialized from checkpoint {init_tag}")

    batches = TrainBatches(data[phase.seq_len]["train"], phase, args.seed, vocab_size)
    eval_set = data[phase.seq_len]["eval"]
    vr = vr_optimizer(engine)
    noise_source = vrgd_ds.find_vr_optimizer(engine)  # its noise_stats(): B_simple etc., every step
    me, world, gas = rank(), dist.get_world_size(), phase.grad_accum
    log(
        f"phase {phase.number}: {phase.steps} steps at seq {phase.seq_len}, batch {phase.train_batch_size} = "
        f"micro {phase.micro_batch_size} x accumulation {gas} x {world} rank(s); "
        f"{phase.steps * phase.train_batch_size / batches.n:.1f} epochs of {batches.n} sequences; optimizer "
        f"{phase.config.get('optimizer', {}).get('type', 'client')}"
        f"{'' if vr is not None else ' (no GSNR statistics)'}"
    )

    if args.stop_at_step is not None and step_offset + start >= args.stop_at_step:
        raise Stop(f"--stop-at-step {args.stop_at_step}: the run is there already (checkpoint {resume_tag})")
    if start == 0:
        metrics.write(step_offset, phase.number, baseline)
    if start == 0 and phase.number == 1:
        metrics.write(0, phase.number, evaluate(engine, eval_set, phase, args, vocab_size))
    bar = tqdm(
        total=phase.steps,
        initial=start,
        desc=f"phase {phase.number} seq {phase.seq_len}",
        disable=me != 0,
        dynamic_ncols=True,
        mininterval=0.5,
    )
    train_time, stats_step, gsnr_postfix, noise = 0.0, -1.0, {}, {}
    for step in range(start, phase.steps):
        tick = time.perf_counter()
        lr = engine.get_lr()[0]  # the LR this step uses (the scheduler moves it after the step)
        for micro in range(gas):
            j = me * gas + micro  # this micro-batch's index within the global batch
            inputs, labels = batches(step, j)
            # Dropout draws from the global RNG: seed it per micro-batch, so a resumed run and
            # any launch layout draw the same dropout masks.
            torch.manual_seed(derive_seed("dropout", args.seed, phase.number, step, j))
            loss = engine(input_ids=inputs.to(engine.device), labels=labels.to(engine.device)).loss
            engine.backward(loss)
            engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
            loss_sum += loss.item() / gas
        train_time += time.perf_counter() - tick  # throughput counts training, not eval or checkpoints
        steps_since_log += 1
        done, global_step = step + 1, step_offset + step + 1
        stats_step, gsnr = gsnr_metrics(vr, stats_step)
        metrics.write(global_step, phase.number, gsnr)

        postfix = {"loss": f"{loss_sum / steps_since_log:.3f}", "lr": f"{lr:.2e}"}
        if gsnr:  # new statistics this step; the bar keeps showing the last ones in between
            gsnr_postfix = {
                short: f"{gsnr[name]:.3g}"
                for short, name in (("gsnr", "gsnr/gsnr_mean"), ("clip", "gsnr/gsnr_clip_frac"))
                if name in gsnr
            }
        postfix.update(gsnr_postfix)
        if noise_source is not None:
            noise = noise_source.noise_stats()  # {} before the first step and while statistics are off
            if noise and engine.monitor is not None:
                vrgd_ds.monitor.log_noise_stats(engine)  # TensorBoard/W&B/CSV monitor, if configured
            noise_row = noise_metrics(noise)
            if "noise/b_simple_ema" in noise_row:
                postfix["B_simple"] = f"{noise_row['noise/b_simple_ema']:.3g}"
        if done % args.log_interval == 0 or done == phase.steps:
            mean_loss = torch.tensor([loss_sum / steps_since_log])
            dist.all_reduce(mean_loss)
            row = {
                "train/loss": mean_loss.item() / world,
                "train/lr": lr,
                "train/batch_size": phase.train_batch_size,
                "train/samples_per_s": steps_since_log * phase.train_batch_size / train_time,
                "train/tokens_per_s": steps_since_log * phase.train_batch_size * phase.seq_len / train_time,
            }
            metrics.write(global_step, phase.number, row)
            if noise_source is not None and noise:
                metrics.write(global_step, phase.number, noise_metrics(noise), to_monitor=False)
                if noise_csv is not None:
                    noise_csv.write_noise_stats(noise, global_step)
            postfix.update(
                loss=f"{row['train/loss']:.3f}",
                samples_s=f"{row['train/samples_per_s']:.0f}",
                tokens_s=f"{row['train/tokens_per_s']:.0f}",
            )
            loss_sum, steps_since_log, train_time = 0.0, 0, 0.0
        bar.set_postfix(postfix, refresh=False)
        bar.update(1)

        if done % args.eval_interval == 0 or done == phase.steps:
            metrics.write(global_step, phase.number, evaluate(engine, eval_set, phase, args, vocab_size))
        stop = args.stop_at_step is not None and global_step >= args.stop_at_step
        if done % args.save_interval == 0 or done == phase.steps or stop:
            # The running loss average goes along, so that a resumed run logs the same numbers.
            save(engine, checkpoints, phase.number, done, loss_sum=loss_sum, steps_since_log=steps_since_log)
        if stop:
            bar.close()
            raise Stop(
                f"stopped after global step {global_step} as asked (--stop-at-step); "
                f"continue with the same command and --resume"
            )
    bar.close()
    if noise:  # the critical batch size from this phase's final averaged noise scale
        b_ema = noise_metrics(noise).get("noise/b_simple_ema")
        log(f"phase {phase.number}: {vrgd_ds.critical_batch_summary(phase.train_batch_size, b_ema)}")
        metrics.write(
            step_offset + phase.steps,
            phase.number,
            critical_batch_metrics(phase.train_batch_size, b_ema),
            to_monitor=False,
        )
    return engine


def exit_with_error(err: InputError, me: int):
    """One line on stderr, exit code 2: the same on every rank, never a traceback.

    Rank 0 prints at once. The other ranks print the same line after a pause, unless the launcher
    has ended them by then (the deepspeed launcher and torchrun do when rank 0 exits): the line
    appears once, and still appears when rank 0 is slower, or its node's launcher is not ours.
    """
    if me != 0:
        time.sleep(ERROR_PAUSE_S)
    print(f"error: {err}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def main(argv=None):
    args = parse_args(argv)
    try:
        phases = check_inputs(args)
    except InputError as err:
        exit_with_error(err, int(os.environ.get("RANK", "0")))

    init_distributed()
    try:
        return run(args, phases)
    except InputError as err:
        exit_with_error(err, rank())
    except Stop as stop:
        log(stop)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(args, phases: list[Phase]):
    """Prepare the data (rank 0), then train each phase not done yet; the final model and plot at the end."""
    if not args.verbose:
        deepspeed.utils.logger.setLevel(logging.WARNING)
        datasets.disable_progress_bars()
        warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")

    out = args.output_dir
    checkpoints = out / "checkpoints"
    if rank() == 0:
        checkpoints.mkdir(parents=True, exist_ok=True)
        run_args = {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("train_files", "eval_files", "corpus_bytes", "documents_checked")
        }
        (out / "run_args.json").write_text(json.dumps(run_args, indent=2, default=str) + "\n")

    files = data_files(args, [p.seq_len for p in phases])
    on_rank0_then_all(lambda: prepare_data(args, files))
    sp = load_sentencepiece(files.tokenizer)
    vocab_size = sp.get_piece_size()
    data = {L: load_sequences(path) for L, path in files.sequences.items()}
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
    baselines = {}
    for phase in phases:
        if rank() == 0:  # only rank 0 writes metrics
            token, accuracy = unigram_baseline(
                data[phase.seq_len]["train"], data[phase.seq_len]["eval"], args.eval_samples, vocab_size, args.seed
            )
            log(
                f"phase {phase.number}: always predicting the most frequent token {sp.id_to_piece(token)!r} scores "
                f"{accuracy:.3f} held-out masked-token accuracy (the unigram baseline)"
            )
            baselines[phase.number] = {"eval/unigram_accuracy": accuracy}

    resume_tag = latest_checkpoint(checkpoints) if args.resume else None
    if args.resume:
        log(
            f"resuming from checkpoint {resume_tag}"
            if resume_tag
            else f"--resume: no checkpoint in {checkpoints} yet, starting from scratch"
        )
    done_phase, done_step = parse_tag(resume_tag) if resume_tag else (1, 0)
    if done_phase > len(phases):
        raise InputError(
            f"{checkpoints} holds a phase-{done_phase} checkpoint, but no --phase{done_phase}-config was given."
        )
    step_offsets = [sum(p.steps for p in phases[:i]) for i in range(len(phases))]  # global step = offset + step
    resume_step = step_offsets[done_phase - 1] + done_step if resume_tag else None
    metrics = Metrics(out / "metrics.csv", resume_step)
    noise_csv = open_noise_csv(out / "noise_per_tensor.csv", resume_step)

    engine = None
    for phase, offset in zip(phases, step_offsets):
        if phase.number < done_phase or (phase.number == done_phase and done_step >= phase.steps):
            log(f"phase {phase.number}: complete already")
            continue
        engine = None  # free the previous phase's engine before this one builds its own
        torch.manual_seed(args.seed)  # model initialization: the same on every rank
        engine = train_phase(
            args,
            phase,
            offset,
            data,
            vocab_size,
            metrics,
            checkpoints,
            resume_tag if phase.number == done_phase else None,
            init_tag=checkpoint_tag(phase.number - 1, phases[phase.number - 2].steps) if phase.number > 1 else None,
            baseline=baselines.get(phase.number, {}),
            noise_csv=noise_csv,
        )
    noise_csv.close()

    if rank() == 0:
        if engine is not None:
            final = out / "final_model"
            engine.module.save_pretrained(final)
            shutil.copy(files.tokenizer, final / "spm.model")
            log(f"final model: {final}")
        if not args.no_plot:
            sys.path.insert(0, str(REPO_DIR / "scripts"))
            from plot_metrics import plot_metrics

            log(f"plot: {plot_metrics(out / 'metrics.csv', out / 'metrics.png')}")
        log(f"metrics: {out / 'metrics.csv'}")
    dist_barrier()


def dist_barrier():
    if dist.is_initialized():
        dist.barrier()


if __name__ == "__main__":
    main()
