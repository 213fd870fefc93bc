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

This file is the training loop; the rest is in ``pretraining/``, one module per job: the command
line and its checks (``args``), documents -> sentencepiece -> cached sequences -> masked batches
(``data``), the model and engine (``model``), metrics.csv and the per-step log (``metrics``),
checkpoints (``checkpoints``) and the process group (``distributed``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import datasets
import deepspeed
import torch
import torch.distributed as dist

import vrgd_ds.monitor
from pretraining import InputError, batch_schedule
from pretraining.args import Phase, check_inputs, check_sequences, parse_args
from pretraining.checkpoints import checkpoint_tag, latest_checkpoint, load, parse_tag, save
from pretraining.data import (
    MASK_ID,
    TrainBatches,
    data_files,
    derive_seed,
    eval_masks,
    load_sentencepiece,
    load_sequences,
    prepare_data,
    unigram_baseline,
)
from pretraining.distributed import barrier, init_distributed, log, on_rank0_then_all, rank
from pretraining.metrics import Metrics, StepLog, open_noise_csv, vr_optimizer
from pretraining.model import build_engine

REPO_DIR = Path(__file__).resolve().parent
ERROR_PAUSE_S = 5.0  # see exit_with_error


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
    schedule = batch_schedule.build(args, phase, dist.get_world_size())  # None: a fixed batch
    if schedule is not None:
        schedule.attach(engine)
    start, running, samples = 0, {}, 0
    if resume_tag is not None:
        state = load(engine, checkpoints, resume_tag)
        start = state["step"]
        running = {k: state[k] for k in ("loss_sum", "steps_since_log", "samples_since_log") if k in state}
        samples = state.get("samples", start * phase.train_batch_size)
        if schedule is not None:  # the batch, LR factor and history as they were at the save
            schedule.load_state_dict(state["critical_batch"])
            schedule.attach(engine)
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
    me, world = rank(), dist.get_world_size()
    log(
        f"phase {phase.number}: {phase.steps} steps at seq {phase.seq_len}, batch {phase.train_batch_size} = "
        f"micro {phase.micro_batch_size} x accumulation {phase.grad_accum} x {world} rank(s)"
        f"{'' if schedule is None else f', growing to <= {schedule.max_batch} with B_simple (--batch-schedule)'}; "
        f"{phase.steps * phase.train_batch_size / batches.n:.1f} epochs of {batches.n} sequences; optimizer "
        f"{phase.config.get('optimizer', {}).get('type', 'client')}"
        f"{'' if vr_optimizer(engine) is not None else ' (no GSNR statistics)'}"
    )

    if args.stop_at_step is not None and step_offset + start >= args.stop_at_step:
        raise Stop(f"--stop-at-step {args.stop_at_step}: the run is there already (checkpoint {resume_tag})")
    if start == 0:
        metrics.write(step_offset, phase.number, baseline)
    if start == 0 and phase.number == 1:
        metrics.write(0, phase.number, evaluate(engine, eval_set, phase, args, vocab_size))
    step_log = StepLog(engine, phase, metrics, noise_csv, args.log_interval, step_offset, start, **running)
    for step in range(start, phase.steps):
        tick = time.perf_counter()
        lr = engine.get_lr()[0]  # the LR this step uses (the scheduler moves it after the step)
        gas = engine.gradient_accumulation_steps()  # --batch-schedule critical changes it between steps
        losses = []
        for micro in range(gas):
            j = me * gas + micro  # this micro-batch's index within the global batch
            inputs, labels = batches(step, j, samples)
            # Dropout draws from the global RNG: seed it per micro-batch, so a resumed run and
            # any launch layout draw the same dropout masks.
            torch.manual_seed(derive_seed("dropout", args.seed, phase.number, step, j))
            loss = engine(input_ids=inputs.to(engine.device), labels=labels.to(engine.device)).loss
            engine.backward(loss)
            engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
            losses.append(loss.item())
        done, global_step = step + 1, step_offset + step + 1
        samples += engine.train_batch_size()
        # Throughput counts training, not eval or checkpoints.
        step_log.step(done, lr, losses, seconds=time.perf_counter() - tick)
        if schedule is not None and schedule.step(engine):  # the next step's batch and LR
            log(
                f"phase {phase.number} step {done}: batch {schedule.batch_size} (B_simple {schedule.b_simple:.0f}), "
                f"LR x {schedule.lr_factor:.3g}"
            )

        if done % args.eval_interval == 0 or done == phase.steps:
            metrics.write(global_step, phase.number, evaluate(engine, eval_set, phase, args, vocab_size))
        stop = args.stop_at_step is not None and global_step >= args.stop_at_step
        if done % args.save_interval == 0 or done == phase.steps or stop:
            # The running loss average goes along, so that a resumed run logs the same numbers.
            extra = {} if schedule is None else {"critical_batch": schedule.state_dict()}
            save(engine, checkpoints, phase.number, done, samples=samples, **step_log.state(), **extra)
        if stop:
            step_log.close()
            raise Stop(
                f"stopped after global step {global_step} as asked (--stop-at-step); "
                f"continue with the same command and --resume"
            )
    step_log.finish()  # and the critical batch size from the phase's final noise scale
    return engine


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
    args = parse_args(argv, description=__doc__.split("\n\n")[0])
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
    check_sequences(phases, data)
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
            log(f"plot: {plot(out / 'metrics.csv', out / 'metrics.png')}")
        log(f"metrics: {out / 'metrics.csv'}")
    barrier()


def plot(csv_path: Path, png_path: Path) -> str:
    """metrics.png, drawn by scripts/plot_metrics.py in its own process (this script imports nothing
    from scripts/); its traceback and exit code if it fails."""
    subprocess.run(
        [sys.executable, str(REPO_DIR / "scripts" / "plot_metrics.py"), str(csv_path), "-o", str(png_path)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return str(png_path)


if __name__ == "__main__":
    main()
