"""The parts of ``pretrain_bert.py`` that are not its training loop, one job per module.

- :mod:`pretraining.args`: the command line and the checks that run before any process group.
- :mod:`pretraining.data`: documents -> sentencepiece -> fixed-length sequences cached on disk,
  and BERT's masking as a pure function of (seed, phase, step, micro-batch).
- :mod:`pretraining.model`: the BERT sizes, the model and its DeepSpeed engine.
- :mod:`pretraining.metrics`: ``metrics.csv`` and the per-step log (GSNR and noise statistics).
- :mod:`pretraining.checkpoints`: checkpoint tags, save and load.
- :mod:`pretraining.distributed`: process group, rank-0 logging, rank 0 first then all.
"""


class InputError(Exception):
    """Bad input, found before training: reported without a traceback, the same on every rank."""
