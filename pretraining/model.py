"""The BERT sizes, the model (built from a ``BertConfig``: nothing is downloaded), its learning-rate
schedule and its DeepSpeed engine."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import deepspeed
from torch.optim.lr_scheduler import LambdaLR
from transformers import BertConfig, BertForMaskedLM

import vrgd_ds  # registers "VRLamb", "VRAdam", ... as DeepSpeed config optimizer types
from pretraining.data import PAD_ID


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


def build_engine(args, phase, vocab_size: int):
    """The DeepSpeed engine of ``phase`` (a :class:`pretraining.args.Phase`) for a fresh model."""
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
