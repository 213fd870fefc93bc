"""The tests' multi-rank harness is :mod:`vrgd_ds.multiproc` (benchmarks use it too, and scripts
do not import from tests/); this module keeps ``from .multiproc import run_ranks`` working."""

from vrgd_ds.multiproc import free_port, run_ranks

__all__ = ["free_port", "run_ranks"]
