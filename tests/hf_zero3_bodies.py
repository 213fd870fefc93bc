"""Rank bodies for tests/test_hf_zero3.py: the Hugging Face Trainer with a DeepSpeed config naming
``"type": "VRLamb"``, a tiny BERT loaded with ``from_pretrained`` — inside ``deepspeed.zero.Init``
at ZeRO-3 (every parameter a (0,) placeholder when the optimizer forms its groups), plainly at
ZeRO-2.

Everything random is fixed: the model is saved once (rank 0, seed 0) and loaded by every case;
the data are fixed token ids and labels read in order (``train_sampling_strategy="sequential"``);
dropout is 0. So the cases differ only in how DeepSpeed holds the parameters.
"""

from __future__ import annotations

import os

import torch

VOCAB = 100
SEQ_LEN = 16
MICRO_BATCH = 4
GAS = 2
STEPS = 3
LR = 1e-2
WEIGHT_DECAY = 0.01
CLIP = 1.0  # binds at every step: the gradient norms are 1.08-1.18
BETAS = (0.9, 0.999)
EPS = 1e-6


def tiny_bert_config():
    from transformers import BertConfig

    return BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def save_tiny_bert(path: str) -> None:
    from transformers import BertForMaskedLM

    torch.manual_seed(0)
    BertForMaskedLM(tiny_bert_config()).save_pretrained(path)


class FixedMLMData(torch.utils.data.Dataset):
    """Random token ids, a quarter of the positions (at least one per row) masked to id 4, the
    labels their original ids; -100 elsewhere. The same rows on every rank and in every run."""

    def __init__(self, rows: int, seed: int = 1):
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(5, VOCAB, (rows, SEQ_LEN), generator=gen)
        masked = torch.rand(rows, SEQ_LEN, generator=gen) < 0.25
        masked[:, 1] = True
        self.labels = torch.where(masked, ids, torch.full_like(ids, -100))
        self.input_ids = torch.where(masked, torch.full_like(ids, 4), ids)

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, i):
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}


def ds_config(stage: int, **optimizer_params) -> dict:
    return {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": GAS,
        "gradient_clipping": CLIP,
        "optimizer": {
            "type": "VRLamb",
            "params": {
                "lr": LR,
                "betas": list(BETAS),
                "eps": EPS,
                "weight_decay": WEIGHT_DECAY,
                "weight_decay_exclude_1d": True,
                "use_nvlamb": False,
                "stats_interval": 1,
                **optimizer_params,
            },
        },
        # Nothing kept gathered: every parameter stays partitioned (the default threshold would keep
        # this model's small tensors whole after the first forward).
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
    }


def _group_names(engine, vr, names: dict) -> list[dict]:
    """Per VR optimizer group: its weight_decay and the names of the model tensors DeepSpeed put in
    it (at ZeRO 1/2/3 the group's "params" are DeepSpeed's flat partitions by now)."""
    zero = engine.optimizer
    members: list[list[str]] = [[] for _ in vr.param_groups]
    if hasattr(zero, "sub_group_to_group_id"):  # ZeRO-3: sub-groups of the param groups
        for sub, params in enumerate(zero.fp16_groups):
            members[zero.sub_group_to_group_id[sub]] += [names[id(p)] for p in params]
    else:  # ZeRO 1/2
        for i, params in enumerate(zero.bit16_groups):
            members[i] += [names[id(p)] for p in params]
    return [{"weight_decay": g["weight_decay"], "names": sorted(m)} for g, m in zip(vr.param_groups, members)]


def _full_params(engine, named) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_fp32_param

    return {name: safe_get_full_fp32_param(p).detach().clone() for name, p in named}


