"""``--batch-schedule critical``: each phase's global batch follows the measured critical batch.

The phase starts at its config's ``train_batch_size`` (micro-batch fixed) and
:class:`vrgd_ds.CriticalBatch` grows it towards ``--critical-scale`` × B_simple (the optimizer's
``b_simple_ema``) within [``--critical-min-batch``, ``--critical-max-batch``], changing the
accumulation steps through ``engine.set_train_batch_size`` and the LR by ``--critical-lr-rule`` on
top of the config's scheduler. A phase is still ``--phaseN-steps`` optimizer steps: it sees more
samples as the batch grows. The schedule's state rides in the checkpoints; phase 2 starts a fresh
schedule at its own config's batch.
"""

from __future__ import annotations

import vrgd_ds
from pretraining import InputError
from vrgd_ds.critical_batch import LR_RULES, CriticalBatch


#: CriticalBatch's option names -> the flags that set them (named in error messages).
FLAGS = {
    "min_batch": "--critical-min-batch",
    "max_batch": "--critical-max-batch",
    "scale": "--critical-scale",
    "interval": "--critical-interval",
    "max_factor": "--critical-max-factor",
    "warmup_steps": "--critical-warmup",
}


def add_arguments(parser) -> None:
    g = parser.add_argument_group("batch schedule")
    g.add_argument(
        "--batch-schedule",
        choices=("fixed", "critical"),
        default="fixed",
        help="fixed: the config's train_batch_size throughout; critical: start there and follow the measured "
        "critical batch (B_simple) with vrgd_ds.CriticalBatch (needs a vrgd_ds optimizer)",
    )
    g.add_argument("--critical-min-batch", type=int, default=None, help="default: the config's train_batch_size")
    g.add_argument("--critical-max-batch", type=int, default=None, help="default: 16 x the config's train_batch_size")
    g.add_argument("--critical-scale", type=float, default=1.0, help="target batch = SCALE x B_simple (default 1)")
    g.add_argument("--critical-interval", type=int, default=100, help="steps between batch changes (default 100)")
    g.add_argument("--critical-warmup", type=int, default=100, help="steps of noise statistics before the first change")
    g.add_argument("--critical-max-factor", type=float, default=2.0, help="most a change multiplies the batch by")
    g.add_argument("--critical-lr-rule", choices=LR_RULES, default="mccandlish", help="LR factor on each change")


def build(args, phase, world_size: int) -> CriticalBatch | None:
    """The phase's schedule (None for ``--batch-schedule fixed``); an InputError for bad options."""
    if args.batch_schedule != "critical":
        return None
    name = phase.config.get("optimizer", {}).get("type", "")
    if name.lower() not in vrgd_ds.OPTIMIZERS:
        raise InputError(
            f"--batch-schedule critical reads the noise scale of a vrgd_ds optimizer; {phase.config_path} uses "
            f'{name or "a client optimizer"}. Use e.g. "type": "VRLamb" ("vr": false for plain LAMB).'
        )
    tbs = phase.train_batch_size
    try:
        return CriticalBatch(
            phase.micro_batch_size,
            tbs if args.critical_min_batch is None else args.critical_min_batch,
            16 * tbs if args.critical_max_batch is None else args.critical_max_batch,
            data_parallel_size=world_size,
            initial_batch=tbs,
            scale=args.critical_scale,
            interval=args.critical_interval,
            max_factor=args.critical_max_factor,
            warmup_steps=args.critical_warmup,
            lr_rule=args.critical_lr_rule,
        )
    except ValueError as err:
        message = str(err).rstrip(".")
        flags = [flag for option, flag in FLAGS.items() if option in message]
        hint = f" ({', '.join(flags)})" if flags else ""
        raise InputError(f"--batch-schedule critical, phase {phase.number}: {message}{hint}.") from None
