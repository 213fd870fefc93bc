r"""A global batch that follows the critical batch: grow it with the measured noise scale.

McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training", arXiv 1812.06162, §2):
reaching a given loss at batch B takes about

.. math::
    S = S_{\min}\,(1 + B_\text{simple}/B)\ \text{steps},\qquad
    E = E_{\min}\,(1 + B/B_\text{simple})\ \text{examples},

so B ≈ B_simple balances the two (2·S_min steps, 2·E_min examples). B_simple grows as the loss
falls (≈ 30–100 examples at initialization to several hundred later in this project's runs), so a
fixed batch is too large early or too small late. :class:`CriticalBatch` proposes, once per
optimizer step, the next global batch from the optimizer's ``noise_stats()["b_simple_ema"]``:

* target B = ``scale`` · B_simple, rounded to whole micro-batches × data-parallel ranks and
  clamped to [``min_batch``, ``max_batch``];
* no change before ``warmup_steps`` steps with a valid estimate, then at most one change every
  ``interval`` steps, by at most ``max_factor`` per change, and only when the target is at least
  ``min_change`` (relative) away from the current batch — a noisy estimate cannot make it thrash;
* the learning rate follows ``lr_rule`` on each change, as a factor on top of the user's LR
  schedule (1 at ``lr_reference_batch``, by default the initial batch):

  ==============  ==========================================================================
  ``"none"``      f = 1
  ``"linear"``    f = B / B_ref
  ``"sqrt"``      f = √(B / B_ref)
  ``"mccandlish"`` f = ε(B) / ε(B_ref) with ε(B) = ε_max / (1 + B_simple/B) (McCandlish §2.1,
                  the optimal SGD step at batch B): (1 + B_simple/B_ref) / (1 + B_simple/B),
                  B_simple the estimate at the change — linear scaling far below B_simple,
                  saturating above it
  ==============  ==========================================================================

The class is pure (no DeepSpeed import): :meth:`CriticalBatch.update` takes a ``noise_stats()``
dict and returns whether the batch changed. The glue is thin:

* **DeepSpeed**: :meth:`CriticalBatch.attach` once (after ``deepspeed.initialize``, after a
  checkpoint load), then :meth:`CriticalBatch.step` after each optimizer step; it calls
  ``engine.set_train_batch_size(B)`` (micro-batch fixed, the accumulation steps change) and
  keeps the LR factor on the param groups across DeepSpeed's LR scheduler, which rewrites the
  group LR every step (:class:`ScaledLRScheduler` wraps it). :func:`save_checkpoint` /
  :func:`load_checkpoint` carry the schedule in the engine checkpoint's client state.
* **plain PyTorch**: :meth:`CriticalBatch.step` on the optimizer (and
  :meth:`CriticalBatch.wrap_lr_scheduler` for a torch LR scheduler);
  :attr:`CriticalBatch.accumulation_steps` says how many micro-batches each rank runs next step.

Example (DeepSpeed)::

    engine, *_ = deepspeed.initialize(model=model, config=config)   # a vrgd_ds optimizer
    schedule = CriticalBatch.for_engine(engine, min_batch=256, max_batch=65536)
    schedule.attach(engine)
    for step in range(steps):
        for _ in range(engine.gradient_accumulation_steps()):
            engine.backward(engine(next(batches)))
            engine.step()
        schedule.step(engine)      # may change engine.gradient_accumulation_steps() and the LR
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping

__all__ = [
    "LR_RULES",
    "CriticalBatch",
    "ScaledLRScheduler",
    "load_checkpoint",
    "lr_rule_factor",
    "save_checkpoint",
    "set_train_batch_size",
]

#: The learning-rate rules a batch change can follow (see the module docstring).
LR_RULES = ("mccandlish", "sqrt", "linear", "none")
#: Key of the schedule's state in a DeepSpeed checkpoint's client state.
CLIENT_STATE_KEY = "critical_batch"


def lr_rule_factor(rule: str, batch: float, reference_batch: float, b_simple: float | None = None) -> float:
    r"""The LR factor of ``rule`` at batch ``batch`` relative to ``reference_batch`` (1 there).

    ``"mccandlish"``: ε(B)/ε(B_ref) with ε(B) = ε_max/(1 + B_simple/B) (McCandlish et al. 2018,
    §2.1, eq. 2.6), i.e. (1 + B_simple/B_ref)/(1 + B_simple/B); needs a positive ``b_simple``.
    ``"sqrt"``: √(B/B_ref); ``"linear"``: B/B_ref; ``"none"``: 1.
    """
    if rule == "none":
        return 1.0
    if rule == "linear":
        return batch / reference_batch
    if rule == "sqrt":
        return math.sqrt(batch / reference_batch)
    if rule == "mccandlish":
        if b_simple is None or not (math.isfinite(b_simple) and b_simple > 0):
            raise ValueError(f"lr_rule 'mccandlish' needs a positive finite B_simple, got {b_simple!r}.")
        return (1.0 + b_simple / reference_batch) / (1.0 + b_simple / batch)
    raise ValueError(f"Invalid lr_rule: {rule!r}; choose one of {', '.join(map(repr, LR_RULES))}.")


def _positive_int(name: str, value, minimum: int = 1, fix: str = "") -> int:
    try:
        ok = not isinstance(value, bool) and operator.index(value) >= minimum
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"Invalid {name}: {value!r}; it must be an int >= {minimum}{fix}.")
    return operator.index(value)


def _positive_float(name: str, value, above: float = 0.0, fix: str = "") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > above):
        raise ValueError(f"Invalid {name}: {value!r}; it must be a finite number > {above:g}{fix}.")
    return float(value)


def _valid_b_simple(stats: Mapping | None) -> float | None:
    if not stats:
        return None
    value = stats.get("b_simple_ema")
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


class CriticalBatch:
    r"""A global batch size that follows ``scale`` × B_simple (the measured critical batch).

    Call :meth:`update` (pure) or :meth:`step` (also applies the change to a DeepSpeed engine
    or an optimizer) once per optimizer step, after the step, with the optimizer's
    ``noise_stats()``. Changes take effect from the next step.

    Args:
        micro_batch_size: examples per micro-batch per rank (DeepSpeed's
            ``train_micro_batch_size_per_gpu``); fixed.
        min_batch, max_batch: bounds of the global batch (examples per optimizer step, all ranks
            and accumulation steps); multiples of ``micro_batch_size × data_parallel_size``.
        data_parallel_size: data-parallel ranks (default 1). A batch is a whole number of
            micro-batches on every rank: the granule is ``micro_batch_size × data_parallel_size``.
        initial_batch: the batch of the first steps (default ``min_batch``).
        scale: c in target = c · B_simple (default 1: McCandlish's balance point, 2·S_min steps
            and 2·E_min examples; c < 1 saves examples, c > 1 steps).
        interval: at least this many steps between two changes (default 100: the window of the
            optimizers' noise EMA, ``noise_ema_decay=0.99``).
        max_factor: a change multiplies or divides the batch by at most this (default 2).
        warmup_steps: no change before this many steps with a valid ``b_simple_ema`` (default
            100, the EMA's window).
        min_change: no change while |target / batch − 1| < this (default 0.1).
        lr_rule: ``"mccandlish"`` (default), ``"sqrt"``, ``"linear"`` or ``"none"``: the LR
            factor on each change (module docstring).
        lr_reference_batch: the batch at which the user's LR schedule applies unscaled (factor 1;
            default ``initial_batch``).
        allow_decrease: whether the batch may shrink when B_simple falls (default True).
    Raises:
        ValueError: an option out of range; the message says which and how to fix it.
    """

    def __init__(
        self,
        micro_batch_size: int,
        min_batch: int,
        max_batch: int,
        *,
        data_parallel_size: int = 1,
        initial_batch: int | None = None,
        scale: float = 1.0,
        interval: int = 100,
        max_factor: float = 2.0,
        warmup_steps: int = 100,
        min_change: float = 0.1,
        lr_rule: str = "mccandlish",
        lr_reference_batch: float | None = None,
        allow_decrease: bool = True,
    ):
        self.micro_batch_size = _positive_int("micro_batch_size", micro_batch_size)
        self.data_parallel_size = _positive_int("data_parallel_size", data_parallel_size)
        self.granule = self.micro_batch_size * self.data_parallel_size
        self.min_batch = self._check_batch("min_batch", min_batch)
        self.max_batch = self._check_batch("max_batch", max_batch)
        if self.min_batch > self.max_batch:
            raise ValueError(f"min_batch {self.min_batch} > max_batch {self.max_batch}: swap them or widen the range.")
        if self.min_batch // self.micro_batch_size < 2:
            raise ValueError(
                f"min_batch {self.min_batch} gives k = {self.min_batch // self.micro_batch_size} gradient sample(s) "
                f"per step; the noise statistics need k >= 2: use min_batch >= {2 * self.micro_batch_size} "
                f"(2 x micro_batch_size) or a smaller micro-batch."
            )
        if initial_batch is None:
            initial_batch = self.min_batch
        initial_batch = self._check_batch("initial_batch", initial_batch)
        if not self.min_batch <= initial_batch <= self.max_batch:
            raise ValueError(
                f"initial_batch {initial_batch} is outside [min_batch, max_batch] = "
                f"[{self.min_batch}, {self.max_batch}]; widen the range or pick a batch inside it."
            )
        self.scale = _positive_float("scale", scale, fix=" (target batch = scale x B_simple; 1 is the balance point)")
        self.interval = _positive_int("interval", interval, fix=" (steps between batch changes)")
        self.max_factor = _positive_float(
            "max_factor", max_factor, above=1.0, fix=" (the most a change multiplies the batch by, e.g. 2)"
        )
        self.warmup_steps = _positive_int(
            "warmup_steps", warmup_steps, minimum=0, fix=" (steps of noise statistics before the first change)"
        )
        if isinstance(min_change, bool) or not isinstance(min_change, (int, float)) or not 0.0 <= min_change < 1.0:
            raise ValueError(
                f"Invalid min_change: {min_change!r}; it must be in [0, 1) (the relative distance to the target "
                "below which the batch is kept, e.g. 0.1)."
            )
        self.min_change = float(min_change)
        if lr_rule not in LR_RULES:
            raise ValueError(f"Invalid lr_rule: {lr_rule!r}; choose one of {', '.join(map(repr, LR_RULES))}.")
        self.lr_rule = lr_rule
        self.lr_reference_batch = (
            float(initial_batch)
            if lr_reference_batch is None
            else _positive_float("lr_reference_batch", lr_reference_batch, fix=" (examples)")
        )
        self.allow_decrease = bool(allow_decrease)

        if self.lr_rule == "mccandlish" and initial_batch != self.lr_reference_batch:
            raise ValueError(
                "lr_rule 'mccandlish' needs lr_reference_batch == initial_batch (B_simple is not known "
                "before the first step); leave lr_reference_batch unset, or use another lr_rule."
            )
        self.batch_size = initial_batch
        self.lr_factor = (
            1.0
            if self.lr_rule == "mccandlish"
            else lr_rule_factor(self.lr_rule, initial_batch, self.lr_reference_batch)
        )
        self.steps = 0  # update() calls: optimizer steps observed
        self.valid_steps = 0  # of which with a valid b_simple_ema
        self.last_change = 0  # the step of the last change (0: none yet)
        self.b_simple: float | None = None  # the last valid b_simple_ema seen
        self.history: list[dict] = [
            {"step": 0, "batch": self.batch_size, "lr_factor": self.lr_factor, "b_simple": None}
        ]
        # LR glue (:meth:`attach`, :class:`ScaledLRScheduler`): the group LRs the user's schedule
        # set, before the factor; None until the schedule first touches an optimizer.
        self.base_lrs: list[float] | None = None

    @classmethod
    def for_engine(cls, engine, min_batch: int, max_batch: int, **kwargs) -> CriticalBatch:
        """A schedule for a DeepSpeed engine: micro-batch, data-parallel size and initial batch
        (its current train batch size, unless ``initial_batch`` is given) read from it."""
        kwargs.setdefault("initial_batch", engine.train_batch_size())
        return cls(
            engine.train_micro_batch_size_per_gpu(),
            min_batch,
            max_batch,
            data_parallel_size=engine.dp_world_size,
            **kwargs,
        )

    def _check_batch(self, name: str, value) -> int:
        value = _positive_int(name, value, fix=" (examples per optimizer step)")
        if value % self.granule:
            lo = max(self.granule, value // self.granule * self.granule)
            raise ValueError(
                f"Invalid {name}: {value} is not a multiple of micro_batch_size x data_parallel_size = "
                f"{self.micro_batch_size} x {self.data_parallel_size} = {self.granule}; "
                f"use {lo} or {lo + self.granule}."
            )
        return value

    # ---- the pure schedule -------------------------------------------------------------------
    @property
    def accumulation_steps(self) -> int:
        """Micro-batches each rank runs per optimizer step at the current batch."""
        return self.batch_size // self.granule

    def target(self, b_simple: float) -> int:
        """scale × b_simple, rounded to the nearest whole granule, clamped to [min_batch, max_batch]."""
        granules = max(1, round(self.scale * b_simple / self.granule))
        return min(self.max_batch, max(self.min_batch, granules * self.granule))

    def propose(self, b_simple: float) -> int:
        """The batch a change would go to now: :meth:`target` limited to a factor ``max_factor``
        of the current batch (moving by at least one granule towards the target)."""
        current, target = self.batch_size, self.target(b_simple)
        if target > current:
            capped = int(current * self.max_factor) // self.granule * self.granule
            return min(target, max(capped, current + self.granule))
        if target < current:
            capped = -(-int(math.ceil(current / self.max_factor)) // self.granule) * self.granule
            return max(target, min(capped, current - self.granule))
        return current

    def update(self, noise_stats: Mapping | None) -> bool:
        """Observe one optimizer step's ``noise_stats()``; returns True when the batch changed
        (then :attr:`batch_size`, :attr:`accumulation_steps` and :attr:`lr_factor` are the next
        step's). A step without a valid ``b_simple_ema`` (none yet, NaN, ≤ 0) counts as a step
        but not towards the warm-up."""
        self.steps += 1
        b_simple = _valid_b_simple(noise_stats)
        if b_simple is None:
            return False
        self.valid_steps += 1
        self.b_simple = b_simple
        if self.valid_steps < self.warmup_steps or self.steps - self.last_change < self.interval:
            return False
        target = self.target(b_simple)
        if abs(target / self.batch_size - 1.0) < self.min_change or (
            target < self.batch_size and not self.allow_decrease
        ):
            return False
        new = self.propose(b_simple)
        if new == self.batch_size:
            return False
        self.batch_size = new
        self.lr_factor = lr_rule_factor(self.lr_rule, new, self.lr_reference_batch, b_simple)
        self.last_change = self.steps
        self.history.append({"step": self.steps, "batch": new, "lr_factor": self.lr_factor, "b_simple": b_simple})
        return True

    # ---- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain Python values (``torch.save`` / JSON friendly)."""
        return {
            "batch_size": self.batch_size,
            "lr_factor": self.lr_factor,
            "steps": self.steps,
            "valid_steps": self.valid_steps,
            "last_change": self.last_change,
            "b_simple": self.b_simple,
            "history": [dict(h) for h in self.history],
            "base_lrs": None if self.base_lrs is None else list(self.base_lrs),
        }

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Restore the schedule. The options stay this object's (the current configuration wins
        on resume); a saved batch that does not fit them (another world size or bounds) must be
        fixed by the caller — a ValueError says so."""
        missing = {"batch_size", "lr_factor", "steps", "valid_steps", "last_change", "history"} - set(state_dict)
        if missing:
            raise ValueError(f"Not a CriticalBatch state dict: missing {sorted(missing)}.")
        batch = int(state_dict["batch_size"])
        if batch % self.granule or not self.min_batch <= batch <= self.max_batch:
            raise ValueError(
                f"The saved batch {batch} does not fit this schedule (multiples of {self.granule} in "
                f"[{self.min_batch}, {self.max_batch}]): resume with the same micro-batch, data-parallel size and "
                f"bounds, or start a new schedule with initial_batch near {batch}."
            )
        self.batch_size = batch
        self.lr_factor = float(state_dict["lr_factor"])
        self.steps = int(state_dict["steps"])
        self.valid_steps = int(state_dict["valid_steps"])
        self.last_change = int(state_dict["last_change"])
        self.b_simple = None if state_dict.get("b_simple") is None else float(state_dict["b_simple"])
        self.history = [dict(h) for h in state_dict["history"]]
        base = state_dict.get("base_lrs")
        self.base_lrs = None if base is None else [float(v) for v in base]

    # ---- the glue: DeepSpeed engines and torch optimizers --------------------------------------
    def _write_lrs(self, param_groups) -> None:
        """Group LR = the user's schedule's LR × :attr:`lr_factor`."""
        if self.base_lrs is None:
            self.base_lrs = [float(g["lr"]) for g in param_groups]
        if len(self.base_lrs) != len(param_groups):
            raise ValueError(
                f"The schedule holds base LRs for {len(self.base_lrs)} param groups, the optimizer has "
                f"{len(param_groups)}: attach a fresh CriticalBatch to an optimizer with other groups."
            )
        for group, base in zip(param_groups, self.base_lrs):
            group["lr"] = base * self.lr_factor

    def attach(self, target) -> None:
        """Hook the schedule into a DeepSpeed engine (or a torch optimizer): the engine's batch is
        set to :attr:`batch_size`, its LR scheduler (if any) wrapped in a
        :class:`ScaledLRScheduler`, and the group LRs set to the user's × :attr:`lr_factor`.

        Call once after ``deepspeed.initialize``, and again after loading a checkpoint and this
        schedule's state (:func:`load_checkpoint` does both). Idempotent."""
        optimizer = _optimizer_of(target)
        if hasattr(target, "set_train_batch_size"):
            if target.train_micro_batch_size_per_gpu() != self.micro_batch_size or (
                target.dp_world_size != self.data_parallel_size
            ):
                raise ValueError(
                    f"The engine runs micro-batch {target.train_micro_batch_size_per_gpu()} on "
                    f"{target.dp_world_size} data-parallel rank(s); this schedule was built for "
                    f"{self.micro_batch_size} on {self.data_parallel_size}: build it with CriticalBatch.for_engine."
                )
            if target.train_batch_size() != self.batch_size:
                set_train_batch_size(target, self.batch_size)
            scheduler = getattr(target, "lr_scheduler", None)
            if scheduler is not None and not isinstance(scheduler, ScaledLRScheduler):
                target.lr_scheduler = ScaledLRScheduler(scheduler, self, optimizer)
            elif isinstance(scheduler, ScaledLRScheduler):
                scheduler.schedule = self
        self._write_lrs(optimizer.param_groups)

    def wrap_lr_scheduler(self, scheduler, optimizer=None) -> ScaledLRScheduler:
        """A torch / DeepSpeed LR scheduler whose LRs are multiplied by :attr:`lr_factor`
        (plain PyTorch; under DeepSpeed :meth:`attach` does this for the engine's scheduler)."""
        return ScaledLRScheduler(scheduler, self, optimizer if optimizer is not None else scheduler.optimizer)

    def step(self, target, noise_stats: Mapping | None = None) -> bool:
        """:meth:`update` from the optimizer's ``noise_stats()``, and apply a change: on a DeepSpeed
        engine ``engine.set_train_batch_size`` (call it after the step's last ``engine.step()``,
        at the accumulation boundary), and the new LR factor on the param groups. ``target``: the
        engine, or a torch optimizer (then run :attr:`accumulation_steps` micro-batches per rank
        next step). ``noise_stats``: default, read from the VR optimizer inside ``target``."""
        if noise_stats is None:
            from . import find_vr_optimizer

            vr = find_vr_optimizer(target)
            if vr is None:
                raise ValueError(
                    "CriticalBatch needs a vrgd_ds optimizer's noise_stats(): none found in "
                    f"{type(target).__name__}; pass noise_stats= or use a vrgd_ds optimizer."
                )
            noise_stats = vr.noise_stats()
        engine = target if hasattr(target, "set_train_batch_size") else None
        if engine is not None and engine.micro_steps % engine.gradient_accumulation_steps():
            raise RuntimeError(
                f"CriticalBatch.step(engine) was called {engine.micro_steps % engine.gradient_accumulation_steps()} "
                f"micro-batch(es) into an accumulation of {engine.gradient_accumulation_steps()}: call it once per "
                "optimizer step, after the step's last engine.step()."
            )
        if not self.update(noise_stats):
            return False
        if engine is not None:
            set_train_batch_size(engine, self.batch_size)
        self._write_lrs(_optimizer_of(target).param_groups)
        return True


def set_train_batch_size(engine, batch_size: int) -> None:
    """``engine.set_train_batch_size(batch_size)`` at an accumulation boundary, with DeepSpeed's
    micro-step counter realigned to the new accumulation count.

    DeepSpeed (0.19.8, engine.py ``is_gradient_accumulation_boundary``) finds the boundary as
    ``(micro_steps + 1) % gradient_accumulation_steps == 0`` on the micro-steps counted since the
    engine was built. ``set_train_batch_size`` changes the divisor but not the counter, so after
    6 micro-steps at gas 2, a change to gas 4 puts the next boundary after 2 micro-batches, not
    4: the first step at the new batch is cut short and every later step straddles two of the
    caller's steps (k, the update and the noise statistics all wrong). The counter is used for
    nothing else (it is not checkpointed: a resumed engine starts at 0), so it is rounded up to
    a multiple of the new accumulation count here.
    """
    gas_before = engine.gradient_accumulation_steps()
    if engine.micro_steps % gas_before:
        raise RuntimeError(
            f"set_train_batch_size called {engine.micro_steps % gas_before} micro-batch(es) into an accumulation "
            f"of {gas_before}: change the batch only between optimizer steps."
        )
    engine.set_train_batch_size(batch_size)
    gas = engine.gradient_accumulation_steps()
    engine.micro_steps = -(-engine.micro_steps // gas) * gas


def _optimizer_of(target):
    """The object whose ``param_groups`` the LR scheduler writes (engine.optimizer under DeepSpeed)."""
    optimizer = getattr(target, "optimizer", None)
    if optimizer is not None and hasattr(optimizer, "param_groups") and not hasattr(target, "param_groups"):
        return optimizer
    if hasattr(target, "param_groups"):
        return target
    raise ValueError(f"{type(target).__name__} has no param_groups: pass a DeepSpeed engine or a torch optimizer.")


class ScaledLRScheduler:
    """An LR scheduler whose group LRs are the inner scheduler's × ``schedule.lr_factor``.

    DeepSpeed's schedulers (WarmupLR, WarmupDecayLR, OneCycle, ...) and torch's closed-form ones
    overwrite ``group["lr"]`` at every step; chainable torch schedulers multiply it. Either way the
    inner scheduler must see its own LR, not the scaled one: :meth:`step` puts the user's LR back
    into the groups, steps the inner scheduler, records what it set as the schedule's base LRs and
    writes base × factor. The factor therefore survives every scheduler step and never compounds.
    Checkpoints: :meth:`state_dict` is the inner scheduler's (DeepSpeed saves it as usual); the
    base LRs and the factor are in the :class:`CriticalBatch` state.
    """

    def __init__(self, scheduler, schedule: CriticalBatch, optimizer):
        self.scheduler = scheduler
        self.schedule = schedule
        self.optimizer = optimizer

    def step(self, *args, **kwargs):
        groups = self.optimizer.param_groups
        if self.schedule.base_lrs is not None and len(self.schedule.base_lrs) == len(groups):
            for group, base in zip(groups, self.schedule.base_lrs):
                group["lr"] = base
        result = self.scheduler.step(*args, **kwargs)
        self.schedule.base_lrs = [float(g["lr"]) for g in groups]
        self.schedule._write_lrs(groups)
        return result

    def get_lr(self):
        """The LRs in use (the inner scheduler's × factor)."""
        return [g["lr"] for g in self.optimizer.param_groups]

    def get_last_lr(self):
        return self.get_lr()

    def state_dict(self):
        return self.scheduler.state_dict()

    def load_state_dict(self, state_dict):
        return self.scheduler.load_state_dict(state_dict)

    def __getattr__(self, name):  # anything else (last_batch_iteration, ...) is the inner scheduler's
        if name in ("scheduler", "schedule", "optimizer"):
            raise AttributeError(name)
        return getattr(self.scheduler, name)


def save_checkpoint(engine, save_dir, schedule: CriticalBatch, tag=None, client_state: Mapping | None = None, **kwargs):
    """``engine.save_checkpoint`` with the schedule's state in the client state (key
    ``"critical_batch"``)."""
    state = dict(client_state or {})
    state[CLIENT_STATE_KEY] = schedule.state_dict()
    return engine.save_checkpoint(save_dir, tag=tag, client_state=state, **kwargs)


def load_checkpoint(engine, load_dir, schedule: CriticalBatch, tag=None, **kwargs):
    """``engine.load_checkpoint``, then the schedule's state from the client state and
    :meth:`CriticalBatch.attach` (the engine's batch and the LR factor as they were at the save).
    Returns what ``engine.load_checkpoint`` returns: ``(path, client_state)``."""
    path, client_state = engine.load_checkpoint(load_dir, tag=tag, **kwargs)
    if path is not None:
        if not client_state or CLIENT_STATE_KEY not in client_state:
            raise ValueError(
                f"The checkpoint {path} has no {CLIENT_STATE_KEY!r} client state: it was not saved with "
                "vrgd_ds.critical_batch.save_checkpoint; attach a fresh schedule instead."
            )
        schedule.load_state_dict(client_state[CLIENT_STATE_KEY])
        schedule.attach(engine)
    return path, client_state
