"""The tiny-BERT task of scripts/bench_critical_batch.py (``--task bert``): the unigram plateau is the
frequency model's loss, and every compared run starts exactly where the shared warm start ended."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .script_loader import load_script

CORPUS = Path(__file__).resolve().parent / "data" / "shakespeare_small"


def test_unigram_loss_is_the_frequency_model():
    bert = load_script("critical_batch_bert")
    # non-special tokens 5, 5, 6, 7 -> p = 1/2, 1/4, 1/4; the special ids 0-4 are never labels
    train = torch.tensor([[2, 5, 5, 3], [2, 6, 7, 3]])
    labels = torch.tensor([[-100, 5, 6, -100]])
    loss, accuracy = bert.unigram_loss(train, labels, vocab_size=10)
    assert math.isclose(loss, -(math.log(0.5) + math.log(0.25)) / 2, rel_tol=1e-12)
    assert accuracy == 0.5  # always "5": right on one of the two labels


def test_runs_start_from_the_warm_start(tmp_path):
    bench = load_script("bench_critical_batch")
    bert = load_script("critical_batch_bert")
    torch.set_num_threads(1)
    task = bert.BertTask(CORPUS, tmp_path / "cache", seq_len=16, eval_samples=16, vocab_limit=120)
    trace = task.warm_start(3, tmp_path / "warm.pt", bench.build_optimizer, log=lambda msg: None, eval_every=3)
    assert trace["step"] == [0, 3] and math.isfinite(trace["b_simple_ema"][-1])
    assert trace["loss"][-1] < trace["loss"][0]
    s = bench.dataclasses.replace(bench.BERT_QUICK, examples=64, eval_every=64)
    for optimizer in ("LAMB", "VR-LAMB"):
        run = bench.train_run(bench.RunConfig(optimizer, "small", s.small, 0.01, 0), s, task)
        # weights loaded: the first evaluation is the warm start's last one, on the same fixed masks
        assert run["evals"]["loss"][0] == trace["loss"][-1]
        assert run["steps"] == 4 and run["evals"]["loss"][-1] != trace["loss"][-1]
    # optimizer state loaded: B_simple's EMA continues from the warm start's; a fresh optimizer's
    # EMA after one step is that step's own estimate
    stats = {}
    for name in ("fresh", "warm"):
        model, state = task.new_model()
        opt = bench.build_optimizer(model, 0.01, True, s.micro, task)
        if name == "warm":
            opt.load_state_dict(state)
        gen = torch.Generator().manual_seed(0)
        for m in range(8):
            (task.loss(model, torch.arange(m * s.micro, (m + 1) * s.micro), gen) / 8).backward()
        opt.step()
        stats[name] = opt.noise_stats()
    assert stats["fresh"]["b_simple"] == stats["warm"]["b_simple"]
    assert math.isclose(stats["fresh"]["b_simple_ema"], stats["fresh"]["b_simple"], rel_tol=1e-6)
    assert not math.isclose(stats["warm"]["b_simple_ema"], stats["warm"]["b_simple"], rel_tol=1e-3)
