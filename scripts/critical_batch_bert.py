"""The tiny-BERT task of scripts/bench_critical_batch.py (``--task bert``), past the unigram plateau.

pretrain_bert.py's tiny BERT (2 layers, hidden 128, 2 heads, its 500-piece sentencepiece vocabulary,
no dropout) on the Shakespeare corpus of scripts/prepare_corpus.py (held-out: whole plays), with
pretrain_bert.py's data pipeline (``pretraining.data``: packed sequences, BERT's 80/10/10 masking of
15 % of the tokens), trained in plain PyTorch on one process: a step of batch B is B/micro
micro-batches, each ``(loss / k).backward()``, as for Fashion-MNIST.

Every compared run starts from one shared warm start, as in docs/results_bert_mlm.md: plain LAMB
(``VRLamb(vr=False, gradient_stats=True)``) at batch 64 (micro 8 × 8) from initialization, peak LR
0.01 after a 30-step linear warm-up, then constant, for ``warm_steps`` steps, past the unigram
plateau (the held-out loss of a model that predicts the training set's token frequencies
everywhere, :func:`unigram_loss`). Each run loads its weights and its optimizer state (LAMB moments
and the noise statistics' EMAs), so B_simple is measured from the first step of every arm.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = ROOT / "data" / "shakespeare"
WARM_BATCH, WARM_MICRO, WARM_LR, WARM_WARMUP = 64, 8, 0.01, 30
OPTIMIZER_KWARGS = {"betas": (0.9, 0.98), "eps": 1e-6}  # configs/tiny_cpu_phase1.json


def load_sequences(corpus: Path, cache_dir: Path, seq_len: int):
    """(train ids, held-out ids, vocabulary size): pretrain_bert.py's tokenizer and packed
    sequences for ``corpus`` (built on the first call, cached in ``cache_dir``)."""
    import datasets

    from pretraining.args import check_inputs, parse_args
    from pretraining.data import data_files, load_sentencepiece, prepare_data
    from pretraining.data import load_sequences as load

    datasets.disable_progress_bars()
    args = parse_args(
        ["--model", "tiny", "--data", str(corpus), "--output-dir", str(cache_dir / "unused"), "--cache-dir",
         str(cache_dir), "--phase1-config", str(ROOT / "configs" / "tiny_cpu_phase1.json"), "--phase1-seq-len",
         str(seq_len), "--adapt-accumulation"]
    )  # fmt: skip
    check_inputs(args)
    files = data_files(args, [seq_len])
    prepare_data(args, files)
    vocab_size = load_sentencepiece(files.tokenizer).get_piece_size()
    seqs = load(files.sequences[seq_len])
    return seqs["train"][:]["input_ids"].long(), seqs["eval"][:]["input_ids"].long(), vocab_size


def unigram_loss(train_ids, labels, vocab_size: int) -> tuple[float, float]:
    """(loss, accuracy) on the masked ``labels`` of predicting the training tokens' frequencies
    everywhere: the unigram plateau a model from initialization first sits on."""
    from pretraining.data import SPECIAL_PIECES

    counts = torch.bincount(train_ids.flatten(), minlength=vocab_size)[:vocab_size].double()
    counts[: len(SPECIAL_PIECES)] = 0  # never masked, never a label
    logp = (counts / counts.sum()).clamp_min(1e-12).log()
    y = labels[labels != -100]
    return float(-logp[y].mean()), float((y == int(counts.argmax())).double().mean())


class BertTask:
    """What :func:`bench_critical_batch.train_run` needs: ``n_train``, ``new_model``, ``loss``, ``held_out``."""

    name = "bert"
    clip = 1.0  # gradient clipping of configs/tiny_cpu_phase1.json
    optimizer_kwargs = OPTIMIZER_KWARGS

    def __init__(self, corpus: Path, cache_dir: Path, seq_len: int, eval_samples: int, vocab_limit: int | None = None):
        from pretraining.data import eval_masks

        self.train_ids, eval_ids, self.vocab_size = load_sequences(corpus, cache_dir, seq_len)
        if vocab_limit:  # smoke runs: a tiny model
            self.vocab_size = min(self.vocab_size, vocab_limit)
            self.train_ids = self.train_ids.clamp_max(self.vocab_size - 1)
            eval_ids = eval_ids.clamp_max(self.vocab_size - 1)
        self.n_train, self.seq_len = len(self.train_ids), seq_len
        # fixed masks, the same for every run and seed: every arm is scored on the same task
        self.eval_inputs, self.eval_labels = eval_masks(eval_ids[:eval_samples], 0, self.vocab_size, seed=0)
        self.plateau_loss, self.unigram_accuracy = unigram_loss(self.train_ids, self.eval_labels, self.vocab_size)
        self.warm = None

    def build(self, seed: int):
        from transformers import BertConfig, BertForMaskedLM

        from pretraining.data import PAD_ID
        from pretraining.model import MODEL_SIZES

        size = MODEL_SIZES["tiny"]
        torch.manual_seed(seed)
        config = BertConfig(
            vocab_size=(self.vocab_size + 7) // 8 * 8,  # as pretraining.model.build_model
            hidden_size=size.hidden_size,
            num_hidden_layers=size.num_hidden_layers,
            num_attention_heads=size.num_attention_heads,
            intermediate_size=size.intermediate_size,
            max_position_embeddings=size.max_position_embeddings,
            pad_token_id=PAD_ID,
            hidden_dropout_prob=size.dropout,
            attention_probs_dropout_prob=size.dropout,
        )
        return BertForMaskedLM(config)

    def new_model(self):
        model = self.build(0)
        if self.warm is None:
            return model, None
        model.load_state_dict(self.warm["model"])
        return model, self.warm["optimizer"]

    def loss(self, model, idx, gen):
        from pretraining.data import mask_tokens

        inputs, labels = mask_tokens(self.train_ids[idx], self.vocab_size, gen)
        return model(input_ids=inputs, labels=labels).loss  # packed sequences: no padding

    @torch.no_grad()
    def held_out(self, model, chunk: int = 256) -> tuple[float, float]:
        """Masked-LM loss (mean over the masked tokens) and accuracy (%) on the fixed held-out masks."""
        was_training = model.training
        model.eval()
        loss, correct, count = 0.0, 0, 0
        for i in range(0, len(self.eval_inputs), chunk):
            logits = model(input_ids=self.eval_inputs[i : i + chunk]).logits
            labels = self.eval_labels[i : i + chunk]
            keep = labels != -100
            loss += float(F.cross_entropy(logits[keep], labels[keep], reduction="sum"))
            correct += int((logits[keep].argmax(-1) == labels[keep]).sum())
            count += int(keep.sum())
        model.train(was_training)
        return loss / count, 100.0 * correct / count

    def warm_start(self, steps: int, path: Path, build_optimizer, log, eval_every: int = 20) -> dict:
        """Plain LAMB at batch 64 from initialization for ``steps`` steps (cached in ``path``);
        the weights and optimizer state are where every compared run starts."""
        if path.exists():
            self.warm = torch.load(path, weights_only=False)
            if self.warm["steps"] == steps:
                log(f"warm start: reusing {path}")
                return self.warm["trace"]
        t0 = time.perf_counter()
        model = self.build(0)
        opt = build_optimizer(model, WARM_LR, False, WARM_MICRO, self)
        gen = torch.Generator().manual_seed(12345)
        order = torch.randperm(self.n_train, generator=gen)
        k = WARM_BATCH // WARM_MICRO
        trace = {"step": [], "loss": [], "acc": [], "b_simple_ema": []}
        for step in range(steps + 1):
            if step % eval_every == 0 or step == steps:
                loss, acc = self.held_out(model)
                bs = float(opt.noise_stats().get("b_simple_ema", math.nan)) if step else math.nan
                for key, v in zip(trace, (step, loss, acc, bs)):
                    trace[key].append(v)
                log(f"warm start step {step}: held-out loss {loss:.4f} acc {acc:.2f} B_simple (EMA) {bs:.0f}")
            if step == steps:
                break
            for group in opt.param_groups:
                group["lr"] = WARM_LR * min(1.0, (step + 1) / WARM_WARMUP)
            idx = order[step * WARM_BATCH : (step + 1) * WARM_BATCH]
            for m in range(k):
                (self.loss(model, idx[m * WARM_MICRO : (m + 1) * WARM_MICRO], gen) / k).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.clip)
            opt.step()
            opt.zero_grad()
        trace["seconds"] = time.perf_counter() - t0
        self.warm = {"steps": steps, "model": model.state_dict(), "optimizer": opt.state_dict(), "trace": trace}
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.warm, path)
        log(f"warm start: {steps} steps in {trace['seconds']:.0f} s -> {path}")
        return trace