def run_hf_case(case: dict, model_dir: str, out_dir: str) -> dict:
    """One Trainer run. ``case``: ``name``, ``stage``; ``zero_init`` (default True: load after the
    TrainingArguments, so at ZeRO-3 inside zero.Init), ``optimizer_params`` (added to the config's),
    ``mutant_shape_from_dim`` (decide 1-D from the placeholder's ``p.dim()``, the old bug)."""
    import time

    import deepspeed
    from transformers import BertForMaskedLM, Trainer, TrainerCallback, TrainingArguments
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    import vrgd_ds
    import vrgd_ds.optimizer

    start = time.perf_counter()
    model = None
    if not case.get("zero_init", True):
        # Loaded while no DeepSpeed config is active: whole tensors, which ZeRO-3 partitions only in
        # deepspeed.initialize, after the optimizer has formed its groups.
        unset_hf_deepspeed_config()
        model = BertForMaskedLM.from_pretrained(model_dir)

    # Before from_pretrained: at ZeRO-3 the arguments' DeepSpeed config makes it build the model
    # inside zero.Init (transformers keeps a weak reference: `args` must stay alive).
    args = TrainingArguments(
        output_dir=os.path.join(out_dir, case["name"]),
        max_steps=STEPS,
        per_device_train_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=GAS,
        learning_rate=LR,
        weight_decay=WEIGHT_DECAY,
        adam_beta1=BETAS[0],
        adam_beta2=BETAS[1],
        adam_epsilon=EPS,
        max_grad_norm=CLIP,
        lr_scheduler_type="constant",
        train_sampling_strategy="sequential",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
        use_cpu=True,
        deepspeed=ds_config(case["stage"], **case.get("optimizer_params", {})),
    )
    if model is None:
        model = BertForMaskedLM.from_pretrained(model_dir)
    model.accepts_loss_kwargs = False  # the micro-batch mean loss, as scripts/hf_trainer_example.py
    named = list(model.named_parameters())
    names = {id(p): n for n, p in named}
    # (shape, ds_shape) as the model stands after from_pretrained: (0,) placeholders under zero.Init.
    shapes = {n: (tuple(p.shape), tuple(getattr(p, "ds_shape", ()))) for n, p in named}

    with deepspeed.zero.GatheredParameters([p for _, p in named]):
        initial = {n: p.detach().clone() for n, p in named}

    losses: list[float] = []
    noise: list[dict] = []

    class RecordingTrainer(Trainer):
        def compute_loss(self, *a, **kw):
            loss = super().compute_loss(*a, **kw)
            losses.append(float((loss[0] if isinstance(loss, tuple) else loss).detach()))
            return loss

    class NoiseRecorder(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kw):
            noise.append(dict(vrgd_ds.find_vr_optimizer(optimizer).noise_stats()))

    trainer = RecordingTrainer(
        model=model,
        args=args,
        train_dataset=FixedMLMData(STEPS * GAS * MICRO_BATCH * int(os.environ["WORLD_SIZE"])),
        callbacks=[NoiseRecorder()],
    )
    full_dim = vrgd_ds.optimizer.full_dim
    if case.get("mutant_shape_from_dim"):
        # The bug this test guards against: 1-D decided from the (0,) placeholder's p.dim().
        vrgd_ds.optimizer.full_dim = lambda p: p.dim()
    try:
        trainer.train()
    finally:
        vrgd_ds.optimizer.full_dim = full_dim
    engine = trainer.model_wrapped
    vr = vrgd_ds.find_vr_optimizer(engine)
    return {
        "shapes": shapes,
        "initial": initial,
        "final": _full_params(engine, named),
        "losses": losses,
        "noise": noise,
        "groups": _group_names(engine, vr, names),
        "zero_stage": engine.zero_optimization_stage(),
        "seconds": time.perf_counter() - start,
    }


def run_hf_cases(rank: int, world: int, cases: list[dict], model_dir: str, out_dir: str) -> dict:
    """Rank 0 saves the tiny BERT, then every case runs in this one process group: {name: result}."""
    import torch.distributed as dist

    if rank == 0:
        save_tiny_bert(model_dir)
    dist.barrier()
    return {case["name"]: run_hf_case(case, model_dir, out_dir) for case in cases}
