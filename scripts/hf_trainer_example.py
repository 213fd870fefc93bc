#!/usr/bin/env python
"""Pretrain a BERT masked LM with the Hugging Face Trainer, VR-LAMB and DeepSpeed ZeRO-2.

The DeepSpeed config below names ``"type": "VRLamb"`` with ``"auto"`` values: the Trainer fills
lr, betas, eps, weight_decay, the batch sizes and gradient clipping from its TrainingArguments.
The Trainer hands DeepSpeed one flat parameter list, so ``"weight_decay_exclude_1d": true`` is
what keeps biases and LayerNorm weights out of weight decay. The data pipeline (sentencepiece
trained on the corpus, fixed-length sequences, BERT masking) is pretrain_bert.py's.

    python scripts/prepare_corpus.py
    torchrun --nproc_per_node 2 scripts/hf_trainer_example.py --data data/shakespeare --output-dir outputs/hf
    deepspeed --num_gpus 8 scripts/hf_trainer_example.py --data /data/corpus --output-dir outputs/hf \\
        --model base --seq-len 128 --per-device-batch-size 64 --bf16

VRGD needs k = ranks x --gradient-accumulation-steps >= 2 gradient samples per step. The Trainer
needs ``accelerate`` (``pip install accelerate``).
Writes ``log_history.json`` (the Trainer's logs, GSNR statistics included) and ``final_model/``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

import vrgd_ds  # noqa: F401  registers "VRLamb" as a DeepSpeed optimizer type
from pretraining import InputError  # pretrain_bert.py's data pipeline and model builder
from pretraining.data import data_files, find_documents, load_sentencepiece, load_sequences, mask_tokens, prepare_data
from pretraining.distributed import init_distributed, on_rank0_then_all
from pretraining.model import MODEL_SIZES, build_model
from vrgd_ds.cpu_comm import avoid_shm_allreduce
from vrgd_ds.hf import add_noise_stats_callback


def deepspeed_config(zero_stage: int, stats_interval: int) -> dict:
    return {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "optimizer": {
            "type": "VRLamb",
            "params": {
                "lr": "auto",
                "weight_decay": "auto",
                "betas": "auto",
                "eps": "auto",
                "weight_decay_exclude_1d": True,
                "stats_interval": stats_interval,
            },
        },
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
    }


class MaskingCollator:
    """Stacks fixed-length sequences and masks them as BERT does (pretrain_bert.mask_tokens)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, rows):
        ids = torch.stack([row["input_ids"] for row in rows]).long()
        inputs, labels = mask_tokens(ids, self.vocab_size, gen=None)  # the Trainer seeds torch's RNG
        return {"input_ids": inputs, "labels": labels}


class VRTrainer(Trainer):
    """Adds the VR optimizer's GSNR summary (when it computed one) to every log entry."""

    def log(self, logs, *args, **kwargs):
        vr = vrgd_ds.find_vr_optimizer(self.optimizer)
        if vr is not None:
            logs.update({f"gsnr/{k}": v for k, v in vr.gsnr_summary().items() if k != "step"})
        super().log(logs, *args, **kwargs)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--data", type=Path, nargs="+", required=True, help="as pretrain_bert.py --data")
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--model", choices=sorted(MODEL_SIZES), default="tiny")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--vocab-size", type=int, default=None, help="sentencepiece vocabulary (default: per model size)")
    p.add_argument("--cache-dir", type=Path, default=Path("~/.cache/vrgd_ds"))
    p.add_argument("--max-steps", type=int, default=50)
    p.add_argument("--per-device-batch-size", type=int, default=16)
    p.add_argument("--gradient-accumulation-steps", type=int, default=2)
    p.add_argument("--learning-rate", type=float, default=1e-2)
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--logging-steps", type=int, default=5)
    p.add_argument("--stats-interval", type=int, default=1, help="VR-LAMB GSNR statistics every N steps (0: off)")
    p.add_argument("--zero-stage", type=int, default=2, choices=(0, 1, 2))
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    size = MODEL_SIZES[args.model]
    # pretrain_bert's data helpers read these attributes of its own arguments.
    args.vocab_size = args.vocab_size or size.vocab_size
    args.max_position_embeddings = size.max_position_embeddings
    args.dataset, args.tokenizer, args.eval_fraction = None, None, 0.05
    args.preprocess_workers = 1
    try:
        args.train_files, args.eval_files = find_documents(args.data, args.eval_fraction)
    except InputError as err:
        raise SystemExit(f"error: {err}") from None

    avoid_shm_allreduce()  # on CPU: no shm op, so no ~69 MB file per rank left in /dev/shm
    init_distributed()  # before TrainingArguments
    training_args = TrainingArguments(
        output_dir=str(args.output_dir),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.per_device_batch_size,
        per_device_eval_batch_size=args.per_device_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-6,
        lr_scheduler_type="linear",
        warmup_steps=args.warmup_steps,
        logging_steps=args.logging_steps,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        bf16=args.bf16,
        use_cpu=not torch.cuda.is_available(),  # on CPU the Trainer counts ranks wrong without it
        deepspeed=deepspeed_config(args.zero_stage, args.stats_interval),
    )

    files = data_files(args, [args.seq_len])
    on_rank0_then_all(lambda: prepare_data(args, files))  # rank 0 tokenizes, the others read the cache
    vocab_size = load_sentencepiece(files.tokenizer).get_piece_size()
    data = load_sequences(files.sequences[args.seq_len])

    model = build_model(args, vocab_size)
    # BertForMaskedLM's forward takes **kwargs but returns the mean loss of its micro-batch,
    # ignoring `num_items_in_batch`. Without this the Trainer (transformers 5) takes the loss as
    # already normalized over the accumulated batch and multiplies it by the number of ranks:
    # the loss it logs and backpropagates is gradient_accumulation_steps x ranks too large.
    model.accepts_loss_kwargs = False
    trainer = VRTrainer(
        model=model,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data["eval"],
        data_collator=MaskingCollator(vocab_size),
    )
    # Gradient-noise statistics (k, |G|², tr Σ, B_simple and its EMA) as noise/* in the logs.
    add_noise_stats_callback(trainer)
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model(str(args.output_dir / "final_model"))
    if trainer.is_world_process_zero():
        (args.output_dir / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1) + "\n")
        print(f"held-out MLM loss {metrics['eval_loss']:.3f}; logs: {args.output_dir / 'log_history.json'}")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
